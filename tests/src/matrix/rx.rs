//! RX and loop-back cells: the guest's `net-rx` scenario receives sequence
//! frames into device-writable buffers (our backend's generator), or sends
//! them and gets them back (our backend's loop-back, testpmd `macswap`).
//! Frame counts and payloads are checked at both ends, and with our backend
//! the security invariant (no INVALIDATE leaves a translation, checked when
//! applied, and nothing invalidated is still translatable afterwards).

use std::path::Path;
use std::time::Duration;

use iommu::sync::lock;
use vmm::{VhostUserStats, VmExit};

use super::{run_own, run_testpmd, Cell, Outcome, VmRun, ONE_CELL};
use crate::backend::rxgen::{seq_checksum, RxGen};
use crate::backend::BackendConfig;
use crate::dpdk::Testpmd;
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

/// Runs a loop-back `cell` against testpmd in `macswap` mode: testpmd counts
/// every frame in and out, the guest verifies every payload that comes back.
pub fn run_dpdk_loopback(cell: &Cell) -> Outcome {
    assert_eq!(cell.traffic, Traffic::Loopback);
    let start = |sock: &Path| {
        let mut pmd = Testpmd::start_forwarding(sock, true, "macswap").expect("testpmd starts");
        // The vhost PMD drops a frame whose RX buffer misses (the enqueue does
        // not wait for the UPDATE); testpmd's TX retry re-offers it until the
        // miss was answered (up to 2000 x 50 us), so the loop-back is lossless.
        for cmd in [
            "stop",
            "set fwd macswap retry",
            "set burst tx delay 50 retry 2000",
            "start",
        ] {
            pmd.command(cmd).expect("testpmd command");
        }
        pmd
    };
    // The guest saw every frame come back, so testpmd has counted them all.
    run_testpmd(cell, start, |pmd, o| {
        let port = o.dpdk.expect("testpmd stats");
        assert_eq!(port.tx_packets, cell.frames, "{}", pmd.output());
        assert_eq!(
            o.stats.bridge.misses_refused, 0,
            "a miss was refused: {:?}",
            o.stats
        );
    })
}
