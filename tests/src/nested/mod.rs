//! The nested Linux acceptance suite: real KVM for stock Linux guests on
//! machines whose own KVM cannot run them.
//!
//! L0 is QEMU with TCG and an emulated AMD SVM CPU; L1 is the Debian 6.12
//! cloud kernel whose `kvm_amd nested=1` is real SVM KVM (image built by
//! `resources/build-nested-l1.sh`); iovmm inside L1 boots the project's
//! Linux guest as L2, whose own drivers (virtio-iommu, intel-iommu,
//! virtio-net) drive iovmm's devices against DPDK testpmd and our backend.
//!
//! One L1 boot runs every scenario back to back: the harness appends a
//! generated `/scenarios.sh` to L1's initramfs ([`script`]), streams L1's
//! serial console, timestamps each line and cuts the transcript into
//! per-scenario records ([`report`]).

pub mod bench;
pub mod cpio;
pub mod report;
pub mod scenario;
pub mod script;
pub mod tap_peer;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use report::{ScenarioReport, Transcript};
pub use scenario::{acceptance, Backend, Outcome, Scenario};

/// The L0 emulator.
pub const QEMU: &str = "qemu-system-x86_64";
/// Marker L1's init prints once KVM is loaded.
pub const L1_READY: &str = "NESTED-L1-READY";
/// Marker L1's init prints after the scenarios.
pub const L1_DONE: &str = "NESTED-L1-DONE";

/// Harness errors.
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// The L1 image has not been built.
    #[error(
        "nested L1 image file {0} is missing; build it with `bash resources/build-nested-l1.sh`"
    )]
    MissingImage(PathBuf),
    /// A file could not be read or written.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("cannot run {QEMU}; install it with `bash resources/install-deps.sh --with-qemu`")]
    Spawn(#[source] std::io::Error),
}

/// L1's kernel and initramfs.
#[derive(Clone, Debug)]
pub struct NestedImage {
    /// L1 bzImage.
    pub kernel: PathBuf,
    /// L1 initramfs (gzip'd newc cpio).
    pub initrd: PathBuf,
}

impl NestedImage {
    /// The image in `resources/out/nested/` (or `$IOVMM_NESTED_DIR`).
    pub fn locate() -> Result<Self, NestedError> {
        let dir = std::env::var_os("IOVMM_NESTED_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/out/nested")
            });
        let img = NestedImage {
            kernel: dir.join("bzImage"),
            initrd: dir.join("l1.cpio.gz"),
        };
        for p in [&img.kernel, &img.initrd] {
            if !p.is_file() {
                return Err(NestedError::MissingImage(p.clone()));
            }
        }
        Ok(img)
    }
}

/// Options of one L1 boot.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Kill L0 after this long.
    pub timeout: Duration,
    /// Echo every L1 console line to stderr as it arrives (markers and L1's
    /// own lines are always echoed).
    pub verbose: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            timeout: Duration::from_secs(45 * 60),
            verbose: false,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NestedError + '_ {
    move |source| NestedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes L1's initrd with `/scenarios.sh` appended; returns its path.
fn initrd_with_script(img: &NestedImage, script: &str) -> Result<PathBuf, NestedError> {
    let mut bytes = std::fs::read(&img.initrd).map_err(io_err(&img.initrd))?;
    // Linux finds a concatenated archive only at a 4-byte aligned offset and
    // skips zero padding between archives.
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes.extend_from_slice(&cpio::archive(&[(
        "scenarios.sh",
        0o755,
        script.as_bytes(),
    )]));
    let path = std::env::temp_dir().join(format!("iovmm-nested-{}.cpio", std::process::id()));
    std::fs::write(&path, &bytes).map_err(io_err(&path))?;
    Ok(path)
}

fn qemu_command(img: &NestedImage, initrd: &Path) -> Command {
    let mut c = Command::new(QEMU);
    c.args(["-accel", "tcg,thread=multi", "-M", "q35"])
        .args(["-cpu", "qemu64,+svm,+npt,+ssse3,+sse4.1,+sse4.2,+popcnt"])
        .args(["-smp", "2", "-m", "4G", "-nodefaults", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 rdinit=/init panic=-1 mitigations=off quiet",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn spawn_reader<R: std::io::Read + Send + 'static>(
    r: R,
    start: Instant,
    tx: mpsc::Sender<(Duration, String)>,
) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send((start.elapsed(), line)).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

fn is_marker(line: &str) -> bool {
    line.starts_with("NESTED-") && !line.starts_with("NESTED-LOG")
}

/// Collects L0's output until L1 is done, QEMU exits or the timeout.
fn collect(child: &mut Child, opts: &RunOptions) -> Transcript {
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    if let Some(o) = child.stdout.take() {
        spawn_reader(o, start, tx.clone());
    }
    if let Some(e) = child.stderr.take() {
        spawn_reader(e, start, tx);
    }
    let mut t = Transcript::default();
    let deadline = start + opts.timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                if opts.verbose || is_marker(&line) {
                    eprintln!("[L1 {:7.1}s] {line}", at.as_secs_f64());
                }
                let done = line.starts_with(L1_DONE);
                t.lines.push((at, line));
                if done {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                t.timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    t.elapsed = start.elapsed();
    t
}

/// Boots L1 once and runs `scenarios` in it; returns the whole transcript.
/// QEMU is killed when L1 is done or the timeout passes.
pub fn run(
    img: &NestedImage,
    scenarios: &[Scenario],
    opts: &RunOptions,
) -> Result<Transcript, NestedError> {
    let initrd = initrd_with_script(img, &script::generate(scenarios))?;
    let mut child = qemu_command(img, &initrd)
        .spawn()
        .map_err(NestedError::Spawn)?;
    let t = collect(&mut child, opts);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&initrd);
    Ok(t)
}

/// A finished suite: one report per scenario, checked.
#[derive(Debug)]
pub struct SuiteResult {
    /// The scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// Their reports, in the same order.
    pub reports: Vec<ScenarioReport>,
    /// L1's whole console (every L1 boot, one after the other).
    pub transcript: Transcript,
    /// L1 boots that ended before their scenarios did (QEMU exited).
    pub l1_restarts: usize,
}

impl SuiteResult {
    /// Whether every scenario passed.
    pub fn passed(&self) -> bool {
        !self.transcript.timed_out && self.reports.iter().all(ScenarioReport::passed)
    }

    /// The table, then for each failed scenario what failed and its logs.
    pub fn summary(&self) -> String {
        let mut s = report::table(&self.scenarios, &self.reports);
        s.push_str(&format!(
            "L1 run: {:.1} s{}\n",
            self.transcript.elapsed.as_secs_f64(),
            if self.transcript.timed_out {
                " (TIMED OUT)"
            } else {
                ""
            }
        ));
        s.push_str("\nLinux driver lines seen:\n");
        for r in self.reports.iter().filter(|r| !r.driver_lines.is_empty()) {
            s.push_str(&format!("  {}:\n", r.name));
            for l in &r.driver_lines {
                s.push_str(&format!("    {l}\n"));
            }
        }
        if self.transcript.find(L1_READY).is_none() {
            s.push_str(&format!(
                "L1 never became ready; its console:\n{}",
                self.transcript.tail(80)
            ));
        }
        for r in self.reports.iter().filter(|r| !r.retries.is_empty()) {
            s.push_str(&format!(
                "\n--- {} crashed or hung and ran again:\n",
                r.name
            ));
            for crash in &r.retries {
                s.push_str(&format!("{crash}\n"));
            }
        }
        if self.l1_restarts > 0 {
            s.push_str(&format!(
                "\nL1 ended early {} time(s); the unfinished scenarios ran in a new L1\n",
                self.l1_restarts
            ));
        }
        for r in self.reports.iter().filter(|r| !r.passed()) {
            s.push_str(&format!("\n--- {} FAILED:\n", r.name));
            for f in &r.failures {
                s.push_str(&format!("  - {f}\n"));
            }
            let from = r.vm_log.len().saturating_sub(60);
            s.push_str("  iovmm + guest (last 60 lines):\n");
            for l in &r.vm_log[from..] {
                s.push_str(&format!("    {l}\n"));
            }
            s.push_str("  backend:\n");
            for l in r
                .backend_log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .iter()
                .rev()
            {
                s.push_str(&format!("    {l}\n"));
            }
        }
        s
    }
}

/// Runs `scenarios` in one L1 and checks each.
pub fn run_suite(
    img: &NestedImage,
    scenarios: Vec<Scenario>,
    opts: &RunOptions,
) -> Result<SuiteResult, NestedError> {
    let mut transcript = run(img, &scenarios, opts)?;
    let mut l1_restarts = 0;
    // L1 itself (QEMU TCG + nested SVM) has been seen to end early; run what
    // did not finish in one new L1.
    if transcript.find(L1_DONE).is_none() && !transcript.timed_out {
        let left: Vec<Scenario> = scenarios
            .iter()
            .filter(|sc| ScenarioReport::extract(&transcript, sc).wall.is_none())
            .cloned()
            .collect();
        if !left.is_empty() && transcript.find(L1_READY).is_some() {
            l1_restarts = 1;
            let again = run(img, &left, opts)?;
            transcript.append(again);
        }
    }
    let reports = scenarios
        .iter()
        .map(|sc| {
            let mut r = ScenarioReport::extract(&transcript, sc);
            r.check(sc);
            r
        })
        .collect();
    Ok(SuiteResult {
        scenarios,
        reports,
        transcript,
        l1_restarts,
    })
}
