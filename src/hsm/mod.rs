//! The secret store: secrets addressed by `<namespace>/<name>`, each a set of named keys,
//! kept on a PKCS#11 token with crash-safe generation switches (DESIGN §8).
//!
//! Callers use the [`SecretStore`] trait; [`Pkcs11Store`] is the real implementation,
//! [`MemoryStore`] an in-process one for tests and benchmarks of code above the store,
//! and `FaultyStore` (feature `fault-injection`, tests only) injects failures into either.

mod error;
#[cfg(feature = "fault-injection")]
mod fault;
#[cfg(feature = "fault-injection")]
mod faulty;
mod handles;
mod layout;
mod memory;
mod model;
mod path;
mod pin_refusal;
mod pkcs11;

pub use error::StoreError;
#[cfg(feature = "fault-injection")]
pub use fault::{FaultKind, FaultPlan};
#[cfg(feature = "fault-injection")]
pub use faulty::FaultyStore;
pub use memory::MemoryStore;
pub use model::{
    Body, Checksum, Expect, GcReport, ManifestEntry, Record, SecretBytes, SecretData, TokenInfo,
};
pub use path::{MAX_KEY_LEN, SecretPath, validate_key};
pub use pin_refusal::PinRefusals;
pub use pkcs11::{Pkcs11Config, Pkcs11Store, TransportPublicKey};

use async_trait::async_trait;

/// What every part of the system uses to reach a token.
///
/// Versions are store-wide change sequence numbers: every write (put, delete) takes the
/// next one, so "what changed since N" is well defined for mirrors.
#[async_trait]
pub trait SecretStore: Send + Sync + 'static {
    /// Label of the token behind this store (for messages).
    fn token_label(&self) -> &str;

    /// The stored record of `path`, tombstones included. NotFound if never written.
    async fn record(&self, path: &SecretPath) -> Result<Record, StoreError>;

    /// The live content and version of `path`; NotFound if absent or deleted.
    async fn get(&self, path: &SecretPath) -> Result<(u64, SecretData), StoreError> {
        let record = self.record(path).await?;
        match record.body {
            Body::Live(data) => Ok((record.version, data)),
            Body::Deleted => Err(StoreError::NotFound {
                token: self.token_label().into(),
                path: path.to_string(),
            }),
        }
    }

    /// Writes a new version if `expect` admits the current one; returns the new version.
    async fn put(
        &self,
        path: &SecretPath,
        data: SecretData,
        expect: Expect,
    ) -> Result<u64, StoreError>;

    /// Replaces the secret by a tombstone (so mirrors delete it too).
    async fn delete(&self, path: &SecretPath, expect: Expect) -> Result<u64, StoreError>;

    /// Stores exactly this record (a mirror copying the primary), after verifying its
    /// checksum. Returns false when it was already there.
    async fn apply(&self, record: Record) -> Result<bool, StoreError>;

    /// Removes every trace of `path` (a mirror dropping what the primary never had).
    async fn purge(&self, path: &SecretPath) -> Result<bool, StoreError>;

    /// Path, version, checksum and deleted flag of every secret, without reading values.
    async fn manifest(&self) -> Result<Vec<ManifestEntry>, StoreError>;

    /// Highest change sequence number stored (0 when empty).
    fn latest_sequence(&self) -> u64;

    /// Proves the token is present and a session usable.
    async fn health(&self) -> Result<TokenInfo, StoreError>;

    /// Removes objects left behind by interrupted writes.
    async fn gc(&self) -> Result<GcReport, StoreError>;

    /// The agent's own facts (epoch, role, lease) last saved on this token, so they
    /// survive a restart of the process; None when never saved. Opaque to the store.
    /// Stores without a token of their own (a remote view) keep none.
    async fn load_agent_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }

    /// Replaces the agent's facts crash-safely: after a crash at any point the previous
    /// or the new bytes load, never a mix. Stores without a token of their own drop them.
    async fn save_agent_state(&self, _bytes: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }
}
