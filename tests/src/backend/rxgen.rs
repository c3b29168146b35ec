//! RX traffic of the test back end: the sequence-frame generator (frames
//! the fast test guest's `net-rx` scenario verifies) and the loop-back of
//! transmitted frames.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iommu::sync::lock;

use super::Shared;

/// Source MAC of generated frames.
pub const GEN_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Frames waiting for a guest buffer before the generator pauses.
pub const MAX_PENDING: usize = 1024;
/// Offset of the little-endian sequence number in a frame.
pub const SEQ_OFF: usize = 14;
/// First pattern byte.
pub const PATTERN_OFF: usize = 22;
/// The guest's `rx_checksum` sums frame bytes from this offset (ethertype).
pub const SUM_OFF: usize = 12;

/// Generated RX traffic: `frames` sequence frames of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxGen {
    /// Number of frames.
    pub frames: u64,
    /// Frame size without the virtio-net header (at least [`PATTERN_OFF`]).
    pub size: usize,
    /// Frames per second; 0 = as fast as the guest posts buffers.
    pub rate: u64,
}

/// Sequence frame `seq` (the layout of `tests/guest/rx.c`): broadcast dst,
/// [`GEN_MAC`] src, ethertype 0x88b5, `seq` LE, byte j = (u8)(seq*31 + j).
pub fn seq_frame(seq: u64, size: usize) -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&GEN_MAC);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend(
        (PATTERN_OFF..size.max(PATTERN_OFF))
            .map(|j| (seq.wrapping_mul(31) as u8).wrapping_add(j as u8)),
    );
    f
}

/// The guest's `rx_checksum` for frames `0..frames` of `size` bytes.
pub fn seq_checksum(frames: u64, size: usize) -> u64 {
    (0..frames).fold(0u64, |sum, seq| {
        seq_frame(seq, size)[SUM_OFF..]
            .iter()
            .fold(sum, |s, b| s.wrapping_add(u64::from(*b)))
    })
}

/// Swaps the destination and source MACs (testpmd's `macswap`).
pub fn mac_swapped(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    if f.len() >= 12 {
        let (dst, rest) = f.split_at_mut(6);
        dst.swap_with_slice(&mut rest[..6]);
    }
    f
}

/// Runs the generator until every frame is queued or the back end stops.
pub(crate) fn generate(shared: &Arc<Shared>, gen: RxGen) {
    let start = Instant::now();
    for seq in 0..gen.frames {
        if gen.rate > 0 {
            // Pacing: frame `seq` is due at start + seq / rate.
            let due = start + Duration::from_secs_f64(seq as f64 / gen.rate as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        while lock(&shared.rx_pending).len() >= MAX_PENDING {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        lock(&shared.rx_pending).push_back(seq_frame(seq, gen.size));
        shared.wake_datapath();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_frame_layout_matches_the_guest() {
        let f = seq_frame(0x0102, 64);
        assert_eq!(f.len(), 64);
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[12..14], &[0x88, 0xb5]);
        assert_eq!(&f[14..22], &0x0102u64.to_le_bytes());
        assert_eq!(f[22], (0x0102u64 * 31 + 22) as u8);
        assert_eq!(f[63], (0x0102u64 * 31 + 63) as u8);
    }

    #[test]
    fn checksum_skips_the_macs_and_macswap_swaps_them() {
        let f = seq_frame(3, 60);
        let s: u64 = f[SUM_OFF..].iter().map(|b| u64::from(*b)).sum();
        assert_eq!(
            seq_checksum(1, 60) + s,
            seq_checksum(1, 60) + seq_checksum(4, 60) - seq_checksum(3, 60)
        );
        let m = mac_swapped(&f);
        assert_eq!(&m[..6], &GEN_MAC);
        assert_eq!(&m[6..12], &[0xff; 6]);
        assert_eq!(m[12..], f[12..]);
    }
}
