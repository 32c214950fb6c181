//! Point-in-time restore: the newest base the target admits, then its chain of segments,
//! each opened, authenticated, checked against the archive and the object before it, and
//! every record verified against its checksum; then the result written into the target
//! token. Nothing is written unless the whole chain up to the chosen point verified.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::chain::{self, ArchiveRoot, Entry, Target};
use super::envelope::{self, ObjectHeader, ObjectKind};
use super::{ArchiveError, Bucket, KeyUnwrap, payload};
use crate::hsm::{Body, Record, SecretStore};

/// Where a restore should stop.
pub type RestoreTarget = Target;

/// What a restore did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreReport {
    pub device: String,
    pub archive: String,
    /// The base the chain started from.
    pub base: String,
    pub segments: usize,
    /// The sequence the restored content is exact at.
    pub sequence: u64,
    pub epoch: u64,
    /// When the last applied object was written (RFC 3339).
    pub time: String,
    /// Live secrets written to the token.
    pub secrets: usize,
    /// Bytes of secret values written.
    pub bytes: u64,
    /// Why the restore stopped before later objects of the archive, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// Newer bases that could not be used, and why (damaged, never made consistent).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// The verified content of an archive at a point, before it is written anywhere.
pub struct Rebuilt {
    pub report: RestoreReport,
    /// Latest record per path (tombstones kept until written).
    pub records: BTreeMap<String, Record>,
}

/// Reads and verifies the chain for `target` without writing anything (also what a drill
/// runs into scratch space). Starts from the best base; a base that is damaged or whose
/// chain never reaches the point it is consistent from is skipped for the next one.
pub async fn rebuild(
    bucket: &Bucket,
    root: &ArchiveRoot,
    key: &dyn KeyUnwrap,
    target: Target,
) -> Result<Rebuilt, ArchiveError> {
    let listed = bucket.list(&root.prefix()).await?;
    let entries: Vec<Entry> = listed
        .iter()
        .filter_map(|l| Entry::parse(root, &l.name))
        .collect();
    let bases = chain::bases_for(&entries, target);
    if bases.is_empty() {
        return Err(ArchiveError::NothingToRestore(match entries.is_empty() {
            true => format!(
                "{} holds no object of device {} archive {}; check the bucket URL, the device \
                 and the archive name",
                bucket.url(),
                root.device,
                root.archive
            ),
            false => "no base snapshot is as old as the target; choose a later point".into(),
        }));
    }
    let mut skipped = Vec::new();
    let mut first_error = None;
    for base in bases {
        match rebuild_from(bucket, root, key, &entries, base, target).await {
            Ok(mut rebuilt) => {
                rebuilt.report.skipped = skipped;
                return Ok(rebuilt);
            }
            Err(error) => {
                skipped.push(format!("{}: {error}", base.name));
                first_error.get_or_insert(error);
            }
        }
    }
    Err(first_error.unwrap_or_else(|| ArchiveError::NothingToRestore(skipped.join("; "))))
}

async fn rebuild_from(
    bucket: &Bucket,
    root: &ArchiveRoot,
    key: &dyn KeyUnwrap,
    entries: &[Entry],
    base: &Entry,
    target: Target,
) -> Result<Rebuilt, ArchiveError> {
    let mut records: BTreeMap<String, Record> = BTreeMap::new();
    let (header, digest) = open_checked(bucket, root, key, base, &mut records).await?;
    // A base is a fuzzy snapshot: consistent once replay reaches `last`.
    let consistent_from = header.last;
    let mut report = RestoreReport {
        device: root.device.clone(),
        archive: root.archive.clone(),
        base: base.name.clone(),
        sequence: header.last,
        epoch: header.epoch,
        time: header.created.clone(),
        ..RestoreReport::default()
    };
    let (mut covers, mut epoch, mut prev) = (header.covers(), header.epoch, digest);
    loop {
        let candidates = chain::successors(entries, covers, epoch, target);
        let mut followed = None;
        let mut refused = None;
        for next in candidates {
            // Each candidate is verified whole before anything of it is used.
            let mut staged = BTreeMap::new();
            match open_checked(bucket, root, key, next, &mut staged).await {
                Ok((h, d)) if h.prev.as_deref() == Some(prev.as_str()) => {
                    followed = Some((h, d, staged));
                    break;
                }
                Ok(_) => {
                    refused = Some(format!(
                        "{} does not follow the object before it (its prev digest differs: \
                         reordered, replayed or from another chain)",
                        next.name
                    ))
                }
                Err(error) => refused = Some(error.to_string()),
            }
        }
        let Some((h, d, staged)) = followed else {
            let beyond = chain::unreachable_after(entries, covers, target);
            if let Some(why) = refused {
                report.stopped = Some(why);
            } else if let Some(first) = beyond.first() {
                report.stopped = Some(format!(
                    "a gap: no segment starts at sequence {}; {} later segment(s) from {} on \
                     cannot be reached",
                    covers + 1,
                    beyond.len(),
                    first.name
                ));
            }
            break;
        };
        for (path, record) in staged {
            apply_newer(&mut records, path, record);
        }
        report.segments += 1;
        report.sequence = h.last;
        report.epoch = h.epoch;
        report.time = h.created.clone();
        (covers, epoch, prev) = (h.covers(), h.epoch, d);
    }
    if covers < consistent_from {
        return Err(ArchiveError::Broken {
            object: base.name.clone(),
            detail: format!(
                "the base is consistent from sequence {consistent_from}, but its chain reaches \
                 only {covers}{}",
                report
                    .stopped
                    .as_deref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            ),
        });
    }
    let live: Vec<&Record> = records.values().filter(|r| !r.is_deleted()).collect();
    report.secrets = live.len();
    report.bytes = live
        .iter()
        .map(|r| match &r.body {
            Body::Live(data) => data.iter().map(|(_, v)| v.len() as u64).sum(),
            Body::Deleted => 0,
        })
        .sum();
    Ok(Rebuilt { report, records })
}

/// Restores `target` of the archive into `into`. Refuses a token that holds secrets unless
/// `force`; with `force`, secrets the archive lacks are left as they are.
pub async fn restore(
    bucket: &Bucket,
    root: &ArchiveRoot,
    key: &dyn KeyUnwrap,
    target: Target,
    into: &dyn SecretStore,
    force: bool,
) -> Result<RestoreReport, ArchiveError> {
    let held = into
        .manifest()
        .await
        .map_err(ArchiveError::Token)?
        .into_iter()
        .filter(|e| !e.deleted)
        .count();
    if held > 0 && !force {
        return Err(ArchiveError::TargetNotEmpty {
            token: into.token_label().to_string(),
            secrets: held,
        });
    }
    let rebuilt = rebuild(bucket, root, key, target).await?;
    for record in rebuilt.records.into_values() {
        // An empty token needs no tombstones; a forced restore writes them so a secret
        // deleted before the point is deleted on the token too.
        if record.is_deleted() && held == 0 {
            continue;
        }
        into.apply(record).await.map_err(ArchiveError::Token)?;
    }
    Ok(rebuilt.report)
}

/// Restores `target` through the device's primary agent, as writes: the sequence moves
/// on, mirrors replicate and the archive records the result, so a device is rolled back
/// to the point rather than rewritten under its own history. Refuses a device that holds
/// secrets unless `force`; with `force` the device ends equal to the point (secrets made
/// after it are deleted). Nothing is written unless the whole chain verified.
pub async fn restore_through_agent(
    bucket: &Bucket,
    root: &ArchiveRoot,
    key: &dyn KeyUnwrap,
    target: Target,
    agent: &crate::mirror::Agent,
    force: bool,
) -> Result<RestoreReport, ArchiveError> {
    let store = agent.store();
    let live: std::collections::BTreeSet<String> = store
        .manifest()
        .await
        .map_err(ArchiveError::Token)?
        .into_iter()
        .filter(|e| !e.deleted)
        .map(|e| e.path.to_string())
        .collect();
    if !live.is_empty() && !force {
        return Err(ArchiveError::TargetNotEmpty {
            token: store.token_label().to_string(),
            secrets: live.len(),
        });
    }
    let rebuilt = rebuild(bucket, root, key, target).await?;
    // A point asked for by sequence or time must be reached exactly; the newest point is
    // whatever verifies.
    if let (Some(stopped), false) = (&rebuilt.report.stopped, target == Target::Latest) {
        return Err(ArchiveError::Broken {
            object: rebuilt.report.base.clone(),
            detail: format!(
                "the chain ends at sequence {} before the point asked for ({stopped}); \
                 restore to sequence {} or earlier",
                rebuilt.report.sequence, rebuilt.report.sequence
            ),
        });
    }
    let epoch = agent.epoch();
    let refused = |e: crate::mirror::MirrorError| {
        ArchiveError::Source(format!("the primary refused a restored write: {e}"))
    };
    for record in rebuilt.records.values() {
        match &record.body {
            Body::Live(data) => {
                agent
                    .put(&record.path, data.clone(), crate::hsm::Expect::Any, epoch)
                    .await
                    .map_err(refused)?;
            }
            Body::Deleted if live.contains(&record.path.to_string()) => {
                agent
                    .delete(&record.path, crate::hsm::Expect::Any, epoch)
                    .await
                    .map_err(refused)?;
            }
            Body::Deleted => {}
        }
    }
    for path in live.iter().filter(|p| !rebuilt.records.contains_key(*p)) {
        let path: crate::hsm::SecretPath = path
            .parse()
            .map_err(|e: crate::hsm::StoreError| ArchiveError::Token(e))?;
        agent
            .delete(&path, crate::hsm::Expect::Any, epoch)
            .await
            .map_err(refused)?;
    }
    Ok(rebuilt.report)
}

/// Opens `entry`, checks it belongs to `root` and matches its name, verifies every record,
/// and adds them to `records`. Returns the header and the SHA-256 of the object.
pub(crate) async fn open_checked(
    bucket: &Bucket,
    root: &ArchiveRoot,
    key: &dyn KeyUnwrap,
    entry: &Entry,
    records: &mut BTreeMap<String, Record>,
) -> Result<(ObjectHeader, String), ArchiveError> {
    let bytes = bucket.get(&entry.name).await?;
    let digest = hex::encode(Sha256::digest(&bytes));
    let (header, plain) = envelope::open(&entry.name, &bytes, key).await?;
    root.check(&entry.name, &header)?;
    if header.kind == ObjectKind::Segment && header.prev.is_none() {
        return Err(ArchiveError::Tampered {
            object: entry.name.clone(),
            detail: "a segment that names no object before it".into(),
        });
    }
    for record in payload::decode(&entry.name, &plain, header.records)? {
        if header.kind == ObjectKind::Segment
            && (record.version < header.first || record.version > header.last)
        {
            return Err(ArchiveError::BadRecord {
                object: entry.name.clone(),
                detail: format!(
                    "{} at version {} lies outside the segment's range {}..={}",
                    record.path, record.version, header.first, header.last
                ),
            });
        }
        apply_newer(records, record.path.to_string(), record);
    }
    Ok((header, digest))
}

fn apply_newer(records: &mut BTreeMap<String, Record>, path: String, record: Record) {
    match records.get(&path) {
        Some(held) if held.version >= record.version => {}
        _ => {
            records.insert(path, record);
        }
    }
}
