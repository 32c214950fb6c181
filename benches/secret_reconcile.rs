//! The HSMSecret controller with 10,000 HSMSecrets: its memory, and reconcile throughput.
//!
//! **Memory (the headline)**: the controller runs alone in a child process (this binary
//! re-executed with `SECRET_RECONCILE_ROLE=controller`), as `hsm-secrets controller`
//! runs it: `run_kube` (kube-runtime `Controller`) leading, over plain HTTP to an
//! in-memory API server and over loopback mutual TLS to an agent, both in this parent
//! process. The parent waits until every HSMSecret is imported (HSM write + verify,
//! Secret copy, status, Event, source deleted) and reads the child's VmRSS/VmHWM from
//! /proc. The objects carry what a cluster adds (managedFields, kubectl's
//! last-applied-configuration). Variants, in the same run:
//! - **before**: the previous wiring (`Controller::new` caching whole HSMSecrets, full
//!   Secret watches, unbounded concurrency);
//! - **run_kube**: the shipped wiring (stripped cache, metadata-only Secret watches,
//!   [`CONCURRENCY`] in flight);
//! - **run_kube, MALLOC_ARENA_MAX=2**: the same with glibc's arenas capped.
//!
//! **Throughput** (in process, against a tower service answering from memory), passes
//! over all 10,000 objects, 32 reconciles in flight:
//! - **import**: first reconcile of each;
//! - **steady**: nothing changed (device GET, copy GET, source GET → 404, agent Get; no
//!   write), interleaved with its **floor**: the same reads issued directly.
//!
//! Run: `cargo bench --bench secret_reconcile` (or `--profile dev`).
#![allow(clippy::unwrap_used)]

use hsm_secrets_testkit as kit;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use hsm_secrets::crd::{
    FINALIZER, HSMSecret, HSMSecretSpec, HSMSecretStatus, LocalSecretRef, SecretSource,
};
use hsm_secrets::hsm::{SecretPath, SecretStore};
use hsm_secrets::mirror::{AgentConnection, Peer};
use hsm_secrets::secret_sync::{
    AgentDirectory, Cluster, DigestKey, KubeCluster, SecretReconciler, SecretSyncMetrics,
};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

const OBJECTS: usize = 10_000;
const NAMESPACES: usize = 100;
const IN_FLIGHT: usize = 32;
const ROUNDS: usize = 3;
const TARGET_MIB: f64 = 60.0;

const ROLE: &str = "SECRET_RECONCILE_ROLE";

fn main() {
    if std::env::var(ROLE).as_deref() == Ok("controller") {
        // As `hsm-secrets controller` builds its runtime.
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(controller::child());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(controller::memory());
    runtime.block_on(run());
}

#[path = "secret_reconcile/controller.rs"]
mod controller;

/// The API server's memory: Secrets and statuses as compact JSON bytes.
#[derive(Default)]
struct Objects {
    secrets: HashMap<String, Vec<u8>>,
    statuses: HashMap<String, Vec<u8>>,
    rv: u64,
}

fn respond(status: u16, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

fn not_found() -> Response<Body> {
    respond(
        404,
        serde_json::to_vec(&kit::mock_api::status(404, "NotFound", "not found")).unwrap(),
    )
}

fn device() -> Vec<u8> {
    serde_json::to_vec(&kit::secret::device("Ready")).unwrap()
}

async fn answer(objects: Arc<Mutex<Objects>>, req: Request<Body>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = req.into_body().collect_bytes().await.unwrap();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut o = objects.lock().unwrap();
    o.rv += 1;
    let rv = o.rv;
    match (method.as_str(), parts.as_slice()) {
        ("GET", ["apis", "hsmsecrets.io", "v1alpha1", "hsmdevices", "dev"]) => {
            respond(200, device())
        }
        ("GET", ["api", "v1", "namespaces", ns, "secrets", name]) => {
            match o.secrets.get(&format!("{ns}/{name}")) {
                Some(s) => respond(200, s.clone()),
                None => not_found(),
            }
        }
        ("POST" | "PUT", ["api", "v1", "namespaces", ns, "secrets", ..]) => {
            let mut v: Value = serde_json::from_slice(&body).unwrap();
            v["metadata"]["resourceVersion"] = json!(rv.to_string());
            let name = v["metadata"]["name"].as_str().unwrap().to_string();
            let bytes = serde_json::to_vec(&v).unwrap();
            o.secrets.insert(format!("{ns}/{name}"), bytes.clone());
            respond(201, bytes)
        }
        ("DELETE", ["api", "v1", "namespaces", ns, "secrets", name]) => {
            o.secrets.remove(&format!("{ns}/{name}"));
            respond(
                200,
                serde_json::to_vec(&kit::mock_api::status(200, "", "")).unwrap(),
            )
        }
        (
            "PATCH",
            [
                "apis",
                "hsmsecrets.io",
                "v1alpha1",
                "namespaces",
                ns,
                "hsmsecrets",
                name,
                "status",
            ],
        ) => {
            let ops: Value = serde_json::from_slice(&body).unwrap();
            let status = serde_json::to_vec(&ops[1]["value"]).unwrap();
            o.statuses.insert(format!("{ns}/{name}"), status);
            respond(
                200,
                serde_json::to_vec(
                    &json!({"apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMSecret",
                    "metadata": {"name": name, "namespace": ns}, "spec": {"deviceRef": "dev"}}),
                )
                .unwrap(),
            )
        }
        (_, ["apis", "events.k8s.io", "v1", "namespaces", ..]) => respond(201, body.to_vec()),
        (m, _) => panic!("unexpected call {m} {path}"),
    }
}

fn object(i: usize) -> HSMSecret {
    let mut o = HSMSecret::new(
        &format!("s-{i}"),
        HSMSecretSpec {
            device_ref: "dev".into(),
            secret_name: Some(format!("s-{i}-copy")),
            secret_type: None,
            sync_interval: None,
            source: Some(SecretSource {
                secret_ref: LocalSecretRef {
                    name: format!("s-{i}-import"),
                },
                delete_after_import: Some(true),
                mode: None,
            }),
            access: None,
            deletion_policy: None,
        },
    );
    o.metadata.namespace = Some(format!("ns-{}", i % NAMESPACES));
    o.metadata.uid = Some(format!("uid-{i}"));
    o.metadata.generation = Some(1);
    o.metadata.resource_version = Some("1".into());
    o.metadata.finalizers = Some(vec![FINALIZER.into()]);
    o
}

fn import_secret(i: usize) -> Vec<u8> {
    let b64 = |s: String| serde_json::to_value(k8s_openapi::ByteString(s.into_bytes())).unwrap();
    serde_json::to_vec(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("s-{i}-import"), "namespace": format!("ns-{}", i % NAMESPACES),
            "resourceVersion": "1", "labels": {"hsmsecrets.io/import-for": format!("s-{i}")}},
        "type": "Opaque",
        "data": {"username": b64(format!("user-{i:05}-0123456789abcdef")),
                 "password": b64(format!("pass-{i:05}-fedcba9876543210"))},
    }))
    .unwrap()
}

/// VmRSS and VmHWM of a process, in KiB.
fn vm_kib(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn run() {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    // A primary agent over an in-memory store, served over mutual TLS.
    let agent = kit::secret::Primary::start().await;
    let (store, primary): (_, AgentConnection) = (&agent.store, agent.primary.clone());

    let objects = Arc::new(Mutex::new(Objects::default()));
    let served = objects.clone();
    let service = tower::service_fn(move |req: Request<Body>| {
        let objects = served.clone();
        async move { Ok::<_, Infallible>(answer(objects, req).await) }
    });
    let client = kube::Client::new(service, "default");
    let cluster = Arc::new(KubeCluster::new(client, None));
    let reconciler = Arc::new(SecretReconciler::new(
        cluster.clone(),
        AgentDirectory::new([primary.clone()]),
        DigestKey::from_bytes(vec![9; 32]).unwrap(),
        SecretSyncMetrics::default(),
    ));

    let mut all: Vec<HSMSecret> = (0..OBJECTS).map(object).collect();
    {
        let mut o = objects.lock().unwrap();
        for i in 0..OBJECTS {
            o.secrets.insert(
                format!("ns-{}/s-{i}-import", i % NAMESPACES),
                import_secret(i),
            );
        }
    }

    // Import pass.
    let started = Instant::now();
    let written = futures::stream::iter(all.iter())
        .map(|o| {
            let r = reconciler.clone();
            async move { r.reconcile(o).await.unwrap().hsm_written }
        })
        .buffer_unordered(IN_FLIGHT)
        .filter(|w| std::future::ready(*w))
        .count()
        .await;
    let import_rate = OBJECTS as f64 / started.elapsed().as_secs_f64();
    assert_eq!(written, OBJECTS);
    assert_eq!(store.manifest().await.unwrap().len(), OBJECTS);
    {
        let o = objects.lock().unwrap();
        assert!(o.secrets.len() == OBJECTS, "copies made, imports deleted");
        for obj in &mut all {
            let key = format!(
                "{}/{}",
                obj.metadata.namespace.as_deref().unwrap(),
                obj.metadata.name.as_deref().unwrap()
            );
            let status: HSMSecretStatus = serde_json::from_slice(&o.statuses[&key]).unwrap();
            obj.status = Some(status);
        }
    }

    // Steady passes interleaved with their floor.
    let mut steady = Vec::new();
    let mut floor = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let writes = futures::stream::iter(all.iter())
            .map(|o| {
                let r = reconciler.clone();
                async move {
                    let out = r.reconcile(o).await.unwrap();
                    usize::from(out.hsm_written || out.secret_written || out.status_written)
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .fold(0, |a, b| std::future::ready(a + b))
            .await;
        steady.push(OBJECTS as f64 / started.elapsed().as_secs_f64());
        assert_eq!(writes, 0, "a steady pass writes nothing");

        let started = Instant::now();
        futures::stream::iter(all.iter())
            .map(|o| {
                let c = cluster.clone();
                let p = primary.clone();
                async move {
                    let ns = o.metadata.namespace.as_deref().unwrap();
                    c.device("dev").await.unwrap();
                    c.secret(ns, o.spec.secret_name.as_deref().unwrap())
                        .await
                        .unwrap();
                    c.secret(ns, &o.spec.source.as_ref().unwrap().secret_ref.name)
                        .await
                        .unwrap();
                    let path = SecretPath::new(ns, o.metadata.name.as_deref().unwrap()).unwrap();
                    p.get(&path).await.unwrap();
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .count()
            .await;
        floor.push(OBJECTS as f64 / started.elapsed().as_secs_f64());
    }
    let (steady, floor) = (median(steady), median(floor));
    println!(
        "\n## HSMSecret reconcile throughput, in process, {OBJECTS} HSMSecrets ({profile} profile, {IN_FLIGHT} in flight)\n"
    );
    println!("| what | figure | floor | ratio |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| import pass (HSM write + verify, copy, status, Event, source delete) | {import_rate:.0} reconciles/s | | |"
    );
    println!(
        "| steady pass, nothing changed (median of {ROUNDS}) | {steady:.0} reconciles/s | {floor:.0} reads/s | {:.2}× floor time |",
        floor / steady
    );
}
