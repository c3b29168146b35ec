//! Protocol tests of the vhost-user frontend device and its IOTLB bridge
//! against iovmm's own test back end, in-process and without KVM: the device
//! is driven through the `VirtioDevice` trait with memfd-backed guest memory
//! and split rings laid out by the shared rig (`integration_tests::rig`).
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use devices::vhost_user::wire::{
    IotlbMsg, IotlbPerm, FLAG_NEED_REPLY, FLAG_VERSION, PROTOCOL_F_BACKEND_REQ,
    PROTOCOL_F_REPLY_ACK, VHOST_USER_IOTLB_MSG, VHOST_USER_SET_BACKEND_REQ_FD,
    VIRTIO_F_ACCESS_PLATFORM,
};
use devices::vhost_user::{
    IotlbBridge, VhostUserConfig, VhostUserDevice, VhostUserError, VhostUserKind,
};
use devices::viommu::{ConsumerRegistration, Viommu, ViommuError};
use devices::virtio::{ActivateContext, VirtioDevice, VirtioInterruptType};
use integration_tests::backend::{BackendConfig, Misbehaviour, TestBackend};
use integration_tests::rig::{
    backend_err, connect_invalidate, covering, dev_config, fnv1a, ring_gpa, try_connect, Rig, BUF,
    IOVA_OFF, MEM, RID, TIMEOUT,
};
use iommu::address_space::Mapping;
use iommu::{
    DmaTranslate, DomainId, Domains, DomainsConfig, IommuEvent, IommuNotifier, Iova, IovaRange,
    NotifierFlags, NotifierHandle, NotifierSet, Permissions, RequesterId, TranslateError,
    Translation, UnmapKind,
};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

fn rig_with(config: BackendConfig, kind: VhostUserKind, iommu: bool, irqfds: bool) -> Rig {
    let r = Rig::pair(config, dev_config(kind, iommu));
    if irqfds {
        r.with_irqfds()
    } else {
        r
    }
}

fn rig(config: BackendConfig, iommu: bool) -> Rig {
    rig_with(config, VhostUserKind::Net, iommu, false)
}

/// A net device behind a vIOMMU that maps all guest RAM at `IOVA_OFF`, activated.
fn translated_rig(config: BackendConfig) -> Rig {
    let mut r = rig(config, true);
    r.translate_all_ram();
    r.activate().unwrap();
    r
}

/// A back end that misbehaves as `misbehave` says.
fn misbehaving(misbehave: Misbehaviour) -> BackendConfig {
    BackendConfig {
        misbehave,
        ..Default::default()
    }
}

#[test]
fn net_device_offers_access_platform_only_behind_an_iommu() {
    let mut plain = rig(BackendConfig::default(), false);
    assert_eq!(plain.dev.device_type(), 1);
    assert_eq!(plain.dev.queue_max_sizes(), &[256, 256]);
    assert_eq!(plain.dev.avail_features() & VIRTIO_F_ACCESS_PLATFORM, 0);
    // MAC (5) and STATUS (16) are served locally.
    assert_eq!(
        plain.dev.avail_features() & (1 << 5 | 1 << 16),
        1 << 5 | 1 << 16
    );
    let mut cfg = [0u8; 8];
    plain.dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [0x02, 0x69, 0x6f, 0x76, 0x6d, 0x01, 1, 0]);
    let iommu = rig(BackendConfig::default(), true);
    assert_ne!(iommu.dev.avail_features() & VIRTIO_F_ACCESS_PLATFORM, 0);
    let proto = iommu.dev.protocol_features();
    assert_eq!(proto & PROTOCOL_F_BACKEND_REQ, PROTOCOL_F_BACKEND_REQ);
    // Without iommu, ACCESS_PLATFORM is not sent to the back end either.
    plain.activate().unwrap();
    assert_eq!(plain.be.features() & VIRTIO_F_ACCESS_PLATFORM, 0);
}

fn refusal(config: BackendConfig) -> Vec<&'static str> {
    match try_connect(config, dev_config(VhostUserKind::Net, true)).0 {
        Err(VhostUserError::MissingFeatures { missing, .. }) => missing,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn withholding(bits: u64) -> BackendConfig {
    misbehaving(Misbehaviour {
        withhold_protocol: bits,
        ..Default::default()
    })
}

#[test]
fn iommu_device_is_refused_when_the_backend_lacks_iotlb_support() {
    assert_eq!(
        refusal(withholding(PROTOCOL_F_REPLY_ACK)),
        vec!["VHOST_USER_PROTOCOL_F_REPLY_ACK"]
    );
    assert_eq!(
        refusal(withholding(PROTOCOL_F_BACKEND_REQ)),
        vec!["VHOST_USER_PROTOCOL_F_BACKEND_REQ"]
    );
    let no_ap = BackendConfig {
        access_platform: false,
        ..Default::default()
    };
    assert_eq!(refusal(no_ap.clone()), vec!["VIRTIO_F_ACCESS_PLATFORM"]);
    // The same back ends are fine for a device without a vIOMMU.
    for c in [withholding(PROTOCOL_F_BACKEND_REQ), no_ap] {
        assert!(try_connect(c, dev_config(VhostUserKind::Net, false))
            .0
            .is_ok());
    }
}

#[test]
fn connecting_to_a_missing_socket_is_a_clear_error() {
    let err =
        VhostUserDevice::connect(VhostUserConfig::net("/nonexistent/iovmm-vu.sock")).unwrap_err();
    assert!(matches!(err, VhostUserError::Connect { .. }));
    assert!(err.to_string().contains("/nonexistent/iovmm-vu.sock"));
}

#[test]
fn connect_by_path_to_a_listening_backend() {
    let dir = std::env::temp_dir().join(format!("iovmm-vu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("net.sock");
    let _be = TestBackend::listen(&path, BackendConfig::default()).unwrap();
    let mut cfg = VhostUserConfig::net(&path);
    cfg.iommu = true;
    let dev = VhostUserDevice::connect(cfg).unwrap();
    assert!(dev.bridge().is_some());
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tx_frame_reaches_the_backend_without_iommu() {
    let mut r = rig(BackendConfig::default(), false);
    r.activate().unwrap();
    let frame = b"\xff\xff\xff\xff\xff\xff\x02\x00\x00\x00\x00\x01\x08\x00hello";
    r.send_tx(0, frame);
    assert!(r.be.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    let c = r.be.counters();
    assert_eq!(
        (c.tx_bytes, c.tx_checksum),
        (frame.len() as u64, fnv1a(frame))
    );
    assert_eq!(c.misses_sent, 0);
    // Used ring updated, and the call relayed as a queue-1 interrupt.
    let deadline = Instant::now() + TIMEOUT;
    while r.irq.fired.lock().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(r.used_idx(1), 1);
    assert_eq!(
        *r.irq.fired.lock().unwrap(),
        vec![VirtioInterruptType::Queue(1)]
    );
    assert!(r.iotlb_msgs().is_empty());
}

#[test]
fn irqfds_are_handed_to_the_backend_as_call_fds() {
    let mut r = rig_with(BackendConfig::default(), VhostUserKind::Net, false, true);
    r.activate().unwrap();
    r.send_tx(0, b"frame-through-irqfd");
    assert!(r.be.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    let deadline = Instant::now() + TIMEOUT;
    while r.irq.irqfds[1].read().is_err() {
        assert!(
            Instant::now() < deadline,
            "the back end never signalled the irqfd"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(r.irq.fired.lock().unwrap().is_empty());
}

#[test]
fn tx_behind_iommu_is_served_by_misses_with_exact_updates() {
    let r = translated_rig(BackendConfig::default());
    let frame = b"behind the vIOMMU";
    r.send_tx(0, frame);
    assert!(r.be.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    assert_eq!(r.be.counters().tx_checksum, fnv1a(frame));
    // Ring addresses went out untranslated (IOVAs).
    let addr = r.be.records().into_iter().find(|m| m.request == 9).unwrap();
    let desc = u64::from_ne_bytes(addr.payload[8..16].try_into().unwrap());
    assert_eq!(desc, IOVA_OFF + ring_gpa(0));
    // The connection's first IOTLB message is one full-range INVALIDATE,
    // sent after SET_MEM_TABLE and before the back-end channel exists.
    let requests: Vec<u32> = r.be.records().iter().map(|m| m.request).collect();
    let at = |req| requests.iter().position(|&q| q == req).unwrap();
    const SET_MEM_TABLE: u32 = 5;
    assert!(at(SET_MEM_TABLE) < at(VHOST_USER_IOTLB_MSG), "{requests:?}");
    assert!(
        at(VHOST_USER_IOTLB_MSG) < at(VHOST_USER_SET_BACKEND_REQ_FD),
        "{requests:?}"
    );
    let mut msgs = r.iotlb_msgs();
    assert_eq!(msgs.remove(0), connect_invalidate());
    // Each UPDATE runs from the missed page to the end of the extent (all of
    // RAM, one region), with the VMM address of that page and the real perm.
    assert!(!msgs.is_empty() && msgs.len() <= 3, "{msgs:?}");
    for (flags, m) in &msgs {
        assert_eq!(*flags, FLAG_VERSION | FLAG_NEED_REPLY);
        assert_eq!(m.iova % 0x1000, 0);
        assert_eq!(m.iova + m.size, IOVA_OFF + MEM);
        let want = IotlbMsg::update(
            m.iova,
            m.size,
            r.host(m.iova - IOVA_OFF),
            IotlbPerm::ReadWrite,
        );
        assert_eq!(*m, want);
    }
    let n = msgs.len() as u64;
    let s = r.dev.stats();
    assert_eq!((s.bridge.misses, s.bridge.misses_served), (n, n));
    assert_eq!(
        (s.iotlb.updates, s.iotlb.acked, s.iotlb.nacks),
        (n, n + 1, 0)
    );
    assert_eq!(s.iotlb.invalidations, 1);
    assert_eq!(
        (s.bridge.connect_invalidations, s.bridge.invalidations),
        (1, 0)
    );
    assert_eq!(s.bridge.miss_latency.count, n);
}

#[test]
fn unmapped_miss_gets_no_update_a_nonzero_ack_and_a_fault() {
    let config = BackendConfig {
        miss_need_reply: true,
        miss_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let mut r = rig(config, true);
    let (_stub, faults) = r.translate_all_ram();
    r.activate().unwrap();
    let outside = IOVA_OFF + MEM + 0x1000;
    assert!(r.be.read(outside, 4).is_err());
    assert_eq!(r.be.counters().miss_nacks, 1);
    // Only the connection's full-range INVALIDATE covers it.
    let covering = covering(&r.be, outside);
    assert_eq!(covering, vec![connect_invalidate().1]);
    let mut msgs = r.iotlb_msgs();
    assert_eq!(msgs.remove(0), connect_invalidate());
    // Starting the rings may have fetched ring translations (each from the
    // missed ring page to the end of RAM, whichever ring missed first);
    // nothing else, and nothing outside RAM.
    let in_ram = |m: &IotlbMsg| m.iova >= IOVA_OFF && m.iova + m.size <= IOVA_OFF + MEM;
    assert!(msgs.iter().all(|(_, m)| in_ram(m)), "{msgs:x?}");
    assert_eq!(
        *faults.lock().unwrap(),
        vec![(RID, outside, Permissions::Read)]
    );
    assert_eq!(r.dev.stats().bridge.faults, 1);
}

#[test]
fn miss_is_acked_only_after_its_update_was_acked() {
    let delay = Duration::from_millis(150);
    let config = BackendConfig {
        miss_need_reply: true,
        ..misbehaving(Misbehaviour {
            ack_delay: delay,
            ..Default::default()
        })
    };
    let r = translated_rig(config);
    r.mem.write_slice(b"data", GuestAddress(BUF)).unwrap();
    let start = Instant::now();
    // The back end blocks on the miss ack; the UPDATE's ack is delayed by
    // `delay`, so the miss ack cannot come sooner.
    assert_eq!(r.be.read(IOVA_OFF + BUF, 4).unwrap(), b"data");
    assert!(start.elapsed() >= delay);
    assert_eq!(r.be.counters().miss_nacks, 0);
}

#[test]
fn invalidate_is_acked_before_notify_returns() {
    let delay = Duration::from_millis(120);
    let config = misbehaving(Misbehaviour {
        ack_delay: delay,
        ..Default::default()
    });
    let r = translated_rig(config);
    // Let the backend hold a translation first (only those need INVALIDATEs).
    r.send_tx(0, b"installs a translation");
    assert!(r.be.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    // The TX buffer's page (below it: the rings, which stay mapped).
    let installed = IOVA_OFF + BUF;
    let invalidates_before = r.be.counters().iotlb_invalidates;
    let range = IovaRange::from_start_len(installed, 0x1000).unwrap();
    let start = Instant::now();
    r.unmap(range).unwrap();
    assert!(start.elapsed() >= delay);
    assert_eq!(r.be.counters().iotlb_invalidates, invalidates_before + 1);
    let (flags, msg) = r.iotlb_msgs().pop().unwrap();
    assert_eq!(flags, FLAG_VERSION | FLAG_NEED_REPLY);
    assert_eq!(msg, IotlbMsg::invalidate(installed, 0x1000));
}

/// Deliver an Unmap the way a vIOMMU does.
trait NotifyUnmap {
    fn notify_unmap_for_test(&self, range: IovaRange);
}

impl NotifyUnmap for IotlbBridge {
    fn notify_unmap_for_test(&self, range: IovaRange) {
        use iommu::IommuNotifier;
        self.notify(&IommuEvent::Unmap { rid: RID, range }).unwrap();
    }
}

/// The `iommu` crate's domain model and notifier set behind the device seam, driven directly by
/// the test (map and unmap without a guest).
struct ModelViommu {
    domains: RwLock<Domains>,
    set: RwLock<NotifierSet>,
    faults: std::sync::Mutex<Vec<u64>>,
}

impl DmaTranslate for ModelViommu {
    fn translate(
        &self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Permissions,
    ) -> Result<Translation, TranslateError> {
        self.domains.translate(rid, iova, len, access)
    }
}

impl Viommu for ModelViommu {
    fn add_endpoint(&self, rid: RequesterId) -> Result<(), ViommuError> {
        let added = self.domains.write().unwrap().add_endpoint(rid);
        added.map_err(|source| ViommuError::Endpoint { rid, source })
    }

    fn register_consumer(
        &self,
        rid: RequesterId,
        consumer: Arc<dyn IommuNotifier>,
        _maps: bool,
    ) -> Result<ConsumerRegistration, ViommuError> {
        let mut set = self.set.write().unwrap();
        let (handle, kind) = set
            .register_with_fallback(rid, NotifierFlags::NONE, consumer)
            .map_err(|source| ViommuError::Consumer { rid, source })?;
        Ok(ConsumerRegistration { handle, kind })
    }

    fn unregister_consumer(&self, handle: NotifierHandle) {
        self.set.write().unwrap().unregister(handle).unwrap();
    }

    fn report_fault(&self, rid: RequesterId, iova: Iova, access: Permissions) {
        assert_eq!((rid, access), (RID, Permissions::Read));
        self.faults.lock().unwrap().push(iova.0);
    }
}

#[test]
fn probe_fails_right_after_a_guest_unmap_was_notified() {
    let mut r = rig(BackendConfig::default(), true);
    let viommu = Arc::new(ModelViommu {
        domains: RwLock::new(Domains::new(DomainsConfig::default())),
        set: RwLock::new(NotifierSet::new(NotifierFlags::MAP | NotifierFlags::UNMAP)),
        faults: Default::default(),
    });
    let dom = DomainId(1);
    viommu.add_endpoint(RID).unwrap();
    {
        let mut d = viommu.domains.write().unwrap();
        d.attach(RID, dom, false).unwrap();
        for page in 0..(MEM / 0x1000) {
            let range = IovaRange::from_start_len(IOVA_OFF + page * 0x1000, 0x1000).unwrap();
            let m = Mapping::new(range, GuestAddress(page * 0x1000), Permissions::ReadWrite);
            d.map(dom, m.unwrap()).unwrap();
        }
    }
    r.dev.set_translation(viommu.clone(), RID).unwrap();
    let reg = viommu
        .register_consumer(RID, r.dev.bridge().unwrap(), false)
        .unwrap();
    assert_eq!(reg.kind, UnmapKind::Iotlb);
    r.activate().unwrap();
    for page in [0x40u64, 0x41, 0x90] {
        let iova = IOVA_OFF + page * 0x1000;
        r.be.read(iova, 8).unwrap();
        assert!(r.be.probe(iova, 8));
        let range = IovaRange::from_start_len(iova, 0x1000).unwrap();
        // The model's lock is released before the events are delivered.
        let events = viommu.domains.write().unwrap().unmap(dom, range).unwrap();
        viommu.set.read().unwrap().dispatch_all(&events).unwrap();
        assert!(
            !r.be.probe(iova, 1),
            "page {page:#x} still usable after unmap"
        );
        assert!(r.be.read(iova, 1).is_err());
    }
    assert!(r.dev.stats().bridge.invalidations >= 3);
    // Each read after its unmap was a refused miss, reported as a fault.
    let pages: Vec<u64> = [0x40u64, 0x41, 0x90]
        .iter()
        .map(|p| IOVA_OFF + p * 0x1000)
        .collect();
    assert_eq!(*viommu.faults.lock().unwrap(), pages);
}

#[test]
fn malformed_backend_message_closes_only_the_backend_channel() {
    let config = BackendConfig {
        miss_timeout: Duration::from_millis(200),
        ..misbehaving(Misbehaviour {
            bogus_backend_msg: true,
            ..Default::default()
        })
    };
    let mut r = translated_rig(config);
    // The back-end channel is gone: a miss goes unanswered...
    std::thread::sleep(Duration::from_millis(50));
    assert!(r.be.read(IOVA_OFF + BUF, 4).is_err());
    // ...but the main socket is fine.
    r.dev
        .bridge()
        .unwrap()
        .notify_unmap_for_test(IovaRange::FULL);
    assert!(!r.dev.is_broken());
    assert!(r.dev.reset());
    r.activate().unwrap();
}

#[test]
fn backend_disconnect_gives_typed_errors_and_never_hangs() {
    let config = misbehaving(Misbehaviour {
        disconnect_after: Some(9),
        ..Default::default()
    });
    let start = Instant::now();
    let mut r = rig(config, true);
    let _t = r.translate_all_ram();
    let err = backend_err(r.activate().unwrap_err());
    assert!(matches!(err, VhostUserError::Request { .. }), "{err}");
    assert!(r.dev.is_broken());
    let again = backend_err(r.activate().unwrap_err());
    assert!(matches!(again, VhostUserError::Broken));
    assert!(!r.dev.reset());
    let bridge = r.dev.bridge().unwrap();
    let range = IovaRange::from_start_len(IOVA_OFF, 0x1000).unwrap();
    use iommu::IommuNotifier;
    // Nothing was ever sent to this backend, so it holds no translation: the
    // unmap needs no round trip and succeeds at once despite the dead socket.
    assert!(bridge
        .notify(&IommuEvent::Unmap { rid: RID, range })
        .is_ok());
    assert!(r.dev.stats().broken);
    assert!(start.elapsed() < TIMEOUT * 2);
}

#[test]
fn backend_gone_at_connect_is_a_request_error() {
    let config = misbehaving(Misbehaviour {
        disconnect_after: Some(1),
        ..Default::default()
    });
    let (res, _be) = try_connect(config, dev_config(VhostUserKind::Net, false));
    assert!(matches!(res, Err(VhostUserError::Request { .. })));
}

#[test]
fn reset_stops_the_rings_and_the_device_restarts() {
    let mut r = translated_rig(BackendConfig::default());
    r.send_tx(0, b"first");
    assert!(r.be.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    assert!(r.dev.reset());
    let get_base = r.be.records().iter().filter(|m| m.request == 11).count();
    assert_eq!(get_base, 2);
    assert!(!r.dev.bridge().unwrap().is_running());
    // Restart on fresh rings.
    for q in 0..2 {
        let z = vec![0u8; 0x3000];
        r.mem.write_slice(&z, GuestAddress(ring_gpa(q))).unwrap();
    }
    r.activate().unwrap();
    r.send_tx(0, b"second");
    assert!(r.be.wait_for(TIMEOUT, |c| c.tx_frames == 2));
    assert_eq!(r.dev.stats().activations, 2);
}

/// Activates `r`'s device (features already acked) with `queues`, which it must refuse: why.
fn refused_activation(r: &mut Rig, queues: Vec<Queue>) -> VhostUserError {
    let queues = queues
        .into_iter()
        .enumerate()
        .map(|(q, queue)| (q, queue, EventFd::new(0).unwrap()))
        .collect();
    let err = r.dev.activate(ActivateContext {
        mem: r.mem.clone(),
        queues,
        interrupt: r.irq.clone(),
    });
    backend_err(err.unwrap_err())
}

#[test]
fn iommu_device_refuses_to_start_without_translation_or_access_platform() {
    let mut r = rig(BackendConfig::default(), true);
    let err = backend_err(r.activate().unwrap_err());
    assert!(matches!(err, VhostUserError::NoTranslation));
    let _t = r.translate_all_ram();
    r.dev
        .ack_features(r.dev.avail_features() & !VIRTIO_F_ACCESS_PLATFORM);
    let queues = vec![r.queue(0), r.queue(1)];
    assert!(matches!(
        refused_activation(&mut r, queues),
        VhostUserError::AccessPlatformNotAcked
    ));
    assert!(!r.dev.is_broken());
}

#[test]
fn blk_device_serves_capacity_and_starts_one_queue() {
    let mut r = rig_with(BackendConfig::default(), VhostUserKind::Blk, false, false);
    assert_eq!(r.dev.device_type(), 2);
    assert_eq!(r.dev.queue_max_sizes().len(), 1);
    let mut cap = [0u8; 8];
    r.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    r.activate().unwrap();
    let kicks = r.be.records().iter().filter(|m| m.request == 12).count();
    assert_eq!(kicks, 1);
    let mut no_cap = dev_config(VhostUserKind::Blk, false);
    no_cap.capacity_sectors = None;
    let (res, _be) = try_connect(BackendConfig::default(), no_cap);
    assert!(matches!(res, Err(VhostUserError::MissingCapacity)));
}

#[test]
fn failed_activation_stops_the_rings_it_started() {
    let mut r = rig(BackendConfig::default(), false);
    let avail = r.dev.avail_features();
    r.dev.ack_features(avail);
    let mut bad = r.queue(1);
    // A ring outside guest RAM (no vIOMMU): refused after queue 0 started.
    bad.try_set_desc_table_address(GuestAddress(MEM + 0x1000))
        .unwrap();
    let queues = vec![r.queue(0), bad];
    assert!(matches!(
        refused_activation(&mut r, queues),
        VhostUserError::RingAddress { queue: 1, .. }
    ));
    let recs = r.be.records();
    let stopped: Vec<u64> = recs
        .iter()
        .filter(|m| m.request == 11)
        .map(|m| u64::from_ne_bytes(m.payload[..8].try_into().unwrap()) & 0xffff_ffff)
        .collect();
    assert_eq!(stopped, vec![0]);
    assert!(r.dev.reset());
    r.activate().unwrap();
}
