//! The IOTLB thread of a vhost-kernel device behind a vIOMMU: reads the
//! kernel's messages from the vhost fd and answers MISS through the same
//! [`MissHandler`] as the vhost-user back-end channel (the IOTLB bridge,
//! whose UPDATE then goes back through the vhost fd).
//!
//! Kernel semantics (Linux `drivers/vhost/vhost.c`) this follows:
//!
//! * A MISS is queued when a virtqueue needs a translation it does not
//!   have (ring or buffer). The virtqueue stops right there. Reading the
//!   MISS moves it to the kernel's pending list; an UPDATE covering its IOVA
//!   removes it and re-queues the virtqueue's work (`vhost_iotlb_notify_vq`).
//! * A MISS has no ack and no timeout. One that never gets an UPDATE (iovmm
//!   refuses it: not mapped, or not with that access) leaves the virtqueue
//!   stopped until the guest kicks it again; then the kernel translates
//!   again and queues a new MISS, which is refused again (and reported to
//!   the guest as a DMA fault again). The pending entries are freed when the
//!   device is released. So a refused miss stalls that queue, it never lets
//!   the device touch the memory.
//! * An UPDATE with the wrong permission does not help: the kernel checks
//!   the entry's permission on every access (`-EPERM` fails the descriptor).
//! * ACCESS_FAIL is defined by the UAPI but vhost-net never sends it; if it
//!   comes it is counted and logged (rate-limited).
//!
//! A malformed message from the fd (short, oversized, wrong type or ASID,
//! unknown IOTLB type or permission) ends the thread with a typed
//! [`ServerError`] recorded on the device: no miss is answered any more, so
//! the device's queues stall; iovmm keeps running.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use iommu::ratelimit::RateLimit;
use iommu::sync::{lock, wait_timeout_while};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::io::{IotlbIo, IotlbIoError};
use super::msg::KernelMsg;
use crate::sys::{poll_fds, PollFd};
use crate::thread::{self, StoppableThread, ThreadHook, ThreadKind};
use crate::vhost_user::backend_req::TICK;
use crate::vhost_user::miss::{MissError, MissHandler, RefusedRequest};
use crate::vhost_user::stats::counters;
#[cfg(test)]
use crate::vhost_user::wire::IotlbMsg;
use crate::vhost_user::wire::{IotlbPerm, IotlbType};

/// Most messages handled per wake-up before the tick is checked again.
const MAX_BATCH: usize = 64;

/// Why the IOTLB thread stopped.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The device stopped it (reset or teardown).
    #[error("stopped by the device")]
    Stopped,
    /// The kernel sent a message that is not a valid `vhost_msg_v2`.
    #[error("{label}: malformed IOTLB message from the vhost fd; no further miss is answered")]
    Malformed {
        /// The device.
        label: String,
        /// What was wrong.
        #[source]
        source: IotlbIoError,
    },
    /// Reading the vhost fd failed.
    #[error("{label}: reading the vhost fd failed; no further miss is answered")]
    Read {
        /// The device.
        label: String,
        /// Cause.
        #[source]
        source: IotlbIoError,
    },
    /// Waiting for the vhost fd failed.
    #[error("{label}: polling the vhost fd failed")]
    Poll {
        /// The device.
        label: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The thread could not enter its sandbox.
    #[error("the vhost-net IOTLB thread could not enter its sandbox")]
    Sandbox,
}

counters! {
    /// Counters of one IOTLB thread (what the bridge does not count).
    ServerCounters =>
    /// A copy of [`ServerCounters`].
    ServerStats {
        /// Messages read from the vhost fd.
        messages,
        /// Malformed messages (the first one stops the thread).
        malformed,
        /// Valid messages of a type only the front end sends.
        unexpected,
    }
}

/// What the thread did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// A miss; whether an UPDATE was written.
    Miss {
        /// The UPDATE was written (the kernel applied it).
        ok: bool,
    },
    /// An ACCESS_FAIL report.
    AccessFail,
    /// A message type the kernel should not send (counted, logged).
    Unexpected,
}

/// Serves one vhost fd's IOTLB messages.
pub struct IotlbServer {
    io: Arc<dyn IotlbIo>,
    handler: Arc<dyn MissHandler>,
    counters: Arc<ServerCounters>,
    label: String,
    fault_log: RateLimit,
    other_log: RateLimit,
    failure_slot: Option<Arc<Mutex<Option<String>>>>,
}

impl IotlbServer {
    /// Answer `io`'s misses with `handler`; `label` names the device in logs.
    pub fn new(
        io: Arc<dyn IotlbIo>,
        handler: Arc<dyn MissHandler>,
        label: impl Into<String>,
    ) -> Self {
        IotlbServer {
            io,
            handler,
            counters: Arc::default(),
            label: label.into(),
            fault_log: RateLimit::per_second(8),
            other_log: RateLimit::per_second(4),
            failure_slot: None,
        }
    }

    /// Count into `counters` (kept by the device across activations).
    pub fn with_counters(mut self, counters: Arc<ServerCounters>) -> Self {
        self.counters = counters;
        self
    }

    /// Also record why the thread ended on its own in `slot`.
    pub fn with_failure_slot(mut self, slot: Arc<Mutex<Option<String>>>) -> Self {
        self.failure_slot = Some(slot);
        self
    }

    /// The counters (shared with the device's stats).
    pub fn counters(&self) -> Arc<ServerCounters> {
        self.counters.clone()
    }

    /// Read and handle one message; `Ok(None)` if none was queued.
    pub fn serve_one(&mut self) -> Result<Option<Handled>, ServerError> {
        let msg = match self.io.read_msg() {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(source @ IotlbIoError::Malformed(_)) => {
                self.counters.malformed.bump();
                let label = self.label.clone();
                return Err(ServerError::Malformed { label, source });
            }
            Err(source) => {
                let label = self.label.clone();
                return Err(ServerError::Read { label, source });
            }
        };
        self.counters.messages.bump();
        Ok(Some(self.handle(msg)))
    }

    fn handle(&mut self, msg: KernelMsg) -> Handled {
        let m = match msg {
            KernelMsg::Iotlb(m) => m,
            KernelMsg::Batch(kind) => return self.unexpected(u32::from(kind)),
        };
        // decode_v2 validated the permission.
        let perm = m.permission().unwrap_or(IotlbPerm::No);
        match m.kind() {
            Ok(IotlbType::Miss) => self.miss(m.iova, perm),
            Ok(IotlbType::AccessFail) => {
                self.handler.on_access_fail(m.iova, perm);
                Handled::AccessFail
            }
            _ => self.unexpected(u32::from(m.msg_type)),
        }
    }

    fn miss(&mut self, iova: u64, perm: IotlbPerm) -> Handled {
        match self.handler.answer_miss(iova, perm) {
            Ok(_) => Handled::Miss { ok: true },
            Err(e) => {
                self.log_refused(iova, perm, &e);
                Handled::Miss { ok: false }
            }
        }
    }

    fn log_refused(&mut self, iova: u64, perm: IotlbPerm, e: &MissError) {
        let label = &self.label;
        if e.is_dma_fault() {
            iommu::warn_limited!(
                self.fault_log,
                "{label}: guest/device DMA fault: the kernel's IOTLB miss at IOVA {iova:#x} for \
                 {perm:?} access was refused: {e}. The virtqueue stays stopped until the guest \
                 kicks it again"
            );
        } else {
            iommu::debug_limited!(
                self.other_log,
                "{label}: IOTLB miss at IOVA {iova:#x} ({perm:?}) refused: {e}"
            );
        }
    }

    fn unexpected(&mut self, kind: u32) -> Handled {
        self.counters.unexpected.bump();
        self.handler
            .on_refused_request(RefusedRequest::Unsupported(kind));
        let label = &self.label;
        iommu::warn_limited!(
            self.other_log,
            "{label}: the kernel sent IOTLB message type {kind}, which only a front end sends; ignored"
        );
        Handled::Unexpected
    }

    /// Serve until `stop` is signalled or the fd fails; returns why it
    /// ended. Calls [`MissHandler::tick`] every [`TICK`].
    pub fn run(mut self, stop: &EventFd) -> ServerError {
        let mut next_tick = Instant::now() + TICK;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let (fd, stop_fd) = (self.io.poll_fd(), stop);
            let mut fds = [PollFd::readable(&RawFdRef(fd)), PollFd::readable(stop_fd)];
            if let Err(source) = poll_fds(&mut fds, Some(wait)) {
                let label = self.label.clone();
                return ServerError::Poll { label, source };
            }
            if fds[1].fired() {
                return ServerError::Stopped;
            }
            if fds[0].fired() {
                if let Err(e) = self.drain() {
                    return e;
                }
            }
            if Instant::now() >= next_tick {
                self.handler.tick();
                next_tick = Instant::now() + TICK;
            }
        }
    }

    fn drain(&mut self) -> Result<(), ServerError> {
        for _ in 0..MAX_BATCH {
            if self.serve_one()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// Run on a thread named `name`, which first runs `hook`.
    pub fn spawn(self, name: &str, hook: Option<ThreadHook>) -> std::io::Result<IotlbThread> {
        let ended = Arc::new(Ended {
            slot: self.failure_slot.clone(),
            ..Ended::default()
        });
        let e = ended.clone();
        let thread = StoppableThread::spawn(name, move |stop| {
            let why = match thread::enter(hook.as_ref(), ThreadKind::VhostNetIotlb) {
                true => self.run(stop),
                false => ServerError::Sandbox,
            };
            e.finish(why);
        })?;
        Ok(IotlbThread {
            _thread: thread,
            ended,
        })
    }
}

/// A raw fd borrowed for one `poll` (the [`IotlbIo`] owns it).
struct RawFdRef(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// How the thread ended: `None` while it runs, then `Some(failure)`
/// (`None` inside when it was stopped).
#[derive(Default)]
struct Ended {
    state: Mutex<Option<Option<String>>>,
    cv: Condvar,
    /// The device's copy of the failure.
    slot: Option<Arc<Mutex<Option<String>>>>,
}

impl Ended {
    fn finish(&self, why: ServerError) {
        let failure = match why {
            ServerError::Stopped => None,
            other => {
                let text = iommu::error::chain(&other).to_string();
                log::error!("{text}");
                if let Some(slot) = &self.slot {
                    *lock(slot) = Some(text.clone());
                }
                Some(text)
            }
        };
        *lock(&self.state) = Some(failure);
        self.cv.notify_all();
    }
}

/// A running IOTLB thread; stopped and joined on drop.
pub struct IotlbThread {
    ended: Arc<Ended>,
    _thread: StoppableThread,
}

impl IotlbThread {
    /// Why the thread ended on its own (the error chain), if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.ended.state).clone().flatten()
    }

    /// Wait at most `timeout` for the thread to end on its own; true if it did.
    pub fn wait_ended(&self, timeout: Duration) -> bool {
        let g = lock(&self.ended.state);
        let (_g, timed_out) = wait_timeout_while(&self.ended.cv, g, timeout, |s| s.is_none());
        !timed_out
    }

    /// Stop the thread and wait for it (bounded by one poll round).
    pub fn stop(self) {}
}

/// How long a test waits for the thread to notice something.
#[cfg(test)]
const TEST_WAIT: Duration = Duration::from_secs(5);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
