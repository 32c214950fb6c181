//! What agents ask of each other, as domain types: a primary's manifest, its change
//! feed, the records a verification pass fetches, and the pushes of an Active primary.
//! [`rpc::convert`](super::rpc::convert) maps them to and from the wire.

use crate::crd::DeviceRole;
use crate::hsm::{ManifestEntry, Record, SecretPath};

/// Every secret's version and checksum (no value), and the point the listing covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub node: String,
    /// Every change up to this sequence is in the listing.
    pub sequence: u64,
    pub epoch: u64,
    /// A primary's: where its term's own history begins (0 from a mirror).
    pub fork_sequence: u64,
    pub entries: Vec<ManifestEntry>,
}

/// A request for the changes after `since`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangesAsk {
    pub since: u64,
    /// At most this many records (0: the primary's default).
    pub limit: u32,
    /// The asking mirror (empty from a reader that is no mirror, like the archiver).
    pub node: String,
    /// The epoch whose history the mirror verified (0: none yet).
    pub verified_epoch: u64,
}

impl ChangesAsk {
    /// Whether it comes from a mirror that verified `epoch`: once such a mirror holds
    /// everything published, it is back in the Active sync set.
    pub fn from_verified_mirror(&self, epoch: u64) -> bool {
        !self.node.is_empty() && self.verified_epoch == epoch
    }
}

/// The changes after a point, up to a point they describe exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// In version order, tombstones included; checksums not yet verified by the reader.
    pub records: Vec<Record>,
    /// Applied to the state at `since`, the records give the state at `through`.
    pub through: u64,
    /// The primary's published sequence.
    pub sequence: u64,
    pub epoch: u64,
    /// More changes follow `through`.
    pub more: bool,
}

/// Named records a verification pass needs, with what the mirror holds of them (so the
/// primary can say which of the mirror's versions it never had).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FetchAsk {
    pub paths: Vec<SecretPath>,
    pub held: Vec<ManifestEntry>,
}

/// The primary's answer to a [`FetchAsk`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// How many of the asked paths this answers (the rest: ask again).
    pub covered: u32,
    pub records: Vec<Record>,
    /// Not on the primary.
    pub missing: Vec<SecretPath>,
    /// The primary's own copy is unreadable or corrupt: mirrors keep theirs.
    pub unreadable: Vec<SecretPath>,
    /// The mirror's version is one the primary's history never had: a lost write.
    pub lost: Vec<SecretPath>,
}

/// One write an Active primary pushes to a mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    pub record: Record,
    pub epoch: u64,
    /// The pushing node as it claims itself (its certificate decides).
    pub primary_node: String,
}

/// What an agent became with an assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assigned {
    pub role: DeviceRole,
    pub epoch: u64,
    pub applied_sequence: u64,
}
