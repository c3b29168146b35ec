//! The machine's floors, measured in the same run as the benchmark cells so that a cell's cost can
//! be read against what this machine allows at that moment:
//!
//! - **socket**: a request/reply round trip over a Unix stream socket pair between two threads,
//!   a 44-byte request and a 12-byte reply (the sizes of a vhost-user IOTLB MISS and its ack),
//!   both threads blocking in `read`, or both spinning on non-blocking reads. The floor of a miss
//!   and of an acked INVALIDATE.
//! - **exit**: a guest exit that iovmm answers without device work, timed by the fast test guest
//!   with RDTSC in ring 3 (`exit-bench`): an `out` to port 0x80 (no device claims it), an `in`
//!   from it, and an MMIO write to an address outside RAM with no device. The floor of a vIOMMU
//!   request (a VT-d queued-invalidation tail write is an MMIO exit). Also CPUID, an exit KVM
//!   handles in the kernel without returning to iovmm, like the MMIO write of a virtio notify
//!   with an ioeventfd (a virtio-iommu request).
//! - **eventfd**: writing an eventfd until another thread, blocked in `poll` on it, runs again
//!   (the wake-up of a device worker thread behind an ioeventfd).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::sys::{poll_fds, PollFd};
use vmm::arch::x86_64::layout::{PCI_ECAM_SIZE, PCI_ECAM_START};
use vmm::{SerialMode, VmConfig, VmExit, Vmm};
use vmm_sys_util::eventfd::EventFd;

use super::us;
use crate::guest::{test_guest_path, GuestResult, Scenario};

/// Bytes of the request (a vhost-user header and an IOTLB message: a MISS).
pub const REQUEST_BYTES: usize = 44;
/// Bytes of the reply (the ack of the request).
pub const REPLY_BYTES: usize = 12;
/// Round trips (and wake-ups, and guest exits) per floor by default.
pub const DEFAULT_ITERATIONS: usize = 20_000;
/// Untimed round trips before the timed ones.
const WARMUP: usize = 200;
/// Longest a floor's thread waits for its peer before it gives up.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Spins between two looks at the clock while spinning on a socket.
const SPINS_PER_CLOCK_CHECK: u32 = 1024;
/// The MMIO exit's address: past the PCI ECAM window, below the IOAPIC, outside RAM and every
/// device and BAR window of iovmm's layout.
pub const UNCLAIMED_MMIO: u64 = PCI_ECAM_START + PCI_ECAM_SIZE;

/// Why a floor could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// A socket, eventfd or thread call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The peer thread did not answer within `PEER_TIMEOUT` or went away.
    #[error("the peer thread {0}")]
    Peer(&'static str),
    /// The exit-bench guest did not run or report.
    #[error("exit-bench guest: {0}")]
    Guest(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> FloorError {
    move |source| FloorError::Io { what, source }
}

/// A floor's summary: sample count, median, 99th percentile and smallest sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Smallest sample.
    pub min: Duration,
}

impl Stats {
    /// Summarises `samples` (sorted in place); `None` without samples. The percentile of rank q
    /// is the sample at index `(n - 1) * q / 100`, as in the guest and [`super::percentiles`].
    pub fn from_samples(samples: &mut [Duration]) -> Option<Self> {
        samples.sort_unstable();
        let at = |q: usize| samples[(samples.len() - 1) * q / 100];
        Some(Stats {
            count: samples.len(),
            min: *samples.first()?,
            p50: at(50),
            p99: at(99),
        })
    }

    /// The guest's summary of one exit kind (`K_p50`, `K_p99`, `K_min` in TSC cycles) in time.
    pub fn from_guest(r: &GuestResult, kind: &str, tsc_khz: u64) -> Option<Self> {
        let field = |name: &str| {
            r.u64(&format!("{kind}_{name}"))
                .and_then(|c| cycles_to_duration(c, tsc_khz))
        };
        Some(Stats {
            count: usize::try_from(r.u64("iterations")?).ok()?,
            p50: field("p50")?,
            p99: field("p99")?,
            min: field("min")?,
        })
    }

    /// `p50/p99` in microseconds.
    pub fn fmt_us(&self) -> String {
        format!("{:.2}/{:.2}", us(self.p50), us(self.p99))
    }
}

/// TSC cycles at `tsc_khz` as time; `None` when the rate is unknown (0).
pub fn cycles_to_duration(cycles: u64, tsc_khz: u64) -> Option<Duration> {
    if tsc_khz == 0 {
        return None;
    }
    // cycles / (kHz * 1000) seconds = cycles * 1e6 / kHz nanoseconds, in u128 (no overflow).
    let ns = u128::from(cycles) * 1_000_000 / u128::from(tsc_khz);
    Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
}

/// How both ends of a socket round trip wait for the other's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Blocking `read` (the thread sleeps until the message is there).
    Blocking,
    /// Non-blocking `read` in a busy loop (a poll-mode backend such as DPDK).
    Spinning,
}

/// One end of the round trip: moves whole messages, blocking or spinning.
struct End {
    sock: UnixStream,
    wait: Wait,
}

impl End {
    fn new(sock: UnixStream, wait: Wait) -> Result<Self, FloorError> {
        match wait {
            Wait::Blocking => sock
                .set_read_timeout(Some(PEER_TIMEOUT))
                .map_err(io_err("setting the socket read timeout"))?,
            Wait::Spinning => sock
                .set_nonblocking(true)
                .map_err(io_err("making the socket non-blocking"))?,
        }
        Ok(End { sock, wait })
    }

    /// Waits until `buf` is full; spinning, gives up after [`PEER_TIMEOUT`].
    fn recv(&mut self, buf: &mut [u8]) -> Result<(), FloorError> {
        let mut got = 0;
        let mut spins = 0u32;
        let mut deadline: Option<Instant> = None;
        while got < buf.len() {
            match self.sock.read(&mut buf[got..]) {
                Ok(0) => return Err(FloorError::Peer("closed its socket")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.wait == Wait::Spinning => {
                    std::hint::spin_loop();
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(SPINS_PER_CLOCK_CHECK) {
                        let now = Instant::now();
                        if now >= *deadline.get_or_insert(now + PEER_TIMEOUT) {
                            return Err(FloorError::Peer("did not answer within 5 s"));
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(FloorError::Peer("did not answer within 5 s"))
                }
                Err(e) => return Err(io_err("reading the socket")(e)),
            }
        }
        Ok(())
    }

    /// Writes all of `buf` (a spinning end retries a full socket buffer).
    fn send(&mut self, buf: &[u8]) -> Result<(), FloorError> {
        let mut sent = 0;
        while sent < buf.len() {
            match self.sock.write(&buf[sent..]) {
                Ok(0) => return Err(FloorError::Peer("closed its socket")),
                Ok(n) => sent += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
                {
                    std::hint::spin_loop()
                }
                Err(e) => return Err(io_err("writing the socket")(e)),
            }
        }
        Ok(())
    }
}

/// `n` timed request/reply round trips between this thread and a server thread over a Unix
/// stream socket pair ([`REQUEST_BYTES`] out, [`REPLY_BYTES`] back), after a short warm-up.
pub fn socket_round_trips(n: usize, wait: Wait) -> Result<Vec<Duration>, FloorError> {
    let (client, server) = UnixStream::pair().map_err(io_err("creating a socket pair"))?;
    let mut client = End::new(client, wait)?;
    let mut server = End::new(server, wait)?;
    let total = n + WARMUP;
    let peer = std::thread::Builder::new()
        .name("floor-socket".into())
        .spawn(move || -> Result<(), FloorError> {
            let mut req = [0u8; REQUEST_BYTES];
            let reply = [0u8; REPLY_BYTES];
            for _ in 0..total {
                server.recv(&mut req)?;
                server.send(&reply)?;
            }
            Ok(())
        })
        .map_err(io_err("starting the socket peer thread"))?;
    let mut req = [0u8; REQUEST_BYTES];
    let mut reply = [0u8; REPLY_BYTES];
    let mut samples = Vec::with_capacity(n);
    let mut run = || -> Result<(), FloorError> {
        for i in 0..total {
            req[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let t = Instant::now();
            client.send(&req)?;
            client.recv(&mut reply)?;
            if i >= WARMUP {
                samples.push(t.elapsed());
            }
        }
        Ok(())
    };
    let ours = run();
    // On our error the peer sees the socket close when `client` drops below, or times out.
    drop(client);
    let theirs = peer.join().unwrap_or(Err(FloorError::Peer("panicked")));
    ours.and(theirs).map(|()| samples)
}

/// `n` timed eventfd wake-ups: this thread writes an eventfd while a second thread is blocked in
/// `poll` on it; a sample is the time from just before the write until the woken thread has read
/// the counter. The woken thread then wakes us through a second eventfd (not timed), so it is
/// blocked again before the next write.
pub fn eventfd_wakeups(n: usize) -> Result<Vec<Duration>, FloorError> {
    let kick = EventFd::new(0).map_err(io_err("creating an eventfd"))?;
    let ack = EventFd::new(0).map_err(io_err("creating an eventfd"))?;
    let (peer_kick, peer_ack) = (
        kick.try_clone().map_err(io_err("duplicating an eventfd"))?,
        ack.try_clone().map_err(io_err("duplicating an eventfd"))?,
    );
    let base = Instant::now();
    // Nanoseconds since `base` when the current kick was written, and the peer's latest sample.
    let sent_at = Arc::new(AtomicU64::new(0));
    let peer_sent_at = sent_at.clone();
    let total = n + WARMUP;
    let peer = std::thread::Builder::new()
        .name("floor-eventfd".into())
        .spawn(move || -> Result<Vec<Duration>, FloorError> {
            let mut samples = Vec::with_capacity(total);
            for _ in 0..total {
                wait_readable(&peer_kick)?;
                peer_kick.read().map_err(io_err("reading the eventfd"))?;
                let woke = base.elapsed();
                let sent = Duration::from_nanos(peer_sent_at.load(Ordering::Acquire));
                samples.push(woke.saturating_sub(sent));
                peer_ack.write(1).map_err(io_err("writing the eventfd"))?;
            }
            Ok(samples)
        })
        .map_err(io_err("starting the eventfd peer thread"))?;
    let run = || -> Result<(), FloorError> {
        for _ in 0..total {
            let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            sent_at.store(now, Ordering::Release);
            kick.write(1).map_err(io_err("writing the eventfd"))?;
            wait_readable(&ack)?;
            ack.read().map_err(io_err("reading the eventfd"))?;
        }
        Ok(())
    };
    let ours = run();
    let theirs = peer.join().unwrap_or(Err(FloorError::Peer("panicked")));
    ours?;
    theirs.map(|s| s.into_iter().skip(WARMUP).collect())
}

fn wait_readable(fd: &EventFd) -> Result<(), FloorError> {
    let mut fds = [PollFd::new(fd, libc::POLLIN)];
    match poll_fds(&mut fds, Some(PEER_TIMEOUT)).map_err(io_err("polling the eventfd"))? {
        0 => Err(FloorError::Peer("did not write its eventfd within 5 s")),
        _ => Ok(()),
    }
}

/// What the `exit-bench` guest measured: one access of each kind, as time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitFloor {
    /// `out` to an unclaimed port (the exit floor).
    pub pio_out: Stats,
    /// `in` from it.
    pub pio_in: Stats,
    /// MMIO write to [`UNCLAIMED_MMIO`].
    pub mmio_write: Option<Stats>,
    /// CPUID (handled by KVM in the kernel).
    pub cpuid: Option<Stats>,
    /// Two back-to-back `lfence; rdtsc` (included in every sample above).
    pub rdtsc: Stats,
}

impl ExitFloor {
    /// Reads the guest's result line; `None` when a field is missing.
    pub fn from_result(r: &GuestResult, tsc_khz: u64) -> Option<Self> {
        Some(ExitFloor {
            pio_out: Stats::from_guest(r, "out", tsc_khz)?,
            pio_in: Stats::from_guest(r, "in", tsc_khz)?,
            mmio_write: Stats::from_guest(r, "mmio", tsc_khz),
            cpuid: Stats::from_guest(r, "cpuid", tsc_khz),
            rdtsc: Stats::from_guest(r, "rdtsc", tsc_khz)?,
        })
    }
}

/// Boots the fast test guest with `exit-bench` (`n` accesses of each kind) and reads its result.
pub fn guest_exits(n: usize, tsc_khz: u64) -> Result<ExitFloor, FloorError> {
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::exit_bench(n as u64, Some(UNCLAIMED_MMIO))
        .tsc_khz(tsc_khz)
        .cmdline()
        .map_err(|e| FloorError::Guest(e.to_string()))?;
    cfg.serial = SerialMode::Capture;
    let mut vmm =
        Vmm::start(&cfg).map_err(|e| FloorError::Guest(iommu::error::chain(&e).to_string()))?;
    let exit = vmm
        .wait_timeout(Duration::from_secs(120))
        .map_err(|e| FloorError::Guest(iommu::error::chain(&e).to_string()))?;
    let serial = vmm.serial_output().unwrap_or_default();
    if exit != VmExit::ExitPort(0) {
        return Err(FloorError::Guest(format!(
            "exit {exit:?}; serial: {}",
            serial.lines().last().unwrap_or_default()
        )));
    }
    let r = GuestResult::from_output(&serial).map_err(|e| FloorError::Guest(e.to_string()))?;
    ExitFloor::from_result(&r, tsc_khz)
        .ok_or_else(|| FloorError::Guest("the result line lacks a field".into()))
}

/// Every floor of one run (a floor that could not be measured carries its error).
#[derive(Debug)]
pub struct Floors {
    /// Round trips per floor.
    pub iterations: usize,
    /// Socket round trip, both ends blocking.
    pub socket_blocking: Result<Stats, FloorError>,
    /// Socket round trip, both ends spinning.
    pub socket_spinning: Result<Stats, FloorError>,
    /// Guest exits.
    pub exits: Result<ExitFloor, FloorError>,
    /// eventfd wake-up of a blocked thread.
    pub eventfd: Result<Stats, FloorError>,
}

fn summarised(samples: Result<Vec<Duration>, FloorError>) -> Result<Stats, FloorError> {
    Stats::from_samples(&mut samples?).ok_or(FloorError::Peer("produced no samples"))
}

impl Floors {
    /// Measures every floor with `n` iterations each.
    pub fn measure(n: usize, tsc_khz: u64) -> Self {
        let n = n.max(1);
        Floors {
            iterations: n,
            socket_blocking: summarised(socket_round_trips(n, Wait::Blocking)),
            socket_spinning: summarised(socket_round_trips(n, Wait::Spinning)),
            exits: guest_exits(n, tsc_khz),
            eventfd: summarised(eventfd_wakeups(n)),
        }
    }

    /// Median socket round trip.
    pub fn socket_p50(&self, wait: Wait) -> Option<Duration> {
        match wait {
            Wait::Blocking => self.socket_blocking.as_ref().ok().map(|s| s.p50),
            Wait::Spinning => self.socket_spinning.as_ref().ok().map(|s| s.p50),
        }
    }

    /// Median guest exit: the `out` to an unclaimed port.
    pub fn exit_p50(&self) -> Option<Duration> {
        self.exits.as_ref().ok().map(|e| e.pio_out.p50)
    }

    /// Median MMIO-write exit (the PIO exit when the MMIO one is missing).
    pub fn mmio_exit_p50(&self) -> Option<Duration> {
        let e = self.exits.as_ref().ok()?;
        Some(e.mmio_write.unwrap_or(e.pio_out).p50)
    }

    /// Median exit handled in the kernel (CPUID).
    pub fn kernel_exit_p50(&self) -> Option<Duration> {
        self.exits.as_ref().ok()?.cpuid.map(|s| s.p50)
    }

    /// Median eventfd wake-up.
    pub fn eventfd_p50(&self) -> Option<Duration> {
        self.eventfd.as_ref().ok().map(|s| s.p50)
    }

    /// The floors section of the bench output (markdown table).
    pub fn print(&self) {
        println!(
            "\n== Floors of this machine, same run ({} iterations each; us)",
            self.iterations
        );
        println!("| floor | p50 us | p99 us | min us |");
        println!("|---|---:|---:|---:|");
        let row = |name: &str, s: &Result<Stats, FloorError>| match s {
            Ok(s) => println!(
                "| {name} | {:.2} | {:.2} | {:.2} |",
                us(s.p50),
                us(s.p99),
                us(s.min)
            ),
            Err(e) => println!("| {name} | failed: {} | | |", iommu::error::chain(e)),
        };
        let bytes = format!("{REQUEST_BYTES} B / {REPLY_BYTES} B");
        row(
            &format!("socket round trip, blocking ({bytes})"),
            &self.socket_blocking,
        );
        row(
            &format!("socket round trip, spinning ({bytes})"),
            &self.socket_spinning,
        );
        match &self.exits {
            Ok(e) => {
                row("guest exit: ring-3 out to port 0x80", &Ok(e.pio_out));
                row("guest exit: ring-3 in from port 0x80", &Ok(e.pio_in));
                if let Some(m) = e.mmio_write {
                    row(
                        &format!("guest exit: MMIO write to {UNCLAIMED_MMIO:#x}"),
                        &Ok(m),
                    );
                }
                if let Some(c) = e.cpuid {
                    row("guest exit handled in KVM: ring-3 cpuid", &Ok(c));
                }
                row(
                    "(guest lfence+rdtsc pair, in every exit sample)",
                    &Ok(e.rdtsc),
                );
            }
            Err(e) => println!("| guest exit | failed: {} | | |", iommu::error::chain(e)),
        }
        row("eventfd wake-up of a blocked thread", &self.eventfd);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn us_(v: u64) -> Duration {
        Duration::from_micros(v)
    }

    #[test]
    fn stats_rank_the_samples() {
        let mut v: Vec<Duration> = (1..=100).rev().map(us_).collect();
        let s = Stats::from_samples(&mut v).unwrap();
        assert_eq!(
            (s.count, s.min, s.p50, s.p99),
            (100, us_(1), us_(50), us_(99))
        );
        let one = Stats::from_samples(&mut [us_(7)]).unwrap();
        assert_eq!((one.p50, one.p99, one.min), (us_(7), us_(7), us_(7)));
        assert_eq!(Stats::from_samples(&mut []), None);
    }

    #[test]
    fn cycles_become_time_at_the_tsc_rate() {
        assert_eq!(cycles_to_duration(2_000, 2_000_000), Some(us_(1)));
        assert_eq!(
            cycles_to_duration(3, 1_000_000),
            Some(Duration::from_nanos(3))
        );
        assert_eq!(cycles_to_duration(1, 0), None);
        assert_eq!(
            cycles_to_duration(u64::MAX, 1),
            Some(Duration::from_nanos(u64::MAX))
        );
    }

    #[test]
    fn exit_floor_reads_the_guest_summary() {
        let line = r#"IOVMM-RESULT {"test":"exit-bench","status":"ok","iterations":20000,"port":"0x80","rdtsc_p50":40,"rdtsc_p99":60,"rdtsc_min":30,"rdtsc_cycles":800000,"out_p50":4000,"out_p99":8000,"out_min":3000,"out_cycles":90000000,"in_p50":4200,"in_p99":9000,"in_min":3100,"in_cycles":1,"tsc_khz":2000000}"#;
        let r = GuestResult::parse_line(line).unwrap();
        let e = ExitFloor::from_result(&r, 2_000_000).unwrap();
        assert_eq!(
            (e.pio_out.p50, e.pio_out.p99, e.pio_out.min),
            (us_(2), us_(4), Duration::from_nanos(1500))
        );
        assert_eq!(e.pio_out.count, 20_000);
        assert_eq!(e.pio_in.p50, Duration::from_nanos(2100));
        assert_eq!(e.rdtsc.p50, Duration::from_nanos(20));
        assert_eq!(
            (e.mmio_write, e.cpuid),
            (None, None),
            "no fields: not measured"
        );
        assert_eq!(ExitFloor::from_result(&r, 0), None, "unknown TSC rate");
    }

    #[test]
    fn exit_bench_scenario_passes_the_mmio_address_in_hex() {
        assert_eq!(
            Scenario::exit_bench(500, Some(UNCLAIMED_MMIO))
                .cmdline()
                .unwrap(),
            "iovmm.test=exit-bench iovmm.iterations=500 iovmm.mmio=0xe0100000"
        );
        assert_eq!(
            Scenario::exit_bench(1, None).cmdline().unwrap(),
            "iovmm.test=exit-bench iovmm.iterations=1"
        );
    }

    #[test]
    fn socket_and_eventfd_floors_produce_one_sample_per_iteration() {
        for wait in [Wait::Blocking, Wait::Spinning] {
            assert_eq!(socket_round_trips(50, wait).unwrap().len(), 50, "{wait:?}");
        }
        assert_eq!(eventfd_wakeups(50).unwrap().len(), 50);
    }

    #[test]
    fn a_missing_floor_has_no_median() {
        let f = Floors {
            iterations: 1,
            socket_blocking: Err(FloorError::Peer("closed its socket")),
            socket_spinning: Ok(Stats::from_samples(&mut [us_(3)]).unwrap()),
            exits: Err(FloorError::Guest("no KVM".into())),
            eventfd: Err(FloorError::Peer("panicked")),
        };
        assert_eq!(f.socket_p50(Wait::Blocking), None);
        assert_eq!(f.socket_p50(Wait::Spinning), Some(us_(3)));
        assert_eq!(
            (f.exit_p50(), f.mmio_exit_p50(), f.eventfd_p50()),
            (None, None, None)
        );
        assert_eq!(f.kernel_exit_p50(), None);
    }
}
