//! Command-line options of the `iovmm` binary, mapped onto [`VmConfig`].

use std::path::PathBuf;

use std::process::ExitCode;

use clap::Parser;

use crate::config::{
    ByteSize, ConfigError, IommuConfig, MetricsConfig, NetConfig, SerialMode, VhostUserConfig,
    VmConfig, DEFAULT_CMDLINE,
};
use crate::seccomp::{self, SeccompLevel};
use crate::{CrashReport, VmExit, Vmm};

/// iovmm: a minimal KVM VMM whose vIOMMUs protect DMA by vhost-user backends.
#[derive(Debug, Parser)]
#[command(name = "iovmm", version, about, long_about = None)]
pub struct Cli {
    /// Kernel: ELF vmlinux, bzImage, or an ELF test guest.
    #[arg(long, value_name = "FILE", required_unless_present = "config")]
    pub kernel: Option<PathBuf>,
    /// Initramfs to load.
    #[arg(long, value_name = "FILE")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// Guest RAM, e.g. 256M or 1G.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<ByteSize>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u8>,
    /// Serial console: stdout, off or file=PATH.
    #[arg(long, value_name = "MODE")]
    pub serial: Option<SerialMode>,
    /// vIOMMU: virtio or vtd[,caching_mode=on][,device_iotlb=on][,intremap=on][,aw=39|48][,iotlb=miss|prefetch].
    // The brackets are clap's `--help` text for optional parts, not intra-doc links.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "KIND[,OPTS]")]
    pub iommu: Option<IommuConfig>,
    /// vhost-user device: net|blk,socket=PATH[,iommu=on][,ats=on][,reconnect=SECS]; repeat for more devices.
    /// With server=on[,wait=SECS] iovmm listens on PATH and waits (default 60 s) for the backend to connect.
    /// poll_us=P (0..=1000, default 0): behind a vIOMMU, busy-poll up to P µs for the next IOTLB
    /// miss and for each IOTLB ack before blocking (fewer wake-ups, at the CPU the spin takes).
    /// queues=N (net, 1..=16, default 1): N queue pairs (VIRTIO_NET_F_MQ, a control queue served
    /// by iovmm; the backend needs VHOST_USER_PROTOCOL_F_MQ and GET_QUEUE_NUM >= N).
    // The brackets are clap's `--help` text for optional parts, not intra-doc links.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long = "vhost-user", value_name = "KIND,socket=PATH[,OPTS]")]
    pub vhost_user: Vec<VhostUserConfig>,
    /// vhost-net device: tap=NAME,vhost=on[,iommu=on][,mac=MAC]; the kernel's vhost-net with the
    /// tap as backend (behind the vIOMMU with iommu=on); repeat for more devices.
    // The brackets are clap's `--help` text for optional parts, not intra-doc links.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long = "net", value_name = "tap=NAME,vhost=on[,OPTS]")]
    pub net: Vec<NetConfig>,
    /// JSON configuration file with the same fields; command-line options override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seccomp filters on iovmm's threads: true (a blocked call ends the process), log
    /// (the kernel logs it) or false. Default true.
    #[arg(long, value_name = "true|log|false")]
    pub seccomp: Option<SeccompLevel>,
    /// Serve the HTTP/1.1 + JSON control API (info, counters, metrics, pause, resume,
    /// shutdown) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Write one JSON line of every counter every SECS seconds (default 60) and when the VM
    /// stops, to a file (appended) or a FIFO.
    // The brackets are clap's `--help` text for optional parts, not intra-doc links.
    #[allow(rustdoc::broken_intra_doc_links)]
    #[arg(long, value_name = "PATH[,interval=SECS]")]
    pub metrics: Option<MetricsConfig>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub log_level: String,
    /// At exit, print each vhost-user device's counters (IOTLB messages, misses,
    /// invalidations, latencies) on stderr as one `iovmm-counters: {JSON}` line.
    #[arg(long)]
    pub print_counters: bool,
}

impl Cli {
    /// Builds the VM configuration (the file first, then command-line overrides).
    pub fn to_config(&self) -> Result<VmConfig, ConfigError> {
        let mut cfg = match (&self.config, &self.kernel) {
            (Some(path), _) => VmConfig::from_json_file(path)?,
            (None, Some(k)) => VmConfig::new(k),
            (None, None) => VmConfig::new(""),
        };
        if let Some(k) = &self.kernel {
            cfg.kernel = k.clone();
        }
        if let Some(i) = &self.initramfs {
            cfg.initramfs = Some(i.clone());
        }
        if let Some(c) = &self.cmdline {
            cfg.cmdline = c.clone();
        }
        if let Some(m) = self.memory {
            cfg.memory = m;
        }
        if let Some(c) = self.cpus {
            cfg.cpus = c;
        }
        if let Some(s) = &self.serial {
            cfg.serial = s.clone();
        }
        if let Some(i) = &self.iommu {
            cfg.iommu = Some(i.clone());
        }
        cfg.vhost_user.extend(self.vhost_user.iter().cloned());
        cfg.net.extend(self.net.iter().cloned());
        if let Some(s) = self.seccomp {
            cfg.seccomp = s;
        }
        if let Some(p) = &self.api_socket {
            cfg.api_socket = Some(p.clone());
        }
        if let Some(m) = &self.metrics {
            cfg.metrics = Some(m.clone());
        }
        if cfg.cmdline.is_empty() {
            cfg.cmdline = DEFAULT_CMDLINE.into();
        }
        Ok(cfg)
    }
}

fn print_counters(vmm: &Vmm) {
    for (i, dev) in vmm.vhost_user_devices().iter().enumerate() {
        let mut v = dev.counters_json();
        v["device"] = i.into();
        eprintln!("iovmm-counters: {v}");
    }
    let first = vmm.vhost_user_devices().len();
    for (i, dev) in vmm.vhost_net_devices().iter().enumerate() {
        let mut v = dev.counters_json();
        v["device"] = (first + i).into();
        eprintln!("iovmm-counters: {v}");
    }
}

/// Exit code and message for a stop reason.
pub fn describe(exit: &VmExit) -> (u8, Option<String>) {
    match exit {
        VmExit::PowerOff => (0, None),
        VmExit::ExitPort(0) => (0, None),
        VmExit::ExitPort(code) => (
            (*code as u8).max(1),
            Some(format!(
                "guest reported failure code {code} on the exit port"
            )),
        ),
        VmExit::Reset => (
            2,
            Some("guest requested a reset; iovmm does not reboot guests".into()),
        ),
        VmExit::Stopped => (3, Some("VM stopped by request".into())),
        VmExit::Halted { vcpu, rip, report } => (
            4,
            Some(format!(
                "vCPU {vcpu} halted with interrupts disabled at RIP {rip:#x}\n{report}"
            )),
        ),
        VmExit::GuestCrash { vcpu, rip, report } => (
            4,
            Some(format!(
                "guest crashed (triple fault) on vCPU {vcpu}{}\n{report}",
                crash_location(*rip, report)
            )),
        ),
        VmExit::InternalError {
            vcpu,
            suberror,
            rip,
            report,
        } => (
            5,
            Some(format!(
                "KVM internal error (suberror {suberror}) on vCPU {vcpu} at guest RIP {rip:#x}: \
                 the hypervisor could not emulate the guest's instruction\n{report}"
            )),
        ),
        VmExit::RunFailed { vcpu, errno } => (
            5,
            Some(format!(
                "KVM_RUN failed on vCPU {vcpu}: {}",
                std::io::Error::from_raw_os_error(*errno)
            )),
        ),
    }
}

/// Where a triple fault happened, as far as iovmm knows. The state read after the shutdown is
/// the guest's unless KVM reset the vCPU (AMD SVM does); then the last RIP seen at an earlier
/// exit (sync regs) is all there is.
fn crash_location(rip_after: u64, report: &CrashReport) -> String {
    let last = match (report.last_known(), report.last_known_state()) {
        (Some(r), Some(s)) => format!(
            "last RIP seen {:#x} at the {} exit before it",
            s.rip,
            r.kind.name()
        ),
        _ => "no earlier RIP recorded".to_string(),
    };
    match &report.after_exit {
        Some(s) if s.looks_reset() => format!(
            ": KVM reset the vCPU at the shutdown (RIP {rip_after:#x}), the faulting RIP is lost; {last}"
        ),
        Some(_) => format!(" at RIP {rip_after:#x} (state after the shutdown, not reset); {last}"),
        None => format!(": the state after the shutdown could not be read; {last}"),
    }
}

/// The whole `iovmm` command: parse the process arguments, run the VM and
/// map the outcome to an exit code (shared by every binary wrapping the CLI).
pub fn main_entry() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log_level)
        .format_timestamp_micros()
        .init();
    let result = cli
        .to_config()
        .map_err(crate::VmmError::from)
        .and_then(|cfg| {
            let mut vmm = Vmm::start(&cfg)?;
            // The VM runs on its own threads; this one only waits and reports from now on.
            seccomp::apply_to_current_thread(seccomp::ThreadKind::Api, cfg.seccomp)?;
            let exit = vmm.wait();
            if cli.print_counters {
                print_counters(&vmm);
            }
            exit
        });
    match result {
        Ok(exit) => {
            let (code, msg) = describe(&exit);
            if let Some(m) = msg {
                eprintln!("iovmm: {m}");
            }
            ExitCode::from(code)
        }
        Err(e) => {
            eprintln!("iovmm: error: {}", iommu::error::chain(&e));
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("iovmm").chain(args.iter().copied()))
    }

    #[test]
    fn options_map_onto_the_config() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--initramfs",
            "/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--serial",
            "off",
        ])
        .unwrap()
        .to_config()
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.initramfs, Some("/i".into()));
        assert_eq!(c.cmdline, "console=ttyS0 quiet");
        assert_eq!(
            (c.memory.0, c.cpus, c.serial),
            (512 << 20, 2, SerialMode::Off)
        );
    }

    #[test]
    fn seccomp_defaults_to_on_and_takes_log_and_false() {
        let cfg = |args: &[&str]| parse(args).unwrap().to_config().unwrap().seccomp;
        assert_eq!(cfg(&["--kernel", "/k"]), SeccompLevel::Trap);
        assert_eq!(
            cfg(&["--kernel", "/k", "--seccomp", "log"]),
            SeccompLevel::Log
        );
        assert_eq!(
            cfg(&["--kernel", "/k", "--seccomp", "false"]),
            SeccompLevel::Off
        );
        assert_eq!(
            cfg(&["--kernel", "/k", "--seccomp", "true"]),
            SeccompLevel::Trap
        );
        assert!(parse(&["--kernel", "/k", "--seccomp", "maybe"]).is_err());
    }

    #[test]
    fn api_socket_and_metrics_options_reach_the_config() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--api-socket",
            "/run/iovmm.sock",
            "--metrics",
            "/run/iovmm.metrics,interval=7",
        ])
        .unwrap()
        .to_config()
        .unwrap();
        assert_eq!(c.api_socket, Some("/run/iovmm.sock".into()));
        let m = c.metrics.unwrap();
        assert_eq!((m.path, m.interval), ("/run/iovmm.metrics".into(), 7));
        assert!(parse(&["--kernel", "/k", "--metrics", "/m,interval=soon"]).is_err());
    }

    #[test]
    fn net_devices_reach_the_config() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--net",
            "tap=tap0,vhost=on,iommu=on",
            "--net",
            "tap=tap1,vhost=on",
        ])
        .unwrap()
        .to_config()
        .unwrap();
        let taps: Vec<_> = c.net.iter().map(|n| (n.tap.as_str(), n.iommu)).collect();
        assert_eq!(taps, [("tap0", true), ("tap1", false)]);
        assert!(parse(&["--kernel", "/k", "--net", "vhost=on"]).is_err());
    }

    #[test]
    fn bad_values_and_missing_kernel_are_usage_errors() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--kernel", "/k", "--memory", "lots"]).is_err());
        assert!(parse(&["--kernel", "/k", "--cpus", "300"]).is_err());
        assert!(parse(&["--kernel", "/k", "--serial", "pty"]).is_err());
    }

    #[test]
    fn command_line_overrides_the_config_file() {
        let p = std::env::temp_dir().join(format!("iovmm-cli-{}.json", std::process::id()));
        std::fs::write(&p, r#"{"kernel":"/from-file","memory":"1G","cpus":2}"#).unwrap();
        let c = parse(&["--config", p.to_str().unwrap(), "--cpus", "4"])
            .unwrap()
            .to_config()
            .unwrap();
        assert_eq!(
            (c.kernel, c.memory.0, c.cpus),
            ("/from-file".into(), 1 << 30, 4)
        );
        std::fs::write(&p, "{not json").unwrap();
        let e = parse(&["--config", p.to_str().unwrap()])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(matches!(e, ConfigError::ConfigFile { .. }));
        std::fs::remove_file(&p).unwrap();
    }

    fn crash(after_rip: u64, cs: u16, cr0: u64) -> VmExit {
        use crate::{Access, ExitKind, ExitRecord, GuestState};
        let state = |rip, cs, cr0| GuestState {
            rip,
            cs,
            cr0,
            ..Default::default()
        };
        let out = ExitRecord {
            kind: ExitKind::PioOut,
            access: Some(Access {
                addr: 0x3f8,
                size: 1,
            }),
            state: Some(state(0x20_0650, 0x2b, 0x8000_0011)),
        };
        let after = state(after_rip, cs, cr0);
        let fatal = ExitRecord {
            kind: ExitKind::Shutdown,
            access: None,
            state: Some(after),
        };
        VmExit::GuestCrash {
            vcpu: 0,
            rip: after_rip,
            report: Box::new(CrashReport {
                sync_regs: true,
                history: vec![out, fatal],
                after_exit: Some(after),
            }),
        }
    }

    #[test]
    fn triple_fault_summary_leads_with_the_guest_rip_and_keeps_exit_code_4() {
        let (code, msg) = describe(&crash(0xfff0, 0xf000, 0x6000_0010));
        assert_eq!(code, 4);
        let msg = msg.unwrap();
        let first = msg.lines().next().unwrap();
        assert_eq!(
            first,
            "guest crashed (triple fault) on vCPU 0: KVM reset the vCPU at the shutdown \
             (RIP 0xfff0), the faulting RIP is lost; last RIP seen 0x200650 at the pio-out exit \
             before it"
        );
        assert_eq!(msg.lines().count(), 1 + 3 + 2, "{msg}");
        let (_, msg) = describe(&crash(0x20_7e02, 0x2b, 0x8000_0011));
        assert!(msg.unwrap().starts_with(
            "guest crashed (triple fault) on vCPU 0 at RIP 0x207e02 (state after the shutdown, \
             not reset); last RIP seen 0x200650 at the pio-out exit before it\n"
        ));
    }
}
