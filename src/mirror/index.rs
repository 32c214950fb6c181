//! The change index: which secret holds which version, ordered by version, so "what
//! changed since N" costs O(log n + changes) and "nothing changed" costs O(1), without
//! touching the token. Built once from the manifest, then kept current by every write,
//! apply and purge the agent makes. Pure.

use std::collections::{BTreeMap, HashMap};

use crate::hsm::{Checksum, ManifestEntry, SecretPath};

/// Writes of the current term remembered for lost-write detection.
pub const MAX_ISSUED: usize = 100_000;

#[derive(Debug, Default)]
pub struct ChangeIndex {
    by_version: BTreeMap<u64, SecretPath>,
    by_path: HashMap<SecretPath, u64>,
    /// Highest version whose change is complete and visible: everything up to it is in
    /// the index (writes are serialized, so nothing below it is still in flight).
    published: u64,
    /// Primary only: the sequence it had applied when it became primary, and every
    /// version it wrote itself since (superseded ones included), to tell a returning
    /// node's lost writes from versions it simply has not caught up with.
    fork: u64,
    issued: BTreeMap<u64, (SecretPath, Checksum)>,
}

impl ChangeIndex {
    pub fn from_manifest(entries: &[ManifestEntry], floor: u64) -> Self {
        let mut index = Self::default();
        for e in entries {
            index.record(&e.path, e.version);
        }
        index.published = index.published.max(floor);
        index
    }

    /// Replaces what the index knows about the token by a fresh manifest (a mirror's
    /// verification pass: objects may have vanished behind the agent's back).
    pub fn reset_entries(&mut self, entries: &[ManifestEntry]) {
        self.by_version.clear();
        self.by_path.clear();
        for e in entries {
            self.record(&e.path, e.version);
        }
    }

    /// A change of `path` to `version` (a write here or an applied copy).
    pub fn record(&mut self, path: &SecretPath, version: u64) {
        if let Some(old) = self.by_path.insert(path.clone(), version)
            && old != version
        {
            self.by_version.remove(&old);
        }
        self.by_version.insert(version, path.clone());
        self.published = self.published.max(version);
    }

    /// A write made by this node as primary.
    pub fn record_write(&mut self, path: &SecretPath, version: u64, checksum: Checksum) {
        self.record(path, version);
        self.issued.insert(version, (path.clone(), checksum));
        // Bounded memory: the oldest writes of a long term become shared history. A node
        // returning with writes from that far back has them discarded like any stale
        // copy, without a lost-write report; that needs a term of over MAX_ISSUED writes.
        while self.issued.len() > MAX_ISSUED {
            if let Some((oldest, _)) = self.issued.pop_first() {
                self.fork = self.fork.max(oldest);
            }
        }
    }

    pub fn remove(&mut self, path: &SecretPath) {
        if let Some(v) = self.by_path.remove(path) {
            self.by_version.remove(&v);
        }
    }

    /// Starts a term as primary: versions above `fork` are this node's own from now on.
    pub fn begin_term(&mut self, fork: u64) {
        self.fork = fork;
        self.issued.clear();
        self.published = self.published.max(fork);
    }

    pub fn fork(&self) -> u64 {
        self.fork
    }

    /// Whether a node holding `entry` holds a write this primary never made and never
    /// received: above the fork point and not issued here with that content (the old
    /// primary may have used the same version number for something else).
    pub fn is_foreign(&self, entry: &ManifestEntry) -> bool {
        entry.version > self.fork
            && self
                .issued
                .get(&entry.version)
                .is_none_or(|(path, sum)| *path != entry.path || *sum != entry.checksum)
    }

    pub fn published(&self) -> u64 {
        self.published
    }

    pub fn version_of(&self, path: &SecretPath) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    pub fn len(&self) -> usize {
        self.by_path.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty()
    }

    /// Up to `limit` changes with a version above `since`, in version order, and whether
    /// more follow.
    pub fn after(&self, since: u64, limit: usize) -> (Vec<(u64, SecretPath)>, bool) {
        if since >= self.published {
            return (Vec::new(), false);
        }
        let mut range = self.by_version.range(since.saturating_add(1)..);
        let batch: Vec<(u64, SecretPath)> = range
            .by_ref()
            .take(limit.max(1))
            .map(|(v, p)| (*v, p.clone()))
            .collect();
        let more = range.next().is_some();
        (batch, more)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::Checksum;

    fn p(s: &str) -> SecretPath {
        s.parse().expect("path")
    }

    fn entry(path: &str, version: u64) -> ManifestEntry {
        ManifestEntry {
            path: p(path),
            version,
            checksum: Checksum([0; 32]),
            deleted: false,
        }
    }

    #[test]
    fn overwrites_move_a_path_to_its_new_version() {
        let mut idx = ChangeIndex::from_manifest(&[entry("a/x", 3), entry("a/y", 5)], 0);
        assert_eq!(idx.published(), 5);
        idx.record(&p("a/x"), 7);
        let (all, more) = idx.after(0, 100);
        assert_eq!(all, vec![(5, p("a/y")), (7, p("a/x"))]);
        assert!(!more);
        assert_eq!(idx.after(5, 100).0, vec![(7, p("a/x"))]);
        idx.remove(&p("a/y"));
        assert_eq!(idx.after(0, 100).0, vec![(7, p("a/x"))]);
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn nothing_new_and_batches() {
        let entries: Vec<_> = (1..=10).map(|i| entry(&format!("a/s{i}"), i)).collect();
        let idx = ChangeIndex::from_manifest(&entries, 0);
        assert_eq!(idx.after(10, 3), (vec![], false));
        assert_eq!(idx.after(99, 3), (vec![], false));
        let (batch, more) = idx.after(2, 3);
        assert_eq!(batch.iter().map(|b| b.0).collect::<Vec<_>>(), [3, 4, 5]);
        assert!(more);
        let (batch, more) = idx.after(7, 3);
        assert_eq!(batch.iter().map(|b| b.0).collect::<Vec<_>>(), [8, 9, 10]);
        assert!(!more);
    }

    #[test]
    fn foreign_versions_are_those_above_the_fork_not_written_here() {
        let mut idx = ChangeIndex::from_manifest(&[entry("a/x", 3)], 0);
        idx.begin_term(5);
        idx.record_write(&p("a/x"), 6, Checksum([0; 32]));
        idx.record_write(&p("a/x"), 8, Checksum([0; 32]));
        assert!(!idx.is_foreign(&entry("a/x", 4)), "shared history");
        assert!(
            !idx.is_foreign(&entry("a/x", 6)),
            "superseded but written here"
        );
        assert!(idx.is_foreign(&entry("a/x", 7)), "never written here");
        assert!(
            idx.is_foreign(&entry("a/z", 8)),
            "version 8 was another path"
        );
        let mut other = entry("a/x", 8);
        other.checksum = Checksum([1; 32]);
        assert!(idx.is_foreign(&other), "same version, other content");
    }

    #[test]
    fn the_memory_of_a_long_term_is_bounded() {
        let mut idx = ChangeIndex::default();
        idx.begin_term(10);
        let total = MAX_ISSUED as u64 + 5;
        for v in 11..11 + total {
            idx.record_write(&p("a/x"), v, Checksum([0; 32]));
        }
        assert_eq!(idx.issued.len(), MAX_ISSUED);
        assert_eq!(idx.fork(), 15, "the five oldest became shared history");
        assert!(!idx.is_foreign(&entry("a/y", 14)));
        assert!(idx.is_foreign(&entry("a/y", 16)));
        assert_eq!(idx.len(), 1);
    }
}
