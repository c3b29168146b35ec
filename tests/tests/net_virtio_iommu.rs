//! Frames through a vhost-user virtio-net device, without a vIOMMU and behind
//! virtio-iommu, in each guest IOMMU mode, against DPDK testpmd and our own
//! backend (see `integration_tests::matrix` for what every cell checks).

use integration_tests::guest::IommuMode;
use integration_tests::matrix::{
    assert_misses_at_most, run_dpdk, run_own_backend, unmap_invalidations, Cell, Outcome, Viommu,
};

#[test]
fn own_backend_without_viommu() {
    let o = run_own_backend(&Cell::new(Viommu::None, IommuMode::Off));
    assert_eq!((o.stats.iotlb.updates, o.stats.iotlb.invalidations), (0, 0));
}

#[test]
fn own_backend_virtio_iommu_strict_invalidates_every_unmap() {
    let cell = Cell::new(Viommu::Virtio, IommuMode::Strict);
    let o = run_own_backend(&cell);
    let unmaps = o.result.u64("unmaps").expect("unmaps");
    assert!(unmaps >= cell.frames);
    // One acked INVALIDATE per guest UNMAP: one backend round trip per unmap.
    assert_eq!(unmap_invalidations(&o.stats), unmaps);
    // At most one miss per frame (its buffer was invalidated with the previous
    // unmap) plus the rings' few; extents often cover the next buffer too.
    assert_misses_at_most(&o.stats, cell.frames + 4);
}

/// What a lazy cell must send. The guest defers its unmaps and sends a batch's UNMAPs
/// together at the flush; iovmm executes them as one batch and merges touching ranges into
/// one INVALIDATE. The back end read every buffer, so each flush removes translations it
/// holds: at least one INVALIDATE per flush, and fewer than one per unmap (what strict sends).
fn assert_lazy_invalidations(cell: &Cell, o: &Outcome) {
    let unmaps = o.result.u64("unmaps").expect("unmaps");
    let flushes = o.result.u64("flushes").expect("flushes");
    let sent = unmap_invalidations(&o.stats);
    assert_eq!(o.result.str("iommu_mode"), Some("lazy"));
    assert!(unmaps >= cell.frames, "unmaps {unmaps}");
    assert!(flushes > 0, "no lazy flush");
    assert!(
        sent >= flushes,
        "{sent} unmap INVALIDATEs for {flushes} flushes"
    );
    assert!(
        sent < unmaps,
        "{sent} unmap INVALIDATEs for {unmaps} unmaps: not batched"
    );
}

#[test]
fn own_backend_virtio_iommu_lazy() {
    let cell = Cell::new(Viommu::Virtio, IommuMode::Lazy);
    let o = run_own_backend(&cell);
    assert_lazy_invalidations(&cell, &o);
}

#[test]
fn own_backend_virtio_iommu_passthrough_has_no_per_page_misses() {
    let o = run_own_backend(&Cell::new(Viommu::Virtio, IommuMode::Passthrough));
    // Identity extents as large as a memory region: a handful of misses in total.
    assert_misses_at_most(&o.stats, 4);
    assert_eq!(unmap_invalidations(&o.stats), 0);
}

#[test]
fn own_backend_virtio_iommu_guest_off_uses_boot_bypass() {
    let o = run_own_backend(&Cell::new(Viommu::Virtio, IommuMode::Off));
    assert_misses_at_most(&o.stats, 4);
}

#[test]
fn dpdk_without_viommu() {
    run_dpdk(&Cell::new(Viommu::None, IommuMode::Off));
}

#[test]
fn dpdk_virtio_iommu_strict() {
    let o = run_dpdk(&Cell::new(Viommu::Virtio, IommuMode::Strict));
    assert_eq!(Some(unmap_invalidations(&o.stats)), o.result.u64("unmaps"));
}

#[test]
fn dpdk_virtio_iommu_lazy() {
    let cell = Cell::new(Viommu::Virtio, IommuMode::Lazy);
    let o = run_dpdk(&cell);
    assert_lazy_invalidations(&cell, &o);
}

#[test]
fn dpdk_virtio_iommu_passthrough() {
    let o = run_dpdk(&Cell::new(Viommu::Virtio, IommuMode::Passthrough));
    assert_misses_at_most(&o.stats, 4);
}

#[test]
fn dpdk_virtio_iommu_guest_off() {
    run_dpdk(&Cell::new(Viommu::Virtio, IommuMode::Off));
}

#[test]
fn own_backend_virtio_iommu_strict_prefetch_avoids_misses() {
    let mut cell = Cell::new(Viommu::Virtio, IommuMode::Strict);
    cell.prefetch = true;
    let o = run_own_backend(&cell);
    // Every buffer's UPDATE is pushed when the guest maps it: misses are rare
    // (rings, and a backend that looks before the pushed UPDATE landed).
    assert!(
        o.stats.bridge.prefetches >= cell.frames,
        "{:?}",
        o.stats.bridge
    );
    assert_misses_at_most(&o.stats, cell.frames / 20);
}

#[test]
fn dpdk_virtio_iommu_strict_prefetch() {
    let mut cell = Cell::new(Viommu::Virtio, IommuMode::Strict);
    cell.prefetch = true;
    let o = run_dpdk(&cell);
    assert_misses_at_most(&o.stats, cell.frames / 20);
}
