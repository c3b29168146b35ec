//! The vIOMMU of the VM and the ACPI table that describes it.
//!
//! With `--iommu virtio` the virtio-iommu is the first PCI function after the
//! host bridge (00:01.0); the devices behind it are added right after it so
//! that they form one contiguous BDF range for the VIOT PCI range node.

use std::sync::{Arc, Mutex};

use devices::interrupt::IrqfdRouter;
use devices::legacy::ioapic::Ioapic;
use devices::pci::PciBdf;
use devices::vhost_user::wire::IotlbPerm;
use devices::vhost_user::FaultHook;
use devices::virtio::iommu::{IommuState, VirtioIommuDevice, VirtioIommuDeviceError};
use devices::virtio::GuestMemoryMmap;
use devices::vtd::{InterruptRemapper, VtdDevice, VtdUnit, VTD_REGS_SIZE};
use iommu::virtio::protocol::{
    VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_READ, VIRTIO_IOMMU_FAULT_F_WRITE,
    VIRTIO_IOMMU_FAULT_R_MAPPING,
};
use iommu::virtio::VirtioIommuSettings;
use iommu::vtd::dmar::{DmarConfig, IoapicScope};
use iommu::vtd::VtdConfig;
use iommu::{
    Access, DmaTranslate, DomainsConfig, IommuNotifier, Iova, NotifierFlags, NotifierHandle,
    RequesterId, UnmapKind,
};
use thiserror::Error;

use super::{DeviceManager, DeviceManagerError};
use crate::arch::x86_64::layout::VTD_START;
use crate::arch::x86_64::viot;
use crate::config::{IommuConfig, IommuKind};

/// vIOMMU setup errors.
#[derive(Debug, Error)]
pub enum IommuSetupError {
    /// The virtio-iommu state could not be created.
    #[error("cannot create the virtio-iommu")]
    Virtio(#[source] VirtioIommuDeviceError),
    /// An endpoint could not be registered.
    #[error("cannot register endpoint {0} with the vIOMMU")]
    Endpoint(PciBdf),
    /// The VIOT table could not be built.
    #[error("cannot build the ACPI VIOT table")]
    Viot(#[source] viot::ViotError),
    /// The VT-d unit could not be created.
    #[error("cannot create the VT-d unit")]
    Vtd(#[source] iommu::vtd::VtdError),
    /// The DMAR table could not be built.
    #[error("cannot build the ACPI DMAR table")]
    Dmar(#[source] iommu::vtd::dmar::DmarError),
}

/// The VM's vIOMMU.
pub enum Viommu {
    /// virtio-iommu.
    Virtio {
        /// Shared model state (translation, notifier set, faults).
        state: Arc<IommuState>,
        /// Where the virtio-iommu sits.
        bdf: PciBdf,
        /// Endpoints registered behind it, in BDF order.
        endpoints: Vec<PciBdf>,
        /// Registered IOTLB consumers (unregistered on drop).
        consumers: Vec<NotifierHandle>,
    },
    /// Intel VT-d remapping unit at [`VTD_START`].
    Vtd {
        /// The unit (translation, notifier set, faults, ATS tracking).
        unit: Arc<VtdUnit>,
        /// Endpoints behind it (all PCI devices are: INCLUDE_PCI_ALL).
        endpoints: Vec<PciBdf>,
        /// Registered IOTLB consumers (unregistered on drop).
        consumers: Vec<NotifierHandle>,
    },
}

impl Drop for Viommu {
    /// Unregisters the IOTLB consumers: a consumer holds the vIOMMU (its
    /// translation and fault hook) and the vIOMMU's notifier set holds the
    /// consumer, so without this neither (nor the backend socket) is freed.
    fn drop(&mut self) {
        match self {
            Viommu::Virtio {
                state, consumers, ..
            } => {
                for h in consumers.drain(..) {
                    let _ = state.unregister_notifier(h);
                }
            }
            Viommu::Vtd {
                unit, consumers, ..
            } => {
                for h in consumers.drain(..) {
                    unit.unregister_consumer(h);
                }
            }
        }
    }
}

/// Turns an IOTLB permission into the access it asks for.
fn access_of(perm: IotlbPerm) -> Access {
    match perm {
        IotlbPerm::Wo => Access::Write,
        IotlbPerm::Rw => Access::ReadWrite,
        _ => Access::Read,
    }
}

impl Viommu {
    /// Creates the configured vIOMMU and puts it on the machine.
    pub fn create(
        cfg: &IommuConfig,
        dm: &mut DeviceManager,
        mem: &GuestMemoryMmap,
        ram_end: u64,
    ) -> Result<Self, DeviceManagerError> {
        match cfg.kind {
            IommuKind::Virtio => {
                let domains = DomainsConfig {
                    boot_bypass: true,
                    identity_limit: ram_end,
                    ..DomainsConfig::default()
                };
                let state = IommuState::new(VirtioIommuSettings::default(), domains)
                    .map_err(IommuSetupError::Virtio)?;
                let device = VirtioIommuDevice::new(state.clone());
                let bdf = dm.add_virtio_pci(mem.clone(), Box::new(device))?;
                Ok(Viommu::Virtio {
                    state,
                    bdf,
                    endpoints: Vec::new(),
                    consumers: Vec::new(),
                })
            }
            IommuKind::Vtd => {
                let vcfg = VtdConfig {
                    address_width: cfg.address_width,
                    caching_mode: cfg.caching_mode,
                    device_iotlb: cfg.device_iotlb,
                    interrupt_remapping: cfg.interrupt_remapping,
                    identity_limit: ram_end,
                    ..VtdConfig::default()
                };
                let unit =
                    VtdUnit::new(vcfg, mem.clone(), dm.msi()).map_err(IommuSetupError::Vtd)?;
                if cfg.interrupt_remapping {
                    dm.enable_interrupt_remapping(&unit);
                }
                let dev = Arc::new(Mutex::new(VtdDevice(unit.clone())));
                dm.mmio
                    .insert(dev, VTD_START, VTD_REGS_SIZE)
                    .map_err(|source| DeviceManagerError::Bus {
                        name: "VT-d",
                        source,
                    })?;
                Ok(Viommu::Vtd {
                    unit,
                    endpoints: Vec::new(),
                    consumers: Vec::new(),
                })
            }
        }
    }

    /// The handler of the guest's ATS Enable changes for `rid`, where the
    /// vIOMMU cares (VT-d device-TLB notifications).
    pub fn ats_handler(&self, rid: RequesterId) -> Option<Box<dyn Fn(bool) + Send + Sync>> {
        match self {
            Viommu::Virtio { .. } => None,
            Viommu::Vtd { unit, .. } => {
                let unit = unit.clone();
                Some(Box::new(move |on| {
                    unit.set_ats_enabled(rid, on);
                }))
            }
        }
    }

    /// Registers a PCI function as an endpoint behind the vIOMMU.
    pub fn add_endpoint(&mut self, bdf: PciBdf) -> Result<(), DeviceManagerError> {
        match self {
            Viommu::Virtio {
                state, endpoints, ..
            } => {
                state
                    .add_endpoint(requester_id(bdf))
                    .map_err(|_| IommuSetupError::Endpoint(bdf))?;
                endpoints.push(bdf);
            }
            Viommu::Vtd { endpoints, .. } => endpoints.push(bdf),
        }
        Ok(())
    }

    /// What an IOTLB bridge calls when a backend's miss hits no valid
    /// translation: a guest-visible fault where the vIOMMU has one.
    pub fn fault_hook(&self) -> FaultHook {
        match self {
            Viommu::Virtio { state, .. } => {
                let state = state.clone();
                Arc::new(move |rid, iova, perm| {
                    let flags = match perm {
                        IotlbPerm::Wo => VIRTIO_IOMMU_FAULT_F_WRITE,
                        IotlbPerm::Rw => VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_WRITE,
                        _ => VIRTIO_IOMMU_FAULT_F_READ,
                    } | VIRTIO_IOMMU_FAULT_F_ADDRESS;
                    let r = state.report_fault(
                        rid,
                        Some(Iova(iova)),
                        VIRTIO_IOMMU_FAULT_R_MAPPING,
                        flags,
                    );
                    log::debug!("viommu: fault for {rid} at {iova:#x}: {r:?}");
                })
            }
            Viommu::Vtd { unit, .. } => {
                let unit = unit.clone();
                Arc::new(move |rid, iova, perm| unit.record_fault(rid, iova, access_of(perm)))
            }
        }
    }

    /// Registers an IOTLB consumer for `rid`'s unmaps (device-IOTLB kind when
    /// the vIOMMU accepts it, plain UNMAP otherwise), and for new mappings
    /// too when `maps` (prefetch policy).
    pub fn register_consumer(
        &mut self,
        rid: RequesterId,
        consumer: Arc<dyn IommuNotifier>,
        maps: bool,
    ) -> Result<(), String> {
        let extra = if maps {
            NotifierFlags::MAP
        } else {
            NotifierFlags::NONE
        };
        match self {
            Viommu::Virtio {
                state, consumers, ..
            } => {
                let (h, kind) = state
                    .register_notifier_with_fallback(rid, extra, consumer)
                    .map_err(|e| e.to_string())?;
                log::info!("viommu: IOTLB consumer for {rid} registered as {kind:?}");
                consumers.push(h);
                Ok(())
            }
            Viommu::Vtd {
                unit, consumers, ..
            } => {
                // ATS is off at boot: IOTLB invalidations until the guest enables it.
                let h = unit
                    .register_consumer(rid, UnmapKind::Iotlb, maps, consumer)
                    .map_err(|e| e.to_string())?;
                consumers.push(h);
                Ok(())
            }
        }
    }

    /// Translation through the vIOMMU, for IOTLB misses.
    pub fn translate(&self) -> Arc<dyn DmaTranslate> {
        match self {
            Viommu::Virtio { state, .. } => state.clone(),
            Viommu::Vtd { unit, .. } => unit.clone(),
        }
    }

    /// The ACPI table describing the vIOMMU (VIOT or DMAR), if it has endpoints.
    pub fn acpi_table(&self) -> Result<Option<Vec<u8>>, DeviceManagerError> {
        match self {
            Viommu::Virtio { bdf, endpoints, .. } => {
                let (Some(first), Some(last)) = (endpoints.first(), endpoints.last()) else {
                    return Ok(None);
                };
                let t = viot::build(*bdf, *first, *last).map_err(IommuSetupError::Viot)?;
                Ok(Some(t))
            }
            Viommu::Vtd { unit, .. } => {
                let dmar = DmarConfig::for_unit(&unit.config(), VTD_START, Some(IOAPIC_SCOPE));
                let t = dmar.build().map_err(IommuSetupError::Dmar)?;
                Ok(Some(t))
            }
        }
    }
}

/// The IOAPIC's pseudo requester id, 0xFF:00.0 as on QEMU's q35: the SID its
/// interrupts carry for the IRTE source check, published in the DMAR.
pub const IOAPIC_REQUESTER_ID: RequesterId = RequesterId::from_bdf(0, 0xFF00);

/// The DMAR IOAPIC device scope (used with interrupt remapping only): the
/// MADT's IOAPIC id 0 at [`IOAPIC_REQUESTER_ID`].
const IOAPIC_SCOPE: IoapicScope = IoapicScope {
    id: 0,
    bus: IOAPIC_REQUESTER_ID.bus(),
    device: IOAPIC_REQUESTER_ID.device(),
    function: IOAPIC_REQUESTER_ID.function(),
};

impl DeviceManager {
    /// Puts VT-d interrupt remapping in front of KVM: the IOAPIC (still
    /// untouched: every pin masked) is rebuilt over its own remapped source,
    /// and PCI functions added from now on deliver through the remapper.
    fn enable_interrupt_remapping(&mut self, unit: &Arc<VtdUnit>) {
        let remapper = InterruptRemapper::new(unit.clone(), self.vm.clone(), self.vm.clone());
        let source = remapper.source(Some(IOAPIC_REQUESTER_ID));
        let mut ioapic = self.ioapic.lock().unwrap_or_else(|e| e.into_inner());
        *ioapic = Ioapic::new(source.clone());
        // As without remapping, KVM needs the pins' (here: remapped) routes in
        // GSIs 0..23 to find level-triggered vectors that need an EOI exit.
        ioapic.set_route_listener(Box::new(move |pin, msg| {
            if let Err(e) = source.set_msi_route(pin as u32, msg) {
                log::warn!("ioapic: cannot mirror the remapped route of pin {pin}: {e}");
            }
        }));
        self.intremap = Some(remapper);
    }
}

/// The requester id of a bus-0 function.
pub fn requester_id(bdf: PciBdf) -> RequesterId {
    RequesterId::from_bdf(bdf.segment(), bdf.requester_id())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dmar(interrupt_remapping: bool) -> Vec<u8> {
        let config = VtdConfig {
            interrupt_remapping,
            ..VtdConfig::default()
        };
        DmarConfig::for_unit(&config, VTD_START, Some(IOAPIC_SCOPE))
            .build()
            .unwrap()
    }

    #[test]
    fn dmar_publishes_the_ioapic_scope_only_with_interrupt_remapping() {
        let without = VtdConfig::default();
        let plain = DmarConfig::for_unit(&without, VTD_START, None).build();
        assert_eq!(dmar(false), plain.unwrap(), "non-IR table unchanged");
        let t = dmar(true);
        assert_eq!(t[37] & 1, 1, "INTR_REMAP");
        // IOAPIC device scope: type 3, length 8, enumeration id 0, bus 0xFF, path 00.0.
        let scope = [3u8, 8, 0, 0, 0, 0xff, 0, 0];
        assert!(t.windows(8).any(|w| w == scope), "{t:x?}");
        assert_eq!(IOAPIC_REQUESTER_ID.bdf(), 0xFF00);
    }
}
