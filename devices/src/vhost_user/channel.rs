//! The front end's side of the main vhost-user socket for IOTLB traffic.
//!
//! [`IotlbChannel`] is the seam the IOMMU glue uses to push UPDATE and
//! INVALIDATE messages. [`MainSocket`] implements it on the real socket and
//! also owns the vhost crate's [`Frontend`] for the same socket, so that every
//! request on the main socket, ours or the crate's, is written and answered
//! under one lock (see the module documentation of `vhost_user` for why).
//! [`MockIotlbChannel`] records messages for tests.

use iommu::sync::lock;
use std::collections::VecDeque;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vmm_sys_util::eventfd::EventFd;

use super::frame::{read_frame_after, write_frame, FirstByte};
use super::stats::counters;
use super::wire::{
    decode_ack, encode_iotlb_frame, IotlbMsg, IotlbType, WireError, VHOST_USER_IOTLB_MSG,
};

/// Default bound on how long the front end waits for a reply-ack.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the IOTLB channels.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The back end answered with a non-zero ack.
    #[error("vhost-user back end refused the message (ack value {0}); its IOTLB may be stale, reset the device")]
    Nack(u64),
    /// No complete reply arrived in time.
    #[error("vhost-user back end did not answer in time; the socket is now closed, reconnect the back end")]
    Timeout,
    /// The peer closed the socket.
    #[error("vhost-user back end disconnected; reconnect it to continue")]
    Disconnected,
    /// The peer sent a frame that does not follow the protocol.
    #[error("vhost-user protocol violation")]
    Protocol(#[from] WireError),
    /// A socket call failed.
    #[error("vhost-user socket I/O failed")]
    Io(#[from] std::io::Error),
    /// An earlier failure left the stream out of sync; nothing more is sent.
    #[error("vhost-user main socket was closed after an earlier failure; reconnect the back end")]
    Broken,
    /// A request issued through the vhost crate's `Frontend` failed.
    #[error("vhost-user request failed")]
    Frontend(#[source] vhost::Error),
}

/// How a busy-polling read wait ended (`--vhost-user ...,poll_us=P`: the back-end request
/// thread waiting for the next request, the main socket waiting for an IOTLB message's ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The socket became readable (or hung up) within the busy-poll window: no wake-up.
    WhileSpinning,
    /// The window passed (or was zero) and the socket became readable in a blocking `poll`.
    AfterBlocking,
    /// The deadline passed first.
    TimedOut,
}

impl Waited {
    /// Whether a read will not block.
    pub fn is_ready(self) -> bool {
        self != Waited::TimedOut
    }
}

/// One busy-polling wait: how it ended and the CPU its busy-poll took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpinWait {
    /// How the wait ended.
    pub waited: Waited,
    /// CPU time the waiting thread spent busy-polling (zero without a window).
    pub spin_cpu: Duration,
}

/// Sends front-end IOTLB messages (UPDATE, INVALIDATE) to a back end.
pub trait IotlbChannel: Send + Sync {
    /// Send `msg` as VHOST_USER_IOTLB_MSG. With `need_reply`, wait for the
    /// reply-ack (bounded by the channel's timeout) and fail on non-zero.
    fn send_iotlb(&self, msg: &IotlbMsg, need_reply: bool) -> Result<(), ChannelError>;

    /// Give up on the back end: close the socket so every later call fails
    /// and the back end sees the disconnect (used when it refused to drop a
    /// translation). The default does nothing.
    fn close(&self) {}

    /// Busy-poll for up to `window` before blocking on an ack (`poll_us`). The default
    /// (transports without such a wait) ignores it.
    fn set_poll_window(&self, window: Duration) {
        let _ = window;
    }

    /// Count a busy-polling wait of another thread serving this back end (the back-end request
    /// thread) with this channel's polling counters. The default ignores it.
    fn record_poll(&self, wait: &SpinWait) {
        let _ = wait;
    }
}

counters! {
    /// Counters of the IOTLB traffic on one main socket.
    IotlbStats =>
    /// A copy of [`IotlbStats`] at one point in time.
    IotlbStatsSnapshot {
        /// UPDATE messages written.
        updates,
        /// INVALIDATE messages written.
        invalidations,
        /// Non-zero acks received.
        nacks,
        /// Timeouts, disconnects and protocol errors.
        failures,
        /// Messages whose ack arrived (zero or not).
        acked,
        /// Sum of ack round-trip times in nanoseconds.
        rtt_total_ns,
        /// Largest ack round-trip time in nanoseconds.
        rtt_max_ns,
        /// Busy-polling waits (`poll_us` > 0; ack waits and the back-end request thread's
        /// waits for the next request) that ended while spinning: wake-ups saved.
        poll_hits,
        /// Busy-polling waits whose window ran out, so the thread blocked after all.
        poll_blocks,
        /// CPU time those waits spent spinning, in nanoseconds: the price of the window.
        poll_spin_ns,
    }
}

impl IotlbStats {
    fn count_sent(&self, msg: &IotlbMsg) {
        match msg.kind() {
            Ok(IotlbType::Update) => self.updates.bump(),
            Ok(IotlbType::Invalidate) => self.invalidations.bump(),
            _ => {}
        }
    }

    fn count_ack(&self, rtt: Duration, value: u64) {
        let ns = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
        self.acked.bump();
        self.rtt_total_ns.add(ns);
        self.rtt_max_ns.max(ns);
        if value != 0 {
            self.nacks.bump();
        }
    }

    fn count_poll(&self, wait: &SpinWait) {
        if wait.spin_cpu.is_zero() && wait.waited != Waited::WhileSpinning {
            return; // no window
        }
        match wait.waited {
            Waited::WhileSpinning => self.poll_hits.bump(),
            Waited::AfterBlocking | Waited::TimedOut => self.poll_blocks.bump(),
        }
        self.poll_spin_ns
            .add(u64::try_from(wait.spin_cpu.as_nanos()).unwrap_or(u64::MAX));
    }
}

struct MainInner {
    frontend: Frontend,
    raw: UnixStream,
}

/// The main vhost-user socket: the crate's [`Frontend`] and our raw IOTLB
/// frames, serialised by one mutex.
///
/// A request and its reply are always exchanged under the lock, so no other
/// request can be interleaved while one waits for its reply (QEMU's
/// "Expected 22 received 40" bug). After a timeout, disconnect or protocol
/// error the stream may be out of sync, so the socket is shut down and every
/// later call fails with [`ChannelError::Broken`].
pub struct MainSocket {
    inner: Mutex<MainInner>,
    broken: AtomicBool,
    timeout: Duration,
    max_queue_num: u64,
    stats: IotlbStats,
    /// Signalled (written) every time the socket is marked broken.
    broken_event: Option<EventFd>,
    /// Busy-poll window of an ack wait, in nanoseconds (0: block at once).
    ack_spin_ns: AtomicU64,
}

impl MainInner {
    fn new(stream: UnixStream, max_queue_num: u64, timeout: Duration) -> std::io::Result<Self> {
        let raw = stream.try_clone()?;
        // Socket options belong to the socket, so they also bound the
        // Frontend's own blocking reads and writes on the same socket.
        raw.set_read_timeout(Some(timeout))?;
        raw.set_write_timeout(Some(timeout))?;
        Ok(MainInner {
            frontend: Frontend::from_stream(stream, max_queue_num),
            raw,
        })
    }
}

impl MainSocket {
    /// Wrap a connected main socket. `timeout` bounds every reply wait and
    /// write on the socket, including those of the crate's `Frontend`.
    pub fn new(
        stream: UnixStream,
        max_queue_num: u64,
        timeout: Duration,
    ) -> Result<Self, ChannelError> {
        Ok(MainSocket {
            inner: Mutex::new(MainInner::new(stream, max_queue_num, timeout)?),
            broken: AtomicBool::new(false),
            timeout,
            max_queue_num,
            stats: IotlbStats::default(),
            broken_event: EventFd::new(libc::EFD_NONBLOCK).ok(),
            ack_spin_ns: AtomicU64::new(0),
        })
    }

    /// Put a new connection in place of the current one (reconnection):
    /// the old stream is closed and the socket is usable again. The caller
    /// makes sure nobody else uses the socket meanwhile (the IOTLB bridge's
    /// link is down and the device's session is not up).
    pub fn replace(&self, stream: UnixStream) -> Result<(), ChannelError> {
        let new = MainInner::new(stream, self.max_queue_num, self.timeout)?;
        let mut inner = lock(&self.inner);
        let _ = inner.raw.shutdown(std::net::Shutdown::Both);
        *inner = new;
        self.broken.store(false, Ordering::Release);
        Ok(())
    }

    /// A duplicate of the current connection, to watch for hang-ups with
    /// `poll` (never read or written).
    pub fn watch_handle(&self) -> Result<UnixStream, ChannelError> {
        let inner = self.inner.lock().map_err(|_| ChannelError::Broken)?;
        Ok(inner.raw.try_clone()?)
    }

    /// An eventfd that becomes readable whenever the socket is marked
    /// broken (`None` if it could not be created).
    pub fn broken_event(&self) -> Option<&EventFd> {
        self.broken_event.as_ref()
    }

    /// The bound on every reply wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lock(&self) -> Result<MutexGuard<'_, MainInner>, ChannelError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(ChannelError::Broken);
        }
        self.inner.lock().map_err(|_| ChannelError::Broken)
    }

    fn mark_broken(&self, inner: &MainInner) {
        self.broken.store(true, Ordering::Release);
        self.stats.failures.bump();
        // Wake any peer and make the stream unusable; errors do not matter.
        let _ = inner.raw.shutdown(std::net::Shutdown::Both);
        if let Some(e) = &self.broken_event {
            // A full counter is still readable; nothing else can fail.
            let _ = e.write(1);
        }
    }

    /// Run `f` with exclusive use of the crate's `Frontend`.
    ///
    /// `f` must not keep a clone of the `Frontend`: requests sent through a
    /// clone would bypass the lock.
    pub fn with_frontend<R>(
        &self,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<R>,
    ) -> Result<R, ChannelError> {
        let mut inner = self.lock()?;
        match f(&mut inner.frontend) {
            Ok(r) => Ok(r),
            Err(e) => {
                if desyncs_stream(&e) {
                    log::error!(
                        "vhost-user main socket failed, closing it: {}",
                        iommu::error::chain(&e)
                    );
                    self.mark_broken(&inner);
                }
                Err(ChannelError::Frontend(e))
            }
        }
    }

    /// Create the back-end request channel: a socketpair whose far end is
    /// sent with VHOST_USER_SET_BACKEND_REQ_FD. Returns our end, to be
    /// served by a `BackendReqServer`.
    pub fn open_backend_channel(&self) -> Result<UnixStream, ChannelError> {
        let (ours, theirs) = UnixStream::pair()?;
        self.with_frontend(|fe| fe.set_backend_request_fd(&theirs))?;
        Ok(ours)
    }

    /// Whether the socket was closed after a failure.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// IOTLB counters of this socket.
    pub fn stats(&self) -> IotlbStatsSnapshot {
        self.stats.snapshot()
    }

    fn exchange(
        &self,
        inner: &MainInner,
        msg: &IotlbMsg,
        need_reply: bool,
    ) -> Result<(), ChannelError> {
        let frame = encode_iotlb_frame(VHOST_USER_IOTLB_MSG, msg, need_reply);
        let start = Instant::now();
        write_frame(&inner.raw, &frame)?;
        self.stats.count_sent(msg);
        if !need_reply {
            return Ok(());
        }
        let deadline = start.checked_add(self.timeout);
        let first = match self.ack_spin_ns.load(Ordering::Relaxed) {
            0 => FirstByte::Block,
            ns => FirstByte::Spin(Duration::from_nanos(ns)),
        };
        let (hdr, payload, wait) = read_frame_after(&inner.raw, deadline, self.timeout, first)?;
        self.stats.count_poll(&wait);
        let value = decode_ack(&hdr, &payload, VHOST_USER_IOTLB_MSG)?;
        self.stats.count_ack(start.elapsed(), value);
        if value != 0 {
            return Err(ChannelError::Nack(value));
        }
        Ok(())
    }
}

impl IotlbChannel for MainSocket {
    fn send_iotlb(&self, msg: &IotlbMsg, need_reply: bool) -> Result<(), ChannelError> {
        let inner = self.lock()?;
        let res = self.exchange(&inner, msg, need_reply);
        if let Err(e) = &res {
            if !matches!(e, ChannelError::Nack(_)) {
                log::error!(
                    "vhost-user IOTLB message failed, closing the main socket: {}",
                    iommu::error::chain(&e)
                );
                self.mark_broken(&inner);
            }
        }
        res
    }

    fn set_poll_window(&self, window: Duration) {
        let ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        self.ack_spin_ns.store(ns, Ordering::Relaxed);
    }

    fn record_poll(&self, wait: &SpinWait) {
        self.stats.count_poll(wait);
    }

    fn close(&self) {
        if let Ok(inner) = self.lock() {
            log::error!("closing the vhost-user main socket on request");
            self.mark_broken(&inner);
        }
    }
}

/// Whether a vhost crate error may have left a partial frame on the stream.
fn desyncs_stream(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as U;
    match e {
        vhost::Error::VhostUserProtocol(u) => matches!(
            u,
            U::PartialMessage
                | U::InvalidMessage
                | U::Disconnected
                | U::OversizedMsg
                | U::IncorrectFds
                | U::SocketError(_)
                | U::SocketBroken(_)
                | U::SocketRetry(_)
        ),
        vhost::Error::IOError(_) => true,
        _ => false,
    }
}

/// What the mock answers to the next message that asks for a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MockReply {
    /// Ack with zero.
    Ack,
    /// Ack with this non-zero value.
    Nack(u64),
    /// Behave as if no ack arrived in time.
    Timeout,
    /// Behave as if the back end went away.
    Disconnected,
}

/// An [`IotlbChannel`] that records every message and answers from a script
/// (default: ack). For unit tests of code that drives the IOTLB.
#[derive(Debug, Default)]
pub struct MockIotlbChannel {
    sent: Mutex<Vec<(IotlbMsg, bool)>>,
    script: Mutex<VecDeque<MockReply>>,
    closed: AtomicBool,
}

impl MockIotlbChannel {
    /// A mock that acks everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queue the answers for the next messages; once exhausted, ack.
    pub fn script(&self, replies: &[MockReply]) {
        if let Ok(mut s) = self.script.lock() {
            s.extend(replies.iter().copied());
        }
    }

    /// Every message sent so far, with its `need_reply` flag.
    pub fn sent(&self) -> Vec<(IotlbMsg, bool)> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Every message sent so far, forgetting them (the next `sent` starts
    /// empty).
    pub fn take_sent(&self) -> Vec<(IotlbMsg, bool)> {
        self.sent
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    /// Whether `close` was called (later sends fail with `Broken`).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

impl IotlbChannel for MockIotlbChannel {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn send_iotlb(&self, msg: &IotlbMsg, need_reply: bool) -> Result<(), ChannelError> {
        if self.is_closed() {
            return Err(ChannelError::Broken);
        }
        self.sent
            .lock()
            .map_err(|_| ChannelError::Broken)?
            .push((*msg, need_reply));
        let reply = self
            .script
            .lock()
            .map_err(|_| ChannelError::Broken)?
            .pop_front()
            .unwrap_or(MockReply::Ack);
        match reply {
            MockReply::Ack => Ok(()),
            MockReply::Nack(v) if need_reply => Err(ChannelError::Nack(v)),
            MockReply::Nack(_) => Ok(()),
            MockReply::Timeout => Err(ChannelError::Timeout),
            MockReply::Disconnected => Err(ChannelError::Disconnected),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vhost_user::frame::read_frame;
    use crate::vhost_user::wire::{encode_ack, Header, IotlbPerm, IOTLB_FRAME_SIZE};
    use std::thread;
    use vhost::VhostBackend;

    fn pair(timeout: Duration) -> (MainSocket, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (MainSocket::new(a, 2, timeout).unwrap(), b)
    }

    fn read_iotlb(peer: &UnixStream) -> (Header, IotlbMsg) {
        let (hdr, payload) = read_frame(peer, None, Duration::from_secs(2)).unwrap();
        (hdr, IotlbMsg::decode(hdr.request, &payload).unwrap())
    }

    #[test]
    fn update_round_trips_over_a_socketpair_with_ack() {
        let (main, peer) = pair(Duration::from_secs(2));
        let msg = IotlbMsg::update(0x10_0000, 0x1000, 0x7f12_3400_0000, IotlbPerm::ReadOnly);
        let backend = thread::spawn(move || {
            let (hdr, got) = read_iotlb(&peer);
            write_frame(&peer, &encode_ack(hdr.request, 0)).unwrap();
            (hdr, got)
        });
        main.send_iotlb(&msg, true).unwrap();
        let (hdr, got) = backend.join().unwrap();
        assert_eq!(hdr, Header::request(22, 32, true));
        assert_eq!(got, msg);
        let s = main.stats();
        assert_eq!((s.updates, s.acked, s.nacks), (1, 1, 0));
    }

    #[test]
    fn a_poll_window_takes_the_ack_while_spinning_and_counts_it() {
        let (main, peer) = pair(Duration::from_secs(2));
        // An endless window: the ack can only be taken while spinning.
        main.set_poll_window(Duration::MAX);
        let backend = thread::spawn(move || {
            let (hdr, _) = read_iotlb(&peer);
            write_frame(&peer, &encode_ack(hdr.request, 0)).unwrap();
            peer
        });
        main.send_iotlb(&IotlbMsg::invalidate(0, 1), true).unwrap();
        let _peer = backend.join().unwrap();
        let s = main.stats();
        assert_eq!((s.acked, s.poll_hits, s.poll_blocks), (1, 1, 0));
        // Another thread's wait (the back-end request thread's) counts with the same counters.
        main.record_poll(&SpinWait {
            waited: Waited::AfterBlocking,
            spin_cpu: Duration::from_nanos(5),
        });
        let t = main.stats();
        assert_eq!((t.poll_hits, t.poll_blocks), (1, 1));
        assert!(t.poll_spin_ns >= s.poll_spin_ns + 5);
        // Without a window nothing is counted.
        main.set_poll_window(Duration::ZERO);
        main.record_poll(&SpinWait {
            waited: Waited::AfterBlocking,
            spin_cpu: Duration::ZERO,
        });
        assert_eq!(main.stats().poll_blocks, 1);
    }

    #[test]
    fn message_without_need_reply_does_not_wait() {
        let (main, peer) = pair(Duration::from_millis(50));
        main.send_iotlb(&IotlbMsg::invalidate(0, 4096), false)
            .unwrap();
        let (hdr, got) = read_iotlb(&peer);
        assert!(!hdr.need_reply());
        assert_eq!(got, IotlbMsg::invalidate(0, 4096));
        assert_eq!(main.stats().invalidations, 1);
    }

    #[test]
    fn nonzero_ack_is_a_nack_error_and_keeps_the_socket() {
        let (main, peer) = pair(Duration::from_secs(2));
        let backend = thread::spawn(move || {
            for value in [3u64, 0] {
                let (hdr, _) = read_iotlb(&peer);
                write_frame(&peer, &encode_ack(hdr.request, value)).unwrap();
            }
        });
        let msg = IotlbMsg::invalidate(0x1000, 0x1000);
        assert!(matches!(
            main.send_iotlb(&msg, true),
            Err(ChannelError::Nack(3))
        ));
        assert!(!main.is_broken());
        main.send_iotlb(&msg, true).unwrap();
        backend.join().unwrap();
        assert_eq!(main.stats().nacks, 1);
    }

    #[test]
    fn missing_ack_times_out_and_breaks_the_socket() {
        let (main, peer) = pair(Duration::from_millis(40));
        let start = Instant::now();
        let err = main
            .send_iotlb(&IotlbMsg::invalidate(0, 1), true)
            .unwrap_err();
        assert!(matches!(err, ChannelError::Timeout));
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(main.is_broken());
        assert!(matches!(
            main.send_iotlb(&IotlbMsg::invalidate(0, 1), true),
            Err(ChannelError::Broken)
        ));
        // The peer sees the frame, then end of stream after the shutdown.
        let mut buf = [0u8; IOTLB_FRAME_SIZE];
        crate::vhost_user::frame::read_exact_until(&peer, &mut buf, None).unwrap();
        assert!(matches!(
            read_frame(&peer, None, Duration::from_secs(1)),
            Err(ChannelError::Disconnected)
        ));
    }

    #[test]
    fn disconnect_while_waiting_is_reported() {
        let (main, peer) = pair(Duration::from_secs(2));
        let backend = thread::spawn(move || {
            let _ = read_iotlb(&peer);
            drop(peer);
        });
        let err = main
            .send_iotlb(&IotlbMsg::invalidate(0, 1), true)
            .unwrap_err();
        backend.join().unwrap();
        assert!(matches!(err, ChannelError::Disconnected));
        assert!(main.is_broken());
    }

    #[test]
    fn reply_to_another_request_is_a_protocol_error() {
        let (main, peer) = pair(Duration::from_secs(2));
        let backend = thread::spawn(move || {
            let _ = read_iotlb(&peer);
            write_frame(&peer, &encode_ack(40, 0)).unwrap();
        });
        let err = main
            .send_iotlb(&IotlbMsg::invalidate(0, 1), true)
            .unwrap_err();
        backend.join().unwrap();
        assert!(matches!(
            err,
            ChannelError::Protocol(WireError::ReplyMismatch {
                got: 40,
                expected: 22
            })
        ));
    }

    #[test]
    fn frontend_requests_share_the_socket_and_lock() {
        let (main, peer) = pair(Duration::from_secs(2));
        let backend = thread::spawn(move || {
            // GET_FEATURES (1) then our IOTLB message, answered in order.
            let (hdr, payload) = read_frame(&peer, None, Duration::from_secs(2)).unwrap();
            assert_eq!((hdr.request, payload.len()), (1, 0));
            let reply = crate::vhost_user::wire::encode_u64_frame(Header::reply(1, 8), 0x1234);
            write_frame(&peer, &reply).unwrap();
            let (hdr, _) = read_iotlb(&peer);
            write_frame(&peer, &encode_ack(hdr.request, 0)).unwrap();
        });
        let features = main.with_frontend(|fe| fe.get_features()).unwrap();
        assert_eq!(features, 0x1234);
        main.send_iotlb(&IotlbMsg::invalidate(0, 1), true).unwrap();
        backend.join().unwrap();
    }

    #[test]
    fn frontend_socket_failure_breaks_the_channel() {
        let (main, peer) = pair(Duration::from_secs(2));
        drop(peer);
        assert!(matches!(
            main.with_frontend(|fe| fe.get_features()),
            Err(ChannelError::Frontend(_))
        ));
        assert!(main.is_broken());
        assert!(matches!(
            main.send_iotlb(&IotlbMsg::invalidate(0, 1), false),
            Err(ChannelError::Broken)
        ));
    }

    #[test]
    fn mock_records_and_follows_its_script() {
        let mock = MockIotlbChannel::new();
        mock.script(&[MockReply::Nack(2), MockReply::Timeout]);
        let m = IotlbMsg::invalidate(0, 1);
        assert!(matches!(
            mock.send_iotlb(&m, true),
            Err(ChannelError::Nack(2))
        ));
        assert!(matches!(
            mock.send_iotlb(&m, true),
            Err(ChannelError::Timeout)
        ));
        mock.send_iotlb(&m, false).unwrap();
        assert_eq!(mock.sent(), vec![(m, true), (m, true), (m, false)]);
    }
}
