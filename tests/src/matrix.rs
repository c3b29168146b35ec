//! One cell of the integration matrix: the fast test guest transmits frames
//! through a vhost-user virtio-net device served by DPDK testpmd or by our
//! own backend, with a given vIOMMU and guest IOMMU mode; the harness checks
//! the frame count on both sides and, with the own backend, the payload
//! bytes and the security invariant.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use iommu::sync::lock;
use vmm::{SerialMode, VhostUserInfo, VhostUserStats, VmConfig, VmExit, Vmm};

use crate::backend::latency::LatencyStats;
use crate::backend::{BackendConfig, BackendHandle, CountersSnapshot, RecordedMsg, TestBackend};
use crate::dpdk::{PortStats, Testpmd};
use crate::guest::{test_guest_path, AtsMode, GuestResult, IommuMode, Scenario};

mod rx;
pub use rx::{run_dpdk_loopback, run_own_backend_rx, run_scenario, Traffic};

const VHOST_USER_IOTLB_MSG: u32 = 22;
const IOTLB_UPDATE: u8 = 2;
const IOTLB_INVALIDATE: u8 = 3;
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

/// A matrix cell.
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

    fn vm_config(&self, sock: &std::path::Path) -> VmConfig {
        self.vm_config_with(sock, self.traffic.scenario(self))
    }

    /// The VM of this cell running `scenario` (the cell's mode, ATS and TSC rate added).
    pub(crate) fn vm_config_with(&self, sock: &std::path::Path, scenario: Scenario) -> VmConfig {
        let mut cfg = VmConfig::new(test_guest_path());
        let mut scenario = scenario.iommu(self.mode).ats(self.ats);
        if let Some(khz) = self.tsc_khz {
            scenario = scenario.tsc_khz(khz);
        }
        cfg.cmdline = scenario.cmdline().expect("scenario cmdline");
        cfg.serial = SerialMode::Capture;
        let (iommu, ats_cap) = match self.viommu {
            Viommu::None => (None, false),
            Viommu::Virtio => (Some("virtio".to_string()), false),
            Viommu::Vtd { dt, ats_cap } => (
                Some(format!("vtd,caching_mode=on,device_iotlb={}", on(dt))),
                ats_cap,
            ),
        };
        let behind = iommu.is_some();
        let iommu = iommu.map(|i| {
            if self.prefetch {
                i + ",iotlb=prefetch"
            } else {
                i
            }
        });
        cfg.iommu = iommu.map(|i| i.parse().expect("iommu option"));
        let dev = format!(
            "net,socket={},iommu={},ats={}",
            sock.display(),
            on(behind),
            on(ats_cap)
        );
        cfg.vhost_user.push(dev.parse().expect("vhost-user option"));
        cfg
    }
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

pub fn socket(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("iovmm-{}-{tag}.sock", std::process::id()))
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

pub(crate) fn run_guest(cell: &Cell, sock: &std::path::Path) -> (GuestResult, VhostUserStats) {
    let mut vmm = Vmm::start(&cell.vm_config(sock)).expect("VM starts");
    let exit = vmm
        .wait_timeout(Duration::from_secs(60))
        .expect("VMM stops");
    let serial = vmm.serial_output().unwrap_or_default();
    assert_eq!(
        exit,
        VmExit::ExitPort(0),
        "{cell:?} guest failed; serial:\n{serial}"
    );
    let result = GuestResult::from_output(&serial).expect("result line");
    cell.traffic.assert_guest_done(cell, &result, &serial);
    let device = &vmm.vhost_user_devices()[0];
    assert_nothing_stale_held(cell, device);
    (result, device.stats())
}

fn iotlb_msgs(records: &[RecordedMsg]) -> Vec<(u8, u64, u64)> {
    let u = |p: &[u8], o: usize| {
        p.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    records
        .iter()
        .filter(|r| r.request == VHOST_USER_IOTLB_MSG && r.payload.len() >= 26)
        .filter_map(|r| Some((r.payload[25], u(&r.payload, 0)?, u(&r.payload, 8)?)))
        .collect()
}

/// iovmm's side of the security invariant, for every back end (DPDK's IOTLB
/// cannot be probed): once the guest stopped, nothing the device's back end
/// may hold (every UPDATE sent and not invalidated since) differs from what
/// the vIOMMU translates.
pub fn assert_nothing_stale_held(cell: &impl std::fmt::Debug, device: &VhostUserInfo) {
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
    let msgs = iotlb_msgs(&backend.records());
    for (i, &(ty, iova, size)) in msgs.iter().enumerate() {
        if ty != IOTLB_INVALIDATE || size == 0 {
            continue;
        }
        let end = iova.saturating_add(size - 1);
        let remapped = msgs[i + 1..].iter().any(|&(t, a, s)| {
            t == IOTLB_UPDATE && a <= end && a.saturating_add(s.saturating_sub(1)) >= iova
        });
        if !remapped {
            assert!(
                !backend.probe(iova, 1),
                "stale translation at {iova:#x} after INVALIDATE"
            );
        }
    }
}

fn sink_byte_sum(path: &std::path::Path) -> u64 {
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

/// Runs `cell` against our own backend.
pub fn run_own_backend(cell: &Cell) -> Outcome {
    let _one = lock(&ONE_CELL);
    let sock = socket(&cell.tag("own"));
    let sink = sock.with_extension("frames");
    let _ = std::fs::remove_file(&sink);
    let config = BackendConfig {
        access_platform: cell.viommu != Viommu::None,
        sink: Some(sink.clone()),
        miss_timeout: MISS_TIMEOUT,
        ..BackendConfig::default()
    };
    let backend = TestBackend::listen(&sock, config).expect("backend listens");
    let (result, stats) = run_guest(cell, &sock);
    assert!(backend.wait_for(Duration::from_secs(5), |c| c.tx_frames == cell.frames));
    let c = backend.counters();
    assert_eq!(c.tx_bytes, cell.frames * cell.size);
    assert_eq!(c.translation_failures, 0);
    assert_eq!(
        Some(sink_byte_sum(&sink)),
        result.u64("checksum"),
        "payload bytes differ"
    );
    assert_no_stale_translation(&backend);
    assert_eq!(
        c.invalidate_violations, 0,
        "an INVALIDATE left a translation"
    );
    let _ = std::fs::remove_file(&sink);
    assert_connection_invalidates(cell.viommu != Viommu::None, &stats);
    report("own", cell, &stats);
    Outcome {
        result,
        stats,
        backend: Some(c),
        dpdk: None,
        backend_miss_latency: backend.miss_latency(),
    }
}

/// Runs `cell` against DPDK testpmd.
pub fn run_dpdk(cell: &Cell) -> Outcome {
    let _one = lock(&ONE_CELL);
    let sock = socket(&cell.tag("dpdk"));
    let mut pmd = Testpmd::start(&sock, true).expect("testpmd starts");
    let (result, stats) = run_guest(cell, &sock);
    let mut port = pmd.port_stats().expect("testpmd stats");
    for _ in 0..50 {
        if port.rx_packets >= cell.frames {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        port = pmd.port_stats().expect("testpmd stats");
    }
    assert_eq!(
        port.rx_packets,
        cell.frames,
        "testpmd output:\n{}",
        pmd.output()
    );
    assert_eq!(port.rx_bytes, cell.frames * cell.size);
    assert_connection_invalidates(cell.viommu != Viommu::None, &stats);
    report("dpdk", cell, &stats);
    Outcome {
        result,
        stats,
        backend: None,
        dpdk: Some(port),
        backend_miss_latency: None,
    }
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
