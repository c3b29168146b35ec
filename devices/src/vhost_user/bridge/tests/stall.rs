//! The stall check on real guest memory: indices read through the
//! translation, one report per episode, nothing while stopped or unmapped,
//! and the history the report names.

use super::*;
use crate::vhost_user::stall::WatchedRing;
use vm_memory::Bytes;

const RW: Permissions = Permissions::ReadWrite;
/// Queue 1's rings: IOVA 0x4000 (desc), 0x5000 (avail), 0x6000 (used),
/// mapped to GPA 0x8000.., so avail idx is at GPA 0x9002, used idx at 0xa002.
const AVAIL_IDX_GPA: u64 = 0x9002;
const USED_IDX_GPA: u64 = 0xa002;

impl Rig {
    fn watch_queue_1(&self) {
        self.stub.map(0x4000, 0x3000, 0x8000, RW);
        self.bridge
            .set_vrings(VringArea::split_ring(1, 64, 0x4000, 0x5000, 0x6000));
        self.bridge.set_watched_rings(vec![WatchedRing {
            queue: 1,
            avail: 0x5000,
            used: 0x6000,
        }]);
    }

    fn indices(&self, avail: u16, used: u16) {
        self.mem
            .write_obj(avail.to_le(), GuestAddress(AVAIL_IDX_GPA))
            .unwrap();
        self.mem
            .write_obj(used.to_le(), GuestAddress(USED_IDX_GPA))
            .unwrap();
    }
}

/// Past the threshold with descriptors held and no progress: one report,
/// counted, however often the check runs; progress ends the episode.
#[test]
fn a_queue_holding_descriptors_without_progress_is_reported_once() {
    let r = rig(IotlbPolicy::MissDriven);
    r.watch_queue_1();
    r.bridge.set_stall_threshold(Duration::from_secs(2));
    r.indices(5, 2);
    let t0 = Instant::now();
    assert_eq!(r.bridge.check_stalls(t0), 0);
    assert_eq!(r.bridge.check_stalls(t0 + Duration::from_millis(1900)), 0);
    assert_eq!(r.bridge.check_stalls(t0 + Duration::from_secs(2)), 1);
    assert_eq!(r.bridge.check_stalls(t0 + Duration::from_secs(9)), 0);
    assert_eq!(r.bridge.stats().stall_reports, 1);
    // The back end completes one: a new episode starts from here.
    r.indices(5, 3);
    assert_eq!(r.bridge.check_stalls(t0 + Duration::from_secs(10)), 0);
    assert_eq!(r.bridge.check_stalls(t0 + Duration::from_secs(12)), 1);
    assert_eq!(r.bridge.stats().stall_reports, 2);
}

#[test]
fn an_empty_or_progressing_queue_is_never_reported() {
    let r = rig(IotlbPolicy::MissDriven);
    r.watch_queue_1();
    let t0 = Instant::now();
    for i in 0..10u16 {
        // Posted and completed alternately, each check a second apart.
        r.indices(i + 1, i);
        assert_eq!(
            r.bridge
                .check_stalls(t0 + Duration::from_secs(2 * u64::from(i))),
            0
        );
        r.indices(i + 1, i + 1);
        assert_eq!(
            r.bridge
                .check_stalls(t0 + Duration::from_secs(2 * u64::from(i) + 1)),
            0
        );
    }
    assert_eq!(r.bridge.stats().stall_reports, 0);
}

#[test]
fn nothing_is_checked_while_stopped_or_where_the_ring_is_unmapped() {
    let r = rig(IotlbPolicy::MissDriven);
    r.watch_queue_1();
    r.indices(5, 2);
    let t0 = Instant::now();
    r.stub.remove(0x4000);
    r.bridge.check_stalls(t0);
    assert_eq!(r.bridge.check_stalls(t0 + Duration::from_secs(60)), 0);
    r.stub.map(0x4000, 0x3000, 0x8000, RW);
    r.bridge.stop();
    assert_eq!(r.bridge.check_stalls(t0 + Duration::from_secs(120)), 0);
    // Stopping forgot the watched rings: a restarted device watches afresh.
    r.bridge.start(r.mem.clone()).unwrap();
    assert_eq!(r.bridge.check_stalls(t0 + Duration::from_secs(180)), 0);
    assert_eq!(r.bridge.stats().stall_reports, 0);
}

/// The report names the last miss and the last INVALIDATE, and whether that
/// INVALIDATE overlapped a ring.
#[test]
fn the_history_names_the_last_miss_and_invalidate() {
    let r = rig(IotlbPolicy::MissDriven);
    r.watch_queue_1();
    let st = lock(&r.bridge.state);
    let now = Instant::now();
    assert_eq!(
        st.history.describe(now),
        "last miss: none; last INVALIDATE: none"
    );
    drop(st);
    r.miss(0x4000, IotlbPerm::ReadOnly).unwrap();
    assert!(r.miss(0x7_0000, IotlbPerm::WriteOnly).is_err());
    // The ring moves: its INVALIDATE overlaps queue 1's ring.
    r.stub.remove(0x4000);
    r.stub.map(0x4000, 0x3000, 0xc000, RW);
    r.bridge
        .notify(&IommuEvent::Unmap {
            rid: RID,
            range: IovaRange::new(0x4000, 0x6fff).unwrap(),
        })
        .unwrap();
    let text = lock(&r.bridge.state).history.describe(Instant::now());
    assert!(text.contains("IOVA 0x70000 WriteOnly"), "{text}");
    assert!(text.contains("refused"), "{text}");
    assert!(text.contains("overlapping queue 1's ring"), "{text}");
}
