//! The vIOMMU of the VM and the ACPI table that describes it.
//!
//! With `--iommu virtio` the virtio-iommu is the first PCI function after the
//! host bridge (00:01.0); the devices behind it are added right after it so
//! that they form one contiguous BDF range for the VIOT PCI range node.

use iommu::sync::lock;
use std::sync::{Arc, Mutex};

use devices::interrupt::IrqfdRouter;
use devices::legacy::ioapic::Ioapic;
use devices::pci::PciBdf;
use devices::viommu::{Viommu as ViommuSeam, ViommuError};
use devices::virtio::iommu::{
    IommuState, VirtioIommuDevice, VirtioIommuDeviceError, VirtioIommuStats,
};
use devices::virtio::GuestMemoryMmap;
use devices::vtd::{InterruptRemapper, VtdDevice, VtdStats, VtdUnit, VTD_REGS_SIZE};
use iommu::virtio::protocol::{
    S_DEVERR, S_FAULT, S_INVAL, S_IOERR, S_NOENT, S_NOMEM, S_OK, S_RANGE, S_UNSUPP,
    VIRTIO_IOMMU_T_ATTACH, VIRTIO_IOMMU_T_DETACH, VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_PROBE,
    VIRTIO_IOMMU_T_UNMAP,
};
use iommu::virtio::VirtioIommuSettings;
use iommu::vtd::dmar::{DmarDescription, IoapicScope};
use iommu::vtd::VtdConfig;
use iommu::{DomainsConfig, IommuNotifier, NotifierHandle, RequesterId};
use thiserror::Error;

use super::{DeviceManager, DeviceManagerError};
use crate::arch::x86_64::layout::VTD_START;
use crate::arch::x86_64::{dmar, viot};
use crate::config::{IommuConfig, IommuKind};

/// vIOMMU setup errors.
#[derive(Debug, Error)]
pub enum IommuSetupError {
    /// The virtio-iommu state could not be created.
    #[error("cannot create the virtio-iommu")]
    Virtio(#[source] VirtioIommuDeviceError),
    /// The VIOT table could not be built.
    #[error("cannot build the ACPI VIOT table")]
    Viot(#[source] viot::ViotError),
    /// The VT-d unit could not be created.
    #[error("cannot create the VT-d unit")]
    Vtd(#[source] iommu::vtd::VtdError),
    /// The DMAR table could not be built.
    #[error("cannot build the ACPI DMAR table")]
    Dmar(#[source] dmar::DmarError),
}

/// The VM's vIOMMU: the devices behind it see only the [`ViommuSeam`];
/// what differs by kind is how the firmware describes it.
pub struct Viommu {
    /// The model behind the seam.
    seam: Arc<dyn ViommuSeam>,
    /// The kind, for the ACPI table and the counters.
    kind: Kind,
    /// Endpoints registered behind it, in BDF order.
    endpoints: Vec<PciBdf>,
    /// Registered IOTLB consumers (unregistered on drop).
    consumers: Vec<NotifierHandle>,
}

/// What only the firmware description and the counters need to know.
enum Kind {
    /// virtio-iommu at `bdf` (VIOT).
    Virtio { state: Arc<IommuState>, bdf: PciBdf },
    /// Intel VT-d at [`VTD_START`] (DMAR).
    Vtd { unit: Arc<VtdUnit> },
}

impl Drop for Viommu {
    /// Unregisters the IOTLB consumers: a consumer holds the vIOMMU (its
    /// translation and fault reporting) and the vIOMMU's notifier set holds
    /// the consumer, so without this neither (nor the backend socket) is freed.
    fn drop(&mut self) {
        for h in self.consumers.drain(..) {
            self.seam.unregister_consumer(h);
        }
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
        let (seam, kind): (Arc<dyn ViommuSeam>, Kind) = match cfg.kind {
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
                (state.clone(), Kind::Virtio { state, bdf })
            }
            IommuKind::Vtd => {
                let unit = create_vtd(cfg, dm, mem, ram_end)?;
                (unit.clone(), Kind::Vtd { unit })
            }
        };
        Ok(Viommu {
            seam,
            kind,
            endpoints: Vec::new(),
            consumers: Vec::new(),
        })
    }

    /// What devices behind the vIOMMU talk to.
    pub fn seam(&self) -> Arc<dyn ViommuSeam> {
        self.seam.clone()
    }

    /// Puts a PCI function behind the vIOMMU and registers `consumer` for
    /// its unmaps (device-TLB kind while its ATS is on, where the vIOMMU
    /// has one), and for new mappings too when `maps` (prefetch policy).
    pub fn attach(
        &mut self,
        bdf: PciBdf,
        consumer: Arc<dyn IommuNotifier>,
        maps: bool,
    ) -> Result<(), ViommuError> {
        let rid = requester_id(bdf);
        self.seam.add_endpoint(rid)?;
        self.endpoints.push(bdf);
        let reg = self.seam.register_consumer(rid, consumer, maps)?;
        self.consumers.push(reg.handle);
        Ok(())
    }

    /// The vIOMMU's own counters, as one flat JSON object ([`virtio_counters`],
    /// [`vtd_counters`]).
    pub fn counters_json(&self) -> serde_json::Value {
        match &self.kind {
            Kind::Virtio { state, .. } => virtio_counters(&state.stats()),
            Kind::Vtd { unit } => vtd_counters(&unit.stats()),
        }
    }

    /// The ACPI table describing the vIOMMU (VIOT or DMAR), if it has endpoints.
    pub fn acpi_table(&self) -> Result<Option<Vec<u8>>, DeviceManagerError> {
        match &self.kind {
            Kind::Virtio { bdf, .. } => {
                let (Some(first), Some(last)) = (self.endpoints.first(), self.endpoints.last())
                else {
                    return Ok(None);
                };
                let t = viot::build(*bdf, *first, *last).map_err(IommuSetupError::Viot)?;
                Ok(Some(t))
            }
            Kind::Vtd { unit } => {
                let desc = DmarDescription::for_unit(&unit.config(), VTD_START, Some(IOAPIC_SCOPE));
                let t = dmar::build(&desc).map_err(IommuSetupError::Dmar)?;
                Ok(Some(t))
            }
        }
    }
}

/// The virtio-iommu request types by name (`requests_<name>`); type 0 counts requests with an
/// unknown type or none readable.
const VIRTIO_REQUEST_TYPES: [(&str, u8); 6] = [
    ("attach", VIRTIO_IOMMU_T_ATTACH),
    ("detach", VIRTIO_IOMMU_T_DETACH),
    ("map", VIRTIO_IOMMU_T_MAP),
    ("unmap", VIRTIO_IOMMU_T_UNMAP),
    ("probe", VIRTIO_IOMMU_T_PROBE),
    ("unknown", 0),
];

/// The virtio-iommu completion statuses by name (`status_<name>`).
const VIRTIO_STATUSES: [(&str, u8); 9] = [
    ("ok", S_OK),
    ("ioerr", S_IOERR),
    ("unsupp", S_UNSUPP),
    ("deverr", S_DEVERR),
    ("inval", S_INVAL),
    ("range", S_RANGE),
    ("noent", S_NOENT),
    ("fault", S_FAULT),
    ("nomem", S_NOMEM),
];

/// The virtio-iommu's counters: requests by type, completions by status, chains returned
/// unwritten, notifier failures and fault events.
pub fn virtio_counters(s: &VirtioIommuStats) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("kind".into(), "virtio-iommu".into());
    for (name, t) in VIRTIO_REQUEST_TYPES {
        m.insert(format!("requests_{name}"), s.requests(t).into());
    }
    for (name, status) in VIRTIO_STATUSES {
        m.insert(format!("status_{name}"), s.statuses(status).into());
    }
    m.insert("unwritten".into(), s.unwritten().into());
    m.insert("notifier_failures".into(), s.notifier_failures().into());
    m.insert("faults_reported".into(), s.faults_reported().into());
    m.insert("faults_dropped".into(), s.faults_dropped().into());
    serde_json::Value::Object(m)
}

/// The VT-d unit's counters: notifications, waits and faults, and every invalidation request
/// (`inv_desc_<type>` for queued descriptors, `inv_reg_<type>` for register-based ones).
pub fn vtd_counters(s: &VtdStats) -> serde_json::Value {
    let i = &s.invalidations;
    serde_json::json!({
        "kind": "vtd",
        "notify_batches": s.notify_batches,
        "events": s.events,
        "notify_failures": s.notify_failures,
        "waits": s.waits,
        "fault_events": s.fault_events,
        "inv_desc_context_cache": i.context_cache,
        "inv_desc_iotlb_global": i.iotlb_global,
        "inv_desc_iotlb_domain": i.iotlb_domain,
        "inv_desc_iotlb_page": i.iotlb_page,
        "inv_desc_device_tlb": i.device_tlb,
        "inv_desc_interrupt_entry_cache": i.interrupt_entry_cache,
        "inv_desc_wait": i.wait,
        "inv_queue_errors": i.queue_errors,
        "inv_reg_context_cache": i.register_context_cache,
        "inv_reg_iotlb": i.register_iotlb,
    })
}

/// Creates the VT-d unit, puts its registers on the MMIO bus and, when
/// configured, its interrupt remapper in front of KVM.
fn create_vtd(
    cfg: &IommuConfig,
    dm: &mut DeviceManager,
    mem: &GuestMemoryMmap,
    ram_end: u64,
) -> Result<Arc<VtdUnit>, DeviceManagerError> {
    let vcfg = VtdConfig {
        address_width: cfg.address_width,
        caching_mode: cfg.caching_mode,
        device_iotlb: cfg.device_iotlb,
        interrupt_remapping: cfg.interrupt_remapping,
        identity_limit: ram_end,
        ..VtdConfig::default()
    };
    let unit = VtdUnit::new(vcfg, mem.clone(), dm.msi()).map_err(IommuSetupError::Vtd)?;
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
    Ok(unit)
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
        let mut ioapic = lock(&self.ioapic);
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

    fn dmar_bytes(interrupt_remapping: bool) -> Vec<u8> {
        let config = VtdConfig {
            interrupt_remapping,
            ..VtdConfig::default()
        };
        dmar::build(&DmarDescription::for_unit(
            &config,
            VTD_START,
            Some(IOAPIC_SCOPE),
        ))
        .unwrap()
    }

    #[test]
    fn vtd_counters_name_every_invalidation_kind() {
        let mut s = VtdStats {
            waits: 7,
            ..VtdStats::default()
        };
        s.invalidations.iotlb_page = 40;
        s.invalidations.wait = 41;
        s.invalidations.register_iotlb = 2;
        let v = vtd_counters(&s);
        assert_eq!(v["kind"], "vtd");
        assert_eq!(
            (
                &v["waits"],
                &v["inv_desc_iotlb_page"],
                &v["inv_desc_wait"],
                &v["inv_reg_iotlb"]
            ),
            (&7.into(), &40.into(), &41.into(), &2.into())
        );
        let names: Vec<&String> = v.as_object().unwrap().keys().collect();
        for want in [
            "inv_desc_context_cache",
            "inv_desc_iotlb_global",
            "inv_desc_iotlb_domain",
            "inv_desc_device_tlb",
            "inv_desc_interrupt_entry_cache",
            "inv_queue_errors",
            "inv_reg_context_cache",
        ] {
            assert!(names.iter().any(|n| *n == want), "{want} in {names:?}");
        }
    }

    #[test]
    fn virtio_counters_have_every_request_type_and_status() {
        let v = virtio_counters(&VirtioIommuStats::default());
        let o = v.as_object().unwrap();
        assert_eq!(o["kind"], "virtio-iommu");
        for (name, _) in VIRTIO_REQUEST_TYPES {
            assert_eq!(o[&format!("requests_{name}")], 0, "{name}");
        }
        for (name, _) in VIRTIO_STATUSES {
            assert_eq!(o[&format!("status_{name}")], 0, "{name}");
        }
        // kind, 6 request types, 9 statuses, unwritten, notifier failures, 2 fault counters.
        assert_eq!(o.len(), 1 + 6 + 9 + 4);
    }

    #[test]
    fn dmar_publishes_the_ioapic_scope_only_with_interrupt_remapping() {
        let without = VtdConfig::default();
        let plain = dmar::build(&DmarDescription::for_unit(&without, VTD_START, None));
        assert_eq!(dmar_bytes(false), plain.unwrap(), "non-IR table unchanged");
        let t = dmar_bytes(true);
        assert_eq!(t[37] & 1, 1, "INTR_REMAP");
        // IOAPIC device scope: type 3, length 8, enumeration id 0, bus 0xFF, path 00.0.
        let scope = [3u8, 8, 0, 0, 0, 0xff, 0, 0];
        assert!(t.windows(8).any(|w| w == scope), "{t:x?}");
        assert_eq!(IOAPIC_REQUESTER_ID.bdf(), 0xFF00);
    }
}
