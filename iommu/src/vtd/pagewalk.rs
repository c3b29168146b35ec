//! The second-level (legacy) page walk: 3 or 4 levels, 2 MiB / 1 GiB leaves when SLLPS allows,
//! R/W ANDed over the levels, reserved-bit checks, and the extent of a leaf widened by its
//! contiguous neighbours in the same table.
//!
//! The walk visits exactly one entry per level, so a guest table that points back at itself
//! (a loop) or a chain deeper than the context's level count cannot make it run longer: after
//! `levels` reads the walk ends with a leaf or a fault.

use vm_memory::{Bytes, GuestAddress};

use super::fault::FaultReason;
use super::regs::page_addr_mask;
use crate::types::{intersect, permissions, IovaRange, Permissions};

/// Entries per table.
const ENTRIES: u64 = 512;

/// Parameters of one walk, from the context entry and the unit's capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkParams {
    /// Address of the top-level table (context SLPTPTR).
    pub root: u64,
    /// Number of levels (3 or 4).
    pub levels: u8,
    /// Host address width: output address bits at or above it are reserved.
    pub haw: u8,
    /// 2 MiB leaves allowed (SLLPS bit 0).
    pub large_2m: bool,
    /// 1 GiB leaves allowed (SLLPS bit 1).
    pub large_1g: bool,
    /// Bit 62 (TM) allowed (device-TLB support).
    pub tm_allowed: bool,
}

impl WalkParams {
    /// Number of input address bits the walk translates (39 or 48).
    pub fn input_width(&self) -> u32 {
        12 + 9 * u32::from(self.levels)
    }
}

/// Why a walk failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The entry at `level` has R = W = 0.
    NotPresent {
        /// Level of the entry (1 = leaf table).
        level: u8,
    },
    /// The entry at `level` has reserved bits set.
    Reserved {
        /// Level of the entry.
        level: u8,
    },
    /// The entry at `level` could not be read from guest memory.
    ReadFailed {
        /// Level of the entry.
        level: u8,
    },
    /// The input address has bits at or above the adjusted guest address width.
    BeyondWidth,
}

impl WalkError {
    /// The VT-d fault reason for a request of the given kind.
    pub fn reason(self, is_write: bool) -> FaultReason {
        match self {
            WalkError::NotPresent { .. } if is_write => FaultReason::WriteDenied,
            WalkError::NotPresent { .. } => FaultReason::ReadDenied,
            WalkError::Reserved { .. } => FaultReason::PagingReserved,
            WalkError::ReadFailed { .. } => FaultReason::PagingEntryRead,
            WalkError::BeyondWidth => FaultReason::AddressBeyondWidth,
        }
    }

    /// log2 of the aligned span around the faulting address that has no translation either
    /// (so range scans can skip it); `None` if nothing beyond the address may be skipped.
    pub fn skip_shift(self) -> Option<u32> {
        match self {
            WalkError::NotPresent { level }
            | WalkError::Reserved { level }
            | WalkError::ReadFailed { level } => Some(12 + 9 * (u32::from(level) - 1)),
            WalkError::BeyondWidth => None,
        }
    }
}

/// A leaf found by the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// Level of the leaf entry (1: 4 KiB, 2: 2 MiB, 3: 1 GiB).
    pub level: u8,
    /// First IOVA the leaf maps.
    pub iova: u64,
    /// Guest-physical address of `iova`.
    pub gpa: u64,
    /// Permission: R/W of every level ANDed.
    pub perm: Permissions,
    /// Permission of the non-leaf entries on the path.
    upper: Permissions,
    /// Address of the table holding the leaf.
    table: u64,
    /// Index of the leaf in that table.
    index: u64,
}

impl Leaf {
    /// log2 of the leaf's page size.
    pub fn shift(&self) -> u32 {
        12 + 9 * (u32::from(self.level) - 1)
    }

    /// The IOVAs the leaf maps.
    pub fn range(&self) -> IovaRange {
        let last = self.iova | ((1u64 << self.shift()) - 1);
        IovaRange::new(self.iova, last).unwrap_or(IovaRange::FULL)
    }
}

fn entry_perm(entry: u64) -> Permissions {
    permissions(entry & 1 != 0, entry & 2 != 0)
}

/// Checks `entry` at `level`; returns whether it is a leaf. Assumes it is present.
fn classify(entry: u64, level: u8, p: &WalkParams) -> Result<bool, WalkError> {
    let addr_reserved = !page_addr_mask(p.haw) & ((1u64 << 52) - 1) & !0xfff;
    let mut reserved = (1u64 << 11) | addr_reserved;
    if !p.tm_allowed {
        reserved |= 1 << 62;
    }
    let ps = entry & (1 << 7) != 0;
    let leaf = match level {
        1 => true,
        2 | 3 if ps => {
            let allowed = if level == 2 { p.large_2m } else { p.large_1g };
            if !allowed {
                return Err(WalkError::Reserved { level });
            }
            // The address bits below the page size must be zero.
            reserved |= ((1u64 << (12 + 9 * (u32::from(level) - 1))) - 1) & !0xfff;
            true
        }
        _ if ps => return Err(WalkError::Reserved { level }),
        _ => false,
    };
    if entry & reserved != 0 {
        return Err(WalkError::Reserved { level });
    }
    Ok(leaf)
}

fn read_entry<M: Bytes<GuestAddress> + ?Sized>(mem: &M, addr: u64) -> Option<u64> {
    mem.read_obj::<u64>(GuestAddress(addr))
        .ok()
        .map(u64::from_le)
}

/// Walks the tables for `iova`.
pub fn walk<M: Bytes<GuestAddress> + ?Sized>(
    mem: &M,
    p: &WalkParams,
    iova: u64,
) -> Result<Leaf, WalkError> {
    if !(3..=4).contains(&p.levels) {
        return Err(WalkError::BeyondWidth);
    }
    if iova >> p.input_width() != 0 {
        return Err(WalkError::BeyondWidth);
    }
    let mut table = p.root;
    let mut perm = Permissions::ReadWrite;
    for level in (1..=p.levels).rev() {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let index = (iova >> shift) & (ENTRIES - 1);
        let entry = table
            .checked_add(index * 8)
            .and_then(|addr| read_entry(mem, addr))
            .ok_or(WalkError::ReadFailed { level })?;
        if entry & 3 == 0 {
            return Err(WalkError::NotPresent { level });
        }
        let upper = perm;
        perm = intersect(perm, entry_perm(entry));
        if classify(entry, level, p)? {
            let size_mask = (1u64 << shift) - 1;
            return Ok(Leaf {
                level,
                iova: iova & !size_mask,
                gpa: entry & page_addr_mask(p.haw) & !size_mask,
                perm,
                upper,
                table,
                index,
            });
        }
        table = entry & page_addr_mask(p.haw);
    }
    // Unreachable: level 1 entries are always leaves. Report a walk failure, never panic.
    Err(WalkError::ReadFailed { level: 1 })
}

/// The largest range around `leaf` that translates linearly with the same permission, using
/// the leaf's contiguous neighbours in the same table. Returns the range and its GPA.
pub fn extent<M: Bytes<GuestAddress> + ?Sized>(
    mem: &M,
    p: &WalkParams,
    leaf: &Leaf,
) -> (IovaRange, u64) {
    let mut table = [0u8; 4096];
    if mem
        .read_slice(&mut table, GuestAddress(leaf.table))
        .is_err()
    {
        return (leaf.range(), leaf.gpa);
    }
    let entry_at = |i: u64| -> u64 {
        let off = (i * 8) as usize;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&table[off..off + 8]);
        u64::from_le_bytes(raw)
    };
    let shift = leaf.shift();
    let continues = |i: u64| -> bool {
        let entry = entry_at(i);
        if entry & 3 == 0 || !matches!(classify(entry, leaf.level, p), Ok(true)) {
            return false;
        }
        if intersect(leaf.upper, entry_perm(entry)) != leaf.perm {
            return false;
        }
        let gpa = entry & page_addr_mask(p.haw) & !((1u64 << shift) - 1);
        let expected = if i >= leaf.index {
            leaf.gpa.checked_add((i - leaf.index) << shift)
        } else {
            leaf.gpa.checked_sub((leaf.index - i) << shift)
        };
        expected == Some(gpa)
    };
    let mut lo = leaf.index;
    while lo > 0 && continues(lo - 1) {
        lo -= 1;
    }
    let mut hi = leaf.index;
    while hi + 1 < ENTRIES && continues(hi + 1) {
        hi += 1;
    }
    let start = leaf.iova - ((leaf.index - lo) << shift);
    let end = leaf.iova + ((hi - leaf.index + 1) << shift) - 1;
    let gpa = leaf.gpa - ((leaf.index - lo) << shift);
    (IovaRange::new(start, end).unwrap_or(leaf.range()), gpa)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vtd::testutil::{test_mem, Builder, PTE_R, PTE_RW};

    fn params(root: u64, levels: u8) -> WalkParams {
        WalkParams {
            root,
            levels,
            haw: 48,
            large_2m: true,
            large_1g: true,
            tm_allowed: false,
        }
    }

    #[test]
    fn four_level_4k_translation() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        b.map(root, 4, 0x1234_5000, 0x7_8000, 1, PTE_RW);
        let leaf = walk(&mem, &params(root, 4), 0x1234_5678).unwrap();
        assert_eq!(
            (leaf.level, leaf.iova, leaf.gpa),
            (1, 0x1234_5000, 0x7_8000)
        );
        assert_eq!(leaf.perm, Permissions::ReadWrite);
    }

    #[test]
    fn three_level_walk_uses_39_bit_input() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        b.map(root, 3, 0x40_0000_0000, 0x9000, 1, PTE_R);
        let leaf = walk(&mem, &params(root, 3), 0x40_0000_0010).unwrap();
        assert_eq!(leaf.gpa, 0x9000);
        assert_eq!(leaf.perm, Permissions::Read);
        assert_eq!(
            walk(&mem, &params(root, 3), 1 << 39),
            Err(WalkError::BeyondWidth)
        );
        assert_eq!(
            walk(&mem, &params(root, 4), 1 << 48),
            Err(WalkError::BeyondWidth)
        );
    }

    #[test]
    fn large_pages_2m_and_1g() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        b.map(root, 4, 0x4000_0000, 0x80_0000_0000, 3, PTE_RW);
        b.map(root, 4, 0x20_0000, 0x60_0000, 2, PTE_RW);
        let big = walk(&mem, &params(root, 4), 0x4123_4567).unwrap();
        assert_eq!((big.level, big.gpa), (3, 0x80_0000_0000));
        assert_eq!(
            big.range(),
            IovaRange::new(0x4000_0000, 0x7fff_ffff).unwrap()
        );
        let mid = walk(&mem, &params(root, 4), 0x2f_ffff).unwrap();
        assert_eq!((mid.level, mid.gpa), (2, 0x60_0000));
    }

    #[test]
    fn large_page_without_sllps_or_misaligned_is_reserved() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        b.map(root, 4, 0x20_0000, 0x60_0000, 2, PTE_RW);
        let no_large = WalkParams {
            large_2m: false,
            ..params(root, 4)
        };
        assert_eq!(
            walk(&mem, &no_large, 0x20_0000),
            Err(WalkError::Reserved { level: 2 })
        );
        b.map(root, 4, 0x40_0000, 0x61_1000, 2, PTE_RW);
        assert_eq!(
            walk(&mem, &params(root, 4), 0x40_0000),
            Err(WalkError::Reserved { level: 2 })
        );
        // PS in a level-4 entry is always reserved.
        let root2 = b.alloc();
        b.write_u64(root2, PTE_RW | 0x80);
        assert_eq!(
            walk(&mem, &params(root2, 4), 0),
            Err(WalkError::Reserved { level: 4 })
        );
    }

    #[test]
    fn not_present_and_permission_anded_over_levels() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        assert_eq!(
            walk(&mem, &params(root, 4), 0x1000),
            Err(WalkError::NotPresent { level: 4 })
        );
        b.map(root, 4, 0x1000, 0x5000, 1, PTE_RW);
        // Make the level-4 entry read-only: the leaf's W is masked.
        let l4 = b.read_u64(root);
        b.write_u64(root, l4 & !2);
        assert_eq!(
            walk(&mem, &params(root, 4), 0x1000).unwrap().perm,
            Permissions::Read
        );
        assert_eq!(
            walk(&mem, &params(root, 4), 0x2000),
            Err(WalkError::NotPresent { level: 1 })
        );
    }

    #[test]
    fn reserved_bits_in_entries_fault() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        for bad in [1u64 << 11, 1 << 50, 1 << 62] {
            let root = b.alloc();
            b.map(root, 4, 0, 0x5000 | bad, 1, PTE_RW);
            assert_eq!(
                walk(&mem, &params(root, 4), 0),
                Err(WalkError::Reserved { level: 1 }),
                "{bad:#x}"
            );
        }
        // TM is fine with device-TLB support; ignored bits 52..61 and 63 never fault.
        let root = b.alloc();
        b.map(root, 4, 0, 0x5000 | 1 << 62 | 1 << 55 | 1 << 63, 1, PTE_RW);
        let tm = WalkParams {
            tm_allowed: true,
            ..params(root, 4)
        };
        assert_eq!(walk(&mem, &tm, 0).unwrap().gpa, 0x5000);
    }

    #[test]
    fn self_referencing_table_terminates_after_levels_reads() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        // Entry 0 points back at its own table at every level: a loop.
        b.write_u64(root, root | PTE_RW);
        let leaf = walk(&mem, &params(root, 4), 0).unwrap();
        assert_eq!((leaf.level, leaf.gpa), (1, root));
    }

    #[test]
    fn pointer_outside_memory_is_read_failure() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        b.write_u64(root, (1 << 40) | PTE_RW);
        assert_eq!(
            walk(&mem, &params(root, 4), 0),
            Err(WalkError::ReadFailed { level: 3 })
        );
        assert_eq!(
            walk(&mem, &params(1 << 45, 4), 0),
            Err(WalkError::ReadFailed { level: 4 })
        );
    }

    #[test]
    fn extent_merges_contiguous_neighbours_with_same_permission() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        for i in 0..4u64 {
            b.map(
                root,
                4,
                0x10_0000 + i * 0x1000,
                0x80_0000 + i * 0x1000,
                1,
                PTE_RW,
            );
        }
        // A discontiguous GPA and a read-only page bound the extent.
        b.map(root, 4, 0x10_4000, 0x90_0000, 1, PTE_RW);
        b.map(root, 4, 0xf_f000, 0x7f_f000, 1, PTE_R);
        let p = params(root, 4);
        let leaf = walk(&mem, &p, 0x10_2000).unwrap();
        let (range, gpa) = extent(&mem, &p, &leaf);
        assert_eq!(range, IovaRange::new(0x10_0000, 0x10_3fff).unwrap());
        assert_eq!(gpa, 0x80_0000);
    }

    #[test]
    fn extent_stops_at_table_boundary() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        b.map(root, 4, 0x1f_f000, 0x1f_f000, 1, PTE_RW);
        b.map(root, 4, 0x20_0000, 0x20_0000, 1, PTE_RW);
        let p = params(root, 4);
        let leaf = walk(&mem, &p, 0x1f_f000).unwrap();
        assert_eq!(
            extent(&mem, &p, &leaf).0,
            IovaRange::new(0x1f_f000, 0x1f_ffff).unwrap()
        );
    }

    #[test]
    fn error_reasons_and_skip_spans() {
        assert_eq!(
            WalkError::NotPresent { level: 1 }.reason(true),
            FaultReason::WriteDenied
        );
        assert_eq!(
            WalkError::NotPresent { level: 1 }.reason(false),
            FaultReason::ReadDenied
        );
        assert_eq!(WalkError::Reserved { level: 2 }.skip_shift(), Some(21));
        assert_eq!(WalkError::NotPresent { level: 4 }.skip_shift(), Some(39));
        assert_eq!(WalkError::BeyondWidth.skip_shift(), None);
    }
}
