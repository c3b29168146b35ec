//! The virtio-net use-after-unmap cells (the guest's `net-stale` scenario, strict): frame 0 goes
//! out from a buffer at IOVA b, the guest unmaps b (the strict unmap waits for the invalidation),
//! then posts a TX descriptor at the stale b carrying a marker frame, then [`AFTER`] normal
//! frames. The marker must never be transferred: iovmm refuses the back end's miss at b and the
//! guest's vIOMMU reports the fault. Our backend completes the faulted descriptor and the device
//! keeps working; DPDK keeps the refused miss pending (MISS has no ack), so its TX queue stops
//! at the marker.

use devices::vhost_user::wire::IotlbMsg;
use iommu::sync::lock;
use vmm::{VhostUserStats, VmExit};

use super::{assert_invalidates_honoured, run_scenario, socket, Cell, Viommu, ONE_CELL};
use crate::backend::{BackendConfig, TestBackend};
use crate::dpdk::Testpmd;
use crate::guest::{GuestResult, Scenario, EXIT_OK};
use crate::rig::iotlb_msgs;

/// Frame bytes.
pub const SIZE: u64 = 200;
/// Normal frames after the stale descriptor.
pub const AFTER: u64 = 4;
/// The marker the stale descriptor carries (`tests/guest/rx.c`).
pub const MARKER: &[u8] = b"IOVMM-STALE-MARKER";

/// The `net-stale` scenario: [`SIZE`]-byte frames, [`AFTER`] frames after the stale one.
pub fn scenario() -> Scenario {
    Scenario::net_stale(SIZE, AFTER)
}

/// What a `net-stale` run produced.
#[derive(Debug)]
pub struct StaleRun {
    /// The guest's result line.
    pub result: GuestResult,
    /// iovmm's counters for the device.
    pub stats: VhostUserStats,
    /// Every IOTLB message our backend received, in order (empty with testpmd).
    pub iotlb: Vec<IotlbMsg>,
    /// The stale IOVA b.
    pub stale_iova: u64,
}

/// The guest ran `net-stale` to the end, iovmm refused the back end's miss at the stale IOVA
/// and the guest's vIOMMU reported it (virtio-iommu: the IOVA, VT-d: its page).
fn finish(cell: &Cell, s: Scenario, sock: &std::path::Path) -> StaleRun {
    let (exit, result, serial, stats) = run_scenario(cell, s, sock);
    assert_eq!(exit, VmExit::ExitPort(EXIT_OK as u32), "{serial}");
    assert!(stats.bridge.misses_refused >= 1, "{stats:?}");
    assert!(stats.bridge.faults >= 1, "{stats:?}");
    let stale = result.u64("stale_iova").expect("stale_iova");
    let addr = result.u64("fault_addr").expect("fault_addr");
    match cell.viommu {
        Viommu::Virtio => assert_eq!(addr, stale, "{result:?}"),
        _ => assert_eq!(addr, stale & !0xfff, "{result:?}"),
    }
    StaleRun {
        result,
        stats,
        iotlb: Vec::new(),
        stale_iova: stale,
    }
}

/// Runs `s` (a `net-stale` scenario) in `cell` against our backend, which acks refused misses
/// (NEED_REPLY), completes faulted chains and records every frame: beyond `finish`, the stale
/// descriptor and every frame after it completed, the backend transferred every frame but the
/// marker (counting the faulted one), never recorded the marker, and honoured every INVALIDATE.
pub fn run_own_stale(cell: &Cell, s: Scenario) -> StaleRun {
    let _one = lock(&ONE_CELL);
    let sock = socket(&cell.tag("stale"));
    let sink = sock.with_extension("frames");
    let _ = std::fs::remove_file(&sink);
    let config = BackendConfig {
        miss_need_reply: true,
        complete_faulted: true,
        sink: Some(sink.clone()),
        ..BackendConfig::default()
    };
    let backend = TestBackend::listen(&sock, config).expect("backend listens");
    let mut run = finish(cell, s, &sock);
    let r = &run.result;
    assert_eq!(r.u64("stale_completed"), Some(1), "{r:?}");
    assert_eq!(r.u64("completed"), Some(2 + AFTER), "{r:?}");
    let c = backend.counters();
    assert_eq!((c.tx_frames, c.tx_faulted), (1 + AFTER, 1), "{c:?}");
    assert_invalidates_honoured(&backend);
    let data = std::fs::read(&sink).expect("sink");
    assert!(
        !data.windows(MARKER.len()).any(|w| w == MARKER),
        "the marker reached the backend"
    );
    let _ = std::fs::remove_file(&sink);
    run.iotlb = iotlb_msgs(&backend).into_iter().map(|(_, m)| m).collect();
    run
}

/// Runs `s` (a `net-stale` scenario; `expect_stall` is added) in `cell` against testpmd: beyond
/// `finish`, the stale descriptor never completed and testpmd received frame 0 only.
pub fn run_dpdk_stale(cell: &Cell, s: Scenario) -> StaleRun {
    let _one = lock(&ONE_CELL);
    let sock = socket(&cell.tag("dpdk-stale"));
    let mut pmd = Testpmd::start(&sock, true).expect("testpmd starts");
    let run = finish(cell, s.expect_stall(2000), &sock);
    // DPDK keeps the refused miss pending: the queue stops at the marker.
    assert_eq!(
        run.result.u64("stale_completed"),
        Some(0),
        "{:?}",
        run.result
    );
    let port = pmd.port_stats().expect("testpmd stats");
    assert_eq!(
        (port.rx_packets, port.rx_bytes),
        (1, SIZE),
        "testpmd received more than frame 0:\n{}",
        pmd.output()
    );
    run
}
