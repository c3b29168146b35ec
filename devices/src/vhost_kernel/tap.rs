//! A tap interface as the backend of a vhost-net device.
//!
//! `/dev/net/tun` opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (an
//! existing persistent tap of that name is attached, otherwise one is
//! created, which needs CAP_NET_ADMIN), with the virtio-net header size set
//! to 12 bytes (`struct virtio_net_hdr_mrg_rxbuf`, the header of a
//! VERSION_1 device). vhost-net then passes the guest's header through to
//! the tap unchanged (VHOST_NET_F_VIRTIO_NET_HDR is not acked).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;
use vmm_sys_util::ioctl::ioctl_with_ref;

/// The tun/tap control device.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Size of the virtio-net header of a VERSION_1 device.
pub const VNET_HDR_LEN: i32 = 12;
/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_NAME_LEN: usize = 15;

/// The tun/tap ioctl request numbers (`linux/if_tun.h`).
mod nr {
    #![allow(missing_docs)]
    use vmm_sys_util::ioctl_iow_nr;

    const TUNTAP: u32 = b'T' as u32;
    ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, libc::c_int);
    ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, libc::c_int);
}
use nr::{TUNSETIFF, TUNSETVNETHDRSZ};

/// Tap setup errors.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name is empty, too long or has a byte an interface name cannot have.
    #[error("tap name {0:?} is not a valid interface name (1 to {MAX_NAME_LEN} bytes, no '/', ':', NUL or whitespace)")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_PATH} (load the tun module)")]
    Open(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error("cannot attach tap {name:?} (TUNSETIFF; creating a tap needs CAP_NET_ADMIN, an existing one must be a tap without multiqueue)")]
    SetIff {
        /// The tap name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the virtio-net header size of tap {name:?}")]
    VnetHdr {
        /// The tap name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` with the name and the flags member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Whether `name` can name a network interface.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// An open tap queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attach (or create) tap `name` with a virtio-net header.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let set_iff = |source| TapError::SetIff {
            name: name.to_string(),
            source,
        };
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its
        // layout (40 bytes) and lives across the call; the fd is open.
        let rc = unsafe { ioctl_with_ref(&file, TUNSETIFF(), &req) };
        if rc < 0 {
            return Err(set_iff(io::Error::last_os_error()));
        }
        let hdr: libc::c_int = VNET_HDR_LEN;
        // SAFETY: TUNSETVNETHDRSZ reads one int; `hdr` lives across the call.
        let rc = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr) };
        if rc < 0 {
            return Err(TapError::VnetHdr {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's file (the vhost-net backend).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn interface_names_are_checked() {
        for good in ["tap0", "vnet-12", "a", "fifteen_chars_x"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "sixteen_chars_xx",
            "a/b",
            "a:1",
            "a b",
            ".",
            "..",
            "a\0",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(matches!(Tap::open("bad/name"), Err(TapError::BadName(_))));
    }

    #[test]
    fn the_ioctl_numbers_are_the_kernel_ones() {
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
    }
}
