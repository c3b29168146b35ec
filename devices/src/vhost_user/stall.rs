//! Stalled-queue detection: a back end that holds descriptors (the ring's
//! avail index is ahead of its used index) and completes none of them for
//! longer than a threshold, while no IOTLB miss is outstanding, has stopped
//! serving the queue. That is how the VT-d + DPDK stall of issue 13 looked
//! from the outside (a queue disabled by an INVALIDATE overlapping its ring,
//! never re-enabled): nothing fails, the guest just waits.
//!
//! The decision is the pure function [`observe`]; the bridge feeds it the
//! indices it reads from guest memory through the vIOMMU on every tick of
//! the back-end request thread (`super::backend_req::TICK`) and logs the
//! verdict with the last miss and the last INVALIDATE
//! (`super::bridge::IotlbBridge::check_stalls`).

use std::time::{Duration, Instant};

/// How long a queue may hold descriptors without completing any before it
/// is reported (the guest test driver gives up after 10 s).
pub const STALL_THRESHOLD: Duration = Duration::from_secs(2);

/// A driver-initiated ring the detector watches, as IOVAs (behind a vIOMMU
/// the ring addresses are IOVAs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchedRing {
    /// The queue index.
    pub queue: usize,
    /// The driver area (avail ring): flags u16, then idx u16.
    pub avail: u64,
    /// The device area (used ring): flags u16, then idx u16.
    pub used: u64,
}

impl WatchedRing {
    /// IOVA of the avail ring's idx field.
    pub fn avail_idx(&self) -> Option<u64> {
        self.avail.checked_add(2)
    }

    /// IOVA of the used ring's idx field.
    pub fn used_idx(&self) -> Option<u64> {
        self.used.checked_add(2)
    }
}

/// The two indices of a split ring, as read from guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingIndices {
    /// avail->idx: descriptors the driver has posted (free running).
    pub avail: u16,
    /// used->idx: descriptors the device has completed (free running).
    pub used: u16,
}

impl RingIndices {
    /// Descriptor chains posted and not completed (mod 2^16).
    pub fn held(&self) -> u16 {
        self.avail.wrapping_sub(self.used)
    }
}

/// What the detector remembers about one queue between observations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueWatch {
    /// The used index seen last.
    used: Option<u16>,
    /// Since when the queue has held descriptors without progress.
    since: Option<Instant>,
    /// This episode was reported already.
    reported: bool,
}

/// The detector's verdict on one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing held, or the back end completed something since last time.
    Fine,
    /// Descriptors held without progress, not for long yet (or a miss is
    /// being served: the back end is waiting for us, not stuck).
    Waiting,
    /// Held without progress for `stuck` ≥ the threshold: report it (once
    /// per episode).
    Stalled {
        /// Descriptors held.
        held: u16,
        /// Time since the last progress.
        stuck: Duration,
    },
    /// The episode reported earlier is still going on.
    StillStalled,
}

/// Feed one observation of a queue's indices at `now`.
///
/// Progress (a new used index) or an empty queue ends an episode; a miss in
/// flight restarts the clock. A queue is stalled when it held descriptors
/// through `threshold` without any of that.
pub fn observe(
    w: &mut QueueWatch,
    idx: RingIndices,
    miss_in_flight: bool,
    now: Instant,
    threshold: Duration,
) -> Verdict {
    let progressed = w.used != Some(idx.used);
    w.used = Some(idx.used);
    if idx.held() == 0 {
        *w = QueueWatch {
            used: w.used,
            ..QueueWatch::default()
        };
        return Verdict::Fine;
    }
    if progressed || miss_in_flight {
        w.since = Some(now);
        w.reported = false;
        return if progressed {
            Verdict::Fine
        } else {
            Verdict::Waiting
        };
    }
    let since = *w.since.get_or_insert(now);
    let stuck = now.saturating_duration_since(since);
    match (stuck >= threshold, w.reported) {
        (false, _) => Verdict::Waiting,
        (true, true) => Verdict::StillStalled,
        (true, false) => {
            w.reported = true;
            Verdict::Stalled {
                held: idx.held(),
                stuck,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    fn idx(avail: u16, used: u16) -> RingIndices {
        RingIndices { avail, used }
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn an_empty_queue_never_stalls() {
        let (mut w, t0) = (QueueWatch::default(), Instant::now());
        for s in 0..10 {
            assert_eq!(
                observe(&mut w, idx(7, 7), false, at(t0, s * 1000), T),
                Verdict::Fine
            );
        }
    }

    #[test]
    fn held_descriptors_without_progress_stall_once_past_the_threshold() {
        let (mut w, t0) = (QueueWatch::default(), Instant::now());
        assert_eq!(observe(&mut w, idx(10, 4), false, t0, T), Verdict::Fine);
        assert_eq!(
            observe(&mut w, idx(10, 4), false, at(t0, 1999), T),
            Verdict::Waiting
        );
        assert_eq!(
            observe(&mut w, idx(12, 4), false, at(t0, 2000), T),
            Verdict::Stalled { held: 8, stuck: T }
        );
        // Reported once per episode.
        assert_eq!(
            observe(&mut w, idx(12, 4), false, at(t0, 9000), T),
            Verdict::StillStalled
        );
    }

    #[test]
    fn progress_ends_the_episode_and_restarts_the_clock() {
        let (mut w, t0) = (QueueWatch::default(), Instant::now());
        observe(&mut w, idx(10, 4), false, t0, T);
        assert!(matches!(
            observe(&mut w, idx(10, 4), false, at(t0, 3000), T),
            Verdict::Stalled { .. }
        ));
        assert_eq!(
            observe(&mut w, idx(10, 5), false, at(t0, 3500), T),
            Verdict::Fine
        );
        assert_eq!(
            observe(&mut w, idx(10, 5), false, at(t0, 5000), T),
            Verdict::Waiting
        );
        // A new episode is reported again.
        assert!(matches!(
            observe(&mut w, idx(10, 5), false, at(t0, 5500), T),
            Verdict::Stalled { held: 5, .. }
        ));
    }

    #[test]
    fn a_miss_in_flight_is_not_a_stall() {
        let (mut w, t0) = (QueueWatch::default(), Instant::now());
        observe(&mut w, idx(3, 1), false, t0, T);
        assert_eq!(
            observe(&mut w, idx(3, 1), true, at(t0, 5000), T),
            Verdict::Waiting
        );
        // The clock restarted when the miss was seen.
        assert_eq!(
            observe(&mut w, idx(3, 1), false, at(t0, 6000), T),
            Verdict::Waiting
        );
        assert!(matches!(
            observe(&mut w, idx(3, 1), false, at(t0, 7000), T),
            Verdict::Stalled { .. }
        ));
    }

    #[test]
    fn indices_wrap_around() {
        let (mut w, t0) = (QueueWatch::default(), Instant::now());
        let i = idx(2, u16::MAX - 1);
        assert_eq!(i.held(), 4);
        observe(&mut w, i, false, t0, T);
        assert_eq!(
            observe(&mut w, i, false, at(t0, 2500), T),
            Verdict::Stalled {
                held: 4,
                stuck: Duration::from_millis(2500)
            }
        );
        assert_eq!(
            observe(&mut w, idx(2, 2), false, at(t0, 2600), T),
            Verdict::Fine
        );
    }

    #[test]
    fn draining_then_refilling_starts_a_new_episode() {
        let (mut w, t0) = (QueueWatch::default(), Instant::now());
        observe(&mut w, idx(4, 0), false, t0, T);
        assert!(matches!(
            observe(&mut w, idx(4, 0), false, at(t0, 2000), T),
            Verdict::Stalled { .. }
        ));
        assert_eq!(
            observe(&mut w, idx(4, 4), false, at(t0, 2100), T),
            Verdict::Fine
        );
        // Same used index as last time, but the queue was empty in between:
        // the clock starts now, not at t0.
        assert_eq!(
            observe(&mut w, idx(6, 4), false, at(t0, 2200), T),
            Verdict::Waiting
        );
        assert_eq!(
            observe(&mut w, idx(6, 4), false, at(t0, 4100), T),
            Verdict::Waiting
        );
        assert!(matches!(
            observe(&mut w, idx(6, 4), false, at(t0, 4200), T),
            Verdict::Stalled { .. }
        ));
    }
}
