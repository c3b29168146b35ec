//! Deadline-bounded reads and writes of whole vhost-user frames on a Unix
//! stream socket. Shared by the main-socket IOTLB sender and the back-end
//! request channel server.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::channel::{ChannelError, SpinWait, Waited};
use super::wire::{Header, HEADER_SIZE};
use crate::sys::{poll_fds, recv_dontwait, thread_cpu_time, PollFd};

/// Wait until `stream` is readable or `deadline` passes (`None`: forever).
///
/// Returns `Ok(false)` on timeout.
pub(crate) fn wait_readable(
    stream: &UnixStream,
    deadline: Option<Instant>,
) -> Result<bool, ChannelError> {
    let timeout = match deadline {
        None => None,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            Some(left)
        }
    };
    // POLLHUP/POLLERR also mean "a read will not block".
    let n = poll_fds(&mut [PollFd::readable(stream)], timeout).map_err(ChannelError::Io)?;
    Ok(n > 0)
}

/// Like [`wait_readable`], but busy-polls first: a zero-timeout `poll` in a loop for up to
/// `spin` (never past `deadline`), then blocks in `poll` for the rest.
///
/// Data that arrives within the window is taken without the wake-up of a blocked thread (1-50
/// µs on these machines, most of a socket round trip); the window costs its CPU time, returned
/// in [`SpinWait::spin_cpu`]. `spin` zero is [`wait_readable`] exactly.
pub(crate) fn wait_readable_spinning(
    stream: &UnixStream,
    deadline: Option<Instant>,
    spin: Duration,
) -> Result<SpinWait, ChannelError> {
    let mut spin_cpu = Duration::ZERO;
    if !spin.is_zero() {
        let cpu0 = thread_cpu_time().map_err(ChannelError::Io)?;
        let spun = spin_until_readable(stream, deadline, spin);
        let cpu1 = thread_cpu_time().map_err(ChannelError::Io)?;
        spin_cpu = cpu1.saturating_sub(cpu0);
        if let Some(waited) = spun? {
            return Ok(SpinWait { waited, spin_cpu });
        }
    }
    let waited = if wait_readable(stream, deadline)? {
        Waited::AfterBlocking
    } else {
        Waited::TimedOut
    };
    Ok(SpinWait { waited, spin_cpu })
}

/// The busy-poll of [`wait_readable_spinning`]: `Some` once the stream is readable or the
/// deadline passed, `None` when the window ran out first.
fn spin_until_readable(
    stream: &UnixStream,
    deadline: Option<Instant>,
    spin: Duration,
) -> Result<Option<Waited>, ChannelError> {
    let window_end = Instant::now().checked_add(spin);
    loop {
        let n = poll_fds(&mut [PollFd::readable(stream)], Some(Duration::ZERO))
            .map_err(ChannelError::Io)?;
        if n > 0 {
            return Ok(Some(Waited::WhileSpinning));
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Ok(Some(Waited::TimedOut));
        }
        if window_end.is_some_and(|e| now >= e) {
            return Ok(None);
        }
        std::hint::spin_loop();
    }
}

/// Fill `buf` completely, waiting at most until `deadline` (`None`: forever).
///
/// End of stream before the first byte or in the middle is `Disconnected`.
pub(crate) fn read_exact_until(
    stream: &UnixStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> Result<(), ChannelError> {
    read_exact_after(stream, buf, deadline, false)
}

/// [`read_exact_until`]; `try_first`: the bytes are probably there already (a wait just
/// reported the stream readable, or they are the rest of a frame written at once), so the
/// first read is a non-blocking `recv` without a `poll` before it.
fn read_exact_after(
    stream: &UnixStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
    mut try_first: bool,
) -> Result<(), ChannelError> {
    let mut done = 0;
    while done < buf.len() {
        let res = if std::mem::take(&mut try_first) {
            recv_dontwait(stream, &mut buf[done..])
        } else {
            if !wait_readable(stream, deadline)? {
                return Err(ChannelError::Timeout);
            }
            let mut reader = stream;
            reader.read(&mut buf[done..])
        };
        match res {
            Ok(0) => return Err(ChannelError::Disconnected),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) if is_disconnect(&e) => return Err(ChannelError::Disconnected),
            Err(e) => return Err(ChannelError::Io(e)),
        }
    }
    Ok(())
}

/// How [`read_frame_after`] waits for the first byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FirstByte {
    /// Block in `poll` until it comes (or the deadline passes).
    Block,
    /// Busy-poll for up to this long, then block ([`wait_readable_spinning`]).
    Spin(Duration),
    /// A wait just reported the stream readable: read at once.
    Ready,
}

/// Read one frame: the header (waiting until `first_deadline` for its first
/// byte) and then the payload within `rest` of the header's arrival.
///
/// The header is validated by [`Header::decode`], so the payload is bounded
/// by the wire module's maximum before anything is allocated.
#[cfg(test)]
pub(crate) fn read_frame(
    stream: &UnixStream,
    first_deadline: Option<Instant>,
    rest: Duration,
) -> Result<(Header, Vec<u8>), ChannelError> {
    read_frame_after(stream, first_deadline, rest, FirstByte::Block).map(|(h, p, _)| (h, p))
}

/// [`read_frame`] whose wait for the first byte is `first`; also returns how that wait went.
///
/// System calls: the wait (one `poll`, none when [`FirstByte::Ready`], one per iteration
/// while spinning), one `recv` for the whole header and one for the payload when the frame
/// came in one piece (a partial frame falls back to `poll` + `read`).
pub(crate) fn read_frame_after(
    stream: &UnixStream,
    first_deadline: Option<Instant>,
    rest: Duration,
    first: FirstByte,
) -> Result<(Header, Vec<u8>, SpinWait), ChannelError> {
    let wait = match first {
        FirstByte::Ready => SpinWait {
            waited: Waited::AfterBlocking,
            spin_cpu: Duration::ZERO,
        },
        FirstByte::Block => SpinWait {
            waited: if wait_readable(stream, first_deadline)? {
                Waited::AfterBlocking
            } else {
                Waited::TimedOut
            },
            spin_cpu: Duration::ZERO,
        },
        FirstByte::Spin(spin) => wait_readable_spinning(stream, first_deadline, spin)?,
    };
    if !wait.waited.is_ready() {
        return Err(ChannelError::Timeout);
    }
    let mut raw = [0u8; HEADER_SIZE];
    let got = read_some(stream, &mut raw, first_deadline)?;
    let rest_deadline = Instant::now().checked_add(rest);
    read_exact_until(stream, &mut raw[got..], rest_deadline)?;
    let hdr = Header::decode(&raw)?;
    let mut payload = vec![0u8; hdr.size as usize];
    read_exact_after(stream, &mut payload, rest_deadline, true)?;
    Ok((hdr, payload, wait))
}

/// Read at least one byte into `buf` from a stream that was reported readable (waiting again,
/// until `deadline`, only if that was spurious): how many.
fn read_some(
    stream: &UnixStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> Result<usize, ChannelError> {
    loop {
        match recv_dontwait(stream, buf) {
            Ok(0) => return Err(ChannelError::Disconnected),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !wait_readable(stream, deadline)? {
                    return Err(ChannelError::Timeout);
                }
            }
            Err(e) if is_disconnect(&e) => return Err(ChannelError::Disconnected),
            Err(e) => return Err(ChannelError::Io(e)),
        }
    }
}

/// Write all of `bytes`, mapping a closed peer to `Disconnected`.
pub(crate) fn write_frame(stream: &UnixStream, bytes: &[u8]) -> Result<(), ChannelError> {
    let mut writer = stream;
    match writer.write_all(bytes) {
        Ok(()) => Ok(()),
        Err(e) if is_disconnect(&e) => Err(ChannelError::Disconnected),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Err(ChannelError::Timeout)
        }
        Err(e) => Err(ChannelError::Io(e)),
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vhost_user::wire::{encode_ack, WireError};

    const FOREVER: Duration = Duration::MAX;

    #[test]
    fn spinning_wait_takes_data_already_there_without_blocking() {
        let (a, b) = UnixStream::pair().unwrap();
        write_frame(&a, &encode_ack(22, 7)).unwrap();
        let w = wait_readable_spinning(&b, None, FOREVER).unwrap();
        assert_eq!(w.waited, Waited::WhileSpinning);
        // Without a window the same wait blocks in poll (and returns at once here).
        let w = wait_readable_spinning(&b, None, Duration::ZERO).unwrap();
        assert_eq!(w.waited, Waited::AfterBlocking);
        assert_eq!(w.spin_cpu, Duration::ZERO);
    }

    #[test]
    fn spinning_wait_sees_data_written_while_it_spins() {
        let (a, b) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            rx.recv().unwrap();
            write_frame(&a, &encode_ack(22, 7)).unwrap();
            a
        });
        tx.send(()).unwrap();
        // An endless window: only data can end the wait, and it ends while spinning.
        let w = wait_readable_spinning(&b, None, FOREVER).unwrap();
        assert_eq!(w.waited, Waited::WhileSpinning);
        let _a = writer.join().unwrap();
        let (hdr, payload) = read_frame(&b, None, Duration::from_secs(1)).unwrap();
        assert_eq!((hdr.request, payload), (22, 7u64.to_ne_bytes().to_vec()));
    }

    #[test]
    fn spinning_wait_ends_on_a_hang_up() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let w = wait_readable_spinning(&b, None, FOREVER).unwrap();
        assert_eq!(w.waited, Waited::WhileSpinning);
        let err = read_frame_after(&b, None, Duration::from_secs(1), FirstByte::Spin(FOREVER))
            .unwrap_err();
        assert!(matches!(err, ChannelError::Disconnected));
    }

    #[test]
    fn the_deadline_bounds_the_spin() {
        let (_a, b) = UnixStream::pair().unwrap();
        let past = Instant::now();
        let w = wait_readable_spinning(&b, Some(past), FOREVER).unwrap();
        assert_eq!(w.waited, Waited::TimedOut);
        let err = read_frame_after(
            &b,
            Some(past),
            Duration::from_secs(1),
            FirstByte::Spin(FOREVER),
        )
        .unwrap_err();
        assert!(matches!(err, ChannelError::Timeout));
    }

    #[test]
    fn a_window_that_runs_out_falls_back_to_blocking() {
        let (a, b) = UnixStream::pair().unwrap();
        // Nothing arrives: after the window the wait blocks until the deadline.
        let soon = Instant::now() + Duration::from_millis(20);
        let w = wait_readable_spinning(&b, Some(soon), Duration::from_nanos(1)).unwrap();
        assert_eq!(w.waited, Waited::TimedOut);
        // Data comes whenever the writer runs: during the window or after it, never lost.
        let writer = std::thread::spawn(move || {
            write_frame(&a, &encode_ack(22, 9)).unwrap();
            a
        });
        let (hdr, payload, w) = read_frame_after(
            &b,
            None,
            Duration::from_secs(1),
            FirstByte::Spin(Duration::from_nanos(1)),
        )
        .unwrap();
        assert!(w.waited.is_ready());
        assert_eq!((hdr.request, payload), (22, 9u64.to_ne_bytes().to_vec()));
        let _a = writer.join().unwrap();
    }

    #[test]
    fn a_frame_split_in_pieces_is_reassembled() {
        let (a, b) = UnixStream::pair().unwrap();
        let frame = encode_ack(22, 5);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            write_frame(&a, &frame[..3]).unwrap();
            rx.recv().unwrap();
            write_frame(&a, &frame[3..14]).unwrap();
            write_frame(&a, &frame[14..]).unwrap();
            a
        });
        // The first piece is already there when the reader starts; the rest comes later.
        let w = wait_readable_spinning(&b, None, FOREVER).unwrap();
        assert_eq!(w.waited, Waited::WhileSpinning);
        tx.send(()).unwrap();
        let (hdr, payload, _) =
            read_frame_after(&b, None, Duration::from_secs(1), FirstByte::Ready).unwrap();
        assert_eq!((hdr.request, payload), (22, 5u64.to_ne_bytes().to_vec()));
        let _a = writer.join().unwrap();
    }

    #[test]
    fn read_frame_returns_header_and_payload() {
        let (a, b) = UnixStream::pair().unwrap();
        write_frame(&a, &encode_ack(22, 7)).unwrap();
        let (hdr, payload) = read_frame(&b, None, Duration::from_secs(1)).unwrap();
        assert_eq!(hdr.request, 22);
        assert_eq!(payload, 7u64.to_ne_bytes());
    }

    #[test]
    fn read_frame_times_out_when_nothing_arrives() {
        let (_a, b) = UnixStream::pair().unwrap();
        let deadline = Instant::now() + Duration::from_millis(30);
        let err = read_frame(&b, Some(deadline), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ChannelError::Timeout));
    }

    #[test]
    fn read_frame_times_out_on_a_partial_payload() {
        let (a, b) = UnixStream::pair().unwrap();
        write_frame(&a, &encode_ack(22, 7)[..15]).unwrap();
        let err = read_frame(&b, None, Duration::from_millis(30)).unwrap_err();
        assert!(matches!(err, ChannelError::Timeout));
    }

    #[test]
    fn read_frame_reports_disconnect_mid_frame() {
        let (a, b) = UnixStream::pair().unwrap();
        write_frame(&a, &encode_ack(22, 7)[..5]).unwrap();
        drop(a);
        let err = read_frame(&b, None, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, ChannelError::Disconnected));
    }

    #[test]
    fn read_frame_rejects_oversized_header_before_reading_payload() {
        let (a, b) = UnixStream::pair().unwrap();
        let hdr = Header::request(1, 0x10_0000, false);
        write_frame(&a, &hdr.encode()).unwrap();
        let err = read_frame(&b, None, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(
            err,
            ChannelError::Protocol(WireError::Oversized(0x10_0000))
        ));
    }
}
