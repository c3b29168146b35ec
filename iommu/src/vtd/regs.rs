//! The VT-d register file at the DRHD base: offsets, bit fields, the CAP/ECAP values a
//! [`VtdConfig`] yields, and the raw register state with reset values and write masks.
//!
//! Side effects of writes (GCMD handshakes, invalidations, fault bookkeeping) live in
//! `mmio.rs`; this module only stores and masks.

use super::VtdConfig;

/// VER: version (32-bit, RO).
pub const VER: u64 = 0x00;
/// CAP: capabilities (64-bit, RO).
pub const CAP: u64 = 0x08;
/// ECAP: extended capabilities (64-bit, RO).
pub const ECAP: u64 = 0x10;
/// GCMD: global command (32-bit, WO, reads 0).
pub const GCMD: u64 = 0x18;
/// GSTS: global status (32-bit, RO).
pub const GSTS: u64 = 0x1c;
/// RTADDR: root table address (64-bit).
pub const RTADDR: u64 = 0x20;
/// CCMD: context command (64-bit).
pub const CCMD: u64 = 0x28;
/// FSTS: fault status (32-bit).
pub const FSTS: u64 = 0x34;
/// FECTL: fault event control (32-bit).
pub const FECTL: u64 = 0x38;
/// FEDATA: fault event data (32-bit).
pub const FEDATA: u64 = 0x3c;
/// FEADDR: fault event address (32-bit).
pub const FEADDR: u64 = 0x40;
/// FEUADDR: fault event upper address (32-bit).
pub const FEUADDR: u64 = 0x44;
/// AFLOG: advanced fault log (absent, reads 0).
pub const AFLOG: u64 = 0x58;
/// IQH: invalidation queue head (64-bit, RO).
pub const IQH: u64 = 0x80;
/// IQT: invalidation queue tail (64-bit).
pub const IQT: u64 = 0x88;
/// IQA: invalidation queue address (64-bit).
pub const IQA: u64 = 0x90;
/// ICS: invalidation completion status (32-bit).
pub const ICS: u64 = 0x9c;
/// IECTL: invalidation event control (32-bit).
pub const IECTL: u64 = 0xa0;
/// IEDATA: invalidation event data (32-bit).
pub const IEDATA: u64 = 0xa4;
/// IEADDR: invalidation event address (32-bit).
pub const IEADDR: u64 = 0xa8;
/// IEUADDR: invalidation event upper address (32-bit).
pub const IEUADDR: u64 = 0xac;
/// IQER: invalidation queue error record (64-bit, RO, always 0 = no detail).
pub const IQER: u64 = 0xb0;
/// IRTA: interrupt remapping table address (64-bit).
pub const IRTA: u64 = 0xb8;
/// IVA: invalidate address for register-based PSI (64-bit), at ECAP.IRO × 16.
pub const IVA: u64 = 0xf0;
/// IOTLB: register-based IOTLB invalidation (64-bit), IVA + 8.
pub const IOTLB: u64 = 0xf8;
/// First fault-recording register, at CAP.FRO × 16 (128 bits per record).
pub const FRCD_BASE: u64 = 0x220;
/// Size of the register block (DRHD size field 0 = one 4 KiB page).
pub const REG_SIZE: u64 = 0x1000;
/// Largest number of fault-recording registers the block has room for.
pub const MAX_FAULT_RECORDS: usize = 64;

/// Version 1.0.
pub const VERSION: u32 = 0x10;
/// Maximum address-mask value for page-selective invalidations.
pub const MAMV: u8 = 18;
/// CAP.ND: 2^(4 + 2·6) = 65536 domains.
pub const ND: u64 = 6;

/// GCMD/GSTS: translation enable.
pub const GCMD_TE: u32 = 1 << 31;
/// GCMD/GSTS: set root table pointer.
pub const GCMD_SRTP: u32 = 1 << 30;
/// GCMD/GSTS: write-buffer flush (unsupported: CAP.RWBF = 0).
pub const GCMD_WBF: u32 = 1 << 27;
/// GCMD/GSTS: queued invalidation enable.
pub const GCMD_QIE: u32 = 1 << 26;
/// GCMD/GSTS: interrupt remapping enable.
pub const GCMD_IRE: u32 = 1 << 25;
/// GCMD/GSTS: set interrupt remap table pointer.
pub const GCMD_SIRTP: u32 = 1 << 24;
/// GCMD/GSTS: compatibility format interrupts.
pub const GCMD_CFI: u32 = 1 << 23;

/// FSTS: primary fault overflow (RW1C).
pub const FSTS_PFO: u32 = 1 << 0;
/// FSTS: primary pending fault (RO, OR of the records' F bits).
pub const FSTS_PPF: u32 = 1 << 1;
/// FSTS: invalidation queue error (RW1C).
pub const FSTS_IQE: u32 = 1 << 4;
/// FSTS: invalidation completion error (RW1C).
pub const FSTS_ICE: u32 = 1 << 5;
/// FSTS: invalidation time-out error (RW1C).
pub const FSTS_ITE: u32 = 1 << 6;
/// FSTS: fault record index shift (bits 15:8).
pub const FSTS_FRI_SHIFT: u32 = 8;
/// FECTL/IECTL: interrupt mask.
pub const CTL_IM: u32 = 1 << 31;
/// FECTL/IECTL: interrupt pending.
pub const CTL_IP: u32 = 1 << 30;
/// ICS: invalidation wait descriptor complete.
pub const ICS_IWC: u32 = 1;

/// CCMD: invalidate context cache (start / busy).
pub const CCMD_ICC: u64 = 1 << 63;
/// CCMD: request granularity shift (62:61).
pub const CCMD_CIRG_SHIFT: u32 = 61;
/// CCMD: actual granularity shift (60:59).
pub const CCMD_CAIG_SHIFT: u32 = 59;
/// IOTLB register: invalidate IOTLB (start / busy).
pub const IOTLB_IVT: u64 = 1 << 63;
/// IOTLB register: request granularity shift (61:60).
pub const IOTLB_IIRG_SHIFT: u32 = 60;
/// IOTLB register: actual granularity shift (58:57).
pub const IOTLB_IAIG_SHIFT: u32 = 57;

/// CAP.FRO (fault-recording offset ÷ 16).
const FRO: u64 = FRCD_BASE / 16;
/// ECAP.IRO (IOTLB register offset ÷ 16).
const IRO: u64 = IVA / 16;

/// CAP.SAGAW bits for an address width: 39 → 3-level only, 48 → 3- and 4-level.
pub fn sagaw(address_width: u8) -> u8 {
    if address_width >= 48 {
        0b110
    } else {
        0b010
    }
}

/// The CAP register value for `config`.
pub fn cap(config: &VtdConfig) -> u64 {
    let nfr = config.fault_records.clamp(1, MAX_FAULT_RECORDS) as u64 - 1;
    let sllps: u64 = if config.large_pages { 0b11 } else { 0 };
    ND | (u64::from(config.caching_mode) << 7)
        | (u64::from(sagaw(config.address_width)) << 8)
        | ((u64::from(config.address_width) - 1) << 16)
        | (FRO << 24)
        | (sllps << 34)
        | (1 << 39) // PSI
        | (nfr << 40)
        | (u64::from(MAMV) << 48)
}

/// The ECAP register value for `config`: C and QI always, DT/IR(+EIM, MHMV)/PT by option.
pub fn ecap(config: &VtdConfig) -> u64 {
    let ir = if config.interrupt_remapping {
        (1 << 3) | (1 << 4) | (0xf << 20)
    } else {
        0
    };
    1 | (1 << 1)
        | (u64::from(config.device_iotlb) << 2)
        | ir
        | (u64::from(config.pass_through) << 6)
        | (IRO << 8)
}

/// A mask of the address bits `[12, width)`.
pub fn page_addr_mask(width: u8) -> u64 {
    let top = if width >= 64 {
        u64::MAX
    } else {
        (1u64 << width) - 1
    };
    top & !0xfff
}

/// Merges a partial write: the bits of `value` selected by `mask` replace those of `old`.
pub fn merge(old: u64, value: u64, mask: u64) -> u64 {
    (old & !mask) | (value & mask)
}

/// The raw register state (everything except the fault records and queue bookkeeping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RegFile {
    pub(crate) cap: u64,
    pub(crate) ecap: u64,
    pub(crate) gsts: u32,
    pub(crate) rtaddr: u64,
    pub(crate) ccmd: u64,
    /// PFO, IQE, ICE, ITE and FRI; PPF is computed from the records.
    pub(crate) fsts: u32,
    pub(crate) fectl: u32,
    pub(crate) fedata: u32,
    pub(crate) feaddr: u32,
    pub(crate) feuaddr: u32,
    pub(crate) iqh: u64,
    pub(crate) iqt: u64,
    pub(crate) iqa: u64,
    pub(crate) ics: u32,
    pub(crate) iectl: u32,
    pub(crate) iedata: u32,
    pub(crate) ieaddr: u32,
    pub(crate) ieuaddr: u32,
    pub(crate) irta: u64,
    pub(crate) iva: u64,
    pub(crate) iotlb: u64,
    /// Host address width in bits (39 or 48), bounding table pointers.
    pub(crate) haw: u8,
    pub(crate) ir: bool,
    pub(crate) eim: bool,
}

impl RegFile {
    /// Reset values: everything 0 except FECTL.IM and IECTL.IM.
    pub(crate) fn new(config: &VtdConfig) -> Self {
        Self {
            cap: cap(config),
            ecap: ecap(config),
            gsts: 0,
            rtaddr: 0,
            ccmd: 0,
            fsts: 0,
            fectl: CTL_IM,
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            iqh: 0,
            iqt: 0,
            iqa: 0,
            ics: 0,
            iectl: CTL_IM,
            iedata: 0,
            ieaddr: 0,
            ieuaddr: 0,
            irta: 0,
            iva: 0,
            iotlb: 0,
            haw: config.address_width,
            ir: config.interrupt_remapping,
            eim: config.interrupt_remapping,
        }
    }

    /// Writable bits of RTADDR: the 4 KiB aligned root table address within the HAW
    /// (TTM is reserved because scalable mode is not offered).
    pub(crate) fn rtaddr_mask(&self) -> u64 {
        page_addr_mask(self.haw)
    }

    /// Writable bits of IQA: base within the HAW and QS (DW is reserved: 128-bit only).
    pub(crate) fn iqa_mask(&self) -> u64 {
        page_addr_mask(self.haw) | 0x7
    }

    /// Writable bits of IRTA (none without interrupt remapping).
    pub(crate) fn irta_mask(&self) -> u64 {
        if !self.ir {
            return 0;
        }
        page_addr_mask(self.haw) | (u64::from(self.eim) << 11) | 0xf
    }

    /// Whether `offset` (8-byte aligned) names a 64-bit register.
    pub(crate) fn is_reg64(&self, offset: u64, fault_records: usize) -> bool {
        matches!(
            offset,
            CAP | ECAP | RTADDR | CCMD | AFLOG | IQH | IQT | IQA | IQER | IRTA | IVA | IOTLB
        ) || frcd_slot(offset, fault_records).is_some()
    }

    /// Reads a 32-bit register (not a half of a 64-bit one). Unknown offsets read 0.
    pub(crate) fn read32(&self, offset: u64) -> u32 {
        match offset {
            VER => VERSION,
            GSTS => self.gsts,
            FECTL => self.fectl,
            FEDATA => self.fedata,
            FEADDR => self.feaddr,
            FEUADDR => self.feuaddr,
            ICS => self.ics,
            IECTL => self.iectl,
            IEDATA => self.iedata,
            IEADDR => self.ieaddr,
            IEUADDR => self.ieuaddr,
            _ => 0, // GCMD is write-only; FSTS is composed by the caller.
        }
    }

    /// Reads a 64-bit register other than FRCD. Unknown offsets read 0.
    pub(crate) fn read64(&self, offset: u64) -> u64 {
        match offset {
            CAP => self.cap,
            ECAP => self.ecap,
            RTADDR => self.rtaddr,
            CCMD => self.ccmd,
            IQH => self.iqh,
            IQT => self.iqt,
            IQA => self.iqa,
            IRTA => self.irta,
            IVA => self.iva,
            IOTLB => self.iotlb,
            _ => 0,
        }
    }

    /// Stores a plain 32-bit register (no side effects). Returns false if `offset` is not one.
    pub(crate) fn write32_plain(&mut self, offset: u64, value: u32) -> bool {
        let ir_data = if self.eim { u32::MAX } else { 0xffff };
        match offset {
            FEDATA => self.fedata = value & ir_data,
            FEADDR => self.feaddr = value & !3,
            FEUADDR => self.feuaddr = value,
            IEDATA => self.iedata = value & ir_data,
            IEADDR => self.ieaddr = value & !3,
            IEUADDR => self.ieuaddr = value,
            _ => return false,
        }
        true
    }

    /// Stores a plain 64-bit register (no side effects) merging the bytes selected by `mask`.
    /// Returns false if `offset` is not one.
    pub(crate) fn write64_plain(&mut self, offset: u64, value: u64, mask: u64) -> bool {
        match offset {
            RTADDR => self.rtaddr = merge(self.rtaddr, value, mask & self.rtaddr_mask()),
            IQA => self.iqa = merge(self.iqa, value, mask & self.iqa_mask()),
            IRTA => self.irta = merge(self.irta, value, mask & self.irta_mask()),
            // IVA: ADDR 63:12, IH 6, AM 5:0.
            IVA => self.iva = merge(self.iva, value, mask & !0xf80),
            _ => return false,
        }
        true
    }
}

/// If `offset` (8-byte aligned) lies in the fault-recording registers: (record index, qword).
pub(crate) fn frcd_slot(offset: u64, fault_records: usize) -> Option<(usize, usize)> {
    let rel = offset.checked_sub(FRCD_BASE)?;
    let index = usize::try_from(rel / 16).ok()?;
    (index < fault_records).then_some((index, ((rel % 16) / 8) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_for_48_bit_caching_mode() {
        let config = VtdConfig {
            address_width: 48,
            caching_mode: true,
            fault_records: 4,
            ..VtdConfig::default()
        };
        let c = cap(&config);
        assert_eq!(c & 7, 6, "ND");
        assert_eq!(c >> 7 & 1, 1, "CM");
        assert_eq!(c >> 8 & 0x1f, 0b110, "SAGAW 39+48");
        assert_eq!(c >> 16 & 0x3f, 47, "MGAW");
        assert_eq!((c >> 24 & 0x3ff) * 16, FRCD_BASE, "FRO");
        assert_eq!(c >> 34 & 0xf, 0b11, "SLLPS 2M+1G");
        assert_eq!(c >> 39 & 1, 1, "PSI");
        assert_eq!(c >> 40 & 0xff, 3, "NFR = records - 1");
        assert_eq!(c >> 48 & 0x3f, 18, "MAMV");
        assert_eq!(c >> 63, 0, "no ESRTPS");
    }

    #[test]
    fn cap_for_39_bit_without_options() {
        let config = VtdConfig {
            address_width: 39,
            large_pages: false,
            ..VtdConfig::default()
        };
        let c = cap(&config);
        assert_eq!(c >> 7 & 1, 0);
        assert_eq!(c >> 8 & 0x1f, 0b010);
        assert_eq!(c >> 16 & 0x3f, 38);
        assert_eq!(c >> 34 & 0xf, 0);
    }

    #[test]
    fn ecap_options_map_to_bits_and_smts_is_zero() {
        let all = VtdConfig {
            device_iotlb: true,
            interrupt_remapping: true,
            pass_through: true,
            ..VtdConfig::default()
        };
        let e = ecap(&all);
        assert_eq!(e & 0x5f, 0x5f, "C QI DT IR EIM PT");
        assert_eq!((e >> 8 & 0x3ff) * 16, IVA, "IRO");
        assert_eq!(e >> 20 & 0xf, 0xf, "MHMV");
        assert_eq!(e >> 43 & 1, 0, "SMTS");
        let none = VtdConfig {
            device_iotlb: false,
            interrupt_remapping: false,
            pass_through: false,
            ..VtdConfig::default()
        };
        assert_eq!(ecap(&none) & 0xff, 0x3, "only C and QI");
    }

    #[test]
    fn frcd_slots_cover_only_configured_records() {
        assert_eq!(frcd_slot(FRCD_BASE, 2), Some((0, 0)));
        assert_eq!(frcd_slot(FRCD_BASE + 24, 2), Some((1, 1)));
        assert_eq!(frcd_slot(FRCD_BASE + 32, 2), None);
        assert_eq!(frcd_slot(FRCD_BASE - 8, 2), None);
    }

    #[test]
    fn merge_replaces_only_masked_bits() {
        assert_eq!(merge(0xaaaa_bbbb, 0x1111_2222, 0xffff), 0xaaaa_2222);
        assert_eq!(page_addr_mask(39), 0x7f_ffff_f000);
    }
}
