//! The unit's internal caches: a context cache (source id → decoded context entry) and an IOTLB
//! (domain + IOVA → translation extent), both bounded and dropped by the guest's invalidations.
//!
//! Only successful translations are cached (never not-present entries), so a guest that does
//! not invalidate after creating a mapping (caching mode off) is still translated correctly.
//! The context cache also records which source ids use which domain: IOTLB invalidations are
//! per domain, and the notifications they cause are per requester.

use std::collections::BTreeMap;

use super::tables::Context;
use crate::types::{IovaRange, Permissions};

/// Default IOTLB capacity (entries; each covers one leaf or a run of contiguous leaves).
pub const DEFAULT_IOTLB_CAPACITY: usize = 4096;

/// A cached translation: `range` maps linearly to `gpa` with `perm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedTranslation {
    /// The IOVAs covered.
    pub range: IovaRange,
    /// Guest-physical address of `range.start()`.
    pub gpa: u64,
    /// Permission over the whole range.
    pub perm: Permissions,
}

/// The IOTLB: non-overlapping cached extents per domain, at most `capacity` of them.
#[derive(Debug, Clone)]
pub struct Iotlb {
    entries: BTreeMap<(u16, u64), CachedTranslation>,
    capacity: usize,
}

impl Iotlb {
    /// An empty IOTLB holding at most `capacity` entries (0 disables caching).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            capacity,
        }
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached translation of `iova` in domain `did`.
    pub fn lookup(&self, did: u16, iova: u64) -> Option<CachedTranslation> {
        self.entries
            .range((did, 0)..=(did, iova))
            .next_back()
            .map(|(_, t)| *t)
            .filter(|t| t.range.contains(iova))
    }

    /// Caches `t` for `did`, replacing overlapping entries and evicting one entry when full.
    pub fn insert(&mut self, did: u16, t: CachedTranslation) {
        if self.capacity == 0 {
            return;
        }
        self.invalidate_range(did, t.range);
        if self.entries.len() >= self.capacity {
            if let Some(key) = self.entries.keys().next().copied() {
                self.entries.remove(&key);
            }
        }
        self.entries.insert((did, t.range.start()), t);
    }

    /// Drops everything (global invalidation).
    pub fn invalidate_all(&mut self) {
        self.entries.clear();
    }

    /// Drops every entry of `did` (domain-selective invalidation).
    pub fn invalidate_domain(&mut self, did: u16) {
        self.entries.retain(|(d, _), _| *d != did);
    }

    /// Drops every entry of `did` sharing an address with `range` (page-selective).
    pub fn invalidate_range(&mut self, did: u16, range: IovaRange) {
        let doomed: Vec<(u16, u64)> = self
            .entries
            .range((did, 0)..=(did, range.end()))
            .filter(|(_, t)| t.range.intersects(range))
            .map(|(k, _)| *k)
            .collect();
        for key in doomed {
            self.entries.remove(&key);
        }
    }
}

/// The context cache: decoded context entries by source id (at most 65536 by construction).
#[derive(Debug, Clone, Default)]
pub struct ContextCache {
    entries: BTreeMap<u16, Context>,
}

impl ContextCache {
    /// The cached context of `sid`.
    pub fn get(&self, sid: u16) -> Option<Context> {
        self.entries.get(&sid).copied()
    }

    /// Caches the context of `sid`.
    pub fn insert(&mut self, sid: u16, ctx: Context) {
        self.entries.insert(sid, ctx);
    }

    /// Source ids whose cached context uses domain `did`.
    pub fn sids_in_domain(&self, did: u16) -> Vec<u16> {
        self.entries
            .iter()
            .filter(|(_, c)| c.did == did)
            .map(|(sid, _)| *sid)
            .collect()
    }

    /// Every cached (source id, context).
    pub fn iter(&self) -> impl Iterator<Item = (u16, Context)> + '_ {
        self.entries.iter().map(|(s, c)| (*s, *c))
    }

    /// Removes the entries `doomed` selects; returns their source ids.
    pub fn remove_where(&mut self, mut doomed: impl FnMut(u16, &Context) -> bool) -> Vec<u16> {
        let sids: Vec<u16> = self
            .entries
            .iter()
            .filter(|(s, c)| doomed(**s, c))
            .map(|(s, _)| *s)
            .collect();
        for sid in &sids {
            self.entries.remove(sid);
        }
        sids
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vtd::tables::TranslationType;

    fn t(start: u64, end: u64, gpa: u64) -> CachedTranslation {
        CachedTranslation {
            range: IovaRange::new(start, end).unwrap(),
            gpa,
            perm: Permissions::ReadWrite,
        }
    }

    #[test]
    fn lookup_finds_containing_entry_of_the_right_domain() {
        let mut tlb = Iotlb::new(16);
        tlb.insert(1, t(0x1000, 0x3fff, 0x9000));
        tlb.insert(2, t(0x1000, 0x1fff, 0x5000));
        assert_eq!(tlb.lookup(1, 0x2abc).unwrap().gpa, 0x9000);
        assert_eq!(tlb.lookup(2, 0x1abc).unwrap().gpa, 0x5000);
        assert!(tlb.lookup(2, 0x2000).is_none());
        assert!(tlb.lookup(3, 0x1000).is_none());
        assert!(tlb.lookup(1, 0xfff).is_none());
    }

    #[test]
    fn range_invalidation_drops_only_overlapping_entries_of_the_domain() {
        let mut tlb = Iotlb::new(16);
        tlb.insert(1, t(0x0, 0xfff, 0));
        tlb.insert(1, t(0x1000, 0x4fff, 0));
        tlb.insert(1, t(0x8000, 0x8fff, 0));
        tlb.insert(2, t(0x1000, 0x1fff, 0));
        tlb.invalidate_range(1, IovaRange::new(0x4000, 0x7fff).unwrap());
        assert!(
            tlb.lookup(1, 0x1000).is_none(),
            "overlapping extent dropped"
        );
        assert!(tlb.lookup(1, 0x0).is_some());
        assert!(tlb.lookup(1, 0x8000).is_some());
        assert!(tlb.lookup(2, 0x1000).is_some());
        tlb.invalidate_domain(1);
        assert_eq!(tlb.len(), 1);
        tlb.invalidate_all();
        assert!(tlb.is_empty());
    }

    #[test]
    fn capacity_is_bounded_and_zero_disables() {
        let mut tlb = Iotlb::new(2);
        for i in 0..10u64 {
            tlb.insert(1, t(i * 0x1000, i * 0x1000 + 0xfff, 0));
        }
        assert_eq!(tlb.len(), 2);
        assert!(tlb.lookup(1, 0x9000).is_some(), "newest entry kept");
        let mut off = Iotlb::new(0);
        off.insert(1, t(0, 0xfff, 0));
        assert!(off.is_empty());
    }

    #[test]
    fn insert_replaces_overlapping_entries() {
        let mut tlb = Iotlb::new(16);
        tlb.insert(1, t(0x1000, 0x1fff, 0xa000));
        tlb.insert(1, t(0x0, 0x3fff, 0x20000));
        assert_eq!(tlb.len(), 1);
        assert_eq!(tlb.lookup(1, 0x1000).unwrap().gpa, 0x20000);
    }

    #[test]
    fn context_cache_maps_domains_to_sids() {
        let ctx = |did| Context {
            did,
            tt: TranslationType::MultiLevel,
            levels: 4,
            slptptr: 0,
            fpd: false,
        };
        let mut cc = ContextCache::default();
        cc.insert(0x08, ctx(2));
        cc.insert(0x10, ctx(2));
        cc.insert(0x18, ctx(3));
        assert_eq!(cc.sids_in_domain(2), vec![0x08, 0x10]);
        assert_eq!(cc.remove_where(|_, c| c.did == 3), vec![0x18]);
        assert!(cc.get(0x18).is_none());
        assert_eq!(cc.iter().count(), 2);
    }
}
