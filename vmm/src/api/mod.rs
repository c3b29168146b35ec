//! The control API: what an orchestration tool can ask of a running VM, on the library
//! ([`crate::Vmm`]) and over HTTP/1.1 + JSON on a Unix socket (`--api-socket`).
//!
//! [`VmControl`] holds what the operations need (the configuration, the exit state, the vCPU
//! control, the device counters) and is shared by the [`crate::Vmm`] handle and the
//! `iovmm_api` thread ([`server`]), which serves the socket and writes the periodic metrics
//! line ([`metrics`]). Requests are framed with `httparse` ([`http`]) and routed by
//! [`routes`]; the endpoint list is in `docs/design/api.md`.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use devices::legacy::ged::Ged;
use iommu::sync::{lock, wait_timeout_while};
use serde::Serialize;

use crate::config::VmConfig;
use crate::device_manager::iommu::Viommu;
use crate::device_manager::vhost_net::VhostNetInfo;
use crate::device_manager::vhost_user::VhostUserInfo;
use crate::vstate::vcpu::{ExitState, VcpuControl, VcpuControlError, VcpuRunState, VmExit};

pub mod connection;
pub mod counters;
pub mod http;
pub mod metrics;
pub mod routes;
pub mod server;

pub use routes::VmApi;
pub use server::{ApiServer, ApiSetupError};

/// How long a pause waits for every vCPU to park (a vCPU may be inside a bounded vhost-user
/// wait when it is kicked).
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a resume waits for every vCPU to leave its parked state.
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shutdown waits for the guest to power off after the power button was pressed,
/// unless the request names its own timeout ([`crate::Vmm::shutdown`], `PUT vm.shutdown`).
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait a shutdown request may ask for (the API thread answers nothing else
/// meanwhile).
pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// The state of the VM as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// The vCPUs are parked by a pause.
    Paused,
    /// A stop reason is recorded; the VM is stopping or stopped.
    Stopped,
}

/// `GET /api/v1/vm.info`.
#[derive(Clone, Debug, Serialize)]
pub struct VmInfo {
    /// iovmm's version.
    pub version: &'static str,
    /// Running, paused or stopped.
    pub state: VmState,
    /// Milliseconds since the VM was started.
    pub uptime_ms: u64,
    /// What each vCPU thread reported last, in index order.
    pub vcpus: Vec<VcpuRunState>,
    /// Why the VM stopped ([`exit_name`]), once it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<String>,
    /// The configuration the VM was started with.
    pub config: VmConfig,
}

/// `GET /api/v1/vm.counters`.
#[derive(Clone, Debug, Serialize)]
pub struct VmCounters {
    /// Milliseconds since the VM was started.
    pub uptime_ms: u64,
    /// One flat object per vhost-user device, in PCI order ([`counters::device_counters`]).
    pub vhost_user: Vec<serde_json::Value>,
    /// One flat object per vhost-net device (the vhost-user IOTLB keys plus tap and backend).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub vhost_net: Vec<serde_json::Value>,
    /// The vIOMMU's counters (flat object with a `kind`), if the VM has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viommu: Option<serde_json::Value>,
}

/// How a shutdown ended (`PUT /api/v1/vm.shutdown` answers it as JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownResult {
    /// The guest powered off through ACPI S5 ([`VmExit::PowerOff`]).
    PoweredOff,
    /// The VMM stopped the VM ([`VmExit::Stopped`]): the guest did not power off within the
    /// timeout, was paused, the timeout was 0, or someone else stopped it meanwhile.
    Forced,
    /// The guest stopped another way (reset, exit port, crash) before or while it was asked.
    Exited,
}

/// The answer of a shutdown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShutdownOutcome {
    /// How it ended.
    pub result: ShutdownResult,
    /// The stop reason ([`exit_name`]).
    pub exit: String,
    /// Whether the power button was pressed (not when the VM was paused or already stopping,
    /// or the timeout was 0).
    pub button: bool,
    /// Milliseconds from the call to the VM's stop (or to the forced stop).
    pub waited_ms: u64,
}

/// Set once the machine has stopped (its vCPUs are joined): what a shutdown waits for.
#[derive(Debug, Default)]
struct Stopped {
    stopped: Mutex<bool>,
    cv: Condvar,
}

/// The operations of the control API over one VM.
pub struct VmControl {
    config: VmConfig,
    started: Instant,
    exit: Arc<ExitState>,
    vcpus: Arc<VcpuControl>,
    vhost_user: Vec<VhostUserInfo>,
    vhost_net: Vec<VhostNetInfo>,
    /// The vIOMMU while the machine lives (never kept alive by the API).
    viommu: Option<Weak<Viommu>>,
    /// The vIOMMU counters last read (what is reported once the machine is gone).
    viommu_last: Mutex<Option<serde_json::Value>>,
    /// The ACPI power button while the machine lives.
    power_button: Weak<Mutex<Ged>>,
    stopped: Stopped,
}

impl std::fmt::Debug for VmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmControl")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl VmControl {
    /// The control of a built machine (before its vCPUs start).
    pub fn new(config: &VmConfig, started: Instant, machine: &crate::builder::Machine) -> Self {
        VmControl {
            config: config.clone(),
            started,
            exit: machine.exit.clone(),
            vcpus: machine.vcpu_control.clone(),
            vhost_user: machine.vhost_user.clone(),
            vhost_net: machine.vhost_net.clone(),
            viommu: machine.viommu.as_ref().map(Arc::downgrade),
            viommu_last: Mutex::new(None),
            power_button: Arc::downgrade(&machine.devices.power_button()),
            stopped: Stopped::default(),
        }
    }

    /// Running, paused or stopped.
    pub fn state(&self) -> VmState {
        if self.exit.reason().is_some() {
            VmState::Stopped
        } else if self.vcpus.is_paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    fn uptime_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Time since the VM was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The vhost-user devices, in PCI order.
    pub fn vhost_user_devices(&self) -> &[VhostUserInfo] {
        &self.vhost_user
    }

    /// The vhost-net devices, in PCI order.
    pub fn vhost_net_devices(&self) -> &[VhostNetInfo] {
        &self.vhost_net
    }

    /// Reads the vIOMMU counters while the machine lives, else returns the last ones read.
    fn viommu_counters(&self) -> Option<serde_json::Value> {
        let live = self
            .viommu
            .as_ref()
            .and_then(Weak::upgrade)
            .map(|v| v.counters_json());
        let mut last = lock(&self.viommu_last);
        if live.is_some() {
            *last = live;
        }
        last.clone()
    }

    /// The machine has stopped (vCPUs joined; called while it still exists): records the final
    /// vIOMMU counters and wakes the shutdowns waiting for the guest.
    pub(crate) fn machine_stopped(&self) {
        let _ = self.viommu_counters();
        *lock(&self.stopped.stopped) = true;
        self.stopped.cv.notify_all();
    }

    /// Presses the power button; false when the machine (and so the button) is gone.
    fn press_power_button(&self) -> bool {
        let Some(button) = self.power_button.upgrade() else {
            return false;
        };
        lock(&button).press_power_button();
        log::info!("vmm: power button pressed; waiting for the guest to power off");
        true
    }

    /// Shuts the VM down: presses the ACPI power button and waits at most `timeout` for the
    /// guest to power off (ACPI S5), then stops the VM itself. A paused VM, one already
    /// stopping, or a zero `timeout` is stopped at once. The vCPUs may still be stopping when
    /// this returns after a forced stop; [`crate::Vmm::wait`] joins them.
    pub fn shutdown_within(&self, timeout: Duration) -> ShutdownOutcome {
        let start = Instant::now();
        let ask = self.exit.reason().is_none() && !self.vcpus.is_paused() && !timeout.is_zero();
        let button = ask && self.press_power_button();
        if button {
            let guard = lock(&self.stopped.stopped);
            let (_guard, timed_out) =
                wait_timeout_while(&self.stopped.cv, guard, timeout, |stopped| !*stopped);
            if timed_out {
                log::warn!("vmm: the guest did not power off within {timeout:?}; stopping it");
            }
        }
        self.exit.request(VmExit::Stopped);
        let exit = self.exit.reason().unwrap_or(VmExit::Stopped);
        let result = match exit {
            VmExit::PowerOff => ShutdownResult::PoweredOff,
            VmExit::Stopped => ShutdownResult::Forced,
            _ => ShutdownResult::Exited,
        };
        ShutdownOutcome {
            result,
            exit: exit_name(&exit),
            button,
            waited_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    pub(crate) fn exit_reason(&self) -> Option<VmExit> {
        self.exit.reason()
    }
}

/// A short name of a stop reason (the CLI prints the full description).
pub fn exit_name(exit: &VmExit) -> String {
    match exit {
        VmExit::ExitPort(code) => format!("exit_port({code})"),
        VmExit::PowerOff => "power_off".into(),
        VmExit::Reset => "reset".into(),
        VmExit::Stopped => "stopped".into(),
        VmExit::Halted { vcpu, .. } => format!("halted(vcpu {vcpu})"),
        VmExit::GuestCrash { vcpu, .. } => format!("guest_crash(vcpu {vcpu})"),
        VmExit::InternalError { vcpu, .. } => format!("internal_error(vcpu {vcpu})"),
        VmExit::RunFailed { vcpu, errno } => format!("run_failed(vcpu {vcpu}, errno {errno})"),
    }
}

impl VmApi for VmControl {
    fn info(&self) -> VmInfo {
        VmInfo {
            version: env!("CARGO_PKG_VERSION"),
            state: self.state(),
            uptime_ms: self.uptime_ms(),
            vcpus: self.vcpus.states(),
            exit: self.exit_reason().as_ref().map(exit_name),
            config: self.config.clone(),
        }
    }

    fn counters(&self) -> VmCounters {
        VmCounters {
            uptime_ms: self.uptime_ms(),
            vhost_user: counters::all_devices(&self.vhost_user),
            vhost_net: self.vhost_net.iter().map(|d| d.counters_json()).collect(),
            viommu: self.viommu_counters(),
        }
    }

    fn pause(&self) -> Result<(), VcpuControlError> {
        if self.exit.reason().is_some() {
            return Err(VcpuControlError::Stopping);
        }
        self.vcpus.pause(PAUSE_TIMEOUT)
    }

    fn resume(&self) -> Result<(), VcpuControlError> {
        self.vcpus.resume(RESUME_TIMEOUT)
    }

    fn shutdown(&self, timeout: Duration) -> ShutdownOutcome {
        self.shutdown_within(timeout)
    }
}
