//! Multiqueue virtio-net over vhost-user (`queues=N`): negotiation (PROTOCOL_F_MQ,
//! GET_QUEUE_NUM), the features and configuration offered, the control queue served by the
//! VMM (VQ_PAIRS_SET enables pairs in the back end with SET_VRING_ENABLE) and TX on every
//! queue pair, against our test back end on a socketpair (no KVM), behind a vIOMMU.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use devices::sys::{poll_fds, PollFd};
use devices::vhost_user::ctrl::{CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, NET_ERR, NET_OK};
use devices::vhost_user::{VhostUserError, VhostUserKind};
use devices::virtio::VirtioDevice;
use integration_tests::backend::{BackendConfig, BackendHandle, Misbehaviour};
use integration_tests::matrix::sink_byte_sum;
use integration_tests::rig::{dev_config, fnv1a, ring_gpa, try_connect, Rig, BUF, QSIZE, TIMEOUT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const SET_VRING_ENABLE: u32 = 18;
const MQ: u64 = 1 << 22;
const CTRL_VQ: u64 = 1 << 17;
/// Command buffers of the control queue (GPA), after the TX buffers.
const CMD: u64 = BUF + 0x2_0000;

fn backend(pairs: usize) -> BackendConfig {
    BackendConfig {
        queue_pairs: pairs,
        ..Default::default()
    }
}

/// A multiqueue device (`pairs` pairs) behind a vIOMMU that maps all RAM, with irqfds.
fn mq_rig(backend_pairs: usize, pairs: u16) -> Rig {
    let mut dcfg = dev_config(VhostUserKind::Net, true);
    dcfg.queue_pairs = pairs;
    let r = Rig::pair(backend(backend_pairs), dcfg).with_irqfds();
    r.translate_all_ram();
    r
}

/// Waits (bounded) for queue `q`'s irqfd.
fn wait_irq(r: &Rig, q: usize) {
    let fd: &EventFd = &r.irq.irqfds[q];
    let mut fds = [PollFd::readable(fd)];
    let n = poll_fds(&mut fds, Some(TIMEOUT)).unwrap();
    assert_eq!(n, 1, "no interrupt on queue {q} within {TIMEOUT:?}");
    fd.read().unwrap();
}

/// (queue, enabled) of every SET_VRING_ENABLE the back end received.
fn enables(be: &BackendHandle) -> Vec<(u32, u32)> {
    be.records()
        .iter()
        .filter(|m| m.request == SET_VRING_ENABLE)
        .map(|m| {
            let p = &m.payload;
            let w = |i: usize| u32::from_ne_bytes(p[i..i + 4].try_into().unwrap());
            (w(0), w(4))
        })
        .collect()
}

fn write(r: &Rig, data: &[u8], gpa: u64) {
    r.mem.write_slice(data, GuestAddress(gpa)).unwrap();
}

/// A chain of `descs` (GPA, length, flags) as avail entry `slot` of queue `q` (avail index
/// `slot + 1`; used_event asks for an interrupt once it is used), then a kick. Chains use
/// descriptors 0..4 and 4..8 alternately (each is completed before the next but one).
fn post(r: &Rig, q: usize, slot: u16, descs: &[(u64, u32, u16)]) {
    assert!(descs.len() <= 4);
    let base = ring_gpa(q);
    let first = u64::from(slot % 2) * 4;
    for (i, (gpa, len, flags)) in descs.iter().enumerate() {
        let idx = first + i as u64;
        let next = u16::try_from(idx + 1).unwrap();
        let flags = if i + 1 < descs.len() {
            flags | 1
        } else {
            *flags
        };
        let mut d = r.dma(*gpa).to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        write(r, &d, base + 16 * idx);
    }
    let head = u16::try_from(first).unwrap();
    let avail = base + 0x1000;
    write(
        r,
        &head.to_le_bytes(),
        avail + 4 + 2 * u64::from(slot % QSIZE),
    );
    write(r, &slot.to_le_bytes(), avail + 4 + 2 * u64::from(QSIZE));
    write(r, &slot.wrapping_add(1).to_le_bytes(), avail + 2);
    r.kicks[q].write(1).unwrap();
}

/// Sends VQ_PAIRS_SET(`pairs`) on control queue `ctrl` (avail slot `slot`); its status.
fn pairs_set(r: &Rig, ctrl: usize, slot: u16, pairs: u16) -> u8 {
    let cmd = CMD + 0x100 * u64::from(slot);
    let mut c = vec![CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET];
    c.extend_from_slice(&pairs.to_le_bytes());
    write(r, &c, cmd);
    write(r, &[0xff], cmd + 0x80);
    post(
        r,
        ctrl,
        slot,
        &[(cmd, 2, 0), (cmd + 2, 2, 0), (cmd + 0x80, 1, 2)],
    );
    wait_irq(r, ctrl);
    let used: u16 = r
        .mem
        .read_obj(GuestAddress(ring_gpa(ctrl) + 0x2002))
        .unwrap();
    assert_eq!(used, slot + 1);
    r.mem.read_obj(GuestAddress(cmd + 0x80)).unwrap()
}

/// Transmits `frame` on TX queue `q` (avail slot `slot`) and waits for its completion.
fn tx(r: &Rig, q: usize, slot: u16, frame: &[u8]) {
    let buf = BUF + 0x1000 * (q as u64 * u64::from(QSIZE) + u64::from(slot % QSIZE));
    let mut data = vec![0u8; integration_tests::rig::NET_HDR];
    data.extend_from_slice(frame);
    write(r, &data, buf);
    post(r, q, slot, &[(buf, u32::try_from(data.len()).unwrap(), 0)]);
    wait_irq(r, q);
}

#[test]
fn the_control_queue_enables_pairs_and_every_tx_queue_carries_frames() {
    let mut r = mq_rig(4, 2);
    let f = r.dev.avail_features();
    assert_eq!(f & (MQ | CTRL_VQ), MQ | CTRL_VQ);
    assert_eq!(
        r.dev.queue_max_sizes().len(),
        5,
        "2 pairs + the control queue"
    );
    let mut cfg = [0u8; 2];
    r.dev.read_config(8, &mut cfg);
    assert_eq!(u16::from_le_bytes(cfg), 2, "max_virtqueue_pairs");
    r.activate().unwrap();
    // Only the first pair runs before the driver asks for more; the control queue is ours.
    assert_eq!(enables(&r.be), vec![(0, 1), (1, 1), (2, 0), (3, 0)]);
    assert_eq!(pairs_set(&r, 4, 0, 2), NET_OK);
    assert_eq!(enables(&r.be)[4..], [(0, 1), (1, 1), (2, 1), (3, 1)]);
    // Out of range: refused, nothing sent to the back end.
    assert_eq!(pairs_set(&r, 4, 1, 3), NET_ERR);
    assert_eq!(pairs_set(&r, 4, 2, 0), NET_ERR);
    assert_eq!(enables(&r.be).len(), 8);
    let frames: [&[u8]; 3] = [b"pair zero frame", b"pair one frame", b"pair one again"];
    tx(&r, 1, 0, frames[0]);
    tx(&r, 3, 0, frames[1]);
    tx(&r, 3, 1, frames[2]);
    assert_eq!(r.be.tx_frames_per_pair(), vec![1, 2, 0, 0]);
    let c = r.be.counters();
    assert_eq!(c.tx_frames, 3);
    let sum = frames.iter().fold(0u64, |s, f| s.wrapping_add(fnv1a(f)));
    assert_eq!(c.tx_checksum, sum);
    // Back to one pair: the second is disabled again.
    assert_eq!(pairs_set(&r, 4, 3, 1), NET_OK);
    assert_eq!(enables(&r.be)[8..], [(0, 1), (1, 1), (2, 0), (3, 0)]);
    // The control queue (4) is never programmed in the back end: vring requests (NUM, ADDR,
    // BASE, GET_BASE, KICK, CALL, ENABLE) name queues 0..4 only.
    let vring_requests = [8u32, 9, 10, 11, 12, 13, SET_VRING_ENABLE];
    assert!(r
        .be
        .records()
        .iter()
        .filter(|m| vring_requests.contains(&m.request))
        .all(|m| m.payload[0] < 4));
    assert!(r.dev.reset());
}

#[test]
fn a_reconnected_back_end_gets_the_pairs_the_driver_chose() {
    use integration_tests::backend::TestBackend;
    let path = integration_tests::rig::socket_path("multiqueue", "reconnect");
    let mut dcfg = dev_config(VhostUserKind::Net, true);
    dcfg.socket = path.clone();
    dcfg.queue_pairs = 2;
    dcfg.reconnect = Some(std::time::Duration::from_millis(100));
    let mut r = Rig::listen(path, backend(2), dcfg).with_irqfds();
    r.translate_all_ram();
    r.activate().unwrap();
    assert_eq!(pairs_set(&r, 4, 0, 2), NET_OK);
    tx(&r, 3, 0, b"pair one, first back end");
    assert_eq!(r.be.tx_frames_per_pair(), vec![0, 1]);
    r.be.kill();
    r.wait_stats("disconnect seen", TIMEOUT * 3, |s| {
        s.reconnect.disconnects == 1
    });
    let b = TestBackend::listen(r.socket(), backend(2)).unwrap();
    r.wait_stats("restored", TIMEOUT * 3, |s| s.reconnect.restores == 1);
    // Both pairs are enabled on the new connection, as the driver chose on the old one.
    assert_eq!(enables(&b), vec![(0, 1), (1, 1), (2, 1), (3, 1)]);
    tx(&r, 3, 1, b"pair one, second back end");
    assert_eq!(b.tx_frames_per_pair(), vec![0, 1]);
    // Back to one pair through the new connection.
    assert_eq!(pairs_set(&r, 4, 1, 1), NET_OK);
    assert_eq!(enables(&b)[4..], [(0, 1), (1, 1), (2, 0), (3, 0)]);
}

#[test]
fn a_bad_control_command_gets_an_error_status() {
    let mut r = mq_rig(2, 2);
    r.activate().unwrap();
    // Unknown class (RX mode), and a VQ_PAIRS_SET with a short payload.
    let cmd = CMD;
    write(&r, &[0, 0, 1], cmd);
    write(&r, &[0xff], cmd + 0x80);
    post(&r, 4, 0, &[(cmd, 3, 0), (cmd + 0x80, 1, 2)]);
    wait_irq(&r, 4);
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(cmd + 0x80)).unwrap(),
        NET_ERR
    );
    write(&r, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2], cmd + 0x100);
    write(&r, &[0xff], cmd + 0x180);
    post(&r, 4, 1, &[(cmd + 0x100, 3, 0), (cmd + 0x180, 1, 2)]);
    wait_irq(&r, 4);
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(cmd + 0x180)).unwrap(),
        NET_ERR
    );
    // A status buffer outside guest RAM: returned with used length 0.
    write(&r, &[CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, 2, 0], cmd + 0x200);
    post(&r, 4, 2, &[(cmd + 0x200, 4, 0), (1 << 40, 1, 2)]);
    wait_irq(&r, 4);
    let len: u32 = r
        .mem
        .read_obj(GuestAddress(ring_gpa(4) + 0x2004 + 8 * 2 + 4))
        .unwrap();
    assert_eq!(len, 0);
    assert_eq!(
        enables(&r.be).len(),
        4 + 4,
        "the command itself was valid and applied"
    );
}

#[test]
fn a_driver_without_mq_gets_one_pair() {
    let mut r = mq_rig(2, 2);
    let avail = r.dev.avail_features();
    r.dev.ack_features(avail & !(MQ | CTRL_VQ));
    let queues = (0..2)
        .map(|q| {
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            r.kicks.push(kick.try_clone().unwrap());
            (q, r.queue(q), kick)
        })
        .collect();
    r.dev
        .activate(devices::virtio::ActivateContext {
            mem: r.mem.clone(),
            queues,
            interrupt: r.irq.clone(),
        })
        .unwrap();
    assert_eq!(enables(&r.be), vec![(0, 1), (1, 1)]);
    tx(&r, 1, 0, b"single pair");
    assert_eq!(r.be.tx_frames_per_pair(), vec![1, 0]);
}

#[test]
fn more_pairs_than_the_back_end_has_are_refused() {
    let mut dcfg = dev_config(VhostUserKind::Net, true);
    dcfg.queue_pairs = 4;
    let (dev, _be) = try_connect(backend(2), dcfg.clone());
    match dev {
        Err(VhostUserError::QueueNum { offered, needed }) => assert_eq!((offered, needed), (4, 8)),
        other => panic!("expected QueueNum, got {other:?}"),
    }
    let without_mq = BackendConfig {
        queue_pairs: 4,
        misbehave: Misbehaviour {
            withhold_protocol: devices::vhost_user::wire::PROTOCOL_F_MQ,
            ..Default::default()
        },
        ..Default::default()
    };
    let (dev, _be) = try_connect(without_mq, dcfg);
    match dev {
        Err(VhostUserError::MissingFeatures { missing, .. }) => {
            assert_eq!(missing, vec!["VHOST_USER_PROTOCOL_F_MQ"])
        }
        other => panic!("expected MissingFeatures, got {other:?}"),
    }
}

// ---------------------------------------------------------------- KVM: the fast test guest

const FRAMES: u64 = 600;
const SIZE: u64 = 256;

/// The `net-mq` guest (strict) behind `viommu` with `queues=2` against our back end with two
/// pairs: VQ_PAIRS_SET is acked OK, half the frames go out on each TX queue, the back end
/// counts them per pair, the payload bytes match and nothing invalidated stays usable. With
/// `cpus` = 2 the guest drives each pair from its own vCPU, both mapping and unmapping through
/// the same vIOMMU at the same time.
fn two_pairs_strict(label: &str, viommu: &str, cpus: u8) {
    use integration_tests::backend::TestBackend;
    use integration_tests::guest::{test_guest_path, IommuMode, Scenario};
    use integration_tests::matrix::{
        assert_invalidates_honoured, assert_no_stale_translation, socket, VmRun, ONE_CELL,
    };
    use vmm::{SerialMode, VmConfig};

    let _one = iommu::sync::lock(&ONE_CELL);
    let sock = socket(&format!("mq-{label}"));
    let sink = sock.with_extension("frames");
    let _ = std::fs::remove_file(&sink);
    let config = BackendConfig {
        queue_pairs: 2,
        miss_timeout: std::time::Duration::from_secs(10),
        sink: Some(sink.clone()),
        ..Default::default()
    };
    let backend = TestBackend::listen(&sock, config).expect("backend listens");
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::net_mq(FRAMES, SIZE, 2)
        .iommu(IommuMode::Strict)
        .param("cpus", cpus)
        .cmdline()
        .unwrap();
    cfg.serial = SerialMode::Capture;
    cfg.cpus = cpus;
    cfg.iommu = Some(viommu.parse().unwrap());
    let dev = format!("net,socket={},iommu=on,queues=2", sock.display());
    cfg.vhost_user.push(dev.parse().unwrap());
    let run = VmRun::boot(&label, &cfg, std::time::Duration::from_secs(60));
    let r = run.ok_result(&label);
    let serial = &run.serial;
    assert_eq!(r.u64("cpus"), Some(u64::from(cpus)), "{serial}");
    assert_eq!(r.u64("ctrl_status"), Some(0), "{serial}");
    assert_eq!(r.u64("max_pairs"), Some(2), "{serial}");
    // Every frame (and the control command's two buffers) unmapped, and every per-vCPU IOVA
    // range came back: what stays in use is exactly the rings' pages, mapped once at set-up.
    let (maps, unmaps) = (r.u64("maps").unwrap(), r.u64("unmaps").unwrap());
    assert_eq!(unmaps, FRAMES + 2, "{serial}");
    assert_eq!(
        r.u64("iova_in_use"),
        Some((maps - unmaps) * 4096),
        "{serial}"
    );
    assert_eq!(r.u64("completed"), Some(FRAMES), "{serial}");
    assert_eq!(
        (r.u64("tx0"), r.u64("tx1")),
        (Some(FRAMES / 2), Some(FRAMES / 2))
    );
    assert!(backend.wait_for(std::time::Duration::from_secs(5), |c| c.tx_frames == FRAMES));
    assert_eq!(backend.tx_frames_per_pair(), vec![FRAMES / 2, FRAMES / 2]);
    let c = backend.counters();
    assert_eq!(c.tx_bytes, FRAMES * SIZE);
    assert_eq!(c.translation_failures, 0);
    assert_eq!(
        Some(sink_byte_sum(&sink)),
        r.u64("checksum"),
        "payload bytes differ"
    );
    // Both pairs enabled by the guest's command (after the first pair alone at start).
    let on = enables(&backend);
    assert_eq!(on[..4], [(0, 1), (1, 1), (2, 0), (3, 0)], "{on:?}");
    assert!(
        on[4..].contains(&(2, 1)) && on[4..].contains(&(3, 1)),
        "{on:?}"
    );
    assert_no_stale_translation(&backend);
    assert_invalidates_honoured(&backend);
    println!(
        "{label}: {FRAMES} frames on 2 pairs from {cpus} vCPU(s), {} misses, {} invalidations",
        run.stats.bridge.misses, run.stats.iotlb.invalidations
    );
    let _ = std::fs::remove_file(&sink);
}

#[test]
fn kvm_two_pairs_virtio_iommu_strict() {
    two_pairs_strict("virtio", "virtio", 1);
}

#[test]
fn kvm_two_pairs_vtd_strict() {
    two_pairs_strict("vtd", "vtd,caching_mode=on", 1);
}

#[test]
fn kvm_two_pairs_two_vcpus_virtio_iommu_strict() {
    two_pairs_strict("virtio-smp", "virtio", 2);
}

#[test]
fn kvm_two_pairs_two_vcpus_vtd_strict() {
    two_pairs_strict("vtd-smp", "vtd,caching_mode=on", 2);
}

/// The test guest starts its other vCPUs (INIT-SIPI-SIPI from ring 3 through the local APIC
/// to a real-mode trampoline) and each one runs code natively in ring 3: every AP reports its
/// own APIC id, and asking for more CPUs than the VM has fails instead of hanging.
#[test]
fn kvm_the_test_guest_starts_its_other_vcpus() {
    use integration_tests::guest::GuestResult;
    use integration_tests::matrix::ONE_CELL;

    let _one = iommu::sync::lock(&ONE_CELL);
    let (exit, serial) = boot_smp(4, 4);
    assert_eq!(exit, vmm::VmExit::ExitPort(0), "{serial}");
    let r = GuestResult::from_output(&serial).unwrap();
    assert_eq!(r.u64("cpus"), Some(4), "{serial}");
    assert_eq!(r.u64("bsp_apic_id"), Some(0));
    for cpu in 1..4u64 {
        assert_eq!(r.u64(&format!("apic_id{cpu}")), Some(cpu), "{serial}");
        // 1M iterations of an empty loop: natively about 1 ms; emulated (ring 0) it would
        // take seconds.
        let cycles = r.u64(&format!("loop_cycles{cpu}")).unwrap();
        assert!(
            cycles < 1_000_000_000,
            "AP {cpu} looped for {cycles} cycles"
        );
    }
    // Asking for a vCPU the VM does not have fails (the AP never answers) instead of hanging.
    let (_, serial) = boot_smp(1, 2);
    let r = GuestResult::from_output(&serial).unwrap();
    assert_eq!(r.status(), Some("failed"), "{serial}");
    assert_eq!(r.u64("cpus"), Some(1), "{serial}");
}

/// Boots the `smp` scenario with `vcpus` vCPUs asking for `wanted`: (exit, serial output).
fn boot_smp(vcpus: u8, wanted: u8) -> (vmm::VmExit, String) {
    use integration_tests::guest::{test_guest_path, Scenario};
    use vmm::{SerialMode, VmConfig, Vmm};

    let mut cfg = VmConfig::new(test_guest_path());
    cfg.serial = SerialMode::Capture;
    cfg.cpus = vcpus;
    cfg.cmdline = Scenario::new("smp")
        .param("cpus", wanted)
        .cmdline()
        .unwrap();
    let mut vm = Vmm::start(&cfg).expect("VM starts");
    let exit = vm
        .wait_timeout(std::time::Duration::from_secs(30))
        .expect("VMM stops");
    (exit, vm.serial_output().unwrap_or_default())
}

/// The `net-mq` guest (strict, two pairs) behind `viommu` against DPDK testpmd with
/// `queues=2` (`--rxq=2 --txq=2`): testpmd receives every frame (counted over both queues),
/// from one vCPU or (`cpus` = 2) one vCPU per pair.
fn two_pairs_testpmd(label: &str, viommu: &str, cpus: u8) {
    use integration_tests::dpdk::Testpmd;
    use integration_tests::guest::{test_guest_path, IommuMode, Scenario};
    use integration_tests::matrix::{socket, VmRun, ONE_CELL};
    use vmm::{SerialMode, VmConfig};

    let _one = iommu::sync::lock(&ONE_CELL);
    let sock = socket(&format!("mq-dpdk-{label}"));
    let mut pmd = Testpmd::start_queues(&sock, true, 2).expect("testpmd starts");
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::net_mq(FRAMES, SIZE, 2)
        .iommu(IommuMode::Strict)
        .param("cpus", cpus)
        .cmdline()
        .unwrap();
    cfg.serial = SerialMode::Capture;
    cfg.cpus = cpus;
    cfg.iommu = Some(viommu.parse().unwrap());
    let dev = format!("net,socket={},iommu=on,queues=2", sock.display());
    cfg.vhost_user.push(dev.parse().unwrap());
    let run = VmRun::boot(&label, &cfg, std::time::Duration::from_secs(60));
    let r = run.ok_result(&label);
    let serial = &run.serial;
    assert_eq!(r.u64("cpus"), Some(u64::from(cpus)), "{serial}");
    assert_eq!(r.u64("ctrl_status"), Some(0), "{serial}");
    assert_eq!(r.u64("completed"), Some(FRAMES), "{serial}");
    assert_eq!(
        (r.u64("tx0"), r.u64("tx1")),
        (Some(FRAMES / 2), Some(FRAMES / 2))
    );
    // The guest completed every frame, so testpmd has dequeued them all; its counters are
    // read through its prompt (no waiting needed beyond that round trip).
    let port = pmd.port_stats().expect("testpmd stats");
    assert_eq!(
        (port.rx_packets, port.rx_bytes),
        (FRAMES, FRAMES * SIZE),
        "testpmd output:\n{}",
        pmd.output()
    );
    let per_queue = pmd.rx_queue_packets(2).expect("testpmd xstats");
    assert_eq!(per_queue, vec![FRAMES / 2, FRAMES / 2], "{}", pmd.output());
    println!(
        "{label} testpmd: {} frames on 2 pairs ({per_queue:?}) from {cpus} vCPU(s), {} misses, {} invalidations",
        port.rx_packets, run.stats.bridge.misses, run.stats.iotlb.invalidations
    );
}

#[test]
fn kvm_two_pairs_testpmd_virtio_iommu_strict() {
    two_pairs_testpmd("virtio", "virtio", 1);
}

#[test]
fn kvm_two_pairs_testpmd_vtd_strict() {
    two_pairs_testpmd("vtd", "vtd,caching_mode=on", 1);
}

#[test]
fn kvm_two_pairs_two_vcpus_testpmd_virtio_iommu_strict() {
    two_pairs_testpmd("virtio-smp", "virtio", 2);
}

#[test]
fn kvm_two_pairs_two_vcpus_testpmd_vtd_strict() {
    two_pairs_testpmd("vtd-smp", "vtd,caching_mode=on", 2);
}
