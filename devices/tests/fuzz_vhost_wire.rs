//! Hostile-backend fuzzing of the vhost-user IOTLB codec and the back-end request server
//! (proptest, bounded): arbitrary bytes never panic the decoders, whatever they accept
//! re-encodes to the same bytes and respects the protocol bounds, and an arbitrary byte stream
//! on the back-end channel ends the server with a typed error instead of a panic or a hang.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use devices::vhost_user::backend_req::BackendReqServer;
use devices::vhost_user::channel::{IotlbChannel, MockIotlbChannel};
use devices::vhost_user::miss::{MissError, MissHandler, TranslatingHandler};
use devices::vhost_user::wire::*;

fn proptest_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A header that is often valid, sometimes off by one field.
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(1u32), Just(22), 0u32..10, any::<u32>()],
        prop_oneof![Just(1u32), Just(9), Just(5), 0u32..16, any::<u32>()],
        prop_oneof![
            Just(32u32),
            Just(8),
            0u32..40,
            Just(4096),
            Just(4097),
            any::<u32>()
        ],
    )
        .prop_map(|(request, flags, size)| {
            let mut b = request.to_le_bytes().to_vec();
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
            b
        })
}

/// A stream of frames, some well formed (misses, access fails, other requests), some not.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    let iova = prop_oneof![3 => 0u64..0x200_0000, 1 => any::<u64>()];
    let miss = (
        iova,
        0u8..5,
        prop_oneof![3 => Just(1u8), 1 => 0u8..6],
        any::<bool>(),
    )
        .prop_map(|(iova, perm, t, nr)| {
            let mut msg = IotlbMsg::miss(iova, IotlbPerm::ReadOnly);
            msg.perm = perm;
            msg.msg_type = t;
            encode_iotlb_frame(VHOST_USER_BACKEND_IOTLB_MSG, &msg, nr).to_vec()
        });
    prop_oneof![
        4 => miss,
        2 => (header_bytes(), proptest::collection::vec(any::<u8>(), 0..48)).prop_map(|(mut h, p)| {
            h.extend_from_slice(&p);
            h
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

fn translate(iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
    if iova >= 0x100_0000 {
        return Err(MissError::Unmapped { iova });
    }
    Ok(IotlbMsg::update(
        iova & !0xfff,
        0x1000,
        0x7f00_0000_0000 + (iova & !0xfff),
        perm,
    ))
}

/// Counts the misses its inner handler answered.
struct Counting<H> {
    inner: H,
    served: AtomicU64,
}

impl<H: MissHandler> MissHandler for Counting<H> {
    fn answer_miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
        let r = self.inner.answer_miss(iova, perm);
        if r.is_ok() {
            self.served.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

proptest! {
    #![proptest_config(proptest_config(512))]

    #[test]
    fn header_decode_accepts_only_bounded_version_one_headers(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
        if let Ok(h) = Header::decode(&bytes) {
            prop_assert!(h.size as usize <= MAX_PAYLOAD_SIZE);
            prop_assert_eq!(h.flags & FLAG_VERSION_MASK, FLAG_VERSION);
            prop_assert_eq!(h.flags & FLAG_RESERVED_MASK, 0);
            prop_assert_eq!(&h.encode()[..], &bytes[..HEADER_SIZE]);
        } else {
            prop_assert!(bytes.len() < HEADER_SIZE || Header::decode(&bytes[..HEADER_SIZE]).is_err());
        }
    }

    #[test]
    fn iotlb_payload_decode_round_trips(request in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..40)) {
        if let Ok(msg) = IotlbMsg::decode(request, &payload) {
            prop_assert!((IOTLB_MSG_MIN_SIZE..=IOTLB_MSG_SIZE).contains(&payload.len()));
            prop_assert!(msg.kind().is_ok() && msg.permission().is_ok());
            prop_assert_eq!(IotlbMsg::decode(request, &msg.encode()), Ok(msg));
            prop_assert_eq!(&msg.encode()[..IOTLB_MSG_MIN_SIZE], &payload[..IOTLB_MSG_MIN_SIZE]);
        }
    }

    #[test]
    fn ack_decode_checks_flags_code_and_size(
        hdr in header_bytes(),
        payload in proptest::collection::vec(any::<u8>(), 0..12),
        expected in prop_oneof![Just(22u32), any::<u32>()],
    ) {
        if let Ok(h) = Header::decode(&hdr) {
            if let Ok(v) = decode_ack(&h, &payload, expected) {
                prop_assert_eq!(h.flags, FLAG_VERSION | FLAG_REPLY);
                prop_assert_eq!(h.request, expected);
                prop_assert_eq!(payload.len(), U64_PAYLOAD_SIZE);
                prop_assert_eq!(v.to_ne_bytes().to_vec(), payload);
            }
        }
        let _ = backend_request(u32::from_le_bytes(hdr[..4].try_into().unwrap()));
    }
}

proptest! {
    #![proptest_config(proptest_config(48))]

    /// The server never panics and always stops once the stream ends: with a typed error for
    /// a malformed frame, or a clean disconnect. Every UPDATE it sent answers a miss.
    #[test]
    fn arbitrary_backend_streams_end_the_server_cleanly(frames in proptest::collection::vec(frame(), 0..24)) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mock = Arc::new(MockIotlbChannel::new());
        let main: Arc<dyn IotlbChannel> = mock.clone();
        let handler = Arc::new(Counting {
            inner: TranslatingHandler::new(translate, main),
            served: AtomicU64::new(0),
        });
        let server = BackendReqServer::new(ours, handler.clone());
        for f in &frames {
            // The server may already have closed the channel on a malformed frame.
            let _ = theirs.write_all(f);
        }
        let _ = theirs.shutdown(std::net::Shutdown::Write);
        let start = Instant::now();
        let _reason = server.run();
        // A truncated last frame waits at most FRAME_TIMEOUT; EOF ends it at once.
        prop_assert!(start.elapsed() < Duration::from_secs(3));
        let served = handler.served.load(Ordering::Relaxed);
        prop_assert_eq!(mock.sent().len() as u64, served);
        for (msg, need_reply) in mock.sent() {
            prop_assert!(need_reply);
            prop_assert_eq!(msg.kind(), Ok(IotlbType::Update));
        }
    }
}
