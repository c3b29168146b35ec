//! Use after an unmap that reaches the top of the IOVA space (issue 13, DPDK's
//! `vhost_user_iotlb_cache_remove` wrap). The guest transmits frame 0 from a
//! buffer at IOVA b, so the back end caches a translation for b, then unmaps
//! it with one virtio-iommu UNMAP `[b, u64::MAX]` (strict: it waits for the
//! completion) and posts a TX descriptor at the stale b carrying a marker.
//!
//! DPDK 22.11 computes `iova + size` of an INVALIDATE in 64 bits: one sent as
//! `(b, 2^64 - b)` wraps and removes nothing, so DPDK would keep b and
//! transmit the marker. iovmm must send an INVALIDATE that covers b and whose
//! end does not wrap: our back end records its exact `(iova, size)`, and live
//! testpmd must never receive the marker (its refused miss is a fault).

use devices::vhost_user::wire::{IotlbMsg, IotlbType};
use integration_tests::backend::{BackendConfig, TestBackend};
use integration_tests::dpdk::Testpmd;
use integration_tests::guest::{GuestResult, IommuMode, Scenario, EXIT_OK};
use integration_tests::matrix::{run_scenario, socket, Cell, Viommu, ONE_CELL};
use integration_tests::rig::iotlb_msgs;
use iommu::sync::lock;
use vmm::{VhostUserStats, VmExit};

const SIZE: u64 = 200;
const AFTER: u64 = 4;
const PAGE: u64 = 0x1000;
const MARKER: &[u8] = b"IOVMM-STALE-MARKER";

fn scenario() -> Scenario {
    Scenario::net_stale(SIZE, AFTER).param("unmap_to_end", 1)
}

/// The guest's UNMAP really reached the top, and iovmm reported the refused
/// miss at the stale IOVA as a fault.
fn assert_unmap_to_end_and_fault(r: &GuestResult, stats: &VhostUserStats) -> u64 {
    assert_eq!(r.u64("unmap_to_end"), Some(1), "{r:?}");
    assert!(stats.bridge.misses_refused >= 1, "{stats:?}");
    assert!(stats.bridge.faults >= 1, "{stats:?}");
    assert_eq!(stats.bridge.invalidation_failures, 0, "{stats:?}");
    assert_eq!(stats.bridge.ring_invalidations, 0, "{stats:?}");
    let stale = r.u64("stale_iova").expect("stale_iova");
    assert_eq!(r.u64("fault_addr"), Some(stale), "{r:?}");
    stale
}

fn is(m: &IotlbMsg, t: IotlbType) -> bool {
    m.kind().is_ok_and(|k| k == t)
}

#[test]
fn own_backend_records_a_non_wrapping_invalidate_of_the_stale_iova() {
    let _one = lock(&ONE_CELL);
    let cell = Cell::new(Viommu::Virtio, IommuMode::Strict);
    let sock = socket(&cell.tag("stale-top"));
    let sink = sock.with_extension("frames");
    let _ = std::fs::remove_file(&sink);
    let config = BackendConfig {
        miss_need_reply: true,
        complete_faulted: true,
        sink: Some(sink.clone()),
        ..BackendConfig::default()
    };
    let backend = TestBackend::listen(&sock, config).expect("backend listens");
    let (exit, r, out, stats) = run_scenario(&cell, scenario(), &sock);
    assert_eq!(exit, VmExit::ExitPort(EXIT_OK as u32), "{out}");
    let stale = assert_unmap_to_end_and_fault(&r, &stats);
    assert_eq!(r.u64("stale_completed"), Some(1), "{r:?}");
    let c = backend.counters();
    assert_eq!((c.tx_frames, c.tx_faulted), (1 + AFTER, 1), "{c:?}");
    assert_eq!(c.invalidate_violations, 0, "{c:?}");
    let data = std::fs::read(&sink).expect("sink");
    assert!(
        !data.windows(MARKER.len()).any(|w| w == MARKER),
        "the marker reached the back end"
    );
    let _ = std::fs::remove_file(&sink);

    let msgs: Vec<IotlbMsg> = iotlb_msgs(&backend).into_iter().map(|(_, m)| m).collect();
    for m in msgs.iter().filter(|m| is(m, IotlbType::Invalidate)) {
        assert!(
            m.size > 0 && m.iova.checked_add(m.size).is_some(),
            "INVALIDATE {:#x}+{:#x} wraps: DPDK would remove nothing",
            m.iova,
            m.size
        );
    }
    // The UPDATE that served frame 0's miss, then (before b is mapped and
    // sent again for the frames after) the INVALIDATE of exactly that page:
    // the changed translation, not the notified range up to the top.
    let covers = |m: &IotlbMsg| m.iova <= stale && stale - m.iova < m.size;
    let updates: Vec<usize> = (0..msgs.len())
        .filter(|&i| is(&msgs[i], IotlbType::Update) && covers(&msgs[i]))
        .collect();
    let first = *updates.first().expect("an UPDATE covering the stale IOVA");
    let next = updates.get(1).copied().unwrap_or(msgs.len());
    let inv: Vec<_> = msgs[first..next]
        .iter()
        .filter(|m| is(m, IotlbType::Invalidate) && covers(m))
        .map(|m| (m.iova, m.size))
        .collect();
    assert_eq!(inv, [(stale & !(PAGE - 1), PAGE)], "{msgs:?}");
    eprintln!(
        "UNMAP [{stale:#x}, {:#x}] -> INVALIDATE iova {:#x} size {:#x}",
        u64::MAX,
        inv[0].0,
        inv[0].1
    );
}

#[test]
fn dpdk_never_transmits_after_an_unmap_to_the_top() {
    let _one = lock(&ONE_CELL);
    let cell = Cell::new(Viommu::Virtio, IommuMode::Strict);
    let sock = socket(&cell.tag("dpdk-stale-top"));
    let mut pmd = Testpmd::start(&sock, true).expect("testpmd starts");
    let (exit, r, out, stats) = run_scenario(&cell, scenario().expect_stall(2000), &sock);
    assert_eq!(exit, VmExit::ExitPort(EXIT_OK as u32), "{out}");
    assert_unmap_to_end_and_fault(&r, &stats);
    // DPDK dropped b: its miss was refused and stays pending (MISS has no
    // ack), so the queue stops at the marker, which never went out.
    assert_eq!(r.u64("stale_completed"), Some(0), "{r:?}");
    assert!(stats.bridge.invalidations >= 1, "{stats:?}");
    let port = pmd.port_stats().expect("testpmd stats");
    assert_eq!(
        (port.rx_packets, port.rx_bytes),
        (1, SIZE),
        "testpmd received more than frame 0:\n{}",
        pmd.output()
    );
}
