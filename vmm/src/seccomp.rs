//! Seccomp filters, one allow-list per kind of iovmm thread.
//!
//! # Threads and where their filter is installed
//!
//! | Kind | Thread | Installed |
//! | --- | --- | --- |
//! | [`ThreadKind::Vcpu`] | `iovmm_vcpuN` | first thing on the thread, before the first `KVM_RUN` |
//! | [`ThreadKind::EventLoop`] | `iovmm_main` | first thing on the thread, before the loop |
//! | [`ThreadKind::VirtioIommu`] | `iovmm_viommu` | first thing on the thread (device thread hook) |
//! | [`ThreadKind::VhostUserReq`] | `vhost-user-req` | first thing, before reading the back-end channel |
//! | [`ThreadKind::VhostUserCall`] | `vhost-user-call` | first thing on the thread |
//! | [`ThreadKind::VhostUserReconnect`] | `vhost-user-reconnect` | once the VMM set its thread hook, before it handles any disconnect |
//! | [`ThreadKind::VhostUserServer`] | `vhost-user-server` (`server=on`) | once the VMM set its thread hook, before it accepts a back end |
//! | [`ThreadKind::VhostNetIotlb`] | `vhost-net-iotlb` (`--net ...,iommu=on`) | first thing, before reading the vhost fd |
//! | [`ThreadKind::Api`] | the CLI's main thread | by the CLI after [`crate::Vmm::start`] |
//! | [`ThreadKind::ApiServer`] | `iovmm_api` (`--api-socket`, `--metrics`) | first thing on the thread, before it accepts a connection |
//!
//! A library caller's own thread is never filtered: [`crate::Vmm::start`] builds the VM there
//! (opening files, KVM, the vhost-user sockets and their feature negotiation) and the caller
//! keeps using it afterwards. Only threads iovmm creates are confined. An embedding tool may
//! confine its own thread with [`apply_to_current_thread`] and [`ThreadKind::Api`].
//!
//! # Inheritance
//!
//! Filters are inherited by threads created later and can only be made stricter (the kernel
//! runs every installed filter and the strictest answer wins). Device threads are created at
//! virtio activation, which runs on a vCPU thread, so they start under the vCPU filter. The
//! vCPU list therefore also allows what starting a thread and installing a filter needs
//! (`clone` with thread flags only, `prctl(PR_SET_NAME | PR_SET_NO_NEW_PRIVS)`,
//! `seccomp(SECCOMP_SET_MODE_FILTER)`) and every call of the device threads; each device
//! thread then installs its own, narrower list through the hook of [`devices::thread`]
//! ([`SeccompFilters::thread_hook`]). A unit test checks that every device list is a subset of
//! the vCPU list.
//!
//! # Soft denials
//!
//! Besides the allow-list, every thread gets a second filter that makes `clone3`, `open` and
//! `openat` fail with `ENOSYS` instead of killing the process: glibc then creates threads with
//! `clone` (whose flags the allow-list can check; `clone3` passes them in memory), and the few
//! library paths that open files lazily (glibc reading `/sys/devices/system/cpu/online` when
//! it sizes its malloc arenas, backtrace symbolization after a panic) fail gracefully. The
//! calls never reach the kernel either way.
//!
//! # Levels
//!
//! [`SeccompLevel::Trap`] (`--seccomp true`, the default) raises `SIGSYS` for any other call;
//! [`install_sigsys_reporter`] prints which call on which thread kind before the process dies.
//! [`SeccompLevel::Log`] lets the call through and the kernel logs it (`SECCOMP_RET_LOG`, see
//! `dmesg` / the audit log), which is how the lists were found. [`SeccompLevel::Off`] installs
//! nothing.
//!
//! Debug and release builds make slightly different calls (debug builds check every closed fd
//! with `fcntl(F_GETFD)`); the lists cover both.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::Arc;

use devices::thread::ThreadHook;
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a filter does with a call that is not on its thread's list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "LevelRepr", into = "LevelRepr")]
pub enum SeccompLevel {
    /// No filters (`--seccomp false`).
    Off,
    /// Allow and let the kernel log the call (`--seccomp log`).
    Log,
    /// Raise `SIGSYS`, which ends the process (`--seccomp true`, the default).
    #[default]
    Trap,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum LevelRepr {
    Bool(bool),
    Str(String),
}

impl TryFrom<LevelRepr> for SeccompLevel {
    type Error = SeccompError;
    fn try_from(r: LevelRepr) -> Result<Self, SeccompError> {
        match r {
            LevelRepr::Bool(true) => Ok(SeccompLevel::Trap),
            LevelRepr::Bool(false) => Ok(SeccompLevel::Off),
            LevelRepr::Str(s) => s.parse(),
        }
    }
}

impl From<SeccompLevel> for LevelRepr {
    fn from(l: SeccompLevel) -> Self {
        match l {
            SeccompLevel::Off => LevelRepr::Bool(false),
            SeccompLevel::Trap => LevelRepr::Bool(true),
            SeccompLevel::Log => LevelRepr::Str("log".into()),
        }
    }
}

impl FromStr for SeccompLevel {
    type Err = SeccompError;
    fn from_str(s: &str) -> Result<Self, SeccompError> {
        match s {
            "true" | "on" | "trap" => Ok(SeccompLevel::Trap),
            "log" => Ok(SeccompLevel::Log),
            "false" | "off" => Ok(SeccompLevel::Off),
            _ => Err(SeccompError::InvalidLevel(s.to_string())),
        }
    }
}

impl fmt::Display for SeccompLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompLevel::Off => "false",
            SeccompLevel::Log => "log",
            SeccompLevel::Trap => "true",
        })
    }
}

/// The kinds of threads iovmm runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The CLI's main thread once the VM runs: waits, prints, removes the API socket, exits.
    Api,
    /// `iovmm_api`: the HTTP control API server and the metrics line writer.
    ApiServer,
    /// `iovmm_main`: the event loop; stops the vCPUs and drops the machine.
    EventLoop,
    /// `iovmm_vcpuN`: KVM_RUN, PIO/MMIO dispatch, virtio activation (starts device threads).
    Vcpu,
    /// `iovmm_viommu`: the virtio-iommu request worker.
    VirtioIommu,
    /// `vhost-user-req`: the vhost-user back-end request (IOTLB miss) server.
    VhostUserReq,
    /// `vhost-user-call`: the vhost-user call eventfd relay.
    VhostUserCall,
    /// The vhost-user reconnect supervisor.
    VhostUserReconnect,
    /// The vhost-user server-mode supervisor: accepts the next back end.
    VhostUserServer,
    /// `vhost-net-iotlb`: serves the kernel's IOTLB misses on a vhost fd.
    VhostNetIotlb,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 10] = [
        ThreadKind::Api,
        ThreadKind::ApiServer,
        ThreadKind::EventLoop,
        ThreadKind::Vcpu,
        ThreadKind::VirtioIommu,
        ThreadKind::VhostUserReq,
        ThreadKind::VhostUserCall,
        ThreadKind::VhostUserReconnect,
        ThreadKind::VhostUserServer,
        ThreadKind::VhostNetIotlb,
    ];

    /// Short name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Api => "api",
            ThreadKind::ApiServer => "api server",
            ThreadKind::EventLoop => "event loop",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::VirtioIommu => "virtio-iommu worker",
            ThreadKind::VhostUserReq => "vhost-user back-end request",
            ThreadKind::VhostUserCall => "vhost-user call relay",
            ThreadKind::VhostUserReconnect => "vhost-user reconnect",
            ThreadKind::VhostUserServer => "vhost-user server",
            ThreadKind::VhostNetIotlb => "vhost-net IOTLB",
        }
    }
}

impl From<devices::thread::ThreadKind> for ThreadKind {
    fn from(k: devices::thread::ThreadKind) -> Self {
        match k {
            devices::thread::ThreadKind::VirtioIommu => ThreadKind::VirtioIommu,
            devices::thread::ThreadKind::VhostUserReq => ThreadKind::VhostUserReq,
            devices::thread::ThreadKind::VhostUserCall => ThreadKind::VhostUserCall,
            devices::thread::ThreadKind::VhostUserReconnect => ThreadKind::VhostUserReconnect,
            devices::thread::ThreadKind::VhostUserServer => ThreadKind::VhostUserServer,
            devices::thread::ThreadKind::VhostNetIotlb => ThreadKind::VhostNetIotlb,
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Seccomp errors.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// A seccomp level string was not understood.
    #[error("invalid seccomp level {0:?}: use true (trap), log or false")]
    InvalidLevel(String),
    /// A rule table did not compile; this is a bug in iovmm.
    #[error("the {kind} seccomp filter does not compile; this is a bug, please report it")]
    Compile {
        /// Thread kind.
        kind: ThreadKind,
        /// Cause.
        #[source]
        source: BackendError,
    },
    /// The kernel refused a filter.
    #[error("cannot install the {kind} seccomp filter; run with --seccomp false if this kernel has no seccomp")]
    Install {
        /// Thread kind.
        kind: ThreadKind,
        /// Cause.
        #[source]
        source: seccompiler::Error,
    },
    /// The filters could not be tried out on a probe thread.
    #[error("cannot try the seccomp filters on a probe thread")]
    Probe(#[source] io::Error),
}

/// KVM ioctl request numbers the filters allow (kvm-ioctls keeps its own private).
mod kvm {
    use kvm_bindings::{
        kvm_ioeventfd, kvm_irq_routing, kvm_irqfd, kvm_msi, kvm_regs, kvm_sregs, kvm_vcpu_events,
        KVMIO,
    };
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
    ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
}

/// Calls every iovmm thread makes: memory, locks, signals (vCPU kicks, the SIGSYS
/// reporter), time, logging, closing fds, thread exit.
const BASE: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_read,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_set_robust_list,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_writev,
];

/// Answered with ENOSYS by the soft-denial filter (see the module docs).
const SOFT_DENIED: &[i64] = &[libc::SYS_clone3, libc::SYS_open, libc::SYS_openat];

/// Allowed by every list so that the soft-denial filter answers them.
const FILE_OPEN: &[i64] = &[libc::SYS_open, libc::SYS_openat];

/// vhost-user socket I/O with bounded waits (main socket, back-end channel).
const SOCKET_IO: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_shutdown,
];

const EPOLL_WAIT: &[i64] = &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait];

/// Virtio activation on a vCPU thread: eventfds, epoll sets, the back-end channel
/// socketpair, and starting device threads (`clone3` is soft-denied, see the module docs).
const ACTIVATION: &[i64] = &[
    libc::SYS_clone3,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
];

/// `clone` flags that make a thread, not a process.
const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// One rule per allowed value of argument `arg`.
fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
    values
        .iter()
        .map(|&v| SeccompRule::new(vec![cond(arg, SeccompCmpOp::Eq, v)?]))
        .collect()
}

/// A rule that argument `arg` has none of the bits of `mask`.
fn arg_without(arg: u8, mask: u64) -> Result<Vec<SeccompRule>, BackendError> {
    Ok(vec![SeccompRule::new(vec![cond(
        arg,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )?])?])
}

fn allow(rules: &mut Rules, calls: &[i64]) {
    for &c in calls {
        rules.insert(c, Vec::new());
    }
}

/// fcntl commands, no-exec mappings, and signals to our own threads only.
fn base_rules() -> Result<Rules, BackendError> {
    let mut r = Rules::new();
    allow(&mut r, BASE);
    allow(&mut r, FILE_OPEN);
    let fcntl_cmds = [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
    ];
    let fcntl_cmds: Vec<u64> = fcntl_cmds.iter().map(|&c| c as u64).collect();
    r.insert(libc::SYS_fcntl, arg_in(1, &fcntl_cmds)?);
    r.insert(libc::SYS_mmap, arg_without(2, libc::PROT_EXEC as u64)?);
    r.insert(libc::SYS_mprotect, arg_without(2, libc::PROT_EXEC as u64)?);
    r.insert(
        libc::SYS_tgkill,
        arg_in(0, &[u64::from(std::process::id())])?,
    );
    Ok(r)
}

fn ioctls(requests: &[libc::c_ulong]) -> Result<Vec<SeccompRule>, BackendError> {
    arg_in(1, requests)
}

/// ioctls device threads make: MSIs for interrupts that have no irqfd.
fn device_ioctls() -> Vec<libc::c_ulong> {
    vec![kvm::KVM_SIGNAL_MSI()]
}

/// Thread creation with a filter of its own (vCPU threads start device
/// threads at activation, the reconnect supervisor its request server).
fn thread_start_rules(r: &mut Rules) -> Result<(), BackendError> {
    allow(r, ACTIVATION);
    let clone = cond(0, SeccompCmpOp::MaskedEq(THREAD_FLAGS), THREAD_FLAGS)?;
    r.insert(libc::SYS_clone, vec![SeccompRule::new(vec![clone])?]);
    r.insert(libc::SYS_socketpair, arg_in(0, &[libc::AF_UNIX as u64])?);
    let prctl = [libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64];
    r.insert(libc::SYS_prctl, arg_in(0, &prctl)?);
    let seccomp = [u64::from(libc::SECCOMP_SET_MODE_FILTER)];
    r.insert(libc::SYS_seccomp, arg_in(0, &seccomp)?);
    Ok(())
}

/// What both supervisors do on a new connection: renegotiate (socket I/O,
/// socket timeouts, fds), start the request server.
fn supervisor_rules(r: &mut Rules) -> Result<(), BackendError> {
    allow(r, SOCKET_IO);
    thread_start_rules(r)?;
    allow(r, &[libc::SYS_setsockopt, libc::SYS_getsockopt]);
    let mut io = device_ioctls();
    io.extend([libc::FIONBIO, libc::FIOCLEX]);
    r.insert(libc::SYS_ioctl, ioctls(&io)?);
    Ok(())
}

/// The reconnect supervisor: connect to the back end's Unix socket again.
fn reconnect_rules(r: &mut Rules) -> Result<(), BackendError> {
    supervisor_rules(r)?;
    r.insert(libc::SYS_socket, arg_in(0, &[libc::AF_UNIX as u64])?);
    allow(r, &[libc::SYS_connect]);
    Ok(())
}

/// The server-mode supervisor: accept the next back end on the socket the VMM bound before
/// the guest started. No `socket`, `bind` or `connect`.
fn server_rules(r: &mut Rules) -> Result<(), BackendError> {
    supervisor_rules(r)?;
    allow(r, &[libc::SYS_accept4]);
    Ok(())
}

/// The API server: accept connections on the socket bound before, non-blocking socket I/O,
/// `poll`; pause and resume kick vCPU threads (`tgkill`, in the base list). No `bind`,
/// `socket`, `connect`, `open` or thread creation.
fn api_server_rules(r: &mut Rules) -> Result<(), BackendError> {
    allow(r, SOCKET_IO);
    allow(r, &[libc::SYS_accept4]);
    // A shutdown presses the ACPI power button: its IOAPIC pin becomes an MSI.
    let io = [libc::FIONBIO, libc::FIOCLEX, kvm::KVM_SIGNAL_MSI()];
    r.insert(libc::SYS_ioctl, ioctls(&io)?);
    Ok(())
}

fn vcpu_rules(r: &mut Rules) -> Result<(), BackendError> {
    allow(r, EPOLL_WAIT);
    // Takes the pending kick signal after KVM_RUN returned EINTR (never blocks).
    allow(r, &[libc::SYS_rt_sigtimedwait]);
    allow(r, SOCKET_IO);
    thread_start_rules(r)?;
    let mut io = device_ioctls();
    io.extend([
        kvm::KVM_RUN(),
        // The crash report reads the vCPU state once, after a fatal exit.
        kvm::KVM_GET_REGS(),
        kvm::KVM_GET_SREGS(),
        kvm::KVM_GET_VCPU_EVENTS(),
        kvm::KVM_SET_GSI_ROUTING(),
        kvm::KVM_IRQFD(),
        kvm::KVM_IOEVENTFD(),
        libc::FIONBIO,
        libc::FIOCLEX,
    ]);
    // vhost-net activation and reset (and VHOST_RESET_OWNER for a VT-d unmap the kernel
    // refused).
    io.extend(devices::vhost_kernel::kern::runtime_ioctls());
    r.insert(libc::SYS_ioctl, ioctls(&io)?);
    Ok(())
}

/// The vhost-net IOTLB thread: `poll` and `read` on the vhost fd, `write` of UPDATEs (and of
/// INVALIDATEs when the bridge's record is full); MSIs for fault events; `VHOST_RESET_OWNER`
/// if the kernel refuses an INVALIDATE. No socket I/O, no thread creation.
fn vhost_net_iotlb_rules(r: &mut Rules) -> Result<(), BackendError> {
    allow(r, &[libc::SYS_poll, libc::SYS_ppoll]);
    let mut io = device_ioctls();
    io.push(devices::vhost_kernel::kern::reset_owner_ioctl());
    r.insert(libc::SYS_ioctl, ioctls(&io)?);
    Ok(())
}

/// The allow-list of `kind`: syscall number to rules (an empty rule list allows any
/// arguments; otherwise one matching rule is enough).
pub fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let build = || -> Result<Rules, BackendError> {
        let mut r = base_rules()?;
        match kind {
            ThreadKind::Api => allow(&mut r, &[libc::SYS_unlink, libc::SYS_unlinkat]),
            ThreadKind::ApiServer => api_server_rules(&mut r)?,
            ThreadKind::EventLoop => {
                allow(&mut r, EPOLL_WAIT);
                allow(&mut r, SOCKET_IO);
                allow(&mut r, &[libc::SYS_epoll_ctl]);
                let unregister = [kvm::KVM_IRQFD(), kvm::KVM_IOEVENTFD()];
                r.insert(libc::SYS_ioctl, ioctls(&unregister)?);
            }
            ThreadKind::Vcpu => vcpu_rules(&mut r)?,
            ThreadKind::VirtioIommu => {
                allow(&mut r, EPOLL_WAIT);
                allow(&mut r, SOCKET_IO);
                // VHOST_RESET_OWNER: a vhost-net kernel that refused an unmap's INVALIDATE.
                let mut io = device_ioctls();
                io.push(devices::vhost_kernel::kern::reset_owner_ioctl());
                r.insert(libc::SYS_ioctl, ioctls(&io)?);
            }
            ThreadKind::VhostUserReq => {
                allow(&mut r, SOCKET_IO);
                r.insert(libc::SYS_ioctl, ioctls(&device_ioctls())?);
            }
            ThreadKind::VhostUserCall => {
                allow(&mut r, &[libc::SYS_poll, libc::SYS_ppoll]);
                r.insert(libc::SYS_ioctl, ioctls(&device_ioctls())?);
            }
            ThreadKind::VhostUserReconnect => reconnect_rules(&mut r)?,
            ThreadKind::VhostUserServer => server_rules(&mut r)?,
            ThreadKind::VhostNetIotlb => vhost_net_iotlb_rules(&mut r)?,
        }
        // The logger asks whether stderr is a terminal (TCGETS) before it
        // writes a line, on whichever thread logs.
        r.entry(libc::SYS_ioctl)
            .or_default()
            .extend(ioctls(&[libc::TCGETS])?);
        Ok(r)
    };
    build().map_err(|source| SeccompError::Compile { kind, source })
}

fn target_arch() -> TargetArch {
    if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        TargetArch::x86_64
    }
}

/// The BPF programs for `kind` at `level`, in installation order (the soft-denial filter
/// first, then the allow-list); empty for [`SeccompLevel::Off`].
pub fn compile(kind: ThreadKind, level: SeccompLevel) -> Result<Vec<BpfProgram>, SeccompError> {
    let mismatch = match level {
        SeccompLevel::Off => return Ok(Vec::new()),
        SeccompLevel::Log => SeccompAction::Log,
        SeccompLevel::Trap => SeccompAction::Trap,
    };
    let err = |source| SeccompError::Compile { kind, source };
    let soft: Rules = SOFT_DENIED.iter().map(|&c| (c, Vec::new())).collect();
    let enosys = SeccompAction::Errno(libc::ENOSYS as u32);
    let soft =
        SeccompFilter::new(soft, SeccompAction::Allow, enosys, target_arch()).map_err(err)?;
    let main = SeccompFilter::new(rules(kind)?, mismatch, SeccompAction::Allow, target_arch())
        .map_err(err)?;
    Ok(vec![
        BpfProgram::try_from(soft).map_err(err)?,
        BpfProgram::try_from(main).map_err(err)?,
    ])
}

thread_local! {
    /// The kind whose filter this thread runs under, for the SIGSYS report.
    static CURRENT: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

fn install(kind: ThreadKind, programs: &[BpfProgram]) -> Result<(), SeccompError> {
    for p in programs {
        seccompiler::apply_filter(p).map_err(|source| SeccompError::Install { kind, source })?;
    }
    if !programs.is_empty() {
        CURRENT.with(|c| c.set(Some(kind)));
    }
    Ok(())
}

/// Compiles the filters of `kind` and installs them on the calling thread (for good: they
/// cannot be removed). Nothing happens with [`SeccompLevel::Off`].
pub fn apply_to_current_thread(kind: ThreadKind, level: SeccompLevel) -> Result<(), SeccompError> {
    install(kind, &compile(kind, level)?)
}

/// The compiled filters of every thread kind, shared by the threads of one VM.
#[derive(Debug)]
pub struct SeccompFilters {
    level: SeccompLevel,
    programs: Vec<(ThreadKind, Vec<BpfProgram>)>,
}

impl SeccompFilters {
    /// Compiles every kind's filters for `level` and installs one set on a short-lived probe
    /// thread, so that a kernel (or container) that refuses them fails here, with an error,
    /// rather than later on a VM thread.
    pub fn new(level: SeccompLevel) -> Result<Arc<Self>, SeccompError> {
        let programs: Vec<(ThreadKind, Vec<BpfProgram>)> = ThreadKind::ALL
            .iter()
            .map(|&k| Ok((k, compile(k, level)?)))
            .collect::<Result<_, SeccompError>>()?;
        if let Some((kind, probe)) = programs.iter().find(|(_, p)| !p.is_empty()) {
            probe_install(*kind, probe.clone())?;
        }
        Ok(Arc::new(SeccompFilters { level, programs }))
    }

    /// The level the filters were compiled for.
    pub fn level(&self) -> SeccompLevel {
        self.level
    }

    /// Installs the filters of `kind` on the calling thread.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        match self.programs.iter().find(|(k, _)| *k == kind) {
            Some((_, p)) => install(kind, p),
            None => Ok(()),
        }
    }

    /// The hook device threads run first (see [`devices::thread`]); `None` when off.
    pub fn thread_hook(self: &Arc<Self>) -> Option<ThreadHook> {
        if self.level == SeccompLevel::Off {
            return None;
        }
        let filters = Arc::clone(self);
        Some(Arc::new(move |kind: devices::thread::ThreadKind| {
            filters.apply(kind.into()).map_err(io::Error::other)
        }))
    }
}

/// Installs `programs` on a throw-away thread and reports whether the kernel took them.
fn probe_install(kind: ThreadKind, programs: Vec<BpfProgram>) -> Result<(), SeccompError> {
    let probe = std::thread::Builder::new()
        .name("iovmm_seccomp".into())
        .spawn(move || install(kind, &programs))
        .map_err(SeccompError::Probe)?;
    probe
        .join()
        .map_err(|_| SeccompError::Probe(io::Error::other("the probe thread panicked")))?
}

mod report;

pub use report::install_sigsys_reporter;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DEVICE_KINDS: [ThreadKind; 4] = [
        ThreadKind::VirtioIommu,
        ThreadKind::VhostUserReq,
        ThreadKind::VhostUserCall,
        ThreadKind::VhostNetIotlb,
    ];

    #[test]
    fn every_kind_compiles_to_bpf_at_every_level() {
        for kind in ThreadKind::ALL {
            for level in [SeccompLevel::Trap, SeccompLevel::Log] {
                let progs = compile(kind, level).unwrap();
                assert_eq!(progs.len(), 2, "{kind} at {level}");
                for p in &progs {
                    assert!(!p.is_empty() && p.len() < 4096, "{kind}: {} insns", p.len());
                }
            }
            assert!(compile(kind, SeccompLevel::Off).unwrap().is_empty());
        }
        // The allow-list differs per kind.
        let vcpu = compile(ThreadKind::Vcpu, SeccompLevel::Trap).unwrap();
        let api = compile(ThreadKind::Api, SeccompLevel::Trap).unwrap();
        assert_eq!(vcpu[0], api[0]);
        assert!(vcpu[1].len() > api[1].len());
    }

    /// Device threads start under the vCPU filter (activation runs on vCPU threads), so
    /// anything they need must also pass the vCPU filter.
    #[test]
    fn device_lists_are_subsets_of_the_vcpu_list() {
        let vcpu = rules(ThreadKind::Vcpu).unwrap();
        for kind in DEVICE_KINDS {
            for (nr, dev_rules) in rules(kind).unwrap() {
                let Some(v) = vcpu.get(&nr) else {
                    panic!("{kind} allows syscall {nr}, which the vCPU filter blocks");
                };
                if v.is_empty() {
                    continue;
                }
                assert!(!dev_rules.is_empty(), "{kind}: {nr} is narrower on vCPUs");
                for r in &dev_rules {
                    assert!(
                        v.contains(r),
                        "{kind}: syscall {nr} rule {r:?} not on vCPUs"
                    );
                }
            }
        }
    }

    #[test]
    fn no_list_allows_processes_programs_or_new_sockets() {
        let forbidden = [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_bind,
            libc::SYS_ptrace,
            libc::SYS_kill,
            libc::SYS_mount,
            libc::SYS_rt_sigaction,
        ];
        let reconnect = ThreadKind::VhostUserReconnect;
        for kind in ThreadKind::ALL {
            let r = rules(kind).unwrap();
            for nr in forbidden {
                assert!(!r.contains_key(&nr), "{kind} allows syscall {nr}");
            }
            // Only the reconnect supervisor opens (Unix) sockets again.
            for nr in [libc::SYS_socket, libc::SYS_connect] {
                assert_eq!(r.contains_key(&nr), kind == reconnect, "{kind} {nr}");
            }
            // Only the API server and the vhost-user server supervisor accept connections, on
            // sockets bound before they start; only the CLI thread removes sockets at exit.
            let acceptor = kind == ThreadKind::ApiServer || kind == ThreadKind::VhostUserServer;
            assert_eq!(r.contains_key(&libc::SYS_accept4), acceptor, "{kind}");
            assert!(!r.contains_key(&libc::SYS_accept), "{kind}");
            assert_eq!(
                r.contains_key(&libc::SYS_unlink),
                kind == ThreadKind::Api,
                "{kind}"
            );
            let spawns = r.contains_key(&libc::SYS_clone);
            let spawner = kind == ThreadKind::Vcpu
                || kind == reconnect
                || kind == ThreadKind::VhostUserServer;
            assert_eq!(spawns, spawner, "{kind}");
            assert_eq!(r.contains_key(&libc::SYS_clone3), spawns, "{kind}");
        }
        assert!(
            rules(reconnect).unwrap()[&libc::SYS_socket].len() == 1,
            "AF_UNIX only"
        );
    }

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_abi() {
        assert_eq!(kvm::KVM_RUN(), 0xae80);
        assert_eq!(kvm::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(kvm::KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(kvm::KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(kvm::KVM_SIGNAL_MSI(), 0x4020_aea5);
        assert_eq!(kvm::KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(kvm::KVM_IRQFD(), 0x4020_ae76);
        assert_eq!(kvm::KVM_IOEVENTFD(), 0x4040_ae79);
    }

    #[test]
    fn levels_parse_from_the_cli_and_json() {
        assert_eq!("true".parse::<SeccompLevel>().unwrap(), SeccompLevel::Trap);
        assert_eq!("log".parse::<SeccompLevel>().unwrap(), SeccompLevel::Log);
        assert_eq!("false".parse::<SeccompLevel>().unwrap(), SeccompLevel::Off);
        let e = "kill".parse::<SeccompLevel>().unwrap_err().to_string();
        assert!(e.contains("\"kill\"") && e.contains("true"), "{e}");
        for (json, level) in [
            ("true", SeccompLevel::Trap),
            ("false", SeccompLevel::Off),
            ("\"log\"", SeccompLevel::Log),
        ] {
            let l: SeccompLevel = serde_json::from_str(json).unwrap();
            assert_eq!(l, level);
            assert_eq!(serde_json::to_string(&l).unwrap(), json);
            assert_eq!(l.to_string().parse::<SeccompLevel>().unwrap(), l);
        }
        assert!(serde_json::from_str::<SeccompLevel>("\"maybe\"").is_err());
        assert_eq!(SeccompLevel::default(), SeccompLevel::Trap);
    }

    #[test]
    fn filters_off_install_nothing_and_give_no_hook() {
        let f = SeccompFilters::new(SeccompLevel::Off).unwrap();
        assert!(f.thread_hook().is_none());
        f.apply(ThreadKind::Vcpu).unwrap();
        assert_eq!(CURRENT.with(|c| c.get()), None);
        let f = SeccompFilters::new(SeccompLevel::Log).unwrap();
        assert_eq!(f.level(), SeccompLevel::Log);
        assert!(f.thread_hook().is_some());
    }
}
