//! What the guest asked the unit to invalidate: queued descriptors by type (and IOTLB
//! granularity), queue errors, and register-based invalidations. Plain numbers in the model
//! (no atomics, no locks): the model is mutated under its owner's write lock anyway, and
//! [`super::Vtd::invalidation_counts`] copies them out.

use super::descriptor::{Descriptor, IotlbScope};

/// Invalidation requests the unit carried out since it was created (a reset does not clear
/// them: they count what the guest did over the VM's life).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InvalidationCounts {
    /// Queued context-cache invalidation descriptors (type 1), any granularity.
    pub context_cache: u64,
    /// Queued global IOTLB invalidation descriptors (type 2, granularity 1).
    pub iotlb_global: u64,
    /// Queued domain-selective IOTLB invalidation descriptors (type 2, granularity 2).
    pub iotlb_domain: u64,
    /// Queued page-selective IOTLB invalidation descriptors (type 2, granularity 3).
    pub iotlb_page: u64,
    /// Queued device-TLB invalidation descriptors (type 3).
    pub device_tlb: u64,
    /// Queued interrupt-entry-cache invalidation descriptors (type 4), global or selective.
    pub interrupt_entry_cache: u64,
    /// Queued invalidation wait descriptors (type 5).
    pub wait: u64,
    /// Queue errors (FSTS.IQE): a descriptor that could not be read or decoded, or IQT beyond
    /// the queue. The queue stops at such a descriptor, so it is not counted by type.
    pub queue_errors: u64,
    /// Register-based context-cache invalidations (CCMD.ICC) carried out.
    pub register_context_cache: u64,
    /// Register-based IOTLB invalidations (IOTLB_REG.IVT) carried out.
    pub register_iotlb: u64,
}

impl InvalidationCounts {
    /// Counts one decoded queued descriptor.
    pub(crate) fn count_descriptor(&mut self, desc: &Descriptor) {
        let c = match desc {
            Descriptor::ContextCache(_) => &mut self.context_cache,
            Descriptor::Iotlb(IotlbScope::Global) => &mut self.iotlb_global,
            Descriptor::Iotlb(IotlbScope::Domain(_)) => &mut self.iotlb_domain,
            Descriptor::Iotlb(IotlbScope::Page { .. }) => &mut self.iotlb_page,
            Descriptor::DeviceTlb { .. } => &mut self.device_tlb,
            Descriptor::InterruptEntryCache(_) => &mut self.interrupt_entry_cache,
            Descriptor::Wait(_) => &mut self.wait,
        };
        *c = c.saturating_add(1);
    }

    /// Queued descriptors of every type.
    pub fn descriptors(&self) -> u64 {
        [
            self.context_cache,
            self.iotlb_global,
            self.iotlb_domain,
            self.iotlb_page,
            self.device_tlb,
            self.interrupt_entry_cache,
            self.wait,
        ]
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vtd::regs::{CCMD, IOTLB, IQT};
    use crate::vtd::testutil::*;
    use crate::vtd::VtdConfig;

    #[test]
    fn queued_descriptors_are_counted_by_type_and_granularity() {
        let mut rig = Rig::new(VtdConfig {
            device_iotlb: true,
            ..VtdConfig::default()
        });
        rig.submit(&[
            cc_desc(1, 0, 0, 0),
            iotlb_desc(1, 0, 0, 0, false),
            iotlb_desc(2, 3, 0, 0, false),
            iotlb_desc(3, 3, 0x4000, 1, false),
            iotlb_desc(3, 3, 0x8000, 0, false),
            devtlb_desc(0x10, 0x1000, false),
            iec_desc(None),
            wait_desc(false, false, 0, 0),
        ]);
        let c = rig.vtd.invalidation_counts();
        assert_eq!(
            c,
            InvalidationCounts {
                context_cache: 1,
                iotlb_global: 1,
                iotlb_domain: 1,
                iotlb_page: 2,
                device_tlb: 1,
                interrupt_entry_cache: 1,
                wait: 1,
                ..InvalidationCounts::default()
            }
        );
        assert_eq!(c.descriptors(), 8);
    }

    #[test]
    fn a_bad_descriptor_is_a_queue_error_not_a_type() {
        let mut rig = Rig::new(VtdConfig::default());
        // Type 0 is not a legacy-mode descriptor; the wait after it is never reached.
        rig.submit(&[(0, 0), wait_desc(false, false, 0, 0)]);
        let c = rig.vtd.invalidation_counts();
        assert_eq!((c.queue_errors, c.descriptors()), (1, 0));
        // A tail beyond the 256-entry queue.
        let mut rig = Rig::new(VtdConfig::default());
        w32(&mut rig.vtd, IQT, 300 << 4);
        assert_eq!(rig.vtd.invalidation_counts().queue_errors, 1);
    }

    #[test]
    fn register_invalidations_are_counted_apart() {
        let (mut vtd, _mem) = vtd_with(VtdConfig::default());
        // CCMD.ICC with global granularity (CIRG = 1).
        w64(&mut vtd, CCMD, (1 << 63) | (1 << 61));
        // IOTLB_REG.IVT with global granularity (IIRG = 1).
        w64(&mut vtd, IOTLB, (1 << 63) | (1 << 60));
        // Without ICC / IVT nothing is carried out.
        w64(&mut vtd, CCMD, 1 << 61);
        let c = vtd.invalidation_counts();
        assert_eq!((c.register_context_cache, c.register_iotlb), (1, 1));
        assert_eq!(c.descriptors(), 0);
    }
}
