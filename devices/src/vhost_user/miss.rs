//! The seam between the back-end request channel and the IOMMU: who answers
//! an IOTLB miss.

use std::sync::Arc;
use std::time::Duration;

use iommu::NotifyError;
use thiserror::Error;

use super::channel::{IotlbChannel, SpinWait};
use super::wire::{Grants, IotlbMsg, IotlbPerm, IotlbType};

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
    #[error("the UPDATE answering the IOTLB miss at IOVA {iova:#x} was not delivered")]
    UpdateFailed {
        /// The IOVA asked for.
        iova: u64,
        /// What the bridge's channel reported.
        #[source]
        source: NotifyError,
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

/// Answers IOTLB misses from a back end: the one way a miss is answered.
///
/// Called on the back-end channel thread. An implementation translates
/// through the guest IOMMU, sends the UPDATE (uaddr = VMM virtual address,
/// size clipped to the memory region, perm = the mapping's real permission)
/// on the device's main socket with NEED_REPLY, and returns once it is
/// acked, so the back end never sees the miss's ack before its UPDATE. The
/// IOTLB bridge ([`super::IotlbBridge`]) is the production implementation;
/// it holds its lock across translating and installing, so an UPDATE cannot
/// overtake an unmap's INVALIDATE.
pub trait MissHandler: Send + Sync {
    /// Answer the miss of `iova` for an access of kind `perm`; returns the
    /// UPDATE sent.
    fn answer_miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError>;

    /// An ACCESS_FAIL report from the back end. Informational; the IOTLB
    /// bridge counts it and logs it rate-limited. Default: a debug line.
    fn on_access_fail(&self, iova: u64, perm: IotlbPerm) {
        log::debug!("vhost-user back end reports a failed access at IOVA {iova:#x} ({perm:?})");
    }

    /// A back-end request the server refused without asking the handler
    /// (counted by the IOTLB bridge). Default: nothing.
    fn on_refused_request(&self, request: RefusedRequest) {
        let _ = request;
    }

    /// Called by the back-end request thread every
    /// [`super::backend_req::TICK`] and between requests once a tick is
    /// due, never while a miss is being answered (the IOTLB bridge checks
    /// for stalled queues here). Default: nothing.
    fn tick(&self) {}

    /// How long the back-end request thread busy-polls for the next request before it blocks
    /// (`--vhost-user ...,poll_us=P`; read before every wait). Default: zero, block at once.
    fn poll_window(&self) -> Duration {
        Duration::ZERO
    }

    /// A busy-polling wait of the back-end request thread ended (the IOTLB bridge counts it
    /// with its channel's polling counters). Default: nothing.
    fn on_poll(&self, wait: &SpinWait) {
        let _ = wait;
    }
}

/// A back-end request refused before any translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedRequest {
    /// A request code or IOTLB message type this front end does not serve.
    Unsupported(u32),
    /// Refused unprocessed: the back end sent too many bad requests this second.
    Throttled,
}

/// A [`MissHandler`] made of a translation function and the channel its
/// UPDATEs go through, for tests, fuzzing and simple embedders without
/// invalidations: the function's UPDATE is checked with [`check_update`]
/// and sent acked.
pub struct TranslatingHandler<F> {
    translate: F,
    channel: Arc<dyn IotlbChannel>,
}

impl<F> TranslatingHandler<F>
where
    F: Fn(u64, IotlbPerm) -> Result<IotlbMsg, MissError> + Send + Sync,
{
    /// Answers misses with `translate`, sending the UPDATEs on `channel`.
    pub fn new(translate: F, channel: Arc<dyn IotlbChannel>) -> Self {
        TranslatingHandler { translate, channel }
    }
}

impl<F> MissHandler for TranslatingHandler<F>
where
    F: Fn(u64, IotlbPerm) -> Result<IotlbMsg, MissError> + Send + Sync,
{
    fn answer_miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
        let update = (self.translate)(iova, perm)?;
        check_update(iova, perm, &update)?;
        self.channel
            .send_iotlb(&update, true)
            .map_err(|e| MissError::UpdateFailed {
                iova,
                source: NotifyError::Install {
                    iova: update.iova,
                    source: Arc::new(e),
                },
            })?;
        Ok(update)
    }
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
        let u = IotlbMsg::update(0x1000, 0x1000, 0x5000, IotlbPerm::ReadWrite);
        check_update(0x1fff, IotlbPerm::WriteOnly, &u).unwrap();
        check_update(0x1000, IotlbPerm::ReadOnly, &u).unwrap();
    }

    #[test]
    fn check_update_rejects_range_kind_and_perm_mismatches() {
        let u = IotlbMsg::update(0x1000, 0x1000, 0x5000, IotlbPerm::ReadOnly);
        assert!(check_update(0x2000, IotlbPerm::ReadOnly, &u).is_err());
        assert!(check_update(0xfff, IotlbPerm::ReadOnly, &u).is_err());
        assert!(check_update(0x1000, IotlbPerm::WriteOnly, &u).is_err());
        let inv = IotlbMsg::invalidate(0x1000, 0x1000);
        assert!(check_update(0x1000, IotlbPerm::No, &inv).is_err());
        let empty = IotlbMsg::update(0x1000, 0, 0x5000, IotlbPerm::ReadWrite);
        assert!(check_update(0x1000, IotlbPerm::ReadOnly, &empty).is_err());
    }

    #[test]
    fn check_update_handles_the_top_of_the_address_space() {
        let u = IotlbMsg::update(u64::MAX - 0xfff, 0x1000, 0, IotlbPerm::ReadWrite);
        check_update(u64::MAX, IotlbPerm::ReadWrite, &u).unwrap();
        let wraps = IotlbMsg::update(u64::MAX - 0xfff, 0x2000, 0, IotlbPerm::ReadWrite);
        assert!(check_update(u64::MAX, IotlbPerm::ReadWrite, &wraps).is_err());
    }

    #[test]
    fn translating_handler_checks_and_sends_the_update_acked() {
        use crate::vhost_user::channel::MockIotlbChannel;
        let chan = Arc::new(MockIotlbChannel::new());
        let h = TranslatingHandler::new(
            |iova: u64, p: IotlbPerm| -> Result<IotlbMsg, MissError> {
                match iova {
                    0x1000 => Ok(IotlbMsg::update(0x1000, 0x1000, 0x5000, p)),
                    _ => Err(MissError::Unmapped { iova }),
                }
            },
            chan.clone(),
        );
        let sent = h.answer_miss(0x1000, IotlbPerm::ReadOnly).unwrap();
        assert_eq!(chan.take_sent(), vec![(sent, true)]);
        assert_eq!(
            h.answer_miss(7, IotlbPerm::ReadOnly),
            Err(MissError::Unmapped { iova: 7 })
        );
        assert!(chan.take_sent().is_empty(), "nothing sent for a refusal");
    }
}
