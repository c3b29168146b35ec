//! Back-end restarts (`reconnect`), protocol level and without KVM: a test
//! back end dies (`BackendHandle::kill`), a new one comes up on the same
//! path, and the device re-negotiates, restores the running rings and lets
//! the new back end's IOTLB refill through misses only.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::vhost_user::wire::{
    IotlbMsg, IotlbType, PROTOCOL_F_REPLY_ACK, VHOST_USER_IOTLB_MSG, VHOST_USER_SET_BACKEND_REQ_FD,
};
use devices::vhost_user::{VhostUserConfig, VhostUserError, VhostUserStats};
use devices::virtio::VirtioDevice;
use integration_tests::backend::{BackendConfig, BackendHandle, Misbehaviour, TestBackend};
use integration_tests::rig::{
    backend_err, connect_invalidate, fnv1a, ring_gpa, socket_path, MapViommu, Rig, BUF, IOVA_OFF,
    MEM, TIMEOUT,
};
use iommu::{IovaRange, Permissions};
use vm_memory::{Bytes, GuestAddress};

/// Rings live below this GPA (one extent); buffers above it, one page each.
const RING_AREA: u64 = 0x4_0000;
const INTERVAL: Duration = Duration::from_millis(100);

const SET_OWNER: u32 = 3;
const SET_FEATURES: u32 = 2;
const SET_VRING_BASE: u32 = 10;

/// The ring area as one mapping, every buffer page as its own mapping.
fn ring_area_and_pages() -> MapViommu {
    let t = MapViommu::default();
    t.map(IOVA_OFF, RING_AREA, 0, Permissions::ReadWrite);
    for gpa in (RING_AREA..MEM).step_by(0x1000) {
        t.map(IOVA_OFF + gpa, 0x1000, gpa, Permissions::ReadWrite);
    }
    t
}

fn listen(path: &Path, config: BackendConfig) -> BackendHandle {
    TestBackend::listen(path, config).unwrap()
}

/// A net device behind an IOMMU on a listening back end (`r.be`), `reconnect` as given.
fn rig(name: &str, reconnect: Option<Duration>) -> Rig {
    let path = socket_path("reconnect", name);
    let mut cfg = VhostUserConfig::net(&path);
    cfg.iommu = true;
    cfg.timeout = TIMEOUT;
    cfg.reconnect = reconnect;
    let r = Rig::listen(path, BackendConfig::default(), cfg);
    r.use_translation(Arc::new(ring_area_and_pages()));
    r
}

fn wait_stats(r: &Rig, what: &str, pred: impl Fn(&VhostUserStats) -> bool) {
    r.wait_stats(what, TIMEOUT * 3, pred);
}

fn iotlb_msgs(be: &BackendHandle) -> Vec<IotlbMsg> {
    let msgs = integration_tests::rig::iotlb_msgs(be);
    msgs.into_iter().map(|(_, m)| m).collect()
}

/// The guest unmaps the page of `gpa` (and the bridge is notified).
fn unmap(r: &Rig, gpa: u64) {
    let range = IovaRange::from_start_len(IOVA_OFF + gpa, 0x1000).unwrap();
    r.unmap(range).unwrap();
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

/// Kills the rig's first back end and starts a new one on the same path.
fn restarted(r: &Rig) -> BackendHandle {
    r.be.kill();
    wait_stats(r, "disconnect seen", |s| s.reconnect.disconnects == 1);
    assert!(!r.dev.stats().reconnect.connected);
    listen(r.socket(), BackendConfig::default())
}

#[test]
fn restarted_backend_is_renegotiated_restored_and_refilled_by_misses() {
    let mut r = rig("restore", Some(INTERVAL));
    r.activate().unwrap();
    r.send_tx(0, b"before the restart");
    assert!(r.be.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    assert!(iotlb_msgs(&r.be)
        .iter()
        .any(|m| m.iova == IOVA_OFF + BUF && m.size == 0x1000));
    let bridge = r.dev.bridge().unwrap();
    let installed_before = bridge.installed_ranges();
    assert!(installed_before >= 1, "{installed_before}");

    let b = restarted(&r);
    // Down: misses are refused at once, the record is kept, and an unmap of
    // what the old back end held sends nothing anywhere.
    assert!(!bridge.is_running());
    assert_eq!(bridge.installed_ranges(), installed_before);
    let skipped = r.dev.stats().bridge.invalidations_skipped;
    unmap(&r, BUF);
    assert_eq!(r.dev.stats().bridge.invalidations_skipped, skipped + 1);

    wait_stats(&r, "restored", |s| s.reconnect.restores == 1);
    let s = r.dev.stats();
    assert!(s.reconnect.connected && s.reconnect.reconnects == 1 && !s.broken);
    // Re-negotiated from scratch; the first IOTLB message is one full-range
    // INVALIDATE, after SET_FEATURES and before the back-end channel exists.
    let codes: Vec<u32> = b.records().iter().map(|m| m.request).collect();
    assert_eq!(codes.first(), Some(&SET_OWNER));
    let at = |req| codes.iter().position(|c| *c == req).unwrap();
    assert!(at(SET_FEATURES) < at(VHOST_USER_IOTLB_MSG), "{codes:?}");
    assert!(
        at(VHOST_USER_IOTLB_MSG) < at(VHOST_USER_SET_BACKEND_REQ_FD),
        "{codes:?}"
    );
    assert_eq!(
        integration_tests::rig::iotlb_msgs(&b).first(),
        Some(&connect_invalidate())
    );
    assert_eq!(r.dev.stats().bridge.connect_invalidations, 2);
    // Rings resume at the used index in guest memory: TX after one frame.
    assert_eq!(vring_bases(&b), vec![(0, 0), (1, 1)]);

    r.send_tx(1, b"after the restart");
    assert!(b.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    let c = b.counters();
    assert_eq!(c.tx_checksum, fnv1a(b"after the restart"));
    // After the connection's INVALIDATE, every UPDATE answered a miss of
    // the new back end; none re-sent the old buffer page, no INVALIDATE
    // for the old connection's ranges.
    let mut msgs = iotlb_msgs(&b);
    assert_eq!(msgs.remove(0), connect_invalidate().1);
    assert!(msgs.iter().all(|m| m.kind().unwrap() == IotlbType::Update));
    assert!(c.iotlb_updates <= c.misses_sent, "{c:?}");
    assert!(!msgs.iter().any(|m| m.iova == IOVA_OFF + BUF));
    assert!(!b.probe(IOVA_OFF + BUF, 1));
    // The old page was forgotten at the connection's INVALIDATE: its unmap
    // needs nothing; the new page's unmap is a new event and reaches the
    // new back end.
    unmap(&r, BUF);
    assert_eq!(b.counters().iotlb_invalidates, 1);
    assert!(b.probe(IOVA_OFF + BUF + 0x1000, 1));
    unmap(&r, BUF + 0x1000);
    assert_eq!(b.counters().iotlb_invalidates, 2);
    assert!(!b.probe(IOVA_OFF + BUF + 0x1000, 1));
    assert_eq!(
        iotlb_msgs(&b).last(),
        Some(&IotlbMsg::invalidate(IOVA_OFF + BUF + 0x1000, 0x1000))
    );
}

#[test]
fn without_reconnect_a_dead_backend_breaks_the_device_for_good() {
    let mut r = rig("noreconnect", None);
    r.activate().unwrap();
    r.be.kill();
    let b = listen(r.socket(), BackendConfig::default());
    assert!(!r.dev.reset());
    assert!(r.dev.is_broken());
    let err = backend_err(r.activate().unwrap_err());
    assert!(matches!(err, VhostUserError::Broken), "{err}");
    std::thread::sleep(INTERVAL * 3);
    assert!(b.records().is_empty(), "the device must not reconnect");
    let s = r.dev.stats();
    assert!(s.broken && !s.reconnect.enabled && s.reconnect.attempts == 0);
}

#[test]
fn backend_lacking_a_feature_is_refused_and_retried() {
    let mut r = rig("refuse", Some(INTERVAL));
    r.activate().unwrap();
    r.be.kill();
    wait_stats(&r, "disconnect seen", |s| s.reconnect.disconnects == 1);
    let lacking = BackendConfig {
        misbehave: Misbehaviour {
            withhold_protocol: PROTOCOL_F_REPLY_ACK,
            ..Default::default()
        },
        ..Default::default()
    };
    let b = listen(r.socket(), lacking);
    wait_stats(&r, "two refusals", |s| s.reconnect.attempts >= 3);
    assert_eq!(r.dev.stats().reconnect.reconnects, 0);
    assert!(b.connections_ended() >= 2);
    assert!(!b.records().iter().any(|m| m.request == SET_FEATURES));
    b.kill();
    let c = listen(r.socket(), BackendConfig::default());
    wait_stats(&r, "restored", |s| s.reconnect.restores == 1);
    r.send_tx(0, b"third back end");
    assert!(c.wait_for(TIMEOUT, |c| c.tx_frames == 1));
}

#[test]
fn reset_and_activation_while_disconnected_are_applied_on_reconnect() {
    let mut r = rig("offline", Some(INTERVAL));
    r.activate().unwrap();
    r.be.kill();
    wait_stats(&r, "disconnect seen", |s| s.reconnect.disconnects == 1);
    let start = Instant::now();
    assert!(r.dev.reset());
    for q in 0..2 {
        let z = vec![0u8; 0x3000];
        r.mem.write_slice(&z, GuestAddress(ring_gpa(q))).unwrap();
    }
    r.activate().unwrap();
    assert!(start.elapsed() < TIMEOUT, "a vCPU waited for the back end");
    let b = listen(r.socket(), BackendConfig::default());
    wait_stats(&r, "restored", |s| s.reconnect.restores == 1);
    assert_eq!(vring_bases(&b), vec![(0, 0), (1, 0)]);
    r.send_tx(0, b"activated while down");
    assert!(b.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    assert_eq!(r.dev.stats().activations, 2);
}

/// A back end that keeps its IOTLB across renegotiation and reconnection
/// (`keep_iotlb_on_features`): while it was gone the guest remapped a buffer
/// IOVA it held to another page. After the reconnect the old translation is
/// gone (the connection's first IOTLB message dropped it) and a frame posted
/// at that IOVA is read from the new page.
#[test]
fn a_backend_keeping_its_iotlb_holds_no_stale_translation_after_a_reconnect() {
    let path = socket_path("reconnect", "keep-iotlb");
    let mut cfg = VhostUserConfig::net(&path);
    cfg.iommu = true;
    cfg.timeout = TIMEOUT;
    cfg.reconnect = Some(INTERVAL);
    let keeps = BackendConfig {
        misbehave: Misbehaviour {
            keep_iotlb_on_features: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut r = Rig::listen(path, keeps, cfg);
    let t = Arc::new(ring_area_and_pages());
    r.use_translation(t.clone());
    r.activate().unwrap();
    r.send_tx(0, b"before the remap");
    assert!(r.be.wait_for(TIMEOUT, |c| c.tx_frames == 1));
    let old = IOVA_OFF + BUF;
    assert!(r.be.probe(old, 1));
    // Nothing the back end held was invalidated yet.
    assert_eq!(r.be.counters().iotlb_entries_invalidated, 0);

    r.be.cut_connection();
    wait_stats(&r, "disconnect seen", |s| s.reconnect.disconnects == 1);
    // While it is gone: the guest unmaps the page (nothing is sent) and maps
    // the same IOVA to another page; the old page holds other bytes.
    let new_gpa = BUF + 0x8000;
    unmap(&r, BUF);
    t.map(old, 0x1000, new_gpa, Permissions::ReadWrite);
    let stale = vec![0xa5u8; 0x100];
    r.mem.write_slice(&stale, GuestAddress(BUF)).unwrap();

    wait_stats(&r, "restored", |s| s.reconnect.restores == 1);
    // The same back end, second connection: it renegotiated without
    // emptying its IOTLB, and the front end's first IOTLB message of that
    // connection is the full-range INVALIDATE, which dropped the entries
    // kept from the first one (checked in full when applied).
    let recs = r.be.records();
    let second = recs.iter().rposition(|m| m.request == SET_OWNER).unwrap();
    assert!(second > 0);
    let iotlb: Vec<IotlbMsg> = recs[second..]
        .iter()
        .filter(|m| m.request == VHOST_USER_IOTLB_MSG)
        .map(|m| IotlbMsg::decode(m.request, &m.payload).unwrap())
        .collect();
    assert_eq!(iotlb.first(), Some(&connect_invalidate().1), "{iotlb:x?}");
    assert!(
        iotlb[1..]
            .iter()
            .all(|m| m.kind().unwrap() == IotlbType::Update),
        "{iotlb:x?}"
    );
    let c = r.be.counters();
    assert!(c.iotlb_entries_invalidated >= 1, "{c:?}");
    assert_eq!(c.invalidate_violations, 0);
    assert!(!r.be.probe(old, 1), "the old translation survived");

    // A frame posted at the remapped IOVA is read from the new page.
    let frame = b"after the remap";
    r.send_tx_at(1, frame, new_gpa, old);
    assert!(r.be.wait_for(TIMEOUT, |c| c.tx_frames == 2));
    let c = r.be.counters();
    assert_eq!(
        c.tx_checksum,
        fnv1a(b"before the remap").wrapping_add(fnv1a(frame))
    );
    assert_eq!(r.dev.stats().bridge.connect_invalidations, 2);
}
