//! This node's token plus the change index kept in step with it. Every mutation the
//! agent makes goes through here, so the index always describes the token.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::hsm::{ManifestEntry, Record, SecretPath, SecretStore, StoreError};

use super::index::ChangeIndex;

/// Which local state a mirror-side apply or purge may replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Guard {
    /// Pulled or pushed from the primary: never replace a newer version (a delayed push
    /// must not undo a later pull, nor the other way round).
    NotOlder,
    /// A verification pass: replace only what the pass planned against (`None` = the path
    /// was absent); a push that arrived meanwhile is newer and stays.
    Expect(Option<u64>),
}

/// Outcome of a guarded apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    Stored,
    AlreadyThere,
    /// The guard kept newer local state.
    Kept,
}

pub(crate) struct Local {
    pub node: String,
    pub store: Arc<dyn SecretStore>,
    index: Mutex<ChangeIndex>,
    built: AtomicBool,
    build: tokio::sync::Mutex<()>,
    /// Serializes mirror-side mutations (pulls, pushes, repairs) so guards see a stable
    /// state between their check and their write.
    applies: tokio::sync::Mutex<()>,
}

impl Local {
    pub fn new(node: String, store: Arc<dyn SecretStore>) -> Self {
        Self {
            node,
            store,
            index: Mutex::default(),
            built: AtomicBool::new(false),
            build: tokio::sync::Mutex::new(()),
            applies: tokio::sync::Mutex::new(()),
        }
    }

    /// Builds the index from the token's manifest once (at start, or on first use when
    /// the token was absent at start). Mutations happen only after this returned Ok.
    pub async fn ensure_index(&self) -> Result<(), StoreError> {
        if self.built.load(Ordering::Acquire) {
            return Ok(());
        }
        let _build = self.build.lock().await;
        if self.built.load(Ordering::Acquire) {
            return Ok(());
        }
        let entries = self.store.manifest().await?;
        let index = ChangeIndex::from_manifest(&entries, self.store.latest_sequence());
        tracing::info!(node = %self.node, secrets = index.len(), sequence = index.published(), "change index built");
        *self.index() = index;
        self.built.store(true, Ordering::Release);
        Ok(())
    }

    pub fn index(&self) -> MutexGuard<'_, ChangeIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token's manifest, with the index brought in line with it (a verification pass
    /// plans against this).
    pub async fn manifest_snapshot(&self) -> Result<Vec<ManifestEntry>, StoreError> {
        self.ensure_index().await?;
        let _serial = self.applies.lock().await;
        let entries = self.store.manifest().await?;
        self.index().reset_entries(&entries);
        Ok(entries)
    }

    /// Stores a record copied from the primary (checksum verified by the store) if the
    /// guard allows.
    pub async fn apply(&self, record: Record, guard: Guard) -> Result<Applied, StoreError> {
        self.ensure_index().await?;
        let _serial = self.applies.lock().await;
        let current = self.index().version_of(&record.path);
        let allowed = match guard {
            Guard::NotOlder => current.is_none_or(|v| v <= record.version),
            Guard::Expect(expected) => current == expected,
        };
        if !allowed {
            return Ok(Applied::Kept);
        }
        let (path, version) = (record.path.clone(), record.version);
        let stored = self.store.apply(record).await?;
        self.index().record(&path, version);
        Ok(if stored {
            Applied::Stored
        } else {
            Applied::AlreadyThere
        })
    }

    /// Removes every trace of `path` if it is still at `expected` (the version a pass
    /// planned against).
    pub async fn purge(&self, path: &SecretPath, expected: u64) -> Result<bool, StoreError> {
        self.ensure_index().await?;
        let _serial = self.applies.lock().await;
        if self.index().version_of(path) != Some(expected) {
            return Ok(false);
        }
        let removed = self.store.purge(path).await?;
        self.index().remove(path);
        Ok(removed)
    }
}
