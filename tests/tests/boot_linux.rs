//! Boots the Debian 6.12 cloud kernel (built by resources/build-linux-guest.sh)
//! under iovmm and checks its first console lines.
//!
//! On these kvm-pvm machines guest ring-0 code is emulated instruction by
//! instruction and Linux dies in its early int3 self-test, so the test stops
//! at the `Linux version` banner. When the host CPU has VMX or SVM (KVM runs
//! ring 0 natively) the same test continues to the initramfs marker and
//! expects an ACPI power-off.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm::{SerialMode, VmConfig, VmExit, Vmm};

const BANNER: &str = "Linux version";
const MARKER: &str = "IOVMM-GUEST-READY";
const BANNER_TIMEOUT: Duration = Duration::from_secs(240);
const MARKER_TIMEOUT: Duration = Duration::from_secs(300);

fn artefact(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../resources/out")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `bash resources/build-linux-guest.sh` first (see README)",
        p.display()
    );
    p
}

/// True when KVM can run guest ring-0 code natively (hardware virtualisation).
fn host_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|s| {
            s.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

fn wait_for(vmm: &Vmm, needle: &str, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if vmm.serial_output().is_some_and(|s| s.contains(needle)) {
            return Some(vmm.uptime());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn linux_vmlinux_prints_its_banner() {
    let mut cfg = VmConfig::new(artefact("vmlinux"));
    cfg.initramfs = Some(artefact("initramfs.cpio.gz"));
    cfg.cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave reboot=k panic=-1 \
                   tsc=reliable no_timer_check rdinit=/init"
        .into();
    cfg.memory = "512M".parse().expect("size");
    cfg.serial = SerialMode::Capture;
    let mut vmm = Vmm::start(&cfg).expect("VM starts");
    let banner = wait_for(&vmm, BANNER, BANNER_TIMEOUT);
    let out = vmm.serial_output().unwrap_or_default();
    let banner = banner.unwrap_or_else(|| {
        panic!("no `{BANNER}` within {BANNER_TIMEOUT:?}; serial output:\n{out}")
    });
    let line = out.lines().find(|l| l.contains(BANNER)).unwrap_or_default();
    assert!(line.contains("6.12"), "unexpected kernel: {line}");
    eprintln!("linux: `{BANNER}` after {banner:.2?}: {line}");
    if !host_has_hw_virt() {
        eprintln!("linux: host has no VMX/SVM (kvm-pvm): stopping at the banner");
        vmm.stop();
        assert_eq!(vmm.wait().expect("VMM stops"), VmExit::Stopped);
        return;
    }
    let marker = wait_for(&vmm, MARKER, MARKER_TIMEOUT);
    let out = vmm.serial_output().unwrap_or_default();
    assert!(marker.is_some(), "no `{MARKER}`; serial output:\n{out}");
    eprintln!("linux: `{MARKER}` after {:.2?}", marker.unwrap_or_default());
    assert_eq!(
        vmm.wait_timeout(MARKER_TIMEOUT).expect("stops"),
        VmExit::PowerOff
    );
}
