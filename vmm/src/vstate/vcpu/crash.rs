//! What iovmm knew about a vCPU when the guest died: the exit history and the state KVM still
//! had after the fatal exit.
//!
//! The state read after a `KVM_EXIT_SHUTDOWN` is not necessarily the guest's: on AMD SVM, KVM
//! resets the vCPU on a shutdown intercept (RIP 0xfff0, CR0 0x60000010), so the report keeps it
//! apart from the last state KVM copied out at an earlier exit (sync regs), which is.

use std::fmt;

use kvm_bindings::kvm_vcpu_events;
use kvm_ioctls::VcpuFd;

use super::history::{ExitRecord, GuestState};

/// What iovmm knew about a vCPU when it stopped the VM because of the guest (triple fault,
/// KVM internal error, halt with no way to wake up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrashReport {
    /// Whether KVM copied guest state out at every exit (`KVM_CAP_SYNC_REGS`); without it the
    /// history has no guest state.
    pub sync_regs: bool,
    /// The last exits of the vCPU, oldest first; the fatal exit is the last one.
    pub history: Vec<ExitRecord>,
    /// State read with `KVM_GET_REGS` / `KVM_GET_SREGS` / `KVM_GET_VCPU_EVENTS` after the fatal
    /// exit (`None` if that failed). After a shutdown on AMD SVM this is the reset state.
    pub after_exit: Option<GuestState>,
}

impl CrashReport {
    /// The fatal exit (the newest in the history).
    pub fn fatal_exit(&self) -> Option<&ExitRecord> {
        self.history.last()
    }

    /// The newest exit before the fatal one that carries guest state: the last state known to
    /// be the guest's own even if KVM reset the vCPU at the fatal exit.
    pub fn last_known(&self) -> Option<&ExitRecord> {
        let before = self.history.len().saturating_sub(1);
        self.history[..before]
            .iter()
            .rev()
            .find(|r| r.state.is_some())
    }

    /// The guest state of [`CrashReport::last_known`].
    pub fn last_known_state(&self) -> Option<&GuestState> {
        self.last_known().and_then(|r| r.state.as_ref())
    }
}

impl fmt::Display for CrashReport {
    /// The multi-line body of a crash report (without the summary line): the state after the
    /// exit, the last known state before it, then the exit history, oldest first. Every line
    /// starts with two spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.after_exit {
            Some(s) => writeln!(
                f,
                "  state after the exit (KVM_GET_*; after a shutdown KVM may have reset it): {s}"
            )?,
            None => writeln!(f, "  state after the exit: could not be read")?,
        }
        match (self.last_known(), self.last_known_state()) {
            (Some(r), Some(s)) => writeln!(
                f,
                "  last state before the fatal exit, at a {} exit: {s}",
                r.kind.name()
            )?,
            _ if !self.sync_regs => writeln!(
                f,
                "  last state before the fatal exit: not recorded (KVM lacks KVM_CAP_SYNC_REGS)"
            )?,
            _ => writeln!(
                f,
                "  last state before the fatal exit: none (no earlier exit)"
            )?,
        }
        let n = self.history.len();
        write!(f, "  exit history (oldest first, {n} exits):")?;
        for (i, r) in self.history.iter().enumerate() {
            let age = n - 1 - i;
            write!(f, "\n    -{age:<2} {r}")?;
        }
        Ok(())
    }
}

/// Reads the vCPU's state after an exit with three ioctls (only on the way out of the VM).
pub(super) fn read_state(fd: &VcpuFd) -> Option<GuestState> {
    let regs = fd
        .get_regs()
        .map_err(|e| log::warn!("vcpu: KVM_GET_REGS after the exit failed: {e}"))
        .ok()?;
    let sregs = fd
        .get_sregs()
        .map_err(|e| log::warn!("vcpu: KVM_GET_SREGS after the exit failed: {e}"))
        .ok()?;
    let events = fd.get_vcpu_events().unwrap_or_else(|e| {
        log::warn!("vcpu: KVM_GET_VCPU_EVENTS after the exit failed ({e}); no exception shown");
        kvm_vcpu_events::default()
    });
    Some(GuestState::from_kvm(&regs, &sregs, &events))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::history::{Access, ExitKind, PendingException};
    use super::*;

    fn state(rip: u64, cr2: u64) -> GuestState {
        GuestState {
            rip,
            cr2,
            cr3: 0x9000,
            cr0: 0x8005_0033,
            ..Default::default()
        }
    }

    fn pio_out(rip: u64) -> ExitRecord {
        ExitRecord {
            kind: ExitKind::PioOut,
            access: Some(Access {
                addr: 0x3f8,
                size: 1,
            }),
            state: Some(state(rip, 0)),
        }
    }

    fn shutdown_report() -> CrashReport {
        let reset = GuestState {
            rip: 0xfff0,
            cr0: 0x6000_0010,
            ..Default::default()
        };
        let fatal = ExitRecord {
            kind: ExitKind::Shutdown,
            access: None,
            state: Some(reset),
        };
        let mut after = reset;
        after.exception = Some(PendingException {
            vector: 8,
            error_code: Some(0),
            injected: true,
        });
        CrashReport {
            sync_regs: true,
            history: vec![pio_out(0x20_1000), pio_out(0x20_1004), fatal],
            after_exit: Some(after),
        }
    }

    #[test]
    fn last_known_skips_the_fatal_exit() {
        let r = shutdown_report();
        assert_eq!(r.fatal_exit().map(|e| e.kind), Some(ExitKind::Shutdown));
        assert_eq!(r.last_known_state().map(|s| s.rip), Some(0x20_1004));
        let only_fatal = CrashReport {
            history: r.history[2..].to_vec(),
            ..r.clone()
        };
        assert_eq!(only_fatal.last_known(), None);
        let empty = CrashReport {
            history: vec![],
            ..r
        };
        assert_eq!(empty.last_known(), None);
        assert_eq!(empty.fatal_exit(), None);
    }

    #[test]
    fn report_lists_state_after_last_known_state_and_history_oldest_first() {
        let text = shutdown_report().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[0].starts_with("  state after the exit (KVM_GET_*; after a shutdown KVM may have reset it): RIP 0xfff0 "), "{text}");
        assert!(
            lines[0].ends_with("; injected exception 8 error code 0x0"),
            "{text}"
        );
        assert!(
            lines[1].starts_with(
                "  last state before the fatal exit, at a pio-out exit: RIP 0x201004 "
            ),
            "{text}"
        );
        assert!(lines[1].contains("CR2 0x0 CR3 0x9000"), "{text}");
        assert_eq!(lines[2], "  exit history (oldest first, 3 exits):");
        assert_eq!(
            lines[3],
            "    -2  pio-out port 0x3f8 size 1 at RIP 0x201000 CR2 0x0 CR3 0x9000"
        );
        assert!(lines[4].starts_with("    -1  pio-out port 0x3f8 size 1 at RIP 0x201004"));
        assert_eq!(lines[5], "    -0  shutdown at RIP 0xfff0 CR2 0x0 CR3 0x0");
    }

    #[test]
    fn report_without_sync_regs_says_why_there_is_no_rip() {
        let report = CrashReport {
            sync_regs: false,
            history: vec![ExitRecord {
                kind: ExitKind::Shutdown,
                access: None,
                state: None,
            }],
            after_exit: None,
        };
        let text = report.to_string();
        assert!(
            text.contains("state after the exit: could not be read"),
            "{text}"
        );
        assert!(
            text.contains("not recorded (KVM lacks KVM_CAP_SYNC_REGS)"),
            "{text}"
        );
        assert!(text.ends_with("-0  shutdown (RIP not recorded)"), "{text}");
    }
}
