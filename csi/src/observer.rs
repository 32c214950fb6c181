//! Hook for metrics and events, so this crate needs no metrics library.

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
}

/// Observer that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl NodeObserver for NoopObserver {}
