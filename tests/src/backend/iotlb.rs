//! The test back end's device IOTLB: IOVA ranges mapped to front-end
//! virtual addresses with a permission, filled by UPDATE and emptied by
//! INVALIDATE, like DPDK's per-device IOTLB cache.

use std::collections::BTreeMap;

use devices::vhost_user::wire::{Grants, IotlbPerm};

/// Most entries kept; on overflow the lowest IOVA entry is evicted (it will
/// simply miss again).
pub const MAX_ENTRIES: usize = 4096;

/// One translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IotlbEntry {
    /// First IOVA covered.
    pub iova: u64,
    /// Bytes covered (non-zero).
    pub size: u64,
    /// Front-end virtual address of `iova`.
    pub uaddr: u64,
    /// What the device may do.
    pub perm: IotlbPerm,
}

impl IotlbEntry {
    fn last(&self) -> u64 {
        // `insert` refuses entries whose end overflows.
        self.iova.saturating_add(self.size - 1)
    }
}

/// The device IOTLB.
#[derive(Debug, Default)]
pub struct DeviceIotlb {
    entries: BTreeMap<u64, IotlbEntry>,
}

impl DeviceIotlb {
    /// Install a translation. Overlapping older entries are dropped first so
    /// that lookups never see two answers. Returns false for an empty or
    /// wrapping range, or a no-access permission (nothing is stored).
    pub fn insert(&mut self, e: IotlbEntry) -> bool {
        let valid = e.size > 0
            && e.iova.checked_add(e.size - 1).is_some()
            && e.uaddr.checked_add(e.size - 1).is_some()
            && e.perm != IotlbPerm::No;
        if !valid {
            return false;
        }
        self.invalidate(e.iova, e.size);
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.pop_first();
        }
        self.entries.insert(e.iova, e);
        true
    }

    /// Drop every entry overlapping `iova..iova+size` (size 0 or a range
    /// reaching past the top means "to the end of the address space").
    /// Returns how many entries were dropped.
    pub fn invalidate(&mut self, iova: u64, size: u64) -> usize {
        let last = match size {
            0 => u64::MAX,
            s => iova.saturating_add(s - 1),
        };
        let doomed: Vec<u64> = self
            .entries
            .range(..=last)
            .rev()
            .take_while(|(_, e)| e.last() >= iova)
            .map(|(k, _)| *k)
            .collect();
        // Entries do not overlap each other, so the scan above (from the top
        // of the range down, stopping at the first entry ending before
        // `iova`) finds them all.
        for k in &doomed {
            self.entries.remove(k);
        }
        doomed.len()
    }

    /// Whether any entry overlaps `iova..iova+size` (size 0 or a range past
    /// the top: to the end of the address space), whatever its permission.
    pub fn overlaps(&self, iova: u64, size: u64) -> bool {
        let last = match size {
            0 => u64::MAX,
            s => iova.saturating_add(s - 1),
        };
        self.entries
            .range(..=last)
            .next_back()
            .is_some_and(|(_, e)| e.last() >= iova)
    }

    /// Drop everything (SET_FEATURES, RESET_OWNER).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    /// The entry containing `iova` if it grants `perm`.
    pub fn lookup(&self, iova: u64, perm: IotlbPerm) -> Option<IotlbEntry> {
        let (_, e) = self.entries.range(..=iova).next_back()?;
        (e.last() >= iova && e.perm.allows(perm)).then_some(*e)
    }

    /// Whether `iova..iova+len` is fully covered (any permission).
    pub fn covers(&self, iova: u64, len: u64) -> bool {
        let mut at = iova;
        let Some(end) = iova.checked_add(len) else {
            return false;
        };
        while at < end {
            match self.lookup(at, IotlbPerm::No) {
                Some(e) if e.last() == u64::MAX => return true,
                Some(e) => at = e.last() + 1,
                None => return false,
            }
        }
        true
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the IOTLB is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(iova: u64, size: u64, perm: IotlbPerm) -> IotlbEntry {
        IotlbEntry {
            iova,
            size,
            uaddr: iova.wrapping_add(0x1000_0000),
            perm,
        }
    }

    #[test]
    fn lookup_finds_containing_entry_with_permission() {
        let mut t = DeviceIotlb::default();
        assert!(t.insert(e(0x1000, 0x1000, IotlbPerm::ReadOnly)));
        assert_eq!(
            t.lookup(0x1fff, IotlbPerm::ReadOnly).map(|x| x.iova),
            Some(0x1000)
        );
        assert!(t.lookup(0x2000, IotlbPerm::ReadOnly).is_none());
        assert!(t.lookup(0x1000, IotlbPerm::WriteOnly).is_none());
    }

    #[test]
    fn invalidate_drops_every_overlapping_entry() {
        let mut t = DeviceIotlb::default();
        for i in 0..4 {
            t.insert(e(i * 0x1000, 0x1000, IotlbPerm::ReadWrite));
        }
        assert_eq!(t.invalidate(0x1800, 0x1000), 2);
        assert!(t.lookup(0x1000, IotlbPerm::ReadOnly).is_none());
        assert!(t.lookup(0x2000, IotlbPerm::ReadOnly).is_none());
        assert!(t.lookup(0x0, IotlbPerm::ReadOnly).is_some());
        assert!(t.lookup(0x3000, IotlbPerm::ReadOnly).is_some());
        assert_eq!(t.invalidate(0, u64::MAX), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn insert_replaces_overlaps_and_refuses_bad_ranges() {
        let mut t = DeviceIotlb::default();
        t.insert(e(0x1000, 0x2000, IotlbPerm::ReadOnly));
        t.insert(e(0x2000, 0x1000, IotlbPerm::ReadWrite));
        assert!(t.lookup(0x1000, IotlbPerm::ReadOnly).is_none());
        assert_eq!(t.len(), 1);
        assert!(!t.insert(e(0, 0, IotlbPerm::ReadWrite)));
        assert!(!t.insert(e(u64::MAX, 2, IotlbPerm::ReadWrite)));
        assert!(!t.insert(e(0x9000, 1, IotlbPerm::No)));
    }

    #[test]
    fn overlaps_sees_any_byte_of_the_range() {
        let mut t = DeviceIotlb::default();
        t.insert(e(0x3000, 0x1000, IotlbPerm::WriteOnly));
        assert!(t.overlaps(0x3fff, 1));
        assert!(t.overlaps(0x1000, 0x2001));
        assert!(!t.overlaps(0x1000, 0x2000));
        assert!(!t.overlaps(0x4000, 0x1000));
        assert!(t.overlaps(0x100, 0));
        t.invalidate(0x3800, 1);
        assert!(!t.overlaps(0, 0));
    }

    #[test]
    fn covers_spans_adjacent_entries_only() {
        let mut t = DeviceIotlb::default();
        t.insert(e(0x1000, 0x1000, IotlbPerm::ReadOnly));
        t.insert(e(0x2000, 0x1000, IotlbPerm::WriteOnly));
        assert!(t.covers(0x1800, 0x1000));
        assert!(!t.covers(0x1800, 0x2000));
        assert!(!t.covers(0x800, 0x1000));
    }

    #[test]
    fn table_is_bounded() {
        let mut t = DeviceIotlb::default();
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            t.insert(e(i * 0x1000, 0x1000, IotlbPerm::ReadWrite));
        }
        assert_eq!(t.len(), MAX_ENTRIES);
        assert!(t.lookup(0, IotlbPerm::ReadOnly).is_none());
    }
}
