//! iovmm: a minimal KVM VMM whose vIOMMUs protect DMA done by external
//! vhost-user backends.
//!
//! The crate is a library first; the `iovmm` binary is a thin CLI over it.
//! An embedding tool builds a [`VmConfig`], calls [`Vmm::start`] and then
//! [`Vmm::wait`] (or [`Vmm::stop`]); in between it may [`Vmm::pause`],
//! [`Vmm::resume`], read [`Vmm::info`] and [`Vmm::counters`], the same
//! operations the HTTP control API ([`api`], `--api-socket`) offers.
//! Nothing is process-global except the
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

pub mod api;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod event_loop;
pub mod seccomp;
pub mod vstate;

use iommu::sync::lock;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

pub use api::{ShutdownOutcome, ShutdownResult, VmApi, VmControl, VmCounters, VmInfo, VmState};
pub use config::{ByteSize, ConfigError, MetricsConfig, SerialMode, VmConfig};
pub use device_manager::vhost_net::VhostNetInfo;
pub use device_manager::vhost_user::VhostUserInfo;
pub use devices::vhost_user::VhostUserStats;
pub use seccomp::SeccompLevel;
pub use vstate::vcpu::{
    Access, CrashReport, ExitKind, ExitRecord, GuestState, PendingException, VcpuControlError,
    VcpuRunState, VmExit,
};

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
    /// The control API socket, the metrics file or the API thread could not be set up.
    #[error(transparent)]
    Api(#[from] api::ApiSetupError),
    /// A pause or resume failed.
    #[error(transparent)]
    Control(#[from] VcpuControlError),
    /// The VMM thread panicked.
    #[error("the VMM event loop thread panicked; this is a bug, please report it with the log")]
    Panicked,
}

/// Result alias of this crate.
pub type VmmResult<T> = Result<T, VmmError>;

/// Set by the event loop thread when the VM has stopped and its machine is dropped.
#[derive(Debug, Default)]
struct Done {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Done {
    fn set(&self) {
        *lock(&self.done) = true;
        self.cv.notify_all();
    }

    /// Waits until set or `deadline`; whether it was set.
    fn wait_until(&self, deadline: Instant) -> bool {
        let guard = lock(&self.done);
        let timeout = deadline.saturating_duration_since(Instant::now());
        let (done, _) = iommu::sync::wait_timeout_while(&self.cv, guard, timeout, |done| !*done);
        *done
    }
}

/// The `iovmm_api` thread and what ends it.
#[derive(Debug)]
struct ApiThread {
    thread: JoinHandle<()>,
    stop: EventFd,
    socket: Option<PathBuf>,
}

impl ApiThread {
    /// Binds the socket and opens the metrics file (here, on the caller's thread), then starts
    /// the thread; `None` when neither is configured.
    fn start(
        config: &VmConfig,
        control: &Arc<VmControl>,
        machine: &builder::Machine,
    ) -> VmmResult<Option<Self>> {
        if config.api_socket.is_none() && config.metrics.is_none() {
            return Ok(None);
        }
        let metrics = config
            .metrics
            .as_ref()
            .map(api::metrics::MetricsSink::open)
            .transpose()?;
        let listener = config
            .api_socket
            .as_deref()
            .map(api::server::bind)
            .transpose()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)
            .and_then(|e| Ok((e.try_clone()?, e)))
            .map_err(|e| VmmError::Api(api::ApiSetupError::Thread(e)));
        let socket = config.api_socket.clone();
        let (stop, theirs) = match stop {
            Ok(pair) => pair,
            Err(e) => {
                remove_socket(socket.as_deref());
                return Err(e);
            }
        };
        let server = api::ApiServer::new(listener, metrics, control.clone(), theirs);
        match server.spawn(machine.seccomp()) {
            Ok(thread) => Ok(Some(ApiThread {
                thread,
                stop,
                socket,
            })),
            Err(e) => {
                remove_socket(socket.as_deref());
                Err(e.into())
            }
        }
    }

    /// Stops the thread (it writes a last metrics line), joins it and removes the socket.
    fn finish(self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("vmm: cannot stop the API thread: {e}");
        }
        if self.thread.join().is_err() {
            log::error!("vmm: the API thread panicked");
        }
        remove_socket(self.socket.as_deref());
    }
}

fn remove_socket(path: Option<&std::path::Path>) {
    if let Some(p) = path {
        if let Err(e) = std::fs::remove_file(p) {
            log::warn!("vmm: cannot remove the API socket {p:?}: {e}");
        }
    }
}

/// A running VM.
#[derive(Debug)]
pub struct Vmm {
    thread: Option<JoinHandle<VmExit>>,
    control: Arc<VmControl>,
    serial: Option<Arc<Mutex<Vec<u8>>>>,
    done: Arc<Done>,
    api: Option<ApiThread>,
    /// vhost-user server sockets, removed once the VM is gone.
    socket_files: Vec<device_manager::vhost_user::SocketFile>,
}

impl Vmm {
    /// Builds the VM described by `config` and starts it (and, when configured, the API
    /// socket and the metrics line: both are set up before the guest runs).
    pub fn start(config: &VmConfig) -> VmmResult<Self> {
        let started = Instant::now();
        let (mut machine, serial) = builder::build(config)?;
        let socket_files = machine.take_socket_files();
        let control = Arc::new(VmControl::new(config, started, &machine));
        let api = ApiThread::start(config, &control, &machine)?;
        // From here on, dropping `vmm` on an error stops what was started.
        let mut vmm = Vmm {
            thread: None,
            control,
            serial,
            done: Arc::new(Done::default()),
            api,
            socket_files,
        };
        let vcpus = machine.start_vcpus()?;
        let (control, done) = (vmm.control.clone(), vmm.done.clone());
        let thread = std::thread::Builder::new()
            .name("iovmm_main".into())
            .spawn(move || {
                let reason = machine.run(vcpus, started);
                control.machine_stopped();
                drop(machine);
                done.set();
                reason
            })
            .map_err(VmmError::SpawnThread)?;
        vmm.thread = Some(thread);
        Ok(vmm)
    }

    /// Asks the VM to stop at once (the guest is not asked); [`Vmm::wait`] then returns
    /// [`VmExit::Stopped`].
    pub fn stop(&self) {
        self.control.shutdown_within(Duration::ZERO);
    }

    /// Shuts the VM down as `PUT /api/v1/vm.shutdown` does: presses the ACPI power button,
    /// waits up to [`api::SHUTDOWN_TIMEOUT`] (10 s) for the guest to power off (ACPI S5), then
    /// stops it. A paused VM is stopped at once. Says which happened.
    pub fn shutdown(&self) -> ShutdownOutcome {
        self.control.shutdown_within(api::SHUTDOWN_TIMEOUT)
    }

    /// [`Vmm::shutdown`] waiting at most `timeout` for the guest (zero: [`Vmm::stop`]).
    pub fn shutdown_timeout(&self, timeout: Duration) -> ShutdownOutcome {
        self.control.shutdown_within(timeout)
    }

    /// Parks every vCPU outside the guest; returns once all of them are parked. Device
    /// threads and vhost-user back ends keep running.
    pub fn pause(&self) -> VmmResult<()> {
        Ok(self.control.pause()?)
    }

    /// Lets the vCPUs of a paused VM run again; returns once all of them left the parked state.
    pub fn resume(&self) -> VmmResult<()> {
        Ok(self.control.resume()?)
    }

    /// State, uptime, vCPU states and configuration (`GET /api/v1/vm.info`).
    pub fn info(&self) -> VmInfo {
        self.control.info()
    }

    /// Device and vIOMMU counters (`GET /api/v1/vm.counters`).
    pub fn counters(&self) -> VmCounters {
        self.control.counters()
    }

    /// Waits until the VM stops (threads joined, devices dropped) and returns
    /// why. The handle stays usable, e.g. for [`Vmm::serial_output`].
    pub fn wait(&mut self) -> VmmResult<VmExit> {
        let joined = self.thread.take().map(|t| t.join());
        if let Some(api) = self.api.take() {
            api.finish();
        }
        // The devices (and their listeners) are gone with the machine: remove the files.
        self.socket_files.clear();
        match joined {
            Some(Ok(exit)) => Ok(exit),
            Some(Err(_)) => Err(VmmError::Panicked),
            None => Ok(self.control.exit_reason().unwrap_or(VmExit::Stopped)),
        }
    }

    /// Whether the VM has stopped (or is stopping).
    pub fn has_exited(&self) -> bool {
        self.control.state() == VmState::Stopped
    }

    /// Waits at most `timeout`; stops the VM when it is still running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> VmmResult<VmExit> {
        let deadline = Instant::now() + timeout;
        if !self.done.wait_until(deadline) && !self.has_exited() {
            log::warn!("vmm: guest still running after {timeout:?}; stopping it");
            self.stop();
        }
        self.wait()
    }

    /// The vhost-user devices, in PCI order, with their live counters.
    pub fn vhost_user_devices(&self) -> &[VhostUserInfo] {
        self.control.vhost_user_devices()
    }

    /// The vhost-net devices, in PCI order, with their live counters.
    pub fn vhost_net_devices(&self) -> &[VhostNetInfo] {
        self.control.vhost_net_devices()
    }

    /// Time since [`Vmm::start`] was called.
    pub fn uptime(&self) -> Duration {
        self.control.uptime()
    }

    /// Serial output so far, when the config asked for [`SerialMode::Capture`].
    pub fn serial_output(&self) -> Option<String> {
        self.serial
            .as_ref()
            .map(|b| String::from_utf8_lossy(&lock(b)).into_owned())
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.thread.is_some() || self.api.is_some() {
            self.stop();
            let _ = self.wait();
        }
    }
}
