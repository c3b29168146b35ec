//! A PCI type-0 configuration space with writable-mask semantics.
//!
//! The space is 4 KiB: the 256-byte conventional header and capability area
//! plus the PCI Express extended area. Each dword has a writable mask; guest
//! writes only change masked bits, which also implements BAR sizing (writing
//! all-ones to a BAR reads back the size mask and the read-only flag bits).
//!
//! Capabilities are appended with [`PciConfiguration::add_capability`]
//! (0x40..0x100) and [`PciConfiguration::add_extended_capability`]
//! (0x100..0x1000); both keep the linked lists consistent.

use thiserror::Error;

/// Size of the conventional configuration space in bytes.
pub const PCI_CONFIG_SPACE_SIZE: usize = 256;
/// Size of the PCI Express (extended) configuration space in bytes.
pub const PCIE_CONFIG_SPACE_SIZE: usize = 4096;
/// Number of dword registers in the configuration space.
pub const NUM_CONFIG_REGISTERS: usize = PCIE_CONFIG_SPACE_SIZE / 4;
/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Dword index of the command (low 16 bits) and status (high 16) register.
pub const COMMAND_REG: usize = 1;
/// Command register bit: memory space decode enabled.
pub const COMMAND_MEMORY_SPACE: u32 = 1 << 1;
/// Dword index of BAR 0.
pub const BAR0_REG: usize = 4;
/// Dword index of the capability pointer.
pub const CAPABILITY_POINTER_REG: usize = 0x34 / 4;
/// Dword index of interrupt line/pin.
pub const INTERRUPT_REG: usize = 0x3c / 4;

/// Command bits a guest may change: I/O, memory, bus master, parity error
/// response, SERR# enable and INTx disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Status bit: the capability list is valid.
const STATUS_CAP_LIST: u32 = 1 << 20;
const FIRST_CAPABILITY: usize = 0x40;
const FIRST_EXTENDED_CAPABILITY: usize = 0x100;
const BAR_MEM_64BIT: u32 = 0b10 << 1;
const BAR_PREFETCHABLE: u32 = 1 << 3;
const BAR_FLAG_MASK: u32 = 0xf;
const MIN_BAR_SIZE: u64 = 16;

/// Errors building a configuration space.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciConfigError {
    /// A BAR index is out of range (a 64-bit BAR needs index and index + 1).
    #[error("BAR index {0} is out of range; use 0..=5 (0..=4 for 64-bit BARs)")]
    BarIndex(usize),
    /// The BAR register(s) are already in use.
    #[error("BAR {0} is already defined; pick a free BAR index")]
    BarInUse(usize),
    /// The BAR size is not a power of two of at least 16 bytes, or too large
    /// for a 32-bit BAR.
    #[error("BAR size {0:#x} is invalid; it must be a power of two >= 16 (< 4 GiB for 32-bit)")]
    BarSize(u64),
    /// The BAR address is not aligned to its size or does not fit the BAR.
    #[error("BAR address {addr:#x} does not fit a BAR of size {size:#x}; align it to the size")]
    BarAddress {
        /// Requested address.
        addr: u64,
        /// BAR size.
        size: u64,
    },
    /// No room left for a capability of this size.
    #[error("no room for a {len}-byte capability; the capability area is full")]
    CapabilitySpace {
        /// Size of the capability including its header.
        len: usize,
    },
    /// A writable mask does not have the length of the capability body.
    #[error("writable mask length {mask} differs from capability body length {body}")]
    CapabilityMask {
        /// Body length.
        body: usize,
        /// Mask length.
        mask: usize,
    },
}

/// The kind of a memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciBarRegionType {
    /// A 32-bit memory BAR (one register).
    Memory32,
    /// A 64-bit memory BAR (two registers).
    Memory64,
}

/// A BAR as defined by its device and as currently programmed by the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarInfo {
    /// BAR index (the low register for 64-bit BARs).
    pub index: usize,
    /// Address currently programmed (may be a sizing pattern or 0).
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// 32- or 64-bit memory BAR.
    pub region_type: PciBarRegionType,
    /// The prefetchable flag.
    pub prefetchable: bool,
}

/// Header fields of a type-0 function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Class code (base class << 16 | subclass << 8 | programming interface).
    pub class_code: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug)]
struct BarDef {
    size: u64,
    region_type: PciBarRegionType,
    prefetchable: bool,
}

/// A PCI type-0 configuration space.
#[derive(Clone)]
pub struct PciConfiguration {
    registers: Box<[u32; NUM_CONFIG_REGISTERS]>,
    writable: Box<[u32; NUM_CONFIG_REGISTERS]>,
    bars: [Option<BarDef>; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
    last_extended_capability: Option<usize>,
    next_extended_capability: usize,
}

impl std::fmt::Debug for PciConfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfiguration")
            .field("id", &format_args!("{:#010x}", self.registers[0]))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl PciConfiguration {
    /// Creates a single-function type-0 header with no BARs or capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut cfg = PciConfiguration {
            registers: Box::new([0; NUM_CONFIG_REGISTERS]),
            writable: Box::new([0; NUM_CONFIG_REGISTERS]),
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
            last_extended_capability: None,
            next_extended_capability: FIRST_EXTENDED_CAPABILITY,
        };
        cfg.registers[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        cfg.registers[2] = (header.class_code & 0x00ff_ffff) << 8 | u32::from(header.revision_id);
        cfg.registers[0x2c / 4] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        cfg.writable[COMMAND_REG] = COMMAND_WRITABLE;
        // Cache line size and latency timer are plain storage for the guest.
        cfg.writable[3] = 0x0000_ffff;
        // Interrupt line is scratch storage for the guest; the pin is fixed.
        cfg.writable[INTERRUPT_REG] = 0x0000_00ff;
        cfg
    }

    /// Sets the interrupt pin (0 = none, 1..=4 = INTA#..INTD#) and line.
    pub fn set_interrupt(&mut self, line: u8, pin: u8) {
        let reg = &mut self.registers[INTERRUPT_REG];
        *reg = (*reg & 0xffff_0000) | u32::from(pin) << 8 | u32::from(line);
    }

    /// Reads one dword; indices past the space read as all ones.
    pub fn read_reg(&self, reg_idx: usize) -> u32 {
        self.registers.get(reg_idx).copied().unwrap_or(u32::MAX)
    }

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within dword
    /// `reg_idx`, honouring the writable mask. Other sizes, accesses crossing
    /// the dword and indices past the space are ignored.
    pub fn write_reg(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        let Some((value, mask)) = merge_partial(offset, data) else {
            return;
        };
        let (Some(reg), Some(writable)) =
            (self.registers.get_mut(reg_idx), self.writable.get(reg_idx))
        else {
            return;
        };
        let mask = mask & writable;
        *reg = (*reg & !mask) | (value & mask);
    }

    /// Overwrites a whole dword, ignoring the writable mask (device side).
    pub fn set_reg(&mut self, reg_idx: usize, value: u32) {
        if let Some(reg) = self.registers.get_mut(reg_idx) {
            *reg = value;
        }
    }

    /// Makes `mask` bits of dword `reg_idx` guest-writable (device side).
    pub fn set_writable_mask(&mut self, reg_idx: usize, mask: u32) {
        if let Some(w) = self.writable.get_mut(reg_idx) {
            *w = mask;
        }
    }

    /// Defines a memory BAR of `size` bytes at `addr` (0 = unassigned).
    pub fn add_bar(
        &mut self,
        index: usize,
        size: u64,
        region_type: PciBarRegionType,
        prefetchable: bool,
        addr: u64,
    ) -> Result<(), PciConfigError> {
        let regs = match region_type {
            PciBarRegionType::Memory32 => 1,
            PciBarRegionType::Memory64 => 2,
        };
        if index + regs > NUM_BARS {
            return Err(PciConfigError::BarIndex(index));
        }
        if let Some(busy) = (index..index + regs).find(|&i| self.bar_reg_used(i)) {
            return Err(PciConfigError::BarInUse(busy));
        }
        let max = match region_type {
            PciBarRegionType::Memory32 => 1 << 31,
            PciBarRegionType::Memory64 => 1 << 63,
        };
        if !size.is_power_of_two() || !(MIN_BAR_SIZE..=max).contains(&size) {
            return Err(PciConfigError::BarSize(size));
        }
        if addr & (size - 1) != 0 || (regs == 1 && addr > u64::from(u32::MAX)) {
            return Err(PciConfigError::BarAddress { addr, size });
        }
        let mut flags = if prefetchable { BAR_PREFETCHABLE } else { 0 };
        if regs == 2 {
            flags |= BAR_MEM_64BIT;
        }
        let size_mask = !(size - 1);
        self.registers[BAR0_REG + index] = (addr as u32 & !BAR_FLAG_MASK) | flags;
        self.writable[BAR0_REG + index] = size_mask as u32 & !BAR_FLAG_MASK;
        if regs == 2 {
            self.registers[BAR0_REG + index + 1] = (addr >> 32) as u32;
            self.writable[BAR0_REG + index + 1] = (size_mask >> 32) as u32;
        }
        self.bars[index] = Some(BarDef {
            size,
            region_type,
            prefetchable,
        });
        Ok(())
    }

    fn bar_reg_used(&self, reg: usize) -> bool {
        self.bars[reg].is_some()
            || (reg > 0
                && matches!(
                    self.bars[reg - 1],
                    Some(BarDef {
                        region_type: PciBarRegionType::Memory64,
                        ..
                    })
                ))
    }

    /// The address currently programmed in BAR `index` (flags stripped).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let def = self.bars.get(index).copied().flatten()?;
        let low = u64::from(self.registers[BAR0_REG + index] & !BAR_FLAG_MASK);
        Some(match def.region_type {
            PciBarRegionType::Memory32 => low,
            PciBarRegionType::Memory64 => {
                u64::from(self.registers[BAR0_REG + index + 1]) << 32 | low
            }
        })
    }

    /// All defined BARs with their current addresses.
    pub fn bars(&self) -> Vec<PciBarInfo> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(index, def)| {
                let def = (*def)?;
                Some(PciBarInfo {
                    index,
                    addr: self.bar_address(index)?,
                    size: def.size,
                    region_type: def.region_type,
                    prefetchable: def.prefetchable,
                })
            })
            .collect()
    }

    /// True when the guest enabled memory space decoding.
    pub fn memory_enabled(&self) -> bool {
        self.registers[COMMAND_REG] & COMMAND_MEMORY_SPACE != 0
    }

    /// Appends a standard capability with ID `cap_id`.
    ///
    /// `body` is everything after the two-byte ID/next header; `writable` is
    /// an optional byte mask of the same length marking guest-writable bits.
    /// Returns the capability's offset in configuration space.
    pub fn add_capability(
        &mut self,
        cap_id: u8,
        body: &[u8],
        writable: Option<&[u8]>,
    ) -> Result<usize, PciConfigError> {
        check_mask(body, writable)?;
        let len = body.len() + 2;
        let offset = self.next_capability;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= PCI_CONFIG_SPACE_SIZE)
            .ok_or(PciConfigError::CapabilitySpace { len })?;
        self.store_bytes(offset, &[cap_id, 0]);
        self.store_bytes(offset + 2, body);
        if let Some(mask) = writable {
            self.store_mask(offset + 2, mask);
        }
        match self.last_capability {
            Some(prev) => self.store_bytes(prev + 1, &[offset as u8]),
            None => {
                self.registers[CAPABILITY_POINTER_REG] = offset as u32;
                self.registers[COMMAND_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = align4(end);
        Ok(offset)
    }

    /// Appends a PCI Express extended capability (`cap_id`, `version`).
    ///
    /// `body` follows the 4-byte header. The guest only looks at extended
    /// capabilities of devices that also carry a PCI Express capability and
    /// are reached through ECAM. Returns the capability's offset.
    pub fn add_extended_capability(
        &mut self,
        cap_id: u16,
        version: u8,
        body: &[u8],
        writable: Option<&[u8]>,
    ) -> Result<usize, PciConfigError> {
        check_mask(body, writable)?;
        let len = body.len() + 4;
        let offset = self.next_extended_capability;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= PCIE_CONFIG_SPACE_SIZE)
            .ok_or(PciConfigError::CapabilitySpace { len })?;
        self.registers[offset / 4] = u32::from(version & 0xf) << 16 | u32::from(cap_id);
        self.store_bytes(offset + 4, body);
        if let Some(mask) = writable {
            self.store_mask(offset + 4, mask);
        }
        if let Some(prev) = self.last_extended_capability {
            self.registers[prev / 4] |= (offset as u32) << 20;
        }
        self.last_extended_capability = Some(offset);
        self.next_extended_capability = align4(end);
        Ok(offset)
    }

    fn store_bytes(&mut self, offset: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let pos = offset + i;
            let shift = (pos % 4) * 8;
            let reg = &mut self.registers[pos / 4];
            *reg = (*reg & !(0xff << shift)) | u32::from(*b) << shift;
        }
    }

    fn store_mask(&mut self, offset: usize, mask: &[u8]) {
        for (i, b) in mask.iter().enumerate() {
            let pos = offset + i;
            let shift = (pos % 4) * 8;
            let reg = &mut self.writable[pos / 4];
            *reg = (*reg & !(0xff << shift)) | u32::from(*b) << shift;
        }
    }
}

fn check_mask(body: &[u8], writable: Option<&[u8]>) -> Result<(), PciConfigError> {
    match writable {
        Some(mask) if mask.len() != body.len() => Err(PciConfigError::CapabilityMask {
            body: body.len(),
            mask: mask.len(),
        }),
        _ => Ok(()),
    }
}

fn align4(v: usize) -> usize {
    (v + 3) & !3
}

/// True for a 1-, 2- or 4-byte access at byte `offset` within one dword.
fn fits_in_dword(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.checked_add(len as u64).is_some_and(|end| end <= 4)
}

/// Turns a 1/2/4-byte access at byte `offset` of a dword into a shifted
/// value and the mask of the bytes it covers. `None` for other sizes or
/// accesses crossing the dword.
pub fn merge_partial(offset: u64, data: &[u8]) -> Option<(u32, u32)> {
    if !fits_in_dword(offset, data.len()) {
        return None;
    }
    let mut bytes = [0u8; 4];
    bytes[..data.len()].copy_from_slice(data);
    let shift = offset * 8;
    let value = u32::from_le_bytes(bytes) << shift;
    let mask = (u64::from(u32::MAX) >> (32 - data.len() * 8)) as u32;
    Some((value, mask << shift))
}

/// Copies the bytes of `value` that a `data.len()`-byte read at byte
/// `offset` of a dword returns; invalid sizes read as all ones.
pub fn extract_partial(value: u32, offset: u64, data: &mut [u8]) {
    if !fits_in_dword(offset, data.len()) {
        data.fill(0xff);
        return;
    }
    let bytes = (value >> (offset * 8)).to_le_bytes();
    data.copy_from_slice(&bytes[..data.len()]);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1059,
            revision_id: 1,
            class_code: 0x088000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut cfg = PciConfiguration::new(&header());
        assert_eq!(cfg.read_reg(0), 0x1059_1af4);
        assert_eq!(cfg.read_reg(2), 0x0880_0001);
        assert_eq!(cfg.read_reg(0x2c / 4), 0x0040_1af4);
        cfg.write_reg(0, 0, &[0; 4]);
        cfg.write_reg(2, 0, &[0; 4]);
        assert_eq!(cfg.read_reg(0), 0x1059_1af4);
        assert_eq!(cfg.read_reg(2), 0x0880_0001);
    }

    #[test]
    fn command_register_only_accepts_defined_bits() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.write_reg(COMMAND_REG, 0, &[0xff, 0xff]);
        assert_eq!(cfg.read_reg(COMMAND_REG) & 0xffff, COMMAND_WRITABLE);
        assert!(cfg.memory_enabled());
        // Status is read-only: a write to the upper half changes nothing.
        cfg.write_reg(COMMAND_REG, 2, &[0xff, 0xff]);
        assert_eq!(cfg.read_reg(COMMAND_REG) >> 16, 0);
    }

    #[test]
    fn partial_writes_touch_only_their_bytes() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.set_interrupt(0, 1);
        cfg.write_reg(INTERRUPT_REG, 0, &[0x0b]);
        cfg.write_reg(INTERRUPT_REG, 1, &[0x04]);
        assert_eq!(cfg.read_reg(INTERRUPT_REG) & 0xffff, 0x010b);
        // Crossing the dword and odd sizes are dropped.
        cfg.write_reg(INTERRUPT_REG, 3, &[1, 2]);
        cfg.write_reg(INTERRUPT_REG, 0, &[1, 2, 3]);
        assert_eq!(cfg.read_reg(INTERRUPT_REG) & 0xffff, 0x010b);
    }

    #[test]
    fn bar32_sizing_reads_back_mask_and_flags() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.add_bar(1, 0x1000, PciBarRegionType::Memory32, true, 0xc000_0000)
            .unwrap();
        let reg = BAR0_REG + 1;
        assert_eq!(cfg.read_reg(reg), 0xc000_0008);
        cfg.write_reg(reg, 0, &u32::MAX.to_le_bytes());
        assert_eq!(cfg.read_reg(reg), 0xffff_f008);
        cfg.write_reg(reg, 0, &0xc010_0000u32.to_le_bytes());
        assert_eq!(cfg.bar_address(1), Some(0xc010_0000));
        // Unaligned bits are dropped by the mask.
        cfg.write_reg(reg, 0, &0xc010_0123u32.to_le_bytes());
        assert_eq!(cfg.bar_address(1), Some(0xc010_0000));
    }

    #[test]
    fn bar64_sizing_covers_both_registers() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.add_bar(0, 0x4000, PciBarRegionType::Memory64, false, 0)
            .unwrap();
        assert_eq!(cfg.read_reg(BAR0_REG), 0x4);
        cfg.write_reg(BAR0_REG, 0, &u32::MAX.to_le_bytes());
        cfg.write_reg(BAR0_REG + 1, 0, &u32::MAX.to_le_bytes());
        assert_eq!(cfg.read_reg(BAR0_REG), 0xffff_c004);
        assert_eq!(cfg.read_reg(BAR0_REG + 1), 0xffff_ffff);
        cfg.write_reg(BAR0_REG, 0, &0xd000_0000u32.to_le_bytes());
        cfg.write_reg(BAR0_REG + 1, 0, &1u32.to_le_bytes());
        assert_eq!(cfg.bar_address(0), Some(0x1_d000_0000));
        let bars = cfg.bars();
        assert_eq!(bars.len(), 1);
        assert_eq!(bars[0].size, 0x4000);
        assert_eq!(bars[0].region_type, PciBarRegionType::Memory64);
    }

    #[test]
    fn large_bar64_high_register_sizing() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.add_bar(2, 1 << 33, PciBarRegionType::Memory64, true, 0)
            .unwrap();
        cfg.write_reg(BAR0_REG + 2, 0, &u32::MAX.to_le_bytes());
        cfg.write_reg(BAR0_REG + 3, 0, &u32::MAX.to_le_bytes());
        assert_eq!(cfg.read_reg(BAR0_REG + 2), 0x0000_000c);
        assert_eq!(cfg.read_reg(BAR0_REG + 3), 0xffff_fffe);
    }

    #[test]
    fn invalid_bar_definitions_are_rejected() {
        let mut cfg = PciConfiguration::new(&header());
        let t32 = PciBarRegionType::Memory32;
        let t64 = PciBarRegionType::Memory64;
        assert_eq!(
            cfg.add_bar(5, 0x1000, t64, false, 0),
            Err(PciConfigError::BarIndex(5))
        );
        assert_eq!(
            cfg.add_bar(0, 0x1800, t32, false, 0),
            Err(PciConfigError::BarSize(0x1800))
        );
        assert_eq!(
            cfg.add_bar(0, 8, t32, false, 0),
            Err(PciConfigError::BarSize(8))
        );
        assert!(matches!(
            cfg.add_bar(0, 0x1000, t32, false, 0x800),
            Err(PciConfigError::BarAddress { .. })
        ));
        cfg.add_bar(0, 0x1000, t64, false, 0).unwrap();
        assert_eq!(
            cfg.add_bar(1, 0x1000, t32, false, 0),
            Err(PciConfigError::BarInUse(1))
        );
        assert_eq!(
            cfg.add_bar(0, 0x1000, t32, false, 0),
            Err(PciConfigError::BarInUse(0))
        );
    }

    #[test]
    fn capability_chain_links_and_sets_status_bit() {
        let mut cfg = PciConfiguration::new(&header());
        assert_eq!(cfg.read_reg(COMMAND_REG) & STATUS_CAP_LIST, 0);
        let a = cfg.add_capability(0x09, &[0xaa; 3], None).unwrap();
        let b = cfg
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], None)
            .unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(cfg.read_reg(CAPABILITY_POINTER_REG) & 0xff, 0x40);
        assert_ne!(cfg.read_reg(COMMAND_REG) & STATUS_CAP_LIST, 0);
        assert_eq!(cfg.read_reg(0x40 / 4), 0xaaaa_4809);
        assert_eq!(cfg.read_reg(0x48 / 4), 0x0201_0011);
    }

    #[test]
    fn capability_writable_mask_applies_to_body_only() {
        let mut cfg = PciConfiguration::new(&header());
        let off = cfg
            .add_capability(0x11, &[0, 0], Some(&[0x00, 0xc0]))
            .unwrap();
        cfg.write_reg(off / 4, 0, &[0xff; 4]);
        assert_eq!(cfg.read_reg(off / 4), 0xc000_0011);
        assert_eq!(
            cfg.add_capability(0x11, &[0, 0], Some(&[0])),
            Err(PciConfigError::CapabilityMask { body: 2, mask: 1 })
        );
    }

    #[test]
    fn capability_area_overflow_is_an_error() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.add_capability(0x09, &[0; 0xbe], None).unwrap();
        assert_eq!(
            cfg.add_capability(0x09, &[0; 2], None),
            Err(PciConfigError::CapabilitySpace { len: 4 })
        );
    }

    #[test]
    fn extended_capabilities_chain_from_0x100() {
        let mut cfg = PciConfiguration::new(&header());
        let ats = cfg.add_extended_capability(0x0f, 1, &[0; 4], None).unwrap();
        let next = cfg.add_extended_capability(0x0b, 1, &[0; 8], None).unwrap();
        assert_eq!((ats, next), (0x100, 0x108));
        assert_eq!(cfg.read_reg(0x100 / 4), 0x1081_000f);
        assert_eq!(cfg.read_reg(0x108 / 4), 0x0001_000b);
        assert_eq!(cfg.read_reg(NUM_CONFIG_REGISTERS), u32::MAX);
    }

    #[test]
    fn partial_helpers_round_trip() {
        assert_eq!(
            merge_partial(2, &[0x34, 0x12]),
            Some((0x1234_0000, 0xffff_0000))
        );
        assert_eq!(merge_partial(3, &[1, 2]), None);
        assert_eq!(merge_partial(u64::MAX, &[1]), None);
        let mut two = [0u8; 2];
        extract_partial(0x1234_5678, 1, &mut two);
        assert_eq!(two, [0x56, 0x34]);
        let mut bad = [0u8; 3];
        extract_partial(0, 0, &mut bad);
        assert_eq!(bad, [0xff; 3]);
    }
}
