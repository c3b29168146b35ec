//! [`VhostFdChannel`]: the vhost-user bridge's [`IotlbChannel`] on a vhost fd.
//!
//! One seam, two transports: the [`crate::vhost_user::IotlbBridge`] sends
//! its UPDATEs and INVALIDATEs through an [`IotlbChannel`]. On a vhost-user
//! socket an IOTLB message is acked by the back end's reply; on a vhost fd
//! the kernel applies the message inside `write(2)` (under the device and
//! virtqueue mutexes), so a write that returned the whole message **is**
//! the ack, whether or not the bridge asked for one.
//!
//! A refused INVALIDATE would leave the kernel holding a translation the
//! guest removed. The channel then drops every translation the kernel holds
//! through its `drop_all` hook (the device passes `VHOST_RESET_OWNER`,
//! which frees the device IOTLB, the memory table and the rings' backends)
//! and reports [`ChannelError::Broken`] from then on: the bridge takes that
//! as "the back end holds nothing", which is then true. If even that fails,
//! the error is returned as is and the bridge keeps its record of what the
//! kernel may hold.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::io::{IotlbIo, IotlbIoError};
use crate::vhost_user::channel::{ChannelError, IotlbChannel, IotlbStats, IotlbStatsSnapshot};
use crate::vhost_user::wire::{IotlbMsg, IotlbType};

/// Drops every translation the kernel holds for the device (`VHOST_RESET_OWNER`).
pub type DropAll = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

/// IOTLB messages to the kernel through a vhost fd.
pub struct VhostFdChannel {
    io: Arc<dyn IotlbIo>,
    stats: IotlbStats,
    /// Every translation was dropped after a failure; nothing is sent any more.
    dropped: AtomicBool,
    drop_all: DropAll,
}

impl std::fmt::Debug for VhostFdChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostFdChannel")
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn channel_error(e: IotlbIoError) -> ChannelError {
    match e {
        IotlbIoError::Io(e) => ChannelError::Io(e),
        other => ChannelError::Io(io::Error::other(other)),
    }
}

impl VhostFdChannel {
    /// Send through `io`; `drop_all` empties the kernel's IOTLB for good
    /// when an INVALIDATE is refused.
    pub fn new(io: Arc<dyn IotlbIo>, drop_all: DropAll) -> Self {
        VhostFdChannel {
            io,
            stats: IotlbStats::default(),
            dropped: AtomicBool::new(false),
            drop_all,
        }
    }

    /// Counters of the messages written.
    pub fn stats(&self) -> IotlbStatsSnapshot {
        self.stats.snapshot()
    }

    /// Whether every translation was dropped after a failure (the device
    /// cannot run again).
    pub fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }

    fn count_written(&self, msg: &IotlbMsg, start: Instant) {
        match msg.kind() {
            Ok(IotlbType::Update) => self.stats.updates.bump(),
            Ok(IotlbType::Invalidate) => self.stats.invalidations.bump(),
            _ => {}
        }
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.acked.bump();
        self.stats.rtt_total_ns.add(ns);
        self.stats.rtt_max_ns.max(ns);
    }

    /// Empty the kernel's IOTLB for good; true if it is empty now.
    fn drop_everything(&self) -> bool {
        if self.dropped.load(Ordering::Acquire) {
            return true;
        }
        match (self.drop_all)() {
            Ok(()) => {
                self.dropped.store(true, Ordering::Release);
                true
            }
            Err(e) => {
                log::error!(
                    "vhost-net: dropping the kernel's IOTLB (VHOST_RESET_OWNER) failed: {e}"
                );
                false
            }
        }
    }
}

impl IotlbChannel for VhostFdChannel {
    fn send_iotlb(&self, msg: &IotlbMsg, _need_reply: bool) -> Result<(), ChannelError> {
        if self.dropped.load(Ordering::Acquire) {
            return Err(ChannelError::Broken);
        }
        let start = Instant::now();
        match self.io.write_msg(msg) {
            Ok(()) => {
                self.count_written(msg, start);
                Ok(())
            }
            Err(e) => {
                self.stats.failures.bump();
                let invalidate = msg.kind() == Ok(IotlbType::Invalidate);
                log::error!(
                    "vhost-net: the kernel refused IOTLB {:?} {:#x}+{:#x}: {e}",
                    msg.kind(),
                    msg.iova,
                    msg.size
                );
                if invalidate && self.drop_everything() {
                    log::error!("vhost-net: every kernel translation of the device was dropped; the device stops");
                    return Err(ChannelError::Broken);
                }
                Err(channel_error(e))
            }
        }
    }

    fn close(&self) {
        if self.drop_everything() {
            log::error!("vhost-net: closed on request; every kernel translation was dropped");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vhost_kernel::msg::KernelMsg;
    use crate::vhost_user::wire::IotlbPerm;
    use std::os::fd::RawFd;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// A kernel that records writes and refuses the ones `refuse` selects.
    struct FakeKernel {
        written: Mutex<Vec<IotlbMsg>>,
        refuse: fn(&IotlbMsg) -> bool,
    }

    impl IotlbIo for FakeKernel {
        fn read_msg(&self) -> Result<Option<KernelMsg>, IotlbIoError> {
            Ok(None)
        }
        fn write_msg(&self, msg: &IotlbMsg) -> Result<(), IotlbIoError> {
            if (self.refuse)(msg) {
                return Err(IotlbIoError::Io(io::Error::from_raw_os_error(libc::EFAULT)));
            }
            self.written.lock().unwrap().push(*msg);
            Ok(())
        }
        fn poll_fd(&self) -> RawFd {
            -1
        }
    }

    fn channel(
        refuse: fn(&IotlbMsg) -> bool,
        reset_ok: bool,
    ) -> (VhostFdChannel, Arc<FakeKernel>, Arc<AtomicUsize>) {
        let k = Arc::new(FakeKernel {
            written: Mutex::new(Vec::new()),
            refuse,
        });
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        let drop_all: DropAll = Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
            match reset_ok {
                true => Ok(()),
                false => Err(io::Error::from_raw_os_error(libc::EPERM)),
            }
        });
        (VhostFdChannel::new(k.clone(), drop_all), k, resets)
    }

    #[test]
    fn a_written_message_is_acked_and_counted() {
        let (ch, k, resets) = channel(|_| false, true);
        let up = IotlbMsg::update(0x1000, 0x1000, 0x7000, IotlbPerm::ReadWrite);
        ch.send_iotlb(&up, true).unwrap();
        ch.send_iotlb(&IotlbMsg::invalidate(0x1000, 0x1000), false)
            .unwrap();
        assert_eq!(k.written.lock().unwrap().len(), 2);
        let s = ch.stats();
        assert_eq!(
            (s.updates, s.invalidations, s.acked, s.failures),
            (1, 1, 2, 0)
        );
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_refused_update_is_an_error_and_nothing_is_dropped() {
        let (ch, _k, resets) = channel(|m| m.kind() == Ok(IotlbType::Update), true);
        let up = IotlbMsg::update(0x1000, 0x1000, 0x7000, IotlbPerm::ReadWrite);
        assert!(matches!(ch.send_iotlb(&up, true), Err(ChannelError::Io(_))));
        assert_eq!((ch.stats().failures, resets.load(Ordering::SeqCst)), (1, 0));
        assert!(!ch.is_dropped());
    }

    #[test]
    fn a_refused_invalidate_drops_every_translation_and_stops_the_channel() {
        let (ch, k, resets) = channel(|m| m.kind() == Ok(IotlbType::Invalidate), true);
        let inv = IotlbMsg::invalidate(0x1000, 0x1000);
        assert!(matches!(
            ch.send_iotlb(&inv, true),
            Err(ChannelError::Broken)
        ));
        assert!(ch.is_dropped());
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        let up = IotlbMsg::update(0x1000, 0x1000, 0x7000, IotlbPerm::ReadWrite);
        assert!(matches!(
            ch.send_iotlb(&up, true),
            Err(ChannelError::Broken)
        ));
        assert!(
            k.written.lock().unwrap().is_empty(),
            "nothing sent after the drop"
        );
    }

    #[test]
    fn when_the_drop_fails_too_the_invalidate_error_is_reported_as_is() {
        let (ch, _k, resets) = channel(|m| m.kind() == Ok(IotlbType::Invalidate), false);
        let inv = IotlbMsg::invalidate(0x1000, 0x1000);
        assert!(matches!(
            ch.send_iotlb(&inv, true),
            Err(ChannelError::Io(_))
        ));
        assert!(!ch.is_dropped(), "the bridge must keep its record");
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn close_drops_every_translation_once() {
        let (ch, _k, resets) = channel(|_| false, true);
        ch.close();
        ch.close();
        assert!(ch.is_dropped());
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }
}
