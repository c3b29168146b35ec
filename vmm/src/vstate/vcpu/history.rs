//! The per-vCPU exit history: a ring of the last [`EXIT_HISTORY_LEN`] exits with what they
//! accessed and, when KVM has `KVM_CAP_SYNC_REGS`, the guest state KVM copied into `kvm_run` at
//! that exit (no extra ioctl per exit).

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_sync_regs, kvm_vcpu_events};

/// How many exits a vCPU remembers.
pub const EXIT_HISTORY_LEN: usize = 16;

/// What a vCPU exit was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExitKind {
    /// Port read (`KVM_EXIT_IO`, in).
    PioIn,
    /// Port write (`KVM_EXIT_IO`, out).
    PioOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// `KVM_EXIT_IOAPIC_EOI` (split irqchip); the access carries the vector.
    IoapicEoi,
    /// `KVM_EXIT_HLT`.
    Hlt,
    /// `KVM_EXIT_SHUTDOWN` (triple fault).
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT` (reset, power off).
    SystemEvent,
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError,
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry,
    /// `KVM_RUN` returned because of a signal (a stop kick) or `KVM_EXIT_INTR`.
    Interrupted,
    /// Any other exit (logged, ignored).
    #[default]
    Other,
}

impl ExitKind {
    /// Short name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::PioIn => "pio-in",
            ExitKind::PioOut => "pio-out",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::IoapicEoi => "ioapic-eoi",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system-event",
            ExitKind::InternalError => "internal-error",
            ExitKind::FailEntry => "fail-entry",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Other => "other",
        }
    }
}

/// The port or MMIO address an exit accessed (for EOI exits: the vector, size 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Port number, guest-physical MMIO address or EOI vector.
    pub addr: u64,
    /// Access size in bytes.
    pub size: u8,
}

/// An exception KVM had pending or was injecting (from `kvm_vcpu_events`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingException {
    /// Exception vector (8 = #DF, 13 = #GP, 14 = #PF, ...).
    pub vector: u8,
    /// Error code, for exceptions that push one.
    pub error_code: Option<u32>,
    /// Whether it was being injected (`injected`) rather than only pending.
    pub injected: bool,
}

/// Guest CPU state as KVM reported it (sync regs at an exit, or `KVM_GET_*` after one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestState {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Flags.
    pub rflags: u64,
    /// CS selector (its low two bits are the privilege level in protected/long mode).
    pub cs: u16,
    /// CR0.
    pub cr0: u64,
    /// CR2 (last page-fault address).
    pub cr2: u64,
    /// CR3 (page-table root).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER MSR.
    pub efer: u64,
    /// IDT base (linear).
    pub idt_base: u64,
    /// IDT limit.
    pub idt_limit: u16,
    /// Pending or injected exception, if any.
    pub exception: Option<PendingException>,
    /// External interrupt vector KVM was injecting, if any.
    pub interrupt: Option<u8>,
    /// Whether an NMI was being injected.
    pub nmi_injected: bool,
}

impl GuestState {
    /// Builds the state from KVM's register, system-register and event structures.
    pub fn from_kvm(regs: &kvm_regs, sregs: &kvm_sregs, events: &kvm_vcpu_events) -> Self {
        let e = &events.exception;
        let exception = (e.injected != 0 || e.pending != 0).then_some(PendingException {
            vector: e.nr,
            error_code: (e.has_error_code != 0).then_some(e.error_code),
            injected: e.injected != 0,
        });
        GuestState {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            cs: sregs.cs.selector,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
            idt_base: sregs.idt.base,
            idt_limit: sregs.idt.limit,
            exception,
            interrupt: (events.interrupt.injected != 0).then_some(events.interrupt.nr),
            nmi_injected: events.nmi.injected != 0,
        }
    }

    /// Whether this is the x86 reset state (CS:IP f000:fff0, protected mode off), which is what
    /// KVM leaves after a shutdown on AMD SVM instead of the guest's state.
    pub fn looks_reset(&self) -> bool {
        self.rip == 0xfff0 && self.cs == 0xf000 && self.cr0 & 1 == 0
    }

    /// The state in KVM's sync-regs area (valid after an exit when requested).
    pub fn from_sync_regs(s: &kvm_sync_regs) -> Self {
        Self::from_kvm(&s.regs, &s.sregs, &s.events)
    }
}

impl fmt::Display for GuestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RIP {:#x} CS {:#x} RSP {:#x} RFLAGS {:#x} CR0 {:#x} CR2 {:#x} CR3 {:#x} CR4 {:#x} \
             EFER {:#x} IDT {:#x}/{:#x}",
            self.rip,
            self.cs,
            self.rsp,
            self.rflags,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.efer,
            self.idt_base,
            self.idt_limit
        )?;
        match self.exception {
            None => write!(f, "; no pending exception")?,
            Some(e) => {
                let how = if e.injected { "injected" } else { "pending" };
                write!(f, "; {how} exception {}", e.vector)?;
                if let Some(code) = e.error_code {
                    write!(f, " error code {code:#x}")?;
                }
            }
        }
        if let Some(v) = self.interrupt {
            write!(f, "; injecting interrupt {v:#x}")?;
        }
        if self.nmi_injected {
            write!(f, "; injecting NMI")?;
        }
        Ok(())
    }
}

/// One remembered exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitRecord {
    /// What the exit was.
    pub kind: ExitKind,
    /// Port / MMIO address and size (PIO, MMIO, EOI exits).
    pub access: Option<Access>,
    /// Guest state at the exit (sync regs); `None` without `KVM_CAP_SYNC_REGS`.
    pub state: Option<GuestState>,
}

impl fmt::Display for ExitRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind.name())?;
        match (self.kind, self.access) {
            (ExitKind::IoapicEoi, Some(a)) => write!(f, " vector {}", a.addr)?,
            (ExitKind::PioIn | ExitKind::PioOut, Some(a)) => {
                write!(f, " port {:#x} size {}", a.addr, a.size)?
            }
            (_, Some(a)) => write!(f, " addr {:#x} size {}", a.addr, a.size)?,
            (_, None) => {}
        }
        match &self.state {
            Some(s) => write!(f, " at RIP {:#x} CR2 {:#x} CR3 {:#x}", s.rip, s.cr2, s.cr3),
            None => write!(f, " (RIP not recorded)"),
        }
    }
}

/// A ring of the last [`EXIT_HISTORY_LEN`] exits of one vCPU.
#[derive(Clone, Debug, Default)]
pub struct ExitHistory {
    entries: [ExitRecord; EXIT_HISTORY_LEN],
    /// Slot the next record goes to.
    next: usize,
    /// Number of valid records (saturates at the capacity).
    len: usize,
}

impl ExitHistory {
    /// Remembers `record`, dropping the oldest one when full.
    pub fn push(&mut self, record: ExitRecord) {
        self.entries[self.next] = record;
        self.next = (self.next + 1) % EXIT_HISTORY_LEN;
        self.len = (self.len + 1).min(EXIT_HISTORY_LEN);
    }

    /// Number of remembered exits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no exit has been recorded.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The remembered exits, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &ExitRecord> {
        let start = (self.next + EXIT_HISTORY_LEN - self.len) % EXIT_HISTORY_LEN;
        (0..self.len).map(move |i| &self.entries[(start + i) % EXIT_HISTORY_LEN])
    }

    /// The remembered exits, oldest first, as a vector.
    pub fn to_vec(&self) -> Vec<ExitRecord> {
        self.iter().copied().collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pio(port: u64) -> ExitRecord {
        ExitRecord {
            kind: ExitKind::PioOut,
            access: Some(Access {
                addr: port,
                size: 1,
            }),
            state: None,
        }
    }

    #[test]
    fn ring_keeps_the_last_exits_oldest_first() {
        let mut h = ExitHistory::default();
        assert!(h.is_empty());
        assert_eq!(h.to_vec(), vec![]);
        for port in 0..3 {
            h.push(pio(port));
        }
        let ports: Vec<u64> = h.iter().map(|r| r.access.unwrap().addr).collect();
        assert_eq!(ports, vec![0, 1, 2]);
        for port in 3..40 {
            h.push(pio(port));
        }
        assert_eq!(h.len(), EXIT_HISTORY_LEN);
        let ports: Vec<u64> = h.iter().map(|r| r.access.unwrap().addr).collect();
        let expected: Vec<u64> = (40 - EXIT_HISTORY_LEN as u64..40).collect();
        assert_eq!(ports, expected);
    }

    #[test]
    fn ring_wraps_exactly_at_capacity() {
        let mut h = ExitHistory::default();
        for port in 0..EXIT_HISTORY_LEN as u64 {
            h.push(pio(port));
        }
        assert_eq!(h.iter().next().unwrap().access.unwrap().addr, 0);
        assert_eq!(h.iter().last().unwrap().access.unwrap().addr, 15);
        h.push(pio(99));
        assert_eq!(h.iter().next().unwrap().access.unwrap().addr, 1);
        assert_eq!(h.iter().last().unwrap().access.unwrap().addr, 99);
    }

    #[test]
    fn state_reads_pending_exception_from_vcpu_events() {
        let mut regs = kvm_regs {
            rip: 0x20_1000,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr2: 0xdead_0000,
            cr3: 0x10_0000,
            ..Default::default()
        };
        let mut events = kvm_vcpu_events::default();
        let s = GuestState::from_kvm(&regs, &sregs, &events);
        assert_eq!(
            (s.rip, s.cr2, s.cr3, s.exception),
            (0x20_1000, 0xdead_0000, 0x10_0000, None)
        );
        events.exception.injected = 1;
        events.exception.nr = 8;
        events.exception.has_error_code = 1;
        let s = GuestState::from_kvm(&regs, &sregs, &events);
        let e = s.exception.expect("exception");
        assert_eq!((e.vector, e.error_code, e.injected), (8, Some(0), true));
        assert!(
            s.to_string()
                .ends_with("; injected exception 8 error code 0x0"),
            "{s}"
        );
        events.exception = Default::default();
        events.exception.pending = 1;
        events.exception.nr = 6;
        let s = GuestState::from_kvm(&regs, &sregs, &events);
        assert!(s.to_string().ends_with("; pending exception 6"), "{s}");
        assert!(!s.looks_reset());
        events.interrupt.injected = 1;
        events.interrupt.nr = 0xec;
        events.nmi.injected = 1;
        let s = GuestState::from_kvm(&regs, &sregs, &events);
        assert_eq!((s.interrupt, s.nmi_injected), (Some(0xec), true));
        assert!(
            s.to_string()
                .ends_with("; pending exception 6; injecting interrupt 0xec; injecting NMI"),
            "{s}"
        );
        regs.rip = 0xfff0;
        sregs.cs.selector = 0xf000;
        sregs.cr0 = 0x6000_0010;
        assert!(GuestState::from_kvm(&regs, &sregs, &events).looks_reset());
    }

    #[test]
    fn records_format_their_access_and_rip() {
        assert_eq!(
            pio(0x3f8).to_string(),
            "pio-out port 0x3f8 size 1 (RIP not recorded)"
        );
        let mmio = ExitRecord {
            kind: ExitKind::MmioRead,
            access: Some(Access {
                addr: 0xfec0_0010,
                size: 4,
            }),
            state: Some(GuestState {
                rip: 0xffff_ffff_8100_0000,
                cr2: 0,
                cr3: 0x1000,
                ..Default::default()
            }),
        };
        assert_eq!(
            mmio.to_string(),
            "mmio-read addr 0xfec00010 size 4 at RIP 0xffffffff81000000 CR2 0x0 CR3 0x1000"
        );
        let eoi = ExitRecord {
            kind: ExitKind::IoapicEoi,
            access: Some(Access { addr: 33, size: 0 }),
            state: None,
        };
        assert_eq!(eoi.to_string(), "ioapic-eoi vector 33 (RIP not recorded)");
    }
}
