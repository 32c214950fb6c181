//! Prometheus metrics of the node plugin. Every label value is a bounded `&'static str`
//! (an outcome or an error kind): never a volume, pod or secret name, never error text.

use std::time::Duration;

use hsm_secrets_csi::observer::{OUTCOME_KEPT_LAST_GOOD, OUTCOME_OK};
use hsm_secrets_csi::{Error as CsiError, NodeObserver, PublishRequest};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishLabels {
    /// `publish` (first mount) or `republish` (kubelet's periodic refresh).
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~8 s: a publish is a few HSM reads and a tmpfs mount.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// Handles to the node plugin's metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct NodeMetrics {
    publishes: Family<PublishLabels, Counter>,
    unpublishes: Family<OutcomeLabels, Counter>,
    duration: Family<OperationLabels, Histogram, fn() -> Histogram>,
    kept_last_good: Family<KindLabels, Counter>,
    volume_errors: Family<KindLabels, Counter>,
    remote_fallbacks: Family<KindLabels, Counter>,
    token_open_failures: Family<KindLabels, Counter>,
    device_ready: Gauge,
}

impl NodeMetrics {
    /// Registers, in `registry`:
    /// `hsm_secrets_node_publishes_total{operation,outcome}`,
    /// `hsm_secrets_node_unpublishes_total{outcome}`,
    /// `hsm_secrets_node_operation_duration_seconds{operation}`,
    /// `hsm_secrets_node_republish_kept_last_good_total{kind}`,
    /// `hsm_secrets_node_volume_errors_total{kind}`,
    /// `hsm_secrets_node_remote_fallback_reads_total{kind}`,
    /// `hsm_secrets_node_token_open_failures_total{kind}` and
    /// `hsm_secrets_node_device_ready`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            publishes: Family::default(),
            unpublishes: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            kept_last_good: Family::default(),
            volume_errors: Family::default(),
            remote_fallbacks: Family::default(),
            token_open_failures: Family::default(),
            device_ready: Gauge::default(),
        };
        registry.register(
            "hsm_secrets_node_publishes",
            "NodePublishVolume calls by operation (publish, republish) and outcome (ok, \
             kept_last_good or an error kind)",
            metrics.publishes.clone(),
        );
        registry.register(
            "hsm_secrets_node_unpublishes",
            "NodeUnpublishVolume calls by outcome",
            metrics.unpublishes.clone(),
        );
        registry.register_with_unit(
            "hsm_secrets_node_operation_duration",
            "Time to answer a CSI volume call, by operation",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "hsm_secrets_node_republish_kept_last_good",
            "Republishes that failed and kept the volume's last good content, by error kind",
            metrics.kept_last_good.clone(),
        );
        registry.register(
            "hsm_secrets_node_volume_errors",
            "Volumes the HSM source refused or could not fill, by error kind",
            metrics.volume_errors.clone(),
        );
        registry.register(
            "hsm_secrets_node_remote_fallback_reads",
            "Volumes of this node's own device read through its agents because the local \
             token could not serve, by why (an error kind)",
            metrics.remote_fallbacks.clone(),
        );
        registry.register(
            "hsm_secrets_node_token_open_failures",
            "Failed attempts to open this node's token, by why (pin_incorrect: the token \
             refused the PIN; pin_refused: the PIN file still holds a refused PIN, so no \
             login was tried)",
            metrics.token_open_failures.clone(),
        );
        registry.register(
            "hsm_secrets_node_device_ready",
            "1 when this node's HSM answered its last health check, else 0",
            metrics.device_ready.clone(),
        );
        // Series that dashboards and alerts rate() exist from the start.
        for operation in ["publish", "republish"] {
            metrics.publishes.get_or_create_owned(&PublishLabels {
                operation,
                outcome: OUTCOME_OK,
            });
        }
        metrics.publishes.get_or_create_owned(&PublishLabels {
            operation: "republish",
            outcome: OUTCOME_KEPT_LAST_GOOD,
        });
        metrics.unpublishes.get_or_create_owned(&OutcomeLabels {
            outcome: OUTCOME_OK,
        });
        for operation in ["publish", "republish", "unpublish"] {
            metrics
                .duration
                .get_or_create_owned(&OperationLabels { operation });
        }
        metrics
    }

    /// Counts a failed attempt to open the token, by [`crate::hsm::StoreError::kind`].
    pub fn token_open_failed(&self, kind: &'static str) {
        self.token_open_failures
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Counts a volume the source refused or failed, by [`super::VolumeError::kind`].
    pub fn volume_error(&self, kind: &'static str) {
        self.volume_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// Counts a volume of the node's own device read remotely, by why the token could
    /// not serve it ([`super::VolumeError::kind`]).
    pub fn remote_fallback(&self, kind: &'static str) {
        self.remote_fallbacks
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn set_device_ready(&self, ready: bool) {
        self.device_ready.set(i64::from(ready));
    }
}

fn operation(republish: bool) -> &'static str {
    if republish { "republish" } else { "publish" }
}

impl NodeObserver for NodeMetrics {
    fn publish(&self, outcome: &'static str, republish: bool, elapsed: Duration) {
        let operation = operation(republish);
        self.publishes
            .get_or_create(&PublishLabels { operation, outcome })
            .inc();
        self.duration
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }

    fn unpublish(&self, outcome: &'static str, elapsed: Duration) {
        self.unpublishes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.duration
            .get_or_create(&OperationLabels {
                operation: "unpublish",
            })
            .observe(elapsed.as_secs_f64());
    }

    fn republish_kept_last_good(&self, _request: &PublishRequest, error: &CsiError) {
        self.kept_last_good
            .get_or_create(&KindLabels { kind: error.kind() })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_from_the_start_and_count() {
        let mut registry = Registry::default();
        let metrics = NodeMetrics::register(&mut registry);
        let before = crate::telemetry::encode_metrics(&registry);
        for line in [
            r#"hsm_secrets_node_publishes_total{operation="publish",outcome="ok"} 0"#,
            r#"hsm_secrets_node_publishes_total{operation="republish",outcome="kept_last_good"} 0"#,
            r#"hsm_secrets_node_unpublishes_total{outcome="ok"} 0"#,
            r#"hsm_secrets_node_operation_duration_seconds_count{operation="unpublish"} 0"#,
            "hsm_secrets_node_device_ready 0",
        ] {
            assert!(before.contains(line), "{line} missing in:\n{before}");
        }
        metrics.publish("source_unavailable", false, Duration::from_millis(3));
        metrics.publish(OUTCOME_OK, true, Duration::from_millis(1));
        metrics.unpublish(OUTCOME_OK, Duration::from_millis(1));
        metrics.volume_error("store_device_unavailable");
        metrics.set_device_ready(true);
        let after = crate::telemetry::encode_metrics(&registry);
        for line in [
            r#"hsm_secrets_node_publishes_total{operation="publish",outcome="source_unavailable"} 1"#,
            r#"hsm_secrets_node_publishes_total{operation="republish",outcome="ok"} 1"#,
            r#"hsm_secrets_node_unpublishes_total{outcome="ok"} 1"#,
            r#"hsm_secrets_node_operation_duration_seconds_count{operation="publish"} 1"#,
            r#"hsm_secrets_node_volume_errors_total{kind="store_device_unavailable"} 1"#,
            "hsm_secrets_node_device_ready 1",
        ] {
            assert!(after.contains(line), "{line} missing in:\n{after}");
        }
    }
}
