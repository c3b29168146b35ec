//! The vhost-net fd, through the vhost crate's vhost-kernel support
//! (`vhost::vhost_kern::net::Net`: open, owner, features, memory table,
//! vring number/base/kick/call, `VHOST_NET_SET_BACKEND`, backend features)
//! plus the one ioctl it lacks for a device behind a vIOMMU:
//! `VHOST_SET_VRING_ADDR` with IOVAs. The crate's `set_vring_addr` checks
//! the ring against guest memory and converts guest-physical addresses to
//! VMM addresses, which is right without a vIOMMU and wrong behind one
//! (the kernel then translates the ring's IOVAs through its device IOTLB).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net;
use vhost::vhost_kern::vhost_binding::{
    vhost_vring_addr, VHOST_BACKEND_F_IOTLB_BATCH, VHOST_BACKEND_F_IOTLB_MSG_V2,
    VHOST_GET_VRING_BASE, VHOST_NET_SET_BACKEND, VHOST_RESET_OWNER, VHOST_SET_FEATURES,
    VHOST_SET_MEM_TABLE, VHOST_SET_VRING_ADDR, VHOST_SET_VRING_BASE, VHOST_SET_VRING_CALL,
    VHOST_SET_VRING_KICK, VHOST_SET_VRING_NUM,
};
use vhost::vhost_kern::{VhostKernBackend, VhostKernFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::virtio::GuestMemoryMmap;

/// Backend feature mask of `VHOST_BACKEND_F_IOTLB_MSG_V2` (a bit number in
/// the UAPI: `vhost_backend_has_feature` tests `1 << 1`).
pub const BACKEND_IOTLB_MSG_V2: u64 = 1 << VHOST_BACKEND_F_IOTLB_MSG_V2;
/// Backend feature mask of `VHOST_BACKEND_F_IOTLB_BATCH` (bit 2).
pub const BACKEND_IOTLB_BATCH: u64 = 1 << VHOST_BACKEND_F_IOTLB_BATCH;

/// The guest memory the crate's `Net` checks ring addresses against.
pub type Mem = Arc<GuestMemoryMmap>;

/// The ioctls a vhost-net device makes after it was opened (activation and
/// reset run on vCPU threads; `VHOST_RESET_OWNER` also on the threads that
/// deliver unmaps), for the seccomp filters.
pub fn runtime_ioctls() -> Vec<libc::c_ulong> {
    vec![
        VHOST_SET_FEATURES(),
        VHOST_SET_MEM_TABLE(),
        VHOST_SET_VRING_NUM(),
        VHOST_SET_VRING_ADDR(),
        VHOST_SET_VRING_BASE(),
        VHOST_GET_VRING_BASE(),
        VHOST_SET_VRING_KICK(),
        VHOST_SET_VRING_CALL(),
        VHOST_NET_SET_BACKEND(),
        VHOST_RESET_OWNER(),
    ]
}

/// `VHOST_RESET_OWNER` alone (the last-resort IOTLB drop).
pub fn reset_owner_ioctl() -> libc::c_ulong {
    VHOST_RESET_OWNER()
}

/// An open `/dev/vhost-net` owned by this process.
pub struct KernNet {
    net: Net<Mem>,
    backend_acked: u64,
}

impl std::fmt::Debug for KernNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernNet")
            .field("fd", &self.net.as_raw_fd())
            .field("backend_acked", &self.backend_acked)
            .finish()
    }
}

impl AsRawFd for KernNet {
    fn as_raw_fd(&self) -> RawFd {
        self.net.as_raw_fd()
    }
}

impl VhostKernBackend for KernNet {
    type AS = Mem;

    fn mem(&self) -> &Mem {
        self.net.mem()
    }
}

impl VhostKernFeatures for KernNet {
    fn get_backend_features_acked(&self) -> u64 {
        self.backend_acked
    }

    fn set_backend_features_acked(&mut self, features: u64) {
        self.backend_acked = features;
    }
}

impl KernNet {
    /// Open `/dev/vhost-net` (non-blocking) and become its owner.
    pub fn open(mem: &GuestMemoryMmap) -> vhost::Result<Self> {
        let net = Net::new(Arc::new(mem.clone()))?;
        net.set_owner()?;
        Ok(KernNet {
            net,
            backend_acked: 0,
        })
    }

    /// `VHOST_GET_FEATURES`: the virtio features the kernel's vhost-net offers.
    pub fn features(&self) -> vhost::Result<u64> {
        self.get_features()
    }

    /// Ack the IOTLB message format (V2) and batching where the kernel
    /// offers them; returns `(offered, acked)`.
    pub fn ack_backend_features(&mut self) -> vhost::Result<(u64, u64)> {
        let offered = self.get_backend_features()?;
        let acked = offered & (BACKEND_IOTLB_MSG_V2 | BACKEND_IOTLB_BATCH);
        self.set_backend_features(acked)?;
        Ok((offered, acked))
    }

    /// `VHOST_SET_MEM_TABLE` with every guest RAM region (GPA → VMM address).
    pub fn set_memory(&self, mem: &GuestMemoryMmap) -> vhost::Result<()> {
        // The kernel uses the GPA, size and VMM address of each region (the
        // file offset and fd are vhost-user's); iovmm's RAM is memfd-backed.
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<vhost::Result<Vec<_>>>()?;
        self.set_mem_table(&regions).map(|_| ())
    }

    /// `VHOST_SET_VRING_ADDR`: behind a vIOMMU the ring addresses as IOVAs
    /// (ioctl of ours); without one through the crate, which checks them
    /// against guest memory and passes VMM addresses.
    pub fn set_ring_addresses(
        &self,
        iommu: bool,
        index: usize,
        config: &VringConfigData,
    ) -> vhost::Result<()> {
        if !iommu {
            return self.set_vring_addr(index, config);
        }
        let addr = vhost_vring_addr {
            index: u32::try_from(index).map_err(|_| vhost::Error::InvalidQueue)?,
            flags: 0,
            desc_user_addr: config.desc_table_addr,
            used_user_addr: config.used_ring_addr,
            avail_user_addr: config.avail_ring_addr,
            log_guest_addr: 0,
        };
        // SAFETY: VHOST_SET_VRING_ADDR reads one `struct vhost_vring_addr`,
        // which `addr` is (repr(C) binding) and which lives across the call;
        // the fd is the open vhost-net fd. The return value is checked.
        let rc = unsafe { ioctl_with_ref(self, VHOST_SET_VRING_ADDR(), &addr) };
        if rc < 0 {
            return Err(vhost::Error::IoctlError(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Start (`Some(tap)`) or stop (`None`) ring `index`.
    pub fn set_ring_backend(&self, index: usize, tap: Option<&File>) -> vhost::Result<()> {
        self.net.set_backend(index, tap)
    }

    /// `VHOST_RESET_OWNER`: the kernel frees the device IOTLB, the memory
    /// table and the rings' backends; the fd must be owned again to be used.
    pub fn reset(&self) -> io::Result<()> {
        self.reset_owner().map_err(|e| match e {
            vhost::Error::IoctlError(e) => e,
            other => io::Error::other(other.to_string()),
        })
    }

    /// `VHOST_SET_VRING_KICK` / `VHOST_SET_VRING_CALL` for ring `index`.
    pub fn set_ring_fds(&self, index: usize, kick: &EventFd, call: &EventFd) -> vhost::Result<()> {
        self.set_vring_kick(index, kick)?;
        self.set_vring_call(index, call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_feature_masks_are_bit_numbers_shifted() {
        // QEMU acks `1ULL << VHOST_BACKEND_F_IOTLB_MSG_V2`; vhost-net's
        // VHOST_NET_BACKEND_FEATURES is that same 0x2.
        assert_eq!(BACKEND_IOTLB_MSG_V2, 0x2);
        assert_eq!(BACKEND_IOTLB_BATCH, 0x4);
    }

    #[test]
    fn the_runtime_ioctls_are_distinct_vhost_requests() {
        let io = runtime_ioctls();
        let mut sorted = io.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), io.len());
        // Type byte 0xAF (VHOST_VIRTIO) in every request number.
        assert!(io.iter().all(|r| (r >> 8) & 0xff == 0xaf), "{io:x?}");
        assert!(io.contains(&reset_owner_ioctl()));
    }
}
