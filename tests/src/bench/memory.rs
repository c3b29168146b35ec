//! VMM memory per vCPU and per device (issue 16 item 5).
//!
//! Starts the release `iovmm` CLI on the fast test guest in a sequence of configurations and reads
//! `/proc/PID/status` while the guest is held at a defined point: iovmm's serial output goes to a
//! pipe the bench has filled beforehand, so the guest's first console line blocks the vCPU thread
//! in `write(1, ...)` (seen in `/proc/PID/task/TID/syscall`). For the `hello` guest that line comes
//! after its whole workload; for `net-rx` it comes after the driver set the device up (DRIVER_OK,
//! rings mapped through the vIOMMU when there is one). The status is read there, then the pipe is
//! drained, the line checked and iovmm killed.
//!
//! Guest RAM is one shared memfd, so the pages the guest touched count in `RssShmem`; `RssAnon`
//! is iovmm's private heap and stacks, `RssFile` its binary, libraries and the vCPUs' `kvm_run`
//! mappings. The per-vCPU and per-device costs are the differences of those fields between rows.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::backend::{BackendConfig, BackendHandle, TestBackend};
use crate::guest::{test_guest_path, IommuMode, Scenario};
use crate::matrix::{socket, temp_path};

/// Guest RAM of every row (the same as the boot RSS row of the bench).
pub const GUEST_MEMORY: &str = "256M";
/// How long the guest may take to reach its first console line (a loaded 2-core machine).
const HOLD_TIMEOUT: Duration = Duration::from_secs(60);
/// Size the bench asks for the serial pipe (one page: the least the kernel allows).
const PIPE_SIZE: libc::c_int = 4096;
/// Start of the guest's first line in the `hello` rows.
const HELLO_LINE: &str = "IOVMM-TEST hello ok";
/// Start of the guest's first line in the `net-rx` rows.
const NET_RX_LINE: &str = "IOVMM-TEST net-rx: queue";
/// Start of the guest's first line in the `net-mq` rows (after the APs started).
const NET_MQ_LINE: &str = "IOVMM-TEST net-mq:";

/// Why a memory row could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A field is missing from `/proc/PID/status` or is not `N kB`.
    #[error("/proc/PID/status has no `{0}:` line with a value")]
    MissingField(&'static str),
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What the bench was doing.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A test back end did not start.
    #[error("test back end on {path}: {message}")]
    Backend {
        /// Its socket.
        path: PathBuf,
        /// The error.
        message: String,
    },
    /// iovmm ended before the guest printed its first line.
    #[error("iovmm exited ({status}) before the guest's first console line; its stderr: {stderr}")]
    Exited {
        /// How it ended.
        status: std::process::ExitStatus,
        /// The end of its stderr.
        stderr: String,
    },
    /// iovmm was not held within `HOLD_TIMEOUT`.
    #[error("iovmm not held at the guest's first console line within {0:?}; last look: {1:?}")]
    Timeout(Duration, TaskScan),
    /// The line the guest was held at is not the expected one.
    #[error("the guest was held at {got:?}, expected a line starting with {want:?}")]
    WrongLine {
        /// The line.
        got: String,
        /// Its expected start.
        want: &'static str,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MemoryError {
    let what = what.into();
    move |source| MemoryError::Io { what, source }
}

/// The memory fields of `/proc/PID/status`, KiB, and the thread count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcMemory {
    /// Resident set (`VmRSS` = `RssAnon` + `RssFile` + `RssShmem`).
    pub vm_rss: u64,
    /// Peak resident set (`VmHWM`).
    pub vm_hwm: u64,
    /// Private anonymous memory: heap, stacks.
    pub rss_anon: u64,
    /// File-backed mappings: binary, libraries, `kvm_run`.
    pub rss_file: u64,
    /// Shared memory: the guest RAM memfd pages touched.
    pub rss_shmem: u64,
    /// Threads (`Threads:`; [`measure`] replaces it with iovmm's own, see [`TaskScan`]).
    pub threads: u64,
}

/// The number after `field:` in a `/proc/PID/status` text, with the unit after it (if any).
pub(crate) fn status_value<'a>(status: &'a str, field: &str) -> Option<(u64, Option<&'a str>)> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let n = words.next()?.parse().ok()?;
        Some((n, words.next()))
    })
}

fn kib(status: &str, field: &'static str) -> Result<u64, MemoryError> {
    match status_value(status, field) {
        Some((n, Some("kB"))) => Ok(n),
        _ => Err(MemoryError::MissingField(field)),
    }
}

impl ProcMemory {
    /// Parses the text of `/proc/PID/status`.
    pub fn parse(status: &str) -> Result<Self, MemoryError> {
        let threads = match status_value(status, "Threads") {
            Some((n, None)) => n,
            _ => return Err(MemoryError::MissingField("Threads")),
        };
        Ok(ProcMemory {
            vm_rss: kib(status, "VmRSS")?,
            vm_hwm: kib(status, "VmHWM")?,
            rss_anon: kib(status, "RssAnon")?,
            rss_file: kib(status, "RssFile")?,
            rss_shmem: kib(status, "RssShmem")?,
            threads,
        })
    }

    /// Field-wise median of `samples` (none: all zero).
    pub fn median(samples: &[ProcMemory]) -> ProcMemory {
        let m = |f: fn(&ProcMemory) -> u64| {
            let mut v: Vec<u64> = samples.iter().map(f).collect();
            v.sort_unstable();
            v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0)
        };
        ProcMemory {
            vm_rss: m(|p| p.vm_rss),
            vm_hwm: m(|p| p.vm_hwm),
            rss_anon: m(|p| p.rss_anon),
            rss_file: m(|p| p.rss_file),
            rss_shmem: m(|p| p.rss_shmem),
            threads: m(|p| p.threads),
        }
    }
}

/// One configuration of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemConfig {
    /// Its label in the table.
    pub label: &'static str,
    /// Index of the row it is compared with.
    pub base: Option<usize>,
    /// vCPUs.
    pub cpus: u8,
    /// `--iommu` argument.
    pub viommu: Option<&'static str>,
    /// vhost-user net devices (each on its own test back end).
    pub nets: usize,
    /// Queue pairs of each net device.
    pub queues: usize,
    /// The guest starts its APs and drives the device with `net-mq` (`iovmm.cpus` = `cpus`,
    /// `iovmm.queues` = `queues`) instead of `hello` / `net-rx` (APs never started).
    pub aps: bool,
}

const fn row(label: &'static str, base: Option<usize>, cpus: u8) -> MemConfig {
    MemConfig {
        label,
        base,
        cpus,
        viommu: None,
        nets: 0,
        queues: 1,
        aps: false,
    }
}

const fn mq_row(label: &'static str, base: Option<usize>, cpus: u8) -> MemConfig {
    MemConfig {
        nets: 1,
        queues: 4,
        aps: true,
        ..row(label, base, cpus)
    }
}

const VIRTIO: Option<&str> = Some("virtio");
const VTD: Option<&str> = Some("vtd,caching_mode=on");

/// The rows, in print order; each is compared with its `base`.
pub const MEM_CONFIGS: [MemConfig; 14] = [
    row("1 vCPU (hello)", None, 1),
    row("2 vCPUs", Some(0), 2),
    row("4 vCPUs", Some(1), 4),
    MemConfig {
        viommu: VIRTIO,
        ..row("+ virtio-iommu", Some(0), 1)
    },
    MemConfig {
        viommu: VTD,
        ..row("+ VT-d", Some(0), 1)
    },
    MemConfig {
        nets: 1,
        ..row("+ 1 net (net-rx)", Some(0), 1)
    },
    MemConfig {
        nets: 2,
        ..row("+ 2nd net", Some(5), 1)
    },
    MemConfig {
        nets: 1,
        queues: 2,
        ..row("1 net, queues=2", Some(5), 1)
    },
    MemConfig {
        viommu: VIRTIO,
        nets: 1,
        ..row("virtio-iommu + 1 net", Some(3), 1)
    },
    MemConfig {
        viommu: VIRTIO,
        nets: 2,
        ..row("virtio-iommu + 2nd net", Some(8), 1)
    },
    MemConfig {
        viommu: VTD,
        nets: 1,
        ..row("VT-d + 1 net", Some(4), 1)
    },
    mq_row("net-mq, 1 net queues=4, 1 vCPU", None, 1),
    mq_row("2 vCPUs, AP started", Some(11), 2),
    mq_row("4 vCPUs, APs started", Some(12), 4),
];

impl MemConfig {
    /// The guest's command line: `hello` without a device, else `net-rx` waiting for one frame
    /// the back end never sends (the bench reads the status before the guest's wait begins).
    pub fn cmdline(&self) -> String {
        let mode = if self.viommu.is_some() {
            IommuMode::Strict
        } else {
            IommuMode::Off
        };
        let s = if self.aps {
            Scenario::net_mq(64, 256, self.queues as u64)
                .param("cpus", self.cpus)
                .iommu(mode)
        } else if self.nets == 0 {
            Scenario::hello()
        } else {
            Scenario::net_rx(1, 256).iommu(mode).timeout_ms(600_000)
        };
        s.cmdline().unwrap_or_default()
    }

    /// The start of the console line the guest is held at.
    pub fn held_line(&self) -> &'static str {
        if self.aps {
            NET_MQ_LINE
        } else if self.nets == 0 {
            HELLO_LINE
        } else {
            NET_RX_LINE
        }
    }

    /// iovmm's arguments besides the kernel and the command line.
    pub fn args(&self, sockets: &[PathBuf]) -> Vec<String> {
        let mut a = vec!["--memory".into(), GUEST_MEMORY.into(), "--cpus".into()];
        a.push(self.cpus.to_string());
        a.extend([
            "--serial".into(),
            "stdout".into(),
            "--log-level".into(),
            "error".into(),
        ]);
        if let Some(v) = self.viommu {
            a.extend(["--iommu".into(), v.into()]);
        }
        let iommu = if self.viommu.is_some() {
            ",iommu=on"
        } else {
            ""
        };
        for s in sockets {
            a.push("--vhost-user".into());
            a.push(format!(
                "net,socket={}{iommu},queues={}",
                s.display(),
                self.queues
            ));
        }
        a
    }
}

/// A pipe whose buffer is full: a write to `write` blocks until `read` is read from.
struct FullPipe {
    read: File,
    write: OwnedFd,
    filled: usize,
}

fn set_nonblocking(fd: &OwnedFd, on: bool) -> Result<(), MemoryError> {
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL on a descriptor we own, with flags it just reported.
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) } < 0 {
        return Err(io_err("fcntl(O_NONBLOCK) on the serial pipe")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

impl FullPipe {
    fn new() -> Result<Self, MemoryError> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io_err("pipe2")(std::io::Error::last_os_error()));
        }
        // SAFETY: pipe2 just returned these two descriptors; nothing else owns them.
        let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on a pipe we own; on failure the pipe keeps its default size and
        // is filled all the same.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        set_nonblocking(&write, true)?;
        let mut w = File::from(
            write
                .try_clone()
                .map_err(io_err("dup of the serial pipe"))?,
        );
        let chunk = [b'#'; 4096];
        let mut filled = 0;
        loop {
            match w.write(&chunk) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(io_err("filling the serial pipe")(e)),
            }
        }
        // O_NONBLOCK belongs to the open file, which iovmm inherits: clear it again.
        set_nonblocking(&write, false)?;
        Ok(FullPipe {
            read,
            write,
            filled,
        })
    }

    /// Reads the filler, then the first line iovmm wrote after it.
    fn release_line(mut self) -> Result<String, MemoryError> {
        drop(self.write);
        let mut filler = vec![0; self.filled];
        self.read
            .read_exact(&mut filler)
            .map_err(io_err("reading the pipe's filler"))?;
        let mut line = String::new();
        BufReader::new(self.read)
            .read_line(&mut line)
            .map_err(io_err("reading the guest's first line"))?;
        Ok(line.trim_end().to_string())
    }
}

/// Whether `syscall` (`/proc/PID/task/TID/syscall`) is a write(2) or writev(2) to fd 1.
pub fn blocked_on_stdout(syscall: &str) -> bool {
    let mut w = syscall.split_whitespace();
    matches!((w.next(), w.next()), (Some("1" | "20"), Some("0x1")))
}

/// The system call number a thread is blocked in (`None` while it runs: "running").
fn syscall_nr(syscall: &str) -> Option<u64> {
    syscall.split_whitespace().next()?.parse().ok()
}

/// epoll_wait, epoll_pwait, epoll_pwait2.
const EPOLL_WAITS: [u64; 3] = [232, 281, 441];

/// What one look at `/proc/PID/task` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TaskScan {
    /// iovmm's own threads (KVM's `kvm-*` kernel workers, which the kernel files under the
    /// process, are left out).
    pub threads: u64,
    /// Threads named `iovmm_vcpuN`.
    pub vcpus: u64,
    /// A thread is blocked writing fd 1 (the serial console).
    pub console_write: bool,
    /// `iovmm_main` waits in its event loop.
    pub event_loop: bool,
    /// Every thread but the vCPUs is blocked in a system call (none runs or is about to); a
    /// vCPU thread may run: a started AP waits for work spinning in the guest.
    pub all_blocked: bool,
}

impl TaskScan {
    /// Adds one thread given its `comm` and `syscall` files.
    pub fn add(&mut self, comm: &str, syscall: &str) {
        let comm = comm.trim();
        if comm.starts_with("kvm-") {
            return;
        }
        self.threads += 1;
        let nr = syscall_nr(syscall);
        let vcpu = comm.starts_with("iovmm_vcpu");
        self.all_blocked &= nr.is_some() || vcpu;
        self.vcpus += u64::from(vcpu);
        self.console_write |= blocked_on_stdout(syscall);
        self.event_loop |= comm == "iovmm_main" && nr.is_some_and(|n| EPOLL_WAITS.contains(&n));
    }

    /// iovmm is held: started (event loop and `cpus` vCPU threads), the guest blocked at its
    /// console line, and no thread left running.
    pub fn held(&self, cpus: u8) -> bool {
        self.console_write && self.event_loop && self.all_blocked && self.vcpus == u64::from(cpus)
    }

    fn of(pid: u32) -> TaskScan {
        let mut scan = TaskScan {
            all_blocked: true,
            ..Default::default()
        };
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return TaskScan::default();
        };
        for t in tasks.flatten() {
            let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let syscall = fs::read_to_string(t.path().join("syscall")).unwrap_or_default();
            scan.add(&comm, &syscall);
        }
        scan
    }
}

/// iovmm, killed when dropped.
struct Vmm {
    child: Child,
    stderr: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.stderr);
    }
}

impl Vmm {
    /// Waits until iovmm is held ([`TaskScan::held`]); returns its number of threads.
    fn wait_held(&mut self, cpus: u8) -> Result<u64, MemoryError> {
        let start = Instant::now();
        let pid = self.child.id();
        loop {
            let scan = TaskScan::of(pid);
            if scan.held(cpus) {
                return Ok(scan.threads);
            }
            if let Some(status) = self.child.try_wait().map_err(io_err("waitpid iovmm"))? {
                let text = fs::read_to_string(&self.stderr).unwrap_or_default();
                let stderr = text.lines().rev().take(5).collect::<Vec<_>>().join(" / ");
                return Err(MemoryError::Exited { status, stderr });
            }
            if start.elapsed() > HOLD_TIMEOUT {
                return Err(MemoryError::Timeout(HOLD_TIMEOUT, scan));
            }
            // Polls a condition with a deadline; no fixed delay stands in for it.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn start_backends(
    c: &MemConfig,
    tag: &str,
) -> Result<(Vec<PathBuf>, Vec<BackendHandle>), MemoryError> {
    let mut socks = Vec::new();
    let mut backends = Vec::new();
    for n in 0..c.nets {
        let path = socket(&format!("mem-{tag}-{n}"));
        let config = BackendConfig {
            queue_pairs: c.queues,
            ..Default::default()
        };
        let b = TestBackend::listen(&path, config).map_err(|e| MemoryError::Backend {
            path: path.clone(),
            message: e.to_string(),
        })?;
        socks.push(path);
        backends.push(b);
    }
    Ok((socks, backends))
}

/// Starts `iovmm` in configuration `c`, holds the guest at its first console line and returns
/// iovmm's `/proc/PID/status` memory fields there.
pub fn measure(iovmm: &Path, c: &MemConfig, tag: &str) -> Result<ProcMemory, MemoryError> {
    let (socks, backends) = start_backends(c, tag)?;
    let pipe = FullPipe::new()?;
    let stderr = temp_path(&format!("mem-{tag}"), "stderr");
    let err_file = File::create(&stderr).map_err(io_err(format!("create {}", stderr.display())))?;
    let out = pipe
        .write
        .try_clone()
        .map_err(io_err("dup of the serial pipe"))?;
    let mut cmd = Command::new(iovmm);
    cmd.arg("--kernel")
        .arg(test_guest_path())
        .args(["--cmdline", &c.cmdline()])
        .args(c.args(&socks))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err_file));
    let child = cmd
        .spawn()
        .map_err(io_err(format!("spawn {}", iovmm.display())))?;
    drop(cmd);
    let mut vmm = Vmm { child, stderr };
    let threads = vmm.wait_held(c.cpus)?;
    let path = format!("/proc/{}/status", vmm.child.id());
    let status = fs::read_to_string(&path).map_err(io_err(path))?;
    let mem = ProcMemory {
        threads,
        ..ProcMemory::parse(&status)?
    };
    let line = pipe.release_line()?;
    drop(vmm);
    drop(backends);
    for s in &socks {
        let _ = fs::remove_file(s);
    }
    if !line.starts_with(c.held_line()) {
        return Err(MemoryError::WrongLine {
            got: line,
            want: c.held_line(),
        });
    }
    Ok(mem)
}

/// iovmm with the `hello` guest held after its whole workload (row 1 of the table): the figure
/// the QEMU comparison uses. Not `ru_maxrss` from `wait4`: Linux carries the spawning process's
/// peak into the child's at `exec`, so a child of a bench process that has grown (guest memory
/// of earlier in-process cells) reported the bench's size, not iovmm's.
pub fn hello(iovmm: &Path) -> Result<ProcMemory, MemoryError> {
    measure(iovmm, &MEM_CONFIGS[0], "hello")
}

/// One measured row: the median of its runs.
#[derive(Debug, Clone)]
pub struct MemRow {
    /// The configuration.
    pub config: MemConfig,
    /// Median of the runs, or why it failed.
    pub result: Result<ProcMemory, String>,
    /// Smallest and largest `RssAnon` of the runs, KiB.
    pub anon_range: (u64, u64),
}

/// Measures every row of [`MEM_CONFIGS`] `reps` times (interleaved, so a slow minute of the
/// machine does not land on one row only) and keeps each row's field-wise median.
pub fn measure_all(iovmm: &Path, reps: usize) -> Vec<MemRow> {
    let mut samples: Vec<Result<Vec<ProcMemory>, String>> = vec![Ok(Vec::new()); MEM_CONFIGS.len()];
    for rep in 0..reps.max(1) {
        for (i, c) in MEM_CONFIGS.iter().enumerate() {
            let Ok(v) = &mut samples[i] else { continue };
            match measure(iovmm, c, &format!("{i}-{rep}")) {
                Ok(m) => v.push(m),
                Err(e) => samples[i] = Err(e.to_string()),
            }
        }
    }
    MEM_CONFIGS
        .iter()
        .zip(samples)
        .map(|(c, s)| {
            let anon = s.as_ref().map(|v| v.iter().map(|m| m.rss_anon)).ok();
            let anon_range = anon.map_or((0, 0), |a| {
                a.fold((u64::MAX, 0), |(lo, hi), x| (lo.min(x), hi.max(x)))
            });
            MemRow {
                config: *c,
                result: s.map(|v| ProcMemory::median(&v)),
                anon_range,
            }
        })
        .collect()
}

fn mib(kib: u64) -> String {
    format!("{:.2}", kib as f64 / 1024.0)
}

fn delta(a: u64, b: u64) -> String {
    format!("{:+}", a as i64 - b as i64)
}

/// The table, Markdown.
pub fn table(rows: &[MemRow]) -> String {
    let mut t = String::from(
        "| # | config | vs | threads | VmRSS MiB | RssAnon MiB | RssFile MiB | RssShmem MiB | VmHWM MiB | ΔRssAnon KiB | ΔRssFile KiB | ΔRssShmem KiB | RssAnon KiB min-max |\n\
         |---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (n, r) in rows.iter().enumerate() {
        let c = &r.config;
        let m = match &r.result {
            Ok(m) => m,
            Err(e) => {
                t += &format!(
                    "| {} | {} | | FAILED: {e} | | | | | | | | | |\n",
                    n + 1,
                    c.label
                );
                continue;
            }
        };
        let base = c
            .base
            .and_then(|b| rows.get(b))
            .and_then(|b| b.result.as_ref().ok());
        let (vs, da, df, ds) = match (c.base, base) {
            (Some(i), Some(b)) => (
                format!("#{}", i + 1),
                delta(m.rss_anon, b.rss_anon),
                delta(m.rss_file, b.rss_file),
                delta(m.rss_shmem, b.rss_shmem),
            ),
            _ => Default::default(),
        };
        t += &format!(
            "| {} | {} | {vs} | {} | {} | {} | {} | {} | {} | {da} | {df} | {ds} | {}-{} |\n",
            n + 1,
            c.label,
            m.threads,
            mib(m.vm_rss),
            mib(m.rss_anon),
            mib(m.rss_file),
            mib(m.rss_shmem),
            mib(m.vm_hwm),
            r.anon_range.0,
            r.anon_range.1,
        );
    }
    t
}

/// Measures and prints the section.
pub fn print_memory(iovmm: &Path, reps: usize) {
    println!(
        "\n== VMM memory per vCPU and per device (iovmm, fast test guest, {GUEST_MEMORY} RAM, \
         /proc/PID/status with the guest held at its first console line, median of {reps} runs)"
    );
    let rows = measure_all(iovmm, reps);
    println!("  (vs = the row the deltas are taken against; threads = iovmm's own)");
    print!("{}", table(&rows));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tiovmm-cli\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t  400000 kB\nVmHWM:\t    6120 kB\nVmRSS:\t    5880 kB\n\
        RssAnon:\t    1200 kB\nRssFile:\t    4100 kB\nRssShmem:\t     580 kB\n\
        VmData:\t  300000 kB\nThreads:\t6\nSigQ:\t0/63451\n";

    #[test]
    fn parses_the_memory_fields_and_threads() {
        let m = ProcMemory::parse(STATUS).unwrap();
        assert_eq!(
            m,
            ProcMemory {
                vm_rss: 5880,
                vm_hwm: 6120,
                rss_anon: 1200,
                rss_file: 4100,
                rss_shmem: 580,
                threads: 6,
            }
        );
        assert_eq!(m.rss_anon + m.rss_file + m.rss_shmem, m.vm_rss);
    }

    #[test]
    fn a_missing_or_unitless_field_is_an_error() {
        let no_anon = STATUS.replace("RssAnon:", "RssAnonX:");
        assert!(matches!(
            ProcMemory::parse(&no_anon),
            Err(MemoryError::MissingField("RssAnon"))
        ));
        let mb = STATUS.replace("5880 kB", "5880 MB");
        assert!(matches!(
            ProcMemory::parse(&mb),
            Err(MemoryError::MissingField("VmRSS"))
        ));
        let threads_kb = STATUS.replace("Threads:\t6", "Threads:\t6 kB");
        assert!(matches!(
            ProcMemory::parse(&threads_kb),
            Err(MemoryError::MissingField("Threads"))
        ));
        // "VmRSS" must not match a longer field name that starts with it.
        let only_prefix = "VmRSSx:\t1 kB\n";
        assert_eq!(kib(only_prefix, "VmRSS").ok(), None);
    }

    #[test]
    fn recognises_a_write_to_stdout_in_proc_syscall() {
        assert!(blocked_on_stdout(
            "1 0x1 0x7f00 0x14 0x0 0x0 0x0 0x7ffd 0x7f01\n"
        ));
        assert!(blocked_on_stdout(
            "20 0x1 0x7f00 0x2 0x0 0x0 0x0 0x7ffd 0x7f01\n"
        ));
        assert!(!blocked_on_stdout(
            "1 0x2 0x7f00 0x14 0x0 0x0 0x0 0x7ffd 0x7f01\n"
        ));
        assert!(!blocked_on_stdout(
            "16 0x1 0xae80 0x0 0x0 0x0 0x0 0x7ffd 0x7f01\n"
        ));
        assert!(!blocked_on_stdout("running\n"));
        assert!(!blocked_on_stdout(""));
    }

    #[test]
    fn held_only_when_started_blocked_at_the_console_and_quiet() {
        let mut s = TaskScan {
            all_blocked: true,
            ..Default::default()
        };
        s.add(
            "iovmm-cli\n",
            "202 0x7f 0x80 0x0 0x0 0x0 0x0 0x7ffd 0x7f01\n",
        );
        s.add(
            "iovmm_vcpu0\n",
            "1 0x1 0x7f00 0x14 0x0 0x0 0x0 0x7ffd 0x7f01\n",
        );
        s.add(
            "iovmm_vcpu1\n",
            "16 0xe 0xae80 0x0 0x0 0x0 0x0 0x7ffd 0x7f01\n",
        );
        assert!(!s.held(2), "no event loop yet: {s:?}");
        s.add("kvm-nx-lpage-re\n", "running\n");
        s.add(
            "iovmm_main\n",
            "232 0xf 0x7f 0x400 0xffffffff 0x0 0x0 0x7ffd 0x7f01\n",
        );
        assert!(s.held(2), "{s:?}");
        assert!(!s.held(4), "two vCPU threads missing");
        assert_eq!(s.threads, 4);
        s.add("iovmm_vcpu2\n", "running\n");
        assert!(s.held(3), "an AP spinning in the guest: {s:?}");
        s.add("vhost_user_dev\n", "running\n");
        assert!(!s.held(2), "a thread still runs");
        assert!(!TaskScan::default().held(0));
    }

    #[test]
    fn median_is_field_wise() {
        let a = ProcMemory {
            vm_rss: 3,
            rss_anon: 10,
            ..Default::default()
        };
        let b = ProcMemory {
            vm_rss: 1,
            rss_anon: 30,
            ..Default::default()
        };
        let c = ProcMemory {
            vm_rss: 2,
            rss_anon: 20,
            ..Default::default()
        };
        let m = ProcMemory::median(&[a, b, c]);
        assert_eq!((m.vm_rss, m.rss_anon), (2, 20));
        assert_eq!(ProcMemory::median(&[]), ProcMemory::default());
    }

    #[test]
    fn every_base_row_comes_before_its_row_and_rows_differ_in_one_thing() {
        for (i, c) in MEM_CONFIGS.iter().enumerate() {
            let Some(b) = c.base else { continue };
            assert!(b < i, "{}", c.label);
            let b = &MEM_CONFIGS[b];
            let changed = [
                c.cpus != b.cpus,
                c.viommu != b.viommu,
                c.nets != b.nets,
                c.queues != b.queues,
                c.aps != b.aps,
            ];
            assert_eq!(changed.iter().filter(|&&x| x).count(), 1, "{}", c.label);
        }
    }

    #[test]
    fn a_full_pipe_blocks_and_gives_back_the_next_line() {
        let pipe = FullPipe::new().unwrap();
        assert!(pipe.filled > 0);
        let mut w = File::from(pipe.write.try_clone().unwrap());
        set_nonblocking(&pipe.write, true).unwrap();
        let e = w.write(b"x\n").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        set_nonblocking(&pipe.write, false).unwrap();
        let writer = std::thread::spawn(move || w.write_all(b"IOVMM-TEST hello ok\nmore\n"));
        assert_eq!(pipe.release_line().unwrap(), "IOVMM-TEST hello ok");
        writer.join().unwrap().unwrap();
    }
}
