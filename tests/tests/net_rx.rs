//! Device-writable DMA: the guest receives into buffers it mapped write-only
//! (VT-d PTE W, virtio-iommu MAP WRITE) and verifies every frame, behind both
//! vIOMMUs in every mode, with our backend's generator and loop-back and with
//! testpmd `macswap` (which needs read-write RX buffers: DPDK's enqueue
//! translates RX descriptors with VHOST_ACCESS_RW; behind a vIOMMU the guest counts
//! a frame testpmd dropped, which must be exactly testpmd's TX-dropped).

use integration_tests::guest::IommuMode;
use integration_tests::matrix::{
    run_dpdk_loopback, run_own_backend_rx, Cell, Traffic, Viommu, DT_ATS, NO_DT, VIOMMUS,
};

fn own_all_modes(viommu: Viommu, traffic: Traffic) {
    for mode in IommuMode::ALL {
        let o = run_own_backend_rx(&Cell::with_traffic(viommu, mode, traffic));
        let translated = matches!(mode, IommuMode::Strict | IommuMode::Lazy);
        if translated {
            // Every RX buffer was mapped and unmapped (the last ring's worth stays posted).
            let maps = o.result.u64("maps").expect("maps");
            assert!(maps >= o.result.u64("received").expect("received"));
            assert!(o.stats.bridge.misses > 0);
        }
    }
}

#[test]
fn own_backend_rx_virtio_iommu_every_mode() {
    own_all_modes(Viommu::Virtio, Traffic::Rx);
}

#[test]
fn own_backend_rx_vtd_ats_every_mode() {
    own_all_modes(DT_ATS, Traffic::Rx);
}

#[test]
fn own_backend_rx_vtd_without_device_tlb_every_mode() {
    own_all_modes(NO_DT, Traffic::Rx);
}

#[test]
fn own_backend_rx_without_viommu() {
    run_own_backend_rx(&Cell::with_traffic(
        Viommu::None,
        IommuMode::Off,
        Traffic::Rx,
    ));
}

#[test]
fn own_backend_loopback_every_viommu_and_mode() {
    for viommu in VIOMMUS {
        own_all_modes(viommu, Traffic::Loopback);
    }
}

fn dpdk_all_modes(viommu: Viommu) {
    for mode in IommuMode::ALL {
        let mut cell = Cell::with_traffic(viommu, mode, Traffic::Loopback);
        cell.rx_rw = true;
        run_dpdk_loopback(&cell);
    }
}

#[test]
fn dpdk_loopback_virtio_iommu_every_mode() {
    dpdk_all_modes(Viommu::Virtio);
}

#[test]
fn dpdk_loopback_vtd_ats_every_mode() {
    dpdk_all_modes(DT_ATS);
}

#[test]
fn dpdk_loopback_vtd_without_device_tlb_every_mode() {
    dpdk_all_modes(NO_DT);
}

#[test]
fn dpdk_loopback_without_viommu() {
    let mut cell = Cell::with_traffic(Viommu::None, IommuMode::Off, Traffic::Loopback);
    cell.rx_rw = true;
    run_dpdk_loopback(&cell);
}
