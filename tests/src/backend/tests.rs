//! In-process tests: a small front-end sequence (the devices crate's
//! `MainSocket` and `BackendReqServer`) drives the test back end over a
//! socketpair with a memfd as guest memory.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use devices::sys::{poll_fds, PollFd};
use devices::vhost_user::backend_req::{BackendReqServer, BackendReqThread};
use devices::vhost_user::channel::{ChannelError, IotlbChannel, MainSocket};
use devices::vhost_user::miss::{MissError, MissHandler, TranslatingHandler};
use devices::vhost_user::wire::*;
use iommu::NotifyError;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::*;

const MEM_SIZE: u64 = 0x10_0000;
/// Pretend front-end virtual address of guest physical 0.
const UBASE: u64 = 0x7f00_0000_0000;
/// IOVAs are GPAs shifted by this (so IOVA != GPA is exercised).
const IOVA_OFF: u64 = 0x4000_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUF: u64 = 0x8000;

struct Rig {
    main: Arc<MainSocket>,
    be: BackendHandle,
    mem: File,
    req: Option<BackendReqThread>,
}

fn rig(config: BackendConfig) -> Rig {
    let (a, b) = UnixStream::pair().unwrap();
    let be = TestBackend::serve_stream(b, config).unwrap();
    let main = Arc::new(MainSocket::new(a, QUEUE_NUM as u64, Duration::from_secs(2)).unwrap());
    Rig {
        main,
        be,
        mem: test_memfd(MEM_SIZE),
        req: None,
    }
}

/// Identity-with-offset translation: IOVA -> GPA - IOVA_OFF, one page.
fn translate(iova: u64, _perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
    let gpa = iova.checked_sub(IOVA_OFF).filter(|g| *g < MEM_SIZE);
    let gpa = gpa.ok_or(MissError::Unmapped { iova })?;
    let page = gpa & !0xfff;
    Ok(IotlbMsg::update(
        IOVA_OFF + page,
        0x1000,
        UBASE + page,
        IotlbPerm::ReadWrite,
    ))
}

impl Rig {
    /// Features, protocol features, owner, memory table, back-end channel.
    fn negotiate(&mut self, features: u64) {
        self.negotiate_with(features, |main| {
            Arc::new(TranslatingHandler::new(translate, main))
        });
    }

    /// `negotiate` with the front end answering misses through the handler `make` builds
    /// over the main socket.
    fn negotiate_with(
        &mut self,
        features: u64,
        make: impl FnOnce(Arc<dyn IotlbChannel>) -> Arc<dyn MissHandler>,
    ) {
        let features = features | VHOST_USER_F_PROTOCOL_FEATURES;
        let mem_fd = self.mem.as_raw_fd();
        self.main
            .with_frontend(|fe| {
                let offered = fe.get_features()?;
                assert_eq!(offered & features, features);
                fe.set_owner()?;
                let proto = fe.get_protocol_features()?;
                fe.set_protocol_features(proto)?;
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                fe.set_features(features)?;
                let region = VhostUserMemoryRegionInfo {
                    guest_phys_addr: 0,
                    memory_size: MEM_SIZE,
                    userspace_addr: UBASE,
                    mmap_offset: 0,
                    mmap_handle: mem_fd,
                };
                fe.set_mem_table(&[region])?;
                Ok(())
            })
            .unwrap();
        let chan = self.main.open_backend_channel().unwrap();
        let srv = BackendReqServer::new(chan, make(self.main.clone()));
        self.req = Some(srv.spawn("test-frontend-req").unwrap());
    }

    /// Set up queue `q` at addresses `base + DESC/AVAIL/USED`.
    fn start_queue(&self, q: usize, base: u64, kick: &EventFd, call: &EventFd) {
        self.main
            .with_frontend(|fe| {
                fe.set_vring_num(q, 8)?;
                let cfg = VringConfigData {
                    queue_max_size: 8,
                    queue_size: 8,
                    flags: 0,
                    desc_table_addr: base + DESC,
                    used_ring_addr: base + USED,
                    avail_ring_addr: base + AVAIL,
                    log_addr: None,
                };
                fe.set_vring_addr(q, &cfg)?;
                fe.set_vring_base(q, 0)?;
                fe.set_vring_call(q, call)?;
                fe.set_vring_kick(q, kick)?;
                fe.set_vring_enable(q, true)
            })
            .unwrap();
    }

    fn put(&self, gpa: u64, bytes: &[u8]) {
        self.mem.write_all_at(bytes, gpa).unwrap();
    }

    fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.mem.read_exact_at(&mut b, gpa).unwrap();
        b
    }

    /// One descriptor at slot 0 and avail idx 1.
    fn post(&self, buf_addr: u64, len: u32, write: bool) {
        let mut d = buf_addr.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&(if write { 2u16 } else { 0 }).to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        self.put(DESC, &d);
        self.put(AVAIL + 4, &0u16.to_le_bytes());
        self.put(AVAIL + 2, &1u16.to_le_bytes());
    }
}

/// Whether `fd` becomes readable within `timeout`.
fn readable_within(fd: &EventFd, timeout: Duration) -> bool {
    poll_fds(&mut [PollFd::readable(fd)], Some(timeout)).is_ok_and(|n| n == 1)
}

fn kick_and_call() -> (EventFd, EventFd) {
    (
        EventFd::new(0).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    )
}

fn requests(be: &BackendHandle) -> Vec<u32> {
    be.records().iter().map(|r| r.request).collect()
}

#[test]
fn negotiation_records_every_message_with_fds() {
    let mut r = rig(BackendConfig::default());
    r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VHOST_USER_F_PROTOCOL_FEATURES);
    assert_eq!(requests(&r.be), vec![1, 3, 15, 16, 2, 5, 21]);
    let recs = r.be.records();
    assert_eq!(recs[5].nfds, 1);
    assert_eq!(recs[6].nfds, 1);
    assert_eq!(recs[4].flags, FLAG_VERSION | FLAG_NEED_REPLY);
    assert_eq!(
        recs[4].payload,
        (VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | VHOST_USER_F_PROTOCOL_FEATURES)
            .to_ne_bytes()
    );
    assert_ne!(r.be.features() & VIRTIO_F_ACCESS_PLATFORM, 0);
    let q = r.main.with_frontend(|fe| fe.get_queue_num()).unwrap();
    assert_eq!(q, QUEUE_NUM as u64);
}

#[test]
fn access_platform_is_not_offered_when_disabled() {
    let r = rig(BackendConfig {
        access_platform: false,
        ..Default::default()
    });
    let f = r.main.with_frontend(|fe| fe.get_features()).unwrap();
    assert_eq!(f & VIRTIO_F_ACCESS_PLATFORM, 0);
    assert!(matches!(
        r.main
            .with_frontend(|fe| fe.set_features(VIRTIO_F_ACCESS_PLATFORM)),
        Ok(())
    ));
    // Not acked with REPLY_ACK, so the refusal is only counted.
    assert!(r
        .be
        .wait_for(Duration::from_secs(2), |c| c.bad_messages == 1));
    assert_eq!(r.be.features(), 0);
}

#[test]
fn iotlb_update_and_invalidate_are_acked_and_probed() {
    let mut r = rig(BackendConfig::default());
    r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
    let upd = IotlbMsg::update(0x9000_0000, 0x2000, UBASE + 0x4000, IotlbPerm::ReadOnly);
    r.main.send_iotlb(&upd, true).unwrap();
    assert!(r.be.probe(0x9000_0000, 0x2000));
    assert!(!r.be.probe(0x9000_0000, 0x2001));
    r.put(0x5000, b"hello");
    assert_eq!(r.be.read(0x9000_1000, 5).unwrap(), b"hello");
    r.main
        .send_iotlb(&IotlbMsg::invalidate(0x9000_1000, 0x1000), true)
        .unwrap();
    assert!(!r.be.probe(0x9000_0000, 1));
    assert_eq!(r.be.iotlb_len(), 0);
    let last = r.be.records().last().cloned().unwrap();
    assert_eq!(last.request, VHOST_USER_IOTLB_MSG);
    assert_eq!(
        last.payload,
        IotlbMsg::invalidate(0x9000_1000, 0x1000).encode()
    );
    let c = r.be.counters();
    assert_eq!((c.iotlb_updates, c.iotlb_invalidates), (1, 1));
}

#[test]
fn update_outside_guest_memory_is_nacked() {
    let mut r = rig(BackendConfig::default());
    r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
    let bad = IotlbMsg::update(0x1000, 0x1000, UBASE + MEM_SIZE, IotlbPerm::ReadWrite);
    assert!(matches!(
        r.main.send_iotlb(&bad, true),
        Err(ChannelError::Nack(1))
    ));
    assert!(!r.be.probe(0x1000, 1));
}

#[test]
fn set_features_flushes_the_iotlb() {
    let mut r = rig(BackendConfig::default());
    let f = VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM;
    r.negotiate(f);
    r.main
        .send_iotlb(
            &IotlbMsg::update(0, 0x1000, UBASE, IotlbPerm::ReadWrite),
            true,
        )
        .unwrap();
    assert!(r.be.probe(0, 0x1000));
    r.main.with_frontend(|fe| fe.set_features(f)).unwrap();
    assert!(!r.be.probe(0, 1));
}

#[test]
fn miss_is_sent_for_an_unmapped_iova_and_update_resolves_it() {
    for need_reply in [false, true] {
        let mut r = rig(BackendConfig {
            miss_need_reply: need_reply,
            ..Default::default()
        });
        r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
        r.put(0x6010, b"data");
        assert!(!r.be.probe(IOVA_OFF + 0x6010, 4));
        assert_eq!(r.be.read(IOVA_OFF + 0x6010, 4).unwrap(), b"data");
        assert!(r.be.probe(IOVA_OFF + 0x6000, 0x1000));
        let c = r.be.counters();
        assert_eq!((c.misses_sent, c.miss_nacks, c.iotlb_updates), (1, 0, 1));
        let last = r.be.records().last().cloned().unwrap();
        let expect = IotlbMsg::update(
            IOVA_OFF + 0x6000,
            0x1000,
            UBASE + 0x6000,
            IotlbPerm::ReadWrite,
        );
        assert_eq!(last.payload, expect.encode());
    }
}

#[test]
fn answered_miss_is_timed_until_its_update() {
    let mut r = rig(BackendConfig::default());
    r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
    assert!(r.be.miss_latency().is_none());
    let t = std::time::Instant::now();
    r.be.read(IOVA_OFF + 0x7008, 8).unwrap();
    let samples = r.be.miss_samples();
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0].iova, IOVA_OFF + 0x7008);
    assert!(samples[0].latency > Duration::ZERO && samples[0].latency <= t.elapsed());
    let stats = r.be.miss_latency().unwrap();
    assert_eq!((stats.count, stats.p50), (1, samples[0].latency));
}

/// Answers every page's first miss with an UPDATE immediately followed by an
/// INVALIDATE of it (a full flush racing with the answer); later misses are
/// answered normally.
struct WipeFirstAnswer {
    seen: std::sync::Mutex<std::collections::HashSet<u64>>,
    main: Arc<dyn IotlbChannel>,
}

impl MissHandler for WipeFirstAnswer {
    fn answer_miss(&self, iova: u64, perm: IotlbPerm) -> Result<IotlbMsg, MissError> {
        let update = translate(iova, perm)?;
        let failed = |e: ChannelError| MissError::UpdateFailed {
            iova,
            source: NotifyError::Install {
                iova: update.iova,
                source: Arc::new(e),
            },
        };
        let main = &self.main;
        let first = self.seen.lock().unwrap().insert(update.iova);
        // Without waiting for the UPDATE's ack, so that the INVALIDATE is
        // already queued behind it and usually wins the race.
        main.send_iotlb(&update, !first).map_err(failed)?;
        if first {
            main.send_iotlb(&IotlbMsg::invalidate(update.iova, update.size), true)
                .map_err(failed)?;
        }
        Ok(update)
    }
}

#[test]
fn miss_is_sent_again_when_its_answer_was_invalidated_before_use() {
    let mut r = rig(BackendConfig {
        miss_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    r.negotiate_with(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM, |main| {
        Arc::new(WipeFirstAnswer {
            seen: Default::default(),
            main,
        })
    });
    // Whether the data path looks before or after the INVALIDATE is a race;
    // over 10 pages it loses at least once without the re-send.
    for page in 0..10u64 {
        let gpa = 0x10000 + page * 0x1000;
        r.put(gpa, &page.to_le_bytes());
        let got = r.be.read(IOVA_OFF + gpa, 8).unwrap();
        assert_eq!(got, page.to_le_bytes());
    }
    let c = r.be.counters();
    assert_eq!(c.translation_failures, 0);
    assert!((10..=20).contains(&c.misses_sent), "{c:?}");
}

#[test]
fn queue_waiting_for_a_miss_yields_to_a_vring_message_and_retries() {
    let mut r = rig(BackendConfig {
        miss_timeout: Duration::from_secs(5),
        ..Default::default()
    });
    // The front end holds its first miss answer until the test releases it,
    // like QEMU sending vring messages before it reads the back-end channel.
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(Some(gate));
    let handler = move |iova: u64, perm: IotlbPerm| {
        if let Some(g) = gate.lock().unwrap().take() {
            let _ = g.recv_timeout(Duration::from_secs(10));
        }
        translate(iova, perm)
    };
    r.negotiate_with(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM, |main| {
        Arc::new(TranslatingHandler::new(handler, main))
    });
    let (kick, call) = kick_and_call();
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(b"held up");
    r.put(BUF, &frame);
    r.post(IOVA_OFF + BUF, frame.len() as u32, false);
    r.start_queue(1, IOVA_OFF, &kick, &call);
    kick.write(1).unwrap();
    assert!(r
        .be
        .wait_for(Duration::from_secs(5), |c| c.misses_sent >= 1));
    let t = std::time::Instant::now();
    r.main
        .with_frontend(|fe| fe.set_vring_enable(1, true))
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "vring message waited for the miss"
    );
    release.send(()).unwrap();
    assert!(r.be.wait_for(Duration::from_secs(5), |c| c.tx_frames == 1));
    assert_eq!(r.be.counters().translation_failures, 0);
}

#[test]
fn refused_miss_fails_the_access() {
    let mut r = rig(BackendConfig {
        miss_need_reply: true,
        miss_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
    assert!(matches!(
        r.be.read(0x10, 4),
        Err(BackendError::Translate { addr: 0x10, .. })
    ));
    let c = r.be.counters();
    assert_eq!(
        (c.misses_sent, c.miss_nacks, c.translation_failures),
        (1, 1, 1)
    );
}

#[test]
fn tx_frame_is_moved_through_the_iotlb() {
    let sink = std::env::temp_dir().join(format!("iovmm-sink-{}", std::process::id()));
    let _ = std::fs::remove_file(&sink);
    let mut r = rig(BackendConfig {
        sink: Some(sink.clone()),
        ..Default::default()
    });
    r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
    let (kick, call) = kick_and_call();
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(b"an ethernet frame");
    r.put(BUF, &frame);
    r.post(IOVA_OFF + BUF, frame.len() as u32, false);
    r.start_queue(1, IOVA_OFF, &kick, &call);
    kick.write(1).unwrap();
    assert!(r.be.wait_for(Duration::from_secs(5), |c| c.tx_frames == 1));
    // The frame is counted when consumed, then its chain goes to the used
    // ring and only then is the call fd signalled: wait for the signal.
    assert!(readable_within(&call, Duration::from_secs(5)), "no call");
    assert_eq!(r.be.counters().tx_bytes, 17);
    assert_eq!(
        r.be.counters().tx_checksum,
        super::net::fnv1a(b"an ethernet frame")
    );
    assert_eq!(r.get(USED + 2, 2), 1u16.to_le_bytes());
    assert_eq!(call.read().unwrap(), 1);
    let mut want = 17u32.to_ne_bytes().to_vec();
    want.extend_from_slice(b"an ethernet frame");
    assert_eq!(std::fs::read(&sink).unwrap(), want);
    assert!(r.be.counters().misses_sent >= 3);
    let _ = std::fs::remove_file(&sink);
}

#[test]
fn rx_injected_frame_lands_in_guest_buffer() {
    let mut r = rig(BackendConfig {
        access_platform: false,
        ..Default::default()
    });
    r.negotiate(VIRTIO_F_VERSION_1);
    let (kick, call) = kick_and_call();
    r.post(BUF, 256, true);
    // Without an IOMMU, vring addresses are front-end virtual addresses.
    r.start_queue(0, UBASE, &kick, &call);
    r.be.inject_rx(b"incoming".to_vec());
    assert!(r.be.wait_for(Duration::from_secs(5), |c| c.rx_frames == 1));
    assert_eq!(r.get(BUF + 12, 8), b"incoming");
    assert_eq!(r.get(USED + 8, 4), 20u32.to_le_bytes());
    let base = r.main.with_frontend(|fe| fe.get_vring_base(0)).unwrap();
    assert_eq!(base, 1);
    assert_eq!(r.be.counters().misses_sent, 0);
}

#[test]
fn slow_acks_are_delayed_and_bogus_replies_break_the_socket() {
    let mut r = rig(BackendConfig {
        misbehave: Misbehaviour {
            ack_delay: Duration::from_millis(100),
            bogus_reply: true,
            ..Default::default()
        },
        ..Default::default()
    });
    let start = std::time::Instant::now();
    r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
    assert!(start.elapsed() >= Duration::from_millis(300));
    let err = r
        .main
        .send_iotlb(&IotlbMsg::invalidate(0, 1), true)
        .unwrap_err();
    assert!(matches!(
        err,
        ChannelError::Protocol(WireError::ReplyMismatch { got: 40, .. })
    ));
    assert!(r.main.is_broken());
}

#[test]
fn bogus_backend_message_closes_the_frontend_channel() {
    let mut r = rig(BackendConfig {
        misbehave: Misbehaviour {
            bogus_backend_msg: true,
            ..Default::default()
        },
        ..Default::default()
    });
    r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
    let req = r.req.take().unwrap();
    let start = std::time::Instant::now();
    while !req.is_finished() {
        assert!(start.elapsed() < Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(req.stop().is_some());
    // The main socket is unaffected.
    assert!(r.main.with_frontend(|fe| fe.get_features()).is_ok());
}

#[test]
fn disconnect_after_n_messages() {
    let r = rig(BackendConfig {
        misbehave: Misbehaviour {
            disconnect_after: Some(2),
            ..Default::default()
        },
        ..Default::default()
    });
    r.main.with_frontend(|fe| fe.get_features()).unwrap();
    assert!(r.main.with_frontend(|fe| fe.get_features()).is_err());
    assert!(r.main.is_broken());
    assert_eq!(r.be.counters().messages, 2);
}

#[test]
fn nack_iotlb_misbehaviour_is_reported_as_nack() {
    let mut r = rig(BackendConfig {
        misbehave: Misbehaviour {
            nack_iotlb: true,
            ..Default::default()
        },
        ..Default::default()
    });
    r.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
    let upd = IotlbMsg::update(0, 0x1000, UBASE, IotlbPerm::ReadWrite);
    assert!(matches!(
        r.main.send_iotlb(&upd, true),
        Err(ChannelError::Nack(1))
    ));
    assert!(!r.be.probe(0, 1));
}

#[test]
fn protocol_features_offer_reply_ack_and_backend_req() {
    let r = rig(BackendConfig::default());
    let p = r
        .main
        .with_frontend(|fe| {
            fe.get_features()?;
            fe.get_protocol_features()
        })
        .unwrap();
    assert!(p.contains(VhostUserProtocolFeatures::REPLY_ACK));
    assert!(p.contains(VhostUserProtocolFeatures::BACKEND_REQ));
}

#[test]
fn listener_serves_connections_one_after_another() {
    let path = std::env::temp_dir().join(format!("iovmm-tb-{}.sock", std::process::id()));
    let be = TestBackend::listen(&path, BackendConfig::default()).unwrap();
    for round in 1..=2u64 {
        let main = MainSocket::new(
            UnixStream::connect(&path).unwrap(),
            2,
            Duration::from_secs(2),
        )
        .unwrap();
        let f = main.with_frontend(|fe| fe.get_features()).unwrap();
        assert_ne!(f & VIRTIO_F_ACCESS_PLATFORM, 0);
        drop(main);
        assert!(be.wait_for(Duration::from_secs(2), |_| be.connections_ended() == round));
    }
    assert_eq!(be.counters().messages, 2);
    let _ = std::fs::remove_file(&path);
}
