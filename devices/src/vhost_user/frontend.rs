//! The generic vhost-user frontend device: a [`VirtioDevice`] whose data path
//! runs in an external back end (DPDK, the test back end, ...).
//!
//! Construction ([`VhostUserDevice::connect`]) connects to the back end and
//! negotiates: SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES (and
//! GET_QUEUE_NUM with MQ), refusing back ends that lack what the device
//! needs. [`VirtioDevice::activate`] programs the back end (SET_FEATURES,
//! SET_MEM_TABLE, the back-end request channel when behind a vIOMMU, then
//! each vring) and [`VirtioDevice::reset`] stops the rings with
//! GET_VRING_BASE. See the `vhost_user` module documentation for the API the
//! VMM uses.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iommu::error::chain;
use iommu::RequesterId;
use thiserror::Error;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::bridge::{IotlbBridge, IotlbPolicy};
use super::channel::{ChannelError, IotlbChannel, MainSocket, DEFAULT_ACK_TIMEOUT};
use super::ctrl::CtrlQueue;
use super::kind::VhostUserKind;
use super::listener::accept_until;
use super::mq::{BadQueuePairs, QueueLayout};
use super::reconnect::{Dial, ReconnectCounters, Supervisor, SupervisorConfig};
use super::relay::CallRelay;
use super::session::{
    negotiate_within, Activation, BoundedGuard, BoundedMutex, Link, Negotiated, RingSetup, Session,
};
use super::stats::VhostUserStats;
use super::wire::{
    PROTOCOL_F_BACKEND_REQ, PROTOCOL_F_CONFIG, PROTOCOL_F_REPLY_ACK,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use crate::thread::ThreadHook;
use crate::viommu::Viommu;
use crate::virtio::{ActivateContext, VirtioDevice, VirtioDeviceError, VirtioInterruptType};

mod ctrl_setup;

/// Default size of every queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Default MAC address of a net device (locally administered).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x69, 0x6f, 0x76, 0x6d, 0x01];

/// How to build a [`VhostUserDevice`].
#[derive(Debug, Clone)]
pub struct VhostUserConfig {
    /// Device type.
    pub kind: VhostUserKind,
    /// The back end's listening socket.
    pub socket: PathBuf,
    /// The device sits behind a vIOMMU: offer VIRTIO_F_ACCESS_PLATFORM and
    /// run the IOTLB protocol.
    pub iommu: bool,
    /// Maximum size of every queue (a power of two, at most 32768).
    pub queue_size: u16,
    /// MAC address served in a net device's configuration (unless the back
    /// end serves the configuration itself).
    pub mac: [u8; 6],
    /// Capacity of a blk device in 512-byte sectors, used when the back end
    /// does not serve the configuration (no CONFIG protocol feature).
    pub capacity_sectors: Option<u64>,
    /// Bound on every reply wait on the main socket.
    pub timeout: Duration,
    /// What the IOTLB bridge does with MAP notifications.
    pub policy: IotlbPolicy,
    /// Reconnect to a back end that went away, trying every this long
    /// (`None` or zero: a dead back end breaks the device for good). Not
    /// used in server mode ([`VhostUserDevice::accept`]), which always
    /// accepts the next back end.
    pub reconnect: Option<Duration>,
    /// Queue pairs of a net device (`queues=N`, 1..=16; 1 for blk). With
    /// more than one the device has a control queue (see [`super::mq`]).
    pub queue_pairs: u16,
}

impl VhostUserConfig {
    /// A virtio-net device on `socket`, not behind a vIOMMU.
    pub fn net(socket: impl Into<PathBuf>) -> Self {
        VhostUserConfig {
            kind: VhostUserKind::Net,
            socket: socket.into(),
            iommu: false,
            queue_size: DEFAULT_QUEUE_SIZE,
            mac: DEFAULT_MAC,
            capacity_sectors: None,
            timeout: DEFAULT_ACK_TIMEOUT,
            policy: IotlbPolicy::MissDriven,
            reconnect: None,
            queue_pairs: 1,
        }
    }

    /// A virtio-blk device on `socket`, not behind a vIOMMU.
    pub fn blk(socket: impl Into<PathBuf>, capacity_sectors: Option<u64>) -> Self {
        VhostUserConfig {
            kind: VhostUserKind::Blk,
            capacity_sectors,
            ..Self::net(socket)
        }
    }
}

/// Errors of the vhost-user frontend device.
#[derive(Debug, Error)]
pub enum VhostUserError {
    /// The socket could not be connected.
    #[error("cannot connect to the vhost-user back end at {path}; start the back end (listening on that path) first")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A request failed (refused, timed out, or the back end went away).
    #[error("vhost-user {step} failed")]
    Request {
        /// The request or step.
        step: &'static str,
        /// What the socket reported.
        source: ChannelError,
    },
    /// The back end lacks features the device needs.
    #[error("the vhost-user back end does not offer {missing:?}, which are required {why}")]
    MissingFeatures {
        /// Names of the missing features.
        missing: Vec<&'static str>,
        /// Why they are required.
        why: &'static str,
    },
    /// The back end has fewer queues than the device type needs.
    #[error("the vhost-user back end supports {offered} queues (GET_QUEUE_NUM) but the device needs {needed} (2 per net queue pair); start the back end with more queues or lower queues=N")]
    QueueNum {
        /// Queues the back end reports.
        offered: u64,
        /// Queues needed.
        needed: usize,
    },
    /// A blk back end without the CONFIG protocol feature and no capacity given.
    #[error("vhost-user blk: the back end cannot serve the configuration (no CONFIG protocol feature); give the capacity in the device options")]
    MissingCapacity,
    /// `queues=N` out of range.
    #[error(transparent)]
    QueuePairs(#[from] BadQueuePairs),
    /// The queue size option is not usable.
    #[error("queue size {0} is invalid; use a power of two between 1 and 32768")]
    QueueSize(u16),
    /// Guest RAM is not file-backed, so it cannot be shared.
    #[error("guest memory at GPA {gpa:#x} is not backed by a shareable file; vhost-user needs memfd-backed guest RAM")]
    MemoryNotShared {
        /// Start of the region.
        gpa: u64,
    },
    /// A ring address (no vIOMMU) is not in guest RAM.
    #[error("queue {queue}: ring address {addr:#x} is not in guest RAM; the guest driver programmed a bad address")]
    RingAddress {
        /// Queue index.
        queue: usize,
        /// The address.
        addr: u64,
    },
    /// The queues handed to `activate` do not match the device type.
    #[error("activation got queue indices {got:?}, the device needs 0..{needed}")]
    Queues {
        /// Indices received.
        got: Vec<usize>,
        /// Number of queues needed.
        needed: usize,
    },
    /// A device behind a vIOMMU was started before the VMM set the IOMMU.
    #[error("the device is behind a vIOMMU but no translation was set; call set_translation before the guest starts")]
    NoTranslation,
    /// Translation was configured on a device without a vIOMMU.
    #[error("set_translation on a vhost-user device created without iommu=on")]
    NotBehindIommu,
    /// The driver refused ACCESS_PLATFORM on a device behind a vIOMMU.
    #[error("the guest driver did not accept VIRTIO_F_ACCESS_PLATFORM; refusing to let the back end bypass the vIOMMU")]
    AccessPlatformNotAcked,
    /// The back end failed earlier; the device cannot be used again.
    #[error("the vhost-user back end failed earlier and the device is broken; restart the back end and the VM")]
    Broken,
    /// A thread or eventfd could not be created.
    #[error("cannot create a vhost-user helper thread or eventfd: {0}")]
    Resource(#[source] std::io::Error),
    /// A reconnected back end lacks features the device already relies on.
    #[error("the new vhost-user back end no longer offers features {features:#x} / protocol features {protocol:#x} that the device uses; start a back end with the same features")]
    FeaturesLost {
        /// Missing virtio feature bits.
        features: u64,
        /// Missing protocol feature bits.
        protocol: u64,
    },
    /// A queue has neither an irqfd nor a relayed call eventfd (internal).
    #[error("queue {0} has no call eventfd")]
    NoCallFd(usize),
    /// Server mode: the socket could not be created.
    #[error("cannot listen on the vhost-user socket {path:?}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Server mode: another process listens on the socket path.
    #[error("the vhost-user socket {0:?} is in use by another process; give each VM its own path")]
    SocketInUse(PathBuf),
    /// Server mode: the socket path exists and is not a socket.
    #[error("{0:?} exists and is not a socket; iovmm does not replace it")]
    NotASocket(PathBuf),
    /// Server mode: accepting a connection failed.
    #[error("cannot accept a vhost-user back end on {path:?}")]
    Accept {
        /// The socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Server mode: no usable back end connected in time (`last`: why the
    /// last one that did connect was refused).
    #[error("no usable vhost-user back end connected to {path:?} within {waited:?}; start the back end as a client of that socket, or raise wait=SECS")]
    NoBackend {
        /// The socket path.
        path: PathBuf,
        /// How long the VMM waited.
        waited: Duration,
        /// Why the last connection was refused, if one came.
        #[source]
        last: Option<Box<VhostUserError>>,
    },
}

fn check_queue_size(size: u16) -> Result<(), VhostUserError> {
    if size == 0 || size > 32768 || !size.is_power_of_two() {
        return Err(VhostUserError::QueueSize(size));
    }
    Ok(())
}

fn step(step: &'static str) -> impl FnOnce(ChannelError) -> VhostUserError {
    move |source| VhostUserError::Request { step, source }
}

/// Names of the features a device behind a vIOMMU needs but `features`
/// (virtio) and `protocol` (offered protocol features) lack.
pub fn missing_for_iommu(features: u64, protocol: u64) -> Vec<&'static str> {
    let mut missing = Vec::new();
    if features & VIRTIO_F_ACCESS_PLATFORM == 0 {
        missing.push("VIRTIO_F_ACCESS_PLATFORM");
    }
    if features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
        missing.push("VHOST_USER_F_PROTOCOL_FEATURES");
    }
    if protocol & PROTOCOL_F_BACKEND_REQ == 0 {
        missing.push("VHOST_USER_PROTOCOL_F_BACKEND_REQ");
    }
    if protocol & PROTOCOL_F_REPLY_ACK == 0 {
        missing.push("VHOST_USER_PROTOCOL_F_REPLY_ACK");
    }
    missing
}

/// The features offered to the guest for a back end offering `backend`.
pub fn guest_features(kind: VhostUserKind, iommu: bool, backend: u64, backend_config: bool) -> u64 {
    let ap = if iommu { VIRTIO_F_ACCESS_PLATFORM } else { 0 };
    (backend & kind.passthrough_features(backend_config))
        | kind.local_features(backend_config)
        | VIRTIO_F_VERSION_1
        | ap
}

/// The SET_FEATURES value for the driver's `acked` features: only what the
/// back end offered, plus VHOST_USER_F_PROTOCOL_FEATURES when it offered it.
pub fn backend_features(acked: u64, backend: u64) -> u64 {
    (acked & backend) | (backend & VHOST_USER_F_PROTOCOL_FEATURES)
}

/// Device-wide counters that outlive activations.
#[derive(Debug, Default)]
struct DeviceCounters {
    activations: AtomicU64,
    broken: AtomicBool,
}

/// A cloneable handle reading a device's counters after the device itself
/// was moved into the transport.
#[derive(Clone)]
pub struct VhostUserStatsHandle {
    main: Arc<MainSocket>,
    bridge: Option<Arc<IotlbBridge>>,
    counters: Arc<DeviceCounters>,
    reconnect: Arc<ReconnectCounters>,
}

impl VhostUserStatsHandle {
    /// The current counters.
    pub fn snapshot(&self) -> VhostUserStats {
        VhostUserStats {
            iotlb: self.main.stats(),
            bridge: self.bridge.as_ref().map(|b| b.stats()).unwrap_or_default(),
            activations: self.counters.activations.load(Ordering::Relaxed),
            broken: self.counters.broken.load(Ordering::Relaxed) || self.main.is_broken(),
            reconnect: self.reconnect.snapshot(),
        }
    }
}

/// What exists while the device is active. Dropping it stops the helper
/// threads (also on a failed activation).
#[derive(Default)]
struct Running {
    queues: Vec<(usize, Queue, EventFd)>,
    relay: Option<CallRelay>,
    ctrl: Option<CtrlQueue>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(r) = self.relay.take() {
            r.stop();
        }
    }
}

/// A virtio device served by a vhost-user back end.
pub struct VhostUserDevice {
    kind: VhostUserKind,
    layout: QueueLayout,
    /// The vIOMMU and requester id (behind a vIOMMU), for the control queue.
    translator: Mutex<Option<(Arc<dyn Viommu>, RequesterId)>>,
    iommu: bool,
    queue_sizes: Vec<u16>,
    link: Arc<Link>,
    main: Arc<MainSocket>,
    neg: Negotiated,
    avail: u64,
    acked: u64,
    /// `None`: the back end serves the configuration (GET_CONFIG).
    local_config: Option<Vec<u8>>,
    /// The last configuration read from the back end (served while it is
    /// reconnecting).
    config_cache: Option<Vec<u8>>,
    bridge: Option<Arc<IotlbBridge>>,
    running: Option<Running>,
    counters: Arc<DeviceCounters>,
    thread_hook: Option<ThreadHook>,
    /// `Some` with `reconnect` > 0 or in server mode; stops its thread
    /// when dropped.
    supervisor: Option<Supervisor>,
    reconnect: Arc<ReconnectCounters>,
    timeout: Duration,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("kind", &self.kind)
            .field("iommu", &self.iommu)
            .field("backend_features", &self.neg.features)
            .field("protocol_features", &self.neg.protocol)
            .field("active", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl VhostUserDevice {
    /// Connect to `cfg.socket` and negotiate with the back end.
    pub fn connect(cfg: VhostUserConfig) -> Result<Self, VhostUserError> {
        let stream =
            UnixStream::connect(&cfg.socket).map_err(|source| VhostUserError::Connect {
                path: cfg.socket.clone(),
                source,
            })?;
        Self::from_stream(stream, cfg)
    }

    /// Server mode: wait at most `wait` for a back end to connect to
    /// `listener` (bound with [`super::listener::bind`] at `cfg.socket`) and
    /// negotiate with it. A connection that fails negotiation (garbage, a
    /// silent client, missing features) is closed and the next one is
    /// accepted until `wait` has passed. The device keeps the listener: its
    /// supervisor thread accepts the next back end whenever the current one
    /// is gone (`cfg.reconnect` is not used).
    pub fn accept(
        listener: UnixListener,
        cfg: VhostUserConfig,
        wait: Duration,
    ) -> Result<Self, VhostUserError> {
        check_queue_size(cfg.queue_size)?;
        let path = cfg.socket.clone();
        let deadline = Instant::now() + wait;
        let mut last: Option<Box<VhostUserError>> = None;
        log::info!("vhost-user: waiting up to {wait:?} for a back end to connect to {path:?}");
        loop {
            let accepted =
                accept_until(&listener, deadline).map_err(|source| VhostUserError::Accept {
                    path: path.clone(),
                    source,
                })?;
            let Some(stream) = accepted else {
                return Err(VhostUserError::NoBackend {
                    path,
                    waited: wait,
                    last,
                });
            };
            let dial = Dial::Accept {
                socket: path.clone(),
                listener: listener.try_clone().map_err(VhostUserError::Resource)?,
            };
            match Self::build(stream, cfg.clone(), Some(dial)) {
                Ok(dev) => return Ok(dev),
                Err(e) => {
                    log::warn!(
                        "vhost-user: refusing the back end that connected to {path:?}: {e}",
                        e = chain(&e)
                    );
                    last = Some(Box::new(e));
                }
            }
        }
    }

    /// Negotiate over an already-connected socket (`cfg.socket` is only
    /// used in messages).
    pub fn from_stream(stream: UnixStream, cfg: VhostUserConfig) -> Result<Self, VhostUserError> {
        let dial = cfg
            .reconnect
            .filter(|d| !d.is_zero())
            .map(|interval| Dial::Connect {
                socket: cfg.socket.clone(),
                interval,
            });
        Self::build(stream, cfg, dial)
    }

    /// The device on a connected socket; with `dial`, a supervisor thread
    /// that gets the next connection when this one is gone.
    fn build(
        stream: UnixStream,
        cfg: VhostUserConfig,
        dial: Option<Dial>,
    ) -> Result<Self, VhostUserError> {
        let layout = QueueLayout::new(cfg.kind, cfg.queue_pairs)?;
        let n = layout.backend_queues();
        check_queue_size(cfg.queue_size)?;
        let main = MainSocket::new(stream, n as u64, cfg.timeout).map_err(step("socket setup"))?;
        let main = Arc::new(main);
        let neg = negotiate_within(&main, layout, cfg.iommu, None, cfg.timeout)?;
        let backend_config = neg.protocol & PROTOCOL_F_CONFIG != 0;
        let local_config = if backend_config {
            None
        } else {
            let capacity = match (cfg.kind, cfg.capacity_sectors) {
                (VhostUserKind::Blk, None) => return Err(VhostUserError::MissingCapacity),
                (_, c) => c.unwrap_or(0),
            };
            let mut c = cfg.kind.local_config(cfg.mac, capacity);
            layout.patch_config(&mut c);
            Some(c)
        };
        let bridge = cfg.iommu.then(|| {
            let chan: Arc<dyn IotlbChannel> = main.clone();
            Arc::new(IotlbBridge::new(chan, cfg.policy))
        });
        let link = Arc::new(Link {
            kind: cfg.kind,
            layout,
            iommu: cfg.iommu,
            main: main.clone(),
            bridge: bridge.clone(),
            session: BoundedMutex::new(Session {
                neg,
                up: true,
                want: None,
                started: Vec::new(),
                server: None,
                req_watch: None,
            }),
            hook: Mutex::new(None),
        });
        let reconnect = Arc::new(ReconnectCounters::new(dial.is_some()));
        let mut dev = VhostUserDevice {
            kind: cfg.kind,
            layout,
            translator: Mutex::new(None),
            iommu: cfg.iommu,
            queue_sizes: vec![cfg.queue_size; layout.device_queues()],
            avail: guest_features(cfg.kind, cfg.iommu, neg.features, backend_config)
                | layout.local_features(),
            link: link.clone(),
            main,
            neg,
            acked: 0,
            local_config,
            config_cache: None,
            bridge,
            running: None,
            counters: Arc::default(),
            thread_hook: None,
            supervisor: None,
            reconnect: reconnect.clone(),
            timeout: cfg.timeout,
        };
        if backend_config {
            // Fail now rather than show the guest an empty configuration.
            dev.config_cache = Some(dev.backend_config()?);
        }
        if let Some(dial) = dial {
            let sup = SupervisorConfig {
                link,
                counters: reconnect,
                dial,
                prior: neg,
            };
            dev.supervisor = Some(Supervisor::spawn(sup).map_err(VhostUserError::Resource)?);
        }
        Ok(dev)
    }

    /// The IOTLB bridge (only behind a vIOMMU), to register in the vIOMMU's
    /// `NotifierSet` and to configure with [`IotlbBridge::set_translation`].
    pub fn bridge(&self) -> Option<Arc<IotlbBridge>> {
        self.bridge.clone()
    }

    /// Set the IOMMU this device's DMA goes through (see
    /// [`IotlbBridge::set_translation`]).
    pub fn set_translation(
        &self,
        viommu: Arc<dyn Viommu>,
        rid: RequesterId,
    ) -> Result<(), VhostUserError> {
        let bridge = self.bridge.as_ref().ok_or(VhostUserError::NotBehindIommu)?;
        *iommu::sync::lock(&self.translator) = Some((viommu.clone(), rid));
        bridge.set_translation(viommu, rid);
        Ok(())
    }

    /// Virtio features the back end offered.
    pub fn backend_features(&self) -> u64 {
        self.neg.features
    }

    /// Protocol features negotiated with the back end.
    pub fn protocol_features(&self) -> u64 {
        self.neg.protocol
    }

    /// The device type.
    pub fn kind(&self) -> VhostUserKind {
        self.kind
    }

    /// Whether the back end failed and the device cannot run again (never
    /// with reconnection: the device recovers when a back end comes back).
    pub fn is_broken(&self) -> bool {
        self.supervisor.is_none()
            && (self.counters.broken.load(Ordering::Relaxed) || self.main.is_broken())
    }

    /// A handle to read the counters later.
    pub fn stats_handle(&self) -> VhostUserStatsHandle {
        VhostUserStatsHandle {
            main: self.main.clone(),
            bridge: self.bridge.clone(),
            counters: self.counters.clone(),
            reconnect: self.reconnect.clone(),
        }
    }

    /// The current counters.
    pub fn stats(&self) -> VhostUserStats {
        self.stats_handle().snapshot()
    }

    fn backend_config(&self) -> Result<Vec<u8>, VhostUserError> {
        let len = self.kind.config_len();
        let buf = vec![0u8; len];
        let size = u32::try_from(len).unwrap_or(u32::MAX);
        let (_, data) = self.link.request("GET_CONFIG", |fe| {
            fe.get_config(0, size, VhostUserConfigFlags::empty(), &buf)
        })?;
        Ok(data)
    }

    /// The session lock, bounded by the channel timeout with reconnection
    /// (the supervisor may hold it while it restores the device).
    fn session(&self) -> BoundedGuard<'_, Session> {
        let bound = self.supervisor.as_ref().map(|_| self.timeout);
        self.link.lock_session(bound)
    }

    /// GET_CONFIG; while reconnecting, the last configuration read.
    fn read_backend_config(&mut self) -> Option<Vec<u8>> {
        let s = self.session();
        let res = if s.up {
            self.backend_config()
        } else {
            Err(VhostUserError::Request {
                step: "GET_CONFIG",
                source: ChannelError::Broken,
            })
        };
        drop(s);
        match res {
            Ok(c) => {
                self.config_cache = Some(c.clone());
                Some(c)
            }
            Err(e) if self.supervisor.is_some() => {
                log::debug!("vhost-user: configuration from cache: {}", chain(&e));
                self.config_cache.clone()
            }
            Err(e) => {
                log::warn!(
                    "vhost-user: reading the device configuration failed: {}",
                    chain(&e)
                );
                self.mark_broken_if_dead();
                None
            }
        }
    }
}

impl VhostUserDevice {
    /// Check the activation's queues: exactly indices 0..n, in order.
    fn check_queues(&self, ctx: &ActivateContext) -> Result<(), VhostUserError> {
        let got: Vec<usize> = ctx.queues.iter().map(|q| q.0).collect();
        let needed = self.layout.active(self.acked).0;
        if got != (0..needed).collect::<Vec<_>>() {
            return Err(VhostUserError::Queues { got, needed });
        }
        Ok(())
    }

    /// Checks that need no back end: queues, and behind a vIOMMU the
    /// translation and the driver's ACCESS_PLATFORM.
    fn check(&self, ctx: &ActivateContext) -> Result<(), VhostUserError> {
        self.check_queues(ctx)?;
        if let Some(bridge) = &self.bridge {
            if self.acked & VIRTIO_F_ACCESS_PLATFORM == 0 {
                return Err(VhostUserError::AccessPlatformNotAcked);
            }
            if !bridge.has_translation() {
                return Err(VhostUserError::NoTranslation);
            }
        }
        Ok(())
    }

    /// What the back end must be programmed with, and the call eventfds to
    /// relay (queues without an irqfd).
    fn activation(
        &self,
        ctx: &ActivateContext,
    ) -> Result<(Activation, Vec<(u16, EventFd)>), VhostUserError> {
        let res = VhostUserError::Resource;
        let mut rings = Vec::new();
        let mut relayed = Vec::new();
        let ctrl = self.layout.active(self.acked).1;
        for (index, queue, kick) in ctx.queues.iter().filter(|q| Some(q.0) != ctrl) {
            let qi = u16::try_from(*index).unwrap_or(u16::MAX);
            let relay = match ctx.interrupt.notifier(VirtioInterruptType::Queue(qi)) {
                Some(_) => None,
                None => {
                    let efd = EventFd::new(libc::EFD_NONBLOCK).map_err(res)?;
                    relayed.push((qi, efd.try_clone().map_err(res)?));
                    Some(efd)
                }
            };
            rings.push(RingSetup {
                index: *index,
                size: queue.size(),
                max_size: queue.max_size(),
                desc: queue.desc_table(),
                avail: queue.avail_ring(),
                used: queue.used_ring(),
                next_avail: queue.next_avail(),
                kick: kick.try_clone().map_err(res)?,
                relay,
            });
        }
        let act = Activation {
            acked: self.acked,
            mem: ctx.mem.clone(),
            interrupt: ctx.interrupt.clone(),
            rings,
            enabled: AtomicUsize::new(self.layout.initially_enabled(self.acked)),
        };
        Ok((act, relayed))
    }

    /// Start the device: program the back end now if connected; with
    /// reconnection, otherwise (or if it goes away meanwhile) leave it to
    /// the supervisor.
    fn start(&self, ctx: ActivateContext, run: &mut Running) -> Result<(), VhostUserError> {
        self.check(&ctx)?;
        let (act, relayed) = self.activation(&ctx)?;
        if !relayed.is_empty() {
            let hook = self.thread_hook.clone();
            let relay =
                CallRelay::spawn_with_hook(relayed, ctx.interrupt.clone(), "vhost-user-call", hook)
                    .map_err(VhostUserError::Resource)?;
            run.relay = Some(relay);
        }
        let act = Arc::new(act);
        let ctrl = self.ctrl_setup(&ctx.mem, &ctx.interrupt, &ctx.queues, act.clone())?;
        run.queues = ctx.queues;
        let mut s = self.session();
        let res = if s.up {
            self.link.program(&mut s, &act, false)
        } else {
            Ok(())
        };
        match res {
            Ok(()) => {}
            Err(e) if self.supervisor.is_some() && self.main.is_broken() => {
                log::warn!("vhost-user back end went away while starting ({}); it is restarted once it is back", chain(&e));
            }
            Err(e) => {
                self.stop_failed(&mut s);
                return Err(e);
            }
        }
        if self.supervisor.is_some() {
            s.want = Some(act.clone());
        }
        if let Some(setup) = ctrl {
            match CtrlQueue::spawn(setup, self.thread_hook.clone()) {
                Ok(c) => run.ctrl = Some(c),
                Err(e) => {
                    s.want = None;
                    self.stop_failed(&mut s);
                    return Err(VhostUserError::Resource(e));
                }
            }
        }
        Ok(())
    }

    /// Undo a failed start: rings already kicked must not keep running.
    fn stop_failed(&self, s: &mut Session) {
        if let Some(b) = &self.bridge {
            b.stop();
        }
        if !self.main.is_broken() {
            self.link.stop_rings(s);
        }
        s.started.clear();
        self.link.stop_server(s);
    }

    fn mark_broken_if_dead(&self) {
        if self.main.is_broken() && self.supervisor.is_none() {
            self.counters.broken.store(true, Ordering::Relaxed);
        }
    }

    fn poke_supervisor(&self) {
        if let Some(s) = &self.supervisor {
            s.poke();
        }
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        // The supervisor first (it may start a back-end channel thread).
        drop(self.supervisor.take());
        let mut s = self.link.lock_session(None);
        self.link.stop_server(&mut s);
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn config_len(&self) -> usize {
        self.layout.config_len()
    }

    fn avail_features(&self) -> u64 {
        self.avail
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.avail;
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = match &self.local_config {
            Some(c) => c.clone(),
            None => match self.read_backend_config() {
                Some(mut c) => {
                    self.layout.patch_config(&mut c);
                    c
                }
                None => return,
            },
        };
        crate::virtio::copy_config(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "vhost-user: ignoring a {}-byte write to read-only configuration at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioDeviceError> {
        if self.running.is_some() {
            return Err(VirtioDeviceError::AlreadyActive);
        }
        if self.is_broken() {
            return Err(VirtioDeviceError::Backend(Box::new(VhostUserError::Broken)));
        }
        let mut run = Running::default();
        match self.start(ctx, &mut run) {
            Ok(()) => {
                self.running = Some(run);
                self.counters.activations.fetch_add(1, Ordering::Relaxed);
                self.poke_supervisor();
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "vhost-user {:?} device failed to start: {}",
                    self.kind,
                    chain(&e)
                );
                drop(run);
                self.mark_broken_if_dead();
                Err(VirtioDeviceError::Backend(Box::new(e)))
            }
        }
    }

    fn reset(&mut self) -> bool {
        let Some(mut run) = self.running.take() else {
            return !self.is_broken();
        };
        // First: the control queue must not enable rings being stopped.
        drop(run.ctrl.take());
        if let Some(b) = &self.bridge {
            b.stop();
        }
        let mut s = self.session();
        s.want = None;
        let stopped = !s.up || self.link.stop_rings(&mut s);
        s.started.clear();
        self.link.stop_server(&mut s);
        drop(s);
        drop(run);
        self.mark_broken_if_dead();
        if !stopped {
            log::warn!("vhost-user {:?} device did not stop cleanly", self.kind);
        }
        !self.is_broken()
    }

    fn set_thread_hook(&mut self, hook: ThreadHook) {
        if let Ok(mut h) = self.link.hook.lock() {
            *h = Some(hook.clone());
        }
        self.thread_hook = Some(hook);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iommu_requirements_name_every_missing_feature() {
        assert_eq!(
            missing_for_iommu(VIRTIO_F_VERSION_1, 0),
            vec![
                "VIRTIO_F_ACCESS_PLATFORM",
                "VHOST_USER_F_PROTOCOL_FEATURES",
                "VHOST_USER_PROTOCOL_F_BACKEND_REQ",
                "VHOST_USER_PROTOCOL_F_REPLY_ACK"
            ]
        );
        let all = VIRTIO_F_ACCESS_PLATFORM | VHOST_USER_F_PROTOCOL_FEATURES;
        let proto = PROTOCOL_F_BACKEND_REQ | PROTOCOL_F_REPLY_ACK;
        assert!(missing_for_iommu(all, proto).is_empty());
        assert_eq!(
            missing_for_iommu(all, PROTOCOL_F_BACKEND_REQ),
            vec!["VHOST_USER_PROTOCOL_F_REPLY_ACK"]
        );
    }

    #[test]
    fn access_platform_is_offered_only_behind_an_iommu() {
        let backend =
            VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VHOST_USER_F_PROTOCOL_FEATURES | 1;
        let on = guest_features(VhostUserKind::Net, true, backend, false);
        let off = guest_features(VhostUserKind::Net, false, backend, false);
        assert_ne!(on & VIRTIO_F_ACCESS_PLATFORM, 0);
        assert_eq!(off & VIRTIO_F_ACCESS_PLATFORM, 0);
        // The protocol-features bit is never a guest feature; CSUM passes.
        assert_eq!(on & VHOST_USER_F_PROTOCOL_FEATURES, 0);
        assert_ne!(on & 1, 0);
    }

    #[test]
    fn set_features_sends_only_backend_bits_plus_protocol_features() {
        let backend =
            VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VHOST_USER_F_PROTOCOL_FEATURES;
        let mac = 1 << 5;
        let acked = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | mac;
        assert_eq!(
            backend_features(acked, backend),
            VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VHOST_USER_F_PROTOCOL_FEATURES
        );
        assert_eq!(
            backend_features(VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1),
            VIRTIO_F_VERSION_1
        );
    }
}
