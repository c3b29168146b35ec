//! Counters of a vhost-net device, in the vhost-user stats model: the same
//! [`IotlbStatsSnapshot`] (messages written to the vhost fd) and
//! [`BridgeStats`] (misses, faults, invalidations), plus the IOTLB thread's
//! own counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use iommu::sync::lock;

use super::channel::VhostFdChannel;
use super::server::{ServerCounters, ServerStats};
use crate::vhost_user::channel::IotlbStatsSnapshot;
use crate::vhost_user::stats::BridgeStats;
use crate::vhost_user::IotlbBridge;

/// Device-wide counters that outlive activations.
#[derive(Debug, Default)]
pub(crate) struct DeviceCounters {
    activations: AtomicU64,
    /// Stopping the rings failed.
    pub(crate) broken: AtomicBool,
    kernel_features: u64,
    backend_features: u64,
}

impl DeviceCounters {
    pub(crate) fn new(kernel_features: u64, backend_features: u64) -> Self {
        DeviceCounters {
            kernel_features,
            backend_features,
            ..Default::default()
        }
    }

    pub(crate) fn activated(&self) {
        self.activations.fetch_add(1, Ordering::Relaxed);
    }
}

/// A vhost-net device's counters at one point in time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VhostNetStats {
    /// UPDATE / INVALIDATE messages written to the vhost fd (each applied
    /// by the kernel when its write returned: `acked` counts them).
    pub iotlb: IotlbStatsSnapshot,
    /// The IOTLB bridge's counters (misses, faults, invalidations, ...).
    pub bridge: BridgeStats,
    /// The IOTLB thread's counters (messages read, malformed, unexpected).
    pub server: ServerStats,
    /// Successful activations.
    pub activations: u64,
    /// The device cannot run again.
    pub broken: bool,
    /// Why the IOTLB thread stopped on its own, if it did.
    pub iotlb_failure: Option<String>,
    /// `VHOST_GET_FEATURES`.
    pub kernel_features: u64,
    /// The backend features acked (`VHOST_SET_BACKEND_FEATURES`).
    pub backend_features: u64,
}

type IotlbParts = (
    Arc<VhostFdChannel>,
    Arc<IotlbBridge>,
    Arc<ServerCounters>,
    Arc<Mutex<Option<String>>>,
);

/// Reads a device's counters after the device moved into the transport.
#[derive(Clone)]
pub struct VhostNetStatsHandle {
    counters: Arc<DeviceCounters>,
    iotlb: Option<IotlbParts>,
}

impl std::fmt::Debug for VhostNetStatsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostNetStatsHandle")
            .field("iommu", &self.iotlb.is_some())
            .finish_non_exhaustive()
    }
}

impl VhostNetStatsHandle {
    pub(crate) fn new(counters: Arc<DeviceCounters>, iotlb: Option<IotlbParts>) -> Self {
        VhostNetStatsHandle { counters, iotlb }
    }

    /// The IOTLB bridge (behind a vIOMMU), for the stale-translation audit.
    pub fn bridge(&self) -> Option<Arc<IotlbBridge>> {
        self.iotlb.as_ref().map(|i| i.1.clone())
    }

    /// The current counters.
    pub fn snapshot(&self) -> VhostNetStats {
        let c = &self.counters;
        let mut s = VhostNetStats {
            activations: c.activations.load(Ordering::Relaxed),
            broken: c.broken.load(Ordering::Relaxed),
            kernel_features: c.kernel_features,
            backend_features: c.backend_features,
            ..Default::default()
        };
        if let Some((channel, bridge, server, failure)) = &self.iotlb {
            s.iotlb = channel.stats();
            s.bridge = bridge.stats();
            s.server = server.snapshot();
            s.iotlb_failure = lock(failure).clone();
            s.broken |= channel.is_dropped() || s.iotlb_failure.is_some();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_without_a_viommu_reports_its_features_and_activations() {
        let c = Arc::new(DeviceCounters::new(0x1_0000_8000, 0x2));
        c.activated();
        c.activated();
        let s = VhostNetStatsHandle::new(c, None).snapshot();
        assert_eq!(
            (
                s.activations,
                s.kernel_features,
                s.backend_features,
                s.broken
            ),
            (2, 0x1_0000_8000, 0x2, false)
        );
        assert_eq!(s.bridge, BridgeStats::default());
    }
}
