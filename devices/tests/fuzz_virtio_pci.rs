//! Hostile-guest fuzzing of the virtio-pci transport (proptest, bounded): arbitrary config-space
//! and BAR accesses mixed with plausible driver sequences (feature negotiation, queue setup
//! with random sizes and addresses, MSI-X vectors, DRIVER_OK, notifies, resets) against a dummy
//! device that checks the transport's contract on every call: features are a subset of the
//! offer, config accesses stay inside the config space, activation happens once per reset and
//! only with queues that are sized and (without ACCESS_PLATFORM) inside guest memory. The
//! dummy then walks the rings it got, as a real device would.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use devices::interrupt::{MsiMessage, MsiSink};
use devices::pci::{allocate_bars, BarAllocator, PciDevice};
use devices::virtio::transport::VirtioPciDevice;
use devices::virtio::{
    ActivateContext, GuestMemoryMmap, VirtioDevice, VirtioDeviceError, VirtioInterruptType,
};

const MEM_SIZE: u64 = 0x4_0000;
const CONFIG_LEN: usize = 12;
const MAX_SIZES: [u16; 2] = [256, 64];
const VERSION_1: u64 = 1 << 32;
const ACCESS_PLATFORM: u64 = 1 << 33;
const OFFERED: u64 = 1 << 3 | 1 << 29 | ACCESS_PLATFORM;
const STATUS: u64 = 0x14;

fn proptest_config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[derive(Default)]
struct Seen {
    active: bool,
    activations: usize,
    acked: u64,
    chains: usize,
}

/// A device that asserts the transport's contract (a panic fails the property).
struct Checker {
    seen: Arc<Mutex<Seen>>,
    config: [u8; CONFIG_LEN],
    fail: bool,
}

impl VirtioDevice for Checker {
    fn device_type(&self) -> u32 {
        1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &MAX_SIZES
    }
    fn config_len(&self) -> usize {
        CONFIG_LEN
    }
    fn avail_features(&self) -> u64 {
        OFFERED
    }
    fn ack_features(&mut self, features: u64) {
        assert_eq!(
            features & !(OFFERED | VERSION_1),
            0,
            "unoffered {features:#x}"
        );
        self.seen.lock().unwrap().acked = features;
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let o = usize::try_from(offset).unwrap();
        assert!(o + data.len() <= CONFIG_LEN, "read {o}+{}", data.len());
        data.copy_from_slice(&self.config[o..o + data.len()]);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let o = usize::try_from(offset).unwrap();
        assert!(o + data.len() <= CONFIG_LEN, "write {o}+{}", data.len());
        self.config[o..o + data.len()].copy_from_slice(data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioDeviceError> {
        let mut seen = self.seen.lock().unwrap();
        assert!(!seen.active, "activated twice without a reset");
        let iova_rings = seen.acked & ACCESS_PLATFORM != 0;
        let mut indices: Vec<usize> = ctx.queues.iter().map(|q| q.0).collect();
        indices.dedup();
        assert_eq!(indices.len(), ctx.queues.len(), "duplicate queue");
        for (index, queue, _kick) in &ctx.queues {
            assert!(*index < MAX_SIZES.len());
            assert!(queue.size().is_power_of_two() && queue.size() <= MAX_SIZES[*index]);
            assert!(queue.ready());
            if !iova_rings {
                assert!(
                    queue.is_valid(&ctx.mem),
                    "invalid queue {index} handed over"
                );
            }
        }
        if self.fail {
            return Err(VirtioDeviceError::QueueCount {
                expected: 3,
                actual: ctx.queues.len(),
            });
        }
        // Walk the rings like a device would (bounded by the queue size).
        if !iova_rings {
            for (_, queue, _) in ctx.queues {
                let mut queue = queue;
                for _ in 0..queue.size() {
                    let Some(chain) = queue.pop_descriptor_chain(&ctx.mem) else {
                        break;
                    };
                    let mut buf = [0u8; 16];
                    for desc in chain.take(16) {
                        let _ = ctx.mem.read_slice(&mut buf[..1], desc.addr());
                    }
                    seen.chains += 1;
                }
            }
        }
        let _ = ctx.interrupt.trigger(VirtioInterruptType::Config);
        let _ = ctx.interrupt.trigger(VirtioInterruptType::Queue(0));
        let _ = ctx.interrupt.trigger(VirtioInterruptType::Queue(7));
        seen.active = true;
        seen.activations += 1;
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.seen.lock().unwrap().active = false;
        true
    }
}

#[derive(Default)]
struct Sink(Mutex<usize>);

impl MsiSink for Sink {
    fn signal_msi(&self, _msg: MsiMessage) -> std::io::Result<()> {
        *self.0.lock().unwrap() += 1;
        Ok(())
    }
}

/// One queue's set-up as a driver would write it.
#[derive(Debug, Clone)]
struct QueueSetup {
    size: u16,
    addrs: [u64; 3],
    vector: u16,
    enable: bool,
}

#[derive(Debug, Clone)]
enum Op {
    Bar {
        write: bool,
        offset: u64,
        len: usize,
        value: u64,
    },
    Config {
        write: bool,
        reg: usize,
        offset: u64,
        len: usize,
        value: u64,
    },
    Driver {
        features: u64,
        queues: Vec<(u16, QueueSetup)>,
        msix: bool,
    },
}

fn ring_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..MEM_SIZE / 0x100).prop_map(|a| a * 0x100),
        1 => MEM_SIZE - 0x100..MEM_SIZE + 0x100,
        1 => any::<u64>(),
    ]
}

fn queue_setup() -> impl Strategy<Value = QueueSetup> {
    (
        prop_oneof![Just(16u16), Just(256), Just(64), 0u16..5, any::<u16>()],
        [ring_addr(), ring_addr(), ring_addr()],
        prop_oneof![0u16..4, Just(0xffff), any::<u16>()],
        prop_oneof![4 => Just(true), 1 => Just(false)],
    )
        .prop_map(|(size, addrs, vector, enable)| QueueSetup {
            size,
            addrs,
            vector,
            enable,
        })
}

fn bar_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..0x40,
        2 => 0x3000u64..0x3010,
        2 => 0x2000u64..0x2010,
        2 => 0x4000u64..0x4040,
        1 => 0x1000u64..0x1004,
        1 => 0u64..0x9000,
        1 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![Just(1usize), Just(2), Just(4), Just(8), 0usize..17];
    prop_oneof![
        6 => (any::<bool>(), bar_offset(), len.clone(), any::<u64>())
            .prop_map(|(write, offset, len, value)| Op::Bar { write, offset, len, value }),
        2 => (any::<bool>(), 0usize..1100, 0u64..5, len, any::<u64>())
            .prop_map(|(write, reg, offset, len, value)| Op::Config { write, reg, offset, len, value }),
        3 => (
            prop_oneof![Just(OFFERED | VERSION_1), Just(VERSION_1), Just(1 << 3 | VERSION_1), any::<u64>()],
            proptest::collection::vec((prop_oneof![0u16..2, any::<u16>()], queue_setup()), 0..4),
            any::<bool>(),
        )
            .prop_map(|(features, queues, msix)| Op::Driver { features, queues, msix }),
    ]
}

struct Rig {
    dev: VirtioPciDevice,
    base: u64,
    seen: Arc<Mutex<Seen>>,
}

impl Rig {
    fn new(fail: bool, mem: GuestMemoryMmap) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let checker = Checker {
            seen: seen.clone(),
            config: [0; CONFIG_LEN],
            fail,
        };
        let sink = Arc::new(Sink::default());
        let mut dev = VirtioPciDevice::new(Box::new(checker), mem, sink, None).unwrap();
        let bars = allocate_bars(&mut dev, &mut BarAllocator::mmio32(), None).unwrap();
        Rig {
            dev,
            base: bars[0].addr,
            seen,
        }
    }

    fn write(&mut self, offset: u64, len: usize, value: u64) {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&value.to_le_bytes());
        devices::bus::BusDevice::write(&mut self.dev, self.base, offset, &bytes[..len]);
    }

    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut bytes = [0u8; 16];
        devices::bus::BusDevice::read(&mut self.dev, self.base, offset, &mut bytes[..len]);
        u64::from_le_bytes(bytes[..8].try_into().unwrap())
    }

    fn driver(&mut self, features: u64, queues: &[(u16, QueueSetup)], msix: bool) {
        if msix {
            let reg = self.msix_cap_reg();
            self.dev.write_config_register(reg, 3, &[0x80]);
            for v in 0..3u64 {
                self.write(0x4000 + v * 16, 4, 0xfee0_0000);
                self.write(0x4000 + v * 16 + 8, 4, 0x30 + v);
                self.write(0x4000 + v * 16 + 12, 4, 0);
            }
        }
        for status in [0, 1, 3] {
            self.write(STATUS, 1, status);
        }
        for sel in 0..2u64 {
            self.write(0x08, 4, sel);
            self.write(0x0c, 4, (features >> (32 * sel)) & 0xffff_ffff);
        }
        self.write(STATUS, 1, 0xb);
        for (index, q) in queues {
            self.write(0x16, 2, u64::from(*index));
            self.write(0x18, 2, u64::from(q.size));
            for (i, addr) in q.addrs.iter().enumerate() {
                self.write(0x20 + 8 * i as u64, 8, *addr);
            }
            self.write(0x1a, 2, u64::from(q.vector));
            self.write(0x1c, 2, u64::from(q.enable));
        }
        self.write(STATUS, 1, 0xf);
        self.write(0x3000, 2, 0);
        self.write(0x3004, 2, 1);
    }

    /// The MSI-X capability's register index, found by walking the capability list.
    fn msix_cap_reg(&mut self) -> usize {
        let mut ptr = self.dev.read_config_register(0x34 / 4) as usize & 0xfc;
        for _ in 0..48 {
            if ptr == 0 {
                break;
            }
            let head = self.dev.read_config_register(ptr / 4);
            if head & 0xff == 0x11 {
                return ptr / 4;
            }
            ptr = (head >> 8) as usize & 0xfc;
        }
        panic!("no MSI-X capability");
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Bar {
                write: true,
                offset,
                len,
                value,
            } => self.write(*offset, *len, *value),
            Op::Bar {
                write: false,
                offset,
                len,
                ..
            } => {
                self.read(*offset, *len);
            }
            Op::Config {
                write,
                reg,
                offset,
                len,
                value,
            } => {
                let bytes = value.to_le_bytes();
                let data: Vec<u8> = bytes.iter().copied().cycle().take(*len).collect();
                if *write {
                    self.dev.write_config_register(*reg, *offset, &data);
                }
                self.dev.read_config_register(*reg);
            }
            Op::Driver {
                features,
                queues,
                msix,
            } => self.driver(*features, queues, *msix),
        }
    }

    /// Transport state agrees with what the device saw.
    fn check(&mut self) -> Result<(), TestCaseError> {
        let status = self.read(STATUS, 1) as u8;
        let active = self.seen.lock().unwrap().active;
        prop_assert_eq!(self.dev.is_active(), active);
        if active {
            prop_assert!(status & 4 != 0, "active without DRIVER_OK: {:#x}", status);
        }
        Ok(())
    }
}

fn guest_memory(seed: u8) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    // Random-looking ring contents: descriptors and indices all over the place.
    let bytes: Vec<u8> = (0..MEM_SIZE)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect();
    mem.write_slice(&bytes, GuestAddress(0)).unwrap();
    mem
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn hostile_driver_sequences_keep_the_transport_contract(
        fail in prop_oneof![4 => Just(false), 1 => Just(true)],
        seed in any::<u8>(),
        ops in proptest::collection::vec(op(), 1..24),
    ) {
        let mut rig = Rig::new(fail, guest_memory(seed));
        for op in &ops {
            rig.apply(op);
            rig.check()?;
        }
        // A reset always brings the device back.
        rig.write(STATUS, 1, 0);
        prop_assert!(!rig.dev.is_active());
        prop_assert_eq!(rig.read(STATUS, 1), 0);
    }
}

#[test]
fn a_plausible_driver_sequence_activates_and_walks_the_rings() {
    let mut rig = Rig::new(false, guest_memory(7));
    let q = QueueSetup {
        size: 16,
        addrs: [0x1000, 0x2000, 0x3000],
        vector: 1,
        enable: true,
    };
    rig.driver(1 << 3 | VERSION_1, &[(0, q)], true);
    assert!(rig.dev.is_active());
    let seen = rig.seen.lock().unwrap();
    assert_eq!(seen.activations, 1);
    assert_eq!(seen.acked, 1 << 3 | VERSION_1);
}
