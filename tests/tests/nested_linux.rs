//! The nested Linux acceptance suite: stock Linux guests on real (nested
//! SVM) KVM inside a QEMU TCG L1, driving iovmm's virtio-iommu, VT-d,
//! virtio-pci and MSI-X with their own drivers, against DPDK testpmd and
//! our backend. See `tests/src/nested/` and `resources/build-nested-l1.sh`.
//!
//! Needs the L1 image (`bash resources/build-nested-l1.sh`) and QEMU
//! (`resources/install-deps.sh --with-qemu`); it fails, naming the missing
//! piece, without them.

use integration_tests::nested::{acceptance, run_suite, NestedImage, RunOptions};
use iommu::error::chain;

#[test]
fn linux_drives_iovmm_devices_on_nested_kvm() {
    let img = NestedImage::locate().unwrap_or_else(|e| panic!("{e}", e = chain(&e)));
    let opts = RunOptions {
        verbose: std::env::var_os("IOVMM_NESTED_VERBOSE").is_some(),
        ..RunOptions::default()
    };
    let suite =
        run_suite(&img, acceptance(), &opts).unwrap_or_else(|e| panic!("{e}", e = chain(&e)));
    let summary = suite.summary();
    eprintln!("{summary}");
    assert!(suite.passed(), "nested acceptance suite failed:\n{summary}");
}
