//! HTTP routes of the webhook, independent of TLS so tests drive them with
//! `tower::ServiceExt::oneshot`.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::FutureExt as _;
use http::{StatusCode, header};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use kube::core::DynamicObject;
use kube::core::admission::AdmissionRequest;
use prometheus_client::registry::Registry;

use crate::error::Error;
use crate::metrics::{self, Metrics, ReviewOperation, ReviewResult};
use crate::review::{decode_request, encode_response};
use crate::rules::{AdmissionRules, Decision};
use crate::tls::TlsReloader;

/// Default request body limit: the API server caps objects at ~1.5 MiB and a
/// review may carry the object twice (object and oldObject).
pub const DEFAULT_MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// Default time to answer a review: under the API server's default webhook
/// timeout of 5 s, so it gets our message instead of its own timeout error.
pub const DEFAULT_REVIEW_DEADLINE: Duration = Duration::from_secs(4);

/// Limits applied to every review.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    max_body_bytes: usize,
    review_deadline: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            review_deadline: DEFAULT_REVIEW_DEADLINE,
        }
    }
}

impl WebhookConfig {
    /// Larger bodies are refused with 413.
    pub fn with_max_body_bytes(mut self, bytes: usize) -> Self {
        self.max_body_bytes = bytes;
        self
    }

    /// Time from receiving a review to answering it (body read and rules).
    pub fn with_review_deadline(mut self, deadline: Duration) -> Self {
        self.review_deadline = deadline;
        self
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    pub fn review_deadline(&self) -> Duration {
        self.review_deadline
    }
}

/// Everything the routes need; cheap to clone.
#[derive(Clone)]
pub struct WebhookState {
    rules: Arc<dyn AdmissionRules>,
    metrics: Metrics,
    registry: Arc<Registry>,
    config: WebhookConfig,
    certificate: Option<TlsReloader>,
}

impl WebhookState {
    /// Register the webhook metrics into `registry` (which may already hold
    /// the embedding program's own metrics) and serve all of it on `/metrics`.
    pub fn new(rules: Arc<dyn AdmissionRules>, mut registry: Registry) -> Self {
        let metrics = Metrics::register(&mut registry);
        WebhookState {
            rules,
            metrics,
            registry: Arc::new(registry),
            config: WebhookConfig::default(),
            certificate: None,
        }
    }

    pub fn with_config(mut self, config: WebhookConfig) -> Self {
        self.config = config;
        self
    }

    /// Report the serving certificate on `/readyz` and count its reloads.
    pub fn with_certificate(mut self, certificate: &TlsReloader) -> Self {
        certificate.set_metrics(self.metrics.clone());
        self.certificate = Some(certificate.clone());
        self
    }

    /// The registry behind `/metrics`, e.g. to also serve it elsewhere.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn config(&self) -> &WebhookConfig {
        &self.config
    }
}

/// `POST /mutate`, `POST /validate`, `GET /healthz`, `GET /readyz`, `GET /metrics`.
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/validate", post(validate))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// `GET /healthz`, `GET /readyz`, `GET /metrics` alone: the operator endpoints served on
/// a separate plain-HTTP address (`--metrics-addr`), so Prometheus and probes need no
/// client TLS setup. The HTTPS router keeps them too.
pub fn ops_router(state: WebhookState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

async fn mutate(State(state): State<WebhookState>, request: Request) -> Response {
    answer(&state, ReviewOperation::Mutate, request).await
}

async fn validate(State(state): State<WebhookState>, request: Request) -> Response {
    answer(&state, ReviewOperation::Validate, request).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<WebhookState>) -> Response {
    // A TlsReloader always holds a loaded pair (it refuses to start without
    // one), so the certificate never blocks readiness once configured.
    let certificate = match &state.certificate {
        Some(_) => "certificate: loaded",
        None => "certificate: not configured (TLS terminated elsewhere)",
    };
    if state.rules.ready() {
        (
            StatusCode::OK,
            format!("ready\nrules: ready\n{certificate}\n"),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\nrules: not ready (caches not synced yet)\n{certificate}\n"),
        )
            .into_response()
    }
}

async fn metrics_text(State(state): State<WebhookState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::encode_text(&state.registry),
    )
        .into_response()
}

async fn answer(state: &WebhookState, operation: ReviewOperation, request: Request) -> Response {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + state.config.review_deadline;
    let (result, response) = match read_review(&state.config, request, deadline).await {
        Ok(review) => decide(state, operation, &review, deadline).await,
        Err(error) => {
            tracing::warn!(
                operation = operation.as_str(),
                kind = error.kind(),
                %error,
                "admission review refused"
            );
            (ReviewResult::Error, plain_error(&error))
        }
    };
    state
        .metrics
        .observe_review(operation, result, started.elapsed());
    response
}

async fn read_review(
    config: &WebhookConfig,
    request: Request,
    deadline: tokio::time::Instant,
) -> Result<AdmissionRequest<DynamicObject>, Error> {
    let limit = config.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(Error::BodyTooLarge { limit });
    }
    let body = Limited::new(request.into_body(), limit);
    let collected = tokio::time::timeout_at(deadline, body.collect())
        .await
        .map_err(|_| Error::BodyTimeout)?
        .map_err(|error| match error.downcast_ref::<LengthLimitError>() {
            Some(_) => Error::BodyTooLarge { limit },
            None => Error::BodyRead(error.to_string()),
        })?;
    decode_request(&collected.to_bytes())
}

#[tracing::instrument(
    name = "admission_review",
    skip_all,
    fields(
        operation = operation.as_str(),
        uid = %request.uid,
        kind = %request.kind.kind,
        namespace = request.namespace.as_deref().unwrap_or(""),
        name = %request.name,
        dry_run = request.dry_run,
    )
)]
async fn decide(
    state: &WebhookState,
    operation: ReviewOperation,
    request: &AdmissionRequest<DynamicObject>,
    deadline: tokio::time::Instant,
) -> (ReviewResult, Response) {
    let rules = &*state.rules;
    let call = async {
        match operation {
            ReviewOperation::Mutate => rules.mutate(request).await,
            ReviewOperation::Validate => rules.validate(request).await,
        }
    };
    // A panic or an overrun still gets a review answer with the uid, so the
    // API server reports our message rather than a dropped connection.
    let (result, decision) =
        match tokio::time::timeout_at(deadline, AssertUnwindSafe(call).catch_unwind()).await {
            Ok(Ok(decision)) if decision.is_allowed() => (ReviewResult::Allowed, decision),
            Ok(Ok(decision)) => (ReviewResult::Denied, decision),
            Ok(Err(_panic)) => {
                tracing::error!("admission rules panicked");
                (
                    ReviewResult::Error,
                    Decision::deny(
                        500,
                        "the hsm-secrets webhook failed while evaluating this request; \
                         see the webhook's logs",
                    ),
                )
            }
            Err(_elapsed) => {
                let budget = state.config.review_deadline;
                tracing::warn!(?budget, "admission rules did not decide in time");
                (
                    ReviewResult::Error,
                    Decision::deny(
                        504,
                        format!(
                            "the hsm-secrets webhook could not decide within {budget:?}; \
                             retry, and check the webhook's readiness and logs if it persists"
                        ),
                    ),
                )
            }
        };
    let decision = match (operation, decision) {
        (
            ReviewOperation::Validate,
            Decision::Allow {
                patch: Some(_),
                warnings,
            },
        ) => {
            tracing::warn!("validate rules returned a patch; dropped (validation cannot mutate)");
            Decision::Allow {
                patch: None,
                warnings,
            }
        }
        (_, decision) => decision,
    };
    match &decision {
        Decision::Allow { patch, .. } => tracing::debug!(patched = patch.is_some(), "allowed"),
        Decision::Deny { code, message, .. } => tracing::info!(code, %message, "denied"),
    }
    match encode_response(&request.uid, &decision) {
        Ok(body) => (
            result,
            (
                [(header::CONTENT_TYPE, "application/json")],
                Body::from(body),
            )
                .into_response(),
        ),
        Err(error) => {
            tracing::error!(%error, "cannot encode admission response");
            (ReviewResult::Error, plain_error(&error))
        }
    }
}

fn plain_error(error: &Error) -> Response {
    (
        error.http_status(),
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{error}\n"),
    )
        .into_response()
}

#[cfg(test)]
mod ops_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::rules::{AdmissionRules, Decision};
    use kube::core::DynamicObject;
    use kube::core::admission::AdmissionRequest;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Allow;

    #[async_trait::async_trait]
    impl AdmissionRules for Allow {
        async fn mutate(&self, _: &AdmissionRequest<DynamicObject>) -> Decision {
            Decision::allow()
        }
        async fn validate(&self, _: &AdmissionRequest<DynamicObject>) -> Decision {
            Decision::allow()
        }
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        (response[9..12].parse().unwrap(), response)
    }

    #[tokio::test]
    async fn the_ops_address_serves_metrics_and_probes_over_plain_http_without_admission() {
        let state = WebhookState::new(Arc::new(Allow), Registry::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, ops_router(state)).await });
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("# EOF"), "{body}");
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        // Admission stays on the HTTPS port only.
        assert_eq!(get(addr, "/mutate").await.0, 404);
    }
}
