//! vCPU threads and their exit handling.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and dispatches port I/O and MMIO
//! exits through the shared buses. A vCPU is stopped by setting the shared
//! stop flag and kicking its thread with [`VCPU_KICK_SIGNAL`], which makes
//! `KVM_RUN` return `EINTR`; [`VcpuHandle::stop`] repeats the kick until the
//! thread has left its loop, so a kick racing with the flag check is harmless.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::seccomp::{SeccompFilters, ThreadKind};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote `code` to the debug exit port.
    ExitPort(u32),
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 or triple-fault-free reboot path).
    Reset,
    /// The VMM was asked to stop through the API.
    Stopped,
    /// The vCPU halted with no way to wake up (KVM_EXIT_HLT).
    Halted {
        /// vCPU index.
        vcpu: u8,
        /// Guest RIP at the time.
        rip: u64,
    },
    /// The guest crashed (triple fault / KVM_EXIT_SHUTDOWN).
    GuestCrash {
        /// vCPU index.
        vcpu: u8,
        /// Guest RIP at the time.
        rip: u64,
    },
    /// KVM could not emulate the guest.
    InternalError {
        /// vCPU index.
        vcpu: u8,
        /// KVM internal error sub-code.
        suberror: u32,
        /// Guest RIP at the time.
        rip: u64,
    },
    /// A KVM_RUN ioctl failed.
    RunFailed {
        /// vCPU index.
        vcpu: u8,
        /// errno.
        errno: i32,
    },
}

/// The first stop reason wins; later ones are ignored.
#[derive(Debug)]
pub struct ExitState {
    reason: Mutex<Option<VmExit>>,
    /// Signalled when a reason is recorded.
    pub evt: EventFd,
}

impl ExitState {
    /// Creates an empty exit state.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitState {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the event loop.
    pub fn request(&self, reason: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        if let Err(e) = self.evt.write(1) {
            log::error!("vmm: cannot signal the exit event: {e}");
        }
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Signal used to kick vCPU threads out of KVM_RUN.
#[allow(non_snake_case)]
pub fn VCPU_KICK_SIGNAL() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (process-wide, idempotent) no-op handler for the kick signal.
pub fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(VCPU_KICK_SIGNAL(), noop_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// What a vCPU thread needs to run.
pub struct VcpuRunner {
    /// vCPU index.
    pub index: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Called with the vector on KVM_EXIT_IOAPIC_EOI (split irqchip).
    pub eoi: Arc<dyn Fn(u8) + Send + Sync>,
    /// Where stop reasons go.
    pub exit: Arc<ExitState>,
    /// Set to stop all vCPUs.
    pub stop: Arc<AtomicBool>,
    /// Seccomp filters; the vCPU one is installed before the first KVM_RUN.
    pub seccomp: Arc<SeccompFilters>,
}

impl VcpuRunner {
    fn handle_exit(&mut self) -> Option<VmExit> {
        let exit = match self.fd.run() {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) => {
                return Some(VmExit::RunFailed {
                    vcpu: self.index,
                    errno: e.errno(),
                })
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(port as u64, data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                self.pio.write(port as u64, data);
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.mmio.write(addr, data);
            }
            VcpuExit::IoapicEoi(vector) => (self.eoi)(vector),
            VcpuExit::Hlt => {
                return Some(VmExit::Halted {
                    vcpu: self.index,
                    rip: self.rip(),
                })
            }
            VcpuExit::Shutdown => {
                return Some(VmExit::GuestCrash {
                    vcpu: self.index,
                    rip: self.rip(),
                })
            }
            VcpuExit::SystemEvent(kind, _) => {
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    _ => VmExit::PowerOff,
                })
            }
            VcpuExit::InternalError | VcpuExit::FailEntry(..) => {
                return Some(self.internal_error());
            }
            VcpuExit::Intr => {}
            other => log::debug!("vcpu{}: unhandled exit {other:?}", self.index),
        }
        None
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX)
    }

    fn internal_error(&mut self) -> VmExit {
        let run = self.fd.get_kvm_run();
        let suberror = if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: exit_reason says the `internal` member of the union is the valid one.
            unsafe { run.__bindgen_anon_1.internal.suberror }
        } else {
            u32::MAX
        };
        VmExit::InternalError {
            vcpu: self.index,
            suberror,
            rip: self.rip(),
        }
    }

    fn run(mut self) {
        if let Err(e) = self.seccomp.apply(ThreadKind::Vcpu) {
            log::error!("vcpu{}: {e}; stopping the VM", self.index);
            self.exit.request(VmExit::Stopped);
            return;
        }
        while !self.stop.load(Ordering::Acquire) {
            if let Some(reason) = self.handle_exit() {
                log::debug!("vcpu{}: stopping: {reason:?}", self.index);
                self.exit.request(reason);
                break;
            }
        }
    }

    /// Starts the vCPU thread.
    pub fn spawn(self) -> std::io::Result<VcpuHandle> {
        let stop = self.stop.clone();
        let name = format!("iovmm_vcpu{}", self.index);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || self.run())?;
        Ok(VcpuHandle { thread, stop })
    }
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl VcpuHandle {
    /// Stops the thread and joins it; gives up (and leaks the thread) after `timeout`.
    pub fn stop(self, timeout: Duration) -> bool {
        self.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        while !self.thread.is_finished() {
            if Instant::now() > deadline {
                log::error!("vmm: a vCPU thread did not stop within {timeout:?}");
                return false;
            }
            // SAFETY: the pthread_t belongs to a thread we own and have not joined;
            // the signal has a no-op handler installed by install_kick_handler.
            unsafe { libc::pthread_kill(self.thread.as_pthread_t(), VCPU_KICK_SIGNAL()) };
            std::thread::sleep(Duration::from_millis(1));
        }
        self.thread.join().is_ok()
    }
}
