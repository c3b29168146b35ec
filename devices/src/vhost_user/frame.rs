//! Deadline-bounded reads and writes of whole vhost-user frames on a Unix
//! stream socket. Shared by the main-socket IOTLB sender and the back-end
//! request channel server.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::channel::ChannelError;
use super::wire::{Header, HEADER_SIZE};
use crate::sys::{poll_fds, PollFd};

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

/// Fill `buf` completely, waiting at most until `deadline` (`None`: forever).
///
/// End of stream before the first byte or in the middle is `Disconnected`.
pub(crate) fn read_exact_until(
    stream: &UnixStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> Result<(), ChannelError> {
    let mut done = 0;
    while done < buf.len() {
        if !wait_readable(stream, deadline)? {
            return Err(ChannelError::Timeout);
        }
        let mut reader = stream;
        match reader.read(&mut buf[done..]) {
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

/// Read one frame: the header (waiting until `first_deadline` for its first
/// byte) and then the payload within `rest` of the header's arrival.
///
/// The header is validated by [`Header::decode`], so the payload is bounded
/// by the wire module's maximum before anything is allocated.
pub(crate) fn read_frame(
    stream: &UnixStream,
    first_deadline: Option<Instant>,
    rest: Duration,
) -> Result<(Header, Vec<u8>), ChannelError> {
    let mut raw = [0u8; HEADER_SIZE];
    read_exact_until(stream, &mut raw[..1], first_deadline)?;
    let rest_deadline = Instant::now().checked_add(rest);
    read_exact_until(stream, &mut raw[1..], rest_deadline)?;
    let hdr = Header::decode(&raw)?;
    let mut payload = vec![0u8; hdr.size as usize];
    read_exact_until(stream, &mut payload, rest_deadline)?;
    Ok((hdr, payload))
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
