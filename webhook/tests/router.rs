//! The routes driven in-process, as the API server would call them.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use common::{FakeRules, SLEEP_LABEL, VERDICT_LABEL, body_json, pod_review, pod_review_bytes};
use hsm_secrets_webhook::{WebhookConfig, router};
use http::StatusCode;
use http_body_util::BodyExt;
use k8s_openapi::ByteString;
use serde_json::json;
use tower::ServiceExt;

const UID: &str = "3c1b6a0e-7c2d-4f59-9d1f-6a2b9e5d4c11";

fn setup(config: WebhookConfig) -> (Arc<FakeRules>, axum::Router) {
    let rules = Arc::new(FakeRules::default());
    let app = router(common::state(&rules, config));
    (rules, app)
}

async fn post(app: &axum::Router, path: &str, body: impl Into<Bytes>) -> http::Response<Body> {
    let request = common::review_post(path, body).map(Body::new);
    app.clone().oneshot(request).await.unwrap()
}

async fn get(app: &axum::Router, path: &str) -> (StatusCode, String) {
    let request = http::Request::get(path).body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn text(response: http::Response<Body>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn mutate_allows_with_a_patch_the_api_server_can_apply() {
    let (_, app) = setup(WebhookConfig::default());
    let response = post(&app, "/mutate", pod_review_bytes(UID, &[])).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[http::header::CONTENT_TYPE],
        "application/json"
    );
    let review = body_json(response).await;

    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let answer = &review["response"];
    assert_eq!(answer["uid"], UID);
    assert_eq!(answer["allowed"], true);
    assert_eq!(answer["patchType"], "JSONPatch");
    assert_eq!(
        answer["warnings"],
        json!(["HSMSecret shop/api-key does not exist yet"])
    );

    // The patch is base64 (as the API server decodes []byte) and applies to the pod.
    assert!(
        answer["patch"].is_string(),
        "patch must be a base64 string: {answer}"
    );
    let ByteString(patch_json) = serde_json::from_value(answer["patch"].clone()).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch_json).unwrap();
    let mut pod = pod_review(UID, &[], false)["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    assert_eq!(
        pod["metadata"]["annotations"]["hsmsecrets.io/status"],
        "injected"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["hsmsecrets.io/inject"],
        "true"
    );
}

#[tokio::test]
async fn mutate_denial_carries_code_message_and_warnings() {
    let (_, app) = setup(WebhookConfig::default());
    let response = post(
        &app,
        "/mutate",
        pod_review_bytes(UID, &[(VERDICT_LABEL, "deny")]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let answer = body_json(response).await["response"].clone();
    assert_eq!(answer["uid"], UID);
    assert_eq!(answer["allowed"], false);
    assert_eq!(answer["status"]["code"], 403);
    assert_eq!(
        answer["status"]["message"],
        "mutate: pod checkout-7d9f8b6c5-x2kqp is denied by its test label"
    );
    assert_eq!(answer["warnings"], json!(["denial warning"]));
    assert!(answer.get("patch").is_none() && answer.get("patchType").is_none());
}

#[tokio::test]
async fn validate_allows_without_a_patch_and_denies_with_a_reason() {
    let (rules, app) = setup(WebhookConfig::default());

    let response = post(&app, "/validate", pod_review_bytes("v-1", &[])).await;
    let answer = body_json(response).await["response"].clone();
    assert_eq!(
        answer,
        json!({"uid": "v-1", "allowed": true}),
        "patch must be dropped"
    );

    let response = post(
        &app,
        "/validate",
        pod_review_bytes("v-2", &[(VERDICT_LABEL, "deny")]),
    )
    .await;
    let answer = body_json(response).await["response"].clone();
    assert_eq!(answer["allowed"], false);
    assert_eq!(answer["status"]["code"], 403);
    assert!(
        answer["status"]["message"]
            .as_str()
            .unwrap()
            .starts_with("validate:")
    );

    let operations: Vec<_> = rules.seen().iter().map(|seen| seen.operation).collect();
    assert_eq!(operations, ["validate", "validate"]);
}

#[tokio::test]
async fn dry_run_reaches_the_rules_untouched() {
    let (rules, app) = setup(WebhookConfig::default());
    for (uid, dry_run) in [("dry", true), ("wet", false)] {
        let body = serde_json::to_vec(&pod_review(uid, &[], dry_run)).unwrap();
        let response = post(&app, "/mutate", body).await;
        assert_eq!(body_json(response).await["response"]["uid"], uid);
    }
    let seen: Vec<_> = rules
        .seen()
        .into_iter()
        .map(|s| (s.uid, s.dry_run))
        .collect();
    assert_eq!(seen, [("dry".to_owned(), true), ("wet".to_owned(), false)]);
}

#[tokio::test]
async fn envelopes_that_are_not_v1_reviews_get_400_with_the_reason() {
    let (rules, app) = setup(WebhookConfig::default());
    let mut v1beta1 = pod_review(UID, &[], false);
    v1beta1["apiVersion"] = "admission.k8s.io/v1beta1".into();
    let mut not_a_review = pod_review(UID, &[], false);
    not_a_review["kind"] = "Pod".into();
    let mut no_request = pod_review(UID, &[], false);
    no_request.as_object_mut().unwrap().remove("request");
    let mut no_uid = pod_review(UID, &[], false);
    no_uid["request"].as_object_mut().unwrap().remove("uid");
    let empty_uid = pod_review("", &[], false);
    // Hostile values are never echoed in full.
    let mut huge_version = pod_review(UID, &[], false);
    huge_version["apiVersion"] = "v".repeat(2 << 20).into();

    let cases: [(&str, Vec<u8>, &str); 8] = [
        (
            "/mutate",
            b"{\"kind\": \"AdmissionReview\",".to_vec(),
            "not a valid AdmissionReview JSON",
        ),
        (
            "/validate",
            b"".to_vec(),
            "not a valid AdmissionReview JSON",
        ),
        (
            "/mutate",
            serde_json::to_vec(&v1beta1).unwrap(),
            "\"admission.k8s.io/v1beta1\"",
        ),
        (
            "/validate",
            serde_json::to_vec(&not_a_review).unwrap(),
            "unsupported AdmissionReview kind \"Pod\"",
        ),
        (
            "/mutate",
            serde_json::to_vec(&no_request).unwrap(),
            "has no `request`",
        ),
        (
            "/mutate",
            serde_json::to_vec(&no_uid).unwrap(),
            "missing field `uid`",
        ),
        (
            "/validate",
            serde_json::to_vec(&empty_uid).unwrap(),
            "request.uid \"\" is not a uid",
        ),
        (
            "/mutate",
            serde_json::to_vec(&huge_version).unwrap(),
            "bytes cut",
        ),
    ];
    for (path, body, expected) in cases {
        let response = post(&app, path, body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{expected}");
        let message = text(response).await;
        assert!(message.len() < 1024, "an answer of {} bytes", message.len());
        assert!(
            message.contains(expected),
            "{message:?} should contain {expected:?}"
        );
    }
    assert!(
        rules.seen().is_empty(),
        "rules must not see invalid reviews"
    );
}

#[tokio::test]
async fn oversized_bodies_get_413_whether_announced_or_streamed() {
    let (_, app) = setup(WebhookConfig::default());
    // Default limit: 3 MiB, announced by Content-Length.
    let huge = vec![b' '; 3 * 1024 * 1024 + 1];
    let response = post(&app, "/mutate", huge).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(text(response).await.contains("limit of 3145728 bytes"));

    // Configured limit, chunked body without a length.
    let (rules, app) = setup(WebhookConfig::default().with_max_body_bytes(1024));
    let review = pod_review_bytes(UID, &[]);
    assert!(review.len() > 1024);
    let chunks: Vec<Result<Bytes, std::io::Error>> = review
        .chunks(256)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let request = http::Request::post("/mutate")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(text(response).await.contains("limit of 1024 bytes"));
    assert!(rules.seen().is_empty());
}

#[tokio::test]
async fn rules_slower_than_the_deadline_get_an_error_answer_not_a_hang() {
    let deadline = Duration::from_millis(200);
    let (_, app) = setup(WebhookConfig::default().with_review_deadline(deadline));
    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(3),
        post(
            &app,
            "/mutate",
            pod_review_bytes(UID, &[(SLEEP_LABEL, "60000")]),
        ),
    )
    .await
    .expect("the webhook must answer before the deadline plus slack");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(response.status(), StatusCode::OK);
    let answer = body_json(response).await["response"].clone();
    assert_eq!(answer["uid"], UID);
    assert_eq!(answer["allowed"], false);
    assert_eq!(answer["status"]["code"], 504);
    assert!(
        answer["status"]["message"]
            .as_str()
            .unwrap()
            .contains("could not decide within 200ms")
    );
}

#[tokio::test]
async fn panicking_rules_get_an_error_answer_and_the_server_keeps_working() {
    let (_, app) = setup(WebhookConfig::default());
    let response = post(
        &app,
        "/validate",
        pod_review_bytes(UID, &[(VERDICT_LABEL, "panic")]),
    )
    .await;
    let answer = body_json(response).await["response"].clone();
    assert_eq!(answer["allowed"], false);
    assert_eq!(answer["status"]["code"], 500);

    let response = post(&app, "/validate", pod_review_bytes("after", &[])).await;
    assert_eq!(body_json(response).await["response"]["allowed"], true);
}

#[tokio::test]
async fn health_and_readiness() {
    let (rules, app) = setup(WebhookConfig::default());
    assert_eq!(
        get(&app, "/healthz").await,
        (StatusCode::OK, "ok\n".to_owned())
    );
    let (status, body) = get(&app, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    rules.not_ready.store(true, Ordering::SeqCst);
    let (status, body) = get(&app, "/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("caches not synced"), "{body}");
    // Liveness does not depend on readiness: a restart would not sync caches faster.
    assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn metrics_count_each_review_by_operation_and_result() {
    let (_, app) = setup(WebhookConfig::default());
    let _ = post(&app, "/mutate", pod_review_bytes("a", &[])).await;
    let _ = post(&app, "/mutate", pod_review_bytes("b", &[])).await;
    let _ = post(
        &app,
        "/validate",
        pod_review_bytes("c", &[(VERDICT_LABEL, "deny")]),
    )
    .await;
    let _ = post(&app, "/validate", &b"garbage"[..]).await;

    let request = http::Request::get("/metrics").body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    assert!(
        response.headers()[http::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let metrics = text(response).await;
    for line in [
        r#"hsm_secrets_webhook_admissions_total{operation="mutate",result="allowed"} 2"#,
        r#"hsm_secrets_webhook_admissions_total{operation="mutate",result="denied"} 0"#,
        r#"hsm_secrets_webhook_admissions_total{operation="validate",result="denied"} 1"#,
        r#"hsm_secrets_webhook_admissions_total{operation="validate",result="error"} 1"#,
        r#"hsm_secrets_webhook_admission_duration_seconds_count{operation="mutate"} 2"#,
        r#"hsm_secrets_webhook_admission_duration_seconds_count{operation="validate"} 2"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn the_embedding_program_shares_the_metrics_registry() {
    use prometheus_client::metrics::counter::Counter;
    let mut registry = prometheus_client::registry::Registry::default();
    let failovers: Counter = Counter::default();
    registry.register("hsm_secrets_failovers", "Failovers", failovers.clone());
    failovers.inc();
    let rules = Arc::new(FakeRules::default());
    let app = router(hsm_secrets_webhook::WebhookState::new(rules, registry));
    let (_, metrics) = get(&app, "/metrics").await;
    assert!(
        metrics.contains("hsm_secrets_failovers_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hsm_secrets_webhook_admissions_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn reviews_only_accept_post() {
    let (_, app) = setup(WebhookConfig::default());
    assert_eq!(get(&app, "/mutate").await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get(&app, "/nowhere").await.0, StatusCode::NOT_FOUND);
}
