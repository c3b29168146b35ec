//! Test fixtures for the virtio-pci transport: a recording dummy device and
//! a driver-side register helper.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use iommu::sync::lock;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap as Mmap};
use vmm_sys_util::eventfd::EventFd;

use super::pci::{VirtioPciDevice, MSIX_TABLE_OFFSET};
use crate::bus::BusDevice;
use crate::interrupt::{IrqfdRouter, MsiMessage};
use crate::pci::allocator::{allocate_bars, BarAllocator};
use crate::pci::msix::test_utils::RecordingSink;
use crate::pci::root::PciDevice;
use crate::virtio::device::{ActivateContext, VirtioDevice, VirtioDeviceError, VirtioInterrupt};

pub(crate) const FEATURE_X: u64 = 1 << 3;
pub(crate) const DEVICE_STATUS: u64 = 0x14;

/// What the dummy device saw.
#[derive(Default)]
pub(crate) struct Record {
    pub(crate) acked: Vec<u64>,
    pub(crate) activated: Vec<Vec<(usize, u16, u64, bool)>>,
    pub(crate) kicks: Vec<EventFd>,
    pub(crate) interrupt: Option<Arc<dyn VirtioInterrupt>>,
    pub(crate) resets: usize,
    pub(crate) config: [u8; 8],
}

pub(crate) struct Dummy {
    pub(crate) record: Arc<Mutex<Record>>,
    pub(crate) fail_activate: bool,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        23
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 128]
    }
    fn config_len(&self) -> usize {
        8
    }
    fn avail_features(&self) -> u64 {
        FEATURE_X | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << 34
    }
    fn ack_features(&mut self, features: u64) {
        lock(&self.record).acked.push(features);
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let r = lock(&self.record);
        let o = offset as usize;
        data.copy_from_slice(&r.config[o..o + data.len()]);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        lock(&self.record).config[o..o + data.len()].copy_from_slice(data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioDeviceError> {
        if self.fail_activate {
            return Err(VirtioDeviceError::QueueCount {
                expected: 3,
                actual: ctx.queues.len(),
            });
        }
        let mut r = lock(&self.record);
        let queues = ctx
            .queues
            .iter()
            .map(|(i, q, _)| (*i, q.size(), q.desc_table(), q.event_idx_enabled()))
            .collect();
        r.activated.push(queues);
        r.kicks = ctx.queues.into_iter().map(|q| q.2).collect();
        r.interrupt = Some(ctx.interrupt);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        let mut r = lock(&self.record);
        r.resets += 1;
        r.kicks.clear();
        r.interrupt = None;
        true
    }
}

pub(crate) struct Fixture {
    pub(crate) dev: VirtioPciDevice,
    pub(crate) record: Arc<Mutex<Record>>,
    pub(crate) sink: Arc<RecordingSink>,
    pub(crate) base: u64,
}

pub(crate) fn fixture_with(fail_activate: bool, router: Option<Arc<dyn IrqfdRouter>>) -> Fixture {
    let mem = Mmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let dummy = Dummy {
        record: record.clone(),
        fail_activate,
    };
    let sink = Arc::new(RecordingSink::default());
    let mut dev = VirtioPciDevice::new(Box::new(dummy), mem, sink.clone(), router).unwrap();
    let bars = allocate_bars(&mut dev, &mut BarAllocator::mmio32(), None).unwrap();
    let base = bars[0].addr;
    Fixture {
        dev,
        record,
        sink,
        base,
    }
}

pub(crate) fn fixture() -> Fixture {
    fixture_with(false, None)
}

impl Fixture {
    pub(crate) fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.dev.read(self.base, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }
    pub(crate) fn write(&mut self, offset: u64, len: usize, v: u64) {
        self.dev.write(self.base, offset, &v.to_le_bytes()[..len]);
    }
    pub(crate) fn status(&mut self) -> u8 {
        self.read(DEVICE_STATUS, 1) as u8
    }
    pub(crate) fn negotiate(&mut self, features: u64) {
        self.write(DEVICE_STATUS, 1, 0);
        self.write(DEVICE_STATUS, 1, 1);
        self.write(DEVICE_STATUS, 1, 3);
        for sel in 0..2u64 {
            self.write(0x08, 4, sel);
            self.write(0x0c, 4, (features >> (32 * sel)) & 0xffff_ffff);
        }
        self.write(DEVICE_STATUS, 1, 0xb);
    }
    pub(crate) fn setup_queue(&mut self, index: u64, size: u64, desc: u64, vector: u64) {
        self.write(0x16, 2, index);
        self.write(0x18, 2, size);
        self.write(0x20, 4, desc);
        self.write(0x24, 4, 0);
        self.write(0x28, 8, desc + 0x1000);
        self.write(0x30, 8, desc + 0x2000);
        self.write(0x1a, 2, vector);
        self.write(0x1c, 2, 1);
    }
    /// Enables MSI-X and programs `vector` with data `0x40 + vector`.
    pub(crate) fn enable_msix(&mut self, vector: u64) {
        let entry = MSIX_TABLE_OFFSET + vector * 16;
        self.write(entry, 4, 0xfee0_0000);
        self.write(entry + 8, 4, 0x40 + vector);
        self.write(entry + 12, 4, 0);
        let reg = self.dev.msix_cap_reg;
        self.dev.write_config_register(reg, 3, &[0x80]);
    }
}

pub(crate) fn msg(vector: u32) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000,
        data: 0x40 + vector,
    }
}
