//! vhost-user devices on the machine: connect to the backend, put the device
//! on PCI and, behind a vIOMMU, hook its IOTLB bridge to the vIOMMU
//! (translation for misses, a fault hook, unmap notifications).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devices::pci::ats::AtsListener;
use devices::pci::PciBdf;
use devices::vhost_user::stats::BridgeStats;
use devices::vhost_user::{
    listener, IotlbPolicy, VhostUserConfig as DeviceConfig, VhostUserDevice, VhostUserError,
    VhostUserKind as DeviceKind, VhostUserStats, VhostUserStatsHandle,
};
use devices::viommu::{Viommu as ViommuSeam, ViommuError};
use devices::virtio::GuestMemoryMmap;
use iommu::RequesterId;
use thiserror::Error;

use super::iommu::{requester_id, Viommu};
use super::{DeviceManager, DeviceManagerError};
use crate::config::{IotlbPolicyConfig, VhostUserConfig, VhostUserKind};

/// vhost-user setup errors.
#[derive(Debug, Error)]
pub enum VhostUserSetupError {
    /// The backend could not be reached or refused the device.
    #[error("vhost-user {kind:?} device on {socket:?}")]
    Device {
        /// Device kind.
        kind: VhostUserKind,
        /// Socket.
        socket: PathBuf,
        /// Cause.
        #[source]
        source: VhostUserError,
    },
    /// Hooking the device to the vIOMMU failed.
    #[error("cannot attach vhost-user device {socket:?} to the vIOMMU")]
    Iommu {
        /// Socket.
        socket: PathBuf,
        /// What failed.
        #[source]
        source: ViommuError,
    },
}

/// A server socket file iovmm created (`server=on`); removed when dropped. The `Vmm`
/// handle keeps these and drops them on the caller's thread once the VM is gone (device
/// threads may not `unlink`), or right away when the VM fails to build.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => log::debug!("vhost-user: removed the server socket {:?}", self.0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!(
                "vhost-user: cannot remove the server socket {:?}: {e}",
                self.0
            ),
        }
    }
}

/// A vhost-user device as seen by the library API.
#[derive(Clone)]
pub struct VhostUserInfo {
    /// Backend socket.
    pub socket: PathBuf,
    /// Server mode: iovmm listens on `socket` and the backend connects.
    pub server: bool,
    /// PCI address.
    pub bdf: PciBdf,
    /// Behind the vIOMMU.
    pub iommu: bool,
    stats: VhostUserStatsHandle,
    bridge: Option<Consumer>,
}

impl std::fmt::Debug for VhostUserInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserInfo")
            .field("socket", &self.socket)
            .field("server", &self.server)
            .field("bdf", &self.bdf)
            .field("iommu", &self.iommu)
            .finish()
    }
}

impl VhostUserInfo {
    /// Current counters (IOTLB messages, misses, invalidations, latencies).
    pub fn stats(&self) -> VhostUserStats {
        self.stats.snapshot()
    }

    /// Translations this device's back end may still hold although the
    /// vIOMMU no longer maps them that way (inclusive IOVA ranges; see
    /// [`devices::vhost_user::IotlbBridge::stale_translations`]). Empty
    /// after the guest stopped means the security invariant held for this
    /// device, whatever the back end (DPDK's IOTLB cannot be probed).
    pub fn stale_translations(&self) -> Vec<(u64, u64)> {
        self.bridge
            .as_ref()
            .map(|b| b.stale_translations())
            .unwrap_or_default()
    }

    /// How many IOVA segments the back end may hold (UPDATEs sent and not
    /// invalidated since): what [`VhostUserInfo::stale_translations`] audits.
    pub fn held_ranges(&self) -> usize {
        self.bridge.as_ref().map_or(0, |b| b.installed_ranges())
    }

    /// The counters as one flat JSON object (what `iovmm --print-counters`
    /// prints at exit).
    pub fn counters_json(&self) -> serde_json::Value {
        counters_json(&self.socket, self.bdf, self.iommu, &self.stats())
    }
}

/// One device's counters as a flat JSON object.
fn counters_json(
    socket: &std::path::Path,
    bdf: PciBdf,
    iommu: bool,
    s: &VhostUserStats,
) -> serde_json::Value {
    let t = s.iotlb;
    let mut obj = serde_json::json!({
        "socket": socket,
        "bdf": bdf.to_string(),
        "iommu": iommu,
        "activations": s.activations,
        "broken": s.broken,
        "updates": t.updates,
        "invalidations": t.invalidations,
        "nacks": t.nacks,
        "failures": t.failures,
        "reconnects": s.reconnect.reconnects,
    });
    add_bridge_counters(&mut obj, &s.bridge);
    obj
}

/// Adds the IOTLB bridge's counters (misses, INVALIDATEs, latencies) to `obj`, a JSON object:
/// the keys every device with a bridge prints, vhost-user or vhost-net.
pub(super) fn add_bridge_counters(obj: &mut serde_json::Value, b: &BridgeStats) {
    let bridge = serde_json::json!({
        "misses": b.misses,
        "misses_served": b.misses_served,
        "misses_refused": b.misses_refused,
        "faults": b.faults,
        "access_fails": b.access_fails,
        "prefetches": b.prefetches,
        "invalidations_acked": b.invalidations,
        "invalidation_failures": b.invalidation_failures,
        "invalidations_skipped": b.invalidations_skipped,
        "invalidations_unchanged": b.invalidations_unchanged,
        "connect_invalidations": b.connect_invalidations,
        "devtlb_notifications": b.devtlb_notifications,
        "ring_invalidations": b.ring_invalidations,
        "ring_updates": b.ring_updates,
        "rings_unmapped": b.rings_unmapped,
        "stall_reports": b.stall_reports,
        "unsupported_requests": b.unsupported_requests,
        "throttled_requests": b.throttled_requests,
        "miss_p50_ns": b.miss_latency.p50_ns,
        "miss_p99_ns": b.miss_latency.p99_ns,
        "invalidate_p50_ns": b.invalidate_latency.p50_ns,
        "invalidate_p99_ns": b.invalidate_latency.p99_ns,
    });
    if let (Some(obj), serde_json::Value::Object(bridge)) = (obj.as_object_mut(), bridge) {
        obj.extend(bridge);
    }
}

fn device_config(cfg: &VhostUserConfig, policy: IotlbPolicyConfig) -> DeviceConfig {
    let mut d = match cfg.kind {
        VhostUserKind::Net => DeviceConfig::net(&cfg.socket),
        VhostUserKind::Blk => DeviceConfig::blk(&cfg.socket, None),
    };
    debug_assert!(matches!(d.kind, DeviceKind::Net | DeviceKind::Blk));
    d.iommu = cfg.iommu;
    d.queue_pairs = cfg.queues;
    d.reconnect = (cfg.reconnect > 0).then(|| Duration::from_secs(cfg.reconnect));
    d.policy = match policy {
        IotlbPolicyConfig::Miss => IotlbPolicy::MissDriven,
        IotlbPolicyConfig::Prefetch => IotlbPolicy::Prefetch,
    };
    d
}

/// The device on its first connection: connected to the backend (client), or listening at
/// the socket path and waiting for the first backend, at most `wait=SECS` (server; the
/// socket file goes to `files`).
fn first_connection(
    cfg: &VhostUserConfig,
    policy: IotlbPolicyConfig,
    files: &mut Vec<SocketFile>,
) -> Result<VhostUserDevice, VhostUserError> {
    let dc = device_config(cfg, policy);
    if !cfg.server {
        return VhostUserDevice::connect(dc);
    }
    let l = listener::bind(&cfg.socket)?;
    files.push(SocketFile(cfg.socket.clone()));
    VhostUserDevice::accept(l, dc, Duration::from_secs(cfg.wait))
}

/// Connects one vhost-user device (or, with `server=on`, binds its socket and waits for the
/// backend) and puts it on the machine.
pub fn add_vhost_user(
    dm: &mut DeviceManager,
    viommu: Option<&mut Viommu>,
    policy: IotlbPolicyConfig,
    cfg: &VhostUserConfig,
    mem: &GuestMemoryMmap,
    files: &mut Vec<SocketFile>,
) -> Result<VhostUserInfo, DeviceManagerError> {
    let dev_err = |source| VhostUserSetupError::Device {
        kind: cfg.kind,
        socket: cfg.socket.clone(),
        source,
    };
    let device = first_connection(cfg, policy, files).map_err(dev_err)?;
    let stats = device.stats_handle();
    let bridge = device.bridge();
    let audited = bridge.clone().filter(|_| cfg.iommu);
    let viommu = viommu.filter(|_| cfg.iommu);
    // The requester id is known before the device exists, so its ATS
    // listener can name it.
    let bdf = dm.next_bdf()?;
    let listener = cfg
        .ats
        .then(|| ats_listener(viommu.as_ref().map(|v| v.seam()), requester_id(bdf)));
    if let Some(v) = &viommu {
        // The device (its control queue) and its bridge translate through the seam.
        device
            .set_translation(v.seam(), requester_id(bdf))
            .map_err(dev_err)?;
    }
    let plugged = dm.add_virtio_pci_with(mem.clone(), Box::new(device), listener)?;
    debug_assert_eq!(plugged, bdf, "the device went where next_bdf said");
    if let (Some(viommu), Some(bridge)) = (viommu, bridge) {
        let iommu_err = |source| VhostUserSetupError::Iommu {
            socket: cfg.socket.clone(),
            source,
        };
        bridge.set_poll_window(Duration::from_micros(cfg.poll_us));
        let maps = policy == IotlbPolicyConfig::Prefetch;
        viommu.attach(bdf, bridge, maps).map_err(iommu_err)?;
    }
    log::info!("vhost-user: {:?} {:?} at {bdf}", cfg.kind, cfg.socket);
    Ok(VhostUserInfo {
        socket: cfg.socket.clone(),
        server: cfg.server,
        bdf,
        iommu: cfg.iommu,
        stats,
        bridge: audited,
    })
}

impl From<VhostUserSetupError> for DeviceManagerError {
    fn from(e: VhostUserSetupError) -> Self {
        DeviceManagerError::VhostUser(Box::new(e))
    }
}

/// The listener of a function's ATS Enable bit: the vIOMMU follows it
/// (VT-d switches the function's consumers between IOTLB and device-TLB
/// unmaps); without a vIOMMU the bit changes nothing.
fn ats_listener(seam: Option<Arc<dyn ViommuSeam>>, rid: RequesterId) -> AtsListener {
    Arc::new(move |on: bool| {
        if let Some(v) = &seam {
            v.set_ats_enabled(rid, on);
        }
    })
}

/// The bridge type registered as an IOMMU notifier consumer.
pub type Consumer = Arc<devices::vhost_user::IotlbBridge>;

#[cfg(test)]
mod tests {
    use super::*;
    use devices::vhost_user::stats::BridgeStats;

    #[test]
    fn counters_json_prints_every_bridge_counter() {
        let stats = VhostUserStats {
            bridge: BridgeStats {
                invalidations_unchanged: 3,
                ring_invalidations: 5,
                ring_updates: 7,
                rings_unmapped: 11,
                stall_reports: 13,
                connect_invalidations: 17,
                ..Default::default()
            },
            ..Default::default()
        };
        let bdf = PciBdf::new(0, 0, 3, 0);
        let v = counters_json(std::path::Path::new("/tmp/vu.sock"), bdf, true, &stats);
        for (key, want) in [
            ("invalidations_unchanged", 3),
            ("ring_invalidations", 5),
            ("ring_updates", 7),
            ("rings_unmapped", 11),
            ("stall_reports", 13),
            ("connect_invalidations", 17),
            ("invalidations_acked", 0),
        ] {
            assert_eq!(v[key].as_u64(), Some(want), "{key} in {v}");
        }
        assert_eq!(v["socket"].as_str(), Some("/tmp/vu.sock"));
        assert_eq!(v["iommu"].as_bool(), Some(true));
    }
}
