//! Permissions of the device IOTLB, end to end: an UPDATE carries exactly
//! the mapping's permission, and a miss that asks for more (write on a
//! buffer mapped read-only, read on one mapped write-only) is refused,
//! reported as a guest-visible fault (virtio-iommu fault event, VT-d fault
//! record) and never answered with a wider permission.

use devices::vhost_user::wire::IotlbPerm;
use integration_tests::backend::rxgen::RxGen;
use integration_tests::backend::{BackendConfig, BackendHandle, Misbehaviour, TestBackend};
use integration_tests::dpdk::Testpmd;
use integration_tests::guest::{IommuMode, Scenario, EXIT_FAILED, EXIT_OK};
use integration_tests::matrix::{run_scenario, socket, Cell, Traffic, Viommu, DT_ATS, ONE_CELL};
use iommu::sync::lock;
use vmm::VmExit;

const VIOMMUS: [Viommu; 2] = [Viommu::Virtio, DT_ATS];
const FRAMES: u64 = 8;
/// virtio-iommu fault flags: READ, WRITE, ADDRESS.
const F_READ: u64 = 1;
const F_WRITE: u64 = 2;

/// A backend asking `perm` for every buffer; refused misses are acked at
/// once (NEED_REPLY) and the faulted chain completes, so nothing hangs.
fn widening_backend(
    cell: &Cell,
    perm: IotlbPerm,
    rx_gen: Option<RxGen>,
) -> (std::path::PathBuf, BackendHandle) {
    let sock = socket(&cell.tag(&format!("perm-{perm:?}")));
    let config = BackendConfig {
        miss_need_reply: true,
        complete_faulted: true,
        rx_gen,
        misbehave: Misbehaviour {
            buffer_perm: Some(perm),
            ..Misbehaviour::default()
        },
        ..BackendConfig::default()
    };
    let b = TestBackend::listen(&sock, config).expect("backend listens");
    (sock, b)
}

/// The guest's vIOMMU reported a fault for a device access including `write`/`read`.
fn assert_guest_fault(
    viommu: Viommu,
    r: &integration_tests::guest::GuestResult,
    read: bool,
    write: bool,
) {
    match viommu {
        Viommu::Virtio => {
            assert!(r.u64("fault_events").unwrap_or(0) >= 1, "{r:?}");
            let flags = r.u64("fault_flags").expect("fault_flags");
            assert_eq!(flags & F_READ != 0, read, "{r:?}");
            assert_eq!(flags & F_WRITE != 0, write, "{r:?}");
        }
        _ => {
            assert!(r.u64("faults").unwrap_or(0) >= 1, "{r:?}");
            // A VT-d fault record holds one access type: a write when asked for.
            assert_eq!(r.u64("fault_write"), Some(u64::from(write)), "{r:?}");
        }
    }
}

#[test]
fn write_miss_on_a_read_only_tx_buffer_is_refused_and_faults() {
    for viommu in VIOMMUS {
        for perm in [IotlbPerm::WriteOnly, IotlbPerm::ReadWrite] {
            let _one = lock(&ONE_CELL);
            let cell = Cell::new(viommu, IommuMode::Strict);
            let (sock, backend) = widening_backend(&cell, perm, None);
            let (exit, r, out, stats) = run_scenario(&cell, Scenario::net_tx(FRAMES, 200), &sock);
            assert_eq!(exit, VmExit::ExitPort(EXIT_OK as u32), "{out}");
            let c = backend.counters();
            // No frame was read: no UPDATE ever granted the wider permission.
            assert_eq!((c.tx_frames, c.tx_faulted), (0, FRAMES), "{c:?}");
            assert_eq!(c.miss_nacks, FRAMES, "{c:?}");
            assert!(stats.bridge.misses_refused >= FRAMES, "{stats:?}");
            assert!(stats.bridge.faults >= FRAMES, "{stats:?}");
            assert_guest_fault(viommu, &r, perm == IotlbPerm::ReadWrite, true);
        }
    }
}

#[test]
fn read_miss_on_a_write_only_rx_buffer_is_refused_and_the_descriptor_errors() {
    for viommu in VIOMMUS {
        let _one = lock(&ONE_CELL);
        let cell = Cell::with_traffic(viommu, IommuMode::Strict, Traffic::Rx);
        let gen = RxGen {
            frames: FRAMES,
            size: 200,
            rate: 0,
        };
        let (sock, backend) = widening_backend(&cell, IotlbPerm::ReadWrite, Some(gen));
        let s = Scenario::net_rx(FRAMES, 200).timeout_ms(5000);
        let (exit, r, out, stats) = run_scenario(&cell, s, &sock);
        // Every descriptor came back empty: the guest sees the error on it.
        assert_eq!(exit, VmExit::ExitPort(EXIT_FAILED as u32), "{out}");
        assert_eq!(r.u64("received"), Some(FRAMES), "{r:?}");
        assert_eq!(r.u64("bad_len"), Some(FRAMES), "{r:?}");
        let c = backend.counters();
        assert_eq!((c.rx_frames, c.rx_faulted), (0, FRAMES), "{c:?}");
        assert!(stats.bridge.misses_refused >= FRAMES, "{stats:?}");
        assert_guest_fault(viommu, &r, true, true);
    }
}

#[test]
fn updates_carry_exactly_the_mapping_permission() {
    // Loop-back: TX buffers are read-only, RX buffers write-only; the UPDATE
    // answering each miss grants exactly that, never read-write.
    for viommu in VIOMMUS {
        let cell = Cell::with_traffic(viommu, IommuMode::Strict, Traffic::Loopback);
        let o = integration_tests::matrix::run_own_backend_rx(&cell);
        let c = o.backend.expect("own backend");
        assert_eq!(c.tx_frames, cell.frames);
        assert_eq!(o.stats.bridge.misses_refused, 0, "{:?}", o.stats);
    }
}

#[test]
fn dpdk_asks_read_write_for_rx_and_a_write_only_buffer_is_refused() {
    // DPDK's enqueue translates RX buffers with VHOST_ACCESS_RW: behind a
    // guest that maps them write-only (Linux's DMA_FROM_DEVICE) every such
    // miss is refused and reported, and no frame reaches the guest. The
    // refused miss stays pending in DPDK (MISS has no ack), so its RX queue
    // stops: DPDK's behaviour, documented in docs/design/guest.md.
    for viommu in VIOMMUS {
        let _one = lock(&ONE_CELL);
        let cell = Cell::with_traffic(viommu, IommuMode::Strict, Traffic::Loopback);
        let sock = socket(&cell.tag("dpdk-perm"));
        let mut pmd = Testpmd::start_forwarding(&sock, true, "macswap").expect("testpmd starts");
        let s = Scenario::net_rx(FRAMES, 200)
            .loopback(true)
            .timeout_ms(2000);
        let (exit, r, out, stats) = run_scenario(&cell, s, &sock);
        assert_eq!(exit, VmExit::ExitPort(EXIT_FAILED as u32), "{out}");
        assert_eq!(r.u64("received"), Some(0), "{r:?}");
        assert!(stats.bridge.misses_refused >= 1, "{stats:?}");
        assert!(stats.bridge.faults >= 1, "{stats:?}");
        assert_guest_fault(viommu, &r, true, true);
        let port = pmd.port_stats().expect("testpmd stats");
        assert_eq!(port.rx_packets, FRAMES, "{}", pmd.output());
        assert_eq!(port.tx_packets, 0, "{}", pmd.output());
    }
}
