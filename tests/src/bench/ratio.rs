//! Each DMA cell's costs over the floors of the same run ([`super::floor`]):
//!
//! - **miss**: MISS→UPDATE p50 at our backend over the socket round trip p50 (blocking and
//!   spinning); next to it iovmm's own mean from MISS receipt to the UPDATE's ack;
//! - **INVALIDATE**: iovmm's mean time from an unmap notification to the last INVALIDATE ack
//!   (exact; the histogram's p50 is only a power-of-two bound) over the socket round trip p50;
//! - **MAP / UNMAP**: the guest's mean cost per `dma_map` / `dma_unmap` (its TSC) over the floor of
//!   what one must wait for: one vIOMMU request (virtio-iommu: an exit KVM handles in the kernel,
//!   as it does the notify's ioeventfd, plus the eventfd wake-up of the request worker; VT-d: an
//!   MMIO exit to iovmm, whose queued invalidation runs on the vCPU thread), plus a
//!   spinning socket round trip per INVALIDATE sent per unmap, or per UPDATE pushed per map
//!   (prefetch);
//! - **frame**: the guest's time per frame over the sum of its floors: vIOMMU requests per frame
//!   times the request floor, plus (MISSes + INVALIDATEs per frame) spinning socket round trips.

use std::time::Duration;

use super::floor::{Floors, Wait};
use super::{us, viommu_name, BenchBackend, CellResult};
use crate::guest::{DmaStats, IommuMode};
use crate::matrix::Viommu;

/// The floors a cell's costs are divided by (p50s; `None` if not measured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloorModel {
    /// Socket round trip, both ends blocking.
    pub socket_blocking: Option<Duration>,
    /// Socket round trip, both ends spinning.
    pub socket_spinning: Option<Duration>,
    /// Guest PIO exit.
    pub pio_exit: Option<Duration>,
    /// Guest MMIO exit.
    pub mmio_exit: Option<Duration>,
    /// Guest exit handled in the kernel.
    pub kernel_exit: Option<Duration>,
    /// eventfd wake-up of a blocked thread.
    pub eventfd: Option<Duration>,
}

impl FloorModel {
    /// The medians of `floors`.
    pub fn from_floors(floors: &Floors) -> Self {
        FloorModel {
            socket_blocking: floors.socket_p50(Wait::Blocking),
            socket_spinning: floors.socket_p50(Wait::Spinning),
            pio_exit: floors.exit_p50(),
            mmio_exit: floors.mmio_exit_p50(),
            kernel_exit: floors.kernel_exit_p50(),
            eventfd: floors.eventfd_p50(),
        }
    }

    /// The floor of one synchronous vIOMMU request of `viommu`.
    pub fn request(&self, viommu: Viommu) -> Option<Duration> {
        match viommu {
            Viommu::None => None,
            Viommu::Virtio => Some(self.kernel_exit? + self.eventfd?),
            Viommu::Vtd { .. } => self.mmio_exit,
        }
    }
}

/// What one cell measured, per operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CellCosts {
    /// The cell's vIOMMU.
    pub viommu: Viommu,
    /// MISS→UPDATE p50 at our backend (own-backend cells).
    pub miss_p50: Option<Duration>,
    /// Mean MISS receipt → UPDATE ack inside iovmm (exact; every backend).
    pub iovmm_miss: Option<Duration>,
    /// Mean unmap notification → last INVALIDATE ack, in iovmm (cells that sent INVALIDATEs).
    pub invalidate: Option<Duration>,
    /// Guest time per `dma_map`.
    pub map: Option<Duration>,
    /// Guest time per `dma_unmap` (lazy flushes included).
    pub unmap: Option<Duration>,
    /// Guest time per frame (whole run).
    pub frame: Option<Duration>,
    /// Synchronous vIOMMU requests per frame.
    pub requests_per_frame: f64,
    /// MISSes served per frame.
    pub misses_per_frame: f64,
    /// INVALIDATEs per frame.
    pub invalidations_per_frame: f64,
    /// INVALIDATEs per unmap.
    pub invalidations_per_unmap: f64,
    /// UPDATEs pushed at MAP (prefetch) per map.
    pub prefetches_per_map: f64,
}

fn per(n: u64, d: u64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

fn cycles(c: Option<f64>, tsc_khz: u64) -> Option<Duration> {
    let c = c?;
    // cycles / (kHz * 1000) seconds, in whole nanoseconds.
    let ns = c * 1e6 / tsc_khz as f64;
    (tsc_khz != 0 && ns.is_finite() && ns >= 0.0).then(|| Duration::from_nanos(ns.round() as u64))
}

impl CellCosts {
    /// Reads a cell's costs from its outcome (the guest's DMA counters and iovmm's).
    pub fn from_result(r: &CellResult, tsc_khz: u64) -> Self {
        let s = &r.outcome.stats;
        let dma = DmaStats::from_result(&r.outcome.result).ok();
        let frames = r.cell.frames.max(1);
        let fps = r.frames_per_sec(tsc_khz);
        let inv = &s.bridge.invalidate_latency;
        CellCosts {
            viommu: r.cell.viommu,
            miss_p50: r.outcome.backend_miss_latency.as_ref().map(|l| l.p50),
            invalidate: (inv.count > 0).then(|| Duration::from_nanos(inv.mean_ns)),
            iovmm_miss: (s.bridge.miss_latency.count > 0)
                .then(|| Duration::from_nanos(s.bridge.miss_latency.mean_ns)),
            map: dma
                .as_ref()
                .and_then(|d| cycles(d.cycles_per_map(), tsc_khz)),
            unmap: dma
                .as_ref()
                .and_then(|d| cycles(d.cycles_per_unmap(), tsc_khz)),
            frame: (fps > 0.0).then(|| Duration::from_secs_f64(1.0 / fps)),
            requests_per_frame: dma.as_ref().map_or(0.0, |d| per(d.iommu_syncs, frames)),
            misses_per_frame: per(s.bridge.misses, frames),
            invalidations_per_frame: per(s.iotlb.invalidations, frames),
            invalidations_per_unmap: dma
                .as_ref()
                .map_or(0.0, |d| per(s.iotlb.invalidations, d.unmaps)),
            prefetches_per_map: dma
                .as_ref()
                .map_or(0.0, |d| per(s.bridge.prefetches, d.maps)),
        }
    }
}

/// A cell's floors and its costs over them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CellRatios {
    /// Miss p50 over the blocking socket round trip.
    pub miss_blocking: Option<f64>,
    /// Miss p50 over the spinning socket round trip.
    pub miss_spinning: Option<f64>,
    /// INVALIDATE over the blocking socket round trip.
    pub invalidate_blocking: Option<f64>,
    /// INVALIDATE over the spinning socket round trip.
    pub invalidate_spinning: Option<f64>,
    /// The floor of one map.
    pub map_floor: Option<Duration>,
    /// Map cost over its floor.
    pub map: Option<f64>,
    /// The floor of one unmap.
    pub unmap_floor: Option<Duration>,
    /// Unmap cost over its floor.
    pub unmap: Option<f64>,
    /// The sum of a frame's floors.
    pub frame_floor: Option<Duration>,
    /// Frame cost over that sum.
    pub frame: Option<f64>,
}

/// `a / b` when both are known and `b` is not zero.
pub fn over(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    let b = b?.as_secs_f64();
    (b > 0.0).then(|| a.map(|a| a.as_secs_f64() / b))?
}

/// `base + n × each` (`n` may be fractional: a per-operation average).
fn plus_times(base: Duration, n: f64, each: Option<Duration>) -> Option<Duration> {
    if n <= 0.0 {
        return Some(base);
    }
    Some(base + each?.mul_f64(n))
}

/// The ratios of `c` over the floors `m`. MAP/UNMAP/frame ratios need vIOMMU requests (none in
/// passthrough and without a vIOMMU).
pub fn ratios(c: &CellCosts, m: &FloorModel) -> CellRatios {
    let sock = m.socket_spinning;
    let request = m.request(c.viommu).filter(|_| c.requests_per_frame > 0.0);
    let map_floor = request.and_then(|r| plus_times(r, c.prefetches_per_map, sock));
    let unmap_floor = request.and_then(|r| plus_times(r, c.invalidations_per_unmap, sock));
    let frame_floor = request.and_then(|r| {
        let requests = r.mul_f64(c.requests_per_frame);
        plus_times(
            requests,
            c.misses_per_frame + c.invalidations_per_frame,
            sock,
        )
    });
    CellRatios {
        miss_blocking: over(c.miss_p50, m.socket_blocking),
        miss_spinning: over(c.miss_p50, sock),
        invalidate_blocking: over(c.invalidate, m.socket_blocking),
        invalidate_spinning: over(c.invalidate, sock),
        map_floor,
        map: over(c.map, map_floor),
        unmap_floor,
        unmap: over(c.unmap, unmap_floor),
        frame_floor,
        frame: over(c.frame, frame_floor),
    }
}

fn x(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.1}x"))
}

fn t(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", us(d)))
}

/// Prints every translated cell's costs over the floors (markdown), after the DMA table.
pub fn print_floor_ratios(results: &[CellResult], floors: &Floors, tsc_khz: u64) {
    let m = FloorModel::from_floors(floors);
    println!("\n== Cells over the floors (us; Nx = cost / floor; floors are p50s of this run)");
    println!(
        "  request floor: virtio-iommu kernel exit+eventfd {} us, VT-d MMIO exit {} us (PIO exit {} us); socket blocking {} us, spinning {} us",
        t(m.request(Viommu::Virtio)),
        t(m.mmio_exit),
        t(m.pio_exit),
        t(m.socket_blocking),
        t(m.socket_spinning)
    );
    println!("| vIOMMU | mode | back | miss p50 | /blk | /spin | iovmm miss | inv mean | /blk | /spin | map | floor | /floor | unmap | floor | /floor | frame | floors | /floors |");
    println!(
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let translated = |r: &&CellResult| matches!(r.cell.mode, IommuMode::Strict | IommuMode::Lazy);
    for r in results.iter().filter(translated) {
        let c = CellCosts::from_result(r, tsc_khz);
        let q = ratios(&c, &m);
        println!(
            "| {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            viommu_name(r.cell.viommu),
            r.cell.mode.as_str(),
            if r.cell.prefetch { "+pref" } else { "" },
            match r.backend {
                BenchBackend::Own => "own",
                BenchBackend::Dpdk => "dpdk",
            },
            t(c.miss_p50),
            x(q.miss_blocking),
            x(q.miss_spinning),
            t(c.iovmm_miss),
            t(c.invalidate),
            x(q.invalidate_blocking),
            x(q.invalidate_spinning),
            t(c.map),
            t(q.map_floor),
            x(q.map),
            t(c.unmap),
            t(q.unmap_floor),
            x(q.unmap),
            t(c.frame),
            t(q.frame_floor),
            x(q.frame),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us_(v: u64) -> Duration {
        Duration::from_micros(v)
    }

    fn model() -> FloorModel {
        FloorModel {
            socket_blocking: Some(us_(20)),
            socket_spinning: Some(us_(5)),
            pio_exit: Some(us_(4)),
            mmio_exit: Some(us_(3)),
            kernel_exit: Some(us_(2)),
            eventfd: Some(us_(8)),
        }
    }

    fn strict(viommu: Viommu) -> CellCosts {
        CellCosts {
            viommu,
            miss_p50: Some(us_(40)),
            iovmm_miss: Some(us_(20)),
            invalidate: Some(us_(50)),
            map: Some(us_(30)),
            unmap: Some(us_(60)),
            frame: Some(us_(200)),
            requests_per_frame: 2.0,
            misses_per_frame: 1.0,
            invalidations_per_frame: 1.0,
            invalidations_per_unmap: 1.0,
            prefetches_per_map: 0.0,
        }
    }

    #[test]
    fn request_floor_depends_on_the_viommu() {
        let m = model();
        assert_eq!(m.request(Viommu::Virtio), Some(us_(10)));
        let vtd = Viommu::Vtd {
            dt: false,
            ats_cap: false,
        };
        assert_eq!(m.request(vtd), Some(us_(3)));
        assert_eq!(m.request(Viommu::None), None);
        let partial = FloorModel { eventfd: None, ..m };
        assert_eq!(partial.request(Viommu::Virtio), None);
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn strict_virtio_cell_over_its_floors() {
        let q = ratios(&strict(Viommu::Virtio), &model());
        assert!(
            close(q.miss_blocking, 2.0) && close(q.miss_spinning, 8.0),
            "{q:?}"
        );
        assert!(
            close(q.invalidate_blocking, 2.5) && close(q.invalidate_spinning, 10.0),
            "{q:?}"
        );
        // map: one request (exit 2 + eventfd 8); unmap: plus one spinning round trip.
        assert_eq!((q.map_floor, q.unmap_floor), (Some(us_(10)), Some(us_(15))));
        assert!(close(q.map, 3.0) && close(q.unmap, 4.0), "{q:?}");
        // frame: 2 requests (20) + (1 miss + 1 INVALIDATE) x 5.
        assert_eq!(q.frame_floor, Some(us_(30)));
        assert!(close(q.frame, 200.0 / 30.0), "{q:?}");
    }

    #[test]
    fn prefetch_puts_a_round_trip_into_the_map_floor() {
        let c = CellCosts {
            prefetches_per_map: 0.5,
            ..strict(Viommu::Vtd {
                dt: true,
                ats_cap: true,
            })
        };
        let q = ratios(&c, &model());
        let floor = q.map_floor.unwrap_or_default().as_nanos();
        assert!(floor.abs_diff(5500) <= 1, "{floor} ns: 3 us + half of 5 us");
    }

    #[test]
    fn no_requests_no_map_ratios() {
        let c = CellCosts {
            requests_per_frame: 0.0,
            miss_p50: None,
            invalidate: None,
            ..strict(Viommu::Virtio)
        };
        let q = ratios(&c, &model());
        assert_eq!(q, CellRatios::default());
    }

    #[test]
    fn over_needs_both_sides_and_a_non_zero_floor() {
        assert!(close(over(Some(us_(4)), Some(us_(2))), 2.0));
        assert_eq!(over(None, Some(us_(2))), None);
        assert_eq!(over(Some(us_(4)), None), None);
        assert_eq!(over(Some(us_(4)), Some(Duration::ZERO)), None);
        assert_eq!(plus_times(us_(1), 2.0, None), None);
        assert_eq!(plus_times(us_(1), 0.0, None), Some(us_(1)));
        assert_eq!(cycles(Some(2000.0), 2_000_000), Some(us_(1)));
        assert_eq!(cycles(Some(f64::NAN), 2_000_000), None);
        assert_eq!(cycles(Some(1.0), 0), None);
    }
}
