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

/// `CKA_APPLICATION` of the agent's state objects (never a secret: no path, not in the
/// manifest, untouched by gc).
pub const AGENT_APP: &[u8] = b"hsm-secrets/agent";
/// Label of the agent's state objects.
pub const AGENT_LABEL: &[u8] = b"hsm-secrets:agent-state";

/// One saved copy of the agent state: `generation (8 bytes, big endian) || SHA-256 of
/// generation and payload || payload`. A save writes generation g+1 before destroying
/// older copies, so a crash leaves both and the newest intact one wins.
pub fn encode_agent_state(generation: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = generation.to_be_bytes().to_vec();
    out.extend_from_slice(&agent_state_digest(generation, payload));
    out.extend_from_slice(payload);
    out
}

/// (generation, payload) of an intact copy; None for a damaged or foreign one.
pub fn decode_agent_state(bytes: &[u8]) -> Option<(u64, Vec<u8>)> {
    if bytes.len() < 40 {
        return None;
    }
    let generation = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    let payload = &bytes[40..];
    (bytes[8..40] == agent_state_digest(generation, payload))
        .then(|| (generation, payload.to_vec()))
}

fn agent_state_digest(generation: u64, payload: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"hsm-secrets agent state\0");
    h.update(generation.to_be_bytes());
    h.update(payload);
    h.finalize().into()
}

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

#[cfg(test)]
mod agent_state_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn agent_state_copies_round_trip_and_damage_is_detected() {
        let bytes = encode_agent_state(7, b"{\"epoch\":3}");
        assert_eq!(
            decode_agent_state(&bytes),
            Some((7, b"{\"epoch\":3}".to_vec()))
        );
        let mut damaged = bytes.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert_eq!(decode_agent_state(&damaged), None);
        let mut other_generation = bytes;
        other_generation[7] = 8;
        assert_eq!(decode_agent_state(&other_generation), None);
        assert_eq!(decode_agent_state(b"short"), None);
    }
}
