//! The hsm-secrets rules behind the real `serve` over TLS, with a CA and
//! serving certificate issued the way `--bootstrap-certificates` issues them.
#![allow(clippy::unwrap_used)]

use crate::kit;
use hsm_secrets::admission::certificates;
use hsm_secrets_webhook::TlsReloader;
use hsm_secrets_webhook::tls::Reload;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kit::admission::{
    DeviceHealth, SERVICE_DNS, TlsServer, app, cluster, fixture, https_connect, https_send,
    serving_identity, write_pair,
};
use serde_json::Value;

#[tokio::test]
async fn a_real_mutation_over_https_with_bootstrap_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let bundle =
        certificates::issue_authority_and_leaf(&serving_identity(), Timestamp::now()).unwrap();
    let (cert, key) = write_pair(dir.path(), &bundle.cert_pem, &bundle.key_pem);
    let tls = TlsReloader::load(&cert, &key).unwrap();
    let (_, _, webhook) = app(cluster(DeviceHealth::Ready));
    let server = TlsServer::start(webhook, tls.clone()).await;

    // Trusting only the issued CA, under the Service's DNS name, as the API server does.
    let (mut sender, first_leaf) =
        https_connect(server.addr, &bundle.ca_cert_pem, SERVICE_DNS).await;
    let original = fixture("pod_create_typical.json");
    let (status, body) = https_send(
        &mut sender,
        http::Method::POST,
        "/mutate",
        serde_json::to_vec(&original).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    let answer = &answer["response"];
    assert_eq!(answer["uid"], original["request"]["uid"]);
    assert_eq!(answer["allowed"], true);
    let ByteString(patch) = serde_json::from_value(answer["patch"].clone()).unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = original["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    let pod: Pod = serde_json::from_value(pod).unwrap();
    let spec = pod.spec.unwrap();
    let volume = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "hsm-secrets")
        .expect("injected volume");
    assert_eq!(volume.csi.unwrap().driver, "csi.hsmsecrets.io");
    assert!(spec.containers.iter().all(|c| {
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "hsm-secrets" && m.mount_path == "/var/run/hsm-secrets")
    }));

    // Same keep-alive connection: a validation.
    let (status, body) = https_send(
        &mut sender,
        http::Method::POST,
        "/validate",
        serde_json::to_vec(&fixture("hsmsecret_create_import.json")).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["response"]["allowed"], true);

    // A renewed serving certificate (same CA) is picked up without a restart
    // and trusted through the caBundle the API server already has.
    let renewed = certificates::issue_leaf(
        &bundle.ca_cert_pem,
        &bundle.ca_key_pem,
        &serving_identity(),
        Timestamp::now(),
    )
    .unwrap();
    assert_eq!(renewed.ca_cert_pem, bundle.ca_cert_pem);
    write_pair(dir.path(), &renewed.cert_pem, &renewed.key_pem);
    assert_eq!(tls.reload().await.unwrap(), Reload::Reloaded);
    let (mut sender, second_leaf) =
        https_connect(server.addr, &bundle.ca_cert_pem, SERVICE_DNS).await;
    assert_ne!(
        first_leaf, second_leaf,
        "new connections get the renewed certificate"
    );
    let (status, _) = https_send(&mut sender, http::Method::GET, "/readyz", Vec::new()).await;
    assert_eq!(status, 200);

    server.shutdown().await;
}
