//! Hostile-guest fuzzing of the VT-d model (proptest, bounded): arbitrary sequences of register
//! reads and writes (any offset and width), translations and interrupt remappings against a
//! unit over a small guest memory full of random root, context, page-table and invalidation-
//! queue entries, which the guest may also rewrite between steps. Nothing panics, every step
//! finishes (the model's loops are bounded), and what a step returns stays bounded.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use iommu::vtd::regs::*;
use iommu::vtd::{MsiMessage, Vtd, VtdAction, VtdConfig, MAX_TRANSLATE_STEPS};
use iommu::{Access, IommuEvent, Iova, Permissions, RequesterId};

type Mem = GuestMemoryMmap<()>;

/// 64 pages of guest memory at GPA 0.
const PAGES: u64 = 64;
const MEM_SIZE: u64 = PAGES * 0x1000;
/// Most events one register write may hand to the adapter. 65536 requesters can be cached, so
/// one global invalidation may name each of them once; the model must not go beyond that.
const MAX_EVENTS_PER_STEP: usize = 1 << 17;

fn proptest_config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A tiny deterministic generator so one seed describes all of guest memory.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A qword that is often a plausible table entry or descriptor, sometimes garbage.
fn plausible_qword(rng: &mut Rng) -> u64 {
    let r = rng.next();
    let page = (rng.next() % PAGES) << 12;
    match r % 10 {
        0..=2 => 0,
        // Root / context low / page-table entry: a pointer into memory with flag bits
        // (present, R/W, translation type, PS, TM).
        3..=5 => page | (r >> 8 & 0xff) | (r >> 20 & 1) << 62,
        // Context high: AW (0..3), DID (0..3).
        6 => (r >> 8 & 3) | (r >> 16 & 3) << 8,
        // An invalidation descriptor low qword: type 1..=5, granularity, small DID/SID.
        7 => ((r >> 8) % 5 + 1) | (r >> 16 & 0x30) | (r >> 24 & 3) << 16 | (r >> 32 & 0xff) << 32,
        8 => r,
        _ => u64::MAX,
    }
}

fn random_memory(seed: u64) -> Mem {
    let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let mut rng = Rng(seed | 1);
    let mut bytes = Vec::with_capacity(MEM_SIZE as usize);
    for _ in 0..MEM_SIZE / 8 {
        bytes.extend_from_slice(&plausible_qword(&mut rng).to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(0)).unwrap();
    mem
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Read {
        offset: u64,
        len: usize,
    },
    Translate {
        sid: u16,
        iova: u64,
        len: u64,
        write: bool,
        record: bool,
    },
    Remap {
        sid: u16,
        addr: u64,
        data: u32,
        record: bool,
    },
    Poke {
        qword: u64,
        value: u64,
    },
    Enable(Tables),
    Submit(Vec<(u64, u64)>),
    Reset,
}

/// A coherent root → context chain (bus 0, devfn 0..16) onto random page tables, written and
/// then enabled the way a driver does (RTADDR, SRTP, queue, TE).
#[derive(Debug, Clone)]
struct Tables {
    root: u64,
    ctx: u64,
    slpt: u64,
    tt: u64,
    aw: u64,
    did: u16,
    queue: u64,
}

fn tables() -> impl Strategy<Value = Tables> {
    (
        0..PAGES,
        0..PAGES,
        0..PAGES,
        prop_oneof![3 => Just(0u64), 1 => 0u64..4],
        1u64..3,
        0u16..4,
        0..PAGES,
    )
        .prop_map(|(root, ctx, slpt, tt, aw, did, queue)| Tables {
            root: root << 12,
            ctx: ctx << 12,
            slpt: slpt << 12,
            tt,
            aw,
            did,
            queue: queue << 12,
        })
}

/// Invalidation descriptors of every legacy type with plausible fields.
fn descriptor() -> impl Strategy<Value = (u64, u64)> {
    let addr = (0u64..0x100_0000).prop_map(|a| a & !0xfff);
    prop_oneof![
        (0u64..4, 0u64..4, 0u64..16, 0u64..4)
            .prop_map(|(g, did, sid, fm)| (1 | g << 4 | did << 16 | sid << 32 | fm << 48, 0)),
        (0u64..4, 0u64..4, addr.clone(), 0u64..20, any::<bool>())
            .prop_map(|(g, did, a, am, ih)| (2 | g << 4 | did << 16, a | u64::from(ih) << 6 | am)),
        (0u64..16, addr.clone(), any::<bool>()).prop_map(|(sid, a, size)| (
            3 | sid << 32,
            a | u64::from(size) | (a >> 12 & 0x7ff) << 1
        )),
        (any::<bool>(), any::<u16>(), 0u64..32).prop_map(|(global, idx, im)| if global {
            (4, 0)
        } else {
            (4 | 1 << 4 | im << 27 | u64::from(idx) << 32, 0)
        }),
        (
            any::<bool>(),
            any::<bool>(),
            any::<u32>(),
            0..MEM_SIZE / 4 + 4
        )
            .prop_map(|(sw, intr, data, dw)| (
                5 | u64::from(intr) << 4 | u64::from(sw) << 5 | u64::from(data) << 32,
                dw * 4
            )),
        (any::<u64>(), any::<u64>()),
    ]
}

fn register() -> impl Strategy<Value = u64> {
    let regs = vec![
        VER,
        CAP,
        ECAP,
        GCMD,
        GSTS,
        RTADDR,
        RTADDR + 4,
        CCMD,
        CCMD + 4,
        FSTS,
        FECTL,
        FEDATA,
        FEADDR,
        FEUADDR,
        AFLOG,
        IQH,
        IQT,
        IQA,
        IQA + 4,
        ICS,
        IECTL,
        IEDATA,
        IEADDR,
        IEUADDR,
        IQER,
        IRTA,
        IVA,
        IVA + 4,
        IOTLB,
        IOTLB + 4,
        FRCD_BASE,
        FRCD_BASE + 8,
        FRCD_BASE + 12,
    ];
    prop_oneof![
        6 => proptest::sample::select(regs),
        1 => (0u64..0x120).prop_map(|i| i * 4),
        1 => any::<u64>(),
    ]
}

fn gcmd_value() -> impl Strategy<Value = u64> {
    let bits = [
        GCMD_TE, GCMD_SRTP, GCMD_QIE, GCMD_IRE, GCMD_SIRTP, GCMD_CFI, GCMD_WBF,
    ];
    proptest::collection::vec(proptest::sample::select(bits.to_vec()), 0..4)
        .prop_map(|v| u64::from(v.into_iter().fold(0, |a, b| a | b)))
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => gcmd_value(),
        // Addresses (RTADDR, IQA with a queue size, IRTA with a size) inside memory.
        3 => (0..PAGES, 0u64..8).prop_map(|(p, low)| p << 12 | low),
        // Queue tails and command registers with their go bits.
        2 => (0u64..64).prop_map(|t| t << 4),
        2 => (any::<u64>(), 0u64..4).prop_map(|(v, g)| (v & 0xffff_ffff) | 1 << 63 | g << 61),
        2 => (any::<u64>(), 0u64..4).prop_map(|(v, g)| (v & 0xffff << 32) | 1 << 63 | g << 60),
        1 => any::<u64>(),
    ]
}

fn width() -> impl Strategy<Value = usize> {
    prop_oneof![8 => prop_oneof![Just(4usize), Just(8usize)], 1 => 0usize..17]
}

fn sid() -> impl Strategy<Value = u16> {
    prop_oneof![4 => 0u16..16, 1 => any::<u16>()]
}

fn iova() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0u64..0x100_0000,
        1 => Just(0xfee0_0000u64),
        1 => Just(0xfedf_f000u64),
        1 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (register(), value(), width()).prop_map(|(offset, v, len)| {
            let mut data = v.to_le_bytes().to_vec();
            data.resize(len, 0);
            Op::Write { offset, data }
        }),
        2 => (register(), width()).prop_map(|(offset, len)| Op::Read { offset, len }),
        4 => (sid(), iova(), prop_oneof![1u64..0x3000, Just(u64::MAX)], any::<bool>(), any::<bool>())
            .prop_map(|(sid, iova, len, write, record)| Op::Translate { sid, iova, len, write, record }),
        1 => (sid(), prop_oneof![Just(0xfee0_0010u64), any::<u64>()], any::<u32>(), any::<bool>())
            .prop_map(|(sid, addr, data, record)| Op::Remap { sid, addr, data, record }),
        2 => (0..MEM_SIZE / 8, any::<u64>()).prop_map(|(qword, value)| Op::Poke { qword, value }),
        2 => tables().prop_map(Op::Enable),
        4 => proptest::collection::vec(descriptor(), 1..12).prop_map(Op::Submit),
        1 => Just(Op::Reset),
    ]
}

fn config() -> impl Strategy<Value = VtdConfig> {
    (
        any::<[bool; 5]>(),
        prop_oneof![Just(39u8), Just(48u8)],
        1usize..=64,
        prop_oneof![Just(0usize), Just(4), Just(4096)],
    )
        .prop_map(
            |(b, address_width, fault_records, iotlb_capacity)| VtdConfig {
                address_width,
                caching_mode: b[0],
                device_iotlb: b[1],
                interrupt_remapping: b[2],
                pass_through: b[3],
                large_pages: b[4],
                fault_records,
                identity_limit: MEM_SIZE - 1,
                iotlb_capacity,
                ..VtdConfig::default()
            },
        )
}

fn count_events(actions: &[VtdAction]) -> usize {
    actions
        .iter()
        .map(|a| match a {
            VtdAction::Notify(events) => events.len(),
            _ => 1,
        })
        .sum()
}

/// Carries out the actions like an adapter would (completing waits); returns how many events
/// the step produced in total.
fn settle(vtd: &mut Vtd<Mem>, actions: Vec<VtdAction>) -> Result<usize, TestCaseError> {
    let mut total = count_events(&actions);
    for a in &actions {
        match a {
            VtdAction::WaitDone(w) => total += count_events(&vtd.complete_wait(w)),
            VtdAction::Notify(events) => {
                for e in events {
                    if let IommuEvent::Unmap { range, .. } | IommuEvent::Map { range, .. } = e {
                        prop_assert!(range.start() <= range.end());
                    }
                }
            }
            _ => {}
        }
    }
    prop_assert!(
        total <= MAX_EVENTS_PER_STEP,
        "one step produced {} events",
        total
    );
    Ok(total)
}

fn translate(vtd: &mut Vtd<Mem>, op: &Op) -> Result<(), TestCaseError> {
    let Op::Translate {
        sid,
        iova,
        len,
        write,
        record,
    } = *op
    else {
        return Ok(());
    };
    let access: Access = if write {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let rid = RequesterId::from_bdf(0, sid);
    let res = if record {
        let (res, actions) = vtd.translate_and_record(rid, Iova(iova), len, access);
        prop_assert!(actions.len() <= 1);
        settle(vtd, actions)?;
        res
    } else {
        iommu::DmaTranslate::translate(&*vtd, rid, Iova(iova), len, access)
    };
    if let Ok(t) = res {
        prop_assert!(t.fragments.len() <= MAX_TRANSLATE_STEPS);
        let total = t.fragments.iter().fold(0u64, |a, f| a.saturating_add(f.1));
        prop_assert_eq!(total, len, "fragments {:x?}", t.fragments);
        prop_assert!(t.perm.allow(access));
        prop_assert!(t.extent.iova.contains(iova));
    }
    Ok(())
}

fn write64(vtd: &mut Vtd<Mem>, offset: u64, value: u64) -> Result<(), TestCaseError> {
    let actions = vtd.mmio_write(offset, &value.to_le_bytes());
    settle(vtd, actions).map(|_| ())
}

fn write32(vtd: &mut Vtd<Mem>, offset: u64, value: u32) -> Result<(), TestCaseError> {
    let actions = vtd.mmio_write(offset, &value.to_le_bytes());
    settle(vtd, actions).map(|_| ())
}

fn enable(vtd: &mut Vtd<Mem>, mem: &Mem, t: &Tables) -> Result<(), TestCaseError> {
    let put = |addr: u64, v: u64| mem.write_obj(v.to_le(), GuestAddress(addr)).unwrap();
    put(t.root, t.ctx | 1);
    put(t.root + 8, 0);
    for devfn in 0..16 {
        put(t.ctx + devfn * 16, t.slpt | t.tt << 2 | 1);
        put(t.ctx + devfn * 16 + 8, t.aw | u64::from(t.did) << 8);
    }
    write64(vtd, RTADDR, t.root)?;
    write32(vtd, GCMD, GCMD_SRTP)?;
    write64(vtd, IQA, t.queue)?;
    write32(vtd, GCMD, GCMD_QIE)?;
    write32(vtd, GCMD, GCMD_QIE | GCMD_TE)
}

/// Writes `descs` at the queue tail (wherever IQA points) and moves the tail past them.
fn submit(vtd: &mut Vtd<Mem>, mem: &Mem, descs: &[(u64, u64)]) -> Result<(), TestCaseError> {
    let read64 = |vtd: &Vtd<Mem>, off: u64| {
        let mut b = [0u8; 8];
        vtd.mmio_read(off, &mut b);
        u64::from_le_bytes(b)
    };
    let base = read64(vtd, IQA) & !0xfff;
    let entries = 256u64 << (read64(vtd, IQA) & 7);
    let mut tail = (read64(vtd, IQT) >> 4) & 0x7fff;
    for &(lo, hi) in descs {
        let at = base.wrapping_add(tail * 16);
        let _ = mem.write_obj(lo.to_le(), GuestAddress(at));
        let _ = mem.write_obj(hi.to_le(), GuestAddress(at.wrapping_add(8)));
        tail = (tail + 1) % entries;
    }
    write64(vtd, IQT, tail << 4)?;
    if read64(vtd, FSTS) & u64::from(FSTS_IQE) != 0 {
        // Recover like a driver: clear IQE and skip the bad descriptor.
        write32(vtd, FSTS, FSTS_IQE)?;
    }
    Ok(())
}

fn step(vtd: &mut Vtd<Mem>, mem: &Mem, op: &Op) -> Result<(), TestCaseError> {
    match op {
        Op::Write { offset, data } => {
            let actions = vtd.mmio_write(*offset, data);
            settle(vtd, actions)?;
        }
        Op::Read { offset, len } => {
            let mut buf = vec![0xa5u8; *len];
            vtd.mmio_read(*offset, &mut buf);
            if !matches!(len, 4 | 8) {
                prop_assert!(buf.iter().all(|&b| b == 0), "odd-sized read returned data");
            }
        }
        Op::Translate { .. } => translate(vtd, op)?,
        Op::Remap {
            sid,
            addr,
            data,
            record,
        } => {
            let msg = MsiMessage {
                addr: *addr,
                data: *data,
            };
            if *record {
                let (_, actions) = vtd.remap_msi_and_record(*sid, msg);
                settle(vtd, actions)?;
            } else {
                let _ = vtd.remap_msi(*sid, msg);
            }
        }
        Op::Poke { qword, value } => {
            mem.write_obj(value.to_le(), GuestAddress(qword * 8))
                .unwrap();
        }
        Op::Enable(t) => enable(vtd, mem, t)?,
        Op::Submit(descs) => submit(vtd, mem, descs)?,
        Op::Reset => {
            let actions = vtd.reset();
            prop_assert_eq!(actions, vec![VtdAction::Notify(vec![IommuEvent::Reset])]);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn random_register_traffic_over_random_tables_never_panics(
        config in config(),
        seed in any::<u64>(),
        ops in proptest::collection::vec(op(), 1..64),
    ) {
        let mem = random_memory(seed);
        let mut vtd = Vtd::new(config, mem.clone()).unwrap();
        for op in &ops {
            step(&mut vtd, &mem, op)?;
        }
        // Whatever happened, the register file still answers sanely.
        let mut ver = [0u8; 4];
        vtd.mmio_read(VER, &mut ver);
        prop_assert_eq!(u32::from_le_bytes(ver), VERSION);
    }
}

/// Regression (bug "unbounded invalidation batch"): a guest that makes thousands of requesters
/// present (one context table shared by 16 buses), gets them cached, and then queues hundreds
/// of global IOTLB invalidations (and caching-mode page invalidations over scattered leaves)
/// made one IQT write return one event per requester per descriptor: millions of events, and
/// with all 65536 requesters gigabytes. One write now returns a bounded number.
#[test]
fn unbounded_invalidation_batch_is_folded_into_one_reset() {
    const SIDS: u16 = 16 * 256;
    let mem = Mem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let put = |addr: u64, v: u64| mem.write_obj(v.to_le(), GuestAddress(addr)).unwrap();
    let (root, ctx, pml4, queue) = (0x1000u64, 0x2000u64, 0x3000u64, 0x10_0000u64);
    for bus in 0..16 {
        put(root + bus * 16, ctx | 1);
    }
    for devfn in 0..256 {
        put(ctx + devfn * 16, pml4 | 1);
        put(ctx + devfn * 16 + 8, 2 | 1 << 8);
    }
    // 4-level tables: IOVA 0..2 MiB, every other 4 KiB page present (no merged extents).
    put(pml4, 0x4000 | 3);
    put(0x4000, 0x5000 | 3);
    put(0x5000, 0x6000 | 3);
    for pte in (0..512).step_by(2) {
        put(0x6000 + pte * 8, (0x20_0000 + pte * 0x2000) | 3);
    }
    let config = VtdConfig {
        caching_mode: true,
        ..VtdConfig::default()
    };
    let mut vtd = Vtd::new(config, mem.clone()).unwrap();
    write64(&mut vtd, RTADDR, root).unwrap();
    write32(&mut vtd, GCMD, GCMD_SRTP).unwrap();
    write32(&mut vtd, GCMD, GCMD_TE).unwrap();
    for sid in 0..SIDS {
        let rid = RequesterId::from_bdf(0, sid);
        let _ = iommu::DmaTranslate::translate(&vtd, rid, Iova(0), 1, Permissions::Read);
        assert_eq!(vtd.cached_domain(rid), Some(1));
    }
    // 100 global IOTLB invalidations, 100 page-selective ones over the 2 MiB (AM 9), a wait.
    let mut descs = Vec::new();
    for _ in 0..100 {
        descs.push((2 | 1 << 4, 0));
        descs.push((2 | 3 << 4 | 1 << 16, 9));
    }
    descs.push((5 | 1 << 4, 0));
    for (i, (lo, hi)) in descs.iter().enumerate() {
        put(queue + i as u64 * 16, *lo);
        put(queue + i as u64 * 16 + 8, *hi);
    }
    write64(&mut vtd, IQA, queue | 1).unwrap();
    write32(&mut vtd, GCMD, GCMD_TE | GCMD_QIE).unwrap();
    let actions = vtd.mmio_write(IQT, &((descs.len() as u64) << 4).to_le_bytes());
    let events = count_events(&actions);
    assert!(events <= 2 * 4096, "one IQT write returned {events} events");
    // Consumers are still told to drop everything before the wait completes.
    assert_eq!(actions[0], VtdAction::Notify(vec![IommuEvent::Reset]));
    assert!(matches!(actions[1], VtdAction::WaitDone(_)));
}
