//! Shared support for the admission tests: fixtures, cluster state, and
//! helpers that drive the webhook router and check patches.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use hsm_secrets::admission::{MemoryState, Rules};
use hsm_secrets_webhook::{WebhookConfig, WebhookState, router};
use http_body_util::BodyExt as _;
use k8s_openapi::ByteString;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tower::ServiceExt as _;

/// A review fixture from tests/fixtures/admission.
pub fn fixture(name: &str) -> Value {
    serde_json::from_str(&fixture_text(name)).unwrap()
}

pub fn fixture_text(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/admission/{name}",
        crate::repo_dir().display()
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// How the device `prod-hsm` is doing.
#[derive(Clone, Copy, Debug)]
pub enum DeviceHealth {
    Ready,
    ReadOnlyFallback,
}

/// The cluster the fixtures were written against: `prod-hsm` (primary
/// worker-1, mirrors worker-2/3), `other-hsm`, and HSMSecrets in `shop`:
/// `db-credentials` (prod-hsm, for service account `checkout`) and
/// `payments-key` (other-hsm). `api-key` and `signing-key` do not exist.
pub fn cluster(health: DeviceHealth) -> MemoryState {
    let state = MemoryState::new();
    let prod_status = match health {
        DeviceHealth::Ready => json!({
            "primaryNode": "worker-1", "epoch": 4, "phase": "Ready",
            "nodes": [
                {"node": "worker-1", "role": "Primary", "health": "Healthy"},
                {"node": "worker-2", "role": "ReadOnly", "health": "Healthy"},
                {"node": "worker-3", "role": "ReadOnly", "health": "Healthy"}
            ]
        }),
        DeviceHealth::ReadOnlyFallback => json!({
            "primaryNode": "worker-1", "epoch": 4, "phase": "ReadOnlyFallback",
            "primaryUnavailableSince": "2025-03-01T10:00:00Z",
            "nodes": [
                {"node": "worker-1", "role": "Primary", "health": "Unhealthy", "lastError": "probe timed out"},
                {"node": "worker-2", "role": "ReadOnly", "health": "Healthy"},
                {"node": "worker-3", "role": "ReadOnly", "health": "Unhealthy"}
            ]
        }),
    };
    state.put_device(
        crate::resources::device("prod-hsm")
            .token("prod")
            .pin_secret("hsm-secrets-system", &format!("{}-pin", "prod-hsm"))
            .mirrored(Some("worker-1"), &["worker-2", "worker-3"])
            .manual_failover()
            .status_json(prod_status)
            .build(),
    );
    state.put_device(
        crate::resources::device("other-hsm")
            .token("other")
            .pin_secret("hsm-secrets-system", &format!("{}-pin", "other-hsm"))
            .mirrored(Some("worker-1"), &["worker-2", "worker-3"])
            .manual_failover()
            .status_json(json!({"primaryNode": "worker-1", "phase": "Ready"}))
            .build(),
    );
    state.put_secret(
        crate::resources::secret("shop", "db-credentials")
            .device("prod-hsm")
            .accounts(&["checkout"])
            .build(),
    );
    state.put_secret(
        crate::resources::secret("shop", "payments-key")
            .device("other-hsm")
            .accounts(&[])
            .build(),
    );
    state
}

/// The router with the real rules over `state`.
pub fn app(state: MemoryState) -> (axum::Router, Arc<Rules<MemoryState>>, WebhookState) {
    app_with(state, WebhookConfig::default())
}

pub fn app_with(
    state: MemoryState,
    config: WebhookConfig,
) -> (axum::Router, Arc<Rules<MemoryState>>, WebhookState) {
    let mut registry = Registry::default();
    let rules = Arc::new(Rules::new(state, &mut registry));
    let webhook = WebhookState::new(rules.clone(), registry).with_config(config);
    (router(webhook.clone()), rules, webhook)
}

/// POST `body` to `path` as the API server would.
pub async fn post(app: &axum::Router, path: &str, body: impl Into<Bytes>) -> http::Response<Body> {
    let request = http::Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.into()))
        .unwrap();
    app.clone().oneshot(request).await.unwrap()
}

pub async fn body_bytes(response: http::Response<Body>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

/// POST a review and return its `response` after checking the envelope.
pub async fn review(app: &axum::Router, path: &str, review: &Value) -> Value {
    let response = post(app, path, serde_json::to_vec(review).unwrap()).await;
    assert_eq!(response.status(), 200);
    let body: Value = serde_json::from_slice(&body_bytes(response).await).unwrap();
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["kind"], "AdmissionReview");
    let answer = body["response"].clone();
    assert_eq!(
        answer["uid"], review["request"]["uid"],
        "uid must be echoed"
    );
    answer
}

/// The JSON patch in an admission response (base64, as the API server reads it).
pub fn patch_of(answer: &Value) -> Option<json_patch::Patch> {
    let encoded = answer.get("patch")?;
    assert_eq!(answer["patchType"], "JSONPatch");
    let ByteString(bytes) = serde_json::from_value(encoded.clone()).unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

pub fn warnings(answer: &Value) -> Vec<String> {
    answer
        .get("warnings")
        .map(|w| serde_json::from_value(w.clone()).unwrap())
        .unwrap_or_default()
}

pub fn denial_message(answer: &Value) -> String {
    assert_eq!(answer["allowed"], false, "expected a denial: {answer}");
    answer["status"]["message"].as_str().unwrap().to_owned()
}

/// Apply the mutation answer to the review's pod, check the result is a
/// valid Pod, then send the patched pod through `/mutate` again and check it
/// gets no patch (idempotence under reinvocation). Returns the typed pod.
pub async fn patched_pod(
    app: &axum::Router,
    original: &Value,
    answer: &Value,
) -> k8s_openapi::api::core::v1::Pod {
    assert_eq!(answer["allowed"], true, "{answer}");
    let patch = patch_of(answer).expect("a mutation must carry a patch");
    let mut pod = original["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod.clone())
        .unwrap_or_else(|e| panic!("patched pod does not deserialize as a Pod: {e}\n{pod:#}"));

    let mut again = original.clone();
    again["request"]["object"] = pod;
    again["request"]["uid"] = "reinvocation".into();
    let second = review(app, "/mutate", &again).await;
    assert_eq!(second["allowed"], true, "{second}");
    assert!(
        second.get("patch").is_none(),
        "a second mutation must change nothing: {second}"
    );
    typed
}

/// The name the API server uses to reach the webhook Service.
pub const SERVICE_DNS: &str = "hsm-secrets-webhook.hsm-secrets-system.svc";

pub fn serving_identity() -> hsm_secrets::admission::certificates::ServingIdentity {
    hsm_secrets::admission::certificates::ServingIdentity {
        service: "hsm-secrets-webhook".into(),
        namespace: "hsm-secrets-system".into(),
    }
}

/// Write a serving pair as the kubelet projects a Secret: `tls.crt`, `tls.key`.
pub fn write_pair(
    dir: &std::path::Path,
    cert_pem: &str,
    key_pem: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    for (path, content) in [(&cert, cert_pem), (&key, key_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    (cert, key)
}

/// A webhook with the real rules served over HTTPS on 127.0.0.1.
pub struct TlsServer {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), hsm_secrets_webhook::Error>>,
}

impl TlsServer {
    pub async fn start(webhook: WebhookState, tls: hsm_secrets_webhook::TlsReloader) -> Self {
        let listener = hsm_secrets_webhook::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = router(webhook.with_certificate(&tls));
        let task = tokio::spawn(hsm_secrets_webhook::serve(listener, router, tls, async {
            let _ = stopped.await;
        }));
        TlsServer {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(std::time::Duration::from_secs(15), &mut self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

/// An HTTP/1.1 keep-alive connection to `addr`, verifying the server as
/// `server_name` against `ca_pem` only. Also returns the server's leaf.
pub async fn https_connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    server_name: &str,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    rustls_pki_types::CertificateDer<'static>,
) {
    let config = hsm_secrets_webhook::client_config(ca_pem.as_bytes()).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    (sender, leaf)
}

/// Send one request on a keep-alive connection; status and body.
pub async fn https_send(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    method: http::Method,
    path: &str,
    body: Vec<u8>,
) -> (http::StatusCode, Bytes) {
    sender.ready().await.unwrap();
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, SERVICE_DNS)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, bytes)
}
