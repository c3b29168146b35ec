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
//! testpmd must never receive the marker (its refused miss is a fault). What
//! every `net-stale` run checks besides is in `integration_tests::matrix::stale`.

use devices::vhost_user::wire::{IotlbMsg, IotlbType};
use integration_tests::guest::{IommuMode, Scenario};
use integration_tests::matrix::stale::{run_dpdk_stale, run_own_stale, StaleRun};
use integration_tests::matrix::{Cell, Viommu};

const PAGE: u64 = 0x1000;

fn scenario() -> Scenario {
    integration_tests::matrix::stale::scenario().param("unmap_to_end", 1)
}

/// The guest's UNMAP really reached the top, and iovmm's INVALIDATEs all went through and
/// never touched a ring.
fn assert_unmap_to_end(run: &StaleRun) {
    let (r, stats) = (&run.result, &run.stats);
    assert_eq!(r.u64("unmap_to_end"), Some(1), "{r:?}");
    assert_eq!(stats.bridge.invalidation_failures, 0, "{stats:?}");
    assert_eq!(stats.bridge.ring_invalidations, 0, "{stats:?}");
}

fn is(m: &IotlbMsg, t: IotlbType) -> bool {
    m.kind().is_ok_and(|k| k == t)
}

#[test]
fn own_backend_records_a_non_wrapping_invalidate_of_the_stale_iova() {
    let run = run_own_stale(&Cell::new(Viommu::Virtio, IommuMode::Strict), scenario());
    assert_unmap_to_end(&run);
    let (msgs, stale) = (&run.iotlb, run.stale_iova);
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
    // DPDK dropped b: its miss was refused and stays pending (MISS has no
    // ack), so the queue stops at the marker, which never went out.
    let run = run_dpdk_stale(&Cell::new(Viommu::Virtio, IommuMode::Strict), scenario());
    assert_unmap_to_end(&run);
    assert!(run.stats.bridge.invalidations >= 1, "{:?}", run.stats);
}
