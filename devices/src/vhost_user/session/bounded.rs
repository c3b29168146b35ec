//! A mutex with a bounded wait, for the session: a vCPU must not wait longer than the channel
//! timeout for a holder that is busy on a slow back end.
//!
//! `std::sync::Mutex` has no timed lock. This one is a `held` flag under a small mutex plus a
//! condition variable: a waiter sleeps until the holder lets go (its guard's drop notifies) or
//! its bound passes. The value itself is in a second mutex that only the flag's owner locks,
//! so it is never contended.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use iommu::sync::{lock, wait_timeout_while, wait_while};

/// A mutex whose [`BoundedMutex::lock_within`] gives up after a bound.
pub(crate) struct BoundedMutex<T> {
    held: Mutex<bool>,
    released: Condvar,
    value: Mutex<T>,
}

/// Access to the value of a [`BoundedMutex`]; dropping it lets the next waiter in.
pub(crate) struct BoundedGuard<'a, T> {
    // Field order matters: the value is unlocked before the flag is cleared.
    value: MutexGuard<'a, T>,
    _release: Release<'a>,
}

/// Clears the `held` flag and wakes a waiter (also when a holder panics).
struct Release<'a> {
    held: &'a Mutex<bool>,
    released: &'a Condvar,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        *lock(self.held) = false;
        self.released.notify_one();
    }
}

impl<T> BoundedMutex<T> {
    pub(crate) fn new(value: T) -> Self {
        BoundedMutex {
            held: Mutex::new(false),
            released: Condvar::new(),
            value: Mutex::new(value),
        }
    }

    /// Waits as long as it takes.
    pub(crate) fn lock(&self) -> BoundedGuard<'_, T> {
        let held = wait_while(&self.released, lock(&self.held), |held| *held);
        self.enter(held)
    }

    /// Waits at most `bound`; `None` if the holder kept the lock that long.
    pub(crate) fn lock_within(&self, bound: Duration) -> Option<BoundedGuard<'_, T>> {
        let (held, timed_out) =
            wait_timeout_while(&self.released, lock(&self.held), bound, |held| *held);
        (!timed_out).then(|| self.enter(held))
    }

    fn enter(&self, mut held: MutexGuard<'_, bool>) -> BoundedGuard<'_, T> {
        *held = true;
        drop(held);
        BoundedGuard {
            value: lock(&self.value),
            _release: Release {
                held: &self.held,
                released: &self.released,
            },
        }
    }
}

impl<T> std::ops::Deref for BoundedGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> std::ops::DerefMut for BoundedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    #[test]
    fn a_bounded_wait_gives_up_while_held_and_gets_in_once_released() {
        let m = Arc::new(BoundedMutex::new(0u32));
        let mut g = m.lock();
        assert!(m.lock_within(Duration::from_millis(20)).is_none());
        let (started_tx, started) = mpsc::channel();
        let m2 = m.clone();
        let waiter = std::thread::spawn(move || {
            started_tx.send(()).unwrap();
            let mut g = m2.lock_within(Duration::from_secs(60)).unwrap();
            // It got in after our write, not before.
            assert_eq!(*g, 7);
            *g += 1;
        });
        started.recv().unwrap();
        *g = 7;
        drop(g);
        // Woken by the release, long before its bound.
        waiter.join().unwrap();
        assert_eq!(*m.lock(), 8);
    }

    #[test]
    fn a_panicking_holder_releases_the_lock() {
        let m = Arc::new(BoundedMutex::new(0u32));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("holder panics");
        })
        .join();
        *m.lock_within(Duration::from_secs(60)).unwrap() += 1;
        assert_eq!(*m.lock(), 1);
    }
}
