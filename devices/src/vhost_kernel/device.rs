//! [`VhostNetDevice`]: a virtio-net device whose data path is the kernel's
//! vhost-net worker, with a tap as the backend. Behind a vIOMMU its device
//! IOTLB is kept by the vhost-user [`IotlbBridge`] through a
//! [`VhostFdChannel`], and the kernel's misses are served by an
//! [`IotlbServer`] thread.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use iommu::sync::lock;
use iommu::RequesterId;
use thiserror::Error;
use vhost::VringConfigData;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::channel::{DropAll, VhostFdChannel};
use super::features::{guest_features, kernel_features, missing};
use super::io::{FdIotlb, IotlbIo};
use super::kern::KernNet;
use super::server::{IotlbServer, IotlbThread, ServerCounters};
use super::stats::{DeviceCounters, VhostNetStatsHandle};
use super::tap::{Tap, TapError};
use crate::thread::ThreadHook;
use crate::vhost_user::channel::ChannelError;
use crate::vhost_user::frontend::{DEFAULT_MAC, DEFAULT_QUEUE_SIZE};
use crate::vhost_user::miss::{MissError, MissHandler};
use crate::vhost_user::recheck::VringArea;
use crate::vhost_user::relay::CallRelay;
use crate::vhost_user::stall::WatchedRing;
use crate::vhost_user::wire::{IotlbPerm, VIRTIO_F_ACCESS_PLATFORM};
use crate::vhost_user::{IotlbBridge, IotlbPolicy, VhostUserKind};
use crate::viommu::Viommu;
use crate::virtio::{
    ActivateContext, GuestMemoryMmap, VirtioDevice, VirtioDeviceError, VirtioInterruptType,
};

/// Receive and transmit queue (vhost-net's and virtio-net's order).
const NUM_QUEUES: usize = 2;
/// The transmit queue, watched by the stall detector.
const TX_QUEUE: usize = 1;

/// How to build a [`VhostNetDevice`].
#[derive(Debug, Clone)]
pub struct VhostNetConfig {
    /// Tap interface to attach (created if it does not exist).
    pub tap: String,
    /// Behind a vIOMMU: VIRTIO_F_ACCESS_PLATFORM and the kernel's device IOTLB.
    pub iommu: bool,
    /// MAC address in the configuration space.
    pub mac: [u8; 6],
    /// Maximum size of both queues (a power of two, at most 32768).
    pub queue_size: u16,
    /// What the IOTLB bridge does with MAP notifications.
    pub policy: IotlbPolicy,
}

impl VhostNetConfig {
    /// A device on tap `name`, not behind a vIOMMU.
    pub fn new(tap: impl Into<String>) -> Self {
        VhostNetConfig {
            tap: tap.into(),
            iommu: false,
            mac: DEFAULT_MAC,
            queue_size: DEFAULT_QUEUE_SIZE,
            policy: IotlbPolicy::MissDriven,
        }
    }
}

/// Errors of the vhost-net device.
#[derive(Debug, Error)]
pub enum VhostNetError {
    /// The tap could not be attached.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// `/dev/vhost-net` could not be opened or owned.
    #[error("cannot open /dev/vhost-net and become its owner (load the vhost_net module; the device must be readable and writable)")]
    Open(#[source] vhost::Error),
    /// A vhost ioctl failed.
    #[error("vhost-net {step} failed")]
    Ioctl {
        /// The request.
        step: &'static str,
        /// What the kernel reported.
        #[source]
        source: vhost::Error,
    },
    /// The kernel lacks what a device behind a vIOMMU needs.
    #[error("the kernel's vhost-net does not offer {missing:?}, which this device needs (ACCESS_PLATFORM and IOTLB_MSG_V2 only behind a vIOMMU)")]
    MissingFeatures {
        /// Names of the missing features.
        missing: Vec<&'static str>,
    },
    /// The queue size option is not usable.
    #[error("queue size {0} is invalid; use a power of two between 1 and 32768")]
    QueueSize(u16),
    /// The activation's queues are not RX and TX.
    #[error("activation got queue indices {0:?}, vhost-net needs 0 (receive) and 1 (transmit)")]
    Queues(Vec<usize>),
    /// A device behind a vIOMMU was started before the VMM set the IOMMU.
    #[error("the device is behind a vIOMMU but no translation was set; call set_translation before the guest starts")]
    NoTranslation,
    /// Translation was configured on a device without a vIOMMU.
    #[error("set_translation on a vhost-net device created without iommu=on")]
    NotBehindIommu,
    /// The driver refused ACCESS_PLATFORM on a device behind a vIOMMU.
    #[error("the guest driver did not accept VIRTIO_F_ACCESS_PLATFORM; refusing to let vhost-net bypass the vIOMMU")]
    AccessPlatformNotAcked,
    /// A used ring is not mapped in the vIOMMU (the kernel writes it when
    /// the ring starts).
    #[error("queue {queue}'s used ring cannot be translated for the kernel")]
    RingsNotMapped {
        /// The queue.
        queue: usize,
        /// Why the translation was refused.
        #[source]
        source: MissError,
    },
    /// The device cannot run again (its IOTLB was dropped or its IOTLB
    /// thread failed).
    #[error("the vhost-net device failed earlier and cannot run again: {0}")]
    Broken(String),
    /// The full-range INVALIDATE that starts every activation was refused.
    #[error("emptying the kernel's device IOTLB at start failed")]
    IotlbStart(#[source] ChannelError),
    /// A thread or eventfd could not be created.
    #[error("cannot create a vhost-net helper thread or eventfd")]
    Resource(#[source] std::io::Error),
    /// A queue has neither an irqfd nor a relayed call eventfd (internal).
    #[error("queue {0} has no call eventfd")]
    NoCallFd(usize),
}

fn ioctl(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostNetError {
    move |source| VhostNetError::Ioctl { step, source }
}

/// The IOTLB side of a device behind a vIOMMU.
struct Iotlb {
    bridge: Arc<IotlbBridge>,
    channel: Arc<VhostFdChannel>,
    io: Arc<dyn IotlbIo>,
    server: Arc<ServerCounters>,
    /// Why the last IOTLB thread ended on its own.
    failure: Arc<Mutex<Option<String>>>,
}

/// What exists while the device is active.
#[derive(Default)]
struct Running {
    queues: Vec<(usize, Queue, EventFd)>,
    /// Rings handed the tap (stopped with SET_BACKEND -1).
    started: Vec<usize>,
    relay: Option<CallRelay>,
    thread: Option<IotlbThread>,
}

/// A virtio-net device served by the kernel's vhost-net.
pub struct VhostNetDevice {
    kern: Arc<KernNet>,
    tap: Tap,
    iommu: Option<Iotlb>,
    queue_sizes: Vec<u16>,
    kernel_features: u64,
    avail: u64,
    acked: u64,
    config: Vec<u8>,
    running: Option<Running>,
    counters: Arc<DeviceCounters>,
    thread_hook: Option<ThreadHook>,
    label: String,
}

impl std::fmt::Debug for VhostNetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostNetDevice")
            .field("tap", &self.tap.name())
            .field("iommu", &self.iommu.is_some())
            .field("kernel_features", &self.kernel_features)
            .field("active", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl VhostNetDevice {
    /// Attach the tap, open `/dev/vhost-net`, negotiate with the kernel.
    pub fn new(cfg: VhostNetConfig, mem: &GuestMemoryMmap) -> Result<Self, VhostNetError> {
        let q = cfg.queue_size;
        if q == 0 || q > 32768 || !q.is_power_of_two() {
            return Err(VhostNetError::QueueSize(q));
        }
        let tap = Tap::open(&cfg.tap)?;
        let mut kern = KernNet::open(mem).map_err(VhostNetError::Open)?;
        let kf = kern.features().map_err(ioctl("GET_FEATURES"))?;
        let (offered, acked) = kern
            .ack_backend_features()
            .map_err(ioctl("SET_BACKEND_FEATURES"))?;
        let missing = missing(kf, offered, cfg.iommu);
        if !missing.is_empty() {
            return Err(VhostNetError::MissingFeatures { missing });
        }
        log::info!(
            "vhost-net {}: kernel features {kf:#x}, backend features offered {offered:#x} acked {acked:#x}",
            cfg.tap
        );
        let kern = Arc::new(kern);
        let iommu = cfg.iommu.then(|| iotlb(&kern, cfg.policy));
        let counters = Arc::new(DeviceCounters::new(kf, acked));
        Ok(VhostNetDevice {
            label: format!("vhost-net {}", cfg.tap),
            kern,
            tap,
            iommu,
            queue_sizes: vec![q; NUM_QUEUES],
            kernel_features: kf,
            avail: guest_features(kf, cfg.iommu),
            acked: 0,
            config: VhostUserKind::Net.local_config(cfg.mac, 0),
            running: None,
            counters,
            thread_hook: None,
        })
    }

    /// The IOTLB bridge (only behind a vIOMMU), to register as the vIOMMU's
    /// consumer of this device's unmaps.
    pub fn bridge(&self) -> Option<Arc<IotlbBridge>> {
        self.iommu.as_ref().map(|i| i.bridge.clone())
    }

    /// Set the vIOMMU this device's DMA goes through and its requester id.
    pub fn set_translation(
        &self,
        viommu: Arc<dyn Viommu>,
        rid: RequesterId,
    ) -> Result<(), VhostNetError> {
        let i = self.iommu.as_ref().ok_or(VhostNetError::NotBehindIommu)?;
        i.bridge.set_translation(viommu, rid);
        Ok(())
    }

    /// The tap's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// What the kernel's vhost-net offered.
    pub fn kernel_features(&self) -> u64 {
        self.kernel_features
    }

    /// A handle reading the counters after the device moved into the transport.
    pub fn stats_handle(&self) -> VhostNetStatsHandle {
        VhostNetStatsHandle::new(
            self.counters.clone(),
            self.iommu.as_ref().map(|i| {
                (
                    i.channel.clone(),
                    i.bridge.clone(),
                    i.server.clone(),
                    i.failure.clone(),
                )
            }),
        )
    }

    /// Why the device cannot run (again), if it cannot.
    fn broken(&self) -> Option<String> {
        let i = self.iommu.as_ref()?;
        if i.channel.is_dropped() {
            return Some("the kernel's device IOTLB was dropped after a refused INVALIDATE".into());
        }
        lock(&i.failure).clone()
    }
}

/// The IOTLB side: the bridge sends through the vhost fd; a refused
/// INVALIDATE resets the owner (drops every kernel translation).
fn iotlb(kern: &Arc<KernNet>, policy: IotlbPolicy) -> Iotlb {
    let io: Arc<dyn IotlbIo> = Arc::new(FdIotlb::new(kern.clone()));
    let k = kern.clone();
    let drop_all: DropAll = Box::new(move || k.reset());
    let channel = Arc::new(VhostFdChannel::new(io.clone(), drop_all));
    let bridge = Arc::new(IotlbBridge::new(channel.clone(), policy));
    Iotlb {
        bridge,
        channel,
        io,
        server: Arc::default(),
        failure: Arc::default(),
    }
}

impl VhostNetDevice {
    /// Checks that need no ioctl.
    fn check(&self, ctx: &ActivateContext) -> Result<(), VhostNetError> {
        let got: Vec<usize> = ctx.queues.iter().map(|q| q.0).collect();
        if got != [0, 1] {
            return Err(VhostNetError::Queues(got));
        }
        if let Some(why) = self.broken() {
            return Err(VhostNetError::Broken(why));
        }
        if let Some(i) = &self.iommu {
            if self.acked & VIRTIO_F_ACCESS_PLATFORM == 0 {
                return Err(VhostNetError::AccessPlatformNotAcked);
            }
            if !i.bridge.has_translation() {
                return Err(VhostNetError::NoTranslation);
            }
        }
        Ok(())
    }

    /// SET_FEATURES (a fresh, empty device IOTLB with ACCESS_PLATFORM) and
    /// SET_MEM_TABLE (the kernel needs it for the rings' access checks even
    /// with an IOTLB).
    fn start_device(&self, mem: &GuestMemoryMmap) -> Result<(), VhostNetError> {
        use vhost::VhostBackend;
        let features = kernel_features(self.acked, self.kernel_features);
        self.kern
            .set_features(features)
            .map_err(ioctl("SET_FEATURES"))?;
        self.kern.set_memory(mem).map_err(ioctl("SET_MEM_TABLE"))
    }

    /// The IOTLB side of a start: empty the IOTLB (full INVALIDATE), serve
    /// misses from now on, and tell the bridge where the rings are.
    fn start_iotlb(&self, ctx: &ActivateContext, run: &mut Running) -> Result<(), VhostNetError> {
        let Some(i) = &self.iommu else {
            return Ok(());
        };
        i.bridge
            .start(ctx.mem.clone())
            .map_err(VhostNetError::IotlbStart)?;
        let areas = ctx
            .queues
            .iter()
            .flat_map(|(index, q, _)| {
                VringArea::split_ring(
                    *index,
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring(),
                )
            })
            .collect();
        i.bridge.set_vrings(areas);
        let watched = ctx
            .queues
            .iter()
            .filter(|(index, _, _)| *index == TX_QUEUE)
            .map(|(index, q, _)| WatchedRing {
                queue: *index,
                avail: q.avail_ring(),
                used: q.used_ring(),
            })
            .collect();
        i.bridge.set_watched_rings(watched);
        *lock(&i.failure) = None;
        let server = IotlbServer::new(i.io.clone(), i.bridge.clone(), self.label.clone())
            .with_counters(i.server.clone())
            .with_failure_slot(i.failure.clone());
        let t = server
            .spawn("vhost-net-iotlb", self.thread_hook.clone())
            .map_err(VhostNetError::Resource)?;
        run.thread = Some(t);
        Ok(())
    }

    /// Program ring `index` (number, base, addresses, kick, call).
    fn start_ring(
        &self,
        ctx: &ActivateContext,
        index: usize,
        q: &Queue,
        kick: &EventFd,
        relay: Option<&EventFd>,
    ) -> Result<(), VhostNetError> {
        use vhost::VhostBackend;
        self.kern
            .set_vring_num(index, q.size())
            .map_err(ioctl("SET_VRING_NUM"))?;
        self.kern
            .set_vring_base(index, q.next_avail())
            .map_err(ioctl("SET_VRING_BASE"))?;
        let config = VringConfigData {
            queue_max_size: q.max_size(),
            queue_size: q.size(),
            flags: 0,
            desc_table_addr: q.desc_table(),
            used_ring_addr: q.used_ring(),
            avail_ring_addr: q.avail_ring(),
            log_addr: None,
        };
        self.kern
            .set_ring_addresses(self.iommu.is_some(), index, &config)
            .map_err(ioctl("SET_VRING_ADDR"))?;
        let qi = u16::try_from(index).unwrap_or(u16::MAX);
        let call = match (
            ctx.interrupt.notifier(VirtioInterruptType::Queue(qi)),
            relay,
        ) {
            (Some(irqfd), _) => irqfd,
            (None, Some(efd)) => efd,
            (None, None) => return Err(VhostNetError::NoCallFd(index)),
        };
        self.kern
            .set_ring_fds(index, kick, call)
            .map_err(ioctl("SET_VRING_KICK/CALL"))
    }

    /// Call eventfds to relay for queues without an irqfd: `(queue, ours, relay's)`.
    fn relayed(
        &self,
        ctx: &ActivateContext,
    ) -> Result<Vec<(usize, EventFd, EventFd)>, VhostNetError> {
        let mut out = Vec::new();
        for (index, _, _) in &ctx.queues {
            let qi = u16::try_from(*index).unwrap_or(u16::MAX);
            if ctx
                .interrupt
                .notifier(VirtioInterruptType::Queue(qi))
                .is_none()
            {
                let efd = EventFd::new(libc::EFD_NONBLOCK).map_err(VhostNetError::Resource)?;
                let dup = efd.try_clone().map_err(VhostNetError::Resource)?;
                out.push((*index, efd, dup));
            }
        }
        Ok(out)
    }

    fn start(&self, ctx: ActivateContext, run: &mut Running) -> Result<(), VhostNetError> {
        self.check(&ctx)?;
        let relayed = self.relayed(&ctx)?;
        self.start_device(&ctx.mem)?;
        self.start_iotlb(&ctx, run)?;
        for (index, q, kick) in &ctx.queues {
            let relay = relayed.iter().find(|r| r.0 == *index).map(|r| &r.1);
            self.start_ring(&ctx, *index, q, kick, relay)?;
        }
        if !relayed.is_empty() {
            let calls = relayed
                .into_iter()
                .map(|(i, _, dup)| (u16::try_from(i).unwrap_or(u16::MAX), dup))
                .collect();
            let relay = CallRelay::spawn_with_hook(
                calls,
                ctx.interrupt.clone(),
                "vhost-net-call",
                self.thread_hook.clone(),
            )
            .map_err(VhostNetError::Resource)?;
            run.relay = Some(relay);
        }
        self.start_backends(&ctx, run)?;
        run.queues = ctx.queues;
        Ok(())
    }

    /// Hand both rings the tap. Behind a vIOMMU each used ring is
    /// translated first, as the answer to a miss iovmm raises itself:
    /// `VHOST_NET_SET_BACKEND` writes the used ring's flags through the
    /// device IOTLB and fails (EFAULT) instead of waiting for a miss (QEMU's
    /// `vhost_dev_start` calls its miss handler on every used ring for the
    /// same reason). These two misses count like the kernel's.
    fn start_backends(
        &self,
        ctx: &ActivateContext,
        run: &mut Running,
    ) -> Result<(), VhostNetError> {
        if let Some(i) = &self.iommu {
            for (index, q, _) in &ctx.queues {
                i.bridge
                    .answer_miss(q.used_ring(), IotlbPerm::WriteOnly)
                    .map_err(|source| VhostNetError::RingsNotMapped {
                        queue: *index,
                        source,
                    })?;
            }
        }
        for (index, _, _) in &ctx.queues {
            self.kern
                .set_ring_backend(*index, Some(self.tap.file()))
                .map_err(ioctl("NET_SET_BACKEND"))?;
            run.started.push(*index);
        }
        Ok(())
    }

    /// Stop every started ring; false if the kernel refused.
    fn stop_rings(&self, run: &mut Running) -> bool {
        use vhost::VhostBackend;
        let mut ok = true;
        for index in std::mem::take(&mut run.started) {
            if let Err(e) = self.kern.set_ring_backend(index, None) {
                log::warn!("{}: stopping queue {index} failed: {e}", self.label);
                ok = false;
            }
            match self.kern.get_vring_base(index) {
                Ok(base) => log::debug!("{}: queue {index} stopped at {base}", self.label),
                Err(e) => {
                    log::warn!("{}: reading queue {index}'s base failed: {e}", self.label);
                    ok = false;
                }
            }
        }
        ok
    }

    /// Undo a start: rings, IOTLB thread, relay.
    fn stop(&self, mut run: Running) -> bool {
        let ok = self.stop_rings(&mut run);
        if let Some(i) = &self.iommu {
            i.bridge.stop();
        }
        if let Some(t) = run.thread.take() {
            t.stop();
        }
        if let Some(r) = run.relay.take() {
            r.stop();
        }
        ok
    }
}

impl VirtioDevice for VhostNetDevice {
    fn device_type(&self) -> u32 {
        VhostUserKind::Net.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn config_len(&self) -> usize {
        self.config.len()
    }

    fn avail_features(&self) -> u64 {
        self.avail
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.avail;
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        crate::virtio::copy_config(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "{}: ignoring a {}-byte write to read-only configuration at {offset:#x}",
            self.label,
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioDeviceError> {
        if self.running.is_some() {
            return Err(VirtioDeviceError::AlreadyActive);
        }
        let mut run = Running::default();
        match self.start(ctx, &mut run) {
            Ok(()) => {
                self.running = Some(run);
                self.counters.activated();
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "{} failed to start: {}",
                    self.label,
                    iommu::error::chain(&e)
                );
                self.stop(run);
                Err(VirtioDeviceError::Backend(Box::new(e)))
            }
        }
    }

    fn reset(&mut self) -> bool {
        if let Some(run) = self.running.take() {
            if !self.stop(run) {
                self.counters.broken.store(true, Ordering::Relaxed);
            }
        }
        !self.counters.broken.load(Ordering::Relaxed) && self.broken().is_none()
    }

    fn set_thread_hook(&mut self, hook: ThreadHook) {
        self.thread_hook = Some(hook);
    }
}

impl Drop for VhostNetDevice {
    fn drop(&mut self) {
        // Threads first; closing the fds then frees everything in the kernel.
        if let Some(mut run) = self.running.take() {
            if let Some(t) = run.thread.take() {
                t.stop();
            }
            if let Some(r) = run.relay.take() {
                r.stop();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn bad_options_fail_before_any_device_is_opened() {
        for q in [0u16, 3, 100] {
            let mut cfg = VhostNetConfig::new("tap0");
            cfg.queue_size = q;
            let e = VhostNetDevice::new(cfg, &mem()).unwrap_err();
            assert!(matches!(e, VhostNetError::QueueSize(n) if n == q), "{e:?}");
        }
        let e = VhostNetDevice::new(VhostNetConfig::new("no/slash"), &mem()).unwrap_err();
        assert!(
            matches!(e, VhostNetError::Tap(TapError::BadName(_))),
            "{e:?}"
        );
    }

    #[test]
    fn errors_name_what_to_fix() {
        let e = VhostNetError::MissingFeatures {
            missing: vec!["VIRTIO_F_ACCESS_PLATFORM"],
        };
        assert!(e.to_string().contains("VIRTIO_F_ACCESS_PLATFORM"));
        let e = VhostNetError::Open(vhost::Error::VhostOpen(std::io::Error::from_raw_os_error(
            libc::ENOENT,
        )));
        assert!(e.to_string().contains("vhost_net module"), "{e}");
    }
}
