//! `iovmm-tap-peer`: the far end of a vhost-net device's tap in L1.
//!
//! It counts and checks the frames the L2 guest transmits through
//! vhost-net (they arrive on the tap), and sends frames the guest receives:
//!
//! * the Linux netbench's UDP frames (to port 9; UDP payload = the frame's
//!   sequence number as a little-endian u64, then zeros): every byte is
//!   checked, duplicates and malformed frames are counted apart;
//! * the fast test guest's sequence frames (ethertype 0x88b5, the layout of
//!   [`crate::backend::rxgen::seq_frame`]) and its use-after-unmap marker
//!   (ethertype 0x88b6, `IOVMM-STALE-MARKER` repeated), which must never
//!   arrive;
//! * with `rx_frames`, that many [`crate::backend::rxgen::seq_frame`]s into
//!   the guest, sent on a packet socket bound to the tap. The tap queues
//!   frames for vhost-net in a ring of `txqueuelen` entries and drops what
//!   does not fit, and the kernel offers no notification when vhost-net
//!   takes them, so sending is paced by the tap's `tx_packets` counter (the
//!   frames vhost-net took): at most [`WINDOW`] frames in flight, the
//!   counter re-read every millisecond while the window is full.
//!
//! It runs until SIGTERM or SIGINT (a signalfd in its poll set) and then
//! prints one `TAP-PEER {json}` line with everything it saw.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use devices::sys::{poll_fds, PollFd};
use serde::Serialize;

use crate::backend::rxgen::{seq_frame, PATTERN_OFF, SEQ_OFF};

/// Frames sent into the guest and not yet taken by vhost-net, at most.
pub const WINDOW: u64 = 128;
/// Ethertype of the fast test guest's sequence frames.
pub const SEQ_ETHERTYPE: u16 = 0x88b5;
/// Ethertype of the fast test guest's use-after-unmap marker frame.
pub const MARKER_ETHERTYPE: u16 = 0x88b6;
/// The marker's payload text.
pub const MARKER: &[u8] = b"IOVMM-STALE-MARKER";
/// The Linux netbench's UDP destination port.
pub const NETBENCH_PORT: u16 = 9;
/// How long the peer waits for the tap's carrier (iovmm attaching it).
const CARRIER_WAIT: Duration = Duration::from_secs(120);

/// What one frame from the guest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A netbench UDP frame with sequence number `seq` and a correct payload.
    Udp(u64),
    /// A netbench UDP frame (port 9) whose length or payload is wrong.
    UdpBad,
    /// A test-guest sequence frame `seq` with a correct pattern.
    Seq(u64),
    /// A test-guest sequence frame with a wrong pattern.
    SeqBad,
    /// The use-after-unmap marker.
    Marker,
    /// Anything else.
    Other,
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

fn le64(f: &[u8], at: usize) -> Option<u64> {
    let b = f.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

/// Classify frame `f` (Ethernet, no virtio-net header) of a run whose UDP
/// frames are `udp_size` bytes long.
pub fn classify(f: &[u8], udp_size: usize) -> Frame {
    match be16(f, 12) {
        Some(0x0800) => classify_ipv4(f, udp_size),
        Some(SEQ_ETHERTYPE) => match le64(f, SEQ_OFF) {
            Some(seq)
                if seq_frame(seq, f.len())[PATTERN_OFF..] == f[PATTERN_OFF.min(f.len())..] =>
            {
                Frame::Seq(seq)
            }
            _ => Frame::SeqBad,
        },
        Some(MARKER_ETHERTYPE) => Frame::Marker,
        _ if f.windows(MARKER.len()).any(|w| w == MARKER) => Frame::Marker,
        _ => Frame::Other,
    }
}

fn classify_ipv4(f: &[u8], udp_size: usize) -> Frame {
    let ihl = usize::from(f.get(14).map_or(0, |b| b & 0xf)) * 4;
    if f.get(23) != Some(&17) || ihl < 20 {
        return Frame::Other;
    }
    let udp = 14 + ihl;
    if be16(f, udp + 2) != Some(NETBENCH_PORT) {
        return Frame::Other;
    }
    let payload = udp + 8;
    match le64(f, payload) {
        Some(seq) if f.len() == udp_size && f[payload + 8..].iter().all(|&b| b == 0) => {
            Frame::Udp(seq)
        }
        _ => Frame::UdpBad,
    }
}

/// What the peer saw and did; printed as `TAP-PEER {json}`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    /// The tap.
    pub tap: String,
    /// Distinct netbench UDP frames with a correct payload.
    pub udp_good: u64,
    /// Netbench UDP frames seen again.
    pub udp_dup: u64,
    /// Netbench UDP frames with a wrong length or payload.
    pub udp_bad: u64,
    /// Distinct test-guest sequence frames with a correct pattern.
    pub seq_good: u64,
    /// Test-guest sequence frames with a wrong pattern.
    pub seq_bad: u64,
    /// Use-after-unmap marker frames (must stay 0).
    pub markers: u64,
    /// Other frames from the guest.
    pub other: u64,
    /// Frames sent into the guest.
    pub rx_sent: u64,
    /// Of those, taken by vhost-net (the tap's `tx_packets` growth).
    pub rx_delivered: u64,
    /// Frames the peer's packet socket dropped (buffer full): must stay 0.
    pub socket_drops: Option<u64>,
    /// The tap's statistics at the end (absent if unreadable).
    pub tap_rx_packets: Option<u64>,
    /// The tap's `tx_packets` at the end.
    pub tap_tx_packets: Option<u64>,
    /// The tap's `tx_dropped` at the end.
    pub tap_tx_dropped: Option<u64>,
    /// Why sending stopped early, if it did.
    pub error: Option<String>,
}

/// Counts frames, remembering sequence numbers to find duplicates.
#[derive(Debug, Default)]
pub struct Tally {
    udp_seen: HashSet<u64>,
    seq_seen: HashSet<u64>,
    /// The counts so far.
    pub summary: Summary,
}

impl Tally {
    /// Count one frame.
    pub fn add(&mut self, f: Frame) {
        let s = &mut self.summary;
        match f {
            Frame::Udp(seq) if self.udp_seen.insert(seq) => s.udp_good += 1,
            Frame::Udp(_) => s.udp_dup += 1,
            Frame::UdpBad => s.udp_bad += 1,
            Frame::Seq(seq) if self.seq_seen.insert(seq) => s.seq_good += 1,
            Frame::Seq(_) | Frame::SeqBad => s.seq_bad += 1,
            Frame::Marker => s.markers += 1,
            Frame::Other => s.other += 1,
        }
    }
}

/// What to do.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The tap.
    pub tap: String,
    /// Length of the netbench's UDP frames.
    pub udp_size: usize,
    /// Frames to send into the guest.
    pub rx_frames: u64,
    /// Their size (at least 22 bytes).
    pub rx_size: usize,
}

fn stat(tap: &str, name: &str) -> Option<u64> {
    let p: PathBuf = ["/sys/class/net", tap, "statistics", name].iter().collect();
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn carrier(tap: &str) -> bool {
    let p: PathBuf = ["/sys/class/net", tap, "carrier"].iter().collect();
    std::fs::read_to_string(p).is_ok_and(|s| s.trim() == "1")
}

fn last_os_error<T>(what: &str) -> io::Result<T> {
    let e = io::Error::last_os_error();
    Err(io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// A packet socket bound to `tap` (every protocol), non-blocking.
fn packet_socket(tap: &str) -> io::Result<(OwnedFd, i32)> {
    let name = std::ffi::CString::new(tap).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return last_os_error("if_nametoindex");
    }
    let index = i32::try_from(index).map_err(io::Error::other)?;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    let kind = libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, kind, i32::from(proto)) };
    if fd < 0 {
        return last_os_error("socket(AF_PACKET)");
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = sockaddr_ll(index, proto);
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_ll of `len` bytes for the call.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            len,
        )
    };
    if rc < 0 {
        return last_os_error("bind(AF_PACKET)");
    }
    // A burst of the guest's frames must not overflow the default ~200 KiB buffer.
    let big: libc::c_int = 16 << 20;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `big` is a valid int of `len` bytes for the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&big as *const libc::c_int).cast(),
            len,
        )
    };
    if rc < 0 {
        return last_os_error("setsockopt(SO_RCVBUFFORCE)");
    }
    Ok((sock, index))
}

/// Frames the packet socket dropped for want of buffer space (`PACKET_STATISTICS`).
fn socket_drops(sock: RawFd) -> Option<u64> {
    let mut st = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: `st` is a valid tpacket_stats of `len` bytes for the kernel to fill.
    let rc = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(u64::from(st.tp_drops))
}

fn sockaddr_ll(index: i32, proto: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    a.sll_family = libc::AF_PACKET as u16;
    a.sll_protocol = proto;
    a.sll_ifindex = index;
    a.sll_halen = 6;
    a
}

/// SIGTERM and SIGINT as a readable fd (blocked for the process).
fn signal_fd() -> io::Result<OwnedFd> {
    // SAFETY: `set` is initialised by sigemptyset before use; the calls only
    // touch it and this thread's signal mask.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return last_os_error("pthread_sigmask");
        }
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if fd < 0 {
        return last_os_error("signalfd");
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Receives and counts every queued frame that came from the guest.
fn drain(sock: RawFd, tally: &mut Tally, udp_size: usize) {
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid for their lengths during the call.
        let n = unsafe {
            libc::recvfrom(
                sock,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            return;
        };
        // Our own frames towards the guest show up as outgoing.
        if from.sll_pkttype != libc::PACKET_OUTGOING {
            tally.add(classify(&buf[..n], udp_size));
        }
    }
}

fn send(sock: RawFd, index: i32, frame: &[u8]) -> io::Result<()> {
    let addr = sockaddr_ll(index, (SEQ_ETHERTYPE).to_be());
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `frame` and `addr` are valid for their lengths during the call.
    let n = unsafe {
        libc::sendto(
            sock,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            len,
        )
    };
    if n < 0 {
        return last_os_error("sendto");
    }
    Ok(())
}

/// The sender's state: frames go out once the tap has a carrier, at most
/// [`WINDOW`] ahead of what vhost-net took.
struct Sender {
    base: Option<u64>,
    since: Instant,
}

impl Sender {
    /// Send what the window allows; returns whether more is to be sent.
    fn pump(&mut self, cfg: &PeerConfig, sock: RawFd, index: i32, s: &mut Summary) -> bool {
        if s.rx_sent >= cfg.rx_frames || s.error.is_some() {
            return false;
        }
        let base = match self.base {
            Some(b) => b,
            None if carrier(&cfg.tap) => {
                *self.base.insert(stat(&cfg.tap, "tx_packets").unwrap_or(0))
            }
            None if self.since.elapsed() > CARRIER_WAIT => {
                s.error = Some("the tap never got a carrier (iovmm did not attach it)".into());
                return false;
            }
            None => return true,
        };
        s.rx_delivered = stat(&cfg.tap, "tx_packets").map_or(0, |t| t.saturating_sub(base));
        while s.rx_sent < cfg.rx_frames && s.rx_sent - s.rx_delivered.min(s.rx_sent) < WINDOW {
            if let Err(e) = send(sock, index, &seq_frame(s.rx_sent, cfg.rx_size)) {
                s.error = Some(e.to_string());
                return false;
            }
            s.rx_sent += 1;
        }
        true
    }
}

/// Run until SIGTERM/SIGINT; returns the summary.
pub fn run(cfg: &PeerConfig) -> io::Result<Summary> {
    let signals = signal_fd()?;
    let (sock, index) = packet_socket(&cfg.tap)?;
    let mut tally = Tally::default();
    tally.summary.tap = cfg.tap.clone();
    let mut sender = Sender {
        base: None,
        since: Instant::now(),
    };
    loop {
        let sending = sender.pump(cfg, sock.as_raw_fd(), index, &mut tally.summary);
        let wait = Duration::from_millis(if sending { 1 } else { 200 });
        let mut fds = [PollFd::readable(&sock), PollFd::readable(&signals)];
        poll_fds(&mut fds, Some(wait))?;
        if fds[0].fired() {
            drain(sock.as_raw_fd(), &mut tally, cfg.udp_size);
        }
        if fds[1].fired() {
            break;
        }
    }
    drain(sock.as_raw_fd(), &mut tally, cfg.udp_size);
    let mut s = tally.summary;
    s.socket_drops = socket_drops(sock.as_raw_fd());
    if let Some(b) = sender.base {
        s.rx_delivered = stat(&cfg.tap, "tx_packets").map_or(0, |t| t.saturating_sub(b));
    }
    s.tap_rx_packets = stat(&cfg.tap, "rx_packets");
    s.tap_tx_packets = stat(&cfg.tap, "tx_packets");
    s.tap_tx_dropped = stat(&cfg.tap, "tx_dropped");
    Ok(s)
}

/// Parse the `TAP-PEER {json}` line out of `log`.
pub fn parse_summary(log: &str) -> Option<serde_json::Value> {
    log.lines()
        .find_map(|l| l.strip_prefix("TAP-PEER "))
        .and_then(|j| serde_json::from_str(j).ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A netbench frame as Linux builds it: Ethernet + IPv4 (20) + UDP (8) + payload.
    fn udp_frame(seq: u64, size: usize, port: u16) -> Vec<u8> {
        let mut f = vec![0u8; size];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[23] = 17;
        f[36..38].copy_from_slice(&port.to_be_bytes());
        f[42..50].copy_from_slice(&seq.to_le_bytes());
        f
    }

    #[test]
    fn netbench_frames_are_checked_byte_for_byte() {
        assert_eq!(classify(&udp_frame(7, 256, 9), 256), Frame::Udp(7));
        assert_eq!(classify(&udp_frame(7, 200, 9), 256), Frame::UdpBad);
        let mut dirty = udp_frame(7, 256, 9);
        dirty[100] = 1;
        assert_eq!(classify(&dirty, 256), Frame::UdpBad);
        assert_eq!(classify(&udp_frame(7, 256, 53), 256), Frame::Other);
    }

    #[test]
    fn sequence_frames_and_the_marker_are_recognised() {
        assert_eq!(classify(&seq_frame(3, 200), 256), Frame::Seq(3));
        let mut bad = seq_frame(3, 200);
        bad[150] ^= 0xff;
        assert_eq!(classify(&bad, 256), Frame::SeqBad);
        let mut marker = seq_frame(0, 200);
        marker[12..14].copy_from_slice(&MARKER_ETHERTYPE.to_be_bytes());
        assert_eq!(classify(&marker, 256), Frame::Marker);
        let mut hidden = vec![0u8; 100];
        hidden[40..40 + MARKER.len()].copy_from_slice(MARKER);
        assert_eq!(classify(&hidden, 256), Frame::Marker);
        assert_eq!(classify(&[0u8; 10], 256), Frame::Other);
    }

    #[test]
    fn the_tally_counts_duplicates_apart() {
        let mut t = Tally::default();
        for f in [
            Frame::Udp(0),
            Frame::Udp(1),
            Frame::Udp(1),
            Frame::UdpBad,
            Frame::Marker,
        ] {
            t.add(f);
        }
        let s = &t.summary;
        assert_eq!((s.udp_good, s.udp_dup, s.udp_bad, s.markers), (2, 1, 1, 1));
        let line = format!("x\nTAP-PEER {}\n", serde_json::to_string(s).unwrap());
        assert_eq!(parse_summary(&line).unwrap()["udp_good"], 2);
    }
}
