//! The virtio-iommu device (virtio device type 23) over the pure model in the `iommu` crate.
//!
//! # Pieces
//!
//! * [`IommuState`], shared as `Arc<IommuState>` between the device and the rest of the VMM:
//!   the [`Domains`] model, the static [`VirtioIommuSettings`], the [`NotifierSet`] of
//!   translation consumers (vhost-user IOTLB bridges), the event queue used for fault reports,
//!   and the [`VirtioIommuStats`] counters. The VMM registers the endpoints behind the IOMMU
//!   ([`IommuState::add_endpoint`]) before the guest boots, translates DMA through it
//!   ([`DmaTranslate`]), registers notifier consumers and reports faults
//!   ([`IommuState::report_fault`]).
//! * [`VirtioIommuDevice`], the [`crate::virtio::VirtioDevice`]: features, config space, and on
//!   activation one worker thread (`iovmm_viommu`) serving the request queue.
//!
//! # Ordering and locks
//!
//! Every change of the model goes through one *update* lock, held across "mutate the model"
//! and "deliver the resulting events to the notifier consumers". Events therefore reach the
//! consumers in model order. The model lock itself is released before delivery: a consumer's
//! miss path may call [`DmaTranslate::translate`] (model lock) while holding its own lock, the
//! same lock its `notify` takes, so holding the model lock across delivery could deadlock.
//! Lock order: update → model; update → notifier set (read); the event queue lock is a leaf.
//! Consumers must not call back into [`IommuState`] mutators from `notify`, and must not
//! register or unregister while holding a lock their `notify` takes.
//!
//! A request completes (reply written, used buffer returned, interrupt raised) only after every
//! consumer returned from `notify`. If a consumer failed, the request completes with
//! `VIRTIO_IOMMU_S_DEVERR`: the spec reserves `S_IOERR` for virtio communication errors
//! (malformed buffers), while a consumer failure is an internal device error. The model change
//! stays in place (a failed consumer is expected to drop its back end, see
//! [`iommu::notifier`]), except for MAP, which is rolled back so that the guest's view (the map
//! failed) matches the model's.

mod chain;
mod device;
mod event;
mod handler;
mod seam;
#[cfg(test)]
mod test_utils;

use iommu::sync::{lock, read, write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use iommu::domain::{DomainError, Domains, DomainsConfig};
use iommu::notifier::{
    IommuEvent, IommuNotifier, NotifierError, NotifierFlags, NotifierHandle, NotifierSet, UnmapKind,
};
use iommu::translate::{DmaTranslate, TranslateError, Translation};
use iommu::types::{Access, Iova, RequesterId};
use iommu::virtio::protocol::{VIRTIO_IOMMU_F_BYPASS, VIRTIO_IOMMU_F_BYPASS_CONFIG};
use iommu::virtio::{VirtioIommuError, VirtioIommuSettings};

pub use device::{VirtioIommuDevice, DEVICE_FEATURES, EVENTQ_SIZE, REQUESTQ_SIZE};
pub use event::FaultDelivery;
pub use handler::MAX_READABLE;

use event::EventQueue;

/// Errors building the virtio-iommu device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioIommuDeviceError {
    /// The settings are not usable by a driver.
    #[error("invalid virtio-iommu settings")]
    Settings(#[from] VirtioIommuError),
    /// Boot bypass was asked for without a feature that lets the driver turn it off.
    #[error(
        "boot bypass needs VIRTIO_IOMMU_F_BYPASS_CONFIG in the offered features; \
         offer it or set boot_bypass = false"
    )]
    BypassWithoutFeature,
    /// The request worker thread or its eventfds could not be created.
    #[error("cannot start the virtio-iommu request worker")]
    Worker(#[source] std::io::Error),
}

/// Counters of one virtio-iommu device (monotonic, lock-free).
#[derive(Debug, Default)]
pub struct VirtioIommuStats {
    requests: [AtomicU64; 6],
    statuses: [AtomicU64; 9],
    unwritten: AtomicU64,
    notifier_failures: AtomicU64,
    faults_reported: AtomicU64,
    faults_dropped: AtomicU64,
}

impl VirtioIommuStats {
    /// Requests seen of `type_` (1 ATTACH .. 5 PROBE); any other value counts requests with an
    /// unknown type or no readable byte at all.
    pub fn requests(&self, type_: u8) -> u64 {
        self.requests[Self::type_index(type_)].load(Ordering::Relaxed)
    }

    /// Requests completed with status `status` (`S_OK` = 0 .. `S_NOMEM` = 8); 0 otherwise.
    pub fn statuses(&self, status: u8) -> u64 {
        self.statuses
            .get(usize::from(status))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Chains returned unwritten (used length 0): malformed, unknown type, or a guest memory
    /// error.
    pub fn unwritten(&self) -> u64 {
        self.unwritten.load(Ordering::Relaxed)
    }

    /// Requests whose event delivery failed at some consumer (completed with `S_DEVERR`).
    pub fn notifier_failures(&self) -> u64 {
        self.notifier_failures.load(Ordering::Relaxed)
    }

    /// Fault records written into the event queue.
    pub fn faults_reported(&self) -> u64 {
        self.faults_reported.load(Ordering::Relaxed)
    }

    /// Faults dropped (no event buffer, device inactive, bad buffer).
    pub fn faults_dropped(&self) -> u64 {
        self.faults_dropped.load(Ordering::Relaxed)
    }

    fn type_index(type_: u8) -> usize {
        match type_ {
            1..=5 => usize::from(type_),
            _ => 0,
        }
    }

    pub(crate) fn count_request(&self, type_: u8) {
        self.requests[Self::type_index(type_)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_status(&self, status: Option<u8>) {
        match status.and_then(|s| self.statuses.get(usize::from(s))) {
            Some(c) => c.fetch_add(1, Ordering::Relaxed),
            None => self.unwritten.fetch_add(1, Ordering::Relaxed),
        };
    }

    pub(crate) fn count_notifier_failure(&self) {
        self.notifier_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_fault(&self, delivered: bool) {
        let c = if delivered {
            &self.faults_reported
        } else {
            &self.faults_dropped
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The virtio-iommu state shared by the device, its worker and the rest of the VMM.
pub struct IommuState {
    settings: VirtioIommuSettings,
    update: Mutex<()>,
    domains: Mutex<Domains>,
    notifiers: RwLock<NotifierSet>,
    events: Mutex<Option<EventQueue>>,
    stats: Arc<VirtioIommuStats>,
}

impl std::fmt::Debug for IommuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuState")
            .field("settings", &self.settings)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// An open model update: holds the update lock. Mutate with [`Update::apply`], then deliver
/// the events with [`Update::deliver`] before releasing it.
pub(crate) struct Update<'a> {
    state: &'a IommuState,
    _serial: MutexGuard<'a, ()>,
}

impl Update<'_> {
    /// Runs `f` on the model under the model lock; returns its result and events.
    pub(crate) fn apply<R>(
        &self,
        f: impl FnOnce(&mut Domains) -> (R, Vec<IommuEvent>),
    ) -> (R, Vec<IommuEvent>) {
        f(&mut lock(&self.state.domains))
    }

    /// Delivers `events` to every consumer; returns once all of them returned.
    pub(crate) fn deliver(&self, events: &[IommuEvent]) -> Result<usize, NotifierError> {
        if events.is_empty() {
            return Ok(0);
        }
        let set = read(&self.state.notifiers);
        set.dispatch_all(events)
    }
}

impl IommuState {
    /// Builds the state. The offered features are `settings.features` restricted to what the
    /// device implements (never the legacy BYPASS or MMIO, see [`VirtioIommuDevice`]).
    pub fn new(
        settings: VirtioIommuSettings,
        config: DomainsConfig,
    ) -> Result<Arc<Self>, VirtioIommuDeviceError> {
        settings.validate()?;
        let settings = VirtioIommuSettings {
            features: settings.features & device::DEVICE_FEATURES,
            ..settings
        };
        if config.boot_bypass && !settings.offers(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            return Err(VirtioIommuDeviceError::BypassWithoutFeature);
        }
        debug_assert!(!settings.offers(VIRTIO_IOMMU_F_BYPASS));
        Ok(Arc::new(Self {
            settings,
            update: Mutex::new(()),
            domains: Mutex::new(Domains::new(config)),
            notifiers: RwLock::new(NotifierSet::new(NotifierFlags::MAP | NotifierFlags::UNMAP)),
            events: Mutex::new(None),
            stats: Arc::new(VirtioIommuStats::default()),
        }))
    }

    /// The settings (config space values and offered device features).
    pub fn settings(&self) -> &VirtioIommuSettings {
        &self.settings
    }

    /// The device counters.
    pub fn stats(&self) -> Arc<VirtioIommuStats> {
        Arc::clone(&self.stats)
    }

    /// Registers an endpoint behind this IOMMU (idempotent). Unknown endpoints get `S_NOENT`.
    pub fn add_endpoint(&self, rid: RequesterId) -> Result<(), DomainError> {
        lock(&self.domains).add_endpoint(rid)
    }

    /// Removes an endpoint (hot-unplug); its consumers drop its translations before this
    /// returns.
    pub fn remove_endpoint(&self, rid: RequesterId) -> Result<(), NotifierError> {
        let update = self.begin_update();
        let ((), events) = update.apply(|d| ((), d.remove_endpoint(rid)));
        update.deliver(&events).map(|_| ())
    }

    /// Reads the model (e.g. for diagnostics or tests). Do not call from a notifier.
    pub fn with_domains<R>(&self, f: impl FnOnce(&Domains) -> R) -> R {
        f(&lock(&self.domains))
    }

    /// Whether unattached endpoints currently bypass translation.
    pub fn global_bypass(&self) -> bool {
        lock(&self.domains).global_bypass()
    }

    /// System reset: drops every domain, restores the boot bypass setting, and waits until
    /// every consumer dropped its translations.
    pub fn system_reset(&self) -> Result<(), NotifierError> {
        let update = self.begin_update();
        let ((), events) = update.apply(|d| ((), d.system_reset()));
        update.deliver(&events).map(|_| ())
    }

    /// Registers `consumer` for the events of `rid` selected by `flags` (`MAP`, `UNMAP`).
    /// virtio-iommu rejects `DEVIOTLB_UNMAP`.
    pub fn register_notifier(
        &self,
        rid: RequesterId,
        flags: NotifierFlags,
        consumer: Arc<dyn IommuNotifier>,
    ) -> Result<NotifierHandle, NotifierError> {
        self.notifiers_mut().register(rid, flags, consumer)
    }

    /// Registers a device-TLB consumer; virtio-iommu has no device TLB, so this always falls
    /// back to `UNMAP` (plus `extra`).
    pub fn register_notifier_with_fallback(
        &self,
        rid: RequesterId,
        extra: NotifierFlags,
        consumer: Arc<dyn IommuNotifier>,
    ) -> Result<(NotifierHandle, UnmapKind), NotifierError> {
        self.notifiers_mut()
            .register_with_fallback(rid, extra, consumer)
    }

    /// Removes a notifier registration.
    pub fn unregister_notifier(&self, handle: NotifierHandle) -> Result<(), NotifierError> {
        self.notifiers_mut().unregister(handle)
    }

    /// Reports a translation fault of `endpoint` on the event queue: `reason` is a
    /// `VIRTIO_IOMMU_FAULT_R_*` value, `flags` the `VIRTIO_IOMMU_FAULT_F_READ/WRITE` bits;
    /// `F_ADDRESS` is added when `address` is known. Never blocks on the guest: without a free
    /// event buffer the fault is dropped and counted.
    pub fn report_fault(
        &self,
        endpoint: RequesterId,
        address: Option<Iova>,
        reason: u8,
        flags: u32,
    ) -> FaultDelivery {
        self.report(event::fault(endpoint, address, reason, flags))
    }

    /// Reports a failed [`DmaTranslate::translate`] of `iova` by `rid` (e.g. a vhost-user IOTLB
    /// miss on an unmapped IOVA). Errors that are not the guest's business (a bad range asked
    /// by the VMM) are not reported and return [`FaultDelivery::NotReported`].
    pub fn report_translate_error(
        &self,
        rid: RequesterId,
        iova: Iova,
        access: Access,
        err: &TranslateError,
    ) -> FaultDelivery {
        match iommu::virtio::fault_record(rid, iova, access, err) {
            Some(record) => self.report(record),
            None => FaultDelivery::NotReported,
        }
    }

    fn report(&self, record: iommu::virtio::protocol::VirtioIommuFault) -> FaultDelivery {
        let outcome = match lock(&self.events).as_mut() {
            Some(q) => q.push(&record),
            None => FaultDelivery::DroppedInactive,
        };
        self.stats.count_fault(outcome == FaultDelivery::Queued);
        outcome
    }

    pub(crate) fn begin_update(&self) -> Update<'_> {
        Update {
            state: self,
            _serial: lock(&self.update),
        }
    }

    pub(crate) fn set_event_queue(&self, q: Option<EventQueue>) {
        *lock(&self.events) = q;
    }

    fn notifiers_mut(&self) -> std::sync::RwLockWriteGuard<'_, NotifierSet> {
        write(&self.notifiers)
    }
}

impl DmaTranslate for IommuState {
    fn translate(
        &self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        lock(&self.domains).translate(rid, iova, len, access)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use iommu::virtio::protocol::{S_DEVERR, S_OK};

    #[test]
    fn boot_bypass_needs_the_bypass_config_feature() {
        let settings = VirtioIommuSettings {
            features: 1 << iommu::virtio::protocol::VIRTIO_IOMMU_F_MAP_UNMAP,
            ..Default::default()
        };
        let config = DomainsConfig {
            boot_bypass: true,
            ..Default::default()
        };
        assert!(matches!(
            IommuState::new(settings, config),
            Err(VirtioIommuDeviceError::BypassWithoutFeature)
        ));
    }

    #[test]
    fn offered_features_exclude_mmio_and_legacy_bypass() {
        let settings = VirtioIommuSettings {
            features: u64::from(u32::MAX),
            ..Default::default()
        };
        let state = IommuState::new(settings, DomainsConfig::default()).unwrap();
        assert!(!state
            .settings()
            .offers(iommu::virtio::protocol::VIRTIO_IOMMU_F_MMIO));
        assert!(!state.settings().offers(VIRTIO_IOMMU_F_BYPASS));
        assert!(state.settings().offers(VIRTIO_IOMMU_F_BYPASS_CONFIG));
    }

    #[test]
    fn stats_bucket_unknown_types_and_statuses() {
        let s = VirtioIommuStats::default();
        s.count_request(3);
        s.count_request(0);
        s.count_request(200);
        s.count_status(Some(S_OK));
        s.count_status(Some(S_DEVERR));
        s.count_status(Some(99));
        s.count_status(None);
        assert_eq!((s.requests(3), s.requests(0), s.requests(9)), (1, 2, 2));
        assert_eq!(
            (s.statuses(S_OK), s.statuses(S_DEVERR), s.statuses(99)),
            (1, 1, 0)
        );
        assert_eq!(s.unwritten(), 2);
    }

    #[test]
    fn faults_without_an_active_device_are_dropped_and_counted() {
        let state = IommuState::new(Default::default(), Default::default()).unwrap();
        let rid = RequesterId::from_bdf(0, 8);
        let out = state.report_fault(rid, Some(Iova(0x1000)), 2, 1);
        assert_eq!(out, FaultDelivery::DroppedInactive);
        let bad = TranslateError::BadRange {
            iova: Iova(0),
            len: 0,
        };
        let out = state.report_translate_error(rid, Iova(0), Access::Read, &bad);
        assert_eq!(out, FaultDelivery::NotReported);
        assert_eq!(
            (
                state.stats().faults_dropped(),
                state.stats().faults_reported()
            ),
            (1, 0)
        );
    }
}
