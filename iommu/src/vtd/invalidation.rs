//! Invalidations: parsing 128-bit queued-invalidation descriptors, the address-range math of
//! page-selective (AM) and device-TLB (S bit) invalidations, running the queue between IQH and
//! IQT, and turning each invalidation into the notifier events consumers must see.
//!
//! Events per descriptor:
//! * context-cache: `DetachEndpoint` for every cached source id it selects (the requester may
//!   have moved to another domain, so every translation it had is suspect);
//! * IOTLB page-selective: `Unmap` of exactly `[ADDR, ADDR + 2^AM pages)` for every requester
//!   whose cached context uses the domain; with caching mode also `Map` for the present leaves
//!   in that range (a bounded scan; a prefetch hint only);
//! * IOTLB domain / global: `Unmap` of the whole 64-bit range for the domain's / all requesters;
//! * device-TLB: `DevIotlbUnmap` of the decoded range for the source id.
//!
//! A wait descriptor becomes [`VtdAction::WaitDone`] after a [`VtdAction::Notify`] with every
//! event of the descriptors before it, so the adapter can deliver and only then complete it.

use log::warn;
use vm_memory::{Bytes, GuestAddress};

use super::fault::MsiMessage;
use super::pagewalk::{extent, walk};
use super::regs::{CTL_IM, CTL_IP, FSTS_IQE, ICS_IWC, MAMV};
use super::tables::{Context, TranslationType};
use super::{Vtd, VtdAction, WaitCompletion};
use crate::notifier::IommuEvent;
use crate::types::{IovaRange, Permissions, RequesterId, X86_MSI_END, X86_MSI_START};

/// At most this many page walks per caching-mode range scan.
pub const MAX_MAP_SCAN_STEPS: usize = 4096;
/// At most this many `Map` extents per caching-mode range scan.
pub const MAX_MAP_EVENTS: usize = 1024;

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
    #[error("IQT index {tail} is beyond the queue's {entries} entries; keep IQT below 256 << IQA.QS")]
    TailOutOfRange {
        /// The tail index.
        tail: u64,
        /// Entries in the queue.
        entries: u64,
    },
}

/// Scope of a context-cache invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextScope {
    /// Every context entry.
    Global,
    /// The entries of one domain.
    Domain(u16),
    /// One device (SID with the low FM function bits ignored).
    Device {
        /// Domain id (informational).
        did: u16,
        /// Source id.
        sid: u16,
        /// Function mask (0..=3).
        fm: u8,
    },
}

impl ContextScope {
    fn selects(self, sid: u16, ctx: &Context) -> bool {
        match self {
            ContextScope::Global => true,
            ContextScope::Domain(did) => ctx.did == did,
            ContextScope::Device { sid: s, fm, .. } => {
                let ignore: u16 = [0, 0b100, 0b110, 0b111][usize::from(fm & 3)];
                sid & !ignore == s & !ignore
            }
        }
    }
}

/// Scope of an IOTLB invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotlbScope {
    /// Everything.
    Global,
    /// One domain.
    Domain(u16),
    /// `2^am` pages at `addr` in one domain.
    Page {
        /// Domain id.
        did: u16,
        /// Address (bits 63:12 of the descriptor).
        addr: u64,
        /// Address mask.
        am: u8,
        /// Invalidation hint (only leaves changed); ignored since only leaves are cached.
        ih: bool,
    },
}

/// A decoded descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descriptor {
    /// Type 1.
    ContextCache(ContextScope),
    /// Type 2.
    Iotlb(IotlbScope),
    /// Type 3.
    DeviceTlb {
        /// Source id of the device.
        sid: u16,
        /// The range to invalidate, decoded from ADDR and S.
        range: IovaRange,
        /// Max invalidations pending (0 = 32); informational.
        max_pending: u8,
    },
    /// Type 4: `None` = global, else (index, mask).
    InterruptEntryCache(Option<(u16, u8)>),
    /// Type 5.
    Wait(WaitCompletion),
}

/// Unit features the parser needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorCaps {
    /// ECAP.DT.
    pub device_tlb: bool,
}

/// `[addr, addr + 2^am pages)` with `addr` aligned down to that size; the full 64-bit range
/// when the size reaches 2^64.
pub fn psi_range(addr: u64, am: u8) -> IovaRange {
    aligned_range(addr, 12 + u32::from(am))
}

/// The device-TLB invalidation range: one page for S=0; for S=1, with k one bits from ADDR[12]
/// upwards, 2^(k+1) pages aligned to that size (the full range when that reaches 2^64).
pub fn device_tlb_range(addr: u64, size_bit: bool) -> IovaRange {
    if !size_bit {
        return aligned_range(addr, 12);
    }
    let ones = (addr >> 12).trailing_ones();
    aligned_range(addr, 12 + ones + 1)
}

fn aligned_range(addr: u64, shift: u32) -> IovaRange {
    if shift >= 64 {
        return IovaRange::FULL;
    }
    let mask = (1u64 << shift) - 1;
    IovaRange::new(addr & !mask, addr | mask).unwrap_or(IovaRange::FULL)
}

/// Decodes and validates one legacy descriptor.
pub fn parse_descriptor(
    qw0: u64,
    qw1: u64,
    caps: DescriptorCaps,
) -> Result<Descriptor, InvalidationError> {
    let desc_type = (qw0 & 0xf) as u8 | (((qw0 >> 9) & 7) as u8) << 4;
    let (rsv0, rsv1): (u64, u64) = match desc_type {
        1 => (0xfffc_0000_0000_f1c0, u64::MAX),
        2 => (0xffff_ffff_0000_f100, 0xf80),
        3 => (0x000f_0000_ffe0_01f0, 0xffe),
        4 => (0xffff_0000_07ff_f1e0, u64::MAX),
        5 => (0x0000_0000_ffff_f100, 0x3),
        _ => return Err(InvalidationError::UnknownType { desc_type }),
    };
    if qw0 & rsv0 != 0 || qw1 & rsv1 != 0 {
        return Err(InvalidationError::Reserved {
            desc_type,
            qw0,
            qw1,
        });
    }
    let granularity = ((qw0 >> 4) & 3) as u8;
    let did = (qw0 >> 16) as u16;
    match desc_type {
        1 => context_scope(granularity, did, (qw0 >> 32) as u16, ((qw0 >> 48) & 3) as u8)
            .map(Descriptor::ContextCache),
        2 => iotlb_scope(granularity, did, qw1).map(Descriptor::Iotlb),
        3 if !caps.device_tlb => Err(InvalidationError::DeviceTlbUnsupported),
        3 => Ok(Descriptor::DeviceTlb {
            sid: (qw0 >> 32) as u16,
            range: device_tlb_range(qw1 & !0xfff, qw1 & 1 != 0),
            max_pending: ((qw0 >> 16) & 0x1f) as u8,
        }),
        4 => Ok(Descriptor::InterruptEntryCache(
            (qw0 & 0x10 != 0).then_some(((qw0 >> 32) as u16, ((qw0 >> 27) & 0x1f) as u8)),
        )),
        _ => Ok(Descriptor::Wait(WaitCompletion {
            status: (qw0 & 0x20 != 0).then_some((qw1 & !3, (qw0 >> 32) as u32)),
            interrupt: qw0 & 0x10 != 0,
            fence: qw0 & 0x40 != 0,
        })),
    }
}

/// The scope of a context-cache request with granularity `g` (CCMD.CIRG or descriptor G).
pub fn context_scope(g: u8, did: u16, sid: u16, fm: u8) -> Result<ContextScope, InvalidationError> {
    match g {
        1 => Ok(ContextScope::Global),
        2 => Ok(ContextScope::Domain(did)),
        3 => Ok(ContextScope::Device { did, sid, fm }),
        _ => Err(InvalidationError::Granularity { desc_type: 1 }),
    }
}

/// The scope of an IOTLB request with granularity `g`; `addr_word` is the descriptor's high
/// qword or the IVA register (ADDR 63:12, IH 6, AM 5:0).
pub fn iotlb_scope(g: u8, did: u16, addr_word: u64) -> Result<IotlbScope, InvalidationError> {
    match g {
        1 => Ok(IotlbScope::Global),
        2 => Ok(IotlbScope::Domain(did)),
        3 => {
            let am = (addr_word & 0x3f) as u8;
            if am > MAMV {
                return Err(InvalidationError::MaskTooLarge { am, mamv: MAMV });
            }
            Ok(IotlbScope::Page {
                did,
                addr: addr_word & !0xfff,
                am,
                ih: addr_word & 0x40 != 0,
            })
        }
        _ => Err(InvalidationError::Granularity { desc_type: 2 }),
    }
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

    /// Context-cache invalidation: drops the selected cached contexts and detaches them.
    pub(crate) fn invalidate_context(&mut self, scope: ContextScope) -> Vec<IommuEvent> {
        let removed = self.caches().context.remove_where(|s, c| scope.selects(s, c));
        removed
            .into_iter()
            .map(|sid| IommuEvent::DetachEndpoint { rid: self.rid(sid) })
            .collect()
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
        let mut events = Vec::with_capacity(extents.len() * sids.len());
        for &sid in sids {
            for &(iova, gpa, perm) in &extents {
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
                    if let Some(c) = clipped.filter(|c| !c.intersects(msi) && leaf.perm != Permissions::No) {
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
            self.queue_error(&mut out, InvalidationError::TailOutOfRange { tail, entries });
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
                Ok(desc) => self.run_descriptor(desc, &mut batch, &mut out),
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

    fn run_descriptor(&mut self, desc: Descriptor, batch: &mut Vec<IommuEvent>, out: &mut Vec<VtdAction>) {
        match desc {
            Descriptor::ContextCache(scope) => batch.extend(self.invalidate_context(scope)),
            Descriptor::Iotlb(scope) => batch.extend(self.invalidate_iotlb(scope)),
            Descriptor::DeviceTlb { sid, range, .. } => batch.push(IommuEvent::DevIotlbUnmap {
                rid: self.rid(sid),
                range,
            }),
            Descriptor::InterruptEntryCache(selector) => {
                flush(batch, out);
                out.push(VtdAction::InterruptCacheInvalidated(selector));
            }
            Descriptor::Wait(wait) => {
                flush(batch, out);
                out.push(VtdAction::WaitDone(wait));
            }
        }
    }

    fn queue_error(&mut self, out: &mut Vec<VtdAction>, error: InvalidationError) {
        warn!("VT-d invalidation queue error at head {}: {error}", self.qi.head);
        self.regs.fsts |= FSTS_IQE;
        out.extend(self.raise_fault_event());
    }

    /// Completes a wait descriptor: writes its status data, and for IF sets ICS.IWC and signals
    /// the invalidation event. Call only after every earlier [`VtdAction::Notify`] returned.
    pub fn complete_wait(&mut self, wait: &WaitCompletion) -> Vec<VtdAction> {
        if let Some((addr, data)) = wait.status {
            if self.mem.write_obj(data.to_le(), GuestAddress(addr)).is_err() {
                warn!("VT-d wait descriptor status write to {addr:#x} failed: not guest RAM");
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

fn flush(batch: &mut Vec<IommuEvent>, out: &mut Vec<VtdAction>) {
    if !batch.is_empty() {
        out.push(VtdAction::Notify(std::mem::take(batch)));
    }
}
