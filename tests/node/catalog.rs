//! Where the node finds HSMSecrets: the static YAML catalog and the Kubernetes cache
//! (a reflector, driven here by a scripted API server).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hsm_secrets::node::{CatalogError, KubeCatalog, SecretCatalog, StaticCatalog};

const GOOD: &str = r#"
# Two HSMSecrets, as `kubectl apply -f` takes them.
---
apiVersion: hsmsecrets.io/v1alpha1
kind: HSMSecret
metadata:
  name: db
  namespace: shop
spec:
  deviceRef: prod-hsm
  access:
    serviceAccounts: [checkout]
---
apiVersion: hsmsecrets.io/v1alpha1
kind: HSMSecret
metadata: {name: db, namespace: bank}
spec: {deviceRef: bank-hsm}
---
"#;

#[tokio::test]
async fn static_catalog_loads_hsmsecret_documents() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("catalog.yaml");
    std::fs::write(&file, GOOD).unwrap();
    let catalog = StaticCatalog::from_yaml_file(&file).unwrap();
    assert_eq!(catalog.len(), 2);
    catalog.ready().await.unwrap();
    let db = catalog.hsm_secret("shop", "db").await.unwrap().unwrap();
    assert_eq!(db.spec.device_ref, "prod-hsm");
    assert_eq!(db.spec.allowed_service_accounts(), ["checkout"]);
    let bank = catalog.hsm_secret("bank", "db").await.unwrap().unwrap();
    assert_eq!(bank.spec.device_ref, "bank-hsm");
    assert!(catalog.hsm_secret("shop", "api").await.unwrap().is_none());
    assert!(catalog.hsm_secret("other", "db").await.unwrap().is_none());
}

/// Each broken file gives an error naming the file, the document and the fix.
#[test]
fn static_catalog_refuses_bad_files_clearly() {
    let secret = |meta: &str, spec: &str| {
        format!(
            "apiVersion: hsmsecrets.io/v1alpha1\nkind: HSMSecret\nmetadata: {meta}\nspec: {spec}\n"
        )
    };
    let ok = secret("{name: db, namespace: shop}", "{deviceRef: prod-hsm}");
    let rows: Vec<(String, &str, Vec<&str>)> = vec![
        ("a: [unclosed".into(), "yaml", vec!["not valid YAML"]),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n".into(),
            "document",
            vec!["document 1", "ConfigMap", "kind: HSMSecret"],
        ),
        (
            format!("{ok}---\napiVersion: hsmsecrets.io/v1\nkind: HSMSecret\n"),
            "document",
            vec!["document 2", "hsmsecrets.io/v1alpha1"],
        ),
        (
            secret("{name: db}", "{deviceRef: prod-hsm}"),
            "document",
            vec!["metadata.namespace", "set both"],
        ),
        (
            secret("{name: db, namespace: shop}", "{}"),
            "document",
            vec!["deviceRef", "HSMSecret CRD"],
        ),
        (
            secret("{name: db, namespace: shop}", "{deviceRef: ''}"),
            "document",
            vec!["empty spec.deviceRef"],
        ),
        (
            secret("{name: DB, namespace: shop}", "{deviceRef: prod-hsm}"),
            "document",
            vec!["\"DB\"", "Kubernetes names"],
        ),
        (
            secret(
                "{name: db, namespace: shop}",
                "{deviceRef: prod-hsm, access: {serviceAccounts: checkout}}",
            ),
            "document",
            vec!["document 1", "HSMSecret CRD"],
        ),
        (
            format!("{ok}---\n{ok}"),
            "document",
            vec!["document 2", "shop/db appears twice"],
        ),
    ];
    let path = Path::new("/etc/hsm/catalog.yaml");
    for (text, kind, parts) in rows {
        let err = StaticCatalog::from_yaml(path, &text).expect_err(&text);
        assert_eq!(err.kind(), kind, "{text}: {err}");
        let message = err.to_string();
        assert!(message.contains("/etc/hsm/catalog.yaml"), "{message}");
        for part in parts {
            assert!(
                message.contains(part),
                "{message:?} should mention {part:?}"
            );
        }
    }
    let err = StaticCatalog::from_yaml_file(Path::new("/nonexistent/catalog.yaml")).unwrap_err();
    assert!(matches!(err, CatalogError::Read { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/catalog.yaml"),
        "{err}"
    );
}

type Request = http::Request<kube::client::Body>;
type Response = http::Response<kube::client::Body>;

/// A scripted API server: answers requests in order from `script`, holds later ones open
/// (as an idle watch would), and records every URI it saw.
fn api_server(
    script: Vec<(u16, String)>,
) -> (
    kube::Client,
    Arc<Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    let (service, mut handle) = tower_test::mock::pair::<Request, Response>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = seen.clone();
    let task = tokio::spawn(async move {
        let mut script = script.into_iter();
        let mut held = Vec::new();
        while let Some((request, respond)) = handle.next_request().await {
            recorder.lock().unwrap().push(request.uri().to_string());
            match script.next() {
                Some((status, body)) => respond.send_response(
                    http::Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(body.into_bytes()))
                        .unwrap(),
                ),
                None => held.push(respond),
            }
        }
    });
    (kube::Client::new(service, "default"), seen, task)
}

fn secret_json(namespace: &str, name: &str, device: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "hsmsecrets.io/v1alpha1",
        "kind": "HSMSecret",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "5"},
        "spec": {"deviceRef": device},
    })
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn kube_catalog_answers_from_its_cache_without_an_api_call_per_lookup() {
    let list = serde_json::json!({
        "apiVersion": "hsmsecrets.io/v1alpha1",
        "kind": "HSMSecretList",
        "metadata": {"resourceVersion": "10"},
        "items": [secret_json("shop", "db", "prod-hsm")],
    });
    let added = serde_json::json!({
        "type": "ADDED",
        "object": secret_json("shop", "api-key", "prod-hsm"),
    });
    let (client, seen, _server) =
        api_server(vec![(200, list.to_string()), (200, format!("{added}\n"))]);
    let catalog = KubeCatalog::spawn(client);

    eventually("the first list", || async { catalog.ready().await.is_ok() }).await;
    let db = catalog.hsm_secret("shop", "db").await.unwrap().unwrap();
    assert_eq!(db.spec.device_ref, "prod-hsm");
    eventually("the watched HSMSecret", || async {
        catalog
            .hsm_secret("shop", "api-key")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    assert!(catalog.hsm_secret("bank", "db").await.unwrap().is_none());

    let requests_before = seen.lock().unwrap().len();
    for _ in 0..100 {
        assert!(catalog.hsm_secret("shop", "db").await.unwrap().is_some());
        assert!(
            catalog
                .hsm_secret("shop", "missing")
                .await
                .unwrap()
                .is_none()
        );
    }
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.len() <= requests_before + 1,
        "lookups reached the API: {seen:?}"
    );
    for uri in &seen {
        assert!(
            uri.starts_with("/apis/hsmsecrets.io/v1alpha1/hsmsecrets?"),
            "only the cluster-wide list and watch: {uri}"
        );
    }
    assert!(!seen[0].contains("watch=true"), "a list first: {}", seen[0]);
    assert!(seen[1].contains("watch=true"), "then a watch: {}", seen[1]);
}

#[tokio::test]
async fn kube_catalog_is_unavailable_until_synced_and_says_why() {
    let forbidden = serde_json::json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 403,
        "reason": "Forbidden",
        "message": "hsmsecrets.hsmsecrets.io is forbidden: User \"system:serviceaccount:hsm-secrets-system:hsm-secrets-node\" cannot list resource \"hsmsecrets\"",
    });
    let (client, _seen, _server) = api_server(vec![(403, forbidden.to_string())]);
    let catalog = KubeCatalog::spawn(client);
    let err = catalog.hsm_secret("shop", "db").await.unwrap_err();
    assert!(matches!(err, CatalogError::NotSynced { .. }), "{err}");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let reason = loop {
        let reason = catalog.ready().await.unwrap_err().to_string();
        if reason.contains("forbidden") {
            break reason;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no watch error: {reason}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(reason.contains("ClusterRole"), "{reason}");
    assert!(
        catalog.hsm_secret("shop", "db").await.is_err(),
        "no answer (rather than a false NotFound) before the first list"
    );
}
