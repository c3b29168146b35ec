//! Miss service latency as the back end sees it: the time from writing an
//! IOTLB MISS on the back-end channel to receiving the UPDATE that covers it
//! on the main socket. Comparable between front ends (iovmm, QEMU) because
//! it is measured on the protocol alone.

use std::time::{Duration, Instant};

/// Most samples kept; later misses are only counted.
pub const MAX_SAMPLES: usize = 1_000_000;

/// One served miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissSample {
    /// The IOVA the miss asked for.
    pub iova: u64,
    /// When the miss was sent, relative to the back end's start.
    pub sent_at: Duration,
    /// Time until the covering UPDATE arrived.
    pub latency: Duration,
}

/// The outstanding miss (the data path sends one at a time) and the samples.
#[derive(Debug)]
pub(crate) struct MissTimer {
    start: Instant,
    pending: Option<(u64, Instant)>,
    samples: Vec<MissSample>,
    /// Misses that were still pending when the next one was sent (no
    /// UPDATE arrived in time).
    pub(crate) unanswered: u64,
    /// Misses answered by a covering UPDATE.
    pub(crate) answered: u64,
}

impl Default for MissTimer {
    fn default() -> Self {
        MissTimer {
            start: Instant::now(),
            pending: None,
            samples: Vec::new(),
            unanswered: 0,
            answered: 0,
        }
    }
}

impl MissTimer {
    /// A miss for `iova` is being sent now.
    pub(crate) fn sent(&mut self, iova: u64, at: Instant) {
        if self.pending.replace((iova, at)).is_some() {
            self.unanswered += 1;
        }
    }

    /// An UPDATE for `iova..iova+size` arrived at `at`; if it answers the
    /// pending miss, a sample is recorded and returned.
    pub(crate) fn update(&mut self, iova: u64, size: u64, at: Instant) -> Option<MissSample> {
        let (miss, sent) = self.pending?;
        let covers = miss >= iova && miss - iova < size;
        if !covers {
            return None;
        }
        self.pending = None;
        self.answered += 1;
        let s = MissSample {
            iova: miss,
            sent_at: sent.saturating_duration_since(self.start),
            latency: at.saturating_duration_since(sent),
        };
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push(s);
        }
        Some(s)
    }

    /// Every sample so far.
    pub(crate) fn samples(&self) -> &[MissSample] {
        &self.samples
    }
}

/// Summary of a set of latencies (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyStats {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl LatencyStats {
    /// Summarise `samples`; `None` when there are none.
    pub fn from_samples(samples: impl IntoIterator<Item = Duration>) -> Option<Self> {
        let mut v: Vec<Duration> = samples.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        Some(LatencyStats {
            count: v.len(),
            p50: percentile(&v, 50),
            p99: percentile(&v, 99),
            max: v[v.len() - 1],
        })
    }
}

/// Nearest-rank percentile `p` (0..=100) of sorted, non-empty `v`.
fn percentile(v: &[Duration], p: usize) -> Duration {
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank.min(v.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn update_covering_the_pending_miss_records_its_latency() {
        let mut t = MissTimer::default();
        let t0 = Instant::now();
        t.sent(0x1234, t0);
        assert_eq!(t.update(0x2000, 0x1000, t0 + ms(1)), None);
        let s = t.update(0x1000, 0x1000, t0 + ms(3));
        assert_eq!(s.map(|s| (s.iova, s.latency)), Some((0x1234, ms(3))));
        // Answered: a second UPDATE (e.g. QEMU's unsolicited one) is not a sample.
        assert_eq!(t.update(0x1000, 0x1000, t0 + ms(4)), None);
        assert_eq!((t.samples().len(), t.answered), (1, 1));
    }

    #[test]
    fn miss_replaced_before_its_update_counts_as_unanswered() {
        let mut t = MissTimer::default();
        let t0 = Instant::now();
        t.sent(0x1000, t0);
        t.sent(0x5000, t0 + ms(1));
        assert_eq!(t.unanswered, 1);
        assert!(t.update(0x1000, 0x1000, t0 + ms(2)).is_none());
        assert!(t.update(0x5000, 0x1000, t0 + ms(2)).is_some());
    }

    #[test]
    fn update_range_end_is_exclusive_and_does_not_overflow() {
        let mut t = MissTimer::default();
        let t0 = Instant::now();
        t.sent(0x2000, t0);
        assert!(t.update(0x1000, 0x1000, t0).is_none());
        t.sent(u64::MAX, t0);
        assert!(t.update(u64::MAX - 0xfff, 0x1000, t0).is_some());
    }

    #[test]
    fn stats_use_nearest_rank_percentiles() {
        let s = LatencyStats::from_samples((1..=100).map(ms)).unwrap_or_else(|| panic!("stats"));
        assert_eq!(
            (s.count, s.p50, s.p99, s.max),
            (100, ms(50), ms(99), ms(100))
        );
        let one = LatencyStats::from_samples([ms(7)]).unwrap_or_else(|| panic!("stats"));
        assert_eq!((one.p50, one.p99, one.max), (ms(7), ms(7), ms(7)));
        let two = LatencyStats::from_samples([ms(9), ms(1)]).unwrap_or_else(|| panic!("stats"));
        assert_eq!((two.p50, two.p99), (ms(1), ms(9)));
        assert!(LatencyStats::from_samples([]).is_none());
    }
}
