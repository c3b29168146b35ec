//! MMIO dispatch for the register file: 4- and 8-byte accesses, 64-bit registers split into
//! 32-bit halves, GCMD/GSTS handshakes and register-based invalidation.
//!
//! Rules: an 8-byte access to a 64-bit register is one access; an 8-byte access elsewhere is
//! two 4-byte accesses (low first); a 4-byte access to half of a 64-bit register writes only
//! that half (write-1-to-clear bits in the other half are left alone). Other sizes or
//! misaligned accesses read 0 and are ignored. Reserved bits read 0; read-only registers
//! ignore writes. GSTS changes synchronously with the GCMD write.

use vm_memory::{Bytes, GuestAddress};

use super::descriptor::{context_scope, iotlb_scope, IotlbScope};
use super::invalidation::InvalidationError;
use super::regs::*;
use super::{Vtd, VtdAction};
use crate::notifier::IommuEvent;
use crate::{debug_limited, warn_limited};

impl<M: Bytes<GuestAddress> + Send + Sync> Vtd<M> {
    /// Reads `data.len()` (4 or 8) bytes of the register file at `offset`.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let value = match data.len() {
            4 if offset.is_multiple_of(4) => u64::from(self.read32(offset)),
            8 if offset.is_multiple_of(8) => self.read64(offset),
            len => {
                debug_limited!(
                    self.log_budget(),
                    "VT-d: ignoring {len}-byte read at {offset:#x}"
                );
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
        match (
            data.len(),
            <[u8; 8]>::try_from(data),
            <[u8; 4]>::try_from(data),
        ) {
            (4, _, Ok(b)) if offset.is_multiple_of(4) => {
                self.write32(offset, u32::from_le_bytes(b))
            }
            (8, Ok(b), _) if offset.is_multiple_of(8) => {
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
                debug_limited!(
                    self.log_budget(),
                    "VT-d: ignoring {len}-byte write at {offset:#x}"
                );
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
                    debug_limited!(
                        self.log_budget(),
                        "VT-d: write {value:#x} to read-only or unknown register {offset:#x}"
                    );
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
                    debug_limited!(
                        self.log_budget(),
                        "VT-d: write {value:#x} to read-only or unknown register {offset:#x}"
                    );
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
            Ok(scope) => {
                self.counts.register_context_cache =
                    self.counts.register_context_cache.saturating_add(1);
                (g, self.invalidate_context(scope))
            }
            Err(e) => {
                warn_limited!(
                    self.log_budget(),
                    "VT-d register context invalidation refused: {e}"
                );
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
                warn_limited!(
                    self.log_budget(),
                    "VT-d register IOTLB invalidation refused: {e}"
                );
                None
            }
        };
        let (iaig, events) = match scope {
            Some((scope, iaig)) => {
                self.counts.register_iotlb = self.counts.register_iotlb.saturating_add(1);
                (iaig, self.invalidate_iotlb(scope))
            }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::translate::DmaTranslate;
    use crate::types::{Iova, Permissions};
    use crate::vtd::testutil::{r32, r64, vtd_with, w32, w64, Rig, PTE_RW};
    use crate::vtd::VtdConfig;
    use vm_memory::GuestAddress;

    #[test]
    fn reset_values() {
        let config = VtdConfig::default();
        let (vtd, _) = vtd_with(config.clone());
        assert_eq!(r32(&vtd, VER), 0x10);
        assert_eq!(r64(&vtd, CAP), cap(&config));
        assert_eq!(r64(&vtd, ECAP), ecap(&config));
        assert_eq!(r32(&vtd, GCMD), 0);
        assert_eq!(r32(&vtd, GSTS), 0);
        assert_eq!(r32(&vtd, FSTS), 0);
        assert_eq!(r32(&vtd, FECTL), CTL_IM);
        assert_eq!(r32(&vtd, IECTL), CTL_IM);
        for reg in [RTADDR, CCMD, IQH, IQT, IQA, IQER, IRTA, IOTLB, AFLOG] {
            assert_eq!(r64(&vtd, reg), 0, "{reg:#x}");
        }
    }

    #[test]
    fn te_handshake_updates_gsts_synchronously_and_resets_consumers() {
        let (mut vtd, _) = vtd_with(VtdConfig::default());
        let actions = w32(&mut vtd, GCMD, GCMD_TE);
        assert_eq!(r32(&vtd, GSTS) & GCMD_TE, GCMD_TE);
        assert!(vtd.translation_enabled());
        assert_eq!(actions, vec![VtdAction::Notify(vec![IommuEvent::Reset])]);
        // Writing the same level again changes nothing.
        assert!(w32(&mut vtd, GCMD, GCMD_TE).is_empty());
        assert_eq!(
            w32(&mut vtd, GCMD, 0),
            vec![VtdAction::Notify(vec![IommuEvent::Reset])]
        );
        assert_eq!(r32(&vtd, GSTS), 0);
    }

    #[test]
    fn srtp_latches_rtaddr_only_when_commanded() {
        let mut rig = Rig::new(VtdConfig::default());
        rig.attach(0x08, 2, 0);
        rig.map(0x1000, 0x9000, 1, PTE_RW);
        let rid = Rig::rid(0x08);
        let t = rig.vtd.translate(rid, Iova(0x1000), 4, Permissions::Read);
        assert_eq!(t.unwrap().fragments[0].0, GuestAddress(0x9000));
        assert_ne!(r32(&rig.vtd, GSTS) & GCMD_SRTP, 0, "RTPS");
        // A new, empty root table is not used until SRTP.
        let empty = rig.b.alloc();
        w64(&mut rig.vtd, RTADDR, empty);
        assert!(rig
            .vtd
            .translate(rid, Iova(0x1000), 4, Permissions::Read)
            .is_ok());
        // SRTP acts on every write with it set, with TE kept as a level.
        let actions = w32(&mut rig.vtd, GCMD, GCMD_TE | GCMD_QIE | GCMD_SRTP);
        assert_eq!(actions, vec![VtdAction::Notify(vec![IommuEvent::Reset])]);
        assert!(rig.vtd.translation_enabled());
        assert!(rig
            .vtd
            .translate(rid, Iova(0x1000), 4, Permissions::Read)
            .is_err());
    }

    #[test]
    fn rtaddr_reserved_bits_read_zero() {
        let (mut vtd, _) = vtd_with(VtdConfig {
            address_width: 39,
            ..VtdConfig::default()
        });
        w64(&mut vtd, RTADDR, u64::MAX);
        assert_eq!(r64(&vtd, RTADDR), 0x7f_ffff_f000);
    }

    #[test]
    fn qie_enable_and_disable_reset_the_head() {
        let mut rig = Rig::new(VtdConfig::default());
        assert_ne!(r32(&rig.vtd, GSTS) & GCMD_QIE, 0);
        rig.submit(&[crate::vtd::testutil::wait_desc(false, false, 0, 0)]);
        assert_eq!(r64(&rig.vtd, IQH), 0x10);
        w32(&mut rig.vtd, GCMD, GCMD_TE);
        assert_eq!(r32(&rig.vtd, GSTS) & GCMD_QIE, 0);
        assert_eq!(r64(&rig.vtd, IQH), 0);
    }

    #[test]
    fn register_context_invalidation_clears_icc_and_reports_caig() {
        let (mut vtd, _) = vtd_with(VtdConfig::default());
        w64(&mut vtd, CCMD, CCMD_ICC | (1 << CCMD_CIRG_SHIFT));
        let v = r64(&vtd, CCMD);
        assert_eq!(v & CCMD_ICC, 0);
        assert_eq!((v >> CCMD_CAIG_SHIFT) & 3, 1);
        // Granularity 0 is refused: CAIG 0.
        w64(&mut vtd, CCMD, CCMD_ICC);
        assert_eq!((r64(&vtd, CCMD) >> CCMD_CAIG_SHIFT) & 3, 0);
        assert_eq!(r64(&vtd, CCMD) & CCMD_ICC, 0);
    }

    #[test]
    fn register_context_invalidation_detaches_cached_device() {
        let mut rig = Rig::new(VtdConfig::default());
        rig.attach(0x10, 5, 0);
        rig.map(0, 0x4000, 1, PTE_RW);
        rig.vtd
            .translate(Rig::rid(0x10), Iova(0), 1, Permissions::Read)
            .unwrap();
        let cmd = CCMD_ICC | (3 << CCMD_CIRG_SHIFT) | (0x10 << 16) | 5;
        let actions = w64(&mut rig.vtd, CCMD, cmd);
        let detach = IommuEvent::DetachEndpoint {
            rid: Rig::rid(0x10),
        };
        assert_eq!(actions, vec![VtdAction::Notify(vec![detach])]);
        assert_eq!((r64(&rig.vtd, CCMD) >> CCMD_CAIG_SHIFT) & 3, 3);
    }

    #[test]
    fn register_iotlb_invalidation_reports_iaig_and_unmaps() {
        let mut rig = Rig::new(VtdConfig::default());
        rig.attach(0x08, 7, 0);
        rig.map(0x20_0000, 0x4000, 1, PTE_RW);
        rig.vtd
            .translate(Rig::rid(0x08), Iova(0x20_0000), 1, Permissions::Read)
            .unwrap();
        w64(&mut rig.vtd, IVA, 0x20_0000 | 1);
        let actions = w64(
            &mut rig.vtd,
            IOTLB,
            IOTLB_IVT | (3 << IOTLB_IIRG_SHIFT) | (7 << 32),
        );
        let v = r64(&rig.vtd, IOTLB);
        assert_eq!(v & IOTLB_IVT, 0);
        assert_eq!((v >> IOTLB_IAIG_SHIFT) & 3, 3);
        let range = crate::types::IovaRange::new(0x20_0000, 0x20_1fff).unwrap();
        let unmap = IommuEvent::Unmap {
            rid: Rig::rid(0x08),
            range,
        };
        assert_eq!(actions, vec![VtdAction::Notify(vec![unmap])]);
        // AM above MAMV falls back to a domain-selective flush, reported as such.
        w64(&mut rig.vtd, IVA, 19);
        w64(
            &mut rig.vtd,
            IOTLB,
            IOTLB_IVT | (3 << IOTLB_IIRG_SHIFT) | (7 << 32),
        );
        assert_eq!((r64(&rig.vtd, IOTLB) >> IOTLB_IAIG_SHIFT) & 3, 2);
        w64(&mut rig.vtd, IOTLB, IOTLB_IVT | (1 << IOTLB_IIRG_SHIFT));
        assert_eq!((r64(&rig.vtd, IOTLB) >> IOTLB_IAIG_SHIFT) & 3, 1);
    }

    #[test]
    fn split_32_bit_halves_of_64_bit_registers() {
        let (mut vtd, _) = vtd_with(VtdConfig::default());
        w32(&mut vtd, RTADDR, 0x1234_5000);
        w32(&mut vtd, RTADDR + 4, 0x7f);
        assert_eq!(r64(&vtd, RTADDR), 0x7f_1234_5000);
        assert_eq!(r32(&vtd, RTADDR + 4), 0x7f);
        let cap64 = r64(&vtd, CAP);
        assert_eq!(
            u64::from(r32(&vtd, CAP)) | u64::from(r32(&vtd, CAP + 4)) << 32,
            cap64
        );
        // CCMD: low half first (DID), then the high half with ICC starts the invalidation.
        assert!(w32(&mut vtd, CCMD, 0x42).is_empty());
        assert_eq!(r64(&vtd, CCMD), 0x42);
        w32(
            &mut vtd,
            CCMD + 4,
            ((CCMD_ICC | (2 << CCMD_CIRG_SHIFT)) >> 32) as u32,
        );
        let v = r64(&vtd, CCMD);
        assert_eq!(
            (v & CCMD_ICC, (v >> CCMD_CAIG_SHIFT) & 3, v & 0xffff),
            (0, 2, 0x42)
        );
    }

    #[test]
    fn eight_byte_access_to_32_bit_registers_splits() {
        let (mut vtd, _) = vtd_with(VtdConfig::default());
        w64(&mut vtd, FEADDR, 0x0000_0001_fee0_0004);
        assert_eq!(r32(&vtd, FEADDR), 0xfee0_0004);
        assert_eq!(r32(&vtd, FEUADDR), 1);
        w32(&mut vtd, GCMD, GCMD_TE);
        assert_eq!(
            r64(&vtd, GCMD) >> 32,
            u64::from(GCMD_TE),
            "GSTS in the high half"
        );
    }

    #[test]
    fn read_only_registers_ignore_writes_and_odd_sizes_are_ignored() {
        let (mut vtd, _) = vtd_with(VtdConfig::default());
        let cap_before = r64(&vtd, CAP);
        w64(&mut vtd, CAP, 0);
        w64(&mut vtd, ECAP, 0);
        w32(&mut vtd, VER, 0);
        w32(&mut vtd, GSTS, u32::MAX);
        w64(&mut vtd, IQH, 0x100);
        w64(&mut vtd, IQER, 1);
        assert_eq!(r64(&vtd, CAP), cap_before);
        assert_eq!(r32(&vtd, VER), 0x10);
        assert_eq!(r32(&vtd, GSTS), 0);
        assert_eq!(r64(&vtd, IQH), 0);
        assert!(vtd.mmio_write(GCMD, &[0, 0, 0]).is_empty());
        assert!(vtd.mmio_write(GCMD + 1, &GCMD_TE.to_le_bytes()).is_empty());
        assert_eq!(r32(&vtd, GSTS), 0);
        let mut two = [0xffu8; 2];
        vtd.mmio_read(VER, &mut two);
        assert_eq!(two, [0, 0]);
        let mut unaligned = [0xffu8; 8];
        vtd.mmio_read(CAP + 4, &mut unaligned);
        assert_eq!(unaligned, [0; 8]);
    }

    #[test]
    fn fedata_and_feaddr_mask_reserved_bits() {
        let (mut vtd, _) = vtd_with(VtdConfig::default());
        w32(&mut vtd, FEDATA, 0xffff_ffff);
        w32(&mut vtd, FEADDR, 0xffff_ffff);
        assert_eq!(r32(&vtd, FEDATA), 0xffff);
        assert_eq!(r32(&vtd, FEADDR), 0xffff_fffc);
    }

    #[test]
    fn interrupt_remapping_registers_only_with_ir() {
        let (mut off, _) = vtd_with(VtdConfig::default());
        w64(&mut off, IRTA, 0x5000 | 0xf);
        assert_eq!(r64(&off, IRTA), 0);
        assert!(w32(&mut off, GCMD, GCMD_IRE | GCMD_SIRTP).is_empty());
        assert_eq!(r32(&off, GSTS), 0);
        assert_eq!(off.interrupt_remapping(), None);

        let (mut on, _) = vtd_with(VtdConfig {
            interrupt_remapping: true,
            ..VtdConfig::default()
        });
        w64(&mut on, IRTA, 0x5000 | (1 << 11) | 0xf | 0x100);
        assert_eq!(r64(&on, IRTA), 0x5000 | (1 << 11) | 0xf);
        let actions = w32(&mut on, GCMD, GCMD_SIRTP);
        assert_eq!(actions, vec![VtdAction::InterruptRemappingChanged]);
        assert_ne!(r32(&on, GSTS) & GCMD_SIRTP, 0, "IRTPS");
        w32(&mut on, GCMD, GCMD_IRE);
        let ir = on.interrupt_remapping().unwrap();
        assert_eq!((ir.base, ir.entries, ir.eime), (0x5000, 65536, true));
        assert!(ir.enabled && !ir.compat_allowed);
        assert!(
            w32(&mut on, GCMD, GCMD_IRE).is_empty(),
            "no change, no action"
        );
    }
}
