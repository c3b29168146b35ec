//! The guest's blk scenario (GET_ID, pattern over the whole disk with 8 requests in flight,
//! FLUSH, read back and verify, one read past the end that must fail with IOERR) through
//! iovmm's vhost-user blk frontend and our own backend in blk mode: without a vIOMMU, and in
//! every guest IOMMU mode behind virtio-iommu and behind VT-d with and without ATS. The harness
//! also checks the backend's counters, the image bytes and that no invalidated range is still
//! translatable.

use integration_tests::blk::{run_own_backend, BlkCell, BlkOutcome};
use integration_tests::guest::IommuMode;
use integration_tests::matrix::{unmap_invalidations, Viommu, DT_ATS, NO_DT};

fn run(viommu: Viommu, mode: IommuMode) -> BlkOutcome {
    run_own_backend(&BlkCell::new(viommu, mode))
}

/// Strict mode unmaps every buffer right away: each of the 3 buffers of a request costs a
/// miss (the backend never saw its IOVA) and an INVALIDATE when it is unmapped.
fn assert_strict_round_trips(o: &BlkOutcome) {
    let unmaps = o.result.u64("unmaps").expect("unmaps");
    let reqs = 2 * o.result.u64("requests").expect("requests");
    assert!(unmaps >= 3 * reqs, "{unmaps} unmaps for {reqs} requests");
    assert!(unmap_invalidations(&o.stats) > 0);
    assert!(
        o.stats.bridge.misses >= reqs,
        "misses {}",
        o.stats.bridge.misses
    );
    assert_eq!(o.stats.bridge.misses_refused, 0);
}

#[test]
fn no_viommu() {
    let o = run(Viommu::None, IommuMode::Off);
    assert_eq!(o.stats.bridge.misses, 0);
}

#[test]
fn virtio_iommu_off() {
    run(Viommu::Virtio, IommuMode::Off);
}

#[test]
fn virtio_iommu_passthrough() {
    let o = run(Viommu::Virtio, IommuMode::Passthrough);
    assert_eq!(unmap_invalidations(&o.stats), 0);
}

#[test]
fn virtio_iommu_strict() {
    assert_strict_round_trips(&run(Viommu::Virtio, IommuMode::Strict));
}

#[test]
fn virtio_iommu_lazy() {
    let o = run(Viommu::Virtio, IommuMode::Lazy);
    assert!(o.result.u64("flushes").expect("flushes") >= 1);
}

#[test]
fn vtd_ats_off() {
    run(DT_ATS, IommuMode::Off);
}

#[test]
fn vtd_ats_passthrough() {
    let o = run(DT_ATS, IommuMode::Passthrough);
    assert_eq!(unmap_invalidations(&o.stats), 0);
}

#[test]
fn vtd_ats_strict() {
    let o = run(DT_ATS, IommuMode::Strict);
    assert_eq!(o.result.u64("ats"), Some(1), "guest enabled ATS");
    assert_strict_round_trips(&o);
}

#[test]
fn vtd_ats_lazy() {
    // Caching mode turns lazy into strict, like Linux.
    let o = run(DT_ATS, IommuMode::Lazy);
    assert_eq!(o.result.str("iommu_mode"), Some("strict"));
}

#[test]
fn vtd_no_device_tlb_off() {
    run(NO_DT, IommuMode::Off);
}

#[test]
fn vtd_no_device_tlb_passthrough() {
    run(NO_DT, IommuMode::Passthrough);
}

#[test]
fn vtd_no_device_tlb_strict() {
    let o = run(NO_DT, IommuMode::Strict);
    assert_eq!(o.result.u64("ats"), Some(0));
    assert_strict_round_trips(&o);
}

#[test]
fn vtd_no_device_tlb_lazy() {
    run(NO_DT, IommuMode::Lazy);
}

#[test]
fn large_requests_behind_virtio_iommu_strict() {
    let mut cell = BlkCell::new(Viommu::Virtio, IommuMode::Strict);
    cell.size = 64 << 10;
    cell.disk_bytes = 2 << 20;
    let o = run_own_backend(&cell);
    assert_eq!(o.blk.expect("blk").bytes_read, 2 << 20);
}

/// A read whose data buffer the guest mapped read-only: the backend asks for write access, iovmm
/// refuses the miss and reports a DMA fault to the guest, the request fails with IOERR and the
/// buffer keeps its marker (checked in the harness and the guest).
fn ro_read(viommu: Viommu) -> BlkOutcome {
    let mut cell = BlkCell::new(viommu, IommuMode::Strict);
    cell.ro_read = true;
    let o = run_own_backend(&cell);
    assert!(o.stats.bridge.misses_refused >= 1, "{:?}", o.stats.bridge);
    o
}

#[test]
fn read_into_read_only_mapping_is_refused_behind_virtio_iommu() {
    let o = ro_read(Viommu::Virtio);
    assert!(
        o.result.u64("fault_events").unwrap_or(0) >= 1,
        "{:?}",
        o.result
    );
    // The fault names a write (VIRTIO_IOMMU_FAULT_F_WRITE), not a read.
    let flags = o.result.u64("fault_flags").expect("fault_flags");
    assert_eq!(flags & 3, 2, "{:?}", o.result);
}

#[test]
fn read_into_read_only_mapping_is_refused_behind_vtd_with_ats() {
    let o = ro_read(DT_ATS);
    assert!(o.result.u64("faults").unwrap_or(0) >= 1, "{:?}", o.result);
    assert_eq!(o.result.u64("fault_write"), Some(1));
}

#[test]
fn read_into_read_only_mapping_is_refused_behind_vtd() {
    let o = ro_read(NO_DT);
    assert!(o.result.u64("faults").unwrap_or(0) >= 1, "{:?}", o.result);
    assert_eq!(o.result.u64("fault_write"), Some(1));
}
