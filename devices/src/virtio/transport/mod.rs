//! Virtio transports. Only the modern (virtio 1.x) PCI transport exists:
//! [`VirtioPciDevice`] with its common configuration registers
//! ([`common_config`]) and MSI-X based interrupt delivery ([`interrupt`]).

pub mod common_config;
pub mod interrupt;
pub mod pci;
#[cfg(test)]
mod test_utils;

pub use interrupt::{VirtioPciInterrupt, VIRTIO_MSI_NO_VECTOR};
pub use pci::{VirtioPciDevice, VirtioPciError};
