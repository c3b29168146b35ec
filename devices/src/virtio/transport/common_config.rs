//! The virtio-pci common configuration structure (`struct
//! virtio_pci_common_cfg`, virtio 1.x section 4.1.4.3) and the device status
//! state machine.
//!
//! [`VirtioPciCommonConfig`] only keeps register state. Status writes that
//! need the device (feature acknowledgement, activation, reset) come back
//! as a [`StatusAction`] for the transport to carry out.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::debug;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use super::interrupt::{InterruptState, VIRTIO_MSI_NO_VECTOR};

/// Device status: the guest OS noticed the device.
pub const DEVICE_ACKNOWLEDGE: u8 = 1;
/// Device status: the guest OS knows how to drive the device.
pub const DEVICE_DRIVER: u8 = 2;
/// Device status: the driver is ready.
pub const DEVICE_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete.
pub const DEVICE_FEATURES_OK: u8 = 8;
/// Device status: the device hit an error and needs a reset.
pub const DEVICE_NEEDS_RESET: u8 = 64;
/// Device status: the driver gave up on the device.
pub const DEVICE_FAILED: u8 = 128;

/// Length of the common configuration structure exposed to the guest
/// (through `queue_reset`).
pub const COMMON_CONFIG_LEN: u64 = 0x3c;

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DEVICE_END: u64 = 0x38;

/// What the transport must do after a status write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAction {
    /// Nothing beyond the register update.
    None,
    /// The driver wrote 0: reset the device (registers are already reset).
    Reset,
    /// FEATURES_OK was accepted with these driver features: acknowledge them.
    FeaturesAccepted(u64),
    /// DRIVER_OK was set: activate the device.
    DriverOk,
}

/// Per-queue registers as programmed by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegisters {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// The driver enabled the queue.
    pub enabled: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver (available) ring address.
    pub driver: u64,
    /// Device (used) ring address.
    pub device: u64,
}

impl QueueRegisters {
    fn new(max_size: u16) -> Self {
        QueueRegisters {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }
}

/// Register state of the common configuration structure.
#[derive(Debug)]
pub struct VirtioPciCommonConfig {
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    device_status: u8,
    queue_select: u16,
    queues: Vec<QueueRegisters>,
    msix_vectors: u16,
    interrupt: Arc<InterruptState>,
}

impl VirtioPciCommonConfig {
    /// Creates the registers for queues of `queue_max_sizes`, with
    /// `msix_vectors` MSI-X vectors available; vector assignments live in
    /// `interrupt` (shared with the interrupt path).
    pub fn new(queue_max_sizes: &[u16], msix_vectors: u16, interrupt: Arc<InterruptState>) -> Self {
        VirtioPciCommonConfig {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            device_status: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueRegisters::new(m))
                .collect(),
            msix_vectors,
            interrupt,
        }
    }

    /// The device status byte.
    pub fn device_status(&self) -> u8 {
        self.device_status
    }

    /// The features the driver wrote.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The queue registers.
    pub fn queues(&self) -> &[QueueRegisters] {
        &self.queues
    }

    /// Sets DEVICE_NEEDS_RESET (device side).
    pub fn set_needs_reset(&mut self) {
        self.device_status |= DEVICE_NEEDS_RESET;
    }

    /// Returns every register to its power-on value.
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.device_status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueRegisters::new(q.max_size);
        }
        self.interrupt.reset();
    }

    /// Reads `data.len()` bytes at `offset`. Accesses must match a field's
    /// width (64-bit fields also as two 32-bit halves); anything else reads 0.
    pub fn read(&self, offset: u64, data: &mut [u8], device_features: u64) {
        let value = self.read_field(offset, data.len(), device_features);
        match value {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()[..data.len()]),
            None => data.fill(0),
        }
    }

    fn read_field(&self, offset: u64, len: usize, device_features: u64) -> Option<u64> {
        let queue = self.selected_queue();
        let v = match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (DEVICE_FEATURE, 4) => feature_dword(device_features, self.device_feature_select),
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (DRIVER_FEATURE, 4) => feature_dword(self.driver_features, self.driver_feature_select),
            (CONFIG_MSIX_VECTOR, 2) => u64::from(self.interrupt.config_vector()),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => u64::from(self.device_status),
            (CONFIG_GENERATION, 1) => u64::from(self.interrupt.generation()),
            (QUEUE_SELECT, 2) => u64::from(self.queue_select),
            (QUEUE_SIZE, 2) => queue.map_or(0, |q| u64::from(q.size)),
            (QUEUE_MSIX_VECTOR, 2) => u64::from(
                self.interrupt
                    .queue_vector(self.queue_select)
                    .unwrap_or(VIRTIO_MSI_NO_VECTOR),
            ),
            (QUEUE_ENABLE, 2) => queue.map_or(0, |q| u64::from(q.enabled)),
            (QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |_| u64::from(self.queue_select)),
            (QUEUE_DESC..QUEUE_DEVICE_END, 4 | 8) => {
                let (field, shift) = queue_addr_field(offset, len)?;
                let addr = queue.map_or(0, |q| [q.desc, q.driver, q.device][field]);
                if len == 8 {
                    addr
                } else {
                    (addr >> shift) & 0xffff_ffff
                }
            }
            // queue_notif_config_data and queue_reset: features not offered.
            (QUEUE_DEVICE_END, 2) | (0x3a, 2) => 0,
            _ => return None,
        };
        Some(v)
    }

    /// Writes `data` at `offset` and returns what the transport must do.
    /// Invalid widths, read-only fields and out-of-state writes are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8], device_features: u64) -> StatusAction {
        let mut bytes = [0u8; 8];
        let len = data.len().min(8);
        bytes[..len].copy_from_slice(&data[..len]);
        let v = u64::from_le_bytes(bytes);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(v as u32),
            (CONFIG_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(v as u16);
                self.interrupt
                    .config_vector
                    .store(vector, Ordering::Release);
            }
            (DEVICE_STATUS, 1) => return self.write_status(v as u8, device_features),
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_SIZE, 2) => self.write_queue_size(v as u16),
            (QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(v as u16);
                if let Some(slot) = self
                    .interrupt
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    slot.store(vector, Ordering::Release);
                }
            }
            (QUEUE_ENABLE, 2) => self.write_queue_enable(v as u16),
            (QUEUE_DESC..QUEUE_DEVICE_END, 4 | 8) => self.write_queue_addr(offset, data.len(), v),
            _ => debug!(
                "virtio-pci: ignored common config write at {offset:#x} len {}",
                data.len()
            ),
        }
        StatusAction::None
    }

    fn selected_queue(&self) -> Option<&QueueRegisters> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The queue registers the driver may still change (selected, not enabled).
    fn configurable_queue(&mut self) -> Option<&mut QueueRegisters> {
        if self.device_status & DEVICE_DRIVER_OK != 0 {
            return None;
        }
        self.queues
            .get_mut(usize::from(self.queue_select))
            .filter(|q| !q.enabled)
    }

    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.device_status & DEVICE_FEATURES_OK != 0 {
            debug!("virtio-pci: driver features written after FEATURES_OK, ignored");
            return;
        }
        let shift = match self.driver_feature_select {
            0 => 0,
            1 => 32,
            _ => return,
        };
        self.driver_features =
            (self.driver_features & !(0xffff_ffffu64 << shift)) | u64::from(value) << shift;
    }

    fn write_queue_size(&mut self, size: u16) {
        if let Some(q) = self.configurable_queue() {
            if (1..=q.max_size).contains(&size) {
                q.size = size;
            }
        }
    }

    fn write_queue_enable(&mut self, value: u16) {
        // Writing 0 is not allowed without VIRTIO_F_RING_RESET, never offered.
        if value != 1 {
            return;
        }
        if let Some(q) = self.configurable_queue() {
            q.enabled = true;
        }
    }

    fn write_queue_addr(&mut self, offset: u64, len: usize, value: u64) {
        let Some((field, shift)) = queue_addr_field(offset, len) else {
            return;
        };
        let Some(q) = self.configurable_queue() else {
            return;
        };
        let addr = match field {
            0 => &mut q.desc,
            1 => &mut q.driver,
            _ => &mut q.device,
        };
        *addr = if len == 8 {
            value
        } else {
            (*addr & !(0xffff_ffffu64 << shift)) | (value & 0xffff_ffff) << shift
        };
    }

    /// Applies a status write (virtio 1.x section 3.1.1 and 2.1.2).
    fn write_status(&mut self, value: u8, device_features: u64) -> StatusAction {
        if value == 0 {
            self.reset();
            return StatusAction::Reset;
        }
        let old = self.device_status;
        // The driver cannot clear bits (except by reset) or set NEEDS_RESET.
        let mut new = (value & !DEVICE_NEEDS_RESET) | old;
        let added = new & !old;
        let mut action = StatusAction::None;
        let driver_known = DEVICE_ACKNOWLEDGE | DEVICE_DRIVER;
        if added & DEVICE_FEATURES_OK != 0 {
            match self.accept_features(device_features) {
                Some(features) if new & driver_known == driver_known => {
                    action = StatusAction::FeaturesAccepted(features);
                }
                _ => new &= !DEVICE_FEATURES_OK,
            }
        }
        if added & DEVICE_DRIVER_OK != 0 {
            if new & DEVICE_FEATURES_OK != 0 && new & DEVICE_FAILED == 0 {
                action = StatusAction::DriverOk;
            } else {
                new &= !DEVICE_DRIVER_OK;
            }
        }
        self.device_status = new;
        action
    }

    /// The driver's features if they are acceptable: a subset of the offer
    /// including VIRTIO_F_VERSION_1 (this transport is modern-only).
    fn accept_features(&self, device_features: u64) -> Option<u64> {
        let features = self.driver_features;
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        if features & !device_features != 0 || features & version_1 == 0 {
            debug!(
                "virtio-pci: rejecting driver features {features:#x} (offered {device_features:#x})"
            );
            return None;
        }
        Some(features)
    }
}

fn feature_dword(features: u64, select: u32) -> u64 {
    match select {
        0 => features & 0xffff_ffff,
        1 => features >> 32,
        _ => 0,
    }
}

/// Maps an access in the queue address block to (field 0..3, bit shift);
/// 8-byte accesses must be 8-byte aligned.
fn queue_addr_field(offset: u64, len: usize) -> Option<(usize, u64)> {
    let rel = offset.checked_sub(QUEUE_DESC)?;
    if rel >= QUEUE_DEVICE_END - QUEUE_DESC || !rel.is_multiple_of(len as u64) {
        return None;
    }
    Some(((rel / 8) as usize, (rel % 8) * 8))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << 3;

    fn common() -> VirtioPciCommonConfig {
        VirtioPciCommonConfig::new(&[256, 64], 3, Arc::new(InterruptState::new(2)))
    }

    fn read(c: &VirtioPciCommonConfig, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        c.read(offset, &mut data[..len], FEATURES);
        u64::from_le_bytes(data)
    }

    fn write(c: &mut VirtioPciCommonConfig, offset: u64, len: usize, v: u64) -> StatusAction {
        c.write(offset, &v.to_le_bytes()[..len], FEATURES)
    }

    fn negotiate(c: &mut VirtioPciCommonConfig, features: u64) -> StatusAction {
        write(c, DEVICE_STATUS, 1, 1);
        write(c, DEVICE_STATUS, 1, 3);
        write(c, DRIVER_FEATURE_SELECT, 4, 0);
        write(c, DRIVER_FEATURE, 4, features & 0xffff_ffff);
        write(c, DRIVER_FEATURE_SELECT, 4, 1);
        write(c, DRIVER_FEATURE, 4, features >> 32);
        write(c, DEVICE_STATUS, 1, 0xb)
    }

    #[test]
    fn device_features_are_paged_by_select() {
        let mut c = common();
        assert_eq!(read(&c, DEVICE_FEATURE, 4), 1 << 3);
        write(&mut c, DEVICE_FEATURE_SELECT, 4, 1);
        assert_eq!(read(&c, DEVICE_FEATURE, 4), 1);
        write(&mut c, DEVICE_FEATURE_SELECT, 4, 2);
        assert_eq!(read(&c, DEVICE_FEATURE, 4), 0);
        assert_eq!(read(&c, NUM_QUEUES, 2), 2);
    }

    #[test]
    fn features_ok_accepts_a_subset_with_version_1() {
        let mut c = common();
        assert_eq!(
            negotiate(&mut c, FEATURES),
            StatusAction::FeaturesAccepted(FEATURES)
        );
        assert_eq!(read(&c, DEVICE_STATUS, 1), 0xb);
        // Features are frozen after FEATURES_OK.
        write(&mut c, DRIVER_FEATURE_SELECT, 4, 0);
        write(&mut c, DRIVER_FEATURE, 4, 0);
        assert_eq!(c.driver_features(), FEATURES);
    }

    #[test]
    fn features_ok_rejects_unoffered_or_legacy_features() {
        let mut c = common();
        assert_eq!(negotiate(&mut c, FEATURES | 1 << 5), StatusAction::None);
        assert_eq!(
            read(&c, DEVICE_STATUS, 1),
            0x3,
            "FEATURES_OK must not stick"
        );
        let mut c = common();
        assert_eq!(negotiate(&mut c, 1 << 3), StatusAction::None);
        assert_eq!(read(&c, DEVICE_STATUS, 1), 0x3);
    }

    #[test]
    fn driver_ok_requires_features_ok() {
        let mut c = common();
        write(&mut c, DEVICE_STATUS, 1, 3);
        assert_eq!(write(&mut c, DEVICE_STATUS, 1, 7), StatusAction::None);
        assert_eq!(read(&c, DEVICE_STATUS, 1), 3);
        negotiate(&mut c, FEATURES);
        assert_eq!(write(&mut c, DEVICE_STATUS, 1, 0xf), StatusAction::DriverOk);
        // The driver cannot clear bits or set NEEDS_RESET itself.
        assert_eq!(write(&mut c, DEVICE_STATUS, 1, 0x41), StatusAction::None);
        assert_eq!(read(&c, DEVICE_STATUS, 1), 0xf);
        c.set_needs_reset();
        assert_eq!(read(&c, DEVICE_STATUS, 1), 0x4f);
        assert_eq!(write(&mut c, DEVICE_STATUS, 1, 0), StatusAction::Reset);
        assert_eq!(read(&c, DEVICE_STATUS, 1), 0);
    }

    #[test]
    fn queue_registers_round_trip_per_selected_queue() {
        let mut c = common();
        write(&mut c, QUEUE_SELECT, 2, 1);
        assert_eq!(read(&c, QUEUE_SIZE, 2), 64);
        assert_eq!(read(&c, QUEUE_NOTIFY_OFF, 2), 1);
        write(&mut c, QUEUE_SIZE, 2, 32);
        write(&mut c, QUEUE_DESC, 4, 0x1000);
        write(&mut c, QUEUE_DESC + 4, 4, 0x2);
        write(&mut c, 0x28, 8, 0x3000);
        write(&mut c, 0x30, 4, 0x4000);
        write(&mut c, QUEUE_MSIX_VECTOR, 2, 2);
        assert_eq!(read(&c, QUEUE_SIZE, 2), 32);
        assert_eq!(read(&c, QUEUE_DESC, 8), 0x2_0000_1000);
        assert_eq!(read(&c, QUEUE_DESC + 4, 4), 0x2);
        assert_eq!(read(&c, 0x28, 4), 0x3000);
        assert_eq!(read(&c, QUEUE_MSIX_VECTOR, 2), 2);
        write(&mut c, QUEUE_ENABLE, 2, 1);
        assert_eq!(read(&c, QUEUE_ENABLE, 2), 1);
        let q = c.queues()[1];
        assert_eq!(
            (q.size, q.desc, q.driver, q.device),
            (32, 0x2_0000_1000, 0x3000, 0x4000)
        );
        // An enabled queue's configuration is frozen.
        write(&mut c, QUEUE_SIZE, 2, 16);
        write(&mut c, QUEUE_DESC, 4, 0);
        assert_eq!(c.queues()[1], q);
        write(&mut c, QUEUE_SELECT, 2, 0);
        assert_eq!(read(&c, QUEUE_ENABLE, 2), 0);
    }

    #[test]
    fn out_of_range_queue_and_vector_are_harmless() {
        let mut c = common();
        write(&mut c, QUEUE_SELECT, 2, 9);
        assert_eq!(read(&c, QUEUE_SIZE, 2), 0);
        write(&mut c, QUEUE_ENABLE, 2, 1);
        write(&mut c, QUEUE_MSIX_VECTOR, 2, 0);
        assert_eq!(
            read(&c, QUEUE_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
        write(&mut c, QUEUE_SELECT, 2, 0);
        write(&mut c, QUEUE_SIZE, 2, 512);
        assert_eq!(read(&c, QUEUE_SIZE, 2), 256, "size above max is refused");
        write(&mut c, CONFIG_MSIX_VECTOR, 2, 3);
        assert_eq!(
            read(&c, CONFIG_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
        write(&mut c, CONFIG_MSIX_VECTOR, 2, 0);
        assert_eq!(read(&c, CONFIG_MSIX_VECTOR, 2), 0);
        // Wrong widths read 0 and change nothing.
        assert_eq!(read(&c, CONFIG_MSIX_VECTOR, 4), 0);
        assert_eq!(read(&c, QUEUE_DESC + 4, 8), 0);
        assert_eq!(read(&c, 0x3c, 4), 0);
    }

    #[test]
    fn reset_restores_power_on_values() {
        let mut c = common();
        negotiate(&mut c, FEATURES);
        write(&mut c, QUEUE_SIZE, 2, 8);
        write(&mut c, QUEUE_ENABLE, 2, 1);
        write(&mut c, CONFIG_MSIX_VECTOR, 2, 1);
        write(&mut c, DEVICE_STATUS, 1, 0);
        assert_eq!(c.driver_features(), 0);
        assert_eq!(c.queues()[0], QueueRegisters::new(256));
        assert_eq!(
            read(&c, CONFIG_MSIX_VECTOR, 2),
            u64::from(VIRTIO_MSI_NO_VECTOR)
        );
    }
}
