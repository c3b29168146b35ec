//! Invalidations: running the queue between IQH and IQT (descriptors are decoded by
//! [`super::descriptor`]), and turning each invalidation into the notifier events consumers
//! must see.
//!
//! Events per descriptor:
//! * context-cache: `DetachEndpoint` for every cached source id it selects (the requester may
//!   have moved to another domain, so every translation it had is suspect); a device-selective
//!   one then re-reads the named entries so the domain → requester relation is known early;
//! * IOTLB page-selective: `Unmap` of exactly `[ADDR, ADDR + 2^AM pages)` for every requester
//!   whose cached context uses the domain; with caching mode also `Map` for the present leaves
//!   in that range (a bounded scan; a prefetch hint only);
//! * IOTLB domain / global: `Unmap` of the whole 64-bit range for the domain's / all requesters;
//! * device-TLB: `DevIotlbUnmap` of the decoded range for the source id.
//!
//! A wait descriptor becomes [`VtdAction::WaitDone`] after a [`VtdAction::Notify`] with every
//! event of the descriptors before it, so the adapter can deliver and only then complete it.

use vm_memory::{Bytes, GuestAddress};

use super::descriptor::{
    parse_descriptor, psi_range, ContextScope, Descriptor, DescriptorCaps, IotlbScope,
};
use super::fault::MsiMessage;
use super::pagewalk::{extent, walk};
use super::regs::{CTL_IM, CTL_IP, FSTS_IQE, ICS_IWC};
use super::tables::{lookup_context, Context, TranslationType};
use super::{Vtd, VtdAction, WaitCompletion};
use crate::notifier::IommuEvent;
use crate::types::{IovaRange, Permissions, RequesterId, X86_MSI_END, X86_MSI_START};
use crate::warn_limited;

/// At most this many page walks per caching-mode range scan.
pub const MAX_MAP_SCAN_STEPS: usize = 4096;
/// At most this many `Map` extents per caching-mode range scan, and `Map` events per
/// invalidation (they are prefetch hints; dropping some is harmless).
pub const MAX_MAP_EVENTS: usize = 1024;
/// At most this many events are collected for one [`VtdAction::Notify`]; a batch growing past it
/// becomes a single [`IommuEvent::Reset`] (every consumer drops everything), so a guest cannot
/// make one register write allocate without bound.
pub const MAX_BATCH_EVENTS: usize = 4096;

/// Errors of invalidation requests (a queue error, FSTS.IQE, for queued ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidationError {
    /// Descriptor type 0, scalable-mode types (6..) or a non-zero upper type field.
    #[error("invalidation descriptor type {desc_type:#x} is not supported in legacy mode; use types 1-5")]
    UnknownType {
        /// Low type field (plus the upper field in bits 7:4).
        desc_type: u8,
    },
    /// Reserved bits set.
    #[error("invalidation descriptor type {desc_type} has reserved bits set ({qw0:#018x} {qw1:#018x}); clear them")]
    Reserved {
        /// Descriptor type.
        desc_type: u8,
        /// Low qword.
        qw0: u64,
        /// High qword.
        qw1: u64,
    },
    /// Granularity 0.
    #[error("invalidation descriptor type {desc_type} has granularity 0; use global, domain or device/page")]
    Granularity {
        /// Descriptor type.
        desc_type: u8,
    },
    /// Page-selective invalidation with AM above CAP.MAMV.
    #[error("IOTLB page-selective invalidation with address mask {am} exceeds MAMV {mamv}; use a domain-selective invalidation")]
    MaskTooLarge {
        /// The AM field.
        am: u8,
        /// CAP.MAMV.
        mamv: u8,
    },
    /// A device-TLB descriptor on a unit without ECAP.DT.
    #[error("device-TLB invalidation on a unit without device-TLB support (ECAP.DT=0)")]
    DeviceTlbUnsupported,
    /// The descriptor could not be read from guest memory.
    #[error("invalidation queue entry at GPA {addr:#x} is not in guest memory; fix IQA")]
    QueueRead {
        /// Its address.
        addr: u64,
    },
    /// IQT points past the end of the queue.
    #[error(
        "IQT index {tail} is beyond the queue's {entries} entries; keep IQT below 256 << IQA.QS"
    )]
    TailOutOfRange {
        /// The tail index.
        tail: u64,
        /// Entries in the queue.
        entries: u64,
    },
}

/// The invalidation queue as latched when QIE was set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueState {
    pub(crate) enabled: bool,
    pub(crate) base: u64,
    pub(crate) entries: u64,
    pub(crate) head: u64,
}

impl<M: Bytes<GuestAddress> + Send + Sync> Vtd<M> {
    fn rid(&self, sid: u16) -> RequesterId {
        RequesterId::from_bdf(self.config.segment, sid)
    }

    /// Context-cache invalidation: drops the selected cached contexts and detaches them. A
    /// device-selective one then re-reads the named context entries (Linux issues one after
    /// writing each new context entry), so later IOTLB invalidations of the new domain reach
    /// the device even before its first DMA; with caching mode that is what lets consumers
    /// prefetch mappings.
    pub(crate) fn invalidate_context(&mut self, scope: ContextScope) -> Vec<IommuEvent> {
        let removed = self
            .caches()
            .context
            .remove_where(|s, c| scope.selects(s, c));
        let events = removed
            .into_iter()
            .map(|sid| IommuEvent::DetachEndpoint { rid: self.rid(sid) })
            .collect();
        if let Some(root) = self.root_table {
            for sid in scope.device_sids() {
                if let Ok(ctx) = lookup_context(&self.mem, root, sid, &self.table_caps()) {
                    self.caches().context.insert(sid, ctx);
                }
            }
        }
        events
    }

    /// IOTLB invalidation: drops cached translations and returns the notifier events.
    pub(crate) fn invalidate_iotlb(&mut self, scope: IotlbScope) -> Vec<IommuEvent> {
        let (did, range) = {
            let mut caches = self.caches();
            match scope {
                IotlbScope::Global => {
                    caches.iotlb.invalidate_all();
                    let sids: Vec<u16> = caches.context.iter().map(|(s, _)| s).collect();
                    drop(caches);
                    return self.unmap_events(&sids, IovaRange::FULL);
                }
                IotlbScope::Domain(did) => {
                    caches.iotlb.invalidate_domain(did);
                    (did, IovaRange::FULL)
                }
                IotlbScope::Page { did, addr, am, .. } => {
                    let range = psi_range(addr, am);
                    caches.iotlb.invalidate_range(did, range);
                    (did, range)
                }
            }
        };
        let sids = self.caches().context.sids_in_domain(did);
        let mut events = self.unmap_events(&sids, range);
        if self.config.caching_mode && matches!(scope, IotlbScope::Page { .. }) {
            events.extend(self.map_events(&sids, range));
        }
        events
    }

    fn unmap_events(&self, sids: &[u16], range: IovaRange) -> Vec<IommuEvent> {
        sids.iter()
            .map(|&sid| IommuEvent::Unmap {
                rid: self.rid(sid),
                range,
            })
            .collect()
    }

    /// Caching mode: `Map` events for the present leaves of `range` in domain `did`.
    fn map_events(&self, sids: &[u16], range: IovaRange) -> Vec<IommuEvent> {
        let ctx = sids
            .iter()
            .filter_map(|&s| self.caches().context.get(s))
            .find(|c| c.tt != TranslationType::PassThrough);
        let Some(ctx) = ctx else {
            return Vec::new();
        };
        let extents = self.scan_present(&ctx, range);
        let mut events = Vec::new();
        for &sid in sids {
            for &(iova, gpa, perm) in extents.iter().take(MAX_MAP_EVENTS - events.len()) {
                events.push(IommuEvent::Map {
                    rid: self.rid(sid),
                    range: iova,
                    gpa: GuestAddress(gpa),
                    perm,
                });
            }
        }
        events
    }

    /// Present extents inside `range` (clipped to it, never touching the MSI window), bounded
    /// by [`MAX_MAP_SCAN_STEPS`] walks and [`MAX_MAP_EVENTS`] extents.
    fn scan_present(&self, ctx: &Context, range: IovaRange) -> Vec<(IovaRange, u64, Permissions)> {
        let p = self.walk_params(ctx);
        let msi = IovaRange::new(X86_MSI_START, X86_MSI_END).unwrap_or(IovaRange::FULL);
        let mut out = Vec::new();
        let mut cur = range.start();
        for _ in 0..MAX_MAP_SCAN_STEPS {
            let next_end = match walk(&self.mem, &p, cur) {
                Ok(leaf) => {
                    let (ext, gpa) = extent(&self.mem, &p, &leaf);
                    let clipped = ext.intersection(range);
                    if let Some(c) =
                        clipped.filter(|c| !c.intersects(msi) && leaf.perm != Permissions::No)
                    {
                        out.push((c, gpa + (c.start() - ext.start()), leaf.perm));
                    }
                    ext.end()
                }
                Err(e) => match e.skip_shift() {
                    Some(shift) => cur | ((1u64 << shift) - 1),
                    None => break,
                },
            };
            if out.len() >= MAX_MAP_EVENTS || next_end >= range.end() {
                break;
            }
            cur = next_end + 1;
        }
        out
    }

    /// Runs the invalidation queue from IQH to IQT (when QIE is on and no IQE is pending).
    pub(crate) fn process_queue(&mut self) -> Vec<VtdAction> {
        let mut out = Vec::new();
        if !self.qi.enabled || self.regs.fsts & FSTS_IQE != 0 {
            return out;
        }
        let tail = (self.regs.iqt >> 4) & 0x7fff;
        let entries = self.qi.entries.max(1);
        if tail >= entries {
            self.queue_error(
                &mut out,
                InvalidationError::TailOutOfRange { tail, entries },
            );
            return out;
        }
        let mut batch = Vec::new();
        let caps = DescriptorCaps {
            device_tlb: self.config.device_iotlb,
        };
        for _ in 0..entries {
            if self.qi.head == tail {
                break;
            }
            let desc = self
                .fetch_descriptor(self.qi.head)
                .and_then(|(qw0, qw1)| parse_descriptor(qw0, qw1, caps));
            match desc {
                Ok(desc) => {
                    self.counts.count_descriptor(&desc);
                    self.run_descriptor(desc, &mut batch, &mut out)
                }
                Err(e) => {
                    flush(&mut batch, &mut out);
                    self.queue_error(&mut out, e);
                    return out;
                }
            }
            self.qi.head = (self.qi.head + 1) % entries;
            self.regs.iqh = self.qi.head << 4;
        }
        flush(&mut batch, &mut out);
        out
    }

    fn fetch_descriptor(&self, index: u64) -> Result<(u64, u64), InvalidationError> {
        let addr = self.qi.base.saturating_add(index * 16);
        let mut buf = [0u8; 16];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .map_err(|_| InvalidationError::QueueRead { addr })?;
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&buf[..8]);
        hi.copy_from_slice(&buf[8..]);
        Ok((u64::from_le_bytes(lo), u64::from_le_bytes(hi)))
    }

    fn run_descriptor(
        &mut self,
        desc: Descriptor,
        batch: &mut Vec<IommuEvent>,
        out: &mut Vec<VtdAction>,
    ) {
        let folded = match desc {
            Descriptor::ContextCache(scope) => add_bounded(batch, self.invalidate_context(scope)),
            Descriptor::Iotlb(scope) => add_bounded(batch, self.invalidate_iotlb(scope)),
            Descriptor::DeviceTlb { sid, range, .. } => {
                let rid = self.rid(sid);
                add_bounded(batch, vec![IommuEvent::DevIotlbUnmap { rid, range }])
            }
            Descriptor::InterruptEntryCache(selector) => {
                flush(batch, out);
                out.push(VtdAction::InterruptCacheInvalidated(selector));
                false
            }
            Descriptor::Wait(wait) => {
                flush(batch, out);
                out.push(VtdAction::WaitDone(wait));
                false
            }
        };
        if folded {
            warn_limited!(
                self.log_budget(),
                "VT-d: invalidations before the next wait produced over {MAX_BATCH_EVENTS} \
                 notifications; telling every consumer to drop all translations instead"
            );
        }
    }

    fn queue_error(&mut self, out: &mut Vec<VtdAction>, error: InvalidationError) {
        self.counts.queue_errors = self.counts.queue_errors.saturating_add(1);
        warn_limited!(
            self.log_budget(),
            "VT-d invalidation queue error at head {}: {error}",
            self.qi.head
        );
        self.regs.fsts |= FSTS_IQE;
        out.extend(self.raise_fault_event());
    }

    /// Completes a wait descriptor: writes its status data, and for IF sets ICS.IWC and signals
    /// the invalidation event. Call only after every earlier [`VtdAction::Notify`] returned.
    pub fn complete_wait(&mut self, wait: &WaitCompletion) -> Vec<VtdAction> {
        if let Some((addr, data)) = wait.status {
            if self
                .mem
                .write_obj(data.to_le(), GuestAddress(addr))
                .is_err()
            {
                warn_limited!(
                    self.log_budget(),
                    "VT-d wait descriptor status write to {addr:#x} failed: not guest RAM"
                );
            }
        }
        if !wait.interrupt || self.regs.ics & ICS_IWC != 0 {
            return Vec::new();
        }
        self.regs.ics |= ICS_IWC;
        if self.regs.iectl & CTL_IM != 0 {
            self.regs.iectl |= CTL_IP;
            return Vec::new();
        }
        vec![VtdAction::InvalidationEvent(self.invalidation_msi())]
    }

    fn invalidation_msi(&self) -> MsiMessage {
        MsiMessage {
            addr: (u64::from(self.regs.ieuaddr) << 32) | u64::from(self.regs.ieaddr),
            data: self.regs.iedata,
        }
    }

    /// ICS write: IWC is write-1-to-clear; clearing it clears IECTL.IP.
    pub(crate) fn write_ics(&mut self, value: u32) {
        if value & ICS_IWC != 0 {
            self.regs.ics &= !ICS_IWC;
            self.regs.iectl &= !CTL_IP;
        }
    }

    /// IECTL write: IM is writable; unmasking with IP set sends the pending event.
    pub(crate) fn write_iectl(&mut self, value: u32) -> Vec<VtdAction> {
        self.regs.iectl = (self.regs.iectl & !CTL_IM) | (value & CTL_IM);
        if self.regs.iectl & (CTL_IM | CTL_IP) == CTL_IP {
            self.regs.iectl &= !CTL_IP;
            return vec![VtdAction::InvalidationEvent(self.invalidation_msi())];
        }
        Vec::new()
    }
}

/// Adds `events` to `batch`, folding the batch into one `Reset` past [`MAX_BATCH_EVENTS`]
/// (a `Reset` already covers every later invalidation of the batch). Returns whether this
/// call folded it.
fn add_bounded(batch: &mut Vec<IommuEvent>, events: Vec<IommuEvent>) -> bool {
    if batch.as_slice() == [IommuEvent::Reset] {
        return false;
    }
    batch.extend(events);
    if batch.len() > MAX_BATCH_EVENTS {
        batch.clear();
        batch.push(IommuEvent::Reset);
        return true;
    }
    false
}

fn flush(batch: &mut Vec<IommuEvent>, out: &mut Vec<VtdAction>) {
    if !batch.is_empty() {
        out.push(VtdAction::Notify(std::mem::take(batch)));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::translate::DmaTranslate;
    use crate::types::Iova;
    use crate::vtd::regs::{
        FECTL, FSTS, GCMD, GCMD_QIE, GCMD_TE, ICS, IEADDR, IECTL, IEDATA, IQA, IQH, IQT,
    };
    use crate::vtd::testutil::*;
    use crate::vtd::VtdConfig;

    fn range(start: u64, end: u64) -> IovaRange {
        IovaRange::new(start, end).unwrap()
    }

    /// Two devices in domain 2, one in domain 3, each with a translation cached.
    fn rig_with_devices(config: VtdConfig) -> Rig {
        let mut rig = Rig::new(config);
        rig.attach(0x08, 2, 0);
        rig.attach(0x10, 2, 0);
        rig.attach(0x18, 3, 0);
        rig.map(0x1000, 0x9000, 1, PTE_RW);
        for devfn in [0x08, 0x10, 0x18] {
            rig.vtd
                .translate(
                    Rig::rid(devfn),
                    Iova(0x1000),
                    1,
                    crate::types::Permissions::Read,
                )
                .unwrap();
        }
        rig
    }

    fn unmap(devfn: u8, r: IovaRange) -> IommuEvent {
        IommuEvent::Unmap {
            rid: Rig::rid(devfn),
            range: r,
        }
    }

    #[test]
    fn iotlb_psi_unmaps_exact_range_for_domain_endpoints() {
        let mut rig = rig_with_devices(VtdConfig::default());
        let actions = rig.submit(&[iotlb_desc(3, 2, 0x4000, 2, false)]);
        let r = range(0x4000, 0x7fff);
        assert_eq!(
            actions,
            vec![VtdAction::Notify(vec![unmap(0x08, r), unmap(0x10, r)])]
        );
    }

    #[test]
    fn iotlb_domain_and_global_unmap_the_whole_range() {
        let mut rig = rig_with_devices(VtdConfig::default());
        let actions = rig.submit(&[iotlb_desc(2, 3, 0, 0, false)]);
        assert_eq!(
            actions,
            vec![VtdAction::Notify(vec![unmap(0x18, IovaRange::FULL)])]
        );
        let actions = rig.submit(&[iotlb_desc(1, 0, 0, 0, false)]);
        let all: Vec<_> = [0x08, 0x10, 0x18]
            .iter()
            .map(|&d| unmap(d, IovaRange::FULL))
            .collect();
        assert_eq!(actions, vec![VtdAction::Notify(all)]);
    }

    #[test]
    fn context_invalidation_detaches_selected_cached_devices() {
        let mut rig = rig_with_devices(VtdConfig::default());
        let detach = |d| IommuEvent::DetachEndpoint { rid: Rig::rid(d) };
        // Device-selective with FM=3 (ignore function bits) selects 0x08..0x0f only.
        let actions = rig.submit(&[cc_desc(3, 0, 0x0b, 3)]);
        assert_eq!(actions, vec![VtdAction::Notify(vec![detach(0x08)])]);
        // Its entry is still present, so it is re-read (primed) at once.
        assert_eq!(rig.vtd.cached_domain(Rig::rid(0x08)), Some(2));
        let actions = rig.submit(&[cc_desc(2, 3, 0, 0)]);
        assert_eq!(actions, vec![VtdAction::Notify(vec![detach(0x18)])]);
        assert_eq!(
            rig.vtd.cached_domain(Rig::rid(0x18)),
            None,
            "only device scopes prime"
        );
        let actions = rig.submit(&[cc_desc(1, 0, 0, 0)]);
        assert_eq!(
            actions,
            vec![VtdAction::Notify(vec![detach(0x08), detach(0x10)])]
        );
        // Nothing cached any more: nothing to notify.
        assert!(rig.submit(&[cc_desc(1, 0, 0, 0)]).is_empty());
    }

    #[test]
    fn device_tlb_descriptor_emits_deviotlb_unmap() {
        let mut rig = Rig::new(VtdConfig {
            device_iotlb: true,
            ..VtdConfig::default()
        });
        let actions = rig.submit(&[devtlb_desc(0x0108, 0x7fff_ffff_ffff_f000, true)]);
        let rid = crate::types::RequesterId::from_bdf(0, 0x0108);
        assert_eq!(
            actions,
            vec![VtdAction::Notify(vec![IommuEvent::DevIotlbUnmap {
                rid,
                range: IovaRange::FULL
            }])]
        );
    }

    #[test]
    fn iec_descriptor_asks_for_route_refresh() {
        let mut rig = Rig::new(VtdConfig::default());
        let actions = rig.submit(&[iec_desc(Some((4, 1))), iec_desc(None)]);
        assert_eq!(
            actions,
            vec![
                VtdAction::InterruptCacheInvalidated(Some((4, 1))),
                VtdAction::InterruptCacheInvalidated(None)
            ]
        );
    }

    #[test]
    fn wait_completes_only_after_preceding_events_and_writes_status_on_completion() {
        let mut rig = rig_with_devices(VtdConfig {
            device_iotlb: true,
            ..VtdConfig::default()
        });
        let status = rig.b.alloc();
        let actions = rig.submit(&[
            iotlb_desc(3, 3, 0x1000, 0, true),
            devtlb_desc(0x18, 0x1000, false),
            wait_desc(true, false, 2, status),
            iotlb_desc(2, 3, 0, 0, false),
        ]);
        let page = range(0x1000, 0x1fff);
        let wait = WaitCompletion {
            status: Some((status, 2)),
            interrupt: false,
            fence: false,
        };
        assert_eq!(
            actions,
            vec![
                VtdAction::Notify(vec![
                    unmap(0x18, page),
                    IommuEvent::DevIotlbUnmap {
                        rid: Rig::rid(0x18),
                        range: page
                    }
                ]),
                VtdAction::WaitDone(wait),
                VtdAction::Notify(vec![unmap(0x18, IovaRange::FULL)]),
            ]
        );
        // The model did not write the status itself: the adapter does it after notifying.
        assert_eq!(rig.b.read_u64(status), 0);
        assert!(rig.vtd.complete_wait(&wait).is_empty());
        assert_eq!(rig.b.read_u64(status), 2);
        assert_eq!(r32(&rig.vtd, ICS), 0, "no IF, no IWC");
    }

    #[test]
    fn wait_with_interrupt_sets_iwc_and_signals_or_pends() {
        let mut rig = Rig::new(VtdConfig::default());
        w32(&mut rig.vtd, IEDATA, 0x55);
        w32(&mut rig.vtd, IEADDR, 0xfee0_0000);
        let wait = WaitCompletion {
            status: None,
            interrupt: true,
            fence: true,
        };
        // Masked (reset state): IP pends, the MSI fires on unmask.
        assert!(rig.vtd.complete_wait(&wait).is_empty());
        assert_eq!(r32(&rig.vtd, ICS), 1);
        assert_eq!(r32(&rig.vtd, IECTL), CTL_IM | CTL_IP);
        let msi = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x55,
        };
        assert_eq!(
            w32(&mut rig.vtd, IECTL, 0),
            vec![VtdAction::InvalidationEvent(msi)]
        );
        // IWC still set: no second event until software clears it.
        assert!(rig.vtd.complete_wait(&wait).is_empty());
        w32(&mut rig.vtd, ICS, 1);
        assert_eq!(r32(&rig.vtd, ICS), 0);
        assert_eq!(
            rig.vtd.complete_wait(&wait),
            vec![VtdAction::InvalidationEvent(msi)]
        );
    }

    #[test]
    fn queue_wraps_around() {
        let mut rig = Rig::new(VtdConfig::default());
        let nops: Vec<_> = (0..254).map(|_| wait_desc(false, false, 0, 0)).collect();
        rig.submit(&nops);
        assert_eq!(r64(&rig.vtd, IQH), 254 << 4);
        let status = rig.b.alloc();
        let actions = rig.submit(&[
            wait_desc(false, false, 0, 0),
            wait_desc(false, false, 0, 0),
            wait_desc(true, false, 7, status),
        ]);
        assert_eq!(actions.len(), 3);
        assert_eq!(r64(&rig.vtd, IQH), 1 << 4);
        assert_eq!(
            actions[2],
            VtdAction::WaitDone(WaitCompletion {
                status: Some((status, 7)),
                interrupt: false,
                fence: false
            })
        );
    }

    #[test]
    fn bad_descriptor_sets_iqe_stops_head_and_resumes_after_clear() {
        let mut rig = rig_with_devices(VtdConfig::default());
        w32(&mut rig.vtd, FECTL, 0);
        let actions = rig.submit(&[
            iotlb_desc(2, 2, 0, 0, false),
            (0x6, 0),
            wait_desc(false, false, 0, 0),
        ]);
        assert_eq!(actions.len(), 2);
        assert!(matches!(&actions[0], VtdAction::Notify(ev) if ev.len() == 2));
        assert!(matches!(actions[1], VtdAction::FaultEvent(_)));
        assert_ne!(r32(&rig.vtd, FSTS) & FSTS_IQE, 0);
        assert_eq!(
            r64(&rig.vtd, IQH),
            1 << 4,
            "head stays at the bad descriptor"
        );
        // Further tail writes do nothing while IQE is set.
        assert!(rig.submit(&[]).is_empty());
        // Software replaces the bad descriptor, then clears IQE: processing resumes.
        rig.b
            .write_u64(rig.queue + 16, wait_desc(false, false, 0, 0).0);
        let actions = w32(&mut rig.vtd, FSTS, FSTS_IQE);
        assert_eq!(actions.len(), 2);
        assert_eq!(r64(&rig.vtd, IQH), 3 << 4);
    }

    #[test]
    fn tail_beyond_queue_size_and_unreadable_queue_set_iqe() {
        let mut rig = Rig::new(VtdConfig::default());
        w32(&mut rig.vtd, IQT, 256 << 4);
        assert_ne!(r32(&rig.vtd, FSTS) & FSTS_IQE, 0);

        let mut rig = Rig::new(VtdConfig::default());
        w32(&mut rig.vtd, GCMD, GCMD_TE);
        w64(&mut rig.vtd, IQA, 1 << 40);
        w32(&mut rig.vtd, GCMD, GCMD_TE | GCMD_QIE);
        w32(&mut rig.vtd, IQT, 1 << 4);
        assert_ne!(r32(&rig.vtd, FSTS) & FSTS_IQE, 0);
        assert_eq!(r64(&rig.vtd, IQH), 0);
    }

    #[test]
    fn tail_written_before_enable_is_processed_on_enable() {
        let mut rig = Rig::new(VtdConfig::default());
        w32(&mut rig.vtd, GCMD, GCMD_TE);
        rig.b.write_u64(rig.queue, iec_desc(None).0);
        assert!(w32(&mut rig.vtd, IQT, 1 << 4).is_empty(), "queue disabled");
        let actions = w32(&mut rig.vtd, GCMD, GCMD_TE | GCMD_QIE);
        assert_eq!(actions, vec![VtdAction::InterruptCacheInvalidated(None)]);
    }

    #[test]
    fn caching_mode_psi_emits_map_events_for_present_entries() {
        let mut rig = Rig::new(VtdConfig {
            caching_mode: true,
            ..VtdConfig::default()
        });
        rig.attach(0x08, 2, 0);
        rig.map(0x10_0000, 0x50_0000, 1, PTE_RW);
        rig.vtd
            .translate(
                Rig::rid(0x08),
                Iova(0x10_0000),
                1,
                crate::types::Permissions::Read,
            )
            .unwrap();
        // New mappings: two contiguous RW pages, a hole, a read-only page.
        rig.map(0x10_1000, 0x50_1000, 1, PTE_RW);
        rig.map(0x10_2000, 0x50_2000, 1, PTE_RW);
        rig.map(0x10_4000, 0x70_0000, 1, PTE_R);
        rig.map(0x10_8000, 0x80_0000, 1, PTE_RW); // outside the invalidated range
        let actions = rig.submit(&[iotlb_desc(3, 2, 0x10_0000, 3, false)]);
        let rid = Rig::rid(0x08);
        let map = |s, e, gpa, perm| IommuEvent::Map {
            rid,
            range: range(s, e),
            gpa: GuestAddress(gpa),
            perm,
        };
        use crate::types::Permissions::{Read, ReadWrite};
        assert_eq!(
            actions,
            vec![VtdAction::Notify(vec![
                unmap(0x08, range(0x10_0000, 0x10_7fff)),
                map(0x10_0000, 0x10_2fff, 0x50_0000, ReadWrite),
                map(0x10_4000, 0x10_4fff, 0x70_0000, Read),
            ])]
        );
    }

    #[test]
    fn device_context_invalidation_primes_domain_membership_for_map_events() {
        let mut rig = Rig::new(VtdConfig {
            caching_mode: true,
            ..VtdConfig::default()
        });
        // Linux with CM=1: write the context entry, invalidate it (DID 0), flush the domain.
        rig.attach(0x08, 2, 0);
        assert!(rig.submit(&[cc_desc(3, 0, 0x08, 0)]).is_empty());
        assert_eq!(rig.vtd.cached_domain(Rig::rid(0x08)), Some(2));
        // The first map is announced although the device never did DMA.
        rig.map(0x3000, 0x7000, 1, PTE_RW);
        let actions = rig.submit(&[iotlb_desc(3, 2, 0x3000, 0, false)]);
        let map = IommuEvent::Map {
            rid: Rig::rid(0x08),
            range: range(0x3000, 0x3fff),
            gpa: GuestAddress(0x7000),
            perm: crate::types::Permissions::ReadWrite,
        };
        assert_eq!(
            actions,
            vec![VtdAction::Notify(vec![
                unmap(0x08, range(0x3000, 0x3fff)),
                map
            ])]
        );
        // A cleared entry is detached and not re-cached.
        rig.b.write_context(rig.ctx0, 0x08, 0, 0);
        let detach = IommuEvent::DetachEndpoint {
            rid: Rig::rid(0x08),
        };
        assert_eq!(
            rig.submit(&[cc_desc(3, 2, 0x08, 0)]),
            vec![VtdAction::Notify(vec![detach])]
        );
        assert_eq!(rig.vtd.cached_domain(Rig::rid(0x08)), None);
    }

    #[test]
    fn caching_mode_scan_skips_large_holes_quickly() {
        let mut rig = Rig::new(VtdConfig {
            caching_mode: true,
            ..VtdConfig::default()
        });
        rig.attach(0x08, 2, 0);
        rig.map(0x4000_0000, 0x20_0000, 2, PTE_RW);
        rig.vtd
            .translate(
                Rig::rid(0x08),
                Iova(0x4000_0000),
                1,
                crate::types::Permissions::Read,
            )
            .unwrap();
        rig.map(0x3fff_f000, 0x1000, 1, PTE_RW);
        // 2^18 pages = 1 GiB from 0x0: mostly not present, the last page is mapped.
        let actions = rig.submit(&[iotlb_desc(3, 2, 0, 18, false)]);
        let VtdAction::Notify(events) = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(events.len(), 2);
        assert!(matches!(
            events[1],
            IommuEvent::Map {
                gpa: GuestAddress(0x1000),
                ..
            }
        ));
    }

    #[test]
    fn invalidation_drops_cached_translation() {
        let mut rig = rig_with_devices(VtdConfig::default());
        let rid = Rig::rid(0x08);
        let read = crate::types::Permissions::Read;
        // Change the mapping without invalidating: the cached translation is still used.
        rig.map(0x1000, 0xa000, 1, PTE_RW);
        let t = rig.vtd.translate(rid, Iova(0x1000), 1, read).unwrap();
        assert_eq!(t.fragments[0].0, GuestAddress(0x9000));
        rig.submit(&[iotlb_desc(3, 2, 0x1000, 0, false)]);
        let t = rig.vtd.translate(rid, Iova(0x1000), 1, read).unwrap();
        assert_eq!(t.fragments[0].0, GuestAddress(0xa000));
    }
}
