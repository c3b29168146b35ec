//! The QEMU 7.2 reference side of the benchmark: one short run per variant.
//! Ignored by default (TCG Linux boot, ~10-30 s each); run with
//! `cargo test -p integration-tests --test qemu_baseline -- --ignored --nocapture`
//! after `resources/fetch-qemu72.sh` and `resources/build-linux-guest.sh`.

use integration_tests::qemu::{self, GuestMode, QemuBackend, QemuConfig, QemuIommu, QemuRun};
use iommu::error::chain;

const FRAMES: u64 = 2000;

fn report(r: &QemuRun) {
    let c = &r.config;
    eprintln!(
        "QEMU 7.2 {:?} (ats {}) {:?} {:?}:",
        c.iommu, c.ats, c.mode, c.backend
    );
    eprintln!(
        "  frames sent {} received {}, guest {:.0} frames/s (send {:?}, drain {:?}, retries {})",
        r.guest.frames,
        r.frames_received,
        r.guest.frames_per_sec(),
        r.guest.send,
        r.guest.drain,
        r.guest.retries
    );
    if let Some(i) = r.iotlb {
        eprintln!(
            "  per frame: misses {:.3} updates {:.3} invalidates {:.3} (totals {} / {} / {})",
            r.per_frame(i.misses),
            r.per_frame(i.updates),
            r.per_frame(i.invalidates),
            i.misses,
            i.updates,
            i.invalidates
        );
    }
    let q = &r.qemu_misses;
    eprintln!(
        "  QEMU trace: misses {} answered {} failed {}",
        q.received, q.answered, q.failed
    );
    if let Some(l) = q.service {
        eprintln!(
            "  QEMU-side miss handling (trace, 1 us resolution): p50={:?} p99={:?} max={:?}",
            l.p50, l.p99, l.max
        );
    }
    if let Some(l) = r.miss_latency {
        eprintln!(
            "  miss service latency: n={} p50={:?} p99={:?} max={:?}",
            l.count, l.p50, l.p99, l.max
        );
    }
    eprintln!(
        "  QEMU VmHWM {} KiB, VmRSS {} KiB, wall {:?}, boot {:?}",
        r.vm_hwm_kib, r.vm_rss_kib, r.wall, r.boot
    );
}

fn run(iommu: QemuIommu, mode: GuestMode, backend: QemuBackend) -> QemuRun {
    run_with(QemuConfig::new(iommu, mode, backend))
}

fn run_with(mut c: QemuConfig) -> QemuRun {
    c.frames = FRAMES;
    c.timeout = std::time::Duration::from_secs(120);
    let r = qemu::run(&c).unwrap_or_else(|e| panic!("QEMU run failed: {e}", e = chain(&e)));
    report(&r);
    assert_eq!(r.guest.frames, FRAMES, "guest could not send every frame");
    assert_eq!(
        r.frames_received, FRAMES,
        "back end did not receive every frame"
    );
    assert!(r.vm_hwm_kib > 0, "no RSS sample taken");
    assert!(matches!(r.translation_failures, None | Some(0)), "{r:?}");
    r
}

#[test]
#[ignore = "slow: boots Linux under QEMU 7.2 TCG"]
fn qemu72_intel_iommu_strict_own_backend() {
    let r = run(QemuIommu::IntelIommu, GuestMode::Strict, QemuBackend::Own);
    let i = r
        .iotlb
        .unwrap_or_else(|| panic!("own back end gives counters"));
    // Strict mode: every frame's buffer is freshly mapped (a miss) and unmapped (an invalidation).
    assert!(i.misses >= FRAMES / 2, "{i:?}");
    assert!(
        i.updates >= i.misses && i.invalidates >= FRAMES / 2,
        "{i:?}"
    );
    // QEMU also runs its miss handler once per vring at start to push an
    // unsolicited UPDATE for the used ring: those count as trace misses and
    // back-end UPDATEs but not as back-end MISSes.
    assert!(r.qemu_misses.received >= i.misses, "{:?}", r.qemu_misses);
    assert_eq!(
        r.qemu_misses.answered, i.updates,
        "every UPDATE answers a miss"
    );
    let l = r
        .miss_latency
        .unwrap_or_else(|| panic!("misses were timed"));
    assert!(l.count > 0 && l.count as u64 <= i.misses, "{l:?} for {i:?}");
    assert!(l.p50 <= l.p99 && l.p99 <= l.max);
}

#[test]
#[ignore = "slow: boots Linux under QEMU 7.2 TCG"]
fn qemu72_intel_iommu_without_ats_strict_own_backend() {
    let mut c = QemuConfig::new(QemuIommu::IntelIommu, GuestMode::Strict, QemuBackend::Own);
    c.ats = false;
    let r = run_with(c);
    let i = r
        .iotlb
        .unwrap_or_else(|| panic!("own back end gives counters"));
    assert!(
        i.misses >= FRAMES / 2 && i.invalidates >= FRAMES / 2,
        "{i:?}"
    );
}

#[test]
#[ignore = "slow: boots Linux under QEMU 7.2 TCG"]
fn qemu72_virtio_iommu_strict_own_backend() {
    let r = run(QemuIommu::VirtioIommu, GuestMode::Strict, QemuBackend::Own);
    let i = r
        .iotlb
        .unwrap_or_else(|| panic!("own back end gives counters"));
    assert!(
        i.misses >= FRAMES / 2 && i.invalidates >= FRAMES / 2,
        "{i:?}"
    );
}

#[test]
#[ignore = "slow: boots Linux under QEMU 7.2 TCG"]
fn qemu72_intel_iommu_passthrough_own_backend() {
    let r = run(
        QemuIommu::IntelIommu,
        GuestMode::Passthrough,
        QemuBackend::Own,
    );
    let i = r
        .iotlb
        .unwrap_or_else(|| panic!("own back end gives counters"));
    // QEMU answers pass-through misses with 4 KiB identity entries: few
    // distinct pages, so far fewer misses than frames, but never zero.
    assert!(i.misses > 0, "{i:?}");
}

#[test]
#[ignore = "slow: boots Linux under QEMU 7.2 TCG and runs testpmd"]
fn qemu72_intel_iommu_strict_testpmd() {
    let r = run(
        QemuIommu::IntelIommu,
        GuestMode::Strict,
        QemuBackend::Testpmd,
    );
    assert!(r.qemu_misses.received > 0, "{:?}", r.qemu_misses);
    assert!(r.qemu_misses.service.is_some(), "trace has timestamps");
}

#[test]
#[ignore = "slow: boots Linux under QEMU 7.2 TCG"]
fn qemu72_intel_iommu_lazy_own_backend() {
    let r = run(QemuIommu::IntelIommu, GuestMode::Lazy, QemuBackend::Own);
    let i = r
        .iotlb
        .unwrap_or_else(|| panic!("own back end gives counters"));
    assert!(i.misses > 0 && i.invalidates > 0, "{i:?}");
}
