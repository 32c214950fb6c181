//! The controller's HTTP endpoints for operators: `/metrics` (controller and HSMSecret
//! reconciler metrics, one registry), `/healthz` (the control loop went round recently:
//! the container's liveness) and `/readyz` (a round reached the controller Lease).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use http::StatusCode;
use prometheus_client::registry::Registry;

use super::ControllerMetrics;

/// How long the loop may go without a round before `/healthz` fails: rounds are a probe
/// interval apart, but one round waits on every device's agents (deadlines of a few
/// seconds each) and on the API server, so allow many intervals and at least a minute.
pub fn stale_after(probe_interval: Duration) -> Duration {
    (probe_interval * 20).max(Duration::from_secs(60))
}

struct Ops {
    registry: Arc<Registry>,
    metrics: ControllerMetrics,
    stale_after: Duration,
}

/// The routes; tests drive them over HTTP or with `tower::ServiceExt::oneshot`.
pub fn router(
    registry: Arc<Registry>,
    metrics: ControllerMetrics,
    stale_after: Duration,
) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Ops {
            registry,
            metrics,
            stale_after,
        }))
}

async fn scrape(State(ops): State<Arc<Ops>>) -> impl IntoResponse {
    crate::telemetry::metrics_response(&ops.registry)
}

async fn healthz(State(ops): State<Arc<Ops>>) -> impl IntoResponse {
    let state = ops.metrics.loop_state();
    if state.is_live(Instant::now(), ops.stale_after) {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the control loop has not gone round for {}s (limit {}s)\n",
                state.last_tick.elapsed().as_secs(),
                ops.stale_after.as_secs()
            ),
        )
    }
}

async fn readyz(State(ops): State<Arc<Ops>>) -> impl IntoResponse {
    let state = ops.metrics.loop_state();
    match state.readiness() {
        Ok(()) => (
            StatusCode::OK,
            if state.leading {
                "ready (leader)\n"
            } else {
                "ready (standby)\n"
            }
            .to_string(),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::metrics::LoopState;
    use super::*;

    #[test]
    fn liveness_and_readiness_follow_the_loop() {
        let start = Instant::now();
        let state = LoopState {
            last_tick: start,
            ..LoopState::default()
        };
        let limit = stale_after(Duration::from_secs(1));
        assert_eq!(limit, Duration::from_secs(60));
        assert_eq!(
            stale_after(Duration::from_secs(10)),
            Duration::from_secs(200)
        );
        assert!(state.is_live(start + limit, limit));
        assert!(!state.is_live(start + limit + Duration::from_millis(1), limit));
        assert!(state.readiness().unwrap_err().contains("not run a round"));
        let unreachable = LoopState {
            ticked: true,
            ..state.clone()
        };
        assert!(unreachable.readiness().unwrap_err().contains("Lease"));
        let standby = LoopState {
            ticked: true,
            lease_reachable: true,
            ..state
        };
        assert!(standby.readiness().is_ok());
    }
}
