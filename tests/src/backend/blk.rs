//! The virtio-blk mode of the test back end: a file-backed disk served on
//! one request queue with VIRTIO_BLK_T_IN / OUT / FLUSH / GET_ID, the
//! configuration space over the CONFIG protocol feature (capacity, seg_max,
//! blk_size), and the same IOTLB, miss and access code as the net mode
//! (`net::Access`): with ACCESS_PLATFORM every ring and buffer address is an
//! IOVA, reads need a readable and writes a writable translation. A request
//! whose header or data buffer does not translate (the front end refused the
//! miss: e.g. a descriptor at an IOVA the guest already unmapped) completes
//! with IOERR and is counted as `faulted`; the queue keeps going.
//!
//! Request parsing and execution live in [`request`] (fuzzed in `tests`).
//! The queue is processed without holding its vring lock across device
//! accesses: a miss may wait for an UPDATE that the front end sends only
//! after a vring message, which needs that lock.

pub mod request;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use devices::vhost_user::wire::{PROTOCOL_F_CONFIG, VHOST_USER_F_PROTOCOL_FEATURES};

use self::request::{execute, Disk, GuestMem, Outcome, Seg, ID_LEN, SECTOR, S_IOERR, S_UNSUPP};
use super::net::Access;
use super::{BackendError, Counters, Shared, VringState};
use iommu::sync::lock;

/// virtio-blk feature: seg_max in the configuration.
pub const F_SEG_MAX: u64 = 1 << 2;
/// virtio-blk feature: blk_size in the configuration.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// virtio-blk feature: FLUSH requests.
pub const F_FLUSH: u64 = 1 << 9;
/// Device features offered in blk mode.
pub const BLK_FEATURES: u64 = F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
/// Length of the configuration space served (`struct virtio_blk_config`
/// up to and including the write-zeroes fields).
pub const CONFIG_LEN: usize = 60;
/// seg_max served: data descriptors per request (queue size 128 minus
/// header and status, like QEMU).
pub const SEG_MAX: u32 = 126;
/// The request queue.
const QUEUE: usize = 0;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// Payload header of GET_CONFIG / SET_CONFIG: offset, size, flags.
const CONFIG_HDR: usize = 12;
/// Largest configuration window the protocol allows.
const MAX_CONFIG: usize = 256;

/// What to serve in blk mode.
#[derive(Debug, Clone)]
pub struct BlkConfig {
    /// The disk image (its size, rounded down to 512 bytes, is the capacity).
    pub path: PathBuf,
    /// The GET_ID answer (at most 20 bytes are used).
    pub serial: String,
}

impl BlkConfig {
    /// A disk at `path` with serial `iovmm-test-blk`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BlkConfig {
            path: path.into(),
            serial: "iovmm-test-blk".into(),
        }
    }
}

/// blk request counters.
#[derive(Debug, Default)]
struct BlkCounters {
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    get_ids: AtomicU64,
    ioerrs: AtomicU64,
    unsupported: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    status_lost: AtomicU64,
    faulted: AtomicU64,
}

/// A copy of the blk counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkSnapshot {
    /// Request chains completed (used ring entries).
    pub requests: u64,
    /// Successful IN requests.
    pub reads: u64,
    /// Successful OUT requests.
    pub writes: u64,
    /// Successful FLUSH requests.
    pub flushes: u64,
    /// Successful GET_ID requests.
    pub get_ids: u64,
    /// Requests answered VIRTIO_BLK_S_IOERR (bad sector, direction,
    /// untranslatable buffer, ...).
    pub ioerrs: u64,
    /// Requests answered VIRTIO_BLK_S_UNSUPP.
    pub unsupported: u64,
    /// Disk bytes read into guest buffers.
    pub bytes_read: u64,
    /// Guest bytes written to the disk.
    pub bytes_written: u64,
    /// Requests whose status byte could not be written (no writable last
    /// descriptor, or no writable translation for it).
    pub status_lost: u64,
    /// Requests answered VIRTIO_BLK_S_IOERR because their header or a data
    /// buffer could not be translated (a refused miss: e.g. a descriptor at
    /// an IOVA the guest unmapped). Counted in `ioerrs` too.
    pub faulted: u64,
}

/// The disk and its counters.
#[derive(Debug)]
pub(crate) struct BlkDevice {
    disk: Disk,
    id: [u8; ID_LEN],
    counters: BlkCounters,
}

impl BlkDevice {
    pub(crate) fn open(cfg: &BlkConfig) -> Result<Self, BackendError> {
        let file = File::options().read(true).write(true).open(&cfg.path)?;
        let mut id = [0u8; ID_LEN];
        let serial = cfg.serial.as_bytes();
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial[..n]);
        Ok(BlkDevice {
            disk: Disk::new(file)?,
            id,
            counters: BlkCounters::default(),
        })
    }

    /// `struct virtio_blk_config` (little-endian).
    pub(crate) fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..8].copy_from_slice(&(self.disk.capacity() / SECTOR).to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c
    }

    pub(crate) fn snapshot(&self) -> BlkSnapshot {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlkSnapshot {
            requests: l(&c.requests),
            reads: l(&c.reads),
            writes: l(&c.writes),
            flushes: l(&c.flushes),
            get_ids: l(&c.get_ids),
            ioerrs: l(&c.ioerrs),
            unsupported: l(&c.unsupported),
            bytes_read: l(&c.bytes_read),
            bytes_written: l(&c.bytes_written),
            status_lost: l(&c.status_lost),
            faulted: l(&c.faulted),
        }
    }

    fn count(&self, o: &Outcome) {
        let (kind, data) = (o.kind, o.moved);
        let c = &self.counters;
        Counters::bump(&c.requests);
        if !o.status_written {
            Counters::bump(&c.status_lost);
        }
        if o.faulted {
            Counters::bump(&c.faulted);
        }
        match (o.status, kind) {
            (S_IOERR, _) => Counters::bump(&c.ioerrs),
            (S_UNSUPP, _) => Counters::bump(&c.unsupported),
            (_, Some(request::T_IN)) => {
                Counters::bump(&c.reads);
                c.bytes_read.fetch_add(data, Ordering::Relaxed);
            }
            (_, Some(request::T_OUT)) => {
                Counters::bump(&c.writes);
                c.bytes_written.fetch_add(data, Ordering::Relaxed);
            }
            (_, Some(request::T_FLUSH)) => Counters::bump(&c.flushes),
            (_, Some(request::T_GET_ID)) => Counters::bump(&c.get_ids),
            _ => {}
        }
    }
}

impl Shared {
    /// Virtio device features added in blk mode.
    pub(crate) fn blk_features(&self) -> u64 {
        if self.blk.is_some() {
            BLK_FEATURES
        } else {
            0
        }
    }

    /// Protocol features added in blk mode (the configuration space).
    pub(crate) fn blk_protocol(&self) -> u64 {
        if self.blk.is_some() {
            PROTOCOL_F_CONFIG
        } else {
            0
        }
    }

    /// The GET_CONFIG reply payload for request payload `p`: the requested
    /// window of the configuration space, or, for a window outside it (or a
    /// net back end), as many zero bytes with size 0 in the header, the
    /// protocol's failure answer (the front end reads the length it asked).
    pub(crate) fn blk_get_config(&self, p: &[u8]) -> Vec<u8> {
        let field = |o: usize| {
            p.get(o..o + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0)
        };
        let (offset, size, flags) = (field(0), field(4), field(8));
        let asked = p.len().saturating_sub(CONFIG_HDR);
        let window = self.blk.as_ref().and_then(|b| {
            let start = usize::try_from(offset).ok()?;
            let end = start.checked_add(usize::try_from(size).ok()?)?;
            b.config_space().get(start..end).map(<[u8]>::to_vec)
        });
        let data = window.filter(|w| !w.is_empty() && w.len() == asked);
        let len = data.as_ref().map_or(0, Vec::len) as u32;
        let mut reply = offset.to_le_bytes().to_vec();
        reply.extend_from_slice(&len.to_le_bytes());
        reply.extend_from_slice(&flags.to_le_bytes());
        match data {
            Some(d) => reply.extend_from_slice(&d),
            None => reply.resize(CONFIG_HDR + asked.min(MAX_CONFIG), 0),
        }
        reply
    }
}

/// Guest memory as the device sees it: through the IOTLB with permission
/// checks (reads need RO/RW, writes WO/RW), misses sent as needed.
struct IotlbMem<'a>(Access<'a>);

impl GuestMem for IotlbMem<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.0.read(addr, buf)
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.0.write(addr, buf)
    }
}

/// The ring addresses and indices, copied out of the vring lock.
#[derive(Debug, Clone, Copy)]
struct Ring {
    num: u16,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
    used_idx: u16,
}

impl Ring {
    fn of(v: &VringState) -> Self {
        Ring {
            num: v.num,
            desc: v.desc,
            avail: v.avail,
            used: v.used,
            last_avail: v.last_avail,
            used_idx: v.used_idx,
        }
    }

    fn read_u16(acc: &Access<'_>, addr: u64) -> Result<u16, BackendError> {
        let mut b = [0u8; 2];
        acc.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// The next available head, if any.
    fn next_avail(&self, acc: &Access<'_>) -> Result<Option<u16>, BackendError> {
        if Self::read_u16(acc, self.avail + 2)? == self.last_avail {
            return Ok(None);
        }
        fence(Ordering::Acquire);
        let slot = u64::from(self.last_avail % self.num);
        let head = Self::read_u16(acc, self.avail + 4 + 2 * slot)?;
        if head >= self.num {
            return Err(BackendError::BadMessage(format!("avail head {head}")));
        }
        Ok(Some(head))
    }

    /// The descriptor chain at `head` (bounded by the queue size).
    fn chain(&self, acc: &Access<'_>, head: u16) -> Result<Vec<Seg>, BackendError> {
        let mut out = Vec::new();
        let mut i = head;
        loop {
            let mut b = [0u8; 16];
            acc.read(self.desc + 16 * u64::from(i), &mut b)?;
            let (addr, rest) = b.split_at(8);
            let addr = u64::from_le_bytes(addr.try_into().unwrap_or_default());
            let len = u32::from_le_bytes(rest[..4].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([rest[4], rest[5]]);
            let next = u16::from_le_bytes([rest[6], rest[7]]);
            out.push(Seg {
                addr,
                len,
                writable: flags & DESC_F_WRITE != 0,
            });
            if flags & DESC_F_NEXT == 0 {
                return Ok(out);
            }
            if next >= self.num || out.len() >= usize::from(self.num) {
                return Err(BackendError::BadMessage(format!("bad chain at {head}")));
            }
            i = next;
        }
    }

    fn push_used(&mut self, acc: &Access<'_>, head: u16, len: u32) -> Result<(), BackendError> {
        let slot = u64::from(self.used_idx % self.num);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        acc.write(self.used + 4 + 8 * slot, &elem)?;
        fence(Ordering::Release);
        self.used_idx = self.used_idx.wrapping_add(1);
        self.last_avail = self.last_avail.wrapping_add(1);
        acc.write(self.used + 2, &self.used_idx.to_le_bytes())
    }
}

/// Complete every available request; returns how many.
fn drain(shared: &Shared, dev: &BlkDevice, ring: &mut Ring) -> Result<usize, BackendError> {
    let rings = Access::for_rings(shared);
    let mem = IotlbMem(Access::new(shared));
    let mut n = 0;
    while let Some(head) = ring.next_avail(&rings)? {
        let chain = ring.chain(&rings, head)?;
        let o = execute(&chain, &mem, &dev.disk, &dev.id);
        dev.count(&o);
        ring.push_used(&rings, head, o.used_len)?;
        n += 1;
    }
    Ok(n)
}

/// Process the request queue if it runs.
fn service(shared: &Shared, dev: &BlkDevice) {
    let proto = lock(&shared.neg).features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
    let (start, call) = {
        let v = lock(&shared.vrings[QUEUE]);
        if !v.started || (proto && !v.enabled) || v.num == 0 {
            return;
        }
        let call = v.call.as_ref().and_then(|c| c.try_clone().ok());
        (Ring::of(&v), call)
    };
    let mut ring = start;
    let res = drain(shared, dev, &mut ring);
    let mut v = lock(&shared.vrings[QUEUE]);
    // A vring message (GET_VRING_BASE, a new address) in between wins.
    let same = v.started && v.desc == start.desc && v.last_avail == start.last_avail;
    if same {
        v.last_avail = ring.last_avail;
        v.used_idx = ring.used_idx;
    }
    drop(v);
    if let Err(e) = &res {
        log::warn!("blk queue stopped: {e}");
        if same {
            lock(&shared.vrings[QUEUE]).started = false;
        }
    }
    if ring.used_idx != start.used_idx {
        if let Some(mut f) = call {
            // A failed signal only delays the guest.
            let _ = f.write_all(&1u64.to_ne_bytes());
        }
    }
}

/// Wait for kicks (or the wake eventfd) and serve the request queue.
pub(crate) fn datapath_loop(shared: &Shared) {
    let Some(dev) = shared.blk.as_ref() else {
        return;
    };
    while !shared.stop.load(Ordering::Acquire) {
        let kick = lock(&shared.vrings[QUEUE]).kick.clone();
        let mut fds: Vec<libc::pollfd> = kick
            .iter()
            .map(|k| k.as_raw_fd())
            .chain(std::iter::once(shared.wake.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd for its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        let woken = shared.wake.read().is_ok();
        let kicked = kick.is_some() && fds[0].revents & libc::POLLIN != 0;
        if let (true, Some(k)) = (kicked, &kick) {
            let mut b = [0u8; 8];
            let _ = k.as_ref().read(&mut b);
        }
        if kicked || woken {
            service(shared, dev);
        }
    }
}

#[cfg(test)]
mod tests;
