//! Per-device counters of a vhost-user frontend: IOTLB misses, updates,
//! invalidations and their latencies, exposed as plain snapshots for the
//! library API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::channel::IotlbStatsSnapshot;
use super::reconnect::ReconnectStats;

/// One event counter (relaxed: counters order nothing).
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Count one event.
    pub fn bump(&self) {
        self.add(1);
    }

    /// Count `n` (e.g. nanoseconds).
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Keep the larger of the value and `n`.
    pub fn max(&self, n: u64) {
        self.0.fetch_max(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The one stats model of the vhost-user code: a live struct of
/// [`Counter`]s (and [`LatencyHistogram`]s) updated lock-free where events
/// happen, and a plain `Copy` snapshot of it with the documented fields,
/// read through `snapshot()` and aggregated into [`VhostUserStats`].
macro_rules! counters {
    (
        $(#[$lmeta:meta])* $live:ident =>
        $(#[$smeta:meta])* $snap:ident {
            $( $(#[$fmeta:meta])* $field:ident, )*
        }
        $( latencies { $( $(#[$hmeta:meta])* $hist:ident, )* } )?
    ) => {
        $(#[$lmeta])*
        #[derive(Debug, Default)]
        pub struct $live {
            $( pub(crate) $field: $crate::vhost_user::stats::Counter, )*
            $( $( pub(crate) $hist: $crate::vhost_user::stats::LatencyHistogram, )* )?
        }

        $(#[$smeta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $snap {
            $( $(#[$fmeta])* pub $field: u64, )*
            $( $( $(#[$hmeta])* pub $hist: $crate::vhost_user::stats::LatencySummary, )* )?
        }

        impl $live {
            /// Read every counter.
            pub fn snapshot(&self) -> $snap {
                $snap {
                    $( $field: self.$field.get(), )*
                    $( $( $hist: self.$hist.summary(), )* )?
                }
            }
        }
    };
}
pub(crate) use counters;

/// Number of histogram buckets: bucket `i` holds samples below `2^i` µs
/// (and at least `2^(i-1)` µs); the last one everything larger (~35 min).
pub const LATENCY_BUCKETS: usize = 32;

/// A lock-free latency histogram with power-of-two microsecond buckets.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    count: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
}

/// A summary of a [`LatencyHistogram`]. Percentiles are bucket upper bounds,
/// so they overestimate by at most a factor of two (and never exceed `max_ns`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Mean in nanoseconds (0 without samples).
    pub mean_ns: u64,
    /// Median (upper bound of its bucket), in nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile (upper bound of its bucket), in nanoseconds.
    pub p99_ns: u64,
    /// Largest sample in nanoseconds.
    pub max_ns: u64,
}

fn bucket_of(us: u64) -> usize {
    // Bucket i covers [2^(i-1), 2^i) µs; 0 covers [0, 1) µs.
    let bits = (u64::BITS - us.leading_zeros()) as usize;
    bits.min(LATENCY_BUCKETS - 1)
}

fn bucket_upper_ns(i: usize) -> u64 {
    1u64.checked_shl(i as u32)
        .unwrap_or(u64::MAX)
        .saturating_mul(1000)
}

impl LatencyHistogram {
    /// Record one sample.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let b = bucket_of(ns / 1000);
        self.buckets[b].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    fn percentile(counts: &[u64], total: u64, pct: u64, max_ns: u64) -> u64 {
        if total == 0 {
            return 0;
        }
        // Smallest rank r with r >= total * pct / 100, at least 1.
        let rank = (total.saturating_mul(pct).div_ceil(100)).max(1);
        let mut seen = 0u64;
        for (i, c) in counts.iter().enumerate() {
            seen = seen.saturating_add(*c);
            if seen >= rank {
                return bucket_upper_ns(i).min(max_ns);
            }
        }
        max_ns
    }

    /// Count, mean, p50, p99 and max.
    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().fold(0, |a, c| a.saturating_add(*c));
        let max_ns = self.max_ns.load(Ordering::Relaxed);
        let sum = self.total_ns.load(Ordering::Relaxed);
        LatencySummary {
            count: self.count.load(Ordering::Relaxed),
            mean_ns: sum.checked_div(total).unwrap_or(0),
            p50_ns: Self::percentile(&counts, total, 50, max_ns),
            p99_ns: Self::percentile(&counts, total, 99, max_ns),
            max_ns,
        }
    }
}

counters! {
    /// Counters of one [`super::bridge::IotlbBridge`].
    BridgeCounters =>
    /// A copy of the bridge counters.
    BridgeStats {

    /// MISS requests received from the back end.
    misses,
    /// Misses answered with an acked UPDATE.
    misses_served,
    /// Misses refused (unmapped, forbidden, stopped, send failure).
    misses_refused,
    /// Refused misses reported to the vIOMMU as DMA faults.
    faults,
    /// ACCESS_FAIL reports from the back end.
    access_fails,
    /// UPDATEs pushed for MAP events (prefetch policy).
    prefetches,
    /// INVALIDATEs acked by the back end (one per changed run of a
    /// notification; a notification that changed nothing sends none).
    invalidations,
    /// Notifications whose INVALIDATE failed.
    invalidation_failures,
    /// Unmap notifications that needed no INVALIDATE: the back end was
    /// never sent anything in their range (since its last invalidation).
    invalidations_skipped,
    /// Unmap notifications that came from device-TLB invalidations (the
    /// guest enabled ATS and the vIOMMU delivered DEVIOTLB_UNMAP events),
    /// whether or not they needed an INVALIDATE.
    devtlb_notifications,
    /// Unmap notifications that needed no INVALIDATE because everything the
    /// back end held in their range still translates the same way (e.g. the
    /// unchanged neighbours in a widened VT-d invalidation block).
    invalidations_unchanged,
    /// INVALIDATEs that overlapped a running vring (DPDK then disables the
    /// queue until an UPDATE covers the ring again).
    ring_invalidations,
    /// UPDATEs pushed right after such an INVALIDATE to restore the ring.
    ring_updates,
    /// Rings found unmapped while the device runs (the guest removed them).
    rings_unmapped,
    /// Stalled queues found by the detector (`super::stall`): the back end
    /// held descriptors without completing any for longer than the
    /// threshold with no IOTLB miss outstanding. One per stall episode.
    stall_reports,
    /// Full-range INVALIDATEs acked at (re)connection: one each time the
    /// device starts on a connection (first activation, every reconnect),
    /// before any other IOTLB message, whatever the back end did with its
    /// IOTLB at SET_FEATURES. Not counted in `invalidations`.
    connect_invalidations,
    /// Back-end requests refused as unknown or unsupported (the back-end
    /// request server reports them; see `MissHandler::on_refused_request`).
    unsupported_requests,
    /// Back-end requests refused unprocessed because the back end sent too
    /// many bad requests in one second.
    throttled_requests,
    }
    latencies {
    /// From MISS receipt to the UPDATE's ack (served misses only).
    miss_latency,
    /// From the start of `notify` to the last INVALIDATE ack.
    invalidate_latency,
    }
}

/// Everything a vhost-user device counts, for the library API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VhostUserStats {
    /// Main-socket IOTLB traffic: UPDATE/INVALIDATE messages written, acks,
    /// nacks, failures and the ack round-trip time.
    pub iotlb: IotlbStatsSnapshot,
    /// Miss and invalidation handling (all zero without a vIOMMU).
    pub bridge: BridgeStats,
    /// Successful activations.
    pub activations: u64,
    /// Whether the back end is gone (without reconnection the device then
    /// refuses to start; with it, until a back end is connected again).
    pub broken: bool,
    /// Back-end restarts (`reconnect=SECS`).
    pub reconnect: ReconnectStats,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_microseconds() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 1);
        assert_eq!(bucket_of(2), 2);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(1024), 11);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn empty_histogram_summarises_to_zero() {
        assert_eq!(
            LatencyHistogram::default().summary(),
            LatencySummary::default()
        );
    }

    #[test]
    fn percentiles_follow_the_distribution() {
        let h = LatencyHistogram::default();
        for _ in 0..98 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(5));
        h.record(Duration::from_millis(5));
        let s = h.summary();
        assert_eq!(s.count, 100);
        // 10 µs lands in [8, 16) µs.
        assert_eq!(s.p50_ns, 16_000);
        // The 99th sample is one of the 5 ms ones: bucket [4096, 8192) µs,
        // capped at the max.
        assert_eq!(s.p99_ns, 5_000_000);
        assert_eq!(s.max_ns, 5_000_000);
        assert_eq!(s.mean_ns, (98 * 10_000 + 2 * 5_000_000) / 100);
    }
}
