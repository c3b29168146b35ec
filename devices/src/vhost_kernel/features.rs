//! Which features go where: what the guest is offered, what the kernel's
//! vhost-net is told (`VHOST_SET_FEATURES`), and what a device behind a
//! vIOMMU requires.

use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use super::kern::BACKEND_IOTLB_MSG_V2;

const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Kernel features the guest may use: mergeable RX buffers and the ring
/// layouts. Checksum and segmentation offloads are not offered (the tap
/// would need TUNSETOFFLOAD); neither are VHOST_NET_F_VIRTIO_NET_HDR (the
/// tap handles the header), the legacy ANY_LAYOUT / NOTIFY_ON_EMPTY,
/// LOG_ALL (no dirty logging) and RING_RESET (not in the transport).
pub const PASSTHROUGH: u64 =
    bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX);
/// Served by iovmm itself (configuration space: MAC, link up).
pub const LOCAL: u64 = bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS);
/// VIRTIO_F_VERSION_1.
pub const VERSION_1: u64 = bit(VIRTIO_F_VERSION_1);
/// VIRTIO_F_ACCESS_PLATFORM: the kernel translates every address through
/// its device IOTLB (allocated empty at `VHOST_SET_FEATURES`).
pub const ACCESS_PLATFORM: u64 = bit(VIRTIO_F_ACCESS_PLATFORM);

/// The features offered to the guest for a kernel offering `kernel`.
pub fn guest_features(kernel: u64, iommu: bool) -> u64 {
    let ap = if iommu { ACCESS_PLATFORM } else { 0 };
    (kernel & PASSTHROUGH) | LOCAL | VERSION_1 | ap
}

/// The `VHOST_SET_FEATURES` value for the driver's `acked` features: the
/// kernel's part of them (never MAC/STATUS, never VHOST_NET_F_VIRTIO_NET_HDR:
/// the 12-byte header goes to the tap as it is).
pub fn kernel_features(acked: u64, kernel: u64) -> u64 {
    acked & kernel & (PASSTHROUGH | VERSION_1 | ACCESS_PLATFORM)
}

/// What the kernel lacks for this device: VERSION_1 always (the transport
/// is modern-only), and behind a vIOMMU ACCESS_PLATFORM and the V2 IOTLB
/// message format (`backend`: the offered backend features).
pub fn missing(kernel: u64, backend: u64, iommu: bool) -> Vec<&'static str> {
    let mut m = Vec::new();
    if kernel & VERSION_1 == 0 {
        m.push("VIRTIO_F_VERSION_1");
    }
    if iommu && kernel & ACCESS_PLATFORM == 0 {
        m.push("VIRTIO_F_ACCESS_PLATFORM");
    }
    if iommu && backend & BACKEND_IOTLB_MSG_V2 == 0 {
        m.push("VHOST_BACKEND_F_IOTLB_MSG_V2");
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Linux 6.12's vhost-net offers: VHOST_FEATURES (NOTIFY_ON_EMPTY,
    /// INDIRECT_DESC, EVENT_IDX, LOG_ALL, ANY_LAYOUT = VIRTIO_NET_HDR,
    /// VERSION_1), MRG_RXBUF, ACCESS_PLATFORM, RING_RESET.
    const LINUX: u64 =
        bit(24) | bit(28) | bit(29) | bit(26) | bit(27) | bit(32) | bit(15) | bit(33) | bit(40);

    #[test]
    fn the_guest_gets_ring_features_mac_status_and_access_platform_only_behind_an_iommu() {
        let on = guest_features(LINUX, true);
        assert_eq!(
            on,
            bit(15) | bit(28) | bit(29) | bit(5) | bit(16) | bit(32) | bit(33)
        );
        assert_eq!(guest_features(LINUX, false), on & !ACCESS_PLATFORM);
    }

    #[test]
    fn the_kernel_never_gets_local_or_header_features() {
        let acked = guest_features(LINUX, true);
        let k = kernel_features(acked, LINUX);
        assert_eq!(k & (LOCAL | bit(27) | bit(24) | bit(26) | bit(40)), 0);
        assert_eq!(k, bit(15) | bit(28) | bit(29) | bit(32) | bit(33));
        // A driver that refused EVENT_IDX: the kernel is not told it.
        assert_eq!(kernel_features(acked & !bit(29), LINUX) & bit(29), 0);
    }

    #[test]
    fn requirements_name_every_missing_feature() {
        assert!(missing(LINUX, BACKEND_IOTLB_MSG_V2, true).is_empty());
        assert!(missing(LINUX & !ACCESS_PLATFORM, 0, false).is_empty());
        assert_eq!(
            missing(LINUX & !ACCESS_PLATFORM & !VERSION_1, 0, true),
            vec![
                "VIRTIO_F_VERSION_1",
                "VIRTIO_F_ACCESS_PLATFORM",
                "VHOST_BACKEND_F_IOTLB_MSG_V2"
            ]
        );
    }
}
