//! Run control of the vCPU threads: stop, pause and resume.
//!
//! Every vCPU thread blocks [`super::VCPU_KICK_SIGNAL`] for itself; KVM unblocks it only inside
//! `KVM_RUN` (`KVM_SET_SIGNAL_MASK` with an empty set, see `set_run_signal_mask`). A kick
//! therefore never interrupts a system call of device emulation on the vCPU thread, and a kick
//! that arrives while the thread is outside `KVM_RUN` stays pending until the next entry, which
//! then returns `EINTR` at once. One kick is enough: whatever the thread is doing when the flag
//! is set, it reaches the top of its loop without entering the guest again. After an `EINTR`
//! the thread takes the pending kicks (`take_pending_kicks`; KVM restores the blocking mask
//! before returning, so the signal is still pending), as QEMU does with its IPI signal.
//!
//! At the top of its loop a vCPU thread looks at the pause and stop flags. Paused, it parks on
//! a condition variable and reports [`VcpuRunState::Paused`]; [`VcpuControl::pause`] returns
//! once every vCPU thread reported it (or has exited), [`VcpuControl::resume`] once every one
//! runs again. Nothing polls: the threads and the caller wait on the same condition variable.

use iommu::sync::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use serde::Serialize;
use thiserror::Error;
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::VCPU_KICK_SIGNAL;

/// The one vCPU ioctl kvm-ioctls does not wrap.
mod ioctls {
    use kvm_bindings::{kvm_signal_mask, KVMIO};
    use vmm_sys_util::ioctl_iow_nr;

    ioctl_iow_nr!(KVM_SET_SIGNAL_MASK, KVMIO, 0x8b, kvm_signal_mask);
}

/// What a vCPU thread is doing, as the thread itself reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VcpuRunState {
    /// Spawned, not yet in its run loop.
    Starting,
    /// In its run loop (in the guest or handling an exit).
    Running,
    /// Parked by a pause.
    Paused,
    /// Left its run loop (the VM is stopping).
    Exited,
}

/// Errors of pausing or resuming the vCPUs.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VcpuControlError {
    /// The VM is already paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// The VM is not paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// The VM is stopping.
    #[error("the VM is stopping")]
    Stopping,
    /// Some vCPU threads did not park in time; the pause was undone.
    #[error("vCPUs {0:?} did not pause within the time limit; the VM keeps running")]
    PauseTimeout(Vec<u8>),
    /// Some vCPU threads did not leave the parked state in time.
    #[error("vCPUs {0:?} did not resume within the time limit")]
    ResumeTimeout(Vec<u8>),
}

#[derive(Debug)]
struct Slot {
    state: VcpuRunState,
    thread: Option<libc::pthread_t>,
}

#[derive(Debug)]
struct Threads {
    slots: Vec<Slot>,
    /// A pause was asked for and not yet undone.
    paused: bool,
}

/// Shared by the vCPU threads of one VM and whoever stops, pauses or resumes them.
#[derive(Debug)]
pub struct VcpuControl {
    stop: AtomicBool,
    pause: AtomicBool,
    threads: Mutex<Threads>,
    changed: Condvar,
}

impl VcpuControl {
    /// Control of `count` vCPUs, all [`VcpuRunState::Starting`].
    pub fn new(count: u8) -> Self {
        let slots = (0..count)
            .map(|_| Slot {
                state: VcpuRunState::Starting,
                thread: None,
            })
            .collect();
        VcpuControl {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            threads: Mutex::new(Threads {
                slots,
                paused: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Threads> {
        lock(&self.threads)
    }

    /// Remembers the thread of vCPU `index` so that it can be kicked.
    pub(super) fn register(&self, index: u8, thread: libc::pthread_t) {
        if let Some(s) = self.lock().slots.get_mut(usize::from(index)) {
            s.thread = Some(thread);
        }
    }

    /// Called by vCPU `index` itself.
    pub(super) fn report(&self, index: u8, state: VcpuRunState) {
        if let Some(s) = self.lock().slots.get_mut(usize::from(index)) {
            s.state = state;
        }
        self.changed.notify_all();
    }

    /// Whether the vCPU threads must leave their loops.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Called by vCPU `index` at the top of its loop: parks while paused. Returns `false` when
    /// the thread must leave its loop.
    pub(super) fn checkpoint(&self, index: u8) -> bool {
        if !self.pause.load(Ordering::SeqCst) {
            return !self.stopping();
        }
        let mut t = self.lock();
        if t.paused && !self.stopping() {
            set_state(&mut t, index, VcpuRunState::Paused);
            self.changed.notify_all();
            t = iommu::sync::wait_while(&self.changed, t, |t| t.paused && !self.stopping());
            set_state(&mut t, index, VcpuRunState::Running);
            self.changed.notify_all();
        }
        !self.stopping()
    }

    /// Kicks every vCPU thread that runs (never one that exited: its thread may be joined).
    fn kick_running(t: &Threads) {
        for s in &t.slots {
            if let (VcpuRunState::Running, Some(thread)) = (s.state, s.thread) {
                // SAFETY: the thread has not reported Exited (it does so under this lock as its
                // last act in the loop), so it is alive and not joined; the kick signal has a
                // handler (install_kick_handler) and is blocked outside KVM_RUN.
                unsafe { libc::pthread_kill(thread, VCPU_KICK_SIGNAL()) };
            }
        }
    }

    /// Asks every vCPU thread to leave its loop (wakes parked ones too); does not wait.
    pub fn request_stop(&self) {
        let t = self.lock();
        self.stop.store(true, Ordering::SeqCst);
        Self::kick_running(&t);
        self.changed.notify_all();
    }

    /// Waits until vCPU `index` has left its loop, at most until `deadline`.
    pub(super) fn wait_exited(&self, index: u8, deadline: Instant) -> bool {
        let exited = |t: &Threads| {
            t.slots
                .get(usize::from(index))
                .is_none_or(|s| s.state == VcpuRunState::Exited)
        };
        self.wait_until(deadline, exited).is_ok()
    }

    /// Waits on the condition variable until `done` holds or `deadline` passes; returns the
    /// guard either way (`Err` on timeout).
    fn wait_until(
        &self,
        deadline: Instant,
        done: impl Fn(&Threads) -> bool,
    ) -> Result<MutexGuard<'_, Threads>, MutexGuard<'_, Threads>> {
        let mut t = self.lock();
        while !done(&t) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(t);
            }
            t = iommu::sync::wait_timeout(&self.changed, t, left);
        }
        Ok(t)
    }

    /// Stops every vCPU (they park outside the guest) and returns once all of them did, or
    /// undoes the pause after `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuControlError> {
        {
            let mut t = self.lock();
            if self.stopping() {
                return Err(VcpuControlError::Stopping);
            }
            if t.paused {
                return Err(VcpuControlError::AlreadyPaused);
            }
            t.paused = true;
            self.pause.store(true, Ordering::SeqCst);
            Self::kick_running(&t);
        }
        let parked = |t: &Threads| {
            t.slots
                .iter()
                .all(|s| matches!(s.state, VcpuRunState::Paused | VcpuRunState::Exited))
        };
        match self.wait_until(Instant::now() + timeout, parked) {
            Ok(_) => Ok(()),
            Err(mut t) => {
                let late = indices(&t, |s| {
                    s != VcpuRunState::Paused && s != VcpuRunState::Exited
                });
                self.unpause(&mut t);
                Err(VcpuControlError::PauseTimeout(late))
            }
        }
    }

    fn unpause(&self, t: &mut Threads) {
        t.paused = false;
        self.pause.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Lets paused vCPUs run again; returns once none is parked, at most after `timeout`.
    pub fn resume(&self, timeout: Duration) -> Result<(), VcpuControlError> {
        {
            let mut t = self.lock();
            if !t.paused {
                return Err(VcpuControlError::NotPaused);
            }
            self.unpause(&mut t);
        }
        let unparked = |t: &Threads| t.slots.iter().all(|s| s.state != VcpuRunState::Paused);
        match self.wait_until(Instant::now() + timeout, unparked) {
            Ok(_) => Ok(()),
            Err(t) => Err(VcpuControlError::ResumeTimeout(indices(&t, |s| {
                s == VcpuRunState::Paused
            }))),
        }
    }

    /// Whether a pause is in force (asked for and not undone).
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// What each vCPU thread reported last, in index order.
    pub fn states(&self) -> Vec<VcpuRunState> {
        self.lock().slots.iter().map(|s| s.state).collect()
    }
}

fn set_state(t: &mut Threads, index: u8, state: VcpuRunState) {
    if let Some(s) = t.slots.get_mut(usize::from(index)) {
        s.state = state;
    }
}

fn indices(t: &Threads, pred: impl Fn(VcpuRunState) -> bool) -> Vec<u8> {
    (0u8..)
        .zip(&t.slots)
        .filter(|(_, s)| pred(s.state))
        .map(|(i, _)| i)
        .collect()
}

/// Lets `KVM_RUN` take every signal: the kick signal, blocked on the vCPU thread, is then
/// delivered only inside `KVM_RUN` (see the module docs).
pub(super) fn set_run_signal_mask(fd: &VcpuFd) -> std::io::Result<()> {
    /// `struct kvm_signal_mask` followed by an empty 64-bit kernel `sigset_t`.
    #[repr(C)]
    struct RunSignalMask {
        len: u32,
        sigset: [u8; 8],
    }
    let mask = RunSignalMask {
        len: 8,
        sigset: [0; 8],
    };
    // SAFETY: KVM_SET_SIGNAL_MASK reads a kvm_signal_mask header and `len` bytes of sigset that
    // follow it; `mask` provides exactly that and outlives the call, and `fd` is a vCPU fd.
    let rc = unsafe { ioctl_with_ref(fd, ioctls::KVM_SET_SIGNAL_MASK(), &mask) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn kick_set() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value to initialise; sigemptyset/sigaddset only
    // write the local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, VCPU_KICK_SIGNAL());
        set
    }
}

/// Blocks the kick signal on the calling (vCPU) thread.
pub(super) fn block_kick_signal() -> std::io::Result<()> {
    let set = kick_set();
    // SAFETY: pthread_sigmask only changes the calling thread's mask and reads `set`.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    match rc {
        0 => Ok(()),
        e => Err(std::io::Error::from_raw_os_error(e)),
    }
}

/// Takes every pending kick off the calling (vCPU) thread after `KVM_RUN` returned `EINTR`.
///
/// KVM restores the thread's mask (kick blocked) before the return to user space, so the kick
/// that interrupted `KVM_RUN` is still pending there: left alone, it would end every later
/// `KVM_RUN` at once. Kicks are real-time signals and queue, hence the loop.
pub(super) fn take_pending_kicks() {
    let set = kick_set();
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: sigtimedwait reads `set` and `zero` (both live locals) and writes no info (null);
    // with a zero timeout it never blocks. It returns -1 (EAGAIN) once none is pending.
    while unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) } >= 0 {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A fake vCPU loop: checkpoints until told to leave.
    fn spawn_vcpu(c: &Arc<VcpuControl>, index: u8) -> std::thread::JoinHandle<()> {
        let c = c.clone();
        std::thread::spawn(move || {
            c.report(index, VcpuRunState::Running);
            while c.checkpoint(index) {
                std::thread::yield_now();
            }
            c.report(index, VcpuRunState::Exited);
        })
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn pause_parks_every_vcpu_and_resume_releases_them() {
        let c = Arc::new(VcpuControl::new(2));
        let threads: Vec<_> = (0..2).map(|i| spawn_vcpu(&c, i)).collect();
        c.pause(T).unwrap();
        assert_eq!(c.states(), vec![VcpuRunState::Paused; 2]);
        assert!(c.is_paused());
        assert_eq!(c.pause(T), Err(VcpuControlError::AlreadyPaused));
        c.resume(T).unwrap();
        assert!(c.states().iter().all(|s| *s != VcpuRunState::Paused));
        assert_eq!(c.resume(T), Err(VcpuControlError::NotPaused));
        c.request_stop();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.states(), vec![VcpuRunState::Exited; 2]);
        assert_eq!(c.pause(T), Err(VcpuControlError::Stopping));
    }

    #[test]
    fn signal_mask_ioctl_number_matches_the_kernel_abi() {
        assert_eq!(ioctls::KVM_SET_SIGNAL_MASK(), 0x4004_ae8b);
    }

    #[test]
    fn stop_releases_parked_vcpus() {
        let c = Arc::new(VcpuControl::new(1));
        let t = spawn_vcpu(&c, 0);
        c.pause(T).unwrap();
        c.request_stop();
        assert!(c.wait_exited(0, Instant::now() + T));
        t.join().unwrap();
    }

    #[test]
    fn a_vcpu_that_never_checks_in_times_the_pause_out_and_it_is_undone() {
        let c = VcpuControl::new(2);
        c.report(0, VcpuRunState::Exited);
        c.report(1, VcpuRunState::Running);
        let e = c.pause(Duration::from_millis(20)).unwrap_err();
        assert_eq!(e, VcpuControlError::PauseTimeout(vec![1]));
        assert!(!c.is_paused());
        assert!(!c.wait_exited(1, Instant::now()));
        assert!(c.wait_exited(0, Instant::now()));
    }
}
