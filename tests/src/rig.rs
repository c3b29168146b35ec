//! One in-process vhost-user rig for the protocol, reconnect and hostile-back-end tests: a
//! `VhostUserDevice` against the test back end (`crate::backend`), driven through the
//! `VirtioDevice` trait, with memfd-backed guest memory and split rings laid out here.
//!
//! Layout: `MEM` bytes of guest RAM at GPA 0; queue `q`'s descriptor table, avail ring and
//! used ring at `ring_gpa(q)`, `+0x1000` and `+0x2000`; TX buffers one page each from `BUF`.
//! Behind a vIOMMU the driver programs IOVAs, which are GPAs shifted by `IOVA_OFF` (so
//! IOVA != GPA is exercised). Everything here panics on failure: it is test scaffolding.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::vhost_user::wire::{IotlbMsg, FLAG_NEED_REPLY, FLAG_VERSION, VHOST_USER_IOTLB_MSG};
use devices::vhost_user::{
    VhostUserConfig, VhostUserDevice, VhostUserError, VhostUserKind, VhostUserStats,
};
pub use devices::viommu::testing::{Faults, MapViommu};
use devices::virtio::{
    ActivateContext, GuestMemoryMmap, VirtioDevice, VirtioDeviceError, VirtioInterrupt,
    VirtioInterruptType,
};
use iommu::sync::lock;
use iommu::{IommuEvent, IommuNotifier, IovaRange, NotifyError, Permissions, RequesterId};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::backend::{BackendConfig, BackendHandle, TestBackend};

/// Guest RAM size.
pub const MEM: u64 = 0x20_0000;
/// IOVAs are GPAs shifted by this.
pub const IOVA_OFF: u64 = 0x8000_0000;
/// GPA of queue 0's rings.
pub const RING_BASE: u64 = 0x1_0000;
/// GPA of the first TX buffer page.
pub const BUF: u64 = 0x4_0000;
/// Size of every queue.
pub const QSIZE: u16 = 8;
/// Length of the virtio-net header in front of every frame.
pub const NET_HDR: usize = 12;
/// The device's requester id.
pub const RID: RequesterId = RequesterId::from_bdf(0, 0x18);
/// The front end's default channel timeout (`dev_config`).
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// Socket path of a socketpair device (only shown in messages).
const PAIR_SOCKET: &str = "/test/socketpair";

/// GPA of queue `q`'s descriptor table (its rings follow at +0x1000 and +0x2000).
pub fn ring_gpa(q: usize) -> u64 {
    RING_BASE + 0x4000 * q as u64
}

/// FNV-1a, the checksum the test back end keeps over TX frames.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The `VhostUserError` inside a device error; panics on any other kind.
pub fn backend_err(e: VirtioDeviceError) -> VhostUserError {
    match e {
        VirtioDeviceError::Backend(b) => *b
            .downcast::<VhostUserError>()
            .expect("a VhostUserError inside VirtioDeviceError::Backend"),
        other => panic!("expected a back-end error, got {other:?}"),
    }
}

/// Every IOTLB message `be` received, with its header flags, in order.
pub fn iotlb_msgs(be: &BackendHandle) -> Vec<(u32, IotlbMsg)> {
    be.records()
        .iter()
        .filter(|r| r.request == VHOST_USER_IOTLB_MSG)
        .map(|r| {
            let msg = IotlbMsg::decode(r.request, &r.payload).expect("a well-formed IOTLB msg");
            (r.flags, msg)
        })
        .collect()
}

/// The IOTLB message every connection of a device behind a vIOMMU starts with, with its
/// header flags: one acked full-range INVALIDATE, `(0, u64::MAX)` so that `iova + size` does
/// not wrap.
pub fn connect_invalidate() -> (u32, IotlbMsg) {
    (
        FLAG_VERSION | FLAG_NEED_REPLY,
        IotlbMsg::invalidate(0, u64::MAX),
    )
}

/// The IOTLB messages `be` received whose range covers `iova`.
pub fn covering(be: &BackendHandle, iova: u64) -> Vec<IotlbMsg> {
    iotlb_msgs(be)
        .into_iter()
        .map(|(_, m)| m)
        .filter(|m| m.iova <= iova && iova - m.iova < m.size)
        .collect()
}

/// A front-end configuration for a socketpair device with the default `TIMEOUT`
/// (a blk device gets 2048 sectors).
pub fn dev_config(kind: VhostUserKind, iommu: bool) -> VhostUserConfig {
    let mut c = match kind {
        VhostUserKind::Net => VhostUserConfig::net(PAIR_SOCKET),
        VhostUserKind::Blk => VhostUserConfig::blk(PAIR_SOCKET, Some(2048)),
    };
    c.iommu = iommu;
    c.timeout = TIMEOUT;
    c
}

/// A test back end on one end of a socketpair and the device connected to the other.
pub fn try_connect(
    config: BackendConfig,
    dcfg: VhostUserConfig,
) -> (Result<VhostUserDevice, VhostUserError>, BackendHandle) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let be = TestBackend::serve_stream(theirs, config).expect("test back end on a socketpair");
    (VhostUserDevice::from_stream(ours, dcfg), be)
}

/// `<tmp>/iovmm-<group>-<pid>/<name>.sock` (the directory is created).
pub fn socket_path(group: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("iovmm-{group}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("socket directory");
    dir.join(format!("{name}.sock"))
}

/// Records interrupts; optionally hands out per-queue irqfds.
#[derive(Default)]
pub struct RecordingIrq {
    /// Every interrupt triggered, in order.
    pub fired: Mutex<Vec<VirtioInterruptType>>,
    /// Queue `q`'s irqfd (none: interrupts go through `trigger`).
    pub irqfds: Vec<EventFd>,
}

impl VirtioInterrupt for RecordingIrq {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        lock(&self.fired).push(t);
        Ok(())
    }

    fn notifier(&self, t: VirtioInterruptType) -> Option<&EventFd> {
        match t {
            VirtioInterruptType::Queue(q) => self.irqfds.get(usize::from(q)),
            VirtioInterruptType::Config => None,
        }
    }
}

/// A vhost-user device, its test back end and the guest memory and rings the test drives.
pub struct Rig {
    /// The device under test.
    pub dev: VhostUserDevice,
    /// The back end it was connected to first.
    pub be: BackendHandle,
    /// Guest RAM (`MEM` bytes at GPA 0).
    pub mem: GuestMemoryMmap,
    /// The interrupt sink handed over at every `activate`.
    pub irq: Arc<RecordingIrq>,
    /// The kick eventfds of the last `activate`, by queue.
    pub kicks: Vec<EventFd>,
    /// The driver programs IOVAs (`gpa + IOVA_OFF`) instead of GPAs.
    pub iommu: bool,
    /// The listening socket, removed on drop (`Rig::listen`).
    socket: Option<PathBuf>,
    /// The translation installed with [`Rig::use_translation`], which [`Rig::unmap`] edits.
    translation: Mutex<Option<Arc<MapViommu>>>,
}

impl Rig {
    /// A device built from `dcfg` on a socketpair with a back end run from `config`.
    pub fn pair(config: BackendConfig, dcfg: VhostUserConfig) -> Rig {
        let iommu = dcfg.iommu;
        let (dev, be) = try_connect(config, dcfg);
        Rig::new(dev.expect("the device connects"), be, iommu, None)
    }

    /// A back end from `config` listening on `path` and a device built from `dcfg` (whose
    /// socket should be `path`) connected to it; the socket file is removed on drop.
    pub fn listen(path: PathBuf, config: BackendConfig, dcfg: VhostUserConfig) -> Rig {
        let iommu = dcfg.iommu;
        let be = TestBackend::listen(&path, config).expect("test back end listens");
        let dev = VhostUserDevice::connect(dcfg).expect("the device connects");
        Rig::new(dev, be, iommu, Some(path))
    }

    fn new(dev: VhostUserDevice, be: BackendHandle, iommu: bool, socket: Option<PathBuf>) -> Rig {
        Rig {
            dev,
            be,
            mem: vmm::vstate::memory::create_guest_memory(&[(0, MEM)]).expect("guest memory"),
            irq: Arc::new(RecordingIrq::default()),
            kicks: Vec::new(),
            iommu,
            socket,
            translation: Mutex::default(),
        }
    }

    /// Hands out one irqfd per queue from now on (before the first `activate`).
    pub fn with_irqfds(mut self) -> Rig {
        let n = self.dev.queue_max_sizes().len();
        let irqfds = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("irqfd"))
            .collect();
        self.irq = Arc::new(RecordingIrq {
            fired: Mutex::default(),
            irqfds,
        });
        self
    }

    /// The listening socket of a `Rig::listen` rig.
    pub fn socket(&self) -> &Path {
        self.socket.as_deref().expect("a rig made by Rig::listen")
    }

    /// Installs a translation of all guest RAM at `IOVA_OFF`, read-write, as one mapping; the
    /// returned list records the faults the device reports.
    pub fn translate_all_ram(&self) -> (Arc<MapViommu>, Faults) {
        let stub = Arc::new(MapViommu::default());
        stub.map(IOVA_OFF, MEM, 0, Permissions::ReadWrite);
        let faults = stub.faults();
        self.dev
            .set_translation(stub.clone(), RID)
            .expect("set_translation");
        *lock(&self.translation) = Some(stub.clone());
        (stub, faults)
    }

    /// The address the driver programs for `gpa`.
    pub fn dma(&self, gpa: u64) -> u64 {
        if self.iommu {
            gpa + IOVA_OFF
        } else {
            gpa
        }
    }

    /// Queue `q`, ready, with its rings at `ring_gpa(q)` (as the driver addresses them).
    pub fn queue(&self, q: usize) -> Queue {
        let mut queue = Queue::new(256).expect("queue");
        queue.set_size(QSIZE);
        let base = ring_gpa(q);
        let ring = |off: u64| GuestAddress(self.dma(base + off));
        queue.try_set_desc_table_address(ring(0)).expect("desc");
        queue
            .try_set_avail_ring_address(ring(0x1000))
            .expect("avail");
        queue.try_set_used_ring_address(ring(0x2000)).expect("used");
        queue.set_ready(true);
        queue
    }

    /// Acks every offered feature and activates all queues with fresh kick eventfds.
    pub fn activate(&mut self) -> Result<(), VirtioDeviceError> {
        let avail = self.dev.avail_features();
        self.dev.ack_features(avail);
        let n = self.dev.queue_max_sizes().len();
        let mut queues = Vec::new();
        self.kicks.clear();
        for q in 0..n {
            let kick = EventFd::new(libc::EFD_NONBLOCK).expect("kick eventfd");
            self.kicks.push(kick.try_clone().expect("kick clone"));
            queues.push((q, self.queue(q), kick));
        }
        self.dev.activate(ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.irq.clone(),
        })
    }

    /// Posts one TX frame in buffer page `slot` at avail slot `slot` of queue 1 and kicks.
    pub fn send_tx(&self, slot: u16, frame: &[u8]) {
        let buf = BUF + 0x1000 * u64::from(slot);
        self.send_tx_at(slot, frame, buf, self.dma(buf));
    }

    /// Like [`Rig::send_tx`], with the frame written at GPA `gpa` and the descriptor pointing
    /// at `addr` (an IOVA the test mapped to `gpa` itself, e.g. after a remap).
    pub fn send_tx_at(&self, slot: u16, frame: &[u8], gpa: u64, addr: u64) {
        let base = ring_gpa(1);
        let mut data = vec![0u8; NET_HDR];
        data.extend_from_slice(frame);
        self.write(&data, gpa);
        let mut d = addr.to_le_bytes().to_vec();
        d.extend_from_slice(&(data.len() as u32).to_le_bytes());
        d.extend_from_slice(&[0, 0, 0, 0]);
        let slot_q = u64::from(slot % QSIZE);
        self.write(&d, base + 16 * slot_q);
        let avail = base + 0x1000;
        self.write_u16(slot % QSIZE, avail + 4 + 2 * slot_q);
        self.write_u16(slot.wrapping_add(1), avail + 2);
        self.kicks[1].write(1).expect("kick");
    }

    fn write(&self, data: &[u8], gpa: u64) {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .expect("write to guest RAM");
    }

    fn write_u16(&self, v: u16, gpa: u64) {
        self.mem
            .write_obj(v, GuestAddress(gpa))
            .expect("write to guest RAM");
    }

    /// Queue `q`'s used index in guest memory.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(ring_gpa(q) + 0x2002))
            .expect("used ring")
    }

    /// The VMM address of `gpa`.
    pub fn host(&self, gpa: u64) -> u64 {
        let host = self.mem.get_host_address(GuestAddress(gpa));
        host.expect("gpa in guest RAM") as u64
    }

    /// Every IOTLB message the first back end received, with its header flags.
    pub fn iotlb_msgs(&self) -> Vec<(u32, IotlbMsg)> {
        iotlb_msgs(&self.be)
    }

    /// Installs `stub` as the device's translation (no fault hook); [`Rig::unmap`] edits it.
    pub fn use_translation(&self, stub: Arc<MapViommu>) {
        self.dev
            .set_translation(stub.clone(), RID)
            .expect("set_translation");
        *lock(&self.translation) = Some(stub);
    }

    /// A guest unmap of `range`: removes it from the installed translation, then notifies the
    /// device's IOTLB bridge (which invalidates what the back end holds there and changed).
    pub fn unmap(&self, range: IovaRange) -> Result<(), NotifyError> {
        if let Some(t) = lock(&self.translation).as_ref() {
            t.unmap(range);
        }
        let bridge = self.dev.bridge().expect("an IOTLB bridge (iommu device)");
        bridge.notify(&IommuEvent::Unmap { rid: RID, range })
    }

    /// Waits up to `within` until `pred` holds for the device's stats; panics with `what`.
    pub fn wait_stats(&self, what: &str, within: Duration, pred: impl Fn(&VhostUserStats) -> bool) {
        let deadline = Instant::now() + within;
        while !pred(&self.dev.stats()) {
            assert!(Instant::now() < deadline, "{what}: {:?}", self.dev.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}
