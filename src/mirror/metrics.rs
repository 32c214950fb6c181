//! Prometheus metrics of a device agent, and its `/metrics`, `/healthz`, `/readyz`.
//!
//! State (role, epoch, sequences, sync counters, refusals, HSM errors) is read from the
//! agent at scrape time; RPC latency is a histogram the gRPC service observes. Every
//! label value is bounded: a role, an error kind, an RPC method or a gRPC code, never a
//! node, path or error text.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::agent::Agent;
use crate::crd::DeviceRole;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

fn rpc_histogram() -> Histogram {
    // 0.1 ms .. ~3 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
}

/// Latency of the agent's RPCs by method and gRPC code. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RpcMetrics(Family<RpcLabels, Histogram, fn() -> Histogram>);

impl Default for RpcMetrics {
    fn default() -> Self {
        Self(Family::new_with_constructor(rpc_histogram))
    }
}

impl RpcMetrics {
    pub(crate) fn observe(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        self.0
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .observe(elapsed.as_secs_f64());
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}

/// The agent's metrics in a registry; registered before the agent exists (the node
/// plugin opens its token in the background), attached once it runs.
#[derive(Clone)]
pub struct AgentMetrics {
    rpc: RpcMetrics,
    agent: Arc<OnceLock<Agent>>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl AgentMetrics {
    /// Registers every `hsm_secrets_agent_*` family in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            rpc: RpcMetrics::default(),
            agent: Arc::default(),
        };
        registry.register_with_unit(
            "hsm_secrets_agent_rpc_duration",
            "Time to answer an agent RPC, by method and gRPC code",
            Unit::Seconds,
            metrics.rpc.0.clone(),
        );
        registry.register_collector(Box::new(AgentCollector {
            agent: metrics.agent.clone(),
        }));
        metrics
    }

    /// What the agent's configuration carries so its service observes RPCs here.
    pub fn rpc(&self) -> RpcMetrics {
        self.rpc.clone()
    }

    /// Starts reporting `agent`'s state.
    pub fn attach(&self, agent: &Agent) {
        let _ = self.agent.set(agent.clone());
    }
}

struct AgentCollector {
    agent: Arc<OnceLock<Agent>>,
}

impl std::fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCollector").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: f64,
) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let m = e.encode_descriptor(name, help, unit, g.metric_type())?;
    g.encode(m)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    let m = e.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

impl Collector for AgentCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let Some(agent) = self.agent.get() else {
            return Ok(());
        };
        let snap = agent.snapshot();
        let sync = &snap.sync;
        gauge(
            &mut e,
            "hsm_secrets_agent_epoch",
            "The fencing epoch this agent holds",
            None,
            snap.epoch as f64,
        )?;
        let roles = [
            (DeviceRole::Primary, "primary"),
            (DeviceRole::ReadOnly, "read_only"),
            (DeviceRole::Standby, "standby"),
        ];
        let g = ConstGauge::new(0i64);
        let mut roles_m = e.encode_descriptor(
            "hsm_secrets_agent_role",
            "1 for the role this agent holds",
            None,
            g.metric_type(),
        )?;
        for (role, name) in roles {
            ConstGauge::new(i64::from(snap.role == role))
                .encode(roles_m.encode_family(&RoleLabel { role: name })?)?;
        }
        gauge(
            &mut e,
            "hsm_secrets_agent_applied_sequence",
            "Primary: its highest published change; mirror: every change up to this one applied",
            None,
            snap.applied_sequence as f64,
        )?;
        gauge(
            &mut e,
            "hsm_secrets_agent_write_lease_remaining",
            "Primary: time left on its write lease (0 when fenced or not primary)",
            Some(&Unit::Seconds),
            snap.lease_remaining.as_secs_f64(),
        )?;
        let mirror = snap.role != DeviceRole::Primary;
        let lag = if mirror {
            sync.primary_sequence
                .saturating_sub(sync.cursor.unwrap_or(0))
        } else {
            0
        };
        gauge(
            &mut e,
            "hsm_secrets_agent_sync_lag_sequence",
            "Mirror: changes of the primary (at the last pull) not yet applied here",
            None,
            lag as f64,
        )?;
        let lag_seconds = match (mirror, sync.last_sync) {
            (false, _) => Some(0.0),
            (true, Some(at)) => Some(
                SystemTime::now()
                    .duration_since(at)
                    .unwrap_or_default()
                    .as_secs_f64(),
            ),
            (true, None) => None,
        };
        let g = ConstGauge::new(0.0);
        let mut m = e.encode_descriptor(
            "hsm_secrets_agent_sync_lag",
            "Mirror: time since the last pull that reached the primary (absent until one did)",
            Some(&Unit::Seconds),
            g.metric_type(),
        )?;
        if let Some(v) = lag_seconds {
            ConstGauge::new(v).encode(m)?;
        }
        counter(
            &mut e,
            "hsm_secrets_agent_sync_pulls",
            "Pulls that reached the primary",
            sync.pulls,
        )?;
        counter(
            &mut e,
            "hsm_secrets_agent_sync_full_passes",
            "Completed full verification passes",
            sync.full_passes,
        )?;
        counter(
            &mut e,
            "hsm_secrets_agent_sync_repairs",
            "Records a verification pass replaced because the local copy was unreadable or corrupt",
            sync.repairs,
        )?;
        counter(
            &mut e,
            "hsm_secrets_agent_sync_records_applied",
            "Records applied from the primary",
            sync.records_applied,
        )?;
        counter(
            &mut e,
            "hsm_secrets_agent_gc_runs",
            "Garbage collections of the token (at start and every gc interval)",
            agent.stats().gc_runs,
        )?;
        counter(
            &mut e,
            "hsm_secrets_agent_gc_collected_objects",
            "Objects garbage collection removed: leftovers of interrupted writes and superseded metadata",
            agent.stats().gc_collected,
        )?;
        counter(
            &mut e,
            "hsm_secrets_agent_pushes_refused",
            "Records pushed to this mirror that it refused (out of sequence, or failing verification); each is logged and shown as the node's last error",
            agent.stats().pushes_refused,
        )?;
        counter(
            &mut e,
            "hsm_secrets_agent_checksum_failures",
            "Records from the primary that failed checksum verification (never applied)",
            sync.checksum_failures,
        )?;

        let c = ConstCounter::new(0u64);
        m = e.encode_descriptor(
            "hsm_secrets_agent_writes_refused",
            "Client writes refused, by reason (not_primary, stale_epoch, lease_expired, fenced, ...)",
            None,
            c.metric_type(),
        )?;
        for (reason, n) in &snap.refused {
            ConstCounter::new(*n).encode(m.encode_family(&ReasonLabel { reason })?)?;
        }
        m = e.encode_descriptor(
            "hsm_secrets_agent_hsm_errors",
            "Errors of the local token, by kind",
            None,
            c.metric_type(),
        )?;
        for (kind, n) in &snap.hsm_errors {
            ConstCounter::new(*n).encode(m.encode_family(&KindLabel { kind })?)?;
        }
        Ok(())
    }
}

/// `/metrics`, `/healthz` (the process serves) and `/readyz` (the token answers).
pub fn ops_router(registry: Arc<Registry>, agent: Agent) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state((registry, agent))
}

async fn metrics(State((registry, _)): State<(Arc<Registry>, Agent)>) -> impl IntoResponse {
    crate::telemetry::metrics_response(&registry)
}

async fn readyz(State((_, agent)): State<(Arc<Registry>, Agent)>) -> impl IntoResponse {
    match agent.store().health().await {
        Ok(_) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the token does not answer: {e}\n"),
        ),
    }
}
