//! The event queue: fault records written into driver-supplied buffers.
//!
//! Buffers are consumed only for faults. A fault that finds no buffer is dropped and counted;
//! nothing is queued inside the VMM, so a guest that never refills the queue costs nothing.

use std::sync::Arc;

use iommu::error::chain as causes;
use iommu::sync::lock;
use iommu::types::{Iova, RequesterId};
use iommu::virtio::protocol::{VirtioIommuFault, VIRTIO_IOMMU_FAULT_F_ADDRESS};
use iommu::warn_limited;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::IntoBytes;

use super::chain;
use super::handler::GUEST_LOG;
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// Index of the event queue.
pub const EVENTQ_INDEX: u16 = 1;
/// Readable bytes an event buffer may carry (none are expected; anything else is malformed).
const MAX_EVENT_READABLE: usize = 0;

/// What happened to a fault report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum FaultDelivery {
    /// Written into an event buffer and signalled.
    Queued,
    /// The driver had no event buffer available.
    DroppedNoBuffer,
    /// The device is not active (no event queue).
    DroppedInactive,
    /// The available buffers were malformed or outside guest memory.
    DroppedBadBuffer,
    /// The error is not reportable to the guest (see [`iommu::virtio::fault_record`]).
    NotReported,
}

/// The event queue of an active device.
pub(crate) struct EventQueue {
    mem: GuestMemoryMmap,
    queue: Queue,
    // Kept open so the transport's ioeventfd stays valid while the device is active; the
    // device never needs the event queue's kicks.
    _kick: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl EventQueue {
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        kick: EventFd,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Self {
        Self {
            mem,
            queue,
            _kick: kick,
            interrupt,
        }
    }

    /// Writes `record` into the next usable buffer. Malformed buffers are returned with used
    /// length 0 and skipped; at most one queue's worth of buffers is looked at.
    pub(crate) fn push(&mut self, record: &VirtioIommuFault) -> FaultDelivery {
        let bytes = record.as_bytes();
        let mut skipped_bad = false;
        for _ in 0..self.queue.size() {
            let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let used = match self.fill(chain, bytes) {
                Ok(()) => bytes.len() as u32,
                Err(e) => {
                    warn_limited!(
                        lock(&GUEST_LOG),
                        "virtio-iommu: skipping event buffer {head}: {}",
                        causes(&e)
                    );
                    skipped_bad = true;
                    0
                }
            };
            self.complete(head, used);
            if used > 0 {
                return FaultDelivery::Queued;
            }
        }
        if skipped_bad {
            FaultDelivery::DroppedBadBuffer
        } else {
            log::debug!("virtio-iommu: fault dropped, no event buffer available");
            FaultDelivery::DroppedNoBuffer
        }
    }

    fn fill<I>(&self, chain: I, bytes: &[u8]) -> Result<(), EventBufferError>
    where
        I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let parts = chain::split(&self.mem, chain, MAX_EVENT_READABLE)?;
        if parts.writable_len < bytes.len() {
            return Err(EventBufferError::TooShort {
                got: parts.writable_len,
                need: bytes.len(),
            });
        }
        chain::check_writable(&self.mem, &parts.writable, bytes.len())?;
        chain::write(&self.mem, &parts.writable, bytes)?;
        Ok(())
    }

    fn complete(&mut self, head: u16, used: u32) {
        if let Err(e) = self.queue.add_used(&self.mem, head, used) {
            warn_limited!(
                lock(&GUEST_LOG),
                "virtio-iommu: cannot return event buffer {head}: {}",
                causes(&e)
            );
            return;
        }
        if !chain::needs_interrupt(&mut self.queue, &self.mem) {
            return;
        }
        if let Err(e) = self
            .interrupt
            .trigger(VirtioInterruptType::Queue(EVENTQ_INDEX))
        {
            warn_limited!(
                lock(&GUEST_LOG),
                "virtio-iommu: cannot signal the event queue: {}",
                causes(&e)
            );
        }
    }
}

/// Why an event buffer was unusable.
#[derive(Debug, thiserror::Error)]
pub enum EventBufferError {
    /// The buffer layout or memory is wrong.
    #[error(transparent)]
    Chain(#[from] chain::ChainError),
    /// The writable part cannot hold a fault record.
    #[error("event buffer has {got} writable bytes; a fault record needs {need}")]
    TooShort {
        /// Writable bytes of the buffer.
        got: usize,
        /// Size of a fault record.
        need: usize,
    },
}

/// Builds a fault record; `F_ADDRESS` is set when `address` is known.
pub(crate) fn fault(
    endpoint: RequesterId,
    address: Option<Iova>,
    reason: u8,
    flags: u32,
) -> VirtioIommuFault {
    let flags = flags & !VIRTIO_IOMMU_FAULT_F_ADDRESS
        | if address.is_some() {
            VIRTIO_IOMMU_FAULT_F_ADDRESS
        } else {
            0
        };
    VirtioIommuFault {
        reason,
        reserved: [0; 3],
        flags: U32::new(flags),
        endpoint: U32::new(endpoint.endpoint_id()),
        reserved1: [0; 4],
        address: U64::new(address.map_or(0, |a| a.0)),
    }
}
