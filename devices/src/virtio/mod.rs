//! Virtio: the transport-agnostic device trait and the modern virtio-pci
//! transport.
//!
//! A device implements [`VirtioDevice`]; [`transport::VirtioPciDevice`] turns
//! it into a PCI function (config space, a memory BAR with the virtio
//! structures, MSI-X) that the `vmm` crate plugs into the PCI root and the
//! MMIO bus.

pub mod device;
pub mod iommu;
pub mod transport;

pub use device::{
    copy_config, ActivateContext, GuestMemoryMmap, VirtioDevice, VirtioDeviceError,
    VirtioInterrupt, VirtioInterruptType,
};
