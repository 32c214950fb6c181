//! What can go wrong reconciling an HSMSecret. Messages name the object, the field and
//! the fix; they never carry secret bytes (key names at most).

/// A bounded label for metrics and status reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncErrorKind {
    InvalidSource,
    InvalidCopyName,
    SourceNotFound,
    SourceNotLabelled,
    InvalidKey,
    EmptyResult,
    ReadOnly,
    DeviceNotFound,
    Hsm,
    ChecksumMismatch,
    SecretNotOwned,
    Conflict,
    Rejected,
    Api,
    Unsupported,
}

impl SyncErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncErrorKind::InvalidSource => "invalid_source",
            SyncErrorKind::InvalidCopyName => "invalid_copy_name",
            SyncErrorKind::SourceNotFound => "source_not_found",
            SyncErrorKind::SourceNotLabelled => "source_not_labelled",
            SyncErrorKind::InvalidKey => "invalid_key",
            SyncErrorKind::EmptyResult => "empty_result",
            SyncErrorKind::ReadOnly => "read_only",
            SyncErrorKind::DeviceNotFound => "device_not_found",
            SyncErrorKind::Hsm => "hsm",
            SyncErrorKind::ChecksumMismatch => "checksum_mismatch",
            SyncErrorKind::SecretNotOwned => "secret_not_owned",
            SyncErrorKind::Conflict => "conflict",
            SyncErrorKind::Rejected => "rejected",
            SyncErrorKind::Api => "api",
            SyncErrorKind::Unsupported => "unsupported",
        }
    }

    /// The condition reason (CamelCase, as Kubernetes conditions want).
    pub fn reason(self) -> &'static str {
        match self {
            SyncErrorKind::InvalidSource => "InvalidSource",
            SyncErrorKind::InvalidCopyName => "InvalidSecretName",
            SyncErrorKind::SourceNotFound => "SourceNotFound",
            SyncErrorKind::SourceNotLabelled => "SourceNotLabelled",
            SyncErrorKind::InvalidKey => "InvalidKey",
            SyncErrorKind::EmptyResult => "EmptyResult",
            SyncErrorKind::ReadOnly => "DeviceReadOnly",
            SyncErrorKind::DeviceNotFound => "DeviceNotFound",
            SyncErrorKind::Hsm => "HSMUnavailable",
            SyncErrorKind::ChecksumMismatch => "ChecksumMismatch",
            SyncErrorKind::SecretNotOwned => "SecretNotOwned",
            SyncErrorKind::Conflict => "Conflict",
            SyncErrorKind::Rejected => "SecretRejected",
            SyncErrorKind::Api => "APIError",
            SyncErrorKind::Unsupported => "Unsupported",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error(
        "spec.source.secretRef.name {name:?} is not a Secret name: {why}; name a Secret in the HSMSecret's own namespace {namespace} (other namespaces cannot be referenced)"
    )]
    InvalidSource {
        namespace: String,
        name: String,
        why: String,
    },
    #[error(
        "spec.secretName {name:?} is not a Secret name: {why}; the copy is kept in the HSMSecret's own namespace {namespace} under a plain name"
    )]
    InvalidCopyName {
        namespace: String,
        name: String,
        why: String,
    },
    #[error(
        "source Secret {namespace}/{name} (spec.source.secretRef) not found; create it, or remove spec.source"
    )]
    SourceNotFound { namespace: String, name: String },
    #[error(
        "source Secret {namespace}/{name} is not labelled hsmsecrets.io/import-for={hsm_secret}; nothing was imported: whoever may write that Secret consents to its import with `kubectl -n {namespace} label secret {name} hsmsecrets.io/import-for={hsm_secret}` (kubectl hsm create/update label theirs)"
    )]
    SourceNotLabelled {
        namespace: String,
        name: String,
        hsm_secret: String,
    },
    #[error("source Secret {source_name}: key {key:?} {why}; rename or remove that key")]
    InvalidKey {
        source_name: String,
        key: String,
        why: String,
    },
    #[error(
        "importing Secret {source_name} would leave HSM secret {path} with no keys; delete the HSMSecret instead"
    )]
    EmptyResult { source_name: String, path: String },
    #[error(
        "import refused: HSMDevice {device} has no writable primary ({why}); nothing was written; the import is applied once a primary takes writes again (or promote one: kubectl hsm failover {device} --to NODE)"
    )]
    ReadOnly { device: String, why: String },
    #[error("HSMDevice {device} (spec.deviceRef) not found; create it or fix spec.deviceRef")]
    DeviceNotFound { device: String },
    #[error("HSM ({kind}): {detail}")]
    Hsm {
        kind: &'static str,
        detail: String,
        /// The agent's error, when one caused it.
        #[source]
        source: Option<Cause>,
    },
    #[error(
        "HSM secret {path}: the record read back at version {version} does not carry the checksum of what was written; the import is retried"
    )]
    ChecksumMismatch { path: String, version: u64 },
    #[error(
        "Secret {namespace}/{name} exists and is not controlled by this HSMSecret (no ownerReference with controller: true to it); it is left untouched: choose another spec.secretName or delete that Secret"
    )]
    SecretNotOwned { namespace: String, name: String },
    #[error("{what} changed while it was being reconciled; retrying")]
    Conflict { what: String },
    #[error(
        "the API server refused {what}: {reason}; check spec.secretName and spec.secretType (a typed Secret needs the keys its type requires in the HSM secret)"
    )]
    Rejected { what: String, reason: String },
    #[error("Kubernetes API: {0}")]
    Api(#[source] Cause),
    #[error("{0}")]
    Unsupported(String),
}

impl SyncError {
    pub fn kind(&self) -> SyncErrorKind {
        match self {
            SyncError::InvalidSource { .. } => SyncErrorKind::InvalidSource,
            SyncError::InvalidCopyName { .. } => SyncErrorKind::InvalidCopyName,
            SyncError::SourceNotFound { .. } => SyncErrorKind::SourceNotFound,
            SyncError::SourceNotLabelled { .. } => SyncErrorKind::SourceNotLabelled,
            SyncError::InvalidKey { .. } => SyncErrorKind::InvalidKey,
            SyncError::EmptyResult { .. } => SyncErrorKind::EmptyResult,
            SyncError::ReadOnly { .. } => SyncErrorKind::ReadOnly,
            SyncError::DeviceNotFound { .. } => SyncErrorKind::DeviceNotFound,
            SyncError::Hsm { .. } => SyncErrorKind::Hsm,
            SyncError::ChecksumMismatch { .. } => SyncErrorKind::ChecksumMismatch,
            SyncError::SecretNotOwned { .. } => SyncErrorKind::SecretNotOwned,
            SyncError::Conflict { .. } => SyncErrorKind::Conflict,
            SyncError::Rejected { .. } => SyncErrorKind::Rejected,
            SyncError::Api(_) => SyncErrorKind::Api,
            SyncError::Unsupported(_) => SyncErrorKind::Unsupported,
        }
    }

    /// An agent call that failed, keeping the agent's error as the cause.
    pub(crate) fn hsm(e: crate::mirror::MirrorError) -> Self {
        SyncError::Hsm {
            kind: e.kind(),
            detail: e.to_string(),
            source: Some(Cause::new(e)),
        }
    }

    /// A failure on the agent side that no agent error caused (none known, a bad answer).
    pub(crate) fn hsm_detail(kind: &'static str, detail: String) -> Self {
        SyncError::Hsm {
            kind,
            detail,
            source: None,
        }
    }
}

impl std::fmt::Display for SyncErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error underneath a [`SyncError`], kept whole for `source()` and for code that
/// matches on its kind (`downcast_ref`), and shared so that the error stays `Clone`. Two
/// causes are equal when they say the same: errors are compared by their message.
#[derive(Clone, Debug)]
pub struct Cause(std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(error))
    }

    /// The cause as `T`, when it is one (a `kube::Error`, a `StateError`...).
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for Cause {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_failure_keeps_the_agent_error_as_its_cause() {
        let error = SyncError::hsm(crate::mirror::MirrorError::NotSyncing {
            node: "worker-2".into(),
        });
        assert_eq!(error.kind(), SyncErrorKind::Hsm);
        let cause = std::error::Error::source(&error).expect("a cause");
        assert!(cause.to_string().contains("worker-2"), "{cause}");
        let SyncError::Hsm {
            source: Some(kept), ..
        } = &error
        else {
            panic!("{error:?}")
        };
        assert!(
            kept.downcast_ref::<crate::mirror::MirrorError>().is_some(),
            "{kept:?}"
        );
        // A failure no agent error caused has none.
        let bare = SyncError::hsm_detail("no_primary", "no primary".into());
        assert!(std::error::Error::source(&bare).is_none());
    }
}
