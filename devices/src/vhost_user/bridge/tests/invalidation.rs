//! Unmap notifications: what is invalidated and what is kept, vrings hit by
//! an INVALIDATE, INVALIDATEs never wrapping, the bounded record, ordering.

use super::*;
use crate::vhost_user::channel::{ChannelError, MockReply};
use crate::vhost_user::installed::MAX_SEGMENTS;
use crate::vhost_user::recheck::VringArea;
use crate::vhost_user::wire::IotlbType;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

const RW: Permissions = Permissions::ReadWrite;

fn inv(iova: u64, size: u64) -> (IotlbMsg, bool) {
    (IotlbMsg::invalidate(iova, size), true)
}

fn upd(iova: u64, size: u64, uaddr: u64) -> (IotlbMsg, bool) {
    (
        IotlbMsg::update(iova, size, uaddr, IotlbPerm::ReadWrite),
        true,
    )
}

impl Rig {
    /// Let the back end hold the translation of the mapping at `iova`.
    fn hold(&self, iova: u64) -> IotlbMsg {
        self.miss(iova, IotlbPerm::ReadOnly).unwrap()
    }

    fn unmap_event(&self, start: u64, end: u64) {
        let range = IovaRange::new(start, end).unwrap();
        self.bridge
            .notify(&IommuEvent::Unmap { rid: RID, range })
            .unwrap();
    }

    fn invalidates(&self) -> Vec<(IotlbMsg, bool)> {
        let inv = IotlbType::Invalidate as u8;
        self.chan
            .sent()
            .into_iter()
            .filter(|(m, _)| m.msg_type == inv)
            .collect()
    }

    /// Messages sent after the first `n`.
    fn sent_after(&self, n: usize) -> Vec<(IotlbMsg, bool)> {
        self.chan.sent().split_off(n)
    }

    /// A 64-entry queue 1 with its rings at IOVA 0x4000 / 0x5000 / 0x6000,
    /// mapped (three pages) to GPA `gpa`, held by the back end.
    fn rings_at(&self, gpa: u64) {
        self.stub.map(0x4000, 0x3000, gpa, RW);
        self.bridge
            .set_vrings(VringArea::split_ring(1, 64, 0x4000, 0x5000, 0x6000));
        self.hold(0x4000);
    }
}

/// The VT-d case that stalled DPDK: two buffer pages unmapped at 0x7000
/// need a 64 KiB PSI, which also covers the rings and a buffer still in use.
#[test]
fn a_widened_block_invalidates_only_the_unmapped_pages() {
    let r = rig(IotlbPolicy::MissDriven);
    r.rings_at(0x4000);
    for (iova, gpa) in [(0x7000, 0xa000), (0x8000, 0xb000), (0x9000, 0xc000)] {
        r.stub.map(iova, 0x1000, gpa, RW);
        r.hold(iova);
    }
    let n = r.chan.sent().len();
    r.stub.remove(0x7000);
    r.stub.remove(0x8000);
    r.unmap_event(0, 0xffff);
    // Use after unmap is impossible: both pages are invalidated (one
    // message, they are adjacent). The rings and 0x9000 are untouched.
    assert_eq!(r.sent_after(n), vec![inv(0x7000, 0x2000)]);
    let s = r.bridge.stats();
    assert_eq!(
        (s.invalidations, s.ring_invalidations, s.ring_updates),
        (1, 0, 0)
    );
    // Unmapping the neighbour later still reaches the back end.
    r.stub.remove(0x9000);
    r.unmap_event(0, 0xffff);
    assert_eq!(r.sent_after(n + 1), vec![inv(0x9000, 0x1000)]);
}

#[test]
fn a_page_remapped_elsewhere_or_with_another_permission_is_invalidated() {
    let r = rig(IotlbPolicy::MissDriven);
    for (iova, gpa) in [(0x1000, 0x8000), (0x2000, 0x9000), (0x3000, 0xa000)] {
        r.stub.map(iova, 0x1000, gpa, RW);
        r.hold(iova);
    }
    let n = r.chan.sent().len();
    r.stub.remove(0x1000);
    r.stub.map(0x1000, 0x1000, 0xc000, RW);
    r.stub.remove(0x3000);
    r.stub.map(0x3000, 0x1000, 0xa000, Permissions::Read);
    r.unmap_event(0, 0xffff);
    // 0x2000 still translates the same way and separates the two runs.
    assert_eq!(
        r.sent_after(n),
        vec![inv(0x1000, 0x1000), inv(0x3000, 0x1000)]
    );
    // The next miss installs the new target.
    assert_eq!(
        r.hold(0x1000),
        IotlbMsg::update(0x1000, 0x1000, host(&r.mem, 0xc000), IotlbPerm::ReadWrite)
    );
}

/// Caching-mode invalidations after a map, or a domain flush, over
/// translations that did not change: no round trip at all.
#[test]
fn unchanged_translations_are_kept() {
    let r = rig(IotlbPolicy::MissDriven);
    r.rings_at(0x4000);
    r.stub.map(0x8000, 0x1000, 0xb000, RW);
    r.hold(0x8000);
    let n = r.chan.sent().len();
    r.unmap_event(0, 0xffff);
    r.bridge.notify(&IommuEvent::Reset).unwrap();
    r.bridge
        .notify(&IommuEvent::DetachEndpoint { rid: RID })
        .unwrap();
    assert!(r.sent_after(n).is_empty());
    assert_eq!(r.bridge.stats().invalidations_unchanged, 3);
}

#[test]
fn every_kind_of_unmap_event_invalidates_exactly_what_changed() {
    let r = rig(IotlbPolicy::MissDriven);
    let range = IovaRange::new(0x1000, 0x2fff).unwrap();
    let top = IovaRange::new(1, u64::MAX).unwrap();
    for ev in [
        IommuEvent::Unmap { rid: RID, range },
        IommuEvent::DevIotlbUnmap { rid: RID, range },
        IommuEvent::DetachEndpoint { rid: RID },
        IommuEvent::Reset,
        IommuEvent::Unmap {
            rid: RID,
            range: top,
        },
    ] {
        r.stub.map(0x1000, 0x2000, 0, RW);
        r.hold(0x1000);
        r.stub.clear();
        r.bridge.notify(&ev).unwrap();
    }
    assert_eq!(r.invalidates(), vec![inv(0x1000, 0x2000); 5]);
    let s = r.bridge.stats();
    assert_eq!((s.invalidations, s.devtlb_notifications), (5, 1));
}

/// A domain flush while the rings moved (still mapped): DPDK disables the
/// queue on the INVALIDATE, so the rings are pushed again right after it.
#[test]
fn a_ring_hit_by_an_invalidate_is_pushed_again_at_once() {
    let r = rig(IotlbPolicy::MissDriven);
    r.rings_at(0x4000);
    r.stub.map(0x7000, 0x1000, 0xa000, RW);
    r.hold(0x7000);
    let n = r.chan.sent().len();
    r.stub.clear();
    r.stub.map(0x4000, 0x3000, 0x1_0000, RW);
    r.bridge.notify(&IommuEvent::Reset).unwrap();
    let h = |gpa| host(&r.mem, gpa);
    assert_eq!(
        r.sent_after(n),
        vec![
            inv(0x4000, 0x4000),
            upd(0x4000, 0x3000, h(0x1_0000)),
            upd(0x5000, 0x2000, h(0x1_1000)),
            upd(0x6000, 0x1000, h(0x1_2000)),
        ]
    );
    let s = r.bridge.stats();
    assert_eq!(
        (s.ring_invalidations, s.ring_updates, s.rings_unmapped),
        (1, 3, 0)
    );
    // The pushed rings are recorded: unmapping them is invalidated.
    r.stub.clear();
    r.unmap_event(0x4000, 0x4fff);
    assert_eq!(r.invalidates().last(), Some(&inv(0x4000, 0x1000)));
}

#[test]
fn a_ring_the_guest_really_unmapped_is_reported_not_pushed() {
    let r = rig(IotlbPolicy::MissDriven);
    r.rings_at(0x4000);
    let n = r.chan.sent().len();
    r.stub.clear();
    r.unmap_event(0x5000, 0x5fff);
    assert_eq!(r.sent_after(n), vec![inv(0x5000, 0x1000)]);
    let s = r.bridge.stats();
    assert_eq!(
        (s.ring_invalidations, s.ring_updates, s.rings_unmapped),
        (1, 0, 1)
    );
    // A stopped device has no rings to restore or report.
    r.rings_at(0x4000);
    r.bridge.stop();
    r.stub.clear();
    r.unmap_event(0x4000, 0x6fff);
    assert_eq!(r.bridge.stats().rings_unmapped, 1);
}

/// DPDK 22.11 `vhost_user_iotlb_cache_remove`, verbatim: a sorted list of
/// `(iova, size)`, `iova + size` computed in 64 bits.
fn dpdk_cache_remove(cache: &mut Vec<(u64, u64)>, iova: u64, size: u64) {
    if size == 0 {
        return;
    }
    let mut keep = Vec::new();
    let mut stopped = false;
    for &(n_iova, n_size) in cache.iter() {
        if stopped || iova.wrapping_add(size) < n_iova {
            stopped = true;
            keep.push((n_iova, n_size));
        } else if iova >= n_iova.wrapping_add(n_size) {
            keep.push((n_iova, n_size));
        }
    }
    *cache = keep;
}

#[test]
fn invalidates_reaching_the_top_never_wrap_and_remove_the_top_entry() {
    let at = |s, e| invalidate_args(IovaRange::new(s, e).unwrap());
    assert_eq!(at(0x1000, 0x1fff), Some((0x1000, 0x1000)));
    assert_eq!(at(0, u64::MAX), Some((0, u64::MAX)));
    assert_eq!(at(1, u64::MAX), Some((1, u64::MAX - 1)));
    assert_eq!(
        at(u64::MAX - 0xfff, u64::MAX),
        Some((u64::MAX - 0xfff, 0xfff))
    );
    assert_eq!(at(u64::MAX, u64::MAX), None);
    // Against DPDK's arithmetic: the old encoding (1, u64::MAX) wrapped to
    // an end of 0 and removed nothing; the new one removes the entry.
    let top = (u64::MAX - 0xfff, 0xfff);
    let mut cache = vec![(0x1000, 0x1000), top];
    dpdk_cache_remove(&mut cache, 1, u64::MAX);
    assert_eq!(cache, vec![(0x1000, 0x1000), top]);
    for s in [1, 0x2000, u64::MAX - 0xfff, u64::MAX - 1] {
        let mut cache = vec![(0x1000, 0x1000), top];
        let (iova, size) = at(s, u64::MAX).unwrap();
        assert!(iova.checked_add(size).is_some());
        dpdk_cache_remove(&mut cache, iova, size);
        let want = if s <= 0x1fff {
            vec![]
        } else {
            vec![(0x1000, 0x1000)]
        };
        assert_eq!(cache, want, "INVALIDATE from {s:#x}");
    }
}

#[test]
fn an_unmap_at_the_top_of_the_space_is_sent_without_wrapping() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub.map(u64::MAX - 0xfff, 0x1000, 0x1000, RW);
    r.hold(u64::MAX - 0xfff);
    r.stub.clear();
    r.unmap_event(1, u64::MAX);
    assert_eq!(r.invalidates(), vec![inv(u64::MAX - 0xfff, 0xfff)]);
}

#[test]
fn the_record_stays_bounded_and_a_full_record_is_flushed_once() {
    let r = rig(IotlbPolicy::MissDriven);
    r.rings_at(0x4000);
    let base = 0x100_0000u64;
    for i in 0..MAX_SEGMENTS as u64 {
        r.stub.map(base + i * 0x2000, 0x1000, (i % 8) * 0x2000, RW);
    }
    for i in 0..MAX_SEGMENTS as u64 - 1 {
        r.hold(base + i * 0x2000);
    }
    assert_eq!(r.bridge.installed_ranges(), MAX_SEGMENTS);
    assert!(r.invalidates().is_empty());
    let n = r.chan.sent().len();
    let last = base + (MAX_SEGMENTS as u64 - 1) * 0x2000;
    let got = r.hold(last);
    let h = |gpa| host(&r.mem, gpa);
    assert_eq!(
        r.sent_after(n),
        vec![
            inv(0, u64::MAX),
            upd(0x4000, 0x3000, h(0x4000)),
            upd(0x5000, 0x2000, h(0x5000)),
            upd(0x6000, 0x1000, h(0x6000)),
            (got, true),
        ]
    );
    // The ring pieces (merged, they are linear) and the new page.
    assert_eq!(r.bridge.installed_ranges(), 2);
}

#[test]
fn unmaps_of_ranges_the_back_end_never_received_need_no_round_trip() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub.map(0x1000, 0x2000, 0, RW);
    // A VT-d caching-mode guest invalidates right after mapping: nothing sent yet.
    r.unmap_event(0x1000, 0x2fff);
    assert!(r.chan.sent().is_empty());
    r.hold(0x1000);
    r.stub.clear();
    // Disjoint from what was sent: skipped; overlapping: invalidated once.
    r.unmap_event(0x8000, 0x8fff);
    r.unmap_event(0x1000, 0x2fff);
    r.unmap_event(0x1000, 0x2fff);
    assert_eq!(r.invalidates().len(), 1);
    let s = r.bridge.stats();
    assert_eq!((s.invalidations, s.invalidations_skipped), (1, 3));
    // A new connection (start) forgets everything the old back end held.
    r.stub.map(0x1000, 0x2000, 0, RW);
    r.hold(0x1000);
    // It starts with one full-range INVALIDATE, after which the old
    // range needs none.
    r.bridge.start(r.mem.clone()).unwrap();
    r.stub.clear();
    r.unmap_event(0x1000, 0x2fff);
    assert_eq!(r.invalidates(), vec![inv(0x1000, 0x2000), inv(0, u64::MAX)]);
}

#[test]
fn events_of_other_requesters_and_before_start_send_nothing() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub.map(0x1000, 0x2000, 0, RW);
    r.hold(0x1000);
    r.stub.clear();
    let other = RequesterId::from_bdf(0, 0x20);
    let range = IovaRange::new(0, 0x1fff).unwrap();
    r.bridge
        .notify(&IommuEvent::Unmap { rid: other, range })
        .unwrap();
    let fresh = IotlbBridge::new(r.chan.clone(), IotlbPolicy::MissDriven);
    fresh.notify(&IommuEvent::Reset).unwrap();
    assert!(r.invalidates().is_empty());
    // After a stop the back end may still hold entries: keep invalidating.
    r.bridge.stop();
    r.unmap_event(0, 0x1fff);
    assert_eq!(r.invalidates(), vec![inv(0x1000, 0x1000)]);
}

#[test]
fn refused_invalidate_is_an_error_and_closes_the_socket() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub.map(0x1000, 0x2000, 0, RW);
    r.hold(0x1000);
    r.stub.clear();
    r.chan.script(&[MockReply::Nack(1)]);
    let range = IovaRange::new(0, 0x1fff).unwrap();
    let err = r.bridge.notify(&IommuEvent::Unmap { rid: RID, range });
    assert!(err.is_err());
    assert!(r.chan.is_closed());
    assert_eq!(r.bridge.stats().invalidation_failures, 1);
}

/// Records messages in the order their acks "arrive"; tells the test when
/// an UPDATE is on the wire, then acks it slowly. The guest unmaps the page
/// while the UPDATE is in flight.
struct SlowUpdates {
    sent: Mutex<Vec<IotlbMsg>>,
    count: AtomicU64,
    in_flight: Mutex<mpsc::Sender<()>>,
    stub: Arc<MapViommu>,
}

impl IotlbChannel for SlowUpdates {
    fn send_iotlb(&self, msg: &IotlbMsg, _need_reply: bool) -> Result<(), ChannelError> {
        if msg.kind() == Ok(IotlbType::Update) {
            self.stub.clear();
            self.in_flight.lock().unwrap().send(()).unwrap();
            // Only widens the window in which notify contends for the lock;
            // the assertion below holds for every interleaving.
            std::thread::sleep(Duration::from_millis(100));
        }
        self.count.fetch_add(1, Ordering::SeqCst);
        self.sent.lock().unwrap().push(*msg);
        Ok(())
    }
}

#[test]
fn an_update_in_flight_is_acked_before_a_concurrent_invalidate_is_sent() {
    let stub = Arc::new(MapViommu::default());
    stub.map(0x1000, 0x1000, 0, RW);
    let (tx, rx) = mpsc::channel();
    let chan = Arc::new(SlowUpdates {
        sent: Mutex::default(),
        count: AtomicU64::new(0),
        in_flight: Mutex::new(tx),
        stub: stub.clone(),
    });
    let bridge = Arc::new(IotlbBridge::new(chan.clone(), IotlbPolicy::MissDriven));
    bridge.set_translation(stub, RID);
    bridge.start(mem()).unwrap();
    let b = bridge.clone();
    let miss = std::thread::spawn(move || b.answer_miss(0x1000, IotlbPerm::ReadOnly));
    rx.recv().unwrap();
    let range = IovaRange::new(0x1000, 0x1fff).unwrap();
    bridge
        .notify(&IommuEvent::Unmap { rid: RID, range })
        .unwrap();
    // The connection's INVALIDATE, then the UPDATE: notify could only
    // re-check and send after the UPDATE was acked.
    let kinds: Vec<_> = chan
        .sent
        .lock()
        .unwrap()
        .iter()
        .map(|m| m.msg_type)
        .collect();
    assert_eq!(kinds, vec![3, 2, 3]);
    miss.join().unwrap().unwrap();
}

#[test]
fn the_connection_invalidate_covers_the_whole_space_without_wrapping() {
    assert_eq!(
        invalidate_args(IovaRange::FULL),
        Some(super::super::invalidate::FULL_INVALIDATE)
    );
    let (iova, size) = super::super::invalidate::FULL_INVALIDATE;
    assert!(iova.checked_add(size).is_some());
    let r = rig(IotlbPolicy::MissDriven);
    let s = r.bridge.stats();
    assert_eq!((s.connect_invalidations, s.invalidations), (1, 0));
}

/// A back end that keeps its IOTLB across the reconnection: what it held
/// before is invalidated by the first message of the new connection, and
/// the unmap that happened while it was gone sends nothing.
#[test]
fn a_new_connection_starts_with_a_full_invalidate_before_any_other_iotlb_message() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub.map(0x1000, 0x1000, 0, RW);
    r.hold(0x1000);
    r.bridge.link_down();
    // The guest remaps the IOVA while the back end is gone.
    r.stub.clear();
    r.unmap_event(0x1000, 0x1fff);
    r.stub.map(0x1000, 0x1000, 0x8000, RW);
    let n = r.chan.sent().len();
    assert_eq!(
        r.miss(0x1000, IotlbPerm::ReadOnly),
        Err(MissError::DeviceStopped { iova: 0x1000 })
    );
    assert_eq!(r.sent_after(n), vec![]);
    r.bridge.start(r.mem.clone()).unwrap();
    let fresh = r.hold(0x1000);
    assert_eq!(fresh.uaddr, host(&r.mem, 0x8000));
    assert_eq!(r.sent_after(n), vec![connect_inv(), (fresh, true)]);
    let s = r.bridge.stats();
    assert_eq!(s.connect_invalidations, 2);
    assert_eq!(r.bridge.installed_ranges(), 1);
}

#[test]
fn a_refused_or_lost_connection_invalidate_fails_the_start() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub.map(0x1000, 0x1000, 0, RW);
    r.chan.script(&[MockReply::Disconnected]);
    assert!(matches!(
        r.bridge.start(r.mem.clone()),
        Err(ChannelError::Disconnected)
    ));
    assert!(!r.bridge.is_running());
    assert!(!r.chan.is_closed());
    r.chan.script(&[MockReply::Nack(1)]);
    assert!(matches!(
        r.bridge.start(r.mem.clone()),
        Err(ChannelError::Nack(1))
    ));
    // A back end refusing to drop its translations is not used any more.
    assert!(r.chan.is_closed());
    assert!(!r.bridge.is_running());
    assert_eq!(
        r.miss(0x1000, IotlbPerm::ReadOnly),
        Err(MissError::DeviceStopped { iova: 0x1000 })
    );
    assert_eq!(r.chan.sent(), vec![connect_inv(), connect_inv()]);
    let s = r.bridge.stats();
    assert_eq!((s.connect_invalidations, s.invalidation_failures), (1, 2));
}

/// The audit behind the matrix's check for back ends that cannot be probed
/// (DPDK): a translation is stale from the model change until the unmap is
/// notified, and gone from the record once its INVALIDATE was acked.
#[test]
fn stale_translations_lists_what_changed_until_the_unmap_is_notified() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub
        .map(0x4000_0000, 0x2000, 0x1000, Permissions::ReadWrite);
    r.stub.map(0x5000_0000, 0x1000, 0x8000, Permissions::Read);
    r.hold(0x4000_0000);
    r.hold(0x5000_0000);
    assert!(r.bridge.stale_translations().is_empty());
    // Moved elsewhere (same IOVA, other GPA): stale although still mapped.
    r.stub.remove(0x4000_0000);
    r.stub
        .map(0x4000_0000, 0x2000, 0x3000, Permissions::ReadWrite);
    r.stub.remove(0x5000_0000);
    assert_eq!(
        r.bridge.stale_translations(),
        vec![(0x4000_0000, 0x4000_1fff), (0x5000_0000, 0x5000_0fff)]
    );
    r.unmap_event(0x4000_0000, 0x4000_1fff);
    assert_eq!(
        r.bridge.stale_translations(),
        vec![(0x5000_0000, 0x5000_0fff)]
    );
    r.unmap_event(0x5000_0000, 0x5000_0fff);
    assert!(r.bridge.stale_translations().is_empty());
}

/// A vIOMMU for long runs: page `p` of IOVA space maps to guest page
/// `p % 32` (alternately read-only and read-write, so recorded pages never
/// merge), and every page below `unmapped_below` is gone.
struct Pages {
    unmapped_below: AtomicU64,
}

impl iommu::DmaTranslate for Pages {
    fn translate(
        &self,
        _rid: RequesterId,
        iova: Iova,
        _len: u64,
        access: Permissions,
    ) -> Result<iommu::Translation, TranslateError> {
        let page = iova.0 >> 12;
        if page < self.unmapped_below.load(Ordering::Relaxed) {
            return Err(TranslateError::Unmapped { iova });
        }
        let perm = if page.is_multiple_of(2) {
            Permissions::Read
        } else {
            RW
        };
        if !perm.allow(access) {
            return Err(TranslateError::PermissionDenied {
                iova,
                requested: access,
                allowed: perm,
            });
        }
        let gpa = GuestAddress((page % 32) << 12);
        let range = IovaRange::from_start_len(page << 12, 0x1000).unwrap();
        Ok(iommu::Translation {
            fragments: vec![(gpa, 1)],
            perm,
            extent: iommu::Extent {
                iova: range,
                gpa,
                perm,
            },
        })
    }
}

impl Viommu for Pages {
    fn add_endpoint(&self, _rid: RequesterId) -> Result<(), crate::viommu::ViommuError> {
        Ok(())
    }

    fn register_consumer(
        &self,
        rid: RequesterId,
        _consumer: Arc<dyn IommuNotifier>,
        _maps: bool,
    ) -> Result<crate::viommu::ConsumerRegistration, crate::viommu::ViommuError> {
        let source = iommu::NotifierError::NoFlags;
        Err(crate::viommu::ViommuError::Consumer { rid, source })
    }

    fn unregister_consumer(&self, _handle: iommu::NotifierHandle) {}

    fn report_fault(&self, _rid: RequesterId, _iova: Iova, _access: Permissions) {}
}

const MILLION: u64 = 1_000_000;

fn pages_bridge() -> (Arc<IotlbBridge>, Arc<Pages>, Arc<MockIotlbChannel>) {
    let chan = Arc::new(MockIotlbChannel::new());
    let pages = Arc::new(Pages {
        unmapped_below: AtomicU64::new(0),
    });
    let bridge = Arc::new(IotlbBridge::new(chan.clone(), IotlbPolicy::MissDriven));
    bridge.set_translation(pages.clone(), RID);
    bridge.start(mem()).unwrap();
    (bridge, pages, chan)
}

/// A million strict frames (miss, then the unmap notified): the record of
/// what the back end may hold never grows past one page.
#[test]
fn the_record_stays_bounded_over_a_million_strict_frames() {
    let (bridge, pages, chan) = pages_bridge();
    let mut most = 0;
    for page in 1..=MILLION {
        let iova = page << 12;
        bridge.answer_miss(iova, IotlbPerm::ReadOnly).unwrap();
        most = most.max(bridge.installed_ranges());
        pages.unmapped_below.store(page + 1, Ordering::Relaxed);
        let range = IovaRange::from_start_len(iova, 0x1000).unwrap();
        bridge
            .notify(&IommuEvent::Unmap { rid: RID, range })
            .unwrap();
        if page.is_multiple_of(4096) {
            chan.take_sent();
        }
    }
    assert_eq!(most, 1);
    assert_eq!(bridge.installed_ranges(), 0);
    assert_eq!(bridge.stats().invalidations, MILLION);
}

/// A million misses that are never unmapped (a lazy guest that never
/// flushes): the record is capped at MAX_SEGMENTS by invalidating
/// everything when it is full.
#[test]
fn the_record_stays_bounded_over_a_million_misses_without_unmaps() {
    let (bridge, _pages, chan) = pages_bridge();
    let mut most = 0;
    for page in 1..=MILLION {
        bridge.answer_miss(page << 12, IotlbPerm::ReadOnly).unwrap();
        most = most.max(bridge.installed_ranges());
        if page.is_multiple_of(4096) {
            chan.take_sent();
        }
    }
    assert_eq!(most, MAX_SEGMENTS);
    assert!(bridge.installed_ranges() <= MAX_SEGMENTS);
    let flushes = MILLION / MAX_SEGMENTS as u64;
    assert!(
        bridge.stats().invalidations >= flushes,
        "{:?}",
        bridge.stats()
    );
}
