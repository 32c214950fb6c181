//! The node plugin's HTTP endpoints for operators: `/metrics`, `/healthz`, `/readyz`.
//!
//! `/healthz` answers while the process serves (the container's liveness); `/readyz`
//! reports whether volumes can be published (HSMSecrets synchronized, token open and
//! answering), with the reason when not.

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::IntoResponse;
use axum::routing::get;
use hsm_secrets_csi::VolumeSource;
use http::StatusCode;
use prometheus_client::registry::Registry;

use super::Mounts;

struct Ops<S> {
    registry: Arc<Registry>,
    source: Arc<S>,
    mounts: Option<Arc<Mounts>>,
}

/// The routes; tests drive them with `tower::ServiceExt::oneshot`. With `mounts`,
/// `/mounts?namespace=NS&secret=NAME` lists the volumes mounted now (pods, secret names
/// and versions, never values).
pub fn router<S: VolumeSource>(
    registry: Arc<Registry>,
    source: Arc<S>,
    mounts: Option<Arc<Mounts>>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<S>))
        .route("/mounts", get(mounted::<S>))
        .with_state(Arc::new(Ops {
            registry,
            source,
            mounts,
        }))
}

async fn mounted<S: VolumeSource>(
    State(ops): State<Arc<Ops<S>>>,
    RawQuery(query): RawQuery,
) -> axum::response::Response {
    let Some(mounts) = &ops.mounts else {
        return (
            StatusCode::NOT_FOUND,
            "the mount table is kept only with the audit trail (--audit-log)\n",
        )
            .into_response();
    };
    let (mut namespace, mut secret) = (None, None);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "namespace" => namespace = Some(value.into_owned()),
            "secret" => secret = Some(value.into_owned()),
            _ => {}
        }
    }
    let list = mounts.list(namespace.as_deref(), secret.as_deref());
    axum::Json(list).into_response()
}

async fn metrics<S: VolumeSource>(State(ops): State<Arc<Ops<S>>>) -> impl IntoResponse {
    crate::telemetry::metrics_response(&ops.registry)
}

async fn readyz<S: VolumeSource>(State(ops): State<Arc<Ops<S>>>) -> impl IntoResponse {
    match ops.source.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}
