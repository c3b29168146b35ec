//! Poison-tolerant locking, the one way iovmm takes its locks.
//!
//! A `std` lock is *poisoned* when a thread panics while holding it, and `lock()` then returns an
//! error for ever after. iovmm runs device models on many threads (vCPUs, the virtio-iommu
//! worker, vhost-user channel threads, the event loop): if every later `lock()` turned that
//! error into another panic, one panicking device thread would take the whole VMM down, or
//! wedge shutdown. The state behind iovmm's locks is kept consistent by its owners (a mutation
//! validates before it changes anything, caches may be dropped at any time), so after a panic
//! the next holder simply takes the lock and carries on. The condition-variable waits below
//! tolerate poisoning the same way.
//!
//! ```
//! use std::sync::{Mutex, RwLock};
//! use iommu::sync::{lock, read, write};
//!
//! let m = Mutex::new(1);
//! *lock(&m) += 1;
//! let r = RwLock::new(vec![1]);
//! write(&r).push(2);
//! assert_eq!(read(&r).len(), 2);
//! ```

use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

/// Locks `m`, also when a panicking thread poisoned it (see the module documentation).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks `l`, also when a panicking thread poisoned it (see the module documentation).
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks `l`, also when a panicking thread poisoned it (see the module documentation).
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` for at most `timeout` (callers re-check what they wait for: wake-ups may be
/// spurious), also when poisoned.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    cv.wait_timeout(guard, timeout)
        .unwrap_or_else(|e| e.into_inner())
        .0
}

/// Waits on `cv` while `condition` holds, also when poisoned.
pub fn wait_while<'a, T, F>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    condition: F,
) -> MutexGuard<'a, T>
where
    F: FnMut(&mut T) -> bool,
{
    cv.wait_while(guard, condition)
        .unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` while `condition` holds, for at most `timeout`, also when poisoned. Returns
/// the guard and whether the wait timed out with `condition` still holding.
pub fn wait_timeout_while<'a, T, F>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
    mut condition: F,
) -> (MutexGuard<'a, T>, bool)
where
    F: FnMut(&mut T) -> bool,
{
    let (mut guard, result) = cv
        .wait_timeout_while(guard, timeout, &mut condition)
        .unwrap_or_else(|e| e.into_inner());
    let timed_out = result.timed_out() && condition(&mut guard);
    (guard, timed_out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    #[test]
    fn poisoned_locks_are_still_taken() {
        let m = Mutex::new(1);
        let l = RwLock::new(1);
        let _ = catch_unwind(AssertUnwindSafe(|| {
            let _g = lock(&m);
            let _w = write(&l);
            panic!("device thread panics while holding the locks");
        }));
        assert!(m.is_poisoned() && l.is_poisoned());
        *lock(&m) += 1;
        *write(&l) += 1;
        assert_eq!((*lock(&m), *read(&l)), (2, 2));
    }

    #[test]
    fn condition_waits_see_the_change_or_time_out() {
        let state = std::sync::Arc::new((Mutex::new(false), Condvar::new()));
        let (g, timed_out) =
            wait_timeout_while(&state.1, lock(&state.0), Duration::ZERO, |set| !*set);
        assert!(timed_out && !*g);
        drop(g);
        let s2 = state.clone();
        let setter = std::thread::spawn(move || {
            *lock(&s2.0) = true;
            s2.1.notify_all();
        });
        let g = wait_while(&state.1, lock(&state.0), |set| !*set);
        assert!(*g);
        drop(g);
        setter.join().unwrap_or_else(|_| panic!("setter panicked"));
        let (g, timed_out) =
            wait_timeout_while(&state.1, lock(&state.0), Duration::from_secs(60), |set| {
                !*set
            });
        assert!(!timed_out && *g);
        drop(wait_timeout(&state.1, g, Duration::ZERO));
    }
}
