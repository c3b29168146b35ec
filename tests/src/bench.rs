//! Measurements behind `iovmm-bench`: guest boot time, VMM RSS, per-cell DMA
//! throughput and IOTLB traffic (TX here, RX and loop-back in [`rx`]), and the
//! QEMU 7.2 reference runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm::{SerialMode, VmConfig, VmExit, Vmm};

use crate::backend::latency::LatencyStats;
use crate::guest::{test_guest_path, IommuMode, Scenario};
use crate::matrix::{
    run_dpdk, run_dpdk_loopback, run_own_backend, run_own_backend_rx, Cell, Outcome, Traffic,
    Viommu,
};

pub mod floor;
pub mod memory;
pub mod mq;
pub mod poll;
pub mod ratio;
pub mod rx;

/// The host TSC rate in kHz (the guest's RDTSC runs at the same rate).
pub fn host_tsc_khz() -> u64 {
    let t0 = Instant::now();
    // SAFETY: RDTSC has no memory effects; x86_64 always has it.
    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: as above.
    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
    let us = t0.elapsed().as_micros().max(1) as u64;
    (c1.wrapping_sub(c0)) * 1000 / us
}

/// p50 and p99 of `v` (sorted in place).
pub fn percentiles(v: &mut [Duration]) -> (Duration, Duration) {
    if v.is_empty() {
        return (Duration::ZERO, Duration::ZERO);
    }
    v.sort();
    let at = |q: usize| v[((v.len() - 1) * q) / 100];
    (at(50), at(99))
}

/// Boots the fast test guest `runs` times (start to exit through the exit
/// port, in-process); returns every duration.
pub fn boot_times(runs: usize) -> Vec<Duration> {
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::hello().cmdline().unwrap_or_default();
    cfg.serial = SerialMode::Off;
    (0..runs)
        .filter_map(|_| {
            let t = Instant::now();
            let mut vmm = Vmm::start(&cfg).ok()?;
            let exit = vmm.wait_timeout(Duration::from_secs(10)).ok()?;
            (exit == VmExit::ExitPort(0)).then(|| t.elapsed())
        })
        .collect()
}

/// A sibling binary of the running one (`target/<profile>/NAME`).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// Which backend a bench cell uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchBackend {
    /// Our own backend (exact message counts and miss timing).
    Own,
    /// DPDK testpmd.
    Dpdk,
}

/// One measured cell.
#[derive(Debug)]
pub struct CellResult {
    /// The cell.
    pub cell: Cell,
    /// Its backend.
    pub backend: BenchBackend,
    /// What the run produced.
    pub outcome: Outcome,
}

impl CellResult {
    /// Frames per second the guest achieved (guest TSC time of the whole run).
    pub fn frames_per_sec(&self, tsc_khz: u64) -> f64 {
        let cycles = self.outcome.result.u64("cycles").unwrap_or(0) as f64;
        if cycles == 0.0 || tsc_khz == 0 {
            return 0.0;
        }
        self.cell.frames as f64 / (cycles / (tsc_khz as f64 * 1000.0))
    }

    /// `n` per frame.
    pub fn per_frame(&self, n: u64) -> f64 {
        n as f64 / self.cell.frames.max(1) as f64
    }
}

/// Runs one cell.
///
/// The matrix harness asserts correctness (frames on both sides, payload,
/// no stale translation) by panicking; a failed cell is returned as an error
/// so the rest of the table is still measured.
pub fn run_cell(cell: Cell, backend: BenchBackend) -> Result<CellResult, String> {
    run_cell_full(cell, backend).map_err(|msg| msg.lines().next().unwrap_or_default().to_string())
}

/// Like [`run_cell`], with the whole failure message (the guest's serial
/// output included), which tells a stall from other failures.
pub fn run_cell_full(cell: Cell, backend: BenchBackend) -> Result<CellResult, String> {
    if (backend, cell.traffic) == (BenchBackend::Dpdk, Traffic::Rx) {
        return Err("no testpmd RX-only cell: testpmd loops back (Traffic::Loopback)".into());
    }
    let run = std::panic::AssertUnwindSafe(|| match (backend, cell.traffic) {
        (BenchBackend::Own, Traffic::Tx) => run_own_backend(&cell),
        (BenchBackend::Own, Traffic::Rx | Traffic::Loopback) => run_own_backend_rx(&cell),
        (BenchBackend::Dpdk, Traffic::Tx) => run_dpdk(&cell),
        (BenchBackend::Dpdk, Traffic::Rx | Traffic::Loopback) => run_dpdk_loopback(&cell),
    });
    match std::panic::catch_unwind(run) {
        Ok(outcome) => Ok(CellResult {
            cell,
            backend,
            outcome,
        }),
        Err(e) => Err(e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "cell failed".into())),
    }
}

/// The name of a vIOMMU in the tables (what `--only` matches).
pub fn viommu_name(v: Viommu) -> &'static str {
    match v {
        Viommu::None => "none",
        Viommu::Virtio => "virtio-iommu",
        Viommu::Vtd { dt: true, .. } => "vt-d+dt/ats",
        Viommu::Vtd { dt: false, .. } => "vt-d",
    }
}

/// The vIOMMU × mode cells of the benchmark.
pub fn bench_cells(frames: u64, size: u64, tsc_khz: u64) -> Vec<Cell> {
    let viommus = [
        Viommu::None,
        Viommu::Virtio,
        Viommu::Vtd {
            dt: true,
            ats_cap: true,
        },
        Viommu::Vtd {
            dt: false,
            ats_cap: false,
        },
    ];
    let modes = [IommuMode::Passthrough, IommuMode::Strict, IommuMode::Lazy];
    let mut cells = Vec::new();
    for v in viommus {
        let ms: &[IommuMode] = if v == Viommu::None {
            &[IommuMode::Off]
        } else {
            &modes
        };
        for &mode in ms {
            let mut c = Cell::new(v, mode);
            c.frames = frames;
            c.size = size;
            c.tsc_khz = Some(tsc_khz);
            cells.push(c);
        }
    }
    // The prefetch policy where the vIOMMU reports new mappings.
    for v in [
        Viommu::Virtio,
        Viommu::Vtd {
            dt: true,
            ats_cap: true,
        },
    ] {
        let mut c = Cell::new(v, IommuMode::Strict);
        c.frames = frames;
        c.size = size;
        c.tsc_khz = Some(tsc_khz);
        c.prefetch = true;
        cells.push(c);
    }
    cells
}

/// The soak cells: {virtio-iommu, VT-d+DT/ATS, VT-d} × {strict, lazy,
/// strict+prefetch}, each with `frames` frames of `size` bytes.
pub fn soak_cells(frames: u64, size: u64, tsc_khz: u64) -> Vec<Cell> {
    let viommus = [
        Viommu::Virtio,
        Viommu::Vtd {
            dt: true,
            ats_cap: true,
        },
        Viommu::Vtd {
            dt: false,
            ats_cap: false,
        },
    ];
    let modes = [
        (IommuMode::Strict, false),
        (IommuMode::Lazy, false),
        (IommuMode::Strict, true),
    ];
    let mut cells = Vec::new();
    for v in viommus {
        for (mode, prefetch) in modes {
            let mut c = Cell::new(v, mode);
            c.frames = frames;
            c.size = size;
            c.tsc_khz = Some(tsc_khz);
            c.prefetch = prefetch;
            cells.push(c);
        }
    }
    cells
}

/// What one soak run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoakSample {
    /// Frames per second (guest TSC time).
    pub frames_per_sec: f64,
    /// MISS requests per frame.
    pub misses_per_frame: f64,
    /// INVALIDATEs that overlapped a running vring.
    pub ring_invalidations: u64,
    /// UPDATEs pushed to restore a ring after such an INVALIDATE.
    pub ring_updates: u64,
    /// Unmap notifications that needed no INVALIDATE (translations unchanged).
    pub invalidations_unchanged: u64,
    /// Stalled queues iovmm's own detector reported.
    pub stall_reports: u64,
}

/// How one soak run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SoakRun {
    /// Every frame arrived and was checked.
    Ok(SoakSample),
    /// The queue stopped: the guest saw no transmit completion within its
    /// timeout, or the VM did not finish at all.
    Stall(String),
    /// Any other failure (wrong count or payload, backend error).
    Failed(String),
}

/// Whether a failed cell's message is a stall (no progress) rather than
/// another failure.
pub fn is_stall(message: &str) -> bool {
    message.contains("no transmit completion") || message.contains("VMM stops")
}

/// The line of a failure message that says why (the guest's result line if
/// there is one, else the first line).
fn failure_reason(message: &str) -> String {
    message
        .lines()
        .find(|l| l.contains("\"error\""))
        .or_else(|| message.lines().next())
        .unwrap_or_default()
        .chars()
        .take(240)
        .collect()
}

/// Runs `cell` once against DPDK testpmd and classifies the result.
pub fn soak_once(cell: Cell, tsc_khz: u64) -> SoakRun {
    match run_cell_full(cell, BenchBackend::Dpdk) {
        Ok(r) => {
            let b = &r.outcome.stats.bridge;
            SoakRun::Ok(SoakSample {
                frames_per_sec: r.frames_per_sec(tsc_khz),
                misses_per_frame: r.per_frame(b.misses),
                ring_invalidations: b.ring_invalidations,
                ring_updates: b.ring_updates,
                invalidations_unchanged: b.invalidations_unchanged,
                stall_reports: b.stall_reports,
            })
        }
        Err(m) if is_stall(&m) => SoakRun::Stall(failure_reason(&m)),
        Err(m) => SoakRun::Failed(failure_reason(&m)),
    }
}

/// Every run of one soak cell.
#[derive(Debug, Clone)]
pub struct SoakCell {
    /// The cell.
    pub cell: Cell,
    /// Its runs, in order.
    pub runs: Vec<SoakRun>,
}

/// The per-cell summary the soak prints.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SoakSummary {
    /// Runs done.
    pub runs: usize,
    /// Runs that stalled.
    pub stalls: usize,
    /// Runs that failed otherwise.
    pub failures: usize,
    /// Median frames/s of the good runs.
    pub fps_p50: f64,
    /// Lowest frames/s of the good runs.
    pub fps_min: f64,
    /// Mean misses per frame of the good runs.
    pub misses_per_frame: f64,
    /// Mean ring-overlapping INVALIDATEs per good run.
    pub ring_invalidations_per_run: f64,
    /// Most ring-overlapping INVALIDATEs in one run.
    pub ring_invalidations_max: u64,
    /// Mean unchanged (not forwarded) notifications per good run.
    pub unchanged_per_run: f64,
    /// Stall reports of iovmm's detector, all good runs together.
    pub stall_reports: u64,
}

impl SoakCell {
    /// The good runs' samples.
    pub fn samples(&self) -> Vec<SoakSample> {
        self.runs
            .iter()
            .filter_map(|r| match r {
                SoakRun::Ok(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    /// Counts, rates and means over the runs.
    pub fn summary(&self) -> SoakSummary {
        let samples = self.samples();
        let n = samples.len().max(1) as f64;
        let mean = |f: fn(&SoakSample) -> f64| samples.iter().map(f).sum::<f64>() / n;
        let mut fps: Vec<f64> = samples.iter().map(|s| s.frames_per_sec).collect();
        fps.sort_by(f64::total_cmp);
        let count = |f: fn(&SoakRun) -> bool| self.runs.iter().filter(|r| f(r)).count();
        SoakSummary {
            runs: self.runs.len(),
            stalls: count(|r| matches!(r, SoakRun::Stall(_))),
            failures: count(|r| matches!(r, SoakRun::Failed(_))),
            fps_p50: fps
                .get(fps.len().saturating_sub(1) / 2)
                .copied()
                .unwrap_or(0.0),
            fps_min: fps.first().copied().unwrap_or(0.0),
            misses_per_frame: mean(|s| s.misses_per_frame),
            ring_invalidations_per_run: mean(|s| s.ring_invalidations as f64),
            ring_invalidations_max: samples
                .iter()
                .map(|s| s.ring_invalidations)
                .max()
                .unwrap_or(0),
            unchanged_per_run: mean(|s| s.invalidations_unchanged as f64),
            stall_reports: samples.iter().map(|s| s.stall_reports).sum(),
        }
    }
}

/// Runs every cell `runs` times (round-robin, so a slow period of the
/// machine spreads over the cells), calling `progress` after each run.
pub fn soak(
    cells: &[Cell],
    runs: usize,
    tsc_khz: u64,
    mut progress: impl FnMut(&Cell, usize, &SoakRun),
) -> Vec<SoakCell> {
    let mut out: Vec<SoakCell> = cells
        .iter()
        .map(|&cell| SoakCell {
            cell,
            runs: Vec::new(),
        })
        .collect();
    for i in 0..runs {
        for c in out.iter_mut() {
            let r = soak_once(c.cell, tsc_khz);
            progress(&c.cell, i, &r);
            c.runs.push(r);
        }
    }
    out
}

/// A competing CPU load: `threads` threads spinning until [`CpuLoad::stop`],
/// the drop, or `limit` (whichever comes first), so it never outlives the
/// bench.
#[derive(Debug)]
pub struct CpuLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl CpuLoad {
    /// Start `threads` busy loops, each ending after `limit` at the latest.
    pub fn start(threads: usize, limit: Duration) -> std::io::Result<Self> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let stop = stop.clone();
            let h = std::thread::Builder::new()
                .name(format!("bench-load-{i}"))
                .spawn(move || spin(&stop, limit))?;
            handles.push(h);
        }
        Ok(CpuLoad {
            stop,
            threads: handles,
        })
    }

    /// Stop and join the threads; returns the spin iterations done (proof
    /// that the load ran).
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.threads.drain(..).filter_map(|h| h.join().ok()).sum()
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.halt();
    }
}

fn spin(stop: &std::sync::atomic::AtomicBool, limit: Duration) -> u64 {
    let end = Instant::now() + limit;
    let mut n = 0u64;
    loop {
        for _ in 0..SPIN_BATCH {
            n = std::hint::black_box(n.wrapping_add(1));
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() >= end {
            return n;
        }
    }
}

/// Spin iterations between two checks of the stop flag and the limit.
const SPIN_BATCH: u64 = 10_000;

/// Formats a latency summary in microseconds.
pub fn fmt_latency(l: Option<&LatencyStats>) -> String {
    match l {
        Some(l) => format!("{:.1}/{:.1}", us(l.p50), us(l.p99)),
        None => "-".into(),
    }
}

/// Microseconds as a float.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_ranked_samples() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        assert_eq!(
            percentiles(&mut v),
            (Duration::from_micros(50), Duration::from_micros(99))
        );
        assert_eq!(percentiles(&mut []), (Duration::ZERO, Duration::ZERO));
    }

    fn sample(fps: f64, ring: u64) -> SoakRun {
        SoakRun::Ok(SoakSample {
            frames_per_sec: fps,
            misses_per_frame: 0.5,
            ring_invalidations: ring,
            ring_updates: 0,
            invalidations_unchanged: 2,
            stall_reports: 0,
        })
    }

    #[test]
    fn soak_summary_counts_stalls_and_ranks_rates() {
        let cell = SoakCell {
            cell: Cell::new(Viommu::Virtio, IommuMode::Strict),
            runs: vec![
                sample(300.0, 0),
                SoakRun::Stall("no transmit completion".into()),
                sample(100.0, 3),
                SoakRun::Failed("count".into()),
                sample(200.0, 1),
            ],
        };
        let s = cell.summary();
        assert_eq!((s.runs, s.stalls, s.failures), (5, 1, 1));
        assert_eq!((s.fps_p50, s.fps_min), (200.0, 100.0));
        assert_eq!(s.ring_invalidations_max, 3);
        assert!((s.ring_invalidations_per_run - 4.0 / 3.0).abs() < 1e-9);
        assert!((s.misses_per_frame - 0.5).abs() < 1e-9);
    }

    #[test]
    fn stalls_are_told_from_other_failures() {
        let guest = "Cell { .. } guest failed; serial:\nboot\n{\"status\":\"failed\",\"error\":\"no transmit completion within iovmm.timeout_ms\"}";
        assert!(is_stall(guest));
        assert!(failure_reason(guest).contains("no transmit completion"));
        assert!(is_stall("VMM stops: Timeout"));
        assert!(!is_stall(
            "assertion `left == right` failed: testpmd output"
        ));
    }

    #[test]
    fn soak_cells_are_the_nine_translated_cells() {
        let cells = soak_cells(20_000, 1024, 1000);
        assert_eq!(cells.len(), 9);
        assert_eq!(cells.iter().filter(|c| c.prefetch).count(), 3);
        assert!(cells
            .iter()
            .all(|c| c.viommu != Viommu::None && c.frames == 20_000));
    }

    #[test]
    fn cpu_load_spins_until_stopped_or_its_limit() {
        let stop = std::sync::atomic::AtomicBool::new(false);
        // At least one batch, then the limit ends it.
        assert_eq!(spin(&stop, Duration::ZERO), SPIN_BATCH);
        let load = CpuLoad::start(2, Duration::from_secs(60)).unwrap();
        let t = Instant::now();
        assert!(load.stop() >= 2 * SPIN_BATCH);
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "stop() ends the load"
        );
    }

    #[test]
    fn cells_cover_every_viommu_and_mode() {
        let cells = bench_cells(10, 64, 1000);
        assert_eq!(cells.len(), 1 + 3 * 3 + 2);
        assert!(cells
            .iter()
            .all(|c| c.tsc_khz == Some(1000) && c.frames == 10));
    }
}
