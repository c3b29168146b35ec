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
