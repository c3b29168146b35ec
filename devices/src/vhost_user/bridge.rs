//! The IOTLB bridge: one per vhost-user endpoint behind a vIOMMU. It answers
//! the back end's IOTLB misses from the IOMMU model ([`DmaTranslate`]) and
//! turns the model's unmap notifications ([`IommuNotifier`]) into acked
//! INVALIDATEs.
//!
//! # Ordering
//!
//! One mutex (the bridge state) is held across "translate + send UPDATE +
//! wait for its ack" on the miss path and across "send INVALIDATE + wait for
//! its ack" in [`IommuNotifier::notify`]. So an UPDATE computed before an
//! unmap is acked before that unmap's INVALIDATE is even sent, and the
//! INVALIDATE then removes it; an UPDATE computed after the unmap no longer
//! finds the mapping.
//!
//! Consequences for the vIOMMU (see the `vhost_user` module docs):
//! * the miss path calls `DmaTranslate::translate` with the bridge lock held,
//!   so the vIOMMU must deliver events **after releasing** the lock its
//!   `translate` takes (the `iommu` crate's models return events for exactly
//!   that reason);
//! * the fault hook is called **without** the bridge lock held, so it may
//!   take the vIOMMU's locks.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use iommu::{
    DmaTranslate, IommuEvent, IommuNotifier, Iova, IovaRange, NotifyError, Permissions,
    RequesterId, TranslateError,
};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::channel::{ChannelError, IotlbChannel};
use super::installed::Installed;
use super::miss::{check_update, MissError, MissHandler};
use super::stats::{BridgeCounters, BridgeStats};
use super::wire::{IotlbMsg, IotlbPerm};
use crate::virtio::GuestMemoryMmap;

/// Called when a miss hits an unmapped IOVA or lacks permission, with the
/// requester, the IOVA and the access the back end wanted, so the vIOMMU can
/// record a guest-visible fault. Called without any bridge lock held.
pub type FaultHook = Arc<dyn Fn(RequesterId, u64, IotlbPerm) + Send + Sync>;

/// UPDATEs start at the missed IOVA rounded down to this (the 4 KiB page).
const UPDATE_START_ALIGN: u64 = 4096;

/// What the bridge does with MAP notifications.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IotlbPolicy {
    /// Ignore MAP; the back end fetches translations with misses (QEMU's
    /// behaviour, and the only one the spec requires).
    #[default]
    MissDriven,
    /// Push an UPDATE for every new mapping right away (register the bridge
    /// with `NotifierFlags::MAP` for this to have any effect).
    Prefetch,
}

/// The device's view of the IOMMU, set by the VMM once the PCI address is known.
struct Translator {
    translate: Arc<dyn DmaTranslate>,
    rid: RequesterId,
    fault: Option<FaultHook>,
}

#[derive(Default)]
struct BridgeState {
    translator: Option<Translator>,
    mem: Option<GuestMemoryMmap>,
    /// Between `start` and `stop`: misses are served.
    running: bool,
    /// ACCESS_PLATFORM was negotiated with the back end on this connection,
    /// so it may hold IOTLB entries and must get INVALIDATEs.
    iotlb_live: bool,
    /// What the back end may hold: UPDATEs sent and not yet invalidated.
    installed: Installed,
    /// The back end disconnected and no new connection is negotiated yet:
    /// nothing is sent and misses are refused (see [`IotlbBridge::link_down`]).
    link_down: bool,
}

/// Bridges one vhost-user back end's device IOTLB to the guest IOMMU.
pub struct IotlbBridge {
    channel: Arc<dyn IotlbChannel>,
    policy: IotlbPolicy,
    state: Mutex<BridgeState>,
    counters: BridgeCounters,
}

impl std::fmt::Debug for IotlbBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotlbBridge")
            .field("policy", &self.policy)
            .field("rid", &self.rid())
            .finish_non_exhaustive()
    }
}

/// The vm-memory permission asked for by an IOTLB access kind.
pub fn access_of(perm: IotlbPerm) -> Permissions {
    match perm {
        IotlbPerm::None => Permissions::No,
        IotlbPerm::Ro => Permissions::Read,
        IotlbPerm::Wo => Permissions::Write,
        IotlbPerm::Rw => Permissions::ReadWrite,
    }
}

/// The IOTLB permission granting exactly `perm`.
pub fn iotlb_perm_of(perm: Permissions) -> IotlbPerm {
    match perm {
        Permissions::No => IotlbPerm::None,
        Permissions::Read => IotlbPerm::Ro,
        Permissions::Write => IotlbPerm::Wo,
        Permissions::ReadWrite => IotlbPerm::Rw,
    }
}

/// The `(iova, size)` of an INVALIDATE covering `range`.
///
/// The full 2^64 range cannot be expressed; it becomes `(0, u64::MAX)`,
/// which covers everything the bridge can have installed because UPDATEs
/// never include the last byte of the space (see [`update_for`]).
pub fn invalidate_args(range: IovaRange) -> (u64, u64) {
    let size = (range.end() - range.start()).saturating_add(1);
    (range.start(), size)
}

/// The UPDATE installing the IOVAs `[iova_lo, iova_lo + span]` → GPAs
/// `[gpa_lo, gpa_lo + span]`, which must lie in one memory region, with
/// `perm`. The last byte of the IOVA space is left out so that `iova + size`
/// never wraps; `None` if nothing is left or the GPA is not guest RAM.
fn update_for(
    mem: &GuestMemoryMmap,
    iova_lo: u64,
    gpa_lo: u64,
    span: u64,
    perm: Permissions,
) -> Option<IotlbMsg> {
    let span = if iova_lo.checked_add(span)? == u64::MAX {
        span.checked_sub(1)?
    } else {
        span
    };
    let host = mem.get_host_address(GuestAddress(gpa_lo)).ok()?;
    let size = span.checked_add(1)?;
    Some(IotlbMsg::update(
        iova_lo,
        size,
        host as u64,
        iotlb_perm_of(perm),
    ))
}

/// The largest piece of `[iova, iova+span] -> [gpa, ...]` that starts at
/// `iova` and stays inside the memory region holding `gpa`: the last IOVA
/// offset it covers, relative to `iova`.
fn span_in_region(mem: &GuestMemoryMmap, gpa: u64, span: u64) -> Option<u64> {
    let region = mem.find_region(GuestAddress(gpa))?;
    let r_last = region
        .start_addr()
        .raw_value()
        .checked_add(region.len().checked_sub(1)?)?;
    Some(span.min(r_last - gpa))
}

/// A MissError for a failed translation.
fn miss_error(iova: u64, perm: IotlbPerm, e: TranslateError) -> MissError {
    match e {
        TranslateError::PermissionDenied { .. } => {
            MissError::PermissionDenied { iova, wanted: perm }
        }
        TranslateError::Unmapped { .. }
        | TranslateError::NotAttached { .. }
        | TranslateError::UnknownEndpoint { .. }
        | TranslateError::BadRange { .. } => MissError::Unmapped { iova },
    }
}

fn lock(m: &Mutex<BridgeState>) -> MutexGuard<'_, BridgeState> {
    // The state stays consistent across a panic (plain flags and handles).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IotlbBridge {
    /// A bridge sending UPDATE/INVALIDATE through `channel` (the endpoint's
    /// main socket). It serves no miss until [`IotlbBridge::set_translation`]
    /// and [`IotlbBridge::start`] were called.
    pub fn new(channel: Arc<dyn IotlbChannel>, policy: IotlbPolicy) -> Self {
        IotlbBridge {
            channel,
            policy,
            state: Mutex::new(BridgeState::default()),
            counters: BridgeCounters::default(),
        }
    }

    /// Set (or replace) the IOMMU this device's DMA goes through: its
    /// translation, the device's requester id and an optional fault hook.
    pub fn set_translation(
        &self,
        translate: Arc<dyn DmaTranslate>,
        rid: RequesterId,
        fault: Option<FaultHook>,
    ) {
        lock(&self.state).translator = Some(Translator {
            translate,
            rid,
            fault,
        });
    }

    /// The requester id set with [`IotlbBridge::set_translation`].
    pub fn rid(&self) -> Option<RequesterId> {
        lock(&self.state).translator.as_ref().map(|t| t.rid)
    }

    /// Whether a translation was configured.
    pub fn has_translation(&self) -> bool {
        lock(&self.state).translator.is_some()
    }

    /// The device started with ACCESS_PLATFORM negotiated (SET_FEATURES was
    /// sent): serve misses against `mem` and send INVALIDATEs from now on.
    pub fn start(&self, mem: GuestMemoryMmap) {
        let mut st = lock(&self.state);
        st.mem = Some(mem);
        st.running = true;
        st.link_down = false;
        st.iotlb_live = true;
        // SET_FEATURES was just sent: the back end's IOTLB starts empty.
        st.installed.clear();
    }

    /// The device is stopping: refuse misses. INVALIDATEs are still sent,
    /// because the back end may keep its IOTLB until the next SET_FEATURES.
    pub fn stop(&self) {
        let mut st = lock(&self.state);
        st.running = false;
        st.mem = None;
    }

    /// The back end disconnected (reconnection): refuse misses at once and
    /// send nothing until [`IotlbBridge::link_up`]. The record of what the
    /// back end may hold is kept until the next connection's SET_FEATURES
    /// ([`IotlbBridge::start`]); nothing is ever re-sent from it.
    pub fn link_down(&self) {
        let mut st = lock(&self.state);
        st.link_down = true;
        st.running = false;
        st.mem = None;
    }

    /// A new connection is negotiated: INVALIDATEs for new unmaps that may
    /// touch what the back end held are sent again (harmless if its IOTLB
    /// is already empty). Misses wait for [`IotlbBridge::start`].
    pub fn link_up(&self) {
        lock(&self.state).link_down = false;
    }

    /// Number of IOVA ranges the back end may hold (for tests and stats).
    pub fn installed_ranges(&self) -> usize {
        lock(&self.state).installed.len()
    }

    /// Translate `[iova, iova + len)` for a read by the device (no fault is
    /// reported): the GPA of `iova`, if the whole range is mapped readable.
    pub fn device_gpa(&self, iova: u64, len: u64) -> Option<u64> {
        let st = lock(&self.state);
        let tr = st.translator.as_ref()?;
        let t = tr
            .translate
            .translate(tr.rid, Iova(iova), len, Permissions::Read)
            .ok()?;
        t.extent.gpa_of(iova).map(|g| g.raw_value())
    }

    /// Whether misses are being served.
    pub fn is_running(&self) -> bool {
        lock(&self.state).running
    }

    /// Counters.
    pub fn stats(&self) -> BridgeStats {
        self.counters.snapshot()
    }

    /// Compute the UPDATE answering a miss (bridge lock held by the caller).
    fn compute(&self, st: &BridgeState, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
        if !st.running {
            return Err(MissError::DeviceStopped { iova });
        }
        if iova == u64::MAX {
            return Err(MissError::Unrepresentable { iova });
        }
        let (Some(tr), Some(mem)) = (&st.translator, &st.mem) else {
            return Err(MissError::NoTranslation { iova });
        };
        let t = tr
            .translate
            .translate(tr.rid, Iova(iova), 1, access_of(perm))
            .map_err(|e| miss_error(iova, perm, e))?;
        let ext = t.extent;
        let not_ram = MissError::NotSharedMemory { iova };
        let gpa = ext.gpa_of(iova).ok_or(not_ram.clone())?.raw_value();
        let region = mem.find_region(GuestAddress(gpa)).ok_or(not_ram.clone())?;
        let r_first = region.start_addr().raw_value();
        // Start at the missed page (not further back): DPDK drops an UPDATE
        // whose start equals a cached entry's start, so an extent that grew
        // since an earlier UPDATE with the same start would never be cached
        // and the back end would miss forever. Page starts of misses repeat
        // only after the entry covering them was invalidated.
        let back = (iova - ext.iova.start())
            .min(gpa - r_first)
            .min(iova & (UPDATE_START_ALIGN - 1));
        let (iova_lo, gpa_lo) = (iova - back, gpa - back);
        let fwd = span_in_region(mem, gpa, ext.iova.end() - iova).ok_or(not_ram.clone())?;
        let update = update_for(mem, iova_lo, gpa_lo, back + fwd, ext.perm)
            .ok_or(MissError::Unrepresentable { iova })?;
        check_update(iova, perm, &update)?;
        Ok(update)
    }

    /// The miss path with the lock held: compute, send, wait for the ack.
    fn serve_locked(
        &self,
        iova: u64,
        perm: IotlbPerm,
    ) -> Result<IotlbMsg, (MissError, Option<Fault>)> {
        let mut st = lock(&self.state);
        let update = self.compute(&st, iova, perm).map_err(|e| {
            let fault = match e {
                MissError::Unmapped { .. } | MissError::PermissionDenied { .. } => st
                    .translator
                    .as_ref()
                    .and_then(|t| t.fault.clone().map(|hook| (hook, t.rid))),
                _ => None,
            };
            (e, fault)
        })?;
        // Recorded before sending: a send that fails half-way may still
        // have installed the entry.
        st.installed
            .add(update.iova, update.iova + (update.size - 1));
        self.channel.send_iotlb(&update, true).map_err(|e| {
            let reason = e.to_string();
            (MissError::UpdateFailed { iova, reason }, None)
        })?;
        Ok(update)
    }

    /// Send one acked INVALIDATE; a nack closes the socket (the back end
    /// refused to drop a translation the guest removed).
    fn invalidate_locked(&self, st: &mut BridgeState, range: IovaRange) -> Result<(), NotifyError> {
        if !st.iotlb_live {
            return Ok(());
        }
        if st.link_down {
            // No back end is connected to tell; the next connection's IOTLB
            // starts empty at its SET_FEATURES.
            BridgeCounters::bump(&self.counters.invalidations_skipped);
            return Ok(());
        }
        if !st.installed.intersects(range.start(), range.end()) {
            // Nothing of it was ever sent (or it was invalidated already).
            BridgeCounters::bump(&self.counters.invalidations_skipped);
            return Ok(());
        }
        let start = Instant::now();
        let (iova, size) = invalidate_args(range);
        match self
            .channel
            .send_iotlb(&IotlbMsg::invalidate(iova, size), true)
        {
            Ok(()) => {
                st.installed.remove(range.start(), range.end());
                BridgeCounters::bump(&self.counters.invalidations);
                self.counters.invalidate_latency.record(start.elapsed());
                Ok(())
            }
            // The back end hung up (or its socket was already closed after an
            // earlier failure): a disconnected back end must stop and drop
            // its IOTLB (a new connection starts empty at SET_FEATURES), so
            // it holds nothing left to invalidate.
            Err(ChannelError::Disconnected | ChannelError::Broken) => {
                st.installed.clear();
                BridgeCounters::bump(&self.counters.invalidations_skipped);
                log::debug!(
                    "vhost-user: back end gone; IOVA {iova:#x}+{size:#x} needs no INVALIDATE"
                );
                Ok(())
            }
            Err(e) => {
                BridgeCounters::bump(&self.counters.invalidation_failures);
                if matches!(e, ChannelError::Nack(_)) {
                    self.channel.close();
                }
                Err(NotifyError::new(format!(
                    "vhost-user INVALIDATE of IOVA {iova:#x}+{size:#x} failed ({e}); \
                     the back end was disconnected"
                )))
            }
        }
    }

    /// Push UPDATEs for a new mapping (prefetch policy), one per memory
    /// region the mapping touches. Parts outside guest RAM are skipped.
    fn prefetch_locked(
        &self,
        st: &mut BridgeState,
        range: IovaRange,
        gpa: GuestAddress,
        perm: Permissions,
    ) -> Result<(), NotifyError> {
        let Some(mem) = st.mem.clone().filter(|_| st.running) else {
            return Ok(());
        };
        let mem = &mem;
        let mut off = 0u64;
        let total = range.end() - range.start();
        for _ in 0..=mem.num_regions() {
            let (iova, g) = (range.start() + off, gpa.raw_value().saturating_add(off));
            let Some(span) = span_in_region(mem, g, total - off) else {
                break;
            };
            if let Some(update) = update_for(mem, iova, g, span, perm) {
                st.installed
                    .add(update.iova, update.iova + (update.size - 1));
                self.channel.send_iotlb(&update, true).map_err(|e| {
                    NotifyError::new(format!("vhost-user prefetch UPDATE failed: {e}"))
                })?;
                BridgeCounters::bump(&self.counters.prefetches);
            }
            match (off + span).checked_add(1) {
                Some(next) if next <= total => off = next,
                _ => break,
            }
        }
        Ok(())
    }
}

type Fault = (FaultHook, RequesterId);

impl MissHandler for IotlbBridge {
    fn on_miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
        let st = lock(&self.state);
        self.compute(&st, iova, perm)
    }

    /// Translate and send the UPDATE under the bridge lock. The UPDATE goes
    /// through the bridge's own channel (the same main socket the server's
    /// `main` refers to), so `_main` is not used.
    fn answer_miss(
        &self,
        iova: u64,
        perm: IotlbPerm,
        _main: &dyn IotlbChannel,
    ) -> Result<IotlbMsg, MissError> {
        let start = Instant::now();
        BridgeCounters::bump(&self.counters.misses);
        match self.serve_locked(iova, perm) {
            Ok(update) => {
                BridgeCounters::bump(&self.counters.misses_served);
                self.counters.miss_latency.record(start.elapsed());
                Ok(update)
            }
            Err((e, fault)) => {
                BridgeCounters::bump(&self.counters.misses_refused);
                if let Some((hook, rid)) = fault {
                    BridgeCounters::bump(&self.counters.faults);
                    hook(rid, iova, perm);
                }
                Err(e)
            }
        }
    }

    fn on_access_fail(&self, iova: u64, perm: IotlbPerm) {
        BridgeCounters::bump(&self.counters.access_fails);
        log::warn!("vhost-user back end reports a failed access at IOVA {iova:#x} ({perm:?})");
    }
}

impl IommuNotifier for IotlbBridge {
    fn notify(&self, ev: &IommuEvent) -> Result<(), NotifyError> {
        let mut st = lock(&self.state);
        let mine = st.translator.as_ref().map(|t| t.rid);
        if let (Some(ev_rid), Some(rid)) = (ev.rid(), mine) {
            if ev_rid != rid {
                return Ok(());
            }
        }
        match ev {
            IommuEvent::Map {
                range, gpa, perm, ..
            } => match self.policy {
                IotlbPolicy::MissDriven => Ok(()),
                IotlbPolicy::Prefetch => self.prefetch_locked(&mut st, *range, *gpa, *perm),
            },
            IommuEvent::Unmap { range, .. } => self.invalidate_locked(&mut st, *range),
            IommuEvent::DevIotlbUnmap { range, .. } => {
                BridgeCounters::bump(&self.counters.devtlb_notifications);
                self.invalidate_locked(&mut st, *range)
            }
            IommuEvent::DetachEndpoint { .. } | IommuEvent::Reset => {
                self.invalidate_locked(&mut st, IovaRange::FULL)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vhost_user::channel::{MockIotlbChannel, MockReply};
    use iommu::{Extent, Translation};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    const RID: RequesterId = RequesterId::from_bdf(0, 0x18);

    /// IOVA range -> (GPA, permission); extents are whole mappings.
    #[derive(Default)]
    struct Stub(Mutex<Vec<(IovaRange, u64, Permissions)>>);

    impl Stub {
        fn map(&self, iova: u64, len: u64, gpa: u64, perm: Permissions) {
            let r = IovaRange::from_start_len(iova, len).unwrap();
            self.0.lock().unwrap().push((r, gpa, perm));
        }
    }

    impl DmaTranslate for Stub {
        fn translate(
            &self,
            _rid: RequesterId,
            iova: Iova,
            len: u64,
            access: Permissions,
        ) -> Result<Translation, TranslateError> {
            let maps = self.0.lock().unwrap();
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

    /// Two adjacent 64 KiB regions (separate mappings) at GPA 0 and 0x10000.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap()
    }

    fn host(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
        mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    struct Rig {
        chan: Arc<MockIotlbChannel>,
        stub: Arc<Stub>,
        bridge: Arc<IotlbBridge>,
        faults: Arc<Mutex<Vec<(RequesterId, u64, IotlbPerm)>>>,
        mem: GuestMemoryMmap,
    }

    fn rig(policy: IotlbPolicy) -> Rig {
        let chan = Arc::new(MockIotlbChannel::new());
        let stub = Arc::new(Stub::default());
        let bridge = Arc::new(IotlbBridge::new(chan.clone(), policy));
        let faults = Arc::new(Mutex::new(Vec::new()));
        let f = faults.clone();
        let hook: FaultHook =
            Arc::new(move |rid, iova, perm| f.lock().unwrap().push((rid, iova, perm)));
        bridge.set_translation(stub.clone(), RID, Some(hook));
        let mem = mem();
        bridge.start(mem.clone());
        Rig {
            chan,
            stub,
            bridge,
            faults,
            mem,
        }
    }

    impl Rig {
        fn miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
            self.bridge.answer_miss(iova, perm, self.chan.as_ref())
        }
    }

    #[test]
    fn miss_sends_the_extent_from_the_missed_page_clipped_to_the_memory_region() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub.map(0x1000_0000, 0x20000, 0, Permissions::ReadWrite);
        // From the missed page to the end of the first region (0x10000 bytes).
        let want = IotlbMsg::update(0x1000_8000, 0x8000, host(&r.mem, 0x8000), IotlbPerm::Rw);
        assert_eq!(r.miss(0x1000_8123, IotlbPerm::Wo).unwrap(), want);
        let want2 = IotlbMsg::update(0x1001_0000, 0x10000, host(&r.mem, 0x10000), IotlbPerm::Rw);
        assert_eq!(r.miss(0x1001_0005, IotlbPerm::Ro).unwrap(), want2);
        assert_eq!(r.chan.sent(), vec![(want, true), (want2, true)]);
        let s = r.bridge.stats();
        assert_eq!((s.misses, s.misses_served, s.misses_refused), (2, 2, 0));
        assert_eq!(s.miss_latency.count, 2);
    }

    #[test]
    fn miss_update_starts_inside_a_region_and_keeps_the_real_permission() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub.map(0x2000_0000, 0x4000, 0x8000, Permissions::Read);
        let got = r.miss(0x2000_1fff, IotlbPerm::Ro).unwrap();
        assert_eq!(
            got,
            IotlbMsg::update(0x2000_1000, 0x3000, host(&r.mem, 0x9000), IotlbPerm::Ro)
        );
    }

    /// DPDK keeps the first cached entry of a given start IOVA and drops later
    /// UPDATEs with the same start. After the mapping grew, a second miss must
    /// therefore not repeat the first UPDATE's start.
    #[test]
    fn misses_after_a_mapping_grew_never_repeat_an_update_start() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub
            .map(0x3000_0000, 0x1000, 0x4000, Permissions::ReadWrite);
        let first = r.miss(0x3000_0010, IotlbPerm::Ro).unwrap();
        assert_eq!((first.iova, first.size), (0x3000_0000, 0x1000));
        // The translation extent now also covers the next page (a contiguous
        // neighbour mapped while the first stays mapped, merged by the model).
        r.stub.0.lock().unwrap().clear();
        r.stub
            .map(0x3000_0000, 0x2000, 0x4000, Permissions::ReadWrite);
        let second = r.miss(0x3000_1010, IotlbPerm::Ro).unwrap();
        assert_eq!((second.iova, second.size), (0x3000_1000, 0x1000));
    }

    #[test]
    fn unmapped_or_forbidden_miss_sends_nothing_and_reports_a_fault() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub.map(0x2000_0000, 0x1000, 0x8000, Permissions::Read);
        assert_eq!(
            r.miss(0x2000_0010, IotlbPerm::Wo),
            Err(MissError::PermissionDenied {
                iova: 0x2000_0010,
                wanted: IotlbPerm::Wo
            })
        );
        assert_eq!(
            r.miss(0x3000_0000, IotlbPerm::Ro),
            Err(MissError::Unmapped { iova: 0x3000_0000 })
        );
        assert!(r.chan.sent().is_empty());
        assert_eq!(
            *r.faults.lock().unwrap(),
            vec![
                (RID, 0x2000_0010, IotlbPerm::Wo),
                (RID, 0x3000_0000, IotlbPerm::Ro)
            ]
        );
        let s = r.bridge.stats();
        assert_eq!((s.misses_refused, s.faults), (2, 2));
    }

    #[test]
    fn miss_while_stopped_or_unconfigured_is_refused_without_fault() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub.map(0, 0x1000, 0, Permissions::ReadWrite);
        r.bridge.stop();
        assert_eq!(
            r.miss(0x10, IotlbPerm::Ro),
            Err(MissError::DeviceStopped { iova: 0x10 })
        );
        let fresh = IotlbBridge::new(r.chan.clone(), IotlbPolicy::MissDriven);
        fresh.start(r.mem.clone());
        assert_eq!(
            fresh.answer_miss(0x10, IotlbPerm::Ro, r.chan.as_ref()),
            Err(MissError::NoTranslation { iova: 0x10 })
        );
        assert!(r.chan.sent().is_empty());
        assert!(r.faults.lock().unwrap().is_empty());
    }

    #[test]
    fn translation_outside_guest_ram_is_refused() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub
            .map(0x5000, 0x1000, 0xfee0_0000, Permissions::ReadWrite);
        assert_eq!(
            r.miss(0x5000, IotlbPerm::Wo),
            Err(MissError::NotSharedMemory { iova: 0x5000 })
        );
        assert!(r.chan.sent().is_empty());
    }

    #[test]
    fn update_never_wraps_the_top_of_the_iova_space() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub
            .map(u64::MAX - 0xfff, 0x1000, 0x1000, Permissions::ReadWrite);
        let got = r.miss(u64::MAX - 0xfff, IotlbPerm::Rw).unwrap();
        assert_eq!(
            got,
            IotlbMsg::update(u64::MAX - 0xfff, 0xfff, host(&r.mem, 0x1000), IotlbPerm::Rw)
        );
        assert_eq!(
            r.miss(u64::MAX, IotlbPerm::Ro),
            Err(MissError::Unrepresentable { iova: u64::MAX })
        );
    }

    impl Rig {
        /// Let the back end hold a translation of `[0x1000, 0x2fff]`.
        fn install(&self) {
            self.miss(0x1000, IotlbPerm::Ro).unwrap();
        }

        fn invalidates(&self) -> Vec<(IotlbMsg, bool)> {
            let inv = crate::vhost_user::wire::IotlbType::Invalidate as u8;
            self.chan
                .sent()
                .into_iter()
                .filter(|(m, _)| m.msg_type == inv)
                .collect()
        }
    }

    #[test]
    fn unmap_events_send_acked_invalidates_with_exact_ranges() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub.map(0x1000, 0x2000, 0, Permissions::ReadWrite);
        let range = IovaRange::new(0x1000, 0x2fff).unwrap();
        let top = IovaRange::new(1, u64::MAX).unwrap();
        for ev in [
            IommuEvent::Unmap { rid: RID, range },
            IommuEvent::DevIotlbUnmap { rid: RID, range },
            IommuEvent::DetachEndpoint { rid: RID },
            IommuEvent::Reset,
            IommuEvent::Unmap {
                rid: RID,
                range: top,
            },
        ] {
            r.install();
            r.bridge.notify(&ev).unwrap();
        }
        let inv = |a, b| (IotlbMsg::invalidate(a, b), true);
        assert_eq!(
            r.invalidates(),
            vec![
                inv(0x1000, 0x2000),
                inv(0x1000, 0x2000),
                inv(0, u64::MAX),
                inv(0, u64::MAX),
                inv(1, u64::MAX)
            ]
        );
        let s = r.bridge.stats();
        assert_eq!((s.invalidations, s.devtlb_notifications), (5, 1));
    }

    #[test]
    fn unmaps_of_ranges_the_back_end_never_received_need_no_round_trip() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub.map(0x1000, 0x2000, 0, Permissions::ReadWrite);
        // A VT-d caching-mode guest invalidates right after mapping: nothing sent yet.
        let range = IovaRange::new(0x1000, 0x2fff).unwrap();
        r.bridge
            .notify(&IommuEvent::Unmap { rid: RID, range })
            .unwrap();
        assert!(r.chan.sent().is_empty());
        r.install();
        // Disjoint from what was sent: skipped; overlapping: invalidated once.
        let elsewhere = IovaRange::new(0x8000, 0x8fff).unwrap();
        r.bridge
            .notify(&IommuEvent::Unmap {
                rid: RID,
                range: elsewhere,
            })
            .unwrap();
        r.bridge
            .notify(&IommuEvent::Unmap { rid: RID, range })
            .unwrap();
        r.bridge
            .notify(&IommuEvent::Unmap { rid: RID, range })
            .unwrap();
        assert_eq!(r.invalidates().len(), 1);
        let s = r.bridge.stats();
        assert_eq!((s.invalidations, s.invalidations_skipped), (1, 3));
        // A new connection (start) forgets everything the old back end held.
        r.install();
        r.bridge.start(r.mem.clone());
        r.bridge
            .notify(&IommuEvent::Unmap { rid: RID, range })
            .unwrap();
        assert_eq!(r.invalidates().len(), 1);
    }

    #[test]
    fn events_of_other_requesters_and_before_start_send_nothing() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub.map(0x1000, 0x2000, 0, Permissions::ReadWrite);
        r.install();
        let other = RequesterId::from_bdf(0, 0x20);
        let range = IovaRange::new(0, 0x1fff).unwrap();
        r.bridge
            .notify(&IommuEvent::Unmap { rid: other, range })
            .unwrap();
        let fresh = IotlbBridge::new(r.chan.clone(), IotlbPolicy::MissDriven);
        fresh.notify(&IommuEvent::Reset).unwrap();
        assert!(r.invalidates().is_empty());
        // After a stop the back end may still hold entries: keep invalidating.
        r.bridge.stop();
        r.bridge
            .notify(&IommuEvent::Unmap { rid: RID, range })
            .unwrap();
        assert_eq!(r.invalidates().len(), 1);
    }

    #[test]
    fn refused_invalidate_is_an_error_and_closes_the_socket() {
        let r = rig(IotlbPolicy::MissDriven);
        r.stub.map(0x1000, 0x2000, 0, Permissions::ReadWrite);
        r.install();
        r.chan.script(&[MockReply::Nack(1)]);
        let range = IovaRange::new(0, 0x1fff).unwrap();
        let err = r.bridge.notify(&IommuEvent::Unmap { rid: RID, range });
        assert!(err.is_err());
        assert!(r.chan.is_closed());
        assert_eq!(r.bridge.stats().invalidation_failures, 1);
    }

    #[test]
    fn map_events_are_pushed_only_with_the_prefetch_policy() {
        let ev = IommuEvent::Map {
            rid: RID,
            range: IovaRange::from_start_len(0x4000_0000, 0x18000).unwrap(),
            gpa: GuestAddress(0x8000),
            perm: Permissions::Read,
        };
        let lazy = rig(IotlbPolicy::MissDriven);
        lazy.bridge.notify(&ev).unwrap();
        assert!(lazy.chan.sent().is_empty());
        let eager = rig(IotlbPolicy::Prefetch);
        eager.bridge.notify(&ev).unwrap();
        // Split at the region boundary 0x10000.
        let m = &eager.mem;
        assert_eq!(
            eager.chan.sent(),
            vec![
                (
                    IotlbMsg::update(0x4000_0000, 0x8000, host(m, 0x8000), IotlbPerm::Ro),
                    true
                ),
                (
                    IotlbMsg::update(0x4000_8000, 0x10000, host(m, 0x10000), IotlbPerm::Ro),
                    true
                ),
            ]
        );
        assert_eq!(eager.bridge.stats().prefetches, 2);
    }

    /// Records messages in the order their acks "arrive"; UPDATE acks are slow.
    struct SlowUpdates(Mutex<Vec<IotlbMsg>>, AtomicU64);

    impl IotlbChannel for SlowUpdates {
        fn send_iotlb(&self, msg: &IotlbMsg, _need_reply: bool) -> Result<(), ChannelError> {
            if msg.kind() == Ok(super::super::wire::IotlbType::Update) {
                std::thread::sleep(Duration::from_millis(150));
            }
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.lock().unwrap().push(*msg);
            Ok(())
        }
    }

    #[test]
    fn an_update_in_flight_is_acked_before_a_concurrent_invalidate_is_sent() {
        let chan = Arc::new(SlowUpdates(Mutex::default(), AtomicU64::new(0)));
        let stub = Arc::new(Stub::default());
        stub.map(0x1000, 0x1000, 0, Permissions::ReadWrite);
        let bridge = Arc::new(IotlbBridge::new(chan.clone(), IotlbPolicy::MissDriven));
        bridge.set_translation(stub, RID, None);
        bridge.start(mem());
        let b = bridge.clone();
        let c = chan.clone();
        let miss = std::thread::spawn(move || b.answer_miss(0x1000, IotlbPerm::Ro, c.as_ref()));
        std::thread::sleep(Duration::from_millis(30));
        let range = IovaRange::new(0x1000, 0x1fff).unwrap();
        bridge
            .notify(&IommuEvent::Unmap { rid: RID, range })
            .unwrap();
        // notify could only send after the UPDATE was acked.
        let kinds: Vec<_> = chan.0.lock().unwrap().iter().map(|m| m.msg_type).collect();
        assert_eq!(kinds, vec![2, 3]);
        miss.join().unwrap().unwrap();
    }
}
