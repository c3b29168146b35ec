//! The test guest's DMA layer and vIOMMU drivers under iovmm, through the `dma-map` scenario
//! (map/unmap cycles without device DMA): without a vIOMMU, and against the VMM's virtio-iommu
//! with a vhost-user virtio-net function (served by the test backend) as the endpoint, checking
//! the exact request pattern of each mode; the same against the VT-d unit (queued-invalidation
//! descriptor pattern, table depth); and the fault path of both (a frame queued at a never-mapped
//! IOVA). Frame transmission per mode is covered by `net_virtio_iommu.rs` and `net_vtd.rs`.

use std::path::PathBuf;
use std::time::Duration;

use integration_tests::backend::{BackendConfig, BackendHandle, TestBackend};
use integration_tests::guest::{
    test_guest_path, AtsMode, GuestResult, IommuMode, LazyFlush, Scenario, ViommuKind, EXIT_FAILED,
    EXIT_OK, EXIT_UNSUPPORTED, EXIT_USAGE, VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_PROBE,
};
use vmm::config::IommuConfig;
use vmm::{SerialMode, VmConfig, VmExit, Vmm};

const TIMEOUT: Duration = Duration::from_secs(30);

fn run(scenario: &Scenario, iommu: Option<&str>) -> (VmExit, GuestResult, String) {
    run_with(scenario, iommu, None)
}

fn run_with(
    scenario: &Scenario,
    iommu: Option<&str>,
    vhost_user: Option<&PathBuf>,
) -> (VmExit, GuestResult, String) {
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = scenario.cmdline().expect("valid scenario");
    cfg.serial = SerialMode::Capture;
    cfg.iommu = iommu.map(|s| s.parse::<IommuConfig>().expect("valid --iommu"));
    if let Some(sock) = vhost_user {
        let opt = format!("net,socket={},iommu=on", sock.display());
        cfg.vhost_user.push(opt.parse().expect("vhost-user option"));
    }
    let mut vmm = Vmm::start(&cfg).expect("VM starts");
    let exit = vmm.wait_timeout(TIMEOUT).expect("VMM stops cleanly");
    let out = vmm.serial_output().unwrap_or_default();
    let result = GuestResult::from_output(&out).unwrap_or_else(|e| panic!("{e}; serial:\n{out}"));
    (exit, result, out)
}

fn exit_code(code: i32) -> VmExit {
    VmExit::ExitPort(code as u32)
}

#[test]
fn dma_map_with_iommu_off_counts_every_map_and_unmap() {
    let s = Scenario::dma_map(200, 6000)
        .iommu(IommuMode::Off)
        .inflight(4);
    let (exit, r, out) = run(&s, None);
    assert_eq!(exit, exit_code(EXIT_OK), "serial:\n{out}");
    let st = r.dma_stats().expect("dma fields");
    assert_eq!((st.maps, st.unmaps), (800, 800));
    assert_eq!((st.iommu_reqs, st.iommu_syncs, st.flushes), (0, 0, 0));
    assert_eq!(st.viommu, "none");
    assert!(st.cycles_per_map().is_some());
}

#[test]
fn translated_modes_without_a_viommu_are_unsupported() {
    for mode in [IommuMode::Strict, IommuMode::Lazy, IommuMode::Passthrough] {
        let (exit, r, out) = run(&Scenario::dma_map(1, 64).iommu(mode), None);
        assert_eq!(
            exit,
            exit_code(EXIT_UNSUPPORTED),
            "{mode:?}, serial:\n{out}"
        );
        assert_eq!(r.status(), Some("unsupported"));
        assert!(
            r.str("error").is_some_and(|e| e.contains("no vIOMMU")),
            "{r:?}"
        );
    }
}

#[test]
fn bad_viommu_parameters_are_usage_errors() {
    let s = Scenario::dma_map(1, 64).param("lazy_batch", 0);
    let (exit, r, _) = run(&s, None);
    assert_eq!(exit, exit_code(EXIT_USAGE));
    assert_eq!(r.status(), Some("error"));
    assert!(
        r.str("error").is_some_and(|e| e.contains("lazy_batch")),
        "{r:?}"
    );
    let s = Scenario::dma_map(1, 64).param("viommu", "amd");
    let (exit, r, _) = run(&s, None);
    assert_eq!(exit, exit_code(EXIT_USAGE));
    assert!(
        r.str("error").is_some_and(|e| e.contains("iovmm.viommu")),
        "{r:?}"
    );
    let s = Scenario::dma_map(1, 64).bdf(0, 31, 7);
    let (exit, r, _) = run(&s, None);
    assert_eq!(exit, exit_code(EXIT_USAGE));
    assert_eq!(r.str("error"), Some("no PCI function at iovmm.bdf"));
}

#[test]
fn virtio_iommu_driver_negotiates_and_gets_noent_for_an_unknown_endpoint() {
    // 00:00.0 (the host bridge) is not behind the virtio-iommu: the device must answer the
    // guest's PROBE with S_NOENT and the guest must report it as a failure.
    let s = Scenario::dma_map(1, 64)
        .iommu(IommuMode::Strict)
        .viommu(ViommuKind::Virtio)
        .bdf(0, 0, 0);
    let (exit, r, out) = run(&s, Some("virtio"));
    assert_eq!(exit, exit_code(EXIT_FAILED), "serial:\n{out}");
    assert_eq!(r.str("viommu"), Some("virtio-iommu"), "{r:?}");
    let error = r.str("error").unwrap_or_default();
    assert!(
        error.contains("PROBE") && error.contains("NOENT"),
        "{error}"
    );
    // VERSION_1 (32) and MAP_UNMAP (2) are required; PROBE (4) was used.
    let features = r.u64("viommu_features").expect("features");
    assert_eq!(
        features & (1 << 32 | 1 << 2 | 1 << 4),
        1 << 32 | 1 << 2 | 1 << 4
    );
    assert_eq!(
        (r.u64("iommu_reqs"), r.u64("iommu_syncs")),
        (Some(1), Some(1))
    );
}

#[test]
fn ats_on_is_unsupported_with_the_virtio_iommu() {
    let s = Scenario::dma_map(1, 64)
        .iommu(IommuMode::Strict)
        .ats(AtsMode::On);
    let (exit, r, out) = run(&s, Some("virtio"));
    assert_eq!(exit, exit_code(EXIT_UNSUPPORTED), "serial:\n{out}");
    assert!(
        r.str("error").is_some_and(|e| e.contains("needs VT-d")),
        "{r:?}"
    );
}

fn socket(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("iovmm-gv-{}-{tag}.sock", std::process::id()))
}

/// Runs `dma-map` (2 buffers in flight) for a vhost-user net function (served by a test
/// backend; the guest does no DMA with it: `dma-map` only programs the vIOMMU for its BDF)
/// behind the vIOMMU `kind` configured by `iommu`. The guest found the unit through its ACPI
/// table (VIOT, DMAR) and saw no fault.
fn dma_map_behind(kind: ViommuKind, iommu: &str, tag: &str, scenario: Scenario) -> GuestResult {
    let (name, table, faults) = match kind {
        ViommuKind::Vtd => ("vt-d", "dmar", "faults"),
        _ => ("virtio-iommu", "viot", "fault_events"),
    };
    let sock = socket(tag);
    let _backend = TestBackend::listen(&sock, BackendConfig::default()).expect("backend listens");
    let s = scenario.viommu(kind).inflight(2);
    let (exit, r, out) = run_with(&s, Some(iommu), Some(&sock));
    assert_eq!(exit, exit_code(EXIT_OK), "serial:\n{out}");
    assert_eq!(r.str("viommu"), Some(name));
    assert_eq!(
        r.u64(table),
        Some(1),
        "found through the ACPI {table}: {r:?}"
    );
    assert_eq!(r.u64(faults), Some(0), "{r:?}");
    r
}

/// [`dma_map_behind`] the virtio-iommu.
fn viommu_dma_map(tag: &str, scenario: Scenario) -> GuestResult {
    dma_map_behind(ViommuKind::Virtio, "virtio", tag, scenario)
}

/// Transmits 12 frames behind `iommu` (strict; the guest's driver `kind`, or the one it finds),
/// the fifth from an IOVA the guest never mapped: the device's read of it must fault, so the
/// backend (whose misses time out after 300 ms) stalls the queue there and the guest fails,
/// having sent the 4 frames before it.
fn unmapped_read(tag: &str, iommu: &str, kind: Option<ViommuKind>) -> (GuestResult, BackendHandle) {
    let sock = socket(tag);
    let config = BackendConfig {
        miss_timeout: Duration::from_millis(300),
        ..BackendConfig::default()
    };
    let backend = TestBackend::listen(&sock, config).expect("backend listens");
    let mut s = Scenario::net_tx(12, 200)
        .iommu(IommuMode::Strict)
        .bad_frame(4)
        .timeout_ms(1500);
    if let Some(kind) = kind {
        s = s.viommu(kind);
    }
    let (exit, r, out) = run_with(&s, Some(iommu), Some(&sock));
    assert_eq!(exit, exit_code(EXIT_FAILED), "serial:\n{out}");
    assert_eq!(r.u64("completed"), Some(4), "{r:?}");
    assert_eq!(backend.counters().tx_frames, 4);
    (r, backend)
}

#[test]
fn strict_mode_sends_one_synchronous_map_and_unmap_per_buffer() {
    let r = viommu_dma_map(
        "strict",
        Scenario::dma_map(20, 5000).iommu(IommuMode::Strict),
    );
    let st = r.dma_stats().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((st.maps, st.unmaps), (40, 40));
    // PROBE + ATTACH, then every MAP and UNMAP is its own round trip.
    assert_eq!(st.iommu_reqs, 2 + 40 + 40);
    assert_eq!(st.iommu_syncs, st.iommu_reqs);
    assert_eq!(r.u64("iova_in_use"), Some(0), "every IOVA came back");
    // The MSI window reported by PROBE; DMA domains start above the bypass domain.
    assert_eq!(r.u64("resv_regions"), Some(1));
    assert_eq!(r.u64("domain"), Some(1));
}

#[test]
fn lazy_mode_sends_the_unmaps_together_per_batch() {
    let s = Scenario::dma_map(20, 64)
        .iommu(IommuMode::Lazy)
        .lazy_batch(16);
    let st = viommu_dma_map("lazy", s)
        .dma_stats()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.mode, IommuMode::Lazy);
    // 40 unmaps in batches of 16: two full batches and the final dma_flush.
    assert_eq!(st.flushes, 3);
    assert_eq!(st.iommu_reqs, 2 + 40 + 40);
    assert_eq!(st.iommu_syncs, 2 + 40 + 3);
    assert!(st.flush_cycles > 0, "flushes are timed");
}

#[test]
fn passthrough_attaches_to_the_bypass_domain_when_offered() {
    let r = viommu_dma_map("pt", Scenario::dma_map(5, 64).iommu(IommuMode::Passthrough));
    assert_eq!(r.u64("bypass_attached"), Some(1), "{r:?}");
    assert_eq!(r.u64("domain"), Some(0), "the reserved first domain id");
    let st = r.dma_stats().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((st.iommu_reqs, st.maps), (2, 10), "PROBE + ATTACH only");
}

#[test]
fn passthrough_without_bypass_config_maps_identity_around_the_msi_window() {
    let s = Scenario::dma_map(5, 64)
        .iommu(IommuMode::Passthrough)
        .viommu_withhold(VIRTIO_IOMMU_F_BYPASS_CONFIG);
    let r = viommu_dma_map("ident", s);
    assert_eq!(r.u64("bypass_attached"), Some(0), "{r:?}");
    // Like Linux: one 1:1 MAP below and one above the reserved MSI region.
    assert_eq!(r.u64("identity_maps"), Some(2), "{r:?}");
    assert_eq!(r.u64("iommu_reqs"), Some(4));
}

#[test]
fn without_probe_no_region_is_reported_and_maps_still_work() {
    let s = Scenario::dma_map(5, 64)
        .iommu(IommuMode::Strict)
        .viommu_withhold(VIRTIO_IOMMU_F_PROBE);
    let r = viommu_dma_map("noprobe", s);
    assert_eq!(r.u64("resv_regions"), Some(0), "{r:?}");
    let features = r.u64("viommu_features").unwrap_or_default();
    assert_eq!(features & VIRTIO_IOMMU_F_PROBE, 0, "PROBE was not accepted");
    assert_eq!(
        r.u64("iommu_reqs"),
        Some(1 + 10 + 10),
        "ATTACH + MAPs + UNMAPs"
    );
}

#[test]
fn a_device_read_at_an_unmapped_iova_is_blocked_and_reported_as_a_fault_event() {
    let (r, backend) = unmapped_read("fault", "virtio", None);
    assert!(backend.counters().translation_failures >= 1);
    let bad = r.u64("bad_iova").expect("bad_iova");
    assert_eq!(r.u64("fault_events"), Some(1), "{r:?}");
    assert_eq!(r.u64("fault_addr"), Some(bad));
    assert_eq!(
        r.u64("fault_reason"),
        Some(2),
        "VIRTIO_IOMMU_FAULT_R_MAPPING"
    );
    // READ | ADDRESS: the device read the frame.
    assert_eq!(r.u64("fault_flags"), Some(0x101));
    assert_eq!(r.u64("fault_endpoint"), r.u64("endpoint"));
}

/// [`dma_map_behind`] the VT-d unit configured by `iommu`.
fn vtd_dma_map(tag: &str, iommu: &str, scenario: Scenario) -> GuestResult {
    dma_map_behind(ViommuKind::Vtd, iommu, tag, scenario)
}

/// Boot: global context-cache + global IOTLB invalidation + wait.
const VTD_INIT_DESCS: u64 = 3;

#[test]
fn vtd_strict_mode_invalidates_each_unmap_with_a_psi_and_a_wait() {
    let r = vtd_dma_map(
        "vtd-strict",
        "vtd",
        Scenario::dma_map(20, 5000).iommu(IommuMode::Strict),
    );
    let st = r.dma_stats().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((st.maps, st.unmaps), (40, 40));
    // Maps need no invalidation without caching mode; every unmap is PSI + wait.
    assert_eq!(st.iommu_reqs, VTD_INIT_DESCS + 40 * 2);
    assert_eq!(st.iommu_syncs, 1 + 40);
    assert_eq!(
        (r.u64("levels"), r.u64("tt"), r.u64("did")),
        (Some(4), Some(0), Some(2))
    );
    assert_eq!(r.u64("iova_in_use"), Some(0));
}

#[test]
fn vtd_lazy_flushes_by_domain_or_by_pages_with_one_wait_per_batch() {
    let lazy = |flush| {
        Scenario::dma_map(20, 64)
            .iommu(IommuMode::Lazy)
            .lazy_batch(16)
            .lazy_flush(flush)
    };
    let dom = vtd_dma_map("vtd-lazy-d", "vtd", lazy(LazyFlush::Domain));
    let st = dom.dma_stats().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.flushes, 3, "40 unmaps in batches of 16, then dma_flush");
    assert_eq!(
        st.iommu_reqs,
        VTD_INIT_DESCS + 3 * 2,
        "DSI + wait per batch"
    );
    assert_eq!(st.iommu_syncs, 1 + 3);
    let pages = vtd_dma_map("vtd-lazy-p", "vtd", lazy(LazyFlush::Pages));
    let st = pages.dma_stats().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        st.iommu_reqs,
        VTD_INIT_DESCS + 40 + 3,
        "a PSI per unmap, a wait per batch"
    );
    assert_eq!(st.iommu_syncs, 1 + 3);
}

#[test]
fn vtd_39_bit_unit_gets_three_level_tables() {
    let r = vtd_dma_map(
        "vtd-39",
        "vtd,aw=39",
        Scenario::dma_map(5, 64).iommu(IommuMode::Strict),
    );
    assert_eq!(r.u64("levels"), Some(3), "{r:?}");
}

#[test]
fn vtd_records_a_fault_for_a_device_read_at_an_unmapped_iova() {
    let (r, _backend) = unmapped_read("vtdfault", "vtd", Some(ViommuKind::Vtd));
    let bad = r.u64("bad_iova").expect("bad_iova");
    assert_eq!(r.u64("faults"), Some(1), "{r:?}");
    assert_eq!(r.u64("fsts").map(|f| f & 2), Some(2), "FSTS.PPF");
    assert_eq!(r.u64("fault_addr"), Some(bad));
    assert_eq!(r.u64("fault_write"), Some(0), "the device read the frame");
    // The requester is the net function (the only device on the bus besides the host bridge).
    assert_eq!(r.u64("fault_sid"), Some(1 << 3), "{r:?}");
}
