//! Prometheus metrics of the webhook, registered into a registry the
//! embedding program shares so one `/metrics` shows everything.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Which endpoint a review came through.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReviewOperation {
    Mutate,
    Validate,
}

impl ReviewOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewOperation::Mutate => "mutate",
            ReviewOperation::Validate => "validate",
        }
    }
}

/// How a review ended: decided either way, or not decided at all (bad
/// envelope, deadline, failing rules).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReviewResult {
    Allowed,
    Denied,
    Error,
}

impl ReviewResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewResult::Allowed => "allowed",
            ReviewResult::Denied => "denied",
            ReviewResult::Error => "error",
        }
    }
}

/// Outcome of reading a changed certificate pair.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReloadResult {
    Reloaded,
    Rejected,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Reloaded => "reloaded",
            ReloadResult::Rejected => "rejected",
        }
    }
}

macro_rules! label_value_from_as_str {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}
label_value_from_as_str!(ReviewOperation, ReviewResult, ReloadResult);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    operation: ReviewOperation,
    result: ReviewResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: ReviewOperation,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~4 s: reviews are fast unless the rules wait on the API or an HSM.
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// Handles to the webhook's metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics {
    admissions: Family<AdmissionLabels, Counter>,
    latency: Family<OperationLabels, Histogram, fn() -> Histogram>,
    certificate_reloads: Family<ReloadLabels, Counter>,
}

impl Metrics {
    /// Register the webhook metrics in `registry`:
    /// `hsm_secrets_webhook_admissions_total{operation,result}`,
    /// `hsm_secrets_webhook_admission_duration_seconds{operation}` and
    /// `hsm_secrets_webhook_certificate_reloads_total{result}`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            admissions: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            certificate_reloads: Family::default(),
        };
        registry.register(
            "hsm_secrets_webhook_admissions",
            "Admission reviews answered, by operation and result",
            metrics.admissions.clone(),
        );
        registry.register_with_unit(
            "hsm_secrets_webhook_admission_duration",
            "Time from receiving an admission review to answering it",
            Unit::Seconds,
            metrics.latency.clone(),
        );
        registry.register(
            "hsm_secrets_webhook_certificate_reloads",
            "Changed serving certificate pairs seen on disk, by whether they were taken",
            metrics.certificate_reloads.clone(),
        );
        // Create every series up front so rates and alerts see zeros, not gaps.
        for operation in [ReviewOperation::Mutate, ReviewOperation::Validate] {
            for result in [
                ReviewResult::Allowed,
                ReviewResult::Denied,
                ReviewResult::Error,
            ] {
                metrics
                    .admissions
                    .get_or_create_owned(&AdmissionLabels { operation, result });
            }
            metrics
                .latency
                .get_or_create_owned(&OperationLabels { operation });
        }
        for result in [ReloadResult::Reloaded, ReloadResult::Rejected] {
            metrics
                .certificate_reloads
                .get_or_create_owned(&ReloadLabels { result });
        }
        metrics
    }

    pub fn observe_review(
        &self,
        operation: ReviewOperation,
        result: ReviewResult,
        elapsed: Duration,
    ) {
        self.admissions
            .get_or_create(&AdmissionLabels { operation, result })
            .inc();
        self.latency
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }

    pub fn observe_reload(&self, result: ReloadResult) {
        self.certificate_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }
}

/// Render `registry` in the OpenMetrics text format served on `/metrics`.
pub fn encode_text(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; an error here would be a bug in a metric.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(%error, "cannot encode metrics");
    }
    text
}

/// Content type of [`encode_text`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_before_the_first_review_and_count_after() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let before = encode_text(&registry);
        assert!(
            before.contains(
                r#"hsm_secrets_webhook_admissions_total{operation="validate",result="error"} 0"#
            ),
            "{before}"
        );
        metrics.observe_review(
            ReviewOperation::Mutate,
            ReviewResult::Denied,
            Duration::from_millis(2),
        );
        let after = encode_text(&registry);
        assert!(
            after.contains(
                r#"hsm_secrets_webhook_admissions_total{operation="mutate",result="denied"} 1"#
            ),
            "{after}"
        );
        assert!(
            after.contains(
                r#"hsm_secrets_webhook_admission_duration_seconds_count{operation="mutate"} 1"#
            ),
            "{after}"
        );
    }
}
