//! Device models of iovmm.
//!
//! Everything here is driven by the `vmm` crate through a few traits:
//! [`bus::BusDevice`] for MMIO and port I/O, [`interrupt::MsiSink`] for
//! interrupt delivery and [`pci::PciDevice`] for PCI functions. Devices never
//! touch KVM directly; the `vmm` crate implements the traits over KVM.
#![warn(missing_docs)]

pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod sys;
pub mod thread;
pub mod vhost_kernel;
pub mod vhost_user;
pub mod viommu;
pub mod virtio;
pub mod vtd;
