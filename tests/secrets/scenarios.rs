//! The HSMSecret reconciler against the scripted API server (every call checked: method,
//! path, body) and a real agent as the device's primary (writes go through the agent
//! protocol with mutual TLS).
#![allow(clippy::unwrap_used)]

use crate::kit;
use hsm_secrets::crd::FINALIZER;
use hsm_secrets::hsm::SecretStore;
use hsm_secrets::secret_sync::{SyncErrorKind, load_or_create_digest_key};
use kit::secret::*;
use serde_json::{Value, json};

const PASSWORD: &[u8] = b"s3cr3t-db-password";

fn import_spec(mode: &str, delete_after: bool) -> Value {
    json!({
        "secretName": "db-copy",
        "source": {"secretRef": {"name": "db-import-x7k2p"}, "deleteAfterImport": delete_after, "mode": mode},
    })
}

/// Scripts a first import of `data` (source resourceVersion 500) and returns the
/// HSMSecret as it then is (finalizer, status).
async fn first_import(env: &mut Env, spec: Value, data: &[(&str, &[u8])]) -> Value {
    let delete_after = spec["source"]["deleteAfterImport"] == json!(true);
    let obj = hsmsecret(spec, None, false);
    let task = env.reconcile(&obj);
    env.device("Ready").await;
    env.get_secret("db-copy", None).await;
    let mut obj = env.add_finalizer(&obj).await;
    env.get_secret("db-import-x7k2p", Some(import("500", data, None)))
        .await;

    let created = env.expect("POST", SECRETS).await;
    let body = created.body.clone();
    let (version, held) = env.hsm().await.expect("the import reached the HSM");
    assert_eq!(held, pairs(data));
    assert_eq!(body["metadata"]["name"], "db-copy");
    assert_eq!(body["metadata"]["namespace"], NS);
    assert_eq!(body["type"], "Opaque");
    assert_eq!(
        body["metadata"]["ownerReferences"],
        json!([{"apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMSecret", "name": "db",
            "uid": UID, "controller": true, "blockOwnerDeletion": true}])
    );
    assert_eq!(
        body["metadata"]["labels"],
        json!({"hsmsecrets.io/device": "dev", "hsmsecrets.io/version": version.to_string()})
    );
    assert_eq!(data_of(&body), pairs(data));
    let mut reply = body.clone();
    reply["metadata"]["resourceVersion"] = json!("7");
    created.reply(201, reply);

    let status = env.status("2").await;
    assert_eq!(status["syncStatus"], "InSync", "{status}");
    assert_eq!(status["version"], version);
    assert_eq!(status["importedSourceVersion"], "500");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["servedBy"], json!({"node": "n1", "role": "Primary"}));
    let mut keys: Vec<&str> = data.iter().map(|(k, _)| *k).collect();
    keys.sort();
    assert_eq!(status["keys"], json!(keys));
    assert!(
        status["digest"]
            .as_str()
            .unwrap()
            .starts_with("hmac-sha256:")
    );
    assert_eq!(status["conditions"][0]["type"], "Ready");
    assert_eq!(status["conditions"][0]["status"], "True");
    assert!(status.get("lastError").is_none());
    let (type_, reason, _) = env.event().await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Normal", "HSMSecretSynced")
    );
    if delete_after {
        env.delete_secret("db-import-x7k2p", "500").await;
    }
    let out = done(task).await;
    assert!(out.hsm_written && out.secret_written && out.status_written);
    assert_eq!(out.source_deleted, delete_after);
    assert_eq!(out.error, None);
    obj["status"] = status;
    obj["metadata"]["resourceVersion"] = json!("3");
    obj
}

#[tokio::test]
async fn first_import_writes_the_hsm_verifies_it_creates_the_copy_and_deletes_the_source() {
    let mut env = Env::start().await;
    first_import(
        &mut env,
        import_spec("Replace", true),
        &[("user", b"app"), ("password", PASSWORD)],
    )
    .await;
    let record = env.store.record(&path()).await.unwrap();
    record.verify().unwrap();
    assert_eq!(
        record.path.to_string(),
        "shop/db",
        "the path is the HSMSecret's own"
    );
}

#[tokio::test]
async fn an_unchanged_source_is_not_written_again_and_nothing_else_is_written() {
    let mut env = Env::start().await;
    let data: &[(&str, &[u8])] = &[("user", b"app"), ("password", PASSWORD)];
    let obj = first_import(&mut env, import_spec("Replace", false), data).await;
    let version = obj["status"]["version"].as_u64().unwrap();
    let sequence = env.sequence();

    // The same source version again: only reads.
    let task = env.reconcile(&obj);
    env.device("Ready").await;
    env.get_secret("db-copy", Some(copy("7", data, version)))
        .await;
    env.get_secret("db-import-x7k2p", Some(import("500", data, None)))
        .await;
    let out = done(task).await;
    assert!(!out.hsm_written && !out.secret_written && !out.status_written);
    assert_eq!(env.sequence(), sequence, "no HSM write");

    // A new source version with the same content: recorded as imported, no HSM write,
    // no Secret write.
    let task = env.reconcile(&obj);
    env.device("Ready").await;
    env.get_secret("db-copy", Some(copy("7", data, version)))
        .await;
    env.get_secret("db-import-x7k2p", Some(import("501", data, None)))
        .await;
    let status = env.status("3").await;
    assert_eq!(status["importedSourceVersion"], "501");
    assert_eq!(status["version"], version);
    let out = done(task).await;
    assert!(!out.hsm_written && !out.secret_written && out.status_written);
    assert_eq!(env.sequence(), sequence, "no HSM write");
}

#[tokio::test]
async fn a_drifted_copy_is_put_back_to_the_hsm_content() {
    let mut env = Env::start().await;
    let data: &[(&str, &[u8])] = &[("user", b"app"), ("password", PASSWORD)];
    let obj = first_import(&mut env, import_spec("Replace", true), data).await;
    let version = obj["status"]["version"].as_u64().unwrap();

    let mut drifted = copy(
        "8",
        &[("user", b"app"), ("password", b"edited-by-hand")],
        version,
    );
    drifted["metadata"]["labels"]["team"] = json!("payments");
    let task = env.reconcile(&obj);
    env.device("Ready").await;
    env.get_secret("db-copy", Some(drifted)).await;
    env.get_secret("db-import-x7k2p", None).await;
    let put = env.expect("PUT", &format!("{SECRETS}/db-copy")).await;
    assert_eq!(put.body["metadata"]["resourceVersion"], "8");
    assert_eq!(data_of(&put.body), pairs(data));
    assert_eq!(
        put.body["metadata"]["labels"]["team"], "payments",
        "labels others added are kept"
    );
    let reply = put.body.clone();
    put.reply(200, reply);
    let status = env.status("3").await;
    assert_eq!(status["syncStatus"], "InSync");
    let (_, reason, _) = env.event().await;
    assert_eq!(reason, "HSMSecretSynced");
    let out = done(task).await;
    assert!(out.secret_written && !out.hsm_written);
}

#[tokio::test]
async fn a_secret_it_does_not_control_is_reported_and_left_alone() {
    let mut env = Env::start().await;
    env.seed(&[("user", b"app")]).await;
    let obj = hsmsecret(json!({"secretName": "db-copy"}), None, false);
    let foreign = secret(
        "db-copy",
        "4",
        &[("user", b"someone-elses")],
        None,
        json!({}),
        json!({}),
    );
    let task = env.reconcile(&obj);
    env.device("Ready").await;
    env.get_secret("db-copy", Some(foreign)).await;
    env.add_finalizer(&obj).await;
    let status = env.status("2").await;
    assert_eq!(status["syncStatus"], "Error");
    assert_eq!(status["conditions"][0]["reason"], "SecretNotOwned");
    assert!(
        status["lastError"]
            .as_str()
            .unwrap()
            .contains("Secret shop/db-copy exists and is not controlled by this HSMSecret"),
        "{status}"
    );
    let (type_, reason, _) = env.event().await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Warning", "HSMSecretSyncFailed")
    );
    let out = done(task).await;
    assert_eq!(out.error, Some(SyncErrorKind::SecretNotOwned));
    assert!(!out.secret_written);
}

#[tokio::test]
async fn a_read_only_device_refuses_the_import_in_status_without_an_hsm_write() {
    let mut env = Env::start().await;
    env.seed(&[("user", b"old")]).await;
    let before = env.hsm().await;
    let sequence = env.sequence();
    let obj = hsmsecret(
        json!({"source": {"secretRef": {"name": "db-import-x7k2p"}, "deleteAfterImport": true}}),
        None,
        true,
    );
    let task = env.reconcile(&obj);
    env.device("ReadOnlyFallback").await;
    env.get_secret(
        "db-import-x7k2p",
        Some(import("600", &[("user", b"new")], None)),
    )
    .await;
    let status = env.status("1").await;
    assert_eq!(status["syncStatus"], "Error");
    assert!(status.get("importedSourceVersion").is_none());
    let error = status["lastError"].as_str().unwrap();
    assert!(
        error.contains("HSMDevice dev has no writable primary")
            && error.contains("nothing was written"),
        "{error}"
    );
    assert_eq!(status["conditions"][0]["reason"], "DeviceReadOnly");
    let (type_, reason, _) = env.event().await;
    assert_eq!(
        (type_.as_str(), reason.as_str()),
        ("Warning", "HSMSecretSyncFailed")
    );
    let out = done(task).await;
    assert_eq!(out.error, Some(SyncErrorKind::ReadOnly));
    assert!(!out.hsm_written && !out.source_deleted);
    assert_eq!(env.sequence(), sequence, "no HSM write");
    assert_eq!(env.hsm().await, before);
}

fn deleting(policy: &str) -> Value {
    let mut obj = hsmsecret(
        json!({"secretName": "db-copy", "deletionPolicy": policy}),
        None,
        true,
    );
    obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    obj["metadata"]["finalizers"] = json!(["example.com/other", FINALIZER]);
    obj
}

async fn release_finalizer(env: &mut Env) {
    let seen = env.expect("PATCH", &format!("{HSMSECRETS}/db")).await;
    assert_eq!(
        seen.body,
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
            {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/other"]},
        ])
    );
    seen.reply(200, deleting("Retain"));
}

#[tokio::test]
async fn deleting_with_retain_removes_the_copy_and_keeps_the_hsm_data() {
    let mut env = Env::start().await;
    let version = env.seed(&[("user", b"app")]).await;
    let obj = deleting("Retain");
    let task = env.reconcile(&obj);
    env.device("Ready").await;
    env.get_secret("db-copy", Some(copy("8", &[("user", b"app")], version)))
        .await;
    env.delete_secret("db-copy", "8").await;
    release_finalizer(&mut env).await;
    let out = done(task).await;
    assert!(out.finalized && !out.hsm_written);
    assert_eq!(env.hsm().await.unwrap().0, version, "HSM data kept");
}

#[tokio::test]
async fn deleting_with_delete_tombstones_the_hsm_data_on_the_primary() {
    let mut env = Env::start().await;
    let version = env.seed(&[("user", b"app")]).await;
    let obj = deleting("Delete");
    let task = env.reconcile(&obj);
    env.device("Ready").await;
    env.get_secret("db-copy", Some(copy("8", &[("user", b"app")], version)))
        .await;
    env.delete_secret("db-copy", "8").await;
    release_finalizer(&mut env).await;
    let out = done(task).await;
    assert!(out.finalized && out.hsm_written);
    assert_eq!(env.hsm().await, None);
    let record = env.store.record(&path()).await.unwrap();
    assert!(record.is_deleted(), "a tombstone, so mirrors delete it too");
    assert!(record.version > version);
}

#[tokio::test]
async fn deleting_with_delete_waits_for_a_writable_primary() {
    let mut env = Env::start().await;
    let version = env.seed(&[("user", b"app")]).await;
    let mut obj = deleting("Delete");
    obj["spec"].as_object_mut().unwrap().remove("secretName");
    let task = env.reconcile(&obj);
    env.device("ReadOnlyFallback").await;
    let status = env.status("1").await;
    assert_eq!(status["conditions"][0]["reason"], "DeviceReadOnly");
    env.event().await;
    let out = done(task).await;
    assert!(!out.finalized, "the finalizer stays");
    assert_eq!(env.hsm().await.unwrap().0, version);
}

#[tokio::test]
async fn a_reference_into_another_namespace_is_impossible() {
    let mut env = Env::start().await;
    let sequence = env.sequence();
    let obj = hsmsecret(
        json!({"source": {"secretRef": {"name": "payments/db-creds"}}}),
        None,
        false,
    );
    let task = env.reconcile(&obj);
    env.device("Ready").await;
    env.add_finalizer(&obj).await;
    // No GET of any Secret: the scripted server would see it before the status patch.
    let status = env.status("2").await;
    assert_eq!(status["conditions"][0]["reason"], "InvalidSource");
    let error = status["lastError"].as_str().unwrap();
    assert!(
        error.contains("\"payments/db-creds\"") && error.contains("own namespace shop"),
        "{error}"
    );
    env.event().await;
    let out = done(task).await;
    assert_eq!(out.error, Some(SyncErrorKind::InvalidSource));
    assert_eq!(env.sequence(), sequence);
}

#[tokio::test]
async fn merge_keeps_other_keys_and_removes_the_named_ones_replace_drops_the_rest() {
    let mut env = Env::start().await;
    env.seed(&[("a", b"1"), ("b", b"2"), ("c", b"3")]).await;
    let spec = json!({"source": {"secretRef": {"name": "db-import-x7k2p"}, "deleteAfterImport": true, "mode": "Merge"}});
    let obj = hsmsecret(spec, None, true);
    let task = env.reconcile(&obj);
    env.device("Ready").await;
    env.get_secret(
        "db-import-x7k2p",
        Some(import("501", &[("d", b"4"), ("a", b"1-new")], Some("b"))),
    )
    .await;
    let status = env.status("1").await;
    assert_eq!(status["keys"], json!(["a", "c", "d"]));
    assert_eq!(status["importedSourceVersion"], "501");
    env.event().await;
    env.delete_secret("db-import-x7k2p", "501").await;
    assert!(done(task).await.hsm_written);
    assert_eq!(
        env.hsm().await.unwrap().1,
        pairs(&[("a", b"1-new"), ("c", b"3"), ("d", b"4")])
    );

    let spec = json!({"source": {"secretRef": {"name": "db-import-x7k2p"}, "deleteAfterImport": true, "mode": "Replace"}});
    let obj = hsmsecret(spec, Some(status), true);
    let task = env.reconcile(&obj);
    env.device("Ready").await;
    env.get_secret("db-import-x7k2p", Some(import("502", &[("x", b"9")], None)))
        .await;
    let status = env.status("1").await;
    assert_eq!(status["keys"], json!(["x"]));
    env.event().await;
    env.delete_secret("db-import-x7k2p", "502").await;
    assert!(done(task).await.hsm_written);
    assert_eq!(env.hsm().await.unwrap().1, pairs(&[("x", b"9")]));
}

#[tokio::test]
async fn the_digest_key_secret_is_created_once_and_then_reused() {
    let (client, mut api) = kit::mock_api::client();
    let path = "/api/v1/namespaces/hsm-secrets-system/secrets/hsm-secrets-digest-key";
    let c = client.clone();
    let task =
        tokio::spawn(async move { load_or_create_digest_key(c, "hsm-secrets-system").await });
    let seen = kit::mock_api::next(&mut api).await;
    assert_eq!((seen.method.as_str(), seen.path()), ("GET", path));
    seen.reply(404, kit::mock_api::status(404, "NotFound", "not found"));
    let seen = kit::mock_api::next(&mut api).await;
    assert_eq!(
        (seen.method.as_str(), seen.path()),
        ("POST", "/api/v1/namespaces/hsm-secrets-system/secrets")
    );
    let body = seen.body.clone();
    assert_eq!(body["metadata"]["name"], "hsm-secrets-digest-key");
    let key = serde_json::from_value::<k8s_openapi::ByteString>(body["data"]["key"].clone())
        .unwrap()
        .0;
    assert_eq!(key.len(), 32);
    seen.reply(201, body.clone());
    let created = task.await.unwrap().unwrap();
    assert_eq!(created.bytes(), key.as_slice());

    let task =
        tokio::spawn(async move { load_or_create_digest_key(client, "hsm-secrets-system").await });
    let seen = kit::mock_api::next(&mut api).await;
    assert_eq!((seen.method.as_str(), seen.path()), ("GET", path));
    seen.reply(200, body);
    assert_eq!(task.await.unwrap().unwrap().bytes(), key.as_slice());
}
