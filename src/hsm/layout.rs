//! How secrets map onto PKCS#11 objects (DESIGN §8). Pure: no PKCS#11 calls here.
//!
//! Every secret is one metadata object plus one `CKO_DATA` object per key, all private
//! token objects. Data objects carry their secret's path and a generation id in the
//! label, so a write creates a complete new generation before the metadata switches to
//! it; a crash at any point leaves the old or the new generation readable, never a mix.

use serde::{Deserialize, Serialize};

use super::{Checksum, SecretPath, StoreError};

/// `CKA_APPLICATION` of metadata objects.
pub const META_APP: &[u8] = b"hsm-secrets/meta";
/// `CKA_APPLICATION` of data objects.
pub const DATA_APP: &[u8] = b"hsm-secrets/data";

/// Label of a secret's metadata object (matched exactly, never by prefix).
pub fn meta_label(path: &SecretPath) -> Vec<u8> {
    format!("hsm-secrets:m:{path}").into_bytes()
}

/// Label shared by the data objects of one generation of a secret.
pub fn data_label(path: &SecretPath, generation: &str) -> Vec<u8> {
    format!("hsm-secrets:d:{path}@{generation}").into_bytes()
}

/// Splits a data label back into (path, generation); None for foreign labels.
pub fn parse_data_label(label: &[u8]) -> Option<(SecretPath, String)> {
    let s = std::str::from_utf8(label).ok()?;
    let rest = s.strip_prefix("hsm-secrets:d:")?;
    let (path, generation) = rest.rsplit_once('@')?;
    Some((path.parse().ok()?, generation.to_string()))
}

/// Contents of a metadata object. Holds no secret bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Format version of this encoding.
    pub f: u32,
    pub path: String,
    pub version: u64,
    /// Generation id of the data objects (unique per write, even across restarts).
    pub generation: String,
    pub deleted: bool,
    pub checksum: String,
    /// Key names, so a missing data object is detected.
    pub keys: Vec<String>,
}

impl Meta {
    pub const FORMAT: u32 = 1;

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("metadata is always serializable")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let meta: Meta = serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            path: "<metadata>".into(),
            detail: format!("unreadable metadata object: {e}"),
        })?;
        if meta.f != Self::FORMAT {
            return Err(StoreError::Corrupt {
                path: meta.path,
                detail: format!(
                    "metadata format {} is not supported by this version (expects {})",
                    meta.f,
                    Self::FORMAT
                ),
            });
        }
        Ok(meta)
    }

    pub fn secret_path(&self) -> Result<SecretPath, StoreError> {
        self.path.parse()
    }

    pub fn checksum(&self) -> Result<Checksum, StoreError> {
        Checksum::from_hex(&self.checksum).ok_or_else(|| StoreError::Corrupt {
            path: self.path.clone(),
            detail: "metadata carries a malformed checksum".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_do_not_prefix_each_other() {
        let db: SecretPath = "shop/db".parse().expect("path");
        let db_prod: SecretPath = "shop/db-prod".parse().expect("path");
        let l = data_label(&db, "7.abc");
        assert_eq!(parse_data_label(&l), Some((db.clone(), "7.abc".into())));
        assert_ne!(meta_label(&db), meta_label(&db_prod));
        assert!(parse_data_label(b"other").is_none());
    }

    #[test]
    fn meta_round_trips_and_rejects_unknown_format() {
        let m = Meta {
            f: Meta::FORMAT,
            path: "shop/db".into(),
            version: 9,
            generation: "9.1".into(),
            deleted: false,
            checksum: "00".repeat(32),
            keys: vec!["a".into()],
        };
        assert_eq!(Meta::decode(&m.encode()).expect("decode"), m);
        let future = Meta { f: 2, ..m };
        assert!(Meta::decode(&future.encode()).is_err());
        assert!(Meta::decode(b"{").is_err());
    }
}
