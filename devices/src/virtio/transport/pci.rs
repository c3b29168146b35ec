//! The modern (virtio 1.x) virtio-pci transport.
//!
//! [`VirtioPciDevice`] wraps a [`VirtioDevice`] into a PCI function with one
//! 64-bit memory BAR (BAR 0) laid out as:
//!
//! | Offset | Content |
//! | --- | --- |
//! | 0x0000 | common configuration (`virtio_pci_common_cfg`) |
//! | 0x1000 | ISR status byte (read clears) |
//! | 0x2000 | device-specific configuration |
//! | 0x3000 | notify area: queue *n* at 0x3000 + 4 *n* (`notify_off_multiplier` 4) |
//! | 0x4000 | MSI-X table, then the PBA on the next page |
//!
//! Vendor capabilities (common, ISR, device, notify and the PCI
//! configuration access window) come first at 0x40, then MSI-X. MSI-X has
//! one vector per queue plus one for configuration changes.
//!
//! The `vmm` crate registers the device twice: in the PCI root (as a
//! [`PciDevice`]) and on the MMIO bus at BAR 0 (as a [`BusDevice`]), and
//! registers KVM ioeventfds from [`VirtioPciDevice::ioeventfds`] without
//! data match and with any access width (Linux notifies with 2-byte writes).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use iommu::error::chain;
use iommu::sync::lock;
use log::{debug, warn};
use thiserror::Error;
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::common_config::{StatusAction, VirtioPciCommonConfig, COMMON_CONFIG_LEN};
use super::interrupt::{InterruptState, VirtioPciInterrupt};
use crate::bus::BusDevice;
use crate::interrupt::{IrqfdRouter, MsiSink};
use crate::pci::ats::{Ats, AtsListener};
use crate::pci::configuration::{
    PciBarInfo, PciBarRegionType, PciConfigError, PciConfiguration, PciHeader,
};
use crate::pci::msix::{
    msix_cap_body, msix_cap_writable_mask, MsixConfig, MsixError, MsixIrqfds, MSIX_CAP_ID,
};
use crate::pci::root::PciDevice;
use crate::virtio::device::{
    ActivateContext, GuestMemoryMmap, VirtioDevice, VirtioDeviceError, VirtioInterruptType,
};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio device IDs are this base plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem ID of non-transitional devices (spec: 0x40 or higher).
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x0040;
/// Offset of the common configuration in BAR 0.
pub const COMMON_CONFIG_OFFSET: u64 = 0x0000;
/// Offset of the ISR byte in BAR 0.
pub const ISR_CONFIG_OFFSET: u64 = 0x1000;
/// Offset of the device-specific configuration in BAR 0.
pub const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
/// Offset of the notify area in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Largest device-specific configuration.
pub const MAX_DEVICE_CONFIG_LEN: usize = 0x1000;
/// Most queues the notify area holds.
pub const MAX_QUEUES: usize = 0x1000 / NOTIFY_OFF_MULTIPLIER as usize;

const PAGE: u64 = 0x1000;
const MIN_BAR_SIZE: u64 = 0x4000;
const VENDOR_CAP_ID: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Transport features this transport cannot support (packed rings,
/// notification data, SR-IOV, ring reset, admin queues) never reach the guest.
const UNSUPPORTED_TRANSPORT_FEATURES: u64 =
    1 << 34 | 1 << 37 | 1 << 38 | 1 << 39 | 1 << 40 | 1 << 41;

/// Errors creating or activating a virtio-pci device.
#[derive(Debug, Error)]
pub enum VirtioPciError {
    /// The virtio device type has no modern PCI device ID.
    #[error("virtio device type {0} has no PCI device ID; types must be 1..=63")]
    DeviceType(u32),
    /// The device has no queues or more than the notify area holds.
    #[error("device has {0} queues; virtio-pci supports 1..=1024")]
    QueueCount(usize),
    /// The device configuration does not fit its BAR region.
    #[error("device config of {0} bytes exceeds the 4096-byte region")]
    ConfigLen(usize),
    /// Building the configuration space failed.
    #[error("failed to build the PCI configuration space")]
    Config(#[from] PciConfigError),
    /// Setting up MSI-X failed.
    #[error("failed to set up MSI-X")]
    Msix(#[from] MsixError),
    /// Creating a queue kick eventfd failed.
    #[error("failed to create a queue kick eventfd")]
    EventFd(#[source] std::io::Error),
    /// An enabled queue is not usable (size or ring addresses).
    #[error("queue {0} is invalid: bad size, misaligned or out-of-memory rings")]
    InvalidQueue(usize),
    /// The device could not be reused after a reset.
    #[error("device failed to reset earlier; it needs a VM reset")]
    Broken,
    /// The device refused to activate.
    #[error("device activation failed")]
    Activate(#[source] VirtioDeviceError),
}

/// Where the virtio structures live in BAR 0, derived from the device.
#[derive(Debug, Clone, Copy)]
struct BarLayout {
    device_config_len: u64,
    notify_len: u64,
    pba_offset: u64,
    bar_size: u64,
}

impl BarLayout {
    fn new(num_queues: usize, device_config_len: usize, msix: &MsixConfig) -> Self {
        let table_end = MSIX_TABLE_OFFSET + msix.table_len().next_multiple_of(PAGE);
        let pba_end = table_end + msix.pba_len().next_multiple_of(PAGE);
        BarLayout {
            device_config_len: device_config_len as u64,
            notify_len: (num_queues as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)).max(4),
            pba_offset: table_end,
            bar_size: pba_end.next_power_of_two().max(MIN_BAR_SIZE),
        }
    }
}

/// PCI class code for a virtio device type.
fn class_code(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00,     // network controller
        2 | 8 => 0x01_00_00, // block / SCSI: mass storage (SCSI)
        3 => 0x07_80_00,     // console: other communication controller
        16 => 0x03_80_00,    // GPU: other display controller
        18 => 0x09_80_00,    // input: other input controller
        23 => 0x08_80_00,    // IOMMU: other system peripheral
        26 => 0x01_80_00,    // file system: other mass storage
        _ => 0xff_00_00,     // device does not fit a defined class
    }
}

/// A virtio device behind the modern virtio-pci transport.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    common: VirtioPciCommonConfig,
    interrupt_state: Arc<InterruptState>,
    interrupt: Arc<VirtioPciInterrupt>,
    msix: Arc<Mutex<MsixConfig>>,
    kicks: Vec<EventFd>,
    mem: GuestMemoryMmap,
    layout: BarLayout,
    pub(super) msix_cap_reg: usize,
    pci_cfg_cap_offset: usize,
    device_features: u64,
    active: bool,
    broken: bool,
    ats: Option<Ats>,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device_type", &self.device.device_type())
            .field("status", &self.common.device_status())
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl VirtioPciDevice {
    /// Wraps `device`. Interrupts go to `msi`; with `irqfd` every MSI-X vector
    /// also gets an irqfd whose eventfd the device can hand to an external
    /// backend ([`crate::virtio::VirtioInterrupt::notifier`]). BAR 0 starts
    /// unassigned: program it with [`crate::pci::allocate_bars`].
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msi: Arc<dyn MsiSink>,
        irqfd: Option<Arc<dyn IrqfdRouter>>,
    ) -> Result<Self, VirtioPciError> {
        let (type_id, num_queues) = check_device(device.as_ref())?;
        let vectors = num_queues as u16 + 1;
        let irqfds = match irqfd {
            Some(router) => Some(Arc::new(MsixIrqfds::new(router, vectors)?)),
            None => None,
        };
        let msix = MsixConfig::new(vectors, msi, irqfds)?;
        let layout = BarLayout::new(num_queues, device.config_len(), &msix);
        let msix = Arc::new(Mutex::new(msix));
        let interrupt_state = Arc::new(InterruptState::new(num_queues));
        let interrupt = Arc::new(VirtioPciInterrupt::new(
            interrupt_state.clone(),
            msix.clone(),
        ));
        let kicks = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(VirtioPciError::EventFd)?;
        let (config, pci_cfg_cap_offset, msix_cap_offset) =
            build_config_space(device.device_type(), type_id, &layout, vectors)?;
        let device_features =
            (device.avail_features() | 1 << VIRTIO_F_VERSION_1) & !UNSUPPORTED_TRANSPORT_FEATURES;
        let common =
            VirtioPciCommonConfig::new(device.queue_max_sizes(), vectors, interrupt_state.clone());
        Ok(VirtioPciDevice {
            config,
            device,
            common,
            interrupt_state,
            interrupt,
            msix,
            kicks,
            mem,
            layout,
            msix_cap_reg: msix_cap_offset / 4,
            pci_cfg_cap_offset,
            device_features,
            active: false,
            broken: false,
            ats: None,
        })
    }

    /// Gives the function a PCI Express capability and the ATS extended
    /// capability; `listener` hears every guest change of ATS Enable. Returns
    /// a shared view of the enable bit.
    pub fn enable_ats(
        &mut self,
        listener: Option<AtsListener>,
    ) -> Result<Arc<AtomicBool>, VirtioPciError> {
        if let Some(a) = &self.ats {
            return Ok(a.enabled_flag());
        }
        let ats = Ats::add_to(&mut self.config, listener)?;
        let flag = ats.enabled_flag();
        self.ats = Some(ats);
        Ok(flag)
    }

    /// The wrapped device.
    pub fn virtio_device(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Size of BAR 0 in bytes.
    pub fn bar_size(&self) -> u64 {
        self.layout.bar_size
    }

    /// True once DRIVER_OK activated the device (until the next reset).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The queue kick eventfds with their guest physical notify addresses
    /// when BAR 0 is at `bar_base`. Register each as a KVM ioeventfd without
    /// data match and with any access length.
    pub fn ioeventfds(&self, bar_base: u64) -> Vec<(&EventFd, u64)> {
        self.kicks
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                let slot = i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
                (fd, bar_base + NOTIFY_OFFSET + slot)
            })
            .collect()
    }

    fn handle_status_action(&mut self, action: StatusAction) {
        match action {
            StatusAction::None => {}
            StatusAction::FeaturesAccepted(features) => self.device.ack_features(features),
            StatusAction::Reset => self.reset_device(),
            StatusAction::DriverOk => {
                if let Err(e) = self.activate() {
                    self.fail_activation(&e);
                }
            }
        }
    }

    fn reset_device(&mut self) {
        if !self.device.reset() {
            warn!(
                "virtio-pci: device type {} cannot be reset",
                self.device.device_type()
            );
            self.broken = true;
        }
        self.active = false;
        for kick in &self.kicks {
            // Drop stale kicks; EAGAIN just means there were none.
            let _ = kick.read();
        }
    }

    fn activate(&mut self) -> Result<(), VirtioPciError> {
        if self.broken {
            return Err(VirtioPciError::Broken);
        }
        let event_idx = self.common.driver_features() & 1 << VIRTIO_RING_F_EVENT_IDX != 0;
        // Behind a vIOMMU the ring addresses are IOVAs: they cannot be checked
        // against guest memory here (the address setters above still check
        // alignment); the device translates them.
        let iova_rings = self.common.driver_features() & 1 << VIRTIO_F_ACCESS_PLATFORM != 0;
        let mut queues = Vec::new();
        for (index, regs) in self.common.queues().iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            let invalid = |_| VirtioPciError::InvalidQueue(index);
            let mut queue = Queue::new(regs.max_size).map_err(invalid)?;
            queue.try_set_size(regs.size).map_err(invalid)?;
            queue
                .try_set_desc_table_address(GuestAddress(regs.desc))
                .map_err(invalid)?;
            queue
                .try_set_avail_ring_address(GuestAddress(regs.driver))
                .map_err(invalid)?;
            queue
                .try_set_used_ring_address(GuestAddress(regs.device))
                .map_err(invalid)?;
            queue.set_ready(true);
            queue.set_event_idx(event_idx);
            if !iova_rings && !queue.is_valid(&self.mem) {
                return Err(VirtioPciError::InvalidQueue(index));
            }
            let kick = self.kicks[index]
                .try_clone()
                .map_err(VirtioPciError::EventFd)?;
            queues.push((index, queue, kick));
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
        };
        self.device
            .activate(ctx)
            .map_err(VirtioPciError::Activate)?;
        self.active = true;
        Ok(())
    }

    /// Reports a failed activation to the driver: DEVICE_NEEDS_RESET plus a
    /// configuration change interrupt (virtio 1.x section 2.1.1).
    fn fail_activation(&mut self, err: &VirtioPciError) {
        debug!(
            "virtio-pci: activation of device type {} failed: {err}",
            self.device.device_type(),
            err = chain(&err)
        );
        self.common.set_needs_reset();
        if let Err(e) = crate::virtio::VirtioInterrupt::trigger(
            self.interrupt.as_ref(),
            VirtioInterruptType::Config,
        ) {
            warn!("virtio-pci: failed to signal DEVICE_NEEDS_RESET: {e}");
        }
    }

    fn read_bar(&mut self, offset: u64, data: &mut [u8]) {
        let l = self.layout;
        let table_end = MSIX_TABLE_OFFSET + lock(&self.msix).table_len();
        match offset {
            o if o < COMMON_CONFIG_LEN => self.common.read(o, data, self.device_features),
            ISR_CONFIG_OFFSET => {
                data.fill(0);
                if let Some(isr) = data.first_mut() {
                    *isr = self.interrupt_state.take_isr();
                }
            }
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + PAGE).contains(&o) => {
                let rel = o - DEVICE_CONFIG_OFFSET;
                if rel + data.len() as u64 <= l.device_config_len {
                    self.device.read_config(rel, data);
                } else {
                    data.fill(0);
                }
            }
            o if (MSIX_TABLE_OFFSET..table_end).contains(&o) => {
                lock(&self.msix).read_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if o >= l.pba_offset => lock(&self.msix).read_pba(o - l.pba_offset, data),
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, offset: u64, data: &[u8]) {
        let l = self.layout;
        let table_end = MSIX_TABLE_OFFSET + lock(&self.msix).table_len();
        match offset {
            o if o < COMMON_CONFIG_LEN => {
                let action = self.common.write(o, data, self.device_features);
                self.handle_status_action(action);
            }
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + PAGE).contains(&o) => {
                let rel = o - DEVICE_CONFIG_OFFSET;
                if rel + data.len() as u64 <= l.device_config_len {
                    self.device.write_config(rel, data);
                }
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + l.notify_len).contains(&o) => {
                let queue = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(kick) = self.kicks.get(queue) {
                    if let Err(e) = kick.write(1) {
                        warn!("virtio-pci: failed to kick queue {queue}: {e}");
                    }
                }
            }
            o if (MSIX_TABLE_OFFSET..table_end).contains(&o) => {
                lock(&self.msix).write_table(o - MSIX_TABLE_OFFSET, data);
            }
            _ => debug!("virtio-pci: ignored BAR write at {offset:#x}"),
        }
    }

    /// The BAR access described by the PCI configuration access capability
    /// (`bar`, `offset`, `length`), if it is valid.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap_offset / 4;
        let bar = self.config.read_reg(cap + 1) & 0xff;
        let offset = u64::from(self.config.read_reg(cap + 2));
        let len = self.config.read_reg(cap + 3) as usize;
        let valid = bar == 0
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && offset + len as u64 <= self.layout.bar_size;
        valid.then_some((offset, len))
    }

    fn pci_cfg_data_reg(&self) -> usize {
        self.pci_cfg_cap_offset / 4 + 4
    }
}

/// Checks that the transport can expose `device`; returns its PCI type ID
/// and queue count.
fn check_device(device: &dyn VirtioDevice) -> Result<(u16, usize), VirtioPciError> {
    let device_type = device.device_type();
    let type_id = u16::try_from(device_type)
        .ok()
        .filter(|t| (1..0x40).contains(t))
        .ok_or(VirtioPciError::DeviceType(device_type))?;
    let num_queues = device.queue_max_sizes().len();
    if num_queues == 0 || num_queues > MAX_QUEUES {
        return Err(VirtioPciError::QueueCount(num_queues));
    }
    if device.config_len() > MAX_DEVICE_CONFIG_LEN {
        return Err(VirtioPciError::ConfigLen(device.config_len()));
    }
    Ok((type_id, num_queues))
}

/// Builds the configuration space: header, BAR 0 and capabilities. Returns
/// it with the offsets of the PCI configuration access and MSI-X capabilities.
fn build_config_space(
    device_type: u32,
    type_id: u16,
    layout: &BarLayout,
    vectors: u16,
) -> Result<(PciConfiguration, usize, usize), PciConfigError> {
    let mut config = PciConfiguration::new(&PciHeader {
        vendor_id: VIRTIO_PCI_VENDOR_ID,
        device_id: VIRTIO_PCI_DEVICE_ID_BASE + type_id,
        revision_id: 1,
        class_code: class_code(device_type),
        subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
        subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
    });
    config.add_bar(0, layout.bar_size, PciBarRegionType::Memory64, false, 0)?;
    let (pci_cfg, msix) = add_capabilities(&mut config, layout, vectors)?;
    Ok((config, pci_cfg, msix))
}

/// Adds the virtio vendor capabilities and MSI-X. Returns the offsets of
/// the PCI configuration access capability and of the MSI-X capability.
fn add_capabilities(
    config: &mut PciConfiguration,
    layout: &BarLayout,
    vectors: u16,
) -> Result<(usize, usize), PciConfigError> {
    let regions = [
        (CAP_COMMON_CFG, COMMON_CONFIG_OFFSET, COMMON_CONFIG_LEN),
        (CAP_ISR_CFG, ISR_CONFIG_OFFSET, 1),
        (
            CAP_DEVICE_CFG,
            DEVICE_CONFIG_OFFSET,
            layout.device_config_len,
        ),
    ];
    for (cfg_type, offset, len) in regions {
        if len > 0 {
            config.add_capability(
                VENDOR_CAP_ID,
                &vendor_cap_body(cfg_type, 16, offset, len),
                None,
            )?;
        }
    }
    let mut notify = vendor_cap_body(CAP_NOTIFY_CFG, 20, NOTIFY_OFFSET, layout.notify_len);
    notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
    config.add_capability(VENDOR_CAP_ID, &notify, None)?;
    // The access window: bar (byte 4), offset, length and data are writable.
    let mut pci_cfg = vendor_cap_body(CAP_PCI_CFG, 20, 0, 0);
    pci_cfg.extend_from_slice(&[0; 4]);
    let mut mask = [0u8; 18];
    mask[2] = 0xff;
    mask[6..18].fill(0xff);
    let pci_cfg_offset = config.add_capability(VENDOR_CAP_ID, &pci_cfg, Some(&mask))?;
    let msix = msix_cap_body(
        vectors,
        0,
        MSIX_TABLE_OFFSET as u32,
        layout.pba_offset as u32,
    );
    let msix_offset = config.add_capability(MSIX_CAP_ID, &msix, Some(&msix_cap_writable_mask()))?;
    Ok((pci_cfg_offset, msix_offset))
}

/// Body of a `virtio_pci_cap` (everything after the ID and next bytes).
fn vendor_cap_body(cfg_type: u8, cap_len: u8, offset: u64, len: u64) -> Vec<u8> {
    let mut body = vec![cap_len, cfg_type, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(len as u32).to_le_bytes());
    body
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        if reg_idx == self.pci_cfg_data_reg() {
            let Some((offset, len)) = self.pci_cfg_window() else {
                return 0;
            };
            let mut bytes = [0u8; 4];
            self.read_bar(offset, &mut bytes[..len]);
            return u32::from_le_bytes(bytes);
        }
        self.config.read_reg(reg_idx)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg_idx, offset, data);
        if let Some(ats) = &self.ats {
            ats.after_write(reg_idx, &self.config);
        }
        if reg_idx == self.msix_cap_reg {
            let msg_ctl = (self.config.read_reg(reg_idx) >> 16) as u16;
            lock(&self.msix).set_message_control(msg_ctl);
        } else if reg_idx == self.pci_cfg_data_reg() {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let bytes = self.config.read_reg(reg_idx).to_le_bytes();
                self.write_bar(bar_offset, &bytes[..len]);
            }
        }
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        self.config.bars()
    }

    fn bar_ioeventfds(&self, bar_index: usize, bar_base: u64) -> Vec<(&EventFd, u64)> {
        if bar_index == 0 {
            self.ioeventfds(bar_base)
        } else {
            Vec::new()
        }
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() > 8 {
            data.fill(0);
            return;
        }
        self.read_bar(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() <= 8 {
            self.write_bar(offset, data);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use vm_memory::GuestMemoryMmap as Mmap;

    use super::super::test_utils::*;
    use super::*;
    use crate::pci::msix::test_utils::{RecordingRouter, RecordingSink};

    #[test]
    fn identity_follows_the_virtio_spec() {
        let mut f = fixture();
        assert_eq!(f.dev.read_config_register(0), 0x1057_1af4);
        assert_eq!(f.dev.read_config_register(2), 0x0880_0001);
        assert_eq!(f.dev.read_config_register(0x2c / 4), 0x0040_1af4);
        let bars = f.dev.bars();
        assert_eq!(bars.len(), 1);
        assert_eq!(bars[0].region_type, PciBarRegionType::Memory64);
        assert_eq!(bars[0].size, 0x8000);
        assert_eq!(f.base, 0xc000_0000);
    }

    #[test]
    fn capability_chain_has_golden_layout() {
        let mut f = fixture();
        let mut caps = Vec::new();
        let mut ptr = f.dev.read_config_register(0x34 / 4) as usize & 0xff;
        while ptr != 0 {
            let head = f.dev.read_config_register(ptr / 4);
            let (id, next, cfg_type) = (head & 0xff, (head >> 8) & 0xff, (head >> 24) & 0xff);
            let bar_off = f.dev.read_config_register(ptr / 4 + 2);
            let len = f.dev.read_config_register(ptr / 4 + 3);
            caps.push((ptr, id, cfg_type, bar_off, len));
            ptr = next as usize;
        }
        assert_eq!(
            caps,
            vec![
                (0x40, 9, 1, 0x0000, 0x3c),
                (0x50, 9, 3, 0x1000, 1),
                (0x60, 9, 4, 0x2000, 8),
                (0x70, 9, 2, 0x3000, 8),
                (0x84, 9, 5, 0, 0),
                // MSI-X: ID, 3 vectors (N-1 = 2), table and PBA in BAR 0.
                (0x98, 0x11, 0, 0x5000, 0),
            ]
        );
        assert_eq!(
            f.dev.read_config_register(0x70 / 4 + 4),
            NOTIFY_OFF_MULTIPLIER
        );
        assert_eq!(f.dev.read_config_register(0x98 / 4 + 1), 0x4000);
        assert_eq!(f.dev.read_config_register(0x98 / 4) >> 16, 2);
    }

    #[test]
    fn full_driver_sequence_activates_enabled_queues() {
        let mut f = fixture();
        assert_eq!(f.read(0x04, 4), FEATURE_X | 1 << VIRTIO_RING_F_EVENT_IDX);
        f.write(0x00, 4, 1);
        assert_eq!(
            f.read(0x04, 4),
            1,
            "VERSION_1 forced on, packed ring masked off"
        );
        let features = FEATURE_X | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_F_VERSION_1;
        f.negotiate(features);
        assert_eq!(f.status(), 0xb);
        assert_eq!(lock(&f.record).acked, vec![features]);
        f.setup_queue(0, 16, 0x1_0000, 1);
        f.write(0x10, 2, 0);
        f.write(DEVICE_STATUS, 1, 0xf);
        assert_eq!(f.status(), 0xf);
        assert!(f.dev.is_active());
        assert_eq!(
            lock(&f.record).activated,
            vec![vec![(0, 16, 0x1_0000, true)]]
        );
        // A notify write kicks the eventfd the device got.
        f.write(NOTIFY_OFFSET, 2, 0);
        assert_eq!(lock(&f.record).kicks[0].read().unwrap(), 1);
        // Reset goes through to the device and clears the registers.
        let resets = lock(&f.record).resets;
        f.write(DEVICE_STATUS, 1, 0);
        assert_eq!(f.status(), 0);
        assert!(!f.dev.is_active());
        assert_eq!(lock(&f.record).resets, resets + 1);
        assert!(lock(&f.record).kicks.is_empty());
        f.write(0x16, 2, 0);
        assert_eq!(f.read(0x1c, 2), 0);
    }

    #[test]
    fn unoffered_feature_blocks_features_ok() {
        let mut f = fixture();
        f.negotiate(1 << 5 | 1 << VIRTIO_F_VERSION_1);
        assert_eq!(f.status(), 0x3);
        assert!(lock(&f.record).acked.is_empty());
        f.write(DEVICE_STATUS, 1, 0x7);
        assert!(!f.dev.is_active());
        // The offered-but-masked packed ring feature is refused too.
        f.negotiate(1 << 34 | 1 << VIRTIO_F_VERSION_1);
        assert_eq!(f.status(), 0x3);
    }

    #[test]
    fn queue_and_config_interrupts_use_msix_vectors() {
        let mut f = fixture();
        f.negotiate(1 << VIRTIO_F_VERSION_1);
        f.setup_queue(1, 32, 0x2_0000, 2);
        f.write(0x10, 2, 0);
        f.enable_msix(0);
        f.enable_msix(2);
        f.write(DEVICE_STATUS, 1, 0xf);
        let interrupt = lock(&f.record).interrupt.clone().unwrap();
        interrupt.trigger(VirtioInterruptType::Queue(1)).unwrap();
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        interrupt.trigger(VirtioInterruptType::Config).unwrap();
        assert_eq!(f.sink.take(), vec![msg(2), msg(0)]);
        assert_eq!(
            f.read(ISR_CONFIG_OFFSET, 1),
            2,
            "config bit only with MSI-X on"
        );
        assert_eq!(f.read(ISR_CONFIG_OFFSET, 1), 0, "ISR read clears");
        assert_eq!(f.read(0x15, 1), 1, "config generation moved");
        assert!(interrupt.notifier(VirtioInterruptType::Queue(1)).is_none());
    }

    #[test]
    fn invalid_queue_sets_needs_reset_and_signals_config() {
        let mut f = fixture();
        f.negotiate(1 << VIRTIO_F_VERSION_1);
        f.setup_queue(0, 16, 0x10_0000, 1); // rings beyond guest memory
        f.write(0x10, 2, 0);
        f.enable_msix(0);
        f.write(DEVICE_STATUS, 1, 0xf);
        assert_eq!(f.status(), 0x4f);
        assert!(lock(&f.record).activated.is_empty());
        assert_eq!(f.sink.take(), vec![msg(0)]);
        f.write(DEVICE_STATUS, 1, 0);
        assert_eq!(f.status(), 0);
    }

    #[test]
    fn non_power_of_two_queue_size_fails_activation() {
        let mut f = fixture();
        f.negotiate(1 << VIRTIO_F_VERSION_1);
        f.setup_queue(0, 24, 0x1_0000, 1);
        f.write(DEVICE_STATUS, 1, 0xf);
        assert_eq!(f.status() & 0x40, 0x40);
        assert!(!f.dev.is_active());
    }

    #[test]
    fn device_activation_error_sets_needs_reset() {
        let mut f = fixture_with(true, None);
        f.negotiate(1 << VIRTIO_F_VERSION_1);
        f.setup_queue(0, 16, 0x1_0000, 1);
        f.write(DEVICE_STATUS, 1, 0xf);
        assert_eq!(f.status(), 0x4f);
        assert!(!f.dev.is_active());
    }

    #[test]
    fn device_config_is_bounded_to_its_length() {
        let mut f = fixture();
        f.write(DEVICE_CONFIG_OFFSET + 4, 4, 0x1234_5678);
        assert_eq!(f.read(DEVICE_CONFIG_OFFSET + 4, 4), 0x1234_5678);
        assert_eq!(f.read(DEVICE_CONFIG_OFFSET + 6, 2), 0x1234);
        f.write(DEVICE_CONFIG_OFFSET + 6, 4, u64::MAX);
        assert_eq!(f.read(DEVICE_CONFIG_OFFSET + 6, 4), 0);
        assert_eq!(lock(&f.record).config[6..], [0x34, 0x12]);
    }

    #[test]
    fn pci_cfg_window_reaches_bar_registers() {
        let mut f = fixture();
        let cap = 0x84 / 4;
        f.dev.write_config_register(cap + 1, 0, &[0]);
        f.dev
            .write_config_register(cap + 2, 0, &0x12u32.to_le_bytes());
        f.dev.write_config_register(cap + 3, 0, &2u32.to_le_bytes());
        assert_eq!(f.dev.read_config_register(cap + 4), 2, "num_queues");
        f.dev
            .write_config_register(cap + 2, 0, &0x14u32.to_le_bytes());
        f.dev.write_config_register(cap + 3, 0, &1u32.to_le_bytes());
        f.dev.write_config_register(cap + 4, 0, &[1]);
        assert_eq!(f.status(), 1);
        // A bad length disables the window.
        f.dev.write_config_register(cap + 3, 0, &3u32.to_le_bytes());
        assert_eq!(f.dev.read_config_register(cap + 4), 0);
    }

    #[test]
    fn ioeventfds_cover_each_notify_slot() {
        let f = fixture();
        let addrs: Vec<u64> = f
            .dev
            .ioeventfds(0x1_0000_0000)
            .iter()
            .map(|e| e.1)
            .collect();
        assert_eq!(addrs, vec![0x1_0000_3000, 0x1_0000_3004]);
        assert_eq!(f.dev.bar_ioeventfds(0, 0x1000).len(), 2);
        assert!(f.dev.bar_ioeventfds(1, 0x1000).is_empty());
    }

    #[test]
    fn irqfd_mode_exposes_vector_eventfds() {
        let router = Arc::new(RecordingRouter::default());
        let mut f = fixture_with(false, Some(router.clone()));
        f.negotiate(1 << VIRTIO_F_VERSION_1);
        f.setup_queue(0, 16, 0x1_0000, 1);
        f.write(DEVICE_STATUS, 1, 0xf);
        router.take();
        f.enable_msix(1);
        let interrupt = lock(&f.record).interrupt.clone().unwrap();
        assert!(interrupt.notifier(VirtioInterruptType::Queue(0)).is_some());
        assert!(interrupt.notifier(VirtioInterruptType::Config).is_none());
        let calls = router.take();
        assert_eq!(
            calls.last(),
            Some(&crate::pci::msix::test_utils::RouterCall::Route(
                25,
                Some(msg(1))
            ))
        );
    }

    #[test]
    fn rejects_devices_the_transport_cannot_expose() {
        struct Bad(u32, Vec<u16>);
        impl VirtioDevice for Bad {
            fn device_type(&self) -> u32 {
                self.0
            }
            fn queue_max_sizes(&self) -> &[u16] {
                &self.1
            }
            fn config_len(&self) -> usize {
                0
            }
            fn avail_features(&self) -> u64 {
                0
            }
            fn ack_features(&mut self, _: u64) {}
            fn read_config(&mut self, _: u64, _: &mut [u8]) {}
            fn write_config(&mut self, _: u64, _: &[u8]) {}
            fn activate(&mut self, _: ActivateContext) -> Result<(), VirtioDeviceError> {
                Ok(())
            }
            fn reset(&mut self) -> bool {
                true
            }
        }
        let mem = || Mmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let sink = Arc::new(RecordingSink::default());
        let new = |d: Bad| VirtioPciDevice::new(Box::new(d), mem(), sink.clone(), None);
        assert!(matches!(
            new(Bad(64, vec![8])),
            Err(VirtioPciError::DeviceType(64))
        ));
        assert!(matches!(
            new(Bad(1, vec![])),
            Err(VirtioPciError::QueueCount(0))
        ));
        assert!(matches!(
            new(Bad(1, vec![8; 1025])),
            Err(VirtioPciError::QueueCount(1025))
        ));
        // Without device config the device-config capability is omitted.
        let mut dev = new(Bad(4, vec![8])).unwrap();
        assert_eq!(dev.read_config_register(0x60 / 4) >> 24, 2);
    }

    /// Relocation over a real bus that also records the ioeventfd moves.
    struct BusRelocation {
        bus: Arc<crate::bus::Bus>,
        ioevents: Mutex<Vec<(Vec<u64>, Vec<u64>)>>,
    }

    impl crate::pci::DeviceRelocation for BusRelocation {
        fn move_bar(
            &self,
            old: u64,
            new: u64,
            _len: u64,
            dev: &mut dyn PciDevice,
        ) -> std::io::Result<()> {
            self.bus.relocate(old, new).map_err(std::io::Error::other)?;
            let index = dev.bars().iter().find(|b| b.addr == new).unwrap().index;
            let addrs = |base| {
                dev.bar_ioeventfds(index, base)
                    .iter()
                    .map(|e| e.1)
                    .collect()
            };
            lock(&self.ioevents).push((addrs(old), addrs(new)));
            Ok(())
        }
    }

    #[test]
    fn ecam_programmed_bar_move_relocates_bus_entry() {
        use crate::pci::{PciConfigMmio, PciRoot, PCI_ECAM_BASE};
        let f = fixture();
        let base = f.base;
        let dev = Arc::new(Mutex::new(f.dev));
        let bus = Arc::new(crate::bus::Bus::new());
        bus.insert(dev.clone(), base, 0x8000).unwrap();
        let reloc = Arc::new(BusRelocation {
            bus: bus.clone(),
            ioevents: Mutex::new(Vec::new()),
        });
        let root = Arc::new(Mutex::new(PciRoot::new(Some(reloc.clone()))));
        let bdf = lock(&root).add_device(dev.clone()).unwrap();
        let mut ecam = PciConfigMmio::new(root);
        let cfg = u64::from(bdf.device()) << 15;
        let mut id = [0u8; 4];
        ecam.read(PCI_ECAM_BASE, cfg, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1057_1af4);
        ecam.write(PCI_ECAM_BASE, cfg + 0x10, &0xd000_0000u32.to_le_bytes());
        ecam.write(PCI_ECAM_BASE, cfg + 0x4, &[0x02, 0x00]);
        let mut n = [0u8; 2];
        assert!(bus.read(0xd000_0012, &mut n), "BAR answers at its new base");
        assert_eq!(u16::from_le_bytes(n), 2);
        assert!(!bus.read(base + 0x12, &mut n));
        let moved = lock(&reloc.ioevents).clone();
        assert_eq!(
            moved,
            vec![(
                vec![base + 0x3000, base + 0x3004],
                vec![0xd000_3000, 0xd000_3004]
            )]
        );
    }

    proptest::proptest! {
        #[test]
        fn random_guest_accesses_never_panic(
            ops in proptest::collection::vec(
                (0u64..0x9000, proptest::sample::select(vec![1usize, 2, 3, 4, 8, 16]), proptest::prelude::any::<u64>(), 0u8..3),
                1..64,
            )
        ) {
            let mut f = fixture();
            for (offset, len, value, kind) in ops {
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&value.to_le_bytes());
                match kind {
                    0 => f.dev.write(f.base, offset, &bytes[..len]),
                    1 => f.dev.read(f.base, offset, &mut bytes[..len]),
                    _ => {
                        let reg = (offset as usize / 4) % 1100;
                        f.dev.write_config_register(reg, offset % 5, &bytes[..len]);
                        f.dev.read_config_register(reg);
                    }
                }
            }
        }
    }
}
