//! The ACPI VIOT table (Virtual I/O Translation) for a virtio-iommu on PCI.
//!
//! Layout (QEMU's): the 48-byte header (36-byte ACPI header, node count, node offset 48,
//! 8 reserved bytes), then the virtio-pci IOMMU node (type 3, 16 bytes) at offset 48, then one
//! PCI range node (type 1, 24 bytes) whose `output_node` is 48. The range's endpoint start is
//! its first BDF, so a device's endpoint id equals its BDF (segment 0), matching the
//! `RequesterId::endpoint_id` the model uses. Linux never translates the IOMMU function itself
//! even when the range covers it.
//!
//! The ACPI header is acpi_tables' [`Sdt`], as for the other tables of [`super::acpi`]; the body
//! (node count and offset, the nodes and the range's reference to the IOMMU node) is encoded by
//! acpi_tables' [`VIOT`] builder. Its own header is not used: it writes revision 1, while ACPI
//! 6.4 and later define VIOT revision 0 (what QEMU writes).

use acpi_tables::sdt::Sdt;
use acpi_tables::viot::{PciDevice, PciRange, VirtIoPciIommu, VIOT};
use acpi_tables::Aml;
use devices::pci::PciBdf;
use thiserror::Error;

use super::acpi::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Length of the common ACPI table header.
const ACPI_HEADER_LEN: usize = 36;
/// VIOT revision defined by ACPI 6.4.
const VIOT_REVISION: u8 = 0;

/// Errors building a VIOT table.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ViotError {
    /// The endpoint range is empty.
    #[error(
        "VIOT endpoint range {first}..={last} is empty; the first BDF must not exceed the last"
    )]
    EmptyRange {
        /// First endpoint.
        first: PciBdf,
        /// Last endpoint.
        last: PciBdf,
    },
    /// Something is outside PCI segment 0 (endpoint ids are plain BDFs).
    #[error("{0} is not in PCI segment 0; this VMM describes segment 0 only")]
    Segment(PciBdf),
}

fn device(bdf: PciBdf) -> PciDevice {
    // `PciBdf` keeps device < 32 and function < 8, which `PciDevice::new` asserts.
    PciDevice::new(bdf.segment(), bdf.bus(), bdf.device(), bdf.function())
}

/// Builds the VIOT for the virtio-iommu function `iommu` translating the PCI endpoints
/// `first..=last` (endpoint id = BDF).
pub fn build(iommu: PciBdf, first: PciBdf, last: PciBdf) -> Result<Vec<u8>, ViotError> {
    if let Some(bad) = [iommu, first, last].into_iter().find(|b| b.segment() != 0) {
        return Err(ViotError::Segment(bad));
    }
    if first.requester_id() > last.requester_id() {
        return Err(ViotError::EmptyRange { first, last });
    }
    let mut nodes = VIOT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let handle = nodes.add_virtio_pci_iommu(VirtIoPciIommu::new(device(iommu)));
    nodes.add_pci_range(PciRange::new(device(first), device(last), &handle));
    let mut encoded = Vec::new();
    nodes.to_aml_bytes(&mut encoded);
    let mut sdt = Sdt::new(
        *b"VIOT",
        ACPI_HEADER_LEN as u32,
        VIOT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    sdt.append_slice(encoded.get(ACPI_HEADER_LEN..).unwrap_or_default());
    Ok(sdt.as_slice().to_vec())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes_of_one_iommu_and_one_pci_range() {
        let iommu = PciBdf::new(0, 0, 3, 0);
        let t = build(iommu, PciBdf::new(0, 0, 0, 0), PciBdf::new(0, 0, 0x1f, 7)).unwrap();
        assert_eq!(t.len(), 88);
        assert_eq!(&t[0..4], b"VIOT");
        assert_eq!(&t[4..8], &88u32.to_le_bytes());
        assert_eq!(t[8], 0, "revision");
        assert_eq!(&t[10..16], b"IOVMM ");
        assert_eq!(&t[16..24], b"IOVMMVM ");
        assert_eq!(&t[24..28], &1u32.to_le_bytes());
        assert_eq!(&t[28..36], b"RVAT\0\0\0\x01", "creator: acpi_tables");
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        // Node count 2, node offset 48, 8 reserved bytes.
        assert_eq!(&t[36..48], &[2, 0, 48, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        // virtio-pci IOMMU: type 3, length 16, segment 0, BDF 00:03.0 = 0x0018.
        let iommu_node = [3, 0, 16, 0, 0, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(&t[48..64], &iommu_node);
        // PCI range: type 1, length 24, endpoint start 0, segments 0..0, BDF 0..0xff,
        // output node 48, 6 reserved bytes.
        let range_node = [
            1, 0, 24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0, 48, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(&t[64..88], &range_node);
    }

    #[test]
    fn endpoint_start_is_the_first_bdf() {
        let t = build(
            PciBdf::new(0, 0, 1, 0),
            PciBdf::new(0, 1, 2, 3),
            PciBdf::new(0, 2, 0, 0),
        )
        .unwrap();
        let first = 0x0113u16;
        assert_eq!(&t[68..72], &u32::from(first).to_le_bytes());
        assert_eq!(&t[76..78], &first.to_le_bytes());
        assert_eq!(&t[78..80], &0x0200u16.to_le_bytes());
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn empty_ranges_and_other_segments_are_rejected() {
        let a = PciBdf::new(0, 0, 2, 0);
        let b = PciBdf::new(0, 0, 1, 0);
        assert_eq!(
            build(a, a, b),
            Err(ViotError::EmptyRange { first: a, last: b })
        );
        let s1 = PciBdf::new(1, 0, 1, 0);
        assert_eq!(build(a, s1, s1), Err(ViotError::Segment(s1)));
        assert_eq!(build(s1, b, a), Err(ViotError::Segment(s1)));
    }

    /// `(type, bytes)` of every node, checked against the header's count and offset.
    fn nodes(t: &[u8]) -> Vec<(u8, &[u8])> {
        let count = u16::from_le_bytes([t[36], t[37]]);
        let mut off = usize::from(u16::from_le_bytes([t[38], t[39]]));
        let mut out = Vec::new();
        while off < t.len() {
            let len = usize::from(u16::from_le_bytes([t[off + 2], t[off + 3]]));
            out.push((t[off], &t[off..off + len]));
            off += len;
        }
        assert_eq!(off, t.len(), "nodes fill the table exactly");
        assert_eq!(out.len(), usize::from(count));
        out
    }

    #[test]
    fn parsed_range_points_at_the_iommu_node() {
        let iommu = PciBdf::new(0, 0, 1, 0);
        let t = build(iommu, PciBdf::new(0, 0, 2, 0), PciBdf::new(0, 0, 4, 0)).unwrap();
        assert_eq!(&t[0..4], b"VIOT");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t[8], VIOT_REVISION);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        let n = nodes(&t);
        assert_eq!(n.iter().map(|(ty, _)| *ty).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(&n[0].1[6..8], &0x0008u16.to_le_bytes(), "IOMMU at 00:01.0");
        let range = n[1].1;
        assert_eq!(&range[12..14], &0x0010u16.to_le_bytes(), "first 00:02.0");
        assert_eq!(&range[14..16], &0x0020u16.to_le_bytes(), "last 00:04.0");
        assert_eq!(
            &range[16..18],
            &48u16.to_le_bytes(),
            "output node = IOMMU node"
        );
    }

    #[test]
    fn header_matches_the_other_acpi_tables() {
        let t = build(
            PciBdf::new(0, 0, 1, 0),
            PciBdf::new(0, 0, 2, 0),
            PciBdf::new(0, 0, 2, 0),
        )
        .unwrap();
        crate::arch::x86_64::acpi::assert_header_like_madt(&t, b"VIOT");
    }
}
