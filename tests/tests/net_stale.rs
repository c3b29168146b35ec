//! The security invariant end to end: after a strict unmap completed, a TX
//! descriptor at the old IOVA carrying a marker frame is never transferred.
//! iovmm refuses the backend's miss and reports a guest-visible fault; our
//! backend completes the faulted descriptor and the device keeps working;
//! DPDK keeps the refused miss pending (MISS has no ack), so its TX queue
//! stops there: the marker never reaches testpmd either.

use std::path::Path;

use integration_tests::backend::{BackendConfig, TestBackend};
use integration_tests::dpdk::Testpmd;
use integration_tests::guest::{GuestResult, IommuMode, Scenario, EXIT_OK};
use integration_tests::matrix::{run_scenario, socket, Cell, Viommu, ONE_CELL};
use iommu::sync::lock;
use vmm::{VhostUserStats, VmExit};

const SIZE: u64 = 200;
const AFTER: u64 = 4;
const MARKER: &[u8] = b"IOVMM-STALE-MARKER";
const VIOMMUS: [(Viommu, &str); 3] = [
    (Viommu::Virtio, "virtio"),
    (
        Viommu::Vtd {
            dt: true,
            ats_cap: true,
        },
        "vtd-ats",
    ),
    (
        Viommu::Vtd {
            dt: false,
            ats_cap: false,
        },
        "vtd",
    ),
];

/// iovmm refused the stale miss and the guest's vIOMMU reported the IOVA.
fn assert_fault_reported(viommu: Viommu, r: &GuestResult, stats: &VhostUserStats) {
    assert!(stats.bridge.misses_refused >= 1, "{stats:?}");
    assert!(stats.bridge.faults >= 1, "{stats:?}");
    let stale = r.u64("stale_iova").expect("stale_iova");
    let addr = r.u64("fault_addr").expect("fault_addr");
    match viommu {
        Viommu::Virtio => assert_eq!(addr, stale, "{r:?}"),
        _ => assert_eq!(addr, stale & !0xfff, "{r:?}"),
    }
}

fn sink_has_marker(sink: &Path) -> bool {
    let data = std::fs::read(sink).expect("sink");
    data.windows(MARKER.len()).any(|w| w == MARKER)
}

#[test]
fn own_backend_never_transfers_a_descriptor_at_an_unmapped_iova() {
    for (viommu, name) in VIOMMUS {
        let _one = lock(&ONE_CELL);
        let cell = Cell::new(viommu, IommuMode::Strict);
        let sock = socket(&cell.tag(&format!("stale-{name}")));
        let sink = sock.with_extension("frames");
        let _ = std::fs::remove_file(&sink);
        let config = BackendConfig {
            miss_need_reply: true,
            complete_faulted: true,
            sink: Some(sink.clone()),
            ..BackendConfig::default()
        };
        let backend = TestBackend::listen(&sock, config).expect("backend listens");
        let (exit, r, out, stats) = run_scenario(&cell, Scenario::net_stale(SIZE, AFTER), &sock);
        assert_eq!(exit, VmExit::ExitPort(EXIT_OK as u32), "{out}");
        assert_eq!(r.u64("stale_completed"), Some(1), "{r:?}");
        assert_eq!(r.u64("completed"), Some(2 + AFTER), "{r:?}");
        let c = backend.counters();
        assert_eq!((c.tx_frames, c.tx_faulted), (1 + AFTER, 1), "{c:?}");
        assert_eq!(c.invalidate_violations, 0);
        assert!(!sink_has_marker(&sink), "the marker reached the backend");
        assert_fault_reported(viommu, &r, &stats);
        let _ = std::fs::remove_file(&sink);
    }
}

#[test]
fn dpdk_never_transfers_a_descriptor_at_an_unmapped_iova() {
    for (viommu, name) in VIOMMUS {
        let _one = lock(&ONE_CELL);
        let cell = Cell::new(viommu, IommuMode::Strict);
        let sock = socket(&cell.tag(&format!("dpdk-stale-{name}")));
        let mut pmd = Testpmd::start(&sock, true).expect("testpmd starts");
        let s = Scenario::net_stale(SIZE, AFTER).expect_stall(2000);
        let (exit, r, out, stats) = run_scenario(&cell, s, &sock);
        assert_eq!(exit, VmExit::ExitPort(EXIT_OK as u32), "{out}");
        // DPDK keeps the refused miss pending: the queue stops at the marker.
        assert_eq!(r.u64("stale_completed"), Some(0), "{r:?}");
        let port = pmd.port_stats().expect("testpmd stats");
        assert_eq!(
            (port.rx_packets, port.rx_bytes),
            (1, SIZE),
            "{}",
            pmd.output()
        );
        assert_fault_reported(viommu, &r, &stats);
    }
}
