//! The mirror's sync engine: pulls the primary's changes and verifies the whole token.
//!
//! - **Pull** (every pull interval): `Changes(since = applied sequence)`. Every record's
//!   checksum is verified before it is stored; one that fails is never applied, counted,
//!   reported, and asked for again by the next pull (the applied sequence stops before
//!   it). Records are applied in version order, tombstones included. With nothing new,
//!   a pull is one RPC that the primary answers from its change index: O(1), no token
//!   access on either side.
//! - **Full verification pass** (on start, after the primary or epoch changed, after a
//!   demotion from primary, every `syncInterval`, and when a pull finds the histories
//!   diverged): compares this token's manifest with the primary's; copies what differs,
//!   removes what the primary does not have, and reads back every secret it believes
//!   intact — a corrupt or missing object is replaced by the primary's copy. Writes this
//!   node holds that the primary never had (a returning old primary's, above the
//!   primary's fork point) are discarded to follow the primary and reported as lost
//!   writes, never silently.
//!
//! The applied sequence is the engine's own cursor in the primary's history, not the
//! store's highest version: after a failover the new primary's numbers may collide with
//! versions this node saw from the old one, so the cursor is re-established by a full
//! pass against each new primary.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use crate::hsm::{ManifestEntry, SecretPath, StoreError};

use super::MirrorError;
use super::feed::{ChangesAsk, FetchAsk, Fetched};
use super::health::{Fault, SyncStatus};
use super::local::{Applied, Guard, Local};
use super::plan::plan_full_pass;
use super::rpc::client::AgentConnection;

/// How often and how much a mirror syncs.
#[derive(Clone, Copy, Debug)]
pub struct SyncSettings {
    /// Time between two pulls.
    pub pull_interval: Duration,
    /// Time between two full verification passes.
    pub sync_interval: Duration,
    /// Records asked for per `Changes` call.
    pub changes_batch: u32,
    /// Paths asked for per `Fetch` call.
    pub fetch_batch: usize,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            pull_interval: Duration::from_millis(500),
            sync_interval: Duration::from_secs(300),
            changes_batch: 256,
            fetch_batch: 128,
        }
    }
}

/// A write this node held that the primary never had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostWrite {
    pub path: SecretPath,
    pub version: u64,
    pub deleted: bool,
}

/// What one full verification pass found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FullPassReport {
    pub finished: Option<SystemTime>,
    pub duration: Duration,
    /// Secrets on the primary.
    pub checked: u64,
    pub fetched: u64,
    pub purged: u64,
    /// Stored here but unreadable or failing verification: replaced by the primary's copy.
    pub repaired: u64,
    pub checksum_failures: u64,
    pub unreadable_on_primary: u64,
    pub lost_writes: Vec<LostWrite>,
    /// The primary's sequence this pass brought the node to.
    pub sequence: u64,
    pub rejoin: bool,
    /// The epoch of the assignment this pass ran under, when its primary served that
    /// epoch; 0 otherwise (the trust rule, `failover::trust`, reads it).
    pub epoch: u64,
}

/// What one pull did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PullReport {
    pub applied: u64,
    /// Changes RPCs made.
    pub calls: u32,
    /// The applied sequence afterwards.
    pub through: u64,
    pub primary_sequence: u64,
    /// The pull found that a full pass was needed and ran it.
    pub ran_full_pass: bool,
}

/// The engine's state, read by Health. Survives engine restarts (counters accumulate).
#[derive(Clone, Debug, Default)]
pub struct SyncState {
    /// Every change of the current primary up to this sequence is applied here; None
    /// until a full pass against the current primary completed.
    pub cursor: Option<u64>,
    /// The epoch of the primary the last full pass verified against.
    pub verified_epoch: u64,
    pub primary_sequence: u64,
    pub last_sync: Option<SystemTime>,
    pub checksum_failures: u64,
    pub records_applied: u64,
    pub last_error: Option<(&'static str, String)>,
    pub consecutive_failures: u32,
    pub last_full_pass: Option<FullPassReport>,
    pub lost_writes: VecDeque<LostWrite>,
    /// Pulls that reached the primary (metrics).
    pub pulls: u64,
    /// Completed full verification passes (metrics).
    pub full_passes: u64,
    /// Records full passes replaced because they were unreadable or corrupt (metrics).
    pub repairs: u64,
    /// Failures of the local token while syncing, by kind (metrics).
    pub hsm_errors: std::collections::BTreeMap<&'static str, u64>,
}

const LOST_WRITES_KEPT: usize = 1000;

impl SyncState {
    /// What Health reports of it.
    pub(crate) fn status(&self) -> SyncStatus {
        SyncStatus {
            last_sync: self.last_sync,
            primary_sequence: self.primary_sequence,
            checksum_failures: self.checksum_failures,
            records_applied: self.records_applied,
            last_error: self.last_error.as_ref().map(|(kind, message)| Fault {
                kind: (*kind).to_string(),
                message: message.clone(),
            }),
            consecutive_failures: self.consecutive_failures,
            last_full_pass: self.last_full_pass.clone(),
            lost_writes: self.lost_writes.iter().cloned().collect(),
        }
    }
}

/// Requests to a running engine (so passes never run concurrently).
pub(crate) enum Command {
    Pull(oneshot::Sender<Result<PullReport, MirrorError>>),
    FullPass(oneshot::Sender<Result<FullPassReport, MirrorError>>),
}

/// A running engine, owned by the agent.
pub(crate) struct SyncHandle {
    pub primary: super::fencing::Peer,
    pub epoch: u64,
    stop: watch::Sender<bool>,
    commands: mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl SyncHandle {
    /// Starts an engine that follows `primary`; its first act is a full pass.
    pub fn spawn(
        local: Arc<Local>,
        primary: AgentConnection,
        epoch: u64,
        settings: SyncSettings,
        sync_interval_ms: Arc<AtomicU64>,
        state: Arc<Mutex<SyncState>>,
        rejoin: bool,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let (commands, commands_rx) = mpsc::channel(8);
        let peer = primary.peer().clone();
        lock(&state).cursor = None;
        let engine = SyncEngine {
            local,
            primary,
            epoch,
            settings,
            sync_interval_ms,
            state,
            rejoin,
            stop: stop_rx,
        };
        let task = tokio::spawn(engine.run(commands_rx));
        Self {
            primary: peer,
            epoch,
            stop,
            commands,
            task,
        }
    }

    /// Stops the engine between two applies and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await
            && e.is_panic()
        {
            tracing::error!("sync engine panicked: {e}");
        }
    }

    pub async fn pull_now(&self) -> Result<PullReport, MirrorError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Pull(tx)).await?;
        rx.await.map_err(|_| self.gone())?
    }

    pub async fn full_pass_now(&self) -> Result<FullPassReport, MirrorError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::FullPass(tx)).await?;
        rx.await.map_err(|_| self.gone())?
    }

    async fn send(&self, c: Command) -> Result<(), MirrorError> {
        self.commands.send(c).await.map_err(|_| self.gone())
    }

    fn gone(&self) -> MirrorError {
        MirrorError::NotSyncing {
            node: self.primary.node.clone(),
        }
    }
}

pub(crate) fn lock(state: &Mutex<SyncState>) -> MutexGuard<'_, SyncState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

struct SyncEngine {
    local: Arc<Local>,
    primary: AgentConnection,
    /// The epoch of the assignment this engine serves; its passes report it.
    epoch: u64,
    settings: SyncSettings,
    /// Set by the controller's assignments (HSMDevice spec.mirroring.syncInterval).
    sync_interval_ms: Arc<AtomicU64>,
    state: Arc<Mutex<SyncState>>,
    rejoin: bool,
    stop: watch::Receiver<bool>,
}

/// A pass interrupted because the engine is stopping.
fn stopped(node: &str) -> MirrorError {
    MirrorError::NotSyncing { node: node.into() }
}

impl SyncEngine {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut ticks = tokio::time::interval(self.settings.pull_interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut next_full = Instant::now();
        let mut full_failures = 0u32;
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                command = commands.recv() => match command {
                    None => break,
                    Some(Command::Pull(reply)) => {
                        let result = self.pull().await;
                        self.note(&result);
                        let _ = reply.send(result);
                    }
                    Some(Command::FullPass(reply)) => {
                        let result = self.full_pass().await;
                        self.note(&result);
                        if result.is_ok() {
                            next_full = Instant::now() + self.sync_interval();
                        }
                        let _ = reply.send(result);
                    }
                },
                _ = ticks.tick() => {
                    let now = Instant::now();
                    if now >= next_full || lock(&self.state).cursor.is_none() {
                        if now < next_full {
                            continue; // backing off after a failed pass
                        }
                        let result = self.full_pass().await;
                        self.note(&result);
                        next_full = match result {
                            Ok(_) => {
                                full_failures = 0;
                                Instant::now() + self.sync_interval()
                            }
                            Err(_) => {
                                full_failures = full_failures.saturating_add(1);
                                Instant::now() + backoff(self.settings.pull_interval, full_failures)
                            }
                        };
                    } else {
                        let result = self.pull().await;
                        self.note(&result);
                    }
                }
            }
            if *stop.borrow() {
                break;
            }
        }
    }

    fn sync_interval(&self) -> Duration {
        Duration::from_millis(self.sync_interval_ms.load(Ordering::Relaxed))
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Awaits a call to the primary or a read, giving up as soon as the engine is told to
    /// stop: a promotion must not wait for an RPC to a dead primary to time out. Never
    /// used around local writes, which always run to completion.
    async fn unless_stopped<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, MirrorError>>,
    ) -> Result<T, MirrorError> {
        let mut stop = self.stop.clone();
        tokio::select! {
            result = work => result,
            _ = stop.wait_for(|stopping| *stopping) => Err(stopped(&self.local.node)),
        }
    }

    /// Records the outcome for Health and logs transitions (not every failed tick).
    fn note<T>(&self, result: &Result<T, MirrorError>) {
        let mut st = lock(&self.state);
        match result {
            Ok(_) => {
                if st.consecutive_failures > 0 {
                    tracing::info!(node = %self.local.node, primary = %self.primary.node(), "sync with the primary recovered");
                }
                st.consecutive_failures = 0;
                st.last_error = None;
            }
            Err(MirrorError::NotSyncing { .. }) if self.stopping() => {}
            Err(e) => {
                if st.consecutive_failures == 0 {
                    tracing::warn!(node = %self.local.node, primary = %self.primary.node(), error = %e, "sync with the primary failed");
                } else {
                    tracing::debug!(node = %self.local.node, error = %e, "sync still failing");
                }
                st.consecutive_failures = st.consecutive_failures.saturating_add(1);
                st.last_error = Some((e.kind(), e.to_string()));
                if let MirrorError::Store(local) = e {
                    *st.hsm_errors.entry(local.kind()).or_default() += 1;
                }
            }
        }
    }

    /// One incremental pull: asks for changes until the primary has no more.
    async fn pull(&mut self) -> Result<PullReport, MirrorError> {
        let Some(mut since) = lock(&self.state).cursor else {
            let pass = self.full_pass().await?;
            return Ok(PullReport {
                through: pass.sequence,
                primary_sequence: pass.sequence,
                ran_full_pass: true,
                ..PullReport::default()
            });
        };
        let verified_epoch = lock(&self.state).verified_epoch;
        let mut report = PullReport::default();
        loop {
            let ask = ChangesAsk {
                since,
                limit: self.settings.changes_batch,
                node: self.local.node.clone(),
                verified_epoch,
            };
            let response = match self.unless_stopped(self.primary.changes(&ask)).await {
                // A malformed record counts as one that fails its checksum.
                Err(e @ MirrorError::Protocol { .. }) => {
                    self.count_checksum_failure();
                    return Err(e);
                }
                other => other?,
            };
            report.calls += 1;
            if response.epoch != verified_epoch || response.sequence < since {
                // A new primary term, or a primary behind this node: histories may differ.
                tracing::info!(node = %self.local.node, primary = %self.primary.node(), epoch = response.epoch, sequence = response.sequence, since, "primary history changed; running a full verification pass");
                let pass = self.full_pass().await?;
                report.through = pass.sequence;
                report.primary_sequence = pass.sequence;
                report.ran_full_pass = true;
                return Ok(report);
            }
            let mut records = response.records;
            records.sort_by_key(|r| r.version);
            for record in records {
                if self.stopping() {
                    return Err(stopped(&self.local.node));
                }
                let version = record.version;
                if let Err(e) = record.verify() {
                    self.count_checksum_failure();
                    tracing::warn!(node = %self.local.node, primary = %self.primary.node(), path = %record.path, version, error = %e, "record from the primary fails its checksum; not applied, will fetch again");
                    return Err(MirrorError::ChecksumMismatch {
                        node: self.primary.node().into(),
                        path: record.path.to_string(),
                        version,
                    });
                }
                if self.local.apply(record, Guard::NotOlder).await? == Applied::Stored {
                    report.applied += 1;
                    lock(&self.state).records_applied += 1;
                }
                since = since.max(version);
                self.advance(since, None);
            }
            since = since.max(response.through);
            self.advance(since, Some(response.sequence));
            if !response.more || self.stopping() {
                break;
            }
        }
        report.through = since;
        report.primary_sequence = lock(&self.state).primary_sequence;
        Ok(report)
    }

    fn advance(&self, cursor: u64, primary_sequence: Option<u64>) {
        let mut st = lock(&self.state);
        st.cursor = Some(cursor);
        if let Some(seq) = primary_sequence {
            st.primary_sequence = seq;
            st.last_sync = Some(SystemTime::now());
            st.pulls += 1;
        }
    }

    fn count_checksum_failure(&self) {
        lock(&self.state).checksum_failures += 1;
    }

    /// Compares, repairs and aligns this token with the primary's.
    async fn full_pass(&mut self) -> Result<FullPassReport, MirrorError> {
        let started = Instant::now();
        let node = self.local.node.clone();
        let manifest = self.unless_stopped(self.primary.manifest()).await?;
        let from = self.primary.node().to_string();
        let theirs: Vec<ManifestEntry> = manifest.entries;
        let ours = self
            .unless_stopped(async { Ok(self.local.manifest_snapshot().await?) })
            .await?;
        let ours_by_path: HashMap<&SecretPath, &ManifestEntry> =
            ours.iter().map(|e| (&e.path, e)).collect();
        let plan = plan_full_pass(&theirs, &ours, manifest.fork_sequence);
        let mut report = FullPassReport {
            checked: theirs.len() as u64,
            rejoin: self.rejoin,
            // A pass vouches for its assignment's history only when the primary already
            // served it (promoted at that epoch): one against a primary not promoted yet,
            // or already demoted, vouches for none.
            epoch: if manifest.epoch == self.epoch {
                self.epoch
            } else {
                0
            },
            ..FullPassReport::default()
        };
        // The lowest version that failed verification: the cursor must stay below it.
        let mut failed_below: Option<u64> = None;

        // 1. Read back everything believed intact; store.record verifies the content.
        let mut fetch = plan.fetch;
        for entry in &plan.verify {
            if self.stopping() {
                return Err(stopped(&node));
            }
            match self
                .unless_stopped(async { Ok(self.local.store.record(&entry.path).await) })
                .await?
            {
                Ok(_) => {}
                Err(e @ (StoreError::Corrupt { .. } | StoreError::NotFound { .. })) => {
                    tracing::warn!(node = %node, path = %entry.path, version = entry.version, error = %e, "stored secret is damaged; repairing it from the primary");
                    self.local.purge(&entry.path, entry.version).await?;
                    report.repaired += 1;
                    fetch.push((entry.path.clone(), 0));
                }
                Err(e) => return Err(e.into()),
            }
        }

        // 2. Remove what the primary does not hold.
        for (entry, lost) in &plan.purge {
            if self.stopping() {
                return Err(stopped(&node));
            }
            if self.local.purge(&entry.path, entry.version).await? {
                report.purged += 1;
                if *lost {
                    report.lost_writes.push(LostWrite {
                        path: entry.path.clone(),
                        version: entry.version,
                        deleted: entry.deleted,
                    });
                }
            }
        }

        // 3. Copy what differs, in bounded batches; the next batch is fetched while this
        //    one is applied.
        let items: Vec<FetchItem> = fetch
            .into_iter()
            .map(|(path, held)| FetchItem {
                held: (held > 0)
                    .then(|| ours_by_path.get(&path).map(|e| (*e).clone()))
                    .flatten(),
                path,
            })
            .collect();
        let mut batches = FetchBatches::spawn(
            self.primary.clone(),
            items,
            self.settings.fetch_batch.max(1),
        );
        while let Some(batch) = self
            .unless_stopped(async { Ok(batches.next().await) })
            .await?
        {
            let (answered, response) = batch?;
            let expected: HashMap<SecretPath, FetchItem> = answered
                .into_iter()
                .map(|item| (item.path.clone(), item))
                .collect();
            let lost: HashSet<&SecretPath> = response.lost.iter().collect();
            for record in response.records {
                if self.stopping() {
                    return Err(stopped(&node));
                }
                let Some(item) = expected.get(&record.path) else {
                    return Err(MirrorError::Protocol {
                        node: from.clone(),
                        what: "Fetch answer",
                        why: format!("returned {}, which was not asked for", record.path),
                    });
                };
                let version = record.version;
                if let Err(e) = record.verify() {
                    tracing::warn!(node = %node, primary = %from, path = %item.path, version, error = %e, "record from the primary fails its checksum; not applied");
                    report.checksum_failures += 1;
                    self.count_checksum_failure();
                    failed_below = Some(failed_below.map_or(version, |v| v.min(version)));
                    continue;
                }
                let guard = Guard::Expect(item.held.as_ref().map(|e| e.version));
                if self.local.apply(record, guard).await? == Applied::Stored {
                    report.fetched += 1;
                }
                if let Some(held) = &item.held
                    && lost.contains(&item.path)
                {
                    report.lost_writes.push(LostWrite {
                        path: item.path.clone(),
                        version: held.version,
                        deleted: held.deleted,
                    });
                }
            }
            for missing in &response.missing {
                if let Some(FetchItem {
                    path,
                    held: Some(held),
                }) = expected.get(missing)
                    && self.local.purge(path, held.version).await?
                {
                    report.purged += 1;
                }
            }
            report.unreadable_on_primary += response.unreadable.len() as u64;
        }

        let cursor = match failed_below {
            Some(v) => manifest.sequence.min(v.saturating_sub(1)),
            None => manifest.sequence,
        };
        report.sequence = cursor;
        report.duration = started.elapsed();
        report.finished = Some(SystemTime::now());
        if report.lost_writes.is_empty() {
            if report.repaired > 0 || report.checksum_failures > 0 {
                tracing::warn!(node = %node, primary = %from, repaired = report.repaired, checksum_failures = report.checksum_failures, fetched = report.fetched, purged = report.purged, "verification pass repaired this token");
            } else {
                tracing::info!(node = %node, primary = %from, checked = report.checked, fetched = report.fetched, purged = report.purged, sequence = cursor, "verification pass done");
            }
        } else {
            let lost: Vec<String> = report
                .lost_writes
                .iter()
                .map(|l| format!("{}@{}", l.path, l.version))
                .collect();
            tracing::warn!(node = %node, primary = %from, lost = %lost.join(", "), count = lost.len(), "writes held here never reached the primary and were discarded to follow it (lost writes)");
        }
        {
            let mut st = lock(&self.state);
            st.cursor = Some(cursor);
            st.verified_epoch = manifest.epoch;
            st.primary_sequence = manifest.sequence;
            st.last_sync = report.finished;
            st.records_applied += report.fetched;
            for l in &report.lost_writes {
                if st.lost_writes.len() == LOST_WRITES_KEPT {
                    st.lost_writes.pop_front();
                }
                st.lost_writes.push_back(l.clone());
            }
            st.last_full_pass = Some(report.clone());
            st.full_passes += 1;
            st.repairs += report.repaired;
        }
        self.rejoin = false;
        Ok(report)
    }
}

/// A path a verification pass copies, with what this node holds for it (if anything).
#[derive(Clone)]
struct FetchItem {
    path: SecretPath,
    held: Option<ManifestEntry>,
}

type FetchBatch = Result<(Vec<FetchItem>, Fetched), MirrorError>;

/// Fetches batches from the primary one step ahead of the consumer. Only reads: dropping
/// it mid-way (an error, a stop) aborts the fetching task and loses nothing.
struct FetchBatches {
    batches: mpsc::Receiver<FetchBatch>,
    task: tokio::task::JoinHandle<()>,
}

impl FetchBatches {
    fn spawn(primary: AgentConnection, items: Vec<FetchItem>, batch: usize) -> Self {
        let (tx, batches) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            let mut start = 0;
            while start < items.len() {
                let end = (start + batch).min(items.len());
                let asked = &items[start..end];
                let ask = FetchAsk {
                    paths: asked.iter().map(|i| i.path.clone()).collect(),
                    held: asked.iter().filter_map(|i| i.held.clone()).collect(),
                };
                let answer = match primary.fetch(&ask).await {
                    Ok(response) => {
                        let covered = response.covered as usize;
                        if covered == 0 || covered > asked.len() {
                            Err(MirrorError::Protocol {
                                node: primary.node().into(),
                                what: "Fetch answer",
                                why: format!("covers {covered} of {} paths", asked.len()),
                            })
                        } else {
                            let answered = asked[..covered].to_vec();
                            start += covered;
                            Ok((answered, response))
                        }
                    }
                    Err(e) => Err(e),
                };
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    return;
                }
            }
        });
        Self { batches, task }
    }

    async fn next(&mut self) -> Option<FetchBatch> {
        self.batches.recv().await
    }
}

impl Drop for FetchBatches {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn backoff(base: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.min(7);
    (base * factor).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(500);
        assert_eq!(backoff(base, 1), Duration::from_secs(1));
        assert_eq!(backoff(base, 3), Duration::from_secs(4));
        assert_eq!(backoff(base, 40), Duration::from_secs(60));
    }
}
