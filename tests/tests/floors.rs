//! The benchmark's floors run end to end: the `exit-bench` guest boots and reports every exit kind,
//! the socket and eventfd floors produce their samples. No timing is asserted (speed goals live in
//! the benchmark's table, docs/benchmark.md), only that each floor was measured and is ordered.

use integration_tests::bench::floor::{guest_exits, Floors, Wait};
use integration_tests::bench::host_tsc_khz;

#[test]
fn every_floor_is_measured() {
    let tsc_khz = host_tsc_khz();
    let f = Floors::measure(200, tsc_khz);
    for (name, s) in [
        ("socket blocking", &f.socket_blocking),
        ("socket spinning", &f.socket_spinning),
        ("eventfd", &f.eventfd),
    ] {
        let s = s.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.count, 200, "{name}");
        assert!(s.min <= s.p50 && s.p50 <= s.p99, "{name}: {s:?}");
    }
    let e = f.exits.as_ref().expect("exit-bench guest");
    let mmio = e.mmio_write.expect("MMIO exits measured");
    let cpuid = e.cpuid.expect("CPUID exits measured");
    for s in [e.pio_out, e.pio_in, mmio, cpuid, e.rdtsc] {
        assert_eq!(s.count, 200);
        assert!(s.min <= s.p50 && s.p50 <= s.p99, "{s:?}");
    }
    assert!(f.socket_p50(Wait::Blocking).is_some() && f.kernel_exit_p50().is_some());
}

#[test]
fn exit_bench_without_a_tsc_rate_reports_no_times() {
    // The guest still runs; the host cannot turn its cycles into time.
    assert!(guest_exits(10, 0).is_err());
}
