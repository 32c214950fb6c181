//! What the store holds: secret data, records, versions, manifests, checksums.

use std::collections::BTreeMap;
use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{SecretPath, StoreError, validate_key};

/// The bytes of one key; wiped from memory when dropped.
pub type SecretBytes = Zeroizing<Vec<u8>>;

/// Named keys of arbitrary bytes. Keys are sorted so encodings are canonical.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData(BTreeMap<String, SecretBytes>);

impl SecretData {
    pub const MAX_KEYS: usize = 256;
    pub const MAX_VALUE_LEN: usize = 1024 * 1024;

    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key, validating its name and size.
    pub fn insert(&mut self, key: &str, value: impl Into<Vec<u8>>) -> Result<(), StoreError> {
        validate_key(key)?;
        let value = value.into();
        if value.len() > Self::MAX_VALUE_LEN {
            return Err(StoreError::InvalidName {
                what: "key",
                name: key.into(),
                why: format!(
                    "value of {} bytes is larger than the limit of {} bytes",
                    value.len(),
                    Self::MAX_VALUE_LEN
                ),
            });
        }
        self.0.insert(key.to_string(), Zeroizing::new(value));
        if self.0.len() > Self::MAX_KEYS {
            return Err(StoreError::InvalidName {
                what: "secret",
                name: format!("{} keys", self.0.len()),
                why: format!("a secret holds at most {} keys", Self::MAX_KEYS),
            });
        }
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(|v| v.as_slice())
    }

    pub fn remove(&mut self, key: &str) -> Option<SecretBytes> {
        self.0.remove(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Total bytes of all values.
    pub fn byte_len(&self) -> usize {
        self.0.values().map(|v| v.len()).sum()
    }

    /// Builds from already-validated parts (used when decoding the token).
    pub(crate) fn from_validated(map: BTreeMap<String, SecretBytes>) -> Self {
        Self(map)
    }
}

/// Values are never printed: only key names and sizes.
impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, format!("<{} bytes>", v.len()))),
            )
            .finish()
    }
}

/// SHA-256 over the canonical, length-prefixed encoding of a record.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checksum(pub [u8; 32]);

impl Checksum {
    /// Checksum of a live secret: path, then each key and value, all length-prefixed so
    /// that no two different secrets share an encoding.
    pub fn of_data(path: &SecretPath, data: &SecretData) -> Self {
        let mut h = Sha256::new();
        h.update(b"hsm-secrets/v1\0live");
        update_lp(&mut h, path.to_string().as_bytes());
        h.update((data.len() as u64).to_be_bytes());
        for (k, v) in data.iter() {
            update_lp(&mut h, k.as_bytes());
            update_lp(&mut h, v);
        }
        Self(h.finalize().into())
    }

    /// Checksum of a tombstone.
    pub fn of_tombstone(path: &SecretPath) -> Self {
        let mut h = Sha256::new();
        h.update(b"hsm-secrets/v1\0deleted");
        update_lp(&mut h, path.to_string().as_bytes());
        Self(h.finalize().into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

fn update_lp(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", &self.to_hex()[..12])
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A secret's content at one version: live data or a tombstone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Live(SecretData),
    Deleted,
}

/// One secret as stored: what mirrors copy and verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub path: SecretPath,
    /// The store-wide change sequence number at which this content was written.
    pub version: u64,
    pub checksum: Checksum,
    pub body: Body,
}

impl Record {
    pub fn live(path: SecretPath, version: u64, data: SecretData) -> Self {
        let checksum = Checksum::of_data(&path, &data);
        Self {
            path,
            version,
            checksum,
            body: Body::Live(data),
        }
    }

    pub fn tombstone(path: SecretPath, version: u64) -> Self {
        let checksum = Checksum::of_tombstone(&path);
        Self {
            path,
            version,
            checksum,
            body: Body::Deleted,
        }
    }

    /// Recomputes the checksum from the content and compares.
    pub fn verify(&self) -> Result<(), StoreError> {
        let actual = match &self.body {
            Body::Live(data) => Checksum::of_data(&self.path, data),
            Body::Deleted => Checksum::of_tombstone(&self.path),
        };
        if actual == self.checksum {
            Ok(())
        } else {
            Err(StoreError::Corrupt {
                path: self.path.to_string(),
                detail: format!(
                    "checksum mismatch at version {} (expected {:?}, content gives {:?})",
                    self.version, self.checksum, actual
                ),
            })
        }
    }

    pub fn is_deleted(&self) -> bool {
        matches!(self.body, Body::Deleted)
    }

    pub fn entry(&self) -> ManifestEntry {
        ManifestEntry {
            path: self.path.clone(),
            version: self.version,
            checksum: self.checksum,
            deleted: self.is_deleted(),
        }
    }
}

/// One line of a manifest: enough to compare two tokens without reading any value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    pub path: SecretPath,
    pub version: u64,
    pub checksum: Checksum,
    pub deleted: bool,
}

/// Condition for a write (optimistic concurrency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// Only if the secret does not exist (or is a tombstone).
    Absent,
    /// Only if the current version is exactly this one.
    Version(u64),
}

impl Expect {
    /// Whether the current version (None = absent or deleted) satisfies the condition.
    pub fn admits(self, current: Option<u64>) -> bool {
        match self {
            Expect::Any => true,
            Expect::Absent => current.is_none(),
            Expect::Version(v) => current == Some(v),
        }
    }
}

/// Token identity and state, for health checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub label: String,
    pub serial: String,
    pub manufacturer: String,
    pub model: String,
}

/// What garbage collection removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub stale_metadata: usize,
    pub orphan_objects: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> SecretPath {
        s.parse().expect("path")
    }

    #[test]
    fn checksum_is_unambiguous() {
        let mut a = SecretData::new();
        a.insert("ab", b"c".to_vec()).expect("insert");
        let mut b = SecretData::new();
        b.insert("a", b"bc".to_vec()).expect("insert");
        assert_ne!(
            Checksum::of_data(&path("ns/x"), &a),
            Checksum::of_data(&path("ns/x"), &b)
        );
        assert_ne!(
            Checksum::of_data(&path("ns/x"), &a),
            Checksum::of_data(&path("ns/y"), &a)
        );
        assert_ne!(
            Checksum::of_data(&path("ns/x"), &SecretData::new()),
            Checksum::of_tombstone(&path("ns/x"))
        );
    }

    #[test]
    fn tampered_record_fails_verification() {
        let mut d = SecretData::new();
        d.insert("k", b"v".to_vec()).expect("insert");
        let mut r = Record::live(path("ns/x"), 3, d);
        r.verify().expect("intact");
        if let Body::Live(data) = &mut r.body {
            data.insert("k", b"w".to_vec()).expect("insert");
        }
        let err = r.verify().expect_err("tampered");
        assert!(matches!(err, StoreError::Corrupt { .. }));
        assert!(!err.to_string().contains('w'), "no value in message");
    }

    #[test]
    fn debug_never_shows_values() {
        let mut d = SecretData::new();
        d.insert("password", b"hunter2".to_vec()).expect("insert");
        let shown = format!("{d:?}");
        assert!(shown.contains("password") && !shown.contains("hunter2"));
    }

    #[test]
    fn expectations() {
        assert!(Expect::Any.admits(None) && Expect::Any.admits(Some(4)));
        assert!(Expect::Absent.admits(None) && !Expect::Absent.admits(Some(1)));
        assert!(Expect::Version(4).admits(Some(4)) && !Expect::Version(4).admits(Some(5)));
        assert!(!Expect::Version(4).admits(None));
    }

    #[test]
    fn oversized_inputs_are_refused() {
        let mut d = SecretData::new();
        let err = d
            .insert("big", vec![0u8; SecretData::MAX_VALUE_LEN + 1])
            .expect_err("too big");
        assert!(err.to_string().contains("limit"));
        for i in 0..SecretData::MAX_KEYS {
            d.insert(&format!("k{i}"), vec![]).expect("within limit");
        }
        assert!(d.insert("one-more", vec![]).is_err());
    }
}
