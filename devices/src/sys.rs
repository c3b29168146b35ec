//! Safe wrappers of the few system calls device threads make directly.
//!
//! [`poll_fds`] is the one `poll(2)` of the workspace: device threads (call relay, reconnect
//! supervisor, channel reads) and the test back ends wait on eventfds and sockets through it.
//! [`recv_dontwait`] reads a socket without blocking (busy-polling, the rest of a frame);
//! [`thread_cpu_time`] is what a busy-poll window costs the calling thread.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// One file descriptor to wait on, and what [`poll_fds`] found on it.
///
/// Holds the raw fd only: keep the fd open while polling (a closed fd reports
/// [`PollFd::hung_up`], it is never unsafe).
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct PollFd(libc::pollfd);

impl std::fmt::Debug for PollFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollFd")
            .field("fd", &self.0.fd)
            .field("events", &self.0.events)
            .field("revents", &self.0.revents)
            .finish()
    }
}

impl PollFd {
    /// Waits for `events` (`libc::POLLIN`, `libc::POLLRDHUP`, ...) on `fd`.
    pub fn new(fd: &impl AsRawFd, events: i16) -> Self {
        PollFd(libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        })
    }

    /// Waits for `fd` to become readable (`POLLIN`).
    pub fn readable(fd: &impl AsRawFd) -> Self {
        Self::new(fd, libc::POLLIN)
    }

    /// The fd.
    pub fn fd(&self) -> RawFd {
        self.0.fd
    }

    /// What the last [`poll_fds`] reported (`revents`).
    pub fn revents(&self) -> i16 {
        self.0.revents
    }

    /// Whether anything was reported (readable, hang-up, error).
    pub fn fired(&self) -> bool {
        self.0.revents != 0
    }

    /// Whether the fd is readable (`POLLIN`).
    pub fn is_readable(&self) -> bool {
        self.0.revents & libc::POLLIN != 0
    }

    /// Whether the peer hung up or the fd failed (`POLLRDHUP`, `POLLHUP`, `POLLERR`, `POLLNVAL`).
    pub fn hung_up(&self) -> bool {
        self.0.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }
}

/// `poll(2)`: waits until one of `fds` reports an event or `timeout` passes (`None`: forever).
///
/// Returns how many fds reported something (0 on timeout); each fd's [`PollFd::revents`] is set.
/// An interrupted call (`EINTR`) is resumed with the time left. A timeout is rounded up to whole
/// milliseconds, so a sub-millisecond remainder still waits.
pub fn poll_fds(fds: &mut [PollFd], timeout: Option<Duration>) -> io::Result<usize> {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let nfds = libc::nfds_t::try_from(fds.len())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        let ms = match (timeout, deadline) {
            (None, _) | (Some(_), None) => -1,
            (Some(_), Some(d)) => timeout_ms(d.saturating_duration_since(Instant::now())),
        };
        // SAFETY: `PollFd` is a `repr(transparent)` `libc::pollfd`, so `fds` is a valid,
        // exclusively borrowed array of `nfds` pollfds for the duration of the call; poll(2)
        // only writes their `revents`.
        let n = unsafe { libc::poll(fds.as_mut_ptr().cast::<libc::pollfd>(), nfds, ms) };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// `recv(2)` with `MSG_DONTWAIT`: reads what `fd` (a socket) holds now into `buf`, without
/// blocking and without changing the socket's blocking mode (shared with `dup`s of it).
///
/// `Ok(0)` is end of stream (or an empty `buf`); nothing to read is `ErrorKind::WouldBlock`.
/// Saves the `poll` before a read that is expected to succeed (the rest of a frame).
pub fn recv_dontwait(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, exclusively borrowed byte buffer of `buf.len()` bytes for the
    // duration of the call; recv(2) writes at most that many bytes into it.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// CPU time the calling thread has used so far (`CLOCK_THREAD_CPUTIME_ID`).
///
/// The price of a busy-poll window: the difference of two readings around a spin is the CPU
/// the spin burnt (wall time would also count the time the thread was preempted).
pub fn thread_cpu_time() -> io::Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec; clock_gettime(2) only writes it.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

/// `d` in whole milliseconds for poll(2), rounded up, saturated.
fn timeout_ms(d: Duration) -> libc::c_int {
    let ms = d.as_nanos().div_ceil(1_000_000);
    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn reports_readable_fds_and_times_out() {
        let (a, b) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        b.write(1).unwrap();
        let mut fds = [PollFd::readable(&a), PollFd::readable(&b)];
        assert_eq!(poll_fds(&mut fds, Some(Duration::ZERO)).unwrap(), 1);
        assert!(!fds[0].fired() && fds[1].is_readable());
        b.read().unwrap();
        let mut fds = [PollFd::readable(&a), PollFd::readable(&b)];
        assert_eq!(
            poll_fds(&mut fds, Some(Duration::from_millis(1))).unwrap(),
            0
        );
    }

    #[test]
    fn reports_a_hang_up() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        ours.write_all(b"x").unwrap();
        drop(theirs);
        let mut fds = [PollFd::new(&ours, libc::POLLRDHUP)];
        assert_eq!(poll_fds(&mut fds, None).unwrap(), 1);
        assert!(fds[0].hung_up());
    }

    #[test]
    fn recv_dontwait_reads_what_is_there_and_never_blocks() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 8];
        let e = recv_dontwait(&theirs, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        ours.write_all(b"abc").unwrap();
        assert_eq!(recv_dontwait(&theirs, &mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        drop(ours);
        assert_eq!(recv_dontwait(&theirs, &mut buf).unwrap(), 0);
    }

    #[test]
    fn thread_cpu_time_never_goes_back() {
        let a = thread_cpu_time().unwrap();
        let mut x = 0u64;
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        let b = thread_cpu_time().unwrap();
        assert!(b >= a, "{b:?} < {a:?} ({x})");
    }

    #[test]
    fn timeouts_round_up_to_milliseconds() {
        assert_eq!(timeout_ms(Duration::ZERO), 0);
        assert_eq!(timeout_ms(Duration::from_micros(1)), 1);
        assert_eq!(timeout_ms(Duration::from_millis(7)), 7);
        assert_eq!(timeout_ms(Duration::MAX), libc::c_int::MAX);
    }
}
