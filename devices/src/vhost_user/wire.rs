//! The vhost-user wire format for the IOTLB messages that vhost 0.18 cannot
//! send or receive: the 12-byte message header, the 32-byte
//! `struct vhost_iotlb_msg` payload and the u64 reply-ack payload.
//!
//! Every field is native-endian, as on the wire (the protocol is host-local).
//! Decoding is strict: the version must be 1, reserved flag bits must be zero,
//! the header's `size` must match the payload that is expected for the
//! message, and nothing larger than [`MAX_PAYLOAD_SIZE`] is ever accepted.

use thiserror::Error;
use vhost::vhost_user::message::{
    BackendReq, FrontendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures, MAX_MSG_SIZE,
};
use virtio_bindings::virtio_config;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Size of the vhost-user message header in bytes.
pub const HEADER_SIZE: usize = 12;
/// Size of `struct vhost_iotlb_msg` as QEMU and DPDK send it (x86-64 layout).
pub const IOTLB_MSG_SIZE: usize = 32;
/// Smallest IOTLB payload accepted: the spec's table without tail padding.
pub const IOTLB_MSG_MIN_SIZE: usize = 26;
/// Size of the u64 payload of a reply-ack.
pub const U64_PAYLOAD_SIZE: usize = 8;
/// Largest payload accepted from a peer (the vhost crate's `MAX_MSG_SIZE`).
pub const MAX_PAYLOAD_SIZE: usize = MAX_MSG_SIZE;

/// Header flags: protocol version 1 in bits 1:0.
pub const FLAG_VERSION: u32 = 0x1;
/// Header flags: mask of the version bits.
pub const FLAG_VERSION_MASK: u32 = VhostUserHeaderFlag::VERSION.bits();
/// Header flags: the message is a reply.
pub const FLAG_REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
/// Header flags: the sender wants a reply-ack.
pub const FLAG_NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();
/// Header flags: bits that must be zero.
pub const FLAG_RESERVED_MASK: u32 = VhostUserHeaderFlag::RESERVED_BITS.bits();

/// Front-end request: VHOST_USER_SET_BACKEND_REQ_FD.
pub const VHOST_USER_SET_BACKEND_REQ_FD: u32 = FrontendReq::SET_BACKEND_REQ_FD as u32;
/// Front-end request: VHOST_USER_IOTLB_MSG.
pub const VHOST_USER_IOTLB_MSG: u32 = FrontendReq::IOTLB_MSG as u32;
/// Back-end request: VHOST_USER_BACKEND_IOTLB_MSG.
pub const VHOST_USER_BACKEND_IOTLB_MSG: u32 = BackendReq::IOTLB_MSG as u32;

/// Virtio feature mask: VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
/// Virtio feature mask: VIRTIO_F_ACCESS_PLATFORM (old name IOMMU_PLATFORM).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << virtio_config::VIRTIO_F_ACCESS_PLATFORM;
/// Virtio feature bit 30: the back end speaks protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// Protocol feature: MQ (bit 0).
pub const PROTOCOL_F_MQ: u64 = VhostUserProtocolFeatures::MQ.bits();
/// Protocol feature: REPLY_ACK (bit 3).
pub const PROTOCOL_F_REPLY_ACK: u64 = VhostUserProtocolFeatures::REPLY_ACK.bits();
/// Protocol feature: BACKEND_REQ (bit 5).
pub const PROTOCOL_F_BACKEND_REQ: u64 = VhostUserProtocolFeatures::BACKEND_REQ.bits();
/// Protocol feature: CONFIG (bit 9).
pub const PROTOCOL_F_CONFIG: u64 = VhostUserProtocolFeatures::CONFIG.bits();

/// Errors found while decoding or encoding vhost-user frames.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("vhost-user frame too short: got {got} bytes, need {need}; the peer sent a truncated message")]
    Short {
        /// Bytes available.
        got: usize,
        /// Bytes required.
        need: usize,
    },
    /// The version bits of the flags are not 1.
    #[error(
        "vhost-user header version {0} is not 1; the peer speaks an unknown protocol revision"
    )]
    BadVersion(u32),
    /// Reserved flag bits are set.
    #[error("vhost-user header flags {0:#x} set reserved bits; the peer is not a vhost-user peer")]
    ReservedFlags(u32),
    /// The header's size exceeds [`MAX_PAYLOAD_SIZE`].
    #[error(
        "vhost-user payload size {0} exceeds the {MAX_PAYLOAD_SIZE}-byte maximum; message refused"
    )]
    Oversized(u32),
    /// The header's size does not fit the message kind.
    #[error("vhost-user request {request} carries {got} payload bytes, expected {expected}")]
    SizeMismatch {
        /// Request code.
        request: u32,
        /// Size found in the header.
        got: u32,
        /// Size (or lower bound) expected.
        expected: usize,
    },
    /// A request code this side does not know.
    #[error("unknown vhost-user request code {0}")]
    UnknownRequest(u32),
    /// IOTLB message type outside MISS..=ACCESS_FAIL.
    #[error("unknown IOTLB message type {0}; expected 1 (miss) to 4 (access fail)")]
    UnknownIotlbType(u8),
    /// IOTLB permission outside 0..=3.
    #[error("invalid IOTLB permission {0}; expected 0 (none) to 3 (read-write)")]
    BadPerm(u8),
    /// A reply whose flags are not exactly VERSION | REPLY.
    #[error("vhost-user reply flags {0:#x} are not 0x5 (version 1, reply)")]
    BadReplyFlags(u32),
    /// A reply for a different request.
    #[error("vhost-user reply is for request {got}, expected a reply to request {expected}")]
    ReplyMismatch {
        /// Request code the reply carries.
        got: u32,
        /// Request code that was sent.
        expected: u32,
    },
}

/// The 12-byte vhost-user message header.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Header {
    /// Request code (front-end or back-end request space, by channel).
    pub request: u32,
    /// Version and REPLY/NEED_REPLY flags.
    pub flags: u32,
    /// Number of payload bytes that follow.
    pub size: u32,
}

impl Header {
    /// A request header with version 1 and optionally NEED_REPLY.
    pub fn request(request: u32, size: u32, need_reply: bool) -> Self {
        let flags = FLAG_VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        Header {
            request,
            flags,
            size,
        }
    }

    /// A reply header: flags exactly VERSION | REPLY, as QEMU requires.
    pub fn reply(request: u32, size: u32) -> Self {
        Header {
            request,
            flags: FLAG_VERSION | FLAG_REPLY,
            size,
        }
    }

    /// Decode and validate a header: version 1, no reserved bits, bounded size.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let raw = bytes.get(..HEADER_SIZE).ok_or(WireError::Short {
            got: bytes.len(),
            need: HEADER_SIZE,
        })?;
        let hdr = Header::read_from_bytes(raw).map_err(|_| WireError::Short {
            got: bytes.len(),
            need: HEADER_SIZE,
        })?;
        let version = hdr.flags & FLAG_VERSION_MASK;
        if version != FLAG_VERSION {
            return Err(WireError::BadVersion(version));
        }
        if hdr.flags & FLAG_RESERVED_MASK != 0 {
            return Err(WireError::ReservedFlags(hdr.flags));
        }
        if hdr.size as usize > MAX_PAYLOAD_SIZE {
            return Err(WireError::Oversized(hdr.size));
        }
        Ok(hdr)
    }

    /// The header as its 12 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out.copy_from_slice(self.as_bytes());
        out
    }

    /// Whether the sender asked for a reply-ack.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }
}

/// `vhost_iotlb_msg.type` values; vhost-user uses MISS..=ACCESS_FAIL.
pub use vhost::VhostIotlbType as IotlbType;

/// The `vhost_iotlb_msg.type` values vhost-user carries (not the kernel's
/// EMPTY and BATCH_* values).
const VHOST_USER_IOTLB_TYPES: [IotlbType; 4] = [
    IotlbType::Miss,
    IotlbType::Update,
    IotlbType::Invalidate,
    IotlbType::AccessFail,
];

/// `vhost_iotlb_msg.perm`: what the *device* may do with the memory
/// (the vhost crate's `VhostAccess`: `No`, `ReadOnly`, `WriteOnly`, `ReadWrite`).
pub use vhost::VhostAccess as IotlbPerm;

/// What the vhost crate's access type lacks for the IOTLB checks.
pub trait Grants {
    /// Whether `self` grants every access `wanted` asks for.
    fn allows(self, wanted: IotlbPerm) -> bool;
}

impl Grants for IotlbPerm {
    fn allows(self, wanted: IotlbPerm) -> bool {
        (self as u8) & (wanted as u8) == wanted as u8
    }
}

/// Decodes a `vhost_iotlb_msg.perm` byte.
pub fn perm_from_u8(v: u8) -> Result<IotlbPerm, WireError> {
    [
        IotlbPerm::No,
        IotlbPerm::ReadOnly,
        IotlbPerm::WriteOnly,
        IotlbPerm::ReadWrite,
    ]
    .into_iter()
    .find(|p| *p as u8 == v)
    .ok_or(WireError::BadPerm(v))
}

/// `struct vhost_iotlb_msg`, 32 bytes with explicit zero tail padding.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct IotlbMsg {
    /// I/O virtual address.
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Front-end virtual address (inside a SET_MEM_TABLE region).
    pub uaddr: u64,
    /// Raw [`IotlbPerm`] value.
    pub perm: u8,
    /// Raw [`IotlbType`] value.
    pub msg_type: u8,
    /// Tail padding, sent as zero and ignored on receipt.
    pub padding: [u8; 6],
}

impl IotlbMsg {
    fn new(kind: IotlbType, iova: u64, size: u64, uaddr: u64, perm: IotlbPerm) -> Self {
        IotlbMsg {
            iova,
            size,
            uaddr,
            perm: perm as u8,
            msg_type: kind as u8,
            padding: [0; 6],
        }
    }

    /// An UPDATE installing `iova..iova+size -> uaddr` with `perm`.
    pub fn update(iova: u64, size: u64, uaddr: u64, perm: IotlbPerm) -> Self {
        Self::new(IotlbType::Update, iova, size, uaddr, perm)
    }

    /// An INVALIDATE of `iova..iova+size` (uaddr and perm zero).
    pub fn invalidate(iova: u64, size: u64) -> Self {
        Self::new(IotlbType::Invalidate, iova, size, 0, IotlbPerm::No)
    }

    /// A MISS asking for a translation of `iova` with `perm`.
    pub fn miss(iova: u64, perm: IotlbPerm) -> Self {
        Self::new(IotlbType::Miss, iova, 0, 0, perm)
    }

    /// The message type, validated.
    pub fn kind(&self) -> Result<IotlbType, WireError> {
        VHOST_USER_IOTLB_TYPES
            .into_iter()
            .find(|t| *t as u8 == self.msg_type)
            .ok_or(WireError::UnknownIotlbType(self.msg_type))
    }

    /// The permission, validated.
    pub fn permission(&self) -> Result<IotlbPerm, WireError> {
        perm_from_u8(self.perm)
    }

    /// Decode a payload of 26 to 32 bytes; type and perm must be known.
    ///
    /// `request` is only used for the error message.
    pub fn decode(request: u32, payload: &[u8]) -> Result<Self, WireError> {
        if !(IOTLB_MSG_MIN_SIZE..=IOTLB_MSG_SIZE).contains(&payload.len()) {
            return Err(WireError::SizeMismatch {
                request,
                got: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                expected: IOTLB_MSG_SIZE,
            });
        }
        let mut raw = [0u8; IOTLB_MSG_SIZE];
        raw[..payload.len()].copy_from_slice(payload);
        let mut msg = IotlbMsg::read_from_bytes(&raw[..]).map_err(|_| WireError::Short {
            got: payload.len(),
            need: IOTLB_MSG_SIZE,
        })?;
        msg.padding = [0; 6];
        msg.kind()?;
        msg.permission()?;
        Ok(msg)
    }

    /// The payload as its 32 wire bytes.
    pub fn encode(&self) -> [u8; IOTLB_MSG_SIZE] {
        let mut out = [0u8; IOTLB_MSG_SIZE];
        out.copy_from_slice(self.as_bytes());
        out[IOTLB_MSG_MIN_SIZE..].fill(0);
        out
    }
}

/// Full size of an IOTLB frame: header plus 32-byte payload.
pub const IOTLB_FRAME_SIZE: usize = HEADER_SIZE + IOTLB_MSG_SIZE;
/// Full size of a u64 frame: header plus 8-byte payload.
pub const U64_FRAME_SIZE: usize = HEADER_SIZE + U64_PAYLOAD_SIZE;

/// Encode a complete IOTLB request frame (header + payload).
pub fn encode_iotlb_frame(
    request: u32,
    msg: &IotlbMsg,
    need_reply: bool,
) -> [u8; IOTLB_FRAME_SIZE] {
    let mut out = [0u8; IOTLB_FRAME_SIZE];
    let hdr = Header::request(request, IOTLB_MSG_SIZE as u32, need_reply);
    out[..HEADER_SIZE].copy_from_slice(&hdr.encode());
    out[HEADER_SIZE..].copy_from_slice(&msg.encode());
    out
}

/// Encode a u64 frame with the given header (used for reply-acks).
pub fn encode_u64_frame(hdr: Header, value: u64) -> [u8; U64_FRAME_SIZE] {
    let mut out = [0u8; U64_FRAME_SIZE];
    let hdr = Header {
        size: U64_PAYLOAD_SIZE as u32,
        ..hdr
    };
    out[..HEADER_SIZE].copy_from_slice(&hdr.encode());
    out[HEADER_SIZE..].copy_from_slice(&value.to_ne_bytes());
    out
}

/// Encode a reply-ack to `request` carrying `value` (0 = success).
pub fn encode_ack(request: u32, value: u64) -> [u8; U64_FRAME_SIZE] {
    encode_u64_frame(Header::reply(request, 0), value)
}

/// Decode the u64 payload of a message whose header is already checked.
pub fn decode_u64(hdr: &Header, payload: &[u8]) -> Result<u64, WireError> {
    if hdr.size as usize != U64_PAYLOAD_SIZE || payload.len() != U64_PAYLOAD_SIZE {
        return Err(WireError::SizeMismatch {
            request: hdr.request,
            got: hdr.size,
            expected: U64_PAYLOAD_SIZE,
        });
    }
    let mut raw = [0u8; U64_PAYLOAD_SIZE];
    raw.copy_from_slice(payload);
    Ok(u64::from_ne_bytes(raw))
}

/// Validate a reply-ack header for `expected` and return its u64 value.
///
/// Flags must be exactly VERSION | REPLY and the request must match.
pub fn decode_ack(hdr: &Header, payload: &[u8], expected: u32) -> Result<u64, WireError> {
    if hdr.flags != FLAG_VERSION | FLAG_REPLY {
        return Err(WireError::BadReplyFlags(hdr.flags));
    }
    if hdr.request != expected {
        return Err(WireError::ReplyMismatch {
            got: hdr.request,
            expected,
        });
    }
    decode_u64(hdr, payload)
}

/// Decode a back-end → front-end request code.
pub fn backend_request(code: u32) -> Result<BackendReq, WireError> {
    BackendReq::try_from(code).map_err(|()| WireError::UnknownRequest(code))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn update_frame_matches_golden_bytes() {
        let msg = IotlbMsg::update(0x1000, 0x2000, 0x7f00_0000_1000, IotlbPerm::ReadWrite);
        let frame = encode_iotlb_frame(VHOST_USER_IOTLB_MSG, &msg, true);
        let mut golden = Vec::new();
        golden.extend_from_slice(&22u32.to_le_bytes());
        golden.extend_from_slice(&0x9u32.to_le_bytes());
        golden.extend_from_slice(&32u32.to_le_bytes());
        golden.extend_from_slice(&0x1000u64.to_le_bytes());
        golden.extend_from_slice(&0x2000u64.to_le_bytes());
        golden.extend_from_slice(&0x7f00_0000_1000u64.to_le_bytes());
        golden.extend_from_slice(&[3, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(frame.len(), 44);
        assert_eq!(&frame[..], &golden[..]);
    }

    #[test]
    fn miss_without_need_reply_has_flags_one() {
        let frame = encode_iotlb_frame(
            VHOST_USER_BACKEND_IOTLB_MSG,
            &IotlbMsg::miss(0xabc000, IotlbPerm::WriteOnly),
            false,
        );
        assert_eq!(&frame[..12], &[1, 0, 0, 0, 1, 0, 0, 0, 32, 0, 0, 0]);
        assert_eq!(frame[HEADER_SIZE + 24], 2);
        assert_eq!(frame[HEADER_SIZE + 25], 1);
    }

    #[test]
    fn ack_frame_matches_golden_bytes() {
        let frame = encode_ack(VHOST_USER_IOTLB_MSG, 1);
        assert_eq!(
            &frame[..],
            &[22, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn iotlb_msg_round_trips_and_clears_padding() {
        let msg = IotlbMsg::update(0xfff0_0000, 4096, 0x1234_5000, IotlbPerm::ReadOnly);
        let mut bytes = msg.encode();
        bytes[30] = 0xee;
        let back = IotlbMsg::decode(VHOST_USER_IOTLB_MSG, &bytes).unwrap();
        assert_eq!(back, msg);
        assert_eq!(back.kind().unwrap(), IotlbType::Update);
    }

    #[test]
    fn iotlb_decode_accepts_unpadded_26_bytes() {
        let msg = IotlbMsg::invalidate(0x4000, 0x1000);
        let bytes = msg.encode();
        assert_eq!(IotlbMsg::decode(22, &bytes[..26]).unwrap(), msg);
    }

    #[test]
    fn iotlb_decode_rejects_wrong_sizes() {
        let bytes = [0u8; 40];
        for len in [0usize, 8, 25, 33, 40] {
            assert!(matches!(
                IotlbMsg::decode(22, &bytes[..len]),
                Err(WireError::SizeMismatch { got, .. }) if got as usize == len
            ));
        }
    }

    #[test]
    fn iotlb_decode_rejects_unknown_type_and_perm() {
        let mut bytes = IotlbMsg::miss(0, IotlbPerm::ReadOnly).encode();
        bytes[25] = 5;
        assert_eq!(
            IotlbMsg::decode(1, &bytes),
            Err(WireError::UnknownIotlbType(5))
        );
        bytes[25] = 0;
        assert_eq!(
            IotlbMsg::decode(1, &bytes),
            Err(WireError::UnknownIotlbType(0))
        );
        bytes[25] = 1;
        bytes[24] = 4;
        assert_eq!(IotlbMsg::decode(1, &bytes), Err(WireError::BadPerm(4)));
    }

    #[test]
    fn header_decode_rejects_short_input() {
        assert_eq!(
            Header::decode(&[1, 0, 0, 0, 1]),
            Err(WireError::Short { got: 5, need: 12 })
        );
    }

    #[test]
    fn header_decode_rejects_bad_version_and_reserved_bits() {
        let mut hdr = Header::request(1, 0, false);
        hdr.flags = 0x2;
        assert_eq!(Header::decode(&hdr.encode()), Err(WireError::BadVersion(2)));
        hdr.flags = 0x0;
        assert_eq!(Header::decode(&hdr.encode()), Err(WireError::BadVersion(0)));
        hdr.flags = 0x11;
        assert_eq!(
            Header::decode(&hdr.encode()),
            Err(WireError::ReservedFlags(0x11))
        );
    }

    #[test]
    fn header_decode_rejects_oversized_payload() {
        let hdr = Header::request(1, MAX_PAYLOAD_SIZE as u32 + 1, false);
        assert_eq!(
            Header::decode(&hdr.encode()),
            Err(WireError::Oversized(MAX_PAYLOAD_SIZE as u32 + 1))
        );
        let ok = Header::request(1, MAX_PAYLOAD_SIZE as u32, true);
        assert_eq!(Header::decode(&ok.encode()).unwrap(), ok);
    }

    #[test]
    fn ack_decode_checks_flags_request_and_size() {
        let frame = encode_ack(22, 0);
        let hdr = Header::decode(&frame).unwrap();
        assert_eq!(decode_ack(&hdr, &frame[12..], 22).unwrap(), 0);
        assert_eq!(
            decode_ack(&hdr, &frame[12..], 21),
            Err(WireError::ReplyMismatch {
                got: 22,
                expected: 21
            })
        );
        let req = Header::request(22, 8, false);
        assert_eq!(
            decode_ack(&req, &frame[12..], 22),
            Err(WireError::BadReplyFlags(1))
        );
        let short = Header::reply(22, 4);
        assert!(matches!(
            decode_ack(&short, &frame[12..16], 22),
            Err(WireError::SizeMismatch { got: 4, .. })
        ));
    }

    #[test]
    fn constants_from_vhost_and_virtio_bindings_match_the_spec() {
        assert_eq!(MAX_PAYLOAD_SIZE, 0x1000);
        assert_eq!(
            (FLAG_VERSION_MASK, FLAG_REPLY, FLAG_NEED_REPLY),
            (0x3, 0x4, 0x8)
        );
        assert_eq!(FLAG_RESERVED_MASK, !0xf);
        assert_eq!(
            (
                VHOST_USER_SET_BACKEND_REQ_FD,
                VHOST_USER_IOTLB_MSG,
                VHOST_USER_BACKEND_IOTLB_MSG
            ),
            (21, 22, 1)
        );
        assert_eq!(
            (VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM),
            (1 << 32, 1 << 33)
        );
        assert_eq!(VHOST_USER_F_PROTOCOL_FEATURES, 1 << 30);
        assert_eq!(
            (
                PROTOCOL_F_MQ,
                PROTOCOL_F_REPLY_ACK,
                PROTOCOL_F_BACKEND_REQ,
                PROTOCOL_F_CONFIG
            ),
            (1, 1 << 3, 1 << 5, 1 << 9)
        );
        let types = VHOST_USER_IOTLB_TYPES.map(|t| t as u8);
        assert_eq!(types, [1, 2, 3, 4]);
        let perms = [
            IotlbPerm::No,
            IotlbPerm::ReadOnly,
            IotlbPerm::WriteOnly,
            IotlbPerm::ReadWrite,
        ];
        assert_eq!(perms.map(|p| p as u8), [0, 1, 2, 3]);
    }

    #[test]
    fn backend_request_decode_rejects_unknown_codes() {
        assert_eq!(backend_request(1).unwrap(), BackendReq::IOTLB_MSG);
        assert_eq!(
            backend_request(8).unwrap(),
            BackendReq::SHARED_OBJECT_LOOKUP
        );
        assert_eq!(backend_request(0), Err(WireError::UnknownRequest(0)));
        assert_eq!(backend_request(99), Err(WireError::UnknownRequest(99)));
    }

    #[test]
    fn perm_allows_is_subset_check() {
        assert!(IotlbPerm::ReadWrite.allows(IotlbPerm::WriteOnly));
        assert!(IotlbPerm::ReadOnly.allows(IotlbPerm::No));
        assert!(!IotlbPerm::ReadOnly.allows(IotlbPerm::WriteOnly));
        assert!(!IotlbPerm::WriteOnly.allows(IotlbPerm::ReadWrite));
    }
}
