//! The bridge's side of the stall detector (`super::super::stall`): it reads
//! the watched rings' indices from guest memory through the vIOMMU, feeds
//! them to [`observe`], and reports a stalled queue with the last miss and
//! the last INVALIDATE, which is what tells a lost ring (an INVALIDATE over
//! the ring, issue 13) from a back end that is simply stuck.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use iommu::{Iova, Permissions};
use vm_memory::Bytes;

use super::super::stall::{observe, RingIndices, Verdict, WatchedRing};
use super::super::wire::IotlbPerm;
use super::{lock, BridgeState, IotlbBridge};

/// The last miss the bridge answered.
#[derive(Debug, Clone, Copy)]
struct MissSeen {
    iova: u64,
    perm: IotlbPerm,
    at: Instant,
    served: bool,
}

/// The last INVALIDATE the bridge sent.
#[derive(Debug, Clone, Copy)]
struct InvalidateSent {
    first: u64,
    last: u64,
    at: Instant,
    /// The queue whose ring it overlapped.
    ring: Option<usize>,
}

/// The last miss and the last INVALIDATE, kept for the stall report.
#[derive(Debug, Default)]
pub(super) struct History {
    miss: Option<MissSeen>,
    invalidate: Option<InvalidateSent>,
}

impl History {
    /// A miss for `(iova, perm)` was answered (`served`) or refused.
    pub(super) fn miss(&mut self, iova: u64, perm: IotlbPerm, served: bool) {
        self.miss = Some(MissSeen {
            iova,
            perm,
            at: Instant::now(),
            served,
        });
    }

    /// An INVALIDATE of `[first, last]` is being sent; `ring` is the queue
    /// whose ring it overlaps.
    pub(super) fn invalidate(&mut self, first: u64, last: u64, ring: Option<usize>) {
        self.invalidate = Some(InvalidateSent {
            first,
            last,
            at: Instant::now(),
            ring,
        });
    }

    /// "last miss: ...; last INVALIDATE: ..." as of `now`.
    pub(super) fn describe(&self, now: Instant) -> String {
        let ago = |at: Instant| now.saturating_duration_since(at).as_secs_f64();
        let miss = match self.miss {
            Some(m) => format!(
                "IOVA {:#x} {:?} {:.2} s ago, {}",
                m.iova,
                m.perm,
                ago(m.at),
                if m.served { "served" } else { "refused" }
            ),
            None => "none".into(),
        };
        let inv = match self.invalidate {
            Some(i) => format!(
                "{:#x}..={:#x} {:.2} s ago, {}",
                i.first,
                i.last,
                ago(i.at),
                match i.ring {
                    Some(q) => format!("overlapping queue {q}'s ring"),
                    None => "overlapping no ring".into(),
                }
            ),
            None => "none".into(),
        };
        format!("last miss: {miss}; last INVALIDATE: {inv}")
    }
}

/// Read the little-endian u16 at `iova` as the device would (no fault is
/// reported if it is not mapped).
fn read_u16(st: &BridgeState, iova: u64) -> Option<u16> {
    let (tr, mem) = (st.translator.as_ref()?, st.mem.as_ref()?);
    let t = tr
        .viommu
        .translate(tr.rid, Iova(iova), 2, Permissions::Read)
        .ok()?;
    let gpa = t.extent.gpa_of(iova)?;
    mem.read_obj::<u16>(gpa).ok().map(u16::from_le)
}

fn read_indices(st: &BridgeState, ring: &WatchedRing) -> Option<RingIndices> {
    Some(RingIndices {
        avail: read_u16(st, ring.avail_idx()?)?,
        used: read_u16(st, ring.used_idx()?)?,
    })
}

impl IotlbBridge {
    /// Look at every watched ring once (the back-end request thread calls
    /// this on its tick, between requests). A ring that cannot be read
    /// (unmapped) is skipped: the "ring unmapped" error covers it. Returns
    /// the number of stalls newly reported.
    pub fn check_stalls(&self, now: Instant) -> usize {
        let threshold = *lock(&self.stall_threshold);
        let in_flight = self.serving_miss.load(Ordering::Relaxed);
        let mut st = lock(&self.state);
        if !st.running {
            return 0;
        }
        let mut reports = 0;
        for i in 0..st.watched.len() {
            let ring = st.watched[i].0;
            let Some(idx) = read_indices(&st, &ring) else {
                continue;
            };
            if let Verdict::Stalled { stuck, .. } =
                observe(&mut st.watched[i].1, idx, in_flight, now, threshold)
            {
                reports += 1;
                self.counters.stall_reports.bump();
                self.report_stall(&mut st, ring.queue, idx, stuck, now);
            }
        }
        reports
    }

    fn report_stall(
        &self,
        st: &mut BridgeState,
        queue: usize,
        idx: RingIndices,
        stuck: Duration,
        now: Instant,
    ) {
        let Some(suppressed) = st.logs.stall.check() else {
            return;
        };
        let rid = st
            .translator
            .as_ref()
            .map(|t| t.rid.to_string())
            .unwrap_or_default();
        log::error!(
            "vhost-user device {rid}: queue {queue} stalled: the back end holds {} descriptor \
             chains (avail idx {}, used idx {}) and completed none for {:.1} s with no IOTLB \
             miss outstanding; {} ({suppressed} similar reports suppressed)",
            idx.held(),
            idx.avail,
            idx.used,
            stuck.as_secs_f64(),
            st.history.describe(now),
        );
    }
}
