//! Controller metrics. Label values are device and node names (bounded by the cluster's
//! configuration) and error kinds, never error text.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// What the control loop last did, for `/healthz` and `/readyz`.
#[derive(Clone, Debug)]
pub struct LoopState {
    /// When the loop last went round (start-up counts as one, so a slow first Lease call
    /// is not a dead loop).
    pub last_tick: Instant,
    /// Whether the loop went round at least once.
    pub ticked: bool,
    /// Whether the last round reached the Lease (its store answered, held or not).
    pub lease_reachable: bool,
    pub leading: bool,
}

impl Default for LoopState {
    fn default() -> Self {
        Self {
            last_tick: Instant::now(),
            ticked: false,
            lease_reachable: false,
            leading: false,
        }
    }
}

impl LoopState {
    /// Live while the loop went round within `stale_after`.
    pub fn is_live(&self, now: Instant, stale_after: Duration) -> bool {
        now.saturating_duration_since(self.last_tick) <= stale_after
    }

    /// Ready once a round reached the Lease: a standby replica is ready too (it takes
    /// over within the Lease duration); one that cannot reach its API is not.
    pub fn readiness(&self) -> Result<(), &'static str> {
        match (self.ticked, self.lease_reachable) {
            (false, _) => Err("the control loop has not run a round yet"),
            (true, false) => Err("the last round could not reach the controller Lease"),
            (true, true) => Ok(()),
        }
    }
}

#[derive(Default)]
struct Inner {
    loop_state: Mutex<LoopState>,
    leader: Gauge,
    last_round: Gauge,
    epoch: Family<DeviceLabel, Gauge>,
    ready: Family<DeviceLabel, Gauge>,
    failovers: Family<DeviceLabel, Gauge>,
    promotions: Family<DeviceLabel, Counter>,
    lost_writes: Family<DeviceLabel, Counter>,
    applied_sequence: Family<NodeLabel, Gauge>,
    sync_lag: Family<NodeLabel, Gauge>,
    probe_failures: Family<KindLabel, Counter>,
    backup_lag: Family<DeviceLabel, Gauge>,
    backup_sequence: Family<DeviceLabel, Gauge>,
    backup_verified: Family<DeviceLabel, Gauge>,
    backup_verified_at: Family<DeviceLabel, Gauge>,
    backup_drills: Family<DrillLabel, Counter>,
    site_lag: Family<DeviceLabel, Gauge>,
    site_passive: Family<DeviceLabel, Gauge>,
    site_fenced: Family<DeviceLabel, Gauge>,
    site_lost_writes: Family<DeviceLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DrillLabel {
    device: String,
    outcome: &'static str,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("hsm_secrets");
        r.register(
            "controller_leader",
            "1 while this replica holds the controller Lease",
            m.inner.leader.clone(),
        );
        r.register(
            "controller_last_round_timestamp_seconds",
            "Unix time of the control loop's last round",
            m.inner.last_round.clone(),
        );
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
        r.register(
            "device_backup_lag_seconds",
            "Seconds of acknowledged writes the archive does not hold (the RPO now)",
            m.inner.backup_lag.clone(),
        );
        r.register(
            "device_backup_archived_sequence",
            "Every change up to this sequence is durable in the archive",
            m.inner.backup_sequence.clone(),
        );
        r.register(
            "device_backup_verified",
            "1 while the last restore drill verified the archive",
            m.inner.backup_verified.clone(),
        );
        r.register(
            "device_backup_last_drill_timestamp_seconds",
            "Unix time the last restore drill finished",
            m.inner.backup_verified_at.clone(),
        );
        r.register(
            "device_site_lag_seconds",
            "Passive site: seconds behind the active site's archive",
            m.inner.site_lag.clone(),
        );
        r.register(
            "device_site_passive",
            "1 while this site is passive (follows another site's archive)",
            m.inner.site_passive.clone(),
        );
        r.register(
            "device_site_fenced",
            "1 while another site was promoted over this one",
            m.inner.site_fenced.clone(),
        );
        r.register(
            "device_site_lost_writes",
            "Fenced site: writes it took after the fence point (never merged)",
            m.inner.site_lost_writes.clone(),
        );
        r.register(
            "device_backup_drills",
            "Restore drills reported, by outcome (verified, failed)",
            m.inner.backup_drills.clone(),
        );
        m
    }

    /// The archive's figures after a round; `new_drill` when this round saw a drill end.
    pub(super) fn observe_backup(
        &self,
        device: &str,
        backup: &crate::crd::BackupStatus,
        lag_seconds: Option<i64>,
        new_drill: bool,
    ) {
        let d = DeviceLabel {
            device: device.into(),
        };
        if let Some(lag) = lag_seconds {
            self.inner.backup_lag.get_or_create(&d).set(lag);
        }
        self.inner
            .backup_sequence
            .get_or_create(&d)
            .set(backup.archived_sequence as i64);
        if let Some(drill) = &backup.last_verified {
            self.inner
                .backup_verified
                .get_or_create(&d)
                .set(i64::from(drill.verified));
            self.inner
                .backup_verified_at
                .get_or_create(&d)
                .set(drill.finished_at.0.as_second());
            if new_drill {
                let outcome = if drill.verified { "verified" } else { "failed" };
                self.inner
                    .backup_drills
                    .get_or_create(&DrillLabel {
                        device: device.into(),
                        outcome,
                    })
                    .inc();
            }
        }
    }

    /// The site's figures after a round.
    pub(super) fn observe_site(&self, device: &str, site: &crate::crd::SiteStatus, lag_ms: u64) {
        let d = DeviceLabel {
            device: device.into(),
        };
        let passive = site.role == crate::crd::SiteRole::Passive;
        let fenced = site.role == crate::crd::SiteRole::Fenced;
        self.inner
            .site_passive
            .get_or_create(&d)
            .set(i64::from(passive));
        self.inner
            .site_fenced
            .get_or_create(&d)
            .set(i64::from(fenced));
        self.inner
            .site_lag
            .get_or_create(&d)
            .set(if passive { (lag_ms / 1000) as i64 } else { 0 });
        self.inner
            .site_lost_writes
            .get_or_create(&d)
            .set(site.lost_writes.unwrap_or(0) as i64);
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

    /// The loop went round: `lease` is whether this replica holds the Lease, or None when
    /// the Lease could not be reached.
    pub(super) fn round(&self, lease: Option<bool>) {
        let leading = lease == Some(true);
        self.inner.leader.set(i64::from(leading));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.inner.last_round.set(now);
        let mut state = self
            .inner
            .loop_state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *state = LoopState {
            last_tick: Instant::now(),
            ticked: true,
            lease_reachable: lease.is_some(),
            leading,
        };
    }

    /// What the control loop last did.
    pub fn loop_state(&self) -> LoopState {
        self.inner
            .loop_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
