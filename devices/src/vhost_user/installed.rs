//! What a vhost-user back end may hold in its device IOTLB, and what each
//! held IOVA translated to when it was sent.
//!
//! A back end can only hold translations the front end sent it in UPDATEs
//! (its IOTLB starts empty after the connection INVALIDATE). The bridge records every UPDATE
//! here as *segments*: disjoint IOVA ranges, each with the GPA of its first
//! byte and the permission it was sent with. An unmap notification is then
//! answered by re-translating the segments it overlaps and invalidating only
//! the parts that are gone or changed (`super::recheck`). A range is
//! forgotten once the back end acked an INVALIDATE covering it.
//!
//! The record is a superset of the back end's IOTLB: DPDK may drop entries
//! on its own (random eviction, or an INVALIDATE removing a whole entry that
//! only partly overlaps it), which only costs a later redundant INVALIDATE.
//! The record is bounded by [`MAX_SEGMENTS`]; when it is full the bridge
//! invalidates everything and starts over ([`Installed::is_full`]).

use std::collections::BTreeMap;

use iommu::Permissions;

/// Most disjoint segments recorded. DPDK caches at most 2048 entries per
/// virtqueue, so a record this large is mostly stale.
pub const MAX_SEGMENTS: usize = 8 * 1024;

/// One recorded range: `[start, end]` was sent as translating to
/// `gpa + (iova - start)` with `perm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub end: u64,
    /// GPA of `start`.
    pub gpa: u64,
    /// Permission sent.
    pub perm: Permissions,
}

impl Segment {
    /// The GPA `iova` was sent as (`iova` must lie in the segment).
    pub fn gpa_of(&self, iova: u64) -> u64 {
        self.gpa.wrapping_add(iova.wrapping_sub(self.start))
    }

    /// The part of the segment in `[start, end]`, if any.
    pub fn clip(&self, start: u64, end: u64) -> Option<Segment> {
        let (s, e) = (self.start.max(start), self.end.min(end));
        (s <= e).then(|| Segment {
            start: s,
            end: e,
            gpa: self.gpa_of(s),
            perm: self.perm,
        })
    }

    /// `next` continues this segment linearly with the same permission.
    fn continued_by(&self, next: &Segment) -> bool {
        self.end.checked_add(1) == Some(next.start)
            && self.perm == next.perm
            && self.gpa_of(self.end).checked_add(1) == Some(next.gpa)
    }
}

/// Disjoint recorded segments keyed by start.
#[derive(Debug, Default)]
pub struct Installed {
    segs: BTreeMap<u64, Segment>,
}

impl Installed {
    /// Records that `[start, end]` was sent as `gpa..` with `perm`; replaces
    /// whatever was recorded for those IOVAs and merges linear neighbours.
    pub fn add(&mut self, start: u64, end: u64, gpa: u64, perm: Permissions) {
        if end < start {
            return;
        }
        self.remove(start, end);
        let mut seg = Segment {
            start,
            end,
            gpa,
            perm,
        };
        let before = self.segs.range(..start).next_back().map(|(_, s)| *s);
        if let Some(prev) = before.filter(|p| p.continued_by(&seg)) {
            self.segs.remove(&prev.start);
            seg = Segment { end, ..prev };
        }
        let after = end.checked_add(1).and_then(|n| self.segs.get(&n).copied());
        if let Some(next) = after.filter(|n| seg.continued_by(n)) {
            self.segs.remove(&next.start);
            seg.end = next.end;
        }
        self.segs.insert(seg.start, seg);
    }

    /// The recorded segments overlapping `[start, end]`, clipped to it, in
    /// IOVA order.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<Segment> {
        let first = self
            .segs
            .range(..=start)
            .next_back()
            .filter(|(_, s)| s.end >= start)
            .map(|(k, _)| *k)
            .unwrap_or(start);
        self.segs
            .range(first..=end)
            .filter_map(|(_, s)| s.clip(start, end))
            .collect()
    }

    /// Whether `[start, end]` is recorded whole as translating to `gpa` (at `start`) with
    /// `perm`: an UPDATE for exactly that would tell the back end nothing new.
    pub fn holds(&self, start: u64, end: u64, gpa: u64, perm: Permissions) -> bool {
        let want = Segment {
            start,
            end,
            gpa,
            perm,
        };
        self.overlapping(start, end) == [want]
    }

    /// Whether anything is recorded in `[start, end]`.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        self.segs
            .range(..=end)
            .next_back()
            .is_some_and(|(_, s)| s.end >= start)
    }

    /// Forgets `[start, end]` (an INVALIDATE covering it was acked).
    pub fn remove(&mut self, start: u64, end: u64) {
        for seg in self.overlapping(start, end) {
            let Some(whole) = self.whole_containing(seg.start) else {
                continue;
            };
            self.segs.remove(&whole.start);
            if whole.start < start {
                let left = whole.clip(whole.start, start - 1);
                self.segs.extend(left.map(|l| (l.start, l)));
            }
            if whole.end > end {
                let right = whole.clip(end + 1, whole.end);
                self.segs.extend(right.map(|r| (r.start, r)));
            }
        }
    }

    fn whole_containing(&self, iova: u64) -> Option<Segment> {
        self.segs
            .range(..=iova)
            .next_back()
            .map(|(_, s)| *s)
            .filter(|s| s.end >= iova)
    }

    /// The back end holds nothing (new connection, or everything invalidated).
    pub fn clear(&mut self) {
        self.segs.clear();
    }

    /// Number of recorded segments.
    pub fn len(&self) -> usize {
        self.segs.len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// No new segment may be added: invalidate everything and clear first.
    pub fn is_full(&self) -> bool {
        self.segs.len() >= MAX_SEGMENTS
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const RW: Permissions = Permissions::ReadWrite;

    #[test]
    fn linear_neighbours_merge_and_others_stay_apart() {
        let mut s = Installed::default();
        s.add(0x1000, 0x1fff, 0x8000, RW);
        s.add(0x2000, 0x2fff, 0x9000, RW);
        assert_eq!(s.len(), 1);
        // Adjacent IOVA but another GPA, or another permission: separate.
        s.add(0x3000, 0x3fff, 0x1_0000, RW);
        s.add(0x4000, 0x4fff, 0x1_1000, Permissions::Read);
        assert_eq!(s.len(), 3);
        assert!(s.intersects(0x4fff, 0x9000));
        assert!(!s.intersects(0x5000, 0x9000));
        assert!(!s.intersects(0, 0xfff));
        let got = s.overlapping(0x2800, 0x3800);
        assert_eq!(
            got,
            vec![
                Segment {
                    start: 0x2800,
                    end: 0x2fff,
                    gpa: 0x9800,
                    perm: RW
                },
                Segment {
                    start: 0x3000,
                    end: 0x3800,
                    gpa: 0x1_0000,
                    perm: RW
                },
            ]
        );
    }

    #[test]
    fn removal_splits_and_keeps_the_gpa_of_each_part() {
        let mut s = Installed::default();
        s.add(0x1000, 0x4fff, 0x10_0000, RW);
        s.remove(0x2000, 0x2fff);
        assert_eq!(s.len(), 2);
        assert!(!s.intersects(0x2000, 0x2fff));
        assert_eq!(s.overlapping(0x3000, 0x3000)[0].gpa, 0x10_2000);
        s.remove(0, u64::MAX);
        assert!(s.is_empty());
    }

    #[test]
    fn a_new_update_replaces_what_was_recorded_for_its_iovas() {
        let mut s = Installed::default();
        s.add(0x1000, 0x3fff, 0x10_0000, RW);
        s.add(0x2000, 0x2fff, 0x50_0000, Permissions::Read);
        let got: Vec<_> = s
            .overlapping(0, u64::MAX)
            .iter()
            .map(|g| (g.start, g.end, g.gpa))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x1000, 0x1fff, 0x10_0000),
                (0x2000, 0x2fff, 0x50_0000),
                (0x3000, 0x3fff, 0x10_2000)
            ]
        );
    }

    #[test]
    fn top_of_the_space_does_not_overflow() {
        let mut s = Installed::default();
        s.add(u64::MAX - 0xfff, u64::MAX, 0, RW);
        s.add(u64::MAX - 0x1fff, u64::MAX - 0x1000, 0, RW);
        assert_eq!(s.len(), 2);
        s.remove(u64::MAX - 10, u64::MAX);
        assert!(s.intersects(u64::MAX - 11, u64::MAX - 11));
        assert!(!s.intersects(u64::MAX - 10, u64::MAX));
    }

    #[test]
    fn the_record_reports_full_at_its_bound() {
        let mut s = Installed::default();
        for i in 0..MAX_SEGMENTS as u64 {
            assert!(!s.is_full());
            s.add(i * 0x2000, i * 0x2000 + 0xfff, i * 0x2000, RW);
        }
        assert!(s.is_full());
        s.clear();
        assert!(!s.is_full() && s.is_empty());
    }

    proptest! {
        /// Same answers as a map of 16-byte granules to their GPA.
        #[test]
        fn matches_a_granule_reference(ops in prop::collection::vec((0u8..3, 0u64..64, 0u64..8, 0u64..4), 1..60)) {
            let mut s = Installed::default();
            let mut reference = BTreeMap::new();
            for (op, start, len, g) in ops {
                let (lo, hi) = (start * 16, (start + len) * 16 + 15);
                match op {
                    0 => {
                        s.add(lo, hi, g * 0x1000 + lo, RW);
                        for x in start..=start + len { reference.insert(x, g * 0x1000 + x * 16); }
                    }
                    1 => { s.remove(lo, hi); for x in start..=start + len { reference.remove(&x); } }
                    _ => {
                        let want = (start..=start + len).any(|x| reference.contains_key(&x));
                        prop_assert_eq!(s.intersects(lo, hi), want);
                        let got: BTreeMap<u64, u64> = s.overlapping(lo, hi).iter()
                            .flat_map(|seg| (seg.start / 16..=seg.end / 16).map(move |x| (x, seg.gpa_of(x * 16))))
                            .collect();
                        let want: BTreeMap<u64, u64> = reference.range(start..=start + len).map(|(k, v)| (*k, *v)).collect();
                        prop_assert_eq!(got, want);
                    }
                }
            }
        }
    }
}
