//! The control queue of a multiqueue net device (`queues=N`): what its
//! thread ([`crate::vhost_user::ctrl`]) needs from the device.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{VhostUserDevice, VhostUserError};
use crate::vhost_user::ctrl::{CtrlRing, CtrlSetup, Dma};
use crate::vhost_user::session::Activation;
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt};

impl VhostUserDevice {
    /// The control queue's thread setup, if the driver has one: its ring,
    /// guest memory through the vIOMMU (behind one), and enabling pairs
    /// through the link (recorded in `act` for a reconnection).
    pub(super) fn ctrl_setup(
        &self,
        mem: &GuestMemoryMmap,
        interrupt: &Arc<dyn VirtioInterrupt>,
        queues: &[(usize, Queue, EventFd)],
        act: Arc<Activation>,
    ) -> Result<Option<CtrlSetup>, VhostUserError> {
        let Some(index) = self.layout.active(self.acked).1 else {
            return Ok(None);
        };
        let Some((_, q, kick)) = queues.iter().find(|q| q.0 == index) else {
            return Ok(None);
        };
        let translator = if self.iommu {
            let t = iommu::sync::lock(&self.translator).clone();
            Some(t.ok_or(VhostUserError::NoTranslation)?)
        } else {
            None
        };
        let ring = CtrlRing {
            size: q.size(),
            desc: q.desc_table(),
            avail: q.avail_ring(),
            used: q.used_ring(),
            event_idx: q.event_idx_enabled(),
            next_avail: q.next_avail(),
            next_used: q.next_used(),
        };
        let link = self.link.clone();
        let bound = self.supervisor.as_ref().map(|_| self.timeout);
        let apply = move |pairs: u16| link.enable_rings(&act, 2 * usize::from(pairs), bound);
        Ok(Some(CtrlSetup {
            dma: Dma::new(mem.clone(), translator),
            ring,
            index: u16::try_from(index).unwrap_or(u16::MAX),
            kick: kick.try_clone().map_err(VhostUserError::Resource)?,
            interrupt: interrupt.clone(),
            max_pairs: self.layout.pairs(),
            apply: Box::new(apply),
        }))
    }
}
