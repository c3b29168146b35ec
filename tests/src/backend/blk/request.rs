//! virtio-blk request parsing and execution, independent of rings and
//! sockets so that it can be fuzzed: a descriptor chain ([`Seg`]s) is cut
//! into header, data and status ([`layout`]), the header is checked against
//! the disk ([`plan`]) and the request runs against guest memory through
//! [`GuestMem`] ([`execute`]). Every guest-controlled number is checked:
//! an out-of-range sector, a misdirected buffer or an untranslatable address
//! ends in a status byte (IOERR / UNSUPP), never in a panic or a write
//! outside a device-writable buffer.
//!
//! A buffer whose address cannot be translated (behind a vIOMMU: the front
//! end refused the miss, e.g. a descriptor at an IOVA the guest unmapped)
//! fails the request with IOERR ([`Outcome::faulted`]), like a disk
//! controller reporting a DMA fault: a write gathers all its data before it
//! touches the disk, so a faulted write never reaches the image, and a read
//! writes only into buffers that translate writable.

use std::fs::File;
use std::os::unix::fs::FileExt;

use thiserror::Error;

use crate::backend::BackendError;

/// Read sectors into the driver's buffers.
pub const T_IN: u32 = 0;
/// Write the driver's buffers to sectors.
pub const T_OUT: u32 = 1;
/// Flush the disk's write cache.
pub const T_FLUSH: u32 = 4;
/// Read the device id (20 bytes).
pub const T_GET_ID: u32 = 8;
/// Status: success.
pub const S_OK: u8 = 0;
/// Status: the request failed.
pub const S_IOERR: u8 = 1;
/// Status: the request type is not supported.
pub const S_UNSUPP: u8 = 2;
/// Bytes per sector (virtio-blk addresses in 512-byte units).
pub const SECTOR: u64 = 512;
/// Length of `struct virtio_blk_outhdr`.
pub const HDR_LEN: usize = 16;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Largest data transfer of one request (bounds the bounce buffer).
pub const MAX_TRANSFER: u64 = 4 << 20;

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Device address (IOVA behind a vIOMMU, else GPA).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// VRING_DESC_F_WRITE: the device may write it.
    pub writable: bool,
}

/// Why a chain cannot be a blk request at all.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChainError {
    /// No descriptor, or the last one is not device-writable (no status byte).
    #[error("the chain has no device-writable status byte at its end")]
    NoStatus,
    /// Fewer than 16 device-readable bytes before the first writable one.
    #[error("the chain has only {0} readable header bytes, needs 16")]
    ShortHeader(u64),
    /// A readable descriptor follows a writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// An address plus length wraps around.
    #[error("descriptor at {0:#x} wraps the address space")]
    Wraps(u64),
}

/// A chain cut into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Exactly [`HDR_LEN`] readable bytes.
    pub header: Vec<Seg>,
    /// The data buffers (between header and status).
    pub data: Vec<Seg>,
    /// Address of the status byte (the chain's last byte).
    pub status: u64,
}

impl Layout {
    /// Total data bytes.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|s| u64::from(s.len)).sum()
    }
}

/// Where the status byte of `chain` is, if it has one (the last byte of a
/// writable last descriptor).
pub fn status_addr(chain: &[Seg]) -> Option<u64> {
    let last = chain.last().filter(|s| s.writable && s.len > 0)?;
    last.addr.checked_add(u64::from(last.len) - 1)
}

/// Cut `chain` into header, data and status.
pub fn layout(chain: &[Seg]) -> Result<Layout, ChainError> {
    let status = status_addr(chain).ok_or(ChainError::NoStatus)?;
    if let Some(s) = chain
        .iter()
        .find(|s| s.addr.checked_add(u64::from(s.len)).is_none())
    {
        return Err(ChainError::Wraps(s.addr));
    }
    let first_w = chain.iter().position(|s| s.writable).unwrap_or(chain.len());
    if chain[first_w..].iter().any(|s| !s.writable) {
        return Err(ChainError::ReadableAfterWritable);
    }
    let (mut header, mut data) = (Vec::new(), Vec::new());
    let mut need = HDR_LEN as u32;
    for s in &chain[..first_w] {
        let take = need.min(s.len);
        if take > 0 {
            header.push(Seg { len: take, ..*s });
        }
        need -= take;
        if s.len > take {
            let addr = s.addr + u64::from(take); // no wrap: checked above
            data.push(Seg {
                addr,
                len: s.len - take,
                writable: false,
            });
        }
    }
    if need > 0 {
        return Err(ChainError::ShortHeader(u64::from(HDR_LEN as u32 - need)));
    }
    let last = chain.len() - 1;
    data.extend(chain[first_w..last].iter().filter(|s| s.len > 0));
    if chain[last].len > 1 {
        data.push(Seg {
            len: chain[last].len - 1,
            ..chain[last]
        });
    }
    Ok(Layout {
        header,
        data,
        status,
    })
}

/// `struct virtio_blk_outhdr`: request type and first sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// VIRTIO_BLK_T_*.
    pub kind: u32,
    /// First sector (512-byte units).
    pub sector: u64,
}

impl Header {
    /// Decode the 16 little-endian header bytes.
    pub fn decode(b: &[u8; HDR_LEN]) -> Self {
        let mut kind = [0u8; 4];
        kind.copy_from_slice(&b[..4]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&b[8..]);
        Header {
            kind: u32::from_le_bytes(kind),
            sector: u64::from_le_bytes(sector),
        }
    }
}

/// What a checked request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Copy `len` disk bytes at `offset` into the (writable) data buffers.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Copy the (readable) data buffers to the disk at `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Flush the backing file.
    Flush,
    /// Write the device id into the (writable) data buffers.
    GetId,
    /// Answer with this status without touching the disk or the buffers.
    Fail(u8),
}

/// Check a request against a disk of `capacity` bytes.
pub fn plan(h: Header, l: &Layout, capacity: u64) -> Op {
    let len = l.data_len();
    let all = |w: bool| l.data.iter().all(|s| s.writable == w);
    match h.kind {
        T_IN | T_OUT => {
            let offset = h.sector.checked_mul(SECTOR);
            let end = offset.and_then(|o| o.checked_add(len));
            let in_range = end.is_some_and(|e| e <= capacity);
            let dir_ok = all(h.kind == T_IN);
            if !in_range || !dir_ok || !len.is_multiple_of(SECTOR) || len > MAX_TRANSFER {
                return Op::Fail(S_IOERR);
            }
            let offset = offset.unwrap_or(0);
            if h.kind == T_IN {
                Op::Read { offset, len }
            } else {
                Op::Write { offset, len }
            }
        }
        T_FLUSH => Op::Flush,
        T_GET_ID if all(true) && len > 0 => Op::GetId,
        T_GET_ID => Op::Fail(S_IOERR),
        _ => Op::Fail(S_UNSUPP),
    }
}

/// Device access to guest memory (through the IOTLB in the back end; a
/// permission-checking fake in the fuzzer).
pub trait GuestMem {
    /// Device read of `buf.len()` bytes at `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Device write of `buf` at `addr`.
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), BackendError>;
}

/// The backing file; its size (rounded down to whole sectors) is the
/// capacity.
#[derive(Debug)]
pub struct Disk {
    file: File,
    capacity: u64,
}

impl Disk {
    /// Use `file` as the disk.
    pub fn new(file: File) -> Result<Self, BackendError> {
        let len = file.metadata()?.len();
        Ok(Disk {
            file,
            capacity: len - len % SECTOR,
        })
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

/// What a request did: its status and how many bytes the device wrote into
/// the chain (the used length, status byte included when it was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The status written (or meant to be written).
    pub status: u8,
    /// Bytes written into the chain.
    pub used_len: u32,
    /// Whether the status byte reached guest memory.
    pub status_written: bool,
    /// The header's request type, if the header was readable.
    pub kind: Option<u32>,
    /// Data bytes moved between disk and guest (either direction).
    pub moved: u64,
    /// The header or a data buffer could not be translated (a DMA fault):
    /// the request failed with IOERR and `moved` is 0 (a read may have
    /// filled the buffers before the one that faulted, which translated
    /// writable; a write never reached the disk).
    pub faulted: bool,
}

/// What [`run_op`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Done {
    status: u8,
    /// Data bytes written into the chain.
    written: u64,
    /// Data bytes moved between disk and guest.
    moved: u64,
    faulted: bool,
}

impl Done {
    fn status(status: u8) -> Self {
        Done {
            status,
            written: 0,
            moved: 0,
            faulted: false,
        }
    }
}

/// Whether `e` is a DMA fault (an address without a usable translation)
/// rather than a host I/O error or a malformed chain.
fn is_fault(e: &BackendError) -> bool {
    matches!(e, BackendError::Translate { .. })
}

/// Copy the data segments out of guest memory.
fn gather(mem: &dyn GuestMem, segs: &[Seg], len: u64) -> Result<Vec<u8>, BackendError> {
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    let mut off = 0usize;
    for s in segs {
        let n = s.len as usize;
        let dst = buf
            .get_mut(off..off + n)
            .ok_or_else(|| BackendError::BadMessage("blk segments exceed the transfer".into()))?;
        mem.read(s.addr, dst)?;
        off += n;
    }
    Ok(buf)
}

/// Copy `data` into the writable segments (as far as they reach).
fn scatter(mem: &dyn GuestMem, segs: &[Seg], data: &[u8]) -> Result<u64, BackendError> {
    let mut off = 0usize;
    for s in segs {
        let n = (s.len as usize).min(data.len() - off);
        if n == 0 {
            break;
        }
        mem.write(s.addr, &data[off..off + n])?;
        off += n;
    }
    Ok(off as u64)
}

/// Run `op`.
fn run_op(op: &Op, l: &Layout, mem: &dyn GuestMem, disk: &Disk, id: &[u8; ID_LEN]) -> Done {
    let res = match op {
        Op::Read { offset, len } => {
            let mut buf = vec![0u8; usize::try_from(*len).unwrap_or(0)];
            disk.file
                .read_exact_at(&mut buf, *offset)
                .map_err(BackendError::Io)
                .and_then(|()| scatter(mem, &l.data, &buf))
        }
        // Every data byte is read before the disk is written: a buffer
        // that faults leaves the disk untouched.
        Op::Write { offset, len } => gather(mem, &l.data, *len)
            .and_then(|buf| Ok(disk.file.write_all_at(&buf, *offset)?))
            .map(|()| 0),
        Op::Flush => disk.file.sync_data().map_err(BackendError::Io).map(|()| 0),
        Op::GetId => scatter(mem, &l.data, id),
        Op::Fail(s) => return Done::status(*s),
    };
    match (res, op) {
        (Ok(_), Op::Write { len, .. }) => Done {
            moved: *len,
            ..Done::status(S_OK)
        },
        (Ok(written), _) => Done {
            written,
            moved: written,
            ..Done::status(S_OK)
        },
        (Err(e), _) => {
            log::info!("blk request {op:?} failed: {e}");
            Done {
                faulted: is_fault(&e),
                ..Done::status(S_IOERR)
            }
        }
    }
}

/// Parse, check and run one request chain, then write its status byte.
pub fn execute(chain: &[Seg], mem: &dyn GuestMem, disk: &Disk, id: &[u8; ID_LEN]) -> Outcome {
    let mut out = Outcome {
        status: S_IOERR,
        used_len: 0,
        status_written: false,
        kind: None,
        moved: 0,
        faulted: false,
    };
    let Some(status_at) = status_addr(chain) else {
        return out;
    };
    let mut written = 0;
    match layout(chain) {
        Err(e) => log::info!("refusing a blk request: {e}"),
        Ok(l) => match gather(mem, &l.header, HDR_LEN as u64) {
            Err(e) => {
                log::info!("blk request header unreadable: {e}");
                out.faulted = is_fault(&e);
            }
            Ok(b) => {
                let mut hdr = [0u8; HDR_LEN];
                hdr.copy_from_slice(&b);
                let h = Header::decode(&hdr);
                out.kind = Some(h.kind);
                let d = run_op(&plan(h, &l, disk.capacity), &l, mem, disk, id);
                (out.status, written, out.moved, out.faulted) =
                    (d.status, d.written, d.moved, d.faulted);
            }
        },
    }
    out.status_written = mem.write(status_at, &[out.status]).is_ok();
    let used = written + u64::from(out.status_written);
    out.used_len = u32::try_from(used).unwrap_or(u32::MAX);
    out
}
