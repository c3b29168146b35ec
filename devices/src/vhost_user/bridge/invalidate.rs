//! The bridge's invalidation side: unmap notifications re-check what the
//! back end holds and invalidate only what changed (`super::super::recheck`),
//! vrings hit by an INVALIDATE are pushed again at once, and the record of
//! what was sent stays bounded. Everything here runs with the bridge lock
//! held, so every INVALIDATE is acked before `notify` returns.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iommu::{Extent, Iova, IovaRange, NotifyError, Permissions, TranslateError};

use super::super::channel::ChannelError;
use super::super::miss::MissError;
use super::super::recheck::{changed_runs, VringArea};
use super::super::wire::{IotlbMsg, IotlbPerm};
use super::{invalidate_args, BridgeState, IotlbBridge, Planned};

/// `invalidate_args(IovaRange::FULL)`: the whole IOVA space without a wrap.
pub(super) const FULL_INVALIDATE: (u64, u64) = (0, u64::MAX);

/// Most UPDATEs pushed to restore one vring area (one per extent).
const MAX_RING_UPDATES: usize = 64;

/// At most one "ring unmapped" error line (and one stall report) per this
/// period.
pub(super) const RING_LOG_PERIOD: Duration = Duration::from_secs(5);

/// What became of one INVALIDATE.
enum Sent {
    /// Acked.
    Acked,
    /// Nothing to send (the last byte of the space is never installed).
    Nothing,
    /// The back end is gone: it holds nothing any more.
    Gone,
}

impl IotlbBridge {
    /// Record and send one UPDATE with its ack; when the record is full,
    /// everything is invalidated first (bounded state).
    pub(super) fn send_update_locked(
        &self,
        st: &mut BridgeState,
        p: &Planned,
    ) -> Result<(), NotifyError> {
        if st.installed.is_full() {
            self.flush_all_locked(st)?;
        }
        self.push_update_locked(st, p)
            .map_err(|e| NotifyError::Install {
                iova: p.msg.iova,
                source: Arc::new(e),
            })
    }

    fn push_update_locked(&self, st: &mut BridgeState, p: &Planned) -> Result<(), ChannelError> {
        let m = p.msg;
        // Recorded before sending: a send that fails half-way may still
        // have installed the entry.
        st.installed
            .add(m.iova, m.iova + (m.size - 1), p.gpa, p.perm);
        self.channel.send_iotlb(&m, true)
    }

    /// An unmap notification for `range`: invalidate what the back end
    /// holds there and the vIOMMU no longer translates the same way, then
    /// restore the vrings those INVALIDATEs hit.
    pub(super) fn unmapped_locked(
        &self,
        st: &mut BridgeState,
        range: IovaRange,
        start: Instant,
    ) -> Result<(), NotifyError> {
        if !st.iotlb_live {
            return Ok(());
        }
        let segs = st.installed.overlapping(range.start(), range.end());
        if st.link_down || segs.is_empty() {
            // No back end to tell (the next connection starts empty), or
            // nothing of the range was sent since its last invalidation.
            self.counters.invalidations_skipped.bump();
            return Ok(());
        }
        let runs = changed_runs(&segs, &st.rings, |iova| now(st, iova));
        if runs.is_empty() {
            self.counters.invalidations_unchanged.bump();
            return Ok(());
        }
        let mut sent = Vec::with_capacity(runs.len());
        for (first, last) in runs {
            match self.invalidate_locked(st, first, last)? {
                Sent::Acked => sent.push((first, last)),
                Sent::Nothing => {}
                Sent::Gone => return Ok(()),
            }
        }
        self.counters.invalidate_latency.record(start.elapsed());
        self.repush_rings_locked(st, &sent);
        Ok(())
    }

    /// The INVALIDATE a connection starts with: the whole IOVA space, sent
    /// as `(0, u64::MAX)` so that `iova + size` does not wrap (DPDK) and
    /// still removes every entry (UPDATEs never include the last byte). The
    /// record is empty once it is acked. A refusal closes the socket: the
    /// back end would keep translations the guest may have removed.
    pub(super) fn connect_invalidate_locked(
        &self,
        st: &mut BridgeState,
    ) -> Result<(), ChannelError> {
        // Not in the stall history: no ring is programmed yet, so it
        // cannot be what stopped a queue.
        let (iova, size) = FULL_INVALIDATE;
        match self
            .channel
            .send_iotlb(&IotlbMsg::invalidate(iova, size), true)
        {
            Ok(()) => {
                st.installed.clear();
                self.counters.connect_invalidations.bump();
                Ok(())
            }
            Err(e) => {
                self.counters.invalidation_failures.bump();
                if matches!(e, ChannelError::Nack(_)) {
                    self.channel.close();
                }
                log::warn!(
                    "vhost-user: the full-range INVALIDATE at connection failed: {}",
                    iommu::error::chain(&e)
                );
                Err(e)
            }
        }
    }

    /// Invalidate everything (the record is full) and restore the vrings.
    fn flush_all_locked(&self, st: &mut BridgeState) -> Result<(), NotifyError> {
        log::debug!("vhost-user: IOTLB record full; invalidating everything");
        // Acked: the record is empty now; gone: it was cleared.
        if let Sent::Acked = self.invalidate_locked(st, 0, u64::MAX)? {
            self.repush_rings_locked(st, &[(0, u64::MAX)]);
        }
        Ok(())
    }

    /// Send one acked INVALIDATE of `[first, last]`; a nack closes the
    /// socket (the back end refused to drop a translation the guest removed).
    fn invalidate_locked(
        &self,
        st: &mut BridgeState,
        first: u64,
        last: u64,
    ) -> Result<Sent, NotifyError> {
        let args = IovaRange::new(first, last).ok().and_then(invalidate_args);
        let Some((iova, size)) = args else {
            return Ok(Sent::Nothing);
        };
        let hit = st.rings.iter().find(|r| r.overlaps(first, last)).copied();
        st.history.invalidate(first, last, hit.map(|r| r.queue));
        if let Some(ring) = hit {
            self.counters.ring_invalidations.bump();
            log::debug!(
                "vhost-user: INVALIDATE {iova:#x}+{size:#x} overlaps queue {}'s ring at {:#x}",
                ring.queue,
                ring.start
            );
        }
        match self
            .channel
            .send_iotlb(&IotlbMsg::invalidate(iova, size), true)
        {
            Ok(()) => {
                st.installed.remove(first, last);
                self.counters.invalidations.bump();
                Ok(Sent::Acked)
            }
            // The back end hung up (or its socket was already closed after an
            // earlier failure): a disconnected back end must stop and drop
            // its IOTLB (a new connection starts with a full INVALIDATE), so
            // it holds nothing left to invalidate.
            Err(ChannelError::Disconnected | ChannelError::Broken) => {
                st.installed.clear();
                self.counters.invalidations_skipped.bump();
                log::debug!(
                    "vhost-user: back end gone; IOVA {iova:#x}+{size:#x} needs no INVALIDATE"
                );
                Ok(Sent::Gone)
            }
            Err(e) => {
                self.counters.invalidation_failures.bump();
                if matches!(e, ChannelError::Nack(_)) {
                    self.channel.close();
                }
                Err(NotifyError::Invalidate {
                    first,
                    last,
                    source: Arc::new(e),
                })
            }
        }
    }

    /// DPDK disables a queue whose ring an INVALIDATE overlaps
    /// (`is_vring_iotlb` → `vring_invalidate`) and only re-enables it on an
    /// UPDATE overlapping the ring, which no MISS may ever ask for once the
    /// PMD stopped polling. So every ring area of each queue hit by `sent`
    /// is pushed again right away, from the vIOMMU's current state.
    fn repush_rings_locked(&self, st: &mut BridgeState, sent: &[(u64, u64)]) {
        if !st.running || st.mem.is_none() {
            return;
        }
        let queues: BTreeSet<usize> = st
            .rings
            .iter()
            .filter(|a| sent.iter().any(|&(s, e)| a.overlaps(s, e)))
            .map(|a| a.queue)
            .collect();
        for q in queues {
            let areas: Vec<VringArea> = st.rings.iter().filter(|a| a.queue == q).copied().collect();
            for area in areas {
                if !self.push_ring_area_locked(st, area) {
                    break;
                }
            }
        }
    }

    /// UPDATEs covering `area`; false if it is not (fully) mapped.
    fn push_ring_area_locked(&self, st: &mut BridgeState, area: VringArea) -> bool {
        let mut iova = area.start;
        for _ in 0..MAX_RING_UPDATES {
            let planned = match self.plan(st, iova, IotlbPerm::ReadOnly) {
                Ok(p) => p,
                Err(e) => {
                    self.ring_lost(st, area, &e);
                    return false;
                }
            };
            if let Err(e) = self.push_update_locked(st, &planned) {
                log::warn!(
                    "vhost-user: restoring queue {} failed: {}",
                    area.queue,
                    iommu::error::chain(&e)
                );
                return false;
            }
            self.counters.ring_updates.bump();
            // UPDATEs never include the last byte of the space: no wrap.
            iova = planned.msg.iova + planned.msg.size;
            if iova > area.end {
                return true;
            }
        }
        true
    }

    fn ring_lost(&self, st: &mut BridgeState, area: VringArea, e: &MissError) {
        self.counters.rings_unmapped.bump();
        if let Some(suppressed) = st.logs.ring.check() {
            log::error!(
                "vhost-user: queue {} ring at IOVA {:#x}..={:#x} is no longer translated ({e}) \
                 while the device runs: the guest removed it, so the back end cannot use \
                 the queue until the driver resets it ({suppressed} similar errors suppressed)",
                area.queue,
                area.start,
                area.end
            );
        }
    }
}

/// The vIOMMU's current extent at `iova` for the bridge's requester.
pub(super) fn now(st: &BridgeState, iova: u64) -> Result<Extent, TranslateError> {
    let Some(tr) = &st.translator else {
        return Err(TranslateError::BadRange {
            iova: Iova(iova),
            len: 0,
        });
    };
    tr.viommu
        .translate(tr.rid, Iova(iova), 1, Permissions::No)
        .map(|t| t.extent)
}
