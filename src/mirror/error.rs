//! Errors of the agent protocol and the sync engine, mapped to gRPC codes in one place.

use tonic::{Code, Status};

use crate::hsm::StoreError;

use super::rpc::tls::TlsError;

/// What can go wrong serving or calling an agent. Messages name the node, the epoch and
/// what to do; they never carry secret bytes or PINs.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("node {node} is {role} at epoch {epoch}, not the primary; {redirect}")]
    NotPrimary {
        node: String,
        role: &'static str,
        epoch: u64,
        /// "writes go to the primary X at Y" or why no primary is known.
        redirect: String,
    },

    #[error(
        "node {node} is a standby (catching up, not serving reads); {redirect}, or a read-only mirror"
    )]
    NotServing { node: String, redirect: String },

    #[error(
        "stale epoch {requested} for {operation}: node {node} is at epoch {current}; re-read the device epoch (HSMDevice status.epoch) and retry"
    )]
    StaleEpoch {
        node: String,
        operation: &'static str,
        current: u64,
        requested: u64,
    },

    #[error(
        "epoch {requested} for {operation} is newer than node {node}'s epoch {current}: the controller has not assigned this node a role at that epoch (it may have been demoted); send AssignRole first"
    )]
    UnknownEpoch {
        node: String,
        operation: &'static str,
        current: u64,
        requested: u64,
    },

    #[error(
        "fenced: write lease expired at {expired_at} ({ago_ms} ms ago) on primary {node}; the controller has not renewed it"
    )]
    LeaseExpired {
        node: String,
        expired_at: String,
        ago_ms: u128,
    },

    #[error(
        "fenced: primary {node} stopped writes at epoch {epoch} for a planned switchover; writes resume on the new primary"
    )]
    Fenced { node: String, epoch: u64 },

    /// The device's site refuses writes (passive, fenced, or its site lease lapsed).
    #[error("{0}")]
    Site(#[from] super::site::SiteRefusal),

    #[error(
        "fenced: the write lease of primary {node} expired while the write of {path} (version {version}) was in progress; do not rely on it: it is discarded and reported as a lost write if another node was promoted"
    )]
    LeaseExpiredDuringWrite {
        node: String,
        path: String,
        version: u64,
    },

    #[error(
        "node {node} is the primary at epoch {epoch} and takes no pushes; the sender {from} is not the primary at this epoch"
    )]
    NotMirror {
        node: String,
        epoch: u64,
        from: String,
    },

    #[error(
        "node {node} follows primary {primary} at epoch {epoch}, but the push came from {from}; only the assigned primary pushes to a mirror"
    )]
    WrongPrimary {
        node: String,
        epoch: u64,
        primary: String,
        from: String,
    },

    #[error(
        "node {node} refused a pushed record at version {version} from {from}: it has applied up to {applied} and accepts a push only within {window} changes after that (a sequence that jumps is never applied; the change arrives by pull if it is real)"
    )]
    OutOfSequence {
        node: String,
        from: String,
        version: u64,
        applied: u64,
        window: u64,
    },

    #[error("invalid {field}: {why}")]
    InvalidArgument { field: &'static str, why: String },

    #[error(transparent)]
    Store(#[from] StoreError),

    #[error(
        "record {path} at version {version} from {node} fails checksum verification; it was not applied and will be fetched again"
    )]
    ChecksumMismatch {
        node: String,
        path: String,
        version: u64,
    },

    #[error("agent {node} at {endpoint} is unreachable: {detail}")]
    Unreachable {
        node: String,
        endpoint: String,
        detail: String,
    },

    #[error("agent {node} answered {rpc} with {code:?}: {message}")]
    Remote {
        node: String,
        rpc: &'static str,
        code: Code,
        message: String,
    },

    #[error("{rpc} to agent {node} did not answer within {timeout_ms} ms")]
    Timeout {
        node: String,
        rpc: &'static str,
        timeout_ms: u128,
    },

    #[error("agent {node} sent an invalid {what}: {why}")]
    Protocol {
        node: String,
        what: &'static str,
        why: String,
    },

    #[error(transparent)]
    Tls(#[from] TlsError),

    #[error("cannot serve the agent on {addr}: {detail}")]
    Serve { addr: String, detail: String },

    #[error("the sync engine of node {node} is not running (no primary assigned)")]
    NotSyncing { node: String },

    #[error(
        "{rpc} is allowed only to the {required} identity; the caller presented {caller} (see `hsm-secrets pki`: the controller's and the agents' certificates carry their identity as a URI SAN)"
    )]
    PermissionDenied {
        rpc: &'static str,
        required: &'static str,
        caller: String,
    },

    #[error("agent discovery: {detail}")]
    Discovery { detail: String },

    #[error(
        "write lease grant refused by node {node}: {why}; the controller probes the agent again and grants a new lease"
    )]
    LeaseGrantRefused { node: String, why: &'static str },

    #[error(
        "write of {path} not acknowledged: primary {node} stored it at version {version}, but mirror(s) {mirrors} of the Active write set did not apply it; writes are acknowledged again once they catch up or the controller takes them out of the write set (within a probe interval); retry the write"
    )]
    NotReplicated {
        node: String,
        path: String,
        version: u64,
        mirrors: String,
    },
}

impl MirrorError {
    /// A bounded label for metrics and Events (never error text).
    pub fn kind(&self) -> &'static str {
        match self {
            MirrorError::NotPrimary { .. } => "not_primary",
            MirrorError::NotServing { .. } => "not_serving",
            MirrorError::StaleEpoch { .. } => "stale_epoch",
            MirrorError::UnknownEpoch { .. } => "unknown_epoch",
            MirrorError::LeaseExpired { .. } => "lease_expired",
            MirrorError::Fenced { .. } => "fenced",
            MirrorError::Site(r) => r.kind(),
            MirrorError::LeaseExpiredDuringWrite { .. } => "lease_expired_during_write",
            MirrorError::NotMirror { .. } => "not_mirror",
            MirrorError::WrongPrimary { .. } => "wrong_primary",
            MirrorError::OutOfSequence { .. } => "out_of_sequence",
            MirrorError::InvalidArgument { .. } => "invalid_argument",
            MirrorError::Store(e) => e.kind(),
            MirrorError::ChecksumMismatch { .. } => "checksum_mismatch",
            MirrorError::Unreachable { .. } => "unreachable",
            MirrorError::Remote { .. } => "remote",
            MirrorError::Timeout { .. } => "timeout",
            MirrorError::Protocol { .. } => "protocol",
            MirrorError::Tls(e) => e.kind(),
            MirrorError::Serve { .. } => "serve",
            MirrorError::NotSyncing { .. } => "not_syncing",
            MirrorError::PermissionDenied { .. } => "permission_denied",
            MirrorError::Discovery { .. } => "discovery",
            MirrorError::LeaseGrantRefused { .. } => "lease_grant_refused",
            MirrorError::NotReplicated { .. } => "not_replicated",
        }
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            MirrorError::NotPrimary { .. }
            | MirrorError::NotServing { .. }
            | MirrorError::StaleEpoch { .. }
            | MirrorError::UnknownEpoch { .. }
            | MirrorError::NotMirror { .. }
            | MirrorError::WrongPrimary { .. }
            | MirrorError::OutOfSequence { .. }
            | MirrorError::NotSyncing { .. } => Code::FailedPrecondition,
            MirrorError::LeaseExpired { .. }
            | MirrorError::LeaseExpiredDuringWrite { .. }
            | MirrorError::Fenced { .. } => Code::Unavailable,
            MirrorError::Site(_) => Code::FailedPrecondition,
            MirrorError::InvalidArgument { .. } => Code::InvalidArgument,
            MirrorError::Store(e) => store_code(e),
            MirrorError::ChecksumMismatch { .. } => Code::DataLoss,
            MirrorError::Unreachable { .. } | MirrorError::Timeout { .. } => Code::Unavailable,
            MirrorError::Remote { code, .. } => *code,
            MirrorError::Protocol { .. } => Code::Internal,
            MirrorError::Tls(_) | MirrorError::Serve { .. } => Code::Internal,
            MirrorError::PermissionDenied { .. } => Code::PermissionDenied,
            MirrorError::Discovery { .. } => Code::Unavailable,
            MirrorError::LeaseGrantRefused { .. } => Code::FailedPrecondition,
            MirrorError::NotReplicated { .. } => Code::Unavailable,
        }
    }

    /// Rebuilds a peer's error from the status of a call. A status that carries a source
    /// error was made on this side (connection refused, TLS handshake failed): the peer
    /// is unreachable. Anything else is the peer's own answer.
    pub(crate) fn from_status(node: &str, rpc: &'static str, status: Status) -> Self {
        if let Some(source) = std::error::Error::source(&status) {
            let mut detail = status.message().to_string();
            let mut cause = Some(source);
            while let Some(e) = cause {
                let text = e.to_string();
                if !detail.contains(&text) {
                    detail.push_str(": ");
                    detail.push_str(&text);
                }
                cause = e.source();
            }
            return MirrorError::Unreachable {
                node: node.into(),
                endpoint: String::new(),
                detail,
            };
        }
        MirrorError::Remote {
            node: node.into(),
            rpc,
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// Whether the peer could not be reached or did not answer in time (as opposed to
    /// answering with a refusal).
    pub fn is_unavailable(&self) -> bool {
        match self {
            MirrorError::Unreachable { .. } | MirrorError::Timeout { .. } => true,
            MirrorError::Remote { code, .. } => {
                matches!(
                    code,
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
                )
            }
            _ => false,
        }
    }
}

fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::NotFound { .. } => Code::NotFound,
        StoreError::VersionConflict { .. } => Code::Aborted,
        StoreError::Corrupt { .. } => Code::DataLoss,
        StoreError::InvalidName { .. } => Code::InvalidArgument,
        StoreError::DeviceUnavailable { .. }
        | StoreError::Timeout { .. }
        | StoreError::TokenNotFound { .. } => Code::Unavailable,
        #[cfg(feature = "fault-injection")]
        StoreError::Injected { .. } => Code::Unavailable,
        StoreError::PinIncorrect { .. }
        | StoreError::PinLocked { .. }
        | StoreError::PinFinalTry { .. }
        | StoreError::PinRefused { .. }
        | StoreError::PinFile { .. }
        | StoreError::Library { .. } => Code::FailedPrecondition,
        StoreError::Pkcs11 { .. } | StoreError::SequenceExhausted { .. } => Code::Internal,
    }
}

/// Longest message an agent answers with: errors quote request fields (a secret's
/// path), and a status larger than a client's header limit would be refused whole.
pub const STATUS_MESSAGE_MAX: usize = 1024;

impl From<MirrorError> for Status {
    fn from(e: MirrorError) -> Self {
        Status::new(
            e.code(),
            hsm_secrets_webhook::bounded::bounded(&e.to_string(), STATUS_MESSAGE_MAX),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<MirrorError> {
        vec![
            MirrorError::NotPrimary {
                node: "n2".into(),
                role: "a read-only mirror",
                epoch: 3,
                redirect: "writes go to the primary n1".into(),
            },
            MirrorError::NotServing {
                node: "n2".into(),
                redirect: "read from the primary n1".into(),
            },
            MirrorError::StaleEpoch {
                node: "n1".into(),
                operation: "Put",
                current: 4,
                requested: 3,
            },
            MirrorError::UnknownEpoch {
                node: "n1".into(),
                operation: "Put",
                current: 4,
                requested: 5,
            },
            MirrorError::LeaseExpired {
                node: "n1".into(),
                expired_at: "2025-01-01T00:00:00Z".into(),
                ago_ms: 5,
            },
            MirrorError::LeaseExpiredDuringWrite {
                node: "n1".into(),
                path: "a/b".into(),
                version: 3,
            },
            MirrorError::InvalidArgument {
                field: "path",
                why: "x".into(),
            },
            MirrorError::Store(StoreError::NotFound {
                token: "t".into(),
                path: "a/b".into(),
            }),
            MirrorError::ChecksumMismatch {
                node: "n1".into(),
                path: "a/b".into(),
                version: 2,
            },
            MirrorError::Unreachable {
                node: "n1".into(),
                endpoint: "https://x".into(),
                detail: "refused".into(),
            },
            MirrorError::Remote {
                node: "n1".into(),
                rpc: "Get",
                code: Code::NotFound,
                message: "gone".into(),
            },
            MirrorError::Timeout {
                node: "n1".into(),
                rpc: "Get",
                timeout_ms: 5,
            },
            MirrorError::Protocol {
                node: "n1".into(),
                what: "record",
                why: "bad".into(),
            },
            MirrorError::Tls(TlsError::NoCertificate {
                path: "/x".into(),
                what: "certificate",
            }),
            MirrorError::Serve {
                addr: "x".into(),
                detail: "y".into(),
            },
            MirrorError::NotSyncing { node: "n".into() },
            MirrorError::PermissionDenied {
                rpc: "AssignRole",
                required: "controller",
                caller: "agent n2".into(),
            },
            MirrorError::Discovery { detail: "x".into() },
            MirrorError::NotMirror {
                node: "n1".into(),
                epoch: 2,
                from: "n3".into(),
            },
            MirrorError::WrongPrimary {
                node: "n2".into(),
                epoch: 2,
                primary: "n1".into(),
                from: "n3".into(),
            },
            MirrorError::LeaseGrantRefused {
                node: "n1".into(),
                why: "it arrived after its deadline",
            },
            MirrorError::NotReplicated {
                node: "n1".into(),
                path: "shop/db".into(),
                version: 9,
                mirrors: "n3".into(),
            },
        ]
    }

    #[test]
    fn every_error_has_a_code_a_kind_and_a_message() {
        for e in all() {
            let kind = e.kind();
            assert!(
                !kind.is_empty() && kind.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{kind}"
            );
            let status = Status::from(e);
            assert!(!status.message().is_empty());
            assert_ne!(status.code(), Code::Ok);
        }
    }

    #[test]
    fn writes_refused_by_role_or_epoch_are_preconditions_and_fencing_is_unavailable() {
        let codes: Vec<Code> = all().iter().map(MirrorError::code).collect();
        assert_eq!(codes[0], Code::FailedPrecondition);
        assert_eq!(codes[2], Code::FailedPrecondition);
        assert_eq!(codes[4], Code::Unavailable);
        assert_eq!(codes[7], Code::NotFound);
        assert_eq!(codes[8], Code::DataLoss);
        let fenced = MirrorError::Fenced {
            node: "n1".into(),
            epoch: 3,
        };
        assert_eq!(fenced.code(), Code::Unavailable);
        assert_eq!(fenced.kind(), "fenced");
        assert!(!Status::from(fenced).message().is_empty());
    }
}
