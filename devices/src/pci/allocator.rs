//! A bump allocator for BAR address windows and the helper that assigns a
//! device's BARs from it.

use thiserror::Error;

use super::configuration::{PciBarInfo, PciBarRegionType, BAR0_REG};
use super::root::PciDevice;

/// Start of the 32-bit PCI MMIO window.
pub const PCI_MMIO32_BASE: u64 = 0xc000_0000;
/// Size of the 32-bit PCI MMIO window (up to the ECAM window).
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// BARs are at least page aligned so no two BARs share a page.
const MIN_BAR_ALIGN: u64 = 0x1000;

/// Errors allocating BAR space.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BarAllocError {
    /// The window is empty or wraps.
    #[error("invalid BAR window base={base:#x} size={size:#x}; it must be non-empty and not wrap")]
    InvalidWindow {
        /// Window start.
        base: u64,
        /// Window size.
        size: u64,
    },
    /// Size zero or alignment not a power of two.
    #[error("invalid allocation size={size:#x} align={align:#x}; align must be a power of two")]
    InvalidRequest {
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
    },
    /// The window has no room left.
    #[error("BAR window exhausted: no room for {size:#x} bytes; enlarge the window or use fewer devices")]
    Exhausted {
        /// Requested size.
        size: u64,
    },
}

/// Hands out aligned, never-reused ranges of one address window.
#[derive(Debug, Clone)]
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    /// Creates an allocator over `[base, base + size)`.
    pub fn new(base: u64, size: u64) -> Result<Self, BarAllocError> {
        let end = base
            .checked_add(size)
            .filter(|_| size != 0)
            .ok_or(BarAllocError::InvalidWindow { base, size })?;
        Ok(BarAllocator { next: base, end })
    }

    /// The platform's 32-bit window `0xC000_0000..0xE000_0000`.
    pub fn mmio32() -> Self {
        BarAllocator {
            next: PCI_MMIO32_BASE,
            end: PCI_MMIO32_BASE + PCI_MMIO32_SIZE,
        }
    }

    /// Allocates `size` bytes aligned to `align` (a power of two).
    pub fn allocate(&mut self, size: u64, align: u64) -> Result<u64, BarAllocError> {
        if size == 0 || !align.is_power_of_two() {
            return Err(BarAllocError::InvalidRequest { size, align });
        }
        let start = self
            .next
            .checked_add(align - 1)
            .map(|v| v & !(align - 1))
            .ok_or(BarAllocError::Exhausted { size })?;
        let end = start
            .checked_add(size)
            .filter(|&e| e <= self.end)
            .ok_or(BarAllocError::Exhausted { size })?;
        self.next = end;
        Ok(start)
    }
}

/// Assigns every unassigned (address 0) BAR of `dev` from the windows and
/// programs it through configuration writes. 64-bit BARs use `mmio64` when
/// given, else `mmio32`. Returns the device's BARs afterwards.
pub fn allocate_bars(
    dev: &mut dyn PciDevice,
    mmio32: &mut BarAllocator,
    mut mmio64: Option<&mut BarAllocator>,
) -> Result<Vec<PciBarInfo>, BarAllocError> {
    for bar in dev.bars().into_iter().filter(|b| b.addr == 0) {
        let window = match (bar.region_type, mmio64.as_deref_mut()) {
            (PciBarRegionType::Memory64, Some(w)) => w,
            _ => &mut *mmio32,
        };
        let addr = window.allocate(bar.size, bar.size.max(MIN_BAR_ALIGN))?;
        let reg = BAR0_REG + bar.index;
        dev.write_config_register(reg, 0, &(addr as u32).to_le_bytes());
        if bar.region_type == PciBarRegionType::Memory64 {
            dev.write_config_register(reg + 1, 0, &((addr >> 32) as u32).to_le_bytes());
        }
    }
    Ok(dev.bars())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::root::test_utils::TestDevice;
    use super::*;

    #[test]
    fn allocations_are_aligned_and_disjoint() {
        let mut a = BarAllocator::mmio32();
        assert_eq!(a.allocate(0x100, 0x1000).unwrap(), 0xc000_0000);
        assert_eq!(a.allocate(0x4000, 0x4000).unwrap(), 0xc000_4000);
        assert_eq!(a.allocate(0x1000, 0x1000).unwrap(), 0xc000_8000);
    }

    #[test]
    fn exhaustion_and_bad_requests_are_errors() {
        let mut a = BarAllocator::new(0x1000, 0x2000).unwrap();
        assert_eq!(
            a.allocate(0x4000, 0x1000),
            Err(BarAllocError::Exhausted { size: 0x4000 })
        );
        assert!(matches!(
            a.allocate(0, 1),
            Err(BarAllocError::InvalidRequest { .. })
        ));
        assert!(matches!(
            a.allocate(1, 3),
            Err(BarAllocError::InvalidRequest { .. })
        ));
        let mut top = BarAllocator::new(u64::MAX - 0x1fff, 0x1000).unwrap();
        assert!(top.allocate(0x10, 1 << 63).is_err());
        assert!(BarAllocator::new(u64::MAX, 2).is_err());
        assert!(BarAllocator::new(0, 0).is_err());
    }

    #[test]
    fn allocate_bars_programs_unassigned_bars() {
        let mut dev = TestDevice::new(1);
        dev.config
            .add_bar(0, 0x4000, PciBarRegionType::Memory64, false, 0)
            .unwrap();
        dev.config
            .add_bar(2, 0x100, PciBarRegionType::Memory32, false, 0)
            .unwrap();
        let mut low = BarAllocator::mmio32();
        let mut high = BarAllocator::new(1 << 40, 1 << 30).unwrap();
        let bars = allocate_bars(&mut dev, &mut low, Some(&mut high)).unwrap();
        assert_eq!(bars[0].addr, 1 << 40);
        assert_eq!(bars[1].addr, 0xc000_0000);
        let bars = allocate_bars(&mut dev, &mut low, None).unwrap();
        assert_eq!(bars[1].addr, 0xc000_0000, "assigned BARs are kept");
    }
}
