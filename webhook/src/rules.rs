//! The seam between this protocol adapter and the domain: the root package
//! implements [`AdmissionRules`]; this crate only carries its [`Decision`]s.

use json_patch::Patch;
use kube::core::DynamicObject;
use kube::core::admission::AdmissionRequest;

/// Admission logic supplied by the embedding program.
///
/// The request is passed as the API server sent it (including `dry_run`, so
/// rules with side effects can skip them). Each call runs under the server's
/// review deadline; a call that overruns is cancelled and the review answered
/// as an error, so rules doing blocking work should hand it to
/// `spawn_blocking` with their own timeout.
#[async_trait::async_trait]
pub trait AdmissionRules: Send + Sync + 'static {
    /// Decide on a `/mutate` review; an allow may carry a JSON patch.
    async fn mutate(&self, request: &AdmissionRequest<DynamicObject>) -> Decision;

    /// Decide on a `/validate` review. A patch in the answer is dropped:
    /// validating webhooks may not modify objects.
    async fn validate(&self, request: &AdmissionRequest<DynamicObject>) -> Decision;

    /// Whether the rules can decide correctly yet (e.g. informer caches synced).
    /// Drives `/readyz`, so the Service only routes to replicas that are ready.
    fn ready(&self) -> bool {
        true
    }
}

/// The answer to one admission review.
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub enum Decision {
    /// Admit the object, optionally changed by `patch` (RFC 6902).
    Allow {
        patch: Option<Patch>,
        warnings: Vec<String>,
    },
    /// Refuse the object. `code` is the HTTP status the client sees (400–599;
    /// anything else is sent as 403) and `message` tells the user what to fix.
    Deny {
        code: u16,
        message: String,
        warnings: Vec<String>,
    },
}

impl Decision {
    /// Admit unchanged.
    pub fn allow() -> Self {
        Decision::Allow {
            patch: None,
            warnings: Vec::new(),
        }
    }

    /// Admit with a patch; an empty patch is the same as [`Decision::allow`].
    pub fn patch(patch: Patch) -> Self {
        Decision::Allow {
            patch: (!patch.0.is_empty()).then_some(patch),
            warnings: Vec::new(),
        }
    }

    /// Refuse with an HTTP status code and a message for the user.
    pub fn deny(code: u16, message: impl Into<String>) -> Self {
        Decision::Deny {
            code,
            message: message.into(),
            warnings: Vec::new(),
        }
    }

    /// Add a warning shown to the API client (kubectl prints it); Kubernetes
    /// truncates long ones, so keep each under ~120 characters.
    pub fn with_warning(mut self, warning: impl Into<String>) -> Self {
        match &mut self {
            Decision::Allow { warnings, .. } | Decision::Deny { warnings, .. } => {
                warnings.push(warning.into())
            }
        }
        self
    }

    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    pub fn warnings(&self) -> &[String] {
        match self {
            Decision::Allow { warnings, .. } | Decision::Deny { warnings, .. } => warnings,
        }
    }

    pub fn json_patch(&self) -> Option<&Patch> {
        match self {
            Decision::Allow { patch, .. } => patch.as_ref(),
            Decision::Deny { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_patch_is_a_plain_allow() {
        assert_eq!(Decision::patch(Patch(Vec::new())), Decision::allow());
    }

    #[test]
    fn warnings_accumulate_on_both_outcomes() {
        let allow = Decision::allow().with_warning("a").with_warning("b");
        assert_eq!(allow.warnings(), ["a", "b"]);
        assert!(allow.is_allowed());
        let deny = Decision::deny(403, "no").with_warning("c");
        assert_eq!(deny.warnings(), ["c"]);
        assert!(!deny.is_allowed());
    }
}
