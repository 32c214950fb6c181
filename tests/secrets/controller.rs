//! `run_kube`, the HSMSecret controller as `hsm-secrets controller` runs it (kube-runtime
//! `Controller`, gated by the Lease), against an in-memory API server answering its
//! concurrent lists and watches, and a real agent as the device's primary (agent
//! protocol over loopback with mutual TLS).
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::time::{Duration, Instant};

use hsm_secrets::hsm::SecretStore;
use hsm_secrets::secret_sync::{SecretSyncMetrics, run_kube};
use kit::fake_api::FakeApi;
use kit::secret::*;
use serde_json::{Value, json};
use tokio::sync::watch;

const HSMSECRET_API: &str = "hsmsecrets.io/v1alpha1";

/// Polls `check` until it holds; panics naming `what` after a minute.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The HSM's data at shop/db and its version.
async fn hsm_content(hsm: &Primary) -> Option<(u64, Vec<(String, Vec<u8>)>)> {
    hsm.store.get(&path()).await.ok().map(|(v, d)| {
        (
            v,
            d.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect(),
        )
    })
}

async fn until_hsm_holds(hsm: &Primary, password: &[u8]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((version, data)) = hsm_content(hsm).await
            && data == pairs(&[("password", password)])
        {
            return version;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the HSM to hold the imported password"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hsmsecret_now(api: &FakeApi) -> Value {
    api.get(HSMSECRET_API, "HSMSecret", Some(NS), "db").unwrap()
}

fn secret_now(api: &FakeApi, name: &str) -> Option<Value> {
    api.get("v1", "Secret", Some(NS), name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_kube_imports_while_leading_reacts_to_watched_secrets_and_stops_when_following() {
    let hsm = Primary::start().await;
    let api = FakeApi::new();
    api.put(device("Ready"));
    api.put(hsmsecret(
        // A day between re-checks: every reconcile here comes from a watch.
        json!({"secretName": "db-copy", "syncInterval": 86400,
            "source": {"secretRef": {"name": "db-import-x7k2p"}, "deleteAfterImport": false}}),
        None,
        false,
    ));
    let source = api.put(import("1", &[("password", b"first")], None));
    let reconciler = hsm.reconciler(api.client(), SecretSyncMetrics::default());
    let (leadership, leading) = watch::channel(false);
    let controller = tokio::spawn(run_kube(api.client(), reconciler, leading));

    // Following: nothing is listed, watched or read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        api.calls("GET hsmsecrets") + api.calls("watch hsmsecrets"),
        0
    );
    assert_eq!(api.calls("GET secrets") + api.calls("watch secrets"), 0);
    assert_eq!(api.calls("GET hsmdevices"), 0);
    assert!(hsm_content(&hsm).await.is_none());

    // Leading: the HSMSecret is imported, its copy made, the status written.
    leadership.send(true).unwrap();
    let first = until_hsm_holds(&hsm, b"first").await;
    let rv = source["metadata"]["resourceVersion"].clone();
    until("the status records the imported source version", || {
        hsmsecret_now(&api)["status"]["importedSourceVersion"] == rv
    })
    .await;
    until("the copy holds the imported data", || {
        secret_now(&api, "db-copy").is_some_and(|s| data_of(&s) == pairs(&[("password", b"first")]))
    })
    .await;
    let object = hsmsecret_now(&api);
    assert_eq!(
        object["metadata"]["finalizers"],
        json!([hsm_secrets::crd::FINALIZER])
    );
    let copy = secret_now(&api, "db-copy").unwrap();
    assert_eq!(
        copy["metadata"]["ownerReferences"][0]["uid"],
        object["metadata"]["uid"]
    );
    // Secrets are watched as metadata only: their data never reaches the controller
    // through a watch.
    assert!(api.calls("watch secrets") >= 2);
    assert!(api.calls("GET secrets") >= 2);

    // A watched change of the import Secret (new resourceVersion) re-imports.
    let source = api.put(import("1", &[("password", b"second")], None));
    let second = until_hsm_holds(&hsm, b"second").await;
    assert!(second > first, "a new HSM version: {first} → {second}");
    let rv = source["metadata"]["resourceVersion"].clone();
    until("the status records the re-imported source version", || {
        hsmsecret_now(&api)["status"]["importedSourceVersion"] == rv
    })
    .await;

    // A watched change of the owned copy (edited by hand) puts the HSM content back.
    until("the copy holds the re-imported data", || {
        secret_now(&api, "db-copy")
            .is_some_and(|s| data_of(&s) == pairs(&[("password", b"second")]))
    })
    .await;
    let mut tampered = secret_now(&api, "db-copy").unwrap();
    tampered["data"] = json!({"password": b64(b"edited")});
    api.put(tampered);
    until("the copy is restored from the HSM", || {
        secret_now(&api, "db-copy")
            .is_some_and(|s| data_of(&s) == pairs(&[("password", b"second")]))
    })
    .await;

    // Following again: the watches close and a further change is left alone.
    leadership.send(false).unwrap();
    until("the controller's watches are closed", || {
        api.open_watches() == 0
    })
    .await;
    let reads = api.calls("GET hsmdevices");
    let status_writes = api.calls("PATCH hsmsecrets/status");
    api.put(import("1", &[("password", b"third")], None));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(hsm_content(&hsm).await.unwrap().0, second);
    assert_eq!(
        api.calls("GET hsmdevices"),
        reads,
        "no reconcile while following"
    );
    assert_eq!(api.calls("PATCH hsmsecrets/status"), status_writes);

    // Leading again: a fresh start catches up with what changed meanwhile.
    leadership.send(true).unwrap();
    let third = until_hsm_holds(&hsm, b"third").await;
    assert!(third > second);

    // The Lease holder going away ends the controller.
    drop(leadership);
    tokio::time::timeout(Duration::from_secs(30), controller)
        .await
        .expect("run_kube returns once leadership is gone")
        .unwrap();
}
