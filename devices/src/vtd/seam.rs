//! The VT-d unit behind the [`Viommu`] seam: consumer registration with
//! the unmap kind the function's ATS state asks for, faults as fault
//! records, and the guest's ATS Enable followed.

use std::sync::Arc;

use iommu::sync::{lock, write};
use iommu::{Access, IommuNotifier, Iova, NotifierFlags, NotifierHandle, RequesterId, UnmapKind};

use super::VtdUnit;
use crate::viommu::{ConsumerRegistration, Viommu, ViommuError};

impl VtdUnit {
    /// The unmap kind `rid`'s consumers get: device-TLB while the guest has
    /// ATS on and the unit has device-TLB support, IOTLB otherwise (a guest
    /// that never enables ATS sends no device-TLB invalidations, so a
    /// device-TLB consumer would keep stale entries).
    fn unmap_kind(&self, rid: RequesterId) -> UnmapKind {
        if self.config().device_iotlb && lock(&self.ats_enabled).contains(&rid) {
            UnmapKind::DevIotlb
        } else {
            UnmapKind::Iotlb
        }
    }

    /// Follows the guest's ATS Enable bit of `rid`; returns the unmap kind
    /// its consumers take from now on.
    pub fn follow_ats(&self, rid: RequesterId, enabled: bool) -> UnmapKind {
        let _serial = lock(&self.inval);
        {
            let mut on = lock(&self.ats_enabled);
            if enabled {
                on.insert(rid);
            } else {
                on.remove(&rid);
            }
        }
        let kind = self.unmap_kind(rid);
        let mut set = write(&self.notifiers);
        match set.switch_endpoint_unmap_kind(rid, kind) {
            Ok(n) => {
                log::info!("vtd: {rid} ATS {enabled}: {n} consumer(s) now take {kind:?} unmaps")
            }
            Err(e) => log::warn!("vtd: cannot switch {rid} to {kind:?} unmaps: {e}"),
        }
        kind
    }
}

impl Viommu for VtdUnit {
    /// Every PCI function is behind the unit (DMAR INCLUDE_PCI_ALL).
    fn add_endpoint(&self, _rid: RequesterId) -> Result<(), ViommuError> {
        Ok(())
    }

    /// MAP is only reported by a caching-mode unit (the guest invalidates
    /// after mapping); without caching mode it is dropped from the request.
    fn register_consumer(
        &self,
        rid: RequesterId,
        consumer: Arc<dyn IommuNotifier>,
        maps: bool,
    ) -> Result<ConsumerRegistration, ViommuError> {
        let extra = if maps && self.config().caching_mode {
            NotifierFlags::MAP
        } else {
            NotifierFlags::NONE
        };
        let preferred = self.unmap_kind(rid);
        let mut set = write(&self.notifiers);
        let (handle, kind) = set
            .register_preferring(rid, preferred, extra, consumer)
            .map_err(|source| ViommuError::Consumer { rid, source })?;
        log::info!("vtd: IOTLB consumer for {rid} registered as {kind:?}");
        Ok(ConsumerRegistration { handle, kind })
    }

    fn unregister_consumer(&self, handle: NotifierHandle) {
        let mut set = write(&self.notifiers);
        if let Err(e) = set.unregister(handle) {
            log::debug!("vtd: unregistering a consumer: {e}");
        }
    }

    /// Records a fault (e.g. an IOTLB miss that found no valid
    /// translation) and raises the fault event if the guest wants it.
    /// Does not take the invalidation lock: the caller may be a backend
    /// thread whose backend is needed to finish a running invalidation.
    fn report_fault(&self, rid: RequesterId, iova: Iova, access: Access) {
        let (result, actions) = {
            let mut m = write(&self.model);
            m.translate_and_record(rid, iova, 1, access)
        };
        if result.is_ok() {
            log::debug!("vtd: {rid} {:#x} translates now; no fault recorded", iova.0);
        }
        self.run(actions);
    }

    fn set_ats_enabled(&self, rid: RequesterId, enabled: bool) {
        self.follow_ats(rid, enabled);
    }
}
