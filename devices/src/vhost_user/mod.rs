//! vhost-user frontend and the IOTLB protocol codec.
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
mod frame;
pub mod frontend;
pub mod kind;
pub mod miss;
pub mod relay;
pub mod stats;
pub mod wire;

pub use bridge::{FaultHook, IotlbBridge, IotlbPolicy};
pub use frontend::{VhostUserConfig, VhostUserDevice, VhostUserError, VhostUserStatsHandle};
pub use kind::VhostUserKind;
pub use stats::VhostUserStats;
