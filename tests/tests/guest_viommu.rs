//! The test guest's DMA layer and vIOMMU drivers under iovmm: the `dma-map` scenario without a
//! vIOMMU, and the virtio-iommu driver's handshake with the VMM's virtio-iommu. Runs that need
//! an endpoint behind the vIOMMU (a vhost-user device) live with the vhost-user tests.

use std::time::Duration;

use integration_tests::guest::{
    test_guest_path, AtsMode, GuestResult, IommuMode, Scenario, ViommuKind, EXIT_FAILED, EXIT_OK,
    EXIT_UNSUPPORTED, EXIT_USAGE,
};
use vmm::config::IommuConfig;
use vmm::{SerialMode, VmConfig, VmExit, Vmm};

const TIMEOUT: Duration = Duration::from_secs(30);

fn run(scenario: &Scenario, iommu: Option<&str>) -> (VmExit, GuestResult, String) {
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = scenario.cmdline().expect("valid scenario");
    cfg.serial = SerialMode::Capture;
    cfg.iommu = iommu.map(|s| s.parse::<IommuConfig>().expect("valid --iommu"));
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
