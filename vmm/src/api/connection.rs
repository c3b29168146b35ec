//! One client connection of the API server: buffered non-blocking reads, one response at a
//! time, deadlines, and a lingering close.
//!
//! A connection that ends with an error (or `Connection: close`) writes its response, shuts its
//! write side down and then reads and discards what the client still sends until the client
//! closes, [`LINGER_TIMEOUT`] passes or [`LINGER_BYTES`] were discarded. Closing at once would
//! make the client's own write fail (`EPIPE`, or `ECONNRESET` once data is left unread) before
//! it reads the answer: curl then reports a send error instead of the 4xx or 503.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::http::{self, HttpError, Response, MAX_BODY, MAX_HEAD};
use super::routes::{handle, VmApi};

/// Time a client has to send a complete request (after connecting or after a response).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection waits for the client to close.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// How much a closing connection discards before it closes anyway.
pub const LINGER_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading requests, writing responses.
    Open,
    /// Writing the last response; then half-close and linger.
    Closing,
    /// Write side shut down; discarding input until the client closes.
    Lingering,
    /// To be dropped.
    Dead,
}

/// One client connection.
pub struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    phase: Phase,
    discarded: usize,
    deadline: Instant,
}

fn transient(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

impl Connection {
    /// A connection that reads requests.
    pub fn new(stream: UnixStream, now: Instant) -> Self {
        Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            phase: Phase::Open,
            discarded: 0,
            deadline: now + REQUEST_TIMEOUT,
        }
    }

    /// A connection that is only told `e` (e.g. too many connections) and closed.
    pub fn refused(stream: UnixStream, e: &HttpError, now: Instant) -> Self {
        let mut c = Self::new(stream, now);
        c.fail(e, now);
        c
    }

    /// The stream, for `poll`.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Whether it takes requests (counts against the connection limit).
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Whether it is to be dropped.
    pub fn is_dead(&self) -> bool {
        self.phase == Phase::Dead
    }

    /// When it must have made progress.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// What to `poll` for: output first (no reading while a response is pending).
    pub fn events(&self) -> i16 {
        if self.output.is_empty() {
            libc::POLLIN
        } else {
            libc::POLLOUT
        }
    }

    /// Handles what `poll` reported.
    pub fn on_events(&mut self, revents: i16, api: &dyn VmApi, now: Instant) {
        if revents & libc::POLLOUT != 0 {
            self.on_writable(api, now);
        } else if revents & libc::POLLIN != 0 {
            self.on_readable(api, now);
        } else if revents != 0 {
            self.phase = Phase::Dead;
        }
        self.on_deadline(now);
    }

    fn on_readable(&mut self, api: &dyn VmApi, now: Instant) {
        let mut chunk = [0u8; 4096];
        let want = match self.phase {
            Phase::Lingering => chunk.len(),
            _ => (MAX_HEAD + MAX_BODY)
                .saturating_sub(self.input.len())
                .clamp(1, chunk.len()),
        };
        match self.stream.read(&mut chunk[..want]) {
            Ok(0) => self.phase = Phase::Dead,
            Ok(n) if self.phase == Phase::Lingering => {
                self.discarded += n;
                if self.discarded >= LINGER_BYTES {
                    self.phase = Phase::Dead;
                }
            }
            Ok(n) => {
                self.input.extend_from_slice(&chunk[..n]);
                self.answer(api, now);
            }
            Err(e) if transient(&e) => {}
            Err(_) => self.phase = Phase::Dead,
        }
    }

    /// Answers the first complete request in `input`, if any.
    fn answer(&mut self, api: &dyn VmApi, now: Instant) {
        if self.phase != Phase::Open {
            return;
        }
        match http::parse(&self.input) {
            Ok(None) => {}
            Ok(Some((req, used))) => {
                self.input.drain(..used);
                let resp = handle(api, &req);
                // A shutdown may have waited seconds for the guest: the next deadline counts
                // from the answer.
                self.respond(&resp, req.close, now.max(Instant::now()));
            }
            Err(e) => self.fail(&e, now),
        }
    }

    fn respond(&mut self, resp: &Response, close: bool, now: Instant) {
        self.output = resp.encode(close);
        if close {
            self.phase = Phase::Closing;
        }
        self.deadline = now + REQUEST_TIMEOUT;
    }

    /// Writes what it can of a pending response without waiting: the server is stopping (the VM
    /// stopped), and a shutdown's answer may have just been produced.
    pub fn flush(&mut self) {
        if self.output.is_empty() || self.phase == Phase::Dead {
            return;
        }
        match self.stream.write(&self.output) {
            Ok(n) => {
                self.output.drain(..n);
            }
            Err(e) => log::debug!("api: cannot write a last response: {e}"),
        }
    }

    fn fail(&mut self, e: &HttpError, now: Instant) {
        log::debug!("api: refusing a request: {e}");
        self.input.clear();
        self.respond(&Response::from_error(e), true, now);
    }

    fn on_writable(&mut self, api: &dyn VmApi, now: Instant) {
        match self.stream.write(&self.output) {
            Ok(n) => {
                self.output.drain(..n);
            }
            Err(e) if transient(&e) => {}
            Err(_) => self.phase = Phase::Dead,
        }
        if !self.output.is_empty() {
            return;
        }
        match self.phase {
            Phase::Closing => self.linger(now),
            // A pipelined request may already be buffered.
            Phase::Open => self.answer(api, now),
            Phase::Lingering | Phase::Dead => {}
        }
    }

    fn linger(&mut self, now: Instant) {
        self.input.clear();
        self.phase = match self.stream.shutdown(Shutdown::Write) {
            Ok(()) => Phase::Lingering,
            Err(_) => Phase::Dead,
        };
        self.deadline = now + LINGER_TIMEOUT;
    }

    /// Past the deadline: 408 for a partial request; otherwise (idle, a response the client
    /// does not read, a lingering close) the connection is dropped.
    fn on_deadline(&mut self, now: Instant) {
        if now < self.deadline || self.phase == Phase::Dead {
            return;
        }
        if self.phase == Phase::Open && !self.input.is_empty() && self.output.is_empty() {
            self.fail(&HttpError::Timeout, now);
        } else {
            self.phase = Phase::Dead;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::routes::tests::FakeVm;

    /// A connection over one end of a socket pair; the test is the client on the other end.
    fn pair(now: Instant) -> (Connection, UnixStream) {
        let (server, client) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (Connection::new(server, now), client)
    }

    fn read_all(client: &mut UnixStream) -> String {
        let mut out = Vec::new();
        client.read_to_end(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_partial_request_past_its_deadline_gets_408_then_a_lingering_close() {
        let vm = FakeVm::default();
        let t0 = Instant::now();
        let (mut c, mut client) = pair(t0);
        client.write_all(b"GET /api/v1/vm.info HT").unwrap();
        c.on_events(libc::POLLIN, &vm, t0);
        assert!(
            c.is_open() && c.events() == libc::POLLIN,
            "waits for the rest"
        );
        let late = t0 + REQUEST_TIMEOUT;
        c.on_events(0, &vm, late);
        assert_eq!(c.events(), libc::POLLOUT);
        c.on_events(libc::POLLOUT, &vm, late);
        assert!(!c.is_open() && !c.is_dead(), "lingering");
        // The client may still write; its bytes are discarded, not refused.
        client.write_all(b"TP/1.1\r\n\r\n").unwrap();
        c.on_events(libc::POLLIN, &vm, late);
        assert!(!c.is_dead());
        let answer = read_all(&mut client);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(answer.contains("Connection: close\r\n"));
        drop(client);
        c.on_events(libc::POLLIN, &vm, late);
        assert!(c.is_dead(), "closed once the client closed");
    }

    #[test]
    fn idle_and_lingering_connections_are_dropped_at_their_deadline() {
        let vm = FakeVm::default();
        let t0 = Instant::now();
        let (mut idle, _client) = pair(t0);
        idle.on_events(0, &vm, t0 + REQUEST_TIMEOUT);
        assert!(idle.is_dead(), "idle past the request timeout");
        let (mut refused, _c2) = pair(t0);
        refused = Connection::refused(refused.stream, &HttpError::TooManyConnections, t0);
        refused.on_events(libc::POLLOUT, &vm, t0);
        assert!(!refused.is_dead());
        refused.on_events(0, &vm, t0 + LINGER_TIMEOUT);
        assert!(refused.is_dead(), "a client that never closes is dropped");
    }
}
