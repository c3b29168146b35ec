//! virtio-iommu behind the [`Viommu`] seam.

use std::sync::Arc;

use iommu::{
    Access, DmaTranslate, IommuNotifier, Iova, NotifierFlags, NotifierHandle, RequesterId,
};

use super::IommuState;
use crate::viommu::{ConsumerRegistration, Viommu, ViommuError};

impl Viommu for IommuState {
    fn add_endpoint(&self, rid: RequesterId) -> Result<(), ViommuError> {
        IommuState::add_endpoint(self, rid).map_err(|source| ViommuError::Endpoint { rid, source })
    }

    /// virtio-iommu has no device TLB: every consumer gets `UNMAP` (and `MAP`
    /// with `maps`, which virtio-iommu always reports).
    fn register_consumer(
        &self,
        rid: RequesterId,
        consumer: Arc<dyn IommuNotifier>,
        maps: bool,
    ) -> Result<ConsumerRegistration, ViommuError> {
        let extra = if maps {
            NotifierFlags::MAP
        } else {
            NotifierFlags::NONE
        };
        let (handle, kind) = self
            .register_notifier_with_fallback(rid, extra, consumer)
            .map_err(|source| ViommuError::Consumer { rid, source })?;
        log::info!("viommu: IOTLB consumer for {rid} registered as {kind:?}");
        Ok(ConsumerRegistration { handle, kind })
    }

    fn unregister_consumer(&self, handle: NotifierHandle) {
        if let Err(e) = self.unregister_notifier(handle) {
            log::debug!("viommu: unregistering a consumer: {e}");
        }
    }

    /// A fault event on the event queue, with the reason the model gives
    /// now (no mapping, not attached, unknown endpoint); nothing if the
    /// IOVA translates by now.
    fn report_fault(&self, rid: RequesterId, iova: Iova, access: Access) {
        match self.translate(rid, iova, 1, access) {
            Ok(_) => log::debug!("viommu: {rid} {:#x} translates now; no fault", iova.0),
            Err(e) => {
                let r = self.report_translate_error(rid, iova, access, &e);
                log::debug!("viommu: fault for {rid} at {:#x}: {r:?}", iova.0);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use iommu::virtio::VirtioIommuSettings;
    use iommu::{DomainsConfig, IommuEvent, NotifyError, Permissions, UnmapKind};

    struct Sink;
    impl IommuNotifier for Sink {
        fn notify(&self, _ev: &IommuEvent) -> Result<(), NotifyError> {
            Ok(())
        }
    }

    #[test]
    fn consumers_get_plain_unmaps_and_faults_need_an_active_event_queue() {
        let state =
            IommuState::new(VirtioIommuSettings::default(), DomainsConfig::default()).unwrap();
        let seam: Arc<dyn Viommu> = state.clone();
        let rid = RequesterId::from_bdf(0, 0x10);
        seam.add_endpoint(rid).unwrap();
        let reg = seam.register_consumer(rid, Arc::new(Sink), true).unwrap();
        assert_eq!(reg.kind, UnmapKind::Iotlb);
        seam.set_ats_enabled(rid, true);
        // No event queue before the driver activates the device: counted as dropped.
        seam.report_fault(rid, Iova(0x1000), Permissions::Read);
        assert_eq!(state.stats().faults_dropped(), 1);
        seam.unregister_consumer(reg.handle);
    }
}
