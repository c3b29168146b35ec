//! The busy-poll window A/B (`iovmm-bench --poll-ab 0,P`): the same TX cells with
//! `--vhost-user ...,poll_us=P` for every P given, interleaved (rep 1 of every variant, then
//! rep 2, ...) so that the shared machine's load drifts over all of them alike.
//!
//! Per variant the medians over the repetitions (and min–max) of: miss p50/p99 at our backend,
//! iovmm's mean miss service time, iovmm's mean INVALIDATE notification time, the guest's time
//! per frame, and the price of the window: the CPU the busy-polling waits burnt per frame
//! (iovmm's `poll_spin_ns`, measured with the thread CPU clock) and the whole process's CPU per
//! frame (iovmm, the own back end's threads and the guest's vCPU all run in this process).

use std::path::Path;
use std::time::Duration;

use iommu::sync::lock;
use vmm::VhostUserStats;

use super::{viommu_name, BenchBackend, CellResult};
use crate::backend::{BackendConfig, TestBackend};
use crate::dpdk::Testpmd;
use crate::guest::GuestResult;
use crate::matrix::{
    assert_connection_invalidates, assert_invalidates_honoured, socket, Cell, Outcome, VmRun,
    ONE_CELL,
};

/// CPU time of this process so far (user + system, every thread).
fn process_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, exclusively borrowed rusage; getrusage only writes it.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Boots `cell` against the back end on `sock` with `poll_us`; the checks of the matrix's
/// `run_guest` (guest done, one connection INVALIDATE per activation).
fn run_guest_polled(cell: &Cell, sock: &Path, poll_us: u64) -> (GuestResult, VhostUserStats) {
    let mut config = cell.vm_config_with(sock, cell.traffic.scenario(cell));
    for d in &mut config.vhost_user {
        d.poll_us = poll_us;
    }
    let run = VmRun::boot(cell, &config, Duration::from_secs(60));
    let result = run.ok_result(cell);
    cell.traffic.assert_guest_done(cell, &result, &run.serial);
    assert_connection_invalidates(true, &run.stats);
    (result, run.stats)
}

fn run_own_polled(cell: &Cell, poll_us: u64) -> Outcome {
    let _one = lock(&ONE_CELL);
    let config = BackendConfig {
        access_platform: true,
        miss_timeout: Duration::from_secs(10),
        ..BackendConfig::default()
    };
    let sock = socket(&cell.tag("own-poll"));
    let backend = TestBackend::listen(&sock, config).expect("backend listens");
    let (result, stats) = run_guest_polled(cell, &sock, poll_us);
    assert!(backend.wait_for(Duration::from_secs(5), |c| c.tx_frames == cell.frames));
    let c = backend.counters();
    assert_eq!(c.translation_failures, 0);
    // The back end checked the security invariant at every INVALIDATE.
    assert_invalidates_honoured(&backend);
    Outcome {
        result,
        stats,
        backend: Some(c),
        dpdk: None,
        backend_miss_latency: backend.miss_latency(),
    }
}

fn run_dpdk_polled(cell: &Cell, poll_us: u64) -> Outcome {
    let _one = lock(&ONE_CELL);
    let sock = socket(&cell.tag("dpdk-poll"));
    let mut pmd = Testpmd::start(&sock, true).expect("testpmd starts");
    let (result, stats) = run_guest_polled(cell, &sock, poll_us);
    let port = crate::matrix::port_stats_after(&mut pmd, cell.frames);
    assert_eq!(port.rx_packets, cell.frames);
    Outcome {
        result,
        stats,
        backend: None,
        dpdk: Some(port),
        backend_miss_latency: None,
    }
}

/// One run of a TX `cell` with `poll_us`; the process CPU it took.
pub fn run_cell_polled(
    cell: Cell,
    backend: BenchBackend,
    poll_us: u64,
) -> Result<(CellResult, Duration), String> {
    let cpu0 = process_cpu();
    let run = std::panic::AssertUnwindSafe(|| match backend {
        BenchBackend::Own => run_own_polled(&cell, poll_us),
        BenchBackend::Dpdk => run_dpdk_polled(&cell, poll_us),
    });
    let outcome = std::panic::catch_unwind(run).map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "cell failed".into())
    })?;
    let cpu = process_cpu().saturating_sub(cpu0);
    Ok((
        CellResult {
            cell,
            backend,
            outcome,
        },
        cpu,
    ))
}

/// What one run of one variant measured (µs; `None`: not measured in this cell).
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    miss_p50: Option<f64>,
    miss_p99: Option<f64>,
    iovmm_miss: Option<f64>,
    inv: Option<f64>,
    frame: Option<f64>,
    spin_per_frame: f64,
    cpu_per_frame: f64,
    hit_ratio: Option<f64>,
}

impl Sample {
    fn of(r: &CellResult, cpu: Duration, tsc_khz: u64) -> Self {
        let s = &r.outcome.stats;
        let frames = r.cell.frames.max(1) as f64;
        let fps = r.frames_per_sec(tsc_khz);
        let lat = r.outcome.backend_miss_latency.as_ref();
        let mean = |h: &devices::vhost_user::stats::LatencySummary| {
            (h.count > 0).then(|| h.mean_ns as f64 / 1000.0)
        };
        let polls = s.iotlb.poll_hits + s.iotlb.poll_blocks;
        Sample {
            miss_p50: lat.map(|l| l.p50.as_secs_f64() * 1e6),
            miss_p99: lat.map(|l| l.p99.as_secs_f64() * 1e6),
            iovmm_miss: mean(&s.bridge.miss_latency),
            inv: mean(&s.bridge.invalidate_latency),
            frame: (fps > 0.0).then(|| 1e6 / fps),
            spin_per_frame: s.iotlb.poll_spin_ns as f64 / 1000.0 / frames,
            cpu_per_frame: cpu.as_secs_f64() * 1e6 / frames,
            hit_ratio: (polls > 0).then(|| s.iotlb.poll_hits as f64 / polls as f64),
        }
    }
}

/// Median and range of the known values.
fn summary(v: impl Iterator<Item = Option<f64>>, prec: usize) -> String {
    let mut v: Vec<f64> = v.flatten().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return "-".into();
    }
    v.sort_by(f64::total_cmp);
    let med = v[v.len() / 2];
    if v.len() == 1 {
        return format!("{med:.prec$}");
    }
    format!("{med:.prec$} ({:.prec$}-{:.prec$})", v[0], v[v.len() - 1])
}

/// Runs every TX `cell` (strict and lazy cells behind a vIOMMU are the ones with misses) on
/// every backend with every `polls` value, `reps` times interleaved, and prints the A/B table.
/// Returns the failures.
pub fn poll_ab(
    cells: &[Cell],
    backends: &[BenchBackend],
    polls: &[u64],
    reps: usize,
    tsc_khz: u64,
) -> Vec<String> {
    let mut samples: Vec<(Cell, BenchBackend, u64, Vec<Sample>)> = Vec::new();
    for c in cells {
        for &b in backends {
            for &p in polls {
                samples.push((*c, b, p, Vec::new()));
            }
        }
    }
    let mut failures = Vec::new();
    for rep in 0..reps {
        for (cell, backend, poll, runs) in samples.iter_mut() {
            match run_cell_polled(*cell, *backend, *poll) {
                Ok((r, cpu)) => runs.push(Sample::of(&r, cpu, tsc_khz)),
                Err(e) => failures.push(format!(
                    "poll A/B rep {rep} {} {} {backend:?} poll_us={poll}: {}",
                    viommu_name(cell.viommu),
                    cell.mode.as_str(),
                    e.lines().next().unwrap_or_default()
                )),
            }
        }
    }
    println!(
        "\n== Busy-poll window A/B (--vhost-user ...,poll_us=P; {reps} interleaved runs each, median (min-max), us)"
    );
    println!(
        "| vIOMMU | mode | back | poll_us | runs | miss p50 | miss p99 | iovmm miss | inv mean | frame | spin CPU/frame | process CPU/frame | spin hits |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (cell, backend, poll, runs) in &samples {
        let col = |f: fn(&Sample) -> Option<f64>, prec| summary(runs.iter().map(f), prec);
        println!(
            "| {} | {} | {} | {poll} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            viommu_name(cell.viommu),
            cell.mode.as_str(),
            match backend {
                BenchBackend::Own => "own",
                BenchBackend::Dpdk => "dpdk",
            },
            runs.len(),
            col(|s| s.miss_p50, 1),
            col(|s| s.miss_p99, 1),
            col(|s| s.iovmm_miss, 1),
            col(|s| s.inv, 1),
            col(|s| s.frame, 1),
            col(|s| Some(s.spin_per_frame), 1),
            col(|s| Some(s.cpu_per_frame), 1),
            col(|s| s.hit_ratio, 2),
        );
    }
    failures
}
