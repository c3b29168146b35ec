//! The transport-agnostic virtio device seam.
//!
//! A [`VirtioDevice`] implements one virtio device type (virtio-iommu, a
//! vhost-user frontend, ...). A transport (today only virtio-pci, see
//! [`crate::virtio::transport`]) owns the guest-visible registers, negotiates
//! features with the driver, collects the virtqueue configuration and hands
//! everything to the device in [`VirtioDevice::activate`].

use std::io;
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::thread::ThreadHook;

/// Guest memory as seen by devices (no dirty bitmap).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors a device reports when it cannot be activated.
#[derive(Debug, Error)]
pub enum VirtioDeviceError {
    /// The driver enabled a different number of queues than the device needs.
    #[error(
        "device needs {expected} queues but the driver enabled {actual}; \
         the guest driver must enable every mandatory queue before DRIVER_OK"
    )]
    QueueCount {
        /// Number of queues the device needs.
        expected: usize,
        /// Number of queues the driver enabled.
        actual: usize,
    },
    /// `activate` was called twice without a successful `reset` in between.
    #[error("device is already active; reset it before activating it again")]
    AlreadyActive,
    /// The device's backend (worker thread, vhost-user socket, ...) failed.
    #[error("device backend failed during activation")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration space changed.
    Config,
    /// The device used buffers of the queue with this index.
    Queue(u16),
}

/// How a device raises interrupts; implemented by the transport.
///
/// `trigger` may be called from any thread (device workers), concurrently
/// with guest register accesses. Implementations take only their own
/// interrupt state lock, never the transport's device lock, so a device may
/// call `trigger` while the transport is waiting on it.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises the interrupt (an MSI-X message, or a pending bit while the
    /// vector is masked). Nothing happens when the driver assigned no vector.
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()>;

    /// The eventfd that raises this interrupt without a VMM round trip (a
    /// KVM irqfd), if the transport was built with one. vhost-user frontends
    /// hand it to the backend as the vring call fd. `None` when irqfds are
    /// not in use or the driver assigned no vector to that queue.
    fn notifier(&self, int_type: VirtioInterruptType) -> Option<&EventFd> {
        let _ = int_type;
        None
    }
}

/// Everything a device needs to start processing its queues.
pub struct ActivateContext {
    /// Guest memory. Ring addresses in the queues are guest physical
    /// addresses unless `VIRTIO_F_ACCESS_PLATFORM` was negotiated (then they
    /// are IOVAs and the device must translate them).
    pub mem: GuestMemoryMmap,
    /// The queues the driver enabled, as `(queue index, queue, kick eventfd)`.
    /// Every queue is already sized, has aligned ring addresses and event-idx
    /// set as negotiated. Without `VIRTIO_F_ACCESS_PLATFORM` it is also valid
    /// for `mem` (`Queue::is_valid`); with it the ring addresses are IOVAs,
    /// which the transport cannot check, and the device must translate (and
    /// so check) them itself. The kick eventfd is written (by KVM
    /// ioeventfd or by the transport) each time the driver notifies the queue.
    pub queues: Vec<(usize, Queue, EventFd)>,
    /// Interrupt delivery for this device.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl std::fmt::Debug for ActivateContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivateContext")
            .field(
                "queues",
                &self.queues.iter().map(|q| q.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A virtio device, independent of the transport.
///
/// # Lifecycle
///
/// ```text
///  created ──ack_features──> negotiated ──activate(Ok)──> active
///     ^                          │                          │
///     │                    activate(Err): transport sets    │
///     │                    DEVICE_NEEDS_RESET               │
///     └──────────── reset() == true <── driver writes status 0
/// ```
///
/// 1. The transport reads `device_type`, `queue_max_sizes`, `config_len`
///    and `avail_features` at construction and whenever the driver asks.
/// 2. When the driver sets FEATURES_OK with a subset of the offered
///    features, the transport calls `ack_features` once with that subset
///    (`VIRTIO_F_VERSION_1` included). A driver asking for a feature that was
///    not offered never reaches the device.
/// 3. `read_config`/`write_config` may be called at any time; offsets are
///    relative to the device-specific configuration and the transport
///    bounds them to `config_len`.
/// 4. At DRIVER_OK the transport calls `activate` exactly once with the
///    enabled queues. An error leaves the device inactive; the driver sees
///    DEVICE_NEEDS_RESET. It must never panic.
/// 5. When the driver resets the device (status 0), the transport calls
///    `reset`. It returns true once the device stopped using guest memory,
///    dropped the queues and kick eventfds and can be activated again; false
///    if it cannot be reused (the transport then refuses later activations).
///    `reset` is also called on an inactive device and must then return true.
///
/// Transport methods are called with the transport's lock held; devices must
/// not block for long in them (a vhost-user round trip is fine).
pub trait VirtioDevice: Send {
    /// The virtio device ID (1 = net, 2 = block, 23 = iommu, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Length in bytes of the device-specific configuration space.
    fn config_len(&self) -> usize;
    /// The features the device offers (bit n = feature n).
    fn avail_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of `avail_features`
    /// plus `VIRTIO_F_VERSION_1`).
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration at `offset`; bytes past the end read as 0.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    /// Writes device configuration at `offset`; read-only fields are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device. See the lifecycle above.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioDeviceError>;
    /// Stops the device and returns it to the pre-activation state.
    fn reset(&mut self) -> bool;
    /// Gives the device the hook its own threads must run first (see
    /// [`crate::thread`]). Devices without threads ignore it (the default).
    fn set_thread_hook(&mut self, _hook: ThreadHook) {}
}

/// Copies the bytes of a device's configuration `config` at `offset` into
/// `data`, the part past the end (or an offset beyond it) reading as 0: the
/// `read_config` contract for devices that hold their configuration as bytes.
pub fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::copy_config;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        copy_config(&config, 1, &mut data);
        assert_eq!(data, [2, 3, 4, 0]);
        copy_config(&config, 4, &mut data);
        assert_eq!(data, [0; 4]);
        data = [0xff; 4];
        copy_config(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
        let mut two = [0u8; 2];
        copy_config(&config, 0, &mut two);
        assert_eq!(two, [1, 2]);
    }
}
