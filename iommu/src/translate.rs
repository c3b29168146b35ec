//! The translation interface devices pull from: `DmaTranslate` turns (requester, IOVA, length,
//! access) into guest-physical fragments, the mapping's permission and its *extent*.

use std::sync::{Mutex, RwLock};

use vm_memory::GuestAddress;

use crate::types::{Access, Iova, IovaRange, Permissions, RequesterId};

/// Why a DMA translation failed. Each variant maps onto a guest-visible fault reason
/// (virtio-iommu `R_MAPPING` / `R_DOMAIN` / `R_UNKNOWN`, VT-d fault reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// Nothing is mapped at `iova` (or it lies in a reserved region).
    #[error(
        "no mapping at IOVA {iova}; the guest driver has not mapped it (or already unmapped it)"
    )]
    Unmapped {
        /// First address without a translation.
        iova: Iova,
    },
    /// The mapping at `iova` does not allow the requested access.
    #[error("access {requested:?} to IOVA {iova} denied: the mapping only allows {allowed:?}")]
    PermissionDenied {
        /// First address whose permission is insufficient.
        iova: Iova,
        /// The access that was asked for.
        requested: Permissions,
        /// What the mapping actually allows.
        allowed: Permissions,
    },
    /// The requester is known but attached to no domain and not in bypass.
    #[error("requester {rid} is not attached to any IOMMU domain; DMA is blocked until the guest attaches it")]
    NotAttached {
        /// The requester.
        rid: RequesterId,
    },
    /// The requester is not managed by this IOMMU at all.
    #[error("requester {rid} is unknown to this IOMMU; register the endpoint before it does DMA")]
    UnknownEndpoint {
        /// The requester.
        rid: RequesterId,
    },
    /// A zero-length request, or one running past the end of the 64-bit space.
    #[error(
        "bad DMA range at IOVA {iova} with length {len:#x}: must be non-empty and end below 2^64"
    )]
    BadRange {
        /// Start of the request.
        iova: Iova,
        /// Its length.
        len: u64,
    },
}

/// A range of IOVAs translated linearly to guest-physical addresses with one permission:
/// `gpa(x) = gpa + (x - iova.start())` for every `x` in `iova`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The IOVAs covered.
    pub iova: IovaRange,
    /// Guest-physical address of `iova.start()`.
    pub gpa: GuestAddress,
    /// The permission over the whole extent.
    pub perm: Permissions,
}

impl Extent {
    /// The guest-physical address of `iova`, if it lies inside the extent.
    pub fn gpa_of(&self, iova: u64) -> Option<GuestAddress> {
        if !self.iova.contains(iova) {
            return None;
        }
        self.gpa
            .0
            .checked_add(iova - self.iova.start())
            .map(GuestAddress)
    }
}

/// The result of a successful translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical pieces covering the requested bytes, in IOVA order:
    /// `(address, length)`. More than one when the request crosses mappings whose GPAs are not
    /// contiguous.
    pub fragments: Vec<(GuestAddress, u64)>,
    /// The permission common to every requested byte (at least the requested access).
    pub perm: Permissions,
    /// The largest range around the *first* requested byte with the same contiguous translation
    /// and permission. A vhost-user IOTLB UPDATE may cover this whole extent instead of one page.
    pub extent: Extent,
}

/// Translates device DMA addresses. Implemented by the whole IOMMU model (all domains), by
/// [`Passthrough`], and by the lock wrappers below so a shared model can be handed to devices.
pub trait DmaTranslate: Send + Sync {
    /// Translates `len` bytes at `iova` for requester `rid`, checking that the mapping allows
    /// `access` (`Permissions::No` checks presence only).
    fn translate(
        &self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Access,
    ) -> Result<Translation, TranslateError>;
}

/// The inclusive IOVA range of a request, or [`TranslateError::BadRange`].
pub fn request_range(iova: Iova, len: u64) -> Result<IovaRange, TranslateError> {
    IovaRange::from_start_len(iova.0, len).map_err(|_| TranslateError::BadRange { iova, len })
}

/// The identity translation of `request` (IOVA == GPA, read-write).
///
/// The extent is `[0, limit]` widened to cover the request when the request starts at or below
/// `limit`, and just the request otherwise. `limit` is typically the last guest-physical address
/// of RAM, so extents never describe huge ranges of nothing.
pub fn identity(request: IovaRange, limit: u64) -> Translation {
    let extent_range = if request.start() <= limit {
        IovaRange::new(0, limit.max(request.end())).unwrap_or(request)
    } else {
        request
    };
    identity_with_extent(request, extent_range)
}

/// The identity translation of `request` with a caller-chosen extent (which must contain it).
pub fn identity_with_extent(request: IovaRange, extent: IovaRange) -> Translation {
    let extent = if extent.contains_range(request) {
        extent
    } else {
        request
    };
    Translation {
        fragments: identity_fragments(request),
        perm: Permissions::ReadWrite,
        extent: Extent {
            iova: extent,
            gpa: GuestAddress(extent.start()),
            perm: Permissions::ReadWrite,
        },
    }
}

/// Identity fragments for `request`; the full 2^64 range needs two fragments because a fragment
/// length is a `u64`.
fn identity_fragments(request: IovaRange) -> Vec<(GuestAddress, u64)> {
    match request.size_u64() {
        Some(len) => vec![(GuestAddress(request.start()), len)],
        None => vec![
            (GuestAddress(0), 1u64 << 63),
            (GuestAddress(1u64 << 63), 1u64 << 63),
        ],
    }
}

/// Translation for a device that is not behind any enabled IOMMU (or an IOMMU in pass-through):
/// identity for every requester, extents bounded by `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passthrough {
    /// Last address the identity extents reach (e.g. the end of guest RAM).
    pub limit: u64,
}

impl DmaTranslate for Passthrough {
    fn translate(
        &self,
        _rid: RequesterId,
        iova: Iova,
        len: u64,
        _access: Access,
    ) -> Result<Translation, TranslateError> {
        Ok(identity(request_range(iova, len)?, self.limit))
    }
}

impl<T: DmaTranslate> DmaTranslate for RwLock<T> {
    fn translate(
        &self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        // A poisoned lock means a writer panicked; the model's maps are still consistent
        // (every mutation validates before it changes anything), so keep translating.
        let guard = crate::sync::read(self);
        guard.translate(rid, iova, len, access)
    }
}

impl<T: DmaTranslate> DmaTranslate for Mutex<T> {
    fn translate(
        &self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        let guard = crate::sync::lock(self);
        guard.translate(rid, iova, len, access)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rid() -> RequesterId {
        RequesterId::from_bdf(0, 0x10)
    }

    #[test]
    fn passthrough_is_identity_with_extent_bounded_by_limit() {
        let pt = Passthrough { limit: 0xfff_ffff };
        let t = pt
            .translate(rid(), Iova(0x1234), 0x10, Permissions::Write)
            .unwrap();
        assert_eq!(t.fragments, vec![(GuestAddress(0x1234), 0x10)]);
        assert_eq!(t.perm, Permissions::ReadWrite);
        assert_eq!(t.extent.iova, IovaRange::new(0, 0xfff_ffff).unwrap());
        assert_eq!(t.extent.gpa_of(0x5000), Some(GuestAddress(0x5000)));
    }

    #[test]
    fn passthrough_beyond_limit_yields_just_the_request() {
        let pt = Passthrough { limit: 0xffff };
        let t = pt
            .translate(rid(), Iova(0x10_0000), 8, Permissions::Read)
            .unwrap();
        assert_eq!(t.extent.iova, IovaRange::new(0x10_0000, 0x10_0007).unwrap());
    }

    #[test]
    fn request_straddling_limit_widens_extent() {
        let t = identity(IovaRange::new(0xff00, 0x1_00ff).unwrap(), 0xffff);
        assert_eq!(t.extent.iova, IovaRange::new(0, 0x1_00ff).unwrap());
    }

    #[test]
    fn zero_length_or_overflowing_request_is_bad_range() {
        let pt = Passthrough { limit: 0 };
        assert_eq!(
            pt.translate(rid(), Iova(5), 0, Permissions::Read),
            Err(TranslateError::BadRange {
                iova: Iova(5),
                len: 0
            })
        );
        assert!(matches!(
            pt.translate(rid(), Iova(u64::MAX), 2, Permissions::Read),
            Err(TranslateError::BadRange { .. })
        ));
    }

    #[test]
    fn full_range_identity_splits_into_two_fragments() {
        let t = identity(IovaRange::FULL, u64::MAX);
        let total: u128 = t.fragments.iter().map(|f| u128::from(f.1)).sum();
        assert_eq!(total, 1u128 << 64);
        assert_eq!(t.extent.iova, IovaRange::FULL);
    }

    #[test]
    fn lock_wrappers_forward_translations() {
        let lock = RwLock::new(Passthrough { limit: 0xffff });
        let m = Mutex::new(Passthrough { limit: 0xffff });
        let a = lock
            .translate(rid(), Iova(1), 1, Permissions::Read)
            .unwrap();
        let b = m.translate(rid(), Iova(1), 1, Permissions::Read).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.fragments, vec![(GuestAddress(1), 1)]);
    }

    #[test]
    fn extent_gpa_of_outside_is_none() {
        let e = Extent {
            iova: IovaRange::new(0x1000, 0x1fff).unwrap(),
            gpa: GuestAddress(0x8000),
            perm: Permissions::Read,
        };
        assert_eq!(e.gpa_of(0x1010), Some(GuestAddress(0x8010)));
        assert_eq!(e.gpa_of(0x2000), None);
    }
}
