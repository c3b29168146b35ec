//! Builds a VM from a [`VmConfig`] and starts it.
//!
//! Order: validate, open KVM, create memfd RAM and the VM (split irqchip),
//! create devices, load kernel / initramfs / command line, write the zero
//! page, page tables and ACPI tables, create and configure vCPUs, then start
//! the vCPU threads and the event loop thread.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::SubscriberOps;
use kvm_ioctls::Kvm;
use vm_memory::GuestMemoryBackend;

use crate::arch::x86_64::{acpi, boot, layout, regs};
use crate::config::{SerialMode, VmConfig};
use crate::device_manager::iommu::Viommu;
use crate::device_manager::vhost_net::{add_vhost_net, VhostNetInfo};
use crate::device_manager::vhost_user::{add_vhost_user, SocketFile, VhostUserInfo};
use crate::device_manager::{DeviceManager, SerialSink};
use crate::event_loop::{run_until_exit, ExitHandler, VmmEventManager};
use crate::seccomp::{install_sigsys_reporter, SeccompFilters, SeccompLevel, ThreadKind};
use crate::vstate::memory::{create_guest_memory, GuestMemoryMmap};
use crate::vstate::vcpu::{
    install_kick_handler, ExitState, VcpuControl, VcpuHandle, VcpuRunner, VmExit,
};
use crate::vstate::vm::{open_kvm, Vm};
use crate::{VmmError, VmmResult};

/// Serial output captured in memory ([`SerialMode::Capture`]).
pub type SerialCapture = Arc<Mutex<Vec<u8>>>;

/// How long a stopping VMM waits for each vCPU thread.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A built VM, owned by the event loop thread once started.
pub struct Machine {
    /// Guest RAM (kept alive while the VM runs).
    pub mem: GuestMemoryMmap,
    /// The KVM VM.
    pub vm: Arc<Vm>,
    /// Devices.
    pub devices: DeviceManager,
    /// The event manager.
    pub em: VmmEventManager,
    /// Stop reasons.
    pub exit: Arc<ExitState>,
    /// The vIOMMU, if configured (shared read-only with the control API's counters).
    pub viommu: Option<Arc<Viommu>>,
    /// The vhost-user devices.
    pub vhost_user: Vec<VhostUserInfo>,
    /// The vhost-net devices.
    pub vhost_net: Vec<VhostNetInfo>,
    /// Stop, pause and resume of the vCPUs.
    pub vcpu_control: Arc<VcpuControl>,
    /// Server sockets of vhost-user devices, removed when dropped: taken out before the
    /// machine moves to the event loop thread (see [`Machine::take_socket_files`]).
    socket_files: Vec<SocketFile>,
    vcpus: Vec<VcpuRunner>,
    seccomp: Arc<SeccompFilters>,
}

fn serial_sink(mode: &SerialMode) -> VmmResult<(SerialSink, Option<SerialCapture>)> {
    Ok(match mode {
        SerialMode::Stdout => (Box::new(std::io::stdout()), None),
        SerialMode::Off => (Box::new(std::io::sink()), None),
        SerialMode::File(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmmError::SerialFile {
                    path: p.clone(),
                    source,
                })?;
            (Box::new(f), None)
        }
        SerialMode::Capture => {
            let buf = Arc::new(Mutex::new(Vec::new()));
            (Box::new(CaptureWriter(buf.clone())), Some(buf))
        }
    })
}

/// Serial output kept in memory for library users and tests.
struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        iommu::sync::lock(&self.0).extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn load_guest(config: &VmConfig, mem: &GuestMemoryMmap, rsdp: u64) -> VmmResult<u64> {
    let kernel = boot::load_kernel(mem, &config.kernel)?;
    let initramfs = match &config.initramfs {
        Some(p) => {
            let max = boot::initrd_addr_max(kernel.setup_header.as_ref());
            Some(boot::load_initramfs(
                mem,
                p,
                config.memory.0,
                kernel.end,
                max,
            )?)
        }
        None => None,
    };
    boot::load_cmdline(mem, &config.cmdline)?;
    let params = boot::build_boot_params(&boot::BootParamsInput {
        setup_header: kernel.setup_header,
        cmdline_len: config.cmdline.len(),
        initramfs,
        mem_size: config.memory.0,
        rsdp,
    });
    boot::write_boot_params(mem, &params)?;
    regs::write_boot_tables(mem)?;
    Ok(kernel.entry)
}

fn create_vcpus(
    kvm: &Kvm,
    config: &VmConfig,
    vm: &Vm,
    devices: &DeviceManager,
    exit: &Arc<ExitState>,
    entry: u64,
    seccomp: &Arc<SeccompFilters>,
) -> VmmResult<(Vec<VcpuRunner>, Arc<VcpuControl>)> {
    let control = Arc::new(VcpuControl::new(config.cpus));
    let mut runners = Vec::with_capacity(config.cpus as usize);
    for index in 0..config.cpus {
        let fd = vm
            .fd()
            .create_vcpu(index as u64)
            .map_err(|source| VmmError::CreateVcpu { index, source })?;
        regs::setup_cpuid(kvm, &fd, index, config.cpus)?;
        regs::setup_lint(&fd)?;
        if index == 0 {
            regs::setup_boot_vcpu(&fd, entry)?;
        }
        runners.push(VcpuRunner {
            index,
            fd,
            pio: devices.pio.clone(),
            mmio: devices.mmio.clone(),
            eoi: devices.eoi_handler(),
            exit: exit.clone(),
            control: control.clone(),
            seccomp: seccomp.clone(),
        });
    }
    Ok((runners, control))
}

/// Creates the vIOMMU and the PCI devices. Devices behind the vIOMMU are
/// added first, right after it, so their BDFs form one range.
fn create_devices(
    config: &VmConfig,
    devices: &mut DeviceManager,
    mem: &GuestMemoryMmap,
    files: &mut Vec<SocketFile>,
    nets: &mut Vec<VhostNetInfo>,
) -> VmmResult<(Option<Viommu>, Vec<VhostUserInfo>)> {
    let ram_end = mem.last_addr().0;
    let mut viommu = match &config.iommu {
        Some(cfg) => Some(Viommu::create(cfg, devices, mem, ram_end)?),
        None => None,
    };
    let policy = config
        .iommu
        .as_ref()
        .map(|i| i.iotlb_policy)
        .unwrap_or_default();
    let mut infos = Vec::with_capacity(config.vhost_user.len());
    // Behind the vIOMMU first (vhost-user, then vhost-net), so that their BDFs form one range.
    for iommu in [true, false] {
        for d in config.vhost_user.iter().filter(|d| d.iommu == iommu) {
            infos.push(add_vhost_user(
                devices,
                viommu.as_mut(),
                policy,
                d,
                mem,
                files,
            )?);
        }
        for n in config.net.iter().filter(|n| n.iommu == iommu) {
            nets.push(add_vhost_net(devices, viommu.as_mut(), policy, n, mem)?);
        }
    }
    Ok((viommu, infos))
}

/// Builds the VM without running it. Returns the machine and the serial capture buffer.
pub fn build(config: &VmConfig) -> VmmResult<(Machine, Option<SerialCapture>)> {
    config.validate()?;
    let kvm = open_kvm()?;
    let mem = create_guest_memory(&layout::ram_ranges(config.memory.0))?;
    let vm = Arc::new(Vm::new(&kvm, &mem)?);
    let exit = Arc::new(ExitState::new().map_err(VmmError::EventFd)?);
    let (sink, capture) = serial_sink(&config.serial)?;
    let seccomp = seccomp_filters(config.seccomp)?;
    let mut devices = DeviceManager::new(vm.clone(), sink)?;
    if let Some(hook) = seccomp.thread_hook() {
        devices.set_thread_hook(hook);
    }
    let mut socket_files = Vec::new();
    let mut vhost_net = Vec::new();
    let (viommu, vhost_user) = create_devices(
        config,
        &mut devices,
        &mem,
        &mut socket_files,
        &mut vhost_net,
    )?;
    let mut extra_tables = Vec::new();
    if let Some(t) = viommu
        .as_ref()
        .map(|v| v.acpi_table())
        .transpose()?
        .flatten()
    {
        extra_tables.push(t);
    }
    let tables = acpi::build(&acpi::AcpiConfig {
        cpus: config.cpus,
        extra_tables,
    })?;
    acpi::write(&mem, &tables)?;
    let entry = load_guest(config, &mem, tables.rsdp_addr())?;
    let (vcpus, vcpu_control) = create_vcpus(&kvm, config, &vm, &devices, &exit, entry, &seccomp)?;
    let mut em = VmmEventManager::new().map_err(VmmError::EventManager)?;
    let mut handler = ExitHandler::new(exit.clone());
    devices.register_exit_sources(&mut handler)?;
    em.add_subscriber(Arc::new(Mutex::new(handler)));
    Ok((
        Machine {
            mem,
            vm,
            devices,
            em,
            exit,
            viommu: viommu.map(Arc::new),
            vhost_user,
            vhost_net,
            vcpu_control,
            socket_files,
            vcpus,
            seccomp,
        },
        capture,
    ))
}

impl Machine {
    /// The server socket files of the vhost-user devices: the caller keeps them while the
    /// VM runs and drops them (removing the files) on its own thread afterwards.
    pub fn take_socket_files(&mut self) -> Vec<SocketFile> {
        std::mem::take(&mut self.socket_files)
    }

    /// The compiled seccomp filters of this VM's threads.
    pub fn seccomp(&self) -> Arc<SeccompFilters> {
        self.seccomp.clone()
    }

    /// Starts vCPU threads; the caller's thread becomes the event loop by
    /// calling [`Machine::run`].
    pub fn start_vcpus(&mut self) -> VmmResult<Vec<VcpuHandle>> {
        install_kick_handler().map_err(VmmError::Signal)?;
        let mut handles = Vec::new();
        for runner in self.vcpus.drain(..) {
            match runner.spawn() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop_vcpus(handles);
                    return Err(VmmError::SpawnThread(e));
                }
            }
        }
        Ok(handles)
    }

    /// Runs the event loop until the VM stops, then stops the vCPUs. The event loop's
    /// seccomp filter is installed first. The caller drops the machine afterwards (which
    /// frees the devices, their threads and sockets).
    pub fn run(&mut self, vcpus: Vec<VcpuHandle>, started: Instant) -> VmExit {
        if let Err(e) = self.seccomp.apply(ThreadKind::EventLoop) {
            log::error!("vmm: {e}; stopping the VM");
            self.exit.request(VmExit::Stopped);
        }
        let reason = run_until_exit(&mut self.em, &self.exit);
        log::info!(
            "vmm: guest stopped after {:?}: {reason:?}",
            started.elapsed()
        );
        stop_vcpus(vcpus);
        reason
    }
}

/// Compiles the filters of every thread kind (see [`crate::seccomp`]) and, when blocked
/// calls end the process, installs the SIGSYS reporter that names them.
fn seccomp_filters(level: SeccompLevel) -> VmmResult<Arc<SeccompFilters>> {
    let filters = SeccompFilters::new(level)?;
    if level == SeccompLevel::Trap {
        match install_sigsys_reporter() {
            Ok(true) => {}
            Ok(false) => log::debug!("vmm: the process has its own SIGSYS handler; keeping it"),
            Err(e) => log::warn!("vmm: cannot install the SIGSYS reporter: {e}"),
        }
    }
    Ok(filters)
}

fn stop_vcpus(vcpus: Vec<VcpuHandle>) {
    for v in vcpus {
        v.stop(VCPU_STOP_TIMEOUT);
    }
}
