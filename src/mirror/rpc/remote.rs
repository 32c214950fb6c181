//! Reads for a node without a local device: a [`SecretStore`] over the agents of the
//! device, asking the primary first and a read-only mirror while the primary is down.
//!
//! An agent that fails is skipped for a short while, so a dead primary costs one failed
//! connection per [`DOWN_FOR`], not one per read. Every record is verified against its
//! checksum on arrival; a bad one is treated like a failed agent. Writes are refused:
//! they carry an epoch and go to the primary's agent (`Put`/`Delete`), which a store
//! without one cannot stamp.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::hsm::{
    Expect, GcReport, ManifestEntry, Record, SecretData, SecretPath, SecretStore, StoreError,
    TokenInfo,
};

use super::AgentPool;
use super::client::AgentConnection;
use crate::mirror::fencing::Peer;
use crate::mirror::{AgentHealth, Manifest, MirrorError, Served};

/// How long an agent that failed is passed over (unless every agent is down).
pub const DOWN_FOR: Duration = Duration::from_secs(5);

struct Target {
    conn: AgentConnection,
    down_until: Mutex<Option<Instant>>,
}

impl Target {
    fn is_down(&self, now: Instant) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| now < t)
    }
    fn mark(&self, down: bool) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            down.then(|| Instant::now() + DOWN_FOR);
    }
}

/// Read-only access to a device through its agents.
pub struct RemoteStore {
    label: String,
    pool: AgentPool,
    targets: RwLock<Vec<std::sync::Arc<Target>>>,
    sequence: AtomicU64,
}

impl RemoteStore {
    /// `agents` in order of preference: the primary first, then the mirrors. `label`
    /// names the device in messages.
    pub fn new(
        label: impl Into<String>,
        agents: &[Peer],
        pool: AgentPool,
    ) -> Result<Self, MirrorError> {
        let store = Self {
            label: label.into(),
            pool,
            targets: RwLock::default(),
            sequence: AtomicU64::new(0),
        };
        store.set_agents(agents)?;
        Ok(store)
    }

    /// Replaces the agents (after a failover the new primary goes first).
    pub fn set_agents(&self, agents: &[Peer]) -> Result<(), MirrorError> {
        if agents.is_empty() {
            return Err(MirrorError::InvalidArgument {
                field: "agents",
                why: "a remote store needs at least one agent endpoint".into(),
            });
        }
        let targets = agents
            .iter()
            .map(|p| {
                Ok(std::sync::Arc::new(Target {
                    conn: self.pool.connect(p)?,
                    down_until: Mutex::new(None),
                }))
            })
            .collect::<Result<Vec<_>, MirrorError>>()?;
        *self.targets.write().unwrap_or_else(|p| p.into_inner()) = targets;
        Ok(())
    }

    /// Agents to try, in order: those not recently failed first, then the others.
    fn order(&self) -> Vec<std::sync::Arc<Target>> {
        let now = Instant::now();
        let all = self
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (up, down): (Vec<_>, Vec<_>) = all.into_iter().partition(|t| !t.is_down(now));
        up.into_iter().chain(down).collect()
    }

    /// Asks the agents in order until one gives an answer `accept` takes. `Ok(None)`
    /// from `accept` means "this agent's answer is unusable, try the next one".
    async fn ask<T, R, F, Fut>(
        &self,
        what: &str,
        call: F,
        accept: impl Fn(&str, R) -> Result<T, Failure>,
    ) -> Result<T, StoreError>
    where
        F: Fn(AgentConnection) -> Fut,
        Fut: std::future::Future<Output = Result<R, MirrorError>>,
    {
        let mut failures = Vec::new();
        // Set while every agent so far answered with a record failing its checksum.
        let mut all_corrupt: Option<String> = None;
        let mut first = true;
        for target in self.order() {
            let node = target.conn.node().to_string();
            let failure = match call(target.conn.clone()).await {
                Ok(answer) => match accept(&node, answer) {
                    Ok(value) => {
                        target.mark(false);
                        return Ok(value);
                    }
                    Err(f) => f,
                },
                Err(MirrorError::Remote {
                    code: tonic::Code::NotFound,
                    ..
                }) => {
                    target.mark(false);
                    return Err(StoreError::NotFound {
                        token: self.label.clone(),
                        path: what.into(),
                    });
                }
                Err(e) => Failure::Agent(e.to_string()),
            };
            target.mark(true);
            match failure {
                Failure::Corrupt(detail) => {
                    failures.push(format!("{node}: {detail}"));
                    if first {
                        all_corrupt = Some(detail);
                    }
                }
                Failure::Agent(detail) => {
                    failures.push(format!("{node}: {detail}"));
                    all_corrupt = None;
                }
            }
            first = false;
        }
        Err(match all_corrupt {
            Some(detail) => StoreError::Corrupt {
                path: what.into(),
                detail,
            },
            None => StoreError::DeviceUnavailable {
                token: self.label.clone(),
                detail: format!("no agent answered for {what}: {}", failures.join("; ")),
            },
        })
    }

    fn note_sequence(&self, sequence: u64) {
        self.sequence.fetch_max(sequence, Ordering::Relaxed);
    }

    fn refuse(&self, operation: &str) -> StoreError {
        StoreError::InvalidName {
            what: "operation",
            name: operation.into(),
            why: format!(
                "device {:?} has no token on this node: reads come from its agents, and writes go to the primary's agent (Put/Delete with the device epoch)",
                self.label
            ),
        }
    }
}

/// Why one agent's answer was not used.
enum Failure {
    Agent(String),
    Corrupt(String),
}

#[async_trait]
impl SecretStore for RemoteStore {
    fn token_label(&self) -> &str {
        &self.label
    }

    async fn record(&self, path: &SecretPath) -> Result<Record, StoreError> {
        self.ask(
            &path.to_string(),
            |conn| {
                let path = path.clone();
                async move { conn.get(&path).await }
            },
            |_node, answer: Served| {
                let record = answer.record;
                if &record.path != path {
                    return Err(Failure::Agent(format!("answered for {}", record.path)));
                }
                record
                    .verify()
                    .map_err(|e| Failure::Corrupt(e.to_string()))?;
                self.note_sequence(answer.applied_sequence);
                Ok(record)
            },
        )
        .await
    }

    async fn put(
        &self,
        _path: &SecretPath,
        _data: SecretData,
        _expect: Expect,
    ) -> Result<u64, StoreError> {
        Err(self.refuse("put"))
    }

    async fn delete(&self, _path: &SecretPath, _expect: Expect) -> Result<u64, StoreError> {
        Err(self.refuse("delete"))
    }

    async fn apply(&self, _record: Record) -> Result<bool, StoreError> {
        Err(self.refuse("apply"))
    }

    async fn purge(&self, _path: &SecretPath) -> Result<bool, StoreError> {
        Err(self.refuse("purge"))
    }

    async fn manifest(&self) -> Result<Vec<ManifestEntry>, StoreError> {
        self.ask(
            "the manifest",
            |conn| async move { conn.manifest().await },
            |_node, answer: Manifest| {
                self.note_sequence(answer.sequence);
                Ok(answer.entries)
            },
        )
        .await
    }

    fn latest_sequence(&self) -> u64 {
        self.sequence.load(Ordering::Relaxed)
    }

    async fn health(&self) -> Result<TokenInfo, StoreError> {
        self.ask(
            "health",
            |conn| async move { conn.health().await },
            |node, h: AgentHealth| {
                if !h.session_usable {
                    return Err(Failure::Agent(format!(
                        "token not usable: {}",
                        h.token_error.map(|f| f.message).unwrap_or_default()
                    )));
                }
                self.note_sequence(h.applied_sequence);
                Ok(TokenInfo {
                    label: h.token_label,
                    serial: h.token_serial.unwrap_or_default(),
                    manufacturer: format!("hsm-secrets agent on {node}"),
                    model: h.role.map(|r| format!("{r:?}")).unwrap_or_default(),
                })
            },
        )
        .await
    }

    async fn gc(&self) -> Result<GcReport, StoreError> {
        // Nothing is stored here; each agent collects its own token's leftovers.
        Ok(GcReport::default())
    }
}
