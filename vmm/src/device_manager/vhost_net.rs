//! vhost-net devices on the machine: attach the tap, open `/dev/vhost-net`,
//! put the device on PCI and, behind a vIOMMU, hook its IOTLB bridge to the
//! vIOMMU exactly like a vhost-user device's (translation for the kernel's
//! misses, faults, unmap notifications).

use std::sync::Arc;

use devices::pci::PciBdf;
use devices::vhost_kernel::{
    VhostNetConfig as DeviceConfig, VhostNetDevice, VhostNetError, VhostNetStats,
    VhostNetStatsHandle,
};
use devices::vhost_user::IotlbPolicy;
use devices::viommu::ViommuError;
use devices::virtio::GuestMemoryMmap;
use thiserror::Error;

use super::iommu::{requester_id, Viommu};
use super::{DeviceManager, DeviceManagerError};
use crate::config::{IotlbPolicyConfig, NetConfig};

/// vhost-net setup errors.
#[derive(Debug, Error)]
pub enum VhostNetSetupError {
    /// The tap or the kernel's vhost-net refused the device.
    #[error("vhost-net device on tap {tap:?}")]
    Device {
        /// The tap.
        tap: String,
        /// Cause.
        #[source]
        source: VhostNetError,
    },
    /// Hooking the device to the vIOMMU failed.
    #[error("cannot attach the vhost-net device on tap {tap:?} to the vIOMMU")]
    Iommu {
        /// The tap.
        tap: String,
        /// What failed.
        #[source]
        source: ViommuError,
    },
}

impl From<VhostNetSetupError> for DeviceManagerError {
    fn from(e: VhostNetSetupError) -> Self {
        DeviceManagerError::VhostNet(Box::new(e))
    }
}

/// A vhost-net device as seen by the library API.
#[derive(Clone)]
pub struct VhostNetInfo {
    /// The tap.
    pub tap: String,
    /// PCI address.
    pub bdf: PciBdf,
    /// Behind the vIOMMU.
    pub iommu: bool,
    stats: VhostNetStatsHandle,
}

impl std::fmt::Debug for VhostNetInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostNetInfo")
            .field("tap", &self.tap)
            .field("bdf", &self.bdf)
            .field("iommu", &self.iommu)
            .finish()
    }
}

impl VhostNetInfo {
    /// Current counters.
    pub fn stats(&self) -> VhostNetStats {
        self.stats.snapshot()
    }

    /// Translations the kernel may still hold although the vIOMMU no longer
    /// maps them that way (the vhost-user audit, same bridge).
    pub fn stale_translations(&self) -> Vec<(u64, u64)> {
        self.stats
            .bridge()
            .map(|b| b.stale_translations())
            .unwrap_or_default()
    }

    /// The counters as one flat JSON object, with the vhost-user device's
    /// keys for what both have (what `iovmm --print-counters` prints).
    pub fn counters_json(&self) -> serde_json::Value {
        counters_json(&self.tap, self.bdf, self.iommu, &self.stats())
    }
}

/// One device's counters as a flat JSON object.
fn counters_json(tap: &str, bdf: PciBdf, iommu: bool, s: &VhostNetStats) -> serde_json::Value {
    let (t, r) = (&s.iotlb, &s.server);
    let mut obj = serde_json::json!({
        "backend": "vhost-net",
        "tap": tap,
        "bdf": bdf.to_string(),
        "iommu": iommu,
        "activations": s.activations,
        "broken": s.broken,
        "kernel_features": format!("{:#x}", s.kernel_features),
        "backend_features": format!("{:#x}", s.backend_features),
        "updates": t.updates,
        "invalidations": t.invalidations,
        "failures": t.failures,
        "messages_read": r.messages,
        "malformed": r.malformed,
        "unexpected": r.unexpected,
        "iotlb_failure": s.iotlb_failure,
    });
    super::vhost_user::add_bridge_counters(&mut obj, &s.bridge);
    obj
}

fn device_config(cfg: &NetConfig, policy: IotlbPolicyConfig) -> DeviceConfig {
    let mut d = DeviceConfig::new(cfg.tap.clone());
    d.iommu = cfg.iommu;
    if let Some(mac) = cfg.mac {
        d.mac = mac;
    }
    d.policy = match policy {
        IotlbPolicyConfig::Miss => IotlbPolicy::MissDriven,
        IotlbPolicyConfig::Prefetch => IotlbPolicy::Prefetch,
    };
    d
}

/// Creates one vhost-net device and puts it on the machine.
pub fn add_vhost_net(
    dm: &mut DeviceManager,
    viommu: Option<&mut Viommu>,
    policy: IotlbPolicyConfig,
    cfg: &NetConfig,
    mem: &GuestMemoryMmap,
) -> Result<VhostNetInfo, DeviceManagerError> {
    let tap = cfg.tap.clone();
    let device = VhostNetDevice::new(device_config(cfg, policy), mem).map_err(|source| {
        VhostNetSetupError::Device {
            tap: tap.clone(),
            source,
        }
    })?;
    let stats = device.stats_handle();
    let bridge = device.bridge();
    let bdf = dm.next_bdf()?;
    if let (Some(viommu), Some(_)) = (viommu.as_ref(), bridge.as_ref()) {
        device
            .set_translation(viommu.seam(), requester_id(bdf))
            .map_err(|source| VhostNetSetupError::Device {
                tap: tap.clone(),
                source,
            })?;
    }
    let plugged = dm.add_virtio_pci(mem.clone(), Box::new(device))?;
    debug_assert_eq!(plugged, bdf, "the device went where next_bdf said");
    if let (Some(viommu), Some(bridge)) = (viommu, bridge) {
        let maps = policy == IotlbPolicyConfig::Prefetch;
        let consumer: Arc<dyn iommu::IommuNotifier> = bridge;
        viommu
            .attach(bdf, consumer, maps)
            .map_err(|source| VhostNetSetupError::Iommu {
                tap: tap.clone(),
                source,
            })?;
    }
    log::info!("vhost-net: tap {tap:?} at {bdf}");
    Ok(VhostNetInfo {
        tap,
        bdf,
        iommu: cfg.iommu,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_json_has_the_vhost_user_keys_for_the_same_counters() {
        let mut s = VhostNetStats::default();
        s.bridge.misses = 7;
        s.iotlb.updates = 5;
        s.iotlb.invalidations = 3;
        s.server.malformed = 1;
        s.iotlb_failure = Some("bad".into());
        let v = counters_json("tap0", PciBdf::new(0, 0, 4, 0), true, &s);
        for (key, want) in [
            ("misses", 7),
            ("updates", 5),
            ("invalidations", 3),
            ("malformed", 1),
        ] {
            assert_eq!(v[key].as_u64(), Some(want), "{key} in {v}");
        }
        assert_eq!(v["backend"], "vhost-net");
        assert_eq!(v["tap"], "tap0");
        assert_eq!(v["iotlb_failure"], "bad");
    }
}
