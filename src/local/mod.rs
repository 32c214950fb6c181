//! Everything on one machine, no cluster (DESIGN §11): SoftHSM tokens for three
//! simulated nodes, their agents, a CSI node plugin per node, the webhook on loopback and
//! the controller over the file-backed state, each a real child process of this binary.
//!
//! - [`cluster`]: starts, owns and stops the processes, tokens, PKI and directories;
//! - [`steps`]: the demo walk-through, each step a checked outcome;
//! - [`report`]: how steps are printed;
//! - [`clients`]: what the walk-through speaks: agent gRPC, AdmissionReview over HTTPS,
//!   CSI over the plugin's Unix socket.

pub mod clients;
pub mod cluster;
pub mod history;
pub mod network;
pub mod processes;
pub mod report;
pub mod site_steps;
pub mod sites;
pub mod steps;
pub mod system;
pub mod tokens;

pub use cluster::{ClusterConfig, LocalCluster, NodeEndpoints, StateFile, Timing};
pub use report::Report;

use std::path::PathBuf;

use crate::admission::certificates::CertificateError;
use crate::mirror::MirrorError;
use crate::mirror::rpc::tls::TlsError;
use crate::state::StateError;

/// Errors of the local mode. Messages name what failed and what to do; never a PIN or
/// a secret byte.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("SoftHSM2: {detail}")]
    SoftHsm { detail: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {process}: {detail}")]
    Spawn { process: String, detail: String },
    #[error("{process} exited ({status}); its log: {log}")]
    Exited {
        process: String,
        status: String,
        log: PathBuf,
    },
    #[error("timed out after {seconds}s waiting for {what}{hint}")]
    Timeout {
        what: String,
        seconds: u64,
        /// Where to look next (a log file), with its leading separator.
        hint: String,
    },
    #[error("state: {0}")]
    State(#[from] StateError),
    #[error("agent: {0}")]
    Mirror(#[from] MirrorError),
    #[error("agent PKI: {0}")]
    Tls(#[from] TlsError),
    #[error("webhook certificate: {0}")]
    Certificate(#[from] CertificateError),
    #[error("webhook: {0}")]
    Webhook(String),
    #[error("CSI: {0}")]
    Csi(String),
    #[error("{0}")]
    Check(String),
    #[error(
        "no local system in {dir}: {detail}; start one with `hsm-secrets local up --dir {dir}`"
    )]
    NotRunning { dir: PathBuf, detail: String },
    #[error("interrupted")]
    Interrupted,
}

impl LocalError {
    /// A bounded label for the error's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            LocalError::SoftHsm { .. } => "softhsm",
            LocalError::Io { .. } => "io",
            LocalError::Spawn { .. } => "spawn",
            LocalError::Exited { .. } => "exited",
            LocalError::Timeout { .. } => "timeout",
            LocalError::State(_) => "state",
            LocalError::Mirror(_) => "agent",
            LocalError::Tls(_) => "tls",
            LocalError::Certificate(_) => "certificate",
            LocalError::Webhook(_) => "webhook",
            LocalError::Csi(_) => "csi",
            LocalError::Check(_) => "check",
            LocalError::NotRunning { .. } => "not_running",
            LocalError::Interrupted => "interrupted",
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LocalError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
