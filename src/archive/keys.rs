//! Who can open archive objects. Each object's data key is wrapped for two recipients:
//!
//! - **the device's archive key**, an AES-256 key generated inside the HSM and present on
//!   every token of the device ([`TokenArchiveKey`]): what the archiver seals with and
//!   what a restore with a surviving token opens with. It never leaves a token in clear;
//! - **the offline recovery key** ([`RecoveryPublicKey`]): an X25519 key pair made by
//!   `hsm-secrets archive recovery-keygen` on an offline machine. The cluster holds only
//!   the public half; the private half (a file kept in a safe) opens the archive when every
//!   token of the device is gone.
//!
//! Wrapping for the recovery key: an ephemeral X25519 agreement with the recipient's
//! public key, HKDF-SHA256 over the shared secret (salted with both public keys), and
//! AES-256-GCM under that one-time key.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{X25519_BASEPOINT_BYTES, x25519};
use zeroize::Zeroizing;

use super::ArchiveError;
use crate::hsm::Pkcs11Store;

/// A data key wrapped for one recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// `token:<key label>` or `recovery:<fingerprint>`.
    pub key_id: String,
    /// Hex of the wrapped key (with whatever the scheme needs to unwrap it).
    pub wrapped: String,
}

/// Wraps data keys for a recipient.
#[async_trait]
pub trait KeyWrap: Send + Sync {
    async fn wrap(&self, dek: &[u8; 32]) -> Result<WrappedKey, ArchiveError>;
}

/// Unwraps data keys wrapped for it.
#[async_trait]
pub trait KeyUnwrap: Send + Sync {
    fn accepts(&self, wrapped: &WrappedKey) -> bool;
    /// Names the key, for "sealed for X, you have Y".
    fn describe(&self) -> String;
    async fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<[u8; 32]>, ArchiveError>;
}

const RECOVERY_INFO: &[u8] = b"hsm-secrets archive recovery v1";
/// How each half is written, so one is never taken for the other.
const PUBLIC_TAG: &str = "hsm-secrets-recovery-public-v1:";
const PRIVATE_TAG: &str = "hsm-secrets-recovery-private-v1:";

/// The public half of the offline recovery key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryPublicKey([u8; 32]);

/// The private half: kept offline, read only for a restore without tokens.
pub struct RecoverySecretKey(Zeroizing<[u8; 32]>);

impl RecoveryPublicKey {
    /// Parses what `recovery-keygen` wrote to the `.pub` file.
    pub fn parse(text: &str) -> Result<Self, ArchiveError> {
        let text = text.trim();
        if text.starts_with(PRIVATE_TAG) {
            return Err(ArchiveError::Config(
                "this is the PRIVATE recovery key: keep it offline and give the cluster the \
                 .pub file next to it"
                    .into(),
            ));
        }
        let bytes = text
            .strip_prefix(PUBLIC_TAG)
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        bytes.map(Self).ok_or_else(|| {
            ArchiveError::Config(format!(
                "not a recovery public key ({PUBLIC_TAG} and 64 hex digits); use the .pub \
                 file that `hsm-secrets archive recovery-keygen` wrote"
            ))
        })
    }

    pub fn read(path: &Path) -> Result<Self, ArchiveError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ArchiveError::Config(format!(
                "read the recovery public key {}: {e}",
                path.display()
            ))
        })?;
        Self::parse(&text).map_err(|e| match e {
            ArchiveError::Config(why) => ArchiveError::Config(format!("{}: {why}", path.display())),
            other => other,
        })
    }

    /// The `.pub` file's content.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_TAG}{}", hex::encode(self.0))
    }

    /// `recovery:` and the first 16 hex digits of SHA-256 of the key.
    pub fn key_id(&self) -> String {
        let digest = Sha256::digest(self.0);
        format!("recovery:{}", &hex::encode(digest)[..16])
    }
}

impl RecoverySecretKey {
    pub fn generate() -> Result<Self, ArchiveError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(secret.as_mut())
            .map_err(|_| ArchiveError::Crypto("the system random generator failed".into()))?;
        Ok(Self(secret))
    }

    pub fn public(&self) -> RecoveryPublicKey {
        RecoveryPublicKey(x25519(*self.0, X25519_BASEPOINT_BYTES))
    }

    /// Writes the private key (mode 0600) and the public key next to it (`<path>.pub`),
    /// refusing to overwrite either.
    pub fn write_new(&self, path: &Path) -> Result<(), ArchiveError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if path.extension().is_some_and(|e| e == "pub") {
            return Err(ArchiveError::Config(format!(
                "{} ends in .pub, the name of the public half; name the private key file \
                 otherwise (e.g. recovery.key)",
                path.display()
            )));
        }
        let public = path.with_extension("pub");
        if public.exists() {
            return Err(ArchiveError::Config(format!(
                "{} exists already; choose another name",
                public.display()
            )));
        }
        let create = |path: &Path, mode: u32, text: &str| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(|e| ArchiveError::Config(format!("write {}: {e}", path.display())))
        };
        let text = Zeroizing::new(format!("{PRIVATE_TAG}{}\n", hex::encode(*self.0)));
        create(path, 0o600, &text)?;
        create(&public, 0o644, &format!("{}\n", self.public().to_text()))
    }

    pub fn read(path: &Path) -> Result<Self, ArchiveError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            ArchiveError::Config(format!("read the recovery key {}: {e}", path.display()))
        })?);
        let mut key = Zeroizing::new([0u8; 32]);
        let hex_digits = text.trim().strip_prefix(PRIVATE_TAG).unwrap_or_default();
        hex::decode_to_slice(hex_digits, key.as_mut()).map_err(|_| {
            ArchiveError::Config(format!(
                "{} is not a private recovery key (the file `hsm-secrets archive \
                 recovery-keygen --out` wrote, not its .pub)",
                path.display()
            ))
        })?;
        Ok(Self(key))
    }
}

fn one_time_key(shared: &[u8; 32], salt: &[u8]) -> Result<LessSafeKey, ArchiveError> {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(shared);
    let mut okm = Zeroizing::new([0u8; 32]);
    prk.expand(&[RECOVERY_INFO], Len32)
        .and_then(|o| o.fill(okm.as_mut()))
        .map_err(|_| ArchiveError::Crypto("HKDF failed".into()))?;
    UnboundKey::new(&AES_256_GCM, okm.as_ref())
        .map(LessSafeKey::new)
        .map_err(|_| ArchiveError::Crypto("AES key setup failed".into()))
}

#[async_trait]
impl KeyWrap for RecoveryPublicKey {
    async fn wrap(&self, dek: &[u8; 32]) -> Result<WrappedKey, ArchiveError> {
        let ephemeral = RecoverySecretKey::generate()?;
        let ephemeral_public = ephemeral.public();
        let shared = Zeroizing::new(x25519(*ephemeral.0, self.0));
        let salt = [ephemeral_public.0, self.0].concat();
        let key = one_time_key(&shared, &salt)?;
        let mut sealed = dek.to_vec();
        // The key is used once: a fixed nonce is safe.
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0; NONCE_LEN]),
            Aad::from(RECOVERY_INFO),
            &mut sealed,
        )
        .map_err(|_| ArchiveError::Crypto("AES-GCM sealing failed".into()))?;
        Ok(WrappedKey {
            key_id: self.key_id(),
            wrapped: hex::encode([ephemeral_public.0.as_slice(), &sealed].concat()),
        })
    }
}

#[async_trait]
impl KeyUnwrap for RecoverySecretKey {
    fn accepts(&self, wrapped: &WrappedKey) -> bool {
        wrapped.key_id == self.public().key_id()
    }

    fn describe(&self) -> String {
        self.public().key_id()
    }

    async fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<[u8; 32]>, ArchiveError> {
        let bytes = hex::decode(&wrapped.wrapped)
            .map_err(|_| ArchiveError::Crypto("the wrapped key is not hex".into()))?;
        if bytes.len() != 32 + 32 + 16 {
            return Err(ArchiveError::Crypto(
                "the wrapped key has the wrong length".into(),
            ));
        }
        let (ephemeral, sealed) = bytes.split_at(32);
        let ephemeral: [u8; 32] = ephemeral
            .try_into()
            .map_err(|_| ArchiveError::Crypto("the wrapped key has the wrong length".into()))?;
        let mine = self.public();
        let shared = Zeroizing::new(x25519(*self.0, ephemeral));
        let salt = [ephemeral, mine.0].concat();
        let key = one_time_key(&shared, &salt)?;
        let mut plain = Zeroizing::new(sealed.to_vec());
        let dek = key
            .open_in_place(
                Nonce::assume_unique_for_key([0; NONCE_LEN]),
                Aad::from(RECOVERY_INFO),
                plain.as_mut_slice(),
            )
            .map_err(|_| ArchiveError::Crypto("the recovery key does not open it".into()))?;
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&dek[..32]);
        Ok(out)
    }
}

/// The device's archive key on a token (by label), used through the token itself.
pub struct TokenArchiveKey {
    store: Arc<Pkcs11Store>,
    label: String,
}

impl TokenArchiveKey {
    pub fn new(store: Arc<Pkcs11Store>, label: impl Into<String>) -> Self {
        Self {
            store,
            label: label.into(),
        }
    }

    fn key_id(&self) -> String {
        format!("token:{}", self.label)
    }
}

#[async_trait]
impl KeyWrap for TokenArchiveKey {
    async fn wrap(&self, dek: &[u8; 32]) -> Result<WrappedKey, ArchiveError> {
        let sealed = self
            .store
            .archive_key_encrypt(&self.label, dek.to_vec())
            .await
            .map_err(ArchiveError::Token)?;
        Ok(WrappedKey {
            key_id: self.key_id(),
            wrapped: hex::encode(sealed),
        })
    }
}

#[async_trait]
impl KeyUnwrap for TokenArchiveKey {
    fn accepts(&self, wrapped: &WrappedKey) -> bool {
        wrapped.key_id == self.key_id()
    }

    fn describe(&self) -> String {
        format!(
            "{} on token {}",
            self.key_id(),
            crate::hsm::SecretStore::token_label(self.store.as_ref())
        )
    }

    async fn unwrap(&self, wrapped: &WrappedKey) -> Result<Zeroizing<[u8; 32]>, ArchiveError> {
        let bytes = hex::decode(&wrapped.wrapped)
            .map_err(|_| ArchiveError::Crypto("the wrapped key is not hex".into()))?;
        let plain = self
            .store
            .archive_key_decrypt(&self.label, bytes)
            .await
            .map_err(|e| match e {
                crate::hsm::StoreError::Pkcs11 { .. } => {
                    ArchiveError::Crypto("the token's archive key does not open it".into())
                }
                other => ArchiveError::Token(other),
            })?;
        let mut out = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return Err(ArchiveError::Crypto(
                "the unwrapped key has the wrong length".into(),
            ));
        }
        out.copy_from_slice(&plain);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn the_recovery_key_unwraps_what_its_public_half_wrapped() {
        let secret = RecoverySecretKey::generate().unwrap();
        let public = RecoveryPublicKey::parse(&secret.public().to_text()).unwrap();
        let dek = [7u8; 32];
        let wrapped = public.wrap(&dek).await.unwrap();
        assert!(secret.accepts(&wrapped));
        assert_eq!(*secret.unwrap(&wrapped).await.unwrap(), dek);
        // Two wraps of one key differ (fresh ephemeral key each time).
        assert_ne!(public.wrap(&dek).await.unwrap().wrapped, wrapped.wrapped);
        let mut bad = wrapped.clone();
        bad.wrapped.replace_range(70..72, "00");
        assert!(secret.unwrap(&bad).await.is_err());
    }

    #[test]
    fn keys_round_trip_through_files_and_the_private_one_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recovery.key");
        let secret = RecoverySecretKey::generate().unwrap();
        secret.write_new(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(secret.write_new(&path).is_err(), "never overwritten");
        let read = RecoverySecretKey::read(&path).unwrap();
        assert_eq!(read.public(), secret.public());
        let public = RecoveryPublicKey::read(&path.with_extension("pub")).unwrap();
        assert_eq!(public, secret.public());
        assert!(RecoveryPublicKey::parse("zz").is_err());
        // One half is never taken for the other, and the private file cannot be a .pub.
        let error = RecoveryPublicKey::read(&path).unwrap_err().to_string();
        assert!(error.contains("PRIVATE"), "{error}");
        assert!(RecoverySecretKey::read(&path.with_extension("pub")).is_err());
        let error = secret.write_new(&dir.path().join("other.pub")).unwrap_err();
        assert!(error.to_string().contains("ends in .pub"), "{error}");
    }
}
