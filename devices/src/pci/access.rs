//! Guest access paths to configuration space: the legacy 0xCF8/0xCFC port
//! pair and the ECAM (memory-mapped) window. Both share one [`PciRoot`].

use std::sync::{Arc, Mutex};

use iommu::sync::lock;
use log::debug;

use super::configuration::{extract_partial, merge_partial};
use super::root::PciRoot;
use crate::bus::BusDevice;

/// First port of the configuration mechanism #1 (CONFIG_ADDRESS).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Number of ports (CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC..0xD00).
pub const PCI_CONFIG_IO_PORT_SIZE: u64 = 8;
/// Guest physical base of the ECAM window.
pub const PCI_ECAM_BASE: u64 = 0xe000_0000;
/// Size of the ECAM window: 1 MiB covers bus 0.
pub const PCI_ECAM_SIZE: u64 = 1 << 20;

const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Enable bit, bus, device, function and dword register; reserved bits and
/// the two low bits read as zero.
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// A decoded configuration access target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConfigTarget {
    bus: u8,
    device: u8,
    function: u8,
    reg_idx: usize,
}

fn read_target(root: &Mutex<PciRoot>, t: ConfigTarget, offset: u64, data: &mut [u8]) {
    let value = lock(root).read_config(t.bus, t.device, t.function, t.reg_idx);
    extract_partial(value, offset, data);
}

fn write_target(root: &Mutex<PciRoot>, t: ConfigTarget, offset: u64, data: &[u8]) {
    if merge_partial(offset, data).is_none() {
        debug!(
            "pci: dropped config write of {} bytes at {offset}",
            data.len()
        );
        return;
    }
    lock(root).write_config(t.bus, t.device, t.function, t.reg_idx, offset, data);
}

/// Configuration mechanism #1: a [`BusDevice`] for ports 0xCF8..0xD00
/// (insert it at [`PCI_CONFIG_IO_PORT`] with length [`PCI_CONFIG_IO_PORT_SIZE`]).
///
/// CONFIG_ADDRESS only responds to 4-byte accesses, as on real chipsets;
/// CONFIG_DATA takes 1-, 2- and 4-byte accesses that stay within the dword.
/// Only the conventional 256 bytes are reachable this way.
#[derive(Debug)]
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    /// Creates the port pair over `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    fn target(&self) -> Option<ConfigTarget> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        Some(ConfigTarget {
            bus: (self.address >> 16) as u8,
            device: (self.address >> 11) as u8 & 0x1f,
            function: (self.address >> 8) as u8 & 0x7,
            reg_idx: ((self.address & 0xfc) >> 2) as usize,
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (offset, self.target()) {
            (0, _) if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            (4..=7, Some(t)) => read_target(&self.root, t, offset - 4, data),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, self.target()) {
            (0, _) => {
                if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                    self.address = u32::from_le_bytes(bytes) & CONFIG_ADDRESS_MASK;
                }
            }
            (4..=7, Some(t)) => write_target(&self.root, t, offset - 4, data),
            _ => {}
        }
    }
}

/// The ECAM window as a [`BusDevice`] (insert it at [`PCI_ECAM_BASE`] with
/// length [`PCI_ECAM_SIZE`]). Offsets encode bus (bits 27:20), device
/// (19:15), function (14:12) and the byte in the 4 KiB space (11:0).
#[derive(Debug)]
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    /// Creates the ECAM window over `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigMmio { root }
    }

    fn target(offset: u64) -> ConfigTarget {
        ConfigTarget {
            bus: (offset >> 20) as u8,
            device: (offset >> 15) as u8 & 0x1f,
            function: (offset >> 12) as u8 & 0x7,
            reg_idx: ((offset & 0xfff) >> 2) as usize,
        }
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= 1 << 28 {
            data.fill(0xff);
            return;
        }
        read_target(&self.root, Self::target(offset), offset & 3, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset < 1 << 28 {
            write_target(&self.root, Self::target(offset), offset & 3, data);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::configuration::INTERRUPT_REG;
    use super::super::root::test_utils::TestDevice;
    use super::*;

    fn root_with_device() -> Arc<Mutex<PciRoot>> {
        let root = Arc::new(Mutex::new(PciRoot::new(None)));
        let mut dev = TestDevice::new(0xabcd);
        dev.config
            .add_extended_capability(0x0f, 1, &[0x11, 0x22, 0x33, 0x44], None)
            .unwrap();
        lock(&root).add_device(Arc::new(Mutex::new(dev))).unwrap();
        root
    }

    fn io_read(io: &mut PciConfigIo, port: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        io.read(PCI_CONFIG_IO_PORT, port - PCI_CONFIG_IO_PORT, &mut data);
        data
    }

    fn select(io: &mut PciConfigIo, dev: u32, func: u32, reg: u32) {
        let addr = CONFIG_ADDRESS_ENABLE | dev << 11 | func << 8 | reg << 2;
        io.write(PCI_CONFIG_IO_PORT, 0, &addr.to_le_bytes());
    }

    #[test]
    fn io_ports_read_ids_with_all_widths() {
        let mut io = PciConfigIo::new(root_with_device());
        select(&mut io, 1, 0, 0);
        assert_eq!(io_read(&mut io, 0xcf8, 4), 0x8000_0800u32.to_le_bytes());
        assert_eq!(io_read(&mut io, 0xcfc, 4), [0x34, 0x12, 0xcd, 0xab]);
        assert_eq!(io_read(&mut io, 0xcfe, 2), [0xcd, 0xab]);
        assert_eq!(io_read(&mut io, 0xcfd, 1), [0x12]);
        assert_eq!(io_read(&mut io, 0xcff, 1), [0xab]);
        // A word access crossing the dword reads as ones.
        assert_eq!(io_read(&mut io, 0xcff, 2), [0xff, 0xff]);
    }

    #[test]
    fn io_ports_absent_or_disabled_read_all_ones() {
        let mut io = PciConfigIo::new(root_with_device());
        select(&mut io, 2, 0, 0);
        assert_eq!(io_read(&mut io, 0xcfc, 4), [0xff; 4]);
        select(&mut io, 1, 3, 0);
        assert_eq!(io_read(&mut io, 0xcfc, 2), [0xff; 2]);
        io.write(PCI_CONFIG_IO_PORT, 0, &0x0000_0800u32.to_le_bytes());
        assert_eq!(io_read(&mut io, 0xcfc, 4), [0xff; 4]);
    }

    #[test]
    fn io_address_register_ignores_partial_writes_and_reserved_bits() {
        let mut io = PciConfigIo::new(root_with_device());
        io.write(PCI_CONFIG_IO_PORT, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(io_read(&mut io, 0xcf8, 4), 0x80ff_fffcu32.to_le_bytes());
        io.write(PCI_CONFIG_IO_PORT, 3, &[0x01]);
        assert_eq!(io_read(&mut io, 0xcf8, 4), 0x80ff_fffcu32.to_le_bytes());
        assert_eq!(io_read(&mut io, 0xcf8, 1), [0xff]);
    }

    #[test]
    fn io_partial_write_lands_in_the_right_byte() {
        let root = root_with_device();
        let mut io = PciConfigIo::new(root.clone());
        select(&mut io, 1, 0, INTERRUPT_REG as u32);
        io.write(PCI_CONFIG_IO_PORT, 4, &[0x0a]);
        assert_eq!(lock(&root).read_config(0, 1, 0, INTERRUPT_REG) & 0xff, 0x0a);
        io.write(PCI_CONFIG_IO_PORT, 5, &[0x0b]);
        assert_eq!(io_read(&mut io, 0xcfc, 1), [0x0a], "pin stays read-only");
    }

    #[test]
    fn ecam_reaches_extended_space_with_partial_widths() {
        let mut ecam = PciConfigMmio::new(root_with_device());
        let dev1 = 1u64 << 15;
        let mut d = [0u8; 4];
        ecam.read(PCI_ECAM_BASE, dev1, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xabcd_1234);
        ecam.read(PCI_ECAM_BASE, dev1 + 0x104, &mut d);
        assert_eq!(d, [0x11, 0x22, 0x33, 0x44]);
        let mut w = [0u8; 2];
        ecam.read(PCI_ECAM_BASE, dev1 + 0x106, &mut w);
        assert_eq!(w, [0x33, 0x44]);
        let mut b = [0u8; 1];
        ecam.read(PCI_ECAM_BASE, dev1 + 0x101, &mut b);
        assert_eq!(b, [0x00]);
        ecam.read(PCI_ECAM_BASE, dev1 + 0x103, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }

    #[test]
    fn ecam_absent_functions_and_buses_read_all_ones() {
        let mut ecam = PciConfigMmio::new(root_with_device());
        let mut d = [0u8; 4];
        for offset in [2u64 << 15, (1 << 15) | (1 << 12), 1 << 20, 1 << 28] {
            d = [0; 4];
            ecam.read(PCI_ECAM_BASE, offset, &mut d);
            assert_eq!(d, [0xff; 4], "offset {offset:#x}");
        }
        ecam.write(PCI_ECAM_BASE, 2 << 15, &[0; 4]);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn ecam_write_updates_command_register() {
        let root = root_with_device();
        let mut ecam = PciConfigMmio::new(root.clone());
        ecam.write(PCI_ECAM_BASE, (1 << 15) + 4, &[0x06, 0x00]);
        assert_eq!(lock(&root).read_config(0, 1, 0, 1) & 0xffff, 0x0006);
    }
}
