//! iovmm's own IOTLB-aware vhost-user back end for virtio-net: a test tool.
//!
//! It speaks the raw protocol (vhost 0.18's back-end side has no IOTLB
//! support), keeps a device IOTLB filled by VHOST_USER_IOTLB_MSG, translates
//! every ring and buffer address through it once VIRTIO_F_ACCESS_PLATFORM is
//! negotiated, sends IOTLB misses on the back-end channel and waits for the
//! UPDATE, and moves real frames: TX frames are counted, hashed and
//! optionally appended to a sink file; RX frames can be injected.
//!
//! Every message is recorded for exact protocol checks, counters are
//! exposed, and [`Misbehaviour`] makes it slow, wrong or disconnecting on
//! purpose. [`BackendHandle::probe`] is the security check: does the back
//! end still hold a translation for a range?

pub mod blk;
pub mod iotlb;
pub mod latency;
pub mod memory;
mod net;
pub mod rxgen;
mod server;

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::vhost_user::wire::{IotlbPerm, WireError};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use self::iotlb::DeviceIotlb;
use self::latency::{LatencyStats, MissSample, MissTimer};
use self::memory::MemTable;
use iommu::sync::lock;

/// Errors of the test back end.
#[derive(Debug, Error)]
pub enum BackendError {
    /// The front end sent a message the back end refuses.
    #[error("bad vhost-user message: {0}")]
    BadMessage(String),
    /// A frame violates the wire format.
    #[error("vhost-user framing error")]
    Wire(#[from] WireError),
    /// A socket or file operation failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
    /// The front end closed the connection.
    #[error("front end disconnected")]
    Disconnected,
    /// A queue access waiting for a miss was abandoned so that a front-end
    /// vring message could take the queue's lock; the queue is retried.
    #[error("queue access abandoned for a vring message at {addr:#x}; will retry")]
    Yielded {
        /// The address whose miss was outstanding.
        addr: u64,
    },
    /// An address could not be translated (no IOTLB entry after a miss, or
    /// outside the memory table).
    #[error("cannot translate address {addr:#x} for {perm:?}; the front end gave no mapping")]
    Translate {
        /// The IOVA (or GPA without IOMMU).
        addr: u64,
        /// The access wanted.
        perm: IotlbPerm,
    },
}

/// Ways to make the back end misbehave on purpose.
#[derive(Debug, Clone, Default)]
pub struct Misbehaviour {
    /// Sleep this long before every reply-ack.
    pub ack_delay: Duration,
    /// Close the connection after this many messages were received.
    pub disconnect_after: Option<u64>,
    /// Send a malformed frame (version 2) on the back-end channel as soon as
    /// it is set up.
    pub bogus_backend_msg: bool,
    /// Answer IOTLB_MSG with a reply carrying the wrong request code.
    pub bogus_reply: bool,
    /// Answer IOTLB_MSG with a non-zero ack (and ignore its content).
    pub nack_iotlb: bool,
    /// Protocol feature bits not to offer (e.g. REPLY_ACK or BACKEND_REQ,
    /// to test a front end's refusal).
    pub withhold_protocol: u64,
    /// Apply IOTLB_MSG but never send its ack.
    pub never_ack_iotlb: bool,
    /// Apply IOTLB INVALIDATEs but never ack them (UPDATEs are acked).
    pub never_ack_invalidate: bool,
    /// Close the connection when an IOTLB INVALIDATE arrives (mid-stream).
    pub disconnect_on_invalidate: bool,
    /// Answer IOTLB_MSG with a reply header announcing a payload over the
    /// protocol maximum.
    pub oversized_reply: bool,
    /// Behave for the first IOTLB message of each connection (the front
    /// end's full-range INVALIDATE at connection), so that the IOTLB
    /// misbehaviours above hit the messages that follow it.
    pub spare_first_iotlb: bool,
    /// Ask for this permission on every buffer (not ring) access and miss,
    /// e.g. `Rw` to ask for write access to a TX buffer the guest mapped
    /// read-only, or read access to an RX buffer mapped write-only.
    pub buffer_perm: Option<IotlbPerm>,
    /// Keep the device IOTLB across SET_FEATURES and across connections (a
    /// back end that does not empty it at renegotiation or when the front
    /// end reconnects; the front end must invalidate everything).
    pub keep_iotlb_on_features: bool,
}

/// Configuration of the test back end.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Offer VIRTIO_F_ACCESS_PLATFORM.
    pub access_platform: bool,
    /// Set NEED_REPLY on the misses it sends (DPDK does not).
    pub miss_need_reply: bool,
    /// How long to wait for an UPDATE after a miss.
    pub miss_timeout: Duration,
    /// Append TX frames (u32 native-endian length, then bytes) to this file.
    pub sink: Option<PathBuf>,
    /// Deliberate protocol faults.
    pub misbehave: Misbehaviour,
    /// Generated RX traffic (sequence frames), started with the back end.
    pub rx_gen: Option<rxgen::RxGen>,
    /// Queue every TX frame back for RX with its MACs swapped.
    pub loopback: bool,
    /// A buffer that cannot be translated (refused miss) completes its chain
    /// with used length 0 and the frame is dropped, like a NIC reporting a
    /// DMA fault; without it the queue stops.
    pub complete_faulted: bool,
    /// Serve virtio-blk on this disk instead of virtio-net (`blk` module).
    pub blk: Option<blk::BlkConfig>,
    /// Net queue pairs served (1..=[`MAX_QUEUE_PAIRS`], clamped); GET_QUEUE_NUM
    /// reports twice as many queues.
    pub queue_pairs: usize,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            access_platform: true,
            miss_need_reply: false,
            miss_timeout: Duration::from_secs(2),
            sink: None,
            misbehave: Misbehaviour::default(),
            rx_gen: None,
            loopback: false,
            complete_faulted: false,
            blk: None,
            queue_pairs: 1,
        }
    }
}

/// Number of virtqueues of one queue pair: one RX (0) and one TX (1).
pub const QUEUE_NUM: usize = 2;
/// Most net queue pairs the back end serves (`--queues N`).
pub const MAX_QUEUE_PAIRS: usize = 16;

/// Live counters.
#[derive(Debug, Default)]
pub struct Counters {
    messages: AtomicU64,
    iotlb_updates: AtomicU64,
    iotlb_invalidates: AtomicU64,
    misses_sent: AtomicU64,
    miss_nacks: AtomicU64,
    translation_failures: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_checksum: AtomicU64,
    rx_frames: AtomicU64,
    rx_dropped: AtomicU64,
    bad_messages: AtomicU64,
    rx_bytes: AtomicU64,
    tx_faulted: AtomicU64,
    rx_faulted: AtomicU64,
    invalidate_violations: AtomicU64,
    iotlb_entries_invalidated: AtomicU64,
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CountersSnapshot {
    /// Front-end messages received.
    pub messages: u64,
    /// IOTLB UPDATEs applied.
    pub iotlb_updates: u64,
    /// IOTLB INVALIDATEs applied.
    pub iotlb_invalidates: u64,
    /// MISS requests sent to the front end.
    pub misses_sent: u64,
    /// Non-zero acks received for misses.
    pub miss_nacks: u64,
    /// Accesses that found no translation even after a miss.
    pub translation_failures: u64,
    /// TX frames consumed.
    pub tx_frames: u64,
    /// TX frame bytes (without the virtio-net header).
    pub tx_bytes: u64,
    /// Wrapping sum of the FNV-1a hash of every TX frame.
    pub tx_checksum: u64,
    /// RX frames delivered.
    pub rx_frames: u64,
    /// RX frames dropped (no buffer large enough).
    pub rx_dropped: u64,
    /// Messages refused as malformed or unsupported.
    pub bad_messages: u64,
    /// RX frame bytes delivered (without the virtio-net header).
    pub rx_bytes: u64,
    /// TX chains completed without transfer because a buffer faulted.
    pub tx_faulted: u64,
    /// RX chains completed with length 0 because a buffer faulted.
    pub rx_faulted: u64,
    /// INVALIDATEs after which some of their range was still translatable,
    /// checked the moment each one was applied (must stay 0).
    pub invalidate_violations: u64,
    /// IOTLB entries dropped by INVALIDATEs.
    pub iotlb_entries_invalidated: u64,
}

impl Counters {
    pub(crate) fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Read every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            messages: l(&self.messages),
            iotlb_updates: l(&self.iotlb_updates),
            iotlb_invalidates: l(&self.iotlb_invalidates),
            misses_sent: l(&self.misses_sent),
            miss_nacks: l(&self.miss_nacks),
            translation_failures: l(&self.translation_failures),
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_checksum: l(&self.tx_checksum),
            rx_frames: l(&self.rx_frames),
            rx_dropped: l(&self.rx_dropped),
            bad_messages: l(&self.bad_messages),
            rx_bytes: l(&self.rx_bytes),
            tx_faulted: l(&self.tx_faulted),
            rx_faulted: l(&self.rx_faulted),
            invalidate_violations: l(&self.invalidate_violations),
            iotlb_entries_invalidated: l(&self.iotlb_entries_invalidated),
        }
    }
}

/// One received front-end message, as it came off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedMsg {
    /// Request code.
    pub request: u32,
    /// Header flags.
    pub flags: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Number of file descriptors attached.
    pub nfds: usize,
}

/// Most messages recorded; later ones are only counted.
pub const MAX_RECORDS: usize = 100_000;

/// State of one virtqueue as configured by the front end.
#[derive(Debug, Default)]
pub(crate) struct VringState {
    pub(crate) num: u16,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    pub(crate) last_avail: u16,
    pub(crate) used_idx: u16,
    pub(crate) kick: Option<Arc<File>>,
    pub(crate) call: Option<File>,
    pub(crate) enabled: bool,
    pub(crate) started: bool,
}

/// Negotiated state of the connection.
#[derive(Debug, Default)]
pub(crate) struct Negotiated {
    pub(crate) features: u64,
    pub(crate) protocol: u64,
    pub(crate) owner: bool,
}

/// Everything the server, the data path and the handle share.
pub(crate) struct Shared {
    pub(crate) config: BackendConfig,
    pub(crate) neg: Mutex<Negotiated>,
    /// Two per queue pair (receiveq*k* at 2*k*, transmitq*k* at 2*k*+1).
    pub(crate) vrings: Vec<Mutex<VringState>>,
    /// TX frames consumed per queue pair.
    pub(crate) tx_per_pair: Vec<AtomicU64>,
    pub(crate) mem: Mutex<Arc<MemTable>>,
    pub(crate) iotlb: Mutex<DeviceIotlb>,
    /// The message being handled is spared the IOTLB misbehaviours
    /// (`Misbehaviour::spare_first_iotlb`).
    pub(crate) sparing: std::sync::atomic::AtomicBool,
    pub(crate) iotlb_cv: Condvar,
    pub(crate) backend_chan: Mutex<Option<UnixStream>>,
    pub(crate) counters: Counters,
    pub(crate) records: Mutex<Vec<RecordedMsg>>,
    pub(crate) rx_pending: Mutex<VecDeque<Vec<u8>>>,
    pub(crate) sink: Mutex<Option<File>>,
    pub(crate) wake: EventFd,
    pub(crate) stop: AtomicBool,
    pub(crate) connections_ended: AtomicU64,
    pub(crate) miss_timer: Mutex<MissTimer>,
    /// Server threads waiting for a vring lock (the data path yields).
    pub(crate) vring_waiters: AtomicU64,
    /// A queue yielded and must be serviced again without a kick.
    pub(crate) retry: AtomicBool,
    /// The connection being served (to cut it on [`BackendHandle::kill`]).
    pub(crate) current: Mutex<Option<UnixStream>>,
    /// The listening socket, if any (shut down on [`BackendHandle::kill`]).
    pub(crate) listener: Mutex<Option<UnixListener>>,
    /// The disk in blk mode.
    pub(crate) blk: Option<blk::BlkDevice>,
}

impl Shared {
    fn new(config: BackendConfig) -> Result<Self, BackendError> {
        let sink = match &config.sink {
            Some(p) => Some(File::options().create(true).append(true).open(p)?),
            None => None,
        };
        let blk = config.blk.as_ref().map(blk::BlkDevice::open).transpose()?;
        let pairs = config.queue_pairs.clamp(1, MAX_QUEUE_PAIRS);
        Ok(Shared {
            vrings: (0..QUEUE_NUM * pairs).map(|_| Mutex::default()).collect(),
            tx_per_pair: (0..pairs).map(|_| AtomicU64::new(0)).collect(),
            config,
            neg: Mutex::default(),
            mem: Mutex::new(Arc::new(MemTable::default())),
            iotlb: Mutex::default(),
            iotlb_cv: Condvar::new(),
            backend_chan: Mutex::new(None),
            counters: Counters::default(),
            records: Mutex::new(Vec::new()),
            rx_pending: Mutex::new(VecDeque::new()),
            sink: Mutex::new(sink),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            connections_ended: AtomicU64::new(0),
            sparing: std::sync::atomic::AtomicBool::new(false),
            miss_timer: Mutex::default(),
            vring_waiters: AtomicU64::new(0),
            retry: AtomicBool::new(false),
            current: Mutex::new(None),
            listener: Mutex::new(None),
            blk,
        })
    }

    /// Whether addresses are IOVAs (ACCESS_PLATFORM negotiated).
    pub(crate) fn iommu_on(&self) -> bool {
        lock(&self.neg).features & devices::vhost_user::wire::VIRTIO_F_ACCESS_PLATFORM != 0
    }

    /// Forget everything negotiated (connection end, RESET_OWNER).
    pub(crate) fn reset(&self) {
        *lock(&self.neg) = Negotiated::default();
        for v in &self.vrings {
            *lock(v) = VringState::default();
        }
        *lock(&self.mem) = Arc::new(MemTable::default());
        if !self.config.misbehave.keep_iotlb_on_features {
            lock(&self.iotlb).clear();
        }
        *lock(&self.backend_chan) = None;
    }

    /// Lock vring `index` for a front-end message. The data path may hold
    /// it while it waits for a miss whose UPDATE is queued behind this very
    /// message (QEMU sends vring setup and its unsolicited UPDATEs back to
    /// back), so the waiter is told to give way.
    pub(crate) fn lock_vring(&self, index: usize) -> Option<MutexGuard<'_, VringState>> {
        let v = self.vrings.get(index)?;
        self.vring_waiters.fetch_add(1, Ordering::AcqRel);
        {
            // Taking the IOTLB lock orders this with the waiter's check.
            let _tlb = lock(&self.iotlb);
            self.iotlb_cv.notify_all();
        }
        let g = lock(v);
        self.vring_waiters.fetch_sub(1, Ordering::AcqRel);
        Some(g)
    }

    pub(crate) fn wake_datapath(&self) {
        // A full counter still wakes the poller; ignore EAGAIN.
        let _ = self.wake.write(1);
    }
}

/// Starts test back ends.
pub struct TestBackend;

impl TestBackend {
    /// Serve one already-connected main socket (e.g. a socketpair end).
    pub fn serve_stream(
        stream: UnixStream,
        config: BackendConfig,
    ) -> Result<BackendHandle, BackendError> {
        let shared = Arc::new(Shared::new(config)?);
        let srv = Arc::clone(&shared);
        let server = std::thread::Builder::new()
            .name("test-backend-main".into())
            .spawn(move || server::serve_connection(&srv, stream))?;
        BackendHandle::start(shared, server)
    }

    /// The client role, for a front end that listens (iovmm's `server=on`): connect to `path`
    /// and serve that one connection. Like DPDK's vhost client, it retries while nobody
    /// listens there yet (no socket file, or connection refused), until `within` has passed.
    pub fn connect(
        path: &Path,
        config: BackendConfig,
        within: Duration,
    ) -> Result<BackendHandle, BackendError> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        Self::serve_stream(stream, config)
    }

    /// Listen on `path` and serve connections one after another.
    pub fn listen(path: &Path, config: BackendConfig) -> Result<BackendHandle, BackendError> {
        // A stale socket file from an earlier run would make bind fail.
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let shared = Arc::new(Shared::new(config)?);
        *lock(&shared.listener) = Some(listener.try_clone()?);
        let srv = Arc::clone(&shared);
        let server = std::thread::Builder::new()
            .name("test-backend-accept".into())
            .spawn(move || server::accept_loop(&srv, &listener))?;
        BackendHandle::start(shared, server)
    }
}

/// A running test back end.
pub struct BackendHandle {
    shared: Arc<Shared>,
    server: Option<JoinHandle<Result<(), BackendError>>>,
    datapath: Option<JoinHandle<()>>,
}

impl BackendHandle {
    fn start(
        shared: Arc<Shared>,
        server: JoinHandle<Result<(), BackendError>>,
    ) -> Result<Self, BackendError> {
        let dp = Arc::clone(&shared);
        let datapath = std::thread::Builder::new()
            .name("test-backend-datapath".into())
            .spawn(move || match dp.blk {
                Some(_) => blk::datapath_loop(&dp),
                None => net::datapath_loop(&dp),
            })?;
        if let Some(gen) = shared.config.rx_gen {
            let g = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("test-backend-rxgen".into())
                .spawn(move || rxgen::generate(&g, gen))?;
        }
        Ok(BackendHandle {
            shared,
            server: Some(server),
            datapath: Some(datapath),
        })
    }

    /// Current counters.
    pub fn counters(&self) -> CountersSnapshot {
        self.shared.counters.snapshot()
    }

    /// TX frames consumed per queue pair (index = pair).
    pub fn tx_frames_per_pair(&self) -> Vec<u64> {
        let per = &self.shared.tx_per_pair;
        per.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// The blk counters (`None` in net mode).
    pub fn blk_counters(&self) -> Option<blk::BlkSnapshot> {
        self.shared.blk.as_ref().map(blk::BlkDevice::snapshot)
    }

    /// Every message received so far.
    pub fn records(&self) -> Vec<RecordedMsg> {
        lock(&self.shared.records).clone()
    }

    /// A second handle on the back-end request channel (`None` before
    /// SET_BACKEND_REQ_FD), for sending arbitrary frames as a hostile back end.
    pub fn backend_channel(&self) -> Option<UnixStream> {
        lock(&self.shared.backend_chan)
            .as_ref()
            .and_then(|s| s.try_clone().ok())
    }

    /// Number of entries in the device IOTLB.
    pub fn iotlb_len(&self) -> usize {
        lock(&self.shared.iotlb).len()
    }

    /// Negotiated virtio features.
    pub fn features(&self) -> u64 {
        lock(&self.shared.neg).features
    }

    /// The security check: whether an access to `iova..iova+len` would
    /// succeed right now without asking the front end (no miss is sent).
    pub fn probe(&self, iova: u64, len: u64) -> bool {
        net::probe(&self.shared, iova, len)
    }

    /// Read `len` bytes at `addr` through the IOTLB as the device would,
    /// sending a miss and waiting for the UPDATE if needed.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, BackendError> {
        let mut buf = vec![0u8; len];
        net::Access::new(&self.shared).read(addr, &mut buf)?;
        Ok(buf)
    }

    /// Queue a frame for the RX queue; it is delivered when a buffer is available.
    pub fn inject_rx(&self, frame: Vec<u8>) {
        lock(&self.shared.rx_pending).push_back(frame);
        self.shared.wake_datapath();
    }

    /// Wait until `pred` holds for the counters, or `timeout` passes.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&CountersSnapshot) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.counters()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Every miss answered by an UPDATE so far: when it was sent and how
    /// long the front end took (MISS written to UPDATE received).
    pub fn miss_samples(&self) -> Vec<MissSample> {
        lock(&self.shared.miss_timer).samples().to_vec()
    }

    /// p50/p99/max of the miss service latencies so far (`None` before the
    /// first answered miss).
    pub fn miss_latency(&self) -> Option<LatencyStats> {
        LatencyStats::from_samples(self.miss_samples().iter().map(|s| s.latency))
    }

    /// How many front-end connections have ended so far.
    pub fn connections_ended(&self) -> u64 {
        self.shared.connections_ended.load(Ordering::Acquire)
    }

    /// Whether the server thread ended (connection closed, for serve_stream).
    pub fn server_finished(&self) -> bool {
        match &self.server {
            Some(s) => s.is_finished(),
            None => true,
        }
    }

    /// Die like a killed back-end process: stop accepting connections and
    /// cut the current one (the socket file stays, refusing connections).
    pub fn kill(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(l) = lock(&self.shared.listener).take() {
            use std::os::fd::AsRawFd;
            // SAFETY: shutdown on a descriptor we own; it only wakes the
            // accept loop (EINVAL) and refuses new connections.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(c) = lock(&self.shared.current).take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Cut the current connection but keep listening, like a back end
    /// restarting in place (with `keep_iotlb_on_features`, its IOTLB
    /// survives into the next connection).
    pub fn cut_connection(&self) {
        if let Some(c) = lock(&self.shared.current).take() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Wait for the server thread to end and return its result.
    pub fn join_server(&mut self) -> Option<Result<(), BackendError>> {
        self.server.take().and_then(|s| s.join().ok())
    }
}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake_datapath();
        if let Some(d) = self.datapath.take() {
            let _ = d.join();
        }
        // The server thread may be blocked in accept/recv; it is detached and
        // ends with the process or its connection.
    }
}

/// A memfd of `size` bytes, for tests that need shareable memory.
#[cfg(test)]
pub(crate) fn test_memfd(size: u64) -> File {
    use std::os::fd::FromRawFd;
    // SAFETY: the name is a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"iovmm-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a fresh, owned descriptor.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .unwrap_or_else(|e| panic!("memfd set_len: {e}"));
    file
}

#[cfg(test)]
mod tests;
