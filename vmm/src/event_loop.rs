//! The VMM event loop (rust-vmm `event-manager`).
//!
//! It runs on its own thread, owns the VM's devices and waits for stop
//! requests: the exit state's eventfd (vCPU errors, API stops) and the
//! eventfds of the devices through which a guest stops itself (debug exit
//! port, ACPI S5, i8042 reset). Device queue handlers of later devices are
//! subscribers of the same loop.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::vcpu::{ExitState, VmExit};

/// The event manager type used by iovmm.
pub type VmmEventManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Maps a fired eventfd to a stop reason.
pub type ExitMapper = Box<dyn Fn() -> VmExit + Send>;

/// Subscriber that turns guest-initiated stops into [`VmExit`] reasons.
pub struct ExitHandler {
    sources: Vec<(EventFd, ExitMapper)>,
    exit: Arc<ExitState>,
}

impl ExitHandler {
    /// Creates the handler; `exit.evt` is always watched.
    pub fn new(exit: Arc<ExitState>) -> Self {
        ExitHandler {
            sources: Vec::new(),
            exit,
        }
    }

    /// Watches `fd`; when it fires, `mapper` says why the guest stopped.
    pub fn add_source(&mut self, fd: EventFd, mapper: ExitMapper) {
        self.sources.push((fd, mapper));
    }
}

impl MutEventSubscriber for ExitHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let idx = events.data() as usize;
        if idx == self.sources.len() {
            // The exit state's own eventfd: the reason is already recorded.
            let _ = self.exit.evt.read();
            return;
        }
        if let Some((fd, mapper)) = self.sources.get(idx) {
            let _ = fd.read();
            self.exit.request(mapper());
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, (fd, _)) in self.sources.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, i as u32, EventSet::IN)) {
                log::error!("vmm: cannot watch an exit eventfd: {e:?}");
            }
        }
        let own = Events::with_data(&self.exit.evt, self.sources.len() as u32, EventSet::IN);
        if let Err(e) = ops.add(own) {
            log::error!("vmm: cannot watch the exit state eventfd: {e:?}");
        }
    }
}

/// Runs `em` until a stop reason is recorded in `exit`.
pub fn run_until_exit(em: &mut VmmEventManager, exit: &ExitState) -> VmExit {
    loop {
        if let Some(r) = exit.reason() {
            return r;
        }
        if let Err(e) = em.run_with_timeout(100) {
            log::error!("vmm: event loop failed: {e:?}");
            exit.request(VmExit::Stopped);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use event_manager::SubscriberOps;

    #[test]
    fn device_eventfd_becomes_stop_reason() {
        let exit = Arc::new(ExitState::new().unwrap());
        let mut h = ExitHandler::new(exit.clone());
        let port = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let acpi = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        h.add_source(port.try_clone().unwrap(), Box::new(|| VmExit::ExitPort(7)));
        h.add_source(acpi.try_clone().unwrap(), Box::new(|| VmExit::PowerOff));
        let mut em = VmmEventManager::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(h)));
        acpi.write(1).unwrap();
        assert_eq!(run_until_exit(&mut em, &exit), VmExit::PowerOff);
        // First reason wins.
        port.write(1).unwrap();
        em.run_with_timeout(10).unwrap();
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));
    }

    #[test]
    fn exit_state_request_wakes_the_loop() {
        let exit = Arc::new(ExitState::new().unwrap());
        let mut em = VmmEventManager::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(ExitHandler::new(exit.clone()))));
        let e2 = exit.clone();
        let t = std::thread::spawn(move || e2.request(VmExit::Stopped));
        assert_eq!(run_until_exit(&mut em, &exit), VmExit::Stopped);
        t.join().unwrap();
    }
}
