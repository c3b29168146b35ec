//! The IOVA ranges a vhost-user back end may hold in its device IOTLB.
//!
//! A back end can only hold translations the front end sent it in UPDATEs
//! (its IOTLB starts empty at SET_FEATURES). The bridge records every UPDATE
//! here and forgets a range once the back end acked its INVALIDATE, so an
//! unmap of IOVAs the back end never received (e.g. the invalidation a VT-d
//! caching-mode guest issues right after *creating* a mapping) needs no round
//! trip. When more than [`MAX_RANGES`] disjoint ranges would be tracked the
//! set gives up and reports everything as possibly installed, which only
//! costs round trips, never safety.

use std::collections::BTreeMap;

/// Most disjoint ranges tracked before falling back to "everything".
pub const MAX_RANGES: usize = 16 * 1024;

/// Inclusive IOVA ranges, disjoint and non-adjacent, keyed by start.
#[derive(Debug, Default)]
pub struct Installed {
    ranges: BTreeMap<u64, u64>,
    overflowed: bool,
}

impl Installed {
    /// Records `[start, end]` as possibly held by the back end.
    pub fn add(&mut self, start: u64, end: u64) {
        if self.overflowed || end < start {
            return;
        }
        let (mut lo, mut hi) = (start, end);
        // Merge with every range overlapping or touching [lo, hi].
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=hi.saturating_add(1))
            .rev()
            .take_while(|(_, e)| e.saturating_add(1) >= lo)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            lo = lo.min(s);
            hi = hi.max(e);
        }
        self.ranges.insert(lo, hi);
        if self.ranges.len() > MAX_RANGES {
            self.ranges.clear();
            self.overflowed = true;
        }
    }

    /// Whether the back end may hold anything in `[start, end]`.
    pub fn intersects(&self, start: u64, end: u64) -> bool {
        self.overflowed
            || self
                .ranges
                .range(..=end)
                .next_back()
                .is_some_and(|(_, e)| *e >= start)
    }

    /// Forgets `[start, end]` (its INVALIDATE was acked).
    pub fn remove(&mut self, start: u64, end: u64) {
        if start == 0 && end == u64::MAX {
            return self.clear();
        }
        let hit: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in hit {
            self.ranges.remove(&s);
            if s < start {
                self.ranges.insert(s, start - 1);
            }
            if e > end {
                self.ranges.insert(end + 1, e);
            }
        }
    }

    /// The back end holds nothing (new connection, or everything invalidated).
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.overflowed = false;
    }

    /// Number of tracked ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True when nothing is tracked and the set has not overflowed.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && !self.overflowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn adjacent_and_overlapping_ranges_merge() {
        let mut s = Installed::default();
        s.add(0x1000, 0x1fff);
        s.add(0x2000, 0x2fff);
        s.add(0x2800, 0x4fff);
        assert_eq!(s.len(), 1);
        assert!(s.intersects(0x4fff, 0x9000));
        assert!(!s.intersects(0x5000, 0x9000));
        assert!(!s.intersects(0, 0xfff));
    }

    #[test]
    fn removal_splits_and_full_removal_clears() {
        let mut s = Installed::default();
        s.add(0x1000, 0x4fff);
        s.remove(0x2000, 0x2fff);
        assert_eq!(s.len(), 2);
        assert!(!s.intersects(0x2000, 0x2fff));
        assert!(s.intersects(0x1fff, 0x1fff) && s.intersects(0x3000, 0x3000));
        s.remove(0, u64::MAX);
        assert!(s.is_empty());
    }

    #[test]
    fn top_of_the_space_does_not_overflow() {
        let mut s = Installed::default();
        s.add(u64::MAX - 0xfff, u64::MAX);
        s.add(u64::MAX - 0x1fff, u64::MAX - 0x1000);
        assert_eq!(s.len(), 1);
        s.remove(u64::MAX - 10, u64::MAX);
        assert!(s.intersects(u64::MAX - 11, u64::MAX - 11));
        assert!(!s.intersects(u64::MAX - 10, u64::MAX));
    }

    #[test]
    fn too_many_ranges_means_everything_may_be_installed() {
        let mut s = Installed::default();
        for i in 0..=MAX_RANGES as u64 {
            s.add(i * 0x2000, i * 0x2000 + 0xfff);
        }
        assert!(s.intersects(u64::MAX, u64::MAX));
        s.remove(0x1000, 0x1fff);
        assert!(
            s.intersects(0x1000, 0x1fff),
            "overflow is only undone by clear"
        );
        s.clear();
        assert!(!s.intersects(0, u64::MAX));
    }

    proptest! {
        /// Same answers as a set of 16-byte granules.
        #[test]
        fn matches_a_granule_reference(ops in prop::collection::vec((0u8..3, 0u64..64, 0u64..8), 1..60)) {
            let mut s = Installed::default();
            let mut reference = BTreeSet::new();
            for (op, start, len) in ops {
                let (lo, hi) = (start * 16, (start + len) * 16 + 15);
                match op {
                    0 => { s.add(lo, hi); reference.extend(start..=start + len); }
                    1 => { s.remove(lo, hi); for g in start..=start + len { reference.remove(&g); } }
                    _ => {
                        let want = (start..=start + len).any(|g| reference.contains(&g));
                        prop_assert_eq!(s.intersects(lo, hi), want);
                    }
                }
            }
        }
    }
}
