//! Creates the platform devices and puts them on the buses.
//!
//! Legacy devices: COM1 16550 (IRQ 4 through the userspace IOAPIC), i8042
//! (reset), the CMOS RTC (no IRQ), the debug exit port for test guests, the ACPI sleep
//! registers (power off) and the Generic Event Device of the ACPI power button (IOAPIC pin 9).
//! PCI: the root complex, reachable through ECAM and ports 0xCF8/0xCFC.

use ::iommu::sync::lock;
use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::interrupt::{IrqfdRouter, MsiSink};
use devices::legacy::acpi_pm::{AcpiSleepRegs, SLEEP_CONTROL_PORT, SLEEP_REGS_LEN};
use devices::legacy::exit_port::{ExitPort, EXIT_PORT_LEN};
use devices::legacy::ged::{Ged, GED_EVENT_LEN, GED_EVENT_PORT, GED_IRQ};
use devices::legacy::i8042::I8042;
use devices::legacy::ioapic::{Ioapic, IoapicError, IoapicPin};
use devices::legacy::rtc::{Rtc, RTC_PORT_LEN};
use devices::legacy::serial::{Serial, SERIAL_PORT_LEN};
use devices::legacy::IrqLine;
use devices::pci::{PciConfigIo, PciConfigMmio, PciRoot};
use devices::thread::ThreadHook;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{
    EXIT_PORT, I8042_PORT, IOAPIC_SIZE, IOAPIC_START, PCI_CONFIG_IO_PORT, PCI_ECAM_SIZE,
    PCI_ECAM_START, RTC_PORT, SERIAL_IRQ, SERIAL_PORT,
};
use crate::event_loop::ExitHandler;

pub mod iommu;
pub mod pci;
pub mod vhost_net;
pub mod vhost_user;

use crate::vstate::vcpu::VmExit;
use crate::vstate::vm::Vm;
use devices::pci::ats::AtsListener;
use devices::pci::{BarAllocator, PciBdf};
use devices::virtio::{GuestMemoryMmap, VirtioDevice};
use devices::vtd::InterruptRemapper;
use pci::{BarRelocator, PciSetupError};

/// Where serial output is written.
pub type SerialSink = Box<dyn Write + Send>;

/// Device setup errors.
#[derive(Debug, Error)]
pub enum DeviceManagerError {
    /// A device range could not be registered.
    #[error("cannot register {name} on the bus")]
    Bus {
        /// Which device.
        name: &'static str,
        /// Cause.
        #[source]
        source: BusError,
    },
    /// The serial IRQ pin could not be wired.
    #[error("cannot wire the serial port to the IOAPIC")]
    Ioapic(#[source] IoapicError),
    /// The power button's Generic Event Device could not be wired.
    #[error("cannot wire the ACPI power button to IOAPIC pin {GED_IRQ}")]
    PowerButton(#[source] IoapicError),
    /// The vIOMMU could not be set up.
    #[error(transparent)]
    Iommu(#[from] iommu::IommuSetupError),
    /// A vhost-user device could not be set up.
    #[error(transparent)]
    VhostUser(Box<vhost_user::VhostUserSetupError>),
    /// A vhost-net device could not be set up.
    #[error(transparent)]
    VhostNet(Box<vhost_net::VhostNetSetupError>),
    /// A PCI device could not be added.
    #[error(transparent)]
    Pci(#[from] PciSetupError),
    /// An eventfd could not be created or cloned.
    #[error("cannot create an eventfd for {0}")]
    EventFd(&'static str, #[source] std::io::Error),
}

/// The VM's devices and buses.
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// The userspace IOAPIC.
    pub ioapic: Arc<Mutex<Ioapic>>,
    /// The PCI root complex.
    pub pci: Arc<Mutex<PciRoot>>,
    vm: Arc<Vm>,
    mmio32: BarAllocator,
    exit_port: Arc<Mutex<ExitPort>>,
    /// The ACPI power button (Generic Event Device).
    ged: Arc<Mutex<Ged>>,
    exit_port_evt: EventFd,
    reset_evt: EventFd,
    poweroff_evt: EventFd,
    thread_hook: Option<ThreadHook>,
    /// VT-d interrupt remapping in front of `vm` (`--iommu vtd,intremap=on`).
    intremap: Option<Arc<InterruptRemapper>>,
}

impl Drop for DeviceManager {
    /// Empties the buses: the PCI root's BAR relocation holds the MMIO bus,
    /// which holds the root's ECAM window, so without this the devices (and
    /// their worker threads and backend sockets) would outlive the VM.
    fn drop(&mut self) {
        self.mmio.clear();
        self.pio.clear();
    }
}

fn evt(name: &'static str) -> Result<EventFd, DeviceManagerError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceManagerError::EventFd(name, e))
}

fn clone_evt(fd: &EventFd, name: &'static str) -> Result<EventFd, DeviceManagerError> {
    fd.try_clone()
        .map_err(|e| DeviceManagerError::EventFd(name, e))
}

fn insert(
    bus: &Bus,
    name: &'static str,
    dev: Arc<Mutex<dyn devices::bus::BusDevice>>,
    base: u64,
    len: u64,
) -> Result<(), DeviceManagerError> {
    bus.insert(dev, base, len)
        .map_err(|source| DeviceManagerError::Bus { name, source })
}

impl DeviceManager {
    /// Creates all platform devices.
    pub fn new(vm: Arc<Vm>, serial_out: SerialSink) -> Result<Self, DeviceManagerError> {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let msi: Arc<dyn MsiSink> = vm.clone();
        let ioapic = Arc::new(Mutex::new(Ioapic::new(msi)));
        // KVM (split irqchip) only exits on EOIs of vectors it finds in the
        // level-triggered MSI routes of GSIs 0..23, so mirror each pin's route.
        let router = vm.clone();
        lock(&ioapic).set_route_listener(Box::new(move |pin, msg| {
            if let Err(e) = router.set_msi_route(pin as u32, msg) {
                log::warn!("ioapic: cannot mirror the route of pin {pin} into KVM: {e}");
            }
        }));
        insert(&mmio, "IOAPIC", ioapic.clone(), IOAPIC_START, IOAPIC_SIZE)?;
        let pin = IoapicPin::new(ioapic.clone(), SERIAL_IRQ as usize)
            .map_err(DeviceManagerError::Ioapic)?;
        let pin: Arc<dyn IrqLine> = Arc::new(pin);
        let serial = Arc::new(Mutex::new(Serial::new(serial_out, Some(pin))));
        insert(&pio, "serial", serial, SERIAL_PORT as u64, SERIAL_PORT_LEN)?;

        let reset_evt = evt("i8042 reset")?;
        let i8042 = Arc::new(Mutex::new(I8042::new(clone_evt(&reset_evt, "i8042")?)));
        insert(&pio, "i8042", i8042, I8042_PORT as u64, 5)?;
        let rtc = Arc::new(Mutex::new(Rtc::default()));
        insert(&pio, "CMOS RTC", rtc, RTC_PORT as u64, RTC_PORT_LEN)?;
        let exit_port_evt = evt("exit port")?;
        let exit_port = Arc::new(Mutex::new(ExitPort::new(clone_evt(
            &exit_port_evt,
            "exit port",
        )?)));
        insert(
            &pio,
            "exit port",
            exit_port.clone(),
            EXIT_PORT as u64,
            EXIT_PORT_LEN,
        )?;
        let poweroff_evt = evt("ACPI power off")?;
        let pm = AcpiSleepRegs::new(clone_evt(&poweroff_evt, "ACPI")?);
        let pm = Arc::new(Mutex::new(pm));
        insert(
            &pio,
            "ACPI sleep registers",
            pm,
            SLEEP_CONTROL_PORT,
            SLEEP_REGS_LEN,
        )?;

        let ged_pin = IoapicPin::new(ioapic.clone(), GED_IRQ as usize)
            .map_err(DeviceManagerError::PowerButton)?;
        let ged = Arc::new(Mutex::new(Ged::new(Arc::new(ged_pin))));
        insert(&pio, "ACPI GED", ged.clone(), GED_EVENT_PORT, GED_EVENT_LEN)?;

        let relocator = BarRelocator {
            mmio: mmio.clone(),
            vm: vm.clone(),
        };
        let pci = Arc::new(Mutex::new(PciRoot::new(Some(Arc::new(relocator)))));
        let cfg_io = Arc::new(Mutex::new(PciConfigIo::new(pci.clone())));
        insert(
            &pio,
            "PCI config ports",
            cfg_io,
            PCI_CONFIG_IO_PORT as u64,
            8,
        )?;
        let ecam = Arc::new(Mutex::new(PciConfigMmio::new(pci.clone())));
        insert(&mmio, "PCI ECAM", ecam, PCI_ECAM_START, PCI_ECAM_SIZE)?;
        Ok(DeviceManager {
            pio,
            mmio,
            ioapic,
            pci,
            vm,
            mmio32: BarAllocator::mmio32(),
            exit_port,
            ged,
            exit_port_evt,
            reset_evt,
            poweroff_evt,
            thread_hook: None,
            intremap: None,
        })
    }

    /// Where the next PCI function will be plugged.
    pub fn next_bdf(&self) -> Result<PciBdf, DeviceManagerError> {
        let root = lock(&self.pci);
        let bdf = root.next_free_bdf();
        bdf.ok_or(DeviceManagerError::Pci(pci::PciSetupError::Root(
            devices::pci::PciRootError::NoFreeSlot,
        )))
    }

    /// Adds a virtio device behind a virtio-pci transport on bus 0.
    pub fn add_virtio_pci(
        &mut self,
        mem: GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
    ) -> Result<PciBdf, DeviceManagerError> {
        self.add_virtio_pci_with(mem, device, None)
    }

    /// Like [`DeviceManager::add_virtio_pci`], optionally with a PCIe ATS
    /// capability whose Enable changes go to the listener.
    pub fn add_virtio_pci_with(
        &mut self,
        mem: GuestMemoryMmap,
        mut device: Box<dyn VirtioDevice>,
        ats: Option<AtsListener>,
    ) -> Result<PciBdf, DeviceManagerError> {
        if let Some(hook) = &self.thread_hook {
            device.set_thread_hook(hook.clone());
        }
        let bus = pci::PciBus {
            root: &self.pci,
            mmio: &self.mmio,
            mmio32: &mut self.mmio32,
            vm: &self.vm,
            intremap: self.intremap.as_ref(),
        };
        Ok(pci::add_virtio_pci(bus, mem, device, ats)?)
    }

    /// The hook every virtio device added from now on runs first on its own threads
    /// (iovmm installs the thread's seccomp filter there).
    pub fn set_thread_hook(&mut self, hook: ThreadHook) {
        self.thread_hook = Some(hook);
    }

    /// The ACPI power button: [`Ged::press_power_button`] asks the guest to power off.
    pub fn power_button(&self) -> Arc<Mutex<Ged>> {
        self.ged.clone()
    }

    /// Where MSIs of VMM-internal devices go.
    pub fn msi(&self) -> Arc<dyn MsiSink> {
        self.vm.clone()
    }

    /// The handler vCPUs call on KVM_EXIT_IOAPIC_EOI.
    pub fn eoi_handler(&self) -> Arc<dyn Fn(u8) + Send + Sync> {
        let ioapic = self.ioapic.clone();
        Arc::new(move |vector| lock(&ioapic).end_of_interrupt(vector))
    }

    /// Lets the event loop turn guest stop requests into exit reasons.
    pub fn register_exit_sources(&self, h: &mut ExitHandler) -> Result<(), DeviceManagerError> {
        let port = self.exit_port.clone();
        h.add_source(
            clone_evt(&self.exit_port_evt, "exit port")?,
            Box::new(move || {
                let code = lock(&port).exit_code();
                VmExit::ExitPort(code.unwrap_or(u32::MAX))
            }),
        );
        h.add_source(
            clone_evt(&self.reset_evt, "i8042")?,
            Box::new(|| VmExit::Reset),
        );
        h.add_source(
            clone_evt(&self.poweroff_evt, "ACPI")?,
            Box::new(|| VmExit::PowerOff),
        );
        Ok(())
    }
}
