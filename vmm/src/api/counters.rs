//! Per-device counters as the API reports them.
//!
//! Each vhost-user device is one flat JSON object: everything
//! [`VhostUserInfo::counters_json`] prints (IOTLB messages, misses, invalidations, miss and
//! invalidate p50/p99 latency, reconnects) plus the sample count, mean and maximum of both
//! latencies, the ack round trips and the link state, which [`VhostUserStats`] has but that line
//! leaves out. The latency histograms' buckets are not exported by the device crate, so the API
//! reports these summaries rather than the buckets.

use serde_json::{Map, Value};

use crate::device_manager::vhost_user::VhostUserInfo;
use crate::VhostUserStats;

/// The fields [`VhostUserInfo::counters_json`] does not have.
fn extras(s: &VhostUserStats) -> Map<String, Value> {
    let (m, i, r) = (
        s.bridge.miss_latency,
        s.bridge.invalidate_latency,
        s.reconnect,
    );
    let pairs: [(&str, Value); 13] = [
        ("miss_count", m.count.into()),
        ("miss_mean_ns", m.mean_ns.into()),
        ("miss_max_ns", m.max_ns.into()),
        ("invalidate_count", i.count.into()),
        ("invalidate_mean_ns", i.mean_ns.into()),
        ("invalidate_max_ns", i.max_ns.into()),
        ("iotlb_acked", s.iotlb.acked.into()),
        ("iotlb_rtt_max_ns", s.iotlb.rtt_max_ns.into()),
        ("reconnect_enabled", r.enabled.into()),
        ("connected", link_up(s).into()),
        ("disconnects", r.disconnects.into()),
        ("reconnect_attempts", r.attempts.into()),
        ("restores", r.restores.into()),
    ];
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Whether the back end is connected: with reconnection, what the supervisor saw last;
/// without it, until the device found the back end gone.
fn link_up(s: &VhostUserStats) -> bool {
    if s.reconnect.enabled {
        s.reconnect.connected
    } else {
        !s.broken
    }
}

/// Device `index`'s counters: [`VhostUserInfo::counters_json`] plus the extra fields (module docs) and `device`.
pub fn device_counters(index: usize, info: &VhostUserInfo) -> Value {
    merge(index, info.counters_json(), &info.stats())
}

fn merge(index: usize, base: Value, stats: &VhostUserStats) -> Value {
    let mut obj = match base {
        Value::Object(m) => m,
        other => {
            let mut m = Map::new();
            m.insert("counters".into(), other);
            m
        }
    };
    obj.insert("device".into(), index.into());
    for (k, v) in extras(stats) {
        obj.entry(k).or_insert(v);
    }
    Value::Object(obj)
}

/// Every device's counters, in PCI order.
pub fn all_devices(devices: &[VhostUserInfo]) -> Vec<Value> {
    devices
        .iter()
        .enumerate()
        .map(|(i, d)| device_counters(i, d))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use devices::vhost_user::stats::{BridgeStats, LatencySummary};

    #[test]
    fn extras_add_latency_summaries_and_link_state_without_overwriting() {
        let stats = VhostUserStats {
            bridge: BridgeStats {
                miss_latency: LatencySummary {
                    count: 4,
                    mean_ns: 1500,
                    p50_ns: 1000,
                    p99_ns: 4000,
                    max_ns: 3900,
                },
                ..Default::default()
            },
            broken: true,
            ..Default::default()
        };
        let base = serde_json::json!({"misses": 4, "miss_p50_ns": 1000, "connected": "kept"});
        let v = merge(2, base, &stats);
        assert_eq!(v["device"], 2);
        assert_eq!(v["misses"], 4);
        assert_eq!(v["miss_count"], 4);
        assert_eq!(v["miss_max_ns"], 3900);
        assert_eq!(v["connected"], "kept", "the base object wins");
        let v = merge(0, serde_json::json!({}), &stats);
        assert_eq!(v["connected"], false, "broken without reconnection is down");
        assert_eq!(v["reconnect_enabled"], false);
    }

    #[test]
    fn reconnecting_devices_report_the_supervisors_view() {
        let mut s = VhostUserStats::default();
        s.reconnect.enabled = true;
        s.broken = false;
        assert!(!link_up(&s), "not connected yet");
        s.reconnect.connected = true;
        assert!(link_up(&s));
    }
}
