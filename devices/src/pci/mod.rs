//! PCI: configuration space, MSI-X and the root complex.
//!
//! The platform has one segment with one bus. Configuration space is
//! reachable through the legacy port pair ([`PciConfigIo`], 0xCF8..0xD00) and
//! the ECAM window ([`PciConfigMmio`], [`PCI_ECAM_BASE`], 1 MiB). Both dispatch
//! into a shared [`PciRoot`] that holds the host bridge (00:00.0) and the
//! devices (00:01.0 upwards), each a [`PciDevice`]. BARs come from
//! [`BarAllocator`] windows; guest BAR moves are applied through the
//! [`DeviceRelocation`] the VMM installs.

pub mod access;
pub mod allocator;
pub mod ats;
pub mod configuration;
pub mod msix;
pub mod root;

pub use access::{
    PciConfigIo, PciConfigMmio, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE, PCI_ECAM_BASE,
    PCI_ECAM_SIZE,
};
pub use allocator::{allocate_bars, BarAllocError, BarAllocator, PCI_MMIO32_BASE, PCI_MMIO32_SIZE};
pub use configuration::{
    PciBarInfo, PciBarRegionType, PciConfigError, PciConfiguration, PciHeader,
};
pub use msix::{MsixConfig, MsixError, MsixIrqfds};
pub use root::{
    DeviceRelocation, PciBdf, PciDevice, PciHostBridge, PciRoot, PciRootError, SharedPciDevice,
};
