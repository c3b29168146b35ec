//! The ACPI DMAR table (DMA Remapping Reporting) of the VT-d unit.
//!
//! The facts come from the pure [`DmarDescription`] of the `iommu` crate (derived from the
//! unit's own configuration); this module only encodes them. The header is acpi_tables'
//! [`Sdt`] (signature, length, revision, OEM fields, creator, checksum), as for the other tables
//! of [`super::acpi`]; the remapping structures are [`Aml`] objects written into it.
//!
//! Layout (VT-d spec 8.1): the 36-byte ACPI header ("DMAR", revision 1), host address width − 1,
//! flags (bit 0 INTR_REMAP, bit 1 X2APIC_OPT_OUT), 10 reserved bytes; then one DRHD for the
//! segment (INCLUDE_PCI_ALL and/or explicit endpoint/bridge scopes, plus an IOAPIC scope when
//! interrupt remapping is offered) and, with device-TLB support, an ATSR with ALL_PORTS.

use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};
use iommu::vtd::dmar::{DmarDescription, ScopeKind};
use thiserror::Error;

use super::acpi::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// DMAR revision (VT-d spec 8.1).
pub const DMAR_REVISION: u8 = 1;
/// DMAR flags: interrupt remapping supported.
pub const FLAG_INTR_REMAP: u8 = 1 << 0;
/// DMAR flags: the platform asks the OS not to use x2APIC mode.
pub const FLAG_X2APIC_OPT_OUT: u8 = 1 << 1;
/// DRHD flags: the unit covers every PCI device of its segment not covered elsewhere.
pub const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;
/// ATSR flags: every root port supports ATS.
pub const ATSR_ALL_PORTS: u8 = 1 << 0;

/// The ACPI header plus host address width, flags and 10 reserved bytes.
const HEADER_LEN: u32 = 48;
/// Offset of the host address width byte.
const HAW_OFFSET: usize = 36;
/// Offset of the flags byte.
const FLAGS_OFFSET: usize = 37;
/// Remapping structure types.
const TYPE_DRHD: u16 = 0;
const TYPE_ATSR: u16 = 2;
/// Fixed part of a DRHD and the whole ATSR (ALL_PORTS: no scopes).
const DRHD_LEN: usize = 16;
const ATSR_LEN: u16 = 8;
/// Device scope types and the length of a scope with a one-element path.
const SCOPE_ENDPOINT: u8 = 1;
const SCOPE_BRIDGE: u8 = 2;
const SCOPE_IOAPIC: u8 = 3;
const SCOPE_LEN: u8 = 8;
/// The register set is described in 4 KiB pages.
const PAGE_SIZE: u64 = 4096;

/// Errors building the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
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
    /// The register block cannot be described in power-of-two 4 KiB pages.
    #[error(
        "DMAR register block size {0:#x} is invalid; it must be a power of two of at least 4 KiB"
    )]
    RegisterSize(u64),
}

/// Builds the DMAR table bytes for `desc`.
pub fn build(desc: &DmarDescription) -> Result<Vec<u8>, DmarError> {
    if !matches!(desc.host_address_width, 39 | 48) {
        return Err(DmarError::AddressWidth(desc.host_address_width));
    }
    let drhd = Drhd::new(desc)?;
    let mut structures = Vec::new();
    drhd.to_aml_bytes(&mut structures);
    if desc.atsr_all_ports {
        AtsrAllPorts(desc.segment).to_aml_bytes(&mut structures);
    }
    let mut sdt = Sdt::new(
        *b"DMAR",
        HEADER_LEN,
        DMAR_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    sdt.write_u8(HAW_OFFSET, desc.host_address_width - 1);
    sdt.write_u8(FLAGS_OFFSET, flags(desc));
    sdt.append_slice(&structures);
    Ok(sdt.as_slice().to_vec())
}

fn flags(desc: &DmarDescription) -> u8 {
    let mut flags = 0;
    if desc.interrupt_remapping {
        flags |= FLAG_INTR_REMAP;
    }
    if desc.x2apic_opt_out {
        flags |= FLAG_X2APIC_OPT_OUT;
    }
    flags
}

/// A checked DRHD (DMA Remapping Hardware Unit Definition).
struct Drhd {
    length: u16,
    flags: u8,
    /// Register set size as 2^size 4 KiB pages.
    size: u8,
    segment: u16,
    base: u64,
    scopes: Vec<Scope>,
}

impl Drhd {
    fn new(desc: &DmarDescription) -> Result<Self, DmarError> {
        let ioapic = desc
            .ioapic
            .map(|io| Scope::new(SCOPE_IOAPIC, io.id, io.bus, io.device, io.function));
        let devices = desc.devices.iter().map(|d| {
            let kind = match d.kind {
                ScopeKind::Endpoint => SCOPE_ENDPOINT,
                ScopeKind::Bridge => SCOPE_BRIDGE,
            };
            Scope::new(kind, 0, d.bus, d.device, d.function)
        });
        let scopes = ioapic
            .into_iter()
            .chain(devices)
            .collect::<Result<Vec<_>, _>>()?;
        let length = scopes
            .len()
            .checked_mul(usize::from(SCOPE_LEN))
            .and_then(|s| s.checked_add(DRHD_LEN))
            .and_then(|l| u16::try_from(l).ok())
            .ok_or(DmarError::TooManyScopes {
                scopes: desc.devices.len(),
            })?;
        let pages = desc.register_size / PAGE_SIZE;
        if !desc.register_size.is_multiple_of(PAGE_SIZE) || !pages.is_power_of_two() {
            return Err(DmarError::RegisterSize(desc.register_size));
        }
        Ok(Self {
            length,
            flags: if desc.include_pci_all {
                DRHD_INCLUDE_PCI_ALL
            } else {
                0
            },
            size: pages.trailing_zeros() as u8,
            segment: desc.segment,
            base: desc.register_base,
            scopes,
        })
    }
}

impl Aml for Drhd {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.word(TYPE_DRHD);
        sink.word(self.length);
        sink.byte(self.flags);
        sink.byte(self.size);
        sink.word(self.segment);
        sink.qword(self.base);
        for s in &self.scopes {
            s.to_aml_bytes(sink);
        }
    }
}

/// A device scope with a one-element path (the device sits on its start bus).
struct Scope {
    kind: u8,
    enumeration_id: u8,
    bus: u8,
    device: u8,
    function: u8,
}

impl Scope {
    fn new(
        kind: u8,
        enumeration_id: u8,
        bus: u8,
        device: u8,
        function: u8,
    ) -> Result<Self, DmarError> {
        if device >= 32 || function >= 8 {
            return Err(DmarError::BadDevice {
                bus,
                device,
                function,
            });
        }
        Ok(Self {
            kind,
            enumeration_id,
            bus,
            device,
            function,
        })
    }
}

impl Aml for Scope {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(self.kind);
        sink.byte(SCOPE_LEN);
        sink.word(0); // reserved
        sink.byte(self.enumeration_id);
        sink.byte(self.bus);
        sink.byte(self.device);
        sink.byte(self.function);
    }
}

/// An ATSR (Root Port ATS Capability Reporting) with ALL_PORTS for a segment.
struct AtsrAllPorts(u16);

impl Aml for AtsrAllPorts {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.word(TYPE_ATSR);
        sink.word(ATSR_LEN);
        sink.byte(ATSR_ALL_PORTS);
        sink.byte(0); // reserved
        sink.word(self.0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use iommu::vtd::dmar::{DeviceScope, IoapicScope};
    use iommu::vtd::VtdConfig;

    use super::*;
    use crate::arch::x86_64::acpi;
    use crate::arch::x86_64::layout::VTD_START;

    const IOAPIC: IoapicScope = IoapicScope {
        id: 0,
        bus: 0xff,
        device: 0,
        function: 0,
    };

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(t: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(t[at..at + 2].try_into().unwrap())
    }

    /// The header every table of `acpi.rs` carries, with the DMAR's own fields.
    fn header(len: u8, haw: u8, flags: u8) -> Vec<u8> {
        let mut h = b"DMAR".to_vec();
        h.extend_from_slice(&[len, 0, 0, 0, 1, 0]);
        h.extend_from_slice(b"IOVMM IOVMMVM ");
        h.extend_from_slice(&[1, 0, 0, 0]);
        h.extend_from_slice(b"RVAT");
        h.extend_from_slice(&[0, 0, 0, 1, haw, flags]);
        h.extend_from_slice(&[0; 10]);
        h
    }

    fn with_checksum(mut t: Vec<u8>) -> Vec<u8> {
        t[9] = 0u8.wrapping_sub(sum(&t));
        t
    }

    /// `(type, bytes)` of every remapping structure after the 48-byte header.
    fn structures(t: &[u8]) -> Vec<(u16, &[u8])> {
        let mut out = Vec::new();
        let mut off = HEADER_LEN as usize;
        while off < t.len() {
            let len = usize::from(u16_at(t, off + 2));
            out.push((u16_at(t, off), &t[off..off + len]));
            off += len;
        }
        assert_eq!(off, t.len(), "structures fill the table exactly");
        out
    }

    fn unit(config: &VtdConfig, ioapic: Option<IoapicScope>) -> Vec<u8> {
        build(&DmarDescription::for_unit(config, VTD_START, ioapic)).unwrap()
    }

    #[test]
    fn golden_include_pci_all_table() {
        let bytes = unit(&VtdConfig::default(), None);
        let mut expected = header(64, 47, 0);
        expected.extend_from_slice(&[
            0, 0, 16, 0, // DRHD, length 16
            1, 0, 0, 0, // INCLUDE_PCI_ALL, size 0 (4 KiB), segment 0
            0x00, 0x00, 0xd9, 0xfe, 0, 0, 0, 0, // base 0xfed90000
        ]);
        assert_eq!(bytes, with_checksum(expected));
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
        let mut desc = DmarDescription::for_unit(&config, VTD_START, Some(IOAPIC));
        desc.include_pci_all = false;
        desc.devices = vec![
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
        let bytes = build(&desc).unwrap();
        let mut expected = header(48 + 40 + 8, 38, FLAG_INTR_REMAP);
        expected.extend_from_slice(&[
            0, 0, 40, 0, 0, 0, 0, 0, // DRHD, length 40, no INCLUDE_PCI_ALL
            0x00, 0x00, 0xd9, 0xfe, 0, 0, 0, 0, // base
            3, 8, 0, 0, 0, 0xff, 0, 0, // IOAPIC id 0 at ff:00.0
            1, 8, 0, 0, 0, 0, 3, 0, // endpoint 00:03.0
            2, 8, 0, 0, 0, 0, 0x1c, 1, // bridge 00:1c.1
            2, 0, 8, 0, 1, 0, 0, 0, // ATSR, ALL_PORTS, segment 0
        ]);
        assert_eq!(bytes, with_checksum(expected));
        assert_eq!(sum(&bytes), 0);
    }

    #[test]
    fn parsed_fields_follow_the_unit_configuration() {
        for (aw, ir, dt) in [(39, false, false), (48, true, false), (48, true, true)] {
            let config = VtdConfig {
                address_width: aw,
                interrupt_remapping: ir,
                device_iotlb: dt,
                ..VtdConfig::default()
            };
            let t = unit(&config, Some(IOAPIC));
            assert_eq!(&t[0..4], b"DMAR");
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
            assert_eq!(t[8], DMAR_REVISION);
            assert_eq!(sum(&t), 0, "checksum");
            assert_eq!(t[HAW_OFFSET], aw - 1);
            assert_eq!(t[FLAGS_OFFSET], u8::from(ir) * FLAG_INTR_REMAP);
            let s = structures(&t);
            let drhd = s[0].1;
            assert_eq!(s[0].0, TYPE_DRHD);
            assert_eq!(drhd[4], DRHD_INCLUDE_PCI_ALL);
            assert_eq!(drhd[5], 0, "one 4 KiB register page");
            assert_eq!(u16_at(drhd, 6), 0, "segment");
            assert_eq!(
                u64::from_le_bytes(drhd[8..16].try_into().unwrap()),
                VTD_START
            );
            let ioapic_scope: &[u8] = &[3, 8, 0, 0, 0, 0xff, 0, 0];
            assert_eq!(&drhd[16..], if ir { ioapic_scope } else { &[] });
            let atsr: Vec<_> = s.iter().filter(|(ty, _)| *ty == TYPE_ATSR).collect();
            assert_eq!(atsr.len(), usize::from(dt));
            if dt {
                assert_eq!(atsr[0].1, &[2, 0, 8, 0, ATSR_ALL_PORTS, 0, 0, 0]);
            }
        }
    }

    #[test]
    fn header_matches_the_other_acpi_tables() {
        let t = unit(&VtdConfig::default(), None);
        acpi::assert_header_like_madt(&t, b"DMAR");
    }

    #[test]
    fn x2apic_opt_out_sets_flag_bit_1() {
        let mut desc = DmarDescription::for_unit(&VtdConfig::default(), VTD_START, None);
        desc.x2apic_opt_out = true;
        assert_eq!(build(&desc).unwrap()[FLAGS_OFFSET], FLAG_X2APIC_OPT_OUT);
    }

    #[test]
    fn register_block_size_is_encoded_in_pages() {
        let mut desc = DmarDescription::for_unit(&VtdConfig::default(), VTD_START, None);
        desc.register_size = 4 * PAGE_SIZE;
        assert_eq!(build(&desc).unwrap()[HEADER_LEN as usize + 5], 2);
        for bad in [0, 0x800, 3 * PAGE_SIZE] {
            desc.register_size = bad;
            assert_eq!(build(&desc), Err(DmarError::RegisterSize(bad)));
        }
    }

    #[test]
    fn invalid_scopes_and_widths_are_errors() {
        let mut desc = DmarDescription::for_unit(&VtdConfig::default(), VTD_START, None);
        desc.devices.push(DeviceScope {
            kind: ScopeKind::Endpoint,
            bus: 0,
            device: 32,
            function: 0,
        });
        assert!(matches!(build(&desc), Err(DmarError::BadDevice { .. })));
        let scope = DeviceScope {
            kind: ScopeKind::Endpoint,
            bus: 0,
            device: 1,
            function: 0,
        };
        desc.devices = vec![scope; 8189];
        assert!(build(&desc).is_ok(), "the largest DRHD that fits");
        desc.devices.push(scope);
        assert_eq!(build(&desc), Err(DmarError::TooManyScopes { scopes: 8190 }));
        desc.devices.clear();
        desc.host_address_width = 52;
        assert_eq!(build(&desc), Err(DmarError::AddressWidth(52)));
    }
}
