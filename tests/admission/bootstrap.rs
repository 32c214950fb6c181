//! The certificate bootstrap and its Lease election against a scripted API
//! server (tower-test): each test states the exact conversation, a missing
//! call times out and an extra call fails.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::time::Duration;

use hsm_secrets::admission::AdmissionMetrics;
use hsm_secrets::admission::bootstrap::{
    self, BootstrapConfig, BootstrapError, BootstrapTiming, PassReport, SecretOutcome,
};
use hsm_secrets::lease::LeaseLock;
use hsm_secrets_webhook::TlsReloader;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kit::admission::{
    DeviceHealth, SERVICE_DNS, TlsServer, app, cluster, https_connect, https_send,
    serving_identity, write_pair,
};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

const NAMESPACE: &str = "hsm-secrets-system";
const SECRET_PATH: &str = "/api/v1/namespaces/hsm-secrets-system/secrets/hsm-secrets-webhook-tls";
const SECRETS_PATH: &str = "/api/v1/namespaces/hsm-secrets-system/secrets";
const MUTATING_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/hsm-secrets";
const VALIDATING_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/hsm-secrets";
const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/hsm-secrets-system/leases/hsm-secrets-webhook-bootstrap";
const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/hsm-secrets-system/leases";

type Handle = mock::Handle<Request<Body>, Response<Body>>;

/// The API server side of the conversation.
struct ApiServer {
    handle: Handle,
}

/// One request the code under test made, and the way to answer it.
struct Call {
    body: Value,
    content_type: Option<String>,
    send: mock::SendResponse<Response<Body>>,
}

impl Call {
    fn respond(self, code: u16, body: &Value) {
        let response = Response::builder()
            .status(StatusCode::from_u16(code).unwrap())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        self.send.send_response(response);
    }

    fn not_found(self, resource: &str, name: &str) {
        self.respond(
            404,
            &status(404, "NotFound", &format!("{resource} \"{name}\" not found")),
        );
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl ApiServer {
    fn client() -> (Client, ApiServer) {
        let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, NAMESPACE), ApiServer { handle })
    }

    async fn expect(&mut self, method: Method, path: &str) -> Call {
        let (request, send) =
            tokio::time::timeout(Duration::from_secs(10), self.handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("expected {method} {path}, but no call came"))
                .expect("client dropped");
        assert_eq!(
            (request.method(), request.uri().path()),
            (&method, path),
            "unexpected call"
        );
        let content_type = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Call {
            body,
            content_type,
            send,
        }
    }
}

/// Close the API server (any further call fails) and collect the result.
async fn finish<T>(api: ApiServer, task: tokio::task::JoinHandle<T>) -> T {
    drop(api);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("finishes once the conversation is over")
        .unwrap()
}

fn config() -> BootstrapConfig {
    BootstrapConfig {
        namespace: NAMESPACE.into(),
        secret_name: "hsm-secrets-webhook-tls".into(),
        identity: serving_identity(),
        mutating_configuration: "hsm-secrets".into(),
        validating_configuration: "hsm-secrets".into(),
        lease_name: "hsm-secrets-webhook-bootstrap".into(),
        holder: "hsm-secrets-webhook-6d5f-abcde".into(),
        timing: BootstrapTiming::default(),
    }
}

/// The two webhook configurations exactly as manifests/webhook ships them.
fn shipped_configuration(kind: &str, resource_version: &str) -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/manifests/webhook/webhooks.yaml"
    ))
    .unwrap();
    let mut object = serde_saphyr::from_multiple::<Value>(&text)
        .unwrap()
        .into_iter()
        .find(|doc| doc["kind"] == kind)
        .unwrap();
    object["metadata"]["resourceVersion"] = resource_version.into();
    object
}

fn with_ca_bundle(mut configuration: Value, ca_pem: &str) -> Value {
    let encoded = serde_json::to_value(ByteString(ca_pem.as_bytes().to_vec())).unwrap();
    for webhook in configuration["webhooks"].as_array_mut().unwrap() {
        webhook["clientConfig"]["caBundle"] = encoded.clone();
    }
    configuration
}

fn decode(value: &Value) -> String {
    let ByteString(bytes) = serde_json::from_value(value.clone()).unwrap();
    String::from_utf8(bytes).unwrap()
}

fn data(secret: &Value, key: &str) -> String {
    decode(&secret["data"][key])
}

/// Expect GET + strategic-merge PATCH of one configuration setting `ca_pem`
/// on all its webhooks (named `webhooks`).
async fn expect_ca_bundle_patch(
    api: &mut ApiServer,
    path: &str,
    kind: &str,
    webhooks: &[&str],
    ca_pem: &str,
) {
    api.expect(Method::GET, path)
        .await
        .respond(200, &shipped_configuration(kind, "7"));
    let patch = api.expect(Method::PATCH, path).await;
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    assert_eq!(
        patch.body["metadata"]["resourceVersion"], "7",
        "the patch is guarded by the version read"
    );
    let patched: Vec<(String, String)> = patch.body["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap().to_owned(),
                decode(&w["clientConfig"]["caBundle"]),
            )
        })
        .collect();
    let expected: Vec<(String, String)> = webhooks
        .iter()
        .map(|name| ((*name).to_owned(), ca_pem.to_owned()))
        .collect();
    assert_eq!(patched, expected);
    let answer = with_ca_bundle(shipped_configuration(kind, "8"), ca_pem);
    patch.respond(200, &answer);
}

const MUTATING_WEBHOOKS: &[&str] = &["inject.pods.hsmsecrets.io"];
const VALIDATING_WEBHOOKS: &[&str] = &[
    "hsmsecrets.validate.hsmsecrets.io",
    "hsmdevices.validate.hsmsecrets.io",
    "pods.validate.hsmsecrets.io",
];

/// Run the fresh-cluster conversation; returns the Secret as created (with
/// the resourceVersion the server gave it) and the caBundle written.
async fn bootstrap_fresh_cluster() -> (Value, String) {
    let (client, mut api) = ApiServer::client();
    let pass = tokio::spawn(async move {
        bootstrap::ensure_certificates(&client, &config(), Timestamp::now()).await
    });
    api.expect(Method::GET, SECRET_PATH)
        .await
        .not_found("secrets", "hsm-secrets-webhook-tls");
    let create = api.expect(Method::POST, SECRETS_PATH).await;
    let mut secret = create.body.clone();
    assert_eq!(secret["metadata"]["name"], "hsm-secrets-webhook-tls");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    secret["metadata"]["resourceVersion"] = "100".into();
    secret["metadata"]["uid"] = "5b0e7c1a-8a43-4bb4-9f3e-2f1c9d2a7e10".into();
    create.respond(201, &secret);
    let ca = data(&secret, "ca.crt");
    expect_ca_bundle_patch(
        &mut api,
        MUTATING_PATH,
        "MutatingWebhookConfiguration",
        MUTATING_WEBHOOKS,
        &ca,
    )
    .await;
    expect_ca_bundle_patch(
        &mut api,
        VALIDATING_PATH,
        "ValidatingWebhookConfiguration",
        VALIDATING_WEBHOOKS,
        &ca,
    )
    .await;
    let report = finish(api, pass).await.unwrap();
    assert_eq!(
        report,
        PassReport {
            secret: SecretOutcome::Created,
            patched: vec![
                "MutatingWebhookConfiguration/hsm-secrets".into(),
                "ValidatingWebhookConfiguration/hsm-secrets".into(),
            ],
        }
    );
    (secret, ca)
}

/// Serve the Secret's pair and check a client trusting only `ca_bundle`
/// accepts it under the Service's DNS name.
async fn assert_served_and_trusted(secret: &Value, ca_bundle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = write_pair(
        dir.path(),
        &data(secret, "tls.crt"),
        &data(secret, "tls.key"),
    );
    let (_, _, webhook) = app(cluster(DeviceHealth::Ready));
    let server = TlsServer::start(webhook, TlsReloader::load(cert, key).unwrap()).await;
    let (mut sender, _) = https_connect(server.addr, ca_bundle, SERVICE_DNS).await;
    let (status, _) = https_send(&mut sender, Method::GET, "/healthz", Vec::new()).await;
    assert_eq!(status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_fresh_cluster_gets_a_ca_a_serving_secret_and_both_ca_bundles() {
    let (secret, ca) = bootstrap_fresh_cluster().await;
    let typed: Secret = serde_json::from_value(secret.clone()).unwrap();
    let keys: Vec<&String> = typed.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["ca.crt", "ca.key", "tls.crt", "tls.key"]);
    let annotations = typed.metadata.annotations.unwrap();
    assert_eq!(
        annotations["hsmsecrets.io/certificate-dns-names"],
        "hsm-secrets-webhook.hsm-secrets-system.svc,\
         hsm-secrets-webhook.hsm-secrets-system.svc.cluster.local,\
         hsm-secrets-webhook.hsm-secrets-system,hsm-secrets-webhook"
    );
    let not_after: Timestamp = annotations["hsmsecrets.io/certificate-not-after"]
        .parse()
        .unwrap();
    let days = not_after.duration_since(Timestamp::now()).as_hours() / 24;
    assert!((363..=365).contains(&days), "{days} days");
    assert_served_and_trusted(&secret, &ca).await;
}

#[tokio::test]
async fn a_current_setup_is_read_and_left_alone() {
    let (secret, ca) = bootstrap_fresh_cluster().await;
    let (client, mut api) = ApiServer::client();
    let pass = tokio::spawn(async move {
        bootstrap::ensure_certificates(&client, &config(), Timestamp::now()).await
    });
    api.expect(Method::GET, SECRET_PATH)
        .await
        .respond(200, &secret);
    api.expect(Method::GET, MUTATING_PATH).await.respond(
        200,
        &with_ca_bundle(
            shipped_configuration("MutatingWebhookConfiguration", "8"),
            &ca,
        ),
    );
    api.expect(Method::GET, VALIDATING_PATH).await.respond(
        200,
        &with_ca_bundle(
            shipped_configuration("ValidatingWebhookConfiguration", "8"),
            &ca,
        ),
    );
    // No write follows: `finish` closes the server, so an extra call fails the pass.
    let report = finish(api, pass).await.unwrap();
    assert_eq!(
        report,
        PassReport {
            secret: SecretOutcome::Unchanged,
            patched: vec![]
        }
    );
}

#[tokio::test]
async fn a_serving_certificate_near_expiry_is_renewed_under_the_same_ca() {
    let (mut secret, ca) = bootstrap_fresh_cluster().await;
    let soon = Timestamp::now() + SignedDuration::from_hours(24 * 10);
    secret["metadata"]["annotations"]["hsmsecrets.io/certificate-not-after"] =
        soon.to_string().into();

    let (client, mut api) = ApiServer::client();
    let pass = tokio::spawn(async move {
        bootstrap::ensure_certificates(&client, &config(), Timestamp::now()).await
    });
    api.expect(Method::GET, SECRET_PATH)
        .await
        .respond(200, &secret);
    let replace = api.expect(Method::PUT, SECRET_PATH).await;
    let renewed = replace.body.clone();
    assert_eq!(
        renewed["metadata"]["resourceVersion"], "100",
        "replaced under the version read"
    );
    assert_eq!(data(&renewed, "ca.crt"), ca, "the CA stays");
    assert_eq!(data(&renewed, "ca.key"), data(&secret, "ca.key"));
    assert_ne!(data(&renewed, "tls.crt"), data(&secret, "tls.crt"));
    assert_ne!(data(&renewed, "tls.key"), data(&secret, "tls.key"));
    let mut stored = renewed.clone();
    stored["metadata"]["resourceVersion"] = "101".into();
    replace.respond(200, &stored);
    api.expect(Method::GET, MUTATING_PATH).await.respond(
        200,
        &with_ca_bundle(
            shipped_configuration("MutatingWebhookConfiguration", "8"),
            &ca,
        ),
    );
    api.expect(Method::GET, VALIDATING_PATH).await.respond(
        200,
        &with_ca_bundle(
            shipped_configuration("ValidatingWebhookConfiguration", "8"),
            &ca,
        ),
    );
    let report = finish(api, pass).await.unwrap();
    assert_eq!(report.secret, SecretOutcome::Renewed);
    assert!(report.patched.is_empty(), "caBundles stay valid: {report}");
    // The renewed certificate is trusted through the caBundle already in place.
    assert_served_and_trusted(&renewed, &ca).await;
}

#[tokio::test]
async fn a_secret_without_a_usable_ca_is_reissued_and_the_ca_bundles_follow() {
    let (mut secret, old_ca) = bootstrap_fresh_cluster().await;
    secret["data"].as_object_mut().unwrap().remove("ca.key");

    let (client, mut api) = ApiServer::client();
    let pass = tokio::spawn(async move {
        bootstrap::ensure_certificates(&client, &config(), Timestamp::now()).await
    });
    api.expect(Method::GET, SECRET_PATH)
        .await
        .respond(200, &secret);
    let replace = api.expect(Method::PUT, SECRET_PATH).await;
    let reissued = replace.body.clone();
    let new_ca = data(&reissued, "ca.crt");
    assert_ne!(new_ca, old_ca);
    assert!(!data(&reissued, "ca.key").is_empty());
    replace.respond(200, &reissued);
    // The configurations still carry the old CA: both are patched.
    api.expect(Method::GET, MUTATING_PATH).await.respond(
        200,
        &with_ca_bundle(
            shipped_configuration("MutatingWebhookConfiguration", "7"),
            &old_ca,
        ),
    );
    let patch = api.expect(Method::PATCH, MUTATING_PATH).await;
    assert_eq!(
        decode(&patch.body["webhooks"][0]["clientConfig"]["caBundle"]),
        new_ca
    );
    patch.respond(
        200,
        &with_ca_bundle(
            shipped_configuration("MutatingWebhookConfiguration", "8"),
            &new_ca,
        ),
    );
    expect_ca_bundle_patch(
        &mut api,
        VALIDATING_PATH,
        "ValidatingWebhookConfiguration",
        VALIDATING_WEBHOOKS,
        &new_ca,
    )
    .await;
    let report = finish(api, pass).await.unwrap();
    assert_eq!(report.secret, SecretOutcome::Reissued);
    assert_eq!(report.patched.len(), 2);
    assert_served_and_trusted(&reissued, &new_ca).await;
}

#[tokio::test]
async fn losing_the_create_race_is_a_retry_not_an_overwrite() {
    let (client, mut api) = ApiServer::client();
    let pass = tokio::spawn(async move {
        bootstrap::ensure_certificates(&client, &config(), Timestamp::now()).await
    });
    api.expect(Method::GET, SECRET_PATH)
        .await
        .not_found("secrets", "hsm-secrets-webhook-tls");
    api.expect(Method::POST, SECRETS_PATH).await.respond(
        409,
        &status(
            409,
            "AlreadyExists",
            "secrets \"hsm-secrets-webhook-tls\" already exists",
        ),
    );
    let error = finish(api, pass).await.expect_err("conflict");
    assert!(matches!(error, BootstrapError::Conflict { .. }), "{error}");
    assert_eq!(error.kind(), "conflict");
}

#[tokio::test]
async fn a_missing_webhook_configuration_is_reported_by_name() {
    let (secret, _) = bootstrap_fresh_cluster().await;
    let (client, mut api) = ApiServer::client();
    let pass = tokio::spawn(async move {
        bootstrap::ensure_certificates(&client, &config(), Timestamp::now()).await
    });
    api.expect(Method::GET, SECRET_PATH)
        .await
        .respond(200, &secret);
    api.expect(Method::GET, MUTATING_PATH).await.not_found(
        "mutatingwebhookconfigurations.admissionregistration.k8s.io",
        "hsm-secrets",
    );
    let error = finish(api, pass).await.expect_err("missing configuration");
    let message = error.to_string();
    assert!(
        message.contains("MutatingWebhookConfiguration hsm-secrets does not exist"),
        "{message}"
    );
    assert!(message.contains("manifests/webhook"), "{message}");
}

// --- Lease election ----------------------------------------------------------

fn lease(holder: &str, resource_version: &str, duration: i32, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "hsm-secrets-webhook-bootstrap", "namespace": NAMESPACE,
                     "resourceVersion": resource_version},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
                 "acquireTime": "2025-03-01T10:00:00.000000Z", "renewTime": "2025-03-01T10:00:05.000000Z",
                 "leaseTransitions": transitions}
    })
}

#[tokio::test]
async fn the_first_candidate_creates_the_lease_and_then_renews_it() {
    let (client, mut api) = ApiServer::client();
    let lock = LeaseLock::new(
        client,
        NAMESPACE,
        "hsm-secrets-webhook-bootstrap",
        "webhook-a",
        Duration::from_secs(15),
    );
    let campaign = tokio::spawn(async move {
        let first = lock.try_acquire_or_renew().await.unwrap();
        let second = lock.try_acquire_or_renew().await.unwrap();
        (first, second)
    });
    api.expect(Method::GET, LEASE_PATH).await.not_found(
        "leases.coordination.k8s.io",
        "hsm-secrets-webhook-bootstrap",
    );
    let create = api.expect(Method::POST, LEASES_PATH).await;
    assert_eq!(create.body["spec"]["holderIdentity"], "webhook-a");
    assert_eq!(create.body["spec"]["leaseDurationSeconds"], 15);
    assert!(create.body["spec"]["renewTime"].is_string());
    let mut created = create.body.clone();
    created["metadata"]["resourceVersion"] = "1".into();
    create.respond(201, &created);

    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond(200, &created);
    let renew = api.expect(Method::PUT, LEASE_PATH).await;
    assert_eq!(renew.body["metadata"]["resourceVersion"], "1");
    assert_eq!(renew.body["spec"]["holderIdentity"], "webhook-a");
    assert_ne!(
        renew.body["spec"]["renewTime"],
        created["spec"]["renewTime"]
    );
    let mut renewed = renew.body.clone();
    renewed["metadata"]["resourceVersion"] = "2".into();
    renew.respond(200, &renewed);
    assert_eq!(finish(api, campaign).await, (true, true));
}

#[tokio::test]
async fn a_stale_lease_is_taken_over_only_by_the_winner_of_the_race() {
    let (client, mut api) = ApiServer::client();
    let lock = LeaseLock::new(
        client,
        NAMESPACE,
        "hsm-secrets-webhook-bootstrap",
        "webhook-b",
        Duration::from_secs(15),
    );
    // The campaign reports each attempt's result and waits for the next go.
    let (go_tx, mut go_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<bool>(1);
    let campaign = tokio::spawn(async move {
        while go_rx.recv().await.is_some() {
            done_tx
                .send(lock.try_acquire_or_renew().await.unwrap())
                .await
                .unwrap();
        }
    });
    // Held by webhook-a with a 1 s lease: first sight, so we follow.
    go_tx.send(()).await.unwrap();
    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond(200, &lease("webhook-a", "5", 1, 0));
    assert!(!done_rx.recv().await.unwrap());
    // The record stays unchanged for longer than its duration (measured from
    // when the attempt above saw it): take over, under the version read.
    // Another replica got there first (409).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    go_tx.send(()).await.unwrap();
    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond(200, &lease("webhook-a", "5", 1, 0));
    let take_over = api.expect(Method::PUT, LEASE_PATH).await;
    assert_eq!(take_over.body["metadata"]["resourceVersion"], "5");
    assert_eq!(take_over.body["spec"]["holderIdentity"], "webhook-b");
    assert_eq!(take_over.body["spec"]["leaseTransitions"], 1);
    take_over.respond(
        409,
        &status(409, "Conflict", "the object has been modified"),
    );
    assert!(
        !done_rx.recv().await.unwrap(),
        "a lost race is not leadership"
    );
    // The winner renews: we see a new record and follow it, writing nothing.
    go_tx.send(()).await.unwrap();
    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond(200, &lease("webhook-c", "6", 15, 1));
    assert!(!done_rx.recv().await.unwrap());
    drop(go_tx);
    finish(api, campaign).await;
}

#[tokio::test]
async fn the_leader_bootstraps_then_releases_the_lease_on_shutdown() {
    let (client, mut api) = ApiServer::client();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = AdmissionMetrics::register(&mut registry);
    let mut config = config();
    config.timing.retry_period = Duration::from_secs(600); // one round in this test
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(bootstrap::run(client, config, metrics.clone(), async {
        let _ = stop_rx.await;
    }));

    api.expect(Method::GET, LEASE_PATH).await.not_found(
        "leases.coordination.k8s.io",
        "hsm-secrets-webhook-bootstrap",
    );
    let create = api.expect(Method::POST, LEASES_PATH).await;
    let mut held = create.body.clone();
    held["metadata"]["resourceVersion"] = "1".into();
    create.respond(201, &held);
    api.expect(Method::GET, SECRET_PATH)
        .await
        .not_found("secrets", "hsm-secrets-webhook-tls");
    let create = api.expect(Method::POST, SECRETS_PATH).await;
    let ca = data(&create.body, "ca.crt");
    let secret = create.body.clone();
    create.respond(201, &secret);
    expect_ca_bundle_patch(
        &mut api,
        MUTATING_PATH,
        "MutatingWebhookConfiguration",
        MUTATING_WEBHOOKS,
        &ca,
    )
    .await;
    expect_ca_bundle_patch(
        &mut api,
        VALIDATING_PATH,
        "ValidatingWebhookConfiguration",
        VALIDATING_WEBHOOKS,
        &ca,
    )
    .await;

    // Poll the metrics until the pass is recorded, then stop.
    let text = || hsm_secrets_webhook::metrics::encode_text(&registry);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !text().contains(r#"hsm_secrets_webhook_bootstrap_passes_total{outcome="changed"} 1"#) {
        assert!(tokio::time::Instant::now() < deadline, "{}", text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(text().contains("hsm_secrets_webhook_bootstrap_leader 1"));
    stop_tx.send(()).unwrap();

    api.expect(Method::GET, LEASE_PATH)
        .await
        .respond(200, &held);
    let release = api.expect(Method::PUT, LEASE_PATH).await;
    assert!(
        release.body["spec"].get("holderIdentity").is_none(),
        "{}",
        release.body
    );
    assert_eq!(release.body["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(release.body["metadata"]["resourceVersion"], "1");
    let released = release.body.clone();
    release.respond(200, &released);
    finish(api, run).await;
    assert!(text().contains("hsm_secrets_webhook_bootstrap_leader 0"));
}
