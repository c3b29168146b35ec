//! Back-end restarts (`reconnect=SECS`, and server mode): the supervisor
//! thread of a device.
//!
//! The thread watches the current connection (hang-up of the main socket,
//! the socket being marked broken by any request, or the back-end request
//! channel ending). When the back end is gone it
//! 1. tells the IOTLB bridge (`link_down`): misses are refused at once,
//!    nothing more is sent, the record of what the back end held is kept;
//! 2. closes the main socket, stops the back-end channel thread and forgets
//!    the started rings;
//! 3. gets a new connection (`Dial`): as a client, connects to the socket
//!    path again every interval; as a server (`server=on`), accepts the next
//!    back end on its listening socket as soon as one connects (a
//!    connection that fails negotiation is closed and the next one
//!    accepted). On the new connection it redoes SET_OWNER
//!    and the feature negotiation (the new back end must offer what the
//!    first one did, see `session::negotiate`), and, if the guest has the
//!    device running, programs it again exactly as an activation does:
//!    SET_FEATURES, SET_MEM_TABLE, then one full-range INVALIDATE before any
//!    other IOTLB message (so the new IOTLB is empty even if the back end
//!    keeps entries across a renegotiation, and the bridge forgets the old
//!    ranges), with every ring resuming at the used index found in guest
//!    memory, and kicks every ring once.
//!
//! Nothing is replayed from the old connection's IOTLB: UPDATEs only answer
//! the new back end's misses, computed from the current vIOMMU state.
//!
//! The vCPU side never waits for an attempt: while no connection is up, an
//! activation or reset only records what the guest wants and the thread
//! applies it once connected.
//!
//! The thread starts with the device, before the VMM hands out its thread
//! hook, and only waits for a hang-up until then. It runs the hook
//! ([`ThreadKind::VhostUserReconnect`]: socket I/O plus `socket`/`connect`
//! on Unix sockets; [`ThreadKind::VhostUserServer`]: socket I/O plus
//! `accept4`) as soon as one is set, and before it handles any
//! disconnect: the first iteration after the hook appears installs it.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iommu::error::chain;
use iommu::ratelimit::RateLimit;
use iommu::sync::lock;
use iommu::warn_limited;
use vmm_sys_util::eventfd::EventFd;

use super::channel::IotlbChannel;
use super::listener::accept_now;
use super::session::{negotiate_within, Link, Negotiated};
use crate::sys::{poll_fds, PollFd};
use crate::thread::{self, ThreadKind};

/// Longest wait between two checks of a healthy connection.
const TICK: Duration = Duration::from_secs(1);
/// At most one log line per this interval about failed attempts.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Reconnection counters of one device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconnectStats {
    /// Whether reconnection is enabled (`reconnect` > 0).
    pub enabled: bool,
    /// Times the back end was found gone.
    pub disconnects: u64,
    /// Connection attempts (successful or not).
    pub attempts: u64,
    /// Successful reconnections (negotiated again).
    pub reconnects: u64,
    /// Reconnections that restored a running device.
    pub restores: u64,
    /// Whether a back end is connected right now.
    pub connected: bool,
}

#[derive(Debug)]
pub(crate) struct ReconnectCounters {
    enabled: bool,
    disconnects: AtomicU64,
    attempts: AtomicU64,
    reconnects: AtomicU64,
    restores: AtomicU64,
    connected: AtomicBool,
}

impl ReconnectCounters {
    pub(crate) fn new(enabled: bool) -> Self {
        ReconnectCounters {
            enabled,
            disconnects: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            restores: AtomicU64::new(0),
            connected: AtomicBool::new(true),
        }
    }

    pub(crate) fn snapshot(&self) -> ReconnectStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ReconnectStats {
            enabled: self.enabled,
            disconnects: l(&self.disconnects),
            attempts: l(&self.attempts),
            reconnects: l(&self.reconnects),
            restores: l(&self.restores),
            connected: self.connected.load(Ordering::Relaxed),
        }
    }
}

/// How the supervisor gets a new connection.
pub(crate) enum Dial {
    /// Client: connect to the back end's socket, every `interval`.
    Connect { socket: PathBuf, interval: Duration },
    /// Server: accept the next back end on our listening socket
    /// (non-blocking), as soon as one connects.
    Accept {
        socket: PathBuf,
        listener: UnixListener,
    },
}

impl Dial {
    fn socket(&self) -> &Path {
        match self {
            Dial::Connect { socket, .. } | Dial::Accept { socket, .. } => socket,
        }
    }

    fn thread(&self) -> (&'static str, ThreadKind) {
        match self {
            Dial::Connect { .. } => ("vhost-user-reconnect", ThreadKind::VhostUserReconnect),
            Dial::Accept { .. } => ("vhost-user-server", ThreadKind::VhostUserServer),
        }
    }

    /// When to try again after a failed attempt at `now`: a client waits
    /// its interval; a server tries again at once (it then waits on the
    /// listener, see [`State::wait`]).
    fn retry_at(&self, now: Instant) -> Instant {
        match self {
            Dial::Connect { interval, .. } => now + *interval,
            Dial::Accept { .. } => now,
        }
    }
}

/// What the supervisor thread needs.
pub(crate) struct SupervisorConfig {
    pub(crate) link: Arc<Link>,
    pub(crate) counters: Arc<ReconnectCounters>,
    pub(crate) dial: Dial,
    /// The first connection's negotiation, which every later one must match.
    pub(crate) prior: Negotiated,
}

/// The running supervisor; dropping it stops the thread.
pub(crate) struct Supervisor {
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl Supervisor {
    pub(crate) fn spawn(cfg: SupervisorConfig) -> std::io::Result<Self> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut state = State {
            cfg,
            wake: wake.clone(),
            stop: stop.clone(),
            watch: None,
            req: None,
            next_attempt: None,
            log: RateLimit::new(1, LOG_EVERY),
        };
        state.watch = state.cfg.link.main.watch_handle().ok();
        let (name, _) = state.cfg.dial.thread();
        let join = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || state.run())?;
        Ok(Supervisor {
            wake,
            stop,
            join: Some(join),
        })
    }

    /// Make the thread look at the connection now.
    pub(crate) fn poke(&self) {
        // A full counter still wakes the thread.
        let _ = self.wake.write(1);
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.poke();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

struct State {
    cfg: SupervisorConfig,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    /// A duplicate of the current main connection (watched, never read).
    watch: Option<UnixStream>,
    /// A duplicate of the current back-end channel, if any.
    req: Option<UnixStream>,
    /// `Some` while disconnected: when to try next.
    next_attempt: Option<Instant>,
    log: RateLimit,
}

/// Whether a watched socket hung up (without reading it).
fn hung_up(s: &UnixStream) -> bool {
    let mut p = [PollFd::new(s, libc::POLLRDHUP)];
    poll_fds(&mut p, Some(Duration::ZERO)).is_ok_and(|n| n > 0) && p[0].hung_up()
}

impl State {
    /// Installs the thread hook once the VMM set one; false = must stop.
    fn enter_sandbox(&self, entered: &mut bool) -> bool {
        if *entered {
            return true;
        }
        let hook = lock(&self.cfg.link.hook).clone();
        let Some(hook) = hook else {
            return true;
        };
        *entered = true;
        thread::enter(Some(&hook), self.cfg.dial.thread().1)
    }

    fn run(mut self) {
        let mut entered = false;
        while !self.stop.load(Ordering::Acquire) {
            if !self.enter_sandbox(&mut entered) {
                return;
            }
            self.wait();
            if self.stop.load(Ordering::Acquire) || !self.enter_sandbox(&mut entered) {
                break;
            }
            match self.next_attempt {
                None => {
                    if self.failed() {
                        self.go_down();
                    }
                }
                Some(t) if Instant::now() >= t => {
                    if !self.attempt() && self.next_attempt.is_some_and(|n| n <= t) {
                        self.next_attempt = Some(self.cfg.dial.retry_at(Instant::now()));
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Sleep until something may have changed or the next attempt is due.
    /// A server without a back end waits on its listener (a connection
    /// makes it readable); with one, it does not look at the listener, so a
    /// second connection stays queued in the backlog.
    fn wait(&mut self) {
        let listener = match (&self.cfg.dial, self.next_attempt) {
            (Dial::Accept { listener, .. }, Some(t)) if t <= Instant::now() => Some(listener),
            _ => None,
        };
        let timeout = match self.next_attempt {
            Some(_) if listener.is_some() => TICK,
            Some(t) => t.saturating_duration_since(Instant::now()).min(TICK),
            None => TICK,
        };
        let mut fds = vec![PollFd::readable(&*self.wake)];
        if let Some(e) = self.cfg.link.main.broken_event() {
            fds.push(PollFd::readable(e));
        }
        if let Some(l) = listener {
            fds.push(PollFd::readable(l));
        }
        if self.next_attempt.is_none() {
            self.refresh_req();
            for s in self.watch.iter().chain(self.req.iter()) {
                fds.push(PollFd::new(s, libc::POLLRDHUP));
            }
        }
        // A failed poll is a spurious wake-up: the loop re-checks everything.
        let _ = poll_fds(&mut fds, Some(timeout));
        let _ = self.wake.read();
        if let Some(e) = self.cfg.link.main.broken_event() {
            let _ = e.read();
        }
    }

    /// Keep a duplicate of the current back-end channel to watch.
    fn refresh_req(&mut self) {
        let s = self.cfg.link.lock_session(None);
        self.req = s.req_watch.as_ref().and_then(|w| w.try_clone().ok());
    }

    /// Whether the current connection is gone.
    fn failed(&self) -> bool {
        let link = &self.cfg.link;
        if link.main.is_broken() || self.watch.as_ref().is_none_or(hung_up) {
            return true;
        }
        let s = link.lock_session(None);
        let req_gone = s.server.as_ref().is_some_and(|srv| srv.is_finished())
            || s.req_watch.as_ref().is_some_and(hung_up);
        req_gone && s.server.is_some()
    }

    fn go_down(&mut self) {
        let c = &self.cfg.counters;
        c.disconnects.fetch_add(1, Ordering::Relaxed);
        c.connected.store(false, Ordering::Relaxed);
        match &self.cfg.dial {
            Dial::Connect { socket, interval } => log::warn!(
                "vhost-user back end on {socket:?} is gone; reconnecting every {interval:?}"
            ),
            Dial::Accept { socket, .. } => log::warn!(
                "vhost-user back end on {socket:?} is gone; waiting for the next one to connect"
            ),
        }
        let link = &self.cfg.link;
        if let Some(b) = &link.bridge {
            b.link_down();
        }
        link.main.close();
        let mut s = link.lock_session(None);
        s.up = false;
        s.started.clear();
        link.stop_server(&mut s);
        drop(s);
        self.watch = None;
        self.req = None;
        self.next_attempt = Some(self.cfg.dial.retry_at(Instant::now()));
    }

    /// A new connection: connect (client) or take a pending one (server).
    /// `None` if there is none yet; a failed `accept` delays the next try
    /// by a tick, so an error that persists cannot spin the thread.
    fn dial(&mut self) -> Option<UnixStream> {
        let res = match &self.cfg.dial {
            Dial::Connect { socket, .. } => UnixStream::connect(socket).map(Some),
            Dial::Accept { listener, .. } => accept_now(listener),
        };
        match res {
            Ok(Some(s)) => {
                self.cfg.counters.attempts.fetch_add(1, Ordering::Relaxed);
                Some(s)
            }
            Ok(None) => None,
            Err(e) => {
                if let Dial::Connect { .. } = self.cfg.dial {
                    self.cfg.counters.attempts.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.next_attempt = Some(Instant::now() + TICK);
                }
                warn_limited!(
                    self.log,
                    "vhost-user: no back end on {:?} yet: {e}",
                    self.cfg.dial.socket()
                );
                None
            }
        }
    }

    /// One connection attempt; true once connected (and restored).
    fn attempt(&mut self) -> bool {
        let link = self.cfg.link.clone();
        let Some(stream) = self.dial() else {
            return false;
        };
        if let Err(e) = link.main.replace(stream) {
            warn_limited!(
                self.log,
                "vhost-user: cannot use the new connection: {e}",
                e = chain(&e)
            );
            return false;
        }
        let timeout = link.main.timeout();
        let prior = Some(self.cfg.prior);
        let neg = match negotiate_within(&link.main, link.layout, link.iommu, prior, timeout) {
            Ok(n) => n,
            Err(e) => {
                warn_limited!(
                    self.log,
                    "vhost-user: refusing the back end on {:?}: {e}; will retry",
                    self.cfg.dial.socket(),
                    e = chain(&e)
                );
                link.main.close();
                return false;
            }
        };
        self.restore(&link, neg)
    }

    /// The connection is negotiated: program a running device again.
    fn restore(&mut self, link: &Arc<Link>, neg: Negotiated) -> bool {
        // The bridge stays quiet (link down) until `program` starts it on
        // this connection with a full-range INVALIDATE.
        let mut s = link.lock_session(None);
        s.neg = neg;
        s.up = true;
        let want = s.want.clone();
        if let Some(act) = want {
            if let Err(e) = link.program(&mut s, &act, true) {
                warn_limited!(
                    self.log,
                    "vhost-user: restoring the device on the new back end failed: {e}; will retry",
                    e = chain(&e)
                );
                s.up = false;
                s.started.clear();
                link.stop_server(&mut s);
                drop(s);
                if let Some(b) = &link.bridge {
                    b.link_down();
                }
                link.main.close();
                return false;
            }
            self.cfg.counters.restores.fetch_add(1, Ordering::Relaxed);
        }
        drop(s);
        let c = &self.cfg.counters;
        c.reconnects.fetch_add(1, Ordering::Relaxed);
        c.connected.store(true, Ordering::Relaxed);
        log::info!("vhost-user: reconnected to {:?}", self.cfg.dial.socket());
        self.watch = link.main.watch_handle().ok();
        self.next_attempt = None;
        self.log = RateLimit::new(1, LOG_EVERY);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hang_up_is_seen_without_reading() {
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
        assert!(!hung_up(&a));
        drop(b);
        assert!(hung_up(&a));
    }
}
