//! The memory section: the controller alone in a child process, the API server and the
//! agent in this one.

use std::process::Stdio;
use std::time::Duration;

use hsm_secrets::mirror::{AgentTls, TlsFiles};
use hsm_secrets::secret_sync::{CONCURRENCY, run_kube};
use k8s_openapi::api::core::v1::Secret;
use kit::fake_api::FakeApi;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tokio::sync::watch;

use super::*;

const API_VERSION: &str = "hsmsecrets.io/v1alpha1";
const TIME: &str = "2026-01-01T00:00:00Z";

struct Variant {
    name: &'static str,
    what: &'static str,
    arena_max: Option<&'static str>,
}

const VARIANTS: [Variant; 3] = [
    Variant {
        name: "before",
        what: "previous wiring: `Controller::new`, whole HSMSecrets cached, full Secret watches, unbounded concurrency",
        arena_max: None,
    },
    Variant {
        name: "run_kube",
        what: "`run_kube`: stripped cache, metadata-only Secret watches, bounded concurrency",
        arena_max: None,
    },
    Variant {
        name: "run_kube",
        what: "`run_kube`, `MALLOC_ARENA_MAX=2`",
        arena_max: Some("2"),
    },
];

/// What a cluster adds to an applied object: kubectl's copy of it and managedFields.
fn as_applied(mut object: Value, spec_fields: Value, controller_fields: Value) -> Value {
    let applied = serde_json::to_string(&json!({
        "apiVersion": object["apiVersion"], "kind": object["kind"],
        "metadata": {"name": object["metadata"]["name"], "namespace": object["metadata"]["namespace"]},
        "spec": object["spec"], "data": object["data"], "type": object["type"],
    }))
    .unwrap();
    object["metadata"]["annotations"] =
        json!({"kubectl.kubernetes.io/last-applied-configuration": applied});
    let entry = |manager: &str, sub: Option<&str>, fields: Value| {
        let mut e = json!({"manager": manager, "operation": "Update",
            "apiVersion": object["apiVersion"], "time": TIME, "fieldsType": "FieldsV1",
            "fieldsV1": fields});
        if let Some(sub) = sub {
            e["subresource"] = json!(sub);
        }
        e
    };
    object["metadata"]["managedFields"] = json!([
        entry("kubectl-client-side-apply", None, spec_fields),
        entry(
            "hsm-secrets-controller",
            None,
            json!({"f:metadata": {"f:finalizers": {".": {}, "v:\"hsmsecrets.io/finalizer\"": {}}}})
        ),
        entry("hsm-secrets-controller", Some("status"), controller_fields),
    ]);
    object
}

fn hsmsecret(i: usize) -> Value {
    let mut o = serde_json::to_value(object(i)).unwrap();
    o["metadata"]["uid"] = Value::Null;
    o["metadata"]["resourceVersion"] = Value::Null;
    as_applied(
        o,
        json!({"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
            "f:spec": {".": {}, "f:deviceRef": {}, "f:secretName": {},
                "f:source": {".": {}, "f:deleteAfterImport": {}, "f:secretRef": {".": {}, "f:name": {}}}}}),
        json!({"f:status": {".": {}, "f:conditions": {}, "f:digest": {}, "f:hsmVersion": {},
            "f:importedSourceVersion": {}, "f:observedGeneration": {}, "f:servedBy": {}}}),
    )
}

fn source(i: usize) -> Value {
    let mut s: Value = serde_json::from_slice(&import_secret(i)).unwrap();
    s["metadata"]["resourceVersion"] = Value::Null;
    as_applied(
        s,
        json!({"f:data": {".": {}, "f:password": {}, "f:username": {}},
            "f:metadata": {"f:labels": {".": {}, "f:hsmsecrets.io/import-for": {}}}, "f:type": {}}),
        json!({}),
    )
}

struct Measured {
    /// Seconds from the child's start until every status names its import.
    seconds: f64,
    /// When the first imports show (the caches filled).
    first: (u64, u64),
    done: (u64, u64),
    idle: (u64, u64),
    fixture: (u64, u64),
}

async fn measure(variant: &Variant) -> Measured {
    // A primary agent over an in-memory store, served over mutual TLS.
    let agent = kit::secret::Primary::start().await;
    let (pki, store) = (&agent.pki, &agent.store);
    let endpoint = agent.primary.peer().endpoint.clone();

    let api = FakeApi::new();
    api.put(serde_json::from_slice(&device()).unwrap());
    for i in 0..OBJECTS {
        api.put(hsmsecret(i));
        api.put(source(i));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let api_task = tokio::spawn(api.clone().serve(listener));

    let files = pki.generated.files(kit::mirror::CONTROLLER).unwrap();
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .env(ROLE, "controller")
        .env("BENCH_VARIANT", variant.name)
        .env("BENCH_API", &url)
        .env("BENCH_AGENT", &endpoint)
        .env("BENCH_CA", &files.ca)
        .env("BENCH_CERT", &files.cert)
        .env("BENCH_KEY", &files.key)
        .env_remove("MALLOC_ARENA_MAX")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    if let Some(max) = variant.arena_max {
        command.env("MALLOC_ARENA_MAX", max);
    }
    let started = Instant::now();
    let mut child = command.spawn().unwrap();
    let pid = child.id().unwrap().to_string();
    let mut first = None;
    loop {
        let imported = api.count(API_VERSION, "HSMSecret", |o| {
            !o["status"]["importedSourceVersion"].is_null()
        });
        if imported == OBJECTS {
            break;
        }
        if imported > 0 && first.is_none() {
            first = Some(vm_kib(&pid));
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the controller exited early"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "{imported} of {OBJECTS} imported after 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let done = vm_kib(&pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = vm_kib(&pid);
    assert_eq!(store.manifest().await.unwrap().len(), OBJECTS);
    child.kill().await.unwrap();
    let fixture = vm_kib("self");
    api_task.abort();
    agent.server.abort();
    Measured {
        seconds,
        first: first.unwrap_or_default(),
        done,
        idle,
        fixture,
    }
}

pub async fn memory() {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    // The previous wiring takes minutes (10,000 reconciles at once): opt in.
    let before = std::env::var("SECRET_RECONCILE_BEFORE").is_ok_and(|v| v == "1");
    let mut rows = Vec::new();
    for variant in VARIANTS.iter().filter(|v| before || v.name != "before") {
        rows.push((variant, measure(variant).await));
    }
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "\n## HSMSecret controller process, {OBJECTS} HSMSecrets imported ({profile} profile, its own process)\n"
    );
    println!(
        "| controller | VmHWM (peak) | VmRSS at the first imports | VmRSS when all imported | VmRSS 3 s later | imports/s (from process start) | target ≤ {TARGET_MIB} MiB |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (variant, m) in &rows {
        println!(
            "| {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.0} | {} |",
            variant.what,
            mib(m.done.1.max(m.idle.1)),
            mib(m.first.0),
            mib(m.done.0),
            mib(m.idle.0),
            OBJECTS as f64 / m.seconds,
            if mib(m.done.1.max(m.idle.1)) <= TARGET_MIB {
                "within"
            } else {
                "ABOVE"
            }
        );
    }
    let fixture = rows
        .iter()
        .map(|(_, m)| m.fixture.1)
        .max()
        .unwrap_or_default();
    println!(
        "\n(Not counted above: this parent process holding the API server's objects and the agent's store peaked at {:.1} MiB. Concurrency of `run_kube`: {CONCURRENCY}.)",
        mib(fixture)
    );
}

/// The controller process.
pub async fn child() {
    let var = |k: &str| std::env::var(k).unwrap();
    let client =
        kube::Client::try_from(kube::Config::new(var("BENCH_API").parse().unwrap())).unwrap();
    let tls = AgentTls::from_files(&TlsFiles {
        ca: var("BENCH_CA").into(),
        cert: var("BENCH_CERT").into(),
        key: var("BENCH_KEY").into(),
    })
    .unwrap();
    let primary = AgentConnection::new(
        &Peer {
            node: "n1".into(),
            endpoint: var("BENCH_AGENT"),
        },
        &tls,
        Duration::from_secs(60),
    )
    .unwrap();
    let reconciler = Arc::new(SecretReconciler::new(
        Arc::new(KubeCluster::new(client.clone(), None)),
        AgentDirectory::new([primary]),
        DigestKey::from_bytes(vec![9; 32]).unwrap(),
        SecretSyncMetrics::default(),
    ));
    let (_leadership, leading) = watch::channel(true);
    if var("BENCH_VARIANT") == "before" {
        previous(client, reconciler).await;
    } else {
        run_kube(client, reconciler, leading).await;
    }
}

/// The wiring `run_kube` had before: for comparison only.
async fn previous(client: kube::Client, reconciler: Arc<SecretReconciler<KubeCluster>>) {
    Controller::new(
        Api::<HSMSecret>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default().labels("hsmsecrets.io/device"),
    )
    .watches(
        Api::<Secret>::all(client),
        watcher::Config::default().labels("hsmsecrets.io/import-for"),
        |secret: Secret| {
            let ns = secret.metadata.namespace.clone()?;
            let name = secret
                .metadata
                .labels
                .as_ref()?
                .get("hsmsecrets.io/import-for")?
                .clone();
            Some(ObjectRef::<HSMSecret>::new(&name).within(&ns))
        },
    )
    .run(
        |object, reconciler: Arc<SecretReconciler<KubeCluster>>| async move {
            let outcome = reconciler.reconcile(&object).await?;
            Ok::<_, hsm_secrets::secret_sync::SyncError>(Action::requeue(outcome.requeue_after))
        },
        |_, _, _| Action::requeue(Duration::from_secs(5)),
        reconciler,
    )
    .for_each(|_| async {})
    .await;
}
