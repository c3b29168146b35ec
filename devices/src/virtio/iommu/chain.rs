//! Splitting a descriptor chain into its device-readable bytes and its device-writable
//! regions, with bounds, and writing a reply across the writable regions.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use crate::virtio::GuestMemoryMmap;

/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver does not want used-buffer interrupts.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Why a chain cannot be served. The chain is returned to the driver unwritten.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A device-readable descriptor follows a device-writable one.
    #[error("descriptor chain has a readable descriptor after a writable one; put all readable descriptors first")]
    ReadableAfterWritable,
    /// The readable part is larger than any request.
    #[error("readable part of {len} bytes exceeds the {max}-byte limit")]
    ReadableTooLong {
        /// Bytes in the readable part (saturated).
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A readable descriptor points outside guest memory.
    #[error("cannot read request at {addr:#x}")]
    Read {
        /// Guest address of the descriptor.
        addr: u64,
        /// The memory error.
        #[source]
        source: GuestMemoryError,
    },
    /// A writable region the reply would use is not guest memory.
    #[error("writable descriptor at {addr:#x} (+{len}) is outside guest memory")]
    BadWritable {
        /// Guest address of the descriptor.
        addr: u64,
        /// Bytes of it the reply would use.
        len: usize,
    },
    /// Writing the reply failed.
    #[error("cannot write reply at {addr:#x}")]
    Write {
        /// Guest address of the descriptor.
        addr: u64,
        /// The memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// A chain split by direction.
#[derive(Debug, Default)]
pub struct ChainParts {
    /// The device-readable bytes, in order.
    pub readable: Vec<u8>,
    /// The device-writable regions, in order.
    pub writable: Vec<(GuestAddress, u32)>,
    /// Sum of the writable lengths (saturating).
    pub writable_len: usize,
}

/// Walks `descriptors` (one chain; virtio-queue already bounds its length and resolves
/// indirect tables): reads the readable part (at most `max_readable` bytes, else an error)
/// and collects the writable regions.
pub fn split<I>(
    mem: &GuestMemoryMmap,
    descriptors: I,
    max_readable: usize,
) -> Result<ChainParts, ChainError>
where
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut parts = ChainParts::default();
    let mut readable_len: u64 = 0;
    for desc in descriptors {
        let len = desc.len();
        if desc.is_write_only() {
            parts.writable.push((desc.addr(), len));
            parts.writable_len = parts.writable_len.saturating_add(len as usize);
            continue;
        }
        if !parts.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        }
        readable_len = readable_len.saturating_add(u64::from(len));
        if readable_len > max_readable as u64 {
            return Err(ChainError::ReadableTooLong {
                len: readable_len,
                max: max_readable,
            });
        }
        let start = parts.readable.len();
        parts.readable.resize(start + len as usize, 0);
        mem.read_slice(&mut parts.readable[start..], desc.addr())
            .map_err(|source| ChainError::Read {
                addr: desc.addr().0,
                source,
            })?;
    }
    Ok(parts)
}

/// Checks that the first `len` bytes of the writable regions are guest memory, so a reply of
/// up to `len` bytes cannot fail half-way after the request was executed.
pub fn check_writable(
    mem: &GuestMemoryMmap,
    regions: &[(GuestAddress, u32)],
    len: usize,
) -> Result<(), ChainError> {
    let mut left = len;
    for &(addr, rlen) in regions {
        if left == 0 {
            break;
        }
        let n = left.min(rlen as usize);
        if n > 0 && !GuestMemory::check_range(mem, addr, n, Permissions::Write) {
            return Err(ChainError::BadWritable {
                addr: addr.0,
                len: n,
            });
        }
        left -= n;
    }
    Ok(())
}

/// Whether the driver wants an interrupt for the buffers just used. With EVENT_IDX this is
/// virtio-queue's `used_event` check; without it the device honours `VRING_AVAIL_F_NO_INTERRUPT`
/// (Linux sets it on the request queue, which it polls). Errors err on the side of signalling.
pub fn needs_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    // Order the used ring update before reading the driver's flags.
    fence(Ordering::SeqCst);
    match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// Writes `bytes` across the writable regions, in order. The caller made sure they fit.
pub fn write(
    mem: &GuestMemoryMmap,
    regions: &[(GuestAddress, u32)],
    bytes: &[u8],
) -> Result<(), ChainError> {
    let mut rest = bytes;
    for &(addr, rlen) in regions {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(rlen as usize);
        mem.write_slice(&rest[..n], addr)
            .map_err(|source| ChainError::Write {
                addr: addr.0,
                source,
            })?;
        rest = &rest[n..];
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;

    const W: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn readable_bytes_are_concatenated_and_writable_regions_collected() {
        let m = mem();
        m.write_slice(&[1, 2], GuestAddress(0x100)).unwrap();
        m.write_slice(&[3], GuestAddress(0x200)).unwrap();
        let descs = vec![
            Descriptor::new(0x100, 2, 0, 0),
            Descriptor::new(0x200, 1, 0, 0),
            Descriptor::new(0x300, 3, W, 0),
            Descriptor::new(0x400, 5, W, 0),
        ];
        let p = split(&m, descs, 16).unwrap();
        assert_eq!(p.readable, vec![1, 2, 3]);
        assert_eq!(p.writable_len, 8);
        write(&m, &p.writable, &[9, 8, 7, 6]).unwrap();
        let mut out = [0u8; 3];
        m.read_slice(&mut out, GuestAddress(0x300)).unwrap();
        assert_eq!(out, [9, 8, 7]);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x400)).unwrap(), 6);
    }

    #[test]
    fn malformed_chains_are_rejected() {
        let m = mem();
        let after = vec![
            Descriptor::new(0x300, 3, W, 0),
            Descriptor::new(0x100, 2, 0, 0),
        ];
        assert!(matches!(
            split(&m, after, 16),
            Err(ChainError::ReadableAfterWritable)
        ));
        let long = vec![
            Descriptor::new(0, 10, 0, 0),
            Descriptor::new(0, u32::MAX, 0, 0),
        ];
        assert!(matches!(
            split(&m, long, 16),
            Err(ChainError::ReadableTooLong { max: 16, .. })
        ));
        let outside = vec![Descriptor::new(0xfffe, 4, 0, 0)];
        assert!(matches!(
            split(&m, outside, 16),
            Err(ChainError::Read { .. })
        ));
        let regions = [(GuestAddress(0x100), 2), (GuestAddress(0xffff), 8)];
        assert!(check_writable(&m, &regions, 2).is_ok());
        assert!(matches!(
            check_writable(&m, &regions, 4),
            Err(ChainError::BadWritable {
                addr: 0xffff,
                len: 2
            })
        ));
    }
}
