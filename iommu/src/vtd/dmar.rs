//! What the ACPI DMAR table says about the unit, as a pure description (no bytes).
//!
//! The DMAR must agree with the register model: the host address width with CAP.MGAW/SAGAW, the
//! INTR_REMAP flag with ECAP.IR, the ATSR with ECAP.DT, the DRHD's register block with
//! [`REG_SIZE`]. [`DmarDescription::for_unit`] derives all of these from the same [`VtdConfig`]
//! the unit is built from, so the two cannot drift. The VMM encodes the description as an ACPI
//! table beside its other tables (`vmm::arch::x86_64::dmar`).

use super::regs::REG_SIZE;
use super::VtdConfig;

/// The kind of a PCI device scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeKind {
    /// A PCI endpoint.
    Endpoint,
    /// A PCI-PCI bridge, covering its subordinate buses.
    Bridge,
}

/// A PCI device scope on the segment's root bus path `bus:device.function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceScope {
    /// Endpoint or bridge.
    pub kind: ScopeKind,
    /// Start bus.
    pub bus: u8,
    /// Device number.
    pub device: u8,
    /// Function number.
    pub function: u8,
}

/// The IOAPIC scope: its MADT id and the pseudo requester id its interrupts carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoapicScope {
    /// IOAPIC id (as in the MADT).
    pub id: u8,
    /// Requester bus.
    pub bus: u8,
    /// Requester device.
    pub device: u8,
    /// Requester function.
    pub function: u8,
}

/// Everything the DMAR table says about one remapping unit (one DRHD, optionally one ATSR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarDescription {
    /// Host address width in bits (39 or 48).
    pub host_address_width: u8,
    /// Interrupt remapping is supported (needs an IOAPIC scope for Linux to enable it).
    pub interrupt_remapping: bool,
    /// The platform asks the OS not to use x2APIC mode.
    pub x2apic_opt_out: bool,
    /// Register block base address.
    pub register_base: u64,
    /// Register block size in bytes (a power of two, at least 4 KiB).
    pub register_size: u64,
    /// PCI segment.
    pub segment: u16,
    /// The unit covers every PCI device of its segment not covered elsewhere (INCLUDE_PCI_ALL).
    pub include_pci_all: bool,
    /// Explicit device scopes.
    pub devices: Vec<DeviceScope>,
    /// IOAPIC scope.
    pub ioapic: Option<IoapicScope>,
    /// Every root port supports ATS (device-TLB support; an ATSR with ALL_PORTS).
    pub atsr_all_ports: bool,
}

impl DmarDescription {
    /// The description of a unit with `config` at `register_base`, covering all PCI devices.
    /// `ioapic` is used only when interrupt remapping is on.
    pub fn for_unit(config: &VtdConfig, register_base: u64, ioapic: Option<IoapicScope>) -> Self {
        Self {
            host_address_width: config.address_width,
            interrupt_remapping: config.interrupt_remapping,
            x2apic_opt_out: false,
            register_base,
            register_size: REG_SIZE,
            segment: config.segment,
            include_pci_all: true,
            devices: Vec::new(),
            ioapic: ioapic.filter(|_| config.interrupt_remapping),
            atsr_all_ports: config.device_iotlb,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IOAPIC: IoapicScope = IoapicScope {
        id: 1,
        bus: 0xff,
        device: 0,
        function: 0,
    };

    #[test]
    fn a_default_unit_covers_all_pci_devices_without_remapping_or_ats() {
        let d = DmarDescription::for_unit(&VtdConfig::default(), 0xfed9_0000, None);
        assert_eq!(
            d,
            DmarDescription {
                host_address_width: 48,
                interrupt_remapping: false,
                x2apic_opt_out: false,
                register_base: 0xfed9_0000,
                register_size: REG_SIZE,
                segment: 0,
                include_pci_all: true,
                devices: vec![],
                ioapic: None,
                atsr_all_ports: false,
            }
        );
    }

    #[test]
    fn ioapic_scope_only_with_interrupt_remapping() {
        let d = DmarDescription::for_unit(&VtdConfig::default(), 0xfed9_0000, Some(IOAPIC));
        assert_eq!(d.ioapic, None);
        assert!(!d.interrupt_remapping);
        let config = VtdConfig {
            interrupt_remapping: true,
            ..VtdConfig::default()
        };
        let d = DmarDescription::for_unit(&config, 0xfed9_0000, Some(IOAPIC));
        assert_eq!(d.ioapic, Some(IOAPIC));
        assert!(d.interrupt_remapping);
    }

    #[test]
    fn address_width_segment_and_device_iotlb_follow_the_unit() {
        let config = VtdConfig {
            address_width: 39,
            device_iotlb: true,
            segment: 2,
            ..VtdConfig::default()
        };
        let d = DmarDescription::for_unit(&config, 0x1000, None);
        assert_eq!(d.host_address_width, 39);
        assert_eq!(d.segment, 2);
        assert!(d.atsr_all_ports);
        assert_eq!(d.register_base, 0x1000);
    }
}
