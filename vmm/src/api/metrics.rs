//! The counters in the Prometheus text format (`GET /metrics`) and as a periodic JSON line
//! (`--metrics PATH[,interval=SECS]`, like Firecracker's metrics file).
//!
//! Prometheus names: `iovmm_vm_*` for the VM, `iovmm_vhost_user_<key>` for every numeric field
//! of a device's counters object (labels `device`, `socket`, `bdf`), `iovmm_viommu_<key>` for the
//! vIOMMU's (label `kind`). Fields ending in `_ns` (latency percentiles, means, maxima) and
//! booleans (`1`/`0`) are gauges; every other number is a counter and gets `_total`.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Map, Value};

use super::server::ApiSetupError;
use super::{VmCounters, VmInfo, VmState};
use crate::config::MetricsConfig;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

/// One metric family: all its samples go under one `# TYPE` line.
struct Family {
    name: String,
    kind: Kind,
    help: String,
    samples: Vec<(String, f64)>,
}

#[derive(Default)]
struct Families(Vec<Family>);

impl Families {
    fn add(&mut self, name: String, kind: Kind, help: &str, labels: String, value: f64) {
        let i = match self.0.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.0.push(Family {
                    name,
                    kind,
                    help: help.to_string(),
                    samples: Vec::new(),
                });
                self.0.len() - 1
            }
        };
        self.0[i].samples.push((labels, value));
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.0 {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(out, "# TYPE {} {kind}", f.name);
            for (labels, v) in &f.samples {
                let _ = writeln!(out, "{}{labels} {v}", f.name);
            }
        }
        out
    }
}

fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Adds every numeric and boolean field of `obj` as `<prefix>_<key>` with `labels`.
fn add_object(
    fams: &mut Families,
    prefix: &str,
    help: &str,
    obj: &Map<String, Value>,
    labels: &str,
) {
    for (key, v) in obj {
        let (kind, value) = match v {
            Value::Bool(b) => (Kind::Gauge, f64::from(u8::from(*b))),
            Value::Number(n) if key.ends_with("_ns") => (Kind::Gauge, n.as_f64().unwrap_or(0.0)),
            Value::Number(n) => (Kind::Counter, n.as_f64().unwrap_or(0.0)),
            _ => continue,
        };
        let name = match kind {
            Kind::Counter => format!("{prefix}_{}_total", sanitize(key)),
            Kind::Gauge => format!("{prefix}_{}", sanitize(key)),
        };
        let help = format!("{help} field {key:?} (see docs/design/api.md)");
        fams.add(name, kind, &help, labels.to_string(), value);
    }
}

fn str_field(obj: &Map<String, Value>, key: &str) -> String {
    match obj.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn vm_families(fams: &mut Families, info: &VmInfo) {
    let up = info.uptime_ms as f64 / 1000.0;
    fams.add(
        "iovmm_vm_uptime_seconds".into(),
        Kind::Gauge,
        "Time since the VM was started.",
        String::new(),
        up,
    );
    for (state, name) in [
        (VmState::Running, "running"),
        (VmState::Paused, "paused"),
        (VmState::Stopped, "stopped"),
    ] {
        let v = f64::from(u8::from(info.state == state));
        let l = labels(&[("state", name.to_string())]);
        fams.add(
            "iovmm_vm_state".into(),
            Kind::Gauge,
            "1 for the state the VM is in.",
            l,
            v,
        );
    }
    fams.add(
        "iovmm_vm_vcpus".into(),
        Kind::Gauge,
        "Number of vCPUs.",
        String::new(),
        info.vcpus.len() as f64,
    );
}

/// Every counter of `counters` (and the VM's state from `info`) in the text exposition format.
pub fn prometheus(info: &VmInfo, counters: &VmCounters) -> String {
    let mut fams = Families::default();
    vm_families(&mut fams, info);
    for dev in &counters.vhost_user {
        let Value::Object(obj) = dev else { continue };
        let l = labels(&[
            ("device", str_field(obj, "device")),
            ("socket", str_field(obj, "socket")),
            ("bdf", str_field(obj, "bdf")),
        ]);
        let mut fields = obj.clone();
        fields.remove("device");
        add_object(
            &mut fams,
            "iovmm_vhost_user",
            "vhost-user device counters",
            &fields,
            &l,
        );
    }
    for (i, dev) in counters.vhost_net.iter().enumerate() {
        let Value::Object(obj) = dev else { continue };
        let l = labels(&[
            ("device", i.to_string()),
            ("tap", str_field(obj, "tap")),
            ("bdf", str_field(obj, "bdf")),
        ]);
        add_object(
            &mut fams,
            "iovmm_vhost_net",
            "vhost-net device counters",
            obj,
            &l,
        );
    }
    if let Some(Value::Object(obj)) = &counters.viommu {
        let l = labels(&[("kind", str_field(obj, "kind"))]);
        add_object(&mut fams, "iovmm_viommu", "vIOMMU counters", obj, &l);
    }
    fams.render()
}

/// One line of the metrics file.
#[derive(Serialize)]
struct MetricsLine<'a> {
    utc_timestamp_ms: u64,
    state: VmState,
    #[serde(flatten)]
    counters: &'a VmCounters,
}

/// The `--metrics` destination: a file (appended) or a FIFO, written without blocking.
#[derive(Debug)]
pub struct MetricsSink {
    file: File,
    path: PathBuf,
    interval: Duration,
    next: Instant,
    /// Bytes of a line a full FIFO did not take yet (written before any new line).
    pending: Vec<u8>,
    /// Lines written completely.
    pub written: u64,
    /// Lines dropped because the FIFO was still full of an earlier one.
    pub dropped: u64,
}

impl MetricsSink {
    /// Opens the destination (on the caller's thread: the API thread may not open files).
    /// A FIFO is opened read-write so that opening never waits for a reader.
    pub fn open(cfg: &MetricsConfig) -> Result<Self, ApiSetupError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&cfg.path)
            .map_err(|source| ApiSetupError::Metrics {
                path: cfg.path.clone(),
                source,
            })?;
        let interval = Duration::from_secs(cfg.interval);
        Ok(MetricsSink {
            file,
            path: cfg.path.clone(),
            interval,
            next: Instant::now() + interval,
            pending: Vec::new(),
            written: 0,
            dropped: 0,
        })
    }

    /// When the next line is due.
    pub fn next_due(&self) -> Instant {
        self.next
    }

    /// Writes a line if one is due at `now`.
    pub fn tick(&mut self, now: Instant, info: &VmInfo, counters: &VmCounters) {
        if now >= self.next {
            self.write_line(info, counters);
            self.next = now + self.interval;
        }
    }

    /// Writes one line now (and whatever part of an earlier one is still pending).
    pub fn write_line(&mut self, info: &VmInfo, counters: &VmCounters) {
        if !self.flush_pending() {
            self.dropped += 1;
            return;
        }
        let line = MetricsLine {
            utc_timestamp_ms: utc_ms(),
            state: info.state,
            counters,
        };
        match serde_json::to_vec(&line) {
            Ok(mut bytes) => {
                bytes.push(b'\n');
                self.pending = bytes;
                self.flush_pending();
            }
            Err(e) => log::warn!("api: cannot encode the metrics line: {e}"),
        }
    }

    /// Writes the pending bytes; `true` when none are left.
    fn flush_pending(&mut self) -> bool {
        while !self.pending.is_empty() {
            match self.file.write(&self.pending) {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                    if self.pending.is_empty() {
                        self.written += 1;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("api: cannot write metrics to {:?}: {e}", self.path);
                    self.pending.clear();
                    break;
                }
            }
        }
        self.pending.is_empty()
    }
}

fn utc_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::VmConfig;

    fn info(state: VmState) -> VmInfo {
        VmInfo {
            version: "test",
            state,
            uptime_ms: 2500,
            vcpus: vec![crate::vstate::vcpu::VcpuRunState::Running; 2],
            exit: None,
            config: VmConfig::new("/k"),
        }
    }

    fn counters() -> VmCounters {
        let dev = |i: u64, sock: &str| {
            serde_json::json!({"device": i, "socket": sock, "bdf": "00:03.0", "iommu": true,
                               "misses": 7 + i, "miss_p99_ns": 4000, "connected": true})
        };
        VmCounters {
            uptime_ms: 2500,
            vhost_user: vec![dev(0, "/tmp/a.sock"), dev(1, "/tmp/q\"b\\.sock")],
            vhost_net: vec![serde_json::json!({"backend": "vhost-net", "tap": "tap0",
                                               "bdf": "00:04.0", "misses": 5})],
            viommu: Some(serde_json::json!({"kind": "vtd", "waits": 3})),
        }
    }

    /// Every sample line is `name{labels} value` with a number value, and every family has one
    /// TYPE line before its samples.
    fn check_exposition(text: &str) {
        let mut typed = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(!typed.contains(&name.to_string()), "{name} typed twice");
                typed.push(name.to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
            let name = series.split('{').next().unwrap();
            assert_eq!(typed.last().map(String::as_str), Some(name), "{line}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        }
    }

    #[test]
    fn prometheus_text_groups_families_and_escapes_labels() {
        let text = prometheus(&info(VmState::Paused), &counters());
        check_exposition(&text);
        assert!(
            text.contains("iovmm_vm_state{state=\"paused\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("iovmm_vm_state{state=\"running\"} 0\n"));
        assert!(text.contains("iovmm_vm_uptime_seconds 2.5\n"));
        assert!(
            text.contains(
                "iovmm_vhost_net_misses_total{device=\"0\",tap=\"tap0\",bdf=\"00:04.0\"} 5\n"
            ),
            "{text}"
        );
        assert!(text.contains("iovmm_vm_vcpus 2\n"));
        assert!(text.contains(
            "iovmm_vhost_user_misses_total{device=\"0\",socket=\"/tmp/a.sock\",bdf=\"00:03.0\"} 7\n"
        ));
        assert!(text.contains("socket=\"/tmp/q\\\"b\\\\.sock\""), "{text}");
        assert!(text.contains("# TYPE iovmm_vhost_user_miss_p99_ns gauge\n"));
        assert!(text.contains("iovmm_vhost_user_connected{"));
        assert!(text.contains("iovmm_viommu_waits_total{kind=\"vtd\"} 3\n"));
        assert!(
            !text.contains("iovmm_vhost_user_device"),
            "device is a label"
        );
    }

    #[test]
    fn metrics_lines_are_appended_one_json_object_each() {
        let path = std::env::temp_dir().join(format!("iovmm-metrics-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let cfg = MetricsConfig {
            path: path.clone(),
            interval: 1,
        };
        let mut sink = MetricsSink::open(&cfg).unwrap();
        let start = Instant::now();
        sink.tick(start, &info(VmState::Running), &counters());
        assert_eq!(sink.written, 0, "not due yet");
        sink.tick(sink.next_due(), &info(VmState::Running), &counters());
        sink.write_line(&info(VmState::Stopped), &counters());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["state"], "running");
        assert_eq!(lines[1]["state"], "stopped");
        assert_eq!(lines[1]["vhost_user"][1]["misses"], 8);
        assert!(lines[0]["utc_timestamp_ms"].as_u64().unwrap() > 0);
        assert_eq!((sink.written, sink.dropped), (2, 0));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_full_fifo_drops_lines_instead_of_blocking() {
        let path = std::env::temp_dir().join(format!("iovmm-metrics-{}.fifo", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut sink = MetricsSink::open(&MetricsConfig {
            path: path.clone(),
            interval: 1,
        })
        .unwrap();
        // Nobody reads: the pipe buffer (64 KiB by default) fills up and lines are dropped.
        for _ in 0..2000 {
            sink.write_line(&info(VmState::Running), &counters());
        }
        assert!(sink.written > 0 && sink.dropped > 0, "{sink:?}");
        std::fs::remove_file(&path).unwrap();
    }
}
