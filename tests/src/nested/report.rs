//! Cuts L1's console transcript into per-scenario records, checks each one
//! against its [`Scenario`] and prints the table.

use std::fmt::Write as _;
use std::time::Duration;

use super::scenario::{Backend, Outcome, Scenario, SHUTDOWN_TIMEOUT_MS};
use super::tap_peer::parse_summary;
use crate::dpdk::parse_port_stats;
use crate::guest::{GuestResult, RESULT_PREFIX};

/// L1's console, line by line, with the time each line arrived.
#[derive(Debug, Default)]
pub struct Transcript {
    /// `(time since QEMU started, line)`.
    pub lines: Vec<(Duration, String)>,
    /// The run hit its timeout.
    pub timed_out: bool,
    /// Wall time of the whole L0 run.
    pub elapsed: Duration,
}

impl Transcript {
    /// Appends a later L1 run's console, its times shifted past this one's.
    pub fn append(&mut self, later: Transcript) {
        let base = self.elapsed;
        self.lines
            .extend(later.lines.into_iter().map(|(t, l)| (base + t, l)));
        self.elapsed = base + later.elapsed;
        self.timed_out |= later.timed_out;
    }

    /// When `prefix` first appeared.
    pub fn find(&self, prefix: &str) -> Option<(Duration, &str)> {
        self.lines
            .iter()
            .find(|(_, l)| l.starts_with(prefix))
            .map(|(t, l)| (*t, l.as_str()))
    }

    /// The last `n` lines, for failure reports.
    pub fn tail(&self, n: usize) -> String {
        let from = self.lines.len().saturating_sub(n);
        self.lines[from..]
            .iter()
            .map(|(t, l)| format!("[{:7.1}s] {l}\n", t.as_secs_f64()))
            .collect()
    }
}

/// What the guest, iovmm and the backend showed for one scenario.
#[derive(Debug, Default, Clone)]
pub struct ScenarioReport {
    /// Scenario name.
    pub name: String,
    /// `NESTED-BEGIN` .. `NESTED-END`.
    pub wall: Option<Duration>,
    /// iovmm start to the guest's first `/init` line.
    pub boot_to_init: Option<Duration>,
    /// iovmm start to its exit.
    pub vm_time: Option<Duration>,
    /// iovmm's exit status.
    pub rc: Option<i32>,
    /// Lines printed by iovmm and the guest.
    pub vm_log: Vec<String>,
    /// The backend's output.
    pub backend_log: String,
    /// The guest's `IOVMM-BENCH` record.
    pub bench: Option<serde_json::Value>,
    /// iovmm's `iovmm-counters:` record of the device.
    pub counters: Option<serde_json::Value>,
    /// Frames the backend received.
    pub backend_frames: Option<u64>,
    /// Frames our backend delivered into the guest's RX buffers.
    pub backend_rx_frames: Option<u64>,
    /// Frames testpmd sent towards the guest (txonly).
    pub testpmd_tx: Option<u64>,
    /// The guest's eth0 RX packet count (`/proc/net/dev`).
    pub guest_netdev_rx: Option<u64>,
    /// The test backend's accesses without a translation after a miss.
    pub translation_failures: Option<u64>,
    /// The tap peer's `TAP-PEER` record (vhost-net scenarios).
    pub tap_peer: Option<serde_json::Value>,
    /// The fast test guest's `IOVMM-RESULT` line (test-guest scenarios).
    pub guest_result: Option<GuestResult>,
    /// iovmm's answer to L1's `PUT vm.shutdown` (API shutdown scenarios).
    pub shutdown_answer: Option<serde_json::Value>,
    /// The expected driver lines, as printed.
    pub driver_lines: Vec<String>,
    /// Everything that did not hold.
    pub failures: Vec<String>,
    /// Guest crashes that made the scenario run again, each with iovmm's
    /// crash report.
    pub retries: Vec<String>,
}

fn marker_rest<'a>(line: &'a str, marker: &str, name: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(marker)?.strip_prefix(' ')?;
    let rest = rest.strip_prefix(name)?;
    (rest.is_empty() || rest.starts_with(' ')).then(|| rest.trim())
}

/// The `name: value` field of a Rust `Debug` struct print.
fn debug_field(text: &str, name: &str) -> Option<u64> {
    let key = format!("{name}: ");
    let i = text.rfind(&key)?;
    let digits: String = text[i + key.len()..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn json_after(line: &str, prefix: &str) -> Option<serde_json::Value> {
    let i = line.find(prefix)?;
    serde_json::from_str(line[i + prefix.len()..].trim()).ok()
}

fn u(v: &Option<serde_json::Value>, key: &str) -> u64 {
    v.as_ref()
        .and_then(|v| v.get(key))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
}

impl ScenarioReport {
    /// Cuts `sc`'s part out of `t`.
    pub fn extract(t: &Transcript, sc: &Scenario) -> Self {
        let mut r = ScenarioReport {
            name: sc.name.clone(),
            ..Default::default()
        };
        let (mut begin, mut vm_start) = (None, None);
        let mut in_vm = false;
        let mut in_log = false;
        for (at, line) in &t.lines {
            if marker_rest(line, "NESTED-BEGIN", &sc.name).is_some() {
                // A scenario cut off by an L1 that ended early starts again.
                begin = Some(*at);
                r.vm_log.clear();
                r.backend_log.clear();
                r.boot_to_init = None;
            } else if marker_rest(line, "NESTED-VM-START", &sc.name).is_some() {
                vm_start = Some(*at);
                in_vm = true;
            } else if let Some(rest) = marker_rest(line, "NESTED-VM-EXIT", &sc.name) {
                in_vm = false;
                r.rc = rest.strip_prefix("rc=").and_then(|c| c.parse().ok());
                r.vm_time = vm_start.map(|s| at.saturating_sub(s));
            } else if marker_rest(line, "NESTED-LOG-BEGIN", &sc.name).is_some() {
                in_log = true;
            } else if marker_rest(line, "NESTED-LOG-END", &sc.name).is_some() {
                in_log = false;
            } else if let Some(rest) = marker_rest(line, "NESTED-RETRY", &sc.name) {
                // Keep the crash (or hang: killed by timeout) for the report;
                // judge the second attempt.
                let crash: Vec<_> = std::iter::once(format!("iovmm exit {rest}"))
                    .chain(
                        r.vm_log
                            .iter()
                            .filter(|l| l.starts_with("iovmm:") || l.starts_with("  "))
                            .cloned(),
                    )
                    .collect();
                r.retries.push(crash.join("\n"));
                r.vm_log.clear();
                r.backend_log.clear();
                r.boot_to_init = None;
            } else if marker_rest(line, "NESTED-END", &sc.name).is_some() {
                r.wall = begin.map(|b| at.saturating_sub(b));
                break;
            } else if in_vm {
                if r.boot_to_init.is_none() && line.contains("iovmm-init: started") {
                    r.boot_to_init = vm_start.map(|s| at.saturating_sub(s));
                }
                r.vm_log.push(line.clone());
            } else if in_log {
                r.backend_log.push_str(line);
                r.backend_log.push('\n');
            }
        }
        r.parse_records(sc);
        r
    }

    fn parse_records(&mut self, sc: &Scenario) {
        for l in &self.vm_log {
            if let Some(rest) = l.split("iovmm-init: netdev:").nth(1) {
                // "eth0: RX-bytes RX-packets ..."
                self.guest_netdev_rx = rest.split_whitespace().nth(2).and_then(|v| v.parse().ok());
            }
            if self.bench.is_none() {
                self.bench = json_after(l, "IOVMM-BENCH ");
            }
            if self.counters.is_none() {
                self.counters = json_after(l, "iovmm-counters: ");
            }
            if self.guest_result.is_none() && l.contains(RESULT_PREFIX) {
                self.guest_result = GuestResult::parse_line(l).ok();
            }
            if self.shutdown_answer.is_none() {
                let marker = format!("NESTED-SHUTDOWN-ANSWER {} ", sc.name);
                self.shutdown_answer = l.strip_prefix(&marker).and_then(|a| json_after(a, ""));
            }
        }
        match sc.backend {
            Backend::None => {}
            Backend::Own { .. } => {
                self.backend_frames = debug_field(&self.backend_log, "tx_frames");
                self.backend_rx_frames = debug_field(&self.backend_log, "rx_frames");
                self.translation_failures = debug_field(&self.backend_log, "translation_failures");
            }
            Backend::Testpmd => {
                let stats = parse_port_stats(&self.backend_log);
                self.backend_frames = stats.map(|p| p.rx_packets);
                self.testpmd_tx = stats.map(|p| p.tx_packets);
            }
            Backend::VhostNet => {
                self.tap_peer = parse_summary(&self.backend_log);
                let field = |k: &str| self.tap_peer.as_ref()?.get(k)?.as_u64();
                self.backend_frames = field("udp_good");
                self.backend_rx_frames = field("rx_delivered");
            }
        }
        for want in sc.expect_lines {
            match self.vm_log.iter().find(|l| l.contains(want)) {
                Some(l) => self.driver_lines.push(l.trim().to_string()),
                None => self.failures.push(format!("no line containing {want:?}")),
            }
        }
    }

    /// Checks the record against the scenario; fills `failures`.
    pub fn check(&mut self, sc: &Scenario) {
        if self.wall.is_none() {
            self.failures.push("the scenario did not finish".into());
            return;
        }
        match sc.outcome {
            Outcome::PowerOff if sc.test_guest.is_some() => {
                match sc.is_stale() {
                    true => self.check_stale(),
                    false => self.check_test_guest(sc),
                }
                self.check_tap_peer();
            }
            Outcome::PowerOff => {
                self.check_power_off(sc);
                self.failures
                    .extend(sc.queue_pairs_problem(&self.backend_log));
            }
            Outcome::SetupError(text) => {
                let line = self.vm_log.iter().find(|l| l.contains("iovmm: error"));
                if self.rc != Some(1) || !line.is_some_and(|l| l.contains(text)) {
                    self.failures.push(format!(
                        "expected iovmm to refuse the setup (exit 1, error naming {text}); rc {:?}",
                        self.rc
                    ));
                }
            }
        }
    }

    fn check_power_off(&mut self, sc: &Scenario) {
        if self.rc != Some(0) {
            self.failures.push(format!(
                "iovmm exited with {:?}, not 0 (power-off)",
                self.rc
            ));
        }
        if !self.vm_log.iter().any(|l| l.contains("IOVMM-GUEST-READY")) {
            self.failures
                .push("the guest never printed IOVMM-GUEST-READY".into());
        }
        if sc.frames > 0 {
            self.check_frames(sc);
        }
        if sc.api_shutdown {
            self.check_api_shutdown();
        }
        if sc.backend == Backend::VhostNet {
            self.check_tap_peer();
        }
        let c = &self.counters;
        if sc.expect_misses && (u(c, "misses") == 0 || u(c, "misses_refused") > 0) {
            self.failures.push(format!(
                "expected served IOTLB misses and none refused: misses {} refused {}",
                u(c, "misses"),
                u(c, "misses_refused")
            ));
        }
        if sc.expect_devtlb && u(c, "devtlb_notifications") == 0 {
            self.failures
                .push("no unmap came as a device-TLB invalidation (ATS unused?)".into());
        }
    }

    /// The control API's shutdown ended in the guest's own S5 power-off, within the timeout.
    fn check_api_shutdown(&mut self) {
        let a = self.shutdown_answer.as_ref();
        let field = |k: &str| a.and_then(|a| a.get(k)).cloned();
        let waited = field("waited_ms").and_then(|v| v.as_u64());
        let ok = field("result").as_ref().and_then(|v| v.as_str()) == Some("powered-off")
            && field("exit").as_ref().and_then(|v| v.as_str()) == Some("power_off")
            && field("button") == Some(serde_json::Value::Bool(true))
            && waited.is_some_and(|w| w < SHUTDOWN_TIMEOUT_MS);
        if !ok {
            let line = self
                .vm_log
                .iter()
                .find(|l| l.starts_with("NESTED-SHUTDOWN-ANSWER"));
            self.failures.push(format!(
                "expected the shutdown to press the power button and the guest to power off \
                 within {SHUTDOWN_TIMEOUT_MS} ms; the answer was {line:?}"
            ));
        }
    }

    /// A fast test guest's common end: iovmm exited 0 through the exit port and the guest
    /// printed its result record, which is returned (failures are noted otherwise).
    fn test_guest_exit(&mut self) -> Option<GuestResult> {
        if self.rc != Some(0) {
            self.failures.push(format!(
                "iovmm exited with {:?}, not 0 (exit port)",
                self.rc
            ));
        }
        if self.guest_result.is_none() {
            self.failures
                .push("the test guest printed no IOVMM-RESULT".into());
        }
        self.guest_result.clone()
    }

    /// A fast test guest run: exit 0 through the exit port, status ok; receiving, every frame
    /// the peer delivered arrived intact (the guest checks each byte) and the device was reset.
    fn check_test_guest(&mut self, sc: &Scenario) {
        let Some(r) = self.test_guest_exit() else {
            return;
        };
        let want = u64::from(sc.frames);
        let (status, received) = (r.status(), r.u64("received"));
        if status != Some("ok") || (sc.rx && received != Some(want)) {
            self.failures.push(format!(
                "test guest: status {status:?}, received {received:?} of {want}: {:?}",
                r.str("error")
            ));
        }
        if sc.rx && self.backend_rx_frames != Some(want) {
            self.failures.push(format!(
                "the tap peer delivered {:?} of {want} frames",
                self.backend_rx_frames
            ));
        }
        let c = &self.counters;
        if sc.expect_misses && (u(c, "misses") == 0 || u(c, "misses_refused") > 0) {
            self.failures.push(format!(
                "expected served IOTLB misses and none refused: misses {} refused {}",
                u(c, "misses"),
                u(c, "misses_refused")
            ));
        }
    }

    /// Use after unmap through vhost-net: frame 0 reached the tap, the marker never did, the
    /// stale descriptor never completed (the kernel's queue stays stopped on the refused
    /// miss), and iovmm refused that miss and reported the fault at the stale IOVA.
    fn check_stale(&mut self) {
        let Some(r) = self.test_guest_exit() else {
            return;
        };
        let (status, completed) = (r.status(), r.u64("stale_completed"));
        if status != Some("ok") || completed != Some(0) {
            self.failures.push(format!(
                "test guest: status {status:?}, stale descriptor completed {completed:?} (want ok, 0)"
            ));
        }
        let page = |v: Option<u64>| v.map(|a| a & !0xfff);
        if page(r.u64("fault_addr")) != page(r.u64("stale_iova")) {
            self.failures.push(format!(
                "the guest saw a fault at {:?}, the stale IOVA is {:?}",
                r.u64("fault_addr"),
                r.u64("stale_iova")
            ));
        }
        let seq = self
            .tap_peer
            .as_ref()
            .and_then(|p| p.get("seq_good")?.as_u64());
        if seq != Some(1) {
            self.failures.push(format!(
                "the tap saw {seq:?} frames of the test guest, want 1 (frame 0)"
            ));
        }
        let c = &self.counters;
        if u(c, "misses_refused") == 0 || u(c, "faults") == 0 {
            self.failures.push(format!(
                "iovmm refused {} misses and reported {} faults; want both > 0",
                u(c, "misses_refused"),
                u(c, "faults")
            ));
        }
    }

    /// The tap's peer saw only intact frames from the guest (no duplicate, no malformed one,
    /// never the use-after-unmap marker) and could send what it had to.
    fn check_tap_peer(&mut self) {
        let Some(p) = &self.tap_peer else {
            return self
                .failures
                .push("the tap peer printed no TAP-PEER record".into());
        };
        let n = |k: &str| {
            p.get(k)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(u64::MAX)
        };
        let bad = [
            ("udp_bad", n("udp_bad")),
            ("udp_dup", n("udp_dup")),
            ("markers", n("markers")),
            ("socket_drops", n("socket_drops")),
        ];
        for (k, v) in bad.into_iter().filter(|(_, v)| *v != 0) {
            self.failures
                .push(format!("the tap peer counted {k} = {v}"));
        }
        if let Some(e) = p.get("error").filter(|e| !e.is_null()) {
            self.failures.push(format!("the tap peer failed: {e}"));
        }
    }

    /// Field `key` of the guest's `IOVMM-BENCH` record.
    fn bench_field(&self, key: &str) -> Option<&serde_json::Value> {
        self.bench.as_ref()?.get(key)
    }

    fn bench_u64(&self, key: &str) -> Option<u64> {
        self.bench_field(key)?.as_u64()
    }

    /// Every generated frame reached the guest's socket intact.
    fn check_received(&mut self, sc: &Scenario) {
        let want = u64::from(sc.frames);
        let (got, bad) = (self.bench_u64("received"), self.bench_u64("bad"));
        if got != Some(want) || bad != Some(0) {
            self.failures.push(format!(
                "guest received {got:?} good and {bad:?} bad of {want} frames"
            ));
        }
        if self.backend_rx_frames != Some(want) {
            self.failures.push(format!(
                "backend delivered {:?} of {want} frames",
                self.backend_rx_frames
            ));
        }
    }

    /// The guest read back what it wrote, and the backend served both.
    fn check_blk(&mut self) {
        let matched = self
            .bench_field("match")
            .and_then(serde_json::Value::as_bool);
        if matched != Some(true) {
            self.failures.push(format!(
                "the guest read back other data than it wrote: {matched:?}"
            ));
        }
        let (reads, writes, errs) = (
            debug_field(&self.backend_log, "reads"),
            debug_field(&self.backend_log, "writes"),
            debug_field(&self.backend_log, "ioerrs"),
        );
        if !(reads > Some(0) && writes > Some(0) && errs == Some(0)) {
            self.failures.push(format!(
                "backend blk requests: reads {reads:?} writes {writes:?} I/O errors {errs:?}"
            ));
        }
    }

    /// testpmd's txonly frames into the guest: delivered without a vIOMMU;
    /// behind one, DPDK's read-write miss on a write-only buffer refused.
    fn check_testpmd_rx(&mut self, sc: &Scenario) {
        let rx = self.guest_netdev_rx;
        if sc.expect_rw_refusal {
            let c = &self.counters;
            let warned = self
                .vm_log
                .iter()
                .any(|l| l.contains("for ReadWrite access was refused"));
            if u(c, "faults") == 0 || u(c, "misses_refused") == 0 || !warned || rx != Some(0) {
                self.failures.push(format!(
                    "expected DPDK's read-write RX miss refused and reported, nothing received: \
                     faults {} refused {} warned {warned} guest rx {rx:?}",
                    u(c, "faults"),
                    u(c, "misses_refused")
                ));
            }
        } else if !(rx > Some(0) && self.testpmd_tx >= rx) {
            self.failures.push(format!(
                "testpmd sent {:?} frames, the guest's eth0 received {rx:?}",
                self.testpmd_tx
            ));
        }
    }

    fn check_frames(&mut self, sc: &Scenario) {
        if sc.blk {
            return self.check_blk();
        }
        if sc.rx && sc.backend == Backend::Testpmd {
            return self.check_testpmd_rx(sc);
        }
        if sc.rx {
            return self.check_received(sc);
        }
        let want = u64::from(sc.frames);
        let guest = self.bench_u64("tx_packets");
        if sc.qdisc == "fq_codel" {
            self.check_aqm_accounting(want, guest);
        } else if guest != Some(want) {
            self.failures
                .push(format!("guest completed {guest:?} of {want} frames"));
        }
        if self.backend_frames != guest {
            self.failures.push(format!(
                "backend received {:?} frames, the guest's device completed {guest:?}",
                self.backend_frames
            ));
        }
        if self.translation_failures.is_some_and(|n| n > 0) {
            self.failures.push(format!(
                "backend saw {:?} translation failures",
                self.translation_failures
            ));
        }
    }

    /// Every frame the socket accepted was either completed by the device or
    /// dropped by the guest's qdisc.
    fn check_aqm_accounting(&mut self, want: u64, guest: Option<u64>) {
        let kind = self
            .bench_field("qdisc")
            .and_then(serde_json::Value::as_str);
        let drops = self.bench_u64("qdisc_drops");
        let accounted = guest.zip(drops).map(|(g, d)| g + d);
        if kind != Some("fq_codel") || accounted != Some(want) {
            self.failures.push(format!(
                "qdisc {kind:?}: device completed {guest:?} + qdisc dropped {drops:?} != {want} sent"
            ));
        }
    }

    /// Passed every check.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Messages per guest frame, for the table.
    fn per_frame(&self, key: &str, frames: u32) -> String {
        if frames == 0 || self.counters.is_none() {
            return "-".into();
        }
        format!("{:.2}", u(&self.counters, key) as f64 / f64::from(frames))
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

/// The per-scenario table.
pub fn table(scs: &[Scenario], reports: &[ScenarioReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | vIOMMU | backend | result | wall s | boot→init s | frames guest/backend | miss/f | upd/f | inv/f | devtlb |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for (sc, r) in scs.iter().zip(reports) {
        let frames = if sc.api_shutdown {
            let a = r.shutdown_answer.as_ref();
            let field = |k: &str| {
                a.and_then(|a| a.get(k))
                    .map_or("-".into(), |v| v.to_string())
            };
            format!("shutdown {} in {} ms", field("result"), field("waited_ms"))
        } else if sc.blk {
            let mib = r.bench_u64("bytes").map_or(0, |v| v >> 20);
            match r.bench_field("match").and_then(serde_json::Value::as_bool) {
                Some(true) => format!("blk {mib} MiB read back"),
                other => format!("blk {mib} MiB match {other:?}"),
            }
        } else if sc.frames > 0 {
            // TX: completed by the guest's device / received by the backend;
            // RX: delivered by the backend / received intact by the guest.
            let (g, backend) = match (sc.rx, sc.backend) {
                (false, _) => (r.bench_u64("tx_packets"), r.backend_frames),
                (true, Backend::Testpmd) => (r.guest_netdev_rx, r.testpmd_tx),
                (true, _) => {
                    let guest = r.guest_result.as_ref().and_then(|g| g.u64("received"));
                    (r.bench_u64("received").or(guest), r.backend_rx_frames)
                }
            };
            let show = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
            match sc.rx {
                false => format!("{}/{}", show(g), show(backend)),
                true => format!("rx {}/{}", show(backend), show(g)),
            }
        } else {
            "-".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            sc.name,
            sc.iommu.unwrap_or("-"),
            sc.backend.label(),
            match (r.passed(), r.retries.len()) {
                (true, 0) => "PASS",
                (true, _) => "PASS (retried after a guest crash or hang)",
                (false, _) => "FAIL",
            },
            secs(r.wall),
            secs(r.boot_to_init),
            frames,
            r.per_frame("misses", sc.frames),
            r.per_frame("updates", sc.frames),
            r.per_frame("invalidations", sc.frames),
            u(&r.counters, "devtlb_notifications"),
        );
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::scenario::acceptance;
    use super::*;

    fn transcript(lines: &[&str]) -> Transcript {
        Transcript {
            lines: lines
                .iter()
                .enumerate()
                .map(|(i, l)| (Duration::from_secs(i as u64), l.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn scenario(name: &str) -> Scenario {
        acceptance().into_iter().find(|s| s.name == name).unwrap()
    }

    #[test]
    fn a_passing_own_backend_run_is_cut_and_checked() {
        let sc = scenario("viommu-strict-own");
        let t = transcript(&[
            "NESTED-BEGIN viommu-strict-own",
            "NESTED-VM-START viommu-strict-own",
            "iovmm-init: started at uptime 1.2 s",
            "[    0.9] virtio_iommu virtio0: input address: 48 bits",
            "[    1.0] virtio_net virtio1: Adding to iommu group 0",
            "IOVMM-BENCH {\"bench\":\"net-tx\",\"tx_packets\":1000}",
            "IOVMM-GUEST-READY",
            "iovmm-counters: {\"misses\":40,\"misses_refused\":0,\"updates\":40,\"invalidations\":900}",
            "NESTED-VM-EXIT viommu-strict-own rc=0",
            "NESTED-LOG-BEGIN viommu-strict-own backend",
            "CountersSnapshot { messages: 9, tx_frames: 1000, translation_failures: 0 }",
            "NESTED-LOG-END viommu-strict-own backend",
            "NESTED-END viommu-strict-own",
        ]);
        let mut r = ScenarioReport::extract(&t, &sc);
        r.check(&sc);
        assert!(r.passed(), "{:?}", r.failures);
        assert_eq!(r.boot_to_init, Some(Duration::from_secs(1)));
        assert_eq!(r.wall, Some(Duration::from_secs(12)));
        assert_eq!(r.driver_lines.len(), 2);
        let table = table(std::slice::from_ref(&sc), std::slice::from_ref(&r));
        assert!(table.contains("| viommu-strict-own | virtio | own | PASS | 12.0 | 1.0 | 1000/1000 | 0.04 | 0.04 | 0.90 | 0 |"), "{table}");
    }

    #[test]
    fn missing_frames_refusals_and_an_unfinished_run_fail() {
        let sc = scenario("vtd-ats-strict-own");
        let t = transcript(&[
            "NESTED-BEGIN vtd-ats-strict-own",
            "NESTED-VM-START vtd-ats-strict-own",
            "IOVMM-BENCH {\"tx_packets\":998}",
            "iovmm-counters: {\"misses\":4,\"misses_refused\":1,\"devtlb_notifications\":0}",
            "NESTED-VM-EXIT vtd-ats-strict-own rc=4",
            "NESTED-END vtd-ats-strict-own",
        ]);
        let mut r = ScenarioReport::extract(&t, &sc);
        r.check(&sc);
        let all = r.failures.join("\n");
        for want in [
            "exited with Some(4)",
            "Some(998) of 1000",
            "refused 1",
            "device-TLB",
            "DMAR-IR",
        ] {
            assert!(all.contains(want), "{want} not in {all}");
        }
        let mut r = ScenarioReport::extract(&transcript(&["NESTED-BEGIN vtd-ats-strict-own"]), &sc);
        r.check(&sc);
        assert!(r.failures.iter().any(|f| f.contains("did not finish")));
    }

    #[test]
    fn aqm_drops_must_account_for_every_missing_frame() {
        let sc = scenario("viommu-strict-own-fqcodel");
        let run = |drops: u64| {
            let bench = format!(
                "IOVMM-BENCH {{\"tx_packets\":990,\"qdisc\":\"fq_codel\",\"qdisc_drops\":{drops}}}"
            );
            let t = transcript(&[
                "NESTED-BEGIN viommu-strict-own-fqcodel",
                "NESTED-VM-START viommu-strict-own-fqcodel",
                &bench,
                "IOVMM-GUEST-READY",
                "iovmm-counters: {\"misses\":4,\"misses_refused\":0}",
                "NESTED-VM-EXIT viommu-strict-own-fqcodel rc=0",
                "NESTED-LOG-BEGIN viommu-strict-own-fqcodel backend",
                "CountersSnapshot { tx_frames: 990, translation_failures: 0 }",
                "NESTED-LOG-END viommu-strict-own-fqcodel backend",
                "NESTED-END viommu-strict-own-fqcodel",
            ]);
            let mut r = ScenarioReport::extract(&t, &sc);
            r.check(&sc);
            r.failures
        };
        assert_eq!(run(10), Vec::<String>::new());
        assert!(run(9)[0].contains("990") && run(9)[0].contains("Some(9)"));
    }

    #[test]
    fn received_frames_count_at_both_ends() {
        let sc = scenario("rx-vtd-strict-own");
        let run = |bench: &str, delivered: u64| {
            let be = format!("CountersSnapshot {{ tx_frames: 0, translation_failures: 0, rx_frames: {delivered}, rx_dropped: 0 }}");
            let t = transcript(&[
                "NESTED-BEGIN rx-vtd-strict-own",
                "NESTED-VM-START rx-vtd-strict-own",
                "iovmm-init: dmesg: DMAR: IOMMU enabled",
                "iovmm-init: dmesg: DMAR: dmar0: Using Queued invalidation",
                "iovmm-init: dmesg: pci 0000:00:01.0: Adding to iommu group 1",
                bench,
                "IOVMM-GUEST-READY",
                "iovmm-counters: {\"misses\":4,\"misses_refused\":0}",
                "NESTED-VM-EXIT rx-vtd-strict-own rc=0",
                "NESTED-LOG-BEGIN rx-vtd-strict-own backend",
                &be,
                "NESTED-LOG-END rx-vtd-strict-own backend",
                "NESTED-END rx-vtd-strict-own",
            ]);
            let mut r = ScenarioReport::extract(&t, &sc);
            r.check(&sc);
            r.failures
        };
        let good = "IOVMM-BENCH {\"bench\":\"net-rx\",\"received\":1000,\"bad\":0}";
        assert_eq!(run(good, 1000), Vec::<String>::new());
        assert_eq!(run(good, 999).len(), 1);
        let bad = "IOVMM-BENCH {\"bench\":\"net-rx\",\"received\":999,\"bad\":1}";
        assert!(run(bad, 1000)[0].contains("Some(999) good and Some(1) bad"));
    }

    #[test]
    fn an_api_shutdown_must_end_in_the_guests_power_off() {
        let sc = scenario("acpi-shutdown");
        let run = |answer: &str, rc: i32| {
            let answer = format!("NESTED-SHUTDOWN-ANSWER acpi-shutdown {answer}");
            let vm_exit = format!("NESTED-VM-EXIT acpi-shutdown rc={rc}");
            let t = transcript(&[
                "NESTED-BEGIN acpi-shutdown",
                "NESTED-VM-START acpi-shutdown",
                "iovmm-init: started at uptime 1.0 s",
                "IOVMM-GUEST-READY",
                "iovmm-init: waiting for the power button on /dev/input/event0",
                "iovmm-init: power button pressed",
                &answer,
                &vm_exit,
                "NESTED-END acpi-shutdown",
            ]);
            let mut r = ScenarioReport::extract(&t, &sc);
            r.check(&sc);
            let table = table(std::slice::from_ref(&sc), std::slice::from_ref(&r));
            (r.failures, table)
        };
        let good = r#"{"result":"powered-off","exit":"power_off","button":true,"waited_ms":1234}"#;
        let (failures, table) = run(good, 0);
        assert_eq!(failures, Vec::<String>::new());
        assert!(
            table.contains("shutdown \"powered-off\" in 1234 ms"),
            "{table}"
        );
        let forced = r#"{"result":"forced","exit":"stopped","button":true,"waited_ms":30001}"#;
        let (failures, _) = run(forced, 3);
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures[1].contains("forced"), "{failures:?}");
        let (failures, _) = run("curl: (7) Couldn't connect to server", 0);
        assert!(failures[0].contains("Couldn't connect"), "{failures:?}");
    }

    /// A vhost-net run's record: the guest's bench line and the tap peer's.
    fn vhost_net_run(name: &str, bench: &str, peer: &str) -> Vec<String> {
        let sc = scenario(name);
        let lines = [
            format!("NESTED-BEGIN {name}"),
            format!("NESTED-VM-START {name}"),
            "iovmm-init: started at uptime 1.0 s".into(),
            "iovmm-init: dmesg: virtio_iommu virtio0: input address: 64 bits".into(),
            "iovmm-init: dmesg: virtio-pci 0000:00:02.0: Adding to iommu group 1".into(),
            bench.into(),
            "IOVMM-GUEST-READY".into(),
            r#"iovmm-counters: {"backend":"vhost-net","misses":990,"misses_refused":0}"#.into(),
            format!("NESTED-VM-EXIT {name} rc=0"),
            format!("NESTED-LOG-BEGIN {name} backend"),
            format!("TAP-PEER {peer}"),
            format!("NESTED-LOG-END {name} backend"),
            format!("NESTED-END {name}"),
        ];
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let mut r = ScenarioReport::extract(&transcript(&refs), &sc);
        r.check(&sc);
        r.failures
    }

    #[test]
    fn vhost_net_frames_are_counted_at_the_tap_and_the_marker_never_arrives() {
        let tx = r#"IOVMM-BENCH {"bench":"net-tx","tx_packets":1000}"#;
        let peer = |good: u64, markers: u64, drops: u64| {
            format!(
                r#"{{"udp_good":{good},"udp_dup":0,"udp_bad":0,"markers":{markers},"socket_drops":{drops},"rx_delivered":0,"error":null}}"#
            )
        };
        let ok = vhost_net_run("vhost-net-viommu-strict", tx, &peer(1000, 0, 0));
        assert_eq!(ok, Vec::<String>::new());
        let short = vhost_net_run("vhost-net-viommu-strict", tx, &peer(970, 0, 30));
        assert_eq!(short.len(), 2, "{short:?}");
        assert!(short[0].contains("Some(970)") && short[1].contains("socket_drops = 30"));
        let marker = vhost_net_run("vhost-net-viommu-strict", tx, &peer(1000, 1, 0));
        assert_eq!(marker, vec!["the tap peer counted markers = 1".to_string()]);
        let none = vhost_net_run("vhost-net-viommu-strict", tx, "not json");
        assert!(
            none.iter().any(|f| f.contains("no TAP-PEER record")),
            "{none:?}"
        );
    }

    #[test]
    fn use_after_unmap_through_vhost_net_needs_a_refused_miss_and_no_marker() {
        let sc = scenario("vhost-net-stale-vtd");
        let run = |completed: u64, fault: &str, seq: u64, refused: u64| {
            let result = format!(
                r#"IOVMM-RESULT {{"test":"net-stale","status":"ok","stale_iova":"0x107000","stale_completed":{completed},"fault_addr":"{fault}"}}"#
            );
            let counters = format!(
                r#"iovmm-counters: {{"misses":6,"misses_refused":{refused},"faults":{refused}}}"#
            );
            let peer = format!(
                r#"TAP-PEER {{"udp_good":0,"udp_dup":0,"udp_bad":0,"seq_good":{seq},"markers":0,"socket_drops":0,"error":null}}"#
            );
            let t = transcript(&[
                "NESTED-BEGIN vhost-net-stale-vtd",
                "NESTED-VM-START vhost-net-stale-vtd",
                &result,
                &counters,
                "NESTED-VM-EXIT vhost-net-stale-vtd rc=0",
                "NESTED-LOG-BEGIN vhost-net-stale-vtd backend",
                &peer,
                "NESTED-LOG-END vhost-net-stale-vtd backend",
                "NESTED-END vhost-net-stale-vtd",
            ]);
            let mut r = ScenarioReport::extract(&t, &sc);
            r.check(&sc);
            r.failures
        };
        assert_eq!(run(0, "0x107000", 1, 1), Vec::<String>::new());
        assert!(run(1, "0x107000", 1, 1)[0].contains("completed Some(1)"));
        assert!(run(0, "0x200000", 1, 1)[0].contains("fault at"));
        assert!(run(0, "0x107000", 2, 1)[0].contains("Some(2) frames"));
        assert!(run(0, "0x107000", 1, 0)[0].contains("refused 0"));
    }

    #[test]
    fn vhost_net_receive_counts_what_the_peer_delivered_and_the_guest_checked() {
        let rx = r#"IOVMM-BENCH {"bench":"net-rx","received":1000,"bad":0}"#;
        let peer = |delivered: u64| {
            format!(
                r#"{{"udp_good":0,"udp_dup":0,"udp_bad":0,"markers":0,"socket_drops":0,"rx_sent":1000,"rx_delivered":{delivered},"error":null}}"#
            )
        };
        let ok = vhost_net_run("vhost-net-rx-viommu-strict", rx, &peer(1000));
        assert_eq!(ok, Vec::<String>::new());
        let lost = vhost_net_run("vhost-net-rx-viommu-strict", rx, &peer(998));
        assert_eq!(
            lost,
            vec!["backend delivered Some(998) of 1000 frames".to_string()]
        );
    }

    #[test]
    fn a_refused_setup_must_name_the_missing_feature() {
        let sc = scenario("viommu-backend-no-iotlb");
        let run = |err: &str, rc: i32| {
            let vm_exit = format!("NESTED-VM-EXIT viommu-backend-no-iotlb rc={rc}");
            let t = transcript(&[
                "NESTED-BEGIN viommu-backend-no-iotlb",
                "NESTED-VM-START viommu-backend-no-iotlb",
                err,
                &vm_exit,
                "NESTED-END viommu-backend-no-iotlb",
            ]);
            let mut r = ScenarioReport::extract(&t, &sc);
            r.check(&sc);
            r.passed()
        };
        assert!(run(
            "iovmm: error: x: backend lacks VIRTIO_F_ACCESS_PLATFORM",
            1
        ));
        assert!(!run("iovmm: error: something else", 1));
        assert!(!run("", 0));
    }

    #[test]
    fn a_crashed_first_attempt_is_kept_apart_and_the_second_judged() {
        let sc = scenario("boot-1cpu");
        let t = transcript(&[
            "NESTED-BEGIN boot-1cpu",
            "NESTED-VM-START boot-1cpu",
            "iovmm: guest crashed (triple fault) on vCPU 0",
            "  exit history (oldest first, 16 exits):",
            "NESTED-VM-EXIT boot-1cpu rc=4",
            "NESTED-RETRY boot-1cpu rc=4",
            "NESTED-VM-START boot-1cpu",
            "iovmm-init: started at uptime 1.0 s",
            "iovmm-init: cpus online: 0 processors: 1",
            "IOVMM-GUEST-READY",
            "NESTED-VM-EXIT boot-1cpu rc=0",
            "NESTED-END boot-1cpu",
        ]);
        let mut r = ScenarioReport::extract(&t, &sc);
        r.check(&sc);
        assert!(r.passed(), "{:?}", r.failures);
        assert_eq!(r.retries.len(), 1);
        assert!(r.retries[0].contains("triple fault") && r.retries[0].contains("exit history"));
        assert!(!r.vm_log.iter().any(|l| l.contains("triple")));
        let table = table(std::slice::from_ref(&sc), std::slice::from_ref(&r));
        assert!(
            table.contains("PASS (retried after a guest crash or hang)"),
            "{table}"
        );
    }

    #[test]
    fn a_scenario_cut_off_by_l1_is_judged_on_its_rerun_in_the_next_l1() {
        let sc = scenario("boot-1cpu");
        let mut t = transcript(&[
            "NESTED-BEGIN boot-1cpu",
            "NESTED-VM-START boot-1cpu",
            "junk",
        ]);
        t.elapsed = Duration::from_secs(100);
        t.append(transcript(&[
            "NESTED-L1-READY kvm=ok",
            "NESTED-BEGIN boot-1cpu",
            "NESTED-VM-START boot-1cpu",
            "iovmm-init: started at uptime 1.0 s",
            "iovmm-init: cpus online: 0 processors: 1",
            "IOVMM-GUEST-READY",
            "NESTED-VM-EXIT boot-1cpu rc=0",
            "NESTED-END boot-1cpu",
        ]));
        let mut r = ScenarioReport::extract(&t, &sc);
        r.check(&sc);
        assert!(r.passed(), "{:?}", r.failures);
        assert!(!r.vm_log.iter().any(|l| l == "junk"));
        assert_eq!(r.wall, Some(Duration::from_secs(6)));
    }

    #[test]
    fn scenario_names_do_not_match_their_prefixes() {
        assert_eq!(
            marker_rest("NESTED-BEGIN boot-1cpu", "NESTED-BEGIN", "boot-1"),
            None
        );
        assert_eq!(
            marker_rest("NESTED-VM-EXIT a rc=3", "NESTED-VM-EXIT", "a"),
            Some("rc=3")
        );
    }
}
