//! Legacy-mode root and context entries: reading them from guest memory, decoding, and the
//! reserved-bit checks that turn a bad guest entry into a fault instead of a surprise.

use vm_memory::{Bytes, GuestAddress};

use super::fault::FaultReason;
use super::regs::page_addr_mask;

/// Size of a root or context entry in bytes.
pub const ENTRY_SIZE: u64 = 16;

/// What the context decoder needs to know about the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableCaps {
    /// Host address width in bits: table pointers above it are reserved.
    pub haw: u8,
    /// CAP.SAGAW bits (bit 1: 3-level, bit 2: 4-level).
    pub sagaw: u8,
    /// ECAP.DT: translation type 01 (device TLB) allowed.
    pub device_tlb: bool,
    /// ECAP.PT: translation type 10 (pass-through) allowed.
    pub pass_through: bool,
}

/// A 128-bit root entry (indexed by bus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootEntry {
    /// Low qword: P, context-table pointer.
    pub lo: u64,
    /// High qword: reserved in legacy mode.
    pub hi: u64,
}

impl RootEntry {
    /// Whether the entry is present.
    pub fn present(&self) -> bool {
        self.lo & 1 != 0
    }

    /// The context-table address.
    pub fn context_table(&self) -> u64 {
        self.lo & !0xfff
    }

    /// Checks the reserved bits (11:1, pointer bits above the HAW, the whole high qword).
    pub fn check(&self, haw: u8) -> Result<(), FaultReason> {
        let reserved = 0xffe | !(page_addr_mask(haw) | 0xfff);
        if self.lo & reserved != 0 || self.hi != 0 {
            return Err(FaultReason::RootReserved);
        }
        Ok(())
    }
}

/// The context entry's translation type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TranslationType {
    /// 00: untranslated requests walk the second-level tables; ATS blocked.
    MultiLevel,
    /// 01: like multi-level, and ATS translation requests are allowed (device TLB).
    DeviceTlb,
    /// 10: untranslated requests pass through (IOVA = GPA).
    PassThrough,
}

/// A decoded, validated context entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Context {
    /// Domain id.
    pub did: u16,
    /// Translation type.
    pub tt: TranslationType,
    /// Page-table levels (3 or 4); meaningless for pass-through.
    pub levels: u8,
    /// Second-level page-table root.
    pub slptptr: u64,
    /// Fault processing disable.
    pub fpd: bool,
}

/// A raw 128-bit context entry (indexed by devfn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextEntry {
    /// Low qword: P, FPD, TT, SLPTPTR.
    pub lo: u64,
    /// High qword: AW, AVAIL, DID.
    pub hi: u64,
}

impl ContextEntry {
    /// Whether the entry is present.
    pub fn present(&self) -> bool {
        self.lo & 1 != 0
    }

    /// The FPD bit.
    pub fn fpd(&self) -> bool {
        self.lo & 2 != 0
    }

    /// Validates and decodes a present entry: reserved bits → 0xB, bad TT or AW → 0x3.
    pub fn decode(&self, caps: &TableCaps) -> Result<Context, FaultReason> {
        let lo_reserved = 0xff0 | !(page_addr_mask(caps.haw) | 0xfff);
        let hi_reserved = (1 << 7) | !0xff_ffff;
        if self.lo & lo_reserved != 0 || self.hi & hi_reserved != 0 {
            return Err(FaultReason::ContextReserved);
        }
        let tt = match (self.lo >> 2) & 3 {
            0 => TranslationType::MultiLevel,
            1 if caps.device_tlb => TranslationType::DeviceTlb,
            2 if caps.pass_through => TranslationType::PassThrough,
            _ => return Err(FaultReason::InvalidContext),
        };
        let aw = (self.hi & 7) as u8;
        let levels = aw + 2;
        let aw_supported = aw < 5 && caps.sagaw & (1 << aw) != 0 && (3..=4).contains(&levels);
        if tt != TranslationType::PassThrough && !aw_supported {
            return Err(FaultReason::InvalidContext);
        }
        Ok(Context {
            did: (self.hi >> 8) as u16,
            tt,
            levels,
            slptptr: self.lo & page_addr_mask(caps.haw),
            fpd: self.fpd(),
        })
    }
}

/// Why a context lookup failed, with the FPD bit when the context entry was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextFault {
    /// The fault reason.
    pub reason: FaultReason,
    /// FPD of the context entry (false when it was not reached).
    pub fpd: bool,
}

impl From<FaultReason> for ContextFault {
    fn from(reason: FaultReason) -> Self {
        Self { reason, fpd: false }
    }
}

fn read_entry<M: Bytes<GuestAddress> + ?Sized>(mem: &M, addr: u64) -> Option<(u64, u64)> {
    let mut buf = [0u8; 16];
    mem.read_slice(&mut buf, GuestAddress(addr)).ok()?;
    let (lo, hi) = buf.split_at(8);
    Some((
        u64::from_le_bytes(lo.try_into().ok()?),
        u64::from_le_bytes(hi.try_into().ok()?),
    ))
}

/// Reads the root entry of `bus` from the root table at `root_table`.
pub fn read_root<M: Bytes<GuestAddress> + ?Sized>(
    mem: &M,
    root_table: u64,
    bus: u8,
) -> Result<RootEntry, FaultReason> {
    let addr = root_table
        .checked_add(u64::from(bus) * ENTRY_SIZE)
        .ok_or(FaultReason::RootTableInvalid)?;
    let (lo, hi) = read_entry(mem, addr).ok_or(FaultReason::RootTableInvalid)?;
    Ok(RootEntry { lo, hi })
}

/// Reads the context entry of `devfn` from the context table at `table`.
pub fn read_context<M: Bytes<GuestAddress> + ?Sized>(
    mem: &M,
    table: u64,
    devfn: u8,
) -> Result<ContextEntry, FaultReason> {
    let addr = table
        .checked_add(u64::from(devfn) * ENTRY_SIZE)
        .ok_or(FaultReason::ContextTableInvalid)?;
    let (lo, hi) = read_entry(mem, addr).ok_or(FaultReason::ContextTableInvalid)?;
    Ok(ContextEntry { lo, hi })
}

/// Root table → context entry for source id `sid`, fully validated.
pub fn lookup_context<M: Bytes<GuestAddress> + ?Sized>(
    mem: &M,
    root_table: u64,
    sid: u16,
    caps: &TableCaps,
) -> Result<Context, ContextFault> {
    let root = read_root(mem, root_table, (sid >> 8) as u8)?;
    if !root.present() {
        return Err(FaultReason::RootNotPresent.into());
    }
    root.check(caps.haw)?;
    let entry = read_context(mem, root.context_table(), sid as u8)?;
    if !entry.present() {
        return Err(FaultReason::ContextNotPresent.into());
    }
    entry.decode(caps).map_err(|reason| ContextFault {
        reason,
        fpd: entry.fpd(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vtd::testutil::{ctx_hi, ctx_lo, test_mem, Builder};

    fn caps() -> TableCaps {
        TableCaps {
            haw: 48,
            sagaw: 0b110,
            device_tlb: false,
            pass_through: true,
        }
    }

    #[test]
    fn valid_context_decodes_did_levels_and_pointer() {
        let e = ContextEntry {
            lo: 0x12_3000 | 1,
            hi: 2 | (0x42 << 8),
        };
        let c = e.decode(&caps()).unwrap();
        assert_eq!(c.did, 0x42);
        assert_eq!(c.levels, 4);
        assert_eq!(c.slptptr, 0x12_3000);
        assert_eq!(c.tt, TranslationType::MultiLevel);
        assert!(!c.fpd);
    }

    #[test]
    fn context_reserved_bits_fault_0xb() {
        for (lo, hi) in [
            (1 | 0x10, 2),
            (1, 2 | 0x80),
            (1, 2 | (1 << 40)),
            (1 | 1 << 50, 2),
        ] {
            let e = ContextEntry { lo, hi };
            assert_eq!(
                e.decode(&caps()),
                Err(FaultReason::ContextReserved),
                "{lo:#x} {hi:#x}"
            );
        }
    }

    #[test]
    fn avail_bits_are_ignored() {
        let e = ContextEntry {
            lo: 1,
            hi: 2 | (0xf << 3),
        };
        assert!(e.decode(&caps()).is_ok());
    }

    #[test]
    fn bad_translation_type_or_aw_is_invalid_context() {
        let tt = |t: u64, aw: u64| ContextEntry {
            lo: 1 | (t << 2),
            hi: aw,
        };
        assert_eq!(tt(3, 2).decode(&caps()), Err(FaultReason::InvalidContext));
        assert_eq!(tt(1, 2).decode(&caps()), Err(FaultReason::InvalidContext));
        assert_eq!(tt(0, 3).decode(&caps()), Err(FaultReason::InvalidContext));
        assert_eq!(tt(0, 0).decode(&caps()), Err(FaultReason::InvalidContext));
        let no_pt = TableCaps {
            pass_through: false,
            ..caps()
        };
        assert_eq!(tt(2, 2).decode(&no_pt), Err(FaultReason::InvalidContext));
        let dt = TableCaps {
            device_tlb: true,
            ..caps()
        };
        assert_eq!(tt(1, 2).decode(&dt).unwrap().tt, TranslationType::DeviceTlb);
        // 4-level context on a 39-bit unit is not in SAGAW.
        let narrow = TableCaps {
            haw: 39,
            sagaw: 0b010,
            ..caps()
        };
        assert_eq!(tt(0, 2).decode(&narrow), Err(FaultReason::InvalidContext));
        assert_eq!(tt(0, 1).decode(&narrow).unwrap().levels, 3);
    }

    #[test]
    fn pass_through_context_ignores_aw() {
        let e = ContextEntry {
            lo: 1 | (2 << 2),
            hi: 7 | (1 << 8),
        };
        let c = e.decode(&caps()).unwrap();
        assert_eq!((c.tt, c.did), (TranslationType::PassThrough, 1));
    }

    #[test]
    fn lookup_reports_root_and_context_not_present_and_reserved() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        assert_eq!(
            lookup_context(&mem, root, 0x0008, &caps())
                .unwrap_err()
                .reason,
            FaultReason::RootNotPresent
        );
        let ctx_table = b.alloc();
        b.write_root(root, 0, ctx_table | 1, 0);
        assert_eq!(
            lookup_context(&mem, root, 0x0008, &caps())
                .unwrap_err()
                .reason,
            FaultReason::ContextNotPresent
        );
        b.write_context(ctx_table, 8, ctx_lo(0x5000, 0) | 0x2 | 0x10, ctx_hi(2, 3));
        let err = lookup_context(&mem, root, 0x0008, &caps()).unwrap_err();
        assert_eq!((err.reason, err.fpd), (FaultReason::ContextReserved, true));
        b.write_root(root, 0, ctx_table | 1 | 0x100, 0);
        assert_eq!(
            lookup_context(&mem, root, 0x0008, &caps())
                .unwrap_err()
                .reason,
            FaultReason::RootReserved
        );
        b.write_root(root, 0, ctx_table | 1, 0);
        b.write_context(ctx_table, 8, ctx_lo(0x5000, 0), ctx_hi(2, 3));
        assert_eq!(lookup_context(&mem, root, 0x0008, &caps()).unwrap().did, 3);
    }

    #[test]
    fn unreadable_root_or_context_table_faults_8_and_9() {
        let mem = test_mem();
        let mut b = Builder::new(&mem);
        let far = 1u64 << 40;
        assert_eq!(
            lookup_context(&mem, far, 0, &caps()).unwrap_err().reason,
            FaultReason::RootTableInvalid
        );
        let root = b.alloc();
        b.write_root(root, 0, far | 1, 0);
        assert_eq!(
            lookup_context(&mem, root, 0, &caps()).unwrap_err().reason,
            FaultReason::ContextTableInvalid
        );
        assert_eq!(
            read_root(&mem, u64::MAX - 8, 0xff),
            Err(FaultReason::RootTableInvalid)
        );
    }
}
