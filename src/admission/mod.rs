//! The admission rules of hsm-secrets (DESIGN §5 and §6), plugged into the
//! `hsm-secrets-webhook` server through [`AdmissionRules`].
//!
//! - `/mutate`: pods annotated `hsmsecrets.io/inject: "true"` get the HSM
//!   secrets volume ([`crate::inject`]).
//! - `/validate`: imports into a device without a writable primary, HSMDevice
//!   specs that cannot work, and pods mounting the driver writable are denied.
//!
//! Decisions read an [`AdmissionState`] (informer caches in production,
//! [`MemoryState`] in tests) and make no API call. [`bootstrap`] issues the
//! serving certificate when no cert-manager does.

pub mod bootstrap;
pub mod certificates;
mod device;
mod file_state;
mod metrics;
mod pod;
mod secret;
mod state;

pub use device::{spec_problems as device_spec_problems, token_conflicts};
pub use file_state::FileAdmissionState;
pub use metrics::{AdmissionMetrics, Rule};
pub use secret::{WriteBlock, write_block, writes_into_hsm};
pub use state::{AdmissionState, MemoryState, ReflectorState};

use hsm_secrets_webhook::{AdmissionRequest, AdmissionRules, Decision, DynamicObject};
use k8s_openapi::jiff::Timestamp;
use prometheus_client::registry::Registry;

use crate::crd::GROUP;
use crate::inject::InjectError;

/// A decision with the bounded reason it is counted under.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    pub reason: &'static str,
}

impl Verdict {
    fn allow(reason: &'static str) -> Self {
        Verdict {
            decision: Decision::allow(),
            reason,
        }
    }

    fn deny(code: u16, reason: &'static str, message: String) -> Self {
        Verdict {
            decision: Decision::deny(code, message),
            reason,
        }
    }

    fn refuse(error: &InjectError) -> Self {
        Verdict::deny(error.http_status(), error.kind(), error.to_string())
    }

    fn with_warning(mut self, warning: impl Into<String>) -> Self {
        self.decision = self.decision.with_warning(warning);
        self
    }
}

/// The hsm-secrets admission rules over some cluster state.
pub struct Rules<S> {
    state: S,
    metrics: AdmissionMetrics,
}

impl<S: AdmissionState> Rules<S> {
    /// Rules reading `state`, with their metrics registered in `registry`
    /// (pass the same registry to `WebhookState::new`).
    pub fn new(state: S, registry: &mut Registry) -> Self {
        Rules {
            state,
            metrics: AdmissionMetrics::register(registry),
        }
    }

    /// Rules sharing already-registered metrics (e.g. with the bootstrap).
    pub fn with_metrics(state: S, metrics: AdmissionMetrics) -> Self {
        Rules { state, metrics }
    }

    pub fn metrics(&self) -> &AdmissionMetrics {
        &self.metrics
    }

    pub fn state(&self) -> &S {
        &self.state
    }

    /// The `/mutate` decision, with the rule that made it.
    pub fn decide_mutation(&self, request: &AdmissionRequest<DynamicObject>) -> (Rule, Verdict) {
        match kind_of(request) {
            Kind::Pod => (Rule::PodInjection, pod::mutate(request, &self.state)),
            _ => (Rule::Other, Verdict::allow("not_handled")),
        }
    }

    /// The `/validate` decision, with the rule that made it.
    pub fn decide_validation(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        now: Timestamp,
    ) -> (Rule, Verdict) {
        match kind_of(request) {
            Kind::Pod => (Rule::PodVolume, pod::validate(request)),
            Kind::HsmSecret => (Rule::HsmSecret, secret::validate(request, &self.state, now)),
            Kind::HsmDevice => (Rule::HsmDevice, device::validate(request, &self.state)),
            Kind::Other => (Rule::Other, Verdict::allow("not_handled")),
        }
    }

    fn finish(
        &self,
        request: &AdmissionRequest<DynamicObject>,
        rule: Rule,
        verdict: Verdict,
    ) -> Decision {
        if rule == Rule::Other {
            tracing::warn!(
                kind = %request.kind.kind,
                group = %request.kind.group,
                "review for a kind these rules do not handle; allowed (check the webhook configuration's rules)"
            );
        }
        // Dry runs leave no trace beyond the server's own review counter.
        if !request.dry_run {
            self.metrics.observe(rule, verdict.reason);
        }
        tracing::debug!(rule = rule.as_str(), reason = verdict.reason, "decided");
        verdict.decision
    }
}

#[async_trait::async_trait]
impl<S: AdmissionState> AdmissionRules for Rules<S> {
    async fn mutate(&self, request: &AdmissionRequest<DynamicObject>) -> Decision {
        let (rule, verdict) = self.decide_mutation(request);
        self.finish(request, rule, verdict)
    }

    async fn validate(&self, request: &AdmissionRequest<DynamicObject>) -> Decision {
        let (rule, verdict) = self.decide_validation(request, Timestamp::now());
        self.finish(request, rule, verdict)
    }

    fn ready(&self) -> bool {
        self.state.is_synced()
    }
}

enum Kind {
    Pod,
    HsmSecret,
    HsmDevice,
    Other,
}

fn kind_of(request: &AdmissionRequest<DynamicObject>) -> Kind {
    match (request.kind.group.as_str(), request.kind.kind.as_str()) {
        ("", "Pod") => Kind::Pod,
        (GROUP, "HSMSecret") => Kind::HsmSecret,
        (GROUP, "HSMDevice") => Kind::HsmDevice,
        _ => Kind::Other,
    }
}
