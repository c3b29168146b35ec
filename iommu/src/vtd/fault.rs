//! Primary fault recording: fault reasons, the fault-recording registers (FRCD), FSTS
//! PFO/PPF/FRI bookkeeping, FECTL IM/IP and the fault-event MSI composed from
//! FEDATA/FEADDR/FEUADDR.
//!
//! Recording picks the next record circularly. If that record still holds an unread fault (F=1)
//! or FSTS.PFO is already set, the fault is dropped and PFO set. Otherwise the record is filled,
//! F set and, when no fault was pending before, FSTS.FRI points at it. The fault event is an MSI
//! when FECTL.IM=0; with IM=1 FECTL.IP is set instead and the MSI is sent when software clears IM.

use vm_memory::Bytes;
use vm_memory::GuestAddress;

use super::regs::{CTL_IM, CTL_IP, FSTS_FRI_SHIFT, FSTS_ICE, FSTS_IQE, FSTS_ITE, FSTS_PFO};
use super::{Vtd, VtdAction};

/// A VT-d (legacy) fault reason code, as written into FRCD.FR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FaultReason {
    /// 0x1: the root entry for the bus is not present.
    RootNotPresent = 0x1,
    /// 0x2: the context entry for the device is not present.
    ContextNotPresent = 0x2,
    /// 0x3: the context entry is invalid (bad TT or AW).
    InvalidContext = 0x3,
    /// 0x4: the input address is beyond the adjusted guest address width.
    AddressBeyondWidth = 0x4,
    /// 0x5: write to a paging entry without W (or not present).
    WriteDenied = 0x5,
    /// 0x6: read of a paging entry without R (or not present).
    ReadDenied = 0x6,
    /// 0x7: a paging entry could not be read.
    PagingEntryRead = 0x7,
    /// 0x8: the root table address is invalid (unreadable).
    RootTableInvalid = 0x8,
    /// 0x9: the context table pointer is invalid (unreadable).
    ContextTableInvalid = 0x9,
    /// 0xA: non-zero reserved bits in a root entry.
    RootReserved = 0xA,
    /// 0xB: non-zero reserved bits in a context entry.
    ContextReserved = 0xB,
    /// 0xC: non-zero reserved bits in a paging entry.
    PagingReserved = 0xC,
    /// 0xD: the request type is blocked by the context's translation type.
    TranslationBlocked = 0xD,
    /// 0x20: reserved fields set in an interrupt request (address, high dword, data).
    IrRequestReserved = 0x20,
    /// 0x21: the interrupt index is beyond the interrupt remapping table.
    IrIndexBeyondTable = 0x21,
    /// 0x22: the IRTE is not present.
    IrEntryNotPresent = 0x22,
    /// 0x23: the interrupt remapping table could not be read.
    IrTableInvalid = 0x23,
    /// 0x24: reserved fields set in a present IRTE.
    IrEntryReserved = 0x24,
    /// 0x25: a compatibility-format interrupt was blocked (IRE=1, CFIS=0).
    IrCompatBlocked = 0x25,
    /// 0x26: the requester failed the IRTE's source-id verification.
    IrSourceInvalid = 0x26,
}

impl FaultReason {
    /// The numeric fault reason code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// A message-signalled interrupt the device adapter must deliver (compatibility format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    /// The 64-bit MSI address (upper register << 32 | lower register).
    pub addr: u64,
    /// The MSI data.
    pub data: u32,
}

/// A translation fault as the hardware would log it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultInfo {
    /// The requester (source id, `bus << 8 | devfn`).
    pub sid: u16,
    /// The faulting address (page-aligned when recorded).
    pub addr: u64,
    /// Why it failed.
    pub reason: FaultReason,
    /// Whether the request was a write (FRCD.T = 0) rather than a read (T = 1).
    pub is_write: bool,
    /// Whether the context entry asked for faults not to be recorded (FPD).
    pub fpd: bool,
}

/// The fault-recording registers.
#[derive(Debug, Clone)]
pub(crate) struct FaultRecords {
    records: Vec<Option<FaultInfo>>,
    next: usize,
}

/// What happened to a fault offered to [`FaultRecords::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordOutcome {
    /// Stored in record `index`.
    Recorded(usize),
    /// Dropped: the next record is still in use.
    Overflow,
}

impl FaultRecords {
    /// `count` empty records (at least one).
    pub(crate) fn new(count: usize) -> Self {
        Self {
            records: vec![None; count.max(1)],
            next: 0,
        }
    }

    /// Number of records.
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether any record holds an unread fault (FSTS.PPF).
    pub(crate) fn pending(&self) -> bool {
        self.records.iter().any(Option::is_some)
    }

    /// Stores `fault` in the next record unless that one is still in use.
    pub(crate) fn record(&mut self, fault: FaultInfo) -> RecordOutcome {
        let index = self.next;
        match self.records.get_mut(index) {
            Some(slot @ None) => {
                *slot = Some(fault);
                self.next = (index + 1) % self.records.len();
                RecordOutcome::Recorded(index)
            }
            _ => RecordOutcome::Overflow,
        }
    }

    /// Clears record `index` (software wrote 1 to F).
    pub(crate) fn clear(&mut self, index: usize) {
        if let Some(slot) = self.records.get_mut(index) {
            *slot = None;
        }
    }

    /// Drops every record.
    pub(crate) fn reset(&mut self) {
        self.records.iter_mut().for_each(|r| *r = None);
        self.next = 0;
    }

    /// Qword `half` (0 = low, 1 = high) of record `index`, as the FRCD register reads.
    pub(crate) fn read(&self, index: usize, half: usize) -> u64 {
        let Some(Some(f)) = self.records.get(index) else {
            return 0;
        };
        if half == 0 {
            return f.addr & !0xfff;
        }
        let t = u64::from(!f.is_write);
        u64::from(f.sid) | (u64::from(f.reason.code()) << 32) | (t << 62) | (1 << 63)
    }
}

impl<M: Bytes<GuestAddress> + Send + Sync> Vtd<M> {
    /// Records a translation fault as the hardware would (unless its context set FPD) and
    /// returns the fault event to deliver, if any.
    pub fn record_fault(&mut self, fault: &FaultInfo) -> Vec<VtdAction> {
        if fault.fpd || self.regs.fsts & FSTS_PFO != 0 {
            return Vec::new();
        }
        let was_pending = self.faults.pending();
        match self.faults.record(*fault) {
            RecordOutcome::Recorded(index) => {
                if !was_pending {
                    self.regs.fsts = (self.regs.fsts & !(0xff << FSTS_FRI_SHIFT))
                        | ((index as u32) << FSTS_FRI_SHIFT);
                }
            }
            RecordOutcome::Overflow => self.regs.fsts |= FSTS_PFO,
        }
        self.raise_fault_event().into_iter().collect()
    }

    /// Signals a fault event: an MSI if FECTL.IM is clear, else FECTL.IP. Nothing if an event is
    /// already pending.
    pub(crate) fn raise_fault_event(&mut self) -> Option<VtdAction> {
        if self.regs.fectl & CTL_IP != 0 {
            return None;
        }
        if self.regs.fectl & CTL_IM != 0 {
            self.regs.fectl |= CTL_IP;
            return None;
        }
        Some(VtdAction::FaultEvent(self.fault_msi()))
    }

    /// The fault-event MSI from FEADDR/FEUADDR/FEDATA.
    pub(crate) fn fault_msi(&self) -> MsiMessage {
        MsiMessage {
            addr: (u64::from(self.regs.feuaddr) << 32) | u64::from(self.regs.feaddr),
            data: self.regs.fedata,
        }
    }

    /// FSTS write: PFO, IQE, ICE, ITE are write-1-to-clear; PPF and FRI are read-only.
    /// Clearing IQE resumes the invalidation queue.
    pub(crate) fn write_fsts(&mut self, value: u32) -> Vec<VtdAction> {
        let w1c = value & (FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE);
        let iqe_cleared = self.regs.fsts & w1c & FSTS_IQE != 0;
        self.regs.fsts &= !w1c;
        self.update_fault_pending();
        if iqe_cleared {
            self.process_queue()
        } else {
            Vec::new()
        }
    }

    /// FECTL write: only IM is writable. Unmasking with IP set sends the pending MSI.
    pub(crate) fn write_fectl(&mut self, value: u32) -> Vec<VtdAction> {
        self.regs.fectl = (self.regs.fectl & !CTL_IM) | (value & CTL_IM);
        if self.regs.fectl & (CTL_IM | CTL_IP) == CTL_IP {
            self.regs.fectl &= !CTL_IP;
            return vec![VtdAction::FaultEvent(self.fault_msi())];
        }
        Vec::new()
    }

    /// Write to the high qword of FRCD[index]: bit 63 (F) clears the record.
    pub(crate) fn write_frcd_high(&mut self, index: usize, value: u64) {
        if value & (1 << 63) != 0 {
            self.faults.clear(index);
            self.update_fault_pending();
        }
    }

    /// Clears FECTL.IP once no fault status is left.
    fn update_fault_pending(&mut self) {
        let status = self.regs.fsts & (FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE);
        if status == 0 && !self.faults.pending() {
            self.regs.fectl &= !CTL_IP;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vtd::regs::{FEADDR, FECTL, FEDATA, FEUADDR, FRCD_BASE, FSTS, FSTS_PPF};
    use crate::vtd::testutil::{r32, r64, vtd_with, w32, w64};
    use crate::vtd::VtdConfig;

    fn fault(sid: u16, addr: u64, reason: FaultReason, is_write: bool) -> FaultInfo {
        FaultInfo {
            sid,
            addr,
            reason,
            is_write,
            fpd: false,
        }
    }

    fn two_records() -> VtdConfig {
        VtdConfig {
            fault_records: 2,
            ..VtdConfig::default()
        }
    }

    #[test]
    fn fault_record_layout_matches_frcd_format() {
        let (mut vtd, _) = vtd_with(two_records());
        vtd.record_fault(&fault(0x0108, 0x1234_5678, FaultReason::ReadDenied, false));
        assert_eq!(r64(&vtd, FRCD_BASE), 0x1234_5000);
        let hi = r64(&vtd, FRCD_BASE + 8);
        assert_eq!(hi & 0xffff, 0x0108, "SID");
        assert_eq!((hi >> 32) & 0xff, 0x6, "fault reason");
        assert_eq!(hi >> 62 & 1, 1, "T=1 means read");
        assert_eq!(hi >> 63, 1, "F");
        assert_eq!(r32(&vtd, FRCD_BASE + 12) >> 31, 1, "F via 32-bit read");
        let fsts = r32(&vtd, FSTS);
        assert_eq!(fsts & FSTS_PPF, FSTS_PPF);
        assert_eq!((fsts >> 8) & 0xff, 0, "FRI");
    }

    #[test]
    fn write_fault_sets_t_bit_to_zero() {
        let (mut vtd, _) = vtd_with(two_records());
        vtd.record_fault(&fault(1, 0x2000, FaultReason::WriteDenied, true));
        assert_eq!(r64(&vtd, FRCD_BASE + 8) >> 62 & 1, 0);
    }

    #[test]
    fn masked_fault_event_sets_ip_and_fires_on_unmask() {
        let (mut vtd, _) = vtd_with(two_records());
        w32(&mut vtd, FEDATA, 0x4041);
        w32(&mut vtd, FEADDR, 0xfee0_1000);
        w32(&mut vtd, FEUADDR, 0x12);
        // IM is set at reset, so the event stays pending.
        let actions = vtd.record_fault(&fault(1, 0, FaultReason::ReadDenied, false));
        assert!(actions.is_empty());
        assert_eq!(r32(&vtd, FECTL), CTL_IM | CTL_IP);
        let actions = w32(&mut vtd, FECTL, 0);
        let msi = MsiMessage {
            addr: 0x12_fee0_1000,
            data: 0x4041,
        };
        assert_eq!(actions, vec![VtdAction::FaultEvent(msi)]);
        assert_eq!(r32(&vtd, FECTL), 0);
    }

    #[test]
    fn unmasked_fault_sends_msi_immediately() {
        let (mut vtd, _) = vtd_with(two_records());
        w32(&mut vtd, FEADDR, 0xfee0_0000);
        w32(&mut vtd, FECTL, 0);
        let actions = vtd.record_fault(&fault(1, 0, FaultReason::ReadDenied, false));
        assert!(matches!(actions.as_slice(), [VtdAction::FaultEvent(m)] if m.addr == 0xfee0_0000));
    }

    #[test]
    fn overflow_sets_pfo_and_drops_until_cleared() {
        let (mut vtd, _) = vtd_with(two_records());
        for i in 0..3u16 {
            vtd.record_fault(&fault(i, 0, FaultReason::ReadDenied, false));
        }
        let fsts = r32(&vtd, FSTS);
        assert_eq!(fsts & (FSTS_PFO | FSTS_PPF), FSTS_PFO | FSTS_PPF);
        assert_eq!(r64(&vtd, FRCD_BASE + 8) & 0xffff, 0);
        assert_eq!(r64(&vtd, FRCD_BASE + 24) & 0xffff, 1);
        // Clear record 0 but not PFO: still dropped.
        w32(&mut vtd, FRCD_BASE + 12, 1 << 31);
        vtd.record_fault(&fault(7, 0, FaultReason::ReadDenied, false));
        assert_eq!(r64(&vtd, FRCD_BASE + 8), 0);
        // Clear PFO: the next fault lands in record 0 (the circular successor of 1).
        w32(&mut vtd, FSTS, FSTS_PFO);
        vtd.record_fault(&fault(8, 0, FaultReason::ReadDenied, false));
        assert_eq!(r64(&vtd, FRCD_BASE + 8) & 0xffff, 8);
    }

    #[test]
    fn clearing_all_records_and_status_clears_ppf_and_ip() {
        let (mut vtd, _) = vtd_with(two_records());
        vtd.record_fault(&fault(1, 0, FaultReason::ReadDenied, false));
        assert_ne!(r32(&vtd, FECTL) & CTL_IP, 0);
        // Linux writes PPF too; it is read-only and must not matter.
        w32(&mut vtd, FSTS, FSTS_PPF);
        assert_ne!(r32(&vtd, FSTS) & FSTS_PPF, 0);
        w64(&mut vtd, FRCD_BASE + 8, 1 << 63);
        assert_eq!(r32(&vtd, FSTS) & FSTS_PPF, 0);
        assert_eq!(r32(&vtd, FECTL), CTL_IM);
    }

    #[test]
    fn writing_low_half_of_record_does_not_clear_it() {
        let (mut vtd, _) = vtd_with(two_records());
        vtd.record_fault(&fault(1, 0x5000, FaultReason::ReadDenied, false));
        w32(&mut vtd, FRCD_BASE + 8, 0);
        w64(&mut vtd, FRCD_BASE, 0);
        assert_eq!(r64(&vtd, FRCD_BASE + 8) >> 63, 1);
        assert_eq!(r64(&vtd, FRCD_BASE), 0x5000);
    }

    #[test]
    fn fri_points_at_first_pending_record() {
        let (mut vtd, _) = vtd_with(two_records());
        vtd.record_fault(&fault(1, 0, FaultReason::ReadDenied, false));
        w64(&mut vtd, FRCD_BASE + 8, 1 << 63);
        vtd.record_fault(&fault(2, 0, FaultReason::ReadDenied, false));
        assert_eq!((r32(&vtd, FSTS) >> 8) & 0xff, 1);
    }

    #[test]
    fn fpd_suppresses_recording() {
        let (mut vtd, _) = vtd_with(two_records());
        let mut f = fault(1, 0, FaultReason::ReadDenied, false);
        f.fpd = true;
        assert!(vtd.record_fault(&f).is_empty());
        assert_eq!(r32(&vtd, FSTS), 0);
    }
}
