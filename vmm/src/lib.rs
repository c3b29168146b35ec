//! iovmm: a minimal KVM VMM whose vIOMMUs protect DMA done by external
//! vhost-user backends.
//!
//! The crate is a library first; the `iovmm` binary is a thin CLI over it.
//! An embedding tool builds a [`VmConfig`], calls [`Vmm::start`] and then
//! [`Vmm::wait`] (or [`Vmm::stop`]). Nothing is process-global except the
//! no-op handler of the signal used to kick vCPU threads out of `KVM_RUN`
//! and, with seccomp on, a `SIGSYS` reporter (only if the process has no
//! `SIGSYS` handler of its own). The caller's thread is never filtered;
//! see [`seccomp`].
//!
//! ```no_run
//! use vmm::{Vmm, VmConfig, VmExit};
//! let mut cfg = VmConfig::new("vmlinux");
//! cfg.cmdline = "console=ttyS0".into();
//! let mut vmm = Vmm::start(&cfg)?;
//! assert_eq!(vmm.wait()?, VmExit::PowerOff);
//! # Ok::<(), vmm::VmmError>(())
//! ```
#![warn(missing_docs)]

pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod event_loop;
pub mod seccomp;
pub mod vstate;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

pub use config::{ByteSize, ConfigError, SerialMode, VmConfig};
pub use device_manager::vhost_user::VhostUserInfo;
pub use devices::vhost_user::VhostUserStats;
pub use seccomp::SeccompLevel;
pub use vstate::vcpu::{
    Access, CrashReport, ExitKind, ExitRecord, GuestState, PendingException, VmExit,
};

use vstate::vcpu::ExitState;

/// Errors of building or running a VM.
#[derive(Debug, Error)]
pub enum VmmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM or VM setup failed.
    #[error(transparent)]
    Vm(#[from] vstate::vm::VmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] vstate::memory::MemoryError),
    /// Loading the guest failed.
    #[error(transparent)]
    Boot(#[from] arch::x86_64::boot::BootError),
    /// ACPI table generation failed.
    #[error(transparent)]
    Acpi(#[from] arch::x86_64::acpi::AcpiError),
    /// vCPU register setup failed.
    #[error(transparent)]
    Regs(#[from] arch::x86_64::regs::RegsError),
    /// Device setup failed.
    #[error(transparent)]
    Devices(#[from] device_manager::DeviceManagerError),
    /// A vCPU could not be created.
    #[error("cannot create vCPU {index}")]
    CreateVcpu {
        /// vCPU index.
        index: u8,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The serial output file could not be opened.
    #[error("cannot open serial output file {path:?}")]
    SerialFile {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The event manager could not be created.
    #[error("cannot create the event manager: {0:?}")]
    EventManager(event_manager::Error),
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
    /// The seccomp filters could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// A thread could not be spawned.
    #[error("cannot spawn a VMM thread")]
    SpawnThread(#[source] std::io::Error),
    /// The VMM thread panicked.
    #[error("the VMM event loop thread panicked; this is a bug, please report it with the log")]
    Panicked,
}

/// Result alias of this crate.
pub type VmmResult<T> = Result<T, VmmError>;

/// A running VM.
#[derive(Debug)]
pub struct Vmm {
    thread: Option<JoinHandle<VmExit>>,
    exit: Arc<ExitState>,
    serial: Option<Arc<Mutex<Vec<u8>>>>,
    started: Instant,
    vhost_user: Vec<VhostUserInfo>,
}

impl Vmm {
    /// Builds the VM described by `config` and starts it.
    pub fn start(config: &VmConfig) -> VmmResult<Self> {
        let started = Instant::now();
        let (mut machine, serial) = builder::build(config)?;
        let exit = machine.exit.clone();
        let vhost_user = machine.vhost_user.clone();
        let vcpus = machine.start_vcpus()?;
        let thread = std::thread::Builder::new()
            .name("iovmm_main".into())
            .spawn(move || machine.run(vcpus, started));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => return Err(VmmError::SpawnThread(e)),
        };
        Ok(Vmm {
            thread: Some(thread),
            exit,
            serial,
            started,
            vhost_user,
        })
    }

    /// Asks the VM to stop; [`Vmm::wait`] then returns [`VmExit::Stopped`].
    pub fn stop(&self) {
        self.exit.request(VmExit::Stopped);
    }

    /// Waits until the VM stops (threads joined, devices dropped) and returns
    /// why. The handle stays usable, e.g. for [`Vmm::serial_output`].
    pub fn wait(&mut self) -> VmmResult<VmExit> {
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| VmmError::Panicked),
            None => Ok(self.exit.reason().unwrap_or(VmExit::Stopped)),
        }
    }

    /// Whether the VM has stopped (or is stopping).
    pub fn has_exited(&self) -> bool {
        self.exit.reason().is_some()
    }

    /// Waits at most `timeout`; stops the VM when it is still running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> VmmResult<VmExit> {
        let deadline = Instant::now() + timeout;
        while self.exit.reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if self.exit.reason().is_none() {
            log::warn!("vmm: guest still running after {timeout:?}; stopping it");
            self.stop();
        }
        self.wait()
    }

    /// The vhost-user devices, in PCI order, with their live counters.
    pub fn vhost_user_devices(&self) -> &[VhostUserInfo] {
        &self.vhost_user
    }

    /// Time since [`Vmm::start`] was called.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Serial output so far, when the config asked for [`SerialMode::Capture`].
    pub fn serial_output(&self) -> Option<String> {
        self.serial.as_ref().map(|b| {
            String::from_utf8_lossy(&b.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
        })
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop();
            let _ = t.join();
        }
    }
}
