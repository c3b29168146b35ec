//! The security invariant end to end: after a strict unmap completed, a TX
//! descriptor at the old IOVA carrying a marker frame is never transferred,
//! behind virtio-iommu, VT-d with a device-TLB and ATS, and VT-d.
//! iovmm refuses the backend's miss and reports a guest-visible fault; our
//! backend completes the faulted descriptor and the device keeps working;
//! DPDK keeps the refused miss pending (MISS has no ack), so its TX queue
//! stops there: the marker never reaches testpmd either. What each run
//! checks is in `integration_tests::matrix::stale`.

use integration_tests::guest::IommuMode;
use integration_tests::matrix::stale::{run_dpdk_stale, run_own_stale, scenario};
use integration_tests::matrix::{Cell, VIOMMUS};

#[test]
fn own_backend_never_transfers_a_descriptor_at_an_unmapped_iova() {
    for viommu in VIOMMUS {
        run_own_stale(&Cell::new(viommu, IommuMode::Strict), scenario());
    }
}

#[test]
fn dpdk_never_transfers_a_descriptor_at_an_unmapped_iova() {
    for viommu in VIOMMUS {
        run_dpdk_stale(&Cell::new(viommu, IommuMode::Strict), scenario());
    }
}
