//! Seccomp filters on iovmm's threads.
//!
//! The rule tables are applied in forked children (one thread, no allocation after the fork)
//! to show that a forbidden call kills the process with SIGSYS, that `log` lets it through and
//! that soft-denied calls fail with ENOSYS. A running VM with a virtio-iommu and a vhost-user
//! net device shows that every thread iovmm owns runs filtered (device threads with their own
//! filter on top of the inherited vCPU one) while the caller's thread does not. Every other
//! integration test runs with the default (`true`), covering the data paths under the filters.

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use integration_tests::backend::{BackendConfig, TestBackend};
use integration_tests::guest::{test_guest_path, IommuMode, Scenario, ViommuKind};
use iommu::sync::lock;
use vmm::seccomp::{SeccompFilters, SeccompLevel, ThreadKind};
use vmm::{SerialMode, VmConfig, VmExit, Vmm};

/// VMs in this file run one at a time so thread names identify their threads.
static VM_LOCK: Mutex<()> = Mutex::new(());

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Exit(i32),
    Signal(i32),
}

/// Runs `body` in a forked child, which exits with its return value. `body` runs on the
/// child's only thread and must not allocate or panic (the parent has other threads).
fn in_child(body: impl FnOnce() -> i32) -> Ended {
    // SAFETY: the child only runs `body` (async-signal-safe calls, no allocation) and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = body();
        // SAFETY: ends the forked child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFSIGNALED(status) {
        Ended::Signal(libc::WTERMSIG(status))
    } else {
        Ended::Exit(libc::WEXITSTATUS(status))
    }
}

fn errno() -> i32 {
    // SAFETY: reads the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

/// In the child: default SIGSYS action (no reporter), install `kind`'s filters (exit 90 on
/// failure), then run `call`.
fn filtered(filters: &SeccompFilters, kind: ThreadKind, call: impl FnOnce() -> i32) -> Ended {
    in_child(|| {
        // SAFETY: resets one signal disposition; no handler code involved.
        unsafe { libc::signal(libc::SIGSYS, libc::SIG_DFL) };
        match filters.apply(kind) {
            Ok(()) => call(),
            Err(_) => 90,
        }
    })
}

fn open_tcp_socket() -> i32 {
    // SAFETY: plain socket(2) call; the fd is closed again if it was created.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd < 0 {
        return 10;
    }
    // SAFETY: closes the fd created above.
    unsafe { libc::close(fd) };
    0
}

#[test]
fn vcpu_filter_kills_the_process_on_a_network_socket() {
    let filters = SeccompFilters::new(SeccompLevel::Trap).expect("filters compile");
    // Control: installing the filter and exiting is fine.
    assert_eq!(filtered(&filters, ThreadKind::Vcpu, || 0), Ended::Exit(0));
    assert_eq!(
        filtered(&filters, ThreadKind::Vcpu, open_tcp_socket),
        Ended::Signal(libc::SIGSYS)
    );
    // Without the filter the same child creates the socket.
    assert_eq!(in_child(open_tcp_socket), Ended::Exit(0));
}

#[test]
fn sigsys_reporter_names_the_call_and_thread_kind_before_the_process_dies() {
    let filters = SeccompFilters::new(SeccompLevel::Trap).expect("filters compile");
    vmm::seccomp::install_sigsys_reporter().expect("sigaction");
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let ended = in_child(|| {
        // SAFETY: points the child's stderr at the pipe's write end.
        unsafe { libc::dup2(fds[1], 2) };
        match filters.apply(ThreadKind::Vcpu) {
            Ok(()) => open_tcp_socket(),
            Err(_) => 90,
        }
    });
    // SAFETY: closes our copy of the write end so the read below sees end of file.
    unsafe { libc::close(fds[1]) };
    let mut out = Vec::new();
    // SAFETY: takes ownership of the pipe's read end, used only here.
    let mut reader = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    std::io::Read::read_to_end(&mut reader, &mut out).expect("read the child's stderr");
    let out = String::from_utf8_lossy(&out);
    assert_eq!(ended, Ended::Signal(libc::SIGSYS), "{out}");
    let want = format!(
        "blocked system call {} on the vcpu thread",
        libc::SYS_socket
    );
    assert!(out.contains(&want), "stderr: {out}");
}

#[test]
fn log_level_lets_a_forbidden_call_through() {
    let filters = SeccompFilters::new(SeccompLevel::Log).expect("filters compile");
    assert_eq!(
        filtered(&filters, ThreadKind::Vcpu, open_tcp_socket),
        Ended::Exit(0)
    );
}

/// The logger checks whether stderr is a terminal (TCGETS) before every line, on whichever
/// thread logs; with a terminal on stderr that once killed iovmm at `--log-level info`.
#[test]
fn every_thread_kind_may_ask_whether_stderr_is_a_terminal() {
    let filters = SeccompFilters::new(SeccompLevel::Trap).expect("filters compile");
    for kind in ThreadKind::ALL {
        let ended = filtered(&filters, kind, || {
            let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
            // SAFETY: TCGETS on fd 2 writes at most one termios into `t`.
            unsafe { libc::ioctl(2, libc::TCGETS, t.as_mut_ptr()) };
            0
        });
        assert_eq!(ended, Ended::Exit(0), "{kind}");
    }
}

#[test]
fn no_thread_kind_may_run_a_program() {
    let filters = SeccompFilters::new(SeccompLevel::Trap).expect("filters compile");
    let path = CString::new("/bin/true").expect("no NUL");
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    for kind in ThreadKind::ALL {
        let ended = filtered(&filters, kind, || {
            // SAFETY: NUL-terminated path and NULL-terminated argv/envp arrays built before
            // the fork; execve only returns on failure.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            20
        });
        assert_eq!(ended, Ended::Signal(libc::SIGSYS), "{kind}");
    }
}

#[test]
fn opening_files_fails_with_enosys_instead_of_killing() {
    let filters = SeccompFilters::new(SeccompLevel::Trap).expect("filters compile");
    let path = CString::new("/proc/self/status").expect("no NUL");
    for kind in ThreadKind::ALL {
        let ended = filtered(&filters, kind, || {
            // SAFETY: NUL-terminated path built before the fork.
            let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY) };
            match (fd, errno()) {
                (-1, libc::ENOSYS) => 0,
                (-1, _) => 30,
                _ => 31,
            }
        });
        assert_eq!(ended, Ended::Exit(0), "{kind}");
    }
}

/// The seccomp mode and filter count of thread `tid` of this process.
fn seccomp_of(tid: &str) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    Some((field("Seccomp:")?, field("Seccomp_filters:")?))
}

/// `(thread name, seccomp mode, filter count)` of this process's threads named in `names`,
/// except the threads in `skip` (by id).
fn threads_named(names: &[&str], skip: &[String]) -> Vec<(String, u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let tid = entry.file_name().to_string_lossy().into_owned();
        if skip.contains(&tid) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"));
        let Ok(comm) = comm else { continue };
        let comm = comm.trim().to_string();
        let known = names.iter().any(|n| comm.starts_with(n));
        if let (true, Some((mode, count))) = (known, seccomp_of(&tid)) {
            found.push((comm, mode, count));
        }
    }
    found.sort();
    found
}

fn net_vm(sock: &std::path::Path, seccomp: SeccompLevel) -> VmConfig {
    let scenario = Scenario::net_tx(1 << 40, 1000)
        .iommu(IommuMode::Strict)
        .viommu(ViommuKind::Virtio);
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = scenario.cmdline().expect("scenario");
    cfg.serial = SerialMode::Capture;
    cfg.iommu = Some("virtio".parse().expect("iommu option"));
    let dev = format!("net,socket={},iommu=on", sock.display());
    cfg.vhost_user.push(dev.parse().expect("vhost-user option"));
    cfg.seccomp = seccomp;
    cfg
}

const VM_THREADS: [&str; 4] = ["iovmm_main", "iovmm_vcpu", "iovmm_viommu", "vhost-user-req"];

/// Runs the transmitting guest until all of iovmm's thread kinds exist and the back end saw
/// misses, and returns those threads' seccomp state.
fn running_vm_threads(tag: &str, seccomp: SeccompLevel) -> Vec<(String, u32, u32)> {
    let _one = lock(&VM_LOCK);
    let sock: PathBuf =
        std::env::temp_dir().join(format!("iovmm-seccomp-{}-{tag}.sock", std::process::id()));
    let backend = TestBackend::listen(&sock, BackendConfig::default()).expect("backend listens");
    // Threads of earlier VMs that are still around are not this VM's.
    let before: Vec<String> = std::fs::read_dir("/proc/self/task")
        .expect("task list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut vmm = Vmm::start(&net_vm(&sock, seccomp)).expect("VM starts");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut threads = Vec::new();
    while Instant::now() < deadline {
        threads = threads_named(&VM_THREADS, &before);
        let all = VM_THREADS
            .iter()
            .all(|n| threads.iter().any(|t| t.0.starts_with(n)));
        if all && backend.counters().misses_sent > 0 && backend.counters().tx_frames > 0 {
            break;
        }
        assert!(!vmm.has_exited(), "guest stopped early: {:?}", vmm.wait());
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = backend.counters();
    vmm.stop();
    let exit = vmm.wait().expect("VM stops");
    let out = vmm.serial_output().unwrap_or_default();
    assert_eq!(exit, VmExit::Stopped, "serial:\n{out}");
    assert!(c.misses_sent > 0 && c.tx_frames > 0, "{c:?}");
    threads
}

#[test]
fn every_thread_of_a_running_vm_is_filtered_but_not_the_callers() {
    let threads = running_vm_threads("on", SeccompLevel::default());
    for name in VM_THREADS {
        let t = threads.iter().find(|t| t.0.starts_with(name));
        let Some((comm, mode, count)) = t else {
            panic!("no {name} thread in {threads:?}");
        };
        assert_eq!(*mode, 2, "{comm} runs in seccomp filter mode");
        // Soft-denial + allow-list; device threads add theirs to the vCPU pair they inherit.
        let expected = if name.starts_with("iovmm_") && name != "iovmm_viommu" {
            2
        } else {
            4
        };
        assert_eq!(*count, expected, "{comm} filters: {threads:?}");
    }
    let caller = std::fs::read_to_string("/proc/thread-self/status").expect("own status");
    assert!(
        caller.lines().any(|l| l == "Seccomp:\t0"),
        "the caller's thread stays unfiltered"
    );
}

#[test]
fn seccomp_false_leaves_the_vm_threads_unfiltered() {
    let threads = running_vm_threads("off", SeccompLevel::Off);
    assert!(threads.len() >= VM_THREADS.len(), "{threads:?}");
    for (comm, mode, count) in &threads {
        assert_eq!((*mode, *count), (0, 0), "{comm}");
    }
}
