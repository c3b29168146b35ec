//! The hook device threads run first, before they touch guest or back-end
//! input.
//!
//! Devices start some threads of their own at activation (the virtio-iommu
//! request worker, the vhost-user back-end request server, the vhost-user
//! call relay). The VMM confines each thread kind with its own seccomp
//! filter, but this crate knows nothing about seccomp: a device that spawns
//! threads keeps the [`ThreadHook`] it was given through
//! [`crate::virtio::VirtioDevice::set_thread_hook`] and calls [`enter`] as
//! the first thing on every such thread. Without a hook, [`enter`] does
//! nothing.
//!
//! Activation runs on a vCPU thread, so a device thread starts with the
//! vCPU thread's filter already in place; the hook can only narrow it.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

/// The kinds of threads devices start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The virtio-iommu request queue worker (`iovmm_viommu`).
    VirtioIommu,
    /// The vhost-user back-end request (IOTLB miss) server (`vhost-user-req`).
    VhostUserReq,
    /// The vhost-user call eventfd relay (`vhost-user-call`).
    VhostUserCall,
    /// The vhost-user reconnect supervisor (`vhost-user-reconnect`): connects
    /// to the back end's socket again and replays the negotiation.
    VhostUserReconnect,
    /// The vhost-user server-mode supervisor (`vhost-user-server`): accepts
    /// the next back end on the device's listening socket and replays the
    /// negotiation.
    VhostUserServer,
    /// The vhost-net IOTLB server (`vhost-net-iotlb`): reads the kernel's
    /// IOTLB misses from the vhost fd and writes UPDATEs back.
    VhostNetIotlb,
}

/// Called on a freshly started device thread with its kind. An error means
/// the thread must not run: it logs and returns without reading any input.
pub type ThreadHook = Arc<dyn Fn(ThreadKind) -> io::Result<()> + Send + Sync>;

/// Runs `hook` (if any) for a thread of `kind`; returns false, after logging
/// why, when the thread must end right away.
pub fn enter(hook: Option<&ThreadHook>, kind: ThreadKind) -> bool {
    let Some(hook) = hook else {
        return true;
    };
    match hook(kind) {
        Ok(()) => true,
        Err(e) => {
            log::error!("{kind:?} thread: cannot enter its sandbox, not starting: {e}");
            false
        }
    }
}

/// A device thread whose loop polls a stop eventfd: dropping (or
/// [`StoppableThread::stop`]) signals the eventfd and joins the thread, so the
/// stop is bounded by one round of the thread's poll.
pub struct StoppableThread {
    stop: Arc<EventFd>,
    join: Option<JoinHandle<()>>,
}

impl StoppableThread {
    /// Run `body` on a thread named `name`; `body` gets the stop eventfd to poll
    /// beside its own fds and returns once it fired (or on its own).
    pub fn spawn<F>(name: &str, body: F) -> io::Result<Self>
    where
        F: FnOnce(&EventFd) + Send + 'static,
    {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let s = Arc::clone(&stop);
        let join = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || body(&s))?;
        Ok(StoppableThread {
            stop,
            join: Some(join),
        })
    }

    /// Stop the thread and wait for it.
    pub fn stop(self) {}
}

impl Drop for StoppableThread {
    fn drop(&mut self) {
        // A full counter still wakes the poller; nothing else can fail here.
        let _ = self.stop.write(1);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn a_stoppable_thread_ends_when_stopped() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = StoppableThread::spawn("stoppable-test", move |stop| {
            let mut fds = [crate::sys::PollFd::readable(stop)];
            let fired = crate::sys::poll_fds(&mut fds, None).is_ok() && fds[0].fired();
            tx.send(fired).unwrap();
        })
        .unwrap();
        t.stop();
        // `stop` joined the thread, so its answer is already there.
        assert_eq!(rx.try_recv(), Ok(true));
    }

    #[test]
    fn enter_without_a_hook_lets_the_thread_run() {
        assert!(enter(None, ThreadKind::VirtioIommu));
    }

    #[test]
    fn enter_reports_the_kind_and_stops_the_thread_on_error() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let hook: ThreadHook = Arc::new(move |k| {
            s.lock().unwrap().push(k);
            match k {
                ThreadKind::VhostUserCall => Err(io::Error::other("no sandbox")),
                _ => Ok(()),
            }
        });
        assert!(enter(Some(&hook), ThreadKind::VhostUserReq));
        assert!(!enter(Some(&hook), ThreadKind::VhostUserCall));
        assert_eq!(
            *seen.lock().unwrap(),
            [ThreadKind::VhostUserReq, ThreadKind::VhostUserCall]
        );
    }
}
