//! Rate-limited logging, for every log line a guest or a vhost-user back end can trigger.
//!
//! A guest that writes a bad register in a loop, or a back end that floods its channel, must
//! not be able to fill the host's log (or spend the VMM's time formatting lines). A
//! [`RateLimit`] lets `burst` lines through per `window`; the lines past it are counted and the
//! count is reported on the next line let through ("N lines suppressed"), or by
//! [`RateLimit::roll_at`] for a summary when no further line may come.
//!
//! The limiter takes the time as an argument ([`RateLimit::check_at`]) so that it is
//! deterministic under test; [`RateLimit::check`] reads the clock. One limiter may guard one
//! line or a group of lines (a device's guest-triggered diagnostics): a flood of one kind then
//! also hides the others for the rest of the window, which is the point.
//!
//! ```
//! use std::time::Duration;
//! use iommu::ratelimit::RateLimit;
//! use iommu::warn_limited;
//!
//! let mut limit = RateLimit::new(8, Duration::from_secs(1));
//! for offset in 0..1000u64 {
//!     // At most 8 lines per second; the rest are counted.
//!     warn_limited!(limit, "bad register write at {offset:#x}");
//! }
//! ```

use std::fmt;
use std::time::{Duration, Instant};

pub use log::Level;

/// At most `burst` log lines per `window`; see the module documentation.
#[derive(Debug, Clone)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    /// Start of the current window (`None` before the first line).
    start: Option<Instant>,
    /// Lines let through in the current window.
    used: u32,
    /// Lines suppressed since the last one let through.
    suppressed: u64,
}

impl RateLimit {
    /// At most `burst` (at least 1) lines per `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        RateLimit {
            burst: if burst == 0 { 1 } else { burst },
            window,
            start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// At most `burst` lines per second.
    pub const fn per_second(burst: u32) -> Self {
        Self::new(burst, Duration::from_secs(1))
    }

    /// [`RateLimit::check_at`] now.
    pub fn check(&mut self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// Decides about one line at `now`: `Some(n)` if it may be logged, `n` being the number of
    /// lines suppressed before it (to be reported with it); `None` if it is suppressed (it is
    /// counted for the next line let through).
    pub fn check_at(&mut self, now: Instant) -> Option<u64> {
        self.new_window_if_due(now);
        if self.used < self.burst {
            self.used += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }

    /// Starts a new window at `now` if the current one is over and returns the number of lines
    /// suppressed since the last one let through, which then count as reported. For a summary
    /// line when a flood stopped and no further line may come; 0 while the window lasts.
    pub fn roll_at(&mut self, now: Instant) -> u64 {
        if self.new_window_if_due(now) {
            std::mem::take(&mut self.suppressed)
        } else {
            0
        }
    }

    /// Starts a new window at `now` if the current one is over (or none began yet).
    fn new_window_if_due(&mut self, now: Instant) -> bool {
        let due = self
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if due {
            self.start = Some(now);
            self.used = 0;
        }
        due
    }

    /// Lines suppressed since the last one let through.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// Whether log lines of `level` for `target` are enabled at all (a disabled line does not use
/// up the budget).
#[doc(hidden)]
pub fn enabled(level: Level, target: &str) -> bool {
    log::log_enabled!(target: target, level)
}

/// Logs one line that a [`RateLimit`] let through, with the count suppressed before it.
#[doc(hidden)]
pub fn emit(level: Level, target: &str, suppressed: u64, args: fmt::Arguments<'_>) {
    if suppressed == 0 {
        log::log!(target: target, level, "{args}");
    } else {
        log::log!(target: target, level, "{args} ({suppressed} earlier lines suppressed by the rate limit)");
    }
}

/// `log_limited!(limit, level, "format", args...)`: logs at `level` if `limit` (a
/// [`RateLimit`], or anything that derefs mutably to one such as a `MutexGuard`) lets the line
/// through. The log target is the calling module, as with `log::log!`.
#[macro_export]
macro_rules! log_limited {
    ($limit:expr, $level:expr, $($arg:tt)+) => {{
        let level: $crate::ratelimit::Level = $level;
        if $crate::ratelimit::enabled(level, ::core::module_path!()) {
            if let ::core::option::Option::Some(suppressed) = $limit.check() {
                $crate::ratelimit::emit(
                    level,
                    ::core::module_path!(),
                    suppressed,
                    ::core::format_args!($($arg)+),
                );
            }
        }
    }};
}

/// `warn_limited!(limit, "format", args...)`: [`log_limited!`] at warning level.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        $crate::log_limited!($limit, $crate::ratelimit::Level::Warn, $($arg)+)
    };
}

/// `debug_limited!(limit, "format", args...)`: [`log_limited!`] at debug level.
#[macro_export]
macro_rules! debug_limited {
    ($limit:expr, $($arg:tt)+) => {
        $crate::log_limited!($limit, $crate::ratelimit::Level::Debug, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn burst_per_window_then_counted() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(3, Duration::from_secs(1));
        let first: Vec<_> = (0..10).map(|i| l.check_at(t0 + MS * i)).collect();
        assert_eq!(&first[..3], &[Some(0); 3]);
        assert!(first[3..].iter().all(Option::is_none));
        assert_eq!(l.suppressed(), 7);
        // Still the same window 999 ms later.
        assert_eq!(l.check_at(t0 + MS * 999), None);
        // The next window's first line carries the count; the count starts again.
        assert_eq!(l.check_at(t0 + MS * 1000), Some(8));
        assert_eq!(l.check_at(t0 + MS * 1001), Some(0));
        assert_eq!(l.suppressed(), 0);
    }

    #[test]
    fn a_window_starts_at_the_first_line_after_a_quiet_spell() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(1, Duration::from_secs(2));
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0 + MS * 1999), None);
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(l.check_at(t1), Some(1));
        // One line per window from t1 on, not from t0's grid.
        assert_eq!(l.check_at(t1 + MS * 1999), None);
        assert_eq!(l.check_at(t1 + MS * 2000), Some(1));
    }

    #[test]
    fn roll_reports_a_finished_flood_once() {
        let t0 = Instant::now();
        let mut l = RateLimit::per_second(1);
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0 + MS), None);
        assert_eq!(l.check_at(t0 + MS * 2), None);
        assert_eq!(l.roll_at(t0 + MS * 500), 0, "the window is not over");
        assert_eq!(l.roll_at(t0 + MS * 1000), 2);
        assert_eq!(l.roll_at(t0 + MS * 3000), 0, "reported once");
        assert_eq!(l.check_at(t0 + MS * 3001), Some(0));
    }

    #[test]
    fn zero_burst_still_logs_one_line_per_window() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(0, Duration::from_secs(1));
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0), None);
    }

    #[test]
    fn macros_accept_a_limiter_or_a_guard() {
        let mut l = RateLimit::per_second(1);
        warn_limited!(l, "line {}", 1);
        let m = std::sync::Mutex::new(RateLimit::per_second(1));
        debug_limited!(crate::sync::lock(&m), "line {}", 2);
        log_limited!(l, Level::Error, "line");
    }
}
