//! The control API against running KVM guests, driven with `curl --unix-socket` (and raw
//! sockets where curl cannot send what is needed): every endpoint, pause and resume around a
//! frame the guest is waiting for, malformed and hostile requests, concurrent clients, the
//! connection limit, shutdown (power button, then the forced stop: the test guest has no ACPI),
//! the vIOMMU counters, the metrics line and the CLI's seccomp-filtered API thread.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use devices::sys::{poll_fds, PollFd};
use integration_tests::backend::rxgen::seq_frame;
use integration_tests::backend::{BackendConfig, BackendHandle, TestBackend};
use integration_tests::guest::{test_guest_path, GuestResult, IommuMode, Scenario, ViommuKind};
use iommu::sync::lock;
use serde_json::Value;
use vmm::api::server::MAX_CONNECTIONS;
use vmm::{SerialMode, VmConfig, VmExit, Vmm};

/// One VM at a time: the guests poll in ring 3 and the machine has two cores.
static ONE_VM: Mutex<()> = Mutex::new(());
const WAIT: Duration = Duration::from_secs(60);

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("iovmm-apitest-{}-{tag}", std::process::id()))
}

/// A curl answer: the status code and the body.
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// `curl --unix-socket sock -X method http://localhost<path>` plus `extra` arguments.
fn curl(sock: &Path, method: &str, path: &str, extra: &[&str]) -> Answer {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-w", "\n%{http_code}"])
        .args(extra)
        .arg(format!("http://localhost{path}"))
        .output()
        .expect("curl runs (resources/install-deps.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {method} {path}: no status in {text:?}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Answer {
        status,
        body: body.to_string(),
    }
}

fn get(sock: &Path, path: &str) -> Answer {
    curl(sock, "GET", path, &[])
}

fn put(sock: &Path, path: &str) -> Answer {
    curl(sock, "PUT", path, &[])
}

fn state(sock: &Path) -> String {
    let a = get(sock, "/api/v1/vm.info");
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()["state"].as_str().unwrap_or_default().to_string()
}

/// A guest that loops for minutes (only a stop ends it), with the API socket.
fn looping_vm(tag: &str) -> (Vmm, PathBuf) {
    let sock = temp_path(&format!("{tag}.sock"));
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::tsc()
        .iterations(1u64 << 40)
        .cmdline()
        .expect("cmdline");
    cfg.serial = SerialMode::Capture;
    cfg.api_socket = Some(sock.clone());
    (Vmm::start(&cfg).expect("VM starts"), sock)
}

/// `net-rx` behind virtio-iommu (strict) with our back end; the test injects the frames.
struct RxVm {
    vmm: Vmm,
    backend: BackendHandle,
    sock: PathBuf,
    frames: u64,
    size: usize,
}

impl RxVm {
    fn start(tag: &str, frames: u64, metrics: Option<&Path>) -> Self {
        let size = 256usize;
        let vu = temp_path(&format!("{tag}-vu.sock"));
        let sock = temp_path(&format!("{tag}.sock"));
        let backend = TestBackend::listen(&vu, BackendConfig::default()).expect("backend");
        let scenario = Scenario::net_rx(frames, size as u64)
            .iommu(IommuMode::Strict)
            .timeout_ms(600_000);
        let mut cfg = VmConfig::new(test_guest_path());
        cfg.cmdline = scenario.cmdline().expect("cmdline");
        cfg.serial = SerialMode::Capture;
        cfg.cpus = 2;
        cfg.iommu = Some("virtio".parse().expect("iommu"));
        let dev = format!("net,socket={},iommu=on", vu.display());
        cfg.vhost_user.push(dev.parse().expect("device"));
        cfg.api_socket = Some(sock.clone());
        cfg.metrics = metrics.map(|p| vmm::MetricsConfig {
            path: p.to_path_buf(),
            interval: 1,
        });
        let vmm = Vmm::start(&cfg).expect("VM starts");
        RxVm {
            vmm,
            backend,
            sock,
            frames,
            size,
        }
    }

    /// Injects frames `from..to` and waits until the back end put them into guest buffers.
    fn deliver(&self, from: u64, to: u64) {
        for seq in from..to {
            self.backend.inject_rx(seq_frame(seq, self.size));
        }
        let done = self.backend.wait_for(WAIT, |c| c.rx_frames == to);
        assert!(
            done,
            "frames {from}..{to} not delivered: {:?}",
            self.backend.counters()
        );
    }

    fn finish(mut self) -> GuestResult {
        let exit = self.vmm.wait_timeout(WAIT).expect("VMM stops");
        let serial = self.vmm.serial_output().unwrap_or_default();
        assert_eq!(exit, VmExit::ExitPort(0), "serial:\n{serial}");
        let r = GuestResult::from_output(&serial).expect("result line");
        assert_eq!(r.u64("received"), Some(self.frames), "{serial}");
        assert!(!self.sock.exists(), "the API socket is removed at exit");
        r
    }
}

#[test]
fn read_endpoints_report_the_running_vm_over_curl() {
    let _one = lock(&ONE_VM);
    let vm = RxVm::start("read", 8, None);
    vm.deliver(0, 4);
    let ping = get(&vm.sock, "/api/v1/vm.ping");
    assert_eq!(ping.status, 200);
    assert_eq!(ping.json()["version"], env!("CARGO_PKG_VERSION"));
    let info = get(&vm.sock, "/api/v1/vm.info").json();
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], serde_json::json!(["running", "running"]));
    assert_eq!(
        info["config"]["api_socket"],
        vm.sock.to_str().expect("UTF-8 socket path")
    );
    assert_eq!(info["config"]["iommu"]["kind"], "virtio");
    assert!(info["uptime_ms"].as_u64().is_some());
    let c = get(&vm.sock, "/api/v1/vm.counters").json();
    let dev = &c["vhost_user"][0];
    // Strict mode behind virtio-iommu: the back end missed on the RX buffers it wrote.
    assert!(dev["misses"].as_u64() > Some(0), "{dev}");
    assert!(dev["misses_served"].as_u64() > Some(0), "{dev}");
    assert_eq!(dev["connected"], true);
    assert!(dev["miss_p99_ns"].as_u64() > Some(0), "{dev}");
    assert_eq!(c["viommu"]["kind"], "virtio-iommu");
    // The guest mapped its RX buffers (strict: one MAP each) before the back end could miss.
    let maps = c["viommu"]["requests_map"].as_u64().unwrap_or_default();
    assert!(maps > 0, "{}", c["viommu"]);
    let misses = dev["misses"].as_u64().unwrap_or_default();
    for path in ["/metrics", "/api/v1/metrics"] {
        let m = get(&vm.sock, path);
        assert_eq!(m.status, 200);
        assert!(
            m.body.contains("iovmm_vm_state{state=\"running\"} 1\n"),
            "{}",
            m.body
        );
        let line = m
            .body
            .lines()
            .find(|l| l.starts_with("iovmm_vhost_user_misses_total{device=\"0\""))
            .unwrap_or_else(|| panic!("no misses series: {}", m.body));
        let value: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(value >= misses, "{line} (JSON said {misses})");
        let series = "iovmm_viommu_requests_map_total{kind=\"virtio-iommu\"}";
        let prom_maps = prometheus_value(&m.body, series);
        assert!(
            prom_maps >= Some(maps),
            "{series}: {prom_maps:?} (JSON said {maps})"
        );
    }
    vm.deliver(4, 8);
    vm.finish();
}

/// The value of the Prometheus sample `series` (name and labels exactly) in `text`.
fn prometheus_value(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// `dma-map` (20 rounds of 2 buffers of 5000 bytes, strict) for a vhost-user function behind
/// `iommu`; returns the vIOMMU counters the VM reports after the guest's exit (frozen when it
/// stopped) and the Prometheus text of all counters.
fn strict_dma_map_counters(tag: &str, iommu: &str, kind: ViommuKind) -> (Value, String) {
    let vu = temp_path(&format!("{tag}-vu.sock"));
    let _backend = TestBackend::listen(&vu, BackendConfig::default()).expect("backend");
    let scenario = Scenario::dma_map(20, 5000)
        .iommu(IommuMode::Strict)
        .viommu(kind)
        .inflight(2);
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = scenario.cmdline().expect("cmdline");
    cfg.serial = SerialMode::Capture;
    cfg.iommu = Some(iommu.parse().expect("iommu"));
    let dev = format!("net,socket={},iommu=on", vu.display());
    cfg.vhost_user.push(dev.parse().expect("device"));
    let mut vmm = Vmm::start(&cfg).expect("VM starts");
    let exit = vmm.wait_timeout(WAIT).expect("VMM stops");
    let serial = vmm.serial_output().unwrap_or_default();
    assert_eq!(exit, VmExit::ExitPort(0), "serial:\n{serial}");
    let counters = vmm.counters();
    let text = vmm::api::metrics::prometheus(&vmm.info(), &counters);
    let json = serde_json::to_value(&counters).expect("counters serialize");
    (json["viommu"].clone(), text)
}

#[test]
fn viommu_counters_count_requests_and_invalidation_descriptors() {
    let _one = lock(&ONE_VM);
    // virtio-iommu: PROBE + ATTACH, then one MAP and one UNMAP per buffer, all answered OK.
    let (v, text) = strict_dma_map_counters("cnt-virtio", "virtio", ViommuKind::Virtio);
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    assert_eq!((n("requests_probe"), n("requests_attach")), (1, 1), "{v}");
    assert_eq!((n("requests_map"), n("requests_unmap")), (40, 40), "{v}");
    assert_eq!((n("status_ok"), n("unwritten")), (82, 0), "{v}");
    for (field, want) in [("requests_map", 40), ("requests_unmap", 40)] {
        let series = format!("iovmm_viommu_{field}_total{{kind=\"virtio-iommu\"}}");
        assert_eq!(
            prometheus_value(&text, &series),
            Some(want),
            "{series}:\n{text}"
        );
    }
    // VT-d: at boot a global context-cache and a global IOTLB invalidation and a wait, then
    // every unmap is a page-selective IOTLB invalidation and a wait (guest_viommu.rs).
    let (v, text) = strict_dma_map_counters("cnt-vtd", "vtd", ViommuKind::Vtd);
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"));
    assert_eq!(v["kind"], "vtd");
    assert_eq!(
        (
            n("inv_desc_context_cache"),
            n("inv_desc_iotlb_global"),
            n("inv_desc_iotlb_page"),
            n("inv_desc_wait")
        ),
        (1, 1, 40, 41),
        "{v}"
    );
    assert_eq!(n("waits"), 41, "every wait completed: {v}");
    assert_eq!((n("inv_queue_errors"), n("inv_reg_iotlb")), (0, 0), "{v}");
    for (field, want) in [("inv_desc_iotlb_page", 40), ("inv_desc_wait", 41)] {
        let series = format!("iovmm_viommu_{field}_total{{kind=\"vtd\"}}");
        assert_eq!(
            prometheus_value(&text, &series),
            Some(want),
            "{series}:\n{text}"
        );
    }
}

#[test]
fn a_paused_guest_does_not_take_a_delivered_frame_until_resumed() {
    let _one = lock(&ONE_VM);
    let frames = 6;
    let vm = RxVm::start("pause", frames, None);
    vm.deliver(0, frames - 1);
    assert_eq!(put(&vm.sock, "/api/v1/vm.pause").status, 204);
    let info = get(&vm.sock, "/api/v1/vm.info").json();
    assert_eq!(info["state"], "paused");
    assert_eq!(info["vcpus"], serde_json::json!(["paused", "paused"]));
    let again = put(&vm.sock, "/api/v1/vm.pause");
    assert_eq!(again.status, 409);
    assert_eq!(again.json()["error"], "the VM is already paused");
    let serial_before = vm.vmm.serial_output().unwrap_or_default();
    // The barrier: the last frame the guest waits for is in its buffer, the used ring says so
    // and the interrupt is sent. A running guest polls that ring and prints its result at once.
    vm.deliver(frames - 1, frames);
    // Two more round trips through the API while the guest holds everything it needs.
    assert_eq!(get(&vm.sock, "/api/v1/vm.counters").status, 200);
    assert_eq!(state(&vm.sock), "paused");
    assert_eq!(vm.vmm.serial_output().unwrap_or_default(), serial_before);
    assert!(!vm.vmm.has_exited());
    assert_eq!(put(&vm.sock, "/api/v1/vm.resume").status, 204);
    assert_eq!(put(&vm.sock, "/api/v1/vm.resume").status, 409);
    let r = vm.finish();
    assert!(r.is_ok(), "{r:?}");
}

/// `(Seccomp, Seccomp_filters)` from the status of this process's thread named `name`.
fn thread_seccomp(name: &str) -> Option<(String, String)> {
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = entry.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
        };
        return Some((field("Seccomp:")?, field("Seccomp_filters:")?));
    }
    None
}

#[test]
fn library_api_pauses_resumes_and_reports() {
    let _one = lock(&ONE_VM);
    let (mut vmm, sock) = looping_vm("lib");
    // Once it answered, the API thread runs in filter mode with its own two filters (it is
    // spawned by the unfiltered caller's thread, so it inherits none).
    assert_eq!(state(&sock), "running");
    let seccomp = thread_seccomp("iovmm_api");
    assert_eq!(
        seccomp,
        Some(("2".into(), "2".into())),
        "iovmm_api seccomp state"
    );
    vmm.pause().expect("pause");
    assert_eq!(vmm.info().state, vmm::VmState::Paused);
    assert_eq!(vmm.info().vcpus, vec![vmm::VcpuRunState::Paused]);
    assert_eq!(state(&sock), "paused", "the API sees the library's pause");
    assert!(matches!(
        vmm.pause(),
        Err(vmm::VmmError::Control(vmm::VcpuControlError::AlreadyPaused))
    ));
    vmm.resume().expect("resume");
    assert_eq!(vmm.info().vcpus, vec![vmm::VcpuRunState::Running]);
    assert!(vmm.counters().vhost_user.is_empty());
    // A paused guest cannot take the power button: it is stopped at once, the parked vCPU
    // released.
    vmm.pause().expect("pause");
    let out = vmm.shutdown();
    assert_eq!(
        (out.result, out.button, out.exit.as_str()),
        (vmm::ShutdownResult::Forced, false, "stopped")
    );
    assert_eq!(vmm.wait().expect("stops"), VmExit::Stopped);
    assert_eq!(vmm.info().state, vmm::VmState::Stopped);
    assert!(!sock.exists());
}

/// Writes `raw` on a new connection and returns the status line of the answer.
fn raw_exchange(sock: &Path, raw: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // The server may answer (and close) before it read everything: a failed write is fine.
    let _ = s.write_all(raw);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        text.contains("\r\n\r\n{\"error\":"),
        "no JSON error body: {text:?}"
    );
    text.lines().next().unwrap_or_default().to_string()
}

#[test]
fn malformed_requests_get_4xx_and_the_vm_keeps_running() {
    let _one = lock(&ONE_VM);
    let (mut vmm, sock) = looping_vm("malformed");
    // Held open with half a request while everything else is served.
    let mut slow = UnixStream::connect(&sock).expect("connect");
    slow.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\nHo")
        .expect("write");
    let status = |a: Answer| (a.status, a.json()["error"].is_string());
    assert_eq!(status(get(&sock, "/api/v1/nothing")), (404, true));
    assert_eq!(status(get(&sock, "/api/v2/vm.info")), (404, true));
    assert_eq!(status(get(&sock, "/api/v1/vm.shutdown")), (405, true));
    assert_eq!(
        status(curl(&sock, "DELETE", "/api/v1/vm.info", &[])),
        (405, true)
    );
    assert_eq!(
        status(curl(&sock, "POST", "/api/v1/vm.pause", &[])),
        (405, true)
    );
    let big = temp_path("big-body");
    std::fs::write(&big, vec![b'x'; 64 * 1024]).expect("write body");
    let data = format!("@{}", big.display());
    let oversized = curl(&sock, "PUT", "/api/v1/vm.pause", &["--data-binary", &data]);
    assert_eq!(status(oversized), (413, true));
    std::fs::remove_file(&big).expect("remove");
    let chunked = ["-H", "Transfer-Encoding: chunked", "--data-binary", "{}"];
    assert_eq!(
        status(curl(&sock, "PUT", "/api/v1/vm.pause", &chunked)),
        (411, true)
    );
    let long_header = format!("X-Junk: {}", "y".repeat(16 * 1024));
    assert_eq!(
        status(curl(&sock, "GET", "/api/v1/vm.ping", &["-H", &long_header])),
        (431, true)
    );
    assert!(
        raw_exchange(&sock, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").starts_with("HTTP/1.1 400 ")
    );
    assert!(raw_exchange(&sock, b"GET /\x01 HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 400 "));
    let bad_len = b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
    assert!(raw_exchange(&sock, bad_len).starts_with("HTTP/1.1 400 "));
    // Nothing of that paused or stopped the VM, and the slow client did not stall the server.
    assert_eq!(state(&sock), "running");
    assert!(!vmm.has_exited());
    slow.write_all(b"st: x\r\n\r\n")
        .expect("finish the slow request");
    let mut head = [0u8; 12];
    slow.read_exact(&mut head)
        .expect("answer to the slow request");
    assert_eq!(&head, b"HTTP/1.1 200");
    vmm.stop();
    assert_eq!(vmm.wait().expect("stops"), VmExit::Stopped);
}

#[test]
fn concurrent_clients_are_all_answered_and_the_connection_limit_holds() {
    let _one = lock(&ONE_VM);
    let (mut vmm, sock) = looping_vm("concurrent");
    let paths = [
        "/api/v1/vm.ping",
        "/api/v1/vm.info",
        "/api/v1/vm.counters",
        "/metrics",
    ];
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..6)
            .map(|w| {
                let sock = &sock;
                s.spawn(move || {
                    for i in 0..10 {
                        let path = paths[(w + i) % paths.len()];
                        let a = get(sock, path);
                        assert_eq!(a.status, 200, "{path}: {}", a.body);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("client thread");
        }
    });
    // Fill every slot with an idle keep-alive connection (each answered once, so accepted).
    let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut c = UnixStream::connect(&sock).expect("connect");
            c.write_all(b"GET /api/v1/vm.ping HTTP/1.1\r\n\r\n")
                .expect("write");
            let mut head = [0u8; 12];
            c.read_exact(&mut head).expect("answer");
            assert_eq!(&head, b"HTTP/1.1 200");
            c
        })
        .collect();
    let over = get(&sock, "/api/v1/vm.ping");
    assert_eq!(over.status, 503);
    assert!(over.json()["error"]
        .as_str()
        .unwrap_or_default()
        .contains("too many"));
    held.pop();
    assert_eq!(
        get(&sock, "/api/v1/vm.ping").status,
        200,
        "a freed slot is reused"
    );
    drop(held);
    vmm.stop();
    assert_eq!(vmm.wait().expect("stops"), VmExit::Stopped);
}

/// `PUT /api/v1/vm.shutdown` with the JSON body `body`.
fn shutdown(sock: &Path, body: &str) -> Answer {
    curl(sock, "PUT", "/api/v1/vm.shutdown", &["--data-binary", body])
}

#[test]
fn shutdown_presses_the_button_then_forces_the_stop_and_the_metrics_file_gets_a_last_line() {
    let _one = lock(&ONE_VM);
    let metrics = temp_path("metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let mut vm = RxVm::start("shutdown", 4, Some(&metrics));
    vm.deliver(0, 2);
    let refused = shutdown(&vm.sock, r#"{"timeout_ms": 3600000}"#);
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(
        state(&vm.sock),
        "running",
        "a refused request stops nothing"
    );
    // The test guest has no ACPI: it never answers the power button, so the stop is forced
    // once the requested 300 ms have passed.
    let a = shutdown(&vm.sock, r#"{"timeout_ms": 300}"#);
    assert_eq!(a.status, 200, "{}", a.body);
    let out = a.json();
    assert_eq!(
        (&out["result"], &out["exit"], &out["button"]),
        (&"forced".into(), &"stopped".into(), &true.into()),
        "{out}"
    );
    let waited = out["waited_ms"].as_u64().unwrap_or_default();
    assert!((300..5000).contains(&waited), "{out}");
    assert_eq!(vm.vmm.wait().expect("stops"), VmExit::Stopped);
    assert!(!vm.sock.exists(), "the API socket is removed at exit");
    let text = std::fs::read_to_string(&metrics).expect("metrics file");
    let last: Value = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON line in {text:?}"));
    assert_eq!(last["state"], "stopped");
    assert_eq!(
        last["viommu"]["kind"], "virtio-iommu",
        "frozen at stop: {last}"
    );
    assert!(last["vhost_user"][0]["misses"].as_u64() > Some(0), "{last}");
    assert!(last["utc_timestamp_ms"].as_u64() > Some(0));
    std::fs::remove_file(&metrics).expect("remove");
}

/// Reads the first line the VMM writes into the FIFO at `path`, waiting at most [`WAIT`].
fn first_fifo_line(path: &Path) -> Value {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking open: it must not wait for a writer that may never come.
    let mut fifo = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .expect("open the FIFO");
    let mut line = Vec::new();
    while !line.contains(&b'\n') {
        let mut fds = [PollFd::readable(&fifo)];
        let n = poll_fds(&mut fds, Some(WAIT)).expect("poll");
        assert_eq!(n, 1, "no metrics line within {WAIT:?}");
        let mut buf = [0u8; 4096];
        match fifo.read(&mut buf) {
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("read the FIFO: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let first = text.lines().next().unwrap_or_default();
    serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first:?}"))
}

#[test]
fn cli_serves_the_api_under_its_seccomp_filter_and_exits_on_shutdown() {
    let _one = lock(&ONE_VM);
    let sock = temp_path("cli.sock");
    let fifo = temp_path("cli.fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let guest = test_guest_path();
    let cmdline = Scenario::tsc()
        .iterations(1u64 << 40)
        .cmdline()
        .expect("cmdline");
    let metrics = format!("{},interval=1", fifo.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_iovmm-cli"))
        .args(["--kernel".as_ref(), guest.as_os_str()])
        .args([
            "--cmdline",
            &cmdline,
            "--serial",
            "off",
            "--seccomp",
            "true",
        ])
        .args(["--api-socket".as_ref(), sock.as_os_str()])
        .args(["--metrics", &metrics])
        .spawn()
        .expect("iovmm runs");
    // The first periodic line comes from the API thread, so the socket is bound by then.
    let line = first_fifo_line(&fifo);
    assert_eq!(line["state"], "running", "{line}");
    let a = get(&sock, "/api/v1/vm.info");
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["state"], "running");
    assert_eq!(put(&sock, "/api/v1/vm.pause").status, 204);
    assert_eq!(state(&sock), "paused");
    assert_eq!(put(&sock, "/api/v1/vm.resume").status, 204);
    assert_eq!(get(&sock, "/metrics").status, 200);
    let a = shutdown(&sock, r#"{"timeout_ms": 100}"#);
    assert_eq!((a.status, &a.json()["result"]), (200, &"forced".into()));
    let status = child.wait().expect("iovmm exits");
    assert_eq!(status.code(), Some(3), "VM stopped by request");
    assert!(!sock.exists(), "the CLI removed the API socket");
    std::fs::remove_file(&fifo).expect("remove the FIFO");
}

#[test]
fn an_unusable_api_socket_fails_the_start_before_the_guest_runs() {
    let _one = lock(&ONE_VM);
    let file = temp_path("not-a-socket");
    std::fs::write(&file, b"keep me").expect("write");
    let mut cfg = VmConfig::new(test_guest_path());
    cfg.cmdline = Scenario::hello().cmdline().expect("cmdline");
    cfg.serial = SerialMode::Capture;
    cfg.api_socket = Some(file.clone());
    let e = Vmm::start(&cfg).expect_err("a regular file is not replaced");
    assert!(
        matches!(
            e,
            vmm::VmmError::Api(vmm::api::ApiSetupError::NotASocket(_))
        ),
        "{e:?}"
    );
    assert_eq!(std::fs::read(&file).expect("still there"), b"keep me");
    std::fs::remove_file(&file).expect("remove");
}
