//! vhost-user frontend devices and the IOTLB protocol.
//!
//! iovmm is the vhost-user *frontend*: a [`VhostUserDevice`] is a virtio
//! device (net or blk) whose data path runs in an external back end. When
//! the device sits behind a vIOMMU, its [`IotlbBridge`] keeps the back end's
//! device IOTLB consistent with the guest's IOMMU mappings.
//!
//! # API for the VMM
//!
//! ```text
//! // 1. Before the guest starts: connect and negotiate (fails with a typed
//! //    VhostUserError if the socket is absent or the back end lacks what
//! //    the device needs, e.g. BACKEND_REQ/REPLY_ACK/ACCESS_PLATFORM with iommu).
//! let mut cfg = VhostUserConfig::net("/run/vu.sock");      // or ::blk(path, Some(sectors))
//! cfg.iommu = true;                                         // --vhost-user net,socket=..,iommu=on
//! let dev = VhostUserDevice::connect(cfg)?;
//! let stats = dev.stats_handle();                           // keep for the library API
//! // 2. Behind a vIOMMU, once the PCI address (requester id) is known:
//! let bridge = dev.bridge().expect("iommu=on");             // Arc<IotlbBridge>
//! viommu.add_endpoint(rid)?;                                // viommu: Arc<dyn devices::viommu::Viommu>
//! bridge.set_translation(viommu.clone(), rid);              // misses translate, refusals fault
//! let reg = viommu.register_consumer(rid, bridge.clone(), false)?; // unmaps -> INVALIDATE
//! // 3. Wrap `dev` in the virtio-pci transport. The transport drives
//! //    activate/reset; stats.snapshot() reads the counters at any time.
//! ```
//!
//! * `activate` sends SET_FEATURES (the driver's acked features the back end
//!   offered, plus VHOST_USER_F_PROTOCOL_FEATURES), SET_MEM_TABLE (every
//!   guest RAM region with its memfd; the table stays GPA -> VMM address),
//!   behind a vIOMMU opens the back-end request channel and starts its
//!   server thread, then per queue SET_VRING_NUM/BASE/ADDR, SET_VRING_CALL
//!   (the queue's irqfd from `VirtioInterrupt::notifier`, or an eventfd
//!   relayed to `trigger` by a helper thread when there is none),
//!   SET_VRING_KICK (the transport's ioeventfd) and SET_VRING_ENABLE.
//!   Behind a vIOMMU ring addresses are passed untranslated (IOVAs); without
//!   one they are translated to VMM virtual addresses, as the spec requires.
//!   A device behind a vIOMMU refuses to start if `set_translation` was not
//!   called or the driver did not accept VIRTIO_F_ACCESS_PLATFORM (the back
//!   end would otherwise bypass the IOMMU).
//! * `reset` disables and stops every ring (GET_VRING_BASE), stops the
//!   server and relay threads and returns true unless the back end is gone.
//! * Back-end death: every request is bounded by the configured timeout;
//!   afterwards the socket is closed and, without reconnection, the device
//!   reports itself broken (`activate` fails, `reset` returns false) and
//!   never panics. With `VhostUserConfig::reconnect` a supervisor thread
//!   reconnects, re-negotiates and restores a running device; every
//!   connection starts with one full-range INVALIDATE, so the new back end's
//!   IOTLB is empty and refills through misses (see [`reconnect`]).
//! * Server mode ([`VhostUserDevice::accept`] on a socket from
//!   [`listener::bind`]): iovmm listens and the back end connects; the first
//!   back end is awaited (bounded) before the guest starts, and the
//!   supervisor accepts the next one whenever the current one is gone, on
//!   the same restore path (see [`listener`]).
//!
//! **Lock order for the vIOMMU.** The bridge calls `DmaTranslate::translate`
//! while holding its own lock (so an UPDATE computed before an unmap is
//! acked before that unmap's INVALIDATE is sent). The vIOMMU must therefore
//! deliver events (`NotifierSet::dispatch*`) *after* releasing the lock its
//! `translate` takes, exactly as the `iommu` crate's models return events
//! instead of delivering them. `Viommu::report_fault` is called with no
//! bridge lock held. `notify` for unmap-type events returns only after the back end
//! acked the INVALIDATE; a nack closes the back end's socket and returns an
//! error.
//!
//! # Modules
//!
//! vhost 0.18 can neither send VHOST_USER_IOTLB_MSG from its `Frontend` nor
//! receive VHOST_USER_BACKEND_IOTLB_MSG in its `FrontendReqHandler` (the arm
//! is missing and the message header type is private), so this module carries
//! its own codec for those frames:
//!
//! * [`wire`]: the 12-byte header, the 32-byte `vhost_iotlb_msg` payload, the
//!   u64 reply-ack, strict bounded decoding.
//! * [`channel`]: [`channel::IotlbChannel`] (send UPDATE/INVALIDATE, wait for
//!   the ack with a timeout) and [`channel::MainSocket`], its real
//!   implementation; [`channel::MockIotlbChannel`] for tests.
//! * [`backend_req`]: the server for the back-end request channel, which
//!   answers misses through a [`miss::MissHandler`].
//! * [`bridge`]: [`IotlbBridge`], the `MissHandler` + `IommuNotifier` of one
//!   endpoint.
//! * [`frontend`]: [`VhostUserDevice`]; [`kind`]: what differs between net
//!   and blk; [`relay`]: call-eventfd relay; [`stats`]: counters.
//! * [`mq`]: the queue layout of a multiqueue net device (`queues=N`);
//!   [`ctrl`]: its control queue, served by the VMM (VQ_PAIRS_SET).
//!
//! # One lock for the main socket
//!
//! vhost 0.18's `Frontend` keeps its socket inside a private
//! `Arc<Mutex<..>>`; it exposes only the raw fd (`AsRawFd`), not the endpoint
//! or its lock. A message of ours written between one of its requests and the
//! reply would interleave replies (QEMU's "Expected 22 received 40" bug). So
//! [`channel::MainSocket`] owns both the `Frontend` and a `dup` of the same
//! socket inside **one mutex of ours**: crate requests run through
//! [`channel::MainSocket::with_frontend`], IOTLB frames through
//! [`channel::IotlbChannel::send_iotlb`], and each request and its reply are
//! exchanged while that mutex is held. This works because the crate reads
//! exactly one frame per reply and never buffers ahead. The `Frontend` is
//! never handed out by value, so no clone can bypass the lock.
//!
//! Reply waits are bounded: our IOTLB acks by `poll` with a deadline, the
//! crate's reads and writes by SO_RCVTIMEO/SO_SNDTIMEO on the shared socket.
//! After a timeout, disconnect or protocol error the stream may hold half a
//! frame, so the socket is shut down and every later call fails fast.
//!
//! # Threads
//!
//! The back-end channel is served on its own thread. For a miss it sends the
//! UPDATE on the main socket (taking the lock, waiting for that UPDATE's ack)
//! and only then acks the miss, so "completed" means the UPDATE is in the
//! back end's IOTLB. It never waits for anything else on the main socket. A
//! single-threaded back end that blocks on its miss ack while we wait for an
//! INVALIDATE ack cannot hang us: both waits time out.

pub mod backend_req;
pub mod bridge;
pub mod channel;
pub mod ctrl;
mod frame;
pub mod frontend;
pub mod installed;
pub mod kind;
pub mod listener;
pub mod miss;
pub mod mq;
pub mod recheck;
pub mod reconnect;
pub mod relay;
mod session;
pub mod stall;
pub mod stats;
pub mod wire;

pub use bridge::{IotlbBridge, IotlbPolicy};
pub use frontend::{VhostUserConfig, VhostUserDevice, VhostUserError, VhostUserStatsHandle};
pub use kind::VhostUserKind;
pub use reconnect::ReconnectStats;
pub use stats::VhostUserStats;
