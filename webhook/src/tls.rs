//! Serving certificate loaded from PEM files and hot-reloaded by polling.
//!
//! Kubernetes updates a mounted Secret by swapping a `..data` symlink, which
//! inotify watches on the files themselves miss; polling the content (a few
//! hundred bytes every few seconds) catches every layout, including plain
//! rename-into-place.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::metrics::{Metrics, ReloadResult};

/// Default time between two reads of the certificate files.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// The process's crypto provider, chosen explicitly rather than from
/// whatever a dependency installed as the process default.
fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// What one poll of the files found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// Same bytes as the last pair read (served, or already rejected).
    Unchanged,
    /// A new valid pair is now served to new connections.
    Reloaded,
}

/// A certificate/key pair read from files, served through a rustls resolver
/// and replaced when the files change. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct TlsReloader {
    inner: Arc<Inner>,
    poll_interval: Duration,
}

struct Inner {
    cert_path: PathBuf,
    key_path: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertifiedKey>,
    /// Digest of the last pair read, good or bad: a bad pair is reported once,
    /// not on every poll.
    last_seen: Mutex<[u8; 32]>,
    metrics: OnceLock<Metrics>,
}

impl fmt::Debug for TlsReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReloader")
            .field("cert_path", &self.inner.cert_path)
            .field("key_path", &self.inner.key_path)
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl TlsReloader {
    /// Load the pair now; fails (naming the file) when it is missing or bad,
    /// so a misconfigured webhook stops at start-up instead of serving nothing.
    pub fn load(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
    ) -> Result<Self, Error> {
        let cert_path = cert_path.into();
        let key_path = key_path.into();
        let provider = crypto_provider();
        let (cert_pem, key_pem) = read_pair(&cert_path, &key_path)?;
        let certified = parse_pair(&cert_path, &cert_pem, &key_path, &key_pem, &provider)?;
        tracing::info!(
            cert = %cert_path.display(),
            fingerprint = %leaf_fingerprint(&certified),
            "serving certificate loaded"
        );
        Ok(TlsReloader {
            inner: Arc::new(Inner {
                last_seen: Mutex::new(content_digest(&cert_pem, &key_pem)),
                cert_path,
                key_path,
                provider,
                current: ArcSwap::from_pointee(certified),
                metrics: OnceLock::new(),
            }),
            poll_interval: DEFAULT_POLL_INTERVAL,
        })
    }

    /// How often [`TlsReloader::watch`] re-reads the files (at least 10 ms).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(10));
        self
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// Count reload outcomes in `metrics` (first call wins).
    pub fn set_metrics(&self, metrics: Metrics) {
        let _ = self.inner.metrics.set(metrics);
    }

    /// The pair new handshakes get.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.inner.current.load_full()
    }

    /// A rustls resolver that always hands out the current pair.
    pub fn resolver(&self) -> Arc<dyn ResolvesServerCert> {
        Arc::new(CurrentCertificate(self.inner.clone()))
    }

    /// Server configuration: TLS 1.2 and 1.3 only, ALPN `h2` then `http/1.1`,
    /// certificate from [`TlsReloader::resolver`], no session resumption.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, Error> {
        let mut config = ServerConfig::builder_with_provider(self.inner.provider.clone())
            .with_protocol_versions(PROTOCOL_VERSIONS)
            .map_err(Error::TlsConfig)?
            .with_no_client_auth()
            .with_cert_resolver(self.resolver());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // No session resumption: a resumed session skips the certificate, so
        // after a rotation clients could go on trusting the old one. The API
        // server keeps its connections alive, so full handshakes are rare.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// Read the files once and swap in the pair if it changed and is valid.
    /// On error the previous pair stays in service.
    pub async fn reload(&self) -> Result<Reload, Error> {
        let inner = &self.inner;
        let (cert_pem, key_pem) = (
            read_async("certificate", &inner.cert_path).await?,
            read_async("private key", &inner.key_path).await?,
        );
        let digest = content_digest(&cert_pem, &key_pem);
        {
            let mut last_seen = inner
                .last_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if *last_seen == digest {
                return Ok(Reload::Unchanged);
            }
            *last_seen = digest;
        }
        let parsed = parse_pair(
            &inner.cert_path,
            &cert_pem,
            &inner.key_path,
            &key_pem,
            &inner.provider,
        );
        let result = match &parsed {
            Ok(_) => ReloadResult::Reloaded,
            Err(_) => ReloadResult::Rejected,
        };
        if let Some(metrics) = inner.metrics.get() {
            metrics.observe_reload(result);
        }
        let certified = parsed?;
        tracing::info!(
            cert = %inner.cert_path.display(),
            fingerprint = %leaf_fingerprint(&certified),
            "serving certificate reloaded"
        );
        inner.current.store(Arc::new(certified));
        Ok(Reload::Reloaded)
    }

    /// Poll the files every [`TlsReloader::poll_interval`] until dropped.
    pub async fn watch(&self) {
        let mut ticker = tokio::time::interval(self.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate and `load` just read the files
        let mut last_error: Option<String> = None;
        loop {
            ticker.tick().await;
            match self.reload().await {
                Ok(_) => last_error = None,
                Err(error) => {
                    // A missing file (mid-rotation, or gone) fails every poll; say it once.
                    let text = error.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::warn!(
                            error = %text,
                            kind = error.kind(),
                            "new serving certificate not taken; still serving the previous one"
                        );
                        last_error = Some(text);
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
struct CurrentCertificate(Arc<Inner>);

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load_full())
    }
}

fn read_pair(cert_path: &Path, key_path: &Path) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| Error::ReadPem {
            what,
            path: path.to_owned(),
            source,
        })
    };
    Ok((
        read("certificate", cert_path)?,
        read("private key", key_path)?,
    ))
}

async fn read_async(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    tokio::fs::read(path)
        .await
        .map_err(|source| Error::ReadPem {
            what,
            path: path.to_owned(),
            source,
        })
}

fn parse_pair(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, Error> {
    let chain = parse_certificates(cert_pem).map_err(|detail| Error::NoCertificate {
        path: cert_path.to_owned(),
        detail,
    })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| Error::NoPrivateKey {
        path: key_path.to_owned(),
        detail: error.to_string(),
    })?;
    // `from_der` also checks that the key belongs to the leaf certificate.
    CertifiedKey::from_der(chain, key, provider).map_err(|source| Error::KeyPair {
        cert_path: cert_path.to_owned(),
        key_path: key_path.to_owned(),
        source,
    })
}

fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| error.to_string())?;
    if chain.is_empty() {
        return Err("no CERTIFICATE block".to_owned());
    }
    Ok(chain)
}

/// Length-prefixed so moving bytes between the two files changes the digest.
fn content_digest(cert_pem: &[u8], key_pem: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in [cert_pem, key_pem] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// SHA-256 of the leaf certificate, for logs (public data, unlike the key).
fn leaf_fingerprint(certified: &CertifiedKey) -> String {
    let Some(leaf) = certified.cert.first() else {
        return String::new();
    };
    Sha256::digest(leaf.as_ref())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A client configuration trusting only the CA certificates in `ca_pem`
/// (ring provider, TLS 1.2/1.3, no ALPN: set `alpn_protocols` to
/// `[b"h2"]` for HTTP/2, otherwise the server speaks HTTP/1.1).
pub fn client_config(ca_pem: &[u8]) -> Result<ClientConfig, Error> {
    let mut roots = RootCertStore::empty();
    for ca in parse_certificates(ca_pem).map_err(|detail| Error::NoCaCertificate { detail })? {
        roots.add(ca).map_err(Error::CaCertificate)?;
    }
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(Error::TlsConfig)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_separates_the_two_files() {
        assert_ne!(content_digest(b"ab", b"c"), content_digest(b"a", b"bc"));
    }

    #[test]
    fn client_config_needs_a_certificate() {
        let error = client_config(b"not pem").expect_err("no CA in input");
        assert_eq!(error.kind(), "no_ca_certificate");
    }
}
