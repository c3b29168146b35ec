//! Boots the fast test guest under real KVM: serial output, the debug exit
//! port, exception reporting, stopping a running guest through the library
//! API, and the `iovmm` CLI's exit codes and error messages.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::guest::{
    exception_exit_code, test_guest_path, GuestResult, Scenario, PAGE_FAULT_VECTOR,
};
use vmm::{SerialMode, VmConfig, VmExit, Vmm};

const TIMEOUT: Duration = Duration::from_secs(30);

fn config(scenario: &Scenario) -> VmConfig {
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = scenario.cmdline().expect("valid scenario");
    cfg.serial = SerialMode::Capture;
    cfg
}

fn run(scenario: &Scenario) -> (VmExit, String, Duration) {
    let start = Instant::now();
    let mut vmm = Vmm::start(&config(scenario)).expect("VM starts");
    let exit = vmm.wait_timeout(TIMEOUT).expect("VMM stops cleanly");
    let took = start.elapsed();
    (exit, vmm.serial_output().unwrap_or_default(), took)
}

#[test]
fn hello_guest_prints_and_exits_through_the_exit_port() {
    let (exit, out, took) = run(&Scenario::hello());
    assert_eq!(exit, VmExit::ExitPort(0), "serial:\n{out}");
    assert!(out.contains("IOVMM-TEST hello ok"), "serial:\n{out}");
    let r = GuestResult::from_output(&out).expect("one result line");
    assert!(r.is_ok(), "{r:?}");
    // The guest saw the RAM the e820 map in the zero page gave it (256 MiB minus the low holes).
    let ram = r.u64("ram_bytes").expect("ram_bytes");
    assert!(ram > 250 << 20 && ram < 256 << 20, "ram_bytes {ram}");
    eprintln!("test guest: start to exit in {took:.2?}");
    assert!(took < Duration::from_secs(5), "boot took {took:?}");
}

#[test]
fn guest_exception_is_reported_with_vector_and_exit_code() {
    let (exit, out, _) = run(&Scenario::fault());
    let code = exception_exit_code(PAGE_FAULT_VECTOR) as u32;
    assert_eq!(exit, VmExit::ExitPort(code), "serial:\n{out}");
    let r = GuestResult::from_output(&out).expect("result line");
    assert_eq!(r.status(), Some("exception"));
    assert_eq!(r.u64("vector"), Some(PAGE_FAULT_VECTOR as u64));
}

#[test]
fn pci_scan_finds_the_host_bridge_over_ecam() {
    let (exit, out, _) = run(&Scenario::pci_scan());
    assert_eq!(exit, VmExit::ExitPort(0), "serial:\n{out}");
    let r = GuestResult::from_output(&out).expect("result line");
    assert!(
        r.str("ids").is_some_and(|s| s.contains("00:00.0=8086:")),
        "{r:?}"
    );
}

#[test]
fn stop_interrupts_a_running_guest_and_joins_its_threads() {
    // A loop long enough (minutes) that only stop() can end it.
    let scenario = Scenario::tsc().param("iterations", 1u64 << 40);
    let mut vmm = Vmm::start(&config(&scenario)).expect("VM starts");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!vmm.has_exited());
    let t = Instant::now();
    vmm.stop();
    assert_eq!(vmm.wait().expect("stops"), VmExit::Stopped);
    eprintln!("test guest: stop took {:.2?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn missing_kernel_is_a_typed_config_error() {
    let mut cfg = VmConfig::new("/nonexistent/kernel");
    cfg.serial = SerialMode::Off;
    let e = Vmm::start(&cfg).expect_err("must fail");
    assert!(matches!(e, vmm::VmmError::Config(_)), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/kernel"));
}

fn iovmm_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_iovmm-cli"))
}

#[test]
fn cli_exit_codes_follow_the_guest() {
    let guest = test_guest_path();
    let cli = |cmdline: &str| {
        Command::new(iovmm_binary())
            .args(["--kernel".as_ref(), guest.as_os_str()])
            .args([
                "--cmdline",
                cmdline,
                "--memory",
                "128M",
                "--serial",
                "stdout",
            ])
            .output()
            .expect("iovmm runs")
    };
    let ok = cli("iovmm.test=hello");
    assert_eq!(ok.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("IOVMM-TEST hello ok"));
    let fault = cli("iovmm.test=fault");
    assert_eq!(
        fault.status.code(),
        Some(exception_exit_code(PAGE_FAULT_VECTOR))
    );
    assert!(String::from_utf8_lossy(&fault.stderr).contains("failure code"));
}

#[test]
fn cli_reports_bad_options_with_a_clear_message() {
    let out = Command::new(iovmm_binary())
        .args(["--kernel", "/nonexistent/k", "--memory", "64M"])
        .output()
        .expect("iovmm runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kernel \"/nonexistent/k\" cannot be read"),
        "{err}"
    );
    let out = Command::new(iovmm_binary())
        .args(["--kernel", "/k", "--memory", "lots"])
        .output()
        .expect("iovmm runs");
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    let help = Command::new(iovmm_binary())
        .arg("--help")
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&help.stdout).contains("--initramfs"));
}
