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
}

fn parse_bool(key: &str, v: &str, whole: &str) -> Result<bool, ConfigError> {
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
fn split(s: &str) -> (&str, Vec<(&str, &str)>) {
    let mut parts = s.split(',');
    let kind = parts.next().unwrap_or_default();
    let kv = parts
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    (kind, kv)
}

fn bad(whole: &str, reason: impl Into<String>) -> ConfigError {
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
        for (k, v) in kv {
            match k {
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
                _ => return Err(bad(s, format!("unknown or empty key {k:?}"))),
            }
        }
        let socket = socket.ok_or_else(|| bad(s, "socket=PATH is required"))?;
        Ok(VhostUserConfig {
            kind,
            socket,
            iommu,
            ats,
            reconnect,
        })
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
        for bad in [
            "net",
            "net,socket=",
            "scsi,socket=/x",
            "net,socket=/x,iommu=perhaps",
            "net,socket=/x,q=2",
            "net,socket=/x,reconnect=-1",
            "net,socket=/x,reconnect=soon",
            "net,socket=/x,reconnect=99999",
        ] {
            assert!(bad.parse::<VhostUserConfig>().is_err(), "{bad}");
        }
    }
}
