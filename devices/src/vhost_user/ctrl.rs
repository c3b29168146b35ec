//! The virtio-net control queue of a multiqueue vhost-user device
//! (`queues=N`, see [`super::mq`]), served by the VMM, never by the back end.
//!
//! The only command accepted is `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` with
//! 1..=N pairs: the first 2*n* data queues are enabled in the back end
//! (SET_VRING_ENABLE), the others disabled, and the command is acked
//! `VIRTIO_NET_OK`. Everything else gets `VIRTIO_NET_ERR`.
//!
//! The ring and the command buffers are guest input: behind a vIOMMU every
//! address is an IOVA translated through the device's [`Viommu`] seam with
//! the access it needs (read for the ring's driver areas and the command,
//! write for the used ring and the status byte); every index and length is
//! checked. A bad chain is returned with used length 0 (and
//! `VIRTIO_NET_ERR` if its status byte is reachable); a bad ring (a head
//! out of range, an avail index moving by more than the queue size) stops
//! the queue until the next activation. Nothing panics.
//!
//! The queue runs on its own thread (`vhost-user-ctrl`) woken by the
//! queue's kick eventfd. It needs what a back-end request thread needs (poll,
//! eventfd reads, requests on the main socket, interrupts), so it runs under
//! [`ThreadKind::VhostUserReq`]'s sandbox.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use iommu::ratelimit::RateLimit;
use iommu::{Iova, Permissions, RequesterId};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::sys::{poll_fds, PollFd};
use crate::thread::{self, StoppableThread, ThreadHook, ThreadKind};
use crate::viommu::Viommu;
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// `VIRTIO_NET_CTRL_MQ` (class).
pub const CTRL_MQ: u8 = 4;
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` (command of class MQ).
pub const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// `VIRTIO_NET_OK`.
pub const NET_OK: u8 = 0;
/// `VIRTIO_NET_ERR`.
pub const NET_ERR: u8 = 1;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;
/// Most descriptors one command may use (direct and indirect together).
const MAX_CHAIN: usize = 64;
/// Most command bytes kept (class, command, data); VQ_PAIRS_SET has 4.
const MAX_COMMAND: usize = 64;
/// `VRING_AVAIL_F_NO_INTERRUPT`.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// What can be wrong with the control queue's ring or a command.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CtrlError {
    /// An IOVA does not translate with the access needed.
    #[error("IOVA {iova:#x} (+{len:#x}) does not translate for {access:?}")]
    Translate {
        /// The address.
        iova: u64,
        /// Bytes needed.
        len: u64,
        /// The access.
        access: Permissions,
    },
    /// An address (after translation) is not in guest RAM, or wraps.
    #[error("address {addr:#x} (+{len:#x}) is not in guest RAM")]
    Memory {
        /// The address.
        addr: u64,
        /// Bytes needed.
        len: u64,
    },
    /// A descriptor index outside its table.
    #[error("descriptor index {index} is outside its table of {size}")]
    DescIndex {
        /// The index.
        index: u32,
        /// Entries in the table.
        size: u32,
    },
    /// A chain longer than `MAX_CHAIN` (or a loop).
    #[error("a descriptor chain is longer than {MAX_CHAIN} descriptors (or loops)")]
    ChainTooLong,
    /// An indirect descriptor that the spec forbids or whose table is malformed.
    #[error("bad indirect descriptor: table at {addr:#x}, {len} bytes")]
    Indirect {
        /// The table address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable descriptor after a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    Order,
    /// The chain has no device-writable byte for the status.
    #[error("the command has no device-writable status byte")]
    NoStatus,
    /// The driver's avail index moved by more than the queue size.
    #[error("the avail index moved by {0}, more than the queue size")]
    AvailIndex(u16),
}

/// Guest memory as the device sees it: GPAs, or IOVAs through a vIOMMU.
#[derive(Clone)]
pub struct Dma {
    mem: GuestMemoryMmap,
    iommu: Option<(Arc<dyn Viommu>, RequesterId)>,
}

impl Dma {
    /// Access `mem` directly (no vIOMMU) or through `iommu`.
    pub fn new(mem: GuestMemoryMmap, iommu: Option<(Arc<dyn Viommu>, RequesterId)>) -> Self {
        Dma { mem, iommu }
    }

    /// The GPA pieces of `len` bytes at `addr`.
    fn pieces(
        &self,
        addr: u64,
        len: usize,
        access: Permissions,
    ) -> Result<Vec<(u64, usize)>, CtrlError> {
        let len64 = len as u64;
        let memory = CtrlError::Memory { addr, len: len64 };
        let Some((viommu, rid)) = &self.iommu else {
            addr.checked_add(len64).ok_or(memory)?;
            return Ok(vec![(addr, len)]);
        };
        let bad = CtrlError::Translate {
            iova: addr,
            len: len64,
            access,
        };
        let t = viommu
            .translate(*rid, Iova(addr), len64, access)
            .map_err(|_| bad.clone())?;
        let mut pieces = Vec::with_capacity(t.fragments.len());
        let mut total = 0u64;
        for (gpa, n) in t.fragments {
            total = total.checked_add(n).ok_or_else(|| bad.clone())?;
            pieces.push((gpa.0, usize::try_from(n).map_err(|_| bad.clone())?));
        }
        if total != len64 {
            return Err(bad);
        }
        Ok(pieces)
    }

    /// Read `buf.len()` bytes at `addr` (device-readable memory).
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), CtrlError> {
        let mut off = 0usize;
        for (gpa, n) in self.pieces(addr, buf.len(), Permissions::Read)? {
            let memory = CtrlError::Memory {
                addr: gpa,
                len: n as u64,
            };
            let end = off.checked_add(n).ok_or_else(|| memory.clone())?;
            let dst = buf.get_mut(off..end).ok_or_else(|| memory.clone())?;
            self.mem
                .read_slice(dst, GuestAddress(gpa))
                .map_err(|_| memory)?;
            off = end;
        }
        Ok(())
    }

    /// Write `data` at `addr` (device-writable memory).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), CtrlError> {
        let mut off = 0usize;
        for (gpa, n) in self.pieces(addr, data.len(), Permissions::Write)? {
            let memory = CtrlError::Memory {
                addr: gpa,
                len: n as u64,
            };
            let end = off.checked_add(n).ok_or_else(|| memory.clone())?;
            let src = data.get(off..end).ok_or_else(|| memory.clone())?;
            self.mem
                .write_slice(src, GuestAddress(gpa))
                .map_err(|_| memory)?;
            off = end;
        }
        Ok(())
    }

    fn read_u16(&self, addr: u64) -> Result<u16, CtrlError> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
}

fn at(base: u64, off: u64) -> Result<u64, CtrlError> {
    base.checked_add(off).ok_or(CtrlError::Memory {
        addr: base,
        len: off,
    })
}

/// The status a command gets; `apply` enables that many pairs (false: it failed).
pub fn command_status(cmd: &[u8], max_pairs: u16, apply: &mut dyn FnMut(u16) -> bool) -> u8 {
    match cmd {
        [CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, lo, hi] => {
            let pairs = u16::from_le_bytes([*lo, *hi]);
            if (1..=max_pairs).contains(&pairs) && apply(pairs) {
                NET_OK
            } else {
                NET_ERR
            }
        }
        _ => NET_ERR,
    }
}

/// One parsed command: its device-readable bytes (`None` if longer than
/// [`MAX_COMMAND`]) and where its status byte goes.
#[derive(Debug, PartialEq, Eq)]
struct Command {
    bytes: Option<Vec<u8>>,
    status: u64,
}

/// The control queue's split ring.
#[derive(Debug, Clone, Copy)]
pub struct CtrlRing {
    /// Queue size (a power of two, as the transport checked).
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Driver area address.
    pub avail: u64,
    /// Device area address.
    pub used: u64,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// Next avail entry to take.
    pub next_avail: u16,
    /// Next used entry to fill.
    pub next_used: u16,
}

impl CtrlRing {
    /// Parse the chain at `head`.
    fn command(&self, dma: &Dma, head: u16) -> Result<Command, CtrlError> {
        let (mut table, mut entries) = (self.desc, u32::from(self.size));
        let (mut index, mut indirect) = (u32::from(head), false);
        let mut bytes = Some(Vec::new());
        let mut status = None;
        for _ in 0..MAX_CHAIN {
            if index >= entries {
                return Err(CtrlError::DescIndex {
                    index,
                    size: entries,
                });
            }
            let mut d = [0u8; 16];
            dma.read(at(table, u64::from(index) * DESC_SIZE)?, &mut d)?;
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([d[12], d[13]]);
            let next = u16::from_le_bytes([d[14], d[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                let n = len / DESC_SIZE as u32;
                if indirect || flags & DESC_F_NEXT != 0 || len % DESC_SIZE as u32 != 0 || n == 0 {
                    return Err(CtrlError::Indirect { addr, len });
                }
                (table, entries, index, indirect) = (addr, n, 0, true);
                continue;
            }
            if flags & DESC_F_WRITE != 0 {
                if status.is_none() && len > 0 {
                    status = Some(addr);
                }
            } else if status.is_some() {
                return Err(CtrlError::Order);
            } else if let Some(b) = &mut bytes {
                let len = len as usize;
                if b.len() + len > MAX_COMMAND {
                    bytes = None;
                } else {
                    let start = b.len();
                    b.resize(start + len, 0);
                    dma.read(addr, &mut b[start..])?;
                }
            }
            if flags & DESC_F_NEXT == 0 {
                let status = status.ok_or(CtrlError::NoStatus)?;
                return Ok(Command { bytes, status });
            }
            index = u32::from(next);
        }
        Err(CtrlError::ChainTooLong)
    }

    /// Handle every available command; returns whether the driver wants an
    /// interrupt. A ring error stops the queue (the caller stops calling).
    pub fn process(
        &mut self,
        dma: &Dma,
        max_pairs: u16,
        apply: &mut dyn FnMut(u16) -> bool,
        log: &mut dyn FnMut(&CtrlError),
    ) -> Result<bool, CtrlError> {
        let size = u64::from(self.size);
        let old_used = self.next_used;
        loop {
            let avail_idx = dma.read_u16(at(self.avail, 2)?)?;
            fence(Ordering::Acquire);
            let pending = avail_idx.wrapping_sub(self.next_avail);
            if pending > self.size {
                return Err(CtrlError::AvailIndex(pending));
            }
            if pending == 0 {
                if self.event_idx {
                    // avail_event: kick us when the next entry is posted.
                    dma.write(at(self.used, 4 + 8 * size)?, &avail_idx.to_le_bytes())?;
                    fence(Ordering::SeqCst);
                    if dma.read_u16(at(self.avail, 2)?)? != avail_idx {
                        continue;
                    }
                }
                break;
            }
            let slot = u64::from(self.next_avail % self.size);
            let head = dma.read_u16(at(self.avail, 4 + 2 * slot)?)?;
            if head >= self.size {
                return Err(CtrlError::DescIndex {
                    index: u32::from(head),
                    size: u32::from(self.size),
                });
            }
            let written = match self.command(dma, head) {
                Ok(cmd) => {
                    let status = match &cmd.bytes {
                        Some(b) => command_status(b, max_pairs, apply),
                        None => NET_ERR,
                    };
                    match dma.write(cmd.status, &[status]) {
                        Ok(()) => 1u32,
                        Err(e) => {
                            log(&e);
                            0
                        }
                    }
                }
                Err(e) => {
                    log(&e);
                    0
                }
            };
            let slot = u64::from(self.next_used % self.size);
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&written.to_le_bytes());
            dma.write(at(self.used, 4 + 8 * slot)?, &elem)?;
            fence(Ordering::Release);
            self.next_used = self.next_used.wrapping_add(1);
            self.next_avail = self.next_avail.wrapping_add(1);
            dma.write(at(self.used, 2)?, &self.next_used.to_le_bytes())?;
        }
        if self.next_used == old_used {
            return Ok(false);
        }
        fence(Ordering::SeqCst);
        if self.event_idx {
            let used_event = dma.read_u16(at(self.avail, 4 + 2 * size)?)?;
            let new = self.next_used;
            Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old_used))
        } else {
            Ok(dma.read_u16(self.avail)? & AVAIL_F_NO_INTERRUPT == 0)
        }
    }
}

/// What the control queue thread needs.
pub struct CtrlSetup {
    /// Guest memory, through the vIOMMU if the device is behind one.
    pub dma: Dma,
    /// The ring.
    pub ring: CtrlRing,
    /// The control queue's index (for its interrupt).
    pub index: u16,
    /// The queue's kick eventfd.
    pub kick: EventFd,
    /// Interrupt delivery.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// `max_virtqueue_pairs`.
    pub max_pairs: u16,
    /// Enable that many pairs in the back end; false if it failed.
    pub apply: Box<dyn FnMut(u16) -> bool + Send>,
}

/// A running control queue thread; stopped and joined when dropped.
pub struct CtrlQueue {
    _thread: StoppableThread,
}

impl CtrlQueue {
    /// Serve `setup` on thread `vhost-user-ctrl`, which runs `hook` first.
    pub fn spawn(setup: CtrlSetup, hook: Option<ThreadHook>) -> std::io::Result<Self> {
        let t = StoppableThread::spawn("vhost-user-ctrl", move |stop| {
            if thread::enter(hook.as_ref(), ThreadKind::VhostUserReq) {
                serve(setup, stop);
            }
        })?;
        Ok(CtrlQueue { _thread: t })
    }
}

fn serve(mut setup: CtrlSetup, stop: &EventFd) {
    let mut limit = RateLimit::per_second(5);
    let mut stopped = false;
    loop {
        let mut fds = [PollFd::readable(stop), PollFd::readable(&setup.kick)];
        if let Err(e) = poll_fds(&mut fds, None) {
            log::error!("vhost-user control queue: poll failed, stopping: {e}");
            return;
        }
        if fds[0].fired() {
            return;
        }
        if !fds[1].fired() {
            continue;
        }
        // Drained; the ring is read below whatever the counter held.
        let _ = setup.kick.read();
        if stopped {
            continue;
        }
        let mut log = |e: &CtrlError| {
            if let Some(suppressed) = limit.check() {
                log::warn!("vhost-user control queue: bad command: {e} ({suppressed} suppressed)");
            }
        };
        match setup
            .ring
            .process(&setup.dma, setup.max_pairs, &mut *setup.apply, &mut log)
        {
            Ok(true) => {
                // Like a back end: the queue's irqfd if it has one.
                let t = VirtioInterruptType::Queue(setup.index);
                let res = match setup.interrupt.notifier(t) {
                    Some(irqfd) => irqfd.write(1),
                    None => setup.interrupt.trigger(t),
                };
                if let Err(e) = res {
                    log::warn!("vhost-user control queue: interrupt failed: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => {
                log::error!("vhost-user control queue: the driver broke the ring ({e}); the queue stops until the device is reset");
                stopped = true;
            }
        }
    }
}

#[cfg(test)]
#[path = "ctrl/tests.rs"]
mod tests;
