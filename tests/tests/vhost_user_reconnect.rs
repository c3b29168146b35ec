//! Back-end restarts (`reconnect`), protocol level and without KVM: a test
//! back end dies (`BackendHandle::kill`), a new one comes up on the same
//! path, and the device re-negotiates, restores the running rings and lets
//! the new back end's IOTLB refill through misses only.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::vhost_user::wire::{IotlbMsg, IotlbType, PROTOCOL_F_REPLY_ACK, VHOST_USER_IOTLB_MSG};
use devices::vhost_user::{
    IotlbBridge, VhostUserConfig, VhostUserDevice, VhostUserError, VhostUserStats,
};
use devices::virtio::{
    ActivateContext, GuestMemoryMmap, VirtioDevice, VirtioDeviceError, VirtioInterrupt,
    VirtioInterruptType,
};
use integration_tests::backend::{BackendConfig, BackendHandle, Misbehaviour, TestBackend};
use iommu::{
    DmaTranslate, Extent, IommuEvent, IommuNotifier, Iova, IovaRange, Permissions, RequesterId,
    TranslateError, Translation,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 0x20_0000;
const IOVA_OFF: u64 = 0x8000_0000;
const RING_BASE: u64 = 0x1_0000;
/// Rings live below this GPA (one extent); buffers above it, one page each.
const RING_AREA: u64 = 0x4_0000;
const BUF: u64 = 0x4_0000;
const QSIZE: u16 = 8;
const NET_HDR: usize = 12;
const RID: RequesterId = RequesterId::from_bdf(0, 0x18);
const TIMEOUT: Duration = Duration::from_secs(2);
const INTERVAL: Duration = Duration::from_millis(100);

const SET_OWNER: u32 = 3;
const SET_FEATURES: u32 = 2;
const SET_VRING_BASE: u32 = 10;

/// The ring area as one mapping, every buffer page as its own mapping.
struct Stub;

impl DmaTranslate for Stub {
    fn translate(
        &self,
        _rid: RequesterId,
        iova: Iova,
        len: u64,
        _access: Permissions,
    ) -> Result<Translation, TranslateError> {
        let off = iova.0.checked_sub(IOVA_OFF).filter(|o| *o < MEM);
        let off = off.ok_or(TranslateError::Unmapped { iova })?;
        let (start, size) = if off < RING_AREA {
            (0, RING_AREA)
        } else {
            (off & !0xfff, 0x1000)
        };
        let perm = Permissions::ReadWrite;
        Ok(Translation {
            fragments: vec![(GuestAddress(off), len)],
            perm,
            extent: Extent {
                iova: IovaRange::from_start_len(IOVA_OFF + start, size).unwrap(),
                gpa: GuestAddress(start),
                perm,
            },
        })
    }
}

#[derive(Default)]
struct TestIrq(Mutex<Vec<VirtioInterruptType>>);

impl VirtioInterrupt for TestIrq {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        self.0.lock().unwrap().push(t);
        Ok(())
    }

    fn notifier(&self, _t: VirtioInterruptType) -> Option<&EventFd> {
        None
    }
}

struct Rig {
    dev: VhostUserDevice,
    mem: GuestMemoryMmap,
    kicks: Vec<EventFd>,
    path: PathBuf,
}

fn sock_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iovmm-reconnect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.sock"))
}

fn listen(path: &Path, config: BackendConfig) -> BackendHandle {
    TestBackend::listen(path, config).unwrap()
}

fn ring_gpa(q: usize) -> u64 {
    RING_BASE + 0x4000 * q as u64
}

fn rig(name: &str, reconnect: Option<Duration>) -> (Rig, BackendHandle) {
    let path = sock_path(name);
    let be = listen(&path, BackendConfig::default());
    let mut cfg = VhostUserConfig::net(&path);
    cfg.iommu = true;
    cfg.timeout = TIMEOUT;
    cfg.reconnect = reconnect;
    let dev = VhostUserDevice::connect(cfg).unwrap();
    dev.set_translation(Arc::new(Stub), RID, None).unwrap();
    let mem = vmm::vstate::memory::create_guest_memory(&[(0, MEM)]).unwrap();
    let rig = Rig {
        dev,
        mem,
        kicks: Vec::new(),
        path,
    };
    (rig, be)
}

impl Rig {
    fn queue(&self, q: usize) -> Queue {
        let mut queue = Queue::new(256).unwrap();
        queue.set_size(QSIZE);
        let base = IOVA_OFF + ring_gpa(q);
        queue
            .try_set_desc_table_address(GuestAddress(base))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(base + 0x1000))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(base + 0x2000))
            .unwrap();
        queue.set_ready(true);
        queue
    }

    fn activate(&mut self) -> Result<(), VirtioDeviceError> {
        let avail = self.dev.avail_features();
        self.dev.ack_features(avail);
        let mut queues = Vec::new();
        self.kicks.clear();
        for q in 0..2 {
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            self.kicks.push(kick.try_clone().unwrap());
            queues.push((q, self.queue(q), kick));
        }
        self.dev.activate(ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: Arc::new(TestIrq::default()),
        })
    }

    /// Post one TX frame in buffer page `slot` at avail slot `slot`; kick.
    fn send_tx(&self, slot: u16, frame: &[u8]) {
        let base = ring_gpa(1);
        let buf = BUF + 0x1000 * u64::from(slot);
        let mut data = vec![0u8; NET_HDR];
        data.extend_from_slice(frame);
        self.mem.write_slice(&data, GuestAddress(buf)).unwrap();
        let mut d = (IOVA_OFF + buf).to_le_bytes().to_vec();
        d.extend_from_slice(&(data.len() as u32).to_le_bytes());
        d.extend_from_slice(&[0, 0, 0, 0]);
        let s = u64::from(slot % QSIZE);
        self.mem
            .write_slice(&d, GuestAddress(base + 16 * s))
            .unwrap();
        let avail = base + 0x1000;
        self.mem
            .write_obj(slot % QSIZE, GuestAddress(avail + 4 + 2 * s))
            .unwrap();
        self.mem
            .write_obj(slot.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
        self.kicks[1].write(1).unwrap();
    }

    fn stats(&self) -> VhostUserStats {
        self.dev.stats()
    }

    fn wait_stats(&self, what: &str, pred: impl Fn(&VhostUserStats) -> bool) {
        let deadline = Instant::now() + TIMEOUT * 3;
        while !pred(&self.stats()) {
            assert!(Instant::now() < deadline, "{what}: {:?}", self.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn bridge(&self) -> Arc<IotlbBridge> {
        self.dev.bridge().unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn iotlb_msgs(be: &BackendHandle) -> Vec<IotlbMsg> {
    be.records()
        .iter()
        .filter(|r| r.request == VHOST_USER_IOTLB_MSG)
        .map(|r| IotlbMsg::decode(r.request, &r.payload).unwrap())
        .collect()
}

fn unmap(bridge: &IotlbBridge, gpa: u64) {
    let range = IovaRange::from_start_len(IOVA_OFF + gpa, 0x1000).unwrap();
    bridge
        .notify(&IommuEvent::Unmap { rid: RID, range })
        .unwrap();
}

/// SET_VRING_BASE payloads as (index, base).
fn vring_bases(be: &BackendHandle) -> Vec<(u32, u32)> {
    be.records()
        .iter()
        .filter(|r| r.request == SET_VRING_BASE)
        .map(|r| {
            let v = u64::from_ne_bytes(r.payload[..8].try_into().unwrap());
            (v as u32, (v >> 32) as u32)
        })
        .collect()
}

fn restarted(r: &Rig, old: &BackendHandle) -> BackendHandle {
    old.kill();
    r.wait_stats("disconnect seen", |s| s.reconnect.disconnects == 1);
    assert!(!r.stats().reconnect.connected);
    listen(&r.path, BackendConfig::default())
}

#[test]
fn restarted_backend_is_renegotiated_restored_and_refilled_by_misses() {
    let (mut r, a) = rig("restore", Some(INTERVAL));
    r.activate().unwrap();
    r.send_tx(0, b"before the restart");
    assert!(a.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    assert!(iotlb_msgs(&a)
        .iter()
        .any(|m| m.iova == IOVA_OFF + BUF && m.size == 0x1000));
    let bridge = r.bridge();
    let installed_before = bridge.installed_ranges();
    assert!(installed_before >= 1, "{installed_before}");

    let b = restarted(&r, &a);
    // Down: misses are refused at once, the record is kept, and an unmap of
    // what the old back end held sends nothing anywhere.
    assert!(!bridge.is_running());
    assert_eq!(bridge.installed_ranges(), installed_before);
    let skipped = r.stats().bridge.invalidations_skipped;
    unmap(&bridge, BUF);
    assert_eq!(r.stats().bridge.invalidations_skipped, skipped + 1);

    r.wait_stats("restored", |s| s.reconnect.restores == 1);
    let s = r.stats();
    assert!(s.reconnect.connected && s.reconnect.reconnects == 1 && !s.broken);
    // Re-negotiated from scratch, SET_FEATURES before any IOTLB message.
    let codes: Vec<u32> = b.records().iter().map(|m| m.request).collect();
    assert_eq!(codes.first(), Some(&SET_OWNER));
    let set_features = codes.iter().position(|c| *c == SET_FEATURES).unwrap();
    if let Some(first_iotlb) = codes.iter().position(|c| *c == VHOST_USER_IOTLB_MSG) {
        assert!(set_features < first_iotlb, "{codes:?}");
    }
    // Rings resume at the used index in guest memory: TX after one frame.
    assert_eq!(vring_bases(&b), vec![(0, 0), (1, 1)]);

    r.send_tx(1, b"after the restart");
    assert!(b.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    let c = b.counters();
    assert_eq!(c.tx_checksum, fnv1a(b"after the restart"));
    // Every UPDATE answered a miss of the new back end; none re-sent the
    // old buffer page, no INVALIDATE for the old connection's ranges.
    let msgs = iotlb_msgs(&b);
    assert!(msgs.iter().all(|m| m.kind().unwrap() == IotlbType::Update));
    assert!(c.iotlb_updates <= c.misses_sent, "{c:?}");
    assert!(!msgs.iter().any(|m| m.iova == IOVA_OFF + BUF));
    assert!(!b.probe(IOVA_OFF + BUF, 1));
    // The old page was forgotten at SET_FEATURES: its unmap needs nothing;
    // the new page's unmap is a new event and reaches the new back end.
    unmap(&bridge, BUF);
    assert_eq!(b.counters().iotlb_invalidates, 0);
    assert!(b.probe(IOVA_OFF + BUF + 0x1000, 1));
    unmap(&bridge, BUF + 0x1000);
    assert_eq!(b.counters().iotlb_invalidates, 1);
    assert!(!b.probe(IOVA_OFF + BUF + 0x1000, 1));
    assert_eq!(
        iotlb_msgs(&b).last(),
        Some(&IotlbMsg::invalidate(IOVA_OFF + BUF + 0x1000, 0x1000))
    );
}

fn backend_err(e: VirtioDeviceError) -> VhostUserError {
    match e {
        VirtioDeviceError::Backend(b) => *b.downcast::<VhostUserError>().unwrap(),
        other => panic!("expected a back-end error, got {other:?}"),
    }
}

#[test]
fn without_reconnect_a_dead_backend_breaks_the_device_for_good() {
    let (mut r, a) = rig("noreconnect", None);
    r.activate().unwrap();
    a.kill();
    let b = listen(&r.path, BackendConfig::default());
    assert!(!r.dev.reset());
    assert!(r.dev.is_broken());
    let err = backend_err(r.activate().unwrap_err());
    assert!(matches!(err, VhostUserError::Broken), "{err}");
    std::thread::sleep(INTERVAL * 3);
    assert!(b.records().is_empty(), "the device must not reconnect");
    let s = r.stats();
    assert!(s.broken && !s.reconnect.enabled && s.reconnect.attempts == 0);
}

#[test]
fn backend_lacking_a_feature_is_refused_and_retried() {
    let (mut r, a) = rig("refuse", Some(INTERVAL));
    r.activate().unwrap();
    a.kill();
    r.wait_stats("disconnect seen", |s| s.reconnect.disconnects == 1);
    let lacking = BackendConfig {
        misbehave: Misbehaviour {
            withhold_protocol: PROTOCOL_F_REPLY_ACK,
            ..Default::default()
        },
        ..Default::default()
    };
    let b = listen(&r.path, lacking);
    r.wait_stats("two refusals", |s| s.reconnect.attempts >= 3);
    assert_eq!(r.stats().reconnect.reconnects, 0);
    assert!(b.connections_ended() >= 2);
    assert!(!b.records().iter().any(|m| m.request == SET_FEATURES));
    b.kill();
    let c = listen(&r.path, BackendConfig::default());
    r.wait_stats("restored", |s| s.reconnect.restores == 1);
    r.send_tx(0, b"third back end");
    assert!(c.wait_for(TIMEOUT, |c| c.tx_frames == 1));
}

#[test]
fn reset_and_activation_while_disconnected_are_applied_on_reconnect() {
    let (mut r, a) = rig("offline", Some(INTERVAL));
    r.activate().unwrap();
    a.kill();
    r.wait_stats("disconnect seen", |s| s.reconnect.disconnects == 1);
    let start = Instant::now();
    assert!(r.dev.reset());
    for q in 0..2 {
        let z = vec![0u8; 0x3000];
        r.mem.write_slice(&z, GuestAddress(ring_gpa(q))).unwrap();
    }
    r.activate().unwrap();
    assert!(start.elapsed() < TIMEOUT, "a vCPU waited for the back end");
    let b = listen(&r.path, BackendConfig::default());
    r.wait_stats("restored", |s| s.reconnect.restores == 1);
    assert_eq!(vring_bases(&b), vec![(0, 0), (1, 0)]);
    r.send_tx(0, b"activated while down");
    assert!(b.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    assert_eq!(r.stats().activations, 2);
}
