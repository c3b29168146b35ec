//! The security invariant end to end for virtio-blk: after the guest's strict unmap completed, no
//! backend still holds that translation. The fast test guest's `blk-stale` scenario writes and
//! reads one region normally (the backend caches translations for both data buffers), unmaps
//! them and a marker-filled buffer it never queued, then posts an OUT from each of the two stale
//! source buffers (one now holding the marker, one mapped with the marker before its unmap) and
//! an IN into the stale destination buffer, then normal requests again.
//!
//! Behind virtio-iommu, VT-d, and VT-d with a device-IOTLB and ATS, all strict, this checks:
//! iovmm refused the backend's misses at the stale IOVAs and reported them as faults (its
//! counters and the guest's vIOMMU fault record), the stale requests completed with IOERR, the
//! marker never reached the disk image, the stale IN left guest memory alone, the device kept
//! working, and the backend had held and then lost the stale translations before the requests
//! came (so the refusal is the invalidation's work, not a translation it never had).
//! qemu-storage-daemon has no IOTLB support, so it is not part of this.

use devices::vhost_user::wire::{Grants, IotlbMsg, IotlbPerm, IotlbType};
use integration_tests::blk::pattern;
use integration_tests::blk::stale::{run_stale, StaleOutcome, STALE_MARKER, STALE_SIZE};
use integration_tests::guest::EXIT_OK;
use integration_tests::matrix::Viommu;
use vmm::VmExit;

/// The stale requests, by their result-line prefix.
const STALE: [&str; 3] = ["stale_out", "stale_marker", "stale_in"];
const VIRTIO_BLK_S_IOERR: u64 = 1;
/// The guest's pattern seed (`iovmm.seed` default).
const SEED: u64 = 1;
const SECTOR: u64 = 512;
const PAGE: u64 = 0x1000;

fn field(o: &StaleOutcome, key: &str) -> u64 {
    o.result
        .u64(key)
        .unwrap_or_else(|| panic!("no {key} in {:?}", o.result))
}

fn iova(o: &StaleOutcome, name: &str) -> u64 {
    field(o, &format!("{name}_iova"))
}

/// The guest completed every stale request with IOERR, kept its poison in the stale IN buffer,
/// did not find the marker when it read the stale OUTs' regions back, and its normal requests
/// before and after worked.
fn assert_guest_verdict(o: &StaleOutcome) {
    let r = &o.result;
    assert_eq!(o.exit, VmExit::ExitPort(EXIT_OK as u32), "{}", o.serial);
    assert_eq!(
        (r.test(), r.status()),
        (Some("blk-stale"), Some("ok")),
        "{r:?}"
    );
    assert_eq!(r.str("iommu_mode"), Some("strict"), "{r:?}");
    assert_eq!(r.str("marker").map(str::as_bytes), Some(STALE_MARKER));
    assert_eq!(field(o, "stale_completed"), 3, "{r:?}");
    for name in STALE {
        assert_eq!(
            field(o, &format!("{name}_status")),
            VIRTIO_BLK_S_IOERR,
            "{name}: {r:?}"
        );
    }
    assert_eq!(
        field(o, "stale_in_intact"),
        1,
        "device wrote a stale IN buffer"
    );
    assert_eq!(field(o, "marker_on_disk"), 0, "{r:?}");
    assert_eq!(
        (field(o, "normal_ok"), field(o, "after_ok")),
        (1, 1),
        "{r:?}"
    );
}

/// The disk holds the pattern in the normal and after regions, zeros everywhere else, and the
/// marker nowhere.
fn assert_image(o: &StaleOutcome) {
    let img = &o.image;
    assert!(
        !img.windows(STALE_MARKER.len()).any(|w| w == STALE_MARKER),
        "the marker reached the disk image"
    );
    let region = |key: &str| {
        let start = field(o, key) * SECTOR;
        start..start + STALE_SIZE
    };
    let written = [region("normal_sector"), region("after_sector")];
    let stale = [region("stale_out_sector"), region("stale_marker_sector")];
    for r in &stale {
        assert!(written.iter().all(|w| w.end <= r.start || r.end <= w.start));
    }
    for (i, w) in img.chunks_exact(8).enumerate() {
        let off = 8 * i as u64;
        let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        let want = if written.iter().any(|r| r.contains(&off)) {
            pattern(off, SEED)
        } else {
            0
        };
        assert_eq!(v, want, "disk word at {off:#x}");
    }
}

/// Each stale request cost exactly one miss, refused by iovmm and reported as a fault, and
/// nothing else was refused; the backend failed those requests as faults and moved no byte.
fn assert_counters(o: &StaleOutcome) {
    let (s, b, blk) = (&o.stats.bridge, &o.backend, &o.blk);
    assert_eq!((s.misses_refused, s.faults), (3, 3), "{s:?}");
    assert_eq!(s.invalidation_failures, 0, "{s:?}");
    assert_eq!((b.miss_nacks, b.translation_failures), (3, 3), "{b:?}");
    assert_eq!(
        (blk.faulted, blk.ioerrs, blk.status_lost),
        (3, 3, 0),
        "{blk:?}"
    );
    // The normal OUT and the after OUT; the normal IN, the after IN and two read-backs.
    assert_eq!((blk.writes, blk.reads), (2, 4), "{blk:?}");
    assert_eq!(
        (blk.bytes_written, blk.bytes_read),
        (2 * STALE_SIZE, 4 * STALE_SIZE),
        "{blk:?}"
    );
}

/// The guest's vIOMMU reported the three faults: virtio-iommu sent one event per stale
/// request (the guest keeps the last: the IN's write), VT-d recorded three faults (the guest
/// reports the first record: the first OUT's read, at page granularity).
fn assert_guest_fault(viommu: Viommu, o: &StaleOutcome) {
    let addr = field(o, "fault_addr");
    match viommu {
        Viommu::Virtio => {
            assert_eq!(field(o, "fault_events"), 3, "{:?}", o.result);
            assert_eq!(addr, iova(o, "stale_in"), "{:?}", o.result);
            // VIRTIO_IOMMU_FAULT_F_WRITE, not READ.
            assert_eq!(field(o, "fault_flags") & 3, 2, "{:?}", o.result);
        }
        _ => {
            assert_eq!(field(o, "faults"), 3, "{:?}", o.result);
            assert_eq!(addr, iova(o, "stale_out") & !(PAGE - 1), "{:?}", o.result);
            assert_eq!(field(o, "fault_write"), 0, "{:?}", o.result);
        }
    }
}

fn is(m: &IotlbMsg, t: IotlbType) -> bool {
    m.kind().is_ok_and(|k| k == t)
}

/// The backend was sent a translation of `iova` granting `perm`, and it was invalidated before
/// any other UPDATE covered `iova` again (the next one can only come after the stale requests,
/// when the after requests reuse the IOVA).
fn assert_held_then_invalidated(o: &StaleOutcome, name: &str, perm: IotlbPerm) {
    let at = iova(o, name);
    let covers = |m: &IotlbMsg| m.iova <= at && at - m.iova < m.size;
    let msgs: Vec<&IotlbMsg> = o.iotlb.iter().filter(|m| covers(m)).collect();
    let first = msgs
        .iter()
        .position(|m| is(m, IotlbType::Update))
        .unwrap_or_else(|| panic!("{name}: no UPDATE covered {at:#x}: {msgs:?}"));
    let granted = msgs[first].permission().expect("permission");
    assert!(granted.allows(perm), "{name}: UPDATE {:?}", msgs[first]);
    assert!(
        msgs.get(first + 1)
            .is_some_and(|m| is(m, IotlbType::Invalidate)),
        "{name}: the UPDATE of {at:#x} was not followed by its INVALIDATE: {msgs:?}"
    );
}

fn check(viommu: Viommu) -> StaleOutcome {
    let o = run_stale(viommu);
    assert_guest_verdict(&o);
    assert_image(&o);
    assert_counters(&o);
    assert_guest_fault(viommu, &o);
    assert_held_then_invalidated(&o, "stale_out", IotlbPerm::ReadOnly);
    assert_held_then_invalidated(&o, "stale_in", IotlbPerm::WriteOnly);
    eprintln!(
        "{viommu:?}: misses {} refused {} faults {} invalidations {} devtlb {}; backend nacks {} \
         faulted {} ioerrs {}",
        o.stats.bridge.misses,
        o.stats.bridge.misses_refused,
        o.stats.bridge.faults,
        o.stats.iotlb.invalidations,
        o.stats.bridge.devtlb_notifications,
        o.backend.miss_nacks,
        o.blk.faulted,
        o.blk.ioerrs
    );
    o
}

#[test]
fn stale_requests_fail_behind_virtio_iommu() {
    let o = check(Viommu::Virtio);
    assert_eq!(o.result.str("viommu"), Some("virtio-iommu"));
}

#[test]
fn stale_requests_fail_behind_vtd() {
    let o = check(Viommu::Vtd {
        dt: false,
        ats_cap: false,
    });
    assert_eq!(o.result.str("viommu"), Some("vt-d"));
    assert_eq!(o.result.u64("ats"), Some(0));
}

#[test]
fn stale_requests_fail_behind_vtd_with_device_iotlb_and_ats() {
    let o = check(Viommu::Vtd {
        dt: true,
        ats_cap: true,
    });
    assert_eq!(o.result.u64("ats"), Some(1), "the guest enabled ATS");
    // The invalidations reached the backend through device-TLB invalidations.
    assert!(o.stats.bridge.devtlb_notifications > 0, "{:?}", o.stats);
}
