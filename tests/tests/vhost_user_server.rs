//! vhost-user server mode (`--vhost-user net,socket=PATH,server=on`) with real KVM and the fast
//! test guest: iovmm listens, the backend connects. `Vmm::start` waits (bounded by `wait=SECS`)
//! for the first backend; when a backend dies, iovmm accepts the next one, renegotiates with an
//! empty IOTLB (the first IOTLB message of every connection is the full-range INVALIDATE) and
//! restores the rings at the used index, while the guest keeps transmitting behind a strict
//! vIOMMU. Clients: our test backend (`TestBackend::connect`) and DPDK testpmd
//! (`net_vhost0,client=1`). Bad input: clients that send garbage or never answer, a second
//! client while one is connected (queued), no client at all, a path in use.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::vhost_user::VhostUserError;
use integration_tests::backend::{BackendConfig, BackendHandle, TestBackend};
use integration_tests::dpdk::{PortStats, Testpmd};
use integration_tests::guest::{test_guest_path, GuestResult, IommuMode, Scenario};
use integration_tests::matrix::{assert_no_stale_translation, assert_nothing_stale_held, ONE_CELL};
use integration_tests::rig::{connect_invalidate, iotlb_msgs};
use iommu::sync::lock;
use vmm::{SerialMode, VhostUserStats, VmConfig, VmExit, Vmm, VmmError};

const FRAMES: u64 = 3000;
const SIZE: u64 = 256;
/// How long a client keeps trying to connect while iovmm is not listening yet.
const CONNECT_WITHIN: Duration = Duration::from_secs(30);

fn socket(name: &str) -> PathBuf {
    let _ = env_logger::builder().is_test(true).try_init();
    std::env::temp_dir().join(format!("iovmm-server-{name}-{}.sock", std::process::id()))
}

/// The fast test guest transmitting `FRAMES` frames through a net device behind `iommu`
/// (strict), served in server mode on `sock`.
fn vm_config(sock: &Path, iommu: &str, extra: &str) -> VmConfig {
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::net_tx(FRAMES, SIZE)
        .iommu(IommuMode::Strict)
        .timeout_ms(60_000)
        .cmdline()
        .unwrap();
    cfg.serial = SerialMode::Capture;
    cfg.iommu = Some(iommu.parse().unwrap());
    let dev = format!("net,socket={},iommu=on,server=on{extra}", sock.display());
    cfg.vhost_user.push(dev.parse().unwrap());
    cfg
}

/// `Vmm::start` on its own thread: in server mode it returns once a backend connected.
fn start_in_background(cfg: VmConfig) -> JoinHandle<Result<Vmm, VmmError>> {
    std::thread::spawn(move || Vmm::start(&cfg))
}

fn stats(vmm: &Vmm) -> VhostUserStats {
    vmm.vhost_user_devices()[0].stats()
}

/// Polls the device counters until `pred` holds (at most 30 s); returns how long it took.
fn wait_stats(vmm: &Vmm, what: &str, pred: impl Fn(&VhostUserStats) -> bool) -> Duration {
    let t = Instant::now();
    while !pred(&stats(vmm)) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what}: {:?}",
            stats(vmm).reconnect
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    t.elapsed()
}

/// Waits for the guest to finish and checks that every frame completed.
fn finish(mut vmm: Vmm, sock: &Path) -> (GuestResult, VhostUserStats) {
    let exit = vmm.wait_timeout(Duration::from_secs(120)).unwrap();
    let serial = vmm.serial_output().unwrap_or_default();
    assert_eq!(exit, VmExit::ExitPort(0), "serial:\n{serial}");
    let r = GuestResult::from_output(&serial).unwrap();
    assert_eq!(r.u64("completed"), Some(FRAMES), "{serial}");
    let device = &vmm.vhost_user_devices()[0];
    assert!(device.server);
    assert_nothing_stale_held(&sock, device);
    assert!(!sock.exists(), "the server socket is removed at exit");
    (r, device.stats())
}

/// A client that connects (retrying until iovmm listens) and, with `garbage`, writes bytes
/// that are no vhost-user reply.
fn raw_client(sock: &Path, garbage: bool) -> UnixStream {
    let t = Instant::now();
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(t.elapsed() < CONNECT_WITHIN, "connect {sock:?}: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    if garbage {
        s.write_all(&[0xff; 64]).unwrap();
    }
    s
}

/// Whether iovmm closed `s` within `within` (reads what it sent until EOF).
fn closed_by_peer(s: &mut UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// Whether iovmm has sent anything on `s` yet (without waiting).
fn has_data(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    let r = (&*s).read(&mut buf);
    s.set_nonblocking(false).unwrap();
    matches!(r, Ok(n) if n > 0)
}

/// The first IOTLB message a backend received is the full-range INVALIDATE with NEED_REPLY.
fn assert_starts_with_connect_invalidate(be: &BackendHandle) {
    let msgs = iotlb_msgs(be);
    assert_eq!(msgs.first(), Some(&connect_invalidate()), "{msgs:x?}");
}

#[test]
fn own_backend_as_client_dies_and_the_next_one_is_accepted() {
    let _one = lock(&ONE_CELL);
    let sock = socket("own");
    let vm = start_in_background(vm_config(&sock, "virtio", ",wait=30"));
    let first = TestBackend::connect(&sock, BackendConfig::default(), CONNECT_WITHIN).unwrap();
    let vmm = vm
        .join()
        .unwrap()
        .expect("VM starts once the backend connected");
    assert!(first.wait_for(Duration::from_secs(30), |c| c.tx_frames >= 200));
    assert_starts_with_connect_invalidate(&first);
    let t = Instant::now();
    first.kill();
    let killed_at = first.counters().tx_frames;
    assert!(sock.exists(), "iovmm keeps listening");
    let second = TestBackend::connect(&sock, BackendConfig::default(), CONNECT_WITHIN).unwrap();
    wait_stats(&vmm, "restored on the second backend", |s| {
        s.reconnect.restores == 1
    });
    let reconnect_time = t.elapsed();
    let (r, s) = finish(vmm, &sock);
    // The new backend's IOTLB started empty: its first IOTLB message is the full-range
    // INVALIDATE, and it filled through misses.
    assert_starts_with_connect_invalidate(&second);
    let c = second.counters();
    assert!(c.misses_sent > 0, "{c:?}");
    assert_no_stale_translation(&second);
    assert_eq!(c.invalidate_violations, 0);
    // Frames at both ends: the guest completed all; the backends carried them (a frame in
    // flight at the kill may be sent twice, or completed by the dying backend uncounted).
    assert!(killed_at + c.tx_frames + 1 >= FRAMES, "{killed_at} + {c:?}");
    assert!(c.tx_frames <= FRAMES && c.tx_frames > 0, "{c:?}");
    assert_eq!(c.tx_bytes, c.tx_frames * SIZE);
    assert_eq!(c.translation_failures, 0);
    let rc = s.reconnect;
    assert!(rc.enabled && rc.connected, "{rc:?}");
    assert_eq!((rc.disconnects, rc.reconnects, rc.restores), (1, 1, 1));
    assert_eq!(s.bridge.connect_invalidations, 2, "one per connection");
    eprintln!(
        "server/own: {} frames by the first backend, {} by the second, reconnected in {reconnect_time:.2?}; guest {} cycles/frame",
        killed_at,
        c.tx_frames,
        r.u64("cycles_per_frame").unwrap_or(0)
    );
}

/// Reads testpmd's port counters until two reads agree (the VM is paused: nothing new
/// arrives, testpmd only finishes what was posted).
fn settled_stats(pmd: &mut Testpmd) -> PortStats {
    let mut last = pmd.port_stats().unwrap();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(20));
        let now = pmd.port_stats().unwrap();
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("testpmd counters did not settle: {last:?}");
}

fn received(pmd: &mut Testpmd, at_least: u64) -> PortStats {
    let t = Instant::now();
    loop {
        let s = pmd.port_stats().unwrap();
        if s.rx_packets >= at_least || t.elapsed() > Duration::from_secs(30) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn testpmd_as_client_is_killed_and_a_new_one_takes_over() {
    let _one = lock(&ONE_CELL);
    for iommu in ["virtio", "vtd,caching_mode=on"] {
        let sock = socket("dpdk");
        // testpmd first: it retries the connection every second until iovmm listens.
        let mut pmd = Testpmd::start_client(&sock, true, "rxonly").unwrap();
        let t0 = Instant::now();
        let vmm = Vmm::start(&vm_config(&sock, iommu, "")).expect("VM starts");
        let accepted_in = t0.elapsed();
        assert!(
            received(&mut pmd, 300).rx_packets >= 300,
            "{}",
            pmd.output()
        );
        // Pause the guest so that the first testpmd's count is exact, then kill it.
        vmm.pause().unwrap();
        let first = settled_stats(&mut pmd);
        let t = Instant::now();
        pmd.kill().unwrap();
        wait_stats(&vmm, "disconnect seen", |s| s.reconnect.disconnects == 1);
        let mut pmd2 = Testpmd::start_client(&sock, true, "rxonly").unwrap();
        let restored = wait_stats(&vmm, "restored on the new testpmd", |s| {
            s.reconnect.restores == 1
        });
        let reconnect_time = t.elapsed();
        let misses_before = stats(&vmm).bridge.misses;
        vmm.resume().unwrap();
        let (_, s) = finish(vmm, &sock);
        let second = received(&mut pmd2, FRAMES - first.rx_packets);
        // Every frame reached exactly one testpmd: none was in flight at the kill.
        assert_eq!(
            first.rx_packets + second.rx_packets,
            FRAMES,
            "{first:?} {second:?}\n{}",
            pmd2.output()
        );
        assert_eq!(first.rx_bytes + second.rx_bytes, FRAMES * SIZE);
        // The new testpmd's IOTLB started empty (one full-range INVALIDATE per connection,
        // nothing replayed) and refilled through misses.
        assert_eq!(s.bridge.connect_invalidations, 2, "{s:?}");
        assert!(s.bridge.misses > misses_before, "{s:?}");
        assert_eq!(s.bridge.misses_refused, 0, "{s:?}");
        assert_eq!(s.bridge.stall_reports, 0);
        let rc = s.reconnect;
        assert_eq!((rc.disconnects, rc.reconnects, rc.restores), (1, 1, 1));
        eprintln!(
            "server/testpmd {iommu}: first backend accepted after {accepted_in:.2?}; {} + {} frames; new testpmd restored {restored:.2?} after the disconnect was seen, {reconnect_time:.2?} after the kill (incl. testpmd start)",
            first.rx_packets, second.rx_packets
        );
    }
}

#[test]
fn hostile_and_queued_clients_never_stop_the_guest() {
    let _one = lock(&ONE_CELL);
    let sock = socket("hostile");
    let vm = start_in_background(vm_config(&sock, "virtio", ",wait=60"));
    // Before the first backend: a client that never answers (iovmm gives up after its
    // 5 s request timeout) and one that answers garbage are closed; the third one is used.
    let mut silent = raw_client(&sock, false);
    let mut garbage = raw_client(&sock, true);
    let first = TestBackend::connect(&sock, BackendConfig::default(), CONNECT_WITHIN).unwrap();
    assert!(closed_by_peer(&mut silent, Duration::from_secs(20)));
    assert!(closed_by_peer(&mut garbage, Duration::from_secs(20)));
    let vmm = vm.join().unwrap().expect("VM starts with the third client");
    assert!(first.wait_for(Duration::from_secs(30), |c| c.tx_frames >= 100));
    // While it is served, two more clients connect: they are queued, not served.
    let mut garbage = raw_client(&sock, true);
    let queued = TestBackend::connect(&sock, BackendConfig::default(), CONNECT_WITHIN).unwrap();
    let now = first.counters().tx_frames;
    assert!(first.wait_for(Duration::from_secs(30), |c| c.tx_frames >= now + 100));
    assert!(!has_data(&garbage), "a queued client is not talked to");
    assert_eq!(
        queued.counters().messages,
        0,
        "a queued client is not talked to"
    );
    // The first backend dies: the garbage client is accepted, refused and closed, then the
    // queued backend takes over.
    // (Paused, so the guest cannot finish before the queued clients are served.)
    vmm.pause().unwrap();
    first.kill();
    assert!(closed_by_peer(&mut garbage, Duration::from_secs(20)));
    wait_stats(&vmm, "restored on the queued backend", |s| {
        s.reconnect.restores == 1
    });
    vmm.resume().unwrap();
    let (_, s) = finish(vmm, &sock);
    assert_starts_with_connect_invalidate(&queued);
    assert!(queued.counters().tx_frames > 0);
    let rc = s.reconnect;
    assert_eq!(
        (rc.disconnects, rc.attempts, rc.reconnects),
        (1, 2, 1),
        "{rc:?}"
    );
}

#[test]
fn no_backend_a_path_in_use_and_a_file_fail_the_start_cleanly() {
    let sock = socket("nobody");
    let t = Instant::now();
    let err = Vmm::start(&vm_config(&sock, "virtio", ",wait=1")).unwrap_err();
    let text = iommu::error::chain(&err).to_string();
    assert!(text.contains("no usable vhost-user back end"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!sock.exists(), "the socket iovmm created is removed");
    // Another process listens there: refused, and its socket is left alone.
    let other = UnixListener::bind(&sock).unwrap();
    let err = Vmm::start(&vm_config(&sock, "virtio", ",wait=1")).unwrap_err();
    let text = iommu::error::chain(&err).to_string();
    assert!(text.contains("in use by another process"), "{text}");
    assert!(sock.exists());
    drop(other);
    std::fs::remove_file(&sock).unwrap();
    // A regular file at the path is never replaced.
    std::fs::write(&sock, b"not a socket").unwrap();
    let err = Vmm::start(&vm_config(&sock, "virtio", ",wait=1")).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
    std::fs::remove_file(&sock).unwrap();
    // The typed error is reachable for library users.
    let l = devices::vhost_user::listener::bind(&sock).unwrap();
    assert!(matches!(
        devices::vhost_user::listener::bind(&sock),
        Err(VhostUserError::SocketInUse(_))
    ));
    drop(l);
    std::fs::remove_file(&sock).unwrap();
}
