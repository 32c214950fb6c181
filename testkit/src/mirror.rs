//! Fixtures for the mirroring tests: agents over real SoftHSM tokens, served on loopback
//! with mutual TLS from a throwaway CA, and a controller-side client.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use hsm_secrets::crd::DeviceRole;
use hsm_secrets::hsm::{
    FaultPlan, FaultyStore, ManifestEntry, Pkcs11Store, SecretData, SecretPath, SecretStore,
};
use hsm_secrets::mirror::{
    Agent, AgentConfig, AgentConnection, AgentTls, GeneratedPki, Peer, SyncSettings, generate_pki,
    pb,
};
use tokio::task::JoinHandle;

use crate::softhsm;
pub use crate::softhsm::TestToken;

/// The name the test's controller identity has in the PKI.
pub const CONTROLLER: &str = "controller";

pub fn path(s: &str) -> SecretPath {
    s.parse().unwrap()
}

pub fn data(pairs: &[(&str, &[u8])]) -> SecretData {
    let mut d = SecretData::new();
    for (k, v) in pairs {
        d.insert(k, v.to_vec()).unwrap();
    }
    d
}

/// A CA with certificates for `nodes` plus the controller, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub generated: GeneratedPki,
}

impl Pki {
    pub fn new(nodes: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut names = nodes.to_vec();
        names.push(CONTROLLER);
        let generated = generate_pki(dir.path(), &names).unwrap();
        Self { dir, generated }
    }

    pub fn tls(&self, node: &str) -> AgentTls {
        AgentTls::from_files(self.generated.files(node).unwrap()).unwrap()
    }

    /// What agent `as_node` uses to reach `peer` (e.g. a primary pushing to a mirror).
    pub fn agent(&self, as_node: &str, peer: &Peer) -> AgentConnection {
        AgentConnection::new(peer, &self.tls(as_node), Duration::from_secs(60)).unwrap()
    }

    /// What the controller uses to reach `peer`.
    pub fn controller(&self, peer: &Peer) -> AgentConnection {
        AgentConnection::new(peer, &self.tls(CONTROLLER), Duration::from_secs(60)).unwrap()
    }
}

/// Settings for tests that drive passes by hand: the background engine only does its
/// first full pass and otherwise waits (an hour) unless told.
pub fn manual_sync() -> SyncSettings {
    SyncSettings {
        pull_interval: Duration::from_secs(3600),
        sync_interval: Duration::from_secs(3600),
        ..SyncSettings::default()
    }
}

/// Settings for tests where mirrors follow on their own.
pub fn eager_sync() -> SyncSettings {
    SyncSettings {
        pull_interval: Duration::from_millis(200),
        sync_interval: Duration::from_secs(3600),
        ..SyncSettings::default()
    }
}

/// The tokens of one test, under the names the test gives them (`"n1"`, `"crash"`):
/// each created on first use, with a label no other test's token has, so tests share no
/// token whether they run as threads of one process (`cargo test`) or each in its own
/// (nextest). A test that restarts a node asks again by the same name and gets the same
/// token.
#[derive(Default)]
pub struct Tokens {
    made: std::sync::Mutex<HashMap<String, Arc<TestToken>>>,
}

impl Tokens {
    pub fn new() -> Self {
        Self::default()
    }

    /// The token this test calls `name`; None when SoftHSM is absent outside CI.
    pub fn get(&self, name: &str) -> Option<Arc<TestToken>> {
        let mut made = self.made.lock().unwrap();
        if let Some(token) = made.get(name) {
            return Some(token.clone());
        }
        let token = Arc::new(TestToken::new(name)?);
        made.insert(name.to_string(), token.clone());
        Some(token)
    }
}

/// Where a scenario's tokens come from, by the names it gives them: a test's own
/// [`Tokens`], or a benchmark's list of names (one scenario per process).
pub trait TokenSource {
    /// The token called `name`; None when SoftHSM is absent outside CI.
    fn token(&self, name: &str) -> Option<Arc<TestToken>>;
}

impl TokenSource for Tokens {
    fn token(&self, name: &str) -> Option<Arc<TestToken>> {
        self.get(name)
    }
}

/// A benchmark's token names: one set for the whole process, which is right for a
/// benchmark (one scenario per process) and wrong for tests (they would share tokens
/// under `cargo test`): tests use their own [`Tokens`].
impl TokenSource for [&str] {
    fn token(&self, name: &str) -> Option<Arc<TestToken>> {
        static SHARED: std::sync::OnceLock<Tokens> = std::sync::OnceLock::new();
        assert!(
            self.contains(&name),
            "token {name:?} is not in this benchmark's list"
        );
        SHARED.get_or_init(Tokens::new).get(name)
    }
}

/// The process-wide token `label` (one of `all`), for benchmarks; tests use [`Tokens`].
pub fn token(all: &[&str], label: &str) -> Option<Arc<TestToken>> {
    all.token(label)
}

/// One node: a SoftHSM token, its store (wrapped so store calls are counted), its agent
/// and the agent's server on 127.0.0.1.
pub struct TestNode {
    pub name: String,
    pub token: Arc<TestToken>,
    pub plan: Arc<FaultPlan>,
    pub store: Arc<dyn SecretStore>,
    pub agent: Agent,
    pub endpoint: String,
    server: Option<(tokio::sync::oneshot::Sender<()>, JoinHandle<()>)>,
}

impl TestNode {
    /// An agent over the test's token `label` (see [`Tokens`]).
    pub async fn start(
        tokens: &(impl TokenSource + ?Sized),
        name: &str,
        label: &str,
        pki: &Pki,
        sync: SyncSettings,
    ) -> Option<Self> {
        Self::start_serving(tokens, name, label, "", pki, sync).await
    }

    /// As [`TestNode::start`], the agent naming the HSMDevice `device` in its health.
    pub async fn start_serving(
        tokens: &(impl TokenSource + ?Sized),
        name: &str,
        label: &str,
        device: &str,
        pki: &Pki,
        sync: SyncSettings,
    ) -> Option<Self> {
        let token = tokens.token(label)?;
        let store = Pkcs11Store::open(token.config()).await.unwrap();
        let plan = Arc::new(FaultPlan::new());
        let store: Arc<dyn SecretStore> = Arc::new(FaultyStore::new(store, plan.clone()));
        let mut cfg = AgentConfig::new(name, pki.tls(name)).with_device(device);
        cfg.sync = sync;
        cfg.replicate_timeout = Duration::from_secs(20);
        let agent = Agent::start(cfg, store.clone()).await;
        let mut node = Self {
            name: name.into(),
            token,
            plan,
            store,
            agent,
            endpoint: String::new(),
            server: None,
        };
        node.serve().await;
        Some(node)
    }

    /// Serves the agent on a fresh loopback port.
    pub async fn serve(&mut self) {
        let listener = hsm_secrets::mirror::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        self.endpoint = format!("https://{}", listener.local_addr().unwrap());
        let agent = self.agent.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            hsm_secrets::mirror::serve(agent, listener, shutdown)
                .await
                .unwrap();
        });
        self.server = Some((stop, task));
    }

    /// Stops serving: the listener closes and open connections are told to go away, so
    /// peers see a dead agent (the agent object itself keeps running, as a partitioned
    /// node would).
    pub async fn cut_off(&mut self) {
        if let Some((stop, mut task)) = self.server.take() {
            let _ = stop.send(());
            if tokio::time::timeout(Duration::from_secs(30), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    pub fn peer(&self) -> Peer {
        Peer {
            node: self.name.clone(),
            endpoint: self.endpoint.clone(),
        }
    }

    pub async fn manifest(&self) -> Vec<ManifestEntry> {
        self.store.manifest().await.unwrap()
    }
}

/// Asks `node` (through the controller's client) to be primary at `epoch`.
pub async fn assign_primary(
    pki: &Pki,
    node: &TestNode,
    epoch: u64,
    active_mirrors: &[&TestNode],
    lease: Duration,
) {
    pki.controller(&node.peer())
        .assign_role(pb::AssignRoleRequest {
            role: pb::Role::Primary as i32,
            epoch,
            primary_node: node.name.clone(),
            primary_endpoint: node.endpoint.clone(),
            mirrors: active_mirrors
                .iter()
                .map(|m| pb::MirrorTarget {
                    node: m.name.clone(),
                    endpoint: m.endpoint.clone(),
                })
                .collect(),
            lease_duration_ms: lease.as_millis() as u64,
            sync_interval_seconds: 0,
            lease_deadline: None,
        })
        .await
        .unwrap();
}

/// Asks `node` to follow `primary` at `epoch`.
pub async fn assign_mirror(pki: &Pki, node: &TestNode, epoch: u64, primary: &TestNode) {
    pki.controller(&node.peer())
        .assign_role(mirror_request(epoch, primary))
        .await
        .unwrap();
}

pub fn mirror_request(epoch: u64, primary: &TestNode) -> pb::AssignRoleRequest {
    pb::AssignRoleRequest {
        role: pb::Role::ReadOnly as i32,
        epoch,
        primary_node: primary.name.clone(),
        primary_endpoint: primary.endpoint.clone(),
        ..Default::default()
    }
}

pub const HOUR: Duration = Duration::from_secs(3600);

/// Polls `check` until it returns Some, failing after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `mirror`'s manifest equals `primary`'s (paths, versions, checksums,
/// tombstones).
pub async fn wait_converged(primary: &TestNode, mirror: &TestNode, timeout: Duration) {
    let what = format!("{} to converge with {}", mirror.name, primary.name);
    wait_for(timeout, &what, || async {
        (primary.manifest().await == mirror.manifest().await).then_some(())
    })
    .await;
}

/// Raw PKCS#11 access to a token, bypassing the store: for damaging objects on purpose.
pub struct RawToken {
    session: Session,
}

impl RawToken {
    pub fn open(label: &str) -> Self {
        let ctx = softhsm::pkcs11(&softhsm::library().unwrap());
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == label)
            .unwrap();
        let session = ctx.open_rw_session(slot).unwrap();
        let _ = session.login(
            UserType::User,
            Some(&AuthPin::from(softhsm::USER_PIN.to_string())),
        );
        Self { session }
    }

    fn labelled(&self, app: &[u8], matches: impl Fn(&str) -> bool) -> Vec<ObjectHandle> {
        let handles = self
            .session
            .find_objects(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(app.to_vec()),
            ])
            .unwrap();
        handles
            .into_iter()
            .filter(|h| {
                let attrs = self
                    .session
                    .get_attributes(*h, &[AttributeType::Label])
                    .unwrap();
                attrs.iter().any(|a| match a {
                    Attribute::Label(l) => matches(&String::from_utf8_lossy(l)),
                    _ => false,
                })
            })
            .collect()
    }

    /// Destroys one data object (one key) of the secret's current generation.
    pub fn destroy_one_data_object(&self, path: &SecretPath) {
        let prefix = format!("hsm-secrets:d:{path}@");
        let objects = self.labelled(b"hsm-secrets/data", |l| l.starts_with(&prefix));
        assert!(!objects.is_empty(), "no data objects for {path}");
        self.session.destroy_object(objects[0]).unwrap();
    }

    /// Destroys the secret's metadata object: the secret vanishes from this token.
    pub fn destroy_metadata(&self, path: &SecretPath) {
        let label = format!("hsm-secrets:m:{path}");
        let objects = self.labelled(b"hsm-secrets/meta", |l| l == label);
        assert_eq!(objects.len(), 1, "metadata of {path}");
        self.session.destroy_object(objects[0]).unwrap();
    }
}

/// The role a Health answer reports.
pub fn role_of(h: &hsm_secrets::mirror::AgentHealth) -> Option<DeviceRole> {
    h.role
}

/// An `hsm-secrets agent` process serving one SoftHSM token with mutual TLS.
pub struct AgentProcess {
    pub child: tokio::process::Child,
    pub peer: Peer,
}

/// Starts `hsm-secrets agent` for `name` on the test's token `label` (see [`Tokens`]), on
/// a port the kernel picks; the agent announces it on its first stdout line.
pub async fn spawn_agent_process(
    tokens: &(impl TokenSource + ?Sized),
    pki: &Pki,
    name: &str,
    label: &str,
) -> AgentProcess {
    spawn_agent_process_with(tokens, pki, name, label, &[]).await
}

/// As [`spawn_agent_process`], with extra command-line arguments.
pub async fn spawn_agent_process_with(
    tokens: &(impl TokenSource + ?Sized),
    pki: &Pki,
    name: &str,
    label: &str,
    extra: &[&str],
) -> AgentProcess {
    spawn_agent_process_at(tokens, pki, name, label, "127.0.0.1:0", extra).await
}

/// As [`spawn_agent_process_with`], listening on `listen` (a restarted agent takes back
/// the address its peers know).
pub async fn spawn_agent_process_at(
    tokens: &(impl TokenSource + ?Sized),
    pki: &Pki,
    name: &str,
    label: &str,
    listen: &str,
    extra: &[&str],
) -> AgentProcess {
    use tokio::io::AsyncBufReadExt;
    let token = tokens.token(label).unwrap();
    let files = pki.generated.files(name).unwrap();
    let mut child = tokio::process::Command::new(crate::binary())
        .args(["agent", "--node", name, "--listen", listen])
        .arg("--pkcs11-library")
        .arg(&token.library)
        .args(["--token-label", &token.label])
        .arg("--pin-file")
        .arg(&token.pin_file)
        .arg("--tls-ca")
        .arg(&files.ca)
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .args(["--pull-interval-ms", "200"])
        .args(extra)
        .env("SOFTHSM2_CONF", softhsm::conf_path())
        .env("HSM_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    tokio::time::timeout(
        Duration::from_secs(120),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("the agent prints its address")
    .unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();
    AgentProcess {
        child,
        peer: Peer {
            node: name.into(),
            endpoint: format!("https://{addr}"),
        },
    }
}

/// Starts `hsm-secrets controller` on the file-backed state `state_dir` for `agents`,
/// with the timing of the failover figures: 1 s probes, a 2 s write lease and a 0.5 s
/// margin. Killed when dropped.
pub fn spawn_controller_process(
    pki: &Pki,
    state_dir: &std::path::Path,
    agents: &[&AgentProcess],
    log: &str,
) -> tokio::process::Child {
    let files = pki.generated.files(CONTROLLER).unwrap();
    let endpoints = agents
        .iter()
        .map(|p| format!("{}={}", p.peer.node, p.peer.endpoint))
        .collect::<Vec<_>>()
        .join(",");
    tokio::process::Command::new(crate::binary())
        .arg("controller")
        .arg("--state")
        .arg(state_dir)
        .args(["--agent", &endpoints])
        .arg("--tls-ca")
        .arg(&files.ca)
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .args([
            "--probe-interval-ms",
            "1000",
            "--write-lease-ms",
            "2000",
            "--lease-margin-ms",
            "500",
        ])
        .env("HSM_LOG", log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// A push of one record as the primary `primary` would send it at epoch 1: `checksum` as
/// given (a forged push may carry another record's) and the key-value pairs sent.
pub fn push_request(
    path: &SecretPath,
    version: u64,
    checksum: &[u8],
    sent: &[(&str, &[u8])],
    primary: &str,
) -> pb::ReplicateRequest {
    pb::ReplicateRequest {
        record: Some(pb::Record {
            path: path.to_string(),
            version,
            checksum: checksum.to_vec(),
            deleted: false,
            data: sent
                .iter()
                .map(|(k, v)| pb::KeyValue {
                    key: (*k).into(),
                    value: v.to_vec(),
                })
                .collect(),
        }),
        epoch: 1,
        primary_node: primary.into(),
    }
}

/// The one value a live record holds (these tests write one key per secret); None for a
/// tombstone.
pub fn only_value(record: &hsm_secrets::hsm::Record) -> Option<Vec<u8>> {
    match &record.body {
        hsm_secrets::hsm::Body::Live(data) => {
            let mut values = data.iter();
            let (_, value) = values.next().expect("a live record with a key");
            assert!(values.next().is_none(), "one key per secret");
            Some(value.to_vec())
        }
        hsm_secrets::hsm::Body::Deleted => None,
    }
}
