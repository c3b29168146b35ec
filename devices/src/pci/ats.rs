//! PCI Express ATS (Address Translation Services) for emulated endpoints.
//!
//! A function offering ATS carries a PCI Express capability (as a Root
//! Complex Integrated Endpoint, so no root port or ATSR walk is needed) and
//! the ATS extended capability. The guest's IOMMU driver sets the ATS Enable
//! bit when it will send device-TLB invalidations for the function; the VMM
//! follows that bit to pick the notifier kind of the function's IOTLB
//! consumers (device-IOTLB notifications only while ATS is enabled).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::configuration::{PciConfigError, PciConfiguration};

/// PCI Express capability ID.
pub const PCI_CAP_ID_EXP: u8 = 0x10;
/// ATS extended capability ID.
pub const PCI_EXT_CAP_ID_ATS: u16 = 0x000f;
/// PCIe capability version 2, device/port type 9 (RC integrated endpoint).
const PCIE_CAPS: u16 = 0x2 | (0x9 << 4);
/// Size of a version-2 PCIe capability including its 2-byte header.
const PCIE_CAP_LEN: usize = 0x3c;
/// Offset of Device Control inside the PCIe capability.
const PCIE_DEVCTL: usize = 0x08;
/// ATS capability register: page aligned requests; queue depth 0 (= 32).
const ATS_CAP_PAGE_ALIGNED: u16 = 1 << 5;
/// ATS control: Enable.
pub const ATS_CTRL_ENABLE: u16 = 1 << 15;
/// ATS control: Smallest Translation Unit field.
const ATS_CTRL_STU_MASK: u16 = 0x1f;

/// Called with the new state whenever the guest flips ATS Enable.
pub type AtsListener = Arc<dyn Fn(bool) + Send + Sync>;

/// The ATS state of one function.
pub struct Ats {
    /// Configuration register index holding the ATS capability and control
    /// registers (the dword after the extended capability header).
    ctrl_reg: usize,
    enabled: Arc<AtomicBool>,
    listener: Option<AtsListener>,
}

impl std::fmt::Debug for Ats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ats")
            .field("ctrl_reg", &self.ctrl_reg)
            .field("enabled", &self.enabled.load(Ordering::Relaxed))
            .finish()
    }
}

impl Ats {
    /// Adds the PCIe and ATS capabilities to `config`.
    pub fn add_to(
        config: &mut PciConfiguration,
        listener: Option<AtsListener>,
    ) -> Result<Self, PciConfigError> {
        let mut body = vec![0u8; PCIE_CAP_LEN - 2];
        body[..2].copy_from_slice(&PCIE_CAPS.to_le_bytes());
        let mut mask = vec![0u8; body.len()];
        // Device Control is read/write for the guest (we ignore its contents).
        mask[PCIE_DEVCTL - 2..PCIE_DEVCTL].copy_from_slice(&[0xff, 0xff]);
        config.add_capability(PCI_CAP_ID_EXP, &body, Some(&mask))?;
        let mut ats = Vec::with_capacity(4);
        ats.extend_from_slice(&ATS_CAP_PAGE_ALIGNED.to_le_bytes());
        ats.extend_from_slice(&0u16.to_le_bytes());
        let writable = [
            0,
            0,
            (ATS_CTRL_STU_MASK & 0xff) as u8,
            (ATS_CTRL_ENABLE >> 8) as u8,
        ];
        let offset =
            config.add_extended_capability(PCI_EXT_CAP_ID_ATS, 1, &ats, Some(&writable))?;
        Ok(Ats {
            ctrl_reg: offset / 4 + 1,
            enabled: Arc::new(AtomicBool::new(false)),
            listener,
        })
    }

    /// Call after every configuration write; notices ATS Enable changes.
    pub fn after_write(&self, reg_idx: usize, config: &PciConfiguration) {
        if reg_idx != self.ctrl_reg {
            return;
        }
        let ctrl = (config.read_reg(reg_idx) >> 16) as u16;
        let now = ctrl & ATS_CTRL_ENABLE != 0;
        if self.enabled.swap(now, Ordering::AcqRel) != now {
            log::debug!("pci: ATS {}", if now { "enabled" } else { "disabled" });
            if let Some(l) = &self.listener {
                l(now);
            }
        }
    }

    /// Whether the guest enabled ATS.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// A shared view of the enable bit (for the VMM).
    pub fn enabled_flag(&self) -> Arc<AtomicBool> {
        self.enabled.clone()
    }

    /// Clears ATS Enable (function reset), telling the listener.
    pub fn reset(&self, config: &mut PciConfiguration) {
        let v = config.read_reg(self.ctrl_reg) & !((ATS_CTRL_ENABLE as u32) << 16);
        config.set_reg(self.ctrl_reg, v);
        self.after_write(self.ctrl_reg, config);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pci::configuration::PciHeader;
    use std::sync::Mutex;

    fn config() -> PciConfiguration {
        PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision_id: 1,
            class_code: 0x020000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        })
    }

    fn find_ext(c: &PciConfiguration, id: u16) -> Option<usize> {
        let mut off = 0x100;
        for _ in 0..64 {
            let h = c.read_reg(off / 4);
            if h & 0xffff == id as u32 {
                return Some(off);
            }
            off = (h >> 20) as usize;
            if off < 0x100 {
                return None;
            }
        }
        None
    }

    #[test]
    fn capabilities_are_discoverable_like_linux_does() {
        let mut c = config();
        Ats::add_to(&mut c, None).unwrap();
        // Standard list: PCIe capability with type RCiEP, version 2.
        let ptr = (c.read_reg(0x34 / 4) & 0xff) as usize;
        let hdr = c.read_reg(ptr / 4);
        assert_eq!(hdr & 0xff, PCI_CAP_ID_EXP as u32);
        assert_eq!((hdr >> 16) & 0xffff, 0x92);
        let ats = find_ext(&c, PCI_EXT_CAP_ID_ATS).unwrap();
        assert_eq!((c.read_reg(ats / 4) >> 16) & 0xf, 1, "ATS version 1");
        assert_eq!(
            c.read_reg(ats / 4 + 1) & 0xffff,
            ATS_CAP_PAGE_ALIGNED as u32
        );
    }

    #[test]
    fn enable_bit_is_tracked_and_reported_once_per_change() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut c = config();
        let ats =
            Ats::add_to(&mut c, Some(Arc::new(move |on| s.lock().unwrap().push(on)))).unwrap();
        let reg = ats.ctrl_reg;
        // Guest writes the control register (upper half of the dword): STU 0, Enable.
        c.write_reg(reg, 2, &0x8000u16.to_le_bytes());
        ats.after_write(reg, &c);
        c.write_reg(reg, 2, &0x8001u16.to_le_bytes());
        ats.after_write(reg, &c);
        assert!(ats.enabled());
        c.write_reg(reg, 2, &0u16.to_le_bytes());
        ats.after_write(reg, &c);
        assert_eq!(*seen.lock().unwrap(), vec![true, false]);
        // The capability register half is read-only.
        c.write_reg(reg, 0, &0xffffu16.to_le_bytes());
        assert_eq!(c.read_reg(reg) & 0xffff, ATS_CAP_PAGE_ALIGNED as u32);
    }

    #[test]
    fn reset_clears_enable_and_notifies() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut c = config();
        let ats =
            Ats::add_to(&mut c, Some(Arc::new(move |on| s.lock().unwrap().push(on)))).unwrap();
        c.write_reg(ats.ctrl_reg, 2, &0x8000u16.to_le_bytes());
        ats.after_write(ats.ctrl_reg, &c);
        ats.reset(&mut c);
        assert!(!ats.enabled());
        assert_eq!(*seen.lock().unwrap(), vec![true, false]);
    }
}
