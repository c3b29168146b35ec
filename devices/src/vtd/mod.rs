//! The Intel VT-d remapping unit as an MMIO device.
//!
//! [`iommu::vtd::Vtd`] is the pure model; this adapter puts it on the MMIO
//! bus and carries out the side effects the model returns, in order:
//! notifications to the IOTLB consumers (synchronously: every consumer has
//! dropped the translations before the call returns), then invalidation-wait
//! completions (status write, completion interrupt), and fault or completion
//! MSIs.
//!
//! Locks. `inval` serialises everything a register write starts, from the
//! model call to the last side effect, so a wait descriptor can never
//! complete before the notifications queued ahead of it. The model lock is
//! held only inside model calls: never while notifying, because a backend
//! may need one of its IOTLB misses answered (a `translate`, which takes the
//! model lock for reading) before it can ack an INVALIDATE.
//!
//! Interrupt remapping ([`intremap`]): an [`InterruptRemapper`] in front of
//! the hypervisor's MSI delivery; interrupt-entry-cache invalidations and
//! SIRTP/IRE/CFI changes refresh its routes in order with the other actions.

use iommu::sync::{lock, read, write};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock, Weak};

use iommu::vtd::{InvalidationCounts, Vtd, VtdAction, VtdConfig, VtdError};
use iommu::{Access, DmaTranslate, Iova, NotifierSet, RequesterId, TranslateError, Translation};

use crate::bus::BusDevice;
use crate::interrupt::{MsiMessage, MsiSink};
use crate::virtio::GuestMemoryMmap;

pub mod intremap;
mod seam;

pub use intremap::{InterruptRemapper, IrSource, IrStats};

/// Size of the register block.
pub const VTD_REGS_SIZE: u64 = 0x1000;

/// Counters of the unit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VtdStats {
    /// Register writes that produced notifications.
    pub notify_batches: u64,
    /// Events delivered to consumers.
    pub events: u64,
    /// Consumer failures.
    pub notify_failures: u64,
    /// Invalidation waits completed.
    pub waits: u64,
    /// Fault MSIs sent.
    pub fault_events: u64,
    /// Invalidation requests the model carried out: queued descriptors by type, queue
    /// errors, register-based invalidations (read from the model by [`VtdUnit::stats`]).
    pub invalidations: InvalidationCounts,
}

/// The unit shared by its MMIO adapter, the IOTLB bridges (translation and
/// faults) and the VMM (notifier registration, ATS tracking).
pub struct VtdUnit {
    model: RwLock<Vtd<GuestMemoryMmap>>,
    inval: Mutex<()>,
    notifiers: RwLock<NotifierSet>,
    msi: Arc<dyn MsiSink>,
    stats: Mutex<VtdStats>,
    interrupt_remapper: Mutex<Option<Weak<InterruptRemapper>>>,
    /// Functions whose ATS Enable the guest set ([`seam`]).
    ats_enabled: Mutex<BTreeSet<RequesterId>>,
}

impl std::fmt::Debug for VtdUnit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VtdUnit").finish_non_exhaustive()
    }
}

impl VtdUnit {
    /// Creates the unit over guest memory `mem`; MSIs go to `msi`.
    pub fn new(
        config: VtdConfig,
        mem: GuestMemoryMmap,
        msi: Arc<dyn MsiSink>,
    ) -> Result<Arc<Self>, VtdError> {
        let model = Vtd::new(config, mem)?;
        let notifiers = NotifierSet::new(model.notifier_flags());
        Ok(Arc::new(VtdUnit {
            model: RwLock::new(model),
            inval: Mutex::new(()),
            notifiers: RwLock::new(notifiers),
            msi,
            stats: Mutex::new(VtdStats::default()),
            interrupt_remapper: Mutex::new(None),
            ats_enabled: Mutex::new(BTreeSet::new()),
        }))
    }

    /// The unit's configuration.
    pub fn config(&self) -> VtdConfig {
        read(&self.model).config().clone()
    }

    /// Counters.
    pub fn stats(&self) -> VtdStats {
        let mut s = *lock(&self.stats);
        s.invalidations = read(&self.model).invalidation_counts();
        s
    }

    fn send_msi(&self, msg: iommu::vtd::MsiMessage) {
        let m = MsiMessage {
            address: msg.addr,
            data: msg.data,
        };
        if let Err(e) = self.msi.signal_msi(m) {
            log::warn!("vtd: cannot deliver an MSI: {e}");
        }
    }

    /// Runs the side effects of one model call, in order.
    fn run(&self, actions: Vec<VtdAction>) {
        let mut queue: std::collections::VecDeque<VtdAction> = actions.into();
        while let Some(a) = queue.pop_front() {
            match a {
                VtdAction::Notify(events) => self.notify(&events),
                VtdAction::WaitDone(w) => {
                    let more = write(&self.model).complete_wait(&w);
                    lock(&self.stats).waits += 1;
                    for (i, m) in more.into_iter().enumerate() {
                        queue.insert(i, m);
                    }
                }
                VtdAction::FaultEvent(m) => {
                    lock(&self.stats).fault_events += 1;
                    self.send_msi(m)
                }
                VtdAction::InvalidationEvent(m) => self.send_msi(m),
                VtdAction::InterruptCacheInvalidated(_) | VtdAction::InterruptRemappingChanged => {
                    self.interrupt_remapping_changed()
                }
            }
        }
    }

    fn notify(&self, events: &[iommu::IommuEvent]) {
        if events.is_empty() {
            return;
        }
        let result = read(&self.notifiers).dispatch_all(events);
        let mut s = lock(&self.stats);
        s.notify_batches += 1;
        s.events += events.len() as u64;
        if let Err(e) = result {
            s.notify_failures += 1;
            log::warn!("vtd: an IOTLB consumer failed to drop translations: {e}");
        }
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        let _serial = lock(&self.inval);
        let actions = write(&self.model).mmio_write(offset, data);
        self.run(actions);
    }

    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        read(&self.model).mmio_read(offset, data)
    }
}

impl DmaTranslate for VtdUnit {
    fn translate(
        &self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        read(&self.model).translate(rid, iova, len, access)
    }
}

/// The register block on the MMIO bus.
pub struct VtdDevice(pub Arc<VtdUnit>);

impl BusDevice for VtdDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.0.mmio_read(offset, data)
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.0.mmio_write(offset, data)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::viommu::Viommu;
    use iommu::{IommuEvent, IommuNotifier, NotifyError, UnmapKind};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    const RID: RequesterId = RequesterId::from_bdf(0, 0x10);
    const ROOT: u64 = 0x10000;
    const CTX: u64 = 0x11000;
    const QUEUE: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    struct NoMsi;
    impl MsiSink for NoMsi {
        fn signal_msi(&self, _: MsiMessage) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A consumer that takes its time and looks at the wait status word.
    struct Slow {
        mem: GuestMemoryMmap,
        status_seen: AtomicU32,
        events: Mutex<Vec<IommuEvent>>,
    }
    impl IommuNotifier for Slow {
        fn notify(&self, ev: &IommuEvent) -> Result<(), NotifyError> {
            std::thread::sleep(Duration::from_millis(50));
            let s: u32 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
            self.status_seen.store(s, Ordering::SeqCst);
            lock(&self.events).push(ev.clone());
            Ok(())
        }
    }

    fn w32(d: &mut VtdDevice, off: u64, v: u32) {
        d.write(0, off, &v.to_le_bytes());
    }
    fn w64(d: &mut VtdDevice, off: u64, v: u64) {
        d.write(0, off, &v.to_le_bytes());
    }

    fn setup() -> (GuestMemoryMmap, Arc<VtdUnit>, VtdDevice) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cfg = VtdConfig {
            device_iotlb: true,
            identity_limit: (1 << 20) - 1,
            ..VtdConfig::default()
        };
        let unit = VtdUnit::new(cfg, mem.clone(), Arc::new(NoMsi)).unwrap();
        let mut dev = VtdDevice(unit.clone());
        // Root entry of bus 0 -> context table; context of 00:02.0: pass-through, DID 5.
        mem.write_obj(CTX | 1, GuestAddress(ROOT)).unwrap();
        mem.write_obj(1u64 | (2 << 2), GuestAddress(CTX + 0x10 * 16))
            .unwrap();
        mem.write_obj(2u64 | (5 << 8), GuestAddress(CTX + 0x10 * 16 + 8))
            .unwrap();
        w64(&mut dev, 0x20, ROOT);
        w32(&mut dev, 0x18, 1 << 30); // SRTP
        w64(&mut dev, 0x90, QUEUE); // IQA: 256 descriptors
        w32(&mut dev, 0x18, 1 << 26); // QIE
        w32(&mut dev, 0x18, (1 << 26) | (1 << 31)); // QIE + TE
        (mem, unit, dev)
    }

    #[test]
    fn wait_completes_only_after_consumers_dropped_the_translation() {
        let (mem, unit, mut dev) = setup();
        // The endpoint translated once (pass-through), so its context is cached.
        assert!(unit.translate(RID, Iova(0x5000), 1, Access::Read).is_ok());
        let slow = Arc::new(Slow {
            mem: mem.clone(),
            status_seen: AtomicU32::new(u32::MAX),
            events: Mutex::new(Vec::new()),
        });
        Viommu::register_consumer(unit.as_ref(), RID, slow.clone(), false).unwrap();
        // Global IOTLB invalidation, then a wait with a status write.
        mem.write_obj(0x2u64 | (1 << 4), GuestAddress(QUEUE))
            .unwrap();
        mem.write_obj(
            0x5u64 | (1 << 5) | (0xabcd_u64 << 32),
            GuestAddress(QUEUE + 16),
        )
        .unwrap();
        mem.write_obj(STATUS, GuestAddress(QUEUE + 24)).unwrap();
        w64(&mut dev, 0x88, 2 << 4); // IQT: two descriptors queued
                                     // The consumer ran before the status word was written...
        assert_eq!(slow.status_seen.load(Ordering::SeqCst), 0);
        assert!(!lock(&slow.events).is_empty());
        // ...and the write returned only after the wait completed.
        assert_eq!(mem.read_obj::<u32>(GuestAddress(STATUS)).unwrap(), 0xabcd);
        let s = unit.stats();
        assert_eq!((s.waits, s.notify_failures), (1, 0));
        let inv = s.invalidations;
        assert_eq!((inv.iotlb_global, inv.wait, inv.descriptors()), (1, 1, 2));
    }

    #[test]
    fn ats_toggle_switches_the_consumer_between_unmap_kinds() {
        let (mem, unit, mut dev) = setup();
        assert!(unit.translate(RID, Iova(0x5000), 1, Access::Read).is_ok());
        let slow = Arc::new(Slow {
            mem: mem.clone(),
            status_seen: AtomicU32::new(0),
            events: Mutex::new(Vec::new()),
        });
        Viommu::register_consumer(unit.as_ref(), RID, slow.clone(), false).unwrap();
        assert_eq!(unit.follow_ats(RID, true), UnmapKind::DevIotlb);
        // An IOTLB invalidation no longer reaches a device-TLB consumer...
        mem.write_obj(0x2u64 | (1 << 4), GuestAddress(QUEUE))
            .unwrap();
        // ...a device-TLB invalidation (type 3, SID 0x10, whole space) does.
        let dev_tlb = 0x3u64 | (0x10 << 32);
        mem.write_obj(dev_tlb, GuestAddress(QUEUE + 16)).unwrap();
        mem.write_obj(0x7fff_ffff_ffff_f001u64, GuestAddress(QUEUE + 24))
            .unwrap();
        w64(&mut dev, 0x88, 2 << 4);
        let evs = lock(&slow.events).clone();
        let mut fsts = [0u8; 4];
        dev.read(0, 0x34, &mut fsts);
        assert_eq!(u32::from_le_bytes(fsts), 0, "fault status");
        assert_eq!(evs.len(), 1, "{evs:?} {:?}", unit.stats());
        assert!(
            matches!(evs[0], IommuEvent::DevIotlbUnmap { .. }),
            "{evs:?}"
        );
        // ATS off again: plain IOTLB invalidations reach it.
        assert_eq!(unit.follow_ats(RID, false), UnmapKind::Iotlb);
        mem.write_obj(0x2u64 | (1 << 4), GuestAddress(QUEUE + 32))
            .unwrap();
        w64(&mut dev, 0x88, 3 << 4);
        assert!(matches!(
            lock(&slow.events).last(),
            Some(IommuEvent::Unmap { .. })
        ));
    }
}
