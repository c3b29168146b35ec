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

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use iommu::{DmaTranslate, RequesterId};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::backend_req::{BackendReqServer, BackendReqThread};
use super::bridge::{FaultHook, IotlbBridge, IotlbPolicy};
use super::channel::{ChannelError, IotlbChannel, MainSocket, DEFAULT_ACK_TIMEOUT};
use super::kind::VhostUserKind;
use super::relay::CallRelay;
use super::stats::VhostUserStats;
use super::wire::{
    PROTOCOL_F_BACKEND_REQ, PROTOCOL_F_CONFIG, PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use crate::thread::ThreadHook;
use crate::virtio::{
    ActivateContext, GuestMemoryMmap, VirtioDevice, VirtioDeviceError, VirtioInterruptType,
};

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
    #[error("cannot connect to the vhost-user back end at {path}: {source}; start the back end (listening on that path) first")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A request failed (refused, timed out, or the back end went away).
    #[error("vhost-user {step} failed: {source}")]
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
    #[error("the vhost-user back end supports {offered} queues but the device needs {needed}")]
    QueueNum {
        /// Queues the back end reports.
        offered: u64,
        /// Queues needed.
        needed: usize,
    },
    /// A blk back end without the CONFIG protocol feature and no capacity given.
    #[error("vhost-user blk: the back end cannot serve the configuration (no CONFIG protocol feature); give the capacity in the device options")]
    MissingCapacity,
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

/// What negotiation at connect time settled.
#[derive(Debug, Clone, Copy)]
struct Negotiated {
    features: u64,
    protocol: u64,
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
}

impl VhostUserStatsHandle {
    /// The current counters.
    pub fn snapshot(&self) -> VhostUserStats {
        VhostUserStats {
            iotlb: self.main.stats(),
            bridge: self.bridge.as_ref().map(|b| b.stats()).unwrap_or_default(),
            activations: self.counters.activations.load(Ordering::Relaxed),
            broken: self.counters.broken.load(Ordering::Relaxed) || self.main.is_broken(),
        }
    }
}

/// What exists while the device is active. Dropping it stops the helper
/// threads (also on a failed activation).
#[derive(Default)]
struct Running {
    /// Rings handed a kick fd (the back end may be processing them).
    started: Vec<usize>,
    queues: Vec<(usize, Queue, EventFd)>,
    server: Option<BackendReqThread>,
    relay: Option<CallRelay>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            if let Some(reason) = s.stop() {
                log::debug!("vhost-user back-end channel thread ended: {reason}");
            }
        }
        if let Some(r) = self.relay.take() {
            r.stop();
        }
    }
}

/// A virtio device served by a vhost-user back end.
pub struct VhostUserDevice {
    kind: VhostUserKind,
    iommu: bool,
    queue_sizes: Vec<u16>,
    main: Arc<MainSocket>,
    neg: Negotiated,
    avail: u64,
    acked: u64,
    /// `None`: the back end serves the configuration (GET_CONFIG).
    local_config: Option<Vec<u8>>,
    bridge: Option<Arc<IotlbBridge>>,
    running: Option<Running>,
    counters: Arc<DeviceCounters>,
    thread_hook: Option<ThreadHook>,
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

    /// Negotiate over an already-connected socket (`cfg.socket` is only
    /// used in messages).
    pub fn from_stream(stream: UnixStream, cfg: VhostUserConfig) -> Result<Self, VhostUserError> {
        let n = cfg.kind.num_queues();
        if cfg.queue_size == 0 || cfg.queue_size > 32768 || !cfg.queue_size.is_power_of_two() {
            return Err(VhostUserError::QueueSize(cfg.queue_size));
        }
        let main = MainSocket::new(stream, n as u64, cfg.timeout).map_err(step("socket setup"))?;
        let main = Arc::new(main);
        let neg = negotiate(&main, &cfg)?;
        let backend_config = neg.protocol & PROTOCOL_F_CONFIG != 0;
        let local_config = if backend_config {
            None
        } else {
            let capacity = match (cfg.kind, cfg.capacity_sectors) {
                (VhostUserKind::Blk, None) => return Err(VhostUserError::MissingCapacity),
                (_, c) => c.unwrap_or(0),
            };
            Some(cfg.kind.local_config(cfg.mac, capacity))
        };
        let bridge = cfg.iommu.then(|| {
            let chan: Arc<dyn IotlbChannel> = main.clone();
            Arc::new(IotlbBridge::new(chan, cfg.policy))
        });
        let dev = VhostUserDevice {
            kind: cfg.kind,
            iommu: cfg.iommu,
            queue_sizes: vec![cfg.queue_size; n],
            avail: guest_features(cfg.kind, cfg.iommu, neg.features, backend_config),
            main,
            neg,
            acked: 0,
            local_config,
            bridge,
            running: None,
            counters: Arc::default(),
            thread_hook: None,
        };
        if backend_config {
            // Fail now rather than show the guest an empty configuration.
            dev.backend_config()?;
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
        translate: Arc<dyn DmaTranslate>,
        rid: RequesterId,
        fault: Option<FaultHook>,
    ) -> Result<(), VhostUserError> {
        let bridge = self.bridge.as_ref().ok_or(VhostUserError::NotBehindIommu)?;
        bridge.set_translation(translate, rid, fault);
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

    /// Whether the back end failed and the device cannot run again.
    pub fn is_broken(&self) -> bool {
        self.counters.broken.load(Ordering::Relaxed) || self.main.is_broken()
    }

    /// A handle to read the counters later.
    pub fn stats_handle(&self) -> VhostUserStatsHandle {
        VhostUserStatsHandle {
            main: self.main.clone(),
            bridge: self.bridge.clone(),
            counters: self.counters.clone(),
        }
    }

    /// The current counters.
    pub fn stats(&self) -> VhostUserStats {
        self.stats_handle().snapshot()
    }

    fn request<R>(
        &self,
        name: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<R>,
    ) -> Result<R, VhostUserError> {
        self.main.with_frontend(f).map_err(step(name))
    }

    fn backend_config(&self) -> Result<Vec<u8>, VhostUserError> {
        let len = self.kind.config_len();
        let buf = vec![0u8; len];
        let size = u32::try_from(len).unwrap_or(u32::MAX);
        let (_, data) = self.request("GET_CONFIG", |fe| {
            fe.get_config(0, size, VhostUserConfigFlags::empty(), &buf)
        })?;
        Ok(data)
    }

    fn has_protocol_features(&self) -> bool {
        self.neg.features & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }
}

fn negotiate(main: &MainSocket, cfg: &VhostUserConfig) -> Result<Negotiated, VhostUserError> {
    let needed = cfg.kind.num_queues();
    main.with_frontend(|fe| fe.set_owner())
        .map_err(step("SET_OWNER"))?;
    let features = main
        .with_frontend(|fe| fe.get_features())
        .map_err(step("GET_FEATURES"))?;
    if features & VIRTIO_F_VERSION_1 == 0 {
        return Err(VhostUserError::MissingFeatures {
            missing: vec!["VIRTIO_F_VERSION_1"],
            why: "by iovmm's modern-only virtio-pci transport",
        });
    }
    let offered = if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
        main.with_frontend(|fe| fe.get_protocol_features())
            .map_err(step("GET_PROTOCOL_FEATURES"))?
            .bits()
    } else {
        0
    };
    if cfg.iommu {
        let missing = missing_for_iommu(features, offered);
        if !missing.is_empty() {
            return Err(VhostUserError::MissingFeatures {
                missing,
                why: "for a device behind a vIOMMU (iommu=on): the back end must speak the vhost-user IOTLB protocol",
            });
        }
    }
    let mut wanted = PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG | PROTOCOL_F_MQ;
    if cfg.iommu {
        wanted |= PROTOCOL_F_BACKEND_REQ;
    }
    let protocol = offered & wanted;
    if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
        let p = VhostUserProtocolFeatures::from_bits_truncate(protocol);
        main.with_frontend(|fe| fe.set_protocol_features(p))
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
    }
    if protocol & PROTOCOL_F_MQ != 0 {
        let offered = main
            .with_frontend(|fe| fe.get_queue_num())
            .map_err(step("GET_QUEUE_NUM"))?;
        if offered < needed as u64 {
            return Err(VhostUserError::QueueNum { offered, needed });
        }
    }
    if protocol & PROTOCOL_F_REPLY_ACK != 0 {
        // From now on every request is acknowledged, so refusals surface.
        main.with_frontend(|fe| {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            Ok(())
        })
        .map_err(step("enabling reply-ack"))?;
    }
    Ok(Negotiated { features, protocol })
}

/// The back end's memory table: every guest RAM region with its fd.
fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                VhostUserError::MemoryNotShared {
                    gpa: r.start_addr().0,
                }
            })
        })
        .collect()
}

/// A ring address as the back end expects it: the IOVA untranslated behind a
/// vIOMMU, else the VMM virtual address of the GPA.
fn ring_addr(
    mem: &GuestMemoryMmap,
    iommu: bool,
    queue: usize,
    addr: u64,
) -> Result<u64, VhostUserError> {
    if iommu {
        return Ok(addr);
    }
    mem.get_host_address(GuestAddress(addr))
        .map(|p| p as u64)
        .map_err(|_| VhostUserError::RingAddress { queue, addr })
}

impl VhostUserDevice {
    /// Check the activation's queues: exactly indices 0..n, in order.
    fn check_queues(&self, ctx: &ActivateContext) -> Result<(), VhostUserError> {
        let got: Vec<usize> = ctx.queues.iter().map(|q| q.0).collect();
        let needed = self.kind.num_queues();
        if got != (0..needed).collect::<Vec<_>>() {
            return Err(VhostUserError::Queues { got, needed });
        }
        Ok(())
    }

    /// SET_FEATURES, SET_MEM_TABLE and, behind a vIOMMU, the bridge and the
    /// back-end request channel.
    fn start_device(&self, ctx: &ActivateContext, run: &mut Running) -> Result<(), VhostUserError> {
        let ap_acked = self.acked & VIRTIO_F_ACCESS_PLATFORM != 0;
        if let Some(bridge) = &self.bridge {
            if !ap_acked {
                return Err(VhostUserError::AccessPlatformNotAcked);
            }
            if !bridge.has_translation() {
                return Err(VhostUserError::NoTranslation);
            }
        }
        let features = backend_features(self.acked, self.neg.features);
        self.request("SET_FEATURES", |fe| fe.set_features(features))?;
        let table = memory_table(&ctx.mem)?;
        self.request("SET_MEM_TABLE", |fe| fe.set_mem_table(&table).map(|_| ()))?;
        if let Some(bridge) = &self.bridge {
            bridge.start(ctx.mem.clone());
            let ours = self
                .main
                .open_backend_channel()
                .map_err(step("SET_BACKEND_REQ_FD"))?;
            let main: Arc<dyn IotlbChannel> = self.main.clone();
            let server = BackendReqServer::new(ours, bridge.clone(), main);
            run.server = Some(
                server
                    .spawn_with_hook("vhost-user-req", self.thread_hook.clone())
                    .map_err(VhostUserError::Resource)?,
            );
        }
        Ok(())
    }

    /// Program one vring. Returns the eventfd to relay when the queue has no
    /// irqfd.
    fn start_queue(
        &self,
        ctx: &ActivateContext,
        index: usize,
        queue: &Queue,
        kick: &EventFd,
    ) -> Result<Option<EventFd>, VhostUserError> {
        let size = queue.size();
        self.request("SET_VRING_NUM", |fe| fe.set_vring_num(index, size))?;
        let base = queue.next_avail();
        self.request("SET_VRING_BASE", |fe| fe.set_vring_base(index, base))?;
        let addr = |a| ring_addr(&ctx.mem, self.iommu, index, a);
        let config = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: size,
            flags: 0,
            desc_table_addr: addr(queue.desc_table())?,
            used_ring_addr: addr(queue.used_ring())?,
            avail_ring_addr: addr(queue.avail_ring())?,
            log_addr: None,
        };
        self.request("SET_VRING_ADDR", |fe| fe.set_vring_addr(index, &config))?;
        let qi = u16::try_from(index).unwrap_or(u16::MAX);
        let relay = match ctx.interrupt.notifier(VirtioInterruptType::Queue(qi)) {
            Some(irqfd) => {
                self.request("SET_VRING_CALL", |fe| fe.set_vring_call(index, irqfd))?;
                None
            }
            None => {
                let efd = EventFd::new(libc::EFD_NONBLOCK).map_err(VhostUserError::Resource)?;
                self.request("SET_VRING_CALL", |fe| fe.set_vring_call(index, &efd))?;
                Some(efd)
            }
        };
        self.request("SET_VRING_KICK", |fe| fe.set_vring_kick(index, kick))?;
        Ok(relay)
    }

    fn start(&self, ctx: ActivateContext, run: &mut Running) -> Result<(), VhostUserError> {
        self.check_queues(&ctx)?;
        self.start_device(&ctx, run)?;
        let mut relayed = Vec::new();
        for (index, queue, kick) in &ctx.queues {
            if let Some(efd) = self.start_queue(&ctx, *index, queue, kick)? {
                relayed.push((u16::try_from(*index).unwrap_or(u16::MAX), efd));
            }
            run.started.push(*index);
        }
        if !relayed.is_empty() {
            let hook = self.thread_hook.clone();
            let relay =
                CallRelay::spawn_with_hook(relayed, ctx.interrupt.clone(), "vhost-user-call", hook)
                    .map_err(VhostUserError::Resource)?;
            run.relay = Some(relay);
        }
        if self.has_protocol_features() {
            for (index, ..) in &ctx.queues {
                self.request("SET_VRING_ENABLE", |fe| fe.set_vring_enable(*index, true))?;
            }
        }
        run.queues = ctx.queues;
        Ok(())
    }

    /// Stop every ring (GET_VRING_BASE); returns false if the back end failed.
    fn stop_rings(&self, run: &Running) -> bool {
        let mut ok = true;
        for index in &run.started {
            if self.has_protocol_features() {
                if let Err(e) =
                    self.request("SET_VRING_ENABLE", |fe| fe.set_vring_enable(*index, false))
                {
                    log::warn!("vhost-user: disabling queue {index} failed: {e}");
                    ok = false;
                }
            }
            match self.request("GET_VRING_BASE", |fe| fe.get_vring_base(*index)) {
                Ok(base) => log::debug!("vhost-user: queue {index} stopped at {base}"),
                Err(e) => {
                    log::warn!("vhost-user: stopping queue {index} failed: {e}");
                    ok = false;
                }
            }
        }
        ok
    }

    fn mark_broken_if_dead(&self) {
        if self.main.is_broken() {
            self.counters.broken.store(true, Ordering::Relaxed);
        }
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
        self.kind.config_len()
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
            None => match self.backend_config() {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("vhost-user: reading the device configuration failed: {e}");
                    self.mark_broken_if_dead();
                    return;
                }
            },
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(src) = config.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
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
                Ok(())
            }
            Err(e) => {
                log::error!("vhost-user {:?} device failed to start: {e}", self.kind);
                if let Some(b) = &self.bridge {
                    b.stop();
                }
                if !self.main.is_broken() {
                    // Rings already kicked must not keep running.
                    self.stop_rings(&run);
                }
                drop(run);
                self.mark_broken_if_dead();
                Err(VirtioDeviceError::Backend(Box::new(e)))
            }
        }
    }

    fn reset(&mut self) -> bool {
        let Some(run) = self.running.take() else {
            return !self.is_broken();
        };
        if let Some(b) = &self.bridge {
            b.stop();
        }
        let stopped = self.stop_rings(&run);
        drop(run);
        self.mark_broken_if_dead();
        if !stopped {
            log::warn!("vhost-user {:?} device did not stop cleanly", self.kind);
        }
        !self.is_broken()
    }

    fn set_thread_hook(&mut self, hook: ThreadHook) {
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
