//! A vhost-user backend dies and a new one comes up on the same socket while
//! the fast test guest transmits through it behind virtio-iommu, under the
//! default seccomp filters: iovmm stays up, renegotiates with the new backend
//! (whose IOTLB starts empty and fills through misses) and the guest's frames
//! flow again.

use std::time::{Duration, Instant};

use integration_tests::backend::{BackendConfig, TestBackend};
use integration_tests::guest::{test_guest_path, GuestResult, IommuMode, Scenario};
use vmm::{SerialMode, VmConfig, VmExit, Vmm};

const FRAMES: u64 = 3000;

#[test]
fn guest_traffic_survives_a_backend_restart() {
    let sock = std::env::temp_dir().join(format!("iovmm-reconnect-{}.sock", std::process::id()));
    let first = TestBackend::listen(&sock, BackendConfig::default()).expect("first backend");
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::net_tx(FRAMES, 256)
        .iommu(IommuMode::Strict)
        .timeout_ms(60_000)
        .cmdline()
        .expect("cmdline");
    cfg.serial = SerialMode::Capture;
    cfg.iommu = Some("virtio".parse().expect("iommu"));
    let dev = format!("net,socket={},iommu=on,reconnect=1", sock.display());
    cfg.vhost_user.push(dev.parse().expect("device"));
    let mut vmm = Vmm::start(&cfg).expect("VM starts");
    assert!(first.wait_for(Duration::from_secs(30), |c| c.tx_frames >= 200));
    first.kill();
    let killed_at = first.counters().tx_frames;
    drop(first);
    let second = TestBackend::listen(&sock, BackendConfig::default()).expect("second backend");
    let t = Instant::now();
    let exit = vmm
        .wait_timeout(Duration::from_secs(120))
        .expect("VMM stops");
    let serial = vmm.serial_output().unwrap_or_default();
    assert_eq!(exit, VmExit::ExitPort(0), "serial:\n{serial}");
    let r = GuestResult::from_output(&serial).expect("result line");
    assert_eq!(r.u64("completed"), Some(FRAMES), "{serial}");
    let c = second.counters();
    // The new backend carried the rest. A frame in flight at the kill may be
    // sent twice, or completed by the dying backend before it counted it.
    assert!(
        killed_at + c.tx_frames + 1 >= FRAMES,
        "{killed_at} + {} < {FRAMES} - 1",
        c.tx_frames
    );
    assert!(
        c.misses_sent > 0,
        "the new backend's IOTLB started empty and filled by misses"
    );
    let s = vmm.vhost_user_devices()[0].stats();
    assert!(s.reconnect.reconnects >= 1, "{:?}", s.reconnect);
    eprintln!(
        "reconnect: resumed in {:.2?}, {:?}",
        t.elapsed(),
        s.reconnect
    );
}
