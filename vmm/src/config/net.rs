//! vhost-net devices (`--net tap=NAME,vhost=on[,iommu=on][,mac=MAC]`): a
//! virtio-net device whose data path is the kernel's vhost-net, with a tap
//! as its backend.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::devices::{bad, parse_bool, split};
use super::{ConfigError, VmConfig};

/// Most vhost-net devices per VM.
pub const MAX_NET_DEVICES: usize = 8;

/// One vhost-net device on a tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap interface (attached if it exists, else created).
    pub tap: String,
    /// The data path is the kernel's vhost-net (the only one iovmm has: must be true).
    pub vhost: bool,
    /// Put the device behind the vIOMMU (VIRTIO_F_ACCESS_PLATFORM and the kernel's device IOTLB).
    #[serde(default)]
    pub iommu: bool,
    /// MAC address of the guest's interface (default 02:69:6f:76:6d:01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<[u8; 6]>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
fn parse_mac(v: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

impl FromStr for NetConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        // `split` takes a leading kind; a net device has none.
        let with_kind = format!("net,{s}");
        let (_, kv) = split(&with_kind);
        let mut c = NetConfig {
            tap: String::new(),
            vhost: false,
            iommu: false,
            mac: None,
        };
        for (k, v) in kv {
            match k {
                "tap" if !v.is_empty() => c.tap = v.to_string(),
                "vhost" => c.vhost = parse_bool(k, v, s)?,
                "iommu" => c.iommu = parse_bool(k, v, s)?,
                "mac" => {
                    c.mac =
                        Some(parse_mac(v).ok_or_else(|| bad(s, "mac must be aa:bb:cc:dd:ee:ff"))?)
                }
                _ => return Err(bad(s, format!("unknown or empty key {k:?}"))),
            }
        }
        if c.tap.is_empty() {
            return Err(bad(s, "tap=NAME is required"));
        }
        Ok(c)
    }
}

impl NetConfig {
    /// Checks one device: a usable interface name, and vhost=on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !devices::vhost_kernel::tap::valid_name(&self.tap) {
            return Err(ConfigError::Combination(format!(
                "net device: tap name {:?} is not a valid interface name (1 to 15 bytes, no '/', ':' or whitespace)",
                self.tap
            )));
        }
        if !self.vhost {
            return Err(ConfigError::Combination(format!(
                "net device on tap {:?}: add vhost=on; the kernel's vhost-net is iovmm's only network data path",
                self.tap
            )));
        }
        Ok(())
    }
}

impl VmConfig {
    /// Checks the vhost-net devices: each one, their number, distinct taps,
    /// and a vIOMMU for those with iommu=on.
    pub(super) fn validate_net(&self) -> Result<(), ConfigError> {
        if self.net.len() > MAX_NET_DEVICES {
            return Err(ConfigError::Combination(format!(
                "{} net devices requested; at most {MAX_NET_DEVICES} are supported",
                self.net.len()
            )));
        }
        for (i, n) in self.net.iter().enumerate() {
            n.validate()?;
            if self.net[..i].iter().any(|m| m.tap == n.tap) {
                return Err(ConfigError::Combination(format!(
                    "tap {:?} is given to two net devices; give each its own tap",
                    n.tap
                )));
            }
            if n.iommu && self.iommu.is_none() {
                return Err(ConfigError::Combination(format!(
                    "net device on tap {:?} has iommu=on but the VM has no vIOMMU: add --iommu virtio or --iommu vtd",
                    n.tap
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn net_options_parse() {
        let n: NetConfig = "tap=tap0,vhost=on,iommu=on,mac=02:00:00:00:00:2a"
            .parse()
            .unwrap();
        assert_eq!(n.tap, "tap0");
        assert!(n.vhost && n.iommu);
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 0x2a]));
        let plain: NetConfig = "tap=t1,vhost=on".parse().unwrap();
        assert!(!plain.iommu && plain.mac.is_none());
        for bad in [
            "",
            "vhost=on",
            "tap=,vhost=on",
            "tap=t,vhost=maybe",
            "tap=t,vhost=on,queues=2",
            "tap=t,vhost=on,mac=02:00:00:00:00",
            "tap=t,vhost=on,mac=02:00:00:00:00:zz",
            "tap=t,vhost=on,mac=2:0:0:0:0:1",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vhost_off_and_bad_tap_names_fail_validation() {
        let n: NetConfig = "tap=t,vhost=off".parse().unwrap();
        assert!(n.validate().unwrap_err().to_string().contains("vhost=on"));
        let n: NetConfig = "tap=a/b,vhost=on".parse().unwrap();
        assert!(n.validate().is_err());
        let n: NetConfig = "tap=this-name-is-too-long,vhost=on".parse().unwrap();
        assert!(n.validate().is_err());
    }

    #[test]
    fn iommu_needs_a_viommu_and_taps_are_not_shared() {
        let mut c = VmConfig::new("/k");
        c.net.push("tap=t0,vhost=on,iommu=on".parse().unwrap());
        assert!(c
            .validate_net()
            .unwrap_err()
            .to_string()
            .contains("no vIOMMU"));
        c.iommu = Some("virtio".parse().unwrap());
        c.validate_net().unwrap();
        c.net.push("tap=t0,vhost=on".parse().unwrap());
        assert!(c
            .validate_net()
            .unwrap_err()
            .to_string()
            .contains("two net devices"));
    }

    #[test]
    fn the_json_form_matches_the_options() {
        let n: NetConfig =
            serde_json::from_str(r#"{"tap":"tap0","vhost":true,"iommu":true}"#).unwrap();
        assert_eq!(n, "tap=tap0,vhost=on,iommu=on".parse().unwrap());
        assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"t","vhost":true,"q":1}"#).is_err());
    }
}
