//! What differs between vhost-user device types: the virtio device id, the
//! queues, which back-end features may reach the guest, and where the
//! device configuration space comes from.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_NET};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Configuration length of a locally served virtio-net configuration:
/// mac[6] + status u16.
const NET_CONFIG_LEN: usize = 8;
/// Configuration length of virtio-blk: `struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding.
const BLK_CONFIG_LEN: usize = 60;

/// The vhost-user device types this frontend can present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhostUserKind {
    /// virtio-net: queue 0 receive, queue 1 transmit.
    Net,
    /// virtio-blk: one request queue.
    Blk,
}

const fn bits(list: &[u32]) -> u64 {
    let mut v = 0u64;
    let mut i = 0;
    while i < list.len() {
        v |= 1u64 << list[i];
        i += 1;
    }
    v
}

const RING: u64 = bits(&[VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX]);

/// Driver can receive TSOv4 .. UFO, device can send them (bits 7..=14).
const NET_OFFLOADS: [u32; 8] = [
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_UFO,
];

const NET_DATA: u64 = bits(&[
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_MRG_RXBUF,
]) | bits(&NET_OFFLOADS)
    | RING;

const BLK_CONFIG_FIELDS: u64 = bits(&[
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
]);

const BLK_DATA: u64 = bits(&[VIRTIO_BLK_F_RO, VIRTIO_BLK_F_FLUSH]) | RING;

impl VhostUserKind {
    /// The virtio device id.
    pub fn device_type(self) -> u32 {
        match self {
            VhostUserKind::Net => VIRTIO_ID_NET,
            VhostUserKind::Blk => VIRTIO_ID_BLOCK,
        }
    }

    /// Number of virtqueues (all mandatory).
    pub fn num_queues(self) -> usize {
        match self {
            VhostUserKind::Net => 2,
            VhostUserKind::Blk => 1,
        }
    }

    /// Whether the back end is expected to complete the buffers of
    /// `queue` promptly once the driver posts them (the stall detector
    /// watches only those): net TX and blk requests, not net RX, whose
    /// buffers wait for incoming frames for as long as there are none.
    pub fn completes_promptly(self, queue: usize) -> bool {
        match self {
            VhostUserKind::Net => queue % 2 == 1,
            VhostUserKind::Blk => true,
        }
    }

    /// A short name for log lines.
    pub fn name(self) -> &'static str {
        match self {
            VhostUserKind::Net => "vhost-user-net",
            VhostUserKind::Blk => "vhost-user-blk",
        }
    }

    /// Length of the device configuration space.
    pub fn config_len(self) -> usize {
        match self {
            VhostUserKind::Net => NET_CONFIG_LEN,
            VhostUserKind::Blk => BLK_CONFIG_LEN,
        }
    }

    /// Device-type features of the back end that may be offered to the
    /// guest. Features needing a queue or a configuration field this
    /// frontend does not provide (control queue, multiqueue, MTU, ...) are
    /// left out. With `backend_config` (the CONFIG protocol feature), the
    /// configuration comes from the back end, so the features describing
    /// its fields pass too.
    pub fn passthrough_features(self, backend_config: bool) -> u64 {
        match (self, backend_config) {
            (VhostUserKind::Net, false) => NET_DATA,
            (VhostUserKind::Net, true) => NET_DATA | bits(&[VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS]),
            (VhostUserKind::Blk, false) => BLK_DATA,
            (VhostUserKind::Blk, true) => BLK_DATA | BLK_CONFIG_FIELDS,
        }
    }

    /// Features the frontend itself implements (they are never sent to the
    /// back end): the MAC address and link status of a locally served
    /// virtio-net configuration.
    pub fn local_features(self, backend_config: bool) -> u64 {
        match (self, backend_config) {
            (VhostUserKind::Net, false) => bits(&[VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS]),
            _ => 0,
        }
    }

    /// The configuration served when the back end has no CONFIG protocol
    /// feature: MAC + link-up status for net, the capacity (in 512-byte
    /// sectors) for blk.
    pub fn local_config(self, mac: [u8; 6], capacity_sectors: u64) -> Vec<u8> {
        match self {
            VhostUserKind::Net => {
                let mut c = mac.to_vec();
                c.extend_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
                c
            }
            VhostUserKind::Blk => {
                let mut c = vec![0u8; BLK_CONFIG_LEN];
                c[..8].copy_from_slice(&capacity_sectors.to_le_bytes());
                c
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_offers_no_control_queue_multiqueue_or_mtu() {
        for cfg in [false, true] {
            let f = VhostUserKind::Net.passthrough_features(cfg);
            for bit in [3u32, 17, 18, 19, 21, 22, 23, 30, 32, 33, 34] {
                assert_eq!(f & (1 << bit), 0, "bit {bit} must not pass");
            }
        }
        assert_eq!(
            VhostUserKind::Net.passthrough_features(false) & (1 << VIRTIO_NET_F_MAC),
            0
        );
        assert_ne!(
            VhostUserKind::Net.local_features(false) & (1 << VIRTIO_NET_F_MAC),
            0
        );
        assert_eq!(VhostUserKind::Net.local_features(true), 0);
    }

    #[test]
    fn feature_masks_have_the_spec_bit_numbers() {
        let set = |list: &[u32]| list.iter().fold(0u64, |v, b| v | 1 << b);
        let net = set(&[0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 28, 29]);
        let blk = set(&[5, 9, 28, 29]);
        let blk_cfg = set(&[1, 2, 4, 6, 10, 13, 14]);
        assert_eq!(VhostUserKind::Net.passthrough_features(false), net);
        assert_eq!(
            VhostUserKind::Net.passthrough_features(true),
            net | set(&[5, 16])
        );
        assert_eq!(VhostUserKind::Net.local_features(false), set(&[5, 16]));
        assert_eq!(VhostUserKind::Blk.passthrough_features(false), blk);
        assert_eq!(VhostUserKind::Blk.passthrough_features(true), blk | blk_cfg);
        assert_eq!(
            (
                VhostUserKind::Net.device_type(),
                VhostUserKind::Blk.device_type()
            ),
            (1, 2)
        );
    }

    #[test]
    fn only_rings_the_back_end_must_drain_are_watched() {
        assert!(!VhostUserKind::Net.completes_promptly(0));
        assert!(VhostUserKind::Net.completes_promptly(1));
        assert!(VhostUserKind::Blk.completes_promptly(0));
    }

    #[test]
    fn blk_config_field_features_need_backend_config() {
        let without = VhostUserKind::Blk.passthrough_features(false);
        let with = VhostUserKind::Blk.passthrough_features(true);
        assert_eq!(without & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
        assert_ne!(with & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
        assert_ne!(without & (1 << VIRTIO_BLK_F_FLUSH), 0);
        // Multiqueue (12) and writeback toggling (11) are never offered.
        assert_eq!(with & (1 << 12 | 1 << 11), 0);
    }

    #[test]
    fn local_configs_have_the_declared_length_and_content() {
        let mac = [2, 0, 0, 0, 0, 1];
        let c = VhostUserKind::Net.local_config(mac, 0);
        assert_eq!(c.len(), VhostUserKind::Net.config_len());
        assert_eq!(c, vec![2, 0, 0, 0, 0, 1, 1, 0]);
        let b = VhostUserKind::Blk.local_config(mac, 0x1234);
        assert_eq!(b.len(), VhostUserKind::Blk.config_len());
        assert_eq!(
            u64::from_le_bytes(b[..8].try_into().unwrap_or_default()),
            0x1234
        );
        assert!(b[8..].iter().all(|x| *x == 0));
    }
}
