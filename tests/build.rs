//! Builds the fast test guest (tests/guest: freestanding C and assembly) with the system gcc and
//! exports its path as `IOVMM_TEST_GUEST`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_DIR: &str = "guest";
const SOURCES: &[&str] = &[
    "boot.S",
    "lib.c",
    "exception.c",
    "env.c",
    "pci.c",
    "iova.c",
    "acpi.c",
    "dma.c",
    "viommu.c",
    "vtd.c",
    "virtio.c",
    "net.c",
    "netmq.c",
    "blk.c",
    "rx.c",
    "dmatest.c",
    "exitbench.c",
    "smp.c",
    "main.c",
];
const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-no-pie",
    "-fno-pic",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-O2",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guest_dir = manifest_dir.join(GUEST_DIR);
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={GUEST_DIR}");
    println!("cargo:rerun-if-env-changed=IOVMM_GUEST_CC");

    let elf = out_dir.join("iovmm-test-guest.elf");
    build_guest(&guest_dir, &elf);
    println!("cargo:rustc-env=IOVMM_TEST_GUEST={}", elf.display());
}

fn build_guest(guest_dir: &Path, elf: &Path) {
    let cc = env::var("IOVMM_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    let mut cmd = Command::new(&cc);
    cmd.current_dir(guest_dir)
        .args(CFLAGS)
        .arg("-T")
        .arg("linker.ld")
        .arg("-o")
        .arg(elf)
        .args(SOURCES);
    let output = match cmd.output() {
        Ok(output) => output,
        Err(err) => panic!(
            "cannot run `{cc}` to build the test guest ({err}); install the build dependencies with \
             resources/install-deps.sh (it installs gcc), or point IOVMM_GUEST_CC at a gcc"
        ),
    };
    if !output.status.success() {
        panic!(
            "building the test guest in {} with `{cc}` failed ({}):\n{}{}",
            guest_dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
