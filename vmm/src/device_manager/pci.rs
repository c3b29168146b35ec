//! Putting PCI functions on the machine: BAR assignment, MMIO bus entries,
//! KVM ioeventfds for virtio queue notifications, and moving all of these
//! when the guest reprograms a BAR.

use iommu::sync::lock;
use std::io;
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::interrupt::{IrqfdRouter, MsiSink};
use devices::pci::ats::AtsListener;
use devices::pci::{allocate_bars, BarAllocError, BarAllocator, PciBdf, PciDevice, PciRootError};
use devices::pci::{DeviceRelocation, PciRoot};
use devices::virtio::transport::{VirtioPciDevice, VirtioPciError};
use devices::virtio::{GuestMemoryMmap, VirtioDevice};
use devices::vtd::InterruptRemapper;
use iommu::RequesterId;
use thiserror::Error;

use crate::vstate::vm::Vm;

/// Errors of adding a PCI device.
#[derive(Debug, Error)]
pub enum PciSetupError {
    /// The virtio-pci transport could not be created.
    #[error("cannot create the virtio-pci transport")]
    Transport(#[source] VirtioPciError),
    /// The BAR window is exhausted.
    #[error("cannot assign the device's BARs")]
    Bars(#[source] BarAllocError),
    /// The root complex is full.
    #[error("cannot add the device to PCI bus 0")]
    Root(#[source] PciRootError),
    /// Bus registration failed.
    #[error("cannot map BAR {index} at {addr:#x}")]
    Bus {
        /// BAR index.
        index: usize,
        /// Address.
        addr: u64,
        /// Cause.
        #[source]
        source: devices::bus::BusError,
    },
    /// ioeventfd registration failed.
    #[error("cannot register a queue notification ioeventfd at {addr:#x}")]
    Ioeventfd {
        /// Address.
        addr: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Moves BARs on the MMIO bus and their ioeventfds in KVM.
pub struct BarRelocator {
    /// The MMIO bus.
    pub mmio: Arc<Bus>,
    /// The VM (ioeventfds).
    pub vm: Arc<Vm>,
}

impl DeviceRelocation for BarRelocator {
    fn move_bar(
        &self,
        old_base: u64,
        new_base: u64,
        _len: u64,
        dev: &mut dyn PciDevice,
    ) -> io::Result<()> {
        let index = dev
            .bars()
            .iter()
            .find(|b| b.addr == new_base)
            .map(|b| b.index)
            .ok_or_else(|| io::Error::other("moved BAR not found in the device's BARs"))?;
        self.mmio
            .relocate(old_base, new_base)
            .map_err(io::Error::other)?;
        for (fd, addr) in dev.bar_ioeventfds(index, old_base) {
            self.vm.unregister_ioeventfd(fd, addr)?;
        }
        for (fd, addr) in dev.bar_ioeventfds(index, new_base) {
            self.vm.register_ioeventfd(fd, addr)?;
        }
        log::debug!("pci: BAR {index} moved from {old_base:#x} to {new_base:#x}");
        Ok(())
    }
}

/// What adding a PCI function touches.
pub struct PciBus<'a> {
    /// The root complex.
    pub root: &'a Mutex<PciRoot>,
    /// The MMIO bus.
    pub mmio: &'a Bus,
    /// The 32-bit BAR window.
    pub mmio32: &'a mut BarAllocator,
    /// The VM.
    pub vm: &'a Arc<Vm>,
    /// VT-d interrupt remapping, when on: the device's MSIs go through it.
    pub intremap: Option<&'a Arc<InterruptRemapper>>,
}

/// Wraps `device` in a virtio-pci transport (with a PCIe ATS capability when
/// `ats` gives a listener), assigns its BARs, maps them and registers its queue notifications.
/// Returns the device's address.
pub fn add_virtio_pci(
    bus: PciBus<'_>,
    mem: GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    ats: Option<AtsListener>,
) -> Result<PciBdf, PciSetupError> {
    let PciBus {
        root,
        mmio,
        mmio32,
        vm,
        intremap,
    } = bus;
    // With interrupt remapping, the source learns its requester id once plugged.
    let source = intremap.map(|r| r.source(None));
    let (msi, irqfd): (Arc<dyn MsiSink>, Arc<dyn IrqfdRouter>) = match &source {
        Some(s) => (s.clone(), s.clone()),
        None => (vm.clone(), vm.clone()),
    };
    let mut pci =
        VirtioPciDevice::new(device, mem, msi, Some(irqfd)).map_err(PciSetupError::Transport)?;
    if let Some(listener) = ats {
        pci.enable_ats(Some(listener))
            .map_err(PciSetupError::Transport)?;
    }
    let bars = allocate_bars(&mut pci, mmio32, None).map_err(PciSetupError::Bars)?;
    let mut kicks = Vec::new();
    for bar in &bars {
        for (fd, addr) in pci.bar_ioeventfds(bar.index, bar.addr) {
            vm.register_ioeventfd(fd, addr)
                .map_err(|source| PciSetupError::Ioeventfd { addr, source })?;
            kicks.push(addr);
        }
    }
    let pci = Arc::new(Mutex::new(pci));
    for bar in &bars {
        mmio.insert(pci.clone(), bar.addr, bar.size)
            .map_err(|source| PciSetupError::Bus {
                index: bar.index,
                addr: bar.addr,
                source,
            })?;
    }
    let bdf = lock(root).add_device(pci).map_err(PciSetupError::Root)?;
    if let Some(s) = source {
        s.bind(RequesterId::from_bdf(bdf.segment(), bdf.requester_id()));
    }
    log::info!(
        "pci: virtio device at {:02x}:{:02x}.{} BARs {:x?} notify {kicks:x?}",
        bdf.bus(),
        bdf.device(),
        bdf.function(),
        bars.iter().map(|b| (b.addr, b.size)).collect::<Vec<_>>()
    );
    Ok(bdf)
}
