//! The fast test guest transmits frames through a vhost-user virtio-net
//! device served by a real external backend (DPDK testpmd) or by our own
//! IOTLB-aware backend, without a vIOMMU and behind virtio-iommu in each
//! guest IOMMU mode. Every case checks the frame count on both sides; the own
//! backend also checks the payload bytes, the IOTLB message pattern and the
//! security invariant (nothing the vIOMMU invalidated is still translatable
//! in the backend's IOTLB).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use integration_tests::backend::{BackendConfig, BackendHandle, RecordedMsg, TestBackend};
use integration_tests::dpdk::Testpmd;
use integration_tests::guest::{test_guest_path, GuestResult, IommuMode, Scenario};
use vmm::{SerialMode, VmConfig, VmExit, Vmm};

const FRAMES: u64 = 500;
const SIZE: u64 = 1000;
const VHOST_USER_IOTLB_MSG: u32 = 22;
const IOTLB_UPDATE: u8 = 2;
const IOTLB_INVALIDATE: u8 = 3;
/// DPDK runs pinned to CPU 0; one testpmd at a time keeps CI's two cores usable.
static DPDK: Mutex<()> = Mutex::new(());

fn socket(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("iovmm-{}-{tag}.sock", std::process::id()))
}

struct Run {
    result: GuestResult,
    serial: String,
    stats: vmm::VhostUserStats,
}

fn run_guest(sock: &PathBuf, viommu: bool, mode: IommuMode) -> Run {
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::net_tx(FRAMES, SIZE)
        .iommu(mode)
        .cmdline()
        .expect("cmdline");
    cfg.serial = SerialMode::Capture;
    if viommu {
        cfg.iommu = Some("virtio".parse().expect("iommu option"));
    }
    let opt = format!(
        "net,socket={},iommu={}",
        sock.display(),
        if viommu { "on" } else { "off" }
    );
    cfg.vhost_user.push(opt.parse().expect("vhost-user option"));
    let mut vmm = Vmm::start(&cfg).expect("VM starts");
    let exit = vmm
        .wait_timeout(Duration::from_secs(60))
        .expect("VMM stops");
    let serial = vmm.serial_output().unwrap_or_default();
    assert_eq!(exit, VmExit::ExitPort(0), "guest failed; serial:\n{serial}");
    let result = GuestResult::from_output(&serial).expect("result line");
    let stats = vmm.vhost_user_devices()[0].stats();
    Run {
        result,
        serial,
        stats,
    }
}

fn iotlb_msgs(records: &[RecordedMsg]) -> Vec<(u8, u64, u64)> {
    records
        .iter()
        .filter(|r| r.request == VHOST_USER_IOTLB_MSG && r.payload.len() >= 26)
        .map(|r| {
            let u =
                |o: usize| u64::from_le_bytes(r.payload[o..o + 8].try_into().unwrap_or_default());
            (r.payload[25], u(0), u(8))
        })
        .collect()
}

/// Every invalidated range that no later UPDATE re-mapped must be gone from
/// the backend's IOTLB.
fn assert_no_stale_translation(backend: &BackendHandle) {
    let msgs = iotlb_msgs(&backend.records());
    for (i, &(ty, iova, size)) in msgs.iter().enumerate() {
        if ty != IOTLB_INVALIDATE || size == 0 {
            continue;
        }
        let end = iova.saturating_add(size - 1);
        let remapped = msgs[i + 1..].iter().any(|&(t, a, s)| {
            t == IOTLB_UPDATE && a <= end && a.saturating_add(s.saturating_sub(1)) >= iova
        });
        if !remapped {
            assert!(
                !backend.probe(iova, 1),
                "stale translation at {iova:#x} after INVALIDATE"
            );
        }
    }
}

fn own_backend_case(viommu: bool, mode: IommuMode) -> (Run, vmm::VhostUserStats) {
    let sock = socket(&format!("own-{viommu}-{}", mode.as_str()));
    let sink = sock.with_extension("frames");
    let _ = std::fs::remove_file(&sink);
    let cfg = BackendConfig {
        access_platform: viommu,
        sink: Some(sink.clone()),
        ..BackendConfig::default()
    };
    let backend = TestBackend::listen(&sock, cfg).expect("backend listens");
    let run = run_guest(&sock, viommu, mode);
    let r = &run.result;
    assert_eq!(r.u64("completed"), Some(FRAMES), "{}", run.serial);
    assert!(backend.wait_for(Duration::from_secs(5), |c| c.tx_frames == FRAMES));
    let c = backend.counters();
    assert_eq!(c.tx_bytes, FRAMES * SIZE);
    assert_eq!(c.translation_failures, 0);
    // Data integrity: the guest's byte sum equals the sum of what arrived.
    let data = std::fs::read(&sink).expect("sink file");
    let (mut sum, mut off) = (0u64, 0usize);
    while off + 4 <= data.len() {
        let len = u32::from_ne_bytes(data[off..off + 4].try_into().unwrap_or_default()) as usize;
        let frame = &data[off + 4..(off + 4 + len).min(data.len())];
        sum = frame.iter().fold(sum, |s, b| s.wrapping_add(*b as u64));
        off += 4 + len;
    }
    assert_eq!(Some(sum), r.u64("checksum"), "payload bytes differ");
    assert_no_stale_translation(&backend);
    let _ = std::fs::remove_file(&sink);
    let stats = run.stats.clone();
    eprintln!(
        "own backend, viommu={viommu} mode={}: misses {} updates {} invalidates {} (backend saw {} / {}), guest cycles/frame {}",
        mode.as_str(),
        stats.bridge.misses,
        stats.iotlb.updates,
        stats.iotlb.invalidations,
        c.iotlb_updates,
        c.iotlb_invalidates,
        r.u64("cycles_per_frame").unwrap_or(0)
    );
    (run, stats)
}

#[test]
fn own_backend_without_viommu() {
    let (_, s) = own_backend_case(false, IommuMode::Off);
    assert_eq!((s.iotlb.updates, s.iotlb.invalidations), (0, 0));
}

#[test]
fn own_backend_virtio_iommu_strict_invalidates_every_unmap() {
    let (run, s) = own_backend_case(true, IommuMode::Strict);
    let unmaps = run.result.u64("unmaps").expect("unmaps");
    assert!(unmaps >= FRAMES);
    // One acked INVALIDATE per guest UNMAP, never more than one round trip.
    assert_eq!(s.iotlb.invalidations, unmaps);
    // Fewer misses than frames: extents let one UPDATE serve rings and reused buffers.
    assert!(s.bridge.misses <= FRAMES + 8, "misses {}", s.bridge.misses);
}

#[test]
fn own_backend_virtio_iommu_lazy_batches_invalidations() {
    let (run, s) = own_backend_case(true, IommuMode::Lazy);
    assert!(run.result.u64("flushes").unwrap_or(0) > 0);
    assert!(s.iotlb.invalidations <= run.result.u64("unmaps").unwrap_or(0));
}

#[test]
fn own_backend_virtio_iommu_passthrough_has_no_per_page_misses() {
    let (_, s) = own_backend_case(true, IommuMode::Passthrough);
    // Identity extents as large as a memory region: a handful of misses in total.
    assert!(s.bridge.misses <= 4, "misses {}", s.bridge.misses);
    assert_eq!(s.iotlb.invalidations, 0);
}

#[test]
fn own_backend_virtio_iommu_guest_off_uses_boot_bypass() {
    let (_, s) = own_backend_case(true, IommuMode::Off);
    assert!(s.bridge.misses <= 4, "misses {}", s.bridge.misses);
}

fn dpdk_case(viommu: bool, mode: IommuMode) {
    let _one = DPDK.lock().unwrap_or_else(|e| e.into_inner());
    let sock = socket(&format!("dpdk-{viommu}-{}", mode.as_str()));
    let mut pmd = Testpmd::start(&sock, true).expect("testpmd starts");
    let run = run_guest(&sock, viommu, mode);
    assert_eq!(run.result.u64("completed"), Some(FRAMES));
    let mut stats = pmd.port_stats().expect("stats");
    for _ in 0..50 {
        if stats.rx_packets >= FRAMES {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        stats = pmd.port_stats().expect("stats");
    }
    assert_eq!(
        stats.rx_packets,
        FRAMES,
        "testpmd output:\n{}",
        pmd.output()
    );
    assert_eq!(stats.rx_bytes, FRAMES * SIZE);
    let s = &run.stats;
    eprintln!(
        "dpdk, viommu={viommu} mode={}: misses {} updates {} invalidates {}",
        mode.as_str(),
        s.bridge.misses,
        s.iotlb.updates,
        s.iotlb.invalidations
    );
}

#[test]
fn dpdk_without_viommu() {
    dpdk_case(false, IommuMode::Off);
}

#[test]
fn dpdk_virtio_iommu_strict() {
    dpdk_case(true, IommuMode::Strict);
}

#[test]
fn dpdk_virtio_iommu_lazy() {
    dpdk_case(true, IommuMode::Lazy);
}

#[test]
fn dpdk_virtio_iommu_passthrough() {
    dpdk_case(true, IommuMode::Passthrough);
}
