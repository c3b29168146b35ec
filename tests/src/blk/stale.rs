//! The virtio-blk use-after-unmap cell: the fast test guest's `blk-stale` scenario (strict mode)
//! against our backend in blk mode, which sets NEED_REPLY on its misses so that it learns at once
//! that iovmm refused one. The run collects everything the assertions of `tests/blk_stale.rs`
//! look at: the guest's verdict, iovmm's and the backend's counters, the IOTLB messages the
//! backend received, and the disk image's bytes.

use devices::vhost_user::wire::IotlbMsg;
use iommu::sync::lock;
use vmm::{VhostUserStats, VmExit};

use super::{disk_image, BlkCell, RUN_TIMEOUT};
use crate::backend::blk::{BlkConfig, BlkSnapshot};
use crate::backend::{BackendConfig, CountersSnapshot, TestBackend};
use crate::guest::{GuestResult, IommuMode, Scenario};
use crate::matrix::{
    assert_invalidates_honoured, temp_path, Viommu, VmRun, MISS_TIMEOUT, ONE_CELL,
};
use crate::rig::iotlb_msgs;

/// The guest's marker (`tests/guest/blk.c`, `stale_marker`).
pub const STALE_MARKER: &[u8] = b"IOVMM-BLK-STALE-MARKER";
/// Bytes per request.
pub const STALE_SIZE: u64 = 4096;
/// The disk: 16 requests' worth (the scenario uses the first 4 regions).
pub const STALE_DISK: u64 = 16 * STALE_SIZE;

/// What a `blk-stale` run produced.
#[derive(Debug)]
pub struct StaleOutcome {
    /// How the VM ended.
    pub exit: VmExit,
    /// The guest's serial output.
    pub serial: String,
    /// The guest's result line.
    pub result: GuestResult,
    /// iovmm's counters for the device.
    pub stats: VhostUserStats,
    /// Our backend's protocol counters.
    pub backend: CountersSnapshot,
    /// Our backend's blk counters.
    pub blk: BlkSnapshot,
    /// Every IOTLB message the backend received, in order.
    pub iotlb: Vec<IotlbMsg>,
    /// The disk image after the run.
    pub image: Vec<u8>,
}

/// The strict cell `blk_stale` runs behind `viommu`.
pub fn stale_cell(viommu: Viommu) -> BlkCell {
    let mut cell = BlkCell::new(viommu, IommuMode::Strict);
    cell.size = STALE_SIZE;
    cell.disk_bytes = STALE_DISK;
    cell
}

/// Runs `blk-stale` behind `viommu` against our backend. Checks on the way that no range the
/// backend was told to invalidate is still translatable in its IOTLB (at each INVALIDATE and
/// after the run); everything else is left to the caller.
pub fn run_stale(viommu: Viommu) -> StaleOutcome {
    let _one = lock(&ONE_CELL);
    let cell = stale_cell(viommu);
    let tag = cell.tag("stale");
    let image = disk_image(&tag, cell.disk_bytes);
    let sock = temp_path(&tag, "sock");
    let config = BackendConfig {
        miss_timeout: MISS_TIMEOUT,
        miss_need_reply: true,
        blk: Some(BlkConfig::new(&image)),
        ..BackendConfig::default()
    };
    let backend = TestBackend::listen(&sock, config).expect("backend listens");
    let vm = cell.vm_config_for(&sock, Scenario::blk_stale(cell.size));
    let run = VmRun::boot(&cell, &vm, RUN_TIMEOUT);
    let result = run.result();
    assert_invalidates_honoured(&backend);
    let out = StaleOutcome {
        exit: run.exit,
        serial: run.serial,
        result,
        stats: run.stats,
        backend: backend.counters(),
        blk: backend.blk_counters().expect("blk counters"),
        iotlb: iotlb_msgs(&backend).into_iter().map(|(_, m)| m).collect(),
        image: std::fs::read(&image).expect("read disk image"),
    };
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&sock);
    out
}
