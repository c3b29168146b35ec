//! The request queue worker: one thread (`iovmm_viommu`) per activated device.
//!
//! For every chain: split it by direction (bounded), make sure the reply will fit into guest
//! memory, execute the request on the model and deliver its events under the update lock, and
//! only then write the reply, return the buffer and raise the queue interrupt.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use iommu::error::chain as causes;
use iommu::ratelimit::RateLimit;
use iommu::sync::lock;
use iommu::types::IovaRange;
use iommu::virtio::protocol::{S_DEVERR, VIRTIO_IOMMU_T_MAP, VIRTIO_IOMMU_T_UNMAP};
use iommu::virtio::{handle, Request, Response};
use iommu::warn_limited;
use iommu::IommuEvent;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{self, ChainError, ChainParts};
use super::{IommuState, Update};

/// The rate limit of every log line the guest (or a back end behind a consumer) can cause in
/// the virtio-iommu device.
pub(super) static GUEST_LOG: std::sync::Mutex<RateLimit> =
    std::sync::Mutex::new(RateLimit::per_second(10));
use crate::thread::{ThreadHook, ThreadKind};
use crate::virtio::{GuestMemoryMmap, VirtioInterrupt, VirtioInterruptType};

/// Largest device-readable part accepted in a request chain. The largest request (PROBE) has
/// 72 readable bytes; longer chains are returned unwritten.
pub const MAX_READABLE: usize = 64 * 1024;
/// Index of the request queue.
pub const REQUESTQ_INDEX: u16 = 0;
/// Name of the worker threads.
pub const WORKER_NAME: &str = "iovmm_viommu";

const TOKEN_KICK: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TAIL_LEN: usize = 4;
/// Most UNMAP requests executed and invalidated as one batch.
pub const MAX_UNMAP_BATCH: usize = 256;

/// Everything the worker owns.
pub(crate) struct RequestQueue {
    pub(crate) state: Arc<IommuState>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queue: Queue,
    pub(crate) kick: EventFd,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) acked: u64,
}

/// A running worker; [`RequestWorker::stop`] (or drop) stops and joins it.
pub(crate) struct RequestWorker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl RequestWorker {
    /// Starts the worker thread for `rq`; the thread runs `hook` first.
    pub(crate) fn spawn(rq: RequestQueue, hook: Option<ThreadHook>) -> io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        add(&epoll, rq.kick.as_raw_fd(), TOKEN_KICK)?;
        add(&epoll, stop.as_raw_fd(), TOKEN_STOP)?;
        let thread = std::thread::Builder::new()
            .name(WORKER_NAME.into())
            .spawn(move || {
                if crate::thread::enter(hook.as_ref(), ThreadKind::VirtioIommu) {
                    rq.run(&epoll)
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the worker to stop and waits for it. A request in progress completes first.
    pub(crate) fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(e) = self.stop.write(1) {
            log::error!("virtio-iommu: cannot signal the worker to stop: {e}; waiting anyway");
        }
        if thread.join().is_err() {
            log::error!("virtio-iommu: request worker panicked");
        }
    }
}

impl Drop for RequestWorker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn add(epoll: &Epoll, fd: i32, token: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

impl RequestQueue {
    fn run(mut self, epoll: &Epoll) {
        // Requests queued before activation (kicks are dropped by the transport's reset).
        self.process_queue();
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-iommu: worker epoll failed: {e}; requests stop");
                    return;
                }
            };
            let mut kicked = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return,
                    _ => kicked = true,
                }
            }
            if kicked {
                // EAGAIN only means another wakeup already drained the counter.
                let _ = self.kick.read();
                self.process_queue();
            }
        }
    }

    /// Serves every available chain. Consecutive UNMAP requests are executed
    /// together and their invalidations delivered as one merged batch (a lazy
    /// guest flushes many at once), before any of them completes.
    fn process_queue(&mut self) {
        let mut unmaps: Vec<(u16, ChainParts)> = Vec::new();
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let parts = chain::split(&self.mem, chain, MAX_READABLE);
            match parts {
                Ok(p) if is_unmap(&p) && unmaps.len() < MAX_UNMAP_BATCH => {
                    unmaps.push((head, p));
                }
                other => {
                    self.run_unmap_batch(&mut unmaps);
                    let used = self.process_parts(other);
                    self.complete(head, used);
                }
            }
        }
        self.run_unmap_batch(&mut unmaps);
    }

    fn complete(&mut self, head: u16, used: u32) {
        if let Err(e) = self.queue.add_used(&self.mem, head, used) {
            warn_limited!(
                lock(&GUEST_LOG),
                "virtio-iommu: cannot return request buffer {head}: {}",
                causes(&e)
            );
            return;
        }
        self.signal();
    }

    /// Executes a batch of UNMAPs under one update, delivers their merged
    /// events once, then writes every reply and completes every chain.
    fn run_unmap_batch(&mut self, batch: &mut Vec<(u16, ChainParts)>) {
        if batch.is_empty() {
            return;
        }
        let stats = &self.state.stats;
        let reply_max = self.max_reply_len();
        let mut done: Vec<(u16, Option<(ChainParts, Response)>)> = Vec::new();
        let update = self.state.begin_update();
        let mut events = Vec::new();
        for (head, parts) in batch.drain(..) {
            stats.count_request(parts.readable.first().copied().unwrap_or(0));
            let fits = reply_max.min(parts.writable_len);
            if let Err(e) = chain::check_writable(&self.mem, &parts.writable, fits) {
                done.push((head, None));
                self.unwritten(&e);
                continue;
            }
            let (r, ev) = update.apply(|domains| {
                let mut r = handle(
                    domains,
                    &self.state.settings,
                    self.acked,
                    &parts.readable,
                    parts.writable_len,
                );
                let ev = std::mem::take(&mut r.events);
                (r, ev)
            });
            events.extend(ev);
            done.push((head, Some((parts, r))));
        }
        let failed = update.deliver(&merge_unmaps(events)).err();
        drop(update);
        if let Some(e) = &failed {
            warn_limited!(
                lock(&GUEST_LOG),
                "virtio-iommu: UNMAP batch failed at a translation consumer: {}",
                causes(&e)
            );
            stats.count_notifier_failure();
        }
        for (head, item) in done {
            let used = match item {
                None => 0,
                Some((parts, mut r)) => {
                    if failed.is_some() {
                        set_status(&mut r, S_DEVERR);
                    }
                    self.write_reply(&parts, &r)
                }
            };
            self.complete(head, used);
        }
    }

    fn write_reply(&self, parts: &ChainParts, response: &Response) -> u32 {
        if let Err(e) = chain::write(&self.mem, &parts.writable, &response.reply) {
            return self.unwritten(&e);
        }
        self.state.stats.count_status(response.status);
        u32::try_from(response.reply.len()).unwrap_or(0)
    }

    fn signal(&mut self) {
        if !chain::needs_interrupt(&mut self.queue, &self.mem) {
            return;
        }
        if let Err(e) = self
            .interrupt
            .trigger(VirtioInterruptType::Queue(REQUESTQ_INDEX))
        {
            warn_limited!(
                lock(&GUEST_LOG),
                "virtio-iommu: cannot signal the request queue: {}",
                causes(&e)
            );
        }
    }

    /// Serves one split chain; returns the used length (0 = returned unwritten).
    fn process_parts(&self, parts: Result<ChainParts, ChainError>) -> u32 {
        let stats = &self.state.stats;
        let parts = match parts {
            Ok(parts) => parts,
            Err(e) => return self.unwritten(&e),
        };
        stats.count_request(parts.readable.first().copied().unwrap_or(0));
        let reply_max = self.max_reply_len().min(parts.writable_len);
        if let Err(e) = chain::check_writable(&self.mem, &parts.writable, reply_max) {
            return self.unwritten(&e);
        }
        let response = self.execute(&parts.readable, parts.writable_len);
        self.write_reply(&parts, &response)
    }

    fn unwritten(&self, e: &ChainError) -> u32 {
        log::debug!("virtio-iommu: returning request unwritten: {}", causes(e));
        self.state.stats.count_status(None);
        0
    }

    /// The longest reply the model can produce: PROBE properties plus the tail.
    fn max_reply_len(&self) -> usize {
        let probe = usize::try_from(self.state.settings.probe_size).unwrap_or(usize::MAX);
        probe.saturating_add(TAIL_LEN)
    }

    /// Executes the request and delivers its events; a failed delivery turns the status into
    /// `S_DEVERR` (and undoes a MAP).
    fn execute(&self, readable: &[u8], writable_len: usize) -> Response {
        let state = &self.state;
        let update = state.begin_update();
        let (mut response, events) = update.apply(|domains| {
            let mut r = handle(domains, &state.settings, self.acked, readable, writable_len);
            let events = std::mem::take(&mut r.events);
            (r, events)
        });
        if let Err(e) = update.deliver(&events) {
            warn_limited!(
                lock(&GUEST_LOG),
                "virtio-iommu: request failed at a translation consumer: {}",
                causes(&e)
            );
            state.stats.count_notifier_failure();
            if readable.first() == Some(&VIRTIO_IOMMU_T_MAP) {
                undo_map(&update, readable);
            }
            set_status(&mut response, S_DEVERR);
        }
        response
    }
}

fn is_unmap(parts: &ChainParts) -> bool {
    parts.readable.first() == Some(&VIRTIO_IOMMU_T_UNMAP)
}

/// Merges unmap events of the same requester whose ranges overlap or touch,
/// keeping every other event (and the order of first appearance).
fn merge_unmaps(events: Vec<IommuEvent>) -> Vec<IommuEvent> {
    let mut out: Vec<IommuEvent> = Vec::with_capacity(events.len());
    for ev in events {
        if let IommuEvent::Unmap { rid, range } = ev {
            let hit = out.iter_mut().rev().find_map(|o| match o {
                IommuEvent::Unmap { rid: r, range: g } if *r == rid && touches(*g, range) => {
                    Some(g)
                }
                _ => None,
            });
            if let Some(g) = hit {
                let lo = g.start().min(range.start());
                let hi = g.end().max(range.end());
                if let Ok(m) = IovaRange::new(lo, hi) {
                    *g = m;
                    continue;
                }
            }
        }
        out.push(ev);
    }
    out
}

fn touches(a: IovaRange, b: IovaRange) -> bool {
    a.start() <= b.end().saturating_add(1) && b.start() <= a.end().saturating_add(1)
}

/// Removes the mapping a MAP just added (its consumers failed), so the model matches what
/// the guest sees: a failed MAP.
fn undo_map(update: &Update<'_>, readable: &[u8]) {
    let Ok(Request::Map {
        domain,
        virt_start,
        virt_end,
        ..
    }) = Request::parse(readable)
    else {
        return;
    };
    let Ok(range) = IovaRange::new(virt_start, virt_end) else {
        return;
    };
    let (result, unmap_events) = update.apply(|d| match d.unmap(domain, range) {
        Ok(ev) => (Ok(()), ev),
        Err(e) => (Err(e), Vec::new()),
    });
    if let Err(e) = result {
        log::error!("virtio-iommu: cannot undo failed MAP {range} in {domain}: {e}");
    }
    if let Err(e) = update.deliver(&unmap_events) {
        warn_limited!(
            lock(&GUEST_LOG),
            "virtio-iommu: undoing MAP {range}: consumers failed again: {}",
            causes(&e)
        );
    }
}

fn set_status(response: &mut Response, status: u8) {
    let len = response.reply.len();
    if len >= TAIL_LEN {
        response.reply[len - TAIL_LEN] = status;
        response.status = Some(status);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use iommu::notifier::{IommuEvent, IommuNotifier, NotifierFlags, NotifyError};
    use iommu::translate::{DmaTranslate, TranslateError};
    use iommu::types::{Access, Iova};
    use iommu::virtio::protocol::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap as Mmap};

    use super::super::test_utils::*;
    use super::*;

    const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;

    /// A consumer that waits, then records each event with the used index it saw.
    struct Slow {
        mem: Mmap<()>,
        used: u64,
        delay: Duration,
        fail: bool,
        seen: Mutex<Vec<(IommuEvent, u16)>>,
    }

    impl IommuNotifier for Slow {
        fn notify(&self, ev: &IommuEvent) -> Result<(), NotifyError> {
            std::thread::sleep(self.delay);
            let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            self.seen.lock().unwrap().push((ev.clone(), idx));
            if self.fail {
                Err(NotifyError::Disconnected)
            } else {
                Ok(())
            }
        }
    }

    fn consumer(d: &Driver, delay_ms: u64, fail: bool) -> Arc<Slow> {
        Arc::new(Slow {
            mem: d.mem.clone(),
            used: d.req.used,
            delay: Duration::from_millis(delay_ms),
            fail,
            seen: Mutex::new(Vec::new()),
        })
    }

    fn translate(state: &IommuState, iova: u64) -> Result<u64, TranslateError> {
        state
            .translate(EP, Iova(iova), 4, Access::Read)
            .map(|t| t.fragments[0].0 .0)
    }

    #[test]
    fn attach_map_unmap_detach_round_trip_with_exact_statuses() {
        let state = state();
        let mut d = Driver::new(state.clone(), ALL_FEATURES);
        let ep = EP.endpoint_id();
        assert_eq!(d.status(&attach(1, ep, 0)), S_OK);
        assert_eq!(d.status(&attach(1, 0x10, 0)), S_NOENT);
        assert_eq!(d.status(&attach(1, ep, 2)), S_INVAL);
        assert_eq!(d.status(&map(1, 0x10000, 0x1ffff, 0x20_0000, RW)), S_OK);
        assert_eq!(translate(&state, 0x10010), Ok(0x20_0010));
        assert_eq!(d.status(&map(1, 0x18000, 0x18fff, 0, RW)), S_INVAL);
        assert_eq!(d.status(&map(1, 0x30800, 0x30fff, 0, RW)), S_RANGE);
        assert_eq!(d.status(&map(2, 0x30000, 0x30fff, 0, RW)), S_NOENT);
        assert_eq!(d.status(&unmap(1, 0x10000, 0x10fff)), S_RANGE);
        assert_eq!(translate(&state, 0x10010), Ok(0x20_0010));
        assert_eq!(d.status(&unmap(1, 0x10000, 0x1ffff)), S_OK);
        assert!(matches!(
            translate(&state, 0x10010),
            Err(TranslateError::Unmapped { .. })
        ));
        assert_eq!(d.status(&unmap(1, 0, 0xfff)), S_OK);
        assert_eq!(d.status(&detach(1, ep)), S_OK);
        assert_eq!(d.status(&detach(1, 0x10)), S_NOENT);
        assert!(matches!(
            translate(&state, 0x10010),
            Err(TranslateError::NotAttached { .. })
        ));
        let stats = state.stats();
        assert_eq!(
            (1..=5).map(|t| stats.requests(t)).collect::<Vec<_>>(),
            vec![3, 2, 4, 3, 0]
        );
        assert_eq!(stats.statuses(S_OK), 5);
        assert_eq!(stats.statuses(S_RANGE), 2);
        assert!(d.interrupt.triggers.lock().unwrap().len() >= 12);
    }

    #[test]
    fn no_interrupt_flag_suppresses_request_interrupts() {
        let mut d = Driver::new(state(), ALL_FEATURES);
        d.req.set_avail_flags(&d.mem, 1);
        assert_eq!(d.status(&attach(1, EP.endpoint_id(), 0)), S_OK);
        assert!(d.interrupt.triggers.lock().unwrap().is_empty());
        d.req.set_avail_flags(&d.mem, 0);
        assert_eq!(d.status(&attach(1, EP.endpoint_id(), 0)), S_OK);
        assert_eq!(
            *d.interrupt.triggers.lock().unwrap(),
            vec![VirtioInterruptType::Queue(0)]
        );
    }

    #[test]
    fn probe_reports_the_msi_window_and_zero_fills() {
        let mut d = Driver::new(state(), ALL_FEATURES);
        let (used, out) = d.request(&probe(EP.endpoint_id()), 512 + 4 + 8);
        assert_eq!(used, 516);
        let mut prop = vec![1, 0, 20, 0, VIRTIO_IOMMU_RESV_MEM_T_MSI, 0, 0, 0];
        prop.extend_from_slice(&0xfee0_0000u64.to_le_bytes());
        prop.extend_from_slice(&0xfeef_ffffu64.to_le_bytes());
        assert_eq!(&out[..24], &prop[..]);
        assert!(out[24..512].iter().all(|&b| b == 0));
        assert_eq!(&out[512..516], &[S_OK, 0, 0, 0]);
        assert_eq!(
            &out[516..],
            &[0xAA; 8],
            "bytes past the reply stay untouched"
        );
        let (used, out) = d.request(&probe(0x10), 516);
        assert_eq!((used, out[512]), (516, S_NOENT));
        let (used, out) = d.request(&probe(EP.endpoint_id()), 100);
        assert_eq!((used, out[96]), (100, S_INVAL));
    }

    #[test]
    fn requests_needing_unacked_features_are_refused() {
        let missing = 1 << VIRTIO_IOMMU_F_MAP_UNMAP | 1 << VIRTIO_IOMMU_F_BYPASS_CONFIG;
        let mut d = Driver::new(state(), ALL_FEATURES & !missing);
        assert_eq!(d.status(&attach(1, EP.endpoint_id(), 0)), S_OK);
        assert_eq!(d.status(&map(1, 0, 0xfff, 0, RW)), S_UNSUPP);
        assert_eq!(d.status(&attach(2, EP.endpoint_id(), 1)), S_INVAL);
    }

    #[test]
    fn malformed_chains_are_returned_unwritten_without_side_effects() {
        let state = state();
        let mut d = Driver::new(state.clone(), ALL_FEATURES);
        let req = attach(1, EP.endpoint_id(), 0);
        let r = d.alloc(64 * 1024);
        d.mem.write_slice(&req, GuestAddress(r)).unwrap();
        let w = d.alloc(4);
        let cases: Vec<Vec<(u64, u32, bool)>> = vec![
            vec![(r, 3, false), (w, 4, true)],
            vec![(r, 20, false), (w, 3, true)],
            vec![(r, 20, false)],
            vec![(w, 4, true), (r, 20, false)],
            vec![(r, 64 * 1024, false), (r, 1, false), (w, 4, true)],
            vec![(MEM_SIZE - 8, 20, false), (w, 4, true)],
            vec![(r, 20, false), (MEM_SIZE - 2, 4, true)],
        ];
        for bufs in &cases {
            assert_eq!(d.raw(bufs), 0, "chain {bufs:x?} must be returned unwritten");
        }
        assert_eq!(d.mem.read_obj::<u32>(GuestAddress(w)).unwrap(), 0xAAAA_AAAA);
        assert_eq!(state.with_domains(|m| m.endpoint_domain(EP)), None);
        let (used, _) = d.request(&[9, 0, 0, 0, 0, 0, 0, 0], 4);
        assert_eq!(used, 0, "unknown request type");
        assert_eq!(state.stats().unwritten(), cases.len() as u64 + 1);
        assert_eq!(d.status(&req), S_OK, "device still serves requests");
    }

    #[test]
    fn unmaps_posted_together_are_invalidated_as_one_merged_range() {
        let state = state();
        let mut d = Driver::new(state.clone(), ALL_FEATURES);
        assert_eq!(d.status(&attach(1, EP.endpoint_id(), 0)), S_OK);
        assert_eq!(d.status(&map(1, 0x10000, 0x10fff, 0x20_0000, RW)), S_OK);
        assert_eq!(d.status(&map(1, 0x11000, 0x11fff, 0x30_0000, RW)), S_OK);
        assert_eq!(d.status(&map(1, 0x40000, 0x40fff, 0x40_0000, RW)), S_OK);
        let slow = consumer(&d, 50, false);
        state
            .register_notifier(EP, NotifierFlags::UNMAP, slow.clone())
            .unwrap();
        let before = d.req.used_idx(&d.mem);
        // A lazy guest's flush: three UNMAPs published before one kick.
        let mut tails = Vec::new();
        for (lo, hi) in [(0x10000, 0x10fff), (0x11000, 0x11fff), (0x40000, 0x40fff)] {
            let req = unmap(1, lo, hi);
            let r = d.alloc(req.len() as u32);
            d.mem.write_slice(&req, GuestAddress(r)).unwrap();
            let w = d.alloc(4);
            d.req
                .push(&d.mem, &[(r, req.len() as u32, false), (w, 4, true)]);
            tails.push(w);
        }
        d.kick.write(1).unwrap();
        for _ in 0..3 {
            d.wait_used();
        }
        for w in tails {
            assert_eq!(d.mem.read_obj::<u8>(GuestAddress(w)).unwrap(), S_OK);
        }
        let seen = slow.seen.lock().unwrap().clone();
        let merged = IovaRange::new(0x10000, 0x11fff).unwrap();
        let apart = IovaRange::new(0x40000, 0x40fff).unwrap();
        // Two invalidations (adjacent ranges merged), both before any completion.
        assert_eq!(
            seen,
            vec![
                (
                    IommuEvent::Unmap {
                        rid: EP,
                        range: merged
                    },
                    before
                ),
                (
                    IommuEvent::Unmap {
                        rid: EP,
                        range: apart
                    },
                    before
                )
            ]
        );
    }

    #[test]
    fn unmap_completes_only_after_a_slow_consumer_returned() {
        let state = state();
        let mut d = Driver::new(state.clone(), ALL_FEATURES);
        assert_eq!(d.status(&attach(1, EP.endpoint_id(), 0)), S_OK);
        assert_eq!(d.status(&map(1, 0x10000, 0x1ffff, 0x20_0000, RW)), S_OK);
        let slow = consumer(&d, 150, false);
        state
            .register_notifier(EP, NotifierFlags::UNMAP, slow.clone())
            .unwrap();
        let before = d.req.used_idx(&d.mem);
        assert_eq!(d.status(&unmap(1, 0x10000, 0x1ffff)), S_OK);
        let seen = slow.seen.lock().unwrap().clone();
        let range = IovaRange::new(0x10000, 0x1ffff).unwrap();
        assert_eq!(seen, vec![(IommuEvent::Unmap { rid: EP, range }, before)]);
        assert_eq!(d.req.used_idx(&d.mem), before.wrapping_add(1));
    }

    #[test]
    fn failing_unmap_consumer_completes_with_deverr() {
        let state = state();
        let mut d = Driver::new(state.clone(), ALL_FEATURES);
        assert_eq!(d.status(&attach(1, EP.endpoint_id(), 0)), S_OK);
        assert_eq!(d.status(&map(1, 0x10000, 0x1ffff, 0x20_0000, RW)), S_OK);
        let bad = consumer(&d, 0, true);
        let good = consumer(&d, 0, false);
        state
            .register_notifier(EP, NotifierFlags::UNMAP, bad)
            .unwrap();
        state
            .register_notifier(EP, NotifierFlags::UNMAP, good.clone())
            .unwrap();
        assert_eq!(d.status(&unmap(1, 0x10000, 0x1ffff)), S_DEVERR);
        assert_eq!(good.seen.lock().unwrap().len(), 1, "others still notified");
        assert!(
            translate(&state, 0x10000).is_err(),
            "the model keeps the unmap"
        );
        assert_eq!(state.stats().notifier_failures(), 1);
        assert_eq!(state.stats().statuses(S_DEVERR), 1);
    }

    #[test]
    fn failing_map_consumer_rolls_the_mapping_back() {
        let state = state();
        let mut d = Driver::new(state.clone(), ALL_FEATURES);
        assert_eq!(d.status(&attach(1, EP.endpoint_id(), 0)), S_OK);
        let bad = consumer(&d, 0, true);
        let flags = NotifierFlags::MAP | NotifierFlags::UNMAP;
        state.register_notifier(EP, flags, bad.clone()).unwrap();
        assert_eq!(d.status(&map(1, 0x10000, 0x1ffff, 0x20_0000, RW)), S_DEVERR);
        assert!(matches!(
            translate(&state, 0x10000),
            Err(TranslateError::Unmapped { .. })
        ));
        let kinds: Vec<bool> = bad
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|(e, _)| matches!(e, IommuEvent::Map { .. }))
            .collect();
        assert_eq!(kinds, vec![true, false], "MAP, then the undoing UNMAP");
        assert_eq!(state.with_domains(|m| m.total_mappings()), 0);
    }
}
