//! Push notifications from an IOMMU model to the consumers that cache its translations
//! (the vhost-user IOTLB bridge, later VFIO-style users).
//!
//! # Contract
//!
//! * Delivery is **synchronous**: [`NotifierSet::dispatch`] and [`NotifierSet::notify_unmap`]
//!   return only after every matching consumer's [`IommuNotifier::notify`] returned.
//! * For [`IommuEvent::Unmap`], [`IommuEvent::DevIotlbUnmap`], [`IommuEvent::DetachEndpoint`]
//!   and [`IommuEvent::Reset`], a consumer returns `Ok` only **after** it dropped every
//!   translation the event covers (for vhost-user: after the back end acked the INVALIDATE).
//!   The vIOMMU completes the guest-visible operation (virtio-iommu used buffer, VT-d wait
//!   descriptor) only after the fan-out returned, so no consumer can use a translation the guest
//!   believes is gone.
//! * Errors are **collected, not short-circuited**: one failing consumer does not stop delivery
//!   to the others; all failures are returned together in [`NotifierError::Delivery`], and the
//!   caller logs them (or reports a device error). A consumer that failed to drop a translation
//!   should disconnect its back end rather than keep it.
//! * Consumers must not call back into the set (or take the lock the caller holds around it)
//!   from `notify`.
//!
//! # Kinds of unmap notification
//!
//! A consumer registers with [`NotifierFlags`]. `UNMAP` receives IOTLB invalidations
//! ([`IommuEvent::Unmap`]); `DEVIOTLB_UNMAP` receives device-TLB (ATS) invalidations
//! ([`IommuEvent::DevIotlbUnmap`]) *instead*. A vIOMMU without device-TLB support (virtio-iommu)
//! rejects `DEVIOTLB_UNMAP`, and [`NotifierSet::register_with_fallback`] then registers `UNMAP`.
//! A `DEVIOTLB_UNMAP` registration is only correct while the guest has ATS enabled on that
//! endpoint (a guest that never enables ATS never sends device-TLB invalidations, leaving stale
//! translations), so VT-d must flip registrations with [`NotifierSet::switch_unmap_kind`] when
//! the guest toggles ATS.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use vm_memory::GuestAddress;

use crate::types::{IovaRange, Permissions, RequesterId};

/// A change of an IOMMU's translations, as seen by one requester.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IommuEvent {
    /// A new mapping became visible to `rid` (delivered to `MAP` consumers).
    Map {
        /// The requester that can now use the mapping.
        rid: RequesterId,
        /// The IOVAs mapped.
        range: IovaRange,
        /// Guest-physical address of `range.start()`.
        gpa: GuestAddress,
        /// Allowed device access.
        perm: Permissions,
    },
    /// Translations of `range` for `rid` are gone (IOTLB invalidation; `UNMAP` consumers).
    Unmap {
        /// The requester whose translations changed.
        rid: RequesterId,
        /// The IOVAs to drop.
        range: IovaRange,
    },
    /// Device-TLB (ATS) invalidation of `range` for `rid` (`DEVIOTLB_UNMAP` consumers).
    DevIotlbUnmap {
        /// The requester whose device TLB is invalidated.
        rid: RequesterId,
        /// The IOVAs to drop.
        range: IovaRange,
    },
    /// `rid` changed translation context (detached, moved to another domain, left bypass):
    /// drop all of its translations. Delivered to every consumer of `rid`.
    DetachEndpoint {
        /// The requester.
        rid: RequesterId,
    },
    /// The IOMMU was reset: drop every translation of every requester. Delivered to all.
    Reset,
}

impl IommuEvent {
    /// The requester the event concerns (`None` for [`IommuEvent::Reset`]).
    pub fn rid(&self) -> Option<RequesterId> {
        match self {
            IommuEvent::Map { rid, .. }
            | IommuEvent::Unmap { rid, .. }
            | IommuEvent::DevIotlbUnmap { rid, .. }
            | IommuEvent::DetachEndpoint { rid } => Some(*rid),
            IommuEvent::Reset => None,
        }
    }

    /// Whether a consumer registered with `flags` receives this event.
    pub fn wanted_by(&self, flags: NotifierFlags) -> bool {
        match self {
            IommuEvent::Map { .. } => flags.contains(NotifierFlags::MAP),
            IommuEvent::Unmap { .. } => flags.contains(NotifierFlags::UNMAP),
            IommuEvent::DevIotlbUnmap { .. } => flags.contains(NotifierFlags::DEVIOTLB_UNMAP),
            IommuEvent::DetachEndpoint { .. } | IommuEvent::Reset => true,
        }
    }
}

/// The error a consumer's failure carries (shared, so that delivery failures stay `Clone`).
pub type ConsumerError = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

/// A consumer failed to act on an event.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotifyError {
    /// The consumer's device is disconnected and could not be told.
    #[error("the consumer's device is disconnected")]
    Disconnected,
    /// The consumer could not drop its translations of `[first, last]`; it was cut off from
    /// its device so that it cannot use them.
    #[error(
        "the consumer could not drop its translations of IOVA {first:#x}..={last:#x}; it was cut off from its device"
    )]
    Invalidate {
        /// First IOVA of the range.
        first: u64,
        /// Last IOVA of the range.
        last: u64,
        /// What the consumer's transport reported.
        #[source]
        source: ConsumerError,
    },
    /// The consumer could not install the new mapping at `iova` (prefetching consumers).
    #[error("the consumer could not install the mapping at IOVA {iova:#x}")]
    Install {
        /// IOVA of the mapping.
        iova: u64,
        /// What the consumer's transport reported.
        #[source]
        source: ConsumerError,
    },
}

impl PartialEq for NotifyError {
    /// Same kind and range; sources compare by their message.
    fn eq(&self, other: &Self) -> bool {
        use std::error::Error;
        let src = |e: &Self| e.source().map(|s| s.to_string());
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
            && src(self) == src(other)
    }
}

impl Eq for NotifyError {}

/// A consumer of IOMMU events. See the module documentation for the contract.
pub trait IommuNotifier: Send + Sync {
    /// Acts on `ev`; returns only once the consumer no longer uses any translation the event
    /// removes.
    fn notify(&self, ev: &IommuEvent) -> Result<(), NotifyError>;
}

bitflags::bitflags! {
    /// The event kinds a consumer subscribes to.
    #[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
    pub struct NotifierFlags: u8 {
        /// New mappings ([`IommuEvent::Map`]).
        const MAP = 1;
        /// IOTLB invalidations ([`IommuEvent::Unmap`]).
        const UNMAP = 1 << 1;
        /// Device-TLB invalidations ([`IommuEvent::DevIotlbUnmap`]).
        const DEVIOTLB_UNMAP = 1 << 2;
    }
}

impl NotifierFlags {
    /// No events.
    pub const NONE: NotifierFlags = NotifierFlags::empty();
    /// Every flag.
    pub const ALL: NotifierFlags = NotifierFlags::all();
}

impl fmt::Debug for NotifierFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return write!(f, "NONE");
        }
        let names: Vec<&str> = self.iter_names().map(|(name, _)| name).collect();
        write!(f, "{}", names.join("|"))
    }
}

/// Which kind of unmap notification a registration receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmapKind {
    /// IOTLB invalidations (`UNMAP`).
    Iotlb,
    /// Device-TLB invalidations (`DEVIOTLB_UNMAP`).
    DevIotlb,
}

impl UnmapKind {
    fn flag(self) -> NotifierFlags {
        match self {
            UnmapKind::Iotlb => NotifierFlags::UNMAP,
            UnmapKind::DevIotlb => NotifierFlags::DEVIOTLB_UNMAP,
        }
    }
}

/// Identifies one registration, for [`NotifierSet::unregister`] and kind switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NotifierHandle {
    rid: RequesterId,
    id: u64,
}

impl NotifierHandle {
    /// The requester the registration is for.
    pub fn rid(&self) -> RequesterId {
        self.rid
    }
}

/// One consumer's failure during a fan-out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFailure {
    /// The registration whose consumer failed.
    pub handle: NotifierHandle,
    /// The event it failed on.
    pub event: IommuEvent,
    /// Its error.
    pub error: NotifyError,
}

/// Errors of notifier registration and delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifierError {
    /// The vIOMMU does not support some requested flags.
    #[error("notifier flags {requested:?} rejected: this IOMMU supports only {supported:?}")]
    Rejected {
        /// What was asked for.
        requested: NotifierFlags,
        /// What the IOMMU model supports.
        supported: NotifierFlags,
    },
    /// Registration without any flag.
    #[error("notifier registered with no flags; pass at least one of MAP, UNMAP, DEVIOTLB_UNMAP")]
    NoFlags,
    /// The handle is not (or no longer) registered.
    #[error("notifier handle for {0} is not registered (already unregistered?)")]
    UnknownHandle(RequesterId),
    /// Some consumers failed; the others were still notified.
    #[error("{} IOMMU notifier consumer(s) failed, {delivered} succeeded; first: {}", failures.len(), first_failure(failures))]
    Delivery {
        /// Successful deliveries.
        delivered: usize,
        /// Every failure, in delivery order.
        failures: Vec<DeliveryFailure>,
    },
}

fn first_failure(failures: &[DeliveryFailure]) -> String {
    failures
        .first()
        .map(|f| format!("{} on {:?}", f.error, f.event))
        .unwrap_or_default()
}

struct Registration {
    id: u64,
    flags: NotifierFlags,
    consumer: Arc<dyn IommuNotifier>,
}

/// The consumers of one IOMMU model, keyed by requester id.
pub struct NotifierSet {
    supported: NotifierFlags,
    by_rid: BTreeMap<RequesterId, Vec<Registration>>,
    next_id: u64,
}

impl fmt::Debug for NotifierSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifierSet")
            .field("supported", &self.supported)
            .field("registrations", &self.len())
            .finish()
    }
}

impl NotifierSet {
    /// An empty set for a vIOMMU that supports `supported` (virtio-iommu: `MAP | UNMAP`).
    pub fn new(supported: NotifierFlags) -> Self {
        Self {
            supported,
            by_rid: BTreeMap::new(),
            next_id: 0,
        }
    }

    /// The flags the vIOMMU accepts.
    pub fn supported(&self) -> NotifierFlags {
        self.supported
    }

    /// Number of registrations.
    pub fn len(&self) -> usize {
        self.by_rid.values().map(Vec::len).sum()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.by_rid.is_empty()
    }

    /// Registers `consumer` for events of `rid` selected by `flags`.
    pub fn register(
        &mut self,
        rid: RequesterId,
        flags: NotifierFlags,
        consumer: Arc<dyn IommuNotifier>,
    ) -> Result<NotifierHandle, NotifierError> {
        self.check_flags(flags)?;
        let id = self.next_id;
        self.next_id += 1;
        let reg = Registration {
            id,
            flags,
            consumer,
        };
        self.by_rid.entry(rid).or_default().push(reg);
        Ok(NotifierHandle { rid, id })
    }

    /// Registers `consumer` for device-TLB invalidations (plus `extra`, e.g. `MAP`); if the
    /// vIOMMU rejects `DEVIOTLB_UNMAP`, registers plain `UNMAP` instead. Returns the kind used.
    pub fn register_with_fallback(
        &mut self,
        rid: RequesterId,
        extra: NotifierFlags,
        consumer: Arc<dyn IommuNotifier>,
    ) -> Result<(NotifierHandle, UnmapKind), NotifierError> {
        self.register_preferring(rid, UnmapKind::DevIotlb, extra, consumer)
    }

    /// Registers `consumer` for `preferred` unmaps (plus `extra`, minus any other unmap flag);
    /// if the vIOMMU rejects a device-TLB registration, registers plain `UNMAP` instead.
    /// Returns the kind used. The one registration path of every vIOMMU.
    pub fn register_preferring(
        &mut self,
        rid: RequesterId,
        preferred: UnmapKind,
        extra: NotifierFlags,
        consumer: Arc<dyn IommuNotifier>,
    ) -> Result<(NotifierHandle, UnmapKind), NotifierError> {
        let base = extra.difference(NotifierFlags::UNMAP | NotifierFlags::DEVIOTLB_UNMAP);
        match self.register(rid, base | preferred.flag(), Arc::clone(&consumer)) {
            Ok(handle) => Ok((handle, preferred)),
            Err(NotifierError::Rejected { .. }) if preferred == UnmapKind::DevIotlb => {
                let handle = self.register(rid, base | NotifierFlags::UNMAP, consumer)?;
                Ok((handle, UnmapKind::Iotlb))
            }
            Err(e) => Err(e),
        }
    }

    /// Removes a registration.
    pub fn unregister(&mut self, handle: NotifierHandle) -> Result<(), NotifierError> {
        let regs = self
            .by_rid
            .get_mut(&handle.rid)
            .ok_or(NotifierError::UnknownHandle(handle.rid))?;
        let pos = regs
            .iter()
            .position(|r| r.id == handle.id)
            .ok_or(NotifierError::UnknownHandle(handle.rid))?;
        regs.remove(pos);
        if regs.is_empty() {
            self.by_rid.remove(&handle.rid);
        }
        Ok(())
    }

    /// Switches one registration between `UNMAP` and `DEVIOTLB_UNMAP` (e.g. when the guest
    /// toggles ATS). On rejection the registration keeps its old kind.
    pub fn switch_unmap_kind(
        &mut self,
        handle: NotifierHandle,
        kind: UnmapKind,
    ) -> Result<(), NotifierError> {
        let supported = self.supported;
        let reg = self
            .by_rid
            .get_mut(&handle.rid)
            .and_then(|regs| regs.iter_mut().find(|r| r.id == handle.id))
            .ok_or(NotifierError::UnknownHandle(handle.rid))?;
        let flags = reg
            .flags
            .difference(NotifierFlags::UNMAP | NotifierFlags::DEVIOTLB_UNMAP)
            | kind.flag();
        if !supported.contains(flags) {
            return Err(NotifierError::Rejected {
                requested: flags,
                supported,
            });
        }
        reg.flags = flags;
        Ok(())
    }

    /// Switches every registration of `rid` that receives unmaps to `kind`; returns how many
    /// were switched. Fails without changing anything if the vIOMMU rejects `kind`.
    pub fn switch_endpoint_unmap_kind(
        &mut self,
        rid: RequesterId,
        kind: UnmapKind,
    ) -> Result<usize, NotifierError> {
        self.check_flags(kind.flag())?;
        let unmaps = NotifierFlags::UNMAP | NotifierFlags::DEVIOTLB_UNMAP;
        let mut switched = 0;
        for reg in self.by_rid.get_mut(&rid).into_iter().flatten() {
            if reg.flags.intersects(unmaps) {
                reg.flags = reg.flags.difference(unmaps) | kind.flag();
                switched += 1;
            }
        }
        Ok(switched)
    }

    /// The flags of a registration.
    pub fn flags(&self, handle: NotifierHandle) -> Option<NotifierFlags> {
        self.by_rid
            .get(&handle.rid)?
            .iter()
            .find(|r| r.id == handle.id)
            .map(|r| r.flags)
    }

    /// Delivers `ev` to every matching consumer (by requester and flags). Returns the number of
    /// deliveries once all consumers returned; failures are collected, see the module docs.
    pub fn dispatch(&self, ev: &IommuEvent) -> Result<usize, NotifierError> {
        self.dispatch_all(std::slice::from_ref(ev))
    }

    /// Delivers every event in order; all are delivered even if some consumers fail.
    pub fn dispatch_all(&self, events: &[IommuEvent]) -> Result<usize, NotifierError> {
        let mut delivered = 0;
        let mut failures = Vec::new();
        for ev in events {
            for (rid, reg) in self.targets(ev) {
                match reg.consumer.notify(ev) {
                    Ok(()) => delivered += 1,
                    Err(error) => failures.push(DeliveryFailure {
                        handle: NotifierHandle { rid, id: reg.id },
                        event: ev.clone(),
                        error,
                    }),
                }
            }
        }
        if failures.is_empty() {
            Ok(delivered)
        } else {
            Err(NotifierError::Delivery {
                delivered,
                failures,
            })
        }
    }

    /// Sends [`IommuEvent::Unmap`] of `range` to the `UNMAP` consumers of each of `rids`, and
    /// returns only after all of them dropped the range.
    pub fn notify_unmap(
        &self,
        rids: &[RequesterId],
        range: IovaRange,
    ) -> Result<usize, NotifierError> {
        let events: Vec<IommuEvent> = rids
            .iter()
            .map(|&rid| IommuEvent::Unmap { rid, range })
            .collect();
        self.dispatch_all(&events)
    }

    fn targets<'a>(
        &'a self,
        ev: &'a IommuEvent,
    ) -> Box<dyn Iterator<Item = (RequesterId, &'a Registration)> + 'a> {
        let wanted = move |(_, r): &(RequesterId, &Registration)| ev.wanted_by(r.flags);
        match ev.rid() {
            Some(rid) => Box::new(
                self.by_rid
                    .get(&rid)
                    .into_iter()
                    .flatten()
                    .map(move |r| (rid, r))
                    .filter(wanted),
            ),
            None => Box::new(
                self.by_rid
                    .iter()
                    .flat_map(|(rid, regs)| regs.iter().map(move |r| (*rid, r)))
                    .filter(wanted),
            ),
        }
    }

    fn check_flags(&self, flags: NotifierFlags) -> Result<(), NotifierError> {
        if flags.is_empty() {
            return Err(NotifierError::NoFlags);
        }
        if !self.supported.contains(flags) {
            return Err(NotifierError::Rejected {
                requested: flags,
                supported: self.supported,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<IommuEvent>>,
        fail: bool,
    }

    impl IommuNotifier for Recorder {
        fn notify(&self, ev: &IommuEvent) -> Result<(), NotifyError> {
            self.seen.lock().unwrap().push(ev.clone());
            if self.fail {
                Err(NotifyError::Disconnected)
            } else {
                Ok(())
            }
        }
    }

    impl Recorder {
        fn events(&self) -> Vec<IommuEvent> {
            self.seen.lock().unwrap().clone()
        }
    }

    fn rid(n: u16) -> RequesterId {
        RequesterId::from_bdf(0, n)
    }

    fn range(s: u64, e: u64) -> IovaRange {
        IovaRange::new(s, e).unwrap()
    }

    fn virtio_like() -> NotifierSet {
        NotifierSet::new(NotifierFlags::MAP | NotifierFlags::UNMAP)
    }

    #[test]
    fn devtlb_rejected_falls_back_to_unmap_and_unmap_still_arrives() {
        let mut set = virtio_like();
        let consumer = Arc::new(Recorder::default());
        let rejected = set.register(rid(8), NotifierFlags::DEVIOTLB_UNMAP, consumer.clone());
        assert!(matches!(rejected, Err(NotifierError::Rejected { .. })));

        let (handle, kind) = set
            .register_with_fallback(rid(8), NotifierFlags::NONE, consumer.clone())
            .unwrap();
        assert_eq!(kind, UnmapKind::Iotlb);
        assert_eq!(set.flags(handle), Some(NotifierFlags::UNMAP));

        let delivered = set.notify_unmap(&[rid(8)], range(0x1000, 0x1fff)).unwrap();
        assert_eq!(delivered, 1);
        assert_eq!(
            consumer.events(),
            vec![IommuEvent::Unmap {
                rid: rid(8),
                range: range(0x1000, 0x1fff)
            }]
        );
    }

    #[test]
    fn fallback_keeps_devtlb_when_supported() {
        let mut set = NotifierSet::new(NotifierFlags::ALL);
        let c = Arc::new(Recorder::default());
        let (h, kind) = set
            .register_with_fallback(rid(1), NotifierFlags::MAP, c)
            .unwrap();
        assert_eq!(kind, UnmapKind::DevIotlb);
        assert_eq!(
            set.flags(h),
            Some(NotifierFlags::MAP | NotifierFlags::DEVIOTLB_UNMAP)
        );
    }

    #[test]
    fn events_are_filtered_by_flags_and_requester() {
        let mut set = NotifierSet::new(NotifierFlags::ALL);
        let unmap = Arc::new(Recorder::default());
        let devtlb = Arc::new(Recorder::default());
        let other = Arc::new(Recorder::default());
        set.register(rid(1), NotifierFlags::UNMAP, unmap.clone())
            .unwrap();
        set.register(rid(1), NotifierFlags::DEVIOTLB_UNMAP, devtlb.clone())
            .unwrap();
        set.register(rid(2), NotifierFlags::UNMAP, other.clone())
            .unwrap();

        set.notify_unmap(&[rid(1)], range(0, 0xfff)).unwrap();
        set.dispatch(&IommuEvent::DevIotlbUnmap {
            rid: rid(1),
            range: range(0, 0xfff),
        })
        .unwrap();
        set.dispatch(&IommuEvent::DetachEndpoint { rid: rid(1) })
            .unwrap();

        assert_eq!(unmap.events().len(), 2); // Unmap + DetachEndpoint
        assert!(matches!(unmap.events()[0], IommuEvent::Unmap { .. }));
        assert_eq!(devtlb.events().len(), 2); // DevIotlbUnmap + DetachEndpoint
        assert!(matches!(
            devtlb.events()[0],
            IommuEvent::DevIotlbUnmap { .. }
        ));
        assert!(other.events().is_empty());
    }

    #[test]
    fn reset_reaches_every_consumer() {
        let mut set = virtio_like();
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        set.register(rid(1), NotifierFlags::MAP, a.clone()).unwrap();
        set.register(rid(2), NotifierFlags::UNMAP, b.clone())
            .unwrap();
        assert_eq!(set.dispatch(&IommuEvent::Reset).unwrap(), 2);
        assert_eq!(a.events(), vec![IommuEvent::Reset]);
        assert_eq!(b.events(), vec![IommuEvent::Reset]);
    }

    #[test]
    fn failures_are_collected_and_do_not_stop_other_consumers() {
        let mut set = virtio_like();
        let bad = Arc::new(Recorder {
            fail: true,
            ..Default::default()
        });
        let good = Arc::new(Recorder::default());
        let bad_handle = set.register(rid(1), NotifierFlags::UNMAP, bad).unwrap();
        set.register(rid(1), NotifierFlags::UNMAP, good.clone())
            .unwrap();
        set.register(rid(2), NotifierFlags::UNMAP, good.clone())
            .unwrap();

        let err = set
            .notify_unmap(&[rid(1), rid(2)], range(0, 0xfff))
            .unwrap_err();
        match err {
            NotifierError::Delivery {
                delivered,
                failures,
            } => {
                assert_eq!(delivered, 2);
                assert_eq!(failures.len(), 1);
                assert_eq!(failures[0].handle, bad_handle);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(good.events().len(), 2);
    }

    #[test]
    fn unregister_stops_delivery_and_rejects_second_unregister() {
        let mut set = virtio_like();
        let c = Arc::new(Recorder::default());
        let h = set
            .register(rid(3), NotifierFlags::UNMAP, c.clone())
            .unwrap();
        set.unregister(h).unwrap();
        assert!(set.is_empty());
        assert_eq!(set.notify_unmap(&[rid(3)], range(0, 1)).unwrap(), 0);
        assert!(c.events().is_empty());
        assert_eq!(set.unregister(h), Err(NotifierError::UnknownHandle(rid(3))));
    }

    #[test]
    fn empty_flags_are_refused() {
        let mut set = virtio_like();
        let c = Arc::new(Recorder::default());
        assert_eq!(
            set.register(rid(1), NotifierFlags::NONE, c).unwrap_err(),
            NotifierError::NoFlags
        );
    }

    #[test]
    fn switching_kind_follows_ats_toggles() {
        let mut set = NotifierSet::new(NotifierFlags::ALL);
        let c = Arc::new(Recorder::default());
        let h = set
            .register(rid(4), NotifierFlags::MAP | NotifierFlags::UNMAP, c.clone())
            .unwrap();
        set.switch_unmap_kind(h, UnmapKind::DevIotlb).unwrap();
        assert_eq!(
            set.flags(h),
            Some(NotifierFlags::MAP | NotifierFlags::DEVIOTLB_UNMAP)
        );
        // A plain IOTLB unmap no longer reaches it; a device-TLB one does.
        assert_eq!(set.notify_unmap(&[rid(4)], range(0, 1)).unwrap(), 0);
        assert_eq!(
            set.switch_endpoint_unmap_kind(rid(4), UnmapKind::Iotlb)
                .unwrap(),
            1
        );
        assert_eq!(set.notify_unmap(&[rid(4)], range(0, 1)).unwrap(), 1);
    }

    #[test]
    fn switching_to_unsupported_kind_keeps_old_flags() {
        let mut set = virtio_like();
        let c = Arc::new(Recorder::default());
        let h = set.register(rid(5), NotifierFlags::UNMAP, c).unwrap();
        assert!(matches!(
            set.switch_unmap_kind(h, UnmapKind::DevIotlb),
            Err(NotifierError::Rejected { .. })
        ));
        assert!(set
            .switch_endpoint_unmap_kind(rid(5), UnmapKind::DevIotlb)
            .is_err());
        assert_eq!(set.flags(h), Some(NotifierFlags::UNMAP));
    }

    #[test]
    fn flags_debug_names_bits() {
        assert_eq!(
            format!("{:?}", NotifierFlags::MAP | NotifierFlags::DEVIOTLB_UNMAP),
            "MAP|DEVIOTLB_UNMAP"
        );
        assert_eq!(format!("{:?}", NotifierFlags::NONE), "NONE");
    }
}
