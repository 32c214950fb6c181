//! Disaster recovery: a continuous, encrypted archive of a device in object storage, and
//! restores from it to a chosen point.
//!
//! ```text
//! primary's agent ──Changes/Fetch (mTLS, as a mirror pulls)──► Archiver
//!     ──► bases:     <prefix>/<device>/<archive>/base/<epoch>-<last>.hsmarc      every live secret at `last`
//!     ──► segments:  <prefix>/<device>/<archive>/seg/<epoch>-<first>-<last>.hsmarc   the changes first..=last
//! restore: newest base at or before the target ─► its chain of segments ─► empty tokens
//! ```
//!
//! - Every object is sealed ([`envelope`]): AES-256-GCM under a fresh data key wrapped for
//!   the HSM's archive key and for the offline recovery key ([`keys`]).
//! - Each segment names the digest of the object before it; a base starts a chain. A
//!   restore follows one chain from its base and stops at the first gap, duplicate,
//!   reordered, foreign or unreadable object, naming it ([`chain`]).
//! - The archiver holds no state of its own: it resumes from what the bucket holds, and
//!   starts a new chain with a base whenever it cannot continue the last one (a new
//!   primary epoch, a gap), so writes a failed primary never replicated are never mixed
//!   into its successor's history.

pub mod archiver;
pub mod bucket;
pub mod chain;
pub mod drill;
pub mod envelope;
pub mod keys;
pub mod payload;
pub mod plan;
pub mod request;
pub mod restore;
pub mod site;
pub mod supervisor;

pub use archiver::{ArchiveMetrics, Archiver, ArchiverConfig};
pub use bucket::{Bucket, BucketConfig};
pub use keys::{KeyUnwrap, KeyWrap, RecoveryPublicKey, RecoverySecretKey, TokenArchiveKey};
pub use request::{
    ArchiveControl, ArchiveRequest, BackupConfig, BucketRef, FollowConfig, SiteConfig,
};
pub use restore::{RestoreReport, RestoreTarget, restore};
pub use supervisor::{ArchiveSettings, BucketSettings, Supervisor};

use crate::hsm::StoreError;

/// Label of the archive key object on every token of a device.
pub const ARCHIVE_KEY_LABEL: &str = "hsm-secrets/archive-key";

/// What can go wrong archiving or restoring. Messages name the object and the fix and
/// never carry a value or a key.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive configuration: {0}")]
    Config(String),
    #[error("object store {url}: {operation} {object}: {detail}; {fix}")]
    Bucket {
        url: String,
        operation: &'static str,
        object: String,
        detail: String,
        fix: &'static str,
    },
    #[error("archive object {object} is damaged or forged: {detail}; it is never applied")]
    Tampered { object: String, detail: String },
    #[error(
        "archive object {object} is sealed for {sealed_for}, not for {have}; restore with the \
         device's token (archive key) or the offline recovery key it was sealed for"
    )]
    NoMatchingKey {
        object: String,
        have: String,
        sealed_for: String,
    },
    #[error(
        "archive object {object} belongs to {found}, not to {expected}; point the restore at \
         the right device and archive"
    )]
    Foreign {
        object: String,
        found: String,
        expected: String,
    },
    #[error("the archive chain breaks at {object}: {detail}; the restore stops before it")]
    Broken { object: String, detail: String },
    #[error("a record in {object} fails its checksum: {detail}; it is never applied")]
    BadRecord { object: String, detail: String },
    #[error("the archive has no point to restore: {0}")]
    NothingToRestore(String),
    #[error(
        "token {token} already holds {secrets} secrets; restore into an empty token, or pass \
         --force to overwrite what it holds"
    )]
    TargetNotEmpty { token: String, secrets: usize },
    #[error("the primary: {0}")]
    Source(String),
    #[error(transparent)]
    Token(StoreError),
    #[error("cryptography: {0}")]
    Crypto(String),
}

impl ArchiveError {
    /// A bounded label for metrics and conditions.
    pub fn kind(&self) -> &'static str {
        match self {
            ArchiveError::Config(_) => "config",
            ArchiveError::Bucket { .. } => "bucket",
            ArchiveError::Tampered { .. } => "tampered",
            ArchiveError::NoMatchingKey { .. } => "no_matching_key",
            ArchiveError::Foreign { .. } => "foreign",
            ArchiveError::Broken { .. } => "broken_chain",
            ArchiveError::BadRecord { .. } => "bad_record",
            ArchiveError::NothingToRestore(_) => "nothing_to_restore",
            ArchiveError::TargetNotEmpty { .. } => "target_not_empty",
            ArchiveError::Source(_) => "source",
            ArchiveError::Token(_) => "token",
            ArchiveError::Crypto(_) => "crypto",
        }
    }
}
