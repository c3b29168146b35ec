//! The ACPI DMAR table describing the unit, as raw bytes with a correct checksum.
//!
//! Layout: the 36-byte ACPI header ("DMAR", revision 1), host address width − 1, flags
//! (bit 0 INTR_REMAP, bit 1 X2APIC_OPT_OUT), 10 reserved bytes; then one DRHD for the segment
//! (INCLUDE_PCI_ALL and/or explicit endpoint/bridge scopes, plus an IOAPIC scope when interrupt
//! remapping is offered) and, with device-TLB support, an ATSR with ALL_PORTS.

use super::regs::REG_SIZE;
use super::VtdConfig;

/// DMAR flags: interrupt remapping supported.
pub const FLAG_INTR_REMAP: u8 = 1 << 0;
/// DMAR flags: the platform asks the OS not to use x2APIC mode.
pub const FLAG_X2APIC_OPT_OUT: u8 = 1 << 1;
/// DRHD flags: the unit covers every PCI device of its segment not covered elsewhere.
pub const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;
/// ATSR flags: every root port supports ATS.
pub const ATSR_ALL_PORTS: u8 = 1 << 0;
/// QEMU's (and this VMM's default) register base on q35-like machines.
pub const DEFAULT_REGISTER_BASE: u64 = 0xfed9_0000;

const HEADER_LEN: usize = 48;
const SCOPE_ENDPOINT: u8 = 1;
const SCOPE_BRIDGE: u8 = 2;
const SCOPE_IOAPIC: u8 = 3;

/// Errors building the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmarError {
    /// A scope names an impossible PCI device or function.
    #[error("DMAR device scope {bus:02x}:{device:02x}.{function} is invalid; device must be < 32 and function < 8")]
    BadDevice {
        /// Bus.
        bus: u8,
        /// Device.
        device: u8,
        /// Function.
        function: u8,
    },
    /// The DRHD would exceed its 16-bit length field.
    #[error(
        "DMAR DRHD with {scopes} device scopes exceeds 65535 bytes; use INCLUDE_PCI_ALL instead"
    )]
    TooManyScopes {
        /// Number of scopes requested.
        scopes: usize,
    },
    /// Address width outside what Linux accepts.
    #[error("DMAR host address width {0} is invalid; use 39 or 48")]
    AddressWidth(u8),
}

/// The kind of a PCI device scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeKind {
    /// A PCI endpoint (type 1).
    Endpoint,
    /// A PCI-PCI bridge, covering its subordinate buses (type 2).
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

/// Everything the DMAR table says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarConfig {
    /// Host address width in bits (39 or 48).
    pub host_address_width: u8,
    /// Set INTR_REMAP (needs an IOAPIC scope for Linux to enable remapping).
    pub interrupt_remapping: bool,
    /// Set X2APIC_OPT_OUT.
    pub x2apic_opt_out: bool,
    /// Register block base address.
    pub register_base: u64,
    /// PCI segment.
    pub segment: u16,
    /// DRHD INCLUDE_PCI_ALL.
    pub include_pci_all: bool,
    /// Explicit device scopes.
    pub devices: Vec<DeviceScope>,
    /// IOAPIC scope.
    pub ioapic: Option<IoapicScope>,
    /// Emit an ATSR with ALL_PORTS (device-TLB support).
    pub atsr_all_ports: bool,
    /// ACPI OEM id.
    pub oem_id: [u8; 6],
    /// ACPI OEM table id.
    pub oem_table_id: [u8; 8],
    /// ACPI OEM revision.
    pub oem_revision: u32,
    /// ACPI creator id.
    pub creator_id: [u8; 4],
    /// ACPI creator revision.
    pub creator_revision: u32,
}

impl DmarConfig {
    /// The table for a unit with `config` at `register_base`, covering all PCI devices.
    /// `ioapic` is used only when interrupt remapping is on.
    pub fn for_unit(config: &VtdConfig, register_base: u64, ioapic: Option<IoapicScope>) -> Self {
        Self {
            host_address_width: config.address_width,
            interrupt_remapping: config.interrupt_remapping,
            x2apic_opt_out: false,
            register_base,
            segment: config.segment,
            include_pci_all: true,
            devices: Vec::new(),
            ioapic: ioapic.filter(|_| config.interrupt_remapping),
            atsr_all_ports: config.device_iotlb,
            oem_id: *b"IOVMM ",
            oem_table_id: *b"IOVMMVM ",
            oem_revision: 1,
            creator_id: *b"IOVM",
            creator_revision: 1,
        }
    }

    /// Builds the table bytes.
    pub fn build(&self) -> Result<Vec<u8>, DmarError> {
        if !matches!(self.host_address_width, 39 | 48) {
            return Err(DmarError::AddressWidth(self.host_address_width));
        }
        let mut t = Vec::with_capacity(128);
        t.extend_from_slice(b"DMAR");
        t.extend_from_slice(&[0; 4]); // length, patched below
        t.push(1); // revision
        t.push(0); // checksum, patched below
        t.extend_from_slice(&self.oem_id);
        t.extend_from_slice(&self.oem_table_id);
        t.extend_from_slice(&self.oem_revision.to_le_bytes());
        t.extend_from_slice(&self.creator_id);
        t.extend_from_slice(&self.creator_revision.to_le_bytes());
        t.push(self.host_address_width - 1);
        t.push(self.flags());
        t.extend_from_slice(&[0; 10]);
        debug_assert_eq!(t.len(), HEADER_LEN);
        t.extend_from_slice(&self.drhd()?);
        if self.atsr_all_ports {
            t.extend_from_slice(&2u16.to_le_bytes()); // type 2: ATSR
            t.extend_from_slice(&8u16.to_le_bytes());
            t.push(ATSR_ALL_PORTS);
            t.push(0);
            t.extend_from_slice(&self.segment.to_le_bytes());
        }
        let len = u32::try_from(t.len()).map_err(|_| DmarError::TooManyScopes {
            scopes: self.devices.len(),
        })?;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t[9] = checksum(&t);
        Ok(t)
    }

    fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.interrupt_remapping {
            flags |= FLAG_INTR_REMAP;
        }
        if self.x2apic_opt_out {
            flags |= FLAG_X2APIC_OPT_OUT;
        }
        flags
    }

    fn drhd(&self) -> Result<Vec<u8>, DmarError> {
        let mut scopes = Vec::new();
        if let Some(io) = self.ioapic {
            check_device(io.bus, io.device, io.function)?;
            scopes.extend_from_slice(&scope(SCOPE_IOAPIC, io.id, io.bus, io.device, io.function));
        }
        for d in &self.devices {
            check_device(d.bus, d.device, d.function)?;
            let kind = match d.kind {
                ScopeKind::Endpoint => SCOPE_ENDPOINT,
                ScopeKind::Bridge => SCOPE_BRIDGE,
            };
            scopes.extend_from_slice(&scope(kind, 0, d.bus, d.device, d.function));
        }
        let len = u16::try_from(16 + scopes.len()).map_err(|_| DmarError::TooManyScopes {
            scopes: self.devices.len(),
        })?;
        let size_field = (REG_SIZE / 4096).trailing_zeros() as u8;
        let mut d = Vec::with_capacity(usize::from(len));
        d.extend_from_slice(&0u16.to_le_bytes()); // type 0: DRHD
        d.extend_from_slice(&len.to_le_bytes());
        d.push(if self.include_pci_all {
            DRHD_INCLUDE_PCI_ALL
        } else {
            0
        });
        d.push(size_field);
        d.extend_from_slice(&self.segment.to_le_bytes());
        d.extend_from_slice(&self.register_base.to_le_bytes());
        d.extend_from_slice(&scopes);
        Ok(d)
    }
}

fn check_device(bus: u8, device: u8, function: u8) -> Result<(), DmarError> {
    if device >= 32 || function >= 8 {
        return Err(DmarError::BadDevice {
            bus,
            device,
            function,
        });
    }
    Ok(())
}

/// An 8-byte device scope with a one-element path.
fn scope(kind: u8, enumeration_id: u8, bus: u8, device: u8, function: u8) -> [u8; 8] {
    [kind, 8, 0, 0, enumeration_id, bus, device, function]
}

/// The byte that makes the sum of `table` zero (with the checksum byte itself counted as 0).
fn checksum(table: &[u8]) -> u8 {
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn header(len: u8, checksum: u8, haw: u8, flags: u8) -> Vec<u8> {
        let mut h = b"DMAR".to_vec();
        h.extend_from_slice(&[len, 0, 0, 0, 1, checksum]);
        h.extend_from_slice(b"IOVMM IOVMMVM ");
        h.extend_from_slice(&[1, 0, 0, 0]);
        h.extend_from_slice(b"IOVM");
        h.extend_from_slice(&[1, 0, 0, 0, haw, flags]);
        h.extend_from_slice(&[0; 10]);
        h
    }

    #[test]
    fn golden_include_pci_all_table() {
        let config = VtdConfig {
            address_width: 48,
            ..VtdConfig::default()
        };
        let bytes = DmarConfig::for_unit(&config, DEFAULT_REGISTER_BASE, None)
            .build()
            .unwrap();
        let mut expected = header(64, 0, 47, 0);
        expected.extend_from_slice(&[
            0, 0, 16, 0, // DRHD, length 16
            1, 0, 0, 0, // INCLUDE_PCI_ALL, size 0 (4 KiB), segment 0
            0x00, 0x00, 0xd9, 0xfe, 0, 0, 0, 0, // base 0xfed90000
        ]);
        expected[9] = 0u8.wrapping_sub(sum(&expected));
        assert_eq!(bytes, expected);
        assert_eq!(sum(&bytes), 0, "checksum");
    }

    #[test]
    fn golden_explicit_scopes_with_ioapic_and_atsr() {
        let config = VtdConfig {
            address_width: 39,
            interrupt_remapping: true,
            device_iotlb: true,
            ..VtdConfig::default()
        };
        let ioapic = IoapicScope {
            id: 0,
            bus: 0xff,
            device: 0,
            function: 0,
        };
        let mut dmar = DmarConfig::for_unit(&config, DEFAULT_REGISTER_BASE, Some(ioapic));
        dmar.include_pci_all = false;
        dmar.devices = vec![
            DeviceScope {
                kind: ScopeKind::Endpoint,
                bus: 0,
                device: 3,
                function: 0,
            },
            DeviceScope {
                kind: ScopeKind::Bridge,
                bus: 0,
                device: 0x1c,
                function: 1,
            },
        ];
        let bytes = dmar.build().unwrap();
        let mut expected = header(48 + 40 + 8, 0, 38, FLAG_INTR_REMAP);
        expected.extend_from_slice(&[
            0, 0, 40, 0, 0, 0, 0, 0, // DRHD, length 40, no INCLUDE_PCI_ALL
            0x00, 0x00, 0xd9, 0xfe, 0, 0, 0, 0, // base
            3, 8, 0, 0, 0, 0xff, 0, 0, // IOAPIC id 0 at ff:00.0
            1, 8, 0, 0, 0, 0, 3, 0, // endpoint 00:03.0
            2, 8, 0, 0, 0, 0, 0x1c, 1, // bridge 00:1c.1
            2, 0, 8, 0, 1, 0, 0, 0, // ATSR, ALL_PORTS, segment 0
        ]);
        expected[9] = 0u8.wrapping_sub(sum(&expected));
        assert_eq!(bytes, expected);
        assert_eq!(sum(&bytes), 0);
    }

    #[test]
    fn ioapic_scope_only_with_interrupt_remapping() {
        let ioapic = IoapicScope {
            id: 1,
            bus: 0xff,
            device: 0,
            function: 0,
        };
        let dmar = DmarConfig::for_unit(&VtdConfig::default(), 0xfed9_0000, Some(ioapic));
        assert_eq!(dmar.ioapic, None);
        assert_eq!(dmar.build().unwrap()[37], 0, "no INTR_REMAP flag");
    }

    #[test]
    fn x2apic_opt_out_sets_flag_bit_1() {
        let mut dmar = DmarConfig::for_unit(&VtdConfig::default(), 0xfed9_0000, None);
        dmar.x2apic_opt_out = true;
        assert_eq!(dmar.build().unwrap()[37], FLAG_X2APIC_OPT_OUT);
    }

    #[test]
    fn invalid_scopes_and_widths_are_errors() {
        let mut dmar = DmarConfig::for_unit(&VtdConfig::default(), 0xfed9_0000, None);
        dmar.devices.push(DeviceScope {
            kind: ScopeKind::Endpoint,
            bus: 0,
            device: 32,
            function: 0,
        });
        assert!(matches!(dmar.build(), Err(DmarError::BadDevice { .. })));
        dmar.devices = vec![
            DeviceScope {
                kind: ScopeKind::Endpoint,
                bus: 0,
                device: 1,
                function: 0
            };
            8190
        ];
        assert_eq!(dmar.build(), Err(DmarError::TooManyScopes { scopes: 8190 }));
        dmar.devices.clear();
        dmar.host_address_width = 52;
        assert_eq!(dmar.build(), Err(DmarError::AddressWidth(52)));
    }
}
