//! virtio-iommu wire format (virtio spec, "IOMMU device"): constants and little-endian structs
//! with `zerocopy` derives. Field names follow the spec; every struct's size is checked at
//! compile time.

use std::mem::size_of;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// virtio device id of the IOMMU.
pub const VIRTIO_ID_IOMMU: u32 = 23;

/// Feature bit: `input_range` is valid.
pub const VIRTIO_IOMMU_F_INPUT_RANGE: u32 = 0;
/// Feature bit: `domain_range` is valid.
pub const VIRTIO_IOMMU_F_DOMAIN_RANGE: u32 = 1;
/// Feature bit: MAP and UNMAP requests are available.
pub const VIRTIO_IOMMU_F_MAP_UNMAP: u32 = 2;
/// Feature bit (legacy, not offered here): unattached endpoints bypass.
pub const VIRTIO_IOMMU_F_BYPASS: u32 = 3;
/// Feature bit: PROBE requests are available and `probe_size` is valid.
pub const VIRTIO_IOMMU_F_PROBE: u32 = 4;
/// Feature bit: the MAP flag MMIO is available.
pub const VIRTIO_IOMMU_F_MMIO: u32 = 5;
/// Feature bit: the `bypass` config byte and `ATTACH_F_BYPASS` are available.
pub const VIRTIO_IOMMU_F_BYPASS_CONFIG: u32 = 6;

/// Request type ATTACH.
pub const VIRTIO_IOMMU_T_ATTACH: u8 = 1;
/// Request type DETACH.
pub const VIRTIO_IOMMU_T_DETACH: u8 = 2;
/// Request type MAP.
pub const VIRTIO_IOMMU_T_MAP: u8 = 3;
/// Request type UNMAP.
pub const VIRTIO_IOMMU_T_UNMAP: u8 = 4;
/// Request type PROBE.
pub const VIRTIO_IOMMU_T_PROBE: u8 = 5;

/// Status: success.
pub const S_OK: u8 = 0;
/// Status: virtio communication error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;
/// Status: internal device error.
pub const S_DEVERR: u8 = 3;
/// Status: invalid parameters.
pub const S_INVAL: u8 = 4;
/// Status: out-of-range parameters.
pub const S_RANGE: u8 = 5;
/// Status: entry not found.
pub const S_NOENT: u8 = 6;
/// Status: bad address.
pub const S_FAULT: u8 = 7;
/// Status: insufficient resources.
pub const S_NOMEM: u8 = 8;

/// ATTACH flag: create/join a bypass domain.
pub const VIRTIO_IOMMU_ATTACH_F_BYPASS: u32 = 1 << 0;

/// MAP flag: device reads allowed.
pub const VIRTIO_IOMMU_MAP_F_READ: u32 = 1 << 0;
/// MAP flag: device writes allowed.
pub const VIRTIO_IOMMU_MAP_F_WRITE: u32 = 1 << 1;
/// MAP flag: the target is device memory.
pub const VIRTIO_IOMMU_MAP_F_MMIO: u32 = 1 << 2;

/// PROBE property type RESV_MEM.
pub const VIRTIO_IOMMU_PROBE_T_RESV_MEM: u16 = 1;
/// Mask of the type bits in a property header (bits 15:12 are reserved).
pub const VIRTIO_IOMMU_PROBE_T_MASK: u16 = 0xfff;
/// RESV_MEM subtype: reserved, not mappable, DMA faults.
pub const VIRTIO_IOMMU_RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: MSI doorbell, not mappable, bypasses translation.
pub const VIRTIO_IOMMU_RESV_MEM_T_MSI: u8 = 1;

/// Fault reason: internal or unclassified error.
pub const VIRTIO_IOMMU_FAULT_R_UNKNOWN: u8 = 0;
/// Fault reason: the endpoint is not attached to a domain.
pub const VIRTIO_IOMMU_FAULT_R_DOMAIN: u8 = 1;
/// Fault reason: no mapping, or insufficient permission.
pub const VIRTIO_IOMMU_FAULT_R_MAPPING: u8 = 2;
/// Fault flag: the access was a read.
pub const VIRTIO_IOMMU_FAULT_F_READ: u32 = 1 << 0;
/// Fault flag: the access was a write.
pub const VIRTIO_IOMMU_FAULT_F_WRITE: u32 = 1 << 1;
/// Fault flag: `address` is valid.
pub const VIRTIO_IOMMU_FAULT_F_ADDRESS: u32 = 1 << 8;

/// Common request head (device-readable).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuReqHead {
    /// Request type (`VIRTIO_IOMMU_T_*`).
    pub type_: u8,
    /// Ignored by the device.
    pub reserved: [u8; 3],
}

/// Common request tail (device-writable).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuReqTail {
    /// Status (`S_*`).
    pub status: u8,
    /// Written as zero.
    pub reserved: [u8; 3],
}

/// ATTACH, device-readable part.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuReqAttach {
    /// Head.
    pub head: VirtioIommuReqHead,
    /// Domain id.
    pub domain: U32,
    /// Endpoint id.
    pub endpoint: U32,
    /// `VIRTIO_IOMMU_ATTACH_F_*`.
    pub flags: U32,
    /// Must be zero.
    pub reserved: [u8; 4],
}

/// DETACH, device-readable part.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuReqDetach {
    /// Head.
    pub head: VirtioIommuReqHead,
    /// Domain id.
    pub domain: U32,
    /// Endpoint id.
    pub endpoint: U32,
    /// Ignored.
    pub reserved: [u8; 8],
}

/// MAP, device-readable part.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuReqMap {
    /// Head.
    pub head: VirtioIommuReqHead,
    /// Domain id.
    pub domain: U32,
    /// First IOVA.
    pub virt_start: U64,
    /// Last IOVA (inclusive).
    pub virt_end: U64,
    /// Guest-physical address of `virt_start`.
    pub phys_start: U64,
    /// `VIRTIO_IOMMU_MAP_F_*`.
    pub flags: U32,
}

/// UNMAP, device-readable part.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuReqUnmap {
    /// Head.
    pub head: VirtioIommuReqHead,
    /// Domain id.
    pub domain: U32,
    /// First IOVA.
    pub virt_start: U64,
    /// Last IOVA (inclusive).
    pub virt_end: U64,
    /// Ignored by this device.
    pub reserved: [u8; 4],
}

/// PROBE, device-readable part.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuReqProbe {
    /// Head.
    pub head: VirtioIommuReqHead,
    /// Endpoint id.
    pub endpoint: U32,
    /// Ignored.
    pub reserved: [u8; 64],
}

/// PROBE property header.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuProbeProperty {
    /// Type in bits 11:0; bits 15:12 reserved.
    pub type_: U16,
    /// Length of the value after this header.
    pub length: U16,
}

/// PROBE property RESV_MEM.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuProbeResvMem {
    /// Header: type RESV_MEM, length 20.
    pub head: VirtioIommuProbeProperty,
    /// `VIRTIO_IOMMU_RESV_MEM_T_*`.
    pub subtype: u8,
    /// Zero.
    pub reserved: [u8; 3],
    /// First reserved IOVA.
    pub start: U64,
    /// Last reserved IOVA (inclusive).
    pub end: U64,
}

/// Fault report written into an event-queue buffer.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuFault {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// Zero (the driver ignores reports where it is not).
    pub reserved: [u8; 3],
    /// `VIRTIO_IOMMU_FAULT_F_*`.
    pub flags: U32,
    /// Faulting endpoint.
    pub endpoint: U32,
    /// Zero.
    pub reserved1: [u8; 4],
    /// Faulting address, valid with `VIRTIO_IOMMU_FAULT_F_ADDRESS`.
    pub address: U64,
}

/// Device configuration space (40 bytes).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct VirtioIommuConfig {
    /// Supported page sizes; the lowest set bit is the granule.
    pub page_size_mask: U64,
    /// `input_range.start`.
    pub input_range_start: U64,
    /// `input_range.end` (inclusive).
    pub input_range_end: U64,
    /// `domain_range.start`.
    pub domain_range_start: U32,
    /// `domain_range.end` (inclusive).
    pub domain_range_end: U32,
    /// Bytes of properties in a PROBE reply.
    pub probe_size: U32,
    /// Global bypass of unattached endpoints (0/1).
    pub bypass: u8,
    /// Zero.
    pub reserved: [u8; 3],
}

/// Byte offset of `bypass` in [`VirtioIommuConfig`].
pub const CONFIG_BYPASS_OFFSET: usize = 36;

const _: () = assert!(size_of::<VirtioIommuReqHead>() == 4);
const _: () = assert!(size_of::<VirtioIommuReqTail>() == 4);
const _: () = assert!(size_of::<VirtioIommuReqAttach>() == 20);
const _: () = assert!(size_of::<VirtioIommuReqDetach>() == 20);
const _: () = assert!(size_of::<VirtioIommuReqMap>() == 36);
const _: () = assert!(size_of::<VirtioIommuReqUnmap>() == 28);
const _: () = assert!(size_of::<VirtioIommuReqProbe>() == 72);
const _: () = assert!(size_of::<VirtioIommuProbeProperty>() == 4);
const _: () = assert!(size_of::<VirtioIommuProbeResvMem>() == 24);
const _: () = assert!(size_of::<VirtioIommuFault>() == 24);
const _: () = assert!(size_of::<VirtioIommuConfig>() == 40);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn map_request_decodes_little_endian_fields_at_spec_offsets() {
        let mut bytes = [0u8; 36];
        bytes[0] = VIRTIO_IOMMU_T_MAP;
        bytes[4..8].copy_from_slice(&7u32.to_le_bytes());
        bytes[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
        bytes[16..24].copy_from_slice(&0x1fffu64.to_le_bytes());
        bytes[24..32].copy_from_slice(&0xa000u64.to_le_bytes());
        bytes[32..36].copy_from_slice(&3u32.to_le_bytes());
        let req = VirtioIommuReqMap::read_from_bytes(&bytes).unwrap();
        assert_eq!(req.domain.get(), 7);
        assert_eq!(req.virt_start.get(), 0x1000);
        assert_eq!(req.virt_end.get(), 0x1fff);
        assert_eq!(req.phys_start.get(), 0xa000);
        assert_eq!(
            req.flags.get(),
            VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE
        );
    }

    #[test]
    fn config_bypass_byte_is_at_offset_36() {
        let cfg = VirtioIommuConfig {
            bypass: 1,
            probe_size: U32::new(512),
            ..Default::default()
        };
        let bytes = cfg.as_bytes();
        assert_eq!(bytes[CONFIG_BYPASS_OFFSET], 1);
        assert_eq!(&bytes[32..36], &512u32.to_le_bytes());
    }

    #[test]
    fn resv_mem_property_encodes_as_24_bytes() {
        let p = VirtioIommuProbeResvMem {
            head: VirtioIommuProbeProperty {
                type_: U16::new(VIRTIO_IOMMU_PROBE_T_RESV_MEM),
                length: U16::new(20),
            },
            subtype: VIRTIO_IOMMU_RESV_MEM_T_MSI,
            reserved: [0; 3],
            start: U64::new(0xFEE0_0000),
            end: U64::new(0xFEEF_FFFF),
        };
        let b = p.as_bytes();
        assert_eq!(&b[..4], &[1, 0, 20, 0]);
        assert_eq!(b[4], 1);
        assert_eq!(&b[8..16], &0xFEE0_0000u64.to_le_bytes());
        assert_eq!(&b[16..24], &0xFEEF_FFFFu64.to_le_bytes());
    }
}
