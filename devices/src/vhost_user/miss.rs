//! The seam between the back-end request channel and the IOMMU: who answers
//! an IOTLB miss.

use thiserror::Error;

use super::channel::IotlbChannel;
use super::wire::{IotlbMsg, IotlbPerm, IotlbType};

/// Why a miss got no UPDATE (the back end then gets a non-zero ack).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MissError {
    /// The IOVA has no mapping in the guest IOMMU.
    #[error("IOVA {iova:#x} is not mapped for this device; the guest did not map it (DMA fault)")]
    Unmapped {
        /// The IOVA asked for.
        iova: u64,
    },
    /// The mapping exists but does not allow the access.
    #[error("IOVA {iova:#x} is mapped without {wanted:?} access; the guest mapping forbids it")]
    PermissionDenied {
        /// The IOVA asked for.
        iova: u64,
        /// The access the back end wanted.
        wanted: IotlbPerm,
    },
    /// The translation leads outside the memory shared with the back end.
    #[error("IOVA {iova:#x} translates to an address outside guest RAM shared with the back end")]
    NotSharedMemory {
        /// The IOVA asked for.
        iova: u64,
    },
    /// The device is not running (stopped, reset, or being torn down).
    #[error("IOTLB miss for IOVA {iova:#x} while the device is stopped; refused")]
    DeviceStopped {
        /// The IOVA asked for.
        iova: u64,
    },
    /// The device sits behind a vIOMMU but no translation was configured yet.
    #[error("IOTLB miss for IOVA {iova:#x} before the VMM configured the device's IOMMU translation; refused")]
    NoTranslation {
        /// The IOVA asked for.
        iova: u64,
    },
    /// The IOVA cannot be covered by an UPDATE (the last byte of the 64-bit
    /// space, whose end `iova + size` would wrap).
    #[error("IOTLB miss for IOVA {iova:#x} cannot be answered: an UPDATE there would wrap the 64-bit space")]
    Unrepresentable {
        /// The IOVA asked for.
        iova: u64,
    },
    /// The UPDATE could not be delivered (socket failure or back-end nack).
    #[error("UPDATE for the IOTLB miss at IOVA {iova:#x} failed: {reason}")]
    UpdateFailed {
        /// The IOVA asked for.
        iova: u64,
        /// What the main socket reported.
        reason: String,
    },
    /// The handler produced an UPDATE that does not answer the miss.
    #[error("translation for IOVA {iova:#x} is not a valid UPDATE covering it with {wanted:?}: {update:?}")]
    BadUpdate {
        /// The IOVA asked for.
        iova: u64,
        /// The access the back end wanted.
        wanted: IotlbPerm,
        /// What the handler returned.
        update: IotlbMsg,
    },
}

/// Answers IOTLB misses from a back end.
///
/// Called on the back-end channel thread. Implementations translate through
/// the guest IOMMU and return the UPDATE to send (uaddr = VMM virtual
/// address, size clipped to the memory region, perm = the mapping's real
/// permission). They must not send anything on the main socket themselves.
pub trait MissHandler: Send + Sync {
    /// Translate `iova` for an access of kind `perm`.
    fn on_miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError>;

    /// Answer a miss completely: translate, send the UPDATE through `main`
    /// with NEED_REPLY and wait for its ack. Returns the UPDATE sent.
    ///
    /// The default runs [`MissHandler::on_miss`], checks the result with
    /// [`check_update`] and sends it. Handlers that must serialise
    /// translating and installing against invalidations (the IOTLB bridge)
    /// override this and hold their lock across both steps.
    fn answer_miss(
        &self,
        iova: u64,
        perm: IotlbPerm,
        main: &dyn IotlbChannel,
    ) -> Result<IotlbMsg, MissError> {
        let update = self.on_miss(iova, perm)?;
        check_update(iova, perm, &update)?;
        main.send_iotlb(&update, true)
            .map_err(|e| MissError::UpdateFailed {
                iova,
                reason: e.to_string(),
            })?;
        Ok(update)
    }

    /// An ACCESS_FAIL report from the back end. Informational; logged.
    fn on_access_fail(&self, iova: u64, perm: IotlbPerm) {
        log::warn!("vhost-user back end reports a failed access at IOVA {iova:#x} ({perm:?})");
    }

    /// Called by the back-end request thread every
    /// [`super::backend_req::TICK`] and between requests once a tick is
    /// due, never while a miss is being answered (the IOTLB bridge checks
    /// for stalled queues here). Default: nothing.
    fn tick(&self) {}
}

impl MissError {
    /// Whether the refusal is the guest's or the back end's fault (the IOVA
    /// is not mapped, not with this access, or not guest RAM), as opposed to
    /// the device being stopped or the UPDATE failing.
    pub fn is_dma_fault(&self) -> bool {
        matches!(
            self,
            MissError::Unmapped { .. }
                | MissError::PermissionDenied { .. }
                | MissError::NotSharedMemory { .. }
                | MissError::Unrepresentable { .. }
                | MissError::BadUpdate { .. }
        )
    }
}

impl<F> MissHandler for F
where
    F: Fn(u64, IotlbPerm) -> Result<IotlbMsg, MissError> + Send + Sync,
{
    fn on_miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
        self(iova, perm)
    }
}

/// Check that `update` is an UPDATE whose range contains `iova` and whose
/// permission grants `wanted`.
pub fn check_update(iova: u64, wanted: IotlbPerm, update: &IotlbMsg) -> Result<(), MissError> {
    let covers = update.size > 0
        && update.iova <= iova
        && update
            .iova
            .checked_add(update.size - 1)
            .is_some_and(|last| iova <= last);
    let perm_ok = update.permission().is_ok_and(|p| p.allows(wanted));
    if update.kind() == Ok(IotlbType::Update) && covers && perm_ok {
        Ok(())
    } else {
        Err(MissError::BadUpdate {
            iova,
            wanted,
            update: *update,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn check_update_accepts_covering_update() {
        let u = IotlbMsg::update(0x1000, 0x1000, 0x5000, IotlbPerm::Rw);
        check_update(0x1fff, IotlbPerm::Wo, &u).unwrap();
        check_update(0x1000, IotlbPerm::Ro, &u).unwrap();
    }

    #[test]
    fn check_update_rejects_range_kind_and_perm_mismatches() {
        let u = IotlbMsg::update(0x1000, 0x1000, 0x5000, IotlbPerm::Ro);
        assert!(check_update(0x2000, IotlbPerm::Ro, &u).is_err());
        assert!(check_update(0xfff, IotlbPerm::Ro, &u).is_err());
        assert!(check_update(0x1000, IotlbPerm::Wo, &u).is_err());
        let inv = IotlbMsg::invalidate(0x1000, 0x1000);
        assert!(check_update(0x1000, IotlbPerm::None, &inv).is_err());
        let empty = IotlbMsg::update(0x1000, 0, 0x5000, IotlbPerm::Rw);
        assert!(check_update(0x1000, IotlbPerm::Ro, &empty).is_err());
    }

    #[test]
    fn check_update_handles_the_top_of_the_address_space() {
        let u = IotlbMsg::update(u64::MAX - 0xfff, 0x1000, 0, IotlbPerm::Rw);
        check_update(u64::MAX, IotlbPerm::Rw, &u).unwrap();
        let wraps = IotlbMsg::update(u64::MAX - 0xfff, 0x2000, 0, IotlbPerm::Rw);
        assert!(check_update(u64::MAX, IotlbPerm::Rw, &wraps).is_err());
    }

    #[test]
    fn closures_are_miss_handlers() {
        let h = |iova: u64, _p: IotlbPerm| -> Result<IotlbMsg, MissError> {
            Err(MissError::Unmapped { iova })
        };
        assert_eq!(
            h.on_miss(7, IotlbPerm::Ro),
            Err(MissError::Unmapped { iova: 7 })
        );
    }
}
