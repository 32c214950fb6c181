//! The device agent: one node's token behind the agent protocol.
//!
//! As primary it takes client writes (under the epoch and write lease of
//! [`fencing`](super::fencing)), keeps the change index that answers mirrors' pulls, and
//! under the Active policy pushes every write to its sync set before acknowledging it. As
//! a mirror it runs the [`sync`](super::sync) engine against its assigned primary and
//! applies the primary's pushes. Roles come only from the controller (`AssignRole`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use tokio::time::Instant;

use crate::crd::DeviceRole;
use crate::hsm::{
    Body, Checksum, Expect, GcReport, ManifestEntry, Record, SecretData, SecretPath, SecretStore,
    StoreError,
};

use super::MirrorError;
use super::facts::AgentFacts;
use super::feed::{Assigned, Changes, ChangesAsk, FetchAsk, Fetched, Manifest, Push};
use super::fencing::{AgentClock, Assignment, Control};
use super::health::{AgentHealth, ClockReading, Fault};
use super::local::{Applied, Guard, Local};
use super::metrics::RpcMetrics;
use super::replication::{self, SyncSet};
use super::rpc::AgentPool;

use super::rpc::identity::Identity;

use super::rpc::tls::AgentTls;
use super::sync::{self, FullPassReport, PullReport, SyncHandle, SyncSettings, SyncState};

/// How an agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This node's name (what its certificate names, and how peers address it).
    pub node: String,
    /// The HSMDevice whose token this agent serves, reported in Health so the controller
    /// finds a device's agents by name; empty when not configured.
    pub device: String,
    pub tls: AgentTls,
    pub sync: SyncSettings,
    /// How long a write under the Active policy waits for a mirror before dropping it.
    pub replicate_timeout: Duration,
    /// Deadline of calls to other agents.
    pub rpc_timeout: Duration,
    /// Soft size limit of one Changes or Fetch answer (at least one record is sent).
    pub batch_bytes: usize,
    /// Where the gRPC service records RPC latency.
    pub rpc_metrics: RpcMetrics,
    /// Between collections of what interrupted writes left on the token (one runs at
    /// start); `None` never collects on its own.
    pub gc_interval: Option<Duration>,
    /// Accept pushes from a certificate shared by every node, trusting the sender named
    /// in the request (a development setup without per-node certificates).
    pub allow_shared_agent_identity: bool,
    /// Where each acknowledged write is journaled (`--write-journal`), if anywhere.
    pub write_journal: Option<Arc<super::journal::WriteJournal>>,
}

impl AgentConfig {
    pub fn new(node: impl Into<String>, tls: AgentTls) -> Self {
        Self {
            node: node.into(),
            device: String::new(),
            tls,
            sync: SyncSettings::default(),
            replicate_timeout: Duration::from_secs(5),
            rpc_timeout: Duration::from_secs(30),
            batch_bytes: 4 * 1024 * 1024,
            rpc_metrics: RpcMetrics::default(),
            gc_interval: Some(Duration::from_secs(600)),
            allow_shared_agent_identity: false,
            write_journal: None,
        }
    }

    /// This configuration serving the HSMDevice `device`.
    pub fn with_device(mut self, device: impl Into<String>) -> Self {
        self.device = device.into();
        self
    }
}

/// Largest `limit` a Changes call may ask for.
const MAX_CHANGES: usize = 4096;
const DEFAULT_CHANGES: usize = 256;
/// Most paths one Fetch call may name.
const MAX_FETCH: usize = 4096;
/// Records read from the token at once for one answer (the store runs reads in
/// parallel sessions).
const READ_CONCURRENCY: usize = 8;
/// Reads a Changes answer makes to reach a point its records describe exactly.
const CONSISTENT_ROUNDS: usize = 8;

/// Result of an acknowledged write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    pub version: u64,
    /// Active policy: mirrors that applied the write before it was acknowledged.
    pub replicated_to: Vec<String>,
}

/// A record this agent served, and who served it (a reader learns whether it came from
/// the primary or a mirror, and at which point of the history).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// As stored: a reader verifies its checksum.
    pub record: Record,
    pub node: String,
    pub role: DeviceRole,
    pub epoch: u64,
    pub applied_sequence: u64,
}

/// Counters for tests and metrics.
#[derive(Debug, Default)]
struct Counters {
    changes_calls: AtomicU64,
    changes_answered_from_index: AtomicU64,
    records_sent: AtomicU64,
    pushes_refused: AtomicU64,
    gc_runs: AtomicU64,
    gc_collected: AtomicU64,
    /// Client writes refused, by error kind.
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Local token failures outside the sync engine, by kind.
    hsm_errors: Mutex<BTreeMap<&'static str, u64>>,
}

/// The agent's state for metrics, read without touching the token.
#[derive(Clone, Debug)]
pub struct AgentSnapshot {
    pub role: DeviceRole,
    pub epoch: u64,
    pub applied_sequence: u64,
    pub lease_remaining: Duration,
    pub sync: SyncState,
    pub refused: BTreeMap<&'static str, u64>,
    pub hsm_errors: BTreeMap<&'static str, u64>,
}

/// A snapshot of the agent's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Changes calls served as primary.
    pub changes_calls: u64,
    /// Of those, answered "nothing new" from the index alone.
    pub changes_answered_from_index: u64,
    /// Records sent in Changes and Fetch answers.
    pub records_sent: u64,
    /// Pushes refused: out of sequence, or failing verification.
    pub pushes_refused: u64,
    /// Garbage collections run on the token.
    pub gc_runs: u64,
    /// Objects they removed (leftovers of interrupted writes, stale metadata).
    pub gc_collected: u64,
}

/// One node's agent. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: AgentConfig,
    local: Arc<Local>,
    control: Mutex<Control>,
    /// Serializes client writes, so every version below the published one is indexed;
    /// role changes take it too, so no write straddles one.
    writes: tokio::sync::Mutex<()>,
    /// Pushes hold it shared, role changes exclusively: a push admitted under the old
    /// role never lands after the new one took effect.
    gate: tokio::sync::RwLock<()>,
    /// Serializes role changes; holds the running sync engine.
    engine: tokio::sync::Mutex<Option<SyncHandle>>,
    replication: Mutex<SyncSet>,
    /// Connections to the primary (pulls) and to the mirrors (pushes).
    pool: AgentPool,
    sync_state: Arc<Mutex<SyncState>>,
    sync_interval_ms: Arc<AtomicU64>,
    counters: Counters,
    /// The last accepted assignment: what is saved on the token with the role facts.
    last_assignment: Mutex<Option<Assignment>>,
    /// Serializes saves of the role facts, so an older snapshot never lands last.
    persist: tokio::sync::Mutex<()>,
    /// Whether the device's site takes writes (multi-site devices); open otherwise.
    site: Mutex<super::site::SiteGate>,
    /// Who answers the Archive RPC on this node, once the node set it up.
    archive: std::sync::OnceLock<Arc<dyn crate::archive::ArchiveControl>>,
}

impl Agent {
    /// An agent for `store`, standby at epoch 0 until the controller assigns a role.
    /// Builds the change index now when the token is usable, else on first use.
    pub async fn start(cfg: AgentConfig, store: Arc<dyn SecretStore>) -> Self {
        let local = Arc::new(Local::new(cfg.node.clone(), store));
        if let Err(e) = local.ensure_index().await {
            tracing::warn!(node = %cfg.node, error = %e, "token not usable at start; the change index is built on first use");
        }
        let sync_interval_ms = Arc::new(AtomicU64::new(duration_ms(cfg.sync.sync_interval)));
        let agent = Self {
            inner: Arc::new(Inner {
                control: Mutex::new(Control::new(cfg.node.clone())),
                pool: AgentPool::new(&cfg.tls, cfg.rpc_timeout),
                local,
                writes: tokio::sync::Mutex::new(()),
                gate: tokio::sync::RwLock::new(()),
                engine: tokio::sync::Mutex::new(None),
                replication: Mutex::default(),
                sync_state: Arc::default(),
                sync_interval_ms,
                counters: Counters::default(),
                last_assignment: Mutex::default(),
                persist: tokio::sync::Mutex::new(()),
                archive: std::sync::OnceLock::new(),
                site: Mutex::default(),
                cfg,
            }),
        };
        agent.restore().await;
        if let Some(interval) = agent.inner.cfg.gc_interval {
            agent.spawn_gc(interval);
        }
        agent
    }

    /// Takes back the role and epoch saved on the token by a previous run, without the
    /// write lease: a primary accepts writes again only once the controller renews its
    /// lease or assigns it anew.
    async fn restore(&self) {
        let node = self.node().to_string();
        let facts = match self.store().load_agent_state().await {
            Ok(Some(bytes)) => match AgentFacts::decode(&bytes) {
                Ok(facts) if facts.applies_to(&node) => facts,
                Ok(facts) => {
                    tracing::info!(%node, saved_by = %facts.node, "the token's saved role belongs to another node; starting as a fresh standby");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%node, %error, "cannot read the saved role; starting as a fresh standby");
                    return;
                }
            },
            Ok(None) => return,
            Err(error) => {
                self.count_store_error(&error);
                tracing::warn!(%node, %error, "cannot load the saved role (token not usable); starting as a fresh standby");
                return;
            }
        };
        let assignment = facts.assignment();
        match self.apply(assignment.clone()).await {
            Ok(_) => {
                let mut control = self.control();
                control.revoke_lease();
                if facts.fenced && facts.role == DeviceRole::Primary {
                    let _ = control.fence(facts.epoch);
                }
                drop(control);
                *lock_plain(&self.inner.last_assignment) = Some(assignment);
                tracing::info!(%node, epoch = facts.epoch, role = ?facts.role, "resumed the saved role; writes wait for the controller's lease");
            }
            Err(error) => {
                // The epoch still holds: nothing older may be assigned.
                *self.control() = Control::restored_epoch(node.clone(), facts.epoch);
                tracing::warn!(%node, epoch = facts.epoch, %error, "cannot resume the saved role; standby at the saved epoch until the controller assigns");
            }
        }
    }

    /// Saves the current role facts on the token. A failure is logged and counted, not
    /// returned: the role already took effect in memory, which is what fencing needs; a
    /// restart then resumes an older epoch, which the controller corrects.
    async fn persist(&self) {
        let _serial = self.inner.persist.lock().await;
        let facts = {
            let control = self.control();
            let last = lock_plain(&self.inner.last_assignment);
            match last.as_ref() {
                Some(a) if a.epoch == control.epoch() && a.role == control.role() => {
                    AgentFacts::new(self.node(), a, control.is_fenced())
                }
                _ => return,
            }
        };
        if let Err(error) = self.store().save_agent_state(&facts.encode()).await {
            self.count_store_error(&error);
            tracing::warn!(node = %self.node(), epoch = facts.epoch, %error, "cannot save the role on the token; a restart would resume an older one");
        }
    }

    pub fn node(&self) -> &str {
        &self.inner.cfg.node
    }

    pub fn config(&self) -> &AgentConfig {
        &self.inner.cfg
    }

    /// Hands the Archive RPC to the node's archive supervisor (once; later calls are
    /// ignored).
    pub fn set_archive_control(&self, control: Arc<dyn crate::archive::ArchiveControl>) {
        let _ = self.inner.archive.set(control);
    }

    /// The site gate, moved by the node's archive supervisor.
    pub fn site_gate(&self) -> super::site::SiteGate {
        self.inner
            .site
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the site gate with what `f` makes of it.
    pub fn update_site_gate(
        &self,
        f: impl FnOnce(&super::site::SiteGate) -> super::site::SiteGate,
    ) -> super::site::SiteGate {
        let mut gate = self
            .inner
            .site
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *gate = f(&gate);
        gate.clone()
    }

    pub fn archive_control(&self) -> Option<Arc<dyn crate::archive::ArchiveControl>> {
        self.inner.archive.get().cloned()
    }

    pub fn store(&self) -> &Arc<dyn SecretStore> {
        &self.inner.local.store
    }

    pub fn role(&self) -> DeviceRole {
        self.control().role()
    }

    pub fn epoch(&self) -> u64 {
        self.control().epoch()
    }

    pub fn sync_state(&self) -> SyncState {
        sync::lock(&self.inner.sync_state).clone()
    }

    pub fn stats(&self) -> AgentStats {
        let c = &self.inner.counters;
        AgentStats {
            changes_calls: c.changes_calls.load(Ordering::Relaxed),
            changes_answered_from_index: c.changes_answered_from_index.load(Ordering::Relaxed),
            records_sent: c.records_sent.load(Ordering::Relaxed),
            pushes_refused: c.pushes_refused.load(Ordering::Relaxed),
            gc_runs: c.gc_runs.load(Ordering::Relaxed),
            gc_collected: c.gc_collected.load(Ordering::Relaxed),
        }
    }

    /// Removes what interrupted writes left on the token (objects of a generation that
    /// never became current, superseded metadata). The store runs it under its write
    /// lock, so it never races a write; counted and logged.
    pub async fn collect_garbage(&self) -> Result<GcReport, MirrorError> {
        let report = self
            .store()
            .gc()
            .await
            .inspect_err(|e| self.count_store_error(e))?;
        let c = &self.inner.counters;
        c.gc_runs.fetch_add(1, Ordering::Relaxed);
        let collected = (report.orphan_objects + report.stale_metadata) as u64;
        c.gc_collected.fetch_add(collected, Ordering::Relaxed);
        if collected > 0 {
            tracing::info!(node = %self.node(), orphan_objects = report.orphan_objects, stale_metadata = report.stale_metadata, "collected leftovers of interrupted writes");
        }
        Ok(report)
    }

    /// Collects garbage now and then every `interval`, for as long as the agent lives.
    fn spawn_gc(&self, interval: Duration) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let agent = Agent { inner };
                if let Err(error) = agent.collect_garbage().await {
                    tracing::warn!(node = %agent.node(), %error, "garbage collection failed; retried at the next interval");
                }
                drop(agent);
                tokio::time::sleep(interval).await;
            }
        });
    }

    /// Role, epoch, sequences and counters, for metrics.
    pub fn snapshot(&self) -> AgentSnapshot {
        let (role, epoch, lease_remaining) = {
            let c = self.control();
            (c.role(), c.epoch(), c.lease_remaining(Instant::now()))
        };
        let c = &self.inner.counters;
        AgentSnapshot {
            role,
            epoch,
            applied_sequence: self.applied_sequence(role),
            lease_remaining,
            sync: self.sync_state(),
            refused: c.refused.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            hsm_errors: c
                .hsm_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    fn count(map: &Mutex<BTreeMap<&'static str, u64>>, kind: &'static str) {
        *map.lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    /// Counts a failure of the local token.
    fn count_store_error(&self, e: &StoreError) {
        if !matches!(
            e,
            StoreError::NotFound { .. } | StoreError::VersionConflict { .. }
        ) {
            Self::count(&self.inner.counters.hsm_errors, e.kind());
        }
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.inner.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn replication(&self) -> MutexGuard<'_, SyncSet> {
        self.inner
            .replication
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The sequence this node vouches for: the primary's published one, or the mirror's
    /// cursor in its primary's history.
    fn applied_sequence(&self, role: DeviceRole) -> u64 {
        if role == DeviceRole::Primary {
            self.inner.local.index().published()
        } else {
            sync::lock(&self.inner.sync_state).cursor.unwrap_or(0)
        }
    }

    /// Token, role and sync state for the controller's probe.
    pub async fn health(&self) -> AgentHealth {
        let token = self.store().health().await;
        let (role, epoch, lease, primary, fenced) = {
            let c = self.control();
            (
                c.role(),
                c.epoch(),
                c.lease_remaining(Instant::now()),
                c.primary().cloned(),
                c.is_fenced(),
            )
        };
        let clock = AgentClock::process();
        let mut h = AgentHealth {
            node: self.node().into(),
            device: self.inner.cfg.device.clone(),
            token_label: self.store().token_label().into(),
            role: Some(role),
            epoch,
            applied_sequence: self.applied_sequence(role),
            // Rounded up: 0 means expired, never "less than a millisecond left".
            write_lease_remaining_ms: duration_ms(
                lease.saturating_add(Duration::from_nanos(999_999)),
            ),
            primary,
            fenced,
            clock: Some(ClockReading {
                id: clock.id(),
                now_ms: clock.now_ms(),
            }),
            ..AgentHealth::default()
        };
        match token {
            Ok(info) => {
                h.token_present = true;
                h.session_usable = true;
                h.token_serial = Some(info.serial).filter(|s| !s.is_empty());
            }
            Err(e) => {
                self.count_store_error(&e);
                h.token_present = !matches!(
                    e,
                    StoreError::TokenNotFound { .. }
                        | StoreError::DeviceUnavailable { .. }
                        | StoreError::Timeout { .. }
                        | StoreError::Library { .. }
                );
                h.token_error = Some(Fault {
                    kind: e.kind().into(),
                    message: e.to_string(),
                });
            }
        }
        if role == DeviceRole::Primary {
            h.replication = Some(self.replication().status());
        } else {
            h.sync = Some(sync::lock(&self.inner.sync_state).status());
        }
        h
    }

    /// Applies a role assignment from the controller and saves it on the token.
    pub async fn assign(&self, a: Assignment) -> Result<Assigned, MirrorError> {
        let response = self.apply(a.clone()).await?;
        *lock_plain(&self.inner.last_assignment) = Some(a);
        self.persist().await;
        Ok(response)
    }

    async fn apply(&self, a: Assignment) -> Result<Assigned, MirrorError> {
        let now = Instant::now();
        let cfg = &self.inner.cfg;
        let mut engine = self.inner.engine.lock().await;
        // Refuse before any side effect: validate the assignment and its endpoints.
        let transition = self.control().clone().assign(&a, now)?;
        let primary_conn = match (&a.primary, a.role) {
            (Some(p), DeviceRole::ReadOnly | DeviceRole::Standby) => {
                Some(self.inner.pool.redial(p)?)
            }
            _ => None,
        };
        let mut mirrors = SyncSet::default();
        mirrors.configure(&a.mirrors, &self.inner.pool)?;
        drop(mirrors);
        if transition.promoted() {
            // A primary needs its token: refuse promotion while it is unusable.
            self.inner.local.ensure_index().await?;
        }

        let _gate = self.inner.gate.write().await;
        let _writes = self.inner.writes.lock().await;
        if let Some(interval) = a.sync_interval {
            self.inner
                .sync_interval_ms
                .store(duration_ms(interval), Ordering::Relaxed);
        }
        match a.role {
            DeviceRole::Primary => {
                if let Some(running) = engine.take() {
                    running.stop().await;
                }
                if transition.promoted() {
                    // Everything up to the mirror's cursor is shared history with the old
                    // primary; later versions are this term's own.
                    let cursor = sync::lock(&self.inner.sync_state).cursor;
                    let fork = cursor.unwrap_or_else(|| self.store().latest_sequence());
                    self.inner.local.index().begin_term(fork);
                    tracing::info!(node = %self.node(), epoch = a.epoch, fork, "promoted to primary");
                }
                self.replication().configure(&a.mirrors, &self.inner.pool)?;
            }
            DeviceRole::ReadOnly | DeviceRole::Standby => {
                if transition.demoted() {
                    self.replication().clear();
                    tracing::warn!(node = %self.node(), epoch = a.epoch, "demoted from primary; rejoining as a mirror with a full verification pass");
                }
                let keep = matches!((&*engine, &a.primary), (Some(h), Some(p)) if h.primary == *p && h.epoch == a.epoch);
                if !keep {
                    if let Some(running) = engine.take() {
                        running.stop().await;
                    }
                    if let Some(conn) = primary_conn {
                        *engine = Some(SyncHandle::spawn(
                            self.inner.local.clone(),
                            conn,
                            a.epoch,
                            cfg.sync,
                            self.inner.sync_interval_ms.clone(),
                            self.inner.sync_state.clone(),
                            transition.demoted(),
                        ));
                    }
                }
            }
        }
        self.control().assign(&a, now)?;
        Ok(Assigned {
            role: a.role,
            epoch: a.epoch,
            applied_sequence: self.applied_sequence(a.role),
        })
    }

    /// Extends the primary's write lease from now.
    /// Stops writes for good under `epoch` (planned switchover); returns the sequence
    /// after which this primary publishes nothing more.
    pub async fn fence(&self, epoch: u64) -> Result<u64, MirrorError> {
        self.control().fence(epoch)?;
        // Saved before answering: a fenced epoch stays fenced across a restart.
        self.persist().await;
        Ok(self.applied_sequence(DeviceRole::Primary))
    }

    /// Extends the write lease; under Active, stops waiting for the mirrors the controller
    /// recorded as outside the write set.
    pub fn renew_lease(
        &self,
        epoch: u64,
        duration: Duration,
        outside_write_set: &[String],
    ) -> Result<Duration, MirrorError> {
        let remaining = self.control().renew(epoch, duration, Instant::now())?;
        self.replication().acknowledge_outside(outside_write_set);
        Ok(remaining)
    }

    /// A client write (primary only).
    pub async fn put(
        &self,
        path: &SecretPath,
        data: SecretData,
        expect: Expect,
        epoch: u64,
    ) -> Result<WriteOutcome, MirrorError> {
        self.write(path, Body::Live(data), expect, epoch).await
    }

    /// A client delete (primary only): a tombstone that mirrors apply too.
    pub async fn delete(
        &self,
        path: &SecretPath,
        expect: Expect,
        epoch: u64,
    ) -> Result<WriteOutcome, MirrorError> {
        self.write(path, Body::Deleted, expect, epoch).await
    }

    async fn write(
        &self,
        path: &SecretPath,
        body: Body,
        expect: Expect,
        epoch: u64,
    ) -> Result<WriteOutcome, MirrorError> {
        let result = self.write_unobserved(path, body, expect, epoch).await;
        match &result {
            Err(MirrorError::Store(e))
                if !matches!(
                    e,
                    StoreError::NotFound { .. } | StoreError::VersionConflict { .. }
                ) =>
            {
                self.count_store_error(e)
            }
            Err(e) => Self::count(&self.inner.counters.refused, e.kind()),
            Ok(outcome) => {
                if let Some(journal) = &self.inner.cfg.write_journal {
                    journal.record(&super::journal::Accepted {
                        node: self.node().into(),
                        epoch,
                        path: path.to_string(),
                        version: outcome.version,
                        mono_ns: super::journal::monotonic_ns(),
                    });
                }
            }
        }
        result
    }

    async fn write_unobserved(
        &self,
        path: &SecretPath,
        body: Body,
        expect: Expect,
        epoch: u64,
    ) -> Result<WriteOutcome, MirrorError> {
        self.inner.local.ensure_index().await?;
        let _writes = self.inner.writes.lock().await;
        self.control().admit_write(epoch, Instant::now())?;
        self.site_gate().admit(Instant::now().into_std())?;
        let with_mirrors = !self.replication().is_empty();
        let store = self.store();
        let (version, checksum, pushed) = match body {
            Body::Live(data) => {
                let checksum = Checksum::of_data(path, &data);
                let copy = with_mirrors.then(|| data.clone());
                let version = store.put(path, data, expect).await?;
                let pushed = copy.map(|data| Record {
                    path: path.clone(),
                    version,
                    checksum,
                    body: Body::Live(data),
                });
                (version, checksum, pushed)
            }
            Body::Deleted => {
                let version = store.delete(path, expect).await?;
                let tombstone = Record::tombstone(path.clone(), version);
                (version, tombstone.checksum, Some(tombstone))
            }
        };
        let targets = {
            let mut index = self.inner.local.index();
            index.record_write(path, version, checksum);
            self.replication().write_targets()
        };
        // The site may have lost its lease (or been fenced) while the write went on.
        if let Err(refusal) = self.site_gate().admit(Instant::now().into_std()) {
            tracing::warn!(%path, version, %refusal, "site gate closed during a write; not acknowledged");
            return Err(MirrorError::Site(refusal));
        }
        if self.control().check_lease(Instant::now()).is_err() {
            return Err(MirrorError::LeaseExpiredDuringWrite {
                node: self.node().into(),
                path: path.to_string(),
                version,
            });
        }
        let mut outcome = WriteOutcome {
            version,
            replicated_to: Vec::new(),
        };
        let Some(record) = pushed.filter(|_| !targets.is_empty()) else {
            return Ok(outcome);
        };
        let request = Push {
            record,
            epoch,
            primary_node: self.node().into(),
        };
        let mut missing = Vec::new();
        for (node, result) in
            replication::push(targets, request, self.inner.cfg.replicate_timeout).await
        {
            match result {
                Ok(()) => outcome.replicated_to.push(node),
                Err(e) => {
                    self.replication().mark_dropping(&node, e.to_string());
                    missing.push(node);
                }
            }
        }
        if !missing.is_empty() {
            return Err(MirrorError::NotReplicated {
                node: self.node().into(),
                path: path.to_string(),
                version,
                mirrors: missing.join(", "),
            });
        }
        // The pushes took time: acknowledge only within the lease, never after another
        // node may have been promoted (the write is on the mirrors; its outcome is
        // indeterminate to the client, as for any write whose answer it did not get).
        if self.control().check_lease(Instant::now()).is_err() {
            return Err(MirrorError::LeaseExpiredDuringWrite {
                node: self.node().into(),
                path: path.to_string(),
                version,
            });
        }
        Ok(outcome)
    }

    /// Applies a record of the active site's archive (this site being passive), keeping
    /// its version, so this site's mirrors pull it as from any primary. `authoritative`
    /// (a base after a change of epoch there) replaces whatever this token holds.
    pub async fn apply_archived(
        &self,
        record: Record,
        authoritative: bool,
    ) -> Result<(), MirrorError> {
        self.archive_apply_allowed()?;
        record.verify().map_err(|_| MirrorError::ChecksumMismatch {
            node: "the archive".into(),
            path: record.path.to_string(),
            version: record.version,
        })?;
        let guard = match authoritative {
            true => Guard::Expect(self.inner.local.index().version_of(&record.path)),
            false => Guard::NotOlder,
        };
        self.inner.local.apply(record, guard).await?;
        Ok(())
    }

    /// Removes a secret the active site's archive does not hold (this site being passive).
    pub async fn remove_archived(&self, path: &SecretPath) -> Result<(), MirrorError> {
        self.archive_apply_allowed()?;
        let Some(version) = self.inner.local.index().version_of(path) else {
            return Ok(());
        };
        self.inner.local.purge(path, version).await?;
        Ok(())
    }

    /// Only a passive site's agent applies an archive: never an active or fenced one.
    fn archive_apply_allowed(&self) -> Result<(), MirrorError> {
        match self.site_gate() {
            super::site::SiteGate::Passive { .. } => Ok(()),
            _ => Err(MirrorError::InvalidArgument {
                field: "site",
                why: "only a passive site applies another site's archive".into(),
            }),
        }
    }

    /// A live secret, as served by the primary or a read-only mirror.
    pub async fn get(&self, path: &SecretPath) -> Result<Record, MirrorError> {
        self.control().admit_read()?;
        let record = self.store().record(path).await.inspect_err(|e| {
            self.count_store_error(e);
        })?;
        if record.is_deleted() {
            return Err(StoreError::NotFound {
                token: self.store().token_label().into(),
                path: path.to_string(),
            }
            .into());
        }
        Ok(record)
    }

    /// Answers a Get with who answered.
    /// A secret for a reader, with who served it.
    pub async fn serve(&self, path: &SecretPath) -> Result<Served, MirrorError> {
        let record = self.get(path).await?;
        let (role, epoch) = {
            let c = self.control();
            (c.role(), c.epoch())
        };
        Ok(Served {
            record,
            node: self.node().into(),
            role,
            epoch,
            applied_sequence: self.applied_sequence(role),
        })
    }

    pub async fn manifest(&self) -> Result<Manifest, MirrorError> {
        let (role, epoch) = {
            let c = self.control();
            c.admit_read()?;
            (c.role(), c.epoch())
        };
        self.inner.local.ensure_index().await?;
        // The sequence is read first: every change up to it is in the listing.
        let sequence = self.applied_sequence(role);
        let fork = self.inner.local.index().fork();
        let entries = self.store().manifest().await?;
        Ok(Manifest {
            sequence,
            epoch,
            fork_sequence: if role == DeviceRole::Primary { fork } else { 0 },
            entries,
            node: self.node().into(),
        })
    }

    /// The primary's change feed.
    pub async fn changes(&self, request: ChangesAsk) -> Result<Changes, MirrorError> {
        let epoch = {
            let c = self.control();
            c.admit_primary_read()?;
            c.epoch()
        };
        self.inner.local.ensure_index().await?;
        self.inner
            .counters
            .changes_calls
            .fetch_add(1, Ordering::Relaxed);
        let limit = match request.limit as usize {
            0 => DEFAULT_CHANGES,
            n => n.min(MAX_CHANGES),
        };
        {
            let index = self.inner.local.index();
            let published = index.published();
            if request.since >= published {
                // Nothing new: answered from the index alone. A mirror that has
                // everything under this epoch is back in the Active sync set (checked
                // under the index lock, so no write slips between).
                if request.from_verified_mirror(epoch) {
                    self.replication().rejoin(&request.node);
                }
                self.inner
                    .counters
                    .changes_answered_from_index
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(Changes {
                    records: Vec::new(),
                    through: request.since,
                    sequence: published,
                    epoch,
                    more: false,
                });
            }
        }
        let (records, through, more, published) =
            self.consistent_changes(request.since, limit).await?;
        // An answer that brings a mirror up to everything published (checked under the
        // index lock: no write slips between) puts it back in the Active sync set too.
        // Under steady writes a mirror's pull rarely finds nothing new, and one taken out
        // of the set would otherwise stay out for as long as clients write. Only within
        // half a push window, so the pushes that follow are never out of its sequence
        // while it applies this answer; it is promoted only once its own sequence shows
        // it holds what the primary acknowledged.
        if !more
            && request.from_verified_mirror(epoch)
            && through.saturating_sub(request.since) <= PUSH_WINDOW / 2
        {
            let index = self.inner.local.index();
            if index.published() <= through {
                self.replication().rejoin(&request.node);
            }
        }
        self.inner
            .counters
            .records_sent
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(Changes {
            records,
            through,
            sequence: published,
            epoch,
            more,
        })
    }

    /// The changes after `since` up to a point `through` that they describe exactly: applied
    /// to the state at `since`, they give the state at `through` (every path at its newest
    /// version up to `through`). The token keeps only each path's newest version, so a path overwritten between the
    /// index snapshot and its read no longer has the version the snapshot listed: no point
    /// at or after that version is described until the newer version read is covered too,
    /// so the answer reads on up to it (a few rounds, each over what was written during the
    /// one before). A mirror or an archive segment that claimed the snapshot's point
    /// instead would miss that path's acknowledged writes up to it.
    async fn consistent_changes(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<(Vec<Record>, u64, bool, u64), MirrorError> {
        let mut newest: std::collections::HashMap<SecretPath, Record> = Default::default();
        let (mut from, mut need) = (since, since);
        for round in 0..CONSISTENT_ROUNDS {
            let mut bytes = 0usize;
            if round > 0 {
                // A write may be on the token but not yet in the index: let it land.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let (batch, mut more, published) = {
                let index = self.inner.local.index();
                let published = index.published();
                let (batch, more) = index.after(from, limit);
                (batch, more, published)
            };
            let count = batch.len();
            let mut through = from;
            let store = self.store().clone();
            let mut reads = std::pin::pin!(
                futures::stream::iter(batch.into_iter().map(|(version, path)| {
                    let store = store.clone();
                    async move {
                        let result = store.record(&path).await;
                        (version, path, result)
                    }
                }))
                .buffered(READ_CONCURRENCY)
            );
            let mut consumed = 0;
            while let Some((version, path, result)) = reads.next().await {
                consumed += 1;
                match result {
                    Ok(record) => {
                        // Overwritten after the snapshot: the listed version is gone and
                        // the newer one read must be covered before any point is.
                        need = need.max(record.version);
                        bytes += record_size(&record);
                        match newest.get(&path) {
                            Some(held) if held.version >= record.version => {}
                            _ => {
                                newest.insert(path, record);
                            }
                        }
                    }
                    // Purged after the snapshot: nothing of it to send.
                    Err(StoreError::NotFound { .. }) => {}
                    Err(e @ StoreError::Corrupt { .. }) => {
                        tracing::error!(node = %self.node(), path = %path, version, error = %e, "the primary's own copy is corrupt; mirrors keep theirs");
                    }
                    Err(e) => return Err(e.into()),
                }
                through = version;
                if bytes >= self.inner.cfg.batch_bytes && consumed < count {
                    more = true;
                    break;
                }
            }
            if !more {
                through = published;
            }
            if need <= through {
                let mut records: Vec<Record> = newest.into_values().collect();
                records.sort_by_key(|r| r.version);
                return Ok((records, through, more, published));
            }
            from = through;
        }
        // Written faster than read, round after round: no point is described yet. Nothing
        // is claimed; the caller asks again.
        tracing::debug!(node = %self.node(), since, "changes kept moving while read; answering none");
        let published = self.inner.local.index().published();
        Ok((Vec::new(), since, false, published))
    }

    /// The primary's records of named paths (a mirror's verification pass).
    pub async fn fetch(&self, request: FetchAsk) -> Result<Fetched, MirrorError> {
        self.control().admit_primary_read()?;
        self.inner.local.ensure_index().await?;
        if request.paths.len() > MAX_FETCH {
            return Err(MirrorError::InvalidArgument {
                field: "paths",
                why: format!("at most {MAX_FETCH} per call"),
            });
        }
        let held: std::collections::HashMap<SecretPath, ManifestEntry> = request
            .held
            .into_iter()
            .map(|entry| (entry.path.clone(), entry))
            .collect();
        let paths = request.paths;
        let store = self.store().clone();
        let mut reads = std::pin::pin!(
            futures::stream::iter(paths.into_iter().map(|path| {
                let store = store.clone();
                async move {
                    let result = store.record(&path).await;
                    (path, result)
                }
            }))
            .buffered(READ_CONCURRENCY)
        );
        let mut response = Fetched::default();
        let mut bytes = 0usize;
        while let Some((path, result)) = reads.next().await {
            match result {
                Ok(record) => {
                    bytes += record_size(&record);
                    response.records.push(record);
                }
                Err(StoreError::NotFound { .. }) => response.missing.push(path.clone()),
                Err(e @ StoreError::Corrupt { .. }) => {
                    tracing::error!(node = %self.node(), path = %path, error = %e, "the primary's own copy is corrupt");
                    response.unreadable.push(path.clone());
                }
                Err(e) => return Err(e.into()),
            }
            if let Some(entry) = held.get(&path)
                && self.inner.local.index().is_foreign(entry)
            {
                response.lost.push(path);
            }
            response.covered += 1;
            if bytes >= self.inner.cfg.batch_bytes {
                break;
            }
        }
        self.inner
            .counters
            .records_sent
            .fetch_add(response.records.len() as u64, Ordering::Relaxed);
        Ok(response)
    }

    /// A push from the primary (Active policy), sent by `sender` as its certificate
    /// proves it.
    pub async fn replicate(
        &self,
        mut request: Push,
        sender: &Identity,
    ) -> Result<bool, MirrorError> {
        let _gate = self.inner.gate.read().await;
        request.primary_node = self.admit_push(request.epoch, &request.primary_node, sender)?;
        let record = request.record;
        // Pushes follow the primary's sequence: a version more than a window of writes in
        // flight beyond what this mirror applied is a jump no primary makes, and would
        // stall every later push behind it (or wrap the sequence near its top).
        let applied = self.inner.local.store.latest_sequence();
        if !push_in_sequence(record.version, applied) {
            let error = MirrorError::OutOfSequence {
                node: self.node().into(),
                from: request.primary_node.clone(),
                version: record.version,
                applied,
                window: PUSH_WINDOW,
            };
            self.refuse_push(&error);
            return Err(error);
        }
        if record.verify().is_err() {
            self.inner
                .counters
                .pushes_refused
                .fetch_add(1, Ordering::Relaxed);
            sync::lock(&self.inner.sync_state).checksum_failures += 1;
            tracing::warn!(node = %self.node(), from = %request.primary_node, path = %record.path, version = record.version, "pushed record fails its checksum; refused");
            return Err(MirrorError::ChecksumMismatch {
                node: request.primary_node,
                path: record.path.to_string(),
                version: record.version,
            });
        }
        let version = record.version;
        let applied = self.inner.local.apply(record, Guard::NotOlder).await?;
        // A push that is the next change after this mirror's cursor, in the history it
        // verified, moves the cursor on: the sequence it reports then counts what pushes
        // brought, not only pulls. The controller promotes, under Active, only a mirror
        // whose sequence reaches the primary's; one that held every acknowledged write
        // by push but had not pulled since would otherwise never qualify.
        {
            let mut st = sync::lock(&self.inner.sync_state);
            if st.verified_epoch == request.epoch
                && st.cursor.is_some_and(|c| c.checked_add(1) == Some(version))
            {
                st.cursor = Some(version);
            }
        }
        Ok(applied == Applied::Stored)
    }

    /// Whether a push under `epoch` from `sender` (claiming `claimed`) may be applied here:
    /// the pushing node, or why not. Checked before anything of the pushed record, so a
    /// push from an old term or a wrong node is refused as such whatever it carries.
    pub fn admit_push(
        &self,
        epoch: u64,
        claimed: &str,
        sender: &Identity,
    ) -> Result<String, MirrorError> {
        let node = match self.pushing_node(claimed, sender) {
            Ok(node) => node,
            Err(error) => {
                self.refuse_push(&error);
                return Err(error);
            }
        };
        self.control().admit_replicate(epoch, &node)?;
        Ok(node)
    }

    /// The node a push comes from: the one its sender's certificate names. The request's
    /// own claim must agree with it; a certificate shared by all nodes proves no node and
    /// is accepted (taking the claim) only where the operator allowed it.
    fn pushing_node(&self, claimed: &str, sender: &Identity) -> Result<String, MirrorError> {
        let refused = |required: &'static str| MirrorError::PermissionDenied {
            rpc: "Replicate",
            required,
            caller: format!("{} claiming to push as {claimed:?}", sender.describe()),
        };
        match sender {
            Identity::Agent(Some(node)) if claimed.is_empty() || claimed == node => {
                Ok(node.clone())
            }
            Identity::Agent(Some(_)) => Err(refused("pushing node's own")),
            Identity::Agent(None) if self.inner.cfg.allow_shared_agent_identity => {
                Ok(claimed.to_string())
            }
            _ => Err(refused("assigned primary's node")),
        }
    }

    /// Counts and logs a refused push, and shows it as the sync engine's last error (in
    /// Health, so in the HSMDevice status of this node) until the next clean pull.
    fn refuse_push(&self, error: &MirrorError) {
        self.inner
            .counters
            .pushes_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(node = %self.node(), %error, "pushed record refused");
        sync::lock(&self.inner.sync_state).last_error = Some((error.kind(), error.to_string()));
    }

    /// Runs one pull now (mirrors; for tests, benchmarks and diagnostics).
    pub async fn pull_now(&self) -> Result<PullReport, MirrorError> {
        match &*self.inner.engine.lock().await {
            Some(h) => h.pull_now().await,
            None => Err(MirrorError::NotSyncing {
                node: self.node().into(),
            }),
        }
    }

    /// Runs a full verification pass now (mirrors).
    pub async fn full_pass_now(&self) -> Result<FullPassReport, MirrorError> {
        match &*self.inner.engine.lock().await {
            Some(h) => h.full_pass_now().await,
            None => Err(MirrorError::NotSyncing {
                node: self.node().into(),
            }),
        }
    }

    /// Stops the sync engine (the agent keeps answering calls).
    pub async fn shutdown(&self) {
        if let Some(running) = self.inner.engine.lock().await.take() {
            running.stop().await;
        }
    }
}

/// How far beyond a mirror's applied sequence a push may be: writes the primary has in
/// flight at once (pushes of concurrent writes may arrive out of order).
pub const PUSH_WINDOW: u64 = 1024;

/// Whether a pushed record's version may follow `applied`: never 0, never beyond the
/// window (checked arithmetic: a version near `u64::MAX` cannot wrap anything).
pub fn push_in_sequence(version: u64, applied: u64) -> bool {
    version != 0 && version <= applied.saturating_add(PUSH_WINDOW)
}

fn record_size(record: &Record) -> usize {
    match &record.body {
        Body::Live(data) => data.byte_len() + data.keys().map(str::len).sum::<usize>() + 64,
        Body::Deleted => 64,
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock_plain<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
