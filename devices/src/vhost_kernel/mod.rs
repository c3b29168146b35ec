//! vhost-net in the kernel, with its device IOTLB kept by the vIOMMU.
//!
//! A [`VhostNetDevice`] is a virtio-net device (on iovmm's virtio-pci
//! transport, like a vhost-user device) whose data path is the kernel's
//! vhost-net worker and whose backend is a tap. Without a vIOMMU the kernel
//! gets the memory table and VMM addresses, as every vhost-net user does.
//! Behind one it gets `VIRTIO_F_ACCESS_PLATFORM`, and every address it
//! uses (rings and buffers) is an IOVA it translates through its device
//! IOTLB, which iovmm fills and empties with `struct vhost_msg_v2` messages
//! on the vhost fd.
//!
//! # One seam, two transports
//!
//! The IOTLB logic is the vhost-user one, unchanged: an
//! [`crate::vhost_user::IotlbBridge`] per device answers misses through the
//! vIOMMU seam ([`crate::viommu::Viommu`]), records what it installed, and
//! turns the vIOMMU's unmap events into INVALIDATEs of what changed. Only
//! its [`crate::vhost_user::channel::IotlbChannel`] differs:
//! [`VhostFdChannel`] writes the messages to the vhost fd, where the kernel
//! applies them synchronously inside `write(2)` (a successful write is the
//! ack). The kernel's MISS messages are read from the same fd by an
//! [`IotlbServer`] thread (`vhost-net-iotlb`) and answered with
//! [`crate::vhost_user::miss::MissHandler::answer_miss`], the one way a miss
//! is answered.
//!
//! ```text
//!  guest unmap ─► vIOMMU ─► IotlbBridge::notify ─► VhostFdChannel ─write─► kernel IOTLB
//!  kernel MISS ─read─► IotlbServer ─► IotlbBridge::answer_miss ─► VhostFdChannel ─write─┘
//! ```
//!
//! # What the vhost crate does and what is ours
//!
//! The vhost crate (`vhost-kern`, `vhost-net`) opens the device, sets the
//! owner, features, backend features, memory table, ring number, base,
//! kick and call, and the tap backend ([`kern`]). Ours: `VHOST_SET_VRING_ADDR`
//! with IOVAs (the crate converts guest-physical addresses), and the IOTLB
//! messages ([`msg`], [`io`]): the crate can write one but cannot read, and
//! its parser transmutes unchecked kernel bytes into enums.
//!
//! # Kernel behaviour iovmm relies on
//!
//! See [`server`] for misses (a refused or unanswered miss stops that
//! virtqueue until the next kick; it never lets the kernel touch the
//! memory) and [`io`] for the synchronous write. `VHOST_SET_FEATURES` with
//! ACCESS_PLATFORM allocates a fresh, empty IOTLB; iovmm still starts every
//! activation with a full-range INVALIDATE (the bridge's connection
//! INVALIDATE). The kernel keeps at most 2048 entries (module parameter
//! `max_iotlb_entries`) and retires the oldest when full, which only causes
//! another miss. An INVALIDATE removes every entry overlapping its range
//! whole, so the kernel may drop more than the bridge's record: the record
//! stays a superset of what the kernel holds.

pub mod channel;
pub mod device;
pub mod features;
pub mod io;
pub mod kern;
pub mod msg;
pub mod server;
pub mod stats;
pub mod tap;

pub use channel::VhostFdChannel;
pub use device::{VhostNetConfig, VhostNetDevice, VhostNetError};
pub use server::{IotlbServer, ServerError};
pub use stats::{VhostNetStats, VhostNetStatsHandle};
