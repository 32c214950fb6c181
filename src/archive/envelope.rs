//! One archive object as stored in the bucket: a clear header, authenticated, and the
//! payload encrypted under a fresh data key that is wrapped for each recipient.
//!
//! ```text
//! b"HSMARC1\n" | u32 header length (big endian) | header (JSON) | 12-byte nonce | ciphertext+tag
//! ```
//!
//! The payload is sealed with AES-256-GCM whose associated data is the header exactly as
//! stored: a changed header (a renamed range, another device, a swapped recipient), a cut
//! object or a flipped bit fails authentication as a whole. Which object may follow which
//! is the chain's business ([`super::chain`]).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::ArchiveError;
use super::keys::{KeyUnwrap, KeyWrap, WrappedKey};

const MAGIC: &[u8; 8] = b"HSMARC1\n";
/// Headers are small (names, numbers, a few wrapped keys); anything larger is not ours.
const MAX_HEADER: usize = 64 * 1024;
pub const FORMAT: u32 = 1;

/// What an object holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// Every live secret at `last` (tombstones dropped): where a restore starts.
    Base,
    /// The changes `first..=last`, following the object whose digest is `prev`.
    Segment,
    /// A site promotion (`epoch` is the site epoch, `last` the fence point); see
    /// [`super::site`].
    Fence,
}

/// The clear, authenticated part of an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectHeader {
    pub format: u32,
    pub kind: ObjectKind,
    /// The HSMDevice and the archive (chosen when the archive is created): an object of
    /// another device or another archive is refused by name.
    pub device: String,
    pub archive: String,
    /// The primary's epoch when the changes were read.
    pub epoch: u64,
    /// A segment: the first change it covers (the previous object's `covers()` + 1). A
    /// base: 0.
    pub first: u64,
    /// A segment: the last change it covers. A base: the sequence from which its content
    /// is consistent (the primary's sequence when the snapshot ended).
    pub last: u64,
    /// A base: the primary's sequence when the snapshot began; every change up to it is
    /// in the base, later ones may be, and the chain replays from the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_from: Option<u64>,
    /// SHA-256 (hex) of the whole previous object of the chain; none for a base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    /// When the object was written (RFC 3339), the time a point-in-time restore matches.
    pub created: String,
    /// How many records the payload holds (checked after decryption).
    pub records: u64,
    pub recipients: Vec<WrappedKey>,
}

impl ObjectHeader {
    /// Every change up to this sequence is in this object and those before it.
    pub fn covers(&self) -> u64 {
        match self.kind {
            ObjectKind::Base => self.base_from.unwrap_or(self.last),
            ObjectKind::Segment | ObjectKind::Fence => self.last,
        }
    }
}

/// Seals `payload` under `header` (whose recipients this fills in) for every wrapper.
pub async fn seal(
    mut header: ObjectHeader,
    payload: &[u8],
    wrappers: &[&dyn KeyWrap],
) -> Result<Vec<u8>, ArchiveError> {
    if wrappers.is_empty() {
        return Err(ArchiveError::Config(
            "an archive object needs at least one key to be sealed for".into(),
        ));
    }
    let rng = SystemRandom::new();
    let mut dek = Zeroizing::new([0u8; 32]);
    rng.fill(dek.as_mut())
        .map_err(|_| ArchiveError::Crypto("the system random generator failed".into()))?;
    header.recipients.clear();
    for wrapper in wrappers {
        header.recipients.push(wrapper.wrap(&dek).await?);
    }
    let header_bytes = serde_json::to_vec(&header)
        .map_err(|e| ArchiveError::Crypto(format!("encode the header: {e}")))?;
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)
        .map_err(|_| ArchiveError::Crypto("the system random generator failed".into()))?;
    let key = aead_key(&dek)?;
    let mut sealed = payload.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(&header_bytes),
        &mut sealed,
    )
    .map_err(|_| ArchiveError::Crypto("AES-GCM sealing failed".into()))?;
    let mut out =
        Vec::with_capacity(MAGIC.len() + 4 + header_bytes.len() + NONCE_LEN + sealed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header_bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&header_bytes);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// The header of `bytes`, unauthenticated: enough to list and plan, never to trust.
pub fn peek_header(name: &str, bytes: &[u8]) -> Result<ObjectHeader, ArchiveError> {
    split(name, bytes).map(|(header, _, _, _)| header)
}

/// Opens `bytes` (object `name`) with `unwrapper`: the authenticated header and the
/// payload. Fails on any change to any byte.
pub async fn open(
    name: &str,
    bytes: &[u8],
    unwrapper: &dyn KeyUnwrap,
) -> Result<(ObjectHeader, Zeroizing<Vec<u8>>), ArchiveError> {
    let (header, header_bytes, nonce, sealed) = split(name, bytes)?;
    let wrapped = header
        .recipients
        .iter()
        .find(|r| unwrapper.accepts(r))
        .ok_or_else(|| ArchiveError::NoMatchingKey {
            object: name.to_string(),
            have: unwrapper.describe(),
            sealed_for: header
                .recipients
                .iter()
                .map(|r| r.key_id.clone())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let dek = unwrapper.unwrap(wrapped).await.map_err(|e| match e {
        ArchiveError::Crypto(detail) => ArchiveError::Tampered {
            object: name.to_string(),
            detail: format!(
                "its data key does not unwrap ({detail}); if the object is sound, this token \
                 holds another archive key than the device's: copy the device's key to it with \
                 the key ceremony (archive key-receive-begin / key-export / key-receive)"
            ),
        },
        other => other,
    })?;
    let key = aead_key(&dek)?;
    let mut plain = Zeroizing::new(sealed.to_vec());
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| ArchiveError::Tampered {
        object: name.to_string(),
        detail: "the nonce is cut short".into(),
    })?;
    let len = key
        .open_in_place(nonce, Aad::from(header_bytes), plain.as_mut_slice())
        .map_err(|_| ArchiveError::Tampered {
            object: name.to_string(),
            detail: "authentication failed: the header or the payload was changed, cut or \
                     belongs to another object"
                .into(),
        })?
        .len();
    plain.truncate(len);
    Ok((header, plain))
}

fn aead_key(dek: &[u8; 32]) -> Result<LessSafeKey, ArchiveError> {
    UnboundKey::new(&AES_256_GCM, dek)
        .map(LessSafeKey::new)
        .map_err(|_| ArchiveError::Crypto("AES-256-GCM key setup failed".into()))
}

type Parts<'a> = (ObjectHeader, &'a [u8], &'a [u8], &'a [u8]);

fn split<'a>(name: &str, bytes: &'a [u8]) -> Result<Parts<'a>, ArchiveError> {
    let bad = |detail: &str| ArchiveError::Tampered {
        object: name.to_string(),
        detail: detail.to_string(),
    };
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| bad("it is not an hsm-secrets archive object (no HSMARC1 magic)"))?;
    if rest.len() < 4 {
        return Err(bad("it is cut short before its header"));
    }
    let (len, rest) = rest.split_at(4);
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_HEADER {
        return Err(bad("its header length is implausible"));
    }
    if rest.len() < len + NONCE_LEN + ring::aead::MAX_TAG_LEN {
        return Err(bad("it is cut short"));
    }
    let (header_bytes, rest) = rest.split_at(len);
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let header: ObjectHeader = serde_json::from_slice(header_bytes)
        .map_err(|e| bad(&format!("its header does not parse ({e})")))?;
    if header.format != FORMAT {
        return Err(bad(&format!(
            "format {} is not the format {FORMAT} this version reads",
            header.format
        )));
    }
    Ok((header, header_bytes, nonce, sealed))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::archive::keys::RecoverySecretKey;

    fn header() -> ObjectHeader {
        ObjectHeader {
            format: FORMAT,
            kind: ObjectKind::Segment,
            device: "prod-hsm".into(),
            archive: "a1".into(),
            epoch: 3,
            first: 11,
            last: 20,
            prev: Some("00".repeat(32)),
            base_from: None,
            created: "2026-12-07T05:00:00Z".into(),
            records: 2,
            recipients: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_sealed_object_opens_with_its_key_and_with_nothing_else() {
        let secret = RecoverySecretKey::generate().unwrap();
        let public = secret.public();
        let sealed = seal(header(), b"payload bytes", &[&public]).await.unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"payload"), "encrypted");
        let (h, plain) = open("s", &sealed, &secret).await.unwrap();
        assert_eq!(plain.as_slice(), b"payload bytes");
        assert_eq!(h.first, 11);
        assert_eq!(h.recipients.len(), 1);

        let other = RecoverySecretKey::generate().unwrap();
        let error = open("s", &sealed, &other).await.unwrap_err();
        assert!(
            matches!(error, ArchiveError::NoMatchingKey { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn every_changed_or_missing_byte_is_detected() {
        let secret = RecoverySecretKey::generate().unwrap();
        let sealed = seal(header(), b"0123456789", &[&secret.public()])
            .await
            .unwrap();
        // A flipped bit anywhere past the magic: header, nonce, ciphertext or tag.
        for at in (8..sealed.len()).step_by(7) {
            let mut bad = sealed.clone();
            bad[at] ^= 0x01;
            assert!(open("s", &bad, &secret).await.is_err(), "bit flip at {at}");
        }
        // Cut short at any length.
        for len in [0, 5, 12, sealed.len() / 2, sealed.len() - 1] {
            let error = open("s", &sealed[..len], &secret).await.unwrap_err();
            assert!(
                matches!(error, ArchiveError::Tampered { .. }),
                "{len}: {error}"
            );
        }
        // A header rewritten to claim another range, its length intact.
        let at = sealed
            .windows(10)
            .position(|w| w == b"\"first\":11")
            .unwrap();
        let mut renamed = sealed.clone();
        renamed[at + 9] = b'2';
        let error = open("s", &renamed, &secret).await.unwrap_err();
        assert!(matches!(error, ArchiveError::Tampered { .. }), "{error}");
    }
}
