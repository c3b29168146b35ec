//! Server mode (`server=on`): iovmm listens on the socket path and the back
//! end connects, as OVS-DPDK's `dpdkvhostuserclient` ports and DPDK's
//! `net_vhost` with `client=1` expect. A switch that restarts connects again
//! without the VM being restarted.
//!
//! * [`bind`] creates the listening socket (non-blocking). A socket file
//!   nobody serves (left by a crashed run) is replaced; a path another
//!   process serves, or a path that is not a socket, is refused.
//! * [`accept_until`] waits for one connection, bounded.
//! * The device accepts the first back end before the guest starts
//!   ([`super::VhostUserDevice::accept`]); afterwards the supervisor thread
//!   (`vhost-user-server`, see [`super::reconnect`]) accepts the next one
//!   whenever the current one is gone. While a back end is connected, the
//!   listener is not watched: a second connection waits in the listen
//!   backlog (it is queued, not refused) and is served once the current one
//!   ends, like QEMU's `server=on` character device.
//!
//! The socket file belongs to whoever bound it: the VMM removes it when the
//! VM is gone (the device threads' seccomp filters have no `unlink`).

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Instant;

use super::frontend::VhostUserError;
use crate::sys::{poll_fds, PollFd};

/// Binds a listening Unix socket at `path`, replacing a stale socket file
/// that nobody serves. The listener is non-blocking.
pub fn bind(path: &Path) -> Result<UnixListener, VhostUserError> {
    let listen_err = |source| VhostUserError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VhostUserError::NotASocket(path.to_path_buf()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(VhostUserError::SocketInUse(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(listen_err)?;
            }
            Err(e) => return Err(listen_err(e)),
        }
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    Ok(listener)
}

/// Takes one pending connection without waiting: `Ok(None)` if none is
/// pending. The stream is blocking (the main socket bounds its waits with
/// socket timeouts).
pub fn accept_now(listener: &UnixListener) -> std::io::Result<Option<UnixStream>> {
    match listener.accept() {
        Ok((stream, _)) => {
            stream.set_nonblocking(false)?;
            Ok(Some(stream))
        }
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(None),
        // A client that gave up while queued is not our error.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits for one connection until `deadline`; `Ok(None)` once it passed.
pub fn accept_until(
    listener: &UnixListener,
    deadline: Instant,
) -> std::io::Result<Option<UnixStream>> {
    loop {
        if let Some(s) = accept_now(listener)? {
            return Ok(Some(s));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut fds = [PollFd::readable(listener)];
        poll_fds(&mut fds, Some(left))?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn path(name: &str) -> std::path::PathBuf {
        let p =
            std::env::temp_dir().join(format!("iovmm-listener-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn a_stale_socket_is_replaced_and_a_served_one_refused() {
        let p = path("stale");
        drop(UnixListener::bind(&p).unwrap());
        assert!(p.exists(), "a dropped listener leaves its file");
        let l = bind(&p).unwrap();
        match bind(&p) {
            Err(VhostUserError::SocketInUse(q)) => assert_eq!(q, p),
            other => panic!("expected SocketInUse, got {other:?}"),
        }
        // The probe of the refused bind is a pending connection on `l`.
        assert!(accept_now(&l).unwrap().is_some());
        drop(l);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_never_replaced() {
        let p = path("file");
        std::fs::write(&p, b"data").unwrap();
        assert!(matches!(bind(&p), Err(VhostUserError::NotASocket(_))));
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
        std::fs::remove_file(&p).unwrap();
        let missing = Path::new("/nonexistent-dir/iovmm.sock");
        let e = bind(missing).unwrap_err();
        assert!(matches!(e, VhostUserError::Listen { .. }), "{e}");
    }

    #[test]
    fn accept_waits_for_a_client_and_gives_up_at_the_deadline() {
        let p = path("accept");
        let l = bind(&p).unwrap();
        let t = Instant::now();
        let none = accept_until(&l, t + Duration::from_millis(50)).unwrap();
        assert!(none.is_none() && t.elapsed() >= Duration::from_millis(50));
        let client = UnixStream::connect(&p).unwrap();
        let s = accept_until(&l, Instant::now() + Duration::from_secs(5))
            .unwrap()
            .unwrap();
        // Blocking, connected to the client.
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        drop(client);
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &s, &mut buf).unwrap(), 0);
        std::fs::remove_file(&p).unwrap();
    }
}
