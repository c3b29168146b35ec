//! Device options: the vIOMMU (`--iommu`) and vhost-user devices
//! (`--vhost-user`), each written on the command line as
//! `kind,key=value,...` and in JSON as an object.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Which vIOMMU the VM gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IommuKind {
    /// virtio-iommu on virtio-pci, described by ACPI VIOT.
    Virtio,
    /// Intel VT-d style remapping unit, described by ACPI DMAR.
    Vtd,
}

/// How the IOTLB bridge fills a backend's IOTLB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IotlbPolicyConfig {
    /// Only answer the backend's misses (default).
    #[default]
    Miss,
    /// Also push UPDATEs when the vIOMMU reports new mappings (VT-d caching mode).
    Prefetch,
}

fn default_aw() -> u8 {
    48
}

/// The vIOMMU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IommuConfig {
    /// Model.
    pub kind: IommuKind,
    /// VT-d caching mode (CAP.CM): the guest also invalidates after mapping.
    #[serde(default)]
    pub caching_mode: bool,
    /// VT-d device-TLB support (ECAP.DT) and ATSR in the DMAR.
    #[serde(default)]
    pub device_iotlb: bool,
    /// VT-d interrupt remapping (ECAP.IR).
    #[serde(default)]
    pub interrupt_remapping: bool,
    /// VT-d guest address width: 39 or 48.
    #[serde(default = "default_aw")]
    pub address_width: u8,
    /// IOTLB fill policy for vhost-user backends.
    #[serde(default)]
    pub iotlb_policy: IotlbPolicyConfig,
}

/// Kind of a vhost-user device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VhostUserKind {
    /// virtio-net.
    Net,
    /// virtio-blk.
    Blk,
}

/// One vhost-user device served by an external backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostUserConfig {
    /// Device type.
    pub kind: VhostUserKind,
    /// Backend's Unix socket.
    pub socket: PathBuf,
    /// Put the device behind the vIOMMU (VIRTIO_F_ACCESS_PLATFORM + IOTLB protocol).
    #[serde(default)]
    pub iommu: bool,
    /// Give the device a PCIe ATS capability (VT-d device-TLB).
    #[serde(default)]
    pub ats: bool,
    /// Reconnect to a restarted backend, trying every this many seconds
    /// (0: a dead backend breaks the device).
    #[serde(default)]
    pub reconnect: u64,
    /// Server mode (`server=on`): iovmm listens on `socket` and the backend
    /// connects (OVS-DPDK `dpdkvhostuserclient`, DPDK `client=1`); the next
    /// backend is accepted whenever the current one goes away.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub server: bool,
    /// Server mode: how many seconds `Vmm::start` waits for the first
    /// backend to connect (1..=86400).
    #[serde(default = "default_wait")]
    pub wait: u64,
    /// Behind a vIOMMU: busy-poll window in µs (`poll_us=P`, 0..=1000, default 0) of the
    /// back-end request thread waiting for the next IOTLB miss and of the wait for an IOTLB
    /// message's ack; saves a thread wake-up per wait that ends within it, at its CPU time.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub poll_us: u64,
    /// Queue pairs of a net device (`queues=N`, 1..=16, default 1): with more than one the
    /// device offers VIRTIO_NET_F_MQ and a control queue the VMM serves.
    #[serde(default = "default_queues", skip_serializing_if = "is_one")]
    pub queues: u16,
}

/// Largest `queues=N`.
pub const MAX_QUEUE_PAIRS: u16 = devices::vhost_user::mq::MAX_QUEUE_PAIRS;

fn default_queues() -> u16 {
    1
}

fn is_one(v: &u16) -> bool {
    *v == 1
}

/// Largest `poll_us=P`.
pub const MAX_POLL_US: u64 = 1000;

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Default of `wait=SECS` (server mode).
pub const DEFAULT_SERVER_WAIT: u64 = 60;
/// Largest `wait=SECS`.
pub const MAX_SERVER_WAIT: u64 = 86_400;

fn default_wait() -> u64 {
    DEFAULT_SERVER_WAIT
}

pub(super) fn parse_bool(key: &str, v: &str, whole: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::DeviceOption {
            option: whole.into(),
            reason: format!("{key} must be on or off, not {v:?}"),
        }),
    }
}

/// Splits `kind,k=v,...`.
pub(super) fn split(s: &str) -> (&str, Vec<(&str, &str)>) {
    let mut parts = s.split(',');
    let kind = parts.next().unwrap_or_default();
    let kv = parts
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    (kind, kv)
}

pub(super) fn bad(whole: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::DeviceOption {
        option: whole.into(),
        reason: reason.into(),
    }
}

impl FromStr for IommuConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (kind, kv) = split(s);
        let kind = match kind {
            "virtio" | "virtio-iommu" => IommuKind::Virtio,
            "vtd" | "intel" | "intel-iommu" => IommuKind::Vtd,
            k => return Err(bad(s, format!("unknown IOMMU {k:?}: use virtio or vtd"))),
        };
        let mut c = IommuConfig {
            kind,
            caching_mode: false,
            device_iotlb: false,
            interrupt_remapping: false,
            address_width: default_aw(),
            iotlb_policy: IotlbPolicyConfig::default(),
        };
        for (k, v) in kv {
            match k {
                "caching_mode" | "caching-mode" => c.caching_mode = parse_bool(k, v, s)?,
                "device_iotlb" | "device-iotlb" => c.device_iotlb = parse_bool(k, v, s)?,
                "intremap" | "interrupt_remapping" => c.interrupt_remapping = parse_bool(k, v, s)?,
                "aw" | "aw_bits" => {
                    c.address_width = v.parse().map_err(|_| bad(s, "aw must be 39 or 48"))?
                }
                "iotlb" => {
                    c.iotlb_policy = match v {
                        "miss" => IotlbPolicyConfig::Miss,
                        "prefetch" => IotlbPolicyConfig::Prefetch,
                        _ => return Err(bad(s, "iotlb must be miss or prefetch")),
                    }
                }
                _ => return Err(bad(s, format!("unknown key {k:?}"))),
            }
        }
        Ok(c)
    }
}

impl FromStr for VhostUserConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let (kind, kv) = split(s);
        let kind = match kind {
            "net" => VhostUserKind::Net,
            "blk" => VhostUserKind::Blk,
            k => {
                return Err(bad(
                    s,
                    format!("unknown vhost-user device {k:?}: use net or blk"),
                ))
            }
        };
        let (mut socket, mut iommu, mut ats, mut reconnect) = (None, false, false, 0);
        let (mut server, mut wait, mut poll_us) = (false, None, 0);
        let mut queues = 1;
        for (k, v) in kv {
            match k {
                "queues" => {
                    queues = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUE_PAIRS).contains(n))
                        .ok_or_else(|| bad(s, "queues must be 1..=16 queue pairs"))?
                }
                "poll_us" => {
                    poll_us = v
                        .parse()
                        .ok()
                        .filter(|n| *n <= MAX_POLL_US)
                        .ok_or_else(|| bad(s, "poll_us must be 0..=1000 microseconds"))?
                }
                "socket" if !v.is_empty() => socket = Some(PathBuf::from(v)),
                "iommu" => iommu = parse_bool(k, v, s)?,
                "ats" => ats = parse_bool(k, v, s)?,
                "reconnect" => {
                    reconnect = v
                        .parse()
                        .ok()
                        .filter(|n| *n <= 3600)
                        .ok_or_else(|| bad(s, "reconnect must be 0..=3600 seconds"))?
                }
                "server" => server = parse_bool(k, v, s)?,
                "wait" => {
                    wait = Some(
                        v.parse()
                            .ok()
                            .filter(|n| (1..=MAX_SERVER_WAIT).contains(n))
                            .ok_or_else(|| bad(s, "wait must be 1..=86400 seconds"))?,
                    )
                }
                _ => return Err(bad(s, format!("unknown or empty key {k:?}"))),
            }
        }
        let socket = socket.ok_or_else(|| bad(s, "socket=PATH is required"))?;
        if wait.is_some() && !server {
            return Err(bad(s, "wait=SECS needs server=on"));
        }
        Ok(VhostUserConfig {
            kind,
            socket,
            iommu,
            ats,
            reconnect,
            server,
            wait: wait.unwrap_or(DEFAULT_SERVER_WAIT),
            poll_us,
            queues,
        })
    }
}

impl VhostUserConfig {
    /// Checks the server-mode options: no `reconnect` (a server accepts the
    /// next backend by itself), `wait` in range, a socket path that fits
    /// `sun_path` in an existing directory and, if the path exists, a socket
    /// (whether another process serves it is checked when it is bound).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |reason: String| {
            ConfigError::Combination(format!("vhost-user device {:?}: {reason}", self.socket))
        };
        if !(1..=MAX_QUEUE_PAIRS).contains(&self.queues) {
            return Err(err(format!(
                "queues must be 1..={MAX_QUEUE_PAIRS} queue pairs, not {}",
                self.queues
            )));
        }
        if self.queues > 1 && self.kind != VhostUserKind::Net {
            return Err(err(
                "queues=N is for net devices (a blk device has one queue)".into(),
            ));
        }
        if !self.server {
            return Ok(());
        }
        if self.reconnect > 0 {
            return Err(err("reconnect=SECS is for client mode; with server=on iovmm accepts the next backend by itself".into()));
        }
        if !(1..=MAX_SERVER_WAIT).contains(&self.wait) {
            return Err(err(format!("wait must be 1..={MAX_SERVER_WAIT} seconds")));
        }
        let len = self.socket.as_os_str().len();
        if len == 0 || len > super::MAX_SOCKET_PATH {
            return Err(err(format!(
                "a server socket path must be 1 to {} bytes, not {len}",
                super::MAX_SOCKET_PATH
            )));
        }
        let parent = match self.socket.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        if !parent.is_dir() {
            return Err(err(format!("the directory {parent:?} does not exist")));
        }
        use std::os::unix::fs::FileTypeExt;
        match std::fs::symlink_metadata(&self.socket) {
            Ok(m) if !m.file_type().is_socket() => Err(err(
                "the path exists and is not a socket; iovmm does not replace it".into(),
            )),
            _ => Ok(()),
        }
    }
}

impl IommuConfig {
    /// Checks option combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let virtio_only_vtd_opts =
            self.caching_mode || self.device_iotlb || self.interrupt_remapping;
        if self.kind == IommuKind::Virtio && virtio_only_vtd_opts {
            return Err(ConfigError::Combination(
                "caching_mode, device_iotlb and intremap are VT-d options; use --iommu vtd,..."
                    .into(),
            ));
        }
        if self.address_width != 39 && self.address_width != 48 {
            return Err(ConfigError::Combination(format!(
                "IOMMU address width {} is not supported: use 39 or 48",
                self.address_width
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn iommu_options_parse() {
        let c: IommuConfig = "vtd,caching_mode=on,device-iotlb=on,aw=39,iotlb=prefetch"
            .parse()
            .unwrap();
        assert_eq!(c.kind, IommuKind::Vtd);
        assert!(c.caching_mode && c.device_iotlb && !c.interrupt_remapping);
        assert_eq!(
            (c.address_width, c.iotlb_policy),
            (39, IotlbPolicyConfig::Prefetch)
        );
        assert_eq!(
            "virtio".parse::<IommuConfig>().unwrap().kind,
            IommuKind::Virtio
        );
        for bad in [
            "amd",
            "vtd,caching_mode=maybe",
            "vtd,bogus=1",
            "vtd,aw=x",
            "vtd,iotlb=eager",
        ] {
            assert!(bad.parse::<IommuConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn iommu_option_combinations_are_checked() {
        assert!("virtio,caching_mode=on"
            .parse::<IommuConfig>()
            .unwrap()
            .validate()
            .is_err());
        assert!("vtd,aw=57"
            .parse::<IommuConfig>()
            .unwrap()
            .validate()
            .is_err());
        assert!("vtd,caching_mode=on"
            .parse::<IommuConfig>()
            .unwrap()
            .validate()
            .is_ok());
        assert!("virtio,intremap=on"
            .parse::<IommuConfig>()
            .unwrap()
            .validate()
            .is_err());
    }

    #[test]
    fn vtd_interrupt_remapping_parses_and_validates() {
        let c: IommuConfig = "vtd,intremap=on,device_iotlb=on".parse().unwrap();
        assert!(c.interrupt_remapping && c.device_iotlb);
        assert!(c.validate().is_ok());
        let off: IommuConfig = "vtd,interrupt_remapping=off".parse().unwrap();
        assert!(!off.interrupt_remapping && off.validate().is_ok());
    }

    #[test]
    fn vhost_user_options_parse() {
        let v: VhostUserConfig = "net,socket=/tmp/s.sock,iommu=on,ats=on".parse().unwrap();
        assert_eq!(v.kind, VhostUserKind::Net);
        assert_eq!(v.socket, PathBuf::from("/tmp/s.sock"));
        assert!(v.iommu && v.ats);
        let b: VhostUserConfig = "blk,socket=/b".parse().unwrap();
        assert!(!b.iommu && b.kind == VhostUserKind::Blk);
        assert_eq!(b.reconnect, 0);
        let r: VhostUserConfig = "net,socket=/r,reconnect=2".parse().unwrap();
        assert_eq!(r.reconnect, 2);
        assert_eq!(r.poll_us, 0);
        let p: VhostUserConfig = "net,socket=/p,iommu=on,poll_us=50".parse().unwrap();
        assert_eq!(p.poll_us, 50);
        for bad in [
            "net,socket=/x,poll_us=-1",
            "net,socket=/x,poll_us=1001",
            "net,socket=/x,poll_us=soon",
            "net",
            "net,socket=",
            "scsi,socket=/x",
            "net,socket=/x,iommu=perhaps",
            "net,socket=/x,q=2",
            "net,socket=/x,reconnect=-1",
            "net,socket=/x,reconnect=soon",
            "net,socket=/x,reconnect=99999",
            "net,socket=/x,server=maybe",
            "net,socket=/x,wait=5",
            "net,socket=/x,server=on,wait=0",
            "net,socket=/x,server=on,wait=86401",
        ] {
            assert!(bad.parse::<VhostUserConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn queue_pairs_parse_and_validate() {
        let one: VhostUserConfig = "net,socket=/q".parse().unwrap();
        assert_eq!(one.queues, 1);
        let four: VhostUserConfig = "net,socket=/q,iommu=on,queues=4".parse().unwrap();
        assert_eq!(four.queues, 4);
        four.validate().unwrap();
        for bad in [
            "net,socket=/q,queues=0",
            "net,socket=/q,queues=17",
            "net,socket=/q,queues=two",
        ] {
            assert!(bad.parse::<VhostUserConfig>().is_err(), "{bad}");
        }
        let blk: VhostUserConfig = "blk,socket=/b,queues=2".parse().unwrap();
        assert!(blk
            .validate()
            .unwrap_err()
            .to_string()
            .contains("net devices"));
        let json = serde_json::to_string(&one).unwrap();
        assert!(!json.contains("queues"), "{json}");
        let back: VhostUserConfig =
            serde_json::from_str(&serde_json::to_string(&four).unwrap()).unwrap();
        assert_eq!(back.queues, 4);
        let zero = VhostUserConfig { queues: 0, ..one };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn server_mode_parses_and_validates() {
        let dir = std::env::temp_dir();
        let sock = dir.join(format!("iovmm-cfg-server-{}.sock", std::process::id()));
        let v: VhostUserConfig = format!("net,socket={},server=on,iommu=on", sock.display())
            .parse()
            .unwrap();
        assert!(v.server && v.iommu);
        assert_eq!(v.wait, DEFAULT_SERVER_WAIT);
        v.validate().unwrap();
        let w: VhostUserConfig = format!("net,socket={},server=on,wait=5", sock.display())
            .parse()
            .unwrap();
        assert_eq!(w.wait, 5);
        let mut r = w.clone();
        r.reconnect = 2;
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("client mode"));
        let long = VhostUserConfig {
            socket: dir.join("x".repeat(120)),
            ..w.clone()
        };
        assert!(long.validate().unwrap_err().to_string().contains("bytes"));
        let nodir = VhostUserConfig {
            socket: "/nonexistent-dir/s.sock".into(),
            ..w.clone()
        };
        assert!(nodir
            .validate()
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
        let file = dir.join(format!("iovmm-cfg-server-{}.file", std::process::id()));
        std::fs::write(&file, b"x").unwrap();
        let not_sock = VhostUserConfig {
            socket: file.clone(),
            ..w.clone()
        };
        assert!(not_sock
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not a socket"));
        std::fs::remove_file(&file).unwrap();
        // A client's socket is checked when it connects; JSON round trip.
        let json = serde_json::to_string(&w).unwrap();
        assert!(json.contains(r#""server":true"#), "{json}");
        assert_eq!(serde_json::from_str::<VhostUserConfig>(&json).unwrap(), w);
        let client: VhostUserConfig = "net,socket=/c".parse().unwrap();
        assert!(!serde_json::to_string(&client).unwrap().contains("server"));
    }
}
