//! The benchmark's blk rows: for each vIOMMU × guest mode, and 4 KiB / 64 KiB requests, the
//! guest's write and read IOPS and MB/s (guest TSC time of each phase; the FLUSH after the writes
//! is timed apart) and the vhost-user IOTLB messages per request, against our own backend and, without
//! a vIOMMU, qemu-storage-daemon.

use crate::blk::{run_own_backend, run_qsd, BlkCell, BlkOutcome};
use crate::guest::IommuMode;
use crate::matrix::Viommu;

/// Who serves the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkBackend {
    /// Our test backend in blk mode.
    Own,
    /// qemu-storage-daemon's vhost-user-blk export (no vIOMMU only).
    Qsd,
}

/// One measured blk row.
#[derive(Debug)]
pub struct BlkRow {
    /// The cell.
    pub cell: BlkCell,
    /// Its backend.
    pub backend: BlkBackend,
    /// What the run produced.
    pub outcome: BlkOutcome,
}

/// Requests per phase of a benchmark cell: enough to amortise start-up, small enough for TCG-free
/// runs of a few seconds.
const BENCH_REQUESTS: u64 = 1024;

/// The cells: no vIOMMU, then passthrough / strict / lazy behind virtio-iommu and VT-d with
/// and without device-TLB/ATS, each at 4 KiB and 64 KiB.
pub fn blk_bench_cells(tsc_khz: u64) -> Vec<BlkCell> {
    let translated = [
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
    let mut base = vec![(Viommu::None, IommuMode::Off)];
    base.extend(
        translated
            .iter()
            .flat_map(|v| modes.iter().map(move |m| (*v, *m))),
    );
    let mut cells = Vec::new();
    for (viommu, mode) in base {
        for size in [4096u64, 64 << 10] {
            let mut c = BlkCell::new(viommu, mode);
            c.size = size;
            c.disk_bytes = size * BENCH_REQUESTS;
            c.inflight = 16;
            c.bad_sector = false;
            c.tsc_khz = (tsc_khz > 0).then_some(tsc_khz);
            cells.push(c);
        }
    }
    cells
}

/// Runs one row; a failed cell (the harness panics on wrong data) is returned as an error.
pub fn run_blk_row(cell: BlkCell, backend: BlkBackend) -> Result<BlkRow, String> {
    let run = std::panic::AssertUnwindSafe(|| match backend {
        BlkBackend::Own => run_own_backend(&cell),
        BlkBackend::Qsd => run_qsd(&cell),
    });
    std::panic::catch_unwind(run)
        .map(|outcome| BlkRow {
            cell,
            backend,
            outcome,
        })
        .map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "cell failed".into())
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
}

impl BlkRow {
    fn phase_secs(&self, key: &str, tsc_khz: u64) -> f64 {
        let cycles = self.outcome.result.u64(key).unwrap_or(0) as f64;
        cycles / (tsc_khz.max(1) as f64 * 1000.0)
    }

    /// (IOPS, MB/s) of the write phase (`write_cycles`) or the read phase (`read_cycles`).
    pub fn rate(&self, key: &str, tsc_khz: u64) -> (f64, f64) {
        let secs = self.phase_secs(key, tsc_khz);
        if secs == 0.0 {
            return (0.0, 0.0);
        }
        let n = self.cell.requests() as f64;
        (n / secs, n * self.cell.size as f64 / secs / 1e6)
    }
}

fn viommu_name(v: Viommu) -> &'static str {
    match v {
        Viommu::None => "none",
        Viommu::Virtio => "virtio-iommu",
        Viommu::Vtd { dt: true, .. } => "vt-d+dt/ats",
        Viommu::Vtd { dt: false, .. } => "vt-d",
    }
}

/// Prints the blk table (markdown).
pub fn print_blk_rows(rows: &[BlkRow], tsc_khz: u64) {
    println!("\n## virtio-blk (guest blk scenario, 16 requests in flight, {BENCH_REQUESTS} requests per phase)\n");
    println!("| vIOMMU | mode | backend | size | write IOPS | write MB/s | read IOPS | read MB/s | flush ms | msgs/req | misses/req | inval/req |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let (wi, wm) = r.rate("write_cycles", tsc_khz);
        let (ri, rm) = r.rate("read_cycles", tsc_khz);
        let s = &r.outcome.stats;
        let reqs = (2 * r.cell.requests()).max(1) as f64;
        println!(
            "| {} | {} | {:?} | {} KiB | {:.0} | {:.1} | {:.0} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} |",
            viommu_name(r.cell.viommu),
            r.cell.mode.as_str(),
            r.backend,
            r.cell.size >> 10,
            wi,
            wm,
            ri,
            rm,
            r.phase_secs("flush_wait_cycles", tsc_khz) * 1e3,
            r.outcome.messages_per_request(),
            s.bridge.misses as f64 / reqs,
            s.iotlb.invalidations as f64 / reqs,
        );
    }
}

/// Runs every blk cell whose vIOMMU name contains `only` (own backend; qemu-storage-daemon too
/// for the no-vIOMMU cells unless `qsd` is false), prints the table and returns the failures.
pub fn blk_bench(tsc_khz: u64, qsd: bool, only: Option<&str>) -> Vec<String> {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let wanted = |c: &BlkCell| only.is_none_or(|o| viommu_name(c.viommu).contains(o));
    for cell in blk_bench_cells(tsc_khz).into_iter().filter(wanted) {
        let mut backends = vec![BlkBackend::Own];
        if qsd && cell.viommu == Viommu::None {
            backends.push(BlkBackend::Qsd);
        }
        for b in backends {
            match run_blk_row(cell, b) {
                Ok(r) => rows.push(r),
                Err(e) => failures.push(format!(
                    "blk {} {} {} KiB {b:?}: {e}",
                    viommu_name(cell.viommu),
                    cell.mode.as_str(),
                    cell.size >> 10
                )),
            }
        }
    }
    print_blk_rows(&rows, tsc_khz);
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_cover_both_sizes_in_every_cell() {
        let cells = blk_bench_cells(0);
        assert_eq!(cells.len(), 2 * (1 + 3 * 3));
        assert!(cells
            .iter()
            .all(|c| c.disk_bytes == c.size * BENCH_REQUESTS && c.requests() == BENCH_REQUESTS));
        assert_eq!(cells.iter().filter(|c| c.size == 4096).count(), 10);
        assert!(cells.iter().all(|c| c.tsc_khz.is_none()));
    }
}
