//! vCPU threads and their exit handling.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and dispatches port I/O and MMIO
//! exits through the shared buses. vCPUs are stopped, paused and resumed
//! through their [`VcpuControl`]: it sets a flag and kicks each thread once with
//! [`VCPU_KICK_SIGNAL`], which the thread blocks except inside `KVM_RUN`, so the
//! kick makes `KVM_RUN` return `EINTR` whenever it lands (see [`control`]).
//!
//! Every vCPU keeps an [`ExitHistory`] of its last exits. With `KVM_CAP_SYNC_REGS`
//! KVM copies regs, sregs and events into `kvm_run` at each exit, so each record
//! carries the guest's RIP, CR2, CR3, ... without an ioctl; without the capability
//! the records have no guest state. A triple fault, internal error or final HLT
//! stops the VM with a [`CrashReport`]: the history plus the state read with
//! `KVM_GET_*` after the exit (which AMD SVM has already reset after a shutdown).

use iommu::sync::lock;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_bindings::{KVM_SYNC_X86_EVENTS, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::seccomp::{SeccompFilters, ThreadKind};

pub mod control;
mod crash;
mod history;

pub use control::{VcpuControl, VcpuControlError, VcpuRunState};
pub use crash::CrashReport;
pub use history::{
    Access, ExitHistory, ExitKind, ExitRecord, GuestState, PendingException, EXIT_HISTORY_LEN,
};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote `code` to the debug exit port.
    ExitPort(u32),
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 or triple-fault-free reboot path).
    Reset,
    /// The VMM was asked to stop through the API.
    Stopped,
    /// The vCPU halted with no way to wake up (KVM_EXIT_HLT).
    Halted {
        /// vCPU index.
        vcpu: u8,
        /// Guest RIP read after the exit.
        rip: u64,
        /// Exit history and guest state.
        report: Box<CrashReport>,
    },
    /// The guest crashed (triple fault / KVM_EXIT_SHUTDOWN).
    GuestCrash {
        /// vCPU index.
        vcpu: u8,
        /// Guest RIP read after the exit. On AMD SVM KVM resets the vCPU on a shutdown
        /// intercept, so this is the reset vector (0xfff0); the report has the last RIP
        /// known to be the guest's ([`CrashReport::last_known_state`]).
        rip: u64,
        /// Exit history and guest state.
        report: Box<CrashReport>,
    },
    /// KVM could not emulate the guest.
    InternalError {
        /// vCPU index.
        vcpu: u8,
        /// KVM internal error sub-code.
        suberror: u32,
        /// Guest RIP read after the exit.
        rip: u64,
        /// Exit history and guest state.
        report: Box<CrashReport>,
    },
    /// A KVM_RUN ioctl failed.
    RunFailed {
        /// vCPU index.
        vcpu: u8,
        /// errno.
        errno: i32,
    },
}

/// The first stop reason wins; later ones are ignored.
#[derive(Debug)]
pub struct ExitState {
    reason: Mutex<Option<VmExit>>,
    /// Signalled when a reason is recorded.
    pub evt: EventFd,
}

impl ExitState {
    /// Creates an empty exit state.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitState {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the event loop.
    pub fn request(&self, reason: VmExit) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            *r = Some(reason);
        }
        if let Err(e) = self.evt.write(1) {
            log::error!("vmm: cannot signal the exit event: {e}");
        }
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<VmExit> {
        lock(&self.reason).clone()
    }
}

/// Signal used to kick vCPU threads out of KVM_RUN.
#[allow(non_snake_case)]
pub fn VCPU_KICK_SIGNAL() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (process-wide, idempotent) no-op handler for the kick signal.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(VCPU_KICK_SIGNAL(), noop_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// What a vCPU thread needs to run.
pub struct VcpuRunner {
    /// vCPU index.
    pub index: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Called with the vector on KVM_EXIT_IOAPIC_EOI (split irqchip).
    pub eoi: Arc<dyn Fn(u8) + Send + Sync>,
    /// Where stop reasons go.
    pub exit: Arc<ExitState>,
    /// Stop, pause and resume of all vCPUs.
    pub control: Arc<VcpuControl>,
    /// Seccomp filters; the vCPU one is installed before the first KVM_RUN.
    pub seccomp: Arc<SeccompFilters>,
}

impl VcpuRunner {
    /// Starts the vCPU thread.
    pub fn spawn(mut self) -> std::io::Result<VcpuHandle> {
        let sync_regs = sync_regs_supported();
        if sync_regs {
            self.fd.set_sync_valid_reg(SyncReg::Register);
            self.fd.set_sync_valid_reg(SyncReg::SystemRegister);
            self.fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        }
        control::set_run_signal_mask(&self.fd)?;
        let control = self.control.clone();
        let index = self.index;
        let name = format!("iovmm_vcpu{index}");
        let vcpu = VcpuLoop {
            r: self,
            history: ExitHistory::default(),
            sync_regs,
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || vcpu.run())?;
        control.register(index, thread.as_pthread_t());
        Ok(VcpuHandle {
            thread,
            control,
            index,
        })
    }
}

/// Whether KVM copies regs, sregs and events into `kvm_run` at every exit
/// (`KVM_CAP_SYNC_REGS` with all three bits). Checked once per process, on the
/// thread that starts the vCPUs (before any seccomp filter applies to it).
fn sync_regs_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let wanted = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
        match Kvm::new() {
            Ok(kvm) => {
                let mask = kvm.check_extension_int(Cap::SyncRegs) as u32;
                log::debug!("vmm: KVM_CAP_SYNC_REGS = {mask:#x}");
                mask & wanted == wanted
            }
            Err(e) => {
                log::warn!("vmm: cannot check KVM_CAP_SYNC_REGS ({e}); no exit history RIPs");
                false
            }
        }
    })
}

/// Why an exit stops the VM.
enum Stop {
    Halted,
    Shutdown,
    Reset,
    PowerOff,
    Internal,
}

/// What one exit was and whether it stops the VM.
type Dispatched = (ExitKind, Option<Access>, Option<Stop>);

fn access(addr: u64, data: &[u8]) -> Option<Access> {
    Some(Access {
        addr,
        size: data.len() as u8,
    })
}

/// Dispatches one exit to the buses.
fn dispatch(exit: VcpuExit<'_>, pio: &Bus, mmio: &Bus, eoi: &dyn Fn(u8), index: u8) -> Dispatched {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(port as u64, data) {
                data.fill(0xff);
            }
            (ExitKind::PioIn, access(port as u64, data), None)
        }
        VcpuExit::IoOut(port, data) => {
            pio.write(port as u64, data);
            (ExitKind::PioOut, access(port as u64, data), None)
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                data.fill(0xff);
            }
            (ExitKind::MmioRead, access(addr, data), None)
        }
        VcpuExit::MmioWrite(addr, data) => {
            mmio.write(addr, data);
            (ExitKind::MmioWrite, access(addr, data), None)
        }
        VcpuExit::IoapicEoi(vector) => {
            eoi(vector);
            let a = Access {
                addr: vector as u64,
                size: 0,
            };
            (ExitKind::IoapicEoi, Some(a), None)
        }
        VcpuExit::Hlt => (ExitKind::Hlt, None, Some(Stop::Halted)),
        VcpuExit::Shutdown => (ExitKind::Shutdown, None, Some(Stop::Shutdown)),
        VcpuExit::SystemEvent(kind, _) => {
            let stop = match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Stop::Reset,
                _ => Stop::PowerOff,
            };
            (ExitKind::SystemEvent, None, Some(stop))
        }
        VcpuExit::InternalError => (ExitKind::InternalError, None, Some(Stop::Internal)),
        VcpuExit::FailEntry(..) => (ExitKind::FailEntry, None, Some(Stop::Internal)),
        VcpuExit::Intr => (ExitKind::Interrupted, None, None),
        other => {
            log::debug!("vcpu{index}: unhandled exit {other:?}");
            (ExitKind::Other, None, None)
        }
    }
}

/// A vCPU thread's loop state: the runner plus its exit history.
struct VcpuLoop {
    r: VcpuRunner,
    history: ExitHistory,
    /// Whether `kvm_run` carries sync regs after each exit.
    sync_regs: bool,
}

impl VcpuLoop {
    fn handle_exit(&mut self) -> Option<VmExit> {
        let r = &mut self.r;
        let (kind, access, stop) = match r.fd.run() {
            Ok(exit) => dispatch(exit, &r.pio, &r.mmio, &*r.eoi, r.index),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                control::take_pending_kicks();
                r.fd.set_kvm_immediate_exit(0);
                (ExitKind::Interrupted, None, None)
            }
            Err(e) => {
                return Some(VmExit::RunFailed {
                    vcpu: r.index,
                    errno: e.errno(),
                })
            }
        };
        self.record(kind, access);
        stop.map(|s| self.stop_reason(s))
    }

    /// Remembers an exit; the guest state comes from the sync-regs area (no ioctl).
    fn record(&mut self, kind: ExitKind, access: Option<Access>) {
        let state = self
            .sync_regs
            .then(|| GuestState::from_sync_regs(&self.r.fd.sync_regs()));
        self.history.push(ExitRecord {
            kind,
            access,
            state,
        });
    }

    fn stop_reason(&mut self, stop: Stop) -> VmExit {
        let vcpu = self.r.index;
        match stop {
            Stop::Reset => VmExit::Reset,
            Stop::PowerOff => VmExit::PowerOff,
            Stop::Halted => {
                let (rip, report) = self.report();
                VmExit::Halted { vcpu, rip, report }
            }
            Stop::Shutdown => {
                let (rip, report) = self.report();
                VmExit::GuestCrash { vcpu, rip, report }
            }
            Stop::Internal => {
                let suberror = self.suberror();
                let (rip, report) = self.report();
                VmExit::InternalError {
                    vcpu,
                    suberror,
                    rip,
                    report,
                }
            }
        }
    }

    /// The RIP read after the exit and the crash report.
    fn report(&self) -> (u64, Box<CrashReport>) {
        let after_exit = crash::read_state(&self.r.fd);
        let rip = after_exit.map_or(u64::MAX, |s| s.rip);
        let report = CrashReport {
            sync_regs: self.sync_regs,
            history: self.history.to_vec(),
            after_exit,
        };
        (rip, Box::new(report))
    }

    fn suberror(&mut self) -> u32 {
        let run = self.r.fd.get_kvm_run();
        if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: exit_reason says the `internal` member of the union is the valid one.
            unsafe { run.__bindgen_anon_1.internal.suberror }
        } else {
            u32::MAX
        }
    }

    fn run(mut self) {
        let index = self.r.index;
        let control = self.r.control.clone();
        // Reports Exited however the loop ends, a panic included.
        let _exited = ExitedGuard(control.clone(), index);
        if let Err(e) = self.enter() {
            log::error!("vcpu{index}: {e}; stopping the VM");
            self.r.exit.request(VmExit::Stopped);
        } else {
            control.report(index, VcpuRunState::Running);
            while control.checkpoint(index) {
                if let Some(reason) = self.handle_exit() {
                    log::debug!("vcpu{index}: stopping: {reason:?}");
                    self.r.exit.request(reason);
                    break;
                }
            }
        }
    }

    /// Blocks the kick signal outside KVM_RUN and installs the vCPU seccomp filter.
    fn enter(&self) -> Result<(), String> {
        control::block_kick_signal().map_err(|e| format!("cannot block the kick signal: {e}"))?;
        self.r
            .seccomp
            .apply(ThreadKind::Vcpu)
            .map_err(|e| e.to_string())
    }
}

/// Reports [`VcpuRunState::Exited`] for a vCPU when dropped.
struct ExitedGuard(Arc<VcpuControl>, u8);

impl Drop for ExitedGuard {
    fn drop(&mut self) {
        self.0.report(self.1, VcpuRunState::Exited);
    }
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    thread: JoinHandle<()>,
    control: Arc<VcpuControl>,
    index: u8,
}

impl VcpuHandle {
    /// Stops every vCPU of the VM (one kick each, see [`control`]), waits for this one's
    /// thread to leave its loop and joins it; gives up (and leaks the thread) after `timeout`.
    pub fn stop(self, timeout: Duration) -> bool {
        self.control.request_stop();
        if !self
            .control
            .wait_exited(self.index, Instant::now() + timeout)
        {
            log::error!("vmm: vCPU {} did not stop within {timeout:?}", self.index);
            return false;
        }
        self.thread.join().is_ok()
    }
}
