//! Basic newtypes shared by every IOMMU model: I/O virtual addresses, requester ids,
//! inclusive IOVA ranges, domain ids, access permissions and reserved regions.

use std::fmt;

/// Access permissions of a mapping, and the kind of access a DMA request wants.
///
/// This is `vm_memory::Permissions` re-exported, so `vm-memory`'s IOMMU support and ours speak the
/// same type. `Read` means the *device* may read guest memory, `Write` that it may write it.
pub use vm_memory::Permissions;

/// The access a DMA request wants (an alias of [`Permissions`]).
pub type Access = Permissions;

/// Builds [`Permissions`] from separate read and write bits.
pub fn permissions(read: bool, write: bool) -> Permissions {
    match (read, write) {
        (false, false) => Permissions::No,
        (true, false) => Permissions::Read,
        (false, true) => Permissions::Write,
        (true, true) => Permissions::ReadWrite,
    }
}

/// The intersection of two permission sets (what both allow).
pub fn intersect(a: Permissions, b: Permissions) -> Permissions {
    permissions(
        a.allow(Permissions::Read) && b.allow(Permissions::Read),
        a.has_write() && b.has_write(),
    )
}

/// An I/O virtual address: an address as the device (the DMA requester) sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(pub u64);

impl Iova {
    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A domain identifier (a virtio-iommu `domain` field, a VT-d DID).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainId(pub u32);

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "domain {}", self.0)
    }
}

/// Errors building the types of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TypesError {
    /// An inclusive range whose end lies before its start.
    #[error(
        "IOVA range end {end:#x} lies before its start {start:#x}; pass an inclusive end >= start"
    )]
    EndBeforeStart {
        /// First address.
        start: u64,
        /// Inclusive last address.
        end: u64,
    },
    /// A zero-length range.
    #[error("IOVA range at {start:#x} has length 0; ranges must cover at least one byte")]
    Empty {
        /// First address.
        start: u64,
    },
    /// `start + len - 1` does not fit in 64 bits.
    #[error("IOVA range {start:#x} + {len:#x} runs past the end of the 64-bit address space")]
    Overflow {
        /// First address.
        start: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A PCI device or function number out of range.
    #[error(
        "invalid PCI address {bus:02x}:{dev:02x}.{func}: device must be < 32 and function < 8"
    )]
    BadBdf {
        /// Bus number.
        bus: u8,
        /// Device number.
        dev: u8,
        /// Function number.
        func: u8,
    },
}

/// The identity of a DMA requester: PCI segment plus bus/device/function.
///
/// The virtio-iommu endpoint id and the VT-d source id are derived from it: with the VIOT layout
/// this VMM writes (one PCI range per segment starting at endpoint 0), the endpoint id is
/// `segment << 16 | bdf` (see [`RequesterId::endpoint_id`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequesterId {
    segment: u16,
    bdf: u16,
}

impl RequesterId {
    /// Builds a requester id from segment, bus, device (< 32) and function (< 8).
    pub fn new(segment: u16, bus: u8, dev: u8, func: u8) -> Result<Self, TypesError> {
        if dev >= 32 || func >= 8 {
            return Err(TypesError::BadBdf { bus, dev, func });
        }
        let bdf = (u16::from(bus) << 8) | (u16::from(dev) << 3) | u16::from(func);
        Ok(Self { segment, bdf })
    }

    /// Builds a requester id from a segment and a 16-bit BDF (`bus << 8 | dev << 3 | fn`).
    pub const fn from_bdf(segment: u16, bdf: u16) -> Self {
        Self { segment, bdf }
    }

    /// Builds a requester id from a virtio-iommu endpoint id (`segment << 16 | bdf`).
    pub const fn from_endpoint_id(endpoint: u32) -> Self {
        Self {
            segment: (endpoint >> 16) as u16,
            bdf: endpoint as u16,
        }
    }

    /// The virtio-iommu endpoint id (`segment << 16 | bdf`).
    pub const fn endpoint_id(self) -> u32 {
        ((self.segment as u32) << 16) | self.bdf as u32
    }

    /// The PCI segment.
    pub const fn segment(self) -> u16 {
        self.segment
    }

    /// The 16-bit BDF (the VT-d source id).
    pub const fn bdf(self) -> u16 {
        self.bdf
    }

    /// The bus number.
    pub const fn bus(self) -> u8 {
        (self.bdf >> 8) as u8
    }

    /// The device number.
    pub const fn device(self) -> u8 {
        ((self.bdf >> 3) & 0x1f) as u8
    }

    /// The function number.
    pub const fn function(self) -> u8 {
        (self.bdf & 0x7) as u8
    }
}

impl fmt::Display for RequesterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{}",
            self.segment,
            self.bus(),
            self.device(),
            self.function()
        )
    }
}

/// A non-empty, inclusive range of IOVAs: `[start, end]`.
///
/// The inclusive end makes the full 64-bit space (`[0, u64::MAX]`) representable; its size,
/// 2^64, is reported as a `u128`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IovaRange {
    start: u64,
    end: u64,
}

impl IovaRange {
    /// The whole 64-bit IOVA space.
    pub const FULL: IovaRange = IovaRange {
        start: 0,
        end: u64::MAX,
    };

    /// `[start, end]`, inclusive. Fails if `end < start`.
    pub const fn new(start: u64, end: u64) -> Result<Self, TypesError> {
        if end < start {
            return Err(TypesError::EndBeforeStart { start, end });
        }
        Ok(Self { start, end })
    }

    /// `[start, start + len - 1]`. Fails if `len` is 0 or the range runs past `u64::MAX`.
    pub const fn from_start_len(start: u64, len: u64) -> Result<Self, TypesError> {
        if len == 0 {
            return Err(TypesError::Empty { start });
        }
        match start.checked_add(len - 1) {
            Some(end) => Ok(Self { start, end }),
            None => Err(TypesError::Overflow { start, len }),
        }
    }

    /// First address.
    pub const fn start(self) -> u64 {
        self.start
    }

    /// Last address (inclusive).
    pub const fn end(self) -> u64 {
        self.end
    }

    /// Number of bytes covered (1..=2^64).
    pub const fn size(self) -> u128 {
        (self.end - self.start) as u128 + 1
    }

    /// Number of bytes covered, or `None` for the full 2^64 range.
    pub const fn size_u64(self) -> Option<u64> {
        (self.end - self.start).checked_add(1)
    }

    /// Whether `iova` lies inside the range.
    pub const fn contains(self, iova: u64) -> bool {
        self.start <= iova && iova <= self.end
    }

    /// Whether `other` lies entirely inside this range.
    pub const fn contains_range(self, other: IovaRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether the two ranges share at least one address.
    pub const fn intersects(self, other: IovaRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }

    /// The common part of two ranges, if any.
    pub fn intersection(self, other: IovaRange) -> Option<IovaRange> {
        if !self.intersects(other) {
            return None;
        }
        Some(IovaRange {
            start: self.start.max(other.start),
            end: self.end.min(other.end),
        })
    }

    /// The smallest range covering both.
    pub fn hull(self, other: IovaRange) -> IovaRange {
        IovaRange {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }
}

impl fmt::Display for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x}]", self.start, self.end)
    }
}

/// What a reserved IOVA region is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservedKind {
    /// Not mappable, and DMA there faults.
    Reserved,
    /// An MSI doorbell window: not mappable, and accesses there bypass translation (identity).
    Msi,
}

/// A reserved IOVA region (virtio-iommu RESV_MEM property; the VT-d interrupt window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedRegion {
    /// The reserved addresses.
    pub range: IovaRange,
    /// Their use.
    pub kind: ReservedKind,
}

/// First address of the x86 MSI window.
pub const X86_MSI_START: u64 = 0xFEE0_0000;
/// Last address (inclusive) of the x86 MSI window.
pub const X86_MSI_END: u64 = 0xFEEF_FFFF;

impl ReservedRegion {
    /// The x86 interrupt window `[0xFEE00000, 0xFEEFFFFF]` as an MSI region.
    pub const fn x86_msi() -> Self {
        Self {
            range: IovaRange {
                start: X86_MSI_START,
                end: X86_MSI_END,
            },
            kind: ReservedKind::Msi,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requester_id_round_trips_bdf_and_fields() {
        let rid = RequesterId::new(1, 0x12, 0x1f, 7).unwrap();
        assert_eq!(rid.bdf(), 0x12ff);
        assert_eq!((rid.bus(), rid.device(), rid.function()), (0x12, 0x1f, 7));
        assert_eq!(rid.endpoint_id(), 0x0001_12ff);
        assert_eq!(RequesterId::from_endpoint_id(0x0001_12ff), rid);
        assert_eq!(RequesterId::from_bdf(1, 0x12ff), rid);
        assert_eq!(rid.to_string(), "0001:12:1f.7");
    }

    #[test]
    fn requester_id_rejects_device_or_function_out_of_range() {
        assert!(matches!(
            RequesterId::new(0, 0, 32, 0),
            Err(TypesError::BadBdf { dev: 32, .. })
        ));
        assert!(RequesterId::new(0, 0, 0, 8).is_err());
    }

    #[test]
    fn range_from_start_len_rejects_zero_and_overflow() {
        assert_eq!(
            IovaRange::from_start_len(5, 0),
            Err(TypesError::Empty { start: 5 })
        );
        assert_eq!(
            IovaRange::from_start_len(u64::MAX, 2),
            Err(TypesError::Overflow {
                start: u64::MAX,
                len: 2
            })
        );
        let last = IovaRange::from_start_len(u64::MAX, 1).unwrap();
        assert_eq!((last.start(), last.end()), (u64::MAX, u64::MAX));
    }

    #[test]
    fn range_new_rejects_end_before_start() {
        assert!(IovaRange::new(10, 9).is_err());
        assert_eq!(IovaRange::new(10, 10).unwrap().size(), 1);
    }

    #[test]
    fn full_range_has_size_two_to_the_64() {
        assert_eq!(IovaRange::FULL.size(), 1u128 << 64);
        assert_eq!(IovaRange::FULL.size_u64(), None);
        assert_eq!(IovaRange::new(0, 9).unwrap().size_u64(), Some(10));
    }

    #[test]
    fn range_set_operations() {
        let a = IovaRange::new(0, 9).unwrap();
        let b = IovaRange::new(5, 14).unwrap();
        let c = IovaRange::new(10, 14).unwrap();
        assert!(a.intersects(b) && !a.intersects(c));
        assert_eq!(a.intersection(b), Some(IovaRange::new(5, 9).unwrap()));
        assert_eq!(a.intersection(c), None);
        assert_eq!(a.hull(c), IovaRange::new(0, 14).unwrap());
        assert!(b.contains_range(c) && !c.contains_range(b));
        assert!(a.contains(9) && !a.contains(10));
    }

    #[test]
    fn permission_helpers_compose() {
        assert_eq!(permissions(true, true), Permissions::ReadWrite);
        assert_eq!(permissions(false, true), Permissions::Write);
        assert_eq!(
            intersect(Permissions::ReadWrite, Permissions::Read),
            Permissions::Read
        );
        assert_eq!(
            intersect(Permissions::Write, Permissions::Read),
            Permissions::No
        );
    }
}
