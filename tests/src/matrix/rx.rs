//! RX and loop-back cells: the guest's `net-rx` scenario receives sequence
//! frames into device-writable buffers (our backend's generator), or sends
//! them and gets them back (our backend's loop-back, testpmd `macswap`).
//! Frame counts and payloads are checked at both ends, and with our backend
//! the security invariant (no INVALIDATE leaves a translation, checked when
//! applied, and nothing invalidated is still translatable afterwards). A
//! frame testpmd drops behind a vIOMMU (its RX buffer missed for longer than
//! testpmd's TX retries) is a gap the guest counts, equal to testpmd's drops.

use std::path::Path;
use std::time::Duration;

use iommu::sync::lock;
use vmm::{VhostUserStats, VmExit};

use super::{
    assert_connection_invalidates, port_stats_after, report, run_own, socket, testpmd_read_until,
    Cell, Outcome, Viommu, VmRun, ONE_CELL,
};
use crate::backend::rxgen::{seq_checksum, RxGen};
use crate::backend::BackendConfig;
use crate::dpdk::{FwdStats, Testpmd};
use crate::guest::{GuestResult, Scenario};

/// Which way the frames of a cell go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// The guest transmits (`net-tx`).
    Tx,
    /// The backend generates, the guest receives (`net-rx`).
    Rx,
    /// The guest transmits, the backend sends every frame back (`net-rx` loop-back).
    Loopback,
}

impl Traffic {
    pub(crate) fn scenario(self, cell: &Cell) -> Scenario {
        match self {
            Traffic::Tx => Scenario::net_tx(cell.frames, cell.size),
            Traffic::Rx | Traffic::Loopback => Scenario::net_rx(cell.frames, cell.size)
                .loopback(self == Traffic::Loopback)
                .rx_read_write(cell.rx_rw),
        }
    }

    /// The guest finished every frame and found none wrong.
    pub(crate) fn assert_guest_done(self, cell: &Cell, r: &GuestResult, serial: &str) {
        if self == Traffic::Tx {
            assert_eq!(r.u64("completed"), Some(cell.frames), "{serial}");
            return;
        }
        assert_eq!(r.u64("received"), Some(cell.frames), "{serial}");
        assert_eq!(r.u64("bad_frames"), Some(0), "{serial}");
        assert_eq!(r.u64("bad_len"), Some(0), "{serial}");
        let size = usize::try_from(cell.size).expect("frame size");
        assert_eq!(
            r.u64("rx_checksum"),
            Some(seq_checksum(cell.frames, size)),
            "{serial}"
        );
        if self == Traffic::Loopback {
            assert_eq!(r.u64("completed"), Some(cell.frames), "{serial}");
        }
    }
}

/// Runs `scenario` in `cell`'s VM against the backend at `sock`, whatever
/// the guest's exit: returns the exit, the result line, the serial output
/// and the device's counters (for refusal and use-after-unmap tests).
pub fn run_scenario(
    cell: &Cell,
    scenario: Scenario,
    sock: &Path,
) -> (VmExit, GuestResult, String, VhostUserStats) {
    let config = cell.vm_config_with(sock, scenario);
    let run = VmRun::boot(cell, &config, Duration::from_secs(60));
    let result = run.result();
    (run.exit, result, run.serial, run.stats)
}

/// Runs an RX or loop-back `cell` against our own backend.
pub fn run_own_backend_rx(cell: &Cell) -> Outcome {
    assert_ne!(cell.traffic, Traffic::Tx, "use run_own_backend");
    let _one = lock(&ONE_CELL);
    let size = usize::try_from(cell.size).expect("frame size");
    let config = BackendConfig {
        rx_gen: (cell.traffic == Traffic::Rx).then_some(RxGen {
            frames: cell.frames,
            size,
            rate: 0,
        }),
        loopback: cell.traffic == Traffic::Loopback,
        ..BackendConfig::default()
    };
    run_own(cell, config, |backend, _| {
        let c = backend.counters();
        assert_eq!(c.rx_frames, cell.frames);
        assert_eq!(c.rx_bytes, cell.frames * cell.size);
        assert_eq!((c.rx_dropped, c.rx_faulted), (0, 0));
        if cell.traffic == Traffic::Loopback {
            assert_eq!(c.tx_frames, cell.frames);
        }
    })
}

/// Starts testpmd on `sock` forwarding in `macswap` mode with TX retries.
fn start_macswap(sock: &Path) -> Testpmd {
    let mut pmd = Testpmd::start_forwarding(sock, true, "macswap").expect("testpmd starts");
    // The vhost enqueue stops at an RX buffer whose IOVA misses (it sends the MISS and does not
    // wait for the UPDATE); testpmd re-offers the rest of the burst up to 2000 x 50 us and then
    // frees it, counting it in its forwarding TX-dropped.
    for cmd in [
        "stop",
        "set fwd macswap retry",
        "set burst tx delay 50 retry 2000",
        "start",
    ] {
        pmd.command(cmd).expect("testpmd command");
    }
    pmd
}

/// testpmd's forwarding counters once every burst it took was accounted for (sent or dropped)
/// and it had received `frames`, or the last read after 5 s (re-read every 100 ms).
fn fwd_stats_settled(pmd: &mut Testpmd, frames: u64) -> FwdStats {
    testpmd_read_until(
        pmd,
        |p| p.fwd_stats().expect("testpmd forwarding stats"),
        |f| f.rx_packets >= frames && f.tx_packets + f.tx_dropped == f.rx_packets,
    )
}

/// A lossy loop-back (`iovmm.lossy=1`): every frame came back unless testpmd dropped it, and
/// the guest's gaps are exactly testpmd's drops, while iovmm answered every miss.
fn assert_lossy_loopback(
    cell: &Cell,
    r: &GuestResult,
    stats: &VhostUserStats,
    fwd: &FwdStats,
    why: &str,
) {
    let field = |k: &str| r.u64(k).unwrap_or_else(|| panic!("no {k}: {why}"));
    let (received, lost) = (field("received"), field("lost"));
    assert_eq!((field("bad_frames"), field("bad_len")), (0, 0), "{why}");
    assert_eq!(received + lost, cell.frames, "{why}");
    assert_eq!(field("completed"), cell.frames, "{why}");
    assert_eq!(
        lost, fwd.tx_dropped,
        "guest gaps vs testpmd drops {fwd:?}: {why}"
    );
    assert_eq!(fwd.tx_packets, received, "{fwd:?}: {why}");
    // A drop is testpmd giving up before an answer came, never a miss left unanswered.
    let b = &stats.bridge;
    assert_eq!(b.misses_served, b.misses, "an unanswered miss: {b:?}");
    if lost == 0 {
        let size = usize::try_from(cell.size).expect("frame size");
        let sum = seq_checksum(cell.frames, size);
        assert_eq!(r.u64("rx_checksum"), Some(sum), "{why}");
    } else {
        eprintln!("{cell:?}: testpmd dropped {lost} frame(s), the guest counted the same gaps");
    }
}

/// Runs a loop-back `cell` against testpmd in `macswap` mode: testpmd counts every frame in
/// and out, the guest verifies every payload that comes back. Behind a vIOMMU testpmd drops a
/// frame whose RX buffer missed for longer than its retries: the guest runs lossy (a gap is
/// counted, disorder or damage still fails) and its gaps must be exactly testpmd's drops.
/// Without a vIOMMU nothing misses, so every frame must come back.
pub fn run_dpdk_loopback(cell: &Cell) -> Outcome {
    assert_eq!(cell.traffic, Traffic::Loopback);
    let _one = lock(&ONE_CELL);
    let sock = socket(&cell.tag("dpdk"));
    let mut pmd = start_macswap(&sock);
    let iommu = cell.viommu != Viommu::None;
    let scenario = cell.traffic.scenario(cell).param("lossy", u8::from(iommu));
    let run = VmRun::boot(
        cell,
        &cell.vm_config_with(&sock, scenario),
        Duration::from_secs(60),
    );
    let result = run.ok_result(cell);
    assert_connection_invalidates(iommu, &run.stats);
    let fwd = fwd_stats_settled(&mut pmd, cell.frames);
    let port = port_stats_after(&mut pmd, cell.frames);
    let why = format!("serial:\n{}\ntestpmd output:\n{}", run.serial, pmd.output());
    assert_eq!(fwd.rx_packets, cell.frames, "{why}");
    assert_eq!(port.rx_packets, cell.frames, "{why}");
    assert_eq!(port.rx_bytes, cell.frames * cell.size, "{why}");
    if iommu {
        assert_lossy_loopback(cell, &result, &run.stats, &fwd, &why);
    } else {
        cell.traffic.assert_guest_done(cell, &result, &run.serial);
        assert_eq!((fwd.tx_packets, fwd.tx_dropped), (cell.frames, 0), "{why}");
    }
    assert_eq!(port.tx_packets, fwd.tx_packets, "{why}");
    let stats = run.stats;
    let refused = stats.bridge.misses_refused;
    assert_eq!(refused, 0, "a miss was refused: {stats:?}");
    report("dpdk", cell, &stats);
    Outcome {
        result,
        stats,
        backend: None,
        dpdk: Some(port),
        backend_miss_latency: None,
    }
}
