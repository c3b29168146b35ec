//! The request queue worker: one thread (`iovmm_viommu`) per activated device.
//!
//! For every chain: split it by direction (bounded), make sure the reply will fit into guest
//! memory, execute the request on the model and deliver its events under the update lock, and
//! only then write the reply, return the buffer and raise the queue interrupt.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use iommu::types::IovaRange;
use iommu::virtio::protocol::{S_DEVERR, VIRTIO_IOMMU_T_MAP};
use iommu::virtio::{handle, Request, Response};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{self, ChainError};
use super::{IommuState, Update};
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
    /// Starts the worker thread for `rq`.
    pub(crate) fn spawn(rq: RequestQueue) -> io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        add(&epoll, rq.kick.as_raw_fd(), TOKEN_KICK)?;
        add(&epoll, stop.as_raw_fd(), TOKEN_STOP)?;
        let thread = std::thread::Builder::new()
            .name(WORKER_NAME.into())
            .spawn(move || rq.run(&epoll))?;
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

    /// Serves every available chain.
    fn process_queue(&mut self) {
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let used = self.process_chain(chain);
            if let Err(e) = self.queue.add_used(&self.mem, head, used) {
                log::warn!("virtio-iommu: cannot return request buffer {head}: {e}");
                continue;
            }
            self.signal();
        }
    }

    fn signal(&mut self) {
        if matches!(self.queue.needs_notification(&self.mem), Ok(false)) {
            return;
        }
        if let Err(e) = self
            .interrupt
            .trigger(VirtioInterruptType::Queue(REQUESTQ_INDEX))
        {
            log::warn!("virtio-iommu: cannot signal the request queue: {e}");
        }
    }

    /// Serves one chain; returns the used length (0 = returned unwritten).
    fn process_chain<I>(&self, chain: I) -> u32
    where
        I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let stats = &self.state.stats;
        let parts = match chain::split(&self.mem, chain, MAX_READABLE) {
            Ok(parts) => parts,
            Err(e) => return self.unwritten(&e),
        };
        stats.count_request(parts.readable.first().copied().unwrap_or(0));
        let reply_max = self.max_reply_len().min(parts.writable_len);
        if let Err(e) = chain::check_writable(&self.mem, &parts.writable, reply_max) {
            return self.unwritten(&e);
        }
        let response = self.execute(&parts.readable, parts.writable_len);
        if let Err(e) = chain::write(&self.mem, &parts.writable, &response.reply) {
            return self.unwritten(&e);
        }
        stats.count_status(response.status);
        u32::try_from(response.reply.len()).unwrap_or(0)
    }

    fn unwritten(&self, e: &ChainError) -> u32 {
        log::debug!("virtio-iommu: returning request unwritten: {e}");
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
            log::warn!("virtio-iommu: request failed at a translation consumer: {e}");
            state.stats.count_notifier_failure();
            if readable.first() == Some(&VIRTIO_IOMMU_T_MAP) {
                undo_map(&update, readable);
            }
            set_status(&mut response, S_DEVERR);
        }
        response
    }
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
        log::warn!("virtio-iommu: undoing MAP {range}: consumers failed again: {e}");
    }
}

fn set_status(response: &mut Response, status: u8) {
    let len = response.reply.len();
    if len >= TAIL_LEN {
        response.reply[len - TAIL_LEN] = status;
        response.status = Some(status);
    }
}
