//! Where each secret's objects are, so that reads and writes need no `C_FindObjects`
//! (a linear scan over every object of the token on most modules, SoftHSM included).
//!
//! One process owns a token (the node's agent), so the cache is filled completely by
//! one full scan of the metadata objects and kept up to date by this process's own
//! writes. Every use still reads the metadata object through its handle, so a handle
//! that went stale is noticed and the secret looked up again.

use std::collections::{HashMap, HashSet};

use cryptoki::object::ObjectHandle;

use super::SecretPath;

#[derive(Clone, Debug)]
pub(super) struct Entry {
    /// Metadata objects, newest first (more than one only after an interrupted write).
    pub meta: Vec<ObjectHandle>,
    pub generation: String,
    /// Data objects of `generation`, once looked up or written.
    pub data: Option<Vec<ObjectHandle>>,
}

pub(super) enum Lookup {
    Known(Entry),
    /// The cache is complete and has no such secret.
    Absent,
    /// Not cached: search the token.
    Unknown,
}

#[derive(Default)]
pub(super) struct HandleCache {
    complete: bool,
    entries: HashMap<SecretPath, Entry>,
    /// Secrets whose objects are in doubt (after a failed write) even when complete.
    unknown: HashSet<SecretPath>,
}

impl HandleCache {
    pub fn lookup(&self, path: &SecretPath) -> Lookup {
        match self.entries.get(path) {
            Some(e) => Lookup::Known(e.clone()),
            None if self.complete && !self.unknown.contains(path) => Lookup::Absent,
            None => Lookup::Unknown,
        }
    }

    pub fn insert(&mut self, path: SecretPath, entry: Entry) {
        self.unknown.remove(&path);
        self.entries.insert(path, entry);
    }

    /// Forgets one secret; it is searched for again on next use.
    pub fn forget(&mut self, path: &SecretPath) {
        self.entries.remove(path);
        self.unknown.insert(path.clone());
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.unknown.clear();
        self.complete = false;
    }

    /// Replaces the content with the result of a full metadata scan, keeping known
    /// data handles of unchanged generations.
    pub fn fill(&mut self, scanned: impl IntoIterator<Item = (SecretPath, Entry)>) {
        let mut old = std::mem::take(&mut self.entries);
        for (path, mut entry) in scanned {
            if let Some(prev) = old.remove(&path)
                && prev.generation == entry.generation
            {
                entry.data = prev.data;
            }
            self.entries.insert(path, entry);
        }
        self.unknown.clear();
        self.complete = true;
    }
}

impl HandleCache {
    /// Whether some live secret's data objects are not known yet (after a fill from a
    /// cold start): reading each would then cost one scan of the whole token.
    pub fn lacks_data<'a>(&self, live: impl IntoIterator<Item = &'a SecretPath>) -> bool {
        live.into_iter()
            .any(|p| self.entries.get(p).is_none_or(|e| e.data.is_none()))
    }

    /// Records the data objects of `path` found by a scan, if `generation` is still the
    /// one cached (a write since the scan has already recorded its own).
    pub fn set_data(&mut self, path: &SecretPath, generation: &str, data: Vec<ObjectHandle>) {
        if let Some(entry) = self.entries.get_mut(path)
            && entry.generation == generation
            && entry.data.is_none()
        {
            entry.data = Some(data);
        }
    }
}
