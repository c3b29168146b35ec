//! Parsers for what a QEMU reference run leaves behind: the guest's
//! `IOVMM-BENCH {...}` line, `/proc/PID/status` sizes and QEMU's
//! `vhost_iotlb_miss` trace.

use std::time::Duration;

use crate::backend::latency::LatencyStats;

/// Prefix of the line the guest's `iovmm-netbench` prints.
pub const BENCH_PREFIX: &str = "IOVMM-BENCH ";

/// What the guest measured (see resources/guest-netbench.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBench {
    /// Frames handed to the socket.
    pub frames: u64,
    /// Ethernet frame size in bytes.
    pub size: u64,
    /// Guest time of the send loop.
    pub send: Duration,
    /// Guest time from the end of the loop until the device had completed
    /// every frame (the interface's tx_packets counter).
    pub drain: Duration,
    /// Sends retried because the queue was full.
    pub retries: u64,
    /// Growth of the interface's tx_packets counter.
    pub tx_packets: u64,
}

impl GuestBench {
    /// Guest-measured frames per second over send + drain.
    pub fn frames_per_sec(&self) -> f64 {
        let t = (self.send + self.drain).as_secs_f64();
        if t > 0.0 {
            self.frames as f64 / t
        } else {
            0.0
        }
    }
}

/// The unsigned integer value of `"key":N` in a flat JSON object.
fn json_u64(obj: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\":");
    let at = obj.find(&pat)? + pat.len();
    let digits: &str = obj[at..].trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Finds and parses the last `IOVMM-BENCH {...}` line of a serial log
/// (kernel messages may share the line, so the prefix may be mid-line).
pub fn parse_bench(log: &str) -> Option<GuestBench> {
    let line = log.lines().rev().find_map(|l| {
        let at = l.find(BENCH_PREFIX)?;
        Some(&l[at + BENCH_PREFIX.len()..])
    })?;
    let obj = &line[..line.find('}')? + 1];
    if !obj.starts_with('{') {
        return None;
    }
    Some(GuestBench {
        frames: json_u64(obj, "frames")?,
        size: json_u64(obj, "size")?,
        send: Duration::from_nanos(json_u64(obj, "send_ns")?),
        drain: Duration::from_nanos(json_u64(obj, "drain_ns")?),
        retries: json_u64(obj, "retries")?,
        tx_packets: json_u64(obj, "tx_packets")?,
    })
}

/// A `Vm*:  N kB` field of `/proc/PID/status`, in KiB.
pub fn status_kib(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let n = words.next()?.parse().ok()?;
        (words.next() == Some("kB")).then_some(n)
    })
}

/// Counts of QEMU's `vhost_iotlb_miss` trace events (log backend lines
/// `vhost_iotlb_miss DEV step S`, `PID@SEC.USEC:`-prefixed with
/// `-msg timestamp=on`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceMisses {
    /// Misses QEMU started to handle (step 1).
    pub received: u64,
    /// Misses answered with an UPDATE (step 2).
    pub answered: u64,
    /// Misses that failed (steps 3 and 4).
    pub failed: u64,
    /// QEMU's own miss handling time, step 1 to step 2 of the same device
    /// (translate, send the UPDATE, wait for the back end's ack), at the
    /// trace's microsecond resolution; `None` without timestamps.
    pub service: Option<LatencyStats>,
}

/// The `PID@SEC.USEC:` timestamp of a trace line, in microseconds.
fn trace_time_us(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once('@')?;
    let (stamp, _) = rest.split_once(':')?;
    let (sec, usec) = stamp.split_once('.')?;
    let (sec, usec): (u64, u64) = (sec.parse().ok()?, usec.parse().ok()?);
    (usec < 1_000_000).then_some(sec.checked_mul(1_000_000)?.checked_add(usec)?)
}

/// Parses a QEMU trace log.
pub fn parse_trace_misses(trace: &str) -> TraceMisses {
    let mut t = TraceMisses::default();
    // QEMU handles misses one at a time on its main loop.
    let mut open: Option<(&str, u64)> = None;
    let mut service = Vec::new();
    for l in trace.lines() {
        let Some((_, event)) = l.split_once("vhost_iotlb_miss ") else {
            continue;
        };
        let Some((dev, step)) = event.split_once(" step ") else {
            continue;
        };
        let at = trace_time_us(l);
        match step.trim() {
            "1" => {
                t.received += 1;
                open = at.map(|at| (dev, at));
            }
            "2" => {
                t.answered += 1;
                if let (Some((d, t1)), Some(t2)) = (open.take(), at) {
                    if d == dev && t2 >= t1 {
                        service.push(Duration::from_micros(t2 - t1));
                    }
                }
            }
            "3" | "4" => {
                t.failed += 1;
                open = None;
            }
            _ => {}
        }
    }
    t.service = LatencyStats::from_samples(service);
    t
}

/// The last `n` lines of `text`, for error messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "IOVMM-BENCH {\"bench\":\"net-tx\",\"frames\":2000,\"size\":1024,\
        \"send_ns\":103233994,\"drain_ns\":4594546,\"retries\":3,\"tx_packets\":2000}";

    #[test]
    fn bench_line_is_parsed_even_after_kernel_output_on_the_same_line() {
        let log =
            format!("[    4.3] Run /init\n[    9.1] virtio_net: x{LINE}\nIOVMM-GUEST-READY\n");
        let b = parse_bench(&log).unwrap_or_else(|| panic!("not parsed"));
        assert_eq!(
            (b.frames, b.size, b.retries, b.tx_packets),
            (2000, 1024, 3, 2000)
        );
        assert_eq!(b.send, Duration::from_nanos(103_233_994));
        assert_eq!(b.drain, Duration::from_nanos(4_594_546));
        assert!((b.frames_per_sec() - 2000.0 / 0.10782854).abs() < 1.0);
    }

    #[test]
    fn incomplete_or_missing_bench_line_is_rejected() {
        assert!(parse_bench("IOVMM-GUEST-READY\n").is_none());
        assert!(parse_bench("IOVMM-BENCH {\"frames\":2000,\"size\":1024").is_none());
        let no_drain = LINE.replace("\"drain_ns\":4594546,", "");
        assert!(parse_bench(&no_drain).is_none());
        let negative = LINE.replace("\"retries\":3", "\"retries\":-3");
        assert!(parse_bench(&negative).is_none());
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let s = "Name:\tqemu-system-x86\nVmPeak:\t 2000000 kB\nVmHWM:\t  241512 kB\nVmRSS:\t  239000 kB\n";
        assert_eq!(status_kib(s, "VmHWM"), Some(241_512));
        assert_eq!(status_kib(s, "VmRSS"), Some(239_000));
        assert_eq!(status_kib(s, "VmSwap"), None);
        assert_eq!(status_kib("VmRSS:\t12 MB\n", "VmRSS"), None);
    }

    #[test]
    fn trace_misses_are_counted_by_step() {
        let t = "vhost_iotlb_miss 0x55f1a14db860 step 1\n\
                 vhost_iotlb_miss 0x55f1a14db860 step 2\n\
                 1234@1700000000.000001:vhost_iotlb_miss 0x55f1 step 1\n\
                 vhost_iotlb_miss 0x55f1 step 3\n\
                 vtd_inv_desc iotlb step 1\n";
        let m = parse_trace_misses(t);
        assert_eq!((m.received, m.answered, m.failed), (2, 1, 1));
        assert_eq!(m.service, None, "no timestamps, no service times");
    }

    #[test]
    fn trace_service_time_pairs_step_1_and_2_of_the_same_device() {
        let t = "9@1795427307.999990:vhost_iotlb_miss 0xa step 1\n\
                 9@1795427308.000357:vhost_iotlb_miss 0xa step 2\n\
                 9@1795427308.000400:vhost_iotlb_miss 0xa step 1\n\
                 9@1795427308.000500:vhost_iotlb_miss 0xb step 2\n\
                 9@1795427308.000600:vhost_iotlb_miss 0xa step 1\n\
                 9@1795427308.000700:vhost_iotlb_miss 0xa step 3\n\
                 9@1795427308.1000000:vhost_iotlb_miss 0xa step 2\n";
        let m = parse_trace_misses(t);
        assert_eq!((m.received, m.answered, m.failed), (3, 3, 1));
        let s = m.service.unwrap_or_else(|| panic!("service times"));
        // Only the first pair matches: other device, failed miss, bad stamp.
        assert_eq!((s.count, s.p50), (1, Duration::from_micros(367)));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
