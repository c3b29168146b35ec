//! The `iovmm_api` thread: serves the API socket and writes the metrics line.
//!
//! One thread, no thread per connection: it `poll`s the stop eventfd, the listening socket and
//! at most [`MAX_CONNECTIONS`] non-blocking connections (plus at most [`MAX_CLOSING`] being
//! closed). A connection past the limit gets a 503 and is closed; a request must be complete
//! within [`REQUEST_TIMEOUT`] of the connection or of the previous response (else 408, or a
//! silent close when nothing was sent); a connection sends the next request only once its
//! response is written (no read while a response is pending), so a client that does not read
//! cannot grow the server's buffers. Closing connections linger ([`super::connection`]). A
//! handler runs on this thread; the slowest is a shutdown, which waits for the guest to power off
//! (at most its `timeout_ms`, by default [`super::SHUTDOWN_TIMEOUT`], never more than
//! [`super::MAX_SHUTDOWN_TIMEOUT`]); other requests wait meanwhile. When the VM stops, pending
//! answers are written once (without waiting) before the thread ends.
//!
//! The socket is bound on the caller's thread ([`bind`]), and the metrics file opened there:
//! the thread's seccomp filter ([`crate::seccomp::ThreadKind::ApiServer`]) has no `bind` or
//! `open`.

use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::sys::{poll_fds, PollFd};
use iommu::error::chain;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::connection::Connection;
use super::http::HttpError;
use super::metrics::MetricsSink;
use super::routes::VmApi;
use crate::seccomp::{SeccompFilters, ThreadKind};

pub use super::connection::{LINGER_TIMEOUT, REQUEST_TIMEOUT};

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Most connections kept beyond that while they are told 503 or closed after an error; past
/// this, new connections are closed without an answer.
pub const MAX_CLOSING: usize = 16;
/// Most connections accepted per wake-up (the rest wait in the backlog).
const ACCEPT_BATCH: usize = 32;

/// Errors of setting up the API socket, the metrics file or the thread.
#[derive(Debug, Error)]
pub enum ApiSetupError {
    /// The socket could not be bound.
    #[error("cannot listen on the API socket {path:?}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process serves the socket.
    #[error("the API socket {0:?} is in use by another process")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0:?} exists and is not a socket; iovmm does not replace it")]
    NotASocket(PathBuf),
    /// The metrics file or FIFO could not be opened.
    #[error("cannot open the metrics file {path:?}")]
    Metrics {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The stop eventfd or the thread could not be created.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// Binds the API socket at `path`, replacing a stale socket file that nobody serves.
pub fn bind(path: &Path) -> Result<UnixListener, ApiSetupError> {
    use std::os::unix::fs::FileTypeExt;
    let bind_err = |source| ApiSetupError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiSetupError::NotASocket(path.to_path_buf()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(ApiSetupError::InUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Err(e) => return Err(bind_err(e)),
        }
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok(listener)
}

/// The API thread's state.
pub struct ApiServer {
    listener: Option<UnixListener>,
    metrics: Option<MetricsSink>,
    api: Arc<dyn VmApi>,
    stop: EventFd,
    conns: Vec<Connection>,
}

impl ApiServer {
    /// A server over `listener` (if any) and `metrics` (if any); it returns once `stop` is
    /// written.
    pub fn new(
        listener: Option<UnixListener>,
        metrics: Option<MetricsSink>,
        api: Arc<dyn VmApi>,
        stop: EventFd,
    ) -> Self {
        ApiServer {
            listener,
            metrics,
            api,
            stop,
            conns: Vec::new(),
        }
    }

    /// Starts the `iovmm_api` thread, which installs its seccomp filter first.
    pub fn spawn(self, seccomp: Arc<SeccompFilters>) -> Result<JoinHandle<()>, ApiSetupError> {
        std::thread::Builder::new()
            .name("iovmm_api".into())
            .spawn(move || {
                if let Err(e) = seccomp.apply(ThreadKind::ApiServer) {
                    log::error!("api: {e}; the API socket is not served", e = chain(&e));
                    return;
                }
                self.run();
            })
            .map_err(ApiSetupError::Thread)
    }

    /// Serves until the stop eventfd is written, then writes a last metrics line.
    pub fn run(mut self) {
        loop {
            let now = Instant::now();
            let mut fds = self.poll_set();
            if let Err(e) = poll_fds(&mut fds, Some(self.timeout(now))) {
                log::error!("api: poll failed: {e}; the API socket is no longer served");
                break;
            }
            if fds[0].fired() {
                break;
            }
            let now = Instant::now();
            self.serve(&fds[1..], now);
            if let Some(m) = &mut self.metrics {
                if now >= m.next_due() {
                    m.tick(now, &self.api.info(), &self.api.counters());
                }
            }
        }
        // The answer of a shutdown that waited for the guest is written before the VM's stop
        // ends this thread: the stop and the connection may become ready in one poll.
        for c in &mut self.conns {
            c.flush();
        }
        if let Some(m) = &mut self.metrics {
            m.write_line(&self.api.info(), &self.api.counters());
        }
    }

    /// Stop eventfd, then the listener when there is one, then every connection in order.
    fn poll_set(&self) -> Vec<PollFd> {
        let mut fds = vec![PollFd::readable(&self.stop)];
        if let Some(l) = &self.listener {
            fds.push(PollFd::readable(l));
        }
        fds.extend(
            self.conns
                .iter()
                .map(|c| PollFd::new(c.stream(), c.events())),
        );
        fds
    }

    fn timeout(&self, now: Instant) -> Duration {
        let conn = self.conns.iter().map(Connection::deadline);
        let next = conn
            .chain(self.metrics.as_ref().map(MetricsSink::next_due))
            .min();
        next.map_or(Duration::from_secs(3600), |t| {
            t.saturating_duration_since(now)
        })
    }

    fn serve(&mut self, fds: &[PollFd], now: Instant) {
        let (listener_fd, conn_fds) = match self.listener {
            Some(_) => fds.split_first().map_or((None, fds), |(l, c)| (Some(l), c)),
            None => (None, fds),
        };
        for (c, fd) in self.conns.iter_mut().zip(conn_fds) {
            c.on_events(fd.revents(), &*self.api, now);
        }
        self.conns.retain(|c| !c.is_dead());
        if listener_fd.is_some_and(PollFd::fired) {
            self.accept(now);
        }
    }

    fn accept(&mut self, now: Instant) {
        let Some(listener) = &self.listener else {
            return;
        };
        for _ in 0..ACCEPT_BATCH {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("api: accept failed: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let open = self.conns.iter().filter(|c| c.is_open()).count();
            if self.conns.len() >= MAX_CONNECTIONS + MAX_CLOSING {
                log::debug!("api: {} connections; closing a new one", self.conns.len());
            } else if open >= MAX_CONNECTIONS {
                let e = HttpError::TooManyConnections;
                self.conns.push(Connection::refused(stream, &e, now));
            } else {
                self.conns.push(Connection::new(stream, now));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::api::http::{MAX_BODY, MAX_HEAD};
    use crate::api::routes::tests::FakeVm;
    use std::io::{Read, Write};

    struct Running {
        path: PathBuf,
        stop: EventFd,
        thread: Option<JoinHandle<()>>,
        vm: Arc<FakeVm>,
    }

    impl Running {
        fn start(tag: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("iovmm-api-{}-{tag}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let listener = bind(&path).unwrap();
            let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let vm = Arc::new(FakeVm::default());
            let server =
                ApiServer::new(Some(listener), None, vm.clone(), stop.try_clone().unwrap());
            let thread = Some(std::thread::spawn(move || server.run()));
            Running {
                path,
                stop,
                thread,
                vm,
            }
        }

        fn connect(&self) -> UnixStream {
            let s = UnixStream::connect(&self.path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.write(1).unwrap();
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Sends `raw` and reads one response (its status and body), by Content-Length.
    fn exchange(s: &mut UnixStream, raw: &[u8]) -> (u16, String) {
        s.write_all(raw).unwrap();
        read_response(s)
    }

    fn read_response(s: &mut UnixStream) -> (u16, String) {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).unwrap(), 1, "connection closed: {buf:?}");
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        let status = head[9..12].parse().unwrap();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.parse().unwrap());
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    #[test]
    fn keep_alive_connections_answer_one_request_after_another() {
        let r = Running::start("keepalive");
        let mut s = r.connect();
        let (st, body) = exchange(&mut s, b"GET /api/v1/vm.ping HTTP/1.1\r\n\r\n");
        assert_eq!(st, 200, "{body}");
        // Two pipelined requests: both answered, in order.
        s.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\n\r\nGET /api/v1/vm.info HTTP/1.1\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut s).0, 204);
        let (st, body) = read_response(&mut s);
        assert_eq!(st, 200);
        assert!(body.contains("\"state\":\"paused\""), "{body}");
        assert!(*r.vm.paused.lock().unwrap());
    }

    #[test]
    fn malformed_requests_are_answered_and_closed() {
        let r = Running::start("malformed");
        let mut s = r.connect();
        let (st, body) = exchange(&mut s, b"\x16\x03\x01garbage\r\n\r\n");
        assert_eq!(st, 400, "{body}");
        assert!(body.starts_with("{\"error\":"));
        let mut rest = Vec::new();
        assert_eq!(
            s.read_to_end(&mut rest).unwrap(),
            0,
            "closed after an error"
        );
        let mut s = r.connect();
        let big = format!(
            "PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(exchange(&mut s, big.as_bytes()).0, 413);
        assert!(!*r.vm.paused.lock().unwrap());
        let mut s = r.connect();
        let flood = vec![b'A'; MAX_HEAD + MAX_BODY + 10];
        // The server answers 431 before it has read everything; the write may then fail.
        let _ = s.write_all(&flood);
        assert_eq!(read_response(&mut s).0, 431);
    }

    #[test]
    fn connections_over_the_limit_get_503_and_freed_slots_are_reused() {
        let r = Running::start("limit");
        let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS).map(|_| r.connect()).collect();
        // Each held connection is accepted once it answered something.
        for s in &mut held {
            assert_eq!(exchange(s, b"GET /api/v1/vm.ping HTTP/1.1\r\n\r\n").0, 200);
        }
        // The request written after the server answered 503 does not make the answer fail:
        // the server lingers, reading, until the client closes.
        let mut extra = r.connect();
        let (status, body) = exchange(&mut extra, b"GET /api/v1/vm.ping HTTP/1.1\r\n\r\n");
        assert_eq!(status, 503, "{body}");
        let mut rest = Vec::new();
        assert_eq!(
            extra.read_to_end(&mut rest).unwrap(),
            0,
            "half-closed after the 503"
        );
        // The close of a held connection is seen before (or with) the next connection, so
        // its slot is free when that one is accepted.
        drop(held.pop());
        let mut s = r.connect();
        assert_eq!(
            exchange(&mut s, b"GET /api/v1/vm.ping HTTP/1.1\r\n\r\n").0,
            200
        );
    }

    #[test]
    fn bind_replaces_stale_sockets_only() {
        let dir = std::env::temp_dir();
        let path = dir.join(format!("iovmm-api-{}-stale.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        drop(UnixListener::bind(&path).unwrap());
        let live = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(ApiSetupError::InUse(_))));
        drop(live);
        std::fs::remove_file(&path).unwrap();
        let file = dir.join(format!("iovmm-api-{}-file", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(ApiSetupError::NotASocket(_))));
        std::fs::remove_file(&file).unwrap();
    }
}
