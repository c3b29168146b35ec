//! Hostile vhost-user back ends against iovmm's front end (`VhostUserDevice` + IOTLB bridge):
//! miss floods for unmapped and out-of-range IOVAs, oversized and malformed frames, a back end
//! that never acks, and disconnects mid-stream. iovmm never panics or hangs (every wait is
//! bounded by the channel timeout), the device reports a typed error or its broken state, and
//! the work a flood causes stays bounded. The last test boots the fast test guest (KVM) against
//! a back end that disconnects mid-run: the VMM stays up and exits cleanly with the guest.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::ops::{Deref, DerefMut};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::sys::{poll_fds, PollFd};
use devices::vhost_user::backend_req::{FRAME_TIMEOUT, MAX_BAD_REQUESTS_PER_SEC};
use devices::vhost_user::channel::ChannelError;
use devices::vhost_user::wire::{
    decode_ack, encode_iotlb_frame, Header, IotlbMsg, IotlbPerm, HEADER_SIZE,
    VHOST_USER_BACKEND_IOTLB_MSG,
};
use devices::vhost_user::{VhostUserConfig, VhostUserError};
use devices::virtio::VirtioDevice;
use integration_tests::backend::{BackendConfig, Misbehaviour, TestBackend};
use integration_tests::guest::{test_guest_path, GuestResult, IommuMode, Scenario};
use integration_tests::rig::{
    backend_err, connect_invalidate, covering, Faults, Rig, BUF, IOVA_OFF, MEM,
};
use iommu::sync::lock;
use iommu::{IovaRange, NotifyError};
use vmm::{SerialMode, VmConfig, VmExit, Vmm};

/// The front end's channel timeout in these tests.
const TIMEOUT: Duration = Duration::from_millis(700);

/// One rig at a time: the machine is small and the miss paths have timeouts.
static ONE: Mutex<()> = Mutex::new(());

/// The shared rig, holding `ONE`, with the faults its all-RAM translation reported.
struct Hostile {
    rig: Rig,
    faults: Faults,
    _one: MutexGuard<'static, ()>,
}

impl Hostile {
    /// A net device behind an IOMMU (all RAM mapped at `IOVA_OFF`), activated. The back end
    /// behaves for the connection's first IOTLB message (the front end's full-range
    /// INVALIDATE; `connection_invalidate_that_fails_fails_the_activation` covers it) and
    /// misbehaves from the next one on.
    fn new(misbehave: Misbehaviour) -> Hostile {
        let one = lock(&ONE);
        let config = BackendConfig {
            miss_timeout: Duration::from_secs(2),
            misbehave: Misbehaviour {
                spare_first_iotlb: true,
                ..misbehave
            },
            ..Default::default()
        };
        let mut rig = Rig::pair(config, dev_config());
        let (_, faults) = rig.translate_all_ram();
        rig.activate().unwrap();
        Hostile {
            rig,
            faults,
            _one: one,
        }
    }

    fn backend_channel(&self) -> UnixStream {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            if let Some(c) = self.be.backend_channel() {
                return c;
            }
            assert!(Instant::now() < deadline, "no back-end channel");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The back-end channel once the back end's own misses (ring addresses at activation),
    /// which share it, were answered: nothing the back end sends lands inside what a test
    /// writes next.
    fn quiet_backend_channel(&self) -> UnixStream {
        let chan = self.backend_channel();
        assert!(self
            .be
            .wait_for(TIMEOUT * 4, |c| c.misses_sent == c.iotlb_updates));
        std::thread::sleep(Duration::from_millis(100));
        chan
    }
}

/// A net device behind an IOMMU with the tests' channel `TIMEOUT`.
fn dev_config() -> VhostUserConfig {
    let mut dcfg = VhostUserConfig::net("/test/socketpair");
    dcfg.iommu = true;
    dcfg.timeout = TIMEOUT;
    dcfg
}

impl Deref for Hostile {
    type Target = Rig;

    fn deref(&self) -> &Rig {
        &self.rig
    }
}

impl DerefMut for Hostile {
    fn deref_mut(&mut self) -> &mut Rig {
        &mut self.rig
    }
}

fn miss_frame(iova: u64, need_reply: bool) -> [u8; 44] {
    let msg = IotlbMsg::miss(iova, IotlbPerm::ReadOnly);
    encode_iotlb_frame(VHOST_USER_BACKEND_IOTLB_MSG, &msg, need_reply)
}

/// Waits until `chan` is readable (data or EOF) or `deadline` passes, without touching the
/// socket's flags (the back end shares it).
fn readable(chan: &UnixStream, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    poll_fds(&mut [PollFd::readable(chan)], Some(left)).is_ok_and(|n| n > 0)
}

/// Reads into `buf` until it is full or the peer closed; returns the bytes read.
fn read_until(chan: &mut UnixStream, buf: &mut [u8], timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut done = 0;
    while done < buf.len() {
        assert!(readable(chan, deadline), "nothing within {timeout:?}");
        match chan.read(&mut buf[done..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n,
        }
    }
    done
}

/// Whether the peer closes the channel within `timeout` (anything it still sends is skipped).
fn closed_within(chan: &mut UnixStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    while readable(chan, deadline) {
        match chan.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
    false
}

/// Reads one reply-ack to a back-end IOTLB message.
fn read_miss_ack(chan: &mut UnixStream) -> u64 {
    let mut raw = [0u8; HEADER_SIZE + 8];
    assert_eq!(
        read_until(chan, &mut raw, Duration::from_secs(5)),
        raw.len()
    );
    let hdr = Header::decode(&raw[..HEADER_SIZE]).unwrap();
    decode_ack(&hdr, &raw[HEADER_SIZE..], VHOST_USER_BACKEND_IOTLB_MSG).unwrap()
}

#[test]
fn miss_flood_for_unmapped_and_out_of_range_iovas_is_refused_and_throttled() {
    let r = Hostile::new(Misbehaviour::default());
    let mut chan = r.quiet_backend_channel();
    let bad = [IOVA_OFF + MEM, 0, u64::MAX, IOVA_OFF - 1, 1 << 63];
    let flood = 20 * MAX_BAD_REQUESTS_PER_SEC;
    let start = Instant::now();
    for i in 0..flood {
        chan.write_all(&miss_frame(bad[i as usize % bad.len()], false))
            .unwrap();
    }
    // A last miss asking for a reply: once it is answered, the flood was processed.
    chan.write_all(&miss_frame(u64::MAX, true)).unwrap();
    assert_eq!(read_miss_ack(&mut chan), 1);
    let seconds = start.elapsed().as_secs() + 1;
    // Refused misses cost a guest fault each, and only up to the per-second budget.
    let faults = r.faults.lock().unwrap().len() as u64;
    assert!(faults >= 1);
    assert!(
        faults <= MAX_BAD_REQUESTS_PER_SEC * seconds,
        "{faults} faults in {seconds} s"
    );
    // Every miss was either answered (refused) or throttled, and the device counts both.
    let b = r.dev.stats().bridge;
    assert!(b.throttled_requests >= 1, "{b:?}");
    assert!(b.misses + b.throttled_requests > flood, "{b:?}");
    // No UPDATE for any of them (the connection's full-range INVALIDATE covers all but the
    // last byte of the space).
    for iova in bad {
        let got = covering(&r.be, iova);
        let want = if iova == u64::MAX {
            vec![]
        } else {
            vec![connect_invalidate().1]
        };
        assert_eq!(got, want, "UPDATE for {iova:#x}");
    }
    assert!(!r.dev.is_broken());
    // Once the throttled second is over (the budget window may have started
    // late in the flood), the same channel serves a real miss again.
    std::thread::sleep(Duration::from_millis(2100));
    r.send_tx(0, b"still works after the flood");
    assert!(r.be.wait_for(Duration::from_secs(5), |c| c.tx_frames == 1));
}

#[test]
fn oversized_backend_frame_closes_only_the_backend_channel() {
    let r = Hostile::new(Misbehaviour::default());
    let mut chan = r.backend_channel();
    let mut hdr = Header::request(VHOST_USER_BACKEND_IOTLB_MSG, 0x10_0000, true).encode();
    chan.write_all(&hdr).unwrap();
    // The front end closes its end: reads on ours see EOF, well within a frame timeout.
    assert!(
        closed_within(&mut chan, FRAME_TIMEOUT * 2),
        "channel still open"
    );
    // Writing more garbage is harmless.
    hdr[4] = 0xff;
    let _ = chan.write_all(&hdr);
    // The main socket is untouched: UPDATEs and INVALIDATEs still work.
    assert!(!r.dev.is_broken());
    // No miss channel any more. (Not at BUF: a ring miss at activation may have installed an
    // UPDATE from the ring page to the end of RAM, which covers BUF; nothing below the rings
    // is ever sent.)
    assert!(!r.be.probe(IOVA_OFF, 4));
    r.be.read(IOVA_OFF, 4).unwrap_err();
    r.unmap(IovaRange::FULL).unwrap();
    assert!(!r.dev.is_broken());
}

#[test]
fn truncated_backend_frame_times_out_and_closes_the_backend_channel() {
    let r = Hostile::new(Misbehaviour::default());
    let mut chan = r.quiet_backend_channel();
    chan.write_all(&miss_frame(IOVA_OFF, true)[..20]).unwrap();
    let start = Instant::now();
    assert!(
        closed_within(&mut chan, FRAME_TIMEOUT * 3),
        "channel still open"
    );
    assert!(start.elapsed() >= FRAME_TIMEOUT / 2);
    assert!(!r.dev.is_broken());
}

#[test]
fn never_acked_invalidate_fails_after_the_channel_timeout() {
    let r = Hostile::new(Misbehaviour {
        never_ack_invalidate: true,
        ..Default::default()
    });
    // The back end holds a translation (only those need an INVALIDATE).
    assert_eq!(r.be.read(IOVA_OFF + BUF, 4).unwrap().len(), 4);
    let start = Instant::now();
    let err = r
        .unmap(IovaRange::from_start_len(IOVA_OFF + BUF, 0x1000).unwrap())
        .unwrap_err();
    let took = start.elapsed();
    assert!(took >= TIMEOUT && took < TIMEOUT * 4, "took {took:?}");
    let NotifyError::Invalidate { source, .. } = &err else {
        panic!("not an INVALIDATE failure: {err:?}");
    };
    let cause = source.downcast_ref::<ChannelError>();
    assert!(matches!(cause, Some(ChannelError::Timeout)), "{err:?}");
    assert!(r.dev.is_broken());
    assert!(r.dev.stats().broken);
    // Later notifications fail at once instead of waiting again.
    let start = Instant::now();
    let _ = r.unmap(IovaRange::FULL);
    assert!(start.elapsed() < TIMEOUT);
}

#[test]
fn never_acked_update_refuses_the_miss_and_breaks_the_device() {
    let mut r = Hostile::new(Misbehaviour {
        never_ack_iotlb: true,
        ..Default::default()
    });
    // The first UPDATE (for a ring or for this read) is applied but never acked: the front end
    // gives up after its channel timeout and marks the device broken.
    let start = Instant::now();
    let _ = r.be.read(IOVA_OFF + BUF, 4);
    assert!(r.be.wait_for(TIMEOUT * 3, |_| r.dev.is_broken()));
    assert!(start.elapsed() >= TIMEOUT / 2 && start.elapsed() < TIMEOUT * 4);
    assert!(r.dev.stats().iotlb.failures >= 1);
    assert!(!r.dev.reset());
    let err = backend_err(r.activate().unwrap_err());
    assert!(matches!(err, VhostUserError::Broken), "{err}");
}

#[test]
fn oversized_reply_on_the_main_socket_is_a_protocol_error() {
    let r = Hostile::new(Misbehaviour {
        oversized_reply: true,
        ..Default::default()
    });
    // The back end's read may itself wait for its miss timeout (its IOTLB is
    // cleared when the front end hangs up), so time the front end alone.
    let be = &r.be;
    let took = std::thread::scope(|s| {
        s.spawn(|| be.read(IOVA_OFF + BUF, 4));
        let start = Instant::now();
        assert!(be.wait_for(TIMEOUT * 3, |_| r.dev.is_broken()));
        start.elapsed()
    });
    // A protocol error, not a timeout.
    assert!(took < TIMEOUT, "took {took:?}");
    assert!(r.dev.stats().iotlb.failures >= 1);
}

#[test]
fn disconnect_mid_stream_ends_both_channels_cleanly() {
    let r = Hostile::new(Misbehaviour {
        disconnect_on_invalidate: true,
        ..Default::default()
    });
    let mut r = r;
    r.send_tx(0, b"one frame before the disconnect");
    assert!(r.be.wait_for(Duration::from_secs(3), |c| c.tx_frames == 1));
    let start = Instant::now();
    let range = IovaRange::from_start_len(IOVA_OFF + BUF, 0x1000).unwrap();
    // A back end that hung up holds no translation (a new connection starts with an empty
    // IOTLB), so the unmap completes: on EOF, not after the timeout.
    r.unmap(range).unwrap();
    assert!(start.elapsed() < TIMEOUT, "took {:?}", start.elapsed());
    assert!(r.dev.is_broken());
    assert!(r
        .be
        .wait_for(Duration::from_secs(2), |_| r.be.server_finished()));
    // Stopping the device joins its back-end channel and call relay threads without hanging.
    let start = Instant::now();
    assert!(!r.dev.reset());
    assert!(start.elapsed() < TIMEOUT);
    let err = backend_err(r.activate().unwrap_err());
    assert!(matches!(err, VhostUserError::Broken), "{err}");
}

/// KVM: the fast test guest transmits through a back end that disconnects mid-run. The VMM
/// stays up, the guest reports the failure of that device, and the VMM exits with the guest.
#[test]
fn guest_survives_a_backend_that_disconnects_mid_run() {
    let sock = std::env::temp_dir().join(format!("iovmm-{}-hostile.sock", std::process::id()));
    let config = BackendConfig {
        misbehave: Misbehaviour {
            disconnect_after: Some(60),
            ..Default::default()
        },
        ..Default::default()
    };
    let be = TestBackend::listen(&sock, config).unwrap();
    let frames = 500;
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::net_tx(frames, 1000)
        .iommu(IommuMode::Strict)
        .timeout_ms(2000)
        .cmdline()
        .unwrap();
    cfg.serial = SerialMode::Capture;
    cfg.iommu = Some("virtio".parse().unwrap());
    let dev = format!("net,socket={},iommu=on", sock.display());
    cfg.vhost_user.push(dev.parse().unwrap());
    let mut vmm = Vmm::start(&cfg).unwrap();
    let exit = vmm.wait_timeout(Duration::from_secs(60)).unwrap();
    let serial = vmm.serial_output().unwrap_or_default();
    // The guest, not the VMM, ended the run.
    assert!(matches!(exit, VmExit::ExitPort(_)), "{exit:?}\n{serial}");
    let result = GuestResult::from_output(&serial).unwrap();
    assert_ne!(result.str("status"), Some("ok"), "{serial}");
    assert!(result.u64("completed").unwrap_or(0) < frames, "{serial}");
    assert!(vmm.vhost_user_devices()[0].stats().broken);
    assert_eq!(be.connections_ended(), 1);
    // Mid-run: the device was up and moving frames when the back end left.
    let sent = be.counters().tx_frames;
    assert!(
        sent > 0 && sent < frames,
        "{sent} frames reached the back end"
    );
    let _ = std::fs::remove_file(&sock);
}

/// The full-range INVALIDATE a connection starts with is refused or never acked: the
/// activation fails (after the channel timeout at most) with a typed error and the device
/// serves nothing.
#[test]
fn connection_invalidate_that_fails_fails_the_activation() {
    let _one = lock(&ONE);
    for misbehave in [
        Misbehaviour {
            nack_iotlb: true,
            ..Default::default()
        },
        Misbehaviour {
            never_ack_invalidate: true,
            ..Default::default()
        },
    ] {
        let what = format!("{misbehave:?}");
        let config = BackendConfig {
            misbehave,
            ..Default::default()
        };
        let mut rig = Rig::pair(config, dev_config());
        let _ = rig.translate_all_ram();
        let start = Instant::now();
        let err = backend_err(rig.activate().unwrap_err());
        assert!(start.elapsed() < TIMEOUT * 4, "took {:?}", start.elapsed());
        assert!(
            matches!(err, VhostUserError::Request { .. }),
            "{what}: {err}"
        );
        assert_eq!(rig.iotlb_msgs(), vec![connect_invalidate()]);
        let b = rig.dev.stats().bridge;
        assert_eq!((b.connect_invalidations, b.invalidation_failures), (0, 1));
        assert!(rig.be.backend_channel().is_none());
    }
}
