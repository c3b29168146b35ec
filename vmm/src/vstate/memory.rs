//! Guest RAM backed by one shared memfd.
//!
//! vhost-user backends map guest memory from the file descriptors sent in
//! `SET_MEM_TABLE`, so RAM must be a shared file mapping, never anonymous.
//! All regions live in one memfd at increasing offsets.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress};

/// Guest memory type used across iovmm.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Guest memory errors.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the guest memory file (memfd_create)")]
    Memfd(#[source] std::io::Error),
    /// The memfd could not be sized.
    #[error("cannot size the guest memory file to {size} bytes; is there enough memory?")]
    Truncate {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Mapping failed.
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
}

/// Creates shared, memfd-backed guest memory for `(start, len)` ranges.
pub fn create_guest_memory(ranges: &[(u64, u64)]) -> Result<GuestMemoryMmap, MemoryError> {
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    let name: &CStr = c"iovmm-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(total)
        .map_err(|source| MemoryError::Truncate {
            size: total,
            source,
        })?;
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        regions.push((GuestAddress(start), len as usize, Some(fo)));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Mmap)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memory_is_shared_memfd_at_increasing_offsets() {
        let mem = create_guest_memory(&[(0, 0x10000), (0x1_0000_0000, 0x20000)]).unwrap();
        let offsets: Vec<u64> = mem
            .iter()
            .map(|r| r.file_offset().unwrap().start())
            .collect();
        assert_eq!(offsets, vec![0, 0x10000]);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1_0000_0010))
            .unwrap();
        // Read the same bytes back through the file: proves a shared mapping.
        let r = mem.find_region(GuestAddress(0x1_0000_0000)).unwrap();
        let f = r.file_offset().unwrap().file();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, 0x10010).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
