//! The integration matrix: one cell is the fast test guest behind a vIOMMU (or none) in one
//! guest IOMMU mode, driving one vhost-user device served by DPDK testpmd or by our own backend.
//! This module holds what every cell shares (the VM of a cell, one run of it, the audits of the
//! security invariant) and the virtio-net TX cells, which check the frame count on both sides
//! and, with the own backend, the payload bytes and the invariant. `rx` has the RX and
//! loop-back cells, [`stale`] the use-after-unmap cells, `crate::blk` the virtio-blk cells.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use devices::vhost_user::wire::IotlbType;
use iommu::sync::lock;
use vmm::{SerialMode, VhostUserInfo, VhostUserStats, VmConfig, VmExit, Vmm};

use crate::backend::latency::LatencyStats;
use crate::backend::{BackendConfig, BackendHandle, CountersSnapshot, TestBackend};
use crate::dpdk::{PortStats, Testpmd};
use crate::guest::{test_guest_path, AtsMode, GuestResult, IommuMode, Scenario, EXIT_OK};
use crate::rig::iotlb_msgs;

mod rx;
pub mod stale;
pub use rx::{run_dpdk_loopback, run_own_backend_rx, run_scenario, Traffic};

/// One cell at a time: a cell's guest vCPU polls in ring 3 and testpmd polls
/// pinned to CPU 0, so parallel cells on a two-core machine would starve the
/// threads that serve IOTLB misses and turn the run into a timing test.
pub static ONE_CELL: Mutex<()> = Mutex::new(());
/// How long the own backend waits for an UPDATE after a miss.
pub(crate) const MISS_TIMEOUT: Duration = Duration::from_secs(10);

/// The vIOMMU of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viommu {
    /// No vIOMMU; the device is not behind one.
    None,
    /// virtio-iommu.
    Virtio,
    /// VT-d; `dt` = device-TLB support (ECAP.DT), `ats_cap` = the device has
    /// an ATS capability.
    Vtd {
        /// ECAP.DT.
        dt: bool,
        /// ATS capability on the device.
        ats_cap: bool,
    },
}

/// VT-d with a device-TLB, the device with an ATS capability.
pub const DT_ATS: Viommu = Viommu::Vtd {
    dt: true,
    ats_cap: true,
};
/// VT-d without a device-TLB, the device without ATS.
pub const NO_DT: Viommu = Viommu::Vtd {
    dt: false,
    ats_cap: false,
};
/// Every vIOMMU a cell can sit behind.
pub const VIOMMUS: [Viommu; 3] = [Viommu::Virtio, DT_ATS, NO_DT];

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// The VM of a cell: the fast test guest running `scenario` (with the host TSC rate when known),
/// serial output captured, behind `viommu` (VT-d in caching mode; `prefetch`: UPDATEs pushed for
/// new mappings), and one vhost-user `device` ("net" or "blk") on `sock` behind it.
pub(crate) fn cell_vm(
    viommu: Viommu,
    prefetch: bool,
    device: &str,
    sock: &Path,
    scenario: Scenario,
    tsc_khz: Option<u64>,
) -> VmConfig {
    let mut cfg = VmConfig::new(test_guest_path());
    let scenario = match tsc_khz {
        Some(khz) => scenario.tsc_khz(khz),
        None => scenario,
    };
    cfg.cmdline = scenario.cmdline().expect("scenario cmdline");
    cfg.serial = SerialMode::Capture;
    let (iommu, ats_cap) = match viommu {
        Viommu::None => (None, false),
        Viommu::Virtio => (Some("virtio".to_string()), false),
        Viommu::Vtd { dt, ats_cap } => (
            Some(format!("vtd,caching_mode=on,device_iotlb={}", on(dt))),
            ats_cap,
        ),
    };
    let dev = format!(
        "{device},socket={},iommu={},ats={}",
        sock.display(),
        on(iommu.is_some()),
        on(ats_cap)
    );
    let iommu = iommu.map(|i| if prefetch { i + ",iotlb=prefetch" } else { i });
    cfg.iommu = iommu.map(|i| i.parse().expect("iommu option"));
    cfg.vhost_user.push(dev.parse().expect("vhost-user option"));
    cfg
}

/// `<tmp>/iovmm-<pid>-<tag>.<ext>`.
pub fn temp_path(tag: &str, ext: &str) -> PathBuf {
    std::env::temp_dir().join(format!("iovmm-{}-{tag}.{ext}", std::process::id()))
}

/// The vhost-user socket of the cell tagged `tag`.
pub fn socket(tag: &str) -> PathBuf {
    temp_path(tag, "sock")
}

/// One boot of a cell's VM, run until the guest stopped.
#[derive(Debug)]
pub struct VmRun {
    /// How the VM ended.
    pub exit: VmExit,
    /// The guest's serial output.
    pub serial: String,
    /// iovmm's counters for the device.
    pub stats: VhostUserStats,
}

impl VmRun {
    /// Boots `config` (the VM of `cell`), waits up to `timeout` for it to stop, and audits the
    /// device ([`assert_nothing_stale_held`]).
    pub fn boot(cell: &impl Debug, config: &VmConfig, timeout: Duration) -> VmRun {
        let mut vmm = Vmm::start(config).expect("VM starts");
        let exit = vmm.wait_timeout(timeout).expect("VMM stops");
        let serial = vmm.serial_output().unwrap_or_default();
        let device = &vmm.vhost_user_devices()[0];
        assert_nothing_stale_held(cell, device);
        let stats = device.stats();
        VmRun {
            exit,
            serial,
            stats,
        }
    }

    /// The guest's result line; panics with the serial output when there is none.
    pub fn result(&self) -> GuestResult {
        let serial = &self.serial;
        GuestResult::from_output(serial)
            .unwrap_or_else(|e| panic!("no result line ({e}); serial:\n{serial}"))
    }

    /// The result line of a guest that must have exited with `EXIT_OK`.
    pub fn ok_result(&self, cell: &impl Debug) -> GuestResult {
        assert_eq!(
            self.exit,
            VmExit::ExitPort(EXIT_OK as u32),
            "{cell:?} guest failed; serial:\n{}",
            self.serial
        );
        self.result()
    }
}

/// iovmm's side of the security invariant, for every back end (DPDK's IOTLB
/// cannot be probed): once the guest stopped, nothing the device's back end
/// may hold (every UPDATE sent and not invalidated since) differs from what
/// the vIOMMU translates.
pub fn assert_nothing_stale_held(cell: &impl Debug, device: &VhostUserInfo) {
    let stale = device.stale_translations();
    eprintln!(
        "{cell:?}: {} IOVA segment(s) held, audited",
        device.held_ranges()
    );
    assert!(
        stale.is_empty(),
        "{cell:?}: the back end may still hold translations the guest removed: {stale:x?}"
    );
}

/// Every invalidated range that no later UPDATE re-mapped is gone from the
/// backend's IOTLB: the backend tries the access right away.
pub fn assert_no_stale_translation(backend: &BackendHandle) {
    let msgs: Vec<_> = iotlb_msgs(backend).into_iter().map(|(_, m)| m).collect();
    let is = |m: &devices::vhost_user::wire::IotlbMsg, t: IotlbType| m.msg_type == t as u8;
    for (i, inv) in msgs.iter().enumerate() {
        if !is(inv, IotlbType::Invalidate) || inv.size == 0 {
            continue;
        }
        let (iova, end) = (inv.iova, inv.iova.saturating_add(inv.size - 1));
        let remapped = msgs[i + 1..].iter().any(|m| {
            is(m, IotlbType::Update)
                && m.iova <= end
                && m.iova.saturating_add(m.size.saturating_sub(1)) >= iova
        });
        if !remapped {
            assert!(
                !backend.probe(iova, 1),
                "stale translation at {iova:#x} after INVALIDATE"
            );
        }
    }
}

/// Our backend honoured every INVALIDATE: nothing it covered was still translatable when the
/// backend applied it, and nothing invalidated (and not re-mapped since) is translatable now.
pub fn assert_invalidates_honoured(backend: &BackendHandle) {
    assert_eq!(
        backend.counters().invalidate_violations,
        0,
        "a range was still translatable when its INVALIDATE was applied"
    );
    assert_no_stale_translation(backend);
}

/// Every activation of a device behind a vIOMMU starts with exactly one full-range
/// INVALIDATE; without a vIOMMU none is sent.
pub fn assert_connection_invalidates(iommu: bool, s: &VhostUserStats) {
    let want = if iommu { s.activations } else { 0 };
    assert_eq!(
        s.bridge.connect_invalidations, want,
        "connection INVALIDATEs for {} activations",
        s.activations
    );
}

/// The INVALIDATEs the guest's unmaps caused: every one iovmm sent but the full-range one
/// each activation starts with.
pub fn unmap_invalidations(s: &VhostUserStats) -> u64 {
    s.iotlb.invalidations - s.bridge.connect_invalidations
}

/// At most `max` IOTLB misses in the whole run.
pub fn assert_misses_at_most(s: &VhostUserStats, max: u64) {
    assert!(s.bridge.misses <= max, "misses {}", s.bridge.misses);
}

/// A virtio-net cell.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    /// vIOMMU.
    pub viommu: Viommu,
    /// Guest IOMMU mode.
    pub mode: IommuMode,
    /// Guest ATS choice (VT-d).
    pub ats: AtsMode,
    /// Frames to send.
    pub frames: u64,
    /// Frame size.
    pub size: u64,
    /// Host TSC rate for the guest's timing (`iovmm.tsc_khz`), if known.
    pub tsc_khz: Option<u64>,
    /// Push UPDATEs for new mappings (`iotlb=prefetch`) instead of waiting for misses.
    pub prefetch: bool,
    /// Which way the frames go (the guest's scenario).
    pub traffic: Traffic,
    /// RX buffers mapped read-write instead of write-only (DPDK needs it).
    pub rx_rw: bool,
}

impl Cell {
    /// A cell with 500 frames of 1000 bytes and ATS left to the guest.
    pub fn new(viommu: Viommu, mode: IommuMode) -> Self {
        Cell {
            viommu,
            mode,
            ats: AtsMode::Auto,
            frames: 500,
            size: 1000,
            tsc_khz: None,
            prefetch: false,
            traffic: Traffic::Tx,
            rx_rw: false,
        }
    }

    /// A cell with `traffic` (500 frames of 1000 bytes).
    pub fn with_traffic(viommu: Viommu, mode: IommuMode, traffic: Traffic) -> Self {
        Cell {
            traffic,
            ..Cell::new(viommu, mode)
        }
    }

    /// A name for this cell's socket and files.
    pub fn tag(&self, backend: &str) -> String {
        format!(
            "{backend}-{:?}-{}-{}-{:?}",
            self.viommu,
            self.mode.as_str(),
            self.ats.as_str(),
            self.traffic
        )
        .replace([' ', '{', '}', ':', ','], "")
    }

    /// The VM of this cell running `scenario` (the cell's mode, ATS and TSC rate added).
    pub(crate) fn vm_config_with(&self, sock: &Path, scenario: Scenario) -> VmConfig {
        let scenario = scenario.iommu(self.mode).ats(self.ats);
        cell_vm(
            self.viommu,
            self.prefetch,
            "net",
            sock,
            scenario,
            self.tsc_khz,
        )
    }
}

/// What a cell run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The guest's result line.
    pub result: GuestResult,
    /// The VMM's counters for the device.
    pub stats: VhostUserStats,
    /// The own backend's counters (own-backend cells).
    pub backend: Option<CountersSnapshot>,
    /// testpmd's counters (DPDK cells).
    pub dpdk: Option<PortStats>,
    /// MISS → UPDATE as the own backend timed it.
    pub backend_miss_latency: Option<LatencyStats>,
}

/// Runs the cell's own scenario against the backend on `sock`: the guest exited with
/// `EXIT_OK` having moved every frame, and the device behind a vIOMMU started each activation
/// with one full-range INVALIDATE.
pub(crate) fn run_guest(cell: &Cell, sock: &Path) -> (GuestResult, VhostUserStats) {
    let config = cell.vm_config_with(sock, cell.traffic.scenario(cell));
    let run = VmRun::boot(cell, &config, Duration::from_secs(60));
    let result = run.ok_result(cell);
    cell.traffic.assert_guest_done(cell, &result, &run.serial);
    assert_connection_invalidates(cell.viommu != Viommu::None, &run.stats);
    (result, run.stats)
}

/// Runs `cell` against our own backend started from `config` (the cell's ACCESS_PLATFORM and
/// miss timeout added); the caller holds [`ONE_CELL`]. `check` looks at the backend once the
/// guest is done; then no translation may have failed and every INVALIDATE must have been
/// honoured.
pub(crate) fn run_own(
    cell: &Cell,
    config: BackendConfig,
    check: impl FnOnce(&BackendHandle, &GuestResult),
) -> Outcome {
    let config = BackendConfig {
        access_platform: cell.viommu != Viommu::None,
        miss_timeout: MISS_TIMEOUT,
        ..config
    };
    let sock = socket(&cell.tag("own"));
    let backend = TestBackend::listen(&sock, config).expect("backend listens");
    let (result, stats) = run_guest(cell, &sock);
    check(&backend, &result);
    let c = backend.counters();
    assert_eq!(c.translation_failures, 0);
    assert_invalidates_honoured(&backend);
    report("own", cell, &stats);
    Outcome {
        result,
        stats,
        backend: Some(c),
        dpdk: None,
        backend_miss_latency: backend.miss_latency(),
    }
}

/// Runs `cell` against testpmd started by `start` on the cell's socket: it received every
/// frame the guest sent (counted once the guest is done, or within 5 s). `check` looks at
/// testpmd and the outcome while testpmd still runs.
pub(crate) fn run_testpmd(
    cell: &Cell,
    start: impl FnOnce(&Path) -> Testpmd,
    check: impl FnOnce(&Testpmd, &Outcome),
) -> Outcome {
    let _one = lock(&ONE_CELL);
    let sock = socket(&cell.tag("dpdk"));
    let mut pmd = start(&sock);
    let (result, stats) = run_guest(cell, &sock);
    let port = port_stats_after(&mut pmd, cell.frames);
    assert_eq!(
        port.rx_packets,
        cell.frames,
        "testpmd output:\n{}",
        pmd.output()
    );
    assert_eq!(port.rx_bytes, cell.frames * cell.size);
    report("dpdk", cell, &stats);
    let outcome = Outcome {
        result,
        stats,
        backend: None,
        dpdk: Some(port),
        backend_miss_latency: None,
    };
    check(&pmd, &outcome);
    outcome
}

/// Reads testpmd's counters with `read` until `done` holds, or for the last time after 5 s
/// (testpmd has nothing to wait on: they are read again every 100 ms).
pub fn testpmd_read_until<T>(
    pmd: &mut Testpmd,
    read: impl Fn(&mut Testpmd) -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let mut last = read(pmd);
    for _ in 0..50 {
        if done(&last) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        last = read(pmd);
    }
    last
}

/// testpmd's port counters once it received `frames` frames, or after 5 s.
pub fn port_stats_after(pmd: &mut Testpmd, frames: u64) -> PortStats {
    testpmd_read_until(
        pmd,
        |p| p.port_stats().expect("testpmd stats"),
        |port| port.rx_packets >= frames,
    )
}

/// The wrapping sum of every payload byte in our backend's sink file (u32 length + frame,
/// repeated).
pub fn sink_byte_sum(path: &Path) -> u64 {
    let data = std::fs::read(path).expect("sink file");
    let (mut sum, mut off) = (0u64, 0usize);
    while off + 4 <= data.len() {
        let len = data[off..off + 4]
            .try_into()
            .map(u32::from_ne_bytes)
            .unwrap_or(0) as usize;
        let end = (off + 4 + len).min(data.len());
        sum = data[off + 4..end]
            .iter()
            .fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
        off += 4 + len;
    }
    sum
}

/// Runs a TX `cell` against our own backend, which records every frame: the payload bytes it
/// received add up to the guest's checksum.
pub fn run_own_backend(cell: &Cell) -> Outcome {
    let _one = lock(&ONE_CELL);
    let sink = socket(&cell.tag("own")).with_extension("frames");
    let _ = std::fs::remove_file(&sink);
    let config = BackendConfig {
        sink: Some(sink.clone()),
        ..BackendConfig::default()
    };
    let outcome = run_own(cell, config, |backend, result| {
        assert!(backend.wait_for(Duration::from_secs(5), |c| c.tx_frames == cell.frames));
        assert_eq!(backend.counters().tx_bytes, cell.frames * cell.size);
        assert_eq!(
            Some(sink_byte_sum(&sink)),
            result.u64("checksum"),
            "payload bytes differ"
        );
    });
    let _ = std::fs::remove_file(&sink);
    outcome
}

/// Runs a TX `cell` against DPDK testpmd.
pub fn run_dpdk(cell: &Cell) -> Outcome {
    let start = |sock: &Path| Testpmd::start(sock, true).expect("testpmd starts");
    run_testpmd(cell, start, |_, _| {})
}

pub(crate) fn report(backend: &str, cell: &Cell, s: &VhostUserStats) {
    if std::env::var_os("IOVMM_MATRIX_QUIET").is_some() {
        return;
    }
    eprintln!(
        "{backend:4} {:?} {:?} {:11} ats={:4} prefetch={}: misses {:4} updates {:4} invalidates {:4} miss p50 {} us",
        cell.traffic,
        cell.viommu,
        cell.mode.as_str(),
        cell.ats.as_str(),
        cell.prefetch,
        s.bridge.misses,
        s.iotlb.updates,
        s.iotlb.invalidations,
        s.bridge.miss_latency.p50_ns / 1000,
    );
}
