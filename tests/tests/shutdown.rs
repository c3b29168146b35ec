//! A stopped VM leaves nothing behind: every thread iovmm started (vCPUs,
//! event loop, virtio-iommu worker, vhost-user backend-request server) has
//! ended and every file descriptor it opened is closed.
//!
//! One test in its own binary, so no other VM runs in the process meanwhile.

use std::time::Duration;

use integration_tests::backend::{BackendConfig, TestBackend};
use integration_tests::guest::{test_guest_path, IommuMode, Scenario};
use vmm::{SerialMode, VmConfig, VmExit, Vmm};

fn thread_names() -> Vec<String> {
    let mut names = Vec::new();
    for t in std::fs::read_dir("/proc/self/task")
        .expect("task dir")
        .flatten()
    {
        if let Ok(n) = std::fs::read_to_string(t.path().join("comm")) {
            names.push(n.trim().to_string());
        }
    }
    names
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fd dir").count()
}

fn fd_targets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    v.sort();
    v
}

fn vmm_threads() -> Vec<String> {
    thread_names()
        .into_iter()
        .filter(|n| n.starts_with("iovmm_") || n.starts_with("vhost-user"))
        .collect()
}

#[test]
fn stopped_vm_leaves_no_threads_or_fds() {
    let sock = std::env::temp_dir().join(format!("iovmm-shutdown-{}.sock", std::process::id()));
    // The backend runs in this process too; its listener and wake eventfd
    // stay open, the fds of its connection close when the VMM hangs up.
    let backend = TestBackend::listen(&sock, BackendConfig::default()).expect("backend");
    let fds_before = fd_count();
    assert!(vmm_threads().is_empty(), "{:?}", vmm_threads());
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::net_tx(50, 512)
        .iommu(IommuMode::Strict)
        .cmdline()
        .expect("cmdline");
    cfg.serial = SerialMode::Capture;
    cfg.iommu = Some("virtio".parse().expect("iommu"));
    cfg.vhost_user.push(
        format!("net,socket={},iommu=on", sock.display())
            .parse()
            .expect("dev"),
    );
    let mut vmm = Vmm::start(&cfg).expect("VM starts");
    let exit = vmm.wait_timeout(Duration::from_secs(30)).expect("stops");
    assert_eq!(
        exit,
        VmExit::ExitPort(0),
        "{}",
        vmm.serial_output().unwrap_or_default()
    );
    drop(vmm);
    // Threads exit asynchronously after their stop signal; give them a moment.
    for _ in 0..100 {
        if vmm_threads().is_empty() && fd_count() <= fds_before {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        vmm_threads().is_empty(),
        "threads left: {:?}",
        vmm_threads()
    );
    assert!(
        fd_count() <= fds_before,
        "fds: {} before, {} after: {:?}",
        fds_before,
        fd_count(),
        fd_targets()
    );
    drop(backend);
}
