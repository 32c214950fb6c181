//! Mutual TLS between agents (DESIGN §10): every agent serves with its node certificate and
//! requires a client certificate signed by the agent CA (tonic verifies it with rustls'
//! `WebPkiClientVerifier`); every client presents its own certificate and checks that the
//! server's certificate names the node it meant to reach.
//!
//! [`generate_pki`] makes a throwaway CA and per-node certificates with rcgen, for tests,
//! the demo and the local mode.

use std::path::{Path, PathBuf};

use k8s_openapi::jiff::Timestamp;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::private_ca::{CaError, Leaf, PrivateCa, Usage, Validity};

/// How long the agent CA and the certificates it issues are valid. Agents have no
/// automatic rotation (a rotation replaces the Secrets `hsm-secrets pki` wrote), so this
/// bounds a stolen key's use without making rotations frequent.
pub const AGENT_CERT_VALIDITY_DAYS: i64 = 3650;

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
    Generate(#[from] CaError),
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

/// The name that [`generate_pki`] issues the controller's certificate for (URI SAN
/// [`CONTROLLER_URI`](super::identity::CONTROLLER_URI)); every other name gets an agent
/// certificate ([`AGENT_URI`](super::identity::AGENT_URI)).
pub const CONTROLLER_CERT_NAME: &str = "controller";

/// A CA that issues agent and controller certificates.
pub struct CertificateAuthority {
    ca: PrivateCa,
    validity: Validity,
}

/// A certificate and its private key, PEM; the key is wiped on drop.
pub type IssuedCertificate = crate::private_ca::Issued;

impl CertificateAuthority {
    /// A fresh CA (its key lives only in memory).
    pub fn generate() -> Result<Self, TlsError> {
        let validity = Validity::days_from(Timestamp::now(), AGENT_CERT_VALIDITY_DAYS)?;
        Ok(Self {
            ca: PrivateCa::generate("hsm-secrets agent CA", validity)?,
            validity,
        })
    }

    pub fn cert_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// One node's own agent certificate: valid for that node's name (plus `localhost` and
    /// 127.0.0.1), for server and client use, and naming the node in its identity URI
    /// ([`AGENT_NODE_URI_PREFIX`](super::identity::AGENT_NODE_URI_PREFIX)), so a push it
    /// sends is known to come from that node.
    pub fn issue_node_agent(&self, node: &str) -> Result<IssuedCertificate, TlsError> {
        let uri = format!("{}{node}", super::identity::AGENT_NODE_URI_PREFIX);
        self.issue(node, &[node], &uri)
    }

    /// An agent certificate shared by every name in `nodes`: it proves membership, not
    /// which node (pushes are accepted from it only with `--allow-shared-agent-identity`).
    pub fn issue_shared_agent(&self, nodes: &[&str]) -> Result<IssuedCertificate, TlsError> {
        self.issue("hsm-secrets-agent", nodes, super::identity::AGENT_URI)
    }

    /// The controller's (client) certificate.
    pub fn issue_controller(&self) -> Result<IssuedCertificate, TlsError> {
        self.issue(
            "hsm-secrets-controller",
            &[CONTROLLER_CERT_NAME],
            super::identity::CONTROLLER_URI,
        )
    }

    fn issue(
        &self,
        common_name: &str,
        names: &[&str],
        uri: &str,
    ) -> Result<IssuedCertificate, TlsError> {
        let mut all: Vec<String> = names.iter().map(|n| (*n).to_string()).collect();
        all.extend(["localhost".to_string(), "127.0.0.1".to_string()]);
        Ok(self.ca.issue(&Leaf {
            common_name,
            names: all,
            uris: vec![uri.to_string()],
            usage: Usage::ServerAndClient,
            validity: self.validity,
        })?)
    }
}

/// Generates a throwaway CA and one certificate per name in `nodes` (valid for server and
/// client use, naming the node, `localhost` and 127.0.0.1), written as PEM files into
/// `dir`: `ca.pem`, `<node>.pem`, `<node>-key.pem` (keys mode 0600). The name
/// [`CONTROLLER_CERT_NAME`] gets the controller's identity, every other name an agent's.
/// For tests, the demo and the local mode; a cluster uses `hsm-secrets pki` or its own CA.
pub fn generate_pki(dir: &Path, nodes: &[&str]) -> Result<GeneratedPki, TlsError> {
    let ca = CertificateAuthority::generate()?;
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Write {
        path: dir.display().to_string(),
        detail: e.to_string(),
    })?;
    let ca_path = dir.join("ca.pem");
    write_pem(&ca_path, ca.cert_pem().as_bytes(), false)?;

    let mut out = Vec::new();
    for node in nodes {
        let issued = if *node == CONTROLLER_CERT_NAME {
            ca.issue_controller()?
        } else {
            ca.issue_node_agent(node)?
        };
        let cert_path = dir.join(format!("{node}.pem"));
        let key_path = dir.join(format!("{node}-key.pem"));
        write_pem(&cert_path, issued.cert_pem.as_bytes(), false)?;
        write_pem(&key_path, issued.key_pem.as_bytes(), true)?;
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

/// Writes a PEM file; `private` ones (keys) are created with mode 0600.
pub fn write_pem(path: &Path, bytes: &[u8], private: bool) -> Result<(), TlsError> {
    write(path, bytes, private)
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
    if private {
        // An existing file keeps its mode on open: tighten it.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(err)?;
    }
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
