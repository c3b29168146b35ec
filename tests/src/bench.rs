//! Measurements behind `iovmm-bench`: guest boot time, VMM RSS, per-cell DMA
//! throughput and IOTLB traffic, and the QEMU 7.2 reference runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmm::{SerialMode, VmConfig, VmExit, Vmm};

use crate::backend::latency::LatencyStats;
use crate::guest::{test_guest_path, IommuMode, Scenario};
use crate::matrix::{run_dpdk, run_own_backend, Cell, Outcome, Viommu};

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

/// A sibling binary of the running one (target/<profile>/NAME).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// Runs `cmd` and returns its exit status and peak RSS in KiB.
pub fn run_with_max_rss(cmd: &mut Command) -> std::io::Result<(i32, u64)> {
    let child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet waited for; both pointers are valid.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    std::mem::forget(child); // already reaped by wait4
    Ok((libc::WEXITSTATUS(status), usage.ru_maxrss as u64))
}

/// Peak RSS of the `iovmm` CLI running `cmdline` on the test guest, with
/// `extra` arguments.
pub fn cli_rss(iovmm: &Path, cmdline: &str, extra: &[String]) -> std::io::Result<(i32, u64)> {
    let mut cmd = Command::new(iovmm);
    cmd.arg("--kernel")
        .arg(test_guest_path())
        .args(["--cmdline", cmdline, "--memory", "256M", "--serial", "off"])
        .args(extra);
    run_with_max_rss(&mut cmd)
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
    let run = std::panic::AssertUnwindSafe(|| match backend {
        BenchBackend::Own => run_own_backend(&cell),
        BenchBackend::Dpdk => run_dpdk(&cell),
    });
    match std::panic::catch_unwind(run) {
        Ok(outcome) => Ok(CellResult {
            cell,
            backend,
            outcome,
        }),
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "cell failed".into());
            Err(msg.lines().next().unwrap_or_default().to_string())
        }
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

    #[test]
    fn cells_cover_every_viommu_and_mode() {
        let cells = bench_cells(10, 64, 1000);
        assert_eq!(cells.len(), 1 + 3 * 3 + 2);
        assert!(cells
            .iter()
            .all(|c| c.tsc_khz == Some(1000) && c.frames == 10));
    }
}
