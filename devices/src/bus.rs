//! Address buses for MMIO and port I/O.
//!
//! A [`Bus`] maps non-overlapping address ranges to [`BusDevice`]s. The vCPU
//! loop dispatches every MMIO or PIO exit through it.
//!
//! Lock ordering: the bus's range map lock is always taken (and released)
//! before a device lock; a device never calls back into the bus while holding
//! its own lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use iommu::sync::{lock, read, write};
use thiserror::Error;

/// A device reachable through a [`Bus`].
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the start of the range the
    /// device was inserted at (`base`). Unimplemented registers read as ones.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors of bus registration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The requested range is empty or wraps around the address space.
    #[error(
        "invalid bus range base={base:#x} len={len:#x}: length must be non-zero and must not wrap"
    )]
    InvalidRange {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The requested range overlaps a registered one.
    #[error("bus range base={base:#x} len={len:#x} overlaps an existing device range")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// No device is registered at this base.
    #[error("no device registered at bus address {0:#x}")]
    NotFound(u64),
}

/// A shared, lockable bus device.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// An address bus (MMIO or PIO).
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = read(&self.ranges);
        f.debug_list()
            .entries(ranges.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len != 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = write(&self.ranges);
        let before = ranges.range(..end).next_back();
        if let Some((b, e)) = before {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the device registered at exactly `base`.
    pub fn remove(&self, base: u64) -> Result<SharedBusDevice, BusError> {
        let mut ranges = write(&self.ranges);
        ranges
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// Moves the device registered at `old_base` to `new_base` (same length).
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let len = {
            let ranges = read(&self.ranges);
            ranges
                .get(&old_base)
                .ok_or(BusError::NotFound(old_base))?
                .len
        };
        let device = self.remove(old_base)?;
        if let Err(e) = self.insert(device.clone(), new_base, len) {
            // Put it back where it was; that range was free a moment ago.
            let _ = self.insert(device, old_base, len);
            return Err(e);
        }
        Ok(())
    }

    /// Removes every device. The VMM calls this at shutdown: devices may hold
    /// the bus (e.g. the PCI root's BAR relocation), and emptying it breaks
    /// those reference cycles so devices, their threads and fds are dropped.
    pub fn clear(&self) {
        let drained: Vec<Entry> = {
            let mut ranges = write(&self.ranges);
            std::mem::take(&mut *ranges).into_values().collect()
        };
        // Devices are dropped here, outside the range lock.
        drop(drained);
    }

    fn resolve(&self, addr: u64) -> Option<(u64, SharedBusDevice)> {
        let ranges = read(&self.ranges);
        let (base, entry) = ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (*base, entry.device.clone()))
    }

    /// Dispatches a read; returns false (and leaves `data` untouched) when no
    /// device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                lock(&dev).read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                lock(&dev).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatches_by_range_and_offset() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 0x10)
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x105, &mut b));
        assert_eq!(b[0], 15);
        assert!(!bus.read(0x110, &mut b));
        assert!(!bus.read(0xff, &mut b));
        assert!(bus.write(0x100, &[1]));
        bus.read(0x100, &mut b);
        assert_eq!(b[0], 1);
    }

    #[test]
    fn rejects_overlap_empty_and_wrapping_ranges() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(0))), 0x100, 0x10)
            .unwrap();
        let d = || Arc::new(Mutex::new(Echo(0)));
        assert!(matches!(
            bus.insert(d(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0xf0, 0x11),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(d(), 0x200, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(d(), 0x110, 1).unwrap();
        bus.insert(d(), 0xf0, 0x10).unwrap();
    }

    #[test]
    fn clear_drops_every_device() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(1)));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(Arc::strong_count(&dev), 2);
        bus.clear();
        assert_eq!(Arc::strong_count(&dev), 1);
        let mut b = [0u8; 1];
        assert!(!bus.read(0x100, &mut b));
    }

    #[test]
    fn relocate_moves_device_or_restores_it() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(7))), 0x100, 0x10)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(9))), 0x300, 0x10)
            .unwrap();
        bus.relocate(0x100, 0x200).unwrap();
        let mut b = [0u8; 1];
        assert!(!bus.read(0x100, &mut b));
        assert!(bus.read(0x200, &mut b));
        assert_eq!(
            bus.relocate(0x200, 0x308),
            Err(BusError::Overlap {
                base: 0x308,
                len: 0x10
            })
        );
        assert!(bus.read(0x200, &mut b));
        assert_eq!(b[0], 7);
    }
}
