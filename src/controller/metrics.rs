//! Controller metrics. Label values are device and node names (bounded by the cluster's
//! configuration) and error kinds, never error text.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::crd::{DevicePhase, HSMDeviceStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabel {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    device: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Default)]
pub struct ControllerMetrics {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    epoch: Family<DeviceLabel, Gauge>,
    ready: Family<DeviceLabel, Gauge>,
    failovers: Family<DeviceLabel, Gauge>,
    promotions: Family<DeviceLabel, Counter>,
    lost_writes: Family<DeviceLabel, Counter>,
    applied_sequence: Family<NodeLabel, Gauge>,
    sync_lag: Family<NodeLabel, Gauge>,
    probe_failures: Family<KindLabel, Counter>,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("hsm_secrets");
        r.register(
            "device_epoch",
            "Fencing epoch of each device",
            m.inner.epoch.clone(),
        );
        r.register(
            "device_ready",
            "1 while the device has a writable primary",
            m.inner.ready.clone(),
        );
        r.register(
            "device_failover_count",
            "Failovers and switchovers recorded in status",
            m.inner.failovers.clone(),
        );
        r.register(
            "device_promotions",
            "Promotions executed by this controller",
            m.inner.promotions.clone(),
        );
        r.register(
            "device_lost_writes",
            "Changes an old primary held that its successor never received",
            m.inner.lost_writes.clone(),
        );
        r.register(
            "node_applied_sequence",
            "Highest change sequence applied per node",
            m.inner.applied_sequence.clone(),
        );
        r.register(
            "node_sync_lag_seconds",
            "Seconds since each mirror last synchronized",
            m.inner.sync_lag.clone(),
        );
        r.register(
            "agent_probe_failures",
            "Failed agent probes by kind",
            m.inner.probe_failures.clone(),
        );
        m
    }

    pub(super) fn observe_status(&self, device: &str, status: &HSMDeviceStatus) {
        let d = DeviceLabel {
            device: device.into(),
        };
        self.inner.epoch.get_or_create(&d).set(status.epoch as i64);
        let ready = matches!(status.phase, DevicePhase::Ready | DevicePhase::Degraded);
        self.inner.ready.get_or_create(&d).set(i64::from(ready));
        self.inner
            .failovers
            .get_or_create(&d)
            .set(status.failover_count as i64);
        for n in &status.nodes {
            let l = NodeLabel {
                device: device.into(),
                node: n.node.clone(),
            };
            self.inner
                .applied_sequence
                .get_or_create(&l)
                .set(n.applied_sequence as i64);
            if let Some(lag) = n.sync_lag_seconds {
                self.inner.sync_lag.get_or_create(&l).set(lag);
            }
        }
    }

    pub(super) fn probe_failed(&self, kind: &str) {
        self.inner
            .probe_failures
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    pub(super) fn promoted(&self, device: &str) {
        self.inner
            .promotions
            .get_or_create(&DeviceLabel {
                device: device.into(),
            })
            .inc();
    }

    pub(super) fn lost_writes(&self, device: &str, count: u64) {
        self.inner
            .lost_writes
            .get_or_create(&DeviceLabel {
                device: device.into(),
            })
            .inc_by(count);
    }
}
