//! The virtio-iommu model without any queue I/O: device settings and config space
//! ([`VirtioIommuSettings`]), the wire format ([`protocol`]), request parsing and execution
//! against [`crate::domain::Domains`] ([`request`]), and fault records.
//!
//! The device crate moves bytes between virtqueues and this module: it hands the readable part
//! of a request chain to [`request::handle`], delivers the returned events to the notifier set,
//! and only then writes the reply and returns the buffer to the guest.

pub mod protocol;
pub mod request;

use zerocopy::byteorder::little_endian::{U32, U64};

use crate::translate::TranslateError;
use crate::types::{Access, Iova, IovaRange, Permissions, RequesterId};
use protocol::*;

pub use request::{handle, Request, RequestError, Response};

/// Errors of the virtio-iommu settings and config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VirtioIommuError {
    /// `page_size_mask` has no bit set.
    #[error("page_size_mask must have at least one bit set (the lowest is the granule)")]
    EmptyPageSizeMask,
    /// `domain_range` with end before start.
    #[error("domain range [{start}, {end}] is empty; end must be >= start")]
    BadDomainRange {
        /// Start.
        start: u32,
        /// End.
        end: u32,
    },
    /// The driver wrote `bypass` without negotiating BYPASS_CONFIG.
    #[error(
        "driver wrote the bypass config byte without negotiating VIRTIO_IOMMU_F_BYPASS_CONFIG"
    )]
    BypassNotNegotiated,
    /// The driver wrote a value other than 0 or 1 to `bypass`.
    #[error("driver wrote {0} to the bypass config byte; only 0 and 1 are valid")]
    BadBypassValue(u8),
}

/// Device-specific features offered by default (as QEMU does): INPUT_RANGE, DOMAIN_RANGE,
/// MAP_UNMAP, PROBE, MMIO, BYPASS_CONFIG; never the legacy BYPASS.
pub const DEFAULT_FEATURES: u64 = (1 << VIRTIO_IOMMU_F_INPUT_RANGE)
    | (1 << VIRTIO_IOMMU_F_DOMAIN_RANGE)
    | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
    | (1 << VIRTIO_IOMMU_F_PROBE)
    | (1 << VIRTIO_IOMMU_F_MMIO)
    | (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);

/// Default PROBE properties size (QEMU's value).
pub const DEFAULT_PROBE_SIZE: u32 = 512;

/// Static settings of one virtio-iommu device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioIommuSettings {
    /// Supported page sizes; the lowest set bit is the mapping granule.
    pub page_size_mask: u64,
    /// IOVAs the device translates (valid with INPUT_RANGE).
    pub input_range: IovaRange,
    /// Valid domain ids, inclusive (valid with DOMAIN_RANGE).
    pub domain_range: (u32, u32),
    /// Bytes of properties in a PROBE reply (valid with PROBE).
    pub probe_size: u32,
    /// Offered device-specific feature bits (`1 << VIRTIO_IOMMU_F_*`).
    pub features: u64,
}

impl Default for VirtioIommuSettings {
    fn default() -> Self {
        Self {
            page_size_mask: !0xfff,
            input_range: IovaRange::new(0, (1 << 48) - 1).unwrap_or(IovaRange::FULL),
            domain_range: (0, u32::MAX),
            probe_size: DEFAULT_PROBE_SIZE,
            features: DEFAULT_FEATURES,
        }
    }
}

impl VirtioIommuSettings {
    /// Checks the settings a driver will rely on.
    pub fn validate(&self) -> Result<(), VirtioIommuError> {
        if self.page_size_mask == 0 {
            return Err(VirtioIommuError::EmptyPageSizeMask);
        }
        let (start, end) = self.domain_range;
        if end < start {
            return Err(VirtioIommuError::BadDomainRange { start, end });
        }
        Ok(())
    }

    /// The mapping granule in bytes (lowest set bit of `page_size_mask`; 1 if the mask is 0).
    pub fn granule(&self) -> u64 {
        if self.page_size_mask == 0 {
            1
        } else {
            1 << self.page_size_mask.trailing_zeros()
        }
    }

    /// Whether feature bit `bit` is offered.
    pub fn offers(&self, bit: u32) -> bool {
        bit < 64 && self.features & (1 << bit) != 0
    }

    /// The IOVAs a MAP may use: `input_range`, or all 64 bits without INPUT_RANGE.
    pub fn effective_input_range(&self) -> IovaRange {
        if self.offers(VIRTIO_IOMMU_F_INPUT_RANGE) {
            self.input_range
        } else {
            IovaRange::FULL
        }
    }

    /// Whether `domain` is valid (always, without DOMAIN_RANGE).
    pub fn domain_in_range(&self, domain: u32) -> bool {
        let (start, end) = self.domain_range;
        !self.offers(VIRTIO_IOMMU_F_DOMAIN_RANGE) || (start <= domain && domain <= end)
    }

    /// The config space the driver reads, with the current global `bypass`.
    pub fn config_space(&self, bypass: bool) -> VirtioIommuConfig {
        VirtioIommuConfig {
            page_size_mask: U64::new(self.page_size_mask),
            input_range_start: U64::new(self.input_range.start()),
            input_range_end: U64::new(self.input_range.end()),
            domain_range_start: U32::new(self.domain_range.0),
            domain_range_end: U32::new(self.domain_range.1),
            probe_size: U32::new(self.probe_size),
            bypass: u8::from(bypass),
            reserved: [0; 3],
        }
    }

    /// Validates a driver write of the `bypass` config byte; returns the new bypass setting.
    /// Apply it with [`crate::domain::Domains::set_global_bypass`].
    pub fn bypass_write(&self, acked_features: u64, value: u8) -> Result<bool, VirtioIommuError> {
        if acked_features & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG) == 0 {
            return Err(VirtioIommuError::BypassNotNegotiated);
        }
        match value {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(VirtioIommuError::BadBypassValue(v)),
        }
    }
}

/// The event-queue fault record for a failed translation of `iova` by `rid`, or `None` for
/// errors that are not the guest's business (a malformed request from the VMM itself).
pub fn fault_record(
    rid: RequesterId,
    iova: Iova,
    access: Access,
    err: &TranslateError,
) -> Option<VirtioIommuFault> {
    let (reason, address) = match *err {
        TranslateError::Unmapped { iova } => (VIRTIO_IOMMU_FAULT_R_MAPPING, Some(iova)),
        TranslateError::PermissionDenied { iova, .. } => (VIRTIO_IOMMU_FAULT_R_MAPPING, Some(iova)),
        TranslateError::NotAttached { .. } => (VIRTIO_IOMMU_FAULT_R_DOMAIN, Some(iova)),
        TranslateError::UnknownEndpoint { .. } => (VIRTIO_IOMMU_FAULT_R_UNKNOWN, Some(iova)),
        TranslateError::BadRange { .. } => return None,
    };
    let mut flags = 0;
    if access.allow(Permissions::Read) {
        flags |= VIRTIO_IOMMU_FAULT_F_READ;
    }
    if access.has_write() {
        flags |= VIRTIO_IOMMU_FAULT_F_WRITE;
    }
    if address.is_some() {
        flags |= VIRTIO_IOMMU_FAULT_F_ADDRESS;
    }
    Some(VirtioIommuFault {
        reason,
        reserved: [0; 3],
        flags: U32::new(flags),
        endpoint: U32::new(rid.endpoint_id()),
        reserved1: [0; 4],
        address: U64::new(address.map_or(0, |a| a.0)),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn default_config_space_matches_linux_expectations() {
        let s = VirtioIommuSettings::default();
        s.validate().unwrap();
        assert_eq!(s.granule(), 4096);
        let cfg = s.config_space(true);
        let b = cfg.as_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(&b[0..8], &(!0xfffu64).to_le_bytes());
        assert_eq!(&b[8..16], &0u64.to_le_bytes());
        assert_eq!(&b[16..24], &((1u64 << 48) - 1).to_le_bytes());
        assert_eq!(&b[24..28], &0u32.to_le_bytes());
        assert_eq!(&b[28..32], &u32::MAX.to_le_bytes());
        assert_eq!(&b[32..36], &512u32.to_le_bytes());
        assert_eq!(b[36], 1);
        assert!(!s.offers(VIRTIO_IOMMU_F_BYPASS));
        assert!(s.offers(VIRTIO_IOMMU_F_BYPASS_CONFIG));
    }

    #[test]
    fn bypass_write_requires_feature_and_boolean_value() {
        let s = VirtioIommuSettings::default();
        let acked = 1 << VIRTIO_IOMMU_F_BYPASS_CONFIG;
        assert_eq!(
            s.bypass_write(0, 1),
            Err(VirtioIommuError::BypassNotNegotiated)
        );
        assert_eq!(
            s.bypass_write(acked, 2),
            Err(VirtioIommuError::BadBypassValue(2))
        );
        assert_eq!(s.bypass_write(acked, 0), Ok(false));
        assert_eq!(s.bypass_write(acked, 1), Ok(true));
    }

    #[test]
    fn ranges_apply_only_when_offered() {
        let s = VirtioIommuSettings {
            domain_range: (1, 10),
            input_range: IovaRange::new(0, 0xffff).unwrap(),
            features: 1 << VIRTIO_IOMMU_F_MAP_UNMAP,
            ..Default::default()
        };
        assert!(s.domain_in_range(11));
        assert_eq!(s.effective_input_range(), IovaRange::FULL);
        let s = VirtioIommuSettings {
            features: DEFAULT_FEATURES,
            ..s
        };
        assert!(!s.domain_in_range(11) && !s.domain_in_range(0) && s.domain_in_range(10));
        assert_eq!(s.effective_input_range().end(), 0xffff);
    }

    #[test]
    fn invalid_settings_are_reported() {
        let s = VirtioIommuSettings {
            page_size_mask: 0,
            ..Default::default()
        };
        assert_eq!(s.validate(), Err(VirtioIommuError::EmptyPageSizeMask));
        let s = VirtioIommuSettings {
            domain_range: (5, 4),
            ..Default::default()
        };
        assert!(matches!(
            s.validate(),
            Err(VirtioIommuError::BadDomainRange { .. })
        ));
    }

    #[test]
    fn fault_records_carry_reason_flags_endpoint_and_address() {
        let rid = RequesterId::from_bdf(0, 0x18);
        let err = TranslateError::PermissionDenied {
            iova: Iova(0x2000),
            requested: Permissions::Write,
            allowed: Permissions::Read,
        };
        let f = fault_record(rid, Iova(0x2000), Permissions::Write, &err).unwrap();
        assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
        assert_eq!(
            f.flags.get(),
            VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS
        );
        assert_eq!(f.endpoint.get(), 0x18);
        assert_eq!(f.address.get(), 0x2000);
        let na = TranslateError::NotAttached { rid };
        let f = fault_record(rid, Iova(0x10), Permissions::Read, &na).unwrap();
        assert_eq!(f.reason, VIRTIO_IOMMU_FAULT_R_DOMAIN);
        assert_eq!(f.reserved, [0; 3]);
        let bad = TranslateError::BadRange {
            iova: Iova(0),
            len: 0,
        };
        assert!(fault_record(rid, Iova(0), Permissions::Read, &bad).is_none());
    }
}
