//! The benchmark's RX and loop-back rows: for each vIOMMU × guest mode, the
//! guest's `net-rx` scenario receiving our backend's generated frames (RX),
//! and sending frames that come back (loop-back) through our backend and
//! through testpmd `macswap` (TX retry on; RX buffers mapped read-write,
//! since DPDK's enqueue asks read-write on RX descriptors). Each row gives
//! the frames/s (guest TSC time of the run), IOTLB messages per frame and
//! the miss latency, the columns of the TX table where they apply.

use super::{fmt_latency, run_cell, viommu_name, BenchBackend, CellResult};
use crate::guest::IommuMode;
use crate::matrix::{Cell, Traffic, Viommu};

/// The RX and loop-back rows to measure, in print order: no vIOMMU (off),
/// then virtio-iommu, VT-d+DT/ATS and VT-d in every guest mode (off,
/// passthrough, strict, lazy); per cell our backend's RX, our backend's
/// loop-back and, if `dpdk`, testpmd's loop-back (`rx_dir=rw`).
pub fn rx_bench_cells(
    frames: u64,
    size: u64,
    tsc_khz: u64,
    dpdk: bool,
) -> Vec<(Cell, BenchBackend)> {
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
    let mut rows = Vec::new();
    for v in viommus {
        let modes: &[IommuMode] = if v == Viommu::None {
            &[IommuMode::Off]
        } else {
            &IommuMode::ALL
        };
        for &mode in modes {
            let mut kinds = vec![
                (Traffic::Rx, BenchBackend::Own),
                (Traffic::Loopback, BenchBackend::Own),
            ];
            if dpdk {
                kinds.push((Traffic::Loopback, BenchBackend::Dpdk));
            }
            for (traffic, backend) in kinds {
                let mut c = Cell::with_traffic(v, mode, traffic);
                c.frames = frames;
                c.size = size;
                c.tsc_khz = (tsc_khz > 0).then_some(tsc_khz);
                c.rx_rw = backend == BenchBackend::Dpdk;
                rows.push((c, backend));
            }
        }
    }
    rows
}

fn traffic_name(t: Traffic) -> &'static str {
    match t {
        Traffic::Tx => "tx",
        Traffic::Rx => "rx",
        Traffic::Loopback => "loop-back",
    }
}

fn backend_name(b: BenchBackend) -> &'static str {
    match b {
        BenchBackend::Own => "own",
        BenchBackend::Dpdk => "testpmd",
    }
}

/// Prints the RX / loop-back table (markdown).
pub fn print_rx_rows(rows: &[CellResult], tsc_khz: u64) {
    println!(
        "\n## RX and loop-back through vhost-user virtio-net ({} frames of {} bytes each; \
         per frame = per frame received; miss = MISS->UPDATE at our backend, us p50/p99; \
         iovmm miss = iovmm's service time p50, us, the upper bound of its power-of-two bucket)\n",
        rows.first().map(|r| r.cell.frames).unwrap_or(0),
        rows.first().map(|r| r.cell.size).unwrap_or(0),
    );
    println!("| traffic | vIOMMU | mode | backend | rx_dir | frames/s | miss/f | upd/f | inv/f | ring inv | miss us | iovmm miss us | inv rtt us |");
    println!("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let s = &r.outcome.stats;
        let rtt = s.iotlb.rtt_total_ns as f64 / s.iotlb.acked.max(1) as f64 / 1000.0;
        let iovmm_p50 = if s.bridge.miss_latency.count == 0 {
            "-".to_string()
        } else {
            format!("{:.1}", s.bridge.miss_latency.p50_ns as f64 / 1000.0)
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {:.1} |",
            traffic_name(r.cell.traffic),
            viommu_name(r.cell.viommu),
            r.cell.mode.as_str(),
            backend_name(r.backend),
            r.outcome.result.str("rx_dir").unwrap_or("?"),
            r.frames_per_sec(tsc_khz),
            r.per_frame(s.bridge.misses),
            r.per_frame(s.iotlb.updates),
            r.per_frame(s.iotlb.invalidations),
            s.bridge.ring_invalidations,
            fmt_latency(r.outcome.backend_miss_latency.as_ref()),
            iovmm_p50,
            rtt,
        );
    }
}

/// Runs every RX / loop-back row whose vIOMMU name contains `only` (testpmd
/// rows too if `dpdk`), prints the table and returns the failures.
pub fn rx_bench(
    frames: u64,
    size: u64,
    tsc_khz: u64,
    dpdk: bool,
    only: Option<&str>,
) -> Vec<String> {
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    let wanted = |c: &Cell| only.is_none_or(|o| viommu_name(c.viommu).contains(o));
    for (cell, b) in rx_bench_cells(frames, size, tsc_khz, dpdk)
        .into_iter()
        .filter(|(c, _)| wanted(c))
    {
        match run_cell(cell, b) {
            Ok(r) => rows.push(r),
            Err(e) => failures.push(format!(
                "{} {} {} {}: {e}",
                traffic_name(cell.traffic),
                viommu_name(cell.viommu),
                cell.mode.as_str(),
                backend_name(b)
            )),
        }
    }
    print_rx_rows(&rows, tsc_khz);
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_cover_every_viommu_mode_and_backend() {
        let rows = rx_bench_cells(10, 64, 1000, true);
        // none/off, then 3 vIOMMUs × 4 modes; 3 rows each.
        assert_eq!(rows.len(), 3 * (1 + 3 * 4));
        assert!(rows
            .iter()
            .all(|(c, _)| c.frames == 10 && c.size == 64 && c.tsc_khz == Some(1000)));
        assert!(rows.iter().all(|(c, _)| c.traffic != Traffic::Tx));
        // testpmd only loops back, always with read-write RX buffers.
        let pmd: Vec<_> = rows
            .iter()
            .filter(|(_, b)| *b == BenchBackend::Dpdk)
            .collect();
        assert_eq!(pmd.len(), 13);
        assert!(pmd
            .iter()
            .all(|(c, _)| c.traffic == Traffic::Loopback && c.rx_rw));
        assert!(rows
            .iter()
            .filter(|(_, b)| *b == BenchBackend::Own)
            .all(|(c, _)| !c.rx_rw));
        assert_eq!(rx_bench_cells(10, 64, 0, false).len(), 2 * 13);
        assert!(rx_bench_cells(10, 64, 0, false)
            .iter()
            .all(|(c, b)| *b == BenchBackend::Own && c.tsc_khz.is_none()));
    }
}
