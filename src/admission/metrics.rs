//! Domain metrics of the admission rules, registered next to the webhook
//! crate's own so one `/metrics` shows both.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which rule decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Mutation of annotated pods.
    PodInjection,
    /// Validation of pods that mount the CSI driver.
    PodVolume,
    HsmSecret,
    HsmDevice,
    /// A kind or subresource these rules do not handle (allowed).
    Other,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::PodInjection => "pod_injection",
            Rule::PodVolume => "pod_volume",
            Rule::HsmSecret => "hsmsecret",
            Rule::HsmDevice => "hsmdevice",
            Rule::Other => "other",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    rule: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Handles to the admission metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct AdmissionMetrics {
    verdicts: Family<VerdictLabels, Counter>,
    bootstrap_leader: Gauge,
    bootstrap_passes: Family<OutcomeLabels, Counter>,
}

impl AdmissionMetrics {
    /// Register `hsm_secrets_admission_verdicts_total{rule,reason}`,
    /// `hsm_secrets_webhook_bootstrap_leader` and
    /// `hsm_secrets_webhook_bootstrap_passes_total{outcome}`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = AdmissionMetrics {
            verdicts: Family::default(),
            bootstrap_leader: Gauge::default(),
            bootstrap_passes: Family::default(),
        };
        registry.register(
            "hsm_secrets_admission_verdicts",
            "Admission decisions of the hsm-secrets rules (dry runs excluded), by rule and reason",
            metrics.verdicts.clone(),
        );
        registry.register(
            "hsm_secrets_webhook_bootstrap_leader",
            "1 while this replica holds the certificate bootstrap lease",
            metrics.bootstrap_leader.clone(),
        );
        registry.register(
            "hsm_secrets_webhook_bootstrap_passes",
            "Certificate bootstrap passes by the lease holder, by outcome",
            metrics.bootstrap_passes.clone(),
        );
        metrics
    }

    /// Count one decision. `reason` must come from a bounded set (an error
    /// `kind()` or a fixed string), never from user input.
    pub fn observe(&self, rule: Rule, reason: &'static str) {
        self.verdicts
            .get_or_create(&VerdictLabels {
                rule: rule.as_str(),
                reason,
            })
            .inc();
    }

    /// How many decisions of `rule` with `reason` were counted (for tests).
    pub fn count(&self, rule: Rule, reason: &'static str) -> u64 {
        self.verdicts
            .get_or_create(&VerdictLabels {
                rule: rule.as_str(),
                reason,
            })
            .get()
    }

    pub fn set_leader(&self, leader: bool) {
        self.bootstrap_leader.set(i64::from(leader));
    }

    pub fn observe_bootstrap(&self, outcome: &'static str) {
        self.bootstrap_passes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}
