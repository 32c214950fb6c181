//! Never offer a token a PIN it has already refused.
//!
//! Every `C_Login` with a wrong PIN spends one of the token's few attempts (three on a
//! SmartCard-HSM or a Nitrokey), and a module that does not report its counter flags locks
//! without warning. So once a token answers `CKR_PIN_INCORRECT`, that PIN is recorded and
//! not tried again until the PIN file holds another one, by this process or any later one:
//! a DaemonSet restarts a crashed container, and each start would otherwise try again.
//!
//! The record is a salted HMAC-SHA256 of the refused PIN (never the PIN), one file per
//! token label in a directory on the node. It only ever describes a PIN known to be wrong.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// A refusal kept in memory: (token, salt, digest).
type Remembered = Option<(String, [u8; 16], Vec<u8>)>;

/// Where refused PINs are remembered: a directory (kept across restarts), or only this
/// process's memory when none is configured.
#[derive(Debug, Default)]
pub struct PinRefusals {
    dir: Option<PathBuf>,
    /// (token, salt, digest) of the last refusal, for a process without a directory.
    memory: Mutex<Remembered>,
    /// A login succeeded and any old record is gone.
    cleared: std::sync::atomic::AtomicBool,
}

impl PinRefusals {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            memory: Mutex::default(),
            cleared: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether `pin` is the PIN `token` last refused.
    pub fn refused(&self, token: &str, pin: &[u8]) -> bool {
        if let Some((t, salt, digest)) = &*self.memory()
            && t == token
            && digest_of(salt, pin) == *digest
        {
            return true;
        }
        let Some(path) = self.path(token) else {
            return false;
        };
        match read_record(&path) {
            Some((salt, digest)) => digest_of(&salt, pin) == digest,
            None => false,
        }
    }

    /// Remembers that `token` refused `pin`.
    pub fn record(&self, token: &str, pin: &[u8]) {
        let salt = fresh_salt();
        let digest = digest_of(&salt, pin);
        *self.memory() = Some((token.to_string(), salt, digest.clone()));
        self.cleared
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let Some(path) = self.path(token) else {
            return;
        };
        if let Err(error) = write_record(&path, &salt, &digest) {
            tracing::error!(%error, path = %path.display(), "cannot keep the PIN refusal on disk; a restart would try the refused PIN once more");
        }
    }

    /// As [`clear`](Self::clear), doing the work only on the first accepted login of
    /// this process (logins happen once per pooled session).
    pub fn clear_once(&self, token: &str) {
        if !self
            .cleared
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            self.clear(token);
        }
    }

    /// Forgets a refusal once `token` accepted a PIN.
    pub fn clear(&self, token: &str) {
        let mut memory = self.memory();
        if memory.as_ref().is_some_and(|(t, _, _)| t == token) {
            *memory = None;
        }
        if let Some(path) = self.path(token) {
            let _ = std::fs::remove_file(path);
        }
    }

    fn path(&self, token: &str) -> Option<PathBuf> {
        let name = hex::encode(&Sha256::digest(token.as_bytes())[..8]);
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{name}.refused-pin")))
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn digest_of(salt: &[u8], pin: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(salt).expect("any key length");
    mac.update(pin);
    mac.finalize().into_bytes().to_vec()
}

fn fresh_salt() -> [u8; 16] {
    let mut salt = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut salt))
        .is_err()
    {
        // Without randomness the record is still correct, only unsalted.
        tracing::warn!("cannot read /dev/urandom; the PIN refusal record is unsalted");
    }
    salt
}

/// `<salt hex> <digest hex>`.
fn read_record(path: &Path) -> Option<([u8; 16], Vec<u8>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (salt, digest) = text.trim().split_once(' ')?;
    let salt: [u8; 16] = hex::decode(salt).ok()?.try_into().ok()?;
    Some((salt, hex::decode(digest).ok()?))
}

fn write_record(path: &Path, salt: &[u8], digest: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    writeln!(file, "{} {}", hex::encode(salt), hex::encode(digest))?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_pin_stays_refused_across_instances_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let first = PinRefusals::new(Some(dir.path().into()));
        assert!(!first.refused("prod", b"1234"));
        first.record("prod", b"1234");
        assert!(first.refused("prod", b"1234"));
        // A restarted process reads the record.
        let second = PinRefusals::new(Some(dir.path().into()));
        assert!(second.refused("prod", b"1234"));
        assert!(!second.refused("prod", b"5678"), "a new PIN is tried");
        assert!(!second.refused("other", b"1234"), "per token");
        // The PIN itself is nowhere on disk.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            assert!(!text.contains("1234"));
        }
        second.clear("prod");
        assert!(!PinRefusals::new(Some(dir.path().into())).refused("prod", b"1234"));
    }

    #[test]
    fn without_a_directory_the_process_remembers() {
        let r = PinRefusals::new(None);
        r.record("prod", b"1234");
        assert!(r.refused("prod", b"1234"));
        assert!(!r.refused("prod", b"12345"));
    }
}
