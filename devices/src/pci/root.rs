//! The PCI root complex: bus 0 of segment 0, its host bridge and devices.
//!
//! [`PciRoot`] dispatches configuration accesses (from [`super::PciConfigIo`]
//! and [`super::PciConfigMmio`]) to [`PciDevice`]s and watches BAR
//! programming: when the guest moves a BAR while memory decoding is on, the
//! root asks the [`DeviceRelocation`] (implemented by the `vmm` crate) to move
//! the device's bus range and ioeventfds.
//!
//! Lock ordering: `PciRoot` lock, then a device lock, then whatever the
//! relocation takes (the MMIO bus's range lock). A device never calls into
//! the root.

use iommu::sync::lock;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

use iommu::error::chain;
use log::debug;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::configuration::{
    PciBarInfo, PciBarRegionType, PciConfiguration, PciHeader, BAR0_REG, COMMAND_MEMORY_SPACE,
    COMMAND_REG, NUM_BARS,
};

/// Number of device slots on a bus.
pub const PCI_SLOTS_PER_BUS: u8 = 32;
/// Vendor ID of the host bridge.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Device ID of the host bridge.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
/// Class code of a host bridge.
pub const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;

/// A PCI function address: segment, bus, device and function.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciBdf(u32);

impl PciBdf {
    /// Builds an address; `device` is truncated to 5 bits, `function` to 3.
    pub fn new(segment: u16, bus: u8, device: u8, function: u8) -> Self {
        PciBdf(
            u32::from(segment) << 16
                | u32::from(bus) << 8
                | u32::from(device & 0x1f) << 3
                | u32::from(function & 0x7),
        )
    }

    /// PCI segment (domain).
    pub fn segment(&self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// Bus number.
    pub fn bus(&self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// Device (slot) number.
    pub fn device(&self) -> u8 {
        (self.0 >> 3) as u8 & 0x1f
    }

    /// Function number.
    pub fn function(&self) -> u8 {
        self.0 as u8 & 0x7
    }

    /// The 16-bit requester ID (bus << 8 | device << 3 | function) used by
    /// IOMMUs to identify the function within its segment.
    pub fn requester_id(&self) -> u16 {
        self.0 as u16
    }
}

impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment(),
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

impl fmt::Debug for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PciBdf({self})")
    }
}

/// A PCI function as seen by the root complex.
///
/// Configuration accesses come with the device lock held by the root; BAR
/// accesses arrive separately through the device's [`crate::bus::BusDevice`]
/// implementation on the MMIO bus.
pub trait PciDevice: Send {
    /// Reads dword `reg_idx` (0..1024) of configuration space.
    fn read_config_register(&mut self, reg_idx: usize) -> u32;
    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` (0..4) of dword
    /// `reg_idx`. Invalid accesses are ignored.
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]);
    /// The device's BARs with the addresses currently programmed.
    fn bars(&self) -> Vec<PciBarInfo>;
    /// Called after BAR `index` was moved from `old_base` to `new_base` (the
    /// bus range and ioeventfds have already been moved).
    fn bar_moved(&mut self, index: usize, old_base: u64, new_base: u64) {
        let _ = (index, old_base, new_base);
    }
    /// The ioeventfds the VMM should register for BAR `bar_index` if it
    /// were at `bar_base`, as `(eventfd, guest physical address)` of 4-byte
    /// writes with any value.
    fn bar_ioeventfds(&self, bar_index: usize, bar_base: u64) -> Vec<(&EventFd, u64)> {
        let _ = (bar_index, bar_base);
        Vec::new()
    }
}

/// Moves a device's BAR in the VMM (MMIO bus entry, ioeventfds).
///
/// Called by [`PciRoot`] with the root and device locks held, when the guest
/// changed a BAR address while memory decoding is on (or turned decoding on
/// after changing it). A typical implementation relocates the bus entry with
/// [`crate::bus::Bus::relocate`], then unregisters
/// `dev.bar_ioeventfds(index, old_base)` and registers
/// `dev.bar_ioeventfds(index, new_base)`, where `index` is the entry of
/// `dev.bars()` whose `addr` is `new_base`. It must not lock `dev` again nor
/// call into the root.
pub trait DeviceRelocation: Send + Sync {
    /// Moves the BAR mapped at `old_base` (`len` bytes) of `dev` to
    /// `new_base`. The range `[new_base, new_base + len)` is non-empty, does
    /// not wrap and ends below 2^52 (2^32 for 32-bit BARs). On error the BAR
    /// stays mapped at `old_base` and the root retries on the next BAR or
    /// command write.
    fn move_bar(
        &self,
        old_base: u64,
        new_base: u64,
        len: u64,
        dev: &mut dyn PciDevice,
    ) -> io::Result<()>;
}

/// Errors of the root complex.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PciRootError {
    /// All 31 device slots of bus 0 are used.
    #[error("PCI bus 0 has no free device slot; at most 31 devices fit besides the host bridge")]
    NoFreeSlot,
}

/// A shared PCI device.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

struct PciSlot {
    device: SharedPciDevice,
    /// BARs as the VMM currently maps them.
    mapped: Vec<PciBarInfo>,
}

/// The host bridge at 00:00.0: a header without BARs.
#[derive(Debug)]
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHostBridge {
    /// Creates the host bridge.
    pub fn new() -> Self {
        PciHostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                revision_id: 0,
                class_code: HOST_BRIDGE_CLASS,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl PciDevice for PciHostBridge {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_reg(reg_idx)
    }
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg_idx, offset, data);
    }
    fn bars(&self) -> Vec<PciBarInfo> {
        Vec::new()
    }
}

/// Bus 0 of segment 0: the host bridge in slot 0 and up to 31 devices.
pub struct PciRoot {
    slots: Vec<Option<PciSlot>>,
    relocation: Option<Arc<dyn DeviceRelocation>>,
}

impl fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let used: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_some())
            .collect();
        f.debug_struct("PciRoot").field("slots", &used).finish()
    }
}

impl PciRoot {
    /// Creates bus 0 with the host bridge at 00:00.0. Without `relocation`
    /// guest BAR moves are ignored (the device stays where it was mapped).
    pub fn new(relocation: Option<Arc<dyn DeviceRelocation>>) -> Self {
        let mut slots: Vec<Option<PciSlot>> = (0..PCI_SLOTS_PER_BUS).map(|_| None).collect();
        slots[0] = Some(PciSlot {
            device: Arc::new(Mutex::new(PciHostBridge::new())),
            mapped: Vec::new(),
        });
        PciRoot { slots, relocation }
    }

    /// Sets the relocation handler.
    pub fn set_relocation(&mut self, relocation: Arc<dyn DeviceRelocation>) {
        self.relocation = Some(relocation);
    }

    /// Plugs `device` into the lowest free slot (from 00:01.0) as function 0.
    ///
    /// Allocate and program its BARs first (see [`super::allocate_bars`]):
    /// the addresses it reports now are taken as where the VMM maps it.
    /// BARs at address 0 are treated as unmapped and are never relocated.
    pub fn add_device(&mut self, device: SharedPciDevice) -> Result<PciBdf, PciRootError> {
        let bdf = self.next_free_bdf().ok_or(PciRootError::NoFreeSlot)?;
        let slot = usize::from(bdf.device());
        let mapped = lock(&device)
            .bars()
            .into_iter()
            .filter(|b| b.addr != 0)
            .collect();
        self.slots[slot] = Some(PciSlot { device, mapped });
        Ok(bdf)
    }

    /// Where [`PciRoot::add_device`] will plug the next device (its
    /// requester id is needed before the device exists, e.g. for its ATS
    /// listener); `None` when the bus is full.
    pub fn next_free_bdf(&self) -> Option<PciBdf> {
        let slot = (1..self.slots.len()).find(|&i| self.slots[i].is_none())?;
        Some(PciBdf::new(0, 0, slot as u8, 0))
    }

    /// The device at `bdf`, if any.
    pub fn device(&self, bdf: PciBdf) -> Option<SharedPciDevice> {
        self.slot(bdf.bus(), bdf.device(), bdf.function())
            .map(|s| s.device.clone())
    }

    fn slot(&self, bus: u8, device: u8, function: u8) -> Option<&PciSlot> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(device))?.as_ref()
    }

    /// Reads dword `reg_idx` of a function; absent functions read all ones.
    pub fn read_config(&self, bus: u8, device: u8, function: u8, reg_idx: usize) -> u32 {
        match self.slot(bus, device, function) {
            Some(slot) => lock(&slot.device).read_config_register(reg_idx),
            None => u32::MAX,
        }
    }

    /// Writes a function's configuration space; writes to absent functions
    /// are dropped. Moves BARs the guest reprogrammed while decoding is on.
    pub fn write_config(
        &mut self,
        bus: u8,
        device: u8,
        function: u8,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) {
        if bus != 0 || function != 0 {
            return;
        }
        let relocation = self.relocation.clone();
        let Some(Some(slot)) = self.slots.get_mut(usize::from(device)) else {
            return;
        };
        let shared = slot.device.clone();
        let mut dev = lock(&shared);
        dev.write_config_register(reg_idx, offset, data);
        let bar_regs = BAR0_REG..BAR0_REG + NUM_BARS;
        if reg_idx == COMMAND_REG || bar_regs.contains(&reg_idx) {
            let dev: &mut dyn PciDevice = &mut *dev;
            update_bar_mappings(slot, dev, relocation.as_deref());
        }
    }
}

/// Moves every BAR whose programmed address differs from where it is
/// mapped, if memory decoding is enabled and the new range is usable.
fn update_bar_mappings(
    slot: &mut PciSlot,
    dev: &mut dyn PciDevice,
    relocation: Option<&dyn DeviceRelocation>,
) {
    if dev.read_config_register(COMMAND_REG) & COMMAND_MEMORY_SPACE == 0 {
        return;
    }
    for bar in dev.bars() {
        let Some(mapped) = slot.mapped.iter_mut().find(|m| m.index == bar.index) else {
            continue;
        };
        if bar.addr == mapped.addr || !usable_bar_range(&bar) {
            continue;
        }
        let Some(relocation) = relocation else {
            debug!("pci: no relocation handler, BAR {} stays put", bar.index);
            continue;
        };
        let old = mapped.addr;
        match relocation.move_bar(old, bar.addr, bar.size, dev) {
            Ok(()) => {
                mapped.addr = bar.addr;
                dev.bar_moved(bar.index, old, bar.addr);
            }
            Err(e) => debug!(
                "pci: cannot move BAR {} from {old:#x} to {:#x}: {e}",
                bar.index,
                bar.addr,
                e = chain(&e)
            ),
        }
    }
}

/// Highest guest physical address (exclusive) a BAR may reach: x86-64
/// physical addresses have at most 52 bits.
const MAX_BAR_END: u64 = 1 << 52;

/// A BAR address is usable when it is non-zero, the range does not wrap,
/// stays below the BAR's address limit and does not end on a 4 GiB boundary.
/// The last rule filters the transient patterns of BAR sizing (all-ones in
/// the low or high register), at the cost of refusing BARs placed flush
/// against a 4 GiB boundary while decoding is on.
fn usable_bar_range(bar: &PciBarInfo) -> bool {
    let limit = match bar.region_type {
        PciBarRegionType::Memory32 => 1u64 << 32,
        PciBarRegionType::Memory64 => MAX_BAR_END,
    };
    let Some(end) = bar.addr.checked_add(bar.size) else {
        return false;
    };
    bar.addr != 0 && end <= limit && (bar.size >= 1 << 32 || end % (1 << 32) != 0)
}

#[cfg(test)]
pub(crate) mod test_utils {
    use super::*;

    /// A device with one configuration space and nothing else.
    pub struct TestDevice {
        pub config: PciConfiguration,
        pub moves: Vec<(usize, u64, u64)>,
    }

    impl TestDevice {
        pub fn new(device_id: u16) -> Self {
            TestDevice {
                config: PciConfiguration::new(&PciHeader {
                    vendor_id: 0x1234,
                    device_id,
                    revision_id: 0,
                    class_code: 0xff0000,
                    subsystem_vendor_id: 0,
                    subsystem_id: 0,
                }),
                moves: Vec::new(),
            }
        }
    }

    impl PciDevice for TestDevice {
        fn read_config_register(&mut self, reg_idx: usize) -> u32 {
            self.config.read_reg(reg_idx)
        }
        fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
            self.config.write_reg(reg_idx, offset, data);
        }
        fn bars(&self) -> Vec<PciBarInfo> {
            self.config.bars()
        }
        fn bar_moved(&mut self, index: usize, old_base: u64, new_base: u64) {
            self.moves.push((index, old_base, new_base));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::test_utils::TestDevice;
    use super::*;

    #[derive(Default)]
    struct RecordingRelocation {
        moves: Mutex<Vec<(u64, u64, u64)>>,
        fail: bool,
    }

    impl DeviceRelocation for RecordingRelocation {
        fn move_bar(
            &self,
            old: u64,
            new: u64,
            len: u64,
            dev: &mut dyn PciDevice,
        ) -> io::Result<()> {
            // The device is reachable (and locked by the root) during the move.
            assert!(dev.bars().iter().any(|b| b.addr == new));
            lock(&self.moves).push((old, new, len));
            if self.fail {
                return Err(io::Error::other("overlap"));
            }
            Ok(())
        }
    }

    fn root_with_bar(
        region_type: PciBarRegionType,
        fail: bool,
    ) -> (PciRoot, Arc<RecordingRelocation>, Arc<Mutex<TestDevice>>) {
        let reloc = Arc::new(RecordingRelocation {
            fail,
            ..Default::default()
        });
        let mut root = PciRoot::new(Some(reloc.clone()));
        let mut dev = TestDevice::new(7);
        dev.config
            .add_bar(0, 0x1000, region_type, false, 0xc000_0000)
            .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        assert_eq!(root.add_device(dev.clone()).unwrap().device(), 1);
        (root, reloc, dev)
    }

    fn write32(root: &mut PciRoot, reg: usize, v: u32) {
        root.write_config(0, 1, 0, reg, 0, &v.to_le_bytes());
    }

    #[test]
    fn bdf_packs_and_formats() {
        let bdf = PciBdf::new(1, 2, 3, 4);
        assert_eq!(
            (bdf.segment(), bdf.bus(), bdf.device(), bdf.function()),
            (1, 2, 3, 4)
        );
        assert_eq!(bdf.requester_id(), 0x021c);
        assert_eq!(bdf.to_string(), "0001:02:03.4");
    }

    #[test]
    fn host_bridge_sits_at_slot_zero_and_devices_follow() {
        let mut root = PciRoot::new(None);
        assert_eq!(root.read_config(0, 0, 0, 0), 0x0d57_8086);
        assert_eq!(root.read_config(0, 0, 0, 2) >> 8, HOST_BRIDGE_CLASS);
        assert_eq!(root.read_config(0, 1, 0, 0), u32::MAX);
        let bdf = root
            .add_device(Arc::new(Mutex::new(TestDevice::new(9))))
            .unwrap();
        assert_eq!(bdf, PciBdf::new(0, 0, 1, 0));
        assert_eq!(root.read_config(0, 1, 0, 0), 0x0009_1234);
        assert_eq!(root.read_config(0, 1, 1, 0), u32::MAX);
        assert_eq!(root.read_config(1, 1, 0, 0), u32::MAX);
        assert!(root.device(bdf).is_some());
    }

    #[test]
    fn bus_holds_at_most_31_devices() {
        let mut root = PciRoot::new(None);
        for _ in 1..32 {
            root.add_device(Arc::new(Mutex::new(TestDevice::new(1))))
                .unwrap();
        }
        assert_eq!(
            root.add_device(Arc::new(Mutex::new(TestDevice::new(1)))),
            Err(PciRootError::NoFreeSlot)
        );
    }

    #[test]
    fn bar_move_with_decode_on_calls_relocation() {
        let (mut root, reloc, dev) = root_with_bar(PciBarRegionType::Memory32, false);
        write32(&mut root, COMMAND_REG, COMMAND_MEMORY_SPACE);
        write32(&mut root, BAR0_REG, 0xc010_0000);
        assert_eq!(
            *lock(&reloc.moves),
            vec![(0xc000_0000, 0xc010_0000, 0x1000)]
        );
        assert_eq!(lock(&dev).moves, vec![(0, 0xc000_0000, 0xc010_0000)]);
    }

    #[test]
    fn bar_move_with_decode_off_waits_for_decode_on() {
        let (mut root, reloc, _dev) = root_with_bar(PciBarRegionType::Memory64, false);
        write32(&mut root, BAR0_REG, 0xd000_0000);
        write32(&mut root, BAR0_REG + 1, 0x1);
        assert!(lock(&reloc.moves).is_empty());
        write32(&mut root, COMMAND_REG, COMMAND_MEMORY_SPACE);
        assert_eq!(
            *lock(&reloc.moves),
            vec![(0xc000_0000, 0x1_d000_0000, 0x1000)]
        );
    }

    #[test]
    fn sizing_and_zero_addresses_never_relocate() {
        let (mut root, reloc, _dev) = root_with_bar(PciBarRegionType::Memory32, false);
        write32(&mut root, COMMAND_REG, COMMAND_MEMORY_SPACE);
        write32(&mut root, BAR0_REG, u32::MAX);
        write32(&mut root, BAR0_REG, 0);
        assert!(lock(&reloc.moves).is_empty());
        let (mut root, reloc, _dev) = root_with_bar(PciBarRegionType::Memory64, false);
        write32(&mut root, COMMAND_REG, COMMAND_MEMORY_SPACE);
        write32(&mut root, BAR0_REG, u32::MAX);
        write32(&mut root, BAR0_REG + 1, u32::MAX);
        write32(&mut root, BAR0_REG, 0xc000_0000);
        write32(&mut root, BAR0_REG + 1, u32::MAX);
        assert!(lock(&reloc.moves).is_empty());
        write32(&mut root, BAR0_REG + 1, 0);
        assert!(lock(&reloc.moves).is_empty(), "back home is no move");
    }

    #[test]
    fn failed_relocation_keeps_old_mapping_and_retries() {
        let (mut root, reloc, dev) = root_with_bar(PciBarRegionType::Memory32, true);
        write32(&mut root, COMMAND_REG, COMMAND_MEMORY_SPACE);
        write32(&mut root, BAR0_REG, 0xc010_0000);
        assert!(lock(&dev).moves.is_empty());
        // The next attempt still moves from the old, really mapped base.
        write32(&mut root, BAR0_REG, 0xc020_0000);
        assert_eq!(lock(&reloc.moves)[1], (0xc000_0000, 0xc020_0000, 0x1000));
    }
}
