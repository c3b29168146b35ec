//! blk mode: request parsing units, a proptest fuzzer of request execution
//! against a permission-checking fake memory, and end-to-end requests over a
//! socketpair through the IOTLB (the devices crate's `MainSocket` and
//! `BackendReqServer` as front end).
#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use devices::vhost_user::backend_req::{BackendReqServer, BackendReqThread};
use devices::vhost_user::channel::{IotlbChannel, MainSocket};
use devices::vhost_user::miss::{MissError, TranslatingHandler};
use devices::vhost_user::wire::*;
use proptest::prelude::*;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::request::Header;
use super::request::*;
use super::*;
use crate::backend::{test_memfd, BackendConfig, BackendHandle, TestBackend};

// ---- parsing units

fn seg(addr: u64, len: u32, writable: bool) -> Seg {
    Seg {
        addr,
        len,
        writable,
    }
}

#[test]
fn linux_layout_is_header_data_status() {
    let chain = [
        seg(0x1000, 16, false),
        seg(0x2000, 4096, true),
        seg(0x3000, 1, true),
    ];
    let l = layout(&chain).unwrap();
    assert_eq!(l.header, vec![seg(0x1000, 16, false)]);
    assert_eq!(l.data, vec![seg(0x2000, 4096, true)]);
    assert_eq!(l.status, 0x3000);
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    // 16 header bytes + 512 data in one readable descriptor; data + status in one writable.
    let chain = [seg(0x1000, 528, false), seg(0x4000, 513, true)];
    let l = layout(&chain).unwrap();
    assert_eq!(l.header, vec![seg(0x1000, 16, false)]);
    assert_eq!(
        l.data,
        vec![seg(0x1010, 512, false), seg(0x4000, 512, true)]
    );
    assert_eq!(l.status, 0x4200);
}

#[test]
fn malformed_chains_are_refused() {
    assert_eq!(layout(&[]), Err(ChainError::NoStatus));
    assert_eq!(layout(&[seg(0x1000, 16, false)]), Err(ChainError::NoStatus));
    assert_eq!(
        layout(&[seg(0x1000, 8, false), seg(0x2000, 1, true)]),
        Err(ChainError::ShortHeader(8))
    );
    assert_eq!(
        layout(&[
            seg(0x1000, 16, false),
            seg(0x2000, 1, true),
            seg(0x3000, 8, false),
            seg(0x4000, 1, true)
        ]),
        Err(ChainError::ReadableAfterWritable)
    );
    assert_eq!(
        layout(&[seg(u64::MAX - 4, 16, false), seg(0x2000, 1, true)]),
        Err(ChainError::Wraps(u64::MAX - 4))
    );
}

fn l(data: &[Seg]) -> Layout {
    Layout {
        header: vec![seg(0, 16, false)],
        data: data.to_vec(),
        status: 0x9000,
    }
}

#[test]
fn plan_checks_bounds_direction_and_alignment() {
    let cap = 8 * SECTOR;
    let w = l(&[seg(0x1000, 1024, true)]);
    let r = l(&[seg(0x1000, 1024, false)]);
    let h = |kind, sector| Header { kind, sector };
    assert_eq!(
        plan(h(T_IN, 6), &w, cap),
        Op::Read {
            offset: 3072,
            len: 1024
        }
    );
    assert_eq!(plan(h(T_IN, 7), &w, cap), Op::Fail(S_IOERR), "one past");
    assert_eq!(plan(h(T_IN, u64::MAX), &w, cap), Op::Fail(S_IOERR));
    assert_eq!(plan(h(T_IN, 0), &r, cap), Op::Fail(S_IOERR), "direction");
    assert_eq!(plan(h(T_OUT, 0), &w, cap), Op::Fail(S_IOERR), "direction");
    assert_eq!(
        plan(h(T_OUT, 0), &l(&[seg(0, 100, false)]), cap),
        Op::Fail(S_IOERR),
        "partial sector"
    );
    assert_eq!(plan(h(T_FLUSH, 99), &l(&[]), cap), Op::Flush);
    assert_eq!(plan(h(T_GET_ID, 0), &w, cap), Op::GetId);
    assert_eq!(plan(h(T_GET_ID, 0), &l(&[]), cap), Op::Fail(S_IOERR));
    assert_eq!(plan(h(11, 0), &w, cap), Op::Fail(S_UNSUPP));
}

// ---- fuzzing execute() against a fake guest memory

const FAKE_MEM: u64 = 0x4000;

/// Guest memory that allows reads only inside readable and writes only
/// inside writable descriptors of the chain, and records any other access.
/// Bytes in `hole` have no translation (an unmapped IOVA: the access fails
/// like a refused miss, which is not a violation).
struct FakeMem {
    bytes: RefCell<Vec<u8>>,
    chain: Vec<Seg>,
    violations: RefCell<Vec<String>>,
    hole: std::ops::Range<u64>,
}

impl FakeMem {
    fn allowed(&self, addr: u64, len: usize, writable: bool) -> bool {
        self.chain.iter().any(|s| {
            s.writable == writable
                && addr >= s.addr
                && addr + len as u64 <= s.addr + u64::from(s.len)
        })
    }

    fn range(
        &self,
        addr: u64,
        len: usize,
        write: bool,
    ) -> Result<std::ops::Range<usize>, BackendError> {
        let perm = if write {
            IotlbPerm::WriteOnly
        } else {
            IotlbPerm::ReadOnly
        };
        let end = addr.checked_add(len as u64).filter(|e| *e <= FAKE_MEM);
        let Some(end) = end else {
            return Err(BackendError::Translate { addr, perm });
        };
        if addr < self.hole.end && end > self.hole.start {
            return Err(BackendError::Translate { addr, perm });
        }
        if !self.allowed(addr, len, write) {
            self.violations
                .borrow_mut()
                .push(format!("{perm:?} {len} bytes at {addr:#x}"));
            return Err(BackendError::Translate { addr, perm });
        }
        Ok(addr as usize..addr as usize + len)
    }
}

impl GuestMem for FakeMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let r = self.range(addr, buf.len(), false)?;
        buf.copy_from_slice(&self.bytes.borrow()[r]);
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), BackendError> {
        let r = self.range(addr, buf.len(), true)?;
        self.bytes.borrow_mut()[r].copy_from_slice(buf);
        Ok(())
    }
}

fn arb_seg() -> impl Strategy<Value = Seg> {
    let addr = prop_oneof![8 => 0u64..FAKE_MEM, 1 => any::<u64>()];
    let len = prop_oneof![
        Just(16u32),
        Just(1),
        Just(512),
        Just(1024),
        0u32..2048,
        any::<u32>()
    ];
    (addr, len, any::<bool>()).prop_map(|(addr, len, writable)| Seg {
        addr,
        len,
        writable,
    })
}

/// A chain shaped like Linux's (16-byte header, 1..4 data buffers of whole
/// sectors, a status byte) inside the fake memory, so that many fuzzed
/// requests are valid and reach the disk and the data buffers.
fn arb_linux_chain() -> impl Strategy<Value = Vec<Seg>> {
    let addr = || 0u64..FAKE_MEM - 2048;
    let data = (addr(), 1u32..5).prop_map(|(a, n)| seg(a, n * 512, false));
    (
        addr(),
        proptest::collection::vec(data, 1..4),
        any::<bool>(),
        addr(),
    )
        .prop_map(|(h, mut data, w, st)| {
            let mut chain = vec![seg(h, 16, false)];
            data.iter_mut().for_each(|d| d.writable = w);
            chain.extend(data);
            chain.push(seg(st, 1, true));
            chain
        })
}

fn arb_chain() -> impl Strategy<Value = Vec<Seg>> {
    prop_oneof![
        proptest::collection::vec(arb_seg(), 0..6),
        arb_linux_chain(),
    ]
}

/// Where the untranslatable range goes: nowhere, over one descriptor of the
/// chain (a stale IOVA), or anywhere.
#[derive(Debug, Clone)]
enum Hole {
    None,
    Desc(prop::sample::Index),
    Range(u64, u64),
}

impl Hole {
    fn range(&self, chain: &[Seg]) -> std::ops::Range<u64> {
        match self {
            Hole::Desc(i) if !chain.is_empty() => {
                let s = chain[i.index(chain.len())];
                s.addr..s.addr.saturating_add(u64::from(s.len))
            }
            Hole::Range(a, n) => *a..a + n,
            _ => 0..0,
        }
    }
}

fn arb_hole() -> impl Strategy<Value = Hole> {
    prop_oneof![
        1 => Just(Hole::None),
        2 => any::<prop::sample::Index>().prop_map(Hole::Desc),
        1 => (0u64..FAKE_MEM, 1u64..2048).prop_map(|(a, n)| Hole::Range(a, n)),
    ]
}

fn arb_header() -> impl Strategy<Value = [u8; HDR_LEN]> {
    let kind = prop_oneof![
        Just(T_IN),
        Just(T_OUT),
        Just(T_FLUSH),
        Just(T_GET_ID),
        any::<u32>()
    ];
    let sector = prop_oneof![0u64..20, Just(u64::MAX), any::<u64>()];
    (kind, sector).prop_map(|(k, s)| {
        let mut h = [0u8; HDR_LEN];
        h[..4].copy_from_slice(&k.to_le_bytes());
        h[8..].copy_from_slice(&s.to_le_bytes());
        h
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever the chain and header: no panic, no access outside the
    /// chain's buffers in their direction, a status byte exactly when the
    /// chain ends writable, successful transfers inside the disk, and the
    /// disk never grows.
    #[test]
    fn execute_never_escapes_the_chain_or_the_disk(
        chain in arb_chain(),
        header in arb_header(),
        sectors in 1u64..16,
        hole in arb_hole(),
    ) {
        let file = test_memfd(sectors * SECTOR);
        let image = vec![0x77u8; (sectors * SECTOR) as usize];
        file.write_all_at(&image, 0).unwrap();
        let disk = Disk::new(file.try_clone().unwrap()).unwrap();
        let mut bytes = vec![0xeeu8; FAKE_MEM as usize];
        if let Some(h) = chain.first().filter(|s| s.addr + 16 <= FAKE_MEM) {
            bytes[h.addr as usize..h.addr as usize + 16].copy_from_slice(&header);
        }
        let before = bytes.clone();
        let hole = hole.range(&chain);
        let mem = FakeMem { bytes: RefCell::new(bytes), chain: chain.clone(), violations: RefCell::default(), hole: hole.clone() };
        let o = execute(&chain, &mem, &disk, b"fuzz-serial-00000000");
        prop_assert!(mem.violations.borrow().is_empty(), "{:?}", mem.violations.borrow());
        // Nothing is ever written where there is no translation.
        let (hs, he) = (hole.start as usize, hole.end.min(FAKE_MEM) as usize);
        if hs < he {
            prop_assert_eq!(&mem.bytes.borrow()[hs..he], &before[hs..he]);
        }
        // A request that did not succeed (a fault included) left the disk as it was.
        let mut after = vec![0u8; image.len()];
        file.read_exact_at(&mut after, 0).unwrap();
        if o.status != S_OK {
            prop_assert!(after == image, "a failed request changed the disk");
        }
        if o.faulted {
            prop_assert_eq!((o.status, o.moved), (S_IOERR, 0));
        }
        let status_at = status_addr(&chain).filter(|a| *a < FAKE_MEM && !hole.contains(a));
        prop_assert_eq!(o.status_written, status_at.is_some());
        if let Some(a) = status_at {
            prop_assert_eq!(mem.bytes.borrow()[a as usize], o.status);
        }
        prop_assert!(o.status <= S_UNSUPP);
        prop_assert_eq!(file.metadata().unwrap().len(), sectors * SECTOR);
        if o.status == S_OK && matches!(o.kind, Some(T_IN | T_OUT)) {
            let h = Header::decode(&header);
            let end = h.sector.checked_mul(SECTOR).and_then(|x| x.checked_add(o.moved));
            prop_assert!(end.is_some_and(|e| e <= sectors * SECTOR));
        }
    }

    /// Layout invariants for any chain it accepts: 16 header bytes, data and
    /// status inside the chain, nothing readable after the first writable.
    #[test]
    fn layout_accepts_only_well_formed_chains(chain in proptest::collection::vec(arb_seg(), 0..8)) {
        if let Ok(l) = layout(&chain) {
            prop_assert_eq!(l.header.iter().map(|s| u64::from(s.len)).sum::<u64>(), HDR_LEN as u64);
            prop_assert!(l.header.iter().all(|s| !s.writable));
            let total: u64 = chain.iter().map(|s| u64::from(s.len)).sum();
            prop_assert_eq!(HDR_LEN as u64 + l.data_len() + 1, total);
            prop_assert_eq!(Some(l.status), status_addr(&chain));
        }
    }
}

// ---- end to end over a socketpair, through the IOTLB

const MEM_SIZE: u64 = 0x10_0000;
const UBASE: u64 = 0x7f00_0000_0000;
const IOVA_OFF: u64 = 0x4000_0000;
/// This guest page is mapped read-only for the device.
const RO_PAGE: u64 = 0x9000;
const RING: u64 = 0x1000;
const HDR: u64 = 0x8000;
const STATUS: u64 = 0x8800;
const DATA: u64 = 0xa000;

fn translate(iova: u64, _perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
    let gpa = iova.checked_sub(IOVA_OFF).filter(|g| *g < MEM_SIZE);
    let page = gpa.ok_or(MissError::Unmapped { iova })? & !0xfff;
    let perm = if page == RO_PAGE {
        IotlbPerm::ReadOnly
    } else {
        IotlbPerm::ReadWrite
    };
    Ok(IotlbMsg::update(
        IOVA_OFF + page,
        0x1000,
        UBASE + page,
        perm,
    ))
}

struct BlkRig {
    main: Arc<MainSocket>,
    be: BackendHandle,
    mem: File,
    disk: File,
    _req: BackendReqThread,
    kick: EventFd,
    call: EventFd,
    posted: u16,
}

fn blk_rig(sectors: u64) -> BlkRig {
    blk_rig_with(sectors, false)
}

/// With `miss_need_reply`, the back end learns at once that a miss is refused.
fn blk_rig_with(sectors: u64, miss_need_reply: bool) -> BlkRig {
    let path = std::env::temp_dir().join(format!(
        "iovmm-blk-unit-{}-{:?}.img",
        std::process::id(),
        std::thread::current().id()
    ));
    let disk = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    disk.set_len(sectors * SECTOR).unwrap();
    let config = BackendConfig {
        miss_timeout: Duration::from_millis(300),
        miss_need_reply,
        blk: Some(BlkConfig::new(&path)),
        ..Default::default()
    };
    let (a, b) = UnixStream::pair().unwrap();
    let be = TestBackend::serve_stream(b, config).unwrap();
    let _ = std::fs::remove_file(&path); // the back end holds it open
    let main = Arc::new(MainSocket::new(a, 1, Duration::from_secs(2)).unwrap());
    let mem = test_memfd(MEM_SIZE);
    let features = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | F_FLUSH;
    negotiate(&main, &mem, features);
    let chan = main.open_backend_channel().unwrap();
    let ch: Arc<dyn IotlbChannel> = main.clone();
    let handler = TranslatingHandler::new(translate, ch);
    let req = BackendReqServer::new(chan, Arc::new(handler))
        .spawn("blk-test-req")
        .unwrap();
    let (kick, call) = (
        EventFd::new(0).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    );
    start_queue(&main, &kick, &call);
    BlkRig {
        main,
        be,
        mem,
        disk,
        _req: req,
        kick,
        call,
        posted: 0,
    }
}

fn negotiate(main: &MainSocket, mem: &File, features: u64) {
    let fd = mem.as_raw_fd();
    main.with_frontend(|fe| {
        let offered = fe.get_features()?;
        assert_eq!(offered & (F_FLUSH | F_SEG_MAX | F_BLK_SIZE), BLK_FEATURES);
        fe.set_owner()?;
        let proto = fe.get_protocol_features()?;
        fe.set_protocol_features(proto)?;
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_features(features | VHOST_USER_F_PROTOCOL_FEATURES)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: UBASE,
            mmap_offset: 0,
            mmap_handle: fd,
        };
        fe.set_mem_table(&[region])
    })
    .unwrap();
}

fn start_queue(main: &MainSocket, kick: &EventFd, call: &EventFd) {
    main.with_frontend(|fe| {
        fe.set_vring_num(0, 8)?;
        let cfg = VringConfigData {
            queue_max_size: 8,
            queue_size: 8,
            flags: 0,
            desc_table_addr: IOVA_OFF + RING,
            used_ring_addr: IOVA_OFF + RING + 0x200,
            avail_ring_addr: IOVA_OFF + RING + 0x100,
            log_addr: None,
        };
        fe.set_vring_addr(0, &cfg)?;
        fe.set_vring_base(0, 0)?;
        fe.set_vring_call(0, call)?;
        fe.set_vring_kick(0, kick)?;
        fe.set_vring_enable(0, true)
    })
    .unwrap();
}

impl BlkRig {
    fn put(&self, gpa: u64, b: &[u8]) {
        self.mem.write_all_at(b, gpa).unwrap();
    }

    fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.mem.read_exact_at(&mut b, gpa).unwrap();
        b
    }

    fn used_idx(&self) -> u16 {
        let u = self.get(RING + 0x202, 2);
        u16::from_le_bytes([u[0], u[1]])
    }

    /// Waits on the call eventfd (signalled after every used update) until
    /// the used index reaches `want`, for at most 10 s.
    fn wait_used(&self, want: u16) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.used_idx() != want {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut p = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, ms) };
            let _ = self.call.read();
        }
        true
    }

    /// One request (header, data, status) at descriptors 0..3; waits for its
    /// used entry and returns (status byte, used length).
    fn request(&mut self, kind: u32, sector: u64, data: u64, len: u32, write: bool) -> (u8, u32) {
        let mut h = kind.to_le_bytes().to_vec();
        h.extend_from_slice(&[0; 4]);
        h.extend_from_slice(&sector.to_le_bytes());
        self.put(HDR, &h);
        self.put(STATUS, &[0xff]);
        let descs = [
            (HDR, 16, 1u16),
            (data, len, 1 | u16::from(write) << 1),
            (STATUS, 1, 2),
        ];
        for (i, (a, l, f)) in descs.iter().enumerate() {
            let mut d = (IOVA_OFF + a).to_le_bytes().to_vec();
            d.extend_from_slice(&l.to_le_bytes());
            d.extend_from_slice(&f.to_le_bytes());
            d.extend_from_slice(&(i as u16 + 1).to_le_bytes());
            self.put(RING + 16 * i as u64, &d);
        }
        self.put(
            RING + 0x100 + 4 + 2 * u64::from(self.posted % 8),
            &0u16.to_le_bytes(),
        );
        self.posted += 1;
        self.put(RING + 0x100 + 2, &self.posted.to_le_bytes());
        self.kick.write(1).unwrap();
        let want = self.posted;
        assert!(
            self.wait_used(want),
            "request {kind} at {sector} not completed"
        );
        let slot = RING + 0x204 + 8 * u64::from((want - 1) % 8);
        let e = self.get(slot, 8);
        let used = u32::from_le_bytes(e[4..].try_into().unwrap());
        (self.get(STATUS, 1)[0], used)
    }
}

#[test]
fn config_space_serves_capacity_seg_max_and_blk_size() {
    let r = blk_rig(64);
    let (_, cfg) = r
        .main
        .with_frontend(|fe| fe.get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60]))
        .unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(cfg[o..o + 4].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(cfg[..8].try_into().unwrap()), 64);
    assert_eq!((u32_at(12), u32_at(20)), (SEG_MAX, 512));
    // A window past the end is answered with size 0 (the protocol's failure).
    let past = r
        .main
        .with_frontend(|fe| fe.get_config(56, 8, VhostUserConfigFlags::empty(), &[0u8; 8]));
    assert!(past.is_err());
}

#[test]
fn write_flush_read_round_trip_through_the_iotlb() {
    let mut r = blk_rig(64);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    r.put(DATA, &pattern);
    assert_eq!(r.request(T_OUT, 10, DATA, 1024, false), (S_OK, 1));
    let mut on_disk = vec![0u8; 1024];
    r.disk.read_exact_at(&mut on_disk, 10 * SECTOR).unwrap();
    assert_eq!(on_disk, pattern);
    assert_eq!(r.request(T_FLUSH, 0, DATA, 0, true).0, S_OK);
    r.put(DATA, &[0u8; 1024]);
    assert_eq!(r.request(T_IN, 10, DATA, 1024, true), (S_OK, 1025));
    assert_eq!(r.get(DATA, 1024), pattern);
    assert_eq!(r.request(T_GET_ID, 0, DATA, 20, true), (S_OK, 21));
    assert_eq!(&r.get(DATA, 14), b"iovmm-test-blk");
    let c = r.be.blk_counters().unwrap();
    assert_eq!((c.writes, c.reads, c.flushes, c.get_ids), (1, 1, 1, 1));
    assert_eq!((c.bytes_written, c.bytes_read, c.ioerrs), (1024, 1024, 0));
    assert_eq!(r.be.counters().translation_failures, 0);
}

#[test]
fn out_of_range_sectors_and_unknown_types_get_a_status_not_a_panic() {
    let mut r = blk_rig(16);
    assert_eq!(r.request(T_IN, 15, DATA, 1024, true).0, S_IOERR);
    assert_eq!(
        r.request(T_OUT, u64::MAX / 256, DATA, 512, false).0,
        S_IOERR
    );
    assert_eq!(r.request(77, 0, DATA, 512, true).0, S_UNSUPP);
    // The queue keeps working afterwards.
    assert_eq!(r.request(T_IN, 15, DATA, 512, true).0, S_OK);
    let c = r.be.blk_counters().unwrap();
    assert_eq!((c.ioerrs, c.unsupported, c.reads), (2, 1, 1));
    assert_eq!(r.disk.metadata().unwrap().len(), 16 * SECTOR);
}

#[test]
fn read_into_a_read_only_mapping_is_refused_and_memory_untouched() {
    let mut r = blk_rig(16);
    r.disk.write_all_at(&[0x5a; 512], 0).unwrap();
    r.put(RO_PAGE, &[0x11; 512]);
    // The front end answers the write miss with a read-only UPDATE (what the
    // guest mapped); the back end never writes through it.
    assert_eq!(r.request(T_IN, 0, RO_PAGE, 512, true), (S_IOERR, 1));
    assert_eq!(r.get(RO_PAGE, 512), vec![0x11; 512]);
    assert!(r.be.counters().translation_failures >= 1);
    // A write from the read-only page is fine.
    assert_eq!(r.request(T_OUT, 1, RO_PAGE, 512, false).0, S_OK);
    let mut b = [0u8; 512];
    r.disk.read_exact_at(&mut b, 512).unwrap();
    assert_eq!(b, [0x11; 512]);
}

/// A buffer at an IOVA the front end has no mapping for (its miss is
/// refused, as iovmm refuses one at an IOVA the guest unmapped): the request
/// completes with IOERR (the status byte translates), the disk never sees
/// the data, and the queue keeps serving.
#[test]
fn buffers_at_untranslatable_iovas_fail_with_ioerr_and_move_nothing() {
    let mut r = blk_rig_with(16, true);
    // translate() refuses everything past MEM_SIZE.
    let stale = MEM_SIZE + 0x3000;
    assert_eq!(r.request(T_OUT, 2, stale, 512, false), (S_IOERR, 1));
    assert_eq!(r.request(T_IN, 0, stale, 512, true), (S_IOERR, 1));
    let mut disk = vec![0u8; 16 * SECTOR as usize];
    r.disk.read_exact_at(&mut disk, 0).unwrap();
    assert!(
        disk.iter().all(|b| *b == 0),
        "a faulted write reached the disk"
    );
    let c = r.be.blk_counters().unwrap();
    assert_eq!((c.faulted, c.ioerrs, c.writes, c.reads), (2, 2, 0, 0));
    assert_eq!((c.bytes_written, c.status_lost), (0, 0));
    let b = r.be.counters();
    assert_eq!((b.translation_failures, b.miss_nacks), (2, 2));
    // Not hung: a request with mapped buffers still works.
    r.put(DATA, &[0x42; 512]);
    assert_eq!(r.request(T_OUT, 2, DATA, 512, false), (S_OK, 1));
    r.disk.read_exact_at(&mut disk[..512], 2 * SECTOR).unwrap();
    assert_eq!(&disk[..512], &[0x42; 512][..]);
    assert_eq!(r.be.blk_counters().unwrap().faulted, 2);
}
