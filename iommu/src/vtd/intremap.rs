//! Interrupt remapping: remappable-format MSI decoding, interrupt remapping table entries
//! (IRTEs) and the translation of an interrupt request into a compatibility-format MSI.
//!
//! An interrupt request is an MSI write (address, data) from a source id. With IRE off it
//! passes unchanged. With IRE on:
//!
//! * the address must be `0xFEEx_xxxx` with a zero high dword, else fault 0x20;
//! * compatibility format (address bit 4 = 0) passes only if CFIS is set, else fault 0x25;
//! * remappable format: handle = address bits 19:5 | bit 2 << 15; with SHV (bit 3) the index is
//!   handle + `data[15:0]` and `data[31:16]` must be 0 (else 0x20); without SHV the data is ignored
//!   (an IOAPIC puts the pin there);
//! * index ≥ table size → 0x21; unreadable entry → 0x23; P = 0 → 0x22; reserved bits, posted
//!   mode (no CAP.PI), reserved delivery modes, SVT = 11 or, in xAPIC mode (EIME = 0),
//!   destination bits outside 47:40 → 0x24; a failed source-id check → 0x26;
//! * the IRTE becomes a compatibility MSI: address `0xFEE0_0000 | dest[7:0] << 12 | RH << 3 |
//!   DM << 2` (plus the request's address bits 1:0, and for x2APIC destinations above 255 the
//!   upper 24 destination bits in address bits 63:40, as KVM's x2APIC API reads them), data
//!   `vector | DLM << 8 | 1 << 14 | TM << 15`.
//!
//! Faults 0x22, 0x24 and 0x26 are qualified: the IRTE's FPD suppresses their recording. Fault
//! records carry the interrupt index in FI bits 63:48 and the requester's source id. The model
//! caches no IRTE: each request reads the table, so an interrupt-entry-cache invalidation only
//! matters to consumers that cache translations themselves (KVM routes).

use vm_memory::{Bytes, GuestAddress};

use super::fault::{FaultInfo, FaultReason, MsiMessage};
use super::{InterruptRemapping, Vtd, VtdAction};

/// Size of one IRTE in bytes.
pub const IRTE_SIZE: u64 = 16;

/// MSI address bits 31:20 of every x86 interrupt message.
const MSI_ADDR_HEAD: u64 = 0xFEE;
/// Address bit 4: remappable format.
const ADDR_REMAPPABLE: u64 = 1 << 4;
/// Address bit 3: subhandle valid.
const ADDR_SHV: u64 = 1 << 3;
/// Address bit 2: handle[15].
const ADDR_HANDLE_15: u64 = 1 << 2;
/// Data bits that must be 0 when SHV is set.
const DATA_SHV_RESERVED: u32 = 0xFFFF_0000;

/// IRTE low qword: reserved bits 14:12 and 31:24; bit 15 (IM, posted) needs CAP.PI.
const IRTE_LO_RESERVED: u64 = 0x7000 | 0xFF00_0000;
const IRTE_IM: u64 = 1 << 15;
/// IRTE low qword in xAPIC mode: destination bits 39:32 and 63:48 are reserved.
const IRTE_LO_XAPIC_RESERVED: u64 = 0xFFFF_00FF_0000_0000;
/// IRTE high qword: bits 127:84 are reserved.
const IRTE_HI_RESERVED: u64 = !0xF_FFFF;

/// How an MSI address asks to be interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptFormat {
    /// Compatibility format: destination in the address, vector in the data.
    Compatibility,
    /// Remappable format: an IRTE handle, plus the data's subhandle if `shv`.
    Remappable {
        /// `handle[15:0]`.
        handle: u16,
        /// Subhandle valid: the index is `handle + data[15:0]`.
        shv: bool,
    },
}

/// Decodes an MSI address (64-bit, high dword included). Not an interrupt address → 0x20.
pub fn decode_msi_address(addr: u64) -> Result<InterruptFormat, FaultReason> {
    if addr >> 20 != MSI_ADDR_HEAD {
        return Err(FaultReason::IrRequestReserved);
    }
    if addr & ADDR_REMAPPABLE == 0 {
        return Ok(InterruptFormat::Compatibility);
    }
    let low = ((addr >> 5) & 0x7FFF) as u16;
    let high = u16::from(addr & ADDR_HANDLE_15 != 0) << 15;
    Ok(InterruptFormat::Remappable {
        handle: low | high,
        shv: addr & ADDR_SHV != 0,
    })
}

/// The IRTE index a remappable request names (up to 0x1FFFE with a subhandle).
pub fn interrupt_index(handle: u16, shv: bool, data: u32) -> Result<u32, FaultReason> {
    if !shv {
        return Ok(u32::from(handle));
    }
    if data & DATA_SHV_RESERVED != 0 {
        return Err(FaultReason::IrRequestReserved);
    }
    Ok(u32::from(handle) + (data & 0xFFFF))
}

/// Source-id validation type of an IRTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceValidation {
    /// SVT = 00: no check.
    None,
    /// SVT = 01: requester id equals SID, ignoring the bits SQ masks.
    RequesterId {
        /// Expected source id.
        sid: u16,
        /// SQ: 0 compares all bits, 1 ignores bit 2, 2 ignores bits 2:1, 3 ignores bits 2:0.
        sq: u8,
    },
    /// SVT = 10: the requester's bus lies in `first..=last`.
    BusRange {
        /// `SID[15:8]`.
        first: u8,
        /// `SID[7:0]`.
        last: u8,
    },
}

impl SourceValidation {
    /// Whether requester `sid` passes.
    pub fn allows(self, sid: u16) -> bool {
        match self {
            SourceValidation::None => true,
            SourceValidation::RequesterId { sid: expected, sq } => {
                let mask = match sq & 3 {
                    0 => 0xFFFF,
                    1 => 0xFFFB,
                    2 => 0xFFF9,
                    _ => 0xFFF8,
                };
                sid & mask == expected & mask
            }
            SourceValidation::BusRange { first, last } => {
                let bus = (sid >> 8) as u8;
                (first..=last).contains(&bus)
            }
        }
    }
}

/// A decoded, present, remapped-mode IRTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Irte {
    /// FPD: do not record qualified faults.
    pub fpd: bool,
    /// DM: logical destination mode.
    pub dest_logical: bool,
    /// RH: redirection hint.
    pub redirection_hint: bool,
    /// TM: level triggered.
    pub level: bool,
    /// DLM: delivery mode (0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT).
    pub delivery_mode: u8,
    /// Vector.
    pub vector: u8,
    /// Destination: x2APIC id (EIME = 1) or 8-bit APIC id (EIME = 0).
    pub dest: u32,
    /// Source-id validation.
    pub source: SourceValidation,
}

/// Why an IRTE was not usable, with the FPD bit the entry carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrteError {
    /// 0x22 or 0x24.
    pub reason: FaultReason,
    /// The entry's FPD bit.
    pub fpd: bool,
}

impl Irte {
    /// Decodes the 128-bit entry `(lo, hi)`; `eime` selects the x2APIC destination format.
    pub fn decode(lo: u64, hi: u64, eime: bool) -> Result<Irte, IrteError> {
        let fpd = lo & 2 != 0;
        let fail = |reason| IrteError { reason, fpd };
        if lo & 1 == 0 {
            return Err(fail(FaultReason::IrEntryNotPresent));
        }
        let xapic_reserved = if eime { 0 } else { IRTE_LO_XAPIC_RESERVED };
        let delivery_mode = ((lo >> 5) & 7) as u8;
        let svt = (hi >> 18) & 3;
        if lo & (IRTE_LO_RESERVED | IRTE_IM | xapic_reserved) != 0
            || hi & IRTE_HI_RESERVED != 0
            || matches!(delivery_mode, 3 | 6)
            || svt == 3
        {
            return Err(fail(FaultReason::IrEntryReserved));
        }
        let sid = (hi & 0xFFFF) as u16;
        let source = match svt {
            0 => SourceValidation::None,
            1 => SourceValidation::RequesterId {
                sid,
                sq: ((hi >> 16) & 3) as u8,
            },
            _ => SourceValidation::BusRange {
                first: (sid >> 8) as u8,
                last: sid as u8,
            },
        };
        let dest = if eime {
            (lo >> 32) as u32
        } else {
            ((lo >> 40) & 0xFF) as u32
        };
        Ok(Irte {
            fpd,
            dest_logical: lo & (1 << 2) != 0,
            redirection_hint: lo & (1 << 3) != 0,
            level: lo & (1 << 4) != 0,
            delivery_mode,
            vector: (lo >> 16) as u8,
            dest,
            source,
        })
    }

    /// The compatibility-format MSI this entry delivers; `low_bits` are the request's address
    /// bits 1:0, which pass through.
    pub fn to_msi(&self, low_bits: u64) -> MsiMessage {
        let upper_dest = u64::from(self.dest & 0xFFFF_FF00) << 32;
        let addr = (MSI_ADDR_HEAD << 20)
            | (u64::from(self.dest & 0xFF) << 12)
            | (u64::from(self.redirection_hint) << 3)
            | (u64::from(self.dest_logical) << 2)
            | (low_bits & 3)
            | upper_dest;
        let data = u32::from(self.vector)
            | (u32::from(self.delivery_mode) << 8)
            | (1 << 14)
            | (u32::from(self.level) << 15);
        MsiMessage { addr, data }
    }
}

/// An interrupt-remapping fault: what to record (unless `fpd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrFault {
    /// Fault reason (0x20-0x26).
    pub reason: FaultReason,
    /// The interrupt index, for remappable requests that got that far.
    pub index: Option<u32>,
    /// A qualified fault whose IRTE set FPD: not recorded.
    pub fpd: bool,
}

impl IrFault {
    fn unqualified(reason: FaultReason, index: Option<u32>) -> Self {
        Self {
            reason,
            index,
            fpd: false,
        }
    }

    /// The fault record for requester `sid`: FI bits 63:48 hold the index; a write request.
    pub fn info(&self, sid: u16) -> FaultInfo {
        let index = u64::from(self.index.unwrap_or(0) & 0xFFFF);
        FaultInfo {
            sid,
            addr: index << 48,
            reason: self.reason,
            is_write: true,
            fpd: self.fpd,
        }
    }
}

impl<M: Bytes<GuestAddress> + Send + Sync> Vtd<M> {
    /// Remaps the interrupt request `msg` from requester `sid` (bus << 8 | devfn): the
    /// message to deliver, or the fault. Records nothing (see
    /// [`Vtd::remap_msi_and_record`]); route set-up uses this one.
    pub fn remap_msi(&self, sid: u16, msg: MsiMessage) -> Result<MsiMessage, IrFault> {
        match self.interrupt_remapping() {
            Some(ir) if self.config.interrupt_remapping && ir.enabled => {
                self.remap_enabled(&ir, sid, msg)
            }
            _ => Ok(msg),
        }
    }

    /// Like [`Vtd::remap_msi`] for an interrupt that really happened: records the fault
    /// (unless FPD) and returns the fault event to send, if any.
    pub fn remap_msi_and_record(
        &mut self,
        sid: u16,
        msg: MsiMessage,
    ) -> (Result<MsiMessage, IrFault>, Vec<VtdAction>) {
        match self.remap_msi(sid, msg) {
            Ok(m) => (Ok(m), Vec::new()),
            Err(f) => {
                let actions = self.record_fault(&f.info(sid));
                (Err(f), actions)
            }
        }
    }

    fn remap_enabled(
        &self,
        ir: &InterruptRemapping,
        sid: u16,
        msg: MsiMessage,
    ) -> Result<MsiMessage, IrFault> {
        let unqualified = |reason, index| IrFault::unqualified(reason, index);
        let format = decode_msi_address(msg.addr).map_err(|r| unqualified(r, None))?;
        let (handle, shv) = match format {
            InterruptFormat::Compatibility if ir.compat_allowed => return Ok(msg),
            InterruptFormat::Compatibility => {
                return Err(unqualified(FaultReason::IrCompatBlocked, None))
            }
            InterruptFormat::Remappable { handle, shv } => (handle, shv),
        };
        let index = interrupt_index(handle, shv, msg.data)
            .map_err(|r| unqualified(r, Some(u32::from(handle))))?;
        if index >= ir.entries {
            return Err(unqualified(FaultReason::IrIndexBeyondTable, Some(index)));
        }
        let (lo, hi) = self
            .read_irte(ir.base, index)
            .ok_or_else(|| unqualified(FaultReason::IrTableInvalid, Some(index)))?;
        let irte = Irte::decode(lo, hi, ir.eime).map_err(|e| IrFault {
            reason: e.reason,
            index: Some(index),
            fpd: e.fpd,
        })?;
        if !irte.source.allows(sid) {
            return Err(IrFault {
                reason: FaultReason::IrSourceInvalid,
                index: Some(index),
                fpd: irte.fpd,
            });
        }
        Ok(irte.to_msi(msg.addr))
    }

    fn read_irte(&self, base: u64, index: u32) -> Option<(u64, u64)> {
        let addr = base.checked_add(u64::from(index) * IRTE_SIZE)?;
        let mut buf = [0u8; IRTE_SIZE as usize];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).ok()?;
        let (lo, hi) = buf.split_at(8);
        Some((
            u64::from_le_bytes(lo.try_into().ok()?),
            u64::from_le_bytes(hi.try_into().ok()?),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vtd::regs::{FEADDR, FECTL, FEDATA, FRCD_BASE, FSTS, FSTS_PPF, GCMD, IRTA};
    use crate::vtd::regs::{GCMD_CFI, GCMD_IRE, GCMD_SIRTP};
    use crate::vtd::testutil::{r32, r64, vtd_with, w32, w64, Builder, Mem};
    use crate::vtd::VtdConfig;

    const SID: u16 = 0x0010; // 00:02.0
    const IOAPIC_SID: u16 = 0xFF00;

    /// Golden IRTE, x2APIC mode: present, fixed, physical, edge, vector 0x41, dest 3,
    /// SVT=01 SQ=0 SID 00:02.0 (what Linux writes for an MSI-X vector).
    const X2_LO: u64 = 0x0000_0003_0041_0001;
    const X2_HI: u64 = 0x0004_0010;
    /// Golden IRTE, xAPIC mode: present, lowest priority, logical, RH, level, vector 0x30,
    /// APIC id 0x0f in bits 47:40, SVT=01 SQ=3 SID ff:00.0.
    const XA_LO: u64 = 0x0000_0f00_0030_003d;
    const XA_HI: u64 = 0x0007_ff00;

    fn remappable(handle: u16, shv: bool) -> u64 {
        0xFEE0_0000
            | (u64::from(handle & 0x7FFF) << 5)
            | ADDR_REMAPPABLE
            | (u64::from(shv) << 3)
            | (u64::from(handle >> 15) << 2)
    }

    struct Ir {
        vtd: Vtd<Mem>,
        b: Builder,
        table: u64,
    }

    /// A unit with IR, a 256-entry table (S = 7), SIRTP and IRE done.
    fn ir(eime: bool, gcmd_extra: u32) -> Ir {
        let (mut vtd, mem) = vtd_with(VtdConfig {
            interrupt_remapping: true,
            ..VtdConfig::default()
        });
        let mut b = Builder::new(&mem);
        let table = b.alloc();
        b.alloc();
        b.alloc();
        b.alloc();
        w64(&mut vtd, IRTA, table | (u64::from(eime) << 11) | 7);
        w32(&mut vtd, GCMD, GCMD_SIRTP);
        w32(&mut vtd, GCMD, GCMD_IRE | gcmd_extra);
        Ir { vtd, b, table }
    }

    impl Ir {
        fn set(&self, index: u64, lo: u64, hi: u64) {
            self.b.write_u64(self.table + index * 16, lo);
            self.b.write_u64(self.table + index * 16 + 8, hi);
        }

        fn remap(&self, sid: u16, addr: u64, data: u32) -> Result<MsiMessage, IrFault> {
            self.vtd.remap_msi(sid, MsiMessage { addr, data })
        }

        fn reason(&self, sid: u16, addr: u64, data: u32) -> FaultReason {
            self.remap(sid, addr, data).unwrap_err().reason
        }
    }

    #[test]
    fn address_decoding_of_handle_and_subhandle() {
        assert_eq!(
            decode_msi_address(remappable(0x8123, true)),
            Ok(InterruptFormat::Remappable {
                handle: 0x8123,
                shv: true
            })
        );
        assert_eq!(
            decode_msi_address(0xFEE0_3000),
            Ok(InterruptFormat::Compatibility)
        );
        assert_eq!(
            decode_msi_address(0x1_FEE0_0010),
            Err(FaultReason::IrRequestReserved),
            "high dword set"
        );
        assert_eq!(
            decode_msi_address(0xFED0_0010),
            Err(FaultReason::IrRequestReserved)
        );
        assert_eq!(interrupt_index(0xFFFF, true, 0xFFFF), Ok(0x1FFFE));
        assert_eq!(interrupt_index(5, false, 0xdead_0021), Ok(5));
        assert_eq!(
            interrupt_index(5, true, 0x1_0000),
            Err(FaultReason::IrRequestReserved)
        );
    }

    #[test]
    fn golden_x2apic_irte_decodes_and_composes_the_msi() {
        let irte = Irte::decode(X2_LO, X2_HI, true).unwrap();
        assert_eq!(
            irte,
            Irte {
                fpd: false,
                dest_logical: false,
                redirection_hint: false,
                level: false,
                delivery_mode: 0,
                vector: 0x41,
                dest: 3,
                source: SourceValidation::RequesterId { sid: SID, sq: 0 },
            }
        );
        assert_eq!(
            irte.to_msi(0),
            MsiMessage {
                addr: 0xFEE0_3000,
                data: 0x4041
            }
        );
        // A 32-bit x2APIC id keeps its upper 24 bits in address bits 63:40.
        let wide = Irte::decode(0x0001_2345_0041_0001, 0, true).unwrap();
        assert_eq!(wide.to_msi(0).addr, 0x0001_2300_FEE4_5000);
    }

    #[test]
    fn golden_xapic_irte_decodes_and_composes_the_msi() {
        let irte = Irte::decode(XA_LO, XA_HI, false).unwrap();
        assert_eq!(irte.dest, 0x0f);
        assert_eq!(irte.delivery_mode, 1);
        assert!(irte.dest_logical && irte.redirection_hint && irte.level && !irte.fpd);
        assert_eq!(
            irte.source,
            SourceValidation::RequesterId {
                sid: IOAPIC_SID,
                sq: 3
            }
        );
        assert_eq!(
            irte.to_msi(3),
            MsiMessage {
                addr: 0xFEE0_F00F,
                data: 0xC130
            }
        );
        // The same entry read in x2APIC mode takes the whole dword as destination.
        assert_eq!(Irte::decode(XA_LO, XA_HI, true).unwrap().dest, 0x0f00);
    }

    #[test]
    fn irte_reserved_bits_and_not_present() {
        let reserved = |lo: u64, hi: u64, eime: bool| Irte::decode(lo, hi, eime).unwrap_err();
        let rsvd = FaultReason::IrEntryReserved;
        assert_eq!(reserved(X2_LO | 1 << 12, X2_HI, true).reason, rsvd);
        assert_eq!(reserved(X2_LO | 1 << 15, X2_HI, true).reason, rsvd, "IM");
        assert_eq!(reserved(X2_LO | 1 << 24, X2_HI, true).reason, rsvd);
        assert_eq!(reserved(X2_LO, X2_HI | 1 << 20, true).reason, rsvd);
        assert_eq!(reserved(X2_LO, 3 << 18, true).reason, rsvd, "SVT=11");
        assert_eq!(reserved(X2_LO | 3 << 5, X2_HI, true).reason, rsvd, "DLM 3");
        assert_eq!(reserved(X2_LO | 6 << 5, X2_HI, true).reason, rsvd, "DLM 6");
        assert_eq!(reserved(XA_LO | 1 << 32, XA_HI, false).reason, rsvd);
        assert_eq!(reserved(XA_LO | 1 << 48, XA_HI, false).reason, rsvd);
        assert!(Irte::decode(X2_LO | 1 << 48, X2_HI, true).is_ok());
        assert!(Irte::decode(X2_LO | 0xf00, X2_HI, true).is_ok(), "AVAIL");
        let np = reserved(X2_LO & !1 | 2, X2_HI, true);
        assert_eq!((np.reason, np.fpd), (FaultReason::IrEntryNotPresent, true));
    }

    #[test]
    fn source_validation_masks_and_bus_ranges() {
        let exact = SourceValidation::RequesterId { sid: 0x0010, sq: 0 };
        assert!(exact.allows(0x0010) && !exact.allows(0x0011) && !exact.allows(0x0014));
        let ign2 = SourceValidation::RequesterId { sid: 0x0010, sq: 1 };
        assert!(ign2.allows(0x0014) && !ign2.allows(0x0012));
        let ign21 = SourceValidation::RequesterId { sid: 0x0010, sq: 2 };
        assert!(ign21.allows(0x0016) && !ign21.allows(0x0011));
        let ign210 = SourceValidation::RequesterId { sid: 0x0010, sq: 3 };
        assert!(ign210.allows(0x0017) && !ign210.allows(0x0018));
        let buses = SourceValidation::BusRange { first: 2, last: 4 };
        assert!(buses.allows(0x0200) && buses.allows(0x04ff));
        assert!(!buses.allows(0x01ff) && !buses.allows(0x0500));
    }

    #[test]
    fn remappable_msi_goes_through_the_table() {
        let ir = ir(true, 0);
        ir.set(5, X2_LO, X2_HI);
        let out = ir.remap(SID, remappable(5, false), 0).unwrap();
        assert_eq!((out.addr, out.data), (0xFEE0_3000, 0x4041));
        // handle 4 + subhandle 1 names the same entry.
        let out = ir.remap(SID, remappable(4, true), 1).unwrap();
        assert_eq!(out.data, 0x4041);
    }

    #[test]
    fn remapping_faults_by_reason() {
        let ir = ir(true, 0);
        ir.set(5, X2_LO, X2_HI);
        ir.set(6, X2_LO | 1 << 13, X2_HI);
        let f = ir.remap(SID, remappable(300, false), 0).unwrap_err();
        assert_eq!(
            (f.reason, f.index),
            (FaultReason::IrIndexBeyondTable, Some(300))
        );
        assert_eq!(
            ir.reason(SID, remappable(7, false), 0),
            FaultReason::IrEntryNotPresent
        );
        assert_eq!(
            ir.reason(SID, remappable(6, false), 0),
            FaultReason::IrEntryReserved
        );
        assert_eq!(
            ir.reason(0x0018, remappable(5, false), 0),
            FaultReason::IrSourceInvalid
        );
        assert_eq!(
            ir.reason(SID, remappable(5, true), 0x1_0000),
            FaultReason::IrRequestReserved
        );
        assert_eq!(
            ir.reason(SID, 0xFEE0_1000, 0x30),
            FaultReason::IrCompatBlocked
        );
        assert_eq!(
            ir.reason(SID, 0xFEF0_0010, 0),
            FaultReason::IrRequestReserved
        );
    }

    #[test]
    fn unreadable_table_faults_with_0x23() {
        let (mut vtd, _) = vtd_with(VtdConfig {
            interrupt_remapping: true,
            ..VtdConfig::default()
        });
        // Beyond the 16 MiB of test memory, 65536 entries.
        w64(&mut vtd, IRTA, 0x4000_0000 | 1 << 11 | 0xf);
        w32(&mut vtd, GCMD, GCMD_SIRTP | GCMD_IRE);
        let msg = MsiMessage {
            addr: remappable(0xffff, false),
            data: 0,
        };
        let f = vtd.remap_msi(SID, msg).unwrap_err();
        assert_eq!(
            (f.reason, f.index),
            (FaultReason::IrTableInvalid, Some(0xffff))
        );
    }

    #[test]
    fn compatibility_format_passes_with_cfi_or_without_ire() {
        let ir_cfi = ir(true, GCMD_CFI);
        let msg = MsiMessage {
            addr: 0xFEE0_1000,
            data: 0x30,
        };
        assert_eq!(ir_cfi.vtd.remap_msi(SID, msg), Ok(msg));
        let (mut off, _) = vtd_with(VtdConfig {
            interrupt_remapping: true,
            ..VtdConfig::default()
        });
        let remap = MsiMessage {
            addr: remappable(5, false),
            data: 0,
        };
        assert_eq!(off.remap_msi(SID, remap), Ok(remap), "no table latched");
        w32(&mut off, GCMD, GCMD_SIRTP);
        assert_eq!(off.remap_msi(SID, remap), Ok(remap), "IRE off");
    }

    #[test]
    fn xapic_mode_uses_the_8_bit_destination() {
        let ir = ir(false, 0);
        ir.set(0, XA_LO, XA_HI);
        let out = ir
            .remap(IOAPIC_SID | 7, remappable(0, false), 0x11)
            .unwrap();
        assert_eq!((out.addr, out.data), (0xFEE0_F00C, 0xC130));
    }

    #[test]
    fn faults_are_recorded_with_index_and_honour_fpd() {
        let mut ir = ir(true, 0);
        w32(&mut ir.vtd, FEDATA, 0x55);
        w32(&mut ir.vtd, FEADDR, 0xFEE0_0000);
        w32(&mut ir.vtd, FECTL, 0);
        ir.set(9, 2, 0); // not present, FPD
        let msg = |h| MsiMessage {
            addr: remappable(h, false),
            data: 0,
        };
        let (res, actions) = ir.vtd.remap_msi_and_record(SID, msg(9));
        assert!(res.unwrap_err().fpd && actions.is_empty());
        assert_eq!(r32(&ir.vtd, FSTS) & FSTS_PPF, 0);
        let (res, actions) = ir.vtd.remap_msi_and_record(SID, msg(10));
        assert_eq!(res.unwrap_err().reason, FaultReason::IrEntryNotPresent);
        assert_eq!(
            actions,
            vec![VtdAction::FaultEvent(MsiMessage {
                addr: 0xFEE0_0000,
                data: 0x55
            })]
        );
        assert_eq!(r64(&ir.vtd, FRCD_BASE), 10 << 48, "FI holds the index");
        let hi = r64(&ir.vtd, FRCD_BASE + 8);
        assert_eq!((hi & 0xffff, (hi >> 32) & 0xff), (u64::from(SID), 0x22));
    }

    #[test]
    fn garbage_tables_never_panic() {
        let ir = ir(true, 0);
        let mut x: u64 = 0x243f_6a88_85a3_08d3;
        for i in 0..512u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ir.b.write_u64(ir.table + i * 8, x);
        }
        for handle in 0..=300u16 {
            for data in [0u32, 1, 0xffff, 0x1_0000] {
                let _ = ir.remap(SID, remappable(handle, handle % 2 == 0), data);
                let _ = ir.remap(SID, remappable(handle | 0x8000, true), data);
            }
        }
    }
}
