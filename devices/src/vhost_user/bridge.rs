//! The IOTLB bridge: one per vhost-user endpoint behind a vIOMMU. It answers
//! the back end's IOTLB misses from the IOMMU model ([`DmaTranslate`](iommu::DmaTranslate)) and
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
//! * [`Viommu::report_fault`] is called **without** the bridge lock held, so
//!   it may take the vIOMMU's locks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iommu::{
    IommuEvent, IommuNotifier, Iova, IovaRange, NotifyError, Permissions, RequesterId,
    TranslateError,
};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::channel::{ChannelError, IotlbChannel, SpinWait};
use super::installed::Installed;
use super::miss::{check_update, MissError, MissHandler, RefusedRequest};
use super::recheck::VringArea;
use super::stall::{QueueWatch, WatchedRing, STALL_THRESHOLD};
use super::stats::{BridgeCounters, BridgeStats};
use super::wire::{IotlbMsg, IotlbPerm};
use crate::viommu::Viommu;
use crate::virtio::GuestMemoryMmap;
use iommu::ratelimit::RateLimit;
use iommu::sync::lock;
use iommu::warn_limited;

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
    viommu: Arc<dyn Viommu>,
    rid: RequesterId,
}

/// The bridge's log rate limits.
struct LogLimits {
    /// "ring unmapped" errors.
    ring: RateLimit,
    /// Stall reports.
    stall: RateLimit,
    /// The back end's ACCESS_FAIL reports.
    access_fail: RateLimit,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits {
            ring: RateLimit::new(1, invalidate::RING_LOG_PERIOD),
            stall: RateLimit::new(1, invalidate::RING_LOG_PERIOD),
            access_fail: RateLimit::per_second(8),
        }
    }
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
    /// The running vrings' IOVAs ([`IotlbBridge::set_vrings`]).
    rings: Vec<VringArea>,
    /// Rate limits of the lines the guest or the back end can cause.
    logs: LogLimits,
    /// The rings the stall detector watches, with its memory of each.
    watched: Vec<(WatchedRing, QueueWatch)>,
    /// The last miss and the last INVALIDATE, for the stall report.
    history: stall_check::History,
}

/// Bridges one vhost-user back end's device IOTLB to the guest IOMMU.
pub struct IotlbBridge {
    channel: Arc<dyn IotlbChannel>,
    policy: IotlbPolicy,
    state: Mutex<BridgeState>,
    counters: BridgeCounters,
    /// A miss is being answered (from its receipt to its ack).
    serving_miss: AtomicBool,
    /// How long a watched queue may hold descriptors without progress.
    stall_threshold: Mutex<Duration>,
    /// Busy-poll window of the back-end request thread, in nanoseconds (`poll_us`).
    poll_window_ns: AtomicU64,
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
        IotlbPerm::No => Permissions::No,
        IotlbPerm::ReadOnly => Permissions::Read,
        IotlbPerm::WriteOnly => Permissions::Write,
        IotlbPerm::ReadWrite => Permissions::ReadWrite,
    }
}

/// The IOTLB permission granting exactly `perm`.
pub fn iotlb_perm_of(perm: Permissions) -> IotlbPerm {
    match perm {
        Permissions::No => IotlbPerm::No,
        Permissions::Read => IotlbPerm::ReadOnly,
        Permissions::Write => IotlbPerm::WriteOnly,
        Permissions::ReadWrite => IotlbPerm::ReadWrite,
    }
}

/// The `(iova, size)` of an INVALIDATE covering `range`, such that
/// `iova + size` never wraps; `None` if nothing can be installed there.
///
/// DPDK's `vhost_user_iotlb_cache_remove` computes `iova + size` in 64 bits
/// and stops at the first cached entry starting above it, so a wrapped end
/// removes nothing. A range reaching `u64::MAX` is sent as
/// `(start, u64::MAX - start)`: that still removes every entry ending after
/// `start`, because UPDATEs never include the last byte of the space (see
/// `update_for`). For the full space that is `(0, u64::MAX)`.
pub fn invalidate_args(range: IovaRange) -> Option<(u64, u64)> {
    let (start, end) = (range.start(), range.end());
    if end < u64::MAX {
        return Some((start, end - start + 1));
    }
    (start < u64::MAX).then(|| (start, u64::MAX - start))
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
            serving_miss: AtomicBool::new(false),
            stall_threshold: Mutex::new(STALL_THRESHOLD),
            poll_window_ns: AtomicU64::new(0),
        }
    }

    /// Set (or replace) the vIOMMU this device's DMA goes through (it
    /// translates misses and gets the faults of refused ones) and the
    /// device's requester id.
    pub fn set_translation(&self, viommu: Arc<dyn Viommu>, rid: RequesterId) {
        lock(&self.state).translator = Some(Translator { viommu, rid });
    }

    /// The requester id set with [`IotlbBridge::set_translation`].
    pub fn rid(&self) -> Option<RequesterId> {
        lock(&self.state).translator.as_ref().map(|t| t.rid)
    }

    /// Whether a translation was configured.
    pub fn has_translation(&self) -> bool {
        lock(&self.state).translator.is_some()
    }

    /// The device starts on this connection with ACCESS_PLATFORM negotiated
    /// (SET_FEATURES and SET_MEM_TABLE were sent, the back-end request
    /// channel is not open yet, so no miss can arrive): first one acked
    /// full-range INVALIDATE, then serve misses against `mem` and send
    /// INVALIDATEs from now on.
    ///
    /// A back end should empty its IOTLB at SET_FEATURES (Linux vhost
    /// does), but nothing in the protocol makes it: one that keeps entries
    /// across a renegotiation or a reconnection would otherwise keep
    /// translations the guest removed meanwhile (unmaps are not sent while
    /// the link is down). Called for the first activation and for every
    /// restore on a new connection. On failure nothing is served and the
    /// caller fails the activation (a refusal also closes the socket).
    pub fn start(&self, mem: GuestMemoryMmap) -> Result<(), ChannelError> {
        let mut st = lock(&self.state);
        st.running = false;
        st.mem = None;
        st.rings.clear();
        st.watched.clear();
        self.connect_invalidate_locked(&mut st)?;
        st.mem = Some(mem);
        st.running = true;
        st.link_down = false;
        st.iotlb_live = true;
        Ok(())
    }

    /// The vrings the back end runs, as IOVAs (after SET_VRING_ADDR). An
    /// INVALIDATE overlapping one of them is followed at once by UPDATEs
    /// for that queue's rings, so the back end re-enables the queue.
    pub fn set_vrings(&self, rings: Vec<VringArea>) {
        lock(&self.state).rings = rings;
    }

    /// The rings whose back end must complete what the driver posts (net
    /// TX, blk): [`IotlbBridge::check_stalls`] watches them until the
    /// device stops.
    pub fn set_watched_rings(&self, rings: Vec<WatchedRing>) {
        lock(&self.state).watched = rings
            .into_iter()
            .map(|r| (r, QueueWatch::default()))
            .collect();
    }

    /// How long a watched queue may hold descriptors without completing
    /// any before it is reported ([`STALL_THRESHOLD`] by default).
    pub fn set_stall_threshold(&self, threshold: Duration) {
        *lock(&self.stall_threshold) = threshold;
    }

    /// Busy-poll for up to `window` before blocking (`--vhost-user ...,poll_us=P`; default
    /// zero): the back-end request thread waiting for the next miss and the channel waiting for
    /// an UPDATE's or INVALIDATE's ack. Saves a thread wake-up per wait that ends within the
    /// window, at the CPU time of the spin (counted in the channel's `poll_*` counters). Takes
    /// effect at the next wait; ordering and the security invariant are unchanged (the waits
    /// are the same, only how the thread waits differs).
    pub fn set_poll_window(&self, window: Duration) {
        let ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        self.poll_window_ns.store(ns, Ordering::Relaxed);
        self.channel.set_poll_window(window);
    }

    /// The device is stopping: refuse misses. INVALIDATEs are still sent,
    /// because the back end may keep its IOTLB until the next SET_FEATURES.
    pub fn stop(&self) {
        let mut st = lock(&self.state);
        st.running = false;
        st.mem = None;
        st.rings.clear();
        st.watched.clear();
    }

    /// The back end disconnected (reconnection): refuse misses at once and
    /// send nothing until the device starts on a new connection
    /// ([`IotlbBridge::start`], which begins with a full-range INVALIDATE).
    /// Nothing is ever re-sent from the record of what the old back end held.
    pub fn link_down(&self) {
        let mut st = lock(&self.state);
        st.link_down = true;
        st.running = false;
        st.mem = None;
        st.rings.clear();
        st.watched.clear();
    }

    /// Number of recorded IOVA segments the back end may hold (for tests and stats).
    pub fn installed_ranges(&self) -> usize {
        lock(&self.state).installed.len()
    }

    /// The recorded translations (UPDATEs sent and not invalidated since)
    /// that the vIOMMU no longer translates the same way, as inclusive IOVA
    /// ranges. The back end holds at most what the record holds, so an
    /// empty answer means no back end (DPDK included, whose IOTLB cannot be
    /// probed) holds a stale translation. Exact once the guest is stopped;
    /// while it runs, an unmap between its model change and its
    /// notification shows up here for that moment.
    pub fn stale_translations(&self) -> Vec<(u64, u64)> {
        let st = lock(&self.state);
        let segs = st.installed.overlapping(0, u64::MAX);
        super::recheck::stale_parts(&segs, |iova| invalidate::now(&st, iova))
    }

    /// Translate `[iova, iova + len)` for a read by the device (no fault is
    /// reported): the GPA of `iova`, if the whole range is mapped readable.
    pub fn device_gpa(&self, iova: u64, len: u64) -> Option<u64> {
        let st = lock(&self.state);
        let tr = st.translator.as_ref()?;
        let t = tr
            .viommu
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

    /// The UPDATE answering a miss and what it maps to.
    fn plan(&self, st: &BridgeState, iova: u64, perm: IotlbPerm) -> Result<Planned, MissError> {
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
            .viommu
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
        let msg = update_for(mem, iova_lo, gpa_lo, back + fwd, ext.perm)
            .ok_or(MissError::Unrepresentable { iova })?;
        check_update(iova, perm, &msg)?;
        Ok(Planned {
            msg,
            gpa: gpa_lo,
            perm: ext.perm,
        })
    }

    /// The miss path with the lock held: compute, send, wait for the ack.
    fn serve_locked(
        &self,
        iova: u64,
        perm: IotlbPerm,
    ) -> Result<IotlbMsg, (MissError, Option<Fault>)> {
        let mut st = lock(&self.state);
        let plan = self.plan(&st, iova, perm);
        st.history.miss(iova, perm, plan.is_ok());
        let planned = plan.map_err(|e| {
            let fault = match e {
                MissError::Unmapped { .. } | MissError::PermissionDenied { .. } => {
                    st.translator.as_ref().map(|t| (t.viommu.clone(), t.rid))
                }
                _ => None,
            };
            (e, fault)
        })?;
        self.send_update_locked(&mut st, &planned)
            .map_err(|source| (MissError::UpdateFailed { iova, source }, None))?;
        Ok(planned.msg)
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
            if let Some(msg) = update_for(mem, iova, g, span, perm) {
                // A caching-mode invalidation reports every present leaf of its range, also
                // ones already sent and unchanged (a neighbour still in flight): skip those.
                let last = msg.iova + (msg.size - 1);
                if !st.installed.holds(msg.iova, last, g, perm) {
                    let planned = Planned { msg, gpa: g, perm };
                    self.send_update_locked(st, &planned)?;
                    self.counters.prefetches.bump();
                }
            }
            match (off + span).checked_add(1) {
                Some(next) if next <= total => off = next,
                _ => break,
            }
        }
        Ok(())
    }
}

/// Where a refused miss is reported as a DMA fault.
type Fault = (Arc<dyn Viommu>, RequesterId);

/// An UPDATE and the GPA and permission it installs (for the record).
#[derive(Debug, Clone, Copy)]
struct Planned {
    msg: IotlbMsg,
    gpa: u64,
    perm: Permissions,
}

impl MissHandler for IotlbBridge {
    /// Translate and send the UPDATE through the bridge's channel, under
    /// the bridge lock.
    fn answer_miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
        let start = Instant::now();
        self.counters.misses.bump();
        self.serving_miss.store(true, Ordering::Relaxed);
        let served = self.serve_locked(iova, perm);
        self.serving_miss.store(false, Ordering::Relaxed);
        match served {
            Ok(update) => {
                self.counters.misses_served.bump();
                self.counters.miss_latency.record(start.elapsed());
                Ok(update)
            }
            Err((e, fault)) => {
                self.counters.misses_refused.bump();
                if let Some((viommu, rid)) = fault {
                    self.counters.faults.bump();
                    viommu.report_fault(rid, Iova(iova), access_of(perm));
                }
                Err(e)
            }
        }
    }

    fn on_access_fail(&self, iova: u64, perm: IotlbPerm) {
        self.counters.access_fails.bump();
        let mut st = lock(&self.state);
        warn_limited!(
            &mut st.logs.access_fail,
            "vhost-user back end reports a failed access at IOVA {iova:#x} ({perm:?})"
        );
    }

    fn on_refused_request(&self, request: RefusedRequest) {
        match request {
            RefusedRequest::Unsupported(_) => self.counters.unsupported_requests.bump(),
            RefusedRequest::Throttled => self.counters.throttled_requests.bump(),
        }
    }

    fn tick(&self) {
        self.check_stalls(Instant::now());
    }

    fn poll_window(&self) -> Duration {
        Duration::from_nanos(self.poll_window_ns.load(Ordering::Relaxed))
    }

    fn on_poll(&self, wait: &SpinWait) {
        self.channel.record_poll(wait);
    }
}

impl IommuNotifier for IotlbBridge {
    fn notify(&self, ev: &IommuEvent) -> Result<(), NotifyError> {
        let start = Instant::now();
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
            IommuEvent::Unmap { range, .. } => self.unmapped_locked(&mut st, *range, start),
            IommuEvent::DevIotlbUnmap { range, .. } => {
                self.counters.devtlb_notifications.bump();
                self.unmapped_locked(&mut st, *range, start)
            }
            IommuEvent::DetachEndpoint { .. } | IommuEvent::Reset => {
                self.unmapped_locked(&mut st, IovaRange::FULL, start)
            }
        }
    }
}

mod invalidate;
mod stall_check;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
