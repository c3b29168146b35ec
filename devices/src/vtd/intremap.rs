//! VT-d interrupt remapping in front of the hypervisor's MSI delivery.
//!
//! With KVM's split irqchip every interrupt is an MSI the VMM hands to KVM,
//! either injected at once ([`MsiSink`]) or through a GSI route that an irqfd
//! raises ([`IrqfdRouter`]). An [`InterruptRemapper`] sits in front of both:
//!
//! * each interrupt source (the IOAPIC, every PCI function) gets its own
//!   [`IrSource`] handle that knows the source id the unit checks (SVT/SQ);
//! * [`MsiSink::signal_msi`] remaps the message through the unit's interrupt
//!   remapping table. A blocked interrupt is recorded as a guest-visible
//!   fault (fault MSI) and not delivered; IRE off passes messages unchanged;
//! * [`IrqfdRouter::set_msi_route`] remembers the guest's message per GSI and
//!   installs the remapped one, or disables the route if remapping fails
//!   (without a fault record: no interrupt was requested yet, as QEMU does);
//! * when the unit reports an interrupt-entry-cache invalidation, a new table
//!   (SIRTP) or an IRE/CFI change, every remembered route is translated again
//!   before the register write that caused it returns, so a wait descriptor
//!   queued after an IEC invalidation completes with the routes up to date.
//!
//! Locks: `routes` is taken before the unit's model lock and the inner
//! router's; the unit calls [`InterruptRemapper::refresh_routes`] holding only
//! its invalidation lock.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use iommu::ratelimit::RateLimit;
use iommu::sync::{lock, read, write};
use iommu::vtd::intremap::IrFault;
use iommu::warn_limited;
use iommu::RequesterId;
use vmm_sys_util::eventfd::EventFd;

use super::VtdUnit;
use crate::interrupt::{IrqfdRouter, MsiMessage, MsiSink};

/// Most log lines per second about what the guest does wrong here (it can do it in a loop).
static LOG_BUDGET: Mutex<RateLimit> = Mutex::new(RateLimit::per_second(10));

/// Counters of the remapping layer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IrStats {
    /// Interrupts delivered (remapped or passed through).
    pub delivered: u64,
    /// Interrupts blocked by a remapping fault.
    pub blocked: u64,
    /// Route translations (set-up and refreshes).
    pub route_translations: u64,
    /// Route translations that failed and disabled the route.
    pub routes_disabled: u64,
}

#[derive(Debug, Clone, Copy)]
struct Route {
    sid: u16,
    msg: MsiMessage,
    installed: Option<MsiMessage>,
}

/// Remaps interrupts of several sources through one VT-d unit.
pub struct InterruptRemapper {
    unit: Arc<VtdUnit>,
    sink: Arc<dyn MsiSink>,
    router: Arc<dyn IrqfdRouter>,
    routes: Mutex<BTreeMap<u32, Route>>,
    stats: Mutex<IrStats>,
}

impl std::fmt::Debug for InterruptRemapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptRemapper")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

fn to_model(m: MsiMessage) -> iommu::vtd::MsiMessage {
    iommu::vtd::MsiMessage {
        addr: m.address,
        data: m.data,
    }
}

fn from_model(m: iommu::vtd::MsiMessage) -> MsiMessage {
    MsiMessage {
        address: m.addr,
        data: m.data,
    }
}

impl VtdUnit {
    /// Remaps `msg` of requester `rid` without recording a fault (route set-up).
    pub fn remap_msi(&self, rid: RequesterId, msg: MsiMessage) -> Result<MsiMessage, IrFault> {
        read(&self.model)
            .remap_msi(rid.bdf(), to_model(msg))
            .map(from_model)
    }

    /// Remaps an interrupt `rid` really sent: a fault is recorded (unless the
    /// IRTE set FPD) and its fault event sent.
    pub fn remap_msi_and_record(
        &self,
        rid: RequesterId,
        msg: MsiMessage,
    ) -> Result<MsiMessage, IrFault> {
        let (result, actions) = write(&self.model).remap_msi_and_record(rid.bdf(), to_model(msg));
        self.run(actions);
        result.map(from_model)
    }

    /// Tells `remapper` about every interrupt remapping change from now on.
    fn set_interrupt_remapper(&self, remapper: &Arc<InterruptRemapper>) {
        *lock(&self.interrupt_remapper) = Some(Arc::downgrade(remapper));
    }

    /// Re-translates the remapper's routes (IEC invalidation, SIRTP, IRE/CFI).
    pub(super) fn interrupt_remapping_changed(&self) {
        let remapper = lock(&self.interrupt_remapper)
            .as_ref()
            .and_then(|w| w.upgrade());
        match remapper {
            Some(r) => r.refresh_routes(),
            None => log::debug!("vtd: interrupt remapping changed; no routes to refresh"),
        }
    }
}

impl InterruptRemapper {
    /// A remapping layer over `unit` delivering to `sink` and `router` (KVM).
    /// The unit refreshes its routes on interrupt remapping changes (one
    /// remapper per unit: a later one replaces this one there).
    pub fn new(
        unit: Arc<VtdUnit>,
        sink: Arc<dyn MsiSink>,
        router: Arc<dyn IrqfdRouter>,
    ) -> Arc<Self> {
        let remapper = Arc::new(InterruptRemapper {
            unit: unit.clone(),
            sink,
            router,
            routes: Mutex::new(BTreeMap::new()),
            stats: Mutex::new(IrStats::default()),
        });
        unit.set_interrupt_remapper(&remapper);
        remapper
    }

    /// A handle for the interrupts of `rid`, or of a source whose id is only
    /// known later (`None`; see [`IrSource::bind`]).
    pub fn source(self: &Arc<Self>, rid: Option<RequesterId>) -> Arc<IrSource> {
        let sid = rid.map_or(UNBOUND, |r| u32::from(r.bdf()));
        Arc::new(IrSource {
            remapper: self.clone(),
            sid: AtomicU32::new(sid),
        })
    }

    /// Counters.
    pub fn stats(&self) -> IrStats {
        *lock(&self.stats)
    }

    /// The remapped message of route `gsi` as installed in the router.
    pub fn installed_route(&self, gsi: u32) -> Option<MsiMessage> {
        lock(&self.routes).get(&gsi).and_then(|r| r.installed)
    }

    fn rid(sid: u16) -> RequesterId {
        RequesterId::from_bdf(0, sid)
    }

    fn deliver(&self, sid: u16, msg: MsiMessage) -> io::Result<()> {
        match self.unit.remap_msi_and_record(Self::rid(sid), msg) {
            Ok(out) => {
                lock(&self.stats).delivered += 1;
                self.sink.signal_msi(out)
            }
            Err(f) => {
                lock(&self.stats).blocked += 1;
                log::debug!(
                    "vtd: interrupt {:#x}/{:#x} from {sid:#06x} blocked: fault {:#x}",
                    msg.address,
                    msg.data,
                    f.reason.code()
                );
                Ok(())
            }
        }
    }

    fn translate_route(&self, gsi: u32, sid: u16, msg: MsiMessage) -> Option<MsiMessage> {
        let out = self.unit.remap_msi(Self::rid(sid), msg);
        let mut s = lock(&self.stats);
        s.route_translations += 1;
        match out {
            Ok(m) => Some(m),
            Err(f) => {
                s.routes_disabled += 1;
                log::info!(
                    "vtd: GSI {gsi} route {:#x}/{:#x} of {sid:#06x} disabled: fault {:#x}",
                    msg.address,
                    msg.data,
                    f.reason.code()
                );
                None
            }
        }
    }

    fn set_route(&self, sid: u16, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut routes = lock(&self.routes);
        let Some(msg) = msg else {
            routes.remove(&gsi);
            return self.router.set_msi_route(gsi, None);
        };
        let installed = self.translate_route(gsi, sid, msg);
        routes.insert(
            gsi,
            Route {
                sid,
                msg,
                installed,
            },
        );
        self.router.set_msi_route(gsi, installed)
    }

    /// Translates every remembered route again and installs the changes.
    pub fn refresh_routes(&self) {
        let mut routes = lock(&self.routes);
        for (gsi, route) in routes.iter_mut() {
            let installed = self.translate_route(*gsi, route.sid, route.msg);
            if installed == route.installed {
                continue;
            }
            route.installed = installed;
            if let Err(e) = self.router.set_msi_route(*gsi, installed) {
                warn_limited!(
                    lock(&LOG_BUDGET),
                    "vtd: cannot update the remapped route of GSI {gsi}: {e}"
                );
            }
        }
    }
}

const UNBOUND: u32 = u32::MAX;

/// The interrupts of one source (the IOAPIC or a PCI function), remapped
/// with its source id.
pub struct IrSource {
    remapper: Arc<InterruptRemapper>,
    sid: AtomicU32,
}

impl std::fmt::Debug for IrSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrSource")
            .field("sid", &self.sid.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

impl IrSource {
    /// Sets the source id once it is known (a PCI function's BDF is assigned
    /// after its interrupt sinks are created, before the guest can program it).
    pub fn bind(&self, rid: RequesterId) {
        self.sid.store(u32::from(rid.bdf()), Ordering::Release);
    }

    fn sid(&self) -> io::Result<u16> {
        u16::try_from(self.sid.load(Ordering::Acquire)).map_err(|_| {
            io::Error::other("interrupt source has no requester id yet; bind it after plugging it")
        })
    }
}

impl MsiSink for IrSource {
    fn signal_msi(&self, msg: MsiMessage) -> io::Result<()> {
        self.remapper.deliver(self.sid()?, msg)
    }
}

impl IrqfdRouter for IrSource {
    fn allocate_gsi(&self) -> io::Result<u32> {
        self.remapper.router.allocate_gsi()
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        match msg {
            Some(_) => self.remapper.set_route(self.sid()?, gsi, msg),
            None => self.remapper.set_route(0, gsi, None),
        }
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.remapper.router.register_irqfd(fd, gsi)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.remapper.router.unregister_irqfd(fd, gsi)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::pci::msix::test_utils::{RecordingRouter, RecordingSink, RouterCall};
    use crate::virtio::GuestMemoryMmap;
    use crate::vtd::VtdDevice;
    use iommu::vtd::VtdConfig;
    use vm_memory::{Bytes, GuestAddress};

    const IRT: u64 = 0x10000;
    const QUEUE: u64 = 0x20000;
    const FSTS: u64 = 0x34;
    const GCMD_QIE: u32 = 1 << 26;
    const GCMD_IRE: u32 = 1 << 25;
    const GCMD_SIRTP: u32 = 1 << 24;
    const NET: RequesterId = RequesterId::from_bdf(0, 0x0010);
    const IOAPIC: RequesterId = RequesterId::from_bdf(0, 0xFF00);
    /// Present, fixed, physical, edge, vector 0x41, x2APIC dest 2, SVT=01 SID 00:02.0.
    const IRTE_LO: u64 = 0x0000_0002_0041_0001;
    const IRTE_HI: u64 = 0x0004_0010;
    /// Remappable, handle 5, no subhandle.
    const MSG5: MsiMessage = MsiMessage {
        address: 0xFEE0_0000 | (5 << 5) | (1 << 4),
        data: 0,
    };
    const FAULT_MSI: MsiMessage = MsiMessage {
        address: 0xFEE0_1000,
        data: 0x2f,
    };

    struct Rig {
        mem: GuestMemoryMmap,
        dev: VtdDevice,
        unit: Arc<VtdUnit>,
        kvm: Arc<RecordingSink>,
        router: Arc<RecordingRouter>,
        remapper: Arc<InterruptRemapper>,
        tail: u64,
    }

    impl Rig {
        fn new() -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let cfg = VtdConfig {
                interrupt_remapping: true,
                ..VtdConfig::default()
            };
            let kvm = Arc::new(RecordingSink::default());
            let router = Arc::new(RecordingRouter::default());
            let unit = VtdUnit::new(cfg, mem.clone(), kvm.clone()).unwrap();
            let remapper = InterruptRemapper::new(unit.clone(), kvm.clone(), router.clone());
            let dev = VtdDevice(unit.clone());
            let mut rig = Rig {
                mem,
                dev,
                unit,
                kvm,
                router,
                remapper,
                tail: 0,
            };
            rig.w32(0x3c, FAULT_MSI.data); // FEDATA
            rig.w32(0x40, FAULT_MSI.address as u32); // FEADDR
            rig.w32(0x38, 0); // FECTL: unmasked
            rig.w64(0x90, QUEUE); // IQA: 256 descriptors
            rig.w32(0x18, GCMD_QIE);
            rig.w64(0xb8, IRT | (1 << 11) | 7); // IRTA: x2APIC, 256 entries
            rig.w32(0x18, GCMD_QIE | GCMD_SIRTP);
            rig
        }

        fn w32(&mut self, off: u64, v: u32) {
            self.dev.write(0, off, &v.to_le_bytes());
        }

        fn w64(&mut self, off: u64, v: u64) {
            self.dev.write(0, off, &v.to_le_bytes());
        }

        fn fsts(&mut self) -> u32 {
            let mut b = [0u8; 4];
            self.dev.read(0, FSTS, &mut b);
            u32::from_le_bytes(b)
        }

        fn set_irte(&self, index: u64, lo: u64, hi: u64) {
            self.mem
                .write_obj(lo, GuestAddress(IRT + index * 16))
                .unwrap();
            self.mem
                .write_obj(hi, GuestAddress(IRT + index * 16 + 8))
                .unwrap();
        }

        /// Queues a global interrupt-entry-cache invalidation.
        fn iec_global(&mut self) {
            let slot = QUEUE + self.tail * 16;
            self.mem.write_obj(4u64, GuestAddress(slot)).unwrap();
            self.mem.write_obj(0u64, GuestAddress(slot + 8)).unwrap();
            self.tail += 1;
            let tail = self.tail;
            self.w64(0x88, tail << 4);
        }
    }

    fn compat(dest: u32, vector: u32) -> MsiMessage {
        MsiMessage {
            address: 0xFEE0_0000 | (u64::from(dest) << 12),
            data: vector | (1 << 14),
        }
    }

    #[test]
    fn remappable_msi_is_delivered_as_the_irte_says() {
        let mut rig = Rig::new();
        rig.set_irte(5, IRTE_LO, IRTE_HI);
        let net = rig.remapper.source(Some(NET));
        // IRE still off: the message passes unchanged.
        net.signal_msi(MSG5).unwrap();
        assert_eq!(rig.kvm.take(), vec![MSG5]);
        rig.w32(0x18, GCMD_QIE | GCMD_IRE);
        net.signal_msi(MSG5).unwrap();
        assert_eq!(rig.kvm.take(), vec![compat(2, 0x41)]);
        // The IOAPIC is not the source the IRTE names: blocked, fault 0x26 recorded.
        rig.remapper.source(Some(IOAPIC)).signal_msi(MSG5).unwrap();
        assert_eq!(rig.kvm.take(), vec![FAULT_MSI]);
        assert_ne!(rig.fsts() & 2, 0, "PPF");
        let s = rig.remapper.stats();
        assert_eq!((s.delivered, s.blocked), (2, 1));
    }

    #[test]
    fn route_is_retranslated_after_irte_change_and_iec_invalidation() {
        let mut rig = Rig::new();
        rig.set_irte(5, IRTE_LO, IRTE_HI);
        rig.w32(0x18, GCMD_QIE | GCMD_IRE);
        let net = rig.remapper.source(Some(NET));
        let gsi = net.allocate_gsi().unwrap();
        net.set_msi_route(gsi, Some(MSG5)).unwrap();
        assert_eq!(
            rig.router.take(),
            vec![RouterCall::Route(gsi, Some(compat(2, 0x41)))]
        );
        // New vector and destination: nothing changes until the guest invalidates.
        rig.set_irte(5, 0x0000_0001_0052_0001, IRTE_HI);
        assert!(rig.router.take().is_empty());
        rig.iec_global();
        assert_eq!(
            rig.router.take(),
            vec![RouterCall::Route(gsi, Some(compat(1, 0x52)))]
        );
        assert_eq!(rig.remapper.installed_route(gsi), Some(compat(1, 0x52)));
        // An invalidation that changes nothing reinstalls nothing.
        rig.iec_global();
        assert!(rig.router.take().is_empty());
        // IRE off: the guest's own message goes back in.
        rig.w32(0x18, GCMD_QIE);
        assert_eq!(rig.router.take(), vec![RouterCall::Route(gsi, Some(MSG5))]);
    }

    #[test]
    fn not_present_irte_faults_and_disables_the_route() {
        let mut rig = Rig::new();
        rig.set_irte(5, IRTE_LO, IRTE_HI);
        rig.w32(0x18, GCMD_QIE | GCMD_IRE);
        let net = rig.remapper.source(Some(NET));
        net.set_msi_route(40, Some(MSG5)).unwrap();
        rig.router.take();
        rig.set_irte(5, 0, 0);
        rig.iec_global();
        assert_eq!(rig.router.take(), vec![RouterCall::Route(40, None)]);
        assert_eq!(rig.fsts() & 2, 0, "route set-up records no fault");
        // An interrupt the device really sends now is blocked and recorded.
        net.signal_msi(MSG5).unwrap();
        assert_eq!(rig.kvm.take(), vec![FAULT_MSI]);
        assert_ne!(rig.fsts() & 2, 0, "PPF");
        let mut rec = [0u8; 8];
        rig.dev.read(0, 0x228, &mut rec);
        let hi = u64::from_le_bytes(rec);
        assert_eq!((hi & 0xffff, (hi >> 32) & 0xff), (0x10, 0x22));
        assert_eq!(rig.remapper.stats().routes_disabled, 1);
        // Masking the vector removes the remembered route for good.
        net.set_msi_route(40, None).unwrap();
        rig.set_irte(5, IRTE_LO, IRTE_HI);
        rig.iec_global();
        assert_eq!(rig.router.take(), vec![RouterCall::Route(40, None)]);
    }

    /// A router that reads the wait status word when a route is installed.
    struct StatusProbe {
        mem: GuestMemoryMmap,
        seen: Mutex<Vec<u32>>,
    }
    impl IrqfdRouter for StatusProbe {
        fn allocate_gsi(&self) -> io::Result<u32> {
            Ok(24)
        }
        fn set_msi_route(&self, _gsi: u32, _msg: Option<MsiMessage>) -> io::Result<()> {
            let status: u32 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
            lock(&self.seen).push(status);
            Ok(())
        }
        fn register_irqfd(&self, _fd: &EventFd, _gsi: u32) -> io::Result<()> {
            Ok(())
        }
        fn unregister_irqfd(&self, _fd: &EventFd, _gsi: u32) -> io::Result<()> {
            Ok(())
        }
    }

    const STATUS: u64 = 0x30000;

    #[test]
    fn routes_are_refreshed_before_a_later_wait_completes() {
        let mut rig = Rig::new();
        let probe = Arc::new(StatusProbe {
            mem: rig.mem.clone(),
            seen: Mutex::new(Vec::new()),
        });
        let remapper = InterruptRemapper::new(rig.unit.clone(), rig.kvm.clone(), probe.clone());
        rig.set_irte(5, IRTE_LO, IRTE_HI);
        rig.w32(0x18, GCMD_QIE | GCMD_IRE);
        remapper
            .source(Some(NET))
            .set_msi_route(24, Some(MSG5))
            .unwrap();
        rig.set_irte(5, 0x0000_0001_0052_0001, IRTE_HI);
        // IEC (global), then a wait writing 0x77 to STATUS.
        let wait = 5u64 | (1 << 5) | (0x77 << 32);
        for (i, (lo, hi)) in [(4u64, 0u64), (wait, STATUS)].into_iter().enumerate() {
            let slot = QUEUE + i as u64 * 16;
            rig.mem.write_obj(lo, GuestAddress(slot)).unwrap();
            rig.mem.write_obj(hi, GuestAddress(slot + 8)).unwrap();
        }
        rig.w64(0x88, 2 << 4);
        assert_eq!(*lock(&probe.seen), vec![0, 0], "set-up, then refresh");
        assert_eq!(rig.mem.read_obj::<u32>(GuestAddress(STATUS)).unwrap(), 0x77);
        assert_eq!(remapper.installed_route(24), Some(compat(1, 0x52)));
    }

    #[test]
    fn ioapic_remappable_entry_is_delivered_and_mirrored_remapped() {
        use crate::legacy::ioapic::Ioapic;
        let mut rig = Rig::new();
        // IRTE 0x8007 (handle bit 15 set): IOAPIC source only, vector 0x33 to APIC 1.
        let index = 0x8007u64;
        rig.w64(0xb8, IRT | (1 << 11) | 0xf); // 65536 entries
        rig.w32(0x18, GCMD_QIE | GCMD_SIRTP | GCMD_IRE);
        rig.set_irte(index, 0x0000_0001_0033_0001, 0x0004_ff00);
        let source = rig.remapper.source(Some(IOAPIC));
        let mut ioapic = Ioapic::new(source.clone());
        ioapic.set_route_listener(Box::new(move |pin, msg| {
            source.set_msi_route(pin as u32, msg).unwrap()
        }));
        // Pin 4: remappable (bit 48), index[14:0] in 63:49, index[15] in bit 11,
        // vector field = the pin (as Linux writes it), edge, unmasked.
        let rte = ((index & 0x7fff) << 49) | (1 << 48) | (1 << 11) | 4;
        for (reg, value) in [(0x19u32, (rte >> 32) as u32), (0x18, rte as u32)] {
            ioapic.write(0, 0x00, &reg.to_le_bytes());
            ioapic.write(0, 0x10, &value.to_le_bytes());
        }
        assert_eq!(
            rig.router.take(),
            vec![RouterCall::Route(4, Some(compat(1, 0x33)))]
        );
        ioapic.set_pin_level(4, true).unwrap();
        assert_eq!(rig.kvm.take(), vec![compat(1, 0x33)]);
        // The same handle from a PCI function fails the source check.
        let msg = MsiMessage {
            address: 0xFEE0_0000 | ((index & 0x7fff) << 5) | (1 << 4) | (1 << 2),
            data: 0,
        };
        rig.remapper.source(Some(NET)).signal_msi(msg).unwrap();
        assert_eq!(rig.kvm.take(), vec![FAULT_MSI]);
        let mut rec = [0u8; 8];
        rig.dev.read(0, 0x228, &mut rec);
        assert_eq!((u64::from_le_bytes(rec) >> 32) & 0xff, 0x26);
    }

    #[test]
    fn sources_bind_late_and_refuse_interrupts_before() {
        let rig = Rig::new();
        let late = rig.remapper.source(None);
        assert!(late.signal_msi(MSG5).is_err());
        assert!(late.set_msi_route(30, Some(MSG5)).is_err());
        late.bind(NET);
        late.signal_msi(MSG5).unwrap();
        assert_eq!(rig.kvm.take(), vec![MSG5], "IRE off: unchanged");
        drop(rig.unit);
    }
}
