//! The device's link to its back end: negotiation, programming a started
//! device and its rings, and stopping them. Shared by the device (driven by
//! the transport on vCPU threads) and the reconnect supervisor, which
//! replays the same programming on a new connection.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iommu::error::chain;
use iommu::sync::lock;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::backend_req::{BackendReqServer, BackendReqThread};
use super::bridge::IotlbBridge;
use super::channel::{IotlbChannel, MainSocket};
use super::frontend::{backend_features, missing_for_iommu, VhostUserError};
use super::kind::VhostUserKind;
use super::mq::{QueueLayout, NET_F_CTRL_VQ};
use super::recheck::VringArea;
use super::stall::WatchedRing;
use super::wire::{
    PROTOCOL_F_BACKEND_REQ, PROTOCOL_F_CONFIG, PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use crate::sys::{poll_fds, PollFd};
use crate::thread::ThreadHook;
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

mod bounded;
pub(crate) use bounded::{BoundedGuard, BoundedMutex};

/// What negotiation on one connection settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub(crate) features: u64,
    pub(crate) protocol: u64,
}

impl Negotiated {
    pub(crate) fn has_protocol_features(&self) -> bool {
        self.features & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }
}

/// One ring as the driver configured it, with the fds the back end gets.
pub(crate) struct RingSetup {
    pub(crate) index: usize,
    pub(crate) size: u16,
    pub(crate) max_size: u16,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    /// The transport's next avail index at activation.
    pub(crate) next_avail: u16,
    /// A duplicate of the transport's kick eventfd.
    pub(crate) kick: EventFd,
    /// Our call eventfd (relayed to the interrupt) when there is no irqfd.
    pub(crate) relay: Option<EventFd>,
}

/// Everything needed to (re)program a back end for a running device.
pub(crate) struct Activation {
    pub(crate) acked: u64,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) rings: Vec<RingSetup>,
    /// Rings below this index are enabled in the back end (SET_VRING_ENABLE),
    /// the others disabled: 2 × the queue pairs the driver chose on a
    /// multiqueue net device, else every ring.
    pub(crate) enabled: AtomicUsize,
}

/// State of the current connection, under [`Link::session`].
pub(crate) struct Session {
    /// What the current connection negotiated.
    pub(crate) neg: Negotiated,
    /// The connection is negotiated and usable.
    pub(crate) up: bool,
    /// The guest has the device running (activated, not reset).
    pub(crate) want: Option<Arc<Activation>>,
    /// Rings handed a kick fd on this connection.
    pub(crate) started: Vec<usize>,
    pub(crate) server: Option<BackendReqThread>,
    /// A duplicate of our end of the back-end channel, watched for hang-ups.
    pub(crate) req_watch: Option<UnixStream>,
}

/// The device's link to its back end.
pub(crate) struct Link {
    pub(crate) kind: VhostUserKind,
    pub(crate) layout: QueueLayout,
    pub(crate) iommu: bool,
    pub(crate) main: Arc<MainSocket>,
    pub(crate) bridge: Option<Arc<IotlbBridge>>,
    pub(crate) session: BoundedMutex<Session>,
    pub(crate) hook: Mutex<Option<ThreadHook>>,
}

fn step(step: &'static str) -> impl FnOnce(super::channel::ChannelError) -> VhostUserError {
    move |source| VhostUserError::Request { step, source }
}

/// Virtio feature bits a new connection must offer again: those the guest
/// may have been offered because the first back end had them.
fn must_keep(kind: VhostUserKind, prior: &Negotiated) -> u64 {
    let config = prior.protocol & PROTOCOL_F_CONFIG != 0;
    prior.features
        & (kind.passthrough_features(config)
            | VIRTIO_F_VERSION_1
            | VIRTIO_F_ACCESS_PLATFORM
            | VHOST_USER_F_PROTOCOL_FEATURES)
}

/// SET_OWNER, feature and protocol-feature negotiation (and GET_QUEUE_NUM
/// with MQ). With `prior` (a reconnection), the back end must offer again
/// everything the device relied on, and exactly the prior protocol
/// features are acked.
pub(crate) fn negotiate(
    main: &MainSocket,
    layout: QueueLayout,
    iommu: bool,
    prior: Option<Negotiated>,
) -> Result<Negotiated, VhostUserError> {
    let kind = layout.kind();
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
    if iommu {
        let missing = missing_for_iommu(features, offered);
        if !missing.is_empty() {
            return Err(VhostUserError::MissingFeatures {
                missing,
                why: "for a device behind a vIOMMU (iommu=on): the back end must speak the vhost-user IOTLB protocol",
            });
        }
    }
    let protocol = match prior {
        Some(p) => {
            let lost = must_keep(kind, &p) & !features;
            let lost_protocol = p.protocol & !offered;
            if lost != 0 || lost_protocol != 0 {
                return Err(VhostUserError::FeaturesLost {
                    features: lost,
                    protocol: lost_protocol,
                });
            }
            p.protocol
        }
        None => {
            let mut wanted = PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG | PROTOCOL_F_MQ;
            if iommu {
                wanted |= PROTOCOL_F_BACKEND_REQ;
            }
            offered & wanted
        }
    };
    if layout.multiqueue() && protocol & PROTOCOL_F_MQ == 0 {
        return Err(VhostUserError::MissingFeatures {
            missing: vec!["VHOST_USER_PROTOCOL_F_MQ"],
            why: "for more than one queue pair (queues=N)",
        });
    }
    finish_negotiation(main, features, protocol, layout)?;
    Ok(Negotiated { features, protocol })
}

/// [`negotiate`] on a new connection, bounded by `limit` as a whole: the vhost crate retries a
/// reply read that timed out (EAGAIN from SO_RCVTIMEO) forever, so a peer that connects and
/// never answers would hang the caller (`Vmm::start` in server mode, the supervisor). A
/// watchdog thread, alive only during the negotiation, shuts the connection down when `limit`
/// passes; the pending read then ends and the negotiation fails.
pub(crate) fn negotiate_within(
    main: &MainSocket,
    layout: QueueLayout,
    iommu: bool,
    prior: Option<Negotiated>,
    limit: Duration,
) -> Result<Negotiated, VhostUserError> {
    let (Ok(watch), Ok(done)) = (main.watch_handle(), EventFd::new(libc::EFD_NONBLOCK)) else {
        return negotiate(main, layout, iommu, prior);
    };
    std::thread::scope(|scope| {
        let dog = std::thread::Builder::new()
            .name("vhost-user-watchdog".into())
            .spawn_scoped(scope, || {
                let mut fds = [PollFd::readable(&done)];
                if matches!(poll_fds(&mut fds, Some(limit)), Ok(0)) {
                    log::warn!("vhost-user: the back end did not finish negotiating within {limit:?}; closing the connection");
                    let _ = watch.shutdown(std::net::Shutdown::Both);
                }
            });
        if let Err(e) = &dog {
            log::warn!("vhost-user: no watchdog thread for the negotiation ({e}); it is bounded per read only");
        }
        let res = negotiate(main, layout, iommu, prior);
        // A full counter still wakes the watchdog.
        let _ = done.write(1);
        res
    })
}

/// SET_PROTOCOL_FEATURES, the queue-count check and reply-ack. GET_QUEUE_NUM
/// counts queues (2 per net queue pair), as the spec and the vhost crate read
/// it (the crate bounds later vring indices by it); DPDK 22.11 answers 128.
fn finish_negotiation(
    main: &MainSocket,
    features: u64,
    protocol: u64,
    layout: QueueLayout,
) -> Result<(), VhostUserError> {
    let needed = layout.backend_queues();
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
    Ok(())
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
pub(crate) fn ring_addr(
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

/// The IOVAs of every ring of `act` (behind a vIOMMU ring addresses are IOVAs).
fn vring_areas(act: &Activation) -> Vec<VringArea> {
    act.rings
        .iter()
        .flat_map(|r| VringArea::split_ring(r.index, r.size, r.desc, r.avail, r.used))
        .collect()
}

/// The rings whose back end must complete what the driver posts, for the
/// stall detector.
fn watched_rings(kind: VhostUserKind, act: &Activation) -> Vec<WatchedRing> {
    act.rings
        .iter()
        .filter(|r| kind.completes_promptly(r.index))
        .map(|r| WatchedRing {
            queue: r.index,
            avail: r.avail,
            used: r.used,
        })
        .collect()
}

impl Link {
    pub(crate) fn request<R>(
        &self,
        name: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<R>,
    ) -> Result<R, VhostUserError> {
        self.main.with_frontend(f).map_err(step(name))
    }

    /// Lock the session, waiting at most `bound` (a vCPU must not wait
    /// longer than the channel timeout): past it, the main socket is shut
    /// down so that whoever holds the lock fails fast, and the lock is
    /// taken then.
    pub(crate) fn lock_session(&self, bound: Option<Duration>) -> BoundedGuard<'_, Session> {
        let Some(bound) = bound else {
            return self.session.lock();
        };
        if let Some(s) = self.session.lock_within(bound) {
            return s;
        }
        log::warn!("vhost-user: the back end is too slow to (re)start; dropping the connection");
        self.main.close();
        self.session.lock()
    }

    /// SET_FEATURES, SET_MEM_TABLE and, behind a vIOMMU, the bridge and the
    /// back-end request channel.
    fn start_device(&self, s: &mut Session, act: &Activation) -> Result<(), VhostUserError> {
        // The control queue is ours: CTRL_VQ never reaches the back end.
        let features = backend_features(act.acked, s.neg.features)
            & !(self.layout.local_features() & NET_F_CTRL_VQ);
        self.request("SET_FEATURES", |fe| fe.set_features(features))?;
        let table = memory_table(&act.mem)?;
        self.request("SET_MEM_TABLE", |fe| fe.set_mem_table(&table).map(|_| ()))?;
        if let Some(bridge) = &self.bridge {
            // Before anything else IOTLB-related (no miss can arrive before
            // SET_BACKEND_REQ_FD): one full-range INVALIDATE, whatever the
            // back end did with its IOTLB at SET_FEATURES.
            bridge
                .start(act.mem.clone())
                .map_err(step("IOTLB_MSG (full-range INVALIDATE at connection)"))?;
            let ours = self
                .main
                .open_backend_channel()
                .map_err(step("SET_BACKEND_REQ_FD"))?;
            let watch = ours.try_clone().map_err(VhostUserError::Resource)?;
            let label = format!(
                "{} {}",
                self.kind.name(),
                bridge.rid().map(|r| r.to_string()).unwrap_or_default()
            );
            let server = BackendReqServer::new(ours, bridge.clone()).with_label(label);
            let hook = lock(&self.hook).clone();
            s.server = Some(
                server
                    .spawn_with_hook("vhost-user-req", hook)
                    .map_err(VhostUserError::Resource)?,
            );
            s.req_watch = Some(watch);
        }
        Ok(())
    }

    /// Program one vring starting at avail index `base`.
    fn start_ring(
        &self,
        act: &Activation,
        ring: &RingSetup,
        base: u16,
    ) -> Result<(), VhostUserError> {
        let index = ring.index;
        self.request("SET_VRING_NUM", |fe| fe.set_vring_num(index, ring.size))?;
        self.request("SET_VRING_BASE", |fe| fe.set_vring_base(index, base))?;
        let addr = |a| ring_addr(&act.mem, self.iommu, index, a);
        let config = VringConfigData {
            queue_max_size: ring.max_size,
            queue_size: ring.size,
            flags: 0,
            desc_table_addr: addr(ring.desc)?,
            used_ring_addr: addr(ring.used)?,
            avail_ring_addr: addr(ring.avail)?,
            log_addr: None,
        };
        self.request("SET_VRING_ADDR", |fe| fe.set_vring_addr(index, &config))?;
        let qi = u16::try_from(index).unwrap_or(u16::MAX);
        let call = match (
            act.interrupt.notifier(VirtioInterruptType::Queue(qi)),
            &ring.relay,
        ) {
            (Some(irqfd), _) => irqfd,
            (None, Some(efd)) => efd,
            (None, None) => return Err(VhostUserError::NoCallFd(index)),
        };
        self.request("SET_VRING_CALL", |fe| fe.set_vring_call(index, call))?;
        self.request("SET_VRING_KICK", |fe| fe.set_vring_kick(index, &ring.kick))
    }

    /// The avail index a new back end resumes `ring` at: the used index the
    /// old one published in guest memory (read through the vIOMMU). Buffers
    /// it had taken but not completed are processed again (a TX frame may
    /// be sent twice); completed ones are not. Falls back to the index at
    /// activation if the used ring cannot be read.
    pub(crate) fn resume_index(&self, act: &Activation, ring: &RingSetup) -> u16 {
        let Some(idx_addr) = ring.used.checked_add(2) else {
            return ring.next_avail;
        };
        let gpa = match &self.bridge {
            Some(b) if self.iommu => b.device_gpa(idx_addr, 2),
            _ => Some(idx_addr),
        };
        gpa.and_then(|g| act.mem.read_obj::<u16>(GuestAddress(g)).ok())
            .unwrap_or(ring.next_avail)
    }

    /// Program the back end for `act`. With `resume` (a new connection of a
    /// running device) the rings resume at [`Link::resume_index`] and are
    /// kicked once so that pending buffers are picked up.
    pub(crate) fn program(
        &self,
        s: &mut Session,
        act: &Activation,
        resume: bool,
    ) -> Result<(), VhostUserError> {
        self.start_device(s, act)?;
        if let (Some(bridge), true) = (&self.bridge, self.iommu) {
            bridge.set_vrings(vring_areas(act));
            bridge.set_watched_rings(watched_rings(self.kind, act));
        }
        for ring in &act.rings {
            let base = if resume {
                self.resume_index(act, ring)
            } else {
                ring.next_avail
            };
            self.start_ring(act, ring, base)?;
            s.started.push(ring.index);
        }
        if s.neg.has_protocol_features() {
            let enabled = act.enabled.load(Ordering::Acquire);
            for ring in &act.rings {
                self.request("SET_VRING_ENABLE", |fe| {
                    fe.set_vring_enable(ring.index, ring.index < enabled)
                })?;
            }
        }
        if resume {
            for ring in &act.rings {
                // A full counter still wakes the back end.
                let _ = ring.kick.write(1);
            }
        }
        Ok(())
    }

    /// Enable the rings of `act` below `count` in the back end and disable
    /// the others (the control queue's VQ_PAIRS_SET). Recorded in `act` so
    /// that a new connection gets the same; while the back end is away
    /// nothing is sent. False if a request failed or the device is stopped.
    pub(crate) fn enable_rings(
        &self,
        act: &Activation,
        count: usize,
        bound: Option<Duration>,
    ) -> bool {
        act.enabled.store(count, Ordering::Release);
        let s = self.lock_session(bound);
        if !s.up {
            return true;
        }
        if s.started.is_empty() || !s.neg.has_protocol_features() {
            return false;
        }
        for ring in &act.rings {
            if !s.started.contains(&ring.index) {
                continue;
            }
            let on = ring.index < count;
            if let Err(e) =
                self.request("SET_VRING_ENABLE", |fe| fe.set_vring_enable(ring.index, on))
            {
                log::warn!(
                    "vhost-user: {} queue {} failed: {e}",
                    if on { "enabling" } else { "disabling" },
                    ring.index,
                    e = chain(&e)
                );
                return false;
            }
        }
        true
    }

    /// Stop every started ring (GET_VRING_BASE); false if the back end failed.
    pub(crate) fn stop_rings(&self, s: &mut Session) -> bool {
        let mut ok = true;
        for index in std::mem::take(&mut s.started) {
            if s.neg.has_protocol_features() {
                if let Err(e) =
                    self.request("SET_VRING_ENABLE", |fe| fe.set_vring_enable(index, false))
                {
                    log::warn!(
                        "vhost-user: disabling queue {index} failed: {e}",
                        e = chain(&e)
                    );
                    ok = false;
                }
            }
            match self.request("GET_VRING_BASE", |fe| fe.get_vring_base(index)) {
                Ok(base) => log::debug!("vhost-user: queue {index} stopped at {base}"),
                Err(e) => {
                    log::warn!(
                        "vhost-user: stopping queue {index} failed: {e}",
                        e = chain(&e)
                    );
                    ok = false;
                }
            }
        }
        ok
    }

    /// Stop the back-end channel thread of this connection.
    pub(crate) fn stop_server(&self, s: &mut Session) {
        s.req_watch = None;
        if let Some(srv) = s.server.take() {
            if let Some(reason) = srv.stop() {
                log::debug!(
                    "vhost-user back-end channel thread ended: {reason}",
                    reason = chain(&reason)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_connection_must_keep_what_the_guest_may_use() {
        let csum = 1u64;
        let unknown = 1u64 << 40;
        let prior = Negotiated {
            features: VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | csum | unknown,
            protocol: PROTOCOL_F_REPLY_ACK,
        };
        let keep = must_keep(VhostUserKind::Net, &prior);
        assert_eq!(keep, VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | csum);
        // Bits the guest was never offered may disappear.
        assert_eq!(keep & unknown, 0);
    }
}
