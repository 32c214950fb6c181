//! Fixtures for the HSMSecret reconciler tests: a real agent (the agent protocol over
//! loopback with mutual TLS, over an in-memory store) as the device's primary, the
//! reconciler on a kube Client wired to the scripted mock API server, and object
//! builders.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use hsm_secrets::crd::{FINALIZER, HSMSecret};
use hsm_secrets::hsm::{Expect, MemoryStore, SecretData, SecretPath, SecretStore};
use hsm_secrets::mirror::{Agent, AgentConfig, AgentConnection, Peer, pb};
use hsm_secrets::secret_sync::{
    AgentDirectory, DigestKey, KubeCluster, ReconcileOutcome, SecretReconciler, SecretSyncMetrics,
    SyncError,
};
use k8s_openapi::ByteString;
use serde_json::{Value, json};

use crate::mirror::{HOUR, Pki};
use crate::mock_api::{self, Handle, Seen};

pub const NS: &str = "shop";
pub const UID: &str = "2f1c-hsmsecret-uid";
pub const HSMSECRETS: &str = "/apis/hsmsecrets.io/v1alpha1/namespaces/shop/hsmsecrets";
pub const DEVICE: &str = "/apis/hsmsecrets.io/v1alpha1/hsmdevices/dev";
pub const SECRETS: &str = "/api/v1/namespaces/shop/secrets";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/shop/events";

/// Base64, as Secret data carries it (through k8s-openapi's own encoding).
pub fn b64(bytes: &[u8]) -> String {
    serde_json::to_value(ByteString(bytes.to_vec()))
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

/// The primary agent n1 at epoch 1 and a reconciler talking to it and to the mock.
pub struct Env {
    pub pki: Pki,
    pub store: Arc<MemoryStore>,
    pub agent: Agent,
    pub primary: AgentConnection,
    pub reconciler: Arc<SecretReconciler<KubeCluster>>,
    pub api: Handle,
    pub registry: prometheus_client::registry::Registry,
    _server: tokio::task::JoinHandle<()>,
}

/// The agent n1 serving an in-memory store on loopback with mutual TLS, made primary at
/// epoch 1.
pub struct Primary {
    pub pki: Pki,
    pub store: Arc<MemoryStore>,
    pub agent: Agent,
    pub primary: AgentConnection,
    pub server: tokio::task::JoinHandle<()>,
}

impl Primary {
    pub async fn start() -> Self {
        let pki = Pki::new(&["n1"]);
        let store = Arc::new(MemoryStore::new("mem"));
        let agent = Agent::start(
            AgentConfig::new("n1", pki.tls("n1")),
            store.clone() as Arc<dyn SecretStore>,
        )
        .await;
        let listener = hsm_secrets::mirror::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let endpoint = format!("https://{}", listener.local_addr().unwrap());
        let serving = agent.clone();
        let server = tokio::spawn(async move {
            hsm_secrets::mirror::serve(serving, listener, std::future::pending())
                .await
                .unwrap();
        });
        let peer = Peer {
            node: "n1".into(),
            endpoint: endpoint.clone(),
        };
        let primary = pki.controller(&peer);
        primary
            .assign_role(pb::AssignRoleRequest {
                role: pb::Role::Primary as i32,
                epoch: 1,
                primary_node: "n1".into(),
                primary_endpoint: endpoint,
                lease_duration_ms: HOUR.as_millis() as u64,
                ..Default::default()
            })
            .await
            .unwrap();
        Self {
            pki,
            store,
            agent,
            primary,
            server,
        }
    }

    /// A reconciler writing through this agent, talking to the cluster through `client`.
    pub fn reconciler(
        &self,
        client: kube::Client,
        metrics: SecretSyncMetrics,
    ) -> Arc<SecretReconciler<KubeCluster>> {
        Arc::new(SecretReconciler::new(
            Arc::new(KubeCluster::new(client, None)),
            AgentDirectory::new([self.primary.clone()]),
            DigestKey::from_bytes(vec![42; 32]).unwrap(),
            metrics,
        ))
    }
}

impl Env {
    pub async fn start() -> Self {
        let Primary {
            pki,
            store,
            agent,
            primary,
            server,
        } = Primary::start().await;
        let (client, api) = mock_api::client();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = SecretSyncMetrics::register(&mut registry);
        let reconciler = Arc::new(SecretReconciler::new(
            Arc::new(KubeCluster::new(client, None)),
            AgentDirectory::new([primary.clone()]),
            DigestKey::from_bytes(vec![42; 32]).unwrap(),
            metrics,
        ));
        Self {
            pki,
            store,
            agent,
            primary,
            reconciler,
            api,
            registry,
            _server: server,
        }
    }

    /// Writes directly through the agent protocol (the state before a scenario).
    pub async fn seed(&self, pairs: &[(&str, &[u8])]) -> u64 {
        let mut data = SecretData::new();
        for (k, v) in pairs {
            data.insert(k, v.to_vec()).unwrap();
        }
        self.primary
            .put(&path(), &data, Expect::Any, 1)
            .await
            .unwrap()
            .version
    }

    /// What the HSM holds at shop/db: (version, key → value) or None.
    pub async fn hsm(&self) -> Option<(u64, Vec<(String, Vec<u8>)>)> {
        match self.store.get(&path()).await {
            Ok((v, d)) => Some((
                v,
                d.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect(),
            )),
            Err(_) => None,
        }
    }

    pub fn sequence(&self) -> u64 {
        self.store.latest_sequence()
    }

    /// Starts one reconcile of `object`; the test answers its API calls.
    pub fn reconcile(
        &self,
        object: &Value,
    ) -> tokio::task::JoinHandle<Result<ReconcileOutcome, SyncError>> {
        let object: HSMSecret = serde_json::from_value(object.clone()).unwrap();
        let reconciler = self.reconciler.clone();
        tokio::spawn(async move { reconciler.reconcile(&object).await })
    }

    /// The next API call, which must be `method path`.
    pub async fn expect(&mut self, method: &str, path: &str) -> Seen {
        let seen = mock_api::next(&mut self.api).await;
        assert_eq!(
            (seen.method.as_str(), seen.path()),
            (method, path),
            "unexpected call; body: {}",
            seen.body
        );
        seen
    }

    /// GET of the device, answered with `status`.
    pub async fn device(&mut self, phase: &str) {
        let seen = self.expect("GET", DEVICE).await;
        seen.reply(200, device(phase));
    }

    /// GET of a Secret, answered with `reply` (None: 404).
    pub async fn get_secret(&mut self, name: &str, reply: Option<Value>) {
        let seen = self.expect("GET", &format!("{SECRETS}/{name}")).await;
        match reply {
            Some(v) => seen.reply(200, v),
            None => seen.reply(404, mock_api::status(404, "NotFound", "not found")),
        }
    }

    /// The finalizer patch; returns the object as the server would (resourceVersion 2).
    pub async fn add_finalizer(&mut self, object: &Value) -> Value {
        let seen = self.expect("PATCH", &format!("{HSMSECRETS}/db")).await;
        let rv = object["metadata"]["resourceVersion"].clone();
        assert_eq!(
            seen.body,
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
            ])
        );
        let mut next = object.clone();
        next["metadata"]["finalizers"] = json!([FINALIZER]);
        next["metadata"]["resourceVersion"] = json!("2");
        seen.reply(200, next.clone());
        next
    }

    /// The status patch: returns the status written (after checking the precondition).
    pub async fn status(&mut self, rv: &str) -> Value {
        let seen = self
            .expect("PATCH", &format!("{HSMSECRETS}/db/status"))
            .await;
        let ops = seen.body.as_array().unwrap().clone();
        assert_eq!(
            ops[0],
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv})
        );
        assert_eq!(ops[1]["op"], "add");
        assert_eq!(ops[1]["path"], "/status");
        let status = ops[1]["value"].clone();
        seen.reply(
            200,
            json!({"apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMSecret",
            "metadata": {"name": "db", "namespace": NS, "resourceVersion": "99"},
            "spec": {"deviceRef": "dev"}, "status": status.clone()}),
        );
        status
    }

    /// An Event about the HSMSecret; returns (type, reason, note).
    /// A repeat of the same reason for the same object is a PATCH of the Event series
    /// (kube's Recorder).
    pub async fn event(&mut self) -> (String, String, String) {
        let seen = mock_api::next(&mut self.api).await;
        let first = seen.method == "POST" && seen.path() == EVENTS;
        let repeat = seen.method == "PATCH" && seen.path().starts_with(&format!("{EVENTS}/db."));
        assert!(
            first || repeat,
            "expected an Event, got {} {}: {}",
            seen.method,
            seen.path(),
            seen.body
        );
        let body = seen.body.clone();
        assert_eq!(body["regarding"]["kind"], "HSMSecret");
        assert_eq!(body["regarding"]["name"], "db");
        assert_eq!(body["regarding"]["namespace"], NS);
        seen.reply(201, body.clone());
        (
            body["type"].as_str().unwrap_or_default().into(),
            body["reason"].as_str().unwrap_or_default().into(),
            body["note"].as_str().unwrap_or_default().into(),
        )
    }

    /// A DELETE of a Secret with a resourceVersion precondition.
    pub async fn delete_secret(&mut self, name: &str, rv: &str) {
        let seen = self.expect("DELETE", &format!("{SECRETS}/{name}")).await;
        assert_eq!(
            seen.body["preconditions"]["resourceVersion"], rv,
            "{}",
            seen.body
        );
        seen.reply(200, mock_api::status(200, "", ""));
    }
}

/// Waits for a reconcile to finish (an unanswered extra API call makes it time out).
pub async fn done(
    task: tokio::task::JoinHandle<Result<ReconcileOutcome, SyncError>>,
) -> ReconcileOutcome {
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the reconcile made an API call the scenario does not expect, or hung")
        .unwrap()
        .unwrap()
}

pub fn path() -> SecretPath {
    SecretPath::new(NS, "db").unwrap()
}

pub fn device(phase: &str) -> Value {
    crate::resources::device("dev")
        .token("t")
        .resource_version("5")
        .status_json(json!({"primaryNode": "n1", "epoch": 1, "phase": phase}))
        .json()
}

/// An HSMSecret shop/db on device `dev`.
pub fn hsmsecret(spec_extra: Value, status: Option<Value>, finalizer: bool) -> Value {
    let mut spec = json!({"deviceRef": "dev"});
    for (k, v) in spec_extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let mut o = json!({
        "apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMSecret",
        "metadata": {"name": "db", "namespace": NS, "uid": UID, "generation": 1,
            "resourceVersion": "1"},
        "spec": spec,
    });
    if finalizer {
        o["metadata"]["finalizers"] = json!([FINALIZER]);
    }
    if let Some(s) = status {
        o["status"] = s;
    }
    o
}

/// A Secret `name` in shop: data, resourceVersion, optional controller owner uid, labels,
/// annotations.
pub fn secret(
    name: &str,
    rv: &str,
    data: &[(&str, &[u8])],
    owner: Option<&str>,
    labels: Value,
    annotations: Value,
) -> Value {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS, "resourceVersion": rv, "uid": format!("uid-{name}"),
            "labels": labels, "annotations": annotations},
        "type": "Opaque",
        "data": data.iter().map(|(k, v)| (k.to_string(), Value::String(b64(v)))).collect::<serde_json::Map<_, _>>(),
    });
    if let Some(uid) = owner {
        s["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMSecret", "name": "db",
            "uid": uid, "controller": true, "blockOwnerDeletion": true
        }]);
    }
    s
}

/// The managed copy as the reconciler writes it for `version`.
pub fn copy(rv: &str, data: &[(&str, &[u8])], version: u64) -> Value {
    secret(
        "db-copy",
        rv,
        data,
        Some(UID),
        json!({"hsmsecrets.io/device": "dev", "hsmsecrets.io/version": version.to_string()}),
        json!({}),
    )
}

/// An import Secret as `kubectl hsm` creates it.
pub fn import(rv: &str, data: &[(&str, &[u8])], remove: Option<&str>) -> Value {
    let annotations = match remove {
        Some(keys) => json!({"hsmsecrets.io/remove-keys": keys}),
        None => json!({}),
    };
    secret(
        "db-import-x7k2p",
        rv,
        data,
        None,
        json!({"hsmsecrets.io/import-for": "db"}),
        annotations,
    )
}

/// Decodes the `data` of a Secret body.
pub fn data_of(body: &Value) -> Vec<(String, Vec<u8>)> {
    body["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::from_value::<ByteString>(v.clone()).unwrap().0,
            )
        })
        .collect()
}

pub fn pairs(p: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = p.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
    v.sort();
    v
}
