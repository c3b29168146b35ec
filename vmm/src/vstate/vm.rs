//! The KVM VM: memory slots, the split irqchip, MSI delivery, GSI routes for
//! irqfds and ioeventfds.
//!
//! iovmm always uses a split irqchip: local APICs in KVM, the IOAPIC in
//! userspace (`devices::legacy`), so that every interrupt is an MSI the VMM
//! could remap (VT-d interrupt remapping).

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

use devices::interrupt::{IrqfdRouter, MsiMessage, MsiSink};
use iommu::sync::lock;
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_msi, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use thiserror::Error;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemoryMmap;
use crate::arch::x86_64::layout::IOAPIC_PINS;

/// Address of the (VMX-only) TSS area KVM needs below 4 GiB.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// First GSI handed out for MSI routes; 0..IOAPIC_PINS belong to the IOAPIC.
const FIRST_MSI_GSI: u32 = IOAPIC_PINS as u32;
/// Most GSIs KVM accepts in a routing table.
const MAX_GSI: u32 = 4095;

/// VM-level errors.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: check that KVM is available and that this user may access it (e.g. member of group kvm)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("unsupported KVM API version {0}, expected 12")]
    ApiVersion(i32),
    /// A required KVM capability is missing.
    #[error("KVM lacks the {0} capability, which iovmm needs")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Opens /dev/kvm and checks the API version and the capabilities iovmm uses.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    use kvm_ioctls::Cap;
    let needed = [
        (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
        (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ];
    for (cap, name) in needed {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// A KVM VM with its interrupt routing state.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    routes: Mutex<Routes>,
}

#[derive(Debug, Default)]
struct Routes {
    next_gsi: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

impl Vm {
    /// Creates the VM, registers guest memory and sets up the split irqchip.
    pub fn new(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::MissingCap("host-mapped guest memory"))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the
            // VMM keeps alive for the whole life of the VM.
            unsafe { fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = IOAPIC_PINS as u64;
        fd.enable_cap(&cap)
            .map_err(kvm_err("KVM_ENABLE_CAP(SPLIT_IRQCHIP)"))?;
        Ok(Vm {
            fd,
            routes: Mutex::new(Routes {
                next_gsi: FIRST_MSI_GSI,
                ..Default::default()
            }),
        })
    }

    /// The raw KVM VM.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Makes a guest write at MMIO `addr` signal `fd` without a VMM exit.
    pub fn register_ioeventfd(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }

    /// Undoes [`Vm::register_ioeventfd`].
    pub fn unregister_ioeventfd(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.fd
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }

    fn commit_routes(&self, routes: &Routes) -> io::Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = routes
            .msi
            .iter()
            .map(|(gsi, m)| {
                let mut e = kvm_irq_routing_entry {
                    gsi: *gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = m.address as u32;
                e.u.msi.address_hi = (m.address >> 32) as u32;
                e.u.msi.data = m.data;
                e
            })
            .collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| io::Error::other("too many GSI routes"))?;
        self.fd.set_gsi_routing(&table).map_err(io::Error::from)
    }
}

impl MsiSink for Vm {
    fn signal_msi(&self, msg: MsiMessage) -> io::Result<()> {
        let m = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.fd.signal_msi(m).map(|_| ()).map_err(io::Error::from)
    }
}

impl IrqfdRouter for Vm {
    fn allocate_gsi(&self) -> io::Result<u32> {
        let mut r = lock(&self.routes);
        if r.next_gsi > MAX_GSI {
            return Err(io::Error::other("out of GSIs for MSI routes"));
        }
        r.next_gsi += 1;
        Ok(r.next_gsi - 1)
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut r = lock(&self.routes);
        let changed = match msg {
            Some(m) => r.msi.insert(gsi, m) != Some(m),
            None => r.msi.remove(&gsi).is_some(),
        };
        if changed {
            self.commit_routes(&r)?;
        }
        Ok(())
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.fd.register_irqfd(fd, gsi).map_err(io::Error::from)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.fd.unregister_irqfd(fd, gsi).map_err(io::Error::from)
    }
}
