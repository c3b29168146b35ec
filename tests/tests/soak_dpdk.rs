//! CI's short soak against DPDK testpmd (issue 13): the three strict
//! translated cells (virtio-iommu, VT-d+DT/ATS, VT-d), a few runs each,
//! under a competing busy thread. No run may stall or fail, iovmm's stall
//! detector must stay quiet, and no INVALIDATE may overlap a running vring: before the fix, VT-d's widened
//! invalidation blocks covered the TX rings, DPDK disabled the queue and it
//! sometimes never came back.
//!
//! The ring counter only counts while the device runs (its rings are
//! registered from programming to reset), so setup and teardown are outside
//! it by construction. The full soak is `iovmm-bench --soak N`.
//!
//! Also here: iovmm's own stall detector names a queue its back end stopped
//! serving, end to end on KVM.

use std::time::Duration;

use devices::vhost_user::wire::IotlbPerm;
use integration_tests::backend::{BackendConfig, Misbehaviour, TestBackend};
use integration_tests::bench::{host_tsc_khz, soak, soak_cells, CpuLoad, SoakRun};
use integration_tests::guest::{test_guest_path, IommuMode, Scenario, EXIT_FAILED};
use integration_tests::matrix::{socket, ONE_CELL};
use iommu::sync::lock;
use vmm::{SerialMode, VmConfig, VmExit, Vmm};

/// Runs per cell.
const RUNS: usize = 3;
/// Frames per run: a few thousand unmaps per run on VT-d, each one a chance
/// to invalidate a ring.
const FRAMES: u64 = 3000;
const SIZE: u64 = 1024;
/// The competing load ends by itself after this, whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(600);

#[test]
fn strict_cells_never_stall_or_invalidate_a_ring_under_load() {
    let tsc_khz = host_tsc_khz();
    let cells: Vec<_> = soak_cells(FRAMES, SIZE, tsc_khz)
        .into_iter()
        .filter(|c| c.mode == IommuMode::Strict && !c.prefetch)
        .collect();
    assert_eq!(cells.len(), 3, "virtio-iommu, VT-d+DT/ATS and VT-d");
    let load = CpuLoad::start(1, LOAD_LIMIT).expect("load thread");
    let results = soak(&cells, RUNS, tsc_khz, |c, i, r| {
        eprintln!("run {} {:?} {}: {r:?}", i + 1, c.viommu, c.mode.as_str());
    });
    assert!(load.stop() > 0, "the competing load ran");
    let mut problems = Vec::new();
    for c in &results {
        assert_eq!(c.runs.len(), RUNS);
        for (i, r) in c.runs.iter().enumerate() {
            let what = format!("{:?} run {}", c.cell.viommu, i + 1);
            match r {
                SoakRun::Ok(s) if s.ring_invalidations > 0 => problems.push(format!(
                    "{what}: {} INVALIDATEs overlapped a running vring",
                    s.ring_invalidations
                )),
                // A healthy run never holds a descriptor for 2 s.
                SoakRun::Ok(s) if s.stall_reports > 0 => problems.push(format!(
                    "{what}: iovmm reported {} stalled queues in a run that passed",
                    s.stall_reports
                )),
                SoakRun::Ok(_) => {}
                SoakRun::Stall(m) => problems.push(format!("{what}: STALL {m}")),
                SoakRun::Failed(m) => problems.push(format!("{what}: failed {m}")),
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// How long the guest waits for a completion: well past the detector's
/// 2 s threshold plus its 0.5 s tick.
const GUEST_TIMEOUT_MS: u64 = 8000;

/// A back end that asks for write access to read-only TX buffers: iovmm
/// refuses the misses (a DMA fault) and, as with DPDK's unacked MISS, the
/// back end's TX queue stops. While the guest still waits, iovmm reports the
/// queue once, with the refused miss.
#[test]
fn iovmm_reports_a_queue_its_back_end_stopped_serving() {
    // RUST_LOG=warn shows the fault warnings and the stall report.
    let _ = env_logger::builder().is_test(true).try_init();
    let _one = lock(&ONE_CELL);
    let sock = socket("stall-detector");
    let config = BackendConfig {
        misbehave: Misbehaviour {
            buffer_perm: Some(IotlbPerm::ReadWrite),
            ..Misbehaviour::default()
        },
        ..BackendConfig::default()
    };
    let _backend = TestBackend::listen(&sock, config).expect("backend listens");
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::net_tx(4, 200)
        .iommu(IommuMode::Strict)
        .timeout_ms(GUEST_TIMEOUT_MS)
        .cmdline()
        .expect("cmdline");
    cfg.serial = SerialMode::Capture;
    cfg.iommu = Some("virtio".parse().expect("iommu option"));
    let dev = format!("net,socket={},iommu=on,ats=off", sock.display());
    cfg.vhost_user.push(dev.parse().expect("vhost-user option"));
    let mut vmm = Vmm::start(&cfg).expect("VM starts");
    let exit = vmm
        .wait_timeout(Duration::from_secs(60))
        .expect("VMM stops");
    let serial = vmm.serial_output().unwrap_or_default();
    assert_eq!(exit, VmExit::ExitPort(EXIT_FAILED as u32), "{serial}");
    assert!(serial.contains("no transmit completion"), "{serial}");
    let s = vmm.vhost_user_devices()[0].stats().bridge;
    assert!(s.misses_refused >= 1, "{s:?}");
    assert_eq!(s.stall_reports, 1, "one episode, one report: {s:?}");
}
