//! MMIO dispatch for the register file: 4- and 8-byte accesses, 64-bit registers split into
//! 32-bit halves, GCMD/GSTS handshakes and register-based invalidation.
//!
//! Rules: an 8-byte access to a 64-bit register is one access; an 8-byte access elsewhere is
//! two 4-byte accesses (low first); a 4-byte access to half of a 64-bit register writes only
//! that half (write-1-to-clear bits in the other half are left alone). Other sizes or
//! misaligned accesses read 0 and are ignored. Reserved bits read 0; read-only registers
//! ignore writes. GSTS changes synchronously with the GCMD write.

use log::{debug, warn};
use vm_memory::{Bytes, GuestAddress};

use super::invalidation::{context_scope, iotlb_scope, InvalidationError, IotlbScope};
use super::regs::*;
use super::{Vtd, VtdAction};
use crate::notifier::IommuEvent;

impl<M: Bytes<GuestAddress> + Send + Sync> Vtd<M> {
    /// Reads `data.len()` (4 or 8) bytes of the register file at `offset`.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let value = match data.len() {
            4 if offset % 4 == 0 => u64::from(self.read32(offset)),
            8 if offset % 8 == 0 => self.read64(offset),
            len => {
                debug!("VT-d: ignoring {len}-byte read at {offset:#x}");
                0
            }
        };
        let bytes = value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// Writes `data` (4 or 8 bytes) to the register file at `offset`; returns the side effects
    /// to carry out in order.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> Vec<VtdAction> {
        match (data.len(), <[u8; 8]>::try_from(data), <[u8; 4]>::try_from(data)) {
            (4, _, Ok(b)) if offset % 4 == 0 => self.write32(offset, u32::from_le_bytes(b)),
            (8, Ok(b), _) if offset % 8 == 0 => {
                let value = u64::from_le_bytes(b);
                if self.is_reg64(offset) {
                    self.write64(offset, value, u64::MAX)
                } else {
                    let mut out = self.write32(offset, value as u32);
                    out.extend(self.write32(offset + 4, (value >> 32) as u32));
                    out
                }
            }
            (len, _, _) => {
                debug!("VT-d: ignoring {len}-byte write at {offset:#x}");
                Vec::new()
            }
        }
    }

    fn is_reg64(&self, offset: u64) -> bool {
        self.regs.is_reg64(offset, self.faults.len())
    }

    fn read64(&self, offset: u64) -> u64 {
        if self.is_reg64(offset) {
            self.reg64(offset)
        } else {
            u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
        }
    }

    fn read32(&self, offset: u64) -> u32 {
        let base = offset & !7;
        if self.is_reg64(base) {
            (self.reg64(base) >> ((offset & 4) * 8)) as u32
        } else if offset == FSTS {
            let ppf = if self.faults.pending() { FSTS_PPF } else { 0 };
            self.regs.fsts | ppf
        } else {
            self.regs.read32(offset)
        }
    }

    fn reg64(&self, offset: u64) -> u64 {
        match frcd_slot(offset, self.faults.len()) {
            Some((index, half)) => self.faults.read(index, half),
            None => self.regs.read64(offset),
        }
    }

    fn write32(&mut self, offset: u64, value: u32) -> Vec<VtdAction> {
        let base = offset & !7;
        if self.is_reg64(base) {
            let shift = (offset & 4) * 8;
            return self.write64(base, u64::from(value) << shift, 0xffff_ffffu64 << shift);
        }
        match offset {
            GCMD => self.write_gcmd(value),
            FSTS => self.write_fsts(value),
            FECTL => self.write_fectl(value),
            IECTL => self.write_iectl(value),
            ICS => {
                self.write_ics(value);
                Vec::new()
            }
            _ => {
                if !self.regs.write32_plain(offset, value) {
                    debug!("VT-d: write {value:#x} to read-only or unknown register {offset:#x}");
                }
                Vec::new()
            }
        }
    }

    /// A write of the bits selected by `mask` to the 64-bit register at `offset`.
    fn write64(&mut self, offset: u64, value: u64, mask: u64) -> Vec<VtdAction> {
        if let Some((index, half)) = frcd_slot(offset, self.faults.len()) {
            if half == 1 {
                self.write_frcd_high(index, value & mask);
            }
            return Vec::new();
        }
        match offset {
            CCMD => self.write_ccmd(value, mask),
            IOTLB => self.write_iotlb(value, mask),
            IQT => {
                self.regs.iqt = merge(self.regs.iqt, value, mask & 0x7fff0);
                self.process_queue()
            }
            _ => {
                if !self.regs.write64_plain(offset, value, mask) {
                    debug!("VT-d: write {value:#x} to read-only or unknown register {offset:#x}");
                }
                Vec::new()
            }
        }
    }

    /// GCMD: one-shot SRTP/SIRTP act on every write with them set; TE, QIE, IRE and CFI are
    /// levels mirrored into GSTS.
    fn write_gcmd(&mut self, value: u32) -> Vec<VtdAction> {
        let mut out = Vec::new();
        let mut reset = false;
        if value & GCMD_SRTP != 0 {
            self.root_table = Some(self.regs.rtaddr);
            self.regs.gsts |= GCMD_SRTP;
            self.flush_caches();
            reset |= self.translation_enabled();
        }
        let te = value & GCMD_TE != 0;
        if te != self.translation_enabled() {
            self.set_gsts(GCMD_TE, te);
            self.flush_caches();
            reset = true;
        }
        if reset {
            out.push(VtdAction::Notify(vec![IommuEvent::Reset]));
        }
        let qie = value & GCMD_QIE != 0;
        let queue_started = qie && !self.qi.enabled;
        if qie != self.qi.enabled {
            self.set_queue_enabled(qie);
        }
        if self.regs.ir && self.write_gcmd_ir(value) {
            out.push(VtdAction::InterruptRemappingChanged);
        }
        if queue_started {
            // Tolerate a tail written before the queue was enabled.
            out.extend(self.process_queue());
        }
        out
    }

    /// The interrupt-remapping bits of GCMD; returns whether the remapping state changed.
    fn write_gcmd_ir(&mut self, value: u32) -> bool {
        let before = self.regs.gsts;
        if value & GCMD_SIRTP != 0 {
            self.irt = Some(self.regs.irta);
            self.regs.gsts |= GCMD_SIRTP;
        }
        self.set_gsts(GCMD_IRE, value & GCMD_IRE != 0);
        self.set_gsts(GCMD_CFI, value & GCMD_CFI != 0);
        value & GCMD_SIRTP != 0 || (before ^ self.regs.gsts) & (GCMD_IRE | GCMD_CFI) != 0
    }

    fn set_gsts(&mut self, bit: u32, on: bool) {
        if on {
            self.regs.gsts |= bit;
        } else {
            self.regs.gsts &= !bit;
        }
    }

    fn set_queue_enabled(&mut self, on: bool) {
        self.set_gsts(GCMD_QIE, on);
        self.qi.enabled = on;
        if on {
            self.qi.base = self.regs.iqa & page_addr_mask(self.config.address_width);
            self.qi.entries = 256 << (self.regs.iqa & 7);
        } else {
            self.qi.head = 0;
            self.regs.iqh = 0;
        }
    }

    /// CCMD: ICC starts a context-cache invalidation of granularity CIRG; CAIG reports it.
    fn write_ccmd(&mut self, value: u64, mask: u64) -> Vec<VtdAction> {
        const WRITABLE: u64 = CCMD_ICC | (3 << CCMD_CIRG_SHIFT) | (3 << 32) | 0xffff_ffff;
        let v = merge(self.regs.ccmd, value, mask & WRITABLE);
        self.regs.ccmd = v;
        if v & CCMD_ICC == 0 {
            return Vec::new();
        }
        let g = ((v >> CCMD_CIRG_SHIFT) & 3) as u8;
        let scope = context_scope(g, v as u16, (v >> 16) as u16, ((v >> 32) & 3) as u8);
        let (caig, events) = match scope {
            Ok(scope) => (g, self.invalidate_context(scope)),
            Err(e) => {
                warn!("VT-d register context invalidation refused: {e}");
                (0, Vec::new())
            }
        };
        let caig_bits = 3u64 << CCMD_CAIG_SHIFT;
        self.regs.ccmd = (v & !CCMD_ICC & !caig_bits) | (u64::from(caig) << CCMD_CAIG_SHIFT);
        notify(events)
    }

    /// IOTLB register: IVT starts an IOTLB invalidation of granularity IIRG (page-selective
    /// takes ADDR/IH/AM from IVA); IAIG reports it. A page-selective request with AM above
    /// MAMV is done domain-wide and reported as such.
    fn write_iotlb(&mut self, value: u64, mask: u64) -> Vec<VtdAction> {
        const WRITABLE: u64 = IOTLB_IVT | (3 << IOTLB_IIRG_SHIFT) | (3 << 48) | (0xffff << 32);
        let v = merge(self.regs.iotlb, value, mask & WRITABLE);
        self.regs.iotlb = v;
        if v & IOTLB_IVT == 0 {
            return Vec::new();
        }
        let g = ((v >> IOTLB_IIRG_SHIFT) & 3) as u8;
        let did = (v >> 32) as u16;
        let scope = match iotlb_scope(g, did, self.regs.iva) {
            Ok(scope) => Some((scope, g)),
            Err(InvalidationError::MaskTooLarge { .. }) => Some((IotlbScope::Domain(did), 2)),
            Err(e) => {
                warn!("VT-d register IOTLB invalidation refused: {e}");
                None
            }
        };
        let (iaig, events) = match scope {
            Some((scope, iaig)) => (iaig, self.invalidate_iotlb(scope)),
            None => (0, Vec::new()),
        };
        let iaig_bits = 3u64 << IOTLB_IAIG_SHIFT;
        self.regs.iotlb = (v & !IOTLB_IVT & !iaig_bits) | (u64::from(iaig) << IOTLB_IAIG_SHIFT);
        notify(events)
    }
}

fn notify(events: Vec<IommuEvent>) -> Vec<VtdAction> {
    if events.is_empty() {
        Vec::new()
    } else {
        vec![VtdAction::Notify(events)]
    }
}
