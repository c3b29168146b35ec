//! An Intel VT-d remapping unit (legacy mode) as a pure model: the MMIO register file, root and
//! context tables, the second-level page walk, an internal IOTLB and context cache, register-
//! based and queued invalidation, primary fault recording and the ACPI DMAR table.
//!
//! The model has no I/O of its own. Register writes return [`VtdAction`]s the device adapter
//! carries out in order:
//!
//! * [`VtdAction::Notify`]: deliver the events through the [`crate::NotifierSet`] and wait until
//!   every consumer returned (vhost-user: INVALIDATE acked);
//! * [`VtdAction::WaitDone`]: an invalidation wait descriptor was reached; call
//!   [`Vtd::complete_wait`] (status write, ICS.IWC, completion interrupt) only after every
//!   earlier `Notify` returned. This is what makes a guest's wait mean "no back end can still use
//!   what I invalidated";
//! * [`VtdAction::FaultEvent`] / [`VtdAction::InvalidationEvent`]: send the MSI;
//! * [`VtdAction::InterruptCacheInvalidated`] / [`VtdAction::InterruptRemappingChanged`]:
//!   re-translate cached interrupt routes ([`Vtd::remap_msi`] translates one message; see
//!   [`intremap`]).
//!
//! The adapter must run the actions of one write before processing the next invalidation
//! request (one invalidation lock), but should not hold the lock that guards `translate` while
//! notifying, since a consumer's back end may need a translation to make progress.
//!
//! Translation ([`DmaTranslate`]): TE off → identity; the x86 interrupt window
//! `0xFEE00000-0xFEEFFFFF` → identity (interrupt messages are not DMA); else root entry →
//! context entry → pass-through (identity with extents up to [`VtdConfig::identity_limit`]) or a
//! 3/4-level walk. Extents cover the leaf plus its contiguous neighbours in the same table.
//! [`Vtd::translate_detailed`] also returns the VT-d fault, and [`Vtd::translate_and_record`]
//! records it in the fault registers.

use std::sync::{Mutex, MutexGuard};

use vm_memory::{Bytes, GuestAddress};

use crate::notifier::{IommuEvent, NotifierFlags};
use crate::ratelimit::RateLimit;
use crate::translate::{
    identity, identity_with_extent, request_range, DmaTranslate, Extent, TranslateError,
    Translation,
};
use crate::types::{intersect, Access, Iova, IovaRange, Permissions, RequesterId};
use crate::types::{X86_MSI_END, X86_MSI_START};

mod counts;
pub mod descriptor;
pub mod dmar;
pub mod fault;
pub mod intremap;
pub mod invalidation;
pub mod iotlb;
mod mmio;
pub mod pagewalk;
pub mod regs;
pub mod tables;
#[cfg(test)]
mod testutil;

pub use counts::InvalidationCounts;
pub use fault::{FaultInfo, FaultReason, MsiMessage};
use invalidation::QueueState;
use iotlb::{CachedTranslation, ContextCache, Iotlb};
use pagewalk::{WalkError, WalkParams};
use regs::{RegFile, GCMD_TE};
use tables::{lookup_context, Context, ContextFault, TableCaps, TranslationType};

/// At most this many leaf lookups per translation request (a request spanning more
/// discontiguous pages fails with [`TranslateError::BadRange`]).
pub const MAX_TRANSLATE_STEPS: usize = 4096;

/// Options of the emulated unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtdConfig {
    /// Guest address width: 39 (3-level tables) or 48 (3- and 4-level).
    pub address_width: u8,
    /// CAP.CM: the guest invalidates after every change, including new mappings.
    pub caching_mode: bool,
    /// ECAP.DT: device-TLB (ATS) invalidations; enables `DEVIOTLB_UNMAP` notifiers.
    pub device_iotlb: bool,
    /// ECAP.IR (+EIM): interrupt-remapping registers.
    pub interrupt_remapping: bool,
    /// ECAP.PT: pass-through context entries.
    pub pass_through: bool,
    /// CAP.SLLPS: 2 MiB and 1 GiB leaves.
    pub large_pages: bool,
    /// Number of fault-recording registers (1..=64).
    pub fault_records: usize,
    /// PCI segment the unit covers.
    pub segment: u16,
    /// Last address identity extents reach (TE off, pass-through), e.g. the end of RAM.
    pub identity_limit: u64,
    /// IOTLB capacity in entries (0 disables the cache).
    pub iotlb_capacity: usize,
}

impl Default for VtdConfig {
    fn default() -> Self {
        Self {
            address_width: 48,
            caching_mode: false,
            device_iotlb: false,
            interrupt_remapping: false,
            pass_through: true,
            large_pages: true,
            fault_records: 4,
            segment: 0,
            identity_limit: (1 << 48) - 1,
            iotlb_capacity: iotlb::DEFAULT_IOTLB_CAPACITY,
        }
    }
}

/// Errors building a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VtdError {
    /// Unsupported address width.
    #[error("VT-d address width {0} is not supported; use 39 or 48")]
    AddressWidth(u8),
    /// Fault record count out of range.
    #[error("VT-d fault record count {0} is out of range; use 1 to 64")]
    FaultRecords(usize),
}

/// A reached invalidation wait descriptor, to complete with [`Vtd::complete_wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitCompletion {
    /// SW: write the 32-bit data to the (dword-aligned) address.
    pub status: Option<(u64, u32)>,
    /// IF: set ICS.IWC and signal the invalidation completion event.
    pub interrupt: bool,
    /// FN: later descriptors wait for this one (sequential processing satisfies it).
    pub fence: bool,
}

/// A side effect the device adapter must carry out, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VtdAction {
    /// Deliver synchronously to the notifier consumers before any later action.
    Notify(Vec<IommuEvent>),
    /// Complete this wait with [`Vtd::complete_wait`] once every earlier `Notify` returned.
    WaitDone(WaitCompletion),
    /// Send the fault-event MSI.
    FaultEvent(MsiMessage),
    /// Send the invalidation-completion MSI.
    InvalidationEvent(MsiMessage),
    /// The interrupt-entry cache was invalidated: `None` = all, else (index, mask: 2^mask
    /// entries from index). Re-translate the affected interrupt routes.
    InterruptCacheInvalidated(Option<(u16, u8)>),
    /// IRTA was latched or IRE/CFI changed: re-translate every interrupt route.
    InterruptRemappingChanged,
}

/// Where a [`Vtd::translate_detailed`] failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct TranslationFailure {
    /// The generic error devices see.
    pub error: TranslateError,
    /// The VT-d fault to record, if the failure is one the hardware records.
    pub fault: Option<FaultInfo>,
}

impl From<TranslateError> for TranslationFailure {
    fn from(error: TranslateError) -> Self {
        Self { error, fault: None }
    }
}

/// The interrupt remapping table as latched by SIRTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptRemapping {
    /// Table base address.
    pub base: u64,
    /// Number of entries (2^(S+1)).
    pub entries: u32,
    /// Extended interrupt mode (x2APIC).
    pub eime: bool,
    /// IRES: remapping enabled.
    pub enabled: bool,
    /// CFIS: compatibility-format interrupts pass.
    pub compat_allowed: bool,
}

#[derive(Debug)]
struct Caches {
    context: ContextCache,
    iotlb: Iotlb,
}

/// The emulated VT-d unit over guest memory `M`.
#[derive(Debug)]
pub struct Vtd<M> {
    config: VtdConfig,
    mem: M,
    regs: RegFile,
    faults: fault::FaultRecords,
    qi: QueueState,
    root_table: Option<u64>,
    irt: Option<u64>,
    caches: Mutex<Caches>,
    /// Invalidation requests carried out ([`Vtd::invalidation_counts`]).
    counts: InvalidationCounts,
    /// Budget of the log lines the guest can trigger (bad registers, queue errors, ...).
    log: Mutex<RateLimit>,
}

/// Most guest-triggered VT-d log lines per second (per unit); the rest are counted.
pub const MAX_LOG_LINES_PER_SEC: u32 = 10;

fn msi_window() -> IovaRange {
    IovaRange::new(X86_MSI_START, X86_MSI_END).unwrap_or(IovaRange::FULL)
}

impl<M: Bytes<GuestAddress> + Send + Sync> Vtd<M> {
    /// A unit in its reset state.
    pub fn new(config: VtdConfig, mem: M) -> Result<Self, VtdError> {
        if !matches!(config.address_width, 39 | 48) {
            return Err(VtdError::AddressWidth(config.address_width));
        }
        if !(1..=regs::MAX_FAULT_RECORDS).contains(&config.fault_records) {
            return Err(VtdError::FaultRecords(config.fault_records));
        }
        Ok(Self {
            regs: RegFile::new(&config),
            faults: fault::FaultRecords::new(config.fault_records),
            qi: QueueState::default(),
            root_table: None,
            irt: None,
            caches: Mutex::new(Caches {
                context: ContextCache::default(),
                iotlb: Iotlb::new(config.iotlb_capacity),
            }),
            counts: InvalidationCounts::default(),
            log: Mutex::new(RateLimit::per_second(MAX_LOG_LINES_PER_SEC)),
            config,
            mem,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VtdConfig {
        &self.config
    }

    /// Resets every register and cache; consumers must drop everything.
    pub fn reset(&mut self) -> Vec<VtdAction> {
        self.regs = RegFile::new(&self.config);
        self.faults.reset();
        self.qi = QueueState::default();
        self.root_table = None;
        self.irt = None;
        self.flush_caches();
        vec![VtdAction::Notify(vec![IommuEvent::Reset])]
    }

    /// Whether DMA remapping is on (GSTS.TES).
    pub fn translation_enabled(&self) -> bool {
        self.regs.gsts & GCMD_TE != 0
    }

    /// Whether the unit offers device-TLB (ATS) invalidations (ECAP.DT).
    pub fn supports_device_iotlb(&self) -> bool {
        self.config.device_iotlb
    }

    /// The notifier flags this unit can honour: `UNMAP`, `MAP` with caching mode,
    /// `DEVIOTLB_UNMAP` with device-TLB support. Build the `NotifierSet` with these so
    /// `register_with_fallback` falls back to `UNMAP` when device-TLB is off.
    pub fn notifier_flags(&self) -> NotifierFlags {
        let mut flags = NotifierFlags::UNMAP;
        if self.config.caching_mode {
            flags |= NotifierFlags::MAP;
        }
        if self.config.device_iotlb {
            flags |= NotifierFlags::DEVIOTLB_UNMAP;
        }
        flags
    }

    /// The interrupt remapping state, once SIRTP latched a table.
    pub fn interrupt_remapping(&self) -> Option<InterruptRemapping> {
        let irta = self.irt?;
        Some(InterruptRemapping {
            base: irta & regs::page_addr_mask(self.config.address_width),
            entries: 2u32 << (irta & 0xf),
            eime: irta & (1 << 11) != 0,
            enabled: self.regs.gsts & regs::GCMD_IRE != 0,
            compat_allowed: self.regs.gsts & regs::GCMD_CFI != 0,
        })
    }

    /// The domain id of `rid`'s cached context entry, if it has been used since the last
    /// context-cache invalidation.
    pub fn cached_domain(&self, rid: RequesterId) -> Option<u16> {
        if rid.segment() != self.config.segment {
            return None;
        }
        self.caches().context.get(rid.bdf()).map(|c| c.did)
    }

    /// Invalidation requests carried out so far: queued descriptors by type, queue errors,
    /// register-based invalidations.
    pub fn invalidation_counts(&self) -> InvalidationCounts {
        self.counts
    }

    /// The budget of guest-triggered log lines, for `warn_limited!` and friends.
    pub(crate) fn log_budget(&self) -> MutexGuard<'_, RateLimit> {
        crate::sync::lock(&self.log)
    }

    fn caches(&self) -> MutexGuard<'_, Caches> {
        // The caches hold no invariants a panicking holder could break.
        crate::sync::lock(&self.caches)
    }

    fn flush_caches(&self) {
        let mut caches = self.caches();
        caches.context.clear();
        caches.iotlb.invalidate_all();
    }

    fn table_caps(&self) -> TableCaps {
        TableCaps {
            haw: self.config.address_width,
            sagaw: regs::sagaw(self.config.address_width),
            device_tlb: self.config.device_iotlb,
            pass_through: self.config.pass_through,
        }
    }

    fn walk_params(&self, ctx: &Context) -> WalkParams {
        WalkParams {
            root: ctx.slptptr,
            levels: ctx.levels,
            haw: self.config.address_width,
            large_2m: self.config.large_pages,
            large_1g: self.config.large_pages,
            tm_allowed: self.config.device_iotlb,
        }
    }

    fn context_for(&self, sid: u16) -> Result<Context, ContextFault> {
        if let Some(ctx) = self.caches().context.get(sid) {
            return Ok(ctx);
        }
        let root = self.root_table.ok_or(FaultReason::RootTableInvalid)?;
        let ctx = lookup_context(&self.mem, root, sid, &self.table_caps())?;
        self.caches().context.insert(sid, ctx);
        Ok(ctx)
    }

    /// The cached or freshly walked translation around `iova`, never crossing into the
    /// interrupt window.
    fn lookup(&self, ctx: &Context, iova: u64) -> Result<CachedTranslation, WalkError> {
        if let Some(t) = self.caches().iotlb.lookup(ctx.did, iova) {
            return Ok(t);
        }
        let p = self.walk_params(ctx);
        let leaf = pagewalk::walk(&self.mem, &p, iova)?;
        let (range, gpa) = pagewalk::extent(&self.mem, &p, &leaf);
        let t = clip_to_side_of_msi(
            CachedTranslation {
                range,
                gpa,
                perm: leaf.perm,
            },
            iova,
        );
        self.caches().iotlb.insert(ctx.did, t);
        Ok(t)
    }

    /// Translates like [`DmaTranslate::translate`] and also reports the VT-d fault.
    pub fn translate_detailed(
        &self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Access,
    ) -> Result<Translation, TranslationFailure> {
        let req = request_range(iova, len)?;
        if rid.segment() != self.config.segment {
            return Err(TranslateError::UnknownEndpoint { rid }.into());
        }
        if !self.translation_enabled() {
            return Ok(identity(req, self.config.identity_limit));
        }
        let msi = msi_window();
        if msi.contains(req.start()) {
            if msi.contains_range(req) {
                return Ok(identity_with_extent(req, msi));
            }
            let iova = Iova(X86_MSI_END + 1);
            return Err(TranslateError::Unmapped { iova }.into());
        }
        let ctx = self
            .context_for(rid.bdf())
            .map_err(|f| context_failure(rid, iova, access, f))?;
        match ctx.tt {
            TranslationType::PassThrough => Ok(identity(req, self.config.identity_limit)),
            TranslationType::MultiLevel | TranslationType::DeviceTlb => {
                self.translate_walk(&ctx, rid, req, access)
            }
        }
    }

    fn translate_walk(
        &self,
        ctx: &Context,
        rid: RequesterId,
        req: IovaRange,
        access: Access,
    ) -> Result<Translation, TranslationFailure> {
        let mut fragments: Vec<(GuestAddress, u64)> = Vec::new();
        let mut perm = Permissions::ReadWrite;
        let mut first: Option<Extent> = None;
        let mut cur = req.start();
        for _ in 0..MAX_TRANSLATE_STEPS {
            if msi_window().contains(cur) {
                return Err(TranslateError::Unmapped { iova: Iova(cur) }.into());
            }
            let t = self
                .lookup(ctx, cur)
                .map_err(|e| walk_failure(rid, cur, access, ctx.fpd, e))?;
            if !t.perm.allow(access) {
                return Err(denied(rid, cur, access, t.perm, ctx.fpd));
            }
            perm = intersect(perm, t.perm);
            let end = t.range.end().min(req.end());
            let gpa = t.gpa + (cur - t.range.start());
            push_fragment(&mut fragments, gpa, end - cur + 1);
            first.get_or_insert(Extent {
                iova: t.range,
                gpa: GuestAddress(t.gpa),
                perm: t.perm,
            });
            if end == req.end() {
                let extent = first.unwrap_or(Extent {
                    iova: t.range,
                    gpa: GuestAddress(t.gpa),
                    perm: t.perm,
                });
                return Ok(Translation {
                    fragments,
                    perm,
                    extent,
                });
            }
            cur = end + 1;
        }
        let len = req.size_u64().unwrap_or(u64::MAX);
        Err(TranslateError::BadRange {
            iova: Iova(req.start()),
            len,
        }
        .into())
    }

    /// Translates and, on a recordable fault, records it (unless FPD). Returns the result and
    /// the actions (a fault event) to carry out.
    pub fn translate_and_record(
        &mut self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Access,
    ) -> (Result<Translation, TranslateError>, Vec<VtdAction>) {
        match self.translate_detailed(rid, iova, len, access) {
            Ok(t) => (Ok(t), Vec::new()),
            Err(TranslationFailure { error, fault }) => {
                let actions = fault.map(|f| self.record_fault(&f)).unwrap_or_default();
                (Err(error), actions)
            }
        }
    }
}

impl<M: Bytes<GuestAddress> + Send + Sync> DmaTranslate for Vtd<M> {
    fn translate(
        &self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        self.translate_detailed(rid, iova, len, access)
            .map_err(|f| f.error)
    }
}

fn push_fragment(fragments: &mut Vec<(GuestAddress, u64)>, gpa: u64, len: u64) {
    if let Some(last) = fragments.last_mut() {
        if last.0 .0.checked_add(last.1) == Some(gpa) {
            last.1 = last.1.saturating_add(len);
            return;
        }
    }
    fragments.push((GuestAddress(gpa), len));
}

/// Keeps only the part of `t` on `iova`'s side of the interrupt window.
fn clip_to_side_of_msi(t: CachedTranslation, iova: u64) -> CachedTranslation {
    let msi = msi_window();
    if !t.range.intersects(msi) || msi.contains(iova) {
        return t;
    }
    let range = if iova < X86_MSI_START {
        IovaRange::new(t.range.start(), t.range.end().min(X86_MSI_START - 1))
    } else {
        IovaRange::new(t.range.start().max(X86_MSI_END + 1), t.range.end())
    };
    match range {
        Ok(range) => CachedTranslation {
            gpa: t.gpa + (range.start() - t.range.start()),
            range,
            perm: t.perm,
        },
        Err(_) => t,
    }
}

fn fault_info(
    rid: RequesterId,
    addr: u64,
    access: Access,
    reason: FaultReason,
    fpd: bool,
) -> FaultInfo {
    FaultInfo {
        sid: rid.bdf(),
        addr,
        reason,
        is_write: access.has_write(),
        fpd,
    }
}

fn context_failure(
    rid: RequesterId,
    iova: Iova,
    access: Access,
    f: ContextFault,
) -> TranslationFailure {
    let error = match f.reason {
        FaultReason::RootNotPresent | FaultReason::ContextNotPresent => {
            TranslateError::NotAttached { rid }
        }
        _ => TranslateError::Unmapped { iova },
    };
    TranslationFailure {
        error,
        fault: Some(fault_info(rid, iova.0, access, f.reason, f.fpd)),
    }
}

fn walk_failure(
    rid: RequesterId,
    iova: u64,
    access: Access,
    fpd: bool,
    e: WalkError,
) -> TranslationFailure {
    TranslationFailure {
        error: TranslateError::Unmapped { iova: Iova(iova) },
        fault: Some(fault_info(
            rid,
            iova,
            access,
            e.reason(access.has_write()),
            fpd,
        )),
    }
}

fn denied(
    rid: RequesterId,
    iova: u64,
    access: Access,
    allowed: Permissions,
    fpd: bool,
) -> TranslationFailure {
    let reason = if access.has_write() && !allowed.has_write() {
        FaultReason::WriteDenied
    } else {
        FaultReason::ReadDenied
    };
    TranslationFailure {
        error: TranslateError::PermissionDenied {
            iova: Iova(iova),
            requested: access,
            allowed,
        },
        fault: Some(fault_info(rid, iova, access, reason, fpd)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::notifier::{IommuNotifier, NotifierSet, NotifyError, UnmapKind};
    use crate::vtd::regs::{FRCD_BASE, FSTS, FSTS_PPF};
    use crate::vtd::testutil::*;

    const R: Permissions = Permissions::Read;
    const W: Permissions = Permissions::Write;

    fn range(start: u64, end: u64) -> IovaRange {
        IovaRange::new(start, end).unwrap()
    }

    #[test]
    fn config_validation() {
        let mem = test_mem();
        let bad_aw = VtdConfig {
            address_width: 57,
            ..VtdConfig::default()
        };
        assert_eq!(
            Vtd::new(bad_aw, mem.clone()).unwrap_err(),
            VtdError::AddressWidth(57)
        );
        let bad_fr = VtdConfig {
            fault_records: 0,
            ..VtdConfig::default()
        };
        assert_eq!(
            Vtd::new(bad_fr, mem).unwrap_err(),
            VtdError::FaultRecords(0)
        );
    }

    #[test]
    fn translation_disabled_is_identity_bounded_by_limit() {
        let (vtd, _) = vtd_with(VtdConfig {
            identity_limit: 0xfff_ffff,
            ..VtdConfig::default()
        });
        let t = vtd.translate(Rig::rid(8), Iova(0x1234), 0x10, W).unwrap();
        assert_eq!(t.fragments, vec![(GuestAddress(0x1234), 0x10)]);
        assert_eq!(t.extent.iova, range(0, 0xfff_ffff));
    }

    #[test]
    fn walk_translation_with_extent_and_fragments() {
        let mut rig = Rig::new(VtdConfig::default());
        rig.attach(0x08, 2, 0);
        rig.map(0x1000, 0x9000, 1, PTE_RW);
        rig.map(0x2000, 0xa000, 1, PTE_RW);
        rig.map(0x3000, 0x20000, 1, PTE_RW);
        let t = rig
            .vtd
            .translate(Rig::rid(0x08), Iova(0x1800), 0x2000, W)
            .unwrap();
        assert_eq!(
            t.fragments,
            vec![
                (GuestAddress(0x9800), 0x1800),
                (GuestAddress(0x20000), 0x800)
            ]
        );
        assert_eq!(t.perm, Permissions::ReadWrite);
        assert_eq!(t.extent.iova, range(0x1000, 0x2fff));
        assert_eq!(t.extent.gpa, GuestAddress(0x9000));
    }

    #[test]
    fn large_page_translation_through_context() {
        let mut rig = Rig::new(VtdConfig {
            address_width: 39,
            ..VtdConfig::default()
        });
        rig.attach(0x08, 2, 0);
        rig.map(0x4000_0000, 0x1_0000_0000, 3, PTE_RW);
        rig.map(0x20_0000, 0x80_0000, 2, PTE_R);
        let t = rig
            .vtd
            .translate(Rig::rid(0x08), Iova(0x4000_1234), 4, R)
            .unwrap();
        assert_eq!(t.fragments[0].0, GuestAddress(0x1_0000_1234));
        assert_eq!(t.extent.iova, range(0x4000_0000, 0x7fff_ffff));
        let t = rig
            .vtd
            .translate(Rig::rid(0x08), Iova(0x20_0010), 4, R)
            .unwrap();
        assert_eq!((t.fragments[0].0, t.perm), (GuestAddress(0x80_0010), R));
    }

    #[test]
    fn write_to_read_only_page_faults_with_reason_5_and_is_recorded() {
        let mut rig = Rig::new(VtdConfig::default());
        rig.attach(0x08, 2, 0);
        rig.map(0x1000, 0x9000, 1, PTE_R);
        let (res, _) = rig
            .vtd
            .translate_and_record(Rig::rid(0x08), Iova(0x1010), 4, W);
        assert_eq!(
            res,
            Err(TranslateError::PermissionDenied {
                iova: Iova(0x1010),
                requested: W,
                allowed: R
            })
        );
        assert_ne!(r32(&rig.vtd, FSTS) & FSTS_PPF, 0);
        let hi = r64(&rig.vtd, FRCD_BASE + 8);
        assert_eq!(
            (hi & 0xffff, (hi >> 32) & 0xff, (hi >> 62) & 1),
            (0x08, 0x5, 0)
        );
        assert_eq!(r64(&rig.vtd, FRCD_BASE), 0x1000);
    }

    #[test]
    fn not_present_read_faults_with_reason_6() {
        let mut rig = Rig::new(VtdConfig::default());
        rig.attach(0x08, 2, 0);
        let f = rig
            .vtd
            .translate_detailed(Rig::rid(0x08), Iova(0x5000), 1, R)
            .unwrap_err();
        assert_eq!(f.error, TranslateError::Unmapped { iova: Iova(0x5000) });
        assert_eq!(f.fault.unwrap().reason, FaultReason::ReadDenied);
    }

    #[test]
    fn missing_root_or_context_is_not_attached() {
        let mut rig = Rig::new(VtdConfig::default());
        let f = rig
            .vtd
            .translate_detailed(Rig::rid(0x08), Iova(0), 1, R)
            .unwrap_err();
        assert_eq!(
            f.error,
            TranslateError::NotAttached {
                rid: Rig::rid(0x08)
            }
        );
        assert_eq!(f.fault.unwrap().reason, FaultReason::ContextNotPresent);
        let other_bus = RequesterId::from_bdf(0, 0x0300);
        let f = rig
            .vtd
            .translate_detailed(other_bus, Iova(0), 1, R)
            .unwrap_err();
        assert_eq!(f.fault.unwrap().reason, FaultReason::RootNotPresent);
        let (res, actions) = rig.vtd.translate_and_record(other_bus, Iova(0), 1, R);
        assert!(res.is_err() && actions.is_empty(), "FECTL masked: no MSI");
        assert_eq!((r64(&rig.vtd, FRCD_BASE + 8) >> 32) & 0xff, 0x1);
        // Another segment is not covered by this unit at all.
        let seg1 = RequesterId::from_bdf(1, 0x08);
        assert_eq!(
            rig.vtd.translate(seg1, Iova(0), 1, R),
            Err(TranslateError::UnknownEndpoint { rid: seg1 })
        );
    }

    #[test]
    fn address_beyond_width_faults_with_reason_4() {
        let mut rig = Rig::new(VtdConfig::default());
        rig.attach(0x08, 2, 0);
        let f = rig
            .vtd
            .translate_detailed(Rig::rid(0x08), Iova(1 << 48), 1, R)
            .unwrap_err();
        assert_eq!(f.fault.unwrap().reason, FaultReason::AddressBeyondWidth);
    }

    #[test]
    fn fpd_context_suppresses_fault_records() {
        let mut rig = Rig::new(VtdConfig::default());
        rig.attach(0x08, 2, 0);
        let lo = rig.b.read_u64(rig.ctx0 + 0x80);
        rig.b.write_u64(rig.ctx0 + 0x80, lo | 2);
        let (res, _) = rig
            .vtd
            .translate_and_record(Rig::rid(0x08), Iova(0x5000), 1, R);
        assert!(res.is_err());
        assert_eq!(r32(&rig.vtd, FSTS), 0);
    }

    #[test]
    fn pass_through_context_is_identity_with_large_extent() {
        let mut rig = Rig::new(VtdConfig {
            identity_limit: 0x3fff_ffff,
            ..VtdConfig::default()
        });
        rig.attach(0x08, 1, 2);
        let t = rig
            .vtd
            .translate(Rig::rid(0x08), Iova(0x1234_5000), 0x1000, W)
            .unwrap();
        assert_eq!(t.fragments, vec![(GuestAddress(0x1234_5000), 0x1000)]);
        assert_eq!(t.extent.iova, range(0, 0x3fff_ffff));
        // Without ECAP.PT the same entry is an invalid context.
        let mut no_pt = Rig::new(VtdConfig {
            pass_through: false,
            ..VtdConfig::default()
        });
        no_pt.attach(0x08, 1, 2);
        let f = no_pt
            .vtd
            .translate_detailed(Rig::rid(0x08), Iova(0), 1, R)
            .unwrap_err();
        assert_eq!(f.fault.unwrap().reason, FaultReason::InvalidContext);
    }

    #[test]
    fn interrupt_window_is_identity_and_never_walked() {
        let mut rig = Rig::new(VtdConfig::default());
        rig.attach(0x08, 2, 0);
        let t = rig
            .vtd
            .translate(Rig::rid(0x08), Iova(0xfee0_1000), 4, W)
            .unwrap();
        assert_eq!(t.fragments, vec![(GuestAddress(0xfee0_1000), 4)]);
        assert_eq!(t.extent.iova, range(0xfee0_0000, 0xfeef_ffff));
        // A 1 GiB page around the window: the extent stops short of it.
        rig.map(0xc000_0000, 0xc000_0000, 3, PTE_RW);
        let t = rig
            .vtd
            .translate(Rig::rid(0x08), Iova(0xc000_0000), 4, R)
            .unwrap();
        assert_eq!(t.extent.iova, range(0xc000_0000, 0xfedf_ffff));
        let t = rig
            .vtd
            .translate(Rig::rid(0x08), Iova(0xff00_0000), 4, R)
            .unwrap();
        assert_eq!(t.extent.iova, range(0xfef0_0000, 0xffff_ffff));
        assert_eq!(t.extent.gpa, GuestAddress(0xfef0_0000));
        let err = rig
            .vtd
            .translate(Rig::rid(0x08), Iova(0xfedf_f000), 0x2000, R)
            .unwrap_err();
        assert_eq!(
            err,
            TranslateError::Unmapped {
                iova: Iova(0xfee0_0000)
            }
        );
    }

    #[test]
    fn unmapped_page_after_psi_fails_translation_and_notifies() {
        let mut rig = Rig::new(VtdConfig::default());
        rig.attach(0x08, 2, 0);
        rig.map(0x1000, 0x9000, 1, PTE_RW);
        assert!(rig
            .vtd
            .translate(Rig::rid(0x08), Iova(0x1000), 1, R)
            .is_ok());
        let (pt, levels) = (rig.pt, rig.levels);
        rig.b.unmap_4k(pt, levels, 0x1000);
        let actions = rig.submit(&[iotlb_desc(3, 2, 0x1000, 0, true)]);
        let unmap = IommuEvent::Unmap {
            rid: Rig::rid(0x08),
            range: range(0x1000, 0x1fff),
        };
        assert_eq!(actions, vec![VtdAction::Notify(vec![unmap])]);
        assert!(rig
            .vtd
            .translate(Rig::rid(0x08), Iova(0x1000), 1, R)
            .is_err());
    }

    #[test]
    fn reset_clears_state_and_resets_consumers() {
        let mut rig = Rig::new(VtdConfig::default());
        assert!(rig.vtd.translation_enabled());
        assert_eq!(
            rig.vtd.reset(),
            vec![VtdAction::Notify(vec![IommuEvent::Reset])]
        );
        assert!(!rig.vtd.translation_enabled());
        assert_eq!(r32(&rig.vtd, regs::GSTS), 0);
    }

    struct Sink;
    impl IommuNotifier for Sink {
        fn notify(&self, _ev: &IommuEvent) -> Result<(), NotifyError> {
            Ok(())
        }
    }

    #[test]
    fn notifier_flags_follow_device_iotlb_and_caching_mode() {
        let (plain, _) = vtd_with(VtdConfig::default());
        assert_eq!(plain.notifier_flags(), NotifierFlags::UNMAP);
        assert!(!plain.supports_device_iotlb());
        let mut set = NotifierSet::new(plain.notifier_flags());
        let (_, kind) = set
            .register_with_fallback(Rig::rid(8), NotifierFlags::NONE, Arc::new(Sink))
            .unwrap();
        assert_eq!(kind, UnmapKind::Iotlb);

        let (full, _) = vtd_with(VtdConfig {
            device_iotlb: true,
            caching_mode: true,
            ..VtdConfig::default()
        });
        assert_eq!(full.notifier_flags(), NotifierFlags::ALL);
        assert!(full.supports_device_iotlb());
        let mut set = NotifierSet::new(full.notifier_flags());
        let (_, kind) = set
            .register_with_fallback(Rig::rid(8), NotifierFlags::MAP, Arc::new(Sink))
            .unwrap();
        assert_eq!(kind, UnmapKind::DevIotlb);
    }

    #[test]
    fn garbage_tables_never_panic() {
        let mut rig = Rig::new(VtdConfig::default());
        // Fill the context table and page tables with a pseudo-random pattern.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..512u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            rig.b.write_u64(rig.ctx0 + i * 8, x);
            rig.b.write_u64(rig.pt + i * 8, x.rotate_left(7));
        }
        for devfn in 0..=255u8 {
            for iova in [0u64, 0x1000, 0xdead_b000, u64::MAX - 0xfff] {
                let _ = rig
                    .vtd
                    .translate_and_record(Rig::rid(devfn), Iova(iova), 0x1000, W);
            }
        }
    }
}
