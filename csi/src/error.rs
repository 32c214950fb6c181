//! The crate's one error type and its single mapping to gRPC status codes.

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;
use tonic::{Code, Status};

use crate::SourceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field} is required")]
    MissingField { field: &'static str },

    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },

    #[error("payload file {path:?}: {reason}")]
    InvalidPayloadFile { path: String, reason: String },

    #[error("volume {volume_id}: {source}")]
    Source {
        volume_id: String,
        source: SourceError,
    },

    #[error("another operation on {target} is in progress; retry")]
    OperationPending { target: PathBuf },

    #[error("{target} is already a {fs_type} mount from {mount_source:?}, not one of this driver")]
    ForeignMount {
        target: PathBuf,
        fs_type: String,
        mount_source: String,
    },

    #[error(
        "{target} exists, is not empty and is not a volume of this driver; it is left as it is"
    )]
    ForeignDirectory { target: PathBuf },

    #[error(
        "{path} is a symbolic link; the node plugin never follows one in a volume path (kubelet does not create them)"
    )]
    Symlink { path: PathBuf },

    #[error("mount tmpfs at {target}: {source}")]
    Mount { target: PathBuf, source: Errno },

    #[error("unmount {target}: {source}")]
    Unmount { target: PathBuf, source: Errno },

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    #[error("blocking task failed: {0}")]
    Task(String),

    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        endpoint: String,
        reason: &'static str,
    },

    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field,
            reason: reason.into(),
        }
    }

    /// Bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::MissingField { .. } => "missing_field",
            Self::InvalidField { .. } => "invalid_field",
            Self::InvalidPayloadFile { .. } => "invalid_payload_file",
            Self::Source { source, .. } => match source {
                SourceError::InvalidArgument(_) => "source_invalid_argument",
                SourceError::NotFound(_) => "source_not_found",
                SourceError::PermissionDenied(_) => "source_permission_denied",
                SourceError::Unavailable(_) => "source_unavailable",
                SourceError::Internal(_) => "source_internal",
            },
            Self::OperationPending { .. } => "operation_pending",
            Self::ForeignMount { .. } => "foreign_mount",
            Self::ForeignDirectory { .. } => "foreign_directory",
            Self::Symlink { .. } => "symlink",
            Self::Mount { .. } => "mount",
            Self::Unmount { .. } => "unmount",
            Self::Io { .. } => "io",
            Self::Task(_) => "task",
            Self::InvalidEndpoint { .. } => "invalid_endpoint",
            Self::Transport(_) => "transport",
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::MissingField { .. }
            | Self::InvalidField { .. }
            | Self::InvalidPayloadFile { .. }
            | Self::InvalidEndpoint { .. } => Code::InvalidArgument,
            Self::Source { source, .. } => source.code(),
            // The CSI spec's code for "an operation is pending for this volume".
            Self::OperationPending { .. } => Code::Aborted,
            Self::ForeignMount { .. } | Self::ForeignDirectory { .. } | Self::Symlink { .. } => {
                Code::FailedPrecondition
            }
            Self::Mount { .. } | Self::Unmount { .. } | Self::Io { .. } | Self::Task(_) => {
                Code::Internal
            }
            Self::Transport(_) => Code::Unavailable,
        }
    }
}

/// Longest message the plugin answers kubelet with (errors quote request fields).
pub const STATUS_MESSAGE_MAX: usize = 1024;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let mut message = error.to_string();
        if message.len() > STATUS_MESSAGE_MAX {
            let mut end = STATUS_MESSAGE_MAX;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("… (cut)");
        }
        Status::new(error.code(), message)
    }
}

impl From<tokio::task::JoinError> for Error {
    /// A panic's message stays in the plugin's log: it goes no further than kubelet's
    /// error either way, but may quote internal state.
    fn from(error: tokio::task::JoinError) -> Self {
        if error.is_panic() {
            tracing::error!(panic = %error, "a blocking volume task panicked");
            Self::Task("panicked (details in the node plugin's log)".into())
        } else {
            Self::Task("cancelled".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exhaustive on purpose: a new variant fails to compile here until it has a row below.
    fn variant_index(error: &Error) -> usize {
        match error {
            Error::MissingField { .. } => 0,
            Error::InvalidField { .. } => 1,
            Error::InvalidPayloadFile { .. } => 2,
            Error::Source { .. } => 3,
            Error::OperationPending { .. } => 4,
            Error::ForeignMount { .. } => 5,
            Error::Mount { .. } => 6,
            Error::Unmount { .. } => 7,
            Error::Io { .. } => 8,
            Error::Task(_) => 9,
            Error::InvalidEndpoint { .. } => 10,
            Error::Transport(_) => 11,
            Error::ForeignDirectory { .. } => 12,
            Error::Symlink { .. } => 13,
        }
    }
    const VARIANTS: usize = 14;

    fn source(e: SourceError) -> Error {
        Error::Source {
            volume_id: "vol-1".into(),
            source: e,
        }
    }

    async fn transport_error() -> tonic::transport::Error {
        tonic::transport::Endpoint::from_static("http://127.0.0.1:1")
            .connect()
            .await
            .expect_err("nothing listens on port 1")
    }

    #[tokio::test]
    async fn every_variant_maps_to_its_code() {
        let target = PathBuf::from("/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/v/mount");
        let rows: Vec<(Error, Code, &str)> = vec![
            (
                Error::MissingField { field: "volume_id" },
                Code::InvalidArgument,
                "volume_id is required",
            ),
            (
                Error::invalid("readonly", "set readOnly: true"),
                Code::InvalidArgument,
                "readonly",
            ),
            (
                Error::InvalidPayloadFile {
                    path: "a/../b".into(),
                    reason: "bad".into(),
                },
                Code::InvalidArgument,
                "a/../b",
            ),
            (
                source(SourceError::InvalidArgument("x".into())),
                Code::InvalidArgument,
                "vol-1",
            ),
            (
                source(SourceError::NotFound("x".into())),
                Code::NotFound,
                "vol-1",
            ),
            (
                source(SourceError::PermissionDenied("x".into())),
                Code::PermissionDenied,
                "vol-1",
            ),
            (
                source(SourceError::Unavailable("x".into())),
                Code::Unavailable,
                "vol-1",
            ),
            (
                source(SourceError::Internal("x".into())),
                Code::Internal,
                "vol-1",
            ),
            (
                Error::OperationPending {
                    target: target.clone(),
                },
                Code::Aborted,
                "in progress",
            ),
            (
                Error::ForeignMount {
                    target: target.clone(),
                    fs_type: "ext4".into(),
                    mount_source: "/dev/sda1".into(),
                },
                Code::FailedPrecondition,
                "ext4",
            ),
            (
                Error::ForeignDirectory {
                    target: target.clone(),
                },
                Code::FailedPrecondition,
                "not a volume of this driver",
            ),
            (
                Error::Symlink {
                    path: target.clone(),
                },
                Code::FailedPrecondition,
                "symbolic link",
            ),
            (
                Error::Mount {
                    target: target.clone(),
                    source: Errno::EPERM,
                },
                Code::Internal,
                "mount tmpfs",
            ),
            (
                Error::Unmount {
                    target: target.clone(),
                    source: Errno::EBUSY,
                },
                Code::Internal,
                "unmount",
            ),
            (
                Error::io("create", &target, io::Error::other("disk")),
                Code::Internal,
                "create /var/lib/kubelet",
            ),
            (Error::Task("panicked".into()), Code::Internal, "panicked"),
            (
                Error::InvalidEndpoint {
                    endpoint: "tcp://x".into(),
                    reason: "not unix",
                },
                Code::InvalidArgument,
                "tcp://x",
            ),
            (
                Error::Transport(transport_error().await),
                Code::Unavailable,
                "transport",
            ),
        ];

        let mut seen = [false; VARIANTS];
        let mut kinds = std::collections::BTreeSet::new();
        for (error, code, message_part) in rows {
            seen[variant_index(&error)] = true;
            kinds.insert(error.kind());
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{}", status.message());
            assert!(
                status.message().contains(message_part),
                "{:?} should mention {message_part:?}",
                status.message()
            );
        }
        assert!(seen.iter().all(|s| *s), "a variant lacks a row: {seen:?}");
        assert_eq!(
            kinds.len(),
            18,
            "kinds are distinct per variant and source code"
        );
    }
}
