//! Poison-tolerant locking, the one way iovmm takes its locks.
//!
//! A `std` lock is *poisoned* when a thread panics while holding it, and `lock()` then returns an
//! error for ever after. iovmm runs device models on many threads (vCPUs, the virtio-iommu
//! worker, vhost-user channel threads, the event loop): if every later `lock()` turned that
//! error into another panic, one panicking device thread would take the whole VMM down, or
//! wedge shutdown. The state behind iovmm's locks is kept consistent by its owners (a mutation
//! validates before it changes anything, caches may be dropped at any time), so after a panic
//! the next holder simply takes the lock and carries on.
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

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

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
}
