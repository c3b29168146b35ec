//! Two iovmm VMs through a real switch: Open vSwitch with DPDK (Debian
//! `openvswitch-switch-dpdk`, `tests/src/ovs.rs`). Each VM's vhost-user net device is in server
//! mode behind a vIOMMU (strict), and OVS connects to both as a `dpdkvhostuserclient` (the only
//! port type on which OVS offers the IOTLB protocol, with `vhost-iommu-support=true`). OpenFlow
//! rules cross-connect the two ports. VM A (virtio-iommu) transmits sequence frames
//! (`net-tx`, `iovmm.seq=1`, paced); VM B (VT-d) receives and verifies every one in order
//! (`net-rx`). Mid-run ovs-vswitchd is killed and started again: both VMs accept the new
//! switch, renegotiate with an empty IOTLB and the traffic resumes. Frames are counted and
//! checked at both guests, at OVS's live port counters (OpenFlow port statistics; the
//! database's `statistics` column is written only every 5 s) and by iovmm's stale-translation
//! audit: every frame B lost is one OVS counted as dropped on B's port. Skipped, with the
//! reason printed, where the package is missing or hugepages cannot be had.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devices::vhost_user::stats::BridgeStats;
use integration_tests::backend::rxgen;
use integration_tests::guest::{test_guest_path, GuestResult, IommuMode, Scenario};
use integration_tests::matrix::{assert_nothing_stale_held, ONE_CELL};
use integration_tests::ovs::{self, Ovs, OvsError};
use iommu::error::chain;
use iommu::sync::lock;
use vmm::{SerialMode, VhostUserStats, VmConfig, VmExit, Vmm};

const FRAMES: u64 = 2000;
const SIZE: u64 = 256;
/// Microseconds between two of VM A's frames: VM B's 256 RX buffers then cover 25 ms of it
/// not being scheduled (two cores for two polling guests and OVS's PMD thread).
const GAP_US: u64 = 200;
/// The MAC iovmm serves to both guests (`devices::vhost_user::frontend::DEFAULT_MAC`).
const MAC: [u8; 6] = [0x02, 0x69, 0x6f, 0x76, 0x6d, 0x01];
const BRIDGE: &str = "br0";

fn vm(sock: &Path, iommu: &str, scenario: Scenario, timeout_ms: u64) -> VmConfig {
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = scenario
        .iommu(IommuMode::Strict)
        .timeout_ms(timeout_ms)
        .cmdline()
        .unwrap();
    cfg.serial = SerialMode::Capture;
    cfg.iommu = Some(iommu.parse().unwrap());
    let dev = format!("net,socket={},iommu=on,server=on,wait=30", sock.display());
    cfg.vhost_user.push(dev.parse().unwrap());
    cfg
}

fn wait_serial(vmm: &Vmm, text: &str) {
    let t = Instant::now();
    while !vmm.serial_output().unwrap_or_default().contains(text) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no {text:?} in:\n{}",
            vmm.serial_output().unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn counter(stats: &BTreeMap<String, u64>, key: &str) -> u64 {
    stats.get(key).copied().unwrap_or(0)
}

/// OVS's live counters of a port (`ovs-ofctl dump-ports`, not the database's `statistics`
/// column, which ovs-vswitchd refreshes only every 5 s).
fn counters(ovs: &Ovs, port: &str) -> BTreeMap<String, u64> {
    ovs.port_counters(BRIDGE, port).unwrap()
}

/// Everything OVS dropped on a port's way out, by its own counters (kept while the port's
/// device is down, unlike `tx_dropped`): enqueue failures (B's RX ring full or an IOTLB miss
/// on B's RX buffer), MTU, QoS and offload drops.
fn ovs_drops(m: &BTreeMap<String, u64>) -> u64 {
    [
        "ovs_tx_failure_drops",
        "ovs_tx_mtu_exceeded_drops",
        "ovs_tx_qos_drops",
        "ovs_tx_invalid_hwol_drops",
    ]
    .iter()
    .map(|k| counter(m, k))
    .sum()
}

/// OVS's counters of both ports once A's frames stopped moving (A is paused): two equal reads
/// and everything A's port received either sent to B or dropped.
fn settled(ovs: &Ovs) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let read = || (counters(ovs, "vma"), counters(ovs, "vmb"));
    let mut last = read();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
        let now = read();
        let running = now.0.contains_key("rx_packets") && now.1.contains_key("tx_packets");
        let moved = counter(&now.0, "rx_packets");
        let out = counter(&now.1, "tx_packets") + counter(&now.1, "tx_dropped");
        if running && now == last && moved == out {
            return now;
        }
        last = now;
    }
    panic!(
        "OVS counters did not settle: {last:?}\n{}",
        ovs.log_tail(30)
    );
}

/// Both VMs' bridge counters now.
fn bridges(a: &Vmm, b: &Vmm) -> [BridgeStats; 2] {
    [a, b].map(|v| v.vhost_user_devices()[0].stats().bridge)
}

fn wait_stats(vmm: &Vmm, what: &str, pred: impl Fn(&VhostUserStats) -> bool) {
    let t = Instant::now();
    while !pred(&vmm.vhost_user_devices()[0].stats()) {
        assert!(t.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn finish(mut vmm: Vmm, name: &str, sock: &Path) -> (GuestResult, VhostUserStats) {
    let exit = vmm.wait_timeout(Duration::from_secs(120)).unwrap();
    let serial = vmm.serial_output().unwrap_or_default();
    assert_eq!(exit, VmExit::ExitPort(0), "VM {name}; serial:\n{serial}");
    let r = GuestResult::from_output(&serial).unwrap();
    let device = &vmm.vhost_user_devices()[0];
    assert_nothing_stale_held(&name, device);
    assert!(
        !sock.exists(),
        "VM {name}'s server socket is removed at exit"
    );
    (r, device.stats())
}

fn start_ovs(dir: &Path) -> Option<Ovs> {
    if let Some(why) = ovs::unavailable() {
        eprintln!("SKIPPED ovs_two_vms: {why}");
        return None;
    }
    match Ovs::start(dir) {
        Ok(o) => Some(o),
        Err(e @ OvsError::Hugepages(_)) => {
            eprintln!("SKIPPED ovs_two_vms: {}", chain(&e));
            None
        }
        Err(e) => panic!("OVS-DPDK does not start: {}", chain(&e)),
    }
}

/// Waits until OVS received a third of the frames from A (its live counter of A's port);
/// returns that count.
fn wait_for_a_third(ovs: &Ovs, vm_a: &Vmm) -> u64 {
    let t = Instant::now();
    loop {
        let a = counters(ovs, "vma");
        let rx = counter(&a, "rx_packets");
        if rx >= FRAMES / 3 {
            return rx;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "A's port: {a:?}\nA: {:?}\nA's serial:\n{}\n{}",
            vm_a.vhost_user_devices()[0].stats(),
            vm_a.serial_output().unwrap_or_default(),
            ovs.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills and restarts ovs-vswitchd, waits until both VMs restored their device on the new
/// switch and the new process runs both ports; returns how long that took.
fn restart_switch(ovs: &mut Ovs, vm_a: &Vmm, vm_b: &Vmm) -> Duration {
    let t = Instant::now();
    ovs.restart_vswitchd().unwrap();
    wait_stats(vm_a, "A restored", |s| s.reconnect.restores == 1);
    wait_stats(vm_b, "B restored", |s| s.reconnect.restores == 1);
    // The database's link_state still says what the killed process wrote last: wait until the
    // new process runs both vhost devices (this also waits for its OpenFlow socket).
    ovs.wait_running(BRIDGE, "vma").unwrap();
    ovs.wait_running(BRIDGE, "vmb").unwrap();
    t.elapsed()
}

/// iovmm: one restore each, every connection started with the full-range INVALIDATE. No miss
/// refused while a switch ran the device: before the restart and from the restore on. Between
/// the kill and the restore the device is stopped, and a miss the killed switch sent just
/// before it died is refused then (correctly: nobody is left to use the answer). No refusal
/// ever names an IOVA the guest had not mapped (a DMA fault).
fn check_iovmm(end: [&VhostUserStats; 2], phase1: &[BridgeStats; 2], restored: &[BridgeStats; 2]) {
    for (i, name) in ["A", "B"].into_iter().enumerate() {
        let s = end[i];
        let rc = s.reconnect;
        assert_eq!((rc.disconnects, rc.restores), (1, 1), "{name}: {rc:?}");
        assert_eq!(s.bridge.connect_invalidations, 2, "{name}: {s:?}");
        let p1 = phase1[i];
        assert_eq!(p1.misses_refused, 0, "{name} before the restart: {p1:?}");
        let after_restore = s.bridge.misses_refused - restored[i].misses_refused;
        assert_eq!(after_restore, 0, "{name} after the restore: {:?}", s.bridge);
        assert_eq!(s.bridge.faults, 0, "{name}: {:?}", s.bridge);
    }
}

#[test]
fn frames_from_one_vm_reach_the_other_through_ovs_dpdk_across_a_switch_restart() {
    let dir = std::env::temp_dir().join(format!("iovmm-ovs-{}", std::process::id()));
    let _one = lock(&ONE_CELL);
    let Some(mut ovs) = start_ovs(&dir) else {
        return;
    };
    let (sock_a, sock_b): (PathBuf, PathBuf) = (dir.join("a.sock"), dir.join("b.sock"));
    ovs.add_bridge(BRIDGE).unwrap();
    ovs.add_vhost_client_port(BRIDGE, "vma", &sock_a).unwrap();
    ovs.add_vhost_client_port(BRIDGE, "vmb", &sock_b).unwrap();
    ovs.cross_connect(BRIDGE, "vma", "vmb").unwrap();

    // B first: its RX ring must be posted before A sends anything.
    // Lossy: OVS drops a frame whose RX buffer misses in its IOTLB (DPDK's enqueue does not
    // wait for the UPDATE), e.g. right after the restart, whose IOTLB starts empty, or that
    // finds B's RX ring full. Every frame must be received intact and in order or counted as
    // dropped by OVS.
    let rx = Scenario::net_rx(FRAMES, SIZE)
        .param("rx_dir", "rw")
        .param("lossy", 1);
    let t = Instant::now();
    let vm_b = Vmm::start(&vm(
        &sock_b,
        "vtd,caching_mode=on,iotlb=prefetch",
        rx,
        15_000,
    ))
    .expect("VM B starts");
    let b_accepted = t.elapsed();
    wait_serial(&vm_b, "net-rx: ready");
    ovs.wait_running(BRIDGE, "vmb").unwrap();
    let tx = Scenario::net_tx(FRAMES, SIZE)
        .param("seq", 1)
        .param("gap_us", GAP_US);
    let vm_a = Vmm::start(&vm(&sock_a, "virtio", tx, 60_000)).expect("VM A starts");
    ovs.wait_running(BRIDGE, "vma").unwrap();

    // A third of the way (by OVS's live counter of A's port), pause A, let OVS settle, and
    // restart ovs-vswitchd.
    let at_pause = wait_for_a_third(&ovs, &vm_a);
    vm_a.pause().unwrap();
    let (a1, b1) = settled(&ovs);
    let phase1 = bridges(&vm_a, &vm_b);
    let restart = restart_switch(&mut ovs, &vm_a, &vm_b);
    let restored = bridges(&vm_a, &vm_b);
    // Flows are not kept in the database: the new process starts with the default (NORMAL)
    // flow; A stays paused until the rules are back.
    ovs.cross_connect(BRIDGE, "vma", "vmb").unwrap();
    vm_a.resume().unwrap();

    let (ra, sa) = finish(vm_a, "A", &sock_a);
    let (rb, sb) = finish(vm_b, "B", &sock_b);
    // B's device is gone now (its guest reset it at the end): of the new process's counters of
    // B's port only OVS's own drop counters remain.
    let b2 = counters(&ovs, "vmb");
    // A sent and completed every frame, with the sequence-frame bytes (its checksum also
    // covers the Ethernet addresses, which B's does not sum).
    assert_eq!(ra.u64("completed"), Some(FRAMES), "A: {ra:?}");
    let macs = 6 * 0xff + MAC.iter().map(|&b| u64::from(b)).sum::<u64>();
    let all = rxgen::seq_checksum(FRAMES, SIZE as usize);
    assert_eq!(ra.u64("checksum"), Some(all + FRAMES * macs));
    // OVS before the restart, exact: A was paused and OVS settled, so every frame A's port
    // received was sent to B's or dropped there, and every drop is one OVS counts as its own.
    let (rx1, tx1) = (counter(&a1, "rx_packets"), counter(&b1, "tx_packets"));
    assert_eq!(
        rx1,
        tx1 + counter(&b1, "tx_dropped"),
        "settled: {a1:?} {b1:?}"
    );
    assert_eq!(counter(&b1, "tx_dropped"), ovs_drops(&b1), "{b1:?}");
    assert!(
        rx1 < FRAMES,
        "A was paused only after it had sent everything: {a1:?}"
    );
    // B received every frame it did not count as lost, intact and in order, and every lost
    // frame is one that OVS dropped on B's port, before or after the restart: nothing is lost
    // in the restart itself (A was paused across it) or unaccounted.
    let (received, lost) = (rb.u64("received").unwrap(), rb.u64("lost").unwrap());
    let dropped = (ovs_drops(&b1), ovs_drops(&b2));
    assert_eq!(received + lost, FRAMES, "B: {rb:?}");
    assert_eq!(rb.u64("bad_frames"), Some(0), "B: {rb:?}");
    assert_eq!(rb.u64("bad_len"), Some(0), "B: {rb:?}");
    assert_eq!(
        lost,
        dropped.0 + dropped.1,
        "B lost {lost}; OVS dropped {dropped:?}: {b1:?} {b2:?}"
    );
    let (before, after) = (tx1, received - tx1);
    assert!(before > 0 && after > 0, "{before} {after}");
    check_iovmm([&sa, &sb], &phase1, &restored);
    let window = |i: usize| restored[i].misses_refused - phase1[i].misses_refused;
    eprintln!(
        "ovs: {FRAMES} frames of {SIZE} B; A paused at {at_pause} (settled {rx1}); delivered {before} before the restart, {after} after, {lost} lost = {} + {} dropped by OVS (IOTLB misses on B's RX buffers or its ring full; {} OVS IOTLB misses on B's RX queue before the restart); B accepted OVS after {b_accepted:.2?}; restart to both running {restart:.2?}; iovmm misses served A {} B {}, refused in the restart window A {} B {}",
        dropped.0,
        dropped.1,
        counter(&b1, "tx_q0_iotlb_misses"),
        sa.bridge.misses_served,
        sb.bridge.misses_served,
        window(0),
        window(1)
    );
}
