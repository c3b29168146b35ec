//! Concurrent misses from several queues are never answered out of order with an INVALIDATE
//! for the same range (issue 16 item 4), over the real sockets and without KVM.
//!
//! The IOTLB bridge (`IotlbBridge`) sends UPDATEs and INVALIDATEs through a real `MainSocket`
//! and serves misses from a real `BackendReqServer` thread. A fake multiqueue back end:
//! * one thread per queue sends MISSes (NEED_REPLY) for the IOVA ranges the guest has mapped,
//!   all on the one back-end request channel, several in flight at once;
//! * one thread reads the main socket and applies every UPDATE and INVALIDATE to an IOTLB model
//!   in the order they arrive, then acks.
//!
//! A guest with two queue pairs on two vCPUs behind one vIOMMU is two mapper threads, each
//! cycling its own ranges: map the range to a GPA no earlier generation used, wait, unmap it in
//! the vIOMMU (a `MapViommu` behind the `Viommu` seam) and notify the bridge. Even generations
//! are unmapped the moment a miss translated them (the seam tells), which aims every such cycle
//! at the classic race: translate, unmap + INVALIDATE, stale UPDATE. Odd ones are unmapped once
//! the back end holds a translation, with other queues' misses still in flight.
//!
//! The security invariant is checked at both ends:
//! * whenever an UPDATE arrives, it must carry the GPA of the range's current generation, which
//!   stays current from just before its map until its unmap's notification returned: an UPDATE
//!   computed before an unmap and delivered after that unmap's INVALIDATE carries the GPA of a
//!   finished generation;
//! * the moment an unmap's notification returned, the back end holds nothing in the range; and
//!   just before every unmap, everything it holds there translates like the vIOMMU does.
//!
//! Every wait is on a condition (no sleep orders anything); the run ends after a fixed number
//! of cycles. Misses that lose the race are refused, and the back-end request server refuses
//! everything for the rest of a second once it refused 256 in it, so the run's length is mostly
//! bound by that budget (6000 cycles took 11-19 s on a loaded 2-core machine). With the bridge
//! lock released between translating a miss and sending its UPDATE, the first stale UPDATE
//! showed up within the first 1-45 cycles in each of 30 runs.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::vhost_user::backend_req::BackendReqServer;
use devices::vhost_user::channel::MainSocket;
use devices::vhost_user::wire::{
    decode_ack, encode_ack, encode_iotlb_frame, Header, IotlbMsg, IotlbPerm, IotlbType,
    HEADER_SIZE, VHOST_USER_BACKEND_IOTLB_MSG, VHOST_USER_IOTLB_MSG,
};
use devices::vhost_user::{IotlbBridge, IotlbPolicy};
use devices::viommu::testing::MapViommu;
use devices::viommu::{ConsumerRegistration, Viommu, ViommuError};
use devices::virtio::GuestMemoryMmap;
use iommu::{
    Access, DmaTranslate, IommuEvent, IommuNotifier, Iova, IovaRange, NotifierHandle, Permissions,
    RequesterId, TranslateError, Translation,
};
use vm_memory::{GuestAddress, GuestMemoryBackend};

const RID: RequesterId = RequesterId::from_bdf(0, 0x18);
const PAGE: u64 = 0x1000;
/// IOVA ranges the guest maps and unmaps over and over.
const RANGES: usize = 4;
/// Each range is this long (four pages, so misses in one range start at different pages).
const RANGE_LEN: u64 = 4 * PAGE;
/// Range `r` starts at `IOVA_BASE + r * IOVA_STRIDE`.
const IOVA_BASE: u64 = 0x1000_0000;
const IOVA_STRIDE: u64 = 0x10_0000;
/// Map/unmap cycles of every range.
const GENERATIONS: usize = 1500;
/// Mapper threads (vCPUs), each owning every `MAPPERS`-th range.
const MAPPERS: usize = 2;
/// Queue workers of the back end.
const WORKERS: usize = 4;
/// Guest RAM: every (range, generation) gets a GPA of its own (never touched, so never faulted in).
const MEM: usize = GENERATIONS * RANGES * RANGE_LEN as usize;
/// Longest pause of a queue worker after a refused miss.
const BACKOFF: Duration = Duration::from_millis(1);
/// The main socket's bound on every ack wait.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

fn range_start(r: usize) -> u64 {
    IOVA_BASE + r as u64 * IOVA_STRIDE
}

fn range(r: usize) -> IovaRange {
    IovaRange::from_start_len(range_start(r), RANGE_LEN).unwrap()
}

/// The range holding `iova`, if any.
fn range_of(iova: u64) -> Option<usize> {
    let r = usize::try_from(iova.checked_sub(IOVA_BASE)? / IOVA_STRIDE).ok()?;
    (r < RANGES && iova - range_start(r) < RANGE_LEN).then_some(r)
}

/// The GPA generation `g` of range `r` maps to: unique to the pair.
fn gpa_of(r: usize, g: usize) -> u64 {
    (g * RANGES + r) as u64 * RANGE_LEN
}

/// One translation the back end holds: `[iova, last]` -> `gpa + (x - iova)`.
#[derive(Debug, Clone, Copy)]
struct Entry {
    iova: u64,
    last: u64,
    gpa: u64,
}

/// What the back end and the guest share for the checks, under one mutex.
#[derive(Default)]
struct Model {
    /// The back end's IOTLB, changed in the order messages arrive on its main socket.
    iotlb: Vec<Entry>,
    /// Per range: the GPA of the generation the back end may hold (set just before the map,
    /// cleared once the unmap's notification returned).
    current: Vec<Option<u64>>,
    /// Per range: a miss translated the current generation (`Seam`).
    translated: Vec<bool>,
    /// Per range: the guest has it mapped, so queue workers may miss there.
    open: Vec<bool>,
    /// The first violations seen (kept short), with the mapper cycle they were seen in.
    violations: Vec<String>,
    /// Map/unmap cycles completed by all mappers.
    cycles: usize,
    /// The cycle during which the first violation was seen.
    first_violation_cycle: Option<usize>,
    updates: u64,
    invalidates: u64,
    /// Bumped at every IOTLB message and every range the guest opens.
    epoch: u64,
    /// The mappers are finished (or a violation stopped them): workers stop.
    done: bool,
}

impl Model {
    fn violation(&mut self, what: String) {
        if self.first_violation_cycle.is_none() {
            self.first_violation_cycle = Some(self.cycles + 1);
        }
        if self.violations.len() < 8 {
            self.violations.push(what);
        }
        self.done = true;
    }

    /// Held entries overlapping range `r`.
    fn held_in(&self, r: usize) -> Vec<Entry> {
        let rg = range(r);
        self.iotlb
            .iter()
            .filter(|e| e.iova <= rg.end() && rg.start() <= e.last)
            .copied()
            .collect()
    }

    /// Whether `e` translates like generation `gpa` of range `r` does.
    fn matches(e: &Entry, r: usize, gpa: u64) -> bool {
        let rg = range(r);
        e.iova >= rg.start() && e.last <= rg.end() && e.gpa == gpa + (e.iova - rg.start())
    }
}

struct Shared {
    model: Mutex<Model>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap()
    }

    /// Waits until `ready` holds or the run is done; returns the guard and whether it is done.
    fn wait_for(&self, mut ready: impl FnMut(&Model) -> bool) -> (MutexGuard<'_, Model>, bool) {
        let guard = self
            .changed
            .wait_while(self.lock(), |m| !m.done && !ready(m))
            .unwrap();
        let done = guard.done;
        (guard, done)
    }
}

/// Reads one frame; `None` at a clean end of stream.
fn read_frame(s: &mut UnixStream) -> Option<(Header, Vec<u8>)> {
    let mut hdr = [0u8; HEADER_SIZE];
    match s.read_exact(&mut hdr) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return None,
        Err(e) => panic!("reading a frame: {e}"),
    }
    let hdr = Header::decode(&hdr).unwrap();
    let mut payload = vec![0u8; hdr.size as usize];
    s.read_exact(&mut payload).unwrap();
    Some((hdr, payload))
}

/// The back end's main-socket thread: apply, then ack, every IOTLB message in arrival order.
fn serve_main(mut sock: UnixStream, shared: &Shared, host_base: u64) {
    while let Some((hdr, payload)) = read_frame(&mut sock) {
        assert_eq!(
            hdr.request, VHOST_USER_IOTLB_MSG,
            "only IOTLB messages here"
        );
        let msg = IotlbMsg::decode(hdr.request, &payload).unwrap();
        apply(&mut shared.lock(), &msg, host_base);
        shared.changed.notify_all();
        if hdr.need_reply() {
            sock.write_all(&encode_ack(hdr.request, 0)).unwrap();
        }
    }
}

fn apply(m: &mut Model, msg: &IotlbMsg, host_base: u64) {
    m.epoch += 1;
    let last = msg.iova.saturating_add(msg.size.saturating_sub(1));
    match msg.kind() {
        Ok(IotlbType::Update) => {
            m.updates += 1;
            let e = Entry {
                iova: msg.iova,
                last,
                gpa: msg.uaddr.wrapping_sub(host_base),
            };
            let r = range_of(msg.iova);
            let now = r.and_then(|r| m.current[r]);
            match (r, now) {
                (Some(r), Some(gpa)) if Model::matches(&e, r, gpa) => {}
                _ => m.violation(format!(
                    "UPDATE {e:x?} arrived while the vIOMMU's current generation there is {now:x?}: \
                     a stale translation reached the back end after its INVALIDATE"
                )),
            }
            m.iotlb.push(e);
        }
        // Like DPDK and Linux vhost: every entry the range touches goes.
        Ok(IotlbType::Invalidate) => {
            m.invalidates += 1;
            m.iotlb.retain(|e| e.last < msg.iova || last < e.iova);
        }
        other => m.violation(format!("unexpected IOTLB message {other:?}: {msg:?}")),
    }
}

/// The back-end request channel shared by the queue workers: misses are written in ticket
/// order and acked in the same order, so several can be in flight at once.
struct ReqChannel {
    writer: Mutex<(UnixStream, u64)>,
    reader: Mutex<Acks>,
}

struct Acks {
    sock: UnixStream,
    /// Acks read so far (the tickets below this are answered).
    read: u64,
    /// Ack values read for tickets whose sender has not collected them yet.
    values: HashMap<u64, u64>,
    served: u64,
    refused: u64,
}

impl ReqChannel {
    /// Sends a MISS and returns once it is acked: whether it was served (ack 0).
    fn miss(&self, iova: u64, perm: IotlbPerm) -> bool {
        let frame = encode_iotlb_frame(
            VHOST_USER_BACKEND_IOTLB_MSG,
            &IotlbMsg::miss(iova, perm),
            true,
        );
        let ticket = {
            let mut w = self.writer.lock().unwrap();
            w.0.write_all(&frame).unwrap();
            w.1 += 1;
            w.1 - 1
        };
        let mut acks = self.reader.lock().unwrap();
        while acks.read <= ticket {
            let (hdr, payload) = read_frame(&mut acks.sock).expect("the miss is acked");
            let value = decode_ack(&hdr, &payload, VHOST_USER_BACKEND_IOTLB_MSG).unwrap();
            let read = acks.read;
            acks.values.insert(read, value);
            acks.read += 1;
        }
        let served = acks.values.remove(&ticket) == Some(0);
        if served {
            acks.served += 1;
        } else {
            acks.refused += 1;
        }
        served
    }
}

/// A small deterministic generator per worker.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A queue worker: miss somewhere in a range the guest has mapped, until the run is done.
fn queue_worker(id: usize, shared: &Shared, req: &ReqChannel) {
    const PERMS: [IotlbPerm; 3] = [
        IotlbPerm::ReadOnly,
        IotlbPerm::WriteOnly,
        IotlbPerm::ReadWrite,
    ];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1));
    loop {
        let pick = rng.next();
        let iova = {
            let (m, done) = shared.wait_for(|m| m.open.iter().any(|o| *o));
            if done {
                return;
            }
            let open: Vec<usize> = (0..RANGES).filter(|r| m.open[*r]).collect();
            let r = open[pick as usize % open.len()];
            range_start(r) + (pick >> 8) % RANGE_LEN
        };
        if !req.miss(iova, PERMS[(pick >> 40) as usize % PERMS.len()]) {
            back_off(shared);
        }
    }
}

/// After a refused miss, wait until the back end's IOTLB or the guest's mappings change, or at
/// most [`BACKOFF`], before missing again: a back-off that keeps a throttled channel (the server
/// refuses everything for the rest of a second once the back end sent
/// `MAX_BAD_REQUESTS_PER_SEC` refused misses) from being flooded. Nothing waits for it to expire.
fn back_off(shared: &Shared) {
    let m = shared.lock();
    let epoch = m.epoch;
    let _ = shared
        .changed
        .wait_timeout_while(m, BACKOFF, |m| !m.done && m.epoch == epoch)
        .unwrap();
}

/// One vCPU: cycles through its ranges, mapping each to a fresh GPA, waiting until the back end
/// holds a translation there, and unmapping it.
fn mapper(id: usize, shared: &Shared, viommu: &MapViommu, bridge: &IotlbBridge) {
    for g in 0..GENERATIONS {
        for r in (id..RANGES).step_by(MAPPERS) {
            if !map_and_unmap(r, g, shared, viommu, bridge) {
                return;
            }
        }
    }
}

/// One cycle of range `r`, generation `g`; false once the run is done (a violation).
fn map_and_unmap(
    r: usize,
    g: usize,
    shared: &Shared,
    viommu: &MapViommu,
    bridge: &IotlbBridge,
) -> bool {
    let gpa = gpa_of(r, g);
    {
        let mut m = shared.lock();
        m.current[r] = Some(gpa);
        m.translated[r] = false;
    }
    viommu.map(range_start(r), RANGE_LEN, gpa, Permissions::ReadWrite);
    {
        let mut m = shared.lock();
        m.open[r] = true;
        m.epoch += 1;
    }
    shared.changed.notify_all();
    {
        // Even generations are unmapped as soon as a miss translated them (its UPDATE may not
        // be sent yet: the classic race), odd ones once the back end holds one (while other
        // queues' misses are still in flight).
        let (mut m, done) = shared.wait_for(|m| match g % 2 {
            0 => m.translated[r],
            _ => !m.held_in(r).is_empty(),
        });
        if done {
            return false;
        }
        if let Some(e) = m.held_in(r).iter().find(|e| !Model::matches(e, r, gpa)) {
            let what = format!("range {r} generation {g} (GPA {gpa:#x}) is held as {e:x?}");
            m.violation(what);
            return false;
        }
        // Queue workers pick no new IOVA here; misses already chosen race with the unmap.
        m.open[r] = false;
    }
    viommu.unmap(range(r));
    let range = range(r);
    bridge
        .notify(&IommuEvent::Unmap { rid: RID, range })
        .unwrap();
    let mut m = shared.lock();
    m.current[r] = None;
    let held = m.held_in(r);
    if !held.is_empty() {
        let what = format!(
            "range {r} generation {g} (GPA {gpa:#x}): the unmap's notification returned while \
             the back end still holds {held:x?}"
        );
        m.violation(what);
        return false;
    }
    m.cycles += 1;
    true
}

/// The vIOMMU seam the bridge translates through: a [`MapViommu`] that also tells the guest
/// side when a miss translated a range (so a mapper can unmap it right then).
struct Seam {
    map: MapViommu,
    shared: Arc<Shared>,
}

impl DmaTranslate for Seam {
    fn translate(
        &self,
        rid: RequesterId,
        iova: Iova,
        len: u64,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        let t = self.map.translate(rid, iova, len, access)?;
        // Misses ask for an access; the bridge's re-checks ask for presence only.
        if let (false, Some(r)) = (access == Permissions::No, range_of(iova.0)) {
            self.shared.lock().translated[r] = true;
            self.shared.changed.notify_all();
        }
        Ok(t)
    }
}

impl Viommu for Seam {
    fn add_endpoint(&self, rid: RequesterId) -> Result<(), ViommuError> {
        self.map.add_endpoint(rid)
    }

    fn register_consumer(
        &self,
        rid: RequesterId,
        consumer: Arc<dyn IommuNotifier>,
        maps: bool,
    ) -> Result<ConsumerRegistration, ViommuError> {
        self.map.register_consumer(rid, consumer, maps)
    }

    fn unregister_consumer(&self, handle: NotifierHandle) {
        self.map.unregister_consumer(handle);
    }

    fn report_fault(&self, rid: RequesterId, iova: Iova, access: Access) {
        self.map.report_fault(rid, iova, access);
    }
}

/// The bridge between the vIOMMU and the back end's two sockets, as a device behind a vIOMMU
/// has it once ACCESS_PLATFORM is negotiated.
struct Rig {
    bridge: Arc<IotlbBridge>,
    viommu: Arc<Seam>,
    shared: Arc<Shared>,
    main_peer: UnixStream,
    req_peer: UnixStream,
    server: devices::vhost_user::backend_req::BackendReqThread,
    host_base: u64,
}

fn rig() -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let host_base = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let (main_ours, main_peer) = UnixStream::pair().unwrap();
    let main = Arc::new(MainSocket::new(main_ours, 2 * RANGES as u64, ACK_TIMEOUT).unwrap());
    let bridge = Arc::new(IotlbBridge::new(main, IotlbPolicy::MissDriven));
    let shared = Arc::new(Shared {
        model: Mutex::new(Model {
            current: vec![None; RANGES],
            open: vec![false; RANGES],
            translated: vec![false; RANGES],
            ..Model::default()
        }),
        changed: Condvar::new(),
    });
    let viommu = Arc::new(Seam {
        map: MapViommu::default(),
        shared: shared.clone(),
    });
    bridge.set_translation(viommu.clone(), RID);
    // `start` sends the connection's full-range INVALIDATE and waits for its ack.
    let mut first = main_peer.try_clone().unwrap();
    let acker = std::thread::spawn(move || {
        let (hdr, payload) = read_frame(&mut first).unwrap();
        let msg = IotlbMsg::decode(hdr.request, &payload).unwrap();
        assert_eq!(msg, IotlbMsg::invalidate(0, u64::MAX));
        first.write_all(&encode_ack(hdr.request, 0)).unwrap();
    });
    bridge.start(mem).unwrap();
    acker.join().unwrap();
    let (req_ours, req_peer) = UnixStream::pair().unwrap();
    let server = BackendReqServer::new(req_ours, bridge.clone())
        .spawn("miss-ordering-req")
        .unwrap();
    Rig {
        bridge,
        viommu,
        shared,
        main_peer,
        req_peer,
        server,
        host_base,
    }
}

/// What one run saw.
struct Outcome {
    model: Model,
    served: u64,
    refused: u64,
    elapsed: Duration,
}

fn run() -> (Outcome, devices::vhost_user::stats::BridgeStats) {
    let rig = rig();
    let shared = &*rig.shared;
    let req = ReqChannel {
        writer: Mutex::new((rig.req_peer.try_clone().unwrap(), 0)),
        reader: Mutex::new(Acks {
            sock: rig.req_peer.try_clone().unwrap(),
            read: 0,
            values: HashMap::new(),
            served: 0,
            refused: 0,
        }),
    };
    let start = Instant::now();
    let main_peer = rig.main_peer.try_clone().unwrap();
    let (req_ref, rig_ref) = (&req, &rig);
    std::thread::scope(|s| {
        let backend = s.spawn(|| serve_main(main_peer, shared, rig.host_base));
        let workers: Vec<_> = (0..WORKERS)
            .map(|id| s.spawn(move || queue_worker(id, shared, req_ref)))
            .collect();
        let mappers: Vec<_> = (0..MAPPERS)
            .map(|id| s.spawn(move || mapper(id, shared, &rig_ref.viommu.map, &rig_ref.bridge)))
            .collect();
        for m in mappers {
            m.join().unwrap();
        }
        shared.lock().done = true;
        shared.changed.notify_all();
        for w in workers {
            w.join().unwrap();
        }
        // Every miss is acked: nothing more can reach the main socket.
        rig.main_peer.shutdown(std::net::Shutdown::Both).unwrap();
        backend.join().unwrap();
    });
    let elapsed = start.elapsed();
    let stats = rig.bridge.stats();
    rig.server.stop();
    // The bridge and the rig hold the seam, which holds `shared`.
    drop((rig.bridge, rig.viommu));
    let shared = Arc::into_inner(rig.shared).expect("no thread holds the model any more");
    let acks = req.reader.into_inner().unwrap();
    let outcome = Outcome {
        model: shared.model.into_inner().unwrap(),
        served: acks.served,
        refused: acks.refused,
        elapsed,
    };
    (outcome, stats)
}

#[test]
fn concurrent_misses_are_never_answered_after_the_invalidate_of_their_range() {
    let (o, stats) = run();
    let m = &o.model;
    println!(
        "{} map/unmap cycles in {:?}; misses served {} refused {} (bridge: {} misses, {} refused, \
         {} throttled); {} UPDATEs, {} INVALIDATEs at the back end",
        m.cycles,
        o.elapsed,
        o.served,
        o.refused,
        stats.misses,
        stats.misses_refused,
        stats.throttled_requests,
        m.updates,
        m.invalidates
    );
    assert!(
        m.violations.is_empty(),
        "after {} completed cycles (first seen in cycle {:?}): {:#?}",
        m.cycles,
        m.first_violation_cycle,
        m.violations
    );
    assert_eq!(m.cycles, GENERATIONS * RANGES);
    // Every cycle installed a translation and took it away again, and nothing is left.
    assert!(m.iotlb.is_empty(), "left over: {:x?}", m.iotlb);
    assert_eq!(
        o.served + o.refused,
        stats.misses + stats.throttled_requests
    );
    assert!(o.served >= m.cycles as u64);
    assert!(
        m.invalidates >= m.cycles as u64,
        "{} INVALIDATEs",
        m.invalidates
    );
}
