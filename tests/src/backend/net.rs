//! The data path: address translation through the device IOTLB (with
//! misses), split-virtqueue processing for RX (queue 0) and TX (queue 1).

use std::io::{Read, Write};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::sys::{poll_fds, PollFd};
use devices::vhost_user::wire::{
    decode_ack, encode_iotlb_frame, Header, IotlbMsg, IotlbPerm, HEADER_SIZE, U64_PAYLOAD_SIZE,
    VHOST_USER_BACKEND_IOTLB_MSG, VHOST_USER_F_PROTOCOL_FEATURES,
};
use iommu::error::chain;
use iommu::sync::{lock, wait_timeout};

use super::memory::MemTable;
use super::{BackendError, Counters, Shared, VringState};

/// Size of the virtio-net header with VERSION_1 (num_buffers included).
pub const NET_HDR_LEN: usize = 12;
/// Largest TX frame accepted (64 KiB plus header).
pub const MAX_FRAME: usize = 65_550;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// Address access as the device does it: through the IOTLB in IOMMU mode,
/// by guest physical address otherwise.
pub(crate) struct Access<'a> {
    shared: &'a Shared,
    mem: Arc<MemTable>,
    iommu: bool,
    allow_miss: bool,
    /// Ring (not buffer) accesses: without an IOMMU the vring addresses of
    /// SET_VRING_ADDR are front-end virtual addresses, not GPAs.
    ring: bool,
    /// The caller holds a vring lock: give up waiting for a miss when the
    /// server needs a vring lock (it may hold the UPDATE behind it).
    in_queue: bool,
}

impl<'a> Access<'a> {
    pub(crate) fn new(shared: &'a Shared) -> Self {
        Access {
            shared,
            mem: Arc::clone(&lock(&shared.mem)),
            iommu: shared.iommu_on(),
            allow_miss: true,
            ring: false,
            in_queue: false,
        }
    }

    /// An accessor for the vring structures themselves.
    pub(crate) fn for_rings(shared: &'a Shared) -> Self {
        Access {
            ring: true,
            ..Self::new(shared)
        }
    }

    /// Host pointer for `addr` and how many bytes are contiguous from it.
    fn chunk(&self, addr: u64, perm: IotlbPerm) -> Result<(*mut u8, u64), BackendError> {
        let fail = BackendError::Translate { addr, perm };
        if !self.iommu && self.ring {
            return self.mem.uaddr_to_host(addr).ok_or(fail);
        }
        if !self.iommu {
            return self.mem.gpa_to_host(addr).ok_or(fail);
        }
        // Misbehaviour: buffers are accessed asking for a wider permission.
        let perm = match self.shared.config.misbehave.buffer_perm {
            Some(p) if !self.ring && perm != IotlbPerm::No => p,
            _ => perm,
        };
        let e = self.lookup_or_miss(addr, perm)?;
        let off = addr - e.iova;
        let in_entry = e.size - off;
        let uaddr = e.uaddr.checked_add(off).ok_or(fail)?;
        let (ptr, in_region) = self
            .mem
            .uaddr_to_host(uaddr)
            .ok_or(BackendError::Translate { addr, perm })?;
        Ok((ptr, in_entry.min(in_region)))
    }

    fn lookup_or_miss(
        &self,
        addr: u64,
        perm: IotlbPerm,
    ) -> Result<super::iotlb::IotlbEntry, BackendError> {
        if let Some(e) = lock(&self.shared.iotlb).lookup(addr, perm) {
            return Ok(e);
        }
        if !self.allow_miss {
            return Err(BackendError::Translate { addr, perm });
        }
        let answered = |s: &Shared| lock(&s.miss_timer).answered;
        let mut seen = answered(self.shared);
        if send_miss(self.shared, addr, perm) == MissAck::Refused {
            // The front end said no (NEED_REPLY): no UPDATE will come.
            Counters::bump(&self.shared.counters.translation_failures);
            return Err(BackendError::Translate { addr, perm });
        }
        let mut resends = 0;
        let deadline = Instant::now() + self.shared.config.miss_timeout;
        let mut tlb = lock(&self.shared.iotlb);
        loop {
            if let Some(e) = tlb.lookup(addr, perm) {
                return Ok(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Counters::bump(&self.shared.counters.translation_failures);
                return Err(BackendError::Translate { addr, perm });
            }
            if self.in_queue && self.shared.vring_waiters.load(Ordering::Acquire) > 0 {
                return Err(BackendError::Yielded { addr });
            }
            // The miss was answered but the entry is gone: an INVALIDATE
            // (e.g. a full flush) dropped it before we looked. Ask again,
            // boundedly. (Lock order iotlb -> miss_timer, as in the server.)
            let now_answered = lock(&self.shared.miss_timer).answered;
            if now_answered != seen && resends < MAX_MISS_RESENDS {
                drop(tlb);
                seen = now_answered;
                resends += 1;
                if send_miss(self.shared, addr, perm) == MissAck::Refused {
                    Counters::bump(&self.shared.counters.translation_failures);
                    return Err(BackendError::Translate { addr, perm });
                }
                tlb = lock(&self.shared.iotlb);
                continue;
            }
            tlb = wait_timeout(&self.shared.iotlb_cv, tlb, left);
        }
    }

    /// Visit `len` bytes at `addr` chunk by chunk.
    fn each_chunk(
        &self,
        addr: u64,
        len: usize,
        perm: IotlbPerm,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), BackendError> {
        let mut done = 0usize;
        while done < len {
            let at = addr
                .checked_add(done as u64)
                .ok_or(BackendError::Translate { addr, perm })?;
            let (ptr, avail) = self.chunk(at, perm)?;
            let n = usize::try_from(avail).unwrap_or(usize::MAX).min(len - done);
            f(ptr, done, n);
            done += n;
        }
        Ok(())
    }

    /// Copy guest memory at `addr` into `buf` (device read).
    pub(crate) fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let dst = buf.as_mut_ptr();
        self.each_chunk(addr, buf.len(), IotlbPerm::ReadOnly, |src, off, n| {
            // SAFETY: `src..src+n` lies inside one mapped region (checked by
            // the memory table) and `dst+off..+n` inside `buf`. The guest may
            // write concurrently; that only yields stale data.
            unsafe { std::ptr::copy_nonoverlapping(src, dst.add(off), n) }
        })
    }

    /// Copy `buf` into guest memory at `addr` (device write).
    pub(crate) fn write(&self, addr: u64, buf: &[u8]) -> Result<(), BackendError> {
        let src = buf.as_ptr();
        self.each_chunk(addr, buf.len(), IotlbPerm::WriteOnly, |dst, off, n| {
            // SAFETY: as in `read`, with the roles swapped.
            unsafe { std::ptr::copy_nonoverlapping(src.add(off), dst, n) }
        })
    }

    fn read_u16(&self, addr: u64) -> Result<u16, BackendError> {
        let mut b = [0u8; 2];
        self.read(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
}

/// How often one access re-sends its miss after INVALIDATEs raced with it.
const MAX_MISS_RESENDS: u32 = 16;

/// Whether `iova..iova+len` is accessible now without a miss.
pub(crate) fn probe(shared: &Shared, iova: u64, len: u64) -> bool {
    let mut a = Access::new(shared);
    a.allow_miss = false;
    let Ok(len) = usize::try_from(len) else {
        return false;
    };
    a.each_chunk(iova, len, IotlbPerm::No, |_, _, _| {}).is_ok()
}

/// What the front end said to a miss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MissAck {
    /// Sent; an UPDATE may come (acked 0, or no ack asked for).
    Sent,
    /// Refused with a non-zero ack: no UPDATE will come.
    Refused,
}

/// Send a MISS on the back-end channel; with `miss_need_reply`, also read
/// its ack. Failures are counted and logged; the caller then times out.
fn send_miss(shared: &Shared, iova: u64, perm: IotlbPerm) -> MissAck {
    let chan = lock(&shared.backend_chan);
    let Some(stream) = chan.as_ref() else {
        log::warn!("IOTLB miss at {iova:#x} but no back-end channel was set up");
        return MissAck::Sent;
    };
    let need_reply = shared.config.miss_need_reply;
    let frame = encode_iotlb_frame(
        VHOST_USER_BACKEND_IOTLB_MSG,
        &IotlbMsg::miss(iova, perm),
        need_reply,
    );
    let mut w = stream;
    // Timed from just before the write: the UPDATE may overtake our return.
    lock(&shared.miss_timer).sent(iova, Instant::now());
    if let Err(e) = w.write_all(&frame) {
        log::warn!("sending IOTLB miss failed: {e}");
        return MissAck::Sent;
    }
    Counters::bump(&shared.counters.misses_sent);
    if need_reply {
        match read_miss_ack(stream, shared.config.miss_timeout) {
            Ok(0) => {}
            Ok(v) => {
                log::info!("front end refused the miss at {iova:#x} (ack {v})");
                Counters::bump(&shared.counters.miss_nacks);
                return MissAck::Refused;
            }
            Err(e) => {
                log::warn!("no ack for the miss at {iova:#x}: {e}", e = chain(&e));
                Counters::bump(&shared.counters.miss_nacks);
            }
        }
    }
    MissAck::Sent
}

fn read_miss_ack(
    stream: &std::os::unix::net::UnixStream,
    timeout: Duration,
) -> Result<u64, BackendError> {
    stream.set_read_timeout(Some(timeout))?;
    let mut raw = [0u8; HEADER_SIZE + U64_PAYLOAD_SIZE];
    let mut r = stream;
    r.read_exact(&mut raw)?;
    let hdr = Header::decode(&raw)?;
    Ok(decode_ack(
        &hdr,
        &raw[HEADER_SIZE..],
        VHOST_USER_BACKEND_IOTLB_MSG,
    )?)
}

/// A descriptor of the split ring.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One queue being processed: its config copied out of the lock, and the
/// indices written back afterwards.
struct Queue<'a> {
    acc: Access<'a>,
    ring: Access<'a>,
    v: &'a mut VringState,
}

impl Queue<'_> {
    fn desc(&self, i: u16) -> Result<Desc, BackendError> {
        let mut b = [0u8; 16];
        self.ring.read(self.v.desc + 16 * u64::from(i), &mut b)?;
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        Ok(Desc {
            addr: u64_at(0),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        })
    }

    /// The next available chain head, if any.
    fn next_avail(&mut self) -> Result<Option<u16>, BackendError> {
        let idx = self.ring.read_u16(self.v.avail + 2)?;
        if idx == self.v.last_avail {
            return Ok(None);
        }
        fence(Ordering::Acquire);
        let slot = u64::from(self.v.last_avail % self.v.num);
        let head = self.ring.read_u16(self.v.avail + 4 + 2 * slot)?;
        if head >= self.v.num {
            return Err(BackendError::BadMessage(format!(
                "avail ring head {head} >= queue size"
            )));
        }
        Ok(Some(head))
    }

    /// Walk a chain; every descriptor must match `writable`.
    fn chain(&self, head: u16, writable: bool) -> Result<Vec<Desc>, BackendError> {
        let mut out = Vec::new();
        let mut i = head;
        loop {
            let d = self.desc(i)?;
            if (d.flags & DESC_F_WRITE != 0) != writable || out.len() >= usize::from(self.v.num) {
                return Err(BackendError::BadMessage(format!(
                    "bad descriptor chain at {head}"
                )));
            }
            out.push(d);
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(out);
            }
            if d.next >= self.v.num {
                return Err(BackendError::BadMessage(format!(
                    "descriptor next {} out of range",
                    d.next
                )));
            }
            i = d.next;
        }
    }

    fn push_used(&mut self, head: u16, len: u32) -> Result<(), BackendError> {
        let slot = u64::from(self.v.used_idx % self.v.num);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        self.ring.write(self.v.used + 4 + 8 * slot, &elem)?;
        fence(Ordering::Release);
        self.v.used_idx = self.v.used_idx.wrapping_add(1);
        self.v.last_avail = self.v.last_avail.wrapping_add(1);
        self.ring
            .write(self.v.used + 2, &self.v.used_idx.to_le_bytes())
    }

    fn notify(&self) {
        if let Some(call) = &self.v.call {
            let mut f = call;
            // A failed signal only delays the guest; nothing to recover.
            let _ = f.write_all(&1u64.to_ne_bytes());
        }
    }
}

/// FNV-1a 64-bit hash of a frame (the TX checksum unit).
pub(crate) fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn consume_tx(shared: &Shared, frame: &[u8]) {
    let c = &shared.counters;
    Counters::bump(&c.tx_frames);
    c.tx_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
    c.tx_checksum.fetch_add(fnv1a(frame), Ordering::Relaxed);
    if shared.config.loopback {
        lock(&shared.rx_pending).push_back(super::rxgen::mac_swapped(frame));
        shared.wake_datapath();
    }
    if let Some(f) = lock(&shared.sink).as_mut() {
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        if let Err(e) = f
            .write_all(&len.to_ne_bytes())
            .and_then(|()| f.write_all(frame))
        {
            log::warn!("writing the TX sink failed: {e}");
        }
    }
}

/// Whether a buffer error ends in a completed chain (`complete_faulted`)
/// rather than a stopped queue.
fn faulted(shared: &Shared, e: &BackendError) -> bool {
    shared.config.complete_faulted && matches!(e, BackendError::Translate { .. })
}

fn read_tx_chain(q: &Queue<'_>, chain: &[Desc]) -> Result<Vec<u8>, BackendError> {
    let mut buf = Vec::new();
    for d in chain {
        let len = d.len as usize;
        if buf.len() + len > MAX_FRAME {
            return Err(BackendError::BadMessage(
                "TX frame larger than 64 KiB".into(),
            ));
        }
        let start = buf.len();
        buf.resize(start + len, 0);
        q.acc.read(d.addr, &mut buf[start..])?;
    }
    Ok(buf)
}

fn process_tx(shared: &Shared, q: &mut Queue<'_>, pair: usize) -> Result<usize, BackendError> {
    let mut n = 0;
    while let Some(head) = q.next_avail()? {
        let chain = q.chain(head, false)?;
        match read_tx_chain(q, &chain) {
            Ok(buf) if buf.len() >= NET_HDR_LEN => {
                if let Some(c) = shared.tx_per_pair.get(pair) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                consume_tx(shared, &buf[NET_HDR_LEN..])
            }
            Ok(_) => {}
            Err(e) if faulted(shared, &e) => {
                log::info!(
                    "TX chain {head} faulted, completed without transfer: {e}",
                    e = iommu::error::chain(&e)
                );
                Counters::bump(&shared.counters.tx_faulted);
            }
            Err(e) => return Err(e),
        }
        q.push_used(head, 0)?;
        n += 1;
    }
    Ok(n)
}

fn write_rx_chain(q: &Queue<'_>, chain: &[Desc], data: &[u8]) -> Result<(), BackendError> {
    let mut off = 0usize;
    for d in chain {
        let take = (d.len as usize).min(data.len() - off);
        q.acc.write(d.addr, &data[off..off + take])?;
        off += take;
    }
    Ok(())
}

fn process_rx(shared: &Shared, q: &mut Queue<'_>) -> Result<usize, BackendError> {
    let mut n = 0;
    loop {
        if lock(&shared.rx_pending).is_empty() {
            return Ok(n);
        }
        let Some(head) = q.next_avail()? else {
            return Ok(n);
        };
        let Some(frame) = lock(&shared.rx_pending).pop_front() else {
            return Ok(n);
        };
        let chain = q.chain(head, true)?;
        let cap: u64 = chain.iter().map(|d| u64::from(d.len)).sum();
        let mut data = vec![0u8; NET_HDR_LEN];
        data[10] = 1; // num_buffers
        data.extend_from_slice(&frame);
        if (data.len() as u64) > cap {
            Counters::bump(&shared.counters.rx_dropped);
            q.push_used(head, 0)?;
            continue;
        }
        match write_rx_chain(q, &chain, &data) {
            Ok(()) => {}
            Err(e) if faulted(shared, &e) => {
                // The guest sees used length 0 on this descriptor.
                log::info!(
                    "RX chain {head} faulted, completed empty: {e}",
                    e = iommu::error::chain(&e)
                );
                Counters::bump(&shared.counters.rx_faulted);
                q.push_used(head, 0)?;
                continue;
            }
            Err(e) => return Err(e),
        }
        q.push_used(head, u32::try_from(data.len()).unwrap_or(u32::MAX))?;
        Counters::bump(&shared.counters.rx_frames);
        let c = &shared.counters;
        c.rx_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
        n += 1;
    }
}

/// Process queue `index` if it is running.
fn service(shared: &Shared, index: usize) {
    // Without PROTOCOL_FEATURES rings start enabled (vhost-user spec).
    let proto = lock(&shared.neg).features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
    let mut v = lock(&shared.vrings[index]);
    if !v.started || (proto && !v.enabled) || v.num == 0 {
        return;
    }
    let mut q = Queue {
        acc: Access {
            in_queue: true,
            ..Access::new(shared)
        },
        ring: Access {
            in_queue: true,
            ..Access::for_rings(shared)
        },
        v: &mut v,
    };
    // RX frames go to receiveq1 only; every transmitq is served.
    let res = match index {
        0 => process_rx(shared, &mut q),
        i if i % 2 == 0 => Ok(0),
        i => process_tx(shared, &mut q, i / 2),
    };
    match res {
        Ok(0) => {}
        Ok(_) => q.notify(),
        Err(BackendError::Yielded { addr }) => {
            // Nothing was consumed past the last completed chain: redo later.
            log::debug!("queue {index} yielded at {addr:#x}; retrying");
            shared.retry.store(true, Ordering::Release);
        }
        Err(e) => {
            // Stop the queue as a real device would on a fatal ring error.
            log::warn!("queue {index} stopped: {e}", e = chain(&e));
            q.v.started = false;
        }
    }
}

/// Wait for kicks or the wake eventfd and service the queues that were
/// kicked (all of them on a wake). No kick, no device access: a stopped or
/// idle queue never causes misses.
pub(crate) fn datapath_loop(shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        let kicks: Vec<_> = shared.vrings.iter().map(|v| lock(v).kick.clone()).collect();
        let mut fds: Vec<PollFd> = kicks
            .iter()
            .flatten()
            .map(PollFd::readable)
            .chain(std::iter::once(PollFd::readable(&shared.wake)))
            .collect();
        // A yielded queue is retried soon, kicked or not.
        let timeout_ms = if shared.retry.load(Ordering::Acquire) {
            5
        } else {
            100
        };
        // A failed poll is a spurious wake-up: every queue is checked below anyway.
        let _ = poll_fds(&mut fds, Some(Duration::from_millis(timeout_ms)));
        let woken = shared.wake.read().is_ok() | shared.retry.swap(false, Ordering::AcqRel);
        let mut fired = fds.iter();
        for (i, k) in kicks.iter().enumerate() {
            let mut kicked = false;
            if let Some(k) = k {
                kicked = fired.next().is_some_and(PollFd::is_readable);
                if kicked {
                    let mut b = [0u8; 8];
                    let mut f = k.as_ref();
                    let _ = f.read(&mut b);
                }
            }
            // A wake services every queue: its kick may be newer than the
            // snapshot above.
            if kicked || woken {
                service(shared, i);
            }
        }
    }
}
