//! iovmm's vhost-user blk frontend against a real backend: qemu-storage-daemon's
//! `vhost-user-blk` export (libvhost-user; Debian package qemu-utils). Without a vIOMMU the
//! guest's blk scenario runs end to end (config space from GET_CONFIG, FLUSH, requests in
//! flight, IOERR past the end) and the image holds the pattern; with `iommu=on` iovmm refuses
//! to start, naming what libvhost-user lacks (no ACCESS_PLATFORM, no IOTLB).

use integration_tests::blk::{qsd_start_error, run_qsd, BlkCell};
use integration_tests::guest::IommuMode;
use integration_tests::matrix::Viommu;

#[test]
fn guest_blk_scenario_against_qemu_storage_daemon() {
    let o = run_qsd(&BlkCell::new(Viommu::None, IommuMode::Off));
    // The configuration came from the daemon (GET_CONFIG): 512-byte logical blocks.
    assert_eq!(o.result.u64("blk_size"), Some(512));
    assert_eq!(o.stats.bridge.misses, 0);
}

#[test]
fn large_requests_against_qemu_storage_daemon() {
    let mut cell = BlkCell::new(Viommu::None, IommuMode::Off);
    cell.size = 64 << 10;
    cell.inflight = 4;
    cell.disk_bytes = 2 << 20;
    run_qsd(&cell);
}

#[test]
fn iommu_on_is_refused_with_a_clear_error() {
    for viommu in [
        Viommu::Virtio,
        Viommu::Vtd {
            dt: true,
            ats_cap: true,
        },
    ] {
        let err = qsd_start_error(&BlkCell::new(viommu, IommuMode::Strict));
        eprintln!("{viommu:?}: {err}");
        assert!(err.contains("VIRTIO_F_ACCESS_PLATFORM"), "{err}");
        assert!(err.contains("IOTLB"), "{err}");
    }
}
