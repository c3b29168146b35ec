//! Server for the back-end request channel (the socketpair end the front end
//! keeps after VHOST_USER_SET_BACKEND_REQ_FD).
//!
//! It reads BACKEND_IOTLB_MSG requests, asks a [`MissHandler`] for the
//! translation, sends the UPDATE on the main socket through an
//! [`IotlbChannel`](super::channel::IotlbChannel) (waiting for that UPDATE's own ack), and only then acks
//! the miss if the back end set NEED_REPLY. It never reads the main socket
//! outside such an exchange, so it cannot steal another request's reply.
//!
//! Unknown or unsupported requests get a non-zero reply when NEED_REPLY was
//! set, else a log line. A malformed frame (bad version, reserved flags,
//! oversized, wrong IOTLB size, a reply where a request belongs, a truncated
//! frame) closes the channel with a log line.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use vhost::vhost_user::message::BackendReq;

use super::channel::ChannelError;
use super::frame::{read_frame_after, wait_readable_spinning, write_frame, FirstByte};
use super::miss::{MissError, MissHandler, RefusedRequest};
use super::wire::{backend_request, encode_ack, Header, IotlbMsg, IotlbPerm, IotlbType, WireError};
use crate::thread::{self, ThreadHook, ThreadKind};
use iommu::ratelimit::RateLimit;
use iommu::warn_limited;

/// Bound on how long the rest of a frame may take once its first byte came.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(1);

/// Most refused misses, ACCESS_FAIL reports and unsupported requests one channel may send per
/// second. Past it the rest of that second's requests are refused (ack 1) without being
/// translated, reported to the guest as faults or logged: a flood costs the VMM a bounded
/// amount of work, log and guest fault traffic. A well-behaved back end misses only on IOVAs
/// the guest mapped, which are not counted.
pub const MAX_BAD_REQUESTS_PER_SEC: u64 = 256;

/// Most refused-miss faults logged one by one per second; the rest of the
/// second's are counted and summed up in one line when the next window
/// opens.
pub const MAX_FAULT_LOGS_PER_SEC: u64 = 8;

/// How often the server calls [`MissHandler::tick`] (the stall check).
pub const TICK: Duration = Duration::from_millis(500);

/// Why the back-end request channel was closed.
#[derive(Debug, Error)]
pub enum BackendReqError {
    /// The back end sent a frame that violates the protocol.
    #[error("malformed message on the vhost-user back-end channel; channel closed")]
    Malformed(#[source] WireError),
    /// The back end sent a reply where only requests are allowed.
    #[error("unexpected reply (request {0}) on the vhost-user back-end channel; channel closed")]
    UnexpectedReply(u32),
    /// Reading or writing the channel failed (including end of stream).
    #[error("vhost-user back-end channel closed")]
    Channel(#[source] ChannelError),
}

impl From<ChannelError> for BackendReqError {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::Protocol(w) => BackendReqError::Malformed(w),
            other => BackendReqError::Channel(other),
        }
    }
}

/// What [`BackendReqServer::serve_one`] did with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// A miss; `ok` is whether an UPDATE was sent and acked.
    Miss {
        /// Whether the miss was answered with an UPDATE.
        ok: bool,
    },
    /// An ACCESS_FAIL report.
    AccessFail,
    /// A request this front end does not handle (code given).
    Unsupported(u32),
    /// A request refused unprocessed: the back end exceeded [`MAX_BAD_REQUESTS_PER_SEC`].
    Throttled,
}

/// Counts bad requests per one-second window and limits the log lines the
/// back end can cause.
struct Throttle {
    window: Instant,
    bad: u64,
    /// Lines about the back end's refused misses and bad requests.
    log: RateLimit,
}

impl Throttle {
    fn new() -> Self {
        Throttle {
            window: Instant::now(),
            bad: 0,
            log: RateLimit::per_second(MAX_FAULT_LOGS_PER_SEC as u32),
        }
    }

    /// Whether this window's budget is used up (starting a new window when due).
    fn exhausted(&mut self, label: &str) -> bool {
        self.exhausted_at(label, Instant::now())
    }

    fn exhausted_at(&mut self, label: &str, now: Instant) -> bool {
        let unlogged = self.log.roll_at(now);
        if unlogged > 0 {
            log::warn!("{label}: {unlogged} more lines about the back end's refused misses or bad requests were not logged");
        }
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            if self.bad > MAX_BAD_REQUESTS_PER_SEC {
                log::warn!(
                    "{label}: the back end sent {} bad requests in one second; {} were refused unprocessed",
                    self.bad,
                    self.bad - MAX_BAD_REQUESTS_PER_SEC
                );
            }
            self.window = now;
            self.bad = 0;
        }
        self.bad >= MAX_BAD_REQUESTS_PER_SEC
    }

    fn record_bad(&mut self, label: &str) {
        self.bad += 1;
        if self.bad == MAX_BAD_REQUESTS_PER_SEC {
            log::warn!(
                "{label}: the back end sent {MAX_BAD_REQUESTS_PER_SEC} refused misses or bad requests \
                 within a second; refusing its requests unprocessed for the rest of the second \
                 (check the back end: it uses IOVAs the guest never mapped)"
            );
        }
    }
}

/// The log level and line for a refused miss at `iova` for `perm`.
///
/// MISS carries no ack in DPDK (it is sent without NEED_REPLY), so a back
/// end whose miss is refused keeps its pending entry for `(iova, perm)` and
/// never asks again: the queue waiting for it stops. A refusal that is the
/// guest's or device's fault (unmapped, forbidden, not guest RAM) is a
/// warning naming the device, the IOVA and the access; one caused by the
/// device stopping or the back end going away is informational.
pub fn refusal_log(label: &str, iova: u64, perm: IotlbPerm, e: &MissError) -> (log::Level, String) {
    if e.is_dma_fault() {
        let line = format!(
            "{label}: guest/device DMA fault: the back end's IOTLB miss at IOVA {iova:#x} for \
             {perm:?} access was refused: {e}. MISS has no ack, so the back end keeps waiting \
             for this translation (a DPDK queue using it stops)"
        );
        (log::Level::Warn, line)
    } else {
        let line = format!("{label}: IOTLB miss at IOVA {iova:#x} ({perm:?}) refused: {e}");
        (log::Level::Info, line)
    }
}

/// Serves one back-end request channel.
pub struct BackendReqServer {
    stream: UnixStream,
    handler: Arc<dyn MissHandler>,
    throttle: Throttle,
    /// Names the device in log lines.
    label: String,
}

impl BackendReqServer {
    /// Serve `stream`, answering misses with `handler` (which sends the
    /// UPDATEs on the device's main socket).
    pub fn new(stream: UnixStream, handler: Arc<dyn MissHandler>) -> Self {
        BackendReqServer {
            stream,
            handler,
            throttle: Throttle::new(),
            label: "vhost-user device".into(),
        }
    }

    /// Name the device in log lines (e.g. "vhost-user-net 0000:00:03.0").
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Block for one request, handle it and reply if asked to.
    ///
    /// An error means the channel must be closed.
    pub fn serve_one(&mut self) -> Result<Served, BackendReqError> {
        self.serve_next(FirstByte::Block)
    }

    /// [`BackendReqServer::serve_one`], waiting for the request's first byte as `first` says.
    fn serve_next(&mut self, first: FirstByte) -> Result<Served, BackendReqError> {
        let (hdr, payload, _) = read_frame_after(&self.stream, None, FRAME_TIMEOUT, first)?;
        if hdr.is_reply() {
            return Err(BackendReqError::UnexpectedReply(hdr.request));
        }
        let (served, value) = match backend_request(hdr.request) {
            _ if self.throttle.exhausted(&self.label) => {
                self.handler.on_refused_request(RefusedRequest::Throttled);
                (Served::Throttled, 1)
            }
            Ok(BackendReq::IOTLB_MSG) => self.iotlb(&hdr, &payload)?,
            Ok(other) => {
                warn_limited!(
                    &mut self.throttle.log,
                    "{}: the back end sent unsupported request {other:?}",
                    self.label
                );
                (Served::Unsupported(hdr.request), 1)
            }
            Err(e) => {
                warn_limited!(
                    &mut self.throttle.log,
                    "{}: back-end channel: {e}",
                    self.label
                );
                (Served::Unsupported(hdr.request), 1)
            }
        };
        if let Served::Unsupported(code) = served {
            self.handler
                .on_refused_request(RefusedRequest::Unsupported(code));
        }
        if matches!(
            served,
            Served::Unsupported(_)
                | Served::AccessFail
                | Served::Miss { ok: false }
                | Served::Throttled
        ) {
            self.throttle.record_bad(&self.label);
        }
        if hdr.need_reply() {
            write_frame(&self.stream, &encode_ack(hdr.request, value))?;
        }
        Ok(served)
    }

    fn iotlb(&mut self, hdr: &Header, payload: &[u8]) -> Result<(Served, u64), BackendReqError> {
        let msg = match IotlbMsg::decode(hdr.request, payload) {
            Ok(m) => m,
            Err(e @ WireError::SizeMismatch { .. }) => return Err(BackendReqError::Malformed(e)),
            Err(e) => {
                warn_limited!(
                    &mut self.throttle.log,
                    "{}: the back end sent an invalid IOTLB message: {e}",
                    self.label
                );
                return Ok((Served::Unsupported(hdr.request), 1));
            }
        };
        // decode() validated both fields.
        let perm = msg.permission().unwrap_or(IotlbPerm::No);
        match msg.kind() {
            Ok(IotlbType::Miss) => {
                let ok = self.miss(msg.iova, perm);
                Ok((Served::Miss { ok }, u64::from(!ok)))
            }
            Ok(IotlbType::AccessFail) => {
                self.handler.on_access_fail(msg.iova, perm);
                Ok((Served::AccessFail, 0))
            }
            other => {
                warn_limited!(
                    &mut self.throttle.log,
                    "{}: the back end sent IOTLB type {other:?}, which only a front end may send",
                    self.label
                );
                Ok((Served::Unsupported(hdr.request), 1))
            }
        }
    }

    /// Answer a miss: UPDATE on the main socket (acked) before returning true.
    fn miss(&mut self, iova: u64, perm: IotlbPerm) -> bool {
        let res = self.handler.answer_miss(iova, perm);
        if let Err(e) = &res {
            self.log_refused(iova, perm, e);
        }
        res.is_ok()
    }

    /// A refused miss, logged by [`refusal_log`]: DMA faults loudly (at
    /// most [`MAX_FAULT_LOGS_PER_SEC`] lines a second), the rest quietly.
    fn log_refused(&mut self, iova: u64, perm: IotlbPerm, e: &MissError) {
        let (level, line) = refusal_log(&self.label, iova, perm, e);
        if level == log::Level::Warn {
            warn_limited!(&mut self.throttle.log, "{line}");
        } else {
            log::log!(level, "{line}");
        }
    }

    /// Serve until the channel fails or is closed; returns the reason.
    /// Calls [`MissHandler::tick`] every [`TICK`] (between requests).
    pub fn run(mut self) -> BackendReqError {
        let mut next_tick = Instant::now() + TICK;
        loop {
            // With a poll window (`poll_us`), spin for the next request first: after a miss
            // another one often follows within microseconds, and taking it without a wake-up
            // saves most of a round trip.
            let spin = self.handler.poll_window();
            let ready = wait_readable_spinning(&self.stream, Some(next_tick), spin)
                .map_err(BackendReqError::from);
            let served = match ready {
                Ok(w) => {
                    if !spin.is_zero() {
                        self.handler.on_poll(&w);
                    }
                    if w.waited.is_ready() {
                        self.serve_next(FirstByte::Ready).map(|_| ())
                    } else {
                        Ok(())
                    }
                }
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                return self.close(e);
            }
            if Instant::now() >= next_tick {
                self.handler.tick();
                next_tick = Instant::now() + TICK;
            }
        }
    }

    fn close(self, e: BackendReqError) -> BackendReqError {
        match &e {
            BackendReqError::Channel(ChannelError::Disconnected) => {
                log::info!("{}: back-end channel closed by the peer", self.label)
            }
            other => log::error!("{}: {}", self.label, iommu::error::chain(other)),
        }
        // Close for the peer now: the thread handle keeps a clone of the socket, so
        // dropping ours alone would leave the back end writing into a dead channel.
        let _ = self.stream.shutdown(Shutdown::Both);
        e
    }

    /// Run the server on its own thread.
    pub fn spawn(self, name: &str) -> std::io::Result<BackendReqThread> {
        self.spawn_with_hook(name, None)
    }

    /// Like [`BackendReqServer::spawn`]; the thread runs `hook` before it
    /// reads the channel (see [`crate::thread`]).
    pub fn spawn_with_hook(
        self,
        name: &str,
        hook: Option<ThreadHook>,
    ) -> std::io::Result<BackendReqThread> {
        let shutdown = self.stream.try_clone()?;
        let join = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if !thread::enter(hook.as_ref(), ThreadKind::VhostUserReq) {
                    let e = std::io::Error::other("the thread could not enter its sandbox");
                    return BackendReqError::Channel(ChannelError::Io(e));
                }
                self.run()
            })?;
        Ok(BackendReqThread { shutdown, join })
    }
}

/// A running back-end channel thread.
pub struct BackendReqThread {
    shutdown: UnixStream,
    join: JoinHandle<BackendReqError>,
}

impl BackendReqThread {
    /// Whether the thread has exited (channel closed).
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Close the channel and wait for the thread; returns why it ended.
    pub fn stop(self) -> Option<BackendReqError> {
        // Errors only mean the socket is already closed.
        let _ = self.shutdown.shutdown(Shutdown::Both);
        self.join.join().ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vhost_user::channel::{MainSocket, MockIotlbChannel, MockReply, SpinWait, Waited};
    use crate::vhost_user::frame::read_frame;
    use crate::vhost_user::miss::{MissError, TranslatingHandler};
    use crate::vhost_user::wire::{
        decode_ack, encode_iotlb_frame, IOTLB_MSG_SIZE, VHOST_USER_BACKEND_IOTLB_MSG,
    };
    use std::time::Instant;

    const UADDR: u64 = 0x7f00_0000_0000;

    fn translate(iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
        if iova >= 0x10_0000 {
            return Err(MissError::Unmapped { iova });
        }
        if perm == IotlbPerm::WriteOnly {
            return Err(MissError::PermissionDenied { iova, wanted: perm });
        }
        let page = iova & !0xfff;
        Ok(IotlbMsg::update(
            page,
            0x1000,
            UADDR + page,
            IotlbPerm::ReadOnly,
        ))
    }

    fn server(mock: &Arc<MockIotlbChannel>) -> (BackendReqServer, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let handler = TranslatingHandler::new(translate, mock.clone());
        (BackendReqServer::new(ours, Arc::new(handler)), theirs)
    }

    fn send_miss(peer: &UnixStream, iova: u64, perm: IotlbPerm, need_reply: bool) {
        let frame = encode_iotlb_frame(
            VHOST_USER_BACKEND_IOTLB_MSG,
            &IotlbMsg::miss(iova, perm),
            need_reply,
        );
        write_frame(peer, &frame).unwrap();
    }

    fn read_ack(peer: &UnixStream, request: u32) -> u64 {
        let (hdr, payload) = read_frame(peer, None, Duration::from_secs(2)).unwrap();
        decode_ack(&hdr, &payload, request).unwrap()
    }

    #[test]
    fn miss_is_answered_with_update_then_zero_ack() {
        let mock = Arc::new(MockIotlbChannel::new());
        let (mut srv, peer) = server(&mock);
        send_miss(&peer, 0x3456, IotlbPerm::ReadOnly, true);
        assert_eq!(srv.serve_one().unwrap(), Served::Miss { ok: true });
        assert_eq!(read_ack(&peer, 1), 0);
        let update = IotlbMsg::update(0x3000, 0x1000, UADDR + 0x3000, IotlbPerm::ReadOnly);
        assert_eq!(mock.sent(), vec![(update, true)]);
    }

    #[test]
    fn unmapped_or_forbidden_miss_gets_nonzero_ack_and_no_update() {
        let mock = Arc::new(MockIotlbChannel::new());
        let (mut srv, peer) = server(&mock);
        send_miss(&peer, 0x20_0000, IotlbPerm::ReadOnly, true);
        assert_eq!(srv.serve_one().unwrap(), Served::Miss { ok: false });
        assert_eq!(read_ack(&peer, 1), 1);
        send_miss(&peer, 0x1000, IotlbPerm::WriteOnly, true);
        assert_eq!(srv.serve_one().unwrap(), Served::Miss { ok: false });
        assert_eq!(read_ack(&peer, 1), 1);
        assert!(mock.sent().is_empty());
    }

    #[test]
    fn failed_update_send_gets_nonzero_ack() {
        let mock = Arc::new(MockIotlbChannel::new());
        mock.script(&[MockReply::Nack(9)]);
        let (mut srv, peer) = server(&mock);
        send_miss(&peer, 0x1000, IotlbPerm::ReadOnly, true);
        assert_eq!(srv.serve_one().unwrap(), Served::Miss { ok: false });
        assert_eq!(read_ack(&peer, 1), 1);
    }

    #[test]
    fn handler_update_not_covering_the_miss_is_refused() {
        let mock = Arc::new(MockIotlbChannel::new());
        let (ours, peer) = UnixStream::pair().unwrap();
        let bad = |_iova: u64, _p: IotlbPerm| {
            Ok(IotlbMsg::update(
                0x9000,
                0x1000,
                UADDR,
                IotlbPerm::ReadWrite,
            ))
        };
        let handler = TranslatingHandler::new(bad, mock.clone());
        let mut srv = BackendReqServer::new(ours, Arc::new(handler));
        send_miss(&peer, 0x1000, IotlbPerm::ReadOnly, true);
        assert_eq!(srv.serve_one().unwrap(), Served::Miss { ok: false });
        assert_eq!(read_ack(&peer, 1), 1);
        assert!(mock.sent().is_empty());
    }

    #[test]
    fn miss_without_need_reply_gets_no_ack() {
        let mock = Arc::new(MockIotlbChannel::new());
        let (mut srv, peer) = server(&mock);
        send_miss(&peer, 0x1000, IotlbPerm::ReadOnly, false);
        assert_eq!(srv.serve_one().unwrap(), Served::Miss { ok: true });
        let deadline = Instant::now() + Duration::from_millis(30);
        assert!(matches!(
            read_frame(&peer, Some(deadline), Duration::from_secs(1)),
            Err(ChannelError::Timeout)
        ));
        assert_eq!(mock.sent().len(), 1);
    }

    #[test]
    fn unknown_request_gets_nonzero_reply_only_when_asked() {
        let mock = Arc::new(MockIotlbChannel::new());
        let (mut srv, peer) = server(&mock);
        write_frame(&peer, &Header::request(77, 0, true).encode()).unwrap();
        assert_eq!(srv.serve_one().unwrap(), Served::Unsupported(77));
        assert_eq!(read_ack(&peer, 77), 1);
        write_frame(&peer, &Header::request(2, 0, false).encode()).unwrap();
        assert_eq!(srv.serve_one().unwrap(), Served::Unsupported(2));
        send_miss(&peer, 0x1000, IotlbPerm::ReadOnly, true);
        assert_eq!(srv.serve_one().unwrap(), Served::Miss { ok: true });
        assert_eq!(read_ack(&peer, 1), 0);
    }

    #[test]
    fn update_type_from_backend_is_refused_not_fatal() {
        let mock = Arc::new(MockIotlbChannel::new());
        let (mut srv, peer) = server(&mock);
        let frame = encode_iotlb_frame(1, &IotlbMsg::update(0, 1, 0, IotlbPerm::ReadWrite), true);
        write_frame(&peer, &frame).unwrap();
        assert_eq!(srv.serve_one().unwrap(), Served::Unsupported(1));
        assert_eq!(read_ack(&peer, 1), 1);
        let mut unknown = encode_iotlb_frame(1, &IotlbMsg::miss(0, IotlbPerm::ReadOnly), true);
        unknown[12 + 25] = 9;
        write_frame(&peer, &unknown).unwrap();
        assert_eq!(srv.serve_one().unwrap(), Served::Unsupported(1));
        assert_eq!(read_ack(&peer, 1), 1);
    }

    #[test]
    fn access_fail_is_counted_and_acked() {
        let mock = Arc::new(MockIotlbChannel::new());
        let (mut srv, peer) = server(&mock);
        let mut frame = encode_iotlb_frame(1, &IotlbMsg::miss(0x5000, IotlbPerm::WriteOnly), true);
        frame[12 + 25] = IotlbType::AccessFail as u8;
        write_frame(&peer, &frame).unwrap();
        assert_eq!(srv.serve_one().unwrap(), Served::AccessFail);
        assert_eq!(read_ack(&peer, 1), 0);
    }

    fn assert_closes(bytes: &[u8]) -> BackendReqError {
        let mock = Arc::new(MockIotlbChannel::new());
        let (srv, peer) = server(&mock);
        write_frame(&peer, bytes).unwrap();
        let thread = srv.spawn("test-backend-req").unwrap();
        let start = Instant::now();
        while !thread.is_finished() {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "channel not closed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(mock.sent().is_empty());
        thread.stop().unwrap()
    }

    #[test]
    fn malformed_messages_close_the_channel() {
        let mut bad_version = Header::request(1, 0, false);
        bad_version.flags = 0x2;
        assert!(matches!(
            assert_closes(&bad_version.encode()),
            BackendReqError::Malformed(WireError::BadVersion(2))
        ));
        let oversized = Header::request(1, 0x2000, false);
        assert!(matches!(
            assert_closes(&oversized.encode()),
            BackendReqError::Malformed(WireError::Oversized(0x2000))
        ));
        let mut short = Header::request(1, 16, true).encode().to_vec();
        short.extend_from_slice(&[0u8; 16]);
        assert!(matches!(
            assert_closes(&short),
            BackendReqError::Malformed(WireError::SizeMismatch { got: 16, .. })
        ));
        let reply = encode_ack(1, 0);
        assert!(matches!(
            assert_closes(&reply),
            BackendReqError::UnexpectedReply(1)
        ));
    }

    #[test]
    fn truncated_frame_times_out_and_closes() {
        let frame = encode_iotlb_frame(1, &IotlbMsg::miss(0, IotlbPerm::ReadOnly), true);
        assert!(matches!(
            assert_closes(&frame[..IOTLB_MSG_SIZE]),
            BackendReqError::Channel(ChannelError::Timeout)
        ));
    }

    #[test]
    fn stop_ends_an_idle_server() {
        let mock = Arc::new(MockIotlbChannel::new());
        let (srv, _peer) = server(&mock);
        let thread = srv.spawn("test-backend-req").unwrap();
        assert!(matches!(
            thread.stop(),
            Some(BackendReqError::Channel(ChannelError::Disconnected))
        ));
    }

    /// A real main socket and a real back-end channel: the UPDATE must be on
    /// the main socket (and acked) before the miss is acked.
    #[test]
    fn update_is_sent_on_main_socket_before_the_miss_is_acked() {
        let (main_ours, main_peer) = UnixStream::pair().unwrap();
        let main = Arc::new(MainSocket::new(main_ours, 2, Duration::from_secs(2)).unwrap());
        let (req_ours, req_peer) = UnixStream::pair().unwrap();
        let handler = TranslatingHandler::new(translate, main.clone());
        let srv = BackendReqServer::new(req_ours, Arc::new(handler));
        let thread = srv.spawn("test-backend-req").unwrap();

        send_miss(&req_peer, 0x7abc, IotlbPerm::ReadOnly, true);
        let (hdr, payload) = read_frame(&main_peer, None, Duration::from_secs(2)).unwrap();
        assert_eq!(hdr, Header::request(22, 32, true));
        let update = IotlbMsg::decode(22, &payload).unwrap();
        assert_eq!(
            update,
            IotlbMsg::update(0x7000, 0x1000, UADDR + 0x7000, IotlbPerm::ReadOnly)
        );
        // No miss ack may arrive while the UPDATE is unacknowledged.
        let early = Instant::now() + Duration::from_millis(50);
        assert!(matches!(
            read_frame(&req_peer, Some(early), Duration::from_secs(1)),
            Err(ChannelError::Timeout)
        ));
        write_frame(&main_peer, &encode_ack(22, 0)).unwrap();
        assert_eq!(read_ack(&req_peer, 1), 0);
        assert_eq!(main.stats().updates, 1);
        drop(req_peer);
        thread.stop();
    }

    /// Regression (bug "closed back-end channel stays half open"): after a malformed frame the
    /// server ended, but the thread handle's clone kept the socket open, so the back end never
    /// saw the channel close.
    #[test]
    fn closed_backend_channel_is_shut_down_for_the_peer() {
        let mock = Arc::new(MockIotlbChannel::new());
        let (srv, peer) = server(&mock);
        let thread = srv.spawn("test-backend-req").unwrap();
        let mut bad = Header::request(1, 0, true);
        bad.flags = 0x2;
        write_frame(&peer, &bad.encode()).unwrap();
        let mut byte = [0u8; 1];
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(
            std::io::Read::read(&mut &peer, &mut byte).unwrap(),
            0,
            "peer sees EOF"
        );
        assert!(matches!(thread.stop(), Some(BackendReqError::Malformed(_))));
    }

    /// Regression (bug "unthrottled refused-miss flood"): every refused miss meant a guest
    /// fault and a log line, without limit. Past the budget, requests are refused unprocessed.
    #[test]
    fn refused_miss_flood_is_throttled() {
        let mock = Arc::new(MockIotlbChannel::new());
        let (mut srv, peer) = server(&mock);
        let budget = MAX_BAD_REQUESTS_PER_SEC;
        for _ in 0..budget {
            send_miss(&peer, 0x100_0000, IotlbPerm::ReadOnly, true);
            assert_eq!(srv.serve_one().unwrap(), Served::Miss { ok: false });
            assert_eq!(read_ack(&peer, 1), 1);
        }
        // Even a mapped IOVA is now refused without a translation or an UPDATE.
        send_miss(&peer, 0x3000, IotlbPerm::ReadOnly, true);
        assert_eq!(srv.serve_one().unwrap(), Served::Throttled);
        assert_eq!(read_ack(&peer, 1), 1);
        assert!(mock.sent().is_empty());
        // A new second brings a new budget.
        srv.throttle.window -= Duration::from_secs(1);
        send_miss(&peer, 0x3000, IotlbPerm::ReadOnly, true);
        assert_eq!(srv.serve_one().unwrap(), Served::Miss { ok: true });
        assert_eq!(read_ack(&peer, 1), 0);
    }

    #[test]
    fn refused_dma_faults_are_warnings_naming_device_iova_and_access() {
        let (level, line) = refusal_log(
            "vhost-user-net 0000:00:03.0",
            0x20_0000,
            IotlbPerm::WriteOnly,
            &MissError::Unmapped { iova: 0x20_0000 },
        );
        assert_eq!(level, log::Level::Warn);
        for part in [
            "vhost-user-net 0000:00:03.0",
            "0x200000",
            "WriteOnly",
            "DMA fault",
            "no ack",
        ] {
            assert!(line.contains(part), "{part} missing in {line}");
        }
        let denied = MissError::PermissionDenied {
            iova: 0x1000,
            wanted: IotlbPerm::WriteOnly,
        };
        assert_eq!(
            refusal_log("d", 0x1000, IotlbPerm::WriteOnly, &denied).0,
            log::Level::Warn
        );
        // Stopping devices refuse misses routinely: not a fault.
        let stopped = MissError::DeviceStopped { iova: 0x1000 };
        assert_eq!(
            refusal_log("d", 0x1000, IotlbPerm::ReadOnly, &stopped).0,
            log::Level::Info
        );
    }

    #[test]
    fn fault_lines_are_rate_limited_per_second() {
        let mut t = Throttle::new();
        let t0 = Instant::now();
        let logged = (0..3 * MAX_FAULT_LOGS_PER_SEC)
            .filter(|_| t.log.check_at(t0).is_some())
            .count() as u64;
        assert_eq!(logged, MAX_FAULT_LOGS_PER_SEC);
        assert_eq!(t.log.suppressed(), 2 * MAX_FAULT_LOGS_PER_SEC);
        // The next second reports the suppressed lines once and opens a new budget.
        let t1 = t0 + Duration::from_secs(1);
        assert!(!t.exhausted_at("d", t1));
        assert_eq!(t.log.suppressed(), 0);
        assert_eq!(t.log.check_at(t1), Some(0));
    }

    struct Ticks(std::sync::Mutex<std::sync::mpsc::Sender<()>>);

    impl MissHandler for Ticks {
        fn answer_miss(&self, iova: u64, _perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
            Err(MissError::Unmapped { iova })
        }

        fn tick(&self) {
            let _ = self.0.lock().unwrap().send(());
        }
    }

    type TranslateFn = fn(u64, IotlbPerm) -> Result<IotlbMsg, MissError>;

    /// Answers misses with `translate`, with an endless poll window, and records how each wait
    /// ended.
    struct Spinning {
        inner: TranslatingHandler<TranslateFn>,
        waits: std::sync::Mutex<Vec<SpinWait>>,
    }

    impl MissHandler for Spinning {
        fn answer_miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
            self.inner.answer_miss(iova, perm)
        }

        fn poll_window(&self) -> Duration {
            Duration::MAX
        }

        fn on_poll(&self, wait: &SpinWait) {
            self.waits.lock().unwrap().push(*wait);
        }
    }

    #[test]
    fn a_server_with_a_poll_window_takes_requests_while_spinning() {
        let mock = Arc::new(MockIotlbChannel::new());
        let handler = Arc::new(Spinning {
            inner: TranslatingHandler::new(translate as TranslateFn, mock.clone()),
            waits: std::sync::Mutex::new(Vec::new()),
        });
        let (ours, peer) = UnixStream::pair().unwrap();
        let thread = BackendReqServer::new(ours, handler.clone())
            .spawn("test-spin")
            .unwrap();
        for page in 0..3u64 {
            send_miss(&peer, page << 12, IotlbPerm::ReadOnly, true);
            assert_eq!(read_ack(&peer, VHOST_USER_BACKEND_IOTLB_MSG), 0);
        }
        drop(peer);
        let end = thread.stop();
        assert!(matches!(
            end,
            Some(BackendReqError::Channel(ChannelError::Disconnected))
        ));
        assert_eq!(mock.sent().len(), 3);
        // An endless window never blocks: every request and the hang-up ended a spin. (The
        // 500 ms tick may end one more spin first; that wait reports TimedOut.)
        let waits = handler.waits.lock().unwrap();
        let spun = waits
            .iter()
            .filter(|w| w.waited == Waited::WhileSpinning)
            .count();
        assert_eq!(spun, 4, "{waits:?}");
        assert!(waits.iter().all(|w| w.waited != Waited::AfterBlocking));
    }

    #[test]
    fn an_idle_server_ticks_its_handler() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ours, peer) = UnixStream::pair().unwrap();
        let handler = Arc::new(Ticks(std::sync::Mutex::new(tx)));
        let thread = BackendReqServer::new(ours, handler)
            .spawn("test-ticks")
            .unwrap();
        // No request at all: the ticks still come, one per TICK.
        for _ in 0..2 {
            rx.recv_timeout(TICK * 20).unwrap();
        }
        drop(peer);
        thread.stop();
    }
}
