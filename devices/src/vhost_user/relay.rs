//! Relays vring call eventfds to [`VirtioInterrupt::trigger`] for queues
//! that have no irqfd (the transport was built without irqfds, or the driver
//! assigned no MSI-X vector). With irqfds the back end signals KVM directly
//! and this thread does not exist.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::sys::{poll_fds, PollFd};
use crate::thread::{self, StoppableThread, ThreadHook, ThreadKind};
use crate::virtio::{VirtioInterrupt, VirtioInterruptType};

/// A running relay thread; stopped and joined when dropped.
pub struct CallRelay(StoppableThread);

impl CallRelay {
    /// Relay each `(queue index, eventfd)` pair to `interrupt`.
    pub fn spawn(
        calls: Vec<(u16, EventFd)>,
        interrupt: Arc<dyn VirtioInterrupt>,
        name: &str,
    ) -> std::io::Result<Self> {
        Self::spawn_with_hook(calls, interrupt, name, None)
    }

    /// Like [`CallRelay::spawn`]; the thread runs `hook` first (see [`crate::thread`]).
    pub fn spawn_with_hook(
        calls: Vec<(u16, EventFd)>,
        interrupt: Arc<dyn VirtioInterrupt>,
        name: &str,
        hook: Option<ThreadHook>,
    ) -> std::io::Result<Self> {
        let t = StoppableThread::spawn(name, move |stop| {
            if thread::enter(hook.as_ref(), ThreadKind::VhostUserCall) {
                relay_loop(&calls, interrupt.as_ref(), stop)
            }
        })?;
        Ok(CallRelay(t))
    }

    /// Stop the thread and wait for it.
    pub fn stop(self) {
        self.0.stop();
    }
}

fn relay_loop(calls: &[(u16, EventFd)], interrupt: &dyn VirtioInterrupt, stop: &EventFd) {
    let mut fds: Vec<PollFd> = std::iter::once(stop)
        .chain(calls.iter().map(|c| &c.1))
        .map(PollFd::readable)
        .collect();
    loop {
        if let Err(e) = poll_fds(&mut fds, None) {
            log::error!("vhost-user call relay: poll failed, stopping: {e}");
            return;
        }
        if fds[0].fired() {
            return;
        }
        for (p, (queue, fd)) in fds[1..].iter().zip(calls) {
            if p.is_readable() && fd.read().is_ok() {
                if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(*queue)) {
                    log::warn!("vhost-user call relay: interrupt for queue {queue} failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Sends every interrupt it is asked for to the test.
    struct Recorder(mpsc::Sender<VirtioInterruptType>);

    impl VirtioInterrupt for Recorder {
        fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
            self.0.send(t).unwrap();
            Ok(())
        }
    }

    #[test]
    fn call_signals_become_queue_interrupts_until_stopped() {
        let (tx, rx) = mpsc::channel();
        let rec = Arc::new(Recorder(tx));
        let a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let b = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let relay = CallRelay::spawn(vec![(0, a), (1, b)], rec.clone(), "relay-test").unwrap();
        let next = || rx.recv_timeout(Duration::from_secs(10)).unwrap();
        b2.write(1).unwrap();
        assert_eq!(next(), VirtioInterruptType::Queue(1));
        a2.write(1).unwrap();
        assert_eq!(next(), VirtioInterruptType::Queue(0));
        relay.stop();
        // `stop` joined the thread: it let go of the interrupt, so a signal
        // now stays unread and nothing can raise an interrupt any more.
        assert_eq!(Arc::strong_count(&rec), 1, "the relay thread is gone");
        a2.write(1).unwrap();
        assert_eq!(a2.read().unwrap(), 1, "nobody read the signal");
        drop(rec);
        assert_eq!(rx.recv(), Err(mpsc::RecvError), "no other interrupt");
    }
}
