//! Sites: a device spread over clusters, one active site whose archive the passive ones
//! apply to their own tokens, and promotion by a person only.
//!
//! ```text
//! <device>/<archive>/site/<site epoch>.hsmarc    a fence: site S was promoted at this site
//!                                               epoch, its history starting after sequence N
//! ```
//!
//! - A fence is sealed like every archive object (the device's archive key and the
//!   recovery key), so nobody without them can fence a site. It is written only if no
//!   object has its name: two sites promoted at once race for one name and the second
//!   learns who won.
//! - The active site checks for fences at every archive step and acknowledges writes only
//!   within its site lease of the last clean check ([`crate::mirror::site::SiteGate`]); a
//!   promotion waits that lease (and a margin) after its fence is durable, so no write is
//!   acknowledged by both sites after the fence.
//! - The passive site's follower applies the archive's chain in order, each object
//!   authenticated and each record checked, starting from the newest epoch's base.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::chain::{ArchiveRoot, Entry};
use super::envelope::{self, FORMAT, ObjectHeader, ObjectKind};
use super::restore::open_checked;
use super::{ArchiveError, Bucket, KeyUnwrap, KeyWrap};
use crate::hsm::Record;
use crate::mirror::Agent;

const FENCES: &str = "site/";
const SUFFIX: &str = ".hsmarc";

/// A promotion, as recorded in the archive of the site it fences.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fence {
    /// Its place among the archive's fences: the object name two promotions of one
    /// archive race for, so only one of them can take it.
    pub slot: u64,
    pub site_epoch: u64,
    /// The promoted site.
    pub site: String,
    /// Every change up to here (of the fenced archive) is in the promoted site's history;
    /// the fenced site's later changes are lost writes.
    pub fence_sequence: u64,
    /// The promoted site's HSMDevice: where its archive continues.
    pub device: String,
    pub millis: u64,
}

fn fence_name(root: &ArchiveRoot, slot: u64) -> String {
    format!("{}{FENCES}{slot:020}{SUFFIX}", root.prefix())
}

/// The next free slot of an archive's fences.
pub fn next_slot(fences: &[Fence]) -> u64 {
    fences.iter().map(|f| f.slot).max().unwrap_or(0) + 1
}

/// Every fence in `root`'s archive, authenticated, oldest first. A fence that does not
/// open or does not match its name is an error naming it: it is never ignored.
pub async fn read_fences(
    bucket: &Bucket,
    root: &ArchiveRoot,
    key: &dyn KeyUnwrap,
) -> Result<Vec<Fence>, ArchiveError> {
    let dir = format!("{}{FENCES}", root.prefix());
    let mut fences = Vec::new();
    for listed in bucket.list(&dir).await? {
        let bytes = bucket.get(&listed.name).await?;
        let (header, plain) = envelope::open(&listed.name, &bytes, key).await?;
        let fence: Fence = serde_json::from_slice(&plain).map_err(|e| ArchiveError::Tampered {
            object: listed.name.clone(),
            detail: format!("a fence that does not decode: {e}"),
        })?;
        let matches = header.kind == ObjectKind::Fence
            && header.device == root.device
            && header.archive == root.archive
            && header.epoch == fence.site_epoch
            && header.last == fence.fence_sequence
            && listed.name == fence_name(root, fence.slot);
        if !matches {
            return Err(ArchiveError::Tampered {
                object: listed.name,
                detail: "a fence whose name or header does not match its content".into(),
            });
        }
        fences.push(fence);
    }
    fences.sort_by_key(|f| f.slot);
    Ok(fences)
}

/// Writes `fence` into `root`'s archive unless a fence of its site epoch exists; then
/// the error names the site that was promoted first.
pub async fn write_fence(
    bucket: &Bucket,
    root: &ArchiveRoot,
    keys: &[&dyn KeyWrap],
    unwrap: &dyn KeyUnwrap,
    fence: &Fence,
) -> Result<(), ArchiveError> {
    let name = fence_name(root, fence.slot);
    let header = ObjectHeader {
        format: FORMAT,
        kind: ObjectKind::Fence,
        device: root.device.as_str().into(),
        archive: root.archive.as_str().into(),
        epoch: fence.site_epoch,
        first: 0,
        last: fence.fence_sequence,
        base_from: None,
        prev: None,
        created: rfc3339(fence.millis),
        records: 0,
        recipients: Vec::new(),
    };
    let payload = serde_json::to_vec(fence)
        .map_err(|e| ArchiveError::Crypto(format!("encode the fence: {e}")))?;
    let bytes = envelope::seal(header, &payload, keys).await?;
    if bucket.put_new(&name, bytes).await? {
        return Ok(());
    }
    let first = read_fences(bucket, root, unwrap)
        .await?
        .into_iter()
        .find(|f| f.slot == fence.slot);
    // A PUT that timed out after the store took it: the fence there is this one.
    if first.as_ref() == Some(fence) {
        return Ok(());
    }
    Err(ArchiveError::Config(match first {
        Some(f) => format!(
            "site {} was promoted first (site epoch {}, {}); site {} is not promoted: it \
             stays passive; rejoin it to follow site {}",
            f.site,
            f.site_epoch,
            rfc3339(f.millis),
            fence.site,
            f.site
        ),
        None => format!("{name} exists but could not be read back; check the bucket"),
    }))
}

/// The newest promotion over `root`'s archive by a site other than `site`, after site
/// epoch `since` (the epoch at which `site` itself became active; older fences are
/// history): the one that fences it. A site's record of its own promotion in its own
/// archive (its device is the archive's) fences nobody.
pub fn fencing(fences: &[Fence], root: &ArchiveRoot, site: &str, since: u64) -> Option<Fence> {
    fences
        .iter()
        .filter(|f| f.site != site && f.site_epoch > since && f.device != root.device)
        .max_by_key(|f| f.site_epoch)
        .cloned()
}

/// What the follower achieved, for the site's status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FollowState {
    /// Every archived change up to here is applied to this site's token.
    pub applied_sequence: u64,
    pub applied_millis: u64,
    /// The newest object of the archive's newest epoch.
    pub source_sequence: u64,
    pub source_millis: u64,
    /// When the first archived object not applied here was written.
    pub behind_since_millis: Option<u64>,
    pub site_epoch: u64,
    /// This site's own promotion, found in the archive: it follows no more.
    pub promoted: Option<Fence>,
    pub last_error: Option<String>,
}

/// Where the follower is in the active site's chain.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Head {
    epoch: u64,
    covers: u64,
    digest: String,
    /// The base the chain followed started from.
    base: String,
}

/// Applies the active site's archive to this site's token, through the agent.
pub struct Follower {
    site: String,
    bucket: Bucket,
    root: ArchiveRoot,
    key: Arc<dyn KeyUnwrap>,
    head: Option<Head>,
    state: Arc<Mutex<FollowState>>,
}

impl Follower {
    pub fn new(
        site: impl Into<String>,
        bucket: Bucket,
        root: ArchiveRoot,
        key: Arc<dyn KeyUnwrap>,
    ) -> Self {
        Self {
            site: site.into(),
            bucket,
            root,
            key,
            head: None,
            state: Arc::default(),
        }
    }

    pub fn state(&self) -> Arc<Mutex<FollowState>> {
        self.state.clone()
    }

    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    pub fn root(&self) -> &ArchiveRoot {
        &self.root
    }

    fn update(&self, f: impl FnOnce(&mut FollowState)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Applies what the archive holds beyond what was applied. Stops at the first object
    /// that does not verify or follow, naming it; nothing after it is applied.
    pub async fn step(&mut self, agent: &Agent) -> Result<(), ArchiveError> {
        // Only the passive site's primary applies the archive; its mirrors copy from it.
        if agent.role() != crate::crd::DeviceRole::Primary {
            return Ok(());
        }
        let fences = read_fences(&self.bucket, &self.root, &*self.key).await?;
        let site_epoch = fences.iter().map(|f| f.site_epoch).max().unwrap_or(0);
        // This site's own fence counts only as the newest: an older one is a past
        // promotion that another has since ended (this site then rejoined).
        if let Some(own) = fences.last().filter(|f| f.site == self.site) {
            self.update(|s| {
                s.promoted = Some(own.clone());
                s.site_epoch = site_epoch;
            });
            return Ok(());
        }
        let entries: Vec<Entry> = self
            .bucket
            .list(&self.root.prefix())
            .await?
            .iter()
            .filter_map(|l| Entry::parse(&self.root, &l.name))
            .collect();
        let Some(newest_epoch) = entries.iter().map(|e| e.epoch).max() else {
            self.update(|s| s.site_epoch = site_epoch);
            return Err(ArchiveError::NothingToRestore(format!(
                "{} holds no object of device {} archive {}; check site.followArchive (url, \
                 device, archiveName) and that the active site archives (spec.backup)",
                self.bucket.url(),
                self.root.device.as_str(),
                self.root.archive.as_str()
            )));
        };
        let newest = entries
            .iter()
            .filter(|e| e.epoch == newest_epoch)
            .max_by_key(|e| (e.last, e.millis));
        self.update(|s| {
            s.site_epoch = site_epoch;
            if let Some(n) = newest {
                s.source_sequence = n.last;
                s.source_millis = n.millis;
            }
        });
        // A new epoch at the active site (a failover there) starts from its base.
        if self.head.as_ref().is_none_or(|h| h.epoch < newest_epoch) {
            self.apply_base(agent, &entries, newest_epoch).await?;
        } else {
            self.follow_new_base(agent, &entries, newest_epoch).await?;
        }
        while let Some(head) = self.head.clone() {
            let mut next: Vec<&Entry> = entries
                .iter()
                .filter(|e| {
                    e.kind == ObjectKind::Segment
                        && e.epoch == head.epoch
                        && e.first == head.covers + 1
                })
                .collect();
            next.sort_by_key(|e| std::cmp::Reverse(e.millis));
            let Some(first) = next.first() else { break };
            // Of the candidates (a chain abandoned after a failed PUT leaves another), the
            // one that links to what was applied.
            let mut linked = None;
            for entry in &next {
                let mut records = BTreeMap::new();
                let (header, digest) =
                    open_checked(&self.bucket, &self.root, &*self.key, entry, &mut records).await?;
                if header.prev.as_deref() == Some(head.digest.as_str()) {
                    linked = Some((*entry, header, digest, records));
                    break;
                }
            }
            let Some((entry, header, digest, records)) = linked else {
                return Err(ArchiveError::Broken {
                    object: first.name.clone(),
                    detail: "it does not follow the object applied before it".into(),
                });
            };
            for record in records.into_values() {
                apply(agent, record, false).await?;
            }
            self.head = Some(Head {
                epoch: header.epoch,
                covers: header.covers(),
                digest,
                base: head.base.clone(),
            });
            self.update(|s| {
                s.applied_sequence = header.covers();
                s.applied_millis = entry.millis;
            });
        }
        let applied = self.head.as_ref().map_or(0, |h| h.covers);
        let first_missing = entries
            .iter()
            .filter(|e| e.epoch == newest_epoch && e.last > applied)
            .map(|e| e.millis)
            .min();
        self.update(|s| {
            s.behind_since_millis = first_missing;
            s.last_error = None;
        });
        Ok(())
    }

    /// A newer base of the epoch followed starts a new chain (a scheduled base, `backup
    /// now`, a fresh chain after a failed PUT). When this token already holds every change
    /// the base covers, the base is verified and followed without applying it (the
    /// segments after it replay changes already here, harmlessly); when it is behind, the
    /// base is applied as the truth.
    async fn follow_new_base(
        &mut self,
        agent: &Agent,
        entries: &[Entry],
        epoch: u64,
    ) -> Result<(), ArchiveError> {
        let Some(head) = self.head.clone() else {
            return Ok(());
        };
        let Some(base) = entries
            .iter()
            .filter(|e| e.kind == ObjectKind::Base && e.epoch == epoch)
            .max_by_key(|e| (e.millis, e.last))
        else {
            return Ok(());
        };
        if base.name == head.base {
            return Ok(());
        }
        // Still on the newest chain: its next segment links to what was applied.
        let continues = entries.iter().any(|e| {
            e.kind == ObjectKind::Segment
                && e.epoch == epoch
                && e.first == head.covers + 1
                && e.millis < base.millis
        });
        if continues {
            return Ok(());
        }
        let mut scratch = BTreeMap::new();
        let (header, digest) =
            open_checked(&self.bucket, &self.root, &*self.key, base, &mut scratch).await?;
        if header.covers() <= head.covers {
            self.head = Some(Head {
                epoch: header.epoch,
                covers: header.covers(),
                digest,
                base: base.name.clone(),
            });
            return Ok(());
        }
        self.apply_base(agent, entries, epoch).await
    }

    /// Makes the token equal to the newest base of `epoch`: what the base holds is written
    /// whatever this token held, and what it lacks is removed.
    async fn apply_base(
        &mut self,
        agent: &Agent,
        entries: &[Entry],
        epoch: u64,
    ) -> Result<(), ArchiveError> {
        let Some(base) = entries
            .iter()
            .filter(|e| e.kind == ObjectKind::Base && e.epoch == epoch)
            .max_by_key(|e| (e.millis, e.last))
        else {
            // The new epoch's base is not written yet: wait for it.
            return Ok(());
        };
        let mut records = BTreeMap::new();
        let (header, digest) =
            open_checked(&self.bucket, &self.root, &*self.key, base, &mut records).await?;
        let kept: BTreeSet<String> = records.keys().cloned().collect();
        for record in records.into_values() {
            apply(agent, record, true).await?;
        }
        let held = agent
            .store()
            .manifest()
            .await
            .map_err(ArchiveError::Token)?;
        for entry in held.into_iter().filter(|e| !e.deleted) {
            if !kept.contains(&entry.path.to_string()) {
                agent
                    .remove_archived(&entry.path)
                    .await
                    .map_err(|e| ArchiveError::Source(e.to_string()))?;
            }
        }
        tracing::info!(object = %base.name, sequence = header.covers(), "site follower applied a base");
        self.head = Some(Head {
            epoch: header.epoch,
            covers: header.covers(),
            digest,
            base: base.name.clone(),
        });
        self.update(|s| {
            s.applied_sequence = header.covers();
            s.applied_millis = base.millis;
        });
        Ok(())
    }

    /// Whether this site's own promotion was found (or made): it follows no more.
    pub fn promoted(&self) -> Option<Fence> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .promoted
            .clone()
    }

    /// Promotes this site: a last catch-up with the archive, then the fence, written only
    /// if no other site took this site epoch. The caller waits the active site's lease
    /// before this site takes writes.
    /// `history`: this site's own archive, whose fences (promotions over it in the past)
    /// the new site epoch must also exceed.
    pub async fn promote(
        &mut self,
        agent: &Agent,
        keys: &[&dyn KeyWrap],
        device: &str,
        history: Option<(&Bucket, &ArchiveRoot)>,
    ) -> Result<Fence, ArchiveError> {
        if let Some(own) = self.promoted() {
            return Ok(own);
        }
        self.step(agent).await?;
        if let Some(own) = self.promoted() {
            return Ok(own);
        }
        let fences = read_fences(&self.bucket, &self.root, &*self.key).await?;
        // The site this one follows was itself fenced: another passive site is active now,
        // and promoting this one over the old site would make two.
        if let Some(first) = fencing(&fences, &self.root, &self.site, 0) {
            return Err(ArchiveError::Config(format!(
                "site {} was promoted first (site epoch {}); site {} is not promoted: it stays \
                 passive; rejoin it to follow site {} (HSMDevice {})",
                first.site, first.site_epoch, self.site, first.site, first.device
            )));
        }
        let past = match history {
            Some((bucket, root)) => read_fences(bucket, root, &*self.key).await?,
            None => Vec::new(),
        };
        let fence = Fence {
            slot: next_slot(&fences),
            site_epoch: next_site_epoch(&fences).max(next_site_epoch(&past)),
            site: self.site.clone(),
            fence_sequence: self.head.as_ref().map_or(0, |h| h.covers),
            device: device.into(),
            millis: super::archiver::now_millis(),
        };
        write_fence(&self.bucket, &self.root, keys, &*self.key, &fence).await?;
        tracing::warn!(site = %self.site, site_epoch = fence.site_epoch, fence_sequence = fence.fence_sequence, "site promoted: the fence is in the archive");
        self.update(|s| {
            s.promoted = Some(fence.clone());
            s.site_epoch = fence.site_epoch;
        });
        Ok(fence)
    }
}

/// Steps `follower` every `interval` until `stop` or until the site is promoted; failures
/// are kept for the status and retried.
pub async fn follow(
    follower: Arc<tokio::sync::Mutex<Follower>>,
    agent: Agent,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut stop = std::pin::pin!(stop);
    loop {
        {
            let mut follower = follower.lock().await;
            if let Err(error) = follower.step(&agent).await {
                tracing::warn!(%error, "following the active site's archive failed; retrying");
                follower.update(|s| s.last_error = Some(error.to_string()));
            }
            if follower.promoted().is_some() {
                return;
            }
        }
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

async fn apply(agent: &Agent, record: Record, authoritative: bool) -> Result<(), ArchiveError> {
    agent
        .apply_archived(record, authoritative)
        .await
        .map_err(|e| ArchiveError::Source(e.to_string()))
}

fn rfc3339(millis: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(millis as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Records this site's own promotion in its own archive, so that a promotion over it
/// later (by a site that follows that archive) takes a higher site epoch, and so that
/// this site knows after a restart from which site epoch it is active.
pub async fn record_promotion(
    bucket: &Bucket,
    own: &ArchiveRoot,
    keys: &[&dyn KeyWrap],
    unwrap: &dyn KeyUnwrap,
    promoted: &Fence,
) -> Result<(), ArchiveError> {
    let fences = read_fences(bucket, own, unwrap).await?;
    if fences
        .iter()
        .any(|f| f.site == promoted.site && f.site_epoch == promoted.site_epoch)
    {
        return Ok(());
    }
    let record = Fence {
        slot: next_slot(&fences),
        fence_sequence: 0,
        ..promoted.clone()
    };
    write_fence(bucket, own, keys, unwrap, &record).await
}

/// The site epoch from which `site` is active, as its own archive records it (0: never
/// promoted, the original active site).
pub fn active_since(own_fences: &[Fence], site: &str) -> u64 {
    own_fences
        .iter()
        .filter(|f| f.site == site)
        .map(|f| f.site_epoch)
        .max()
        .unwrap_or(0)
}

/// A new fence's site epoch: one above every fence the archive holds.
pub fn next_site_epoch(fences: &[Fence]) -> u64 {
    fences.iter().map(|f| f.site_epoch).max().unwrap_or(0) + 1
}

/// How long a promotion waits after its fence is durable: the active site's lease, plus a
/// margin for the two clocks' rates and the last check's round trip.
pub fn promotion_wait(lease: Duration) -> Duration {
    lease + lease / 10 + Duration::from_secs(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fence(site: &str, epoch: u64) -> Fence {
        Fence {
            slot: epoch,
            site_epoch: epoch,
            site: site.into(),
            fence_sequence: 10 * epoch,
            device: format!("{site}-dev"),
            millis: 0,
        }
    }

    #[test]
    fn the_newest_fence_by_another_site_fences() {
        let root = ArchiveRoot::new("x-dev", "main").unwrap();
        let fences = [fence("b", 1), fence("a", 2), fence("c", 3)];
        assert_eq!(
            fencing(&fences, &root, "c", 0).map(|f| f.site),
            Some("a".into())
        );
        assert_eq!(
            fencing(&fences, &root, "a", 0).map(|f| f.site),
            Some("c".into())
        );
        assert_eq!(
            fencing(&fences, &root, "a", 3),
            None,
            "history before it became active"
        );
        assert_eq!(
            fencing(&[fence("a", 1)], &root, "a", 0),
            None,
            "its own promotion"
        );
        assert_eq!(
            fencing(&[fence("x", 1)], &root, "a", 0),
            None,
            "the archive's own site recording its promotion fences nobody"
        );
        assert_eq!(next_site_epoch(&fences), 4);
        assert_eq!(next_slot(&fences), 4);
        assert_eq!(active_since(&fences, "a"), 2);
        assert_eq!(active_since(&fences, "z"), 0);
        assert_eq!(next_site_epoch(&[]), 1);
        assert_eq!(
            promotion_wait(Duration::from_secs(30)),
            Duration::from_secs(34)
        );
    }
}
