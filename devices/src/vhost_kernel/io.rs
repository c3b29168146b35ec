//! Reading and writing IOTLB messages on a vhost fd, behind [`IotlbIo`].
//!
//! The kernel exchanges one `struct vhost_msg_v2` per `read(2)` / `write(2)`
//! on the vhost fd (`vhost_chr_read_iter` / `vhost_chr_write_iter`):
//!
//! * a read returns exactly one queued message (72 bytes), `EAGAIN` on a
//!   non-blocking fd with nothing queued, or 0 if the buffer is smaller
//!   than a message; a MISS that was read moves to the kernel's pending
//!   list until an UPDATE covering its IOVA arrives;
//! * a write applies one UPDATE or INVALIDATE **synchronously**, under the
//!   device mutex and every virtqueue mutex, before it returns: a write that
//!   returned the full size is the "ack" (nothing can use an invalidated
//!   translation afterwards); a refused message fails the write (`EFAULT`,
//!   `EINVAL`, `ENOMEM`).
//!
//! [`FdIotlb`] implements [`IotlbIo`] on any fd: the vhost fd in production
//! and a `SOCK_SEQPACKET` socketpair in tests, which keeps message
//! boundaries the same way (so truncated and oversized messages can be
//! produced). Reads use a buffer larger than a message, so an oversized
//! message is seen as such instead of being cut.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use thiserror::Error;

use super::msg::{
    decode_v2, encode_v2, is_front_end_message, KernelMsg, MsgError, VHOST_MSG_V2_SIZE,
};
use crate::vhost_user::wire::IotlbMsg;

/// Bytes offered to one `read`: more than a message, so that a longer one
/// shows up as [`MsgError::Oversized`].
const READ_BUF: usize = 2 * VHOST_MSG_V2_SIZE;

/// Errors of IOTLB message I/O on a vhost fd.
#[derive(Debug, Error)]
pub enum IotlbIoError {
    /// The bytes read are not a valid message.
    #[error("malformed message on the vhost fd")]
    Malformed(#[source] MsgError),
    /// The fd reported end of file (the kernel returns 0 only for a buffer
    /// smaller than a message, which this code never offers).
    #[error("the vhost fd returned end of file")]
    Eof,
    /// Reading or writing failed.
    #[error("vhost fd I/O failed")]
    Io(#[source] io::Error),
    /// The kernel accepted fewer bytes than the message.
    #[error("the vhost fd took {written} of the {VHOST_MSG_V2_SIZE} bytes of an IOTLB message")]
    ShortWrite {
        /// Bytes written.
        written: usize,
    },
    /// The message is not an UPDATE or INVALIDATE with a non-empty range.
    #[error("refusing to send {0:?} to the kernel: only non-empty UPDATE and INVALIDATE messages are sent")]
    NotSendable(IotlbMsg),
}

/// One message in, one message out, on a vhost fd.
pub trait IotlbIo: Send + Sync {
    /// Read one message; `Ok(None)` if none is queued (non-blocking fd).
    fn read_msg(&self) -> Result<Option<KernelMsg>, IotlbIoError>;

    /// Write one UPDATE or INVALIDATE; returns once the kernel applied it.
    fn write_msg(&self, msg: &IotlbMsg) -> Result<(), IotlbIoError>;

    /// The fd to poll for readability.
    fn poll_fd(&self) -> RawFd;
}

/// [`IotlbIo`] over a file descriptor (vhost fd, or a seqpacket socket in
/// tests). The fd must be non-blocking for [`IotlbIo::read_msg`] to return
/// `Ok(None)`.
#[derive(Debug)]
pub struct FdIotlb<F> {
    fd: F,
}

impl<F: AsRawFd + Send + Sync> FdIotlb<F> {
    /// Exchange messages on `fd`.
    pub fn new(fd: F) -> Self {
        FdIotlb { fd }
    }

    /// The wrapped fd owner.
    pub fn inner(&self) -> &F {
        &self.fd
    }
}

impl<F: AsRawFd + Send + Sync> IotlbIo for FdIotlb<F> {
    fn read_msg(&self) -> Result<Option<KernelMsg>, IotlbIoError> {
        let mut buf = [0u8; READ_BUF];
        // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes that
        // outlives the call; the fd is owned by `self.fd` and stays open.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(IotlbIoError::Io(e)),
            };
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return Err(IotlbIoError::Eof);
        }
        decode_v2(&buf[..n])
            .map(Some)
            .map_err(IotlbIoError::Malformed)
    }

    fn write_msg(&self, msg: &IotlbMsg) -> Result<(), IotlbIoError> {
        if !is_front_end_message(msg) {
            return Err(IotlbIoError::NotSendable(*msg));
        }
        let bytes = encode_v2(msg);
        loop {
            // SAFETY: `bytes` is a valid buffer of `bytes.len()` bytes that
            // outlives the call; the fd is owned by `self.fd` and stays open.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(IotlbIoError::Io(e));
            }
            let written = usize::try_from(n).unwrap_or(0);
            return match written == bytes.len() {
                true => Ok(()),
                false => Err(IotlbIoError::ShortWrite { written }),
            };
        }
    }

    fn poll_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A connected, non-blocking `SOCK_SEQPACKET` pair: one end stands in for a
/// vhost fd in tests, the other plays the kernel.
pub fn seqpacket_pair() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as RawFd; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so both fds are open and owned by no one else.
    let pair = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    Ok(pair)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vhost_user::wire::{IotlbPerm, IotlbType};
    use std::os::fd::OwnedFd;

    /// The "kernel" end writes raw bytes as one datagram.
    fn kernel_sends(fd: &OwnedFd, bytes: &[u8]) {
        // SAFETY: `bytes` is valid for `bytes.len()` bytes; `fd` is open.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(n, bytes.len() as isize);
    }

    fn kernel_reads(fd: &OwnedFd) -> Vec<u8> {
        let mut buf = [0u8; 256];
        // SAFETY: `buf` is writable for its length; `fd` is open.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n >= 0, "{}", io::Error::last_os_error());
        buf[..n as usize].to_vec()
    }

    #[test]
    fn messages_cross_in_both_directions() {
        let (ours, kernel) = seqpacket_pair().unwrap();
        let io = FdIotlb::new(ours);
        assert!(io.read_msg().unwrap().is_none(), "nothing queued");
        kernel_sends(
            &kernel,
            &encode_v2(&IotlbMsg::miss(0x5000, IotlbPerm::ReadOnly)),
        );
        let Some(KernelMsg::Iotlb(m)) = io.read_msg().unwrap() else {
            panic!("no miss read");
        };
        assert_eq!((m.kind().unwrap(), m.iova), (IotlbType::Miss, 0x5000));
        let up = IotlbMsg::update(0x5000, 0x1000, 0x7000_0000, IotlbPerm::ReadOnly);
        io.write_msg(&up).unwrap();
        assert_eq!(kernel_reads(&kernel), encode_v2(&up).to_vec());
    }

    #[test]
    fn truncated_oversized_and_garbage_messages_are_typed_errors() {
        let (ours, kernel) = seqpacket_pair().unwrap();
        let io = FdIotlb::new(ours);
        let good = encode_v2(&IotlbMsg::miss(0x5000, IotlbPerm::ReadOnly));
        kernel_sends(&kernel, &good[..40]);
        assert!(matches!(
            io.read_msg(),
            Err(IotlbIoError::Malformed(MsgError::Short { got: 40 }))
        ));
        kernel_sends(&kernel, &[0u8; 100]);
        assert!(matches!(
            io.read_msg(),
            Err(IotlbIoError::Malformed(MsgError::Oversized { got: 100 }))
        ));
        // Larger than the read buffer: the datagram is cut at the buffer,
        // still longer than a message.
        kernel_sends(&kernel, &[0xffu8; 4096]);
        assert!(matches!(
            io.read_msg(),
            Err(IotlbIoError::Malformed(MsgError::Oversized {
                got: READ_BUF
            }))
        ));
        kernel_sends(&kernel, &[0xffu8; VHOST_MSG_V2_SIZE]);
        assert!(matches!(
            io.read_msg(),
            Err(IotlbIoError::Malformed(MsgError::BadType(u32::MAX)))
        ));
        // The channel is still usable after each of them.
        kernel_sends(&kernel, &good);
        assert!(matches!(io.read_msg(), Ok(Some(KernelMsg::Iotlb(_)))));
    }

    #[test]
    fn a_closed_peer_is_end_of_file_and_a_refused_write_an_error() {
        let (ours, kernel) = seqpacket_pair().unwrap();
        let io = FdIotlb::new(ours);
        drop(kernel);
        assert!(matches!(io.read_msg(), Err(IotlbIoError::Eof)));
        let e = io.write_msg(&IotlbMsg::invalidate(0, 0x1000)).unwrap_err();
        assert!(matches!(e, IotlbIoError::Io(_)), "{e:?}");
    }

    #[test]
    fn only_updates_and_invalidates_are_written() {
        let (ours, kernel) = seqpacket_pair().unwrap();
        let io = FdIotlb::new(ours);
        let miss = IotlbMsg::miss(0x1000, IotlbPerm::ReadOnly);
        assert!(matches!(
            io.write_msg(&miss),
            Err(IotlbIoError::NotSendable(_))
        ));
        let empty = IotlbMsg::update(0x1000, 0, 0x1000, IotlbPerm::ReadOnly);
        assert!(io.write_msg(&empty).is_err());
        // SAFETY: a valid buffer for a non-blocking read on an open fd.
        let n = unsafe { libc::read(kernel.as_raw_fd(), [0u8; 8].as_mut_ptr().cast(), 8) };
        assert_eq!(n, -1, "nothing reached the kernel end");
    }
}
