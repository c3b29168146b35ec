//! A guest that triple-faults (the `triple-fault` scenario clears the IDT from ring 3 and runs
//! `ud2`) is reported with its exit history and the last guest state KVM gave us, through the
//! library ([`VmExit::GuestCrash`]) and the CLI (exit code 4, multi-line report on stderr).
//! Also measures what one exit costs with the exit history recorded (`pio-exits` scenario).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration_tests::bench::host_tsc_khz;
use integration_tests::guest::{test_guest_path, GuestResult, Scenario};
use vmm::{ExitKind, SerialMode, VmConfig, VmExit, Vmm};

const TIMEOUT: Duration = Duration::from_secs(30);
/// The guest image is linked at 2 MiB and stays below 16 MiB (docs/design/guest.md).
const IMAGE: std::ops::Range<u64> = 0x20_0000..0x100_0000;
const SERIAL_PORT: u64 = 0x3f8;

fn ud2_address(serial: &str) -> u64 {
    let tail = serial
        .split("ud2 at 0x")
        .nth(1)
        .unwrap_or_else(|| panic!("no ud2 address in the serial output:\n{serial}"));
    let hex: String = tail.chars().take_while(char::is_ascii_hexdigit).collect();
    u64::from_str_radix(&hex, 16).expect("hex address")
}

#[test]
fn triple_fault_reports_exit_history_and_last_known_state() {
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::new("triple-fault").cmdline().expect("cmdline");
    cfg.serial = SerialMode::Capture;
    let mut vmm = Vmm::start(&cfg).expect("VM starts");
    let exit = vmm.wait_timeout(TIMEOUT).expect("VMM stops cleanly");
    let serial = vmm.serial_output().unwrap_or_default();
    let ud2 = ud2_address(&serial);
    assert!(IMAGE.contains(&ud2), "ud2 at {ud2:#x}");
    let VmExit::GuestCrash { vcpu, rip, report } = &exit else {
        panic!("expected a guest crash, got {exit:?}\nserial:\n{serial}");
    };
    eprintln!("{}", vmm::cli::describe(&exit).1.unwrap_or_default());
    assert_eq!(*vcpu, 0);
    // The vCPU filter allows the state ioctls: the state after the exit was read.
    let after = report.after_exit.expect("state read after the shutdown");
    assert_eq!(after.rip, *rip);
    // AMD SVM resets the vCPU on a shutdown intercept; kvm-pvm (like VMX) leaves the faulting
    // instruction's state.
    assert!(
        after.rip == ud2 || after.rip == 0xfff0,
        "RIP after the shutdown {rip:#x}"
    );
    let fatal = report.fatal_exit().expect("history has the fatal exit");
    assert_eq!(fatal.kind, ExitKind::Shutdown);
    if let Some(s) = fatal.state {
        // Sync regs and the KVM_GET_* ioctls read the same state after the exit.
        assert_eq!((s.rip, s.cr3), (after.rip, after.cr3));
    }
    // The guest printed its line through the UART right before the ud2.
    assert!(
        report.history.iter().any(|r| r.kind == ExitKind::PioOut
            && r.access
                .is_some_and(|a| a.addr == SERIAL_PORT && a.size == 1)),
        "{report:#?}"
    );
    if !report.sync_regs {
        eprintln!("KVM lacks KVM_CAP_SYNC_REGS: the history carries no RIPs");
        assert!(report.history.iter().all(|r| r.state.is_none()));
        return;
    }
    // The last exit before the shutdown is the guest's own: ring 3, inside the image.
    let last = report
        .last_known_state()
        .expect("a state before the shutdown");
    assert!(IMAGE.contains(&last.rip), "last known RIP {:#x}", last.rip);
    assert_eq!(last.cs & 3, 3, "ring 3 workload: {last:?}");
    assert_ne!(last.cr3, 0, "{last:?}");
    // Every exit before the fatal one carries guest state.
    let before = &report.history[..report.history.len() - 1];
    assert!(!before.is_empty() && before.iter().all(|r| r.state.is_some()));
}

#[test]
fn cli_prints_the_crash_report_and_exits_4() {
    let out = Command::new(PathBuf::from(env!("CARGO_BIN_EXE_iovmm-cli")))
        .args(["--kernel".as_ref(), test_guest_path().as_os_str()])
        .args(["--cmdline", "iovmm.test=triple-fault", "--memory", "128M"])
        .args(["--serial", "stdout"])
        .output()
        .expect("iovmm runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "stderr:\n{err}");
    let lines: Vec<&str> = err.lines().collect();
    let first = lines
        .iter()
        .position(|l| l.starts_with("iovmm: guest crashed (triple fault) on vCPU 0"))
        .unwrap_or_else(|| panic!("no summary line:\n{err}"));
    let report = &lines[first..];
    assert!(report[1].starts_with("  state after the exit"), "{err}");
    assert!(
        report[2].starts_with("  last state before the fatal exit"),
        "{err}"
    );
    assert!(
        report[3].starts_with("  exit history (oldest first, "),
        "{err}"
    );
    let history = &report[4..];
    assert!(history.len() >= 2, "{err}");
    let fatal = history.last().expect("a fatal exit line");
    assert!(fatal.contains("shutdown"), "{err}");
    assert!(
        history
            .iter()
            .any(|l| l.contains("pio-out port 0x3f8 size 1")),
        "{err}"
    );
}

#[test]
fn exit_cost_with_exit_history() {
    let iterations = 20_000u64;
    let mut cfg = VmConfig::new(test_guest_path());
    let scenario = Scenario::new("pio-exits").param("iterations", iterations);
    cfg.cmdline = scenario.cmdline().expect("cmdline");
    cfg.serial = SerialMode::Capture;
    let mut vmm = Vmm::start(&cfg).expect("VM starts");
    let exit = vmm.wait_timeout(TIMEOUT).expect("VMM stops cleanly");
    let serial = vmm.serial_output().unwrap_or_default();
    assert_eq!(exit, VmExit::ExitPort(0), "serial:\n{serial}");
    let r = GuestResult::from_output(&serial).expect("result line");
    assert_eq!(r.u64("iterations"), Some(iterations));
    let cycles = r.u64("cycles").expect("cycles");
    let ns = cycles as f64 * 1e6 / (host_tsc_khz() as f64 * iterations as f64);
    eprintln!("pio exit round trip (with exit history): {ns:.0} ns per exit");
    assert!(ns > 0.0 && ns < 1e6, "{ns} ns per exit");
}
