//! Test fixtures: a driver-side split ring in guest memory, a recording interrupt and a
//! [`Driver`] that activates a [`VirtioIommuDevice`] without a transport or KVM.
#![allow(clippy::unwrap_used)]

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iommu::types::RequesterId;
use iommu::virtio::protocol::*;
use iommu::virtio::VirtioIommuSettings;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{IommuState, VirtioIommuDevice};
use crate::virtio::{
    ActivateContext, GuestMemoryMmap, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};

/// Guest memory size of the fixture.
pub(crate) const MEM_SIZE: u64 = 0x40_0000;
const HEAP_START: u64 = 0x10_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// The endpoint every fixture registers.
pub(crate) const EP: RequesterId = RequesterId::from_bdf(0, 0x08);
/// Every device feature plus VERSION_1.
pub(crate) const ALL_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_IOMMU_F_INPUT_RANGE
    | 1 << VIRTIO_IOMMU_F_DOMAIN_RANGE
    | 1 << VIRTIO_IOMMU_F_MAP_UNMAP
    | 1 << VIRTIO_IOMMU_F_PROBE
    | 1 << VIRTIO_IOMMU_F_BYPASS_CONFIG;

/// Records every interrupt.
#[derive(Default)]
pub(crate) struct RecordingInterrupt {
    pub(crate) triggers: Mutex<Vec<VirtioInterruptType>>,
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        self.triggers.lock().unwrap().push(int_type);
        Ok(())
    }
}

/// One split ring: descriptors at `base`, avail ring at `base + 0x1000`, used at `+ 0x2000`.
pub(crate) struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    pub(crate) used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    pub(crate) fn new(base: u64, size: u16) -> Self {
        Self {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub(crate) fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Makes `bufs` (`addr`, `len`, device-writable) one chain and publishes it.
    pub(crate) fn push(&mut self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % self.size;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            let at = self.desc + 16 * u64::from(idx);
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
            self.next_desc = next;
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Sets the avail ring flags (1 = `VRING_AVAIL_F_NO_INTERRUPT`).
    pub(crate) fn set_avail_flags(&self, mem: &GuestMemoryMmap, flags: u16) {
        mem.write_obj(flags, GuestAddress(self.avail)).unwrap();
    }

    pub(crate) fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// The next used element `(id, len)`, if the device returned one.
    pub(crate) fn next_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        if self.used_idx(mem) == self.used_seen {
            return None;
        }
        let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        self.used_seen = self.used_seen.wrapping_add(1);
        let id = mem.read_obj(GuestAddress(at)).unwrap();
        let len = mem.read_obj(GuestAddress(at + 4)).unwrap();
        Some((id, len))
    }
}

/// A guest driver over an activated device.
pub(crate) struct Driver {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) dev: VirtioIommuDevice,
    pub(crate) req: Ring,
    pub(crate) evt: Ring,
    pub(crate) kick: EventFd,
    pub(crate) interrupt: Arc<RecordingInterrupt>,
    heap: u64,
}

/// Default state with endpoint [`EP`] registered.
pub(crate) fn state() -> Arc<IommuState> {
    let s = IommuState::new(VirtioIommuSettings::default(), Default::default()).unwrap();
    s.add_endpoint(EP).unwrap();
    s
}

pub(crate) fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// Activation context over fresh rings; returns it with the request kick.
pub(crate) fn context(
    mem: &GuestMemoryMmap,
    req: &Ring,
    evt: &Ring,
    interrupt: Arc<RecordingInterrupt>,
) -> (ActivateContext, EventFd) {
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let ekick = EventFd::new(EFD_NONBLOCK).unwrap();
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: vec![
            (0, req.queue(), kick.try_clone().unwrap()),
            (1, evt.queue(), ekick),
        ],
        interrupt,
    };
    (ctx, kick)
}

impl Driver {
    /// Activates a device over `state` with `features` acked.
    pub(crate) fn new(state: Arc<IommuState>, features: u64) -> Self {
        let mem = mem();
        let mut dev = VirtioIommuDevice::new(state);
        dev.ack_features(features);
        let (req, evt) = (Ring::new(0, 256), Ring::new(0x4000, 64));
        let interrupt = Arc::new(RecordingInterrupt::default());
        let (ctx, kick) = context(&mem, &req, &evt, interrupt.clone());
        dev.activate(ctx).unwrap();
        Self {
            mem,
            dev,
            req,
            evt,
            kick,
            interrupt,
            heap: HEAP_START,
        }
    }

    /// Allocates `len` bytes of guest memory filled with 0xAA.
    pub(crate) fn alloc(&mut self, len: u32) -> u64 {
        if self.heap + u64::from(len) > MEM_SIZE {
            self.heap = HEAP_START;
        }
        let at = self.heap;
        self.heap = (self.heap + u64::from(len) + 15) & !15;
        let fill = vec![0xAA; len as usize];
        self.mem.write_slice(&fill, GuestAddress(at)).unwrap();
        at
    }

    /// Publishes a raw chain, kicks and waits for its used element; returns the used length.
    pub(crate) fn raw(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
        let head = self.req.push(&self.mem, bufs);
        self.kick.write(1).unwrap();
        let (id, len) = self.wait_used();
        assert_eq!(id, u32::from(head));
        len
    }

    /// Sends one request; returns the used length and the whole writable buffer.
    pub(crate) fn request(&mut self, readable: &[u8], writable_len: u32) -> (u32, Vec<u8>) {
        let r = self.alloc(readable.len() as u32);
        self.mem.write_slice(readable, GuestAddress(r)).unwrap();
        let w = self.alloc(writable_len);
        let used = self.raw(&[(r, readable.len() as u32, false), (w, writable_len, true)]);
        let mut out = vec![0; writable_len as usize];
        self.mem.read_slice(&mut out, GuestAddress(w)).unwrap();
        (used, out)
    }

    /// Sends a request with a 4-byte tail; returns the status (panics if unwritten).
    pub(crate) fn status(&mut self, readable: &[u8]) -> u8 {
        let (used, out) = self.request(readable, 4);
        assert_eq!(used, 4, "request returned unwritten");
        assert_eq!(&out[1..], &[0, 0, 0], "tail reserved bytes must be zero");
        out[0]
    }

    pub(crate) fn wait_used(&mut self) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(u) = self.req.next_used(&self.mem) {
                return u;
            }
            assert!(
                Instant::now() < deadline,
                "device did not complete the request"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// ATTACH request bytes.
pub(crate) fn attach(domain: u32, ep: u32, flags: u32) -> Vec<u8> {
    let mut v = vec![VIRTIO_IOMMU_T_ATTACH, 0, 0, 0];
    v.extend_from_slice(&domain.to_le_bytes());
    v.extend_from_slice(&ep.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v
}

/// DETACH request bytes.
pub(crate) fn detach(domain: u32, ep: u32) -> Vec<u8> {
    let mut v = vec![VIRTIO_IOMMU_T_DETACH, 0, 0, 0];
    v.extend_from_slice(&domain.to_le_bytes());
    v.extend_from_slice(&ep.to_le_bytes());
    v.extend_from_slice(&[0; 8]);
    v
}

/// MAP request bytes.
pub(crate) fn map(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Vec<u8> {
    let mut v = vec![VIRTIO_IOMMU_T_MAP, 0, 0, 0];
    v.extend_from_slice(&domain.to_le_bytes());
    v.extend_from_slice(&start.to_le_bytes());
    v.extend_from_slice(&end.to_le_bytes());
    v.extend_from_slice(&phys.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// UNMAP request bytes.
pub(crate) fn unmap(domain: u32, start: u64, end: u64) -> Vec<u8> {
    let mut v = vec![VIRTIO_IOMMU_T_UNMAP, 0, 0, 0];
    v.extend_from_slice(&domain.to_le_bytes());
    v.extend_from_slice(&start.to_le_bytes());
    v.extend_from_slice(&end.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v
}

/// PROBE request bytes.
pub(crate) fn probe(ep: u32) -> Vec<u8> {
    let mut v = vec![VIRTIO_IOMMU_T_PROBE, 0, 0, 0];
    v.extend_from_slice(&ep.to_le_bytes());
    v.extend_from_slice(&[0; 64]);
    v
}
