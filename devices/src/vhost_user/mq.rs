//! Multiqueue virtio-net (`queues=N`): the queue layout a device presents
//! and what it offers for it.
//!
//! With N > 1 queue pairs the device has 2N data queues (receiveq*k* at
//! 2*k*, transmitq*k* at 2*k*+1) served by the back end, plus a control
//! queue at 2N served by the VMM itself ([`super::ctrl`]). It offers
//! VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ (both served locally, never
//! forwarded as a need of the back end) and `max_virtqueue_pairs` = N in the
//! configuration. A driver that does not accept MQ sees one pair (and the
//! control queue at 2 if it accepted CTRL_VQ). With N = 1 nothing changes:
//! two queues, no control queue.

use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};

use super::kind::VhostUserKind;

/// Most queue pairs a net device can have (`queues=N`).
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// VIRTIO_NET_F_MQ as a mask.
pub const NET_F_MQ: u64 = 1 << VIRTIO_NET_F_MQ;
/// VIRTIO_NET_F_CTRL_VQ as a mask.
pub const NET_F_CTRL_VQ: u64 = 1 << VIRTIO_NET_F_CTRL_VQ;
/// Offset of `max_virtqueue_pairs` in `struct virtio_net_config`.
const MAX_PAIRS_OFFSET: usize = 8;

/// The queues of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLayout {
    kind: VhostUserKind,
    pairs: u16,
}

/// `queues=N` is out of range for the device type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{pairs} queue pairs requested; a net device has 1..={MAX_QUEUE_PAIRS}, a blk device 1")]
pub struct BadQueuePairs {
    /// What was asked for.
    pub pairs: u16,
}

impl QueueLayout {
    /// The layout of a `kind` device with `pairs` queue pairs (net) or 1 (blk).
    pub fn new(kind: VhostUserKind, pairs: u16) -> Result<Self, BadQueuePairs> {
        let ok = match kind {
            VhostUserKind::Net => (1..=MAX_QUEUE_PAIRS).contains(&pairs),
            VhostUserKind::Blk => pairs == 1,
        };
        if !ok {
            return Err(BadQueuePairs { pairs });
        }
        Ok(QueueLayout { kind, pairs })
    }

    /// The device type.
    pub fn kind(&self) -> VhostUserKind {
        self.kind
    }

    /// Queue pairs (1 for blk).
    pub fn pairs(&self) -> u16 {
        self.pairs
    }

    /// Whether this is a multiqueue net device (a control queue, MQ offered).
    pub fn multiqueue(&self) -> bool {
        self.kind == VhostUserKind::Net && self.pairs > 1
    }

    /// Queues the back end serves at most (the data queues).
    pub fn backend_queues(&self) -> usize {
        match self.kind {
            VhostUserKind::Net => 2 * usize::from(self.pairs),
            VhostUserKind::Blk => self.kind.num_queues(),
        }
    }

    /// Queues the device presents to the driver (data + control).
    pub fn device_queues(&self) -> usize {
        self.backend_queues() + usize::from(self.multiqueue())
    }

    /// Features the frontend serves itself on top of the kind's.
    pub fn local_features(&self) -> u64 {
        if self.multiqueue() {
            NET_F_MQ | NET_F_CTRL_VQ
        } else {
            0
        }
    }

    /// Length of the configuration space (with `max_virtqueue_pairs` for MQ).
    pub fn config_len(&self) -> usize {
        if self.multiqueue() {
            self.kind.config_len().max(MAX_PAIRS_OFFSET + 2)
        } else {
            self.kind.config_len()
        }
    }

    /// Length of the configuration read from a back end (CONFIG protocol
    /// feature): the kind's, `max_virtqueue_pairs` is always ours.
    pub fn backend_config_len(&self) -> usize {
        self.kind.config_len()
    }

    /// Put `max_virtqueue_pairs` into a configuration (padded to
    /// [`QueueLayout::config_len`]).
    pub fn patch_config(&self, config: &mut Vec<u8>) {
        if !self.multiqueue() {
            return;
        }
        config.resize(self.config_len(), 0);
        config[MAX_PAIRS_OFFSET..MAX_PAIRS_OFFSET + 2].copy_from_slice(&self.pairs.to_le_bytes());
    }

    /// How many queues the driver must enable for the features it acked,
    /// and the index of the control queue among them.
    pub fn active(&self, acked: u64) -> (usize, Option<usize>) {
        if !self.multiqueue() {
            return (self.kind.num_queues(), None);
        }
        if acked & NET_F_MQ != 0 {
            let data = self.backend_queues();
            (data + 1, Some(data))
        } else if acked & NET_F_CTRL_VQ != 0 {
            (3, Some(2))
        } else {
            (2, None)
        }
    }

    /// Data queues enabled in the back end before the driver chose a pair
    /// count: one pair with MQ acked (virtio-net starts with one), else
    /// every data queue the driver enabled.
    pub fn initially_enabled(&self, acked: u64) -> usize {
        if self.multiqueue() && acked & NET_F_MQ != 0 {
            2
        } else {
            self.active(acked).1.unwrap_or(self.active(acked).0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pair_is_the_plain_layout() {
        let l = QueueLayout::new(VhostUserKind::Net, 1).unwrap_or_else(|e| panic!("{e}"));
        assert!(!l.multiqueue());
        assert_eq!((l.backend_queues(), l.device_queues()), (2, 2));
        assert_eq!(l.local_features(), 0);
        assert_eq!(l.config_len(), 8);
        assert_eq!(l.active(u64::MAX), (2, None));
        assert_eq!(l.initially_enabled(u64::MAX), 2);
        let mut c = vec![1u8; 8];
        l.patch_config(&mut c);
        assert_eq!(c, vec![1u8; 8]);
    }

    #[test]
    fn n_pairs_have_2n_data_queues_and_a_control_queue() {
        let l = QueueLayout::new(VhostUserKind::Net, 4).unwrap_or_else(|e| panic!("{e}"));
        assert!(l.multiqueue());
        assert_eq!((l.backend_queues(), l.device_queues()), (8, 9));
        assert_eq!(l.local_features(), (1 << 22) | (1 << 17));
        assert_eq!(l.active(NET_F_MQ | NET_F_CTRL_VQ), (9, Some(8)));
        assert_eq!(l.active(NET_F_CTRL_VQ), (3, Some(2)));
        assert_eq!(l.active(0), (2, None));
        assert_eq!(l.initially_enabled(NET_F_MQ | NET_F_CTRL_VQ), 2);
        assert_eq!(l.initially_enabled(NET_F_CTRL_VQ), 2);
        assert_eq!(l.initially_enabled(0), 2);
        let mut c = vec![2, 0, 0, 0, 0, 1, 1, 0];
        l.patch_config(&mut c);
        assert_eq!(c, vec![2, 0, 0, 0, 0, 1, 1, 0, 4, 0]);
        assert_eq!(c.len(), l.config_len());
    }

    #[test]
    fn out_of_range_pair_counts_are_refused() {
        for (kind, pairs) in [
            (VhostUserKind::Net, 0),
            (VhostUserKind::Net, MAX_QUEUE_PAIRS + 1),
            (VhostUserKind::Blk, 2),
            (VhostUserKind::Blk, 0),
        ] {
            assert_eq!(
                QueueLayout::new(kind, pairs),
                Err(BadQueuePairs { pairs }),
                "{kind:?} {pairs}"
            );
        }
        assert!(QueueLayout::new(VhostUserKind::Net, MAX_QUEUE_PAIRS).is_ok());
    }
}
