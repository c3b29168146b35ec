//! The memory table sent with SET_MEM_TABLE: each region's fd is mapped
//! into the back end, and addresses are looked up by front-end virtual
//! address (IOTLB mode) or by guest physical address (no IOMMU).

use std::fs::File;
use std::os::unix::io::AsRawFd;

use super::BackendError;

/// Most regions accepted in one SET_MEM_TABLE (the protocol's fd limit).
pub const MAX_REGIONS: usize = 8;
/// Largest region accepted (64 GiB), a sanity bound on a hostile table.
pub const MAX_REGION_SIZE: u64 = 64 << 30;
/// Size of one region descriptor in the SET_MEM_TABLE payload.
pub const REGION_DESC_SIZE: usize = 32;

/// One region as described on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDesc {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Front-end virtual address.
    pub uaddr: u64,
    /// Offset of the region in the fd.
    pub mmap_offset: u64,
}

struct Mapping {
    desc: RegionDesc,
    base: *mut u8,
    map_len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this struct; access
// goes through bounds-checked raw copies.
unsafe impl Send for Mapping {}
// SAFETY: as above; no interior references are handed out.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base/map_len are exactly what mmap returned.
        unsafe { libc::munmap(self.base.cast(), self.map_len) };
    }
}

/// The mapped memory table.
#[derive(Default)]
pub struct MemTable {
    maps: Vec<Mapping>,
}

impl std::fmt::Debug for MemTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let descs: Vec<_> = self.maps.iter().map(|m| m.desc).collect();
        f.debug_struct("MemTable").field("regions", &descs).finish()
    }
}

/// Parse a SET_MEM_TABLE payload (u32 count, u32 padding, regions).
pub fn parse_mem_table(payload: &[u8], nfds: usize) -> Result<Vec<RegionDesc>, BackendError> {
    let bad = |why: &str| BackendError::BadMessage(format!("SET_MEM_TABLE: {why}"));
    let count = read_u32(payload, 0).ok_or_else(|| bad("payload shorter than 8 bytes"))? as usize;
    if count == 0 || count > MAX_REGIONS {
        return Err(bad(&format!("{count} regions, expected 1..={MAX_REGIONS}")));
    }
    if payload.len() != 8 + count * REGION_DESC_SIZE {
        return Err(bad(&format!("{} bytes for {count} regions", payload.len())));
    }
    if nfds != count {
        return Err(bad(&format!("{nfds} fds for {count} regions")));
    }
    let regions = (0..count)
        .map(|i| {
            let off = 8 + i * REGION_DESC_SIZE;
            let f = |k: usize| read_u64(payload, off + 8 * k).unwrap_or(0);
            RegionDesc {
                gpa: f(0),
                size: f(1),
                uaddr: f(2),
                mmap_offset: f(3),
            }
        })
        .collect();
    Ok(regions)
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    let raw = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_ne_bytes(raw.try_into().ok()?))
}

fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    let raw = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_ne_bytes(raw.try_into().ok()?))
}

fn map_region(desc: RegionDesc, file: &File) -> Result<Mapping, BackendError> {
    let bad =
        |why: String| BackendError::BadMessage(format!("SET_MEM_TABLE region {desc:x?}: {why}"));
    if desc.size == 0 || desc.size > MAX_REGION_SIZE {
        return Err(bad(format!("size must be 1..={MAX_REGION_SIZE:#x}")));
    }
    let fits =
        desc.gpa.checked_add(desc.size).is_some() && desc.uaddr.checked_add(desc.size).is_some();
    let map_len = desc
        .mmap_offset
        .checked_add(desc.size)
        .filter(|_| fits)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or_else(|| bad("addresses overflow".into()))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if (map_len as u64) > file_len {
        return Err(bad(format!(
            "fd holds only {file_len:#x} bytes, region needs {map_len:#x}"
        )));
    }
    // SAFETY: mapping a caller-provided fd shared; the result is checked and
    // owned by the returned Mapping, which unmaps it on drop.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(bad(format!(
            "mmap failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(Mapping {
        desc,
        base: base.cast(),
        map_len,
    })
}

impl MemTable {
    /// Map every region with its fd.
    pub fn map(regions: &[RegionDesc], files: &[File]) -> Result<Self, BackendError> {
        let maps = regions
            .iter()
            .zip(files)
            .map(|(d, f)| map_region(*d, f))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MemTable { maps })
    }

    /// The regions as received.
    pub fn regions(&self) -> Vec<RegionDesc> {
        self.maps.iter().map(|m| m.desc).collect()
    }

    fn lookup(&self, addr: u64, by_uaddr: bool) -> Option<(*mut u8, u64)> {
        self.maps.iter().find_map(|m| {
            let start = if by_uaddr { m.desc.uaddr } else { m.desc.gpa };
            let off = addr.checked_sub(start).filter(|o| *o < m.desc.size)?;
            let within = m.desc.mmap_offset.checked_add(off)?;
            let ptr = m.base.wrapping_add(usize::try_from(within).ok()?);
            Some((ptr, m.desc.size - off))
        })
    }

    /// Host pointer for a front-end virtual address and the bytes left in
    /// its region.
    pub fn uaddr_to_host(&self, uaddr: u64) -> Option<(*mut u8, u64)> {
        self.lookup(uaddr, true)
    }

    /// Host pointer for a guest physical address and the bytes left in its
    /// region.
    pub fn gpa_to_host(&self, gpa: u64) -> Option<(*mut u8, u64)> {
        self.lookup(gpa, false)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn payload(regions: &[RegionDesc]) -> Vec<u8> {
        let mut p = (regions.len() as u32).to_ne_bytes().to_vec();
        p.extend_from_slice(&[0; 4]);
        for r in regions {
            for v in [r.gpa, r.size, r.uaddr, r.mmap_offset] {
                p.extend_from_slice(&v.to_ne_bytes());
            }
        }
        p
    }

    #[test]
    fn parse_rejects_counts_sizes_and_fd_mismatch() {
        let r = RegionDesc {
            gpa: 0,
            size: 0x1000,
            uaddr: 0x7000_0000,
            mmap_offset: 0,
        };
        assert_eq!(parse_mem_table(&payload(&[r]), 1).unwrap(), vec![r]);
        assert!(parse_mem_table(&payload(&[r]), 0).is_err());
        assert!(parse_mem_table(&payload(&[]), 0).is_err());
        assert!(parse_mem_table(&payload(&[r; 9]), 9).is_err());
        assert!(parse_mem_table(&payload(&[r])[..20], 1).is_err());
        assert!(parse_mem_table(&[1, 0], 1).is_err());
    }

    #[test]
    fn mapped_region_translates_both_address_kinds() {
        let file = super::super::test_memfd(0x3000);
        let d = RegionDesc {
            gpa: 0x10_0000,
            size: 0x2000,
            uaddr: 0x7000_0000,
            mmap_offset: 0x1000,
        };
        let t = MemTable::map(&[d], &[file]).unwrap();
        let (p1, left1) = t.gpa_to_host(0x10_0800).unwrap();
        let (p2, left2) = t.uaddr_to_host(0x7000_0800).unwrap();
        assert_eq!((p1, left1), (p2, left2));
        assert_eq!(left1, 0x1800);
        assert!(t.gpa_to_host(0x10_2000).is_none());
        assert!(t.uaddr_to_host(0x6fff_ffff).is_none());
    }

    #[test]
    fn map_refuses_zero_and_huge_regions() {
        let file = super::super::test_memfd(0x1000);
        let mut d = RegionDesc {
            gpa: 0,
            size: 0,
            uaddr: 0,
            mmap_offset: 0,
        };
        assert!(MemTable::map(&[d], &[file.try_clone().unwrap()]).is_err());
        d.size = MAX_REGION_SIZE + 1;
        assert!(MemTable::map(&[d], &[file.try_clone().unwrap()]).is_err());
        d.size = 0x1000;
        d.gpa = u64::MAX;
        assert!(MemTable::map(&[d], &[file]).is_err());
    }
}
