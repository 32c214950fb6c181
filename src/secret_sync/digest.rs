//! The keyed status digest: HMAC-SHA256 over the canonical encoding of a secret, under a
//! cluster key. A bare hash of low-entropy values could be brute-forced from status; a
//! keyed one cannot without the key, which stays in a Secret only the controller reads.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::hsm::{SecretData, SecretPath};

/// Secret (in the controller namespace) holding the digest key.
pub const DIGEST_KEY_SECRET: &str = "hsm-secrets-digest-key";
/// Its data key.
pub const DIGEST_KEY_FIELD: &str = "key";
/// Length of a generated key.
pub const DIGEST_KEY_LEN: usize = 32;

#[derive(Clone)]
pub struct DigestKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DigestKey(<redacted>)")
    }
}

impl DigestKey {
    /// A key from stored bytes (at least 16 of them).
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() >= 16).then(|| Self(Zeroizing::new(bytes)))
    }

    /// A fresh random key from the kernel's generator.
    pub fn generate() -> std::io::Result<Self> {
        use std::io::Read;
        let mut bytes = Zeroizing::new(vec![0u8; DIGEST_KEY_LEN]);
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Self(bytes))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// `hmac-sha256:<hex>` over path, then each key and value, length-prefixed.
    pub fn digest(&self, path: &SecretPath, data: &SecretData) -> String {
        #[allow(clippy::expect_used)] // HMAC takes keys of any length
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("any key length");
        let mut lp = |bytes: &[u8]| {
            mac.update(&(bytes.len() as u64).to_be_bytes());
            mac.update(bytes);
        };
        lp(b"hsm-secrets/digest/v1");
        lp(path.to_string().as_bytes());
        for (k, v) in data.iter() {
            lp(k.as_bytes());
            lp(v);
        }
        format!("hmac-sha256:{}", hex::encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn digest_depends_on_the_key_path_and_content_and_is_not_a_bare_hash() {
        let path: SecretPath = "shop/db".parse().unwrap();
        let mut data = SecretData::new();
        data.insert("password", b"hunter2".to_vec()).unwrap();
        let a = DigestKey::from_bytes(vec![1; 32]).unwrap();
        let b = DigestKey::from_bytes(vec![2; 32]).unwrap();
        assert_ne!(a.digest(&path, &data), b.digest(&path, &data));
        assert_eq!(a.digest(&path, &data), a.digest(&path, &data));
        let other: SecretPath = "shop/db2".parse().unwrap();
        assert_ne!(a.digest(&path, &data), a.digest(&other, &data));
        let bare = crate::hsm::Checksum::of_data(&path, &data).to_hex();
        assert!(!a.digest(&path, &data).contains(&bare));
        assert!(DigestKey::from_bytes(vec![0; 8]).is_none());
        assert_eq!(format!("{a:?}"), "DigestKey(<redacted>)");
    }
}
