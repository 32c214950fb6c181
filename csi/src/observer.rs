//! Hook for metrics and events, so this crate needs no metrics library.

use std::path::Path;
use std::time::Duration;

use crate::{Error, PublishRequest};

/// Outcome label of a publish or unpublish that succeeded.
pub const OUTCOME_OK: &str = "ok";
/// Outcome label of a republish that failed and kept the previous content.
pub const OUTCOME_KEPT_LAST_GOOD: &str = "kept_last_good";
/// Outcome label of a republish that found the pod may no longer read its secrets: the
/// files were removed (the RPC succeeded; the volume stays mounted, empty).
pub const OUTCOME_REVOKED: &str = "revoked";

/// Receives one call per CSI volume operation. Outcomes are [`OUTCOME_OK`],
/// [`OUTCOME_KEPT_LAST_GOOD`] or an [`Error::kind`]: bounded, safe as metric labels.
/// Calls happen on the request path; keep them cheap and non-blocking.
pub trait NodeObserver: Send + Sync + 'static {
    fn publish(&self, _outcome: &'static str, _republish: bool, _elapsed: Duration) {}

    fn unpublish(&self, _outcome: &'static str, _elapsed: Duration) {}

    /// A republish failed and the volume kept its previous content (the RPC succeeded).
    /// The request carries the pod's namespace and name for a Kubernetes Event.
    fn republish_kept_last_good(&self, _request: &PublishRequest, _error: &Error) {}

    /// A republish found access revoked (the source answered PermissionDenied or
    /// NotFound) and removed the volume's files.
    fn republish_revoked(&self, _request: &PublishRequest, _error: &Error) {}

    /// Every publish, republish and unpublish once it finished, whatever its outcome.
    fn finished(&self, _operation: &Operation<'_>) {}
}

/// Which CSI call an [`Operation`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationKind {
    Publish,
    /// A publish of a target that is already mounted (kubelet's periodic republish).
    Republish,
    Unpublish,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::Publish => "publish",
            OperationKind::Republish => "republish",
            OperationKind::Unpublish => "unpublish",
        }
    }
}

/// One finished volume operation, for an audit trail.
#[derive(Debug)]
pub struct Operation<'a> {
    pub kind: OperationKind,
    pub volume_id: &'a str,
    pub target: &'a Path,
    /// The request once it passed validation (publish and republish only).
    pub request: Option<&'a PublishRequest>,
    /// [`OUTCOME_OK`], [`OUTCOME_KEPT_LAST_GOOD`], [`OUTCOME_REVOKED`] or an error kind.
    pub outcome: &'static str,
    /// Whether the volume's content changed: a first publish, a rotation, a revocation.
    pub changed: bool,
    /// Why the operation failed, or why a republish kept or removed the content.
    pub error: Option<&'a Error>,
}

/// Observer that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl NodeObserver for NoopObserver {}
