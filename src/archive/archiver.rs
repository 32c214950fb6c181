//! The archiver: a task beside the device agent that, while its token is the device's
//! unfenced primary, ships every change to the bucket. It keeps no state of its own: the
//! bucket's newest object of the current epoch is where it resumes, and when there is
//! none (a new primary after a failover, a first start) it writes a base.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};

use super::chain::{ArchiveRoot, Entry};
use super::envelope::{self, FORMAT, ObjectHeader, ObjectKind};
use super::{ArchiveError, Bucket, KeyWrap, payload};
use crate::crd::DeviceRole;
use crate::hsm::Record;
use crate::mirror::{Agent, ChangesAsk};

/// Most change bytes one segment carries; more changes make more segments.
const SEGMENT_BYTES: usize = 32 * 1024 * 1024;
const BASE_READ_CONCURRENCY: usize = 8;

#[derive(Clone, Debug)]
pub struct ArchiverConfig {
    pub root: ArchiveRoot,
    /// How often changes are shipped: the most writes a lost device costs (RPO).
    pub segment_interval: Duration,
    /// How often a new base starts a new chain (restores replay at most this much).
    pub base_interval: Duration,
    /// How far back points stay restorable; older objects are deleted after each base.
    /// `None` keeps everything.
    pub retention: Option<Duration>,
}

/// The end of the chain the archiver appends to.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Head {
    epoch: u64,
    covers: u64,
    digest: String,
    /// When this chain's base was written (unix ms).
    base_millis: u64,
}

/// What one step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Not the unfenced primary: nothing to do here.
    NotPrimary,
    /// Another site was promoted over this one: nothing is archived any more.
    SiteFenced,
    /// Everything acknowledged is in the bucket.
    UpToDate { sequence: u64 },
    Base {
        name: String,
        records: usize,
        sequence: u64,
    },
    Segment {
        name: String,
        records: usize,
        sequence: u64,
    },
}

/// What the archiver last achieved, for metrics and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiverState {
    /// Every change up to this sequence is durable in the bucket.
    pub archived_sequence: u64,
    /// The primary's sequence when last looked at.
    pub primary_sequence: u64,
    /// Unix ms of the last step that left nothing behind.
    pub up_to_date_at: Option<u64>,
    pub last_error: Option<String>,
    pub objects_written: u64,
    pub failures: u64,
    /// A base asked for out of schedule (`kubectl hsm backup now`), by request id.
    pub base_requested: Option<String>,
    /// The last such request a durable base answered.
    pub base_done: Option<String>,
    /// The bases in the bucket as last listed: where restores can start.
    pub bases: Vec<BasePoint>,
    /// With a site guard: the highest site epoch among the archive's fences.
    pub site_epoch: u64,
    /// Another site was promoted over this one: nothing more is archived or acknowledged.
    pub fenced: Option<super::site::Fence>,
    /// Changes this site made after the fence point (lost writes, never merged).
    pub lost_writes: u64,
}

/// What an active site checks before each step: that no other site was promoted.
#[derive(Clone)]
pub struct SiteGuard {
    pub site: String,
    /// How long a clean check lets the site acknowledge writes.
    pub lease: Duration,
    /// Opens fences (the device's archive key).
    pub key: Arc<dyn super::KeyUnwrap>,
    /// The site epoch at which this site became active (0: it always was); fences up to
    /// it are history.
    pub active_since: u64,
}

/// A base snapshot in the bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BasePoint {
    pub epoch: u64,
    pub sequence: u64,
    pub millis: u64,
}

/// The bases among `entries`, oldest first.
fn base_points(entries: &[Entry]) -> Vec<BasePoint> {
    let mut bases: Vec<BasePoint> = entries
        .iter()
        .filter(|e| e.kind == ObjectKind::Base)
        .map(|e| BasePoint {
            epoch: e.epoch,
            sequence: e.last,
            millis: e.millis,
        })
        .collect();
    bases.sort_by_key(|b| (b.millis, b.epoch, b.sequence));
    bases
}

pub struct Archiver {
    cfg: ArchiverConfig,
    bucket: Bucket,
    keys: Vec<Arc<dyn KeyWrap>>,
    head: Option<Head>,
    /// A PUT failed: the object may have landed anyway (a timeout after the store took
    /// it), so the chain it would follow is left alone and a new one starts with a base.
    fresh_chain: bool,
    state: Arc<Mutex<ArchiverState>>,
    metrics: Option<ArchiveMetrics>,
    site: Option<SiteGuard>,
}

/// The archive's figures on `/metrics`.
#[derive(Clone, Default)]
pub struct ArchiveMetrics {
    archived: Gauge,
    lag: Gauge,
    up_to_date: Gauge,
    objects: Counter,
    failures: Family<KindLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

impl ArchiveMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "hsm_secrets_archive_sequence",
            "Every change up to this sequence is durable in the archive",
            metrics.archived.clone(),
        );
        registry.register(
            "hsm_secrets_archive_lag_sequences",
            "Changes the primary acknowledged that the archive does not hold yet",
            metrics.lag.clone(),
        );
        registry.register(
            "hsm_secrets_archive_up_to_date_timestamp_seconds",
            "When the archive last held every acknowledged change (unix seconds): the RPO a \
             lost device would cost is now minus this",
            metrics.up_to_date.clone(),
        );
        registry.register(
            "hsm_secrets_archive_objects_written",
            "Archive bases and segments written",
            metrics.objects.clone(),
        );
        registry.register(
            "hsm_secrets_archive_failures",
            "Archiving attempts that failed, by error kind",
            metrics.failures.clone(),
        );
        metrics
    }
}

impl Archiver {
    /// `keys`: the recipients every object is sealed for (the token's archive key, the
    /// offline recovery key).
    pub fn new(cfg: ArchiverConfig, bucket: Bucket, keys: Vec<Arc<dyn KeyWrap>>) -> Self {
        Self {
            cfg,
            bucket,
            keys,
            head: None,
            fresh_chain: false,
            state: Arc::default(),
            metrics: None,
            site: None,
        }
    }

    /// Checks for another site's promotion before every step, renewing this site's lease
    /// on the agent when there is none and fencing it when there is.
    pub fn with_site(mut self, guard: SiteGuard) -> Self {
        // A promoted site starts its own history: never a chain it left when it was fenced.
        if guard.active_since > 0 {
            self.fresh_chain = true;
        }
        self.site = Some(guard);
        self
    }

    /// Replaces the recipients objects are sealed for.
    pub fn with_keys(mut self, keys: Vec<Arc<dyn KeyWrap>>) -> Self {
        self.keys = keys;
        self
    }

    pub fn with_metrics(mut self, metrics: ArchiveMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn publish_metrics(&self, failed: Option<&'static str>) {
        let Some(metrics) = &self.metrics else { return };
        let state = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        metrics.archived.set(state.archived_sequence as i64);
        metrics.lag.set(
            state
                .primary_sequence
                .saturating_sub(state.archived_sequence) as i64,
        );
        if let Some(at) = state.up_to_date_at {
            metrics.up_to_date.set((at / 1000) as i64);
        }
        let written = state.objects_written.saturating_sub(metrics.objects.get());
        metrics.objects.inc_by(written);
        if let Some(kind) = failed {
            metrics.failures.get_or_create(&KindLabels { kind }).inc();
        }
    }

    pub fn state(&self) -> Arc<Mutex<ArchiverState>> {
        self.state.clone()
    }

    /// Ships what is new, as the primary; a base when the chain cannot continue or is due.
    pub async fn step(&mut self, agent: &Agent) -> Result<Step, ArchiveError> {
        let snapshot = agent.snapshot();
        if snapshot.role != DeviceRole::Primary || snapshot.lease_remaining.is_zero() {
            // A fenced or demoted primary never writes into the archive; its successor
            // continues it.
            self.head = None;
            return Ok(Step::NotPrimary);
        }
        let published = agent.store().latest_sequence();
        self.update(|s| s.primary_sequence = published);
        let Some(watch) = self.site_watch() else {
            return self.ship(agent, snapshot.epoch, published).await;
        };
        if watch.check(agent, published).await? {
            self.head = None;
            return Ok(Step::SiteFenced);
        }
        // A long step (a base of thousands of token reads) must not let the site's lease
        // lapse, nor keep a site that was fenced meanwhile writing: while it runs, a check
        // of the fences starts three times per lease (a check slower than two thirds of
        // the lease still lets it lapse: writes then pause until the next one).
        let interval = self.cfg.segment_interval.min(watch.guard.lease / 3);
        let shipped = tokio::select! {
            biased;
            () = watch.renew_every(agent, interval) => None,
            result = self.ship(agent, snapshot.epoch, published) => Some(result),
        };
        match shipped {
            Some(result) => result,
            None => {
                // Fenced meanwhile. The interrupted object may or may not have landed:
                // never continue a chain after it.
                self.head = None;
                self.fresh_chain = true;
                Ok(Step::SiteFenced)
            }
        }
    }

    /// Ships what is new: a base when the chain cannot continue or one is due, else the
    /// segments since the chain's head.
    async fn ship(
        &mut self,
        agent: &Agent,
        epoch: u64,
        published: u64,
    ) -> Result<Step, ArchiveError> {
        if !self.fresh_chain && self.head.as_ref().is_none_or(|h| h.epoch != epoch) {
            self.head = self.find_head(epoch, published).await?;
        }
        let requested = {
            let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state
                .base_requested
                .clone()
                .filter(|r| state.base_done.as_ref() != Some(r))
        };
        let due = self.fresh_chain
            || requested.is_some()
            || self.head.as_ref().is_none_or(|h| {
                now_millis().saturating_sub(h.base_millis)
                    >= self.cfg.base_interval.as_millis() as u64
            });
        let result = match due {
            true => self.write_base(agent, epoch).await,
            false => self.write_segments(agent, epoch).await,
        };
        if result.is_ok() && requested.is_some() {
            self.update(|s| s.base_done = requested);
        }
        if let Err(ArchiveError::Bucket {
            operation: "PUT", ..
        }) = &result
        {
            self.head = None;
            self.fresh_chain = true;
        }
        result
    }

    /// The site check of this archiver, when it runs with a site guard.
    fn site_watch(&self) -> Option<SiteWatch> {
        Some(SiteWatch {
            guard: self.site.clone()?,
            bucket: self.bucket.clone(),
            root: self.cfg.root.clone(),
            state: self.state.clone(),
        })
    }

    /// The newest object of this epoch's chain, if it can be continued. Anything odd (an
    /// object that does not open, a name that does not match its header, a link that does
    /// not follow) ends the search: a new chain with a base is always safe.
    async fn find_head(&self, epoch: u64, published: u64) -> Result<Option<Head>, ArchiveError> {
        let listed = self.bucket.list(&self.cfg.root.prefix()).await?;
        let all: Vec<Entry> = listed
            .iter()
            .filter_map(|l| Entry::parse(&self.cfg.root, &l.name))
            .collect();
        self.update(|s| s.bases = base_points(&all));
        // A token that never held a change over an archive that holds some: a wiped or
        // replaced token. Its empty base would become the newest point (and start the
        // clock on pruning the real ones), so nothing is written until it is restored.
        if published == 0
            && let Some(newest) = all.iter().filter(|e| e.last > 0).max_by_key(|e| e.millis)
        {
            return Err(ArchiveError::Config(format!(
                "the token holds no change but archive {} holds the device up to sequence {} \
                 ({}); restore it first (kubectl hsm restore, or hsm-secrets archive restore \
                 on the node), or start a new archive with another spec.backup.archiveName",
                self.cfg.root.prefix(),
                newest.last,
                newest.name
            )));
        }
        let entries: Vec<Entry> = all.into_iter().filter(|e| e.epoch == epoch).collect();
        let Some(base) = entries
            .iter()
            .filter(|e| e.kind == ObjectKind::Base)
            .max_by_key(|e| (e.last, e.millis))
        else {
            return Ok(None);
        };
        let mut head = match self.head_of(base, base.millis, None).await {
            Some(head) => head,
            None => return Ok(None),
        };
        loop {
            let mut next: Vec<&Entry> = entries
                .iter()
                .filter(|e| e.kind == ObjectKind::Segment && e.first == head.covers + 1)
                .collect();
            next.sort_by_key(|e| std::cmp::Reverse(e.millis));
            let mut followed = None;
            for candidate in next {
                if let Some(h) = self.head_of(candidate, head.base_millis, Some(&head)).await {
                    followed = Some(h);
                    break;
                }
            }
            match followed {
                Some(h) => head = h,
                None => break,
            }
        }
        // An archive ahead of this token (restored elsewhere, rewound): start afresh.
        Ok((head.covers <= published).then_some(head))
    }

    /// `entry` as the end of a chain, if it opens, matches its name and (after `after`)
    /// names it and moves forward.
    async fn head_of(&self, entry: &Entry, base_millis: u64, after: Option<&Head>) -> Option<Head> {
        let bytes = self.bucket.get(&entry.name).await.ok()?;
        let header = envelope::peek_header(&entry.name, &bytes).ok()?;
        self.cfg.root.check(&entry.name, &header).ok()?;
        if let Some(prev) = after {
            let links = header.prev.as_deref() == Some(prev.digest.as_str());
            if !links || header.covers() <= prev.covers {
                return None;
            }
        }
        Some(Head {
            epoch: header.epoch,
            covers: header.covers(),
            digest: hex::encode(Sha256::digest(&bytes)),
            base_millis,
        })
    }

    async fn write_base(&mut self, agent: &Agent, epoch: u64) -> Result<Step, ArchiveError> {
        let store = agent.store().clone();
        let from = store.latest_sequence();
        let manifest = store.manifest().await.map_err(ArchiveError::Token)?;
        let live: Vec<_> = manifest.into_iter().filter(|e| !e.deleted).collect();
        let mut records: Vec<Record> = futures::stream::iter(live.into_iter().map(|entry| {
            let store = store.clone();
            async move { store.record(&entry.path).await }
        }))
        .buffered(BASE_READ_CONCURRENCY)
        .filter_map(|r| async move {
            match r {
                Ok(record) if !record.is_deleted() => Some(Ok(record)),
                Ok(_) | Err(crate::hsm::StoreError::NotFound { .. }) => None,
                Err(e) => Some(Err(ArchiveError::Token(e))),
            }
        })
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
        records.sort_by_key(|r| r.version);
        let last = store.latest_sequence().max(from);
        let millis = now_millis();
        let name = self.cfg.root.base_name(epoch, last, millis);
        let header = self.header(
            ObjectKind::Base,
            epoch,
            0,
            last,
            Some(from),
            None,
            millis,
            records.len(),
        );
        let bytes = self.seal(header, &records).await?;
        let digest = hex::encode(Sha256::digest(&bytes));
        self.bucket.put(&name, bytes).await?;
        self.fresh_chain = false;
        self.head = Some(Head {
            epoch,
            covers: from,
            digest,
            base_millis: millis,
        });
        self.update(|s| {
            s.archived_sequence = from;
            s.objects_written += 1;
        });
        tracing::info!(object = %name, records = records.len(), sequence = last, "archive base written");
        if let Some(window) = self.cfg.retention {
            self.prune(window).await?;
        }
        let listed = self.bucket.list(&self.cfg.root.prefix()).await?;
        let entries: Vec<Entry> = listed
            .iter()
            .filter_map(|l| Entry::parse(&self.cfg.root, &l.name))
            .collect();
        self.update(|s| s.bases = base_points(&entries));
        Ok(Step::Base {
            name,
            records: records.len(),
            sequence: last,
        })
    }

    async fn write_segments(&mut self, agent: &Agent, epoch: u64) -> Result<Step, ArchiveError> {
        let mut last_step = None;
        loop {
            let Some(head) = self.head.clone() else {
                return Err(ArchiveError::Source("no chain to append to".into()));
            };
            let (records, through, more) = self.pull(agent, head.covers).await?;
            if records.is_empty() && through <= head.covers {
                self.update(|s| {
                    s.archived_sequence = head.covers;
                    s.up_to_date_at = Some(now_millis());
                });
                return Ok(last_step.unwrap_or(Step::UpToDate {
                    sequence: head.covers,
                }));
            }
            let first = head.covers + 1;
            let last = records
                .iter()
                .map(|r| r.version)
                .max()
                .unwrap_or(0)
                .max(through);
            let millis = now_millis();
            let name = self.cfg.root.segment_name(epoch, first, last, millis);
            let header = self.header(
                ObjectKind::Segment,
                epoch,
                first,
                last,
                None,
                Some(head.digest.clone()),
                millis,
                records.len(),
            );
            let bytes = self.seal(header, &records).await?;
            let digest = hex::encode(Sha256::digest(&bytes));
            self.bucket.put(&name, bytes).await?;
            self.head = Some(Head {
                epoch,
                covers: last,
                digest,
                base_millis: head.base_millis,
            });
            self.update(|s| {
                s.archived_sequence = last;
                s.objects_written += 1;
                if !more {
                    s.up_to_date_at = Some(now_millis());
                }
            });
            tracing::debug!(object = %name, records = records.len(), "archive segment written");
            last_step = Some(Step::Segment {
                name,
                records: records.len(),
                sequence: last,
            });
            if !more {
                return Ok(last_step.unwrap_or(Step::UpToDate { sequence: last }));
            }
        }
    }

    /// Deletes what no point inside the retention window needs.
    pub async fn prune(&self, window: Duration) -> Result<usize, ArchiveError> {
        let listed = self.bucket.list(&self.cfg.root.prefix()).await?;
        let entries: Vec<Entry> = listed
            .iter()
            .filter_map(|l| Entry::parse(&self.cfg.root, &l.name))
            .collect();
        let doomed = super::chain::prunable(&entries, now_millis(), window.as_millis() as u64);
        for entry in &doomed {
            self.bucket.delete(&entry.name).await?;
        }
        if !doomed.is_empty() {
            tracing::info!(
                objects = doomed.len(),
                "archive objects past retention deleted"
            );
        }
        Ok(doomed.len())
    }

    /// Changes after `since` from the primary's change feed, up to one segment's worth.
    async fn pull(
        &self,
        agent: &Agent,
        since: u64,
    ) -> Result<(Vec<Record>, u64, bool), ArchiveError> {
        let mut records = Vec::new();
        let (mut through, mut bytes) = (since, 0usize);
        loop {
            let answer = agent
                .changes(ChangesAsk {
                    since: through,
                    ..ChangesAsk::default()
                })
                .await
                .map_err(|e| ArchiveError::Source(e.to_string()))?;
            for record in answer.records {
                bytes += record_bytes(&record);
                records.push(record);
            }
            through = answer.through.max(through);
            if !answer.more {
                return Ok((records, through, false));
            }
            if bytes >= SEGMENT_BYTES {
                return Ok((records, through, true));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &self,
        kind: ObjectKind,
        epoch: u64,
        first: u64,
        last: u64,
        base_from: Option<u64>,
        prev: Option<String>,
        millis: u64,
        records: usize,
    ) -> ObjectHeader {
        ObjectHeader {
            format: FORMAT,
            kind,
            device: self.cfg.root.device.clone(),
            archive: self.cfg.root.archive.clone(),
            epoch,
            first,
            last,
            base_from,
            prev,
            created: rfc3339(millis),
            records: records as u64,
            recipients: Vec::new(),
        }
    }

    async fn seal(
        &self,
        header: ObjectHeader,
        records: &[Record],
    ) -> Result<Vec<u8>, ArchiveError> {
        let plain = zeroize::Zeroizing::new(payload::encode(records));
        let keys: Vec<&dyn KeyWrap> = self.keys.iter().map(|k| k.as_ref()).collect();
        envelope::seal(header, &plain, &keys).await
    }

    fn update(&self, f: impl FnOnce(&mut ArchiverState)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Steps every `segment_interval` until `stop`; failures are counted, logged and
    /// retried (the device keeps taking writes; only the archive's lag grows).
    pub async fn run(mut self, agent: Agent, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            match self.step(&agent).await {
                Ok(_) => {
                    self.update(|s| s.last_error = None);
                    self.publish_metrics(None);
                }
                Err(error) => {
                    tracing::warn!(%error, kind = error.kind(), "archiving failed; retrying");
                    self.update(|s| {
                        s.failures += 1;
                        s.last_error = Some(error.to_string());
                    });
                    self.publish_metrics(Some(error.kind()));
                }
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(self.cfg.segment_interval) => {}
            }
        }
    }
}

fn record_bytes(record: &Record) -> usize {
    match &record.body {
        crate::hsm::Body::Live(data) => data.iter().map(|(k, v)| k.len() + v.len()).sum(),
        crate::hsm::Body::Deleted => 0,
    }
}

pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn rfc3339(millis: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(millis as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// An active site's check that no other site was promoted over it: run before every
/// archive step and, during a long one, on its own timer.
struct SiteWatch {
    guard: SiteGuard,
    bucket: Bucket,
    root: ArchiveRoot,
    state: Arc<Mutex<ArchiverState>>,
}

impl SiteWatch {
    fn update(&self, f: impl FnOnce(&mut ArchiverState)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Starts a check every `interval` (a slow check eats into the wait, not the lease)
    /// until the site is fenced, then completes; a failed check only lets the lease run
    /// down.
    async fn renew_every(&self, agent: &Agent, interval: Duration) {
        let mut last = std::time::Instant::now();
        loop {
            tokio::time::sleep(interval.saturating_sub(last.elapsed())).await;
            last = std::time::Instant::now();
            let published = agent.store().latest_sequence();
            match self.check(agent, published).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, "site check during an archive write failed; the site lease runs down");
                }
            }
        }
    }

    /// Reads the archive's fences: true when another site was promoted over this one (the
    /// agent then refuses writes for good); otherwise the site's lease is renewed from the
    /// moment the check began.
    async fn check(&self, agent: &Agent, published: u64) -> Result<bool, ArchiveError> {
        let guard = &self.guard;
        use crate::mirror::site::SiteGate;
        let checked_at = std::time::Instant::now();
        let fences = super::site::read_fences(&self.bucket, &self.root, &*guard.key).await?;
        let site_epoch = fences.last().map_or(0, |f| f.site_epoch);
        // Its own archive records from which site epoch this site is active (after a
        // promotion), so older fences over it stay history even after a restart.
        let since = guard
            .active_since
            .max(super::site::active_since(&fences, &guard.site));
        let Some(fence) = super::site::fencing(&fences, &self.root, &guard.site, since) else {
            agent.update_site_gate(|g| g.renewed(&guard.site, checked_at, guard.lease));
            self.update(|s| s.site_epoch = site_epoch);
            return Ok(false);
        };
        let gate = agent.update_site_gate(|_| SiteGate::Fenced {
            site: guard.site.clone(),
            by: fence.site.clone(),
            by_device: fence.device.clone(),
            site_epoch: fence.site_epoch,
            fence_sequence: fence.fence_sequence,
        });
        // Read after the gate closed: a write acknowledged before that (the agent checks
        // the gate again after each write) is in this sequence; `published`, read before
        // the bucket round trip, may miss the last ones.
        let lost = agent
            .store()
            .latest_sequence()
            .max(published)
            .saturating_sub(fence.fence_sequence);
        if self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fenced
            .is_none()
        {
            tracing::error!(by = %fence.site, site_epoch = fence.site_epoch, fence_sequence = fence.fence_sequence, lost, ?gate, "another site was promoted: this site is fenced");
        }
        self.update(|s| {
            s.site_epoch = site_epoch;
            s.fenced = Some(fence);
            s.lost_writes = lost;
        });
        Ok(true)
    }
}
