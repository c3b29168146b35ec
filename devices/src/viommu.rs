//! The seam between a vIOMMU and the devices behind it.
//!
//! A device whose DMA goes through a vIOMMU (today: a vhost-user device's
//! IOTLB bridge) needs four things from it, whatever its kind: translation,
//! an IOTLB-consumer registration with the right unmap kind, a guest-visible
//! fault when its DMA hits no valid mapping, and, for ATS-capable
//! functions, the guest's ATS Enable followed. [`Viommu`] is that contract;
//! [`crate::virtio::iommu::IommuState`] and [`crate::vtd::VtdUnit`]
//! implement it, and the VMM wires devices through `Arc<dyn Viommu>` without
//! knowing which one it has.

use std::sync::Arc;

use iommu::{
    Access, DmaTranslate, IommuNotifier, Iova, NotifierError, NotifierHandle, RequesterId,
    UnmapKind,
};
use thiserror::Error;

/// Why a device could not be put behind the vIOMMU.
#[derive(Debug, Error)]
pub enum ViommuError {
    /// The vIOMMU refused the endpoint (e.g. it is full).
    #[error("the vIOMMU refused endpoint {rid}")]
    Endpoint {
        /// The endpoint.
        rid: RequesterId,
        /// The model's reason.
        #[source]
        source: iommu::DomainError,
    },
    /// The IOTLB consumer could not be registered.
    #[error("the vIOMMU refused the IOTLB consumer of {rid}")]
    Consumer {
        /// The endpoint.
        rid: RequesterId,
        /// The notifier set's reason.
        #[source]
        source: NotifierError,
    },
}

/// One registered IOTLB consumer and the unmap kind it receives now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerRegistration {
    /// Handle for [`Viommu::unregister_consumer`].
    pub handle: NotifierHandle,
    /// The unmap notifications it gets (device-TLB only while ATS is on).
    pub kind: UnmapKind,
}

/// What a device behind a vIOMMU needs from it.
///
/// Lock contract (see `devices::vhost_user`): `translate` may be called
/// with a consumer's lock held, so implementations deliver notifications
/// after releasing the lock `translate` takes; [`Viommu::report_fault`] is
/// called without any consumer lock held.
pub trait Viommu: DmaTranslate {
    /// Puts PCI function `rid` behind this vIOMMU (idempotent).
    fn add_endpoint(&self, rid: RequesterId) -> Result<(), ViommuError>;

    /// Registers `consumer` for `rid`'s unmaps, and for new mappings too
    /// when `maps` and the vIOMMU can report them (else they are dropped
    /// from the request). The unmap kind follows the function's ATS state.
    fn register_consumer(
        &self,
        rid: RequesterId,
        consumer: Arc<dyn IommuNotifier>,
        maps: bool,
    ) -> Result<ConsumerRegistration, ViommuError>;

    /// Removes a registration (at shutdown: the consumer and the vIOMMU
    /// hold each other).
    fn unregister_consumer(&self, handle: NotifierHandle);

    /// `rid`'s DMA at `iova` with `access` found no valid translation:
    /// record a guest-visible fault where the vIOMMU has a way to report it.
    fn report_fault(&self, rid: RequesterId, iova: Iova, access: Access);

    /// The guest flipped `rid`'s ATS Enable bit. vIOMMUs without a device
    /// TLB ignore it.
    fn set_ats_enabled(&self, rid: RequesterId, enabled: bool) {
        let _ = (rid, enabled);
    }
}

/// A vIOMMU over a plain list of mappings, for tests of what sits behind the seam: this crate's
/// unit tests and, with the `test-utils` feature, the integration tests' vhost-user rig.
#[cfg(any(test, feature = "test-utils"))]
pub mod testing {
    use std::sync::{Arc, Mutex};

    use iommu::sync::lock;
    use iommu::{
        Access, DmaTranslate, Extent, IommuNotifier, Iova, IovaRange, NotifierError,
        NotifierHandle, Permissions, RequesterId, TranslateError, Translation,
    };
    use vm_memory::GuestAddress;

    use super::{ConsumerRegistration, Viommu, ViommuError};

    /// The faults devices reported to a [`MapViommu`]: (requester, IOVA, access).
    pub type Faults = Arc<Mutex<Vec<(RequesterId, u64, Access)>>>;

    /// A vIOMMU over a list of mappings: IOVA range -> (GPA, permission), for every requester.
    /// A translation's extent is the whole mapping it falls in. It records the faults devices
    /// report and refuses IOTLB consumers (a test notifies a device's consumer itself).
    #[derive(Default)]
    pub struct MapViommu {
        maps: Mutex<Vec<(IovaRange, u64, Permissions)>>,
        faults: Faults,
    }

    impl MapViommu {
        /// Adds the mapping `iova..iova+len` -> `gpa` with `perm`.
        pub fn map(&self, iova: u64, len: u64, gpa: u64, perm: Permissions) {
            let r = IovaRange::from_start_len(iova, len).expect("a valid IOVA range");
            lock(&self.maps).push((r, gpa, perm));
        }

        /// Removes `range` from every mapping; the parts of a mapping outside `range` stay
        /// mapped to the same GPAs.
        pub fn unmap(&self, range: IovaRange) {
            let mut maps = lock(&self.maps);
            for (r, gpa, perm) in std::mem::take(&mut *maps) {
                if r.end() < range.start() || r.start() > range.end() {
                    maps.push((r, gpa, perm));
                    continue;
                }
                if r.start() < range.start() {
                    let left = IovaRange::new(r.start(), range.start() - 1).expect("left part");
                    maps.push((left, gpa, perm));
                }
                if r.end() > range.end() {
                    let right = IovaRange::new(range.end() + 1, r.end()).expect("right part");
                    maps.push((right, gpa + (range.end() + 1 - r.start()), perm));
                }
            }
        }

        /// Removes the whole mapping that contains `iova`.
        pub fn remove(&self, iova: u64) {
            lock(&self.maps).retain(|(r, ..)| !r.contains(iova));
        }

        /// Removes every mapping.
        pub fn clear(&self) {
            lock(&self.maps).clear();
        }

        /// The faults reported so far (shared: it fills as devices report more).
        pub fn faults(&self) -> Faults {
            self.faults.clone()
        }
    }

    impl DmaTranslate for MapViommu {
        fn translate(
            &self,
            _rid: RequesterId,
            iova: Iova,
            len: u64,
            access: Access,
        ) -> Result<Translation, TranslateError> {
            let maps = lock(&self.maps);
            let (r, gpa, perm) = *maps
                .iter()
                .find(|(r, ..)| r.contains(iova.0))
                .ok_or(TranslateError::Unmapped { iova })?;
            if !perm.allow(access) {
                return Err(TranslateError::PermissionDenied {
                    iova,
                    requested: access,
                    allowed: perm,
                });
            }
            Ok(Translation {
                fragments: vec![(GuestAddress(gpa + (iova.0 - r.start())), len)],
                perm,
                extent: Extent {
                    iova: r,
                    gpa: GuestAddress(gpa),
                    perm,
                },
            })
        }
    }

    impl Viommu for MapViommu {
        fn add_endpoint(&self, _rid: RequesterId) -> Result<(), ViommuError> {
            Ok(())
        }

        fn register_consumer(
            &self,
            rid: RequesterId,
            _consumer: Arc<dyn IommuNotifier>,
            _maps: bool,
        ) -> Result<ConsumerRegistration, ViommuError> {
            let source = NotifierError::NoFlags;
            Err(ViommuError::Consumer { rid, source })
        }

        fn unregister_consumer(&self, _handle: NotifierHandle) {}

        fn report_fault(&self, rid: RequesterId, iova: Iova, access: Access) {
            lock(&self.faults).push((rid, iova.0, access));
        }
    }
}
