//! Restore drills: rebuild the archive's newest point in memory (never the live tokens)
//! and compare it with what the device holds, so a restore is known to work before it is
//! needed.
//!
//! The device has moved on since the point, so the comparison is by version: every path
//! the device holds at a version at or before the point must be in the rebuilt state at
//! that version with that checksum, and every path the rebuilt state holds must be on the
//! device at that version or changed there after the point.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::chain::{ArchiveRoot, Target};
use super::restore::rebuild;
use super::{ArchiveError, Bucket, KeyUnwrap};
use crate::hsm::ManifestEntry;

/// What a drill found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrillReport {
    /// The point restored: sequence, epoch and when it was written.
    pub sequence: u64,
    pub epoch: u64,
    pub time: String,
    pub secrets: usize,
    pub bytes: u64,
    pub duration_ms: u64,
    /// Paths whose archived state disagrees with the device (names only), at most 20.
    pub mismatches: Vec<String>,
    /// Why the rebuild stopped before later objects, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

impl DrillReport {
    pub fn verified(&self) -> bool {
        self.mismatches.is_empty() && self.stopped.is_none()
    }
}

const MAX_LISTED: usize = 20;

/// Rebuilds the newest point and compares it with `live` (the device's manifest now).
pub async fn verify(
    bucket: &Bucket,
    root: &ArchiveRoot,
    key: &dyn KeyUnwrap,
    live: &[ManifestEntry],
) -> Result<DrillReport, ArchiveError> {
    let started = Instant::now();
    let rebuilt = rebuild(bucket, root, key, Target::Latest).await?;
    let point = rebuilt.report.sequence;
    let archived: BTreeMap<String, ManifestEntry> = rebuilt
        .records
        .values()
        .map(|r| (r.path.to_string(), r.entry()))
        .collect();
    let mut mismatches = compare(point, &archived, live);
    mismatches.truncate(MAX_LISTED);
    Ok(DrillReport {
        sequence: point,
        epoch: rebuilt.report.epoch,
        time: rebuilt.report.time,
        secrets: rebuilt.report.secrets,
        bytes: rebuilt.report.bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        mismatches,
        stopped: rebuilt.report.stopped,
    })
}

/// Paths on which the archive at `point` and the device disagree (pure).
pub fn compare(
    point: u64,
    archived: &BTreeMap<String, ManifestEntry>,
    live: &[ManifestEntry],
) -> Vec<String> {
    let mut mismatches = Vec::new();
    let live_by_path: BTreeMap<String, &ManifestEntry> =
        live.iter().map(|e| (e.path.to_string(), e)).collect();
    for (path, device) in &live_by_path {
        if device.version > point {
            continue; // changed after the point: the archive's next objects carry it
        }
        let same = archived.get(path).is_some_and(|a| {
            a.version == device.version
                && a.checksum == device.checksum
                && a.deleted == device.deleted
        });
        // A tombstone the archive never saw the secret of is no disagreement.
        let absent_both = device.deleted && !archived.contains_key(path);
        if !same && !absent_both {
            mismatches.push(format!(
                "{path}: the device holds version {}",
                device.version
            ));
        }
    }
    for (path, entry) in archived {
        if entry.deleted {
            continue;
        }
        let accounted = live_by_path
            .get(path)
            .is_some_and(|d| d.version > point || d.version == entry.version);
        if !accounted {
            mismatches.push(format!(
                "{path}: the archive holds version {} the device does not",
                entry.version
            ));
        }
    }
    mismatches
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::hsm::{Record, SecretData};

    fn entry(path: &str, version: u64, value: &[u8]) -> ManifestEntry {
        let mut data = SecretData::new();
        data.insert("k", value.to_vec()).unwrap();
        Record::live(path.parse().unwrap(), version, data).entry()
    }

    #[test]
    fn only_disagreements_at_or_before_the_point_count() {
        let archived: BTreeMap<String, ManifestEntry> =
            [entry("ns/a", 3, b"x"), entry("ns/b", 5, b"y")]
                .into_iter()
                .map(|e| (e.path.to_string(), e))
                .collect();
        // The device moved on: b changed at 9, c added at 8.
        let live = [
            entry("ns/a", 3, b"x"),
            entry("ns/b", 9, b"z"),
            entry("ns/c", 8, b"w"),
        ];
        assert!(compare(6, &archived, &live).is_empty());
        // a differs at the same version: a corrupt or forged archive, or a forked device.
        let live = [entry("ns/a", 3, b"other"), entry("ns/b", 5, b"y")];
        assert_eq!(compare(6, &archived, &live).len(), 1);
        // The archive holds a secret the device never had.
        let live = [entry("ns/a", 3, b"x")];
        assert_eq!(compare(6, &archived, &live).len(), 1);
        // The device holds, at or before the point, a secret the archive lacks.
        let live = [
            entry("ns/a", 3, b"x"),
            entry("ns/b", 5, b"y"),
            entry("ns/d", 4, b"v"),
        ];
        assert_eq!(
            compare(6, &archived, &live),
            ["ns/d: the device holds version 4"]
        );
    }
}
