//! QEMU reference runs for the benchmark: boots the Debian 6.12 test
//! guest under QEMU (TCG, q35) behind a vIOMMU with a vhost-user net device,
//! lets the guest send frames (`iovmm.bench=net-tx`) and measures what is
//! comparable with iovmm at the protocol level: IOTLB messages per frame and
//! miss service latency as the back end sees them, plus QEMU's RSS.
//!
//! Two QEMUs ([`binary`]): bookworm's 7.2 (the default of [`QemuConfig::new`],
//! unpacked by `resources/fetch-qemu72.sh`) and the installed one (10.0 from
//! bookworm-backports); every run records the version its binary reports.
//! Needs `resources/build-linux-guest.sh`.
//! QEMU 7.2 segfaults (NULL `vector_irqfd` in virtio-pci's MSI-X unmask
//! path) when a vhost-user device uses MSI-X without KVM irqfds, i.e. under
//! TCG, so the net device gets `vectors=0` (INTx).

pub mod binary;
mod parse;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use self::binary::{parse_version, reference_qemus, QemuBinary};
pub use self::parse::{
    parse_bench, parse_trace_misses, status_kib, tail, GuestBench, TraceMisses, BENCH_PREFIX,
};
use crate::backend::latency::LatencyStats;
use crate::backend::{BackendConfig, BackendError, BackendHandle, TestBackend};
use crate::dpdk::{Testpmd, TestpmdError};

/// Printed by the guest's /init once its modules are loaded.
const MODULES_LOADED: &str = "iovmm-init: modules loaded";
/// How often QEMU's /proc status and the serial log are sampled.
const POLL: Duration = Duration::from_millis(50);

/// Errors of a QEMU reference run.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU or a guest artefact is missing.
    #[error("{0} is missing: run `resources/fetch-qemu72.sh` (QEMU 7.2), `resources/install-deps.sh --with-qemu` (QEMU 10) and `resources/build-linux-guest.sh` first")]
    Missing(PathBuf),
    /// `qemu-system-x86_64 --version` printed no version.
    #[error("{} --version printed no version: {output:?}", binary.display())]
    Version {
        /// The binary.
        binary: PathBuf,
        /// The first line it printed.
        output: String,
    },
    /// A file or process operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The own test back end failed to start.
    #[error("test back end")]
    Backend(#[from] BackendError),
    /// testpmd failed.
    #[error("testpmd")]
    Testpmd(#[from] TestpmdError),
    /// The guest did not power off in time.
    #[error("QEMU still running after {0:?} (killed); back end: {2}; serial log tail:\n{1}")]
    Timeout(Duration, String, String),
    /// QEMU exited with an error.
    #[error("QEMU exited with {0}; stderr:\n{1}\nserial log tail:\n{2}")]
    Exit(ExitStatus, String, String),
    /// The guest printed no IOVMM-BENCH line.
    #[error("the guest printed no IOVMM-BENCH line; serial log tail:\n{0}")]
    NoBench(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QemuError {
    let what = what.into();
    move |source| QemuError::Io { what, source }
}

/// The vIOMMU in front of the net device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuIommu {
    /// `intel-iommu,intremap=on,caching-mode=on,device-iotlb=on`, split
    /// irqchip; the net device's ATS is chosen by [`QemuConfig::ats`].
    IntelIommu,
    /// `virtio-iommu-pci` (no ATS).
    VirtioIommu,
}

/// How the guest kernel uses the IOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMode {
    /// `iommu.strict=1`: every unmap is invalidated at once.
    Strict,
    /// `iommu.strict=0`: invalidations are batched.
    Lazy,
    /// `iommu=pt`: identity (pass-through) domains.
    Passthrough,
}

/// The vhost-user back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuBackend {
    /// Our test back end, in-process (counters and miss timing).
    Own,
    /// DPDK testpmd (received frame count only).
    Testpmd,
}

/// One reference run.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// vIOMMU model.
    pub iommu: QemuIommu,
    /// Guest IOMMU mode.
    pub mode: GuestMode,
    /// Back end.
    pub backend: QemuBackend,
    /// With intel-iommu: put the net device behind a PCIe root port with
    /// `ats=on`, so it has an ATS capability the guest enables (device-TLB
    /// invalidations). On q35's root bus a virtio device is conventional PCI
    /// and `ats=on` adds nothing, so `false` means "no ATS". Ignored with
    /// virtio-iommu.
    pub ats: bool,
    /// Frames the guest sends.
    pub frames: u64,
    /// Ethernet frame size in bytes (60..=1514).
    pub frame_size: u64,
    /// Kill QEMU after this long.
    pub timeout: Duration,
    /// The QEMU to run.
    pub qemu: QemuBinary,
    /// Guest kernel (bzImage).
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
}

/// `resources/out` of this workspace.
pub fn resources_out() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/out")
}

impl QemuConfig {
    /// A run of QEMU 7.2 (where `fetch-qemu72.sh` unpacks it) with the
    /// default artefact paths, ATS on, 2000 frames of 1024 bytes and a 300 s
    /// timeout; [`QemuConfig::with_qemu`] picks another QEMU.
    pub fn new(iommu: QemuIommu, mode: GuestMode, backend: QemuBackend) -> Self {
        let out = resources_out();
        QemuConfig {
            iommu,
            mode,
            backend,
            ats: true,
            frames: 2000,
            frame_size: 1024,
            timeout: Duration::from_secs(300),
            qemu: QemuBinary::fetched_72(),
            kernel: out.join("bzImage"),
            initrd: out.join("initramfs.cpio.gz"),
        }
    }

    /// The guest kernel command line.
    pub fn cmdline(&self) -> String {
        let mut c = String::from("console=ttyS0 panic=-1 quiet");
        if self.iommu == QemuIommu::IntelIommu {
            c.push_str(" intel_iommu=on");
        }
        c.push_str(match self.mode {
            GuestMode::Strict => " iommu.strict=1",
            GuestMode::Lazy => " iommu.strict=0",
            GuestMode::Passthrough => " iommu=pt",
        });
        c.push_str(&format!(
            " iovmm.bench=net-tx iovmm.frames={} iovmm.size={}",
            self.frames, self.frame_size
        ));
        c
    }

    /// The same run with another QEMU.
    pub fn with_qemu(mut self, qemu: QemuBinary) -> Self {
        self.qemu = qemu;
        self
    }

    /// QEMU's arguments for a back end at `sock`, serial output to `serial`
    /// and the miss trace to `trace`.
    pub fn args(&self, sock: &Path, serial: &Path, trace: &Path) -> Vec<String> {
        let intel = self.iommu == QemuIommu::IntelIommu;
        let machine = if intel {
            "q35,kernel-irqchip=split"
        } else {
            "q35"
        };
        let iommu_dev = if intel {
            "intel-iommu,intremap=on,caching-mode=on,device-iotlb=on"
        } else {
            "virtio-iommu-pci"
        };
        let ats = intel && self.ats;
        // ATS needs a PCIe endpoint, i.e. a device below a root port.
        let (port, bus_ats) = if ats {
            (
                "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
                ",bus=rp0,ats=on",
            )
        } else {
            ("", "")
        };
        let p = |p: &Path| p.display().to_string();
        let mut a = self.qemu.firmware_args();
        a.extend(
            [
                "-accel",
                "tcg",
                "-machine",
                machine,
                "-m",
                "1G",
                "-object",
                "memory-backend-memfd,id=mem,size=1G,share=on",
                "-numa",
                "node,memdev=mem",
                "-nodefaults",
                "-display",
                "none",
                "-no-reboot",
                "-serial",
                &format!("file:{}", p(serial)),
                "-msg",
                "timestamp=on",
                "-trace",
                "vhost_iotlb_miss",
                "-D",
                &p(trace),
                "-device",
                iommu_dev,
                "-chardev",
                &format!("socket,id=c0,path={}", p(sock)),
                "-netdev",
                "vhost-user,id=n0,chardev=c0",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        if ats {
            a.extend(["-device".into(), port.into()]);
        }
        a.extend([
            "-device".into(),
            format!(
                "virtio-net-pci,netdev=n0,iommu_platform=on,disable-legacy=on,romfile=,vectors=0{bus_ats}"
            ),
        ]);
        a.extend(["-kernel".into(), p(&self.kernel)]);
        a.extend(["-initrd".into(), p(&self.initrd)]);
        a.extend(["-append".into(), self.cmdline()]);
        a
    }
}

/// IOTLB messages the back end saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IotlbCounts {
    /// MISS messages sent.
    pub misses: u64,
    /// UPDATE messages received (misses answered plus unsolicited ones).
    pub updates: u64,
    /// INVALIDATE messages received.
    pub invalidates: u64,
}

/// The result of one reference run.
#[derive(Debug, Clone)]
pub struct QemuRun {
    /// What was run.
    pub config: QemuConfig,
    /// The version the QEMU binary reported (`--version`), e.g. `10.0.2`.
    pub qemu_version: String,
    /// The guest's own measurement.
    pub guest: GuestBench,
    /// Frames the back end received.
    pub frames_received: u64,
    /// Back-end IOTLB counters (own back end only).
    pub iotlb: Option<IotlbCounts>,
    /// Misses QEMU handled, from its `vhost_iotlb_miss` trace (both back ends).
    pub qemu_misses: TraceMisses,
    /// Accesses that found no translation even after a miss; should be 0
    /// (own back end only).
    pub translation_failures: Option<u64>,
    /// MISS → UPDATE latency seen by the back end (own back end only).
    pub miss_latency: Option<LatencyStats>,
    /// QEMU's peak resident set (VmHWM), KiB.
    pub vm_hwm_kib: u64,
    /// QEMU's resident set at the last sample before exit (VmRSS), KiB.
    pub vm_rss_kib: u64,
    /// QEMU start to exit.
    pub wall: Duration,
    /// QEMU start until the guest had loaded its modules (boot time).
    pub boot: Option<Duration>,
    /// The guest's serial log (kept in a per-run temporary directory; the
    /// other files there are removed after a successful run).
    pub serial_log: PathBuf,
}

impl QemuRun {
    /// `n` divided by the frames the guest sent.
    pub fn per_frame(&self, n: u64) -> f64 {
        if self.guest.frames == 0 {
            0.0
        } else {
            n as f64 / self.guest.frames as f64
        }
    }
}

/// The running back end.
enum Running {
    Own(BackendHandle),
    Pmd(Testpmd),
}

/// What was sampled while QEMU ran.
#[derive(Debug, Default)]
struct Samples {
    hwm: u64,
    rss: u64,
    boot: Option<Duration>,
}

/// The back end's state, for error messages.
fn describe(backend: &Running) -> String {
    match backend {
        Running::Own(be) => format!("{:?}", be.counters()),
        Running::Pmd(_) => "testpmd".into(),
    }
}

/// A fresh directory for one run's socket and logs.
fn run_dir() -> Result<PathBuf, QemuError> {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("iovmm-qemu-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    Ok(dir)
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Polls QEMU until it exits or `timeout` passes (then kills it).
fn supervise(
    child: &mut Child,
    serial: &Path,
    timeout: Duration,
) -> Result<(ExitStatus, Samples, Duration), QemuError> {
    let start = Instant::now();
    let status_path = format!("/proc/{}/status", child.id());
    let mut s = Samples::default();
    loop {
        if let Some(st) = child.try_wait().map_err(io_err("wait for QEMU"))? {
            return Ok((st, s, start.elapsed()));
        }
        let status = read_lossy(Path::new(&status_path));
        s.hwm = s.hwm.max(status_kib(&status, "VmHWM").unwrap_or(0));
        s.rss = status_kib(&status, "VmRSS").unwrap_or(s.rss);
        if s.boot.is_none() && read_lossy(serial).contains(MODULES_LOADED) {
            s.boot = Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            // Our own child, by its handle.
            let _ = child.kill();
            let _ = child.wait();
            let log = tail(&read_lossy(serial), 30);
            return Err(QemuError::Timeout(timeout, log, String::new()));
        }
        std::thread::sleep(POLL);
    }
}

fn start_backend(config: &QemuConfig, sock: &Path) -> Result<Running, QemuError> {
    Ok(match config.backend {
        QemuBackend::Own => Running::Own(TestBackend::listen(sock, BackendConfig::default())?),
        QemuBackend::Testpmd => Running::Pmd(Testpmd::start(sock, true)?),
    })
}

fn spawn_qemu(config: &QemuConfig, dir: &Path) -> Result<Child, QemuError> {
    let stderr = File::create(dir.join("qemu.err")).map_err(io_err("create qemu.err"))?;
    config
        .qemu
        .command()
        .args(config.args(
            &dir.join("vhost.sock"),
            &dir.join("serial.log"),
            &dir.join("trace.log"),
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(io_err(format!("spawn {}", config.qemu.path.display())))
}

/// Runs one reference measurement. Blocks until the guest powered off.
pub fn run(config: &QemuConfig) -> Result<QemuRun, QemuError> {
    for p in [&config.qemu.path, &config.kernel, &config.initrd] {
        if !p.exists() {
            return Err(QemuError::Missing(p.clone()));
        }
    }
    let qemu_version = config.qemu.version()?;
    let dir = run_dir()?;
    let serial = dir.join("serial.log");
    let backend = start_backend(config, &dir.join("vhost.sock"))?;
    let mut child = spawn_qemu(config, &dir)?;
    let (status, samples, wall) = match supervise(&mut child, &serial, config.timeout) {
        Err(QemuError::Timeout(t, log, _)) => {
            return Err(QemuError::Timeout(t, log, describe(&backend)))
        }
        other => other?,
    };
    let log = read_lossy(&serial);
    if !status.success() {
        let err = read_lossy(&dir.join("qemu.err"));
        return Err(QemuError::Exit(status, tail(&err, 20), tail(&log, 30)));
    }
    let guest = parse_bench(&log).ok_or_else(|| QemuError::NoBench(tail(&log, 30)))?;
    let mut run = QemuRun {
        config: config.clone(),
        qemu_version,
        guest,
        frames_received: 0,
        iotlb: None,
        translation_failures: None,
        qemu_misses: parse_trace_misses(&read_lossy(&dir.join("trace.log"))),
        miss_latency: None,
        vm_hwm_kib: samples.hwm,
        vm_rss_kib: samples.rss,
        wall,
        boot: samples.boot,
        serial_log: serial,
    };
    match backend {
        Running::Own(be) => {
            let c = be.counters();
            run.frames_received = c.tx_frames;
            run.iotlb = Some(IotlbCounts {
                misses: c.misses_sent,
                updates: c.iotlb_updates,
                invalidates: c.iotlb_invalidates,
            });
            run.translation_failures = Some(c.translation_failures);
            run.miss_latency = be.miss_latency();
        }
        Running::Pmd(mut pmd) => run.frames_received = pmd.port_stats()?.rx_packets,
    }
    // Keep only the serial log of a successful run (the trace is ~100 B per miss).
    for f in ["vhost.sock", "trace.log", "qemu.err"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_selects_the_guest_iommu_mode() {
        let mut c = QemuConfig::new(QemuIommu::IntelIommu, GuestMode::Strict, QemuBackend::Own);
        c.frames = 10;
        c.frame_size = 200;
        let line = c.cmdline();
        assert!(line.contains(" intel_iommu=on iommu.strict=1 "));
        assert!(line.ends_with("iovmm.bench=net-tx iovmm.frames=10 iovmm.size=200"));
        c.iommu = QemuIommu::VirtioIommu;
        c.mode = GuestMode::Passthrough;
        assert!(!c.cmdline().contains("intel_iommu"));
        assert!(c.cmdline().contains(" iommu=pt "));
        c.mode = GuestMode::Lazy;
        assert!(c.cmdline().contains(" iommu.strict=0 "));
    }

    #[test]
    fn args_pair_ats_and_split_irqchip_with_intel_iommu_only() {
        let (s, l, t) = (Path::new("/s"), Path::new("/l"), Path::new("/t"));
        let c = QemuConfig::new(QemuIommu::IntelIommu, GuestMode::Strict, QemuBackend::Own);
        let a = c.args(s, l, t).join(" ");
        let firmware = c.qemu.firmware_args().join(" ");
        assert!(a.starts_with(&format!("{firmware} -accel tcg ")), "{a}");
        assert!(a.contains("-machine q35,kernel-irqchip=split "));
        assert!(a.contains("-device intel-iommu,intremap=on,caching-mode=on,device-iotlb=on "));
        assert!(a.contains("-device pcie-root-port,id=rp0,bus=pcie.0,chassis=1 "));
        assert!(
            a.contains("iommu_platform=on,disable-legacy=on,romfile=,vectors=0,bus=rp0,ats=on ")
        );
        assert!(a.contains("-chardev socket,id=c0,path=/s ") && a.contains("-serial file:/l "));
        let mut no_ats = c.clone();
        no_ats.ats = false;
        let a = no_ats.args(s, l, t).join(" ");
        assert!(a.contains("vectors=0 ") && !a.contains("ats=on") && !a.contains("root-port"));
        let v = QemuConfig::new(QemuIommu::VirtioIommu, GuestMode::Strict, QemuBackend::Own);
        let a = v.args(s, l, t).join(" ");
        assert!(a.contains("-machine q35 ") && a.contains("-device virtio-iommu-pci "));
        assert!(!a.contains("ats=on") && !a.contains("intel-iommu") && !a.contains("root-port"));
    }

    #[test]
    fn missing_qemu_is_reported_before_anything_starts() {
        let mut c = QemuConfig::new(QemuIommu::IntelIommu, GuestMode::Strict, QemuBackend::Own);
        c.qemu = QemuBinary::unpacked(Path::new("/nonexistent/qemu-7.2"));
        match run(&c) {
            Err(QemuError::Missing(p)) => assert!(p.starts_with("/nonexistent")),
            other => panic!("expected Missing, got {other:?}"),
        }
    }

    #[test]
    fn per_frame_divides_by_frames_sent() {
        let c = QemuConfig::new(QemuIommu::IntelIommu, GuestMode::Strict, QemuBackend::Own);
        let guest = GuestBench {
            frames: 4,
            size: 1024,
            send: Duration::ZERO,
            drain: Duration::ZERO,
            retries: 0,
            tx_packets: 4,
        };
        let mut r = QemuRun {
            config: c,
            qemu_version: "7.2.22".into(),
            guest,
            frames_received: 4,
            iotlb: None,
            translation_failures: None,
            qemu_misses: TraceMisses::default(),
            miss_latency: None,
            vm_hwm_kib: 0,
            vm_rss_kib: 0,
            wall: Duration::ZERO,
            boot: None,
            serial_log: PathBuf::new(),
        };
        assert_eq!(r.per_frame(6), 1.5);
        r.guest.frames = 0;
        assert_eq!(r.per_frame(6), 0.0);
    }
}
