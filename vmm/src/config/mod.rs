//! The typed VM configuration shared by the CLI, `--config file.json` and the
//! library API.
//!
//! A [`VmConfig`] is plain data; [`VmConfig::validate`] checks everything that
//! can be checked before KVM is touched, so a bad configuration fails fast with
//! a message naming the field and the fix.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::seccomp::SeccompLevel;

mod api;
mod devices;
mod net;

pub use api::{
    validate_api_socket, MetricsConfig, DEFAULT_METRICS_INTERVAL, MAX_METRICS_INTERVAL,
    MAX_SOCKET_PATH,
};
pub use devices::{
    IommuConfig, IommuKind, IotlbPolicyConfig, VhostUserConfig, VhostUserKind, DEFAULT_SERVER_WAIT,
    MAX_SERVER_WAIT,
};
pub use net::{NetConfig, MAX_NET_DEVICES};

/// Most vhost-user devices per VM (PCI bus 0 has 31 free slots).
pub const MAX_VHOST_USER_DEVICES: usize = 16;

/// Smallest guest memory accepted.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest memory accepted.
pub const MAX_MEMORY: u64 = 256 << 30;
/// Largest vCPU count accepted (APIC ids are 8-bit in the MADT we build).
pub const MAX_CPUS: u8 = 64;
/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Configuration errors.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size string could not be parsed.
    #[error(
        "invalid size {0:?}: use a number of bytes with an optional K, M or G suffix, e.g. 256M"
    )]
    InvalidSize(String),
    /// Memory size out of range or not page aligned.
    #[error("memory size {0} bytes is not supported: use a multiple of 4 KiB between 16 MiB and 256 GiB")]
    MemorySize(u64),
    /// vCPU count out of range.
    #[error("{0} vCPUs is not supported: use 1 to {MAX_CPUS}")]
    Cpus(u8),
    /// A file named by the configuration is missing or not readable.
    #[error("{what} {path:?} cannot be read: {reason}; check the path and its permissions")]
    File {
        /// Which option named the file.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// The command line is too long or contains a NUL.
    #[error("kernel command line is {0} bytes: it must be shorter than {CMDLINE_MAX_SIZE} bytes and contain no NUL")]
    Cmdline(usize),
    /// The serial option was not understood.
    #[error("invalid serial option {0:?}: use stdout, off or file=PATH")]
    Serial(String),
    /// A device option string could not be parsed.
    #[error("invalid device option {option:?}: {reason}")]
    DeviceOption {
        /// The option as given.
        option: String,
        /// What is wrong.
        reason: String,
    },
    /// A non-device option string could not be parsed.
    #[error("invalid {name} option {value:?}: {reason}")]
    Option {
        /// The option (e.g. `--metrics`).
        name: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Options that do not work together.
    #[error("invalid configuration: {0}")]
    Combination(String),
    /// The JSON configuration file could not be read or parsed.
    #[error("configuration file {path:?}: {reason}")]
    ConfigFile {
        /// The path given.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// A byte size written as `256M`, `1G`, `4096` or `512K` (binary units).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "SizeRepr", into = "String")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Num(u64),
    Str(String),
}

impl TryFrom<SizeRepr> for ByteSize {
    type Error = ConfigError;
    fn try_from(r: SizeRepr) -> Result<Self, ConfigError> {
        match r {
            SizeRepr::Num(n) => Ok(ByteSize(n)),
            SizeRepr::Str(s) => s.parse(),
        }
    }
}

impl From<ByteSize> for String {
    fn from(s: ByteSize) -> String {
        s.to_string()
    }
}

impl FromStr for ByteSize {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::InvalidSize(s.to_string());
        let t = s.trim();
        let t = t
            .strip_suffix("iB")
            .or_else(|| t.strip_suffix('B'))
            .unwrap_or(t);
        let (digits, shift) = match t.char_indices().last() {
            Some((i, 'K' | 'k')) => (&t[..i], 10),
            Some((i, 'M' | 'm')) => (&t[..i], 20),
            Some((i, 'G' | 'g')) => (&t[..i], 30),
            _ => (t, 0),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        n.checked_mul(1 << shift).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n != 0 && n % (1 << 30) == 0 => write!(f, "{}G", n >> 30),
            n if n != 0 && n % (1 << 20) == 0 => write!(f, "{}M", n >> 20),
            n if n != 0 && n % (1 << 10) == 0 => write!(f, "{}K", n >> 10),
            n => write!(f, "{n}"),
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialMode {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// Discarded.
    Off,
    /// Appended to a file.
    File(PathBuf),
    /// Kept in memory; read it with [`crate::Vmm::serial_output`] (library use).
    Capture,
}

impl FromStr for SerialMode {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdout" | "tty" => Ok(SerialMode::Stdout),
            "off" | "null" => Ok(SerialMode::Off),
            "capture" => Ok(SerialMode::Capture),
            _ => match s.strip_prefix("file=") {
                Some(p) if !p.is_empty() => Ok(SerialMode::File(p.into())),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

impl TryFrom<String> for SerialMode {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, ConfigError> {
        s.parse()
    }
}

impl From<SerialMode> for String {
    fn from(m: SerialMode) -> String {
        match m {
            SerialMode::Stdout => "stdout".into(),
            SerialMode::Off => "off".into(),
            SerialMode::Capture => "capture".into(),
            SerialMode::File(p) => format!("file={}", p.display()),
        }
    }
}

fn default_memory() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_cpus() -> u8 {
    1
}
fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

/// A complete VM description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel image: an ELF `vmlinux`, a bzImage, or an ELF test guest.
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Guest RAM size.
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// Number of vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Serial console destination.
    #[serde(default)]
    pub serial: SerialMode,
    /// The vIOMMU, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommu: Option<IommuConfig>,
    /// vhost-user devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vhost_user: Vec<VhostUserConfig>,
    /// vhost-net devices on taps (`--net`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetConfig>,
    /// Seccomp filters on iovmm's threads (`true`, `"log"` or `false`; default `true`).
    #[serde(default)]
    pub seccomp: SeccompLevel,
    /// Unix socket of the HTTP control API (`--api-socket`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Periodic JSON metrics line (`--metrics`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initramfs: None,
            cmdline: default_cmdline(),
            memory: default_memory(),
            cpus: default_cpus(),
            serial: SerialMode::default(),
            iommu: None,
            vhost_user: Vec::new(),
            net: Vec::new(),
            seccomp: SeccompLevel::default(),
            api_socket: None,
            metrics: None,
        }
    }

    /// Reads a JSON configuration file (same schema as the CLI options).
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::ConfigFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| err(e.to_string()))
    }

    /// Checks the configuration without touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mem = self.memory.0;
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&mem) || !mem.is_multiple_of(4096) {
            return Err(ConfigError::MemorySize(mem));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        if self.cmdline.len() >= CMDLINE_MAX_SIZE || self.cmdline.contains('\0') {
            return Err(ConfigError::Cmdline(self.cmdline.len()));
        }
        self.validate_devices()?;
        self.validate_net()?;
        self.validate_api()?;
        check_file("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            check_file("initramfs", initramfs)?;
        }
        Ok(())
    }
}

impl VmConfig {
    fn validate_api(&self) -> Result<(), ConfigError> {
        if let Some(sock) = &self.api_socket {
            validate_api_socket(sock)?;
        }
        if let Some(m) = &self.metrics {
            m.validate()?;
            if self.api_socket.as_ref() == Some(&m.path) {
                return Err(ConfigError::Combination(
                    "the metrics path and the API socket are the same file".into(),
                ));
            }
        }
        Ok(())
    }

    fn validate_devices(&self) -> Result<(), ConfigError> {
        if let Some(iommu) = &self.iommu {
            iommu.validate()?;
        }
        if self.vhost_user.len() > MAX_VHOST_USER_DEVICES {
            return Err(ConfigError::Combination(format!(
                "{} vhost-user devices requested; at most {MAX_VHOST_USER_DEVICES} are supported",
                self.vhost_user.len()
            )));
        }
        let kind = self.iommu.as_ref().map(|i| i.kind);
        for d in &self.vhost_user {
            if d.iommu && kind.is_none() {
                return Err(ConfigError::Combination(format!(
                    "vhost-user device {:?} has iommu=on but the VM has no vIOMMU: add --iommu virtio or --iommu vtd",
                    d.socket
                )));
            }
            if d.ats && kind != Some(IommuKind::Vtd) {
                return Err(ConfigError::Combination(format!(
                    "vhost-user device {:?} has ats=on, which needs --iommu vtd",
                    d.socket
                )));
            }
            d.validate()?;
        }
        self.validate_server_sockets()
    }

    /// Server sockets (`server=on`) are files iovmm creates: one per device, and not the API
    /// socket.
    fn validate_server_sockets(&self) -> Result<(), ConfigError> {
        let servers: Vec<&Path> = self
            .vhost_user
            .iter()
            .filter(|d| d.server)
            .map(|d| d.socket.as_path())
            .collect();
        for (i, p) in servers.iter().enumerate() {
            if servers[..i].contains(p) || self.api_socket.as_deref() == Some(*p) {
                return Err(ConfigError::Combination(format!(
                    "the server socket {p:?} is given twice (two devices, or a device and the API socket)"
                )));
            }
        }
        Ok(())
    }
}

fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::File {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(err("the file is empty".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn kernel_file() -> tempfile_path::TempPath {
        tempfile_path::TempPath::with_contents(b"\x7fELF")
    }

    mod tempfile_path {
        use std::path::PathBuf;
        pub struct TempPath(pub PathBuf);
        impl TempPath {
            pub fn with_contents(data: &[u8]) -> Self {
                let p = std::env::temp_dir().join(format!(
                    "iovmm-cfg-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                std::fs::write(&p, data).unwrap();
                TempPath(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!("256M".parse::<ByteSize>().unwrap().0, 256 << 20);
        assert_eq!("1G".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("2GiB".parse::<ByteSize>().unwrap().0, 2 << 30);
        assert_eq!("512k".parse::<ByteSize>().unwrap().0, 512 << 10);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        for bad in [
            "",
            "M",
            "12X",
            "-1M",
            "99999999999999999999G",
            "18014398509481984G",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad} parsed");
        }
        assert_eq!(ByteSize(3 << 30).to_string(), "3G");
        assert_eq!(ByteSize(4097).to_string(), "4097");
    }

    #[test]
    fn validation_rejects_bad_memory_cpus_and_cmdline() {
        let k = kernel_file();
        let mut c = VmConfig::new(&k.0);
        c.validate().unwrap();
        c.memory = ByteSize(8 << 20);
        assert_eq!(c.validate(), Err(ConfigError::MemorySize(8 << 20)));
        c.memory = ByteSize((256 << 20) + 1);
        assert!(matches!(c.validate(), Err(ConfigError::MemorySize(_))));
        c.memory = default_memory();
        c.cpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Cpus(0)));
        c.cpus = 1;
        c.cmdline = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(c.validate(), Err(ConfigError::Cmdline(_))));
    }

    #[test]
    fn validation_names_missing_and_empty_files() {
        let mut c = VmConfig::new("/nonexistent/vmlinux");
        let e = c.validate().unwrap_err();
        assert!(matches!(e, ConfigError::File { what: "kernel", .. }));
        assert!(e.to_string().contains("/nonexistent/vmlinux"));
        let empty = tempfile_path::TempPath::with_contents(b"");
        c.kernel = empty.0.clone();
        assert!(c.validate().unwrap_err().to_string().contains("empty"));
        c.kernel = "/".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("regular file"));
    }

    #[test]
    fn json_schema_round_trips_and_applies_defaults() {
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel":"/k","memory":"1G","serial":"off"}"#).unwrap();
        assert_eq!(c.memory.0, 1 << 30);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.serial, SerialMode::Off);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        let back: VmConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let n: VmConfig = serde_json::from_str(r#"{"kernel":"/k","memory":268435456}"#).unwrap();
        assert_eq!(n.memory.0, 256 << 20);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","bogus":1}"#).is_err());
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","serial":"tty9"}"#).is_err());
    }

    #[test]
    fn device_combinations_are_validated() {
        let k = kernel_file();
        let mut c = VmConfig::new(&k.0);
        c.vhost_user.push("net,socket=/s,iommu=on".parse().unwrap());
        assert!(c.validate().unwrap_err().to_string().contains("no vIOMMU"));
        c.iommu = Some("virtio".parse().unwrap());
        c.validate().unwrap();
        c.vhost_user[0].ats = true;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("needs --iommu vtd"));
        c.iommu = Some("vtd,device_iotlb=on".parse().unwrap());
        c.validate().unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);
        let from_json: VmConfig = serde_json::from_str(
            r#"{"kernel":"/k","iommu":{"kind":"vtd","caching_mode":true},
                "vhost_user":[{"kind":"net","socket":"/s","iommu":true}]}"#,
        )
        .unwrap();
        assert!(from_json.iommu.unwrap().caching_mode && from_json.vhost_user[0].iommu);
    }

    #[test]
    fn server_sockets_are_not_shared() {
        let k = kernel_file();
        let mut c = VmConfig::new(&k.0);
        let sock = std::env::temp_dir().join(format!("iovmm-cfg-dup-{}.sock", std::process::id()));
        let dev = format!("net,socket={},server=on", sock.display());
        c.vhost_user.push(dev.parse().unwrap());
        c.validate().unwrap();
        c.api_socket = Some(sock.clone());
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        c.api_socket = None;
        c.vhost_user.push(dev.parse().unwrap());
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        // The same path as a client of one device and the server of another is allowed
        // (a loop-back through iovmm itself); two clients may share a backend's socket.
        c.vhost_user[1].server = false;
        c.validate().unwrap();
    }

    #[test]
    fn api_socket_and_metrics_are_validated_and_serialized() {
        let k = kernel_file();
        let mut c = VmConfig::new(&k.0);
        c.api_socket = Some("/tmp/iovmm-api.sock".into());
        c.metrics = Some("/tmp/iovmm-api.sock".parse().unwrap());
        assert!(c.validate().unwrap_err().to_string().contains("same file"));
        c.metrics = Some("/tmp/iovmm-metrics,interval=2".parse().unwrap());
        c.validate().unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(r#""api_socket":"/tmp/iovmm-api.sock""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);
        c.api_socket = Some("/nonexistent-dir/api.sock".into());
        assert!(matches!(c.validate(), Err(ConfigError::File { .. })));
    }

    #[test]
    fn serial_modes_parse() {
        assert_eq!(
            "file=/tmp/x".parse::<SerialMode>().unwrap(),
            SerialMode::File("/tmp/x".into())
        );
        assert!("file=".parse::<SerialMode>().is_err());
        assert_eq!(String::from(SerialMode::File("/a".into())), "file=/a");
    }
}
