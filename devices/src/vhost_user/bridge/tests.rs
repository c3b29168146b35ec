//! Unit tests of the IOTLB bridge against a mock channel and a stub translation.

mod invalidation;
mod stall;

use super::*;
use crate::vhost_user::channel::MockIotlbChannel;
use crate::viommu::testing::MapViommu;

const RID: RequesterId = RequesterId::from_bdf(0, 0x18);

/// Two adjacent 64 KiB regions (separate mappings) at GPA 0 and 0x10000.
fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)])
        .unwrap()
}

fn host(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
}

struct Rig {
    chan: Arc<MockIotlbChannel>,
    stub: Arc<MapViommu>,
    bridge: Arc<IotlbBridge>,
    mem: GuestMemoryMmap,
}

fn rig(policy: IotlbPolicy) -> Rig {
    let chan = Arc::new(MockIotlbChannel::new());
    let stub = Arc::new(MapViommu::default());
    let bridge = Arc::new(IotlbBridge::new(chan.clone(), policy));
    bridge.set_translation(stub.clone(), RID);
    let mem = mem();
    bridge.start(mem.clone()).unwrap();
    // The connection starts with one full-range, non-wrapping INVALIDATE;
    // the tests below look at what follows it.
    assert_eq!(chan.take_sent(), vec![connect_inv()]);
    Rig {
        chan,
        stub,
        bridge,
        mem,
    }
}

/// The INVALIDATE every connection starts with.
fn connect_inv() -> (IotlbMsg, bool) {
    (IotlbMsg::invalidate(0, u64::MAX), true)
}

impl Rig {
    fn miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
        self.bridge.answer_miss(iova, perm)
    }
}

#[test]
fn miss_sends_the_extent_from_the_missed_page_clipped_to_the_memory_region() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub.map(0x1000_0000, 0x20000, 0, Permissions::ReadWrite);
    // From the missed page to the end of the first region (0x10000 bytes).
    let want = IotlbMsg::update(
        0x1000_8000,
        0x8000,
        host(&r.mem, 0x8000),
        IotlbPerm::ReadWrite,
    );
    assert_eq!(r.miss(0x1000_8123, IotlbPerm::WriteOnly).unwrap(), want);
    let want2 = IotlbMsg::update(
        0x1001_0000,
        0x10000,
        host(&r.mem, 0x10000),
        IotlbPerm::ReadWrite,
    );
    assert_eq!(r.miss(0x1001_0005, IotlbPerm::ReadOnly).unwrap(), want2);
    assert_eq!(r.chan.sent(), vec![(want, true), (want2, true)]);
    let s = r.bridge.stats();
    assert_eq!((s.misses, s.misses_served, s.misses_refused), (2, 2, 0));
    assert_eq!(s.miss_latency.count, 2);
}

#[test]
fn miss_update_starts_inside_a_region_and_keeps_the_real_permission() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub.map(0x2000_0000, 0x4000, 0x8000, Permissions::Read);
    let got = r.miss(0x2000_1fff, IotlbPerm::ReadOnly).unwrap();
    assert_eq!(
        got,
        IotlbMsg::update(
            0x2000_1000,
            0x3000,
            host(&r.mem, 0x9000),
            IotlbPerm::ReadOnly
        )
    );
}

/// DPDK keeps the first cached entry of a given start IOVA and drops later
/// UPDATEs with the same start. After the mapping grew, a second miss must
/// therefore not repeat the first UPDATE's start.
#[test]
fn misses_after_a_mapping_grew_never_repeat_an_update_start() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub
        .map(0x3000_0000, 0x1000, 0x4000, Permissions::ReadWrite);
    let first = r.miss(0x3000_0010, IotlbPerm::ReadOnly).unwrap();
    assert_eq!((first.iova, first.size), (0x3000_0000, 0x1000));
    // The translation extent now also covers the next page (a contiguous
    // neighbour mapped while the first stays mapped, merged by the model).
    r.stub.clear();
    r.stub
        .map(0x3000_0000, 0x2000, 0x4000, Permissions::ReadWrite);
    let second = r.miss(0x3000_1010, IotlbPerm::ReadOnly).unwrap();
    assert_eq!((second.iova, second.size), (0x3000_1000, 0x1000));
}

#[test]
fn unmapped_or_forbidden_miss_sends_nothing_and_reports_a_fault() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub.map(0x2000_0000, 0x1000, 0x8000, Permissions::Read);
    assert_eq!(
        r.miss(0x2000_0010, IotlbPerm::WriteOnly),
        Err(MissError::PermissionDenied {
            iova: 0x2000_0010,
            wanted: IotlbPerm::WriteOnly
        })
    );
    assert_eq!(
        r.miss(0x3000_0000, IotlbPerm::ReadOnly),
        Err(MissError::Unmapped { iova: 0x3000_0000 })
    );
    assert!(r.chan.sent().is_empty());
    assert_eq!(
        *r.stub.faults().lock().unwrap(),
        vec![
            (RID, 0x2000_0010, Permissions::Write),
            (RID, 0x3000_0000, Permissions::Read)
        ]
    );
    let s = r.bridge.stats();
    assert_eq!((s.misses_refused, s.faults), (2, 2));
}

#[test]
fn miss_while_stopped_or_unconfigured_is_refused_without_fault() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub.map(0, 0x1000, 0, Permissions::ReadWrite);
    r.bridge.stop();
    assert_eq!(
        r.miss(0x10, IotlbPerm::ReadOnly),
        Err(MissError::DeviceStopped { iova: 0x10 })
    );
    let fresh = IotlbBridge::new(r.chan.clone(), IotlbPolicy::MissDriven);
    fresh.start(r.mem.clone()).unwrap();
    assert_eq!(
        fresh.answer_miss(0x10, IotlbPerm::ReadOnly),
        Err(MissError::NoTranslation { iova: 0x10 })
    );
    // Only the fresh bridge's connection INVALIDATE.
    assert_eq!(r.chan.sent(), vec![connect_inv()]);
    assert!(r.stub.faults().lock().unwrap().is_empty());
}

#[test]
fn translation_outside_guest_ram_is_refused() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub
        .map(0x5000, 0x1000, 0xfee0_0000, Permissions::ReadWrite);
    assert_eq!(
        r.miss(0x5000, IotlbPerm::WriteOnly),
        Err(MissError::NotSharedMemory { iova: 0x5000 })
    );
    assert!(r.chan.sent().is_empty());
}

#[test]
fn update_never_wraps_the_top_of_the_iova_space() {
    let r = rig(IotlbPolicy::MissDriven);
    r.stub
        .map(u64::MAX - 0xfff, 0x1000, 0x1000, Permissions::ReadWrite);
    let got = r.miss(u64::MAX - 0xfff, IotlbPerm::ReadWrite).unwrap();
    assert_eq!(
        got,
        IotlbMsg::update(
            u64::MAX - 0xfff,
            0xfff,
            host(&r.mem, 0x1000),
            IotlbPerm::ReadWrite
        )
    );
    assert_eq!(
        r.miss(u64::MAX, IotlbPerm::ReadOnly),
        Err(MissError::Unrepresentable { iova: u64::MAX })
    );
}

#[test]
fn a_map_event_for_what_the_back_end_already_holds_sends_nothing() {
    let map = |gpa: u64, perm| IommuEvent::Map {
        rid: RID,
        range: IovaRange::from_start_len(0x4000_0000, 0x2000).unwrap(),
        gpa: GuestAddress(gpa),
        perm,
    };
    let r = rig(IotlbPolicy::Prefetch);
    r.bridge.notify(&map(0x8000, Permissions::Read)).unwrap();
    assert_eq!(r.chan.sent().len(), 1);
    // The same leaves reported again (a caching-mode invalidation of a larger block).
    r.bridge.notify(&map(0x8000, Permissions::Read)).unwrap();
    assert_eq!(r.chan.sent().len(), 1);
    // A different GPA or permission for the same IOVAs is news.
    r.bridge.notify(&map(0xa000, Permissions::Read)).unwrap();
    r.bridge
        .notify(&map(0xa000, Permissions::ReadWrite))
        .unwrap();
    assert_eq!(r.chan.sent().len(), 3);
    assert_eq!(r.bridge.stats().prefetches, 3);
}

#[test]
fn map_events_are_pushed_only_with_the_prefetch_policy() {
    let ev = IommuEvent::Map {
        rid: RID,
        range: IovaRange::from_start_len(0x4000_0000, 0x18000).unwrap(),
        gpa: GuestAddress(0x8000),
        perm: Permissions::Read,
    };
    let lazy = rig(IotlbPolicy::MissDriven);
    lazy.bridge.notify(&ev).unwrap();
    assert!(lazy.chan.sent().is_empty());
    let eager = rig(IotlbPolicy::Prefetch);
    eager.bridge.notify(&ev).unwrap();
    // Split at the region boundary 0x10000.
    let m = &eager.mem;
    assert_eq!(
        eager.chan.sent(),
        vec![
            (
                IotlbMsg::update(0x4000_0000, 0x8000, host(m, 0x8000), IotlbPerm::ReadOnly),
                true
            ),
            (
                IotlbMsg::update(0x4000_8000, 0x10000, host(m, 0x10000), IotlbPerm::ReadOnly),
                true
            ),
        ]
    );
    assert_eq!(eager.bridge.stats().prefetches, 2);
}
