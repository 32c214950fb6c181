//! Mutual TLS between agents (DESIGN §10): every agent serves with its node certificate and
//! requires a client certificate signed by the agent CA (tonic verifies it with rustls'
//! `WebPkiClientVerifier`); every client presents its own certificate and checks that the
//! server's certificate names the node it meant to reach.
//!
//! [`generate_pki`] makes a throwaway CA and per-node certificates with rcgen, for tests,
//! the demo and the local mode.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// TLS setup errors; each names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} file {path}: {detail}")]
    Read {
        path: String,
        what: &'static str,
        detail: String,
    },
    #[error(
        "the TLS {what} file {path} holds no PEM {what}; expected a `-----BEGIN ...-----` block"
    )]
    NoCertificate { path: String, what: &'static str },
    #[error("the TLS {what} file {path} is not valid PEM: {detail}")]
    Invalid {
        path: String,
        what: &'static str,
        detail: String,
    },
    #[error("cannot generate certificates: {0}")]
    Generate(String),
    #[error("cannot write {path}: {detail}")]
    Write { path: String, detail: String },
}

impl TlsError {
    pub fn kind(&self) -> &'static str {
        match self {
            TlsError::Read { .. } => "tls_read",
            TlsError::NoCertificate { .. } => "tls_empty",
            TlsError::Invalid { .. } => "tls_invalid",
            TlsError::Generate(_) => "tls_generate",
            TlsError::Write { .. } => "tls_write",
        }
    }
}

/// Where an agent's PEM files are (a mounted Secret in a cluster).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The agent CA: signs every agent's (and the controller's) certificate.
    pub ca: PathBuf,
    /// This node's certificate (server and client use).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// An agent's TLS material: serves with it and presents it when calling other agents.
#[derive(Clone)]
pub struct AgentTls {
    ca: Certificate,
    identity: Identity,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTls").finish_non_exhaustive()
    }
}

impl AgentTls {
    /// Reads and checks the three PEM files, so a bad file stops the agent at start-up
    /// with its name instead of failing every handshake later.
    pub fn from_files(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca = read(&files.ca, "CA certificate")?;
        let cert = read(&files.cert, "certificate")?;
        let key = read(&files.key, "private key")?;
        check_certs(&ca, &files.ca, "CA certificate")?;
        check_certs(&cert, &files.cert, "certificate")?;
        check_key(&key, &files.key)?;
        Ok(Self::from_pem(&ca, &cert, &key))
    }

    /// From PEM bytes already checked by the caller.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Self {
        Self {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
        }
    }

    /// Server side: our certificate, client certificates required and verified against
    /// the CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .client_auth_optional(false)
    }

    /// Client side: trust only the agent CA, present our certificate, and expect the
    /// server certificate to name `server_node`.
    pub fn client_config(&self, server_node: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(server_node)
    }

    /// A client that presents no certificate (only for tests that prove it is refused).
    pub fn anonymous_client_config(&self, server_node: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(server_node)
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.display().to_string(),
        what,
        detail: e.to_string(),
    })
}

fn check_certs(pem: &[u8], path: &Path, what: &'static str) -> Result<(), TlsError> {
    let certs: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.display().to_string(),
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
            what,
        });
    }
    Ok(())
}

fn check_key(pem: &[u8], path: &Path) -> Result<(), TlsError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map(|_| ())
        .map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoCertificate {
                path: path.display().to_string(),
                what: "private key",
            },
            other => TlsError::Invalid {
                path: path.display().to_string(),
                what: "private key",
                detail: other.to_string(),
            },
        })
}

/// Files written by [`generate_pki`].
#[derive(Clone, Debug)]
pub struct GeneratedPki {
    pub ca_cert: PathBuf,
    /// Per node (in the order given): its files, sharing `ca_cert`.
    pub nodes: Vec<(String, TlsFiles)>,
}

impl GeneratedPki {
    pub fn files(&self, node: &str) -> Option<&TlsFiles> {
        self.nodes.iter().find(|(n, _)| n == node).map(|(_, f)| f)
    }
}

/// Generates a throwaway CA and one certificate per name in `nodes` (valid for server and
/// client use, naming the node, `localhost` and 127.0.0.1), written as PEM files into
/// `dir`: `ca.pem`, `<node>.pem`, `<node>-key.pem` (keys mode 0600). For tests, the demo
/// and the local mode; a cluster uses certificates from its own CA (e.g. cert-manager).
pub fn generate_pki(dir: &Path, nodes: &[&str]) -> Result<GeneratedPki, TlsError> {
    let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    let ca_key = KeyPair::generate().map_err(gen_err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "hsm-secrets agent CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen_err)?;
    let issuer = Issuer::new(ca_params, ca_key);

    std::fs::create_dir_all(dir).map_err(|e| TlsError::Write {
        path: dir.display().to_string(),
        detail: e.to_string(),
    })?;
    let ca_path = dir.join("ca.pem");
    write(&ca_path, ca_cert.pem().as_bytes(), false)?;

    let mut out = Vec::new();
    for node in nodes {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::new(vec![
            (*node).to_string(),
            "localhost".into(),
            "127.0.0.1".into(),
        ])
        .map_err(gen_err)?;
        params.distinguished_name.push(DnType::CommonName, *node);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        let cert_path = dir.join(format!("{node}.pem"));
        let key_path = dir.join(format!("{node}-key.pem"));
        write(&cert_path, cert.pem().as_bytes(), false)?;
        write(&key_path, key.serialize_pem().as_bytes(), true)?;
        out.push((
            (*node).to_string(),
            TlsFiles {
                ca: ca_path.clone(),
                cert: cert_path,
                key: key_path,
            },
        ));
    }
    Ok(GeneratedPki {
        ca_cert: ca_path,
        nodes: out,
    })
}

fn write(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| TlsError::Write {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    file.write_all(bytes).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_load_and_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("dir");
        let pki = generate_pki(dir.path(), &["n1", "n2"]).expect("pki");
        let files = pki.files("n2").expect("n2");
        AgentTls::from_files(files).expect("load");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let err = AgentTls::from_files(&TlsFiles {
            cert: empty.clone(),
            ..files.clone()
        })
        .expect_err("empty cert");
        assert!(
            err.to_string().contains("empty.pem") && err.to_string().contains("BEGIN"),
            "{err}"
        );
        let err = AgentTls::from_files(&TlsFiles {
            key: dir.path().join("missing-key.pem"),
            ..files.clone()
        })
        .expect_err("missing key");
        assert!(err.to_string().contains("missing-key.pem"), "{err}");
        // A certificate where the key should be is refused too.
        let err = AgentTls::from_files(&TlsFiles {
            key: files.cert.clone(),
            ..files.clone()
        })
        .expect_err("cert as key");
        assert!(err.to_string().contains("private key"), "{err}");
    }
}
