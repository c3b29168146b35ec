//! `struct vhost_msg_v2`: the IOTLB message the kernel's vhost reads and
//! writes on the vhost fd once `VHOST_BACKEND_F_IOTLB_MSG_V2` is acked.
//!
//! ```text
//! offset 0   u32  type   2 = VHOST_IOTLB_MSG_V2
//! offset 4   u32  asid   0 (vhost-net has one address space)
//! offset 8   struct vhost_iotlb_msg (32 bytes: iova, size, uaddr, perm, type, padding)
//! offset 40  zero padding of the 64-byte union
//! total 72 bytes
//! ```
//!
//! The payload is the vhost-user IOTLB payload ([`IotlbMsg`], the same C
//! struct), so both transports share one codec for it. Decoding is strict:
//! exactly 72 bytes, type 2, ASID 0, a known IOTLB type and permission.
//! The vhost crate's own parser (`VhostIotlbMsgParser`) transmutes the
//! kernel's type and permission bytes into enums without checking them,
//! which is undefined behaviour for a value outside the enum; this one
//! returns a typed error instead.

use thiserror::Error;
use zerocopy::{FromBytes, IntoBytes};

use crate::vhost_user::wire::{perm_from_u8, IotlbMsg, IotlbType, IOTLB_MSG_SIZE};

/// `VHOST_IOTLB_MSG_V2`: the `type` of a `struct vhost_msg_v2`.
pub const VHOST_IOTLB_MSG_V2: u32 = 2;
/// `VHOST_IOTLB_MSG`: the `type` of the older `struct vhost_msg` (never
/// used once V2 is acked; refused here).
pub const VHOST_IOTLB_MSG_V1: u32 = 1;
/// Size of `struct vhost_msg_v2` (and of `struct vhost_msg`) on x86-64.
pub const VHOST_MSG_V2_SIZE: usize = 72;
/// Offset of `struct vhost_iotlb_msg` inside the message.
const PAYLOAD_OFFSET: usize = 8;

/// `VHOST_IOTLB_BATCH_BEGIN` / `VHOST_IOTLB_BATCH_END`: kernel-only IOTLB
/// types outside the vhost-user set.
const BATCH_TYPES: [u8; 2] = [5, 6];

/// Why bytes read from a vhost fd are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MsgError {
    /// The read returned fewer bytes than a message.
    #[error("vhost IOTLB message is {got} bytes, shorter than the {VHOST_MSG_V2_SIZE}-byte struct vhost_msg_v2")]
    Short {
        /// Bytes read.
        got: usize,
    },
    /// The read returned more bytes than a message.
    #[error("vhost IOTLB message is {got} bytes, longer than the {VHOST_MSG_V2_SIZE}-byte struct vhost_msg_v2")]
    Oversized {
        /// Bytes read.
        got: usize,
    },
    /// The message type is not `VHOST_IOTLB_MSG_V2`.
    #[error("vhost message type {0} is not VHOST_IOTLB_MSG_V2 (2); was IOTLB_MSG_V2 not acked?")]
    BadType(u32),
    /// An address space other than 0.
    #[error("vhost IOTLB message for address space {0}; vhost-net has only address space 0")]
    BadAsid(u32),
    /// An IOTLB type outside MISS..=BATCH_END.
    #[error("vhost IOTLB message type {0} is unknown (expected 1..=6)")]
    UnknownIotlbType(u8),
    /// A permission outside 0..=3.
    #[error("vhost IOTLB permission {0} is invalid (expected 0..=3)")]
    BadPerm(u8),
}

/// One message read from a vhost fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelMsg {
    /// An IOTLB message with a vhost-user type (the kernel sends MISS and,
    /// in principle, ACCESS_FAIL; UPDATE and INVALIDATE only go the other
    /// way).
    Iotlb(IotlbMsg),
    /// `VHOST_IOTLB_BATCH_BEGIN` (5) or `VHOST_IOTLB_BATCH_END` (6): only
    /// the front end sends these.
    Batch(u8),
}

/// The 72 bytes of a `struct vhost_msg_v2` carrying `msg` in ASID 0.
pub fn encode_v2(msg: &IotlbMsg) -> [u8; VHOST_MSG_V2_SIZE] {
    let mut out = [0u8; VHOST_MSG_V2_SIZE];
    out[..4].copy_from_slice(&VHOST_IOTLB_MSG_V2.to_ne_bytes());
    out[PAYLOAD_OFFSET..PAYLOAD_OFFSET + IOTLB_MSG_SIZE].copy_from_slice(&msg.encode());
    out
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_ne_bytes(b)
}

/// Decode exactly one message of `bytes` (the result of one `read`).
pub fn decode_v2(bytes: &[u8]) -> Result<KernelMsg, MsgError> {
    let got = bytes.len();
    match got.cmp(&VHOST_MSG_V2_SIZE) {
        std::cmp::Ordering::Less => return Err(MsgError::Short { got }),
        std::cmp::Ordering::Greater => return Err(MsgError::Oversized { got }),
        std::cmp::Ordering::Equal => {}
    }
    let kind = u32_at(bytes, 0);
    if kind != VHOST_IOTLB_MSG_V2 {
        return Err(MsgError::BadType(kind));
    }
    let asid = u32_at(bytes, 4);
    if asid != 0 {
        return Err(MsgError::BadAsid(asid));
    }
    let payload = &bytes[PAYLOAD_OFFSET..PAYLOAD_OFFSET + IOTLB_MSG_SIZE];
    let mut msg =
        IotlbMsg::read_from_bytes(payload).map_err(|_| MsgError::Short { got: payload.len() })?;
    msg.padding = [0; 6];
    if BATCH_TYPES.contains(&msg.msg_type) {
        return Ok(KernelMsg::Batch(msg.msg_type));
    }
    msg.kind()
        .map_err(|_| MsgError::UnknownIotlbType(msg.msg_type))?;
    perm_from_u8(msg.perm).map_err(|_| MsgError::BadPerm(msg.perm))?;
    Ok(KernelMsg::Iotlb(msg))
}

/// Whether `msg` is a valid message for the kernel to apply (UPDATE with a
/// non-empty range, or INVALIDATE): what [`encode_v2`] callers send.
pub fn is_front_end_message(msg: &IotlbMsg) -> bool {
    match msg.kind() {
        Ok(IotlbType::Update) => msg.size > 0 && msg.permission().is_ok(),
        Ok(IotlbType::Invalidate) => msg.size > 0,
        _ => false,
    }
}

/// The raw bytes of an [`IotlbMsg`] (for tests building odd messages).
pub fn raw_payload(msg: &IotlbMsg) -> &[u8] {
    msg.as_bytes()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::vhost_user::wire::IotlbPerm;

    fn miss_bytes(iova: u64, perm: u8, kind: u8) -> [u8; VHOST_MSG_V2_SIZE] {
        let mut m = IotlbMsg::miss(iova, IotlbPerm::ReadOnly);
        m.perm = perm;
        m.msg_type = kind;
        let mut b = [0u8; VHOST_MSG_V2_SIZE];
        b[..4].copy_from_slice(&VHOST_IOTLB_MSG_V2.to_ne_bytes());
        b[8..40].copy_from_slice(raw_payload(&m));
        b
    }

    #[test]
    fn update_encodes_at_the_kernel_offsets() {
        let m = IotlbMsg::update(0x1000, 0x2000, 0x7f00_0000_1000, IotlbPerm::WriteOnly);
        let b = encode_v2(&m);
        assert_eq!(b.len(), 72);
        assert_eq!(u32_at(&b, 0), 2);
        assert_eq!(u32_at(&b, 4), 0, "asid");
        assert_eq!(&b[8..16], &0x1000u64.to_ne_bytes());
        assert_eq!(&b[16..24], &0x2000u64.to_ne_bytes());
        assert_eq!(&b[24..32], &0x7f00_0000_1000u64.to_ne_bytes());
        assert_eq!((b[32], b[33]), (2, 2), "perm WO, type UPDATE");
        assert!(b[34..].iter().all(|&x| x == 0), "padding is zero");
        assert_eq!(decode_v2(&b).unwrap(), KernelMsg::Iotlb(m));
    }

    #[test]
    fn a_kernel_miss_decodes() {
        let b = miss_bytes(0xdead_b000, 2, 1);
        let KernelMsg::Iotlb(m) = decode_v2(&b).unwrap() else {
            panic!("not an IOTLB message");
        };
        assert_eq!(m.kind().unwrap(), IotlbType::Miss);
        assert_eq!(
            (m.iova, m.permission().unwrap()),
            (0xdead_b000, IotlbPerm::WriteOnly)
        );
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        let good = miss_bytes(0x1000, 1, 1);
        assert_eq!(decode_v2(&good[..71]), Err(MsgError::Short { got: 71 }));
        assert_eq!(decode_v2(&[]), Err(MsgError::Short { got: 0 }));
        let mut long = good.to_vec();
        long.push(0);
        assert_eq!(decode_v2(&long), Err(MsgError::Oversized { got: 73 }));
        let mut v1 = good;
        v1[..4].copy_from_slice(&VHOST_IOTLB_MSG_V1.to_ne_bytes());
        assert_eq!(decode_v2(&v1), Err(MsgError::BadType(1)));
        let mut asid = good;
        asid[4] = 3;
        assert_eq!(decode_v2(&asid), Err(MsgError::BadAsid(3)));
        assert_eq!(
            decode_v2(&miss_bytes(0x1000, 1, 9)),
            Err(MsgError::UnknownIotlbType(9))
        );
        assert_eq!(
            decode_v2(&miss_bytes(0x1000, 1, 0)),
            Err(MsgError::UnknownIotlbType(0))
        );
        assert_eq!(
            decode_v2(&miss_bytes(0x1000, 7, 1)),
            Err(MsgError::BadPerm(7))
        );
    }

    #[test]
    fn batch_markers_are_recognised_not_served() {
        assert_eq!(decode_v2(&miss_bytes(0, 0, 5)), Ok(KernelMsg::Batch(5)));
        assert_eq!(decode_v2(&miss_bytes(0, 0, 6)), Ok(KernelMsg::Batch(6)));
    }

    #[test]
    fn only_non_empty_updates_and_invalidates_go_to_the_kernel() {
        assert!(is_front_end_message(&IotlbMsg::update(
            0,
            1,
            2,
            IotlbPerm::ReadOnly
        )));
        assert!(is_front_end_message(&IotlbMsg::invalidate(0, u64::MAX)));
        assert!(!is_front_end_message(&IotlbMsg::update(
            0,
            0,
            2,
            IotlbPerm::ReadOnly
        )));
        assert!(!is_front_end_message(&IotlbMsg::invalidate(5, 0)));
        assert!(!is_front_end_message(&IotlbMsg::miss(
            5,
            IotlbPerm::ReadOnly
        )));
    }
}
