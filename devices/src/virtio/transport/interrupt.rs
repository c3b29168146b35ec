//! Interrupt delivery of the virtio-pci transport: MSI-X vectors chosen by
//! the driver, plus the ISR status byte.

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use iommu::sync::lock;
use vmm_sys_util::eventfd::EventFd;

use crate::pci::msix::{MsixConfig, MsixIrqfds};
use crate::virtio::device::{VirtioInterrupt, VirtioInterruptType};

/// The "no vector assigned" value of the vector registers.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// ISR bit: a queue was used.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 2;

/// Interrupt state shared between the registers (written by the driver) and
/// the interrupt path (used by device threads). Lock-free.
#[derive(Debug)]
pub struct InterruptState {
    pub(crate) config_vector: AtomicU16,
    pub(crate) queue_vectors: Box<[AtomicU16]>,
    isr: AtomicU8,
    generation: AtomicU8,
}

impl InterruptState {
    /// Creates the state for `num_queues` queues, no vectors assigned.
    pub fn new(num_queues: usize) -> Self {
        InterruptState {
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            isr: AtomicU8::new(0),
            generation: AtomicU8::new(0),
        }
    }

    /// The vector of configuration change interrupts.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    /// The vector of queue `queue`, if the queue exists.
    pub fn queue_vector(&self, queue: u16) -> Option<u16> {
        self.queue_vectors
            .get(usize::from(queue))
            .map(|v| v.load(Ordering::Acquire))
    }

    /// The configuration generation counter.
    pub fn generation(&self) -> u8 {
        self.generation.load(Ordering::Acquire)
    }

    /// Returns and clears the ISR status (a guest read of the ISR byte).
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    /// Unassigns every vector and clears the ISR (device reset).
    pub fn reset(&self) {
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for v in self.queue_vectors.iter() {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
        self.isr.store(0, Ordering::Release);
    }

    fn vector_of(&self, int_type: VirtioInterruptType) -> Option<u16> {
        let v = match int_type {
            VirtioInterruptType::Config => self.config_vector(),
            VirtioInterruptType::Queue(q) => self.queue_vector(q)?,
        };
        (v != VIRTIO_MSI_NO_VECTOR).then_some(v)
    }
}

/// The [`VirtioInterrupt`] the virtio-pci transport hands to its device.
pub struct VirtioPciInterrupt {
    state: Arc<InterruptState>,
    msix: Arc<Mutex<MsixConfig>>,
    irqfds: Option<Arc<MsixIrqfds>>,
}

impl std::fmt::Debug for VirtioPciInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciInterrupt")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl VirtioPciInterrupt {
    /// Creates the interrupt path over the shared state and MSI-X table.
    pub fn new(state: Arc<InterruptState>, msix: Arc<Mutex<MsixConfig>>) -> Self {
        let irqfds = lock(&msix).irqfds().cloned();
        VirtioPciInterrupt {
            state,
            msix,
            irqfds,
        }
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        let mut msix = lock(&self.msix);
        match int_type {
            VirtioInterruptType::Config => {
                self.state.generation.fetch_add(1, Ordering::AcqRel);
                self.state.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
            }
            // With MSI-X on, the queue bit of the ISR is not used (4.1.4.5).
            VirtioInterruptType::Queue(_) if !msix.enabled() => {
                self.state.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
            }
            VirtioInterruptType::Queue(_) => {}
        }
        match self.state.vector_of(int_type) {
            Some(vector) => msix.trigger(vector),
            None => Ok(()),
        }
    }

    fn notifier(&self, int_type: VirtioInterruptType) -> Option<&EventFd> {
        let vector = self.state.vector_of(int_type)?;
        self.irqfds.as_ref()?.eventfd(vector)
    }
}
