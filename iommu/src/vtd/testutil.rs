//! Test helpers: a small guest memory, a table builder writing root/context/page tables, and
//! register access shorthands.
#![allow(clippy::unwrap_used)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::{GCMD, GCMD_QIE, GCMD_SRTP, GCMD_TE, IQA, IQT, RTADDR};
use super::{Vtd, VtdAction, VtdConfig};
use crate::types::RequesterId;

/// Guest memory used by the tests.
pub type Mem = GuestMemoryMmap<()>;

/// Size of the test memory.
pub const MEM_SIZE: u64 = 0x100_0000;

/// R permission bit of a paging entry.
pub const PTE_R: u64 = 1;
/// R|W permission bits of a paging entry.
pub const PTE_RW: u64 = 3;

/// 16 MiB of guest memory at GPA 0.
pub fn test_mem() -> Mem {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Context entry low qword: present, translation type `tt`, table pointer.
pub fn ctx_lo(slptptr: u64, tt: u64) -> u64 {
    slptptr | (tt << 2) | 1
}

/// Context entry high qword: AW and DID.
pub fn ctx_hi(aw: u64, did: u16) -> u64 {
    aw | (u64::from(did) << 8)
}

/// Allocates zeroed 4 KiB pages from 1 MiB upwards and writes table entries.
pub struct Builder {
    mem: Mem,
    next: u64,
}

impl Builder {
    /// A builder over `mem`.
    pub fn new(mem: &Mem) -> Self {
        Self {
            mem: mem.clone(),
            next: 0x10_0000,
        }
    }

    /// A fresh zeroed page.
    pub fn alloc(&mut self) -> u64 {
        let page = self.next;
        self.next += 0x1000;
        self.mem
            .write_slice(&[0u8; 4096], GuestAddress(page))
            .unwrap();
        page
    }

    /// Writes a little-endian qword.
    pub fn write_u64(&self, addr: u64, value: u64) {
        self.mem
            .write_obj(value.to_le(), GuestAddress(addr))
            .unwrap();
    }

    /// Reads a little-endian qword.
    pub fn read_u64(&self, addr: u64) -> u64 {
        u64::from_le(self.mem.read_obj(GuestAddress(addr)).unwrap())
    }

    /// Writes root entry `bus`.
    pub fn write_root(&self, root: u64, bus: u8, lo: u64, hi: u64) {
        self.write_u64(root + u64::from(bus) * 16, lo);
        self.write_u64(root + u64::from(bus) * 16 + 8, hi);
    }

    /// Writes context entry `devfn`.
    pub fn write_context(&self, table: u64, devfn: u8, lo: u64, hi: u64) {
        self.write_u64(table + u64::from(devfn) * 16, lo);
        self.write_u64(table + u64::from(devfn) * 16 + 8, hi);
    }

    /// Maps `iova` with a leaf at `leaf_level` (1: 4K, 2: 2M, 3: 1G) whose entry is
    /// `gpa | flags` (+PS above level 1), creating missing intermediate tables (R|W).
    pub fn map(&mut self, root: u64, levels: u8, iova: u64, gpa: u64, leaf_level: u8, flags: u64) {
        let mut table = root;
        for level in (leaf_level..=levels).rev() {
            let shift = 12 + 9 * (u32::from(level) - 1);
            let slot = table + ((iova >> shift) & 511) * 8;
            if level == leaf_level {
                let ps = if level > 1 { 0x80 } else { 0 };
                self.write_u64(slot, gpa | flags | ps);
                return;
            }
            let entry = self.read_u64(slot);
            table = if entry & 3 == 0 {
                let next = self.alloc();
                self.write_u64(slot, next | PTE_RW);
                next
            } else {
                entry & 0xf_ffff_ffff_f000
            };
        }
    }

    /// Clears the 4 KiB leaf of `iova` (all intermediate tables must exist).
    pub fn unmap_4k(&self, root: u64, levels: u8, iova: u64) {
        let mut table = root;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (u32::from(level) - 1);
            let slot = table + ((iova >> shift) & 511) * 8;
            if level == 1 {
                self.write_u64(slot, 0);
                return;
            }
            table = self.read_u64(slot) & 0xf_ffff_ffff_f000;
        }
    }
}

/// A unit over fresh test memory.
pub fn vtd_with(config: VtdConfig) -> (Vtd<Mem>, Mem) {
    let mem = test_mem();
    (Vtd::new(config, mem.clone()).unwrap(), mem)
}

/// 32-bit register read.
pub fn r32(vtd: &Vtd<Mem>, offset: u64) -> u32 {
    let mut buf = [0u8; 4];
    vtd.mmio_read(offset, &mut buf);
    u32::from_le_bytes(buf)
}

/// 64-bit register read.
pub fn r64(vtd: &Vtd<Mem>, offset: u64) -> u64 {
    let mut buf = [0u8; 8];
    vtd.mmio_read(offset, &mut buf);
    u64::from_le_bytes(buf)
}

/// 32-bit register write.
pub fn w32(vtd: &mut Vtd<Mem>, offset: u64, value: u32) -> Vec<VtdAction> {
    vtd.mmio_write(offset, &value.to_le_bytes())
}

/// 64-bit register write.
pub fn w64(vtd: &mut Vtd<Mem>, offset: u64, value: u64) -> Vec<VtdAction> {
    vtd.mmio_write(offset, &value.to_le_bytes())
}

/// A unit with a root table, a bus-0 context table, one second-level table tree, and an
/// enabled 256-entry invalidation queue; translation enabled.
pub struct Rig {
    /// The unit.
    pub vtd: Vtd<Mem>,
    /// Table builder.
    pub b: Builder,
    /// Context table of bus 0.
    pub ctx0: u64,
    /// Top-level page table shared by the attached devices.
    pub pt: u64,
    /// Page-table levels.
    pub levels: u8,
    /// Queue base.
    pub queue: u64,
    /// Next tail index.
    pub tail: u64,
}

impl Rig {
    /// Sets everything up with `config`.
    pub fn new(config: VtdConfig) -> Self {
        let levels = if config.address_width == 48 { 4 } else { 3 };
        let (mut vtd, mem) = vtd_with(config);
        let mut b = Builder::new(&mem);
        let root = b.alloc();
        let ctx0 = b.alloc();
        b.write_root(root, 0, ctx0 | 1, 0);
        let pt = b.alloc();
        let queue = b.alloc();
        w64(&mut vtd, RTADDR, root);
        w32(&mut vtd, GCMD, GCMD_SRTP);
        w64(&mut vtd, IQA, queue);
        w32(&mut vtd, GCMD, GCMD_QIE);
        w32(&mut vtd, GCMD, GCMD_QIE | GCMD_TE);
        Self {
            vtd,
            b,
            ctx0,
            pt,
            levels,
            queue,
            tail: 0,
        }
    }

    /// The requester id of bus-0 `devfn`.
    pub fn rid(devfn: u8) -> RequesterId {
        RequesterId::from_bdf(0, u16::from(devfn))
    }

    /// Writes a context entry for bus-0 `devfn` in domain `did` with translation type `tt`.
    pub fn attach(&mut self, devfn: u8, did: u16, tt: u64) {
        let aw = u64::from(self.levels) - 2;
        self.b
            .write_context(self.ctx0, devfn, ctx_lo(self.pt, tt), ctx_hi(aw, did));
    }

    /// Maps `iova` in the shared tables (see [`Builder::map`]).
    pub fn map(&mut self, iova: u64, gpa: u64, leaf_level: u8, flags: u64) {
        let (pt, levels) = (self.pt, self.levels);
        self.b.map(pt, levels, iova, gpa, leaf_level, flags);
    }

    /// Writes descriptors at the tail (wrapping at 256) and writes IQT.
    pub fn submit(&mut self, descs: &[(u64, u64)]) -> Vec<VtdAction> {
        for &(qw0, qw1) in descs {
            let slot = self.queue + self.tail * 16;
            self.b.write_u64(slot, qw0);
            self.b.write_u64(slot + 8, qw1);
            self.tail = (self.tail + 1) % 256;
        }
        let tail = self.tail;
        w32(&mut self.vtd, IQT, (tail << 4) as u32)
    }
}

/// Context-cache descriptor.
pub fn cc_desc(g: u64, did: u16, sid: u16, fm: u64) -> (u64, u64) {
    (
        1 | g << 4 | u64::from(did) << 16 | u64::from(sid) << 32 | fm << 48,
        0,
    )
}

/// IOTLB descriptor.
pub fn iotlb_desc(g: u64, did: u16, addr: u64, am: u64, ih: bool) -> (u64, u64) {
    (
        2 | g << 4 | u64::from(did) << 16,
        addr | u64::from(ih) << 6 | am,
    )
}

/// Device-TLB descriptor.
pub fn devtlb_desc(sid: u16, addr: u64, size: bool) -> (u64, u64) {
    (3 | u64::from(sid) << 32, addr | u64::from(size))
}

/// Interrupt-entry-cache descriptor (`None` = global).
pub fn iec_desc(index: Option<(u16, u64)>) -> (u64, u64) {
    match index {
        None => (4, 0),
        Some((idx, im)) => (4 | 1 << 4 | im << 27 | u64::from(idx) << 32, 0),
    }
}

/// Wait descriptor.
pub fn wait_desc(sw: bool, intr: bool, data: u32, addr: u64) -> (u64, u64) {
    (
        5 | u64::from(intr) << 4 | u64::from(sw) << 5 | u64::from(data) << 32,
        addr,
    )
}
