//! What can go wrong in `kubectl hsm`, each with the fix, and how API errors map to it.

use std::time::Duration;

use crate::crd::GROUP;

#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    /// Bad arguments (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the cluster: {detail}; check --context/--kubeconfig")]
    Unreachable { detail: String },
    /// The kubeconfig on this machine names no usable cluster (an unknown context, a
    /// missing file): nothing was sent to any cluster.
    #[error("kubeconfig {file}: {problem}; {fix}")]
    Kubeconfig {
        file: String,
        problem: String,
        fix: String,
    },
    #[error(
        "the cluster rejected your credentials (401 Unauthorized): {message}; check --context/--kubeconfig or log in again"
    )]
    Unauthorized { message: String },
    #[error("the {kind} CRD is not installed: kubectl apply -k manifests/")]
    CrdMissing { kind: &'static str },
    #[error(
        "forbidden: you may not {verb} {resource}{scope} (RBAC); ask a cluster admin for a Role that allows it. API server: {message}"
    )]
    Forbidden {
        verb: &'static str,
        resource: &'static str,
        scope: String,
        message: String,
    },
    /// An admission webhook said no (e.g. the device is read-only): printed as the API
    /// server returned it, since it already says why and what to do.
    #[error("{message}")]
    Denied { message: String },
    #[error("{kind} {name} not found{hint}")]
    NotFound {
        kind: &'static str,
        name: String,
        hint: String,
    },
    #[error("{kind} {name} already exists; {hint}")]
    AlreadyExists {
        kind: &'static str,
        name: String,
        hint: &'static str,
    },
    #[error("HSMSecret {secret} has no key {key:?} (its keys: {known})")]
    UnknownKey {
        secret: String,
        key: String,
        known: String,
    },
    /// The cluster state rules the request out (failover to a non-member, ...).
    #[error("{0}")]
    Refused(String),
    #[error("import into HSMSecret {name} failed: {last_error}")]
    ImportFailed { name: String, last_error: String },
    #[error("timed out after {}s waiting for {waiting_for} (last seen: {last_seen}); {hint}", .after.as_secs())]
    Timeout {
        after: Duration,
        waiting_for: String,
        last_seen: String,
        hint: String,
    },
    #[error("{count} of {total} devices not Ready: {which}")]
    NotReady {
        count: usize,
        total: usize,
        which: String,
    },
    #[error("{what}: {detail}")]
    Input { what: String, detail: String },
    #[error("{action}: {message}")]
    Api { action: String, message: String },
    #[error("cannot write output: {0}")]
    Output(String),
}

impl KubectlError {
    /// Label for metrics and tests; never derived from error text.
    pub fn kind(&self) -> &'static str {
        match self {
            KubectlError::Usage(_) => "usage",
            KubectlError::Unreachable { .. } => "unreachable",
            KubectlError::Kubeconfig { .. } => "kubeconfig",
            KubectlError::Unauthorized { .. } => "unauthorized",
            KubectlError::CrdMissing { .. } => "crd_missing",
            KubectlError::Forbidden { .. } => "forbidden",
            KubectlError::Denied { .. } => "denied",
            KubectlError::NotFound { .. } => "not_found",
            KubectlError::AlreadyExists { .. } => "already_exists",
            KubectlError::UnknownKey { .. } => "unknown_key",
            KubectlError::Refused(_) => "refused",
            KubectlError::ImportFailed { .. } => "import_failed",
            KubectlError::Timeout { .. } => "timeout",
            KubectlError::NotReady { .. } => "not_ready",
            KubectlError::Input { .. } => "input",
            KubectlError::Api { .. } => "api",
            KubectlError::Output(_) => "output",
        }
    }

    /// 2 for usage errors, 1 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            KubectlError::Usage(_) => 2,
            _ => 1,
        }
    }

    pub(crate) fn stdout(e: std::io::Error) -> Self {
        KubectlError::Output(e.to_string())
    }

    pub(crate) fn usage(msg: impl Into<String>) -> Self {
        KubectlError::Usage(msg.into())
    }
}

/// One API call, described well enough to turn its failure into an actionable error.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Call<'a> {
    /// RBAC verb: get, list, create, patch, delete.
    pub verb: &'static str,
    pub kind: &'static str,
    /// RBAC resource, with its group for ours (`hsmsecrets.hsmsecrets.io`).
    pub resource: &'static str,
    pub group: &'static str,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

impl<'a> Call<'a> {
    pub fn hsmsecret(
        verb: &'static str,
        namespace: Option<&'a str>,
        name: Option<&'a str>,
    ) -> Self {
        Self {
            verb,
            kind: "HSMSecret",
            resource: "hsmsecrets.hsmsecrets.io",
            group: GROUP,
            namespace,
            name,
        }
    }

    pub fn hsmdevice(verb: &'static str, name: Option<&'a str>) -> Self {
        Self {
            verb,
            kind: "HSMDevice",
            resource: "hsmdevices.hsmsecrets.io",
            group: GROUP,
            namespace: None,
            name,
        }
    }

    pub fn secret(verb: &'static str, namespace: &'a str, name: Option<&'a str>) -> Self {
        Self {
            verb,
            kind: "Secret",
            resource: "secrets",
            group: "",
            namespace: Some(namespace),
            name,
        }
    }

    fn display_name(&self) -> String {
        match (self.namespace, self.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            (None, Some(n)) => n.to_string(),
            (Some(ns), None) => format!("in namespace {ns}"),
            (None, None) => String::new(),
        }
    }

    /// Maps a kube error to what the user should do about it.
    pub fn fail(&self, e: kube::Error) -> KubectlError {
        match e {
            kube::Error::Api(status) => self.fail_status(
                status.code,
                &status.message,
                status.details.as_ref().map(|d| d.name.as_str()),
            ),
            kube::Error::HyperError(e) => KubectlError::Unreachable {
                detail: e.to_string(),
            },
            kube::Error::Service(e) => KubectlError::Unreachable {
                detail: source_chain(&*e),
            },
            kube::Error::RustlsTls(e) => KubectlError::Unreachable {
                detail: e.to_string(),
            },
            kube::Error::Auth(e) => KubectlError::Unreachable {
                detail: format!("authentication: {e}"),
            },
            other => KubectlError::Api {
                action: format!("{} {} {}", self.verb, self.kind, self.display_name()),
                message: other.to_string(),
            },
        }
    }

    fn fail_status(&self, code: u16, message: &str, detail_name: Option<&str>) -> KubectlError {
        if is_admission_denial(message) {
            return KubectlError::Denied {
                message: message.to_string(),
            };
        }
        match code {
            401 => KubectlError::Unauthorized {
                message: message.to_string(),
            },
            403 => KubectlError::Forbidden {
                verb: self.verb,
                resource: self.resource,
                scope: match (self.namespace, self.name) {
                    (Some(ns), _) => format!(" in namespace {ns}"),
                    (None, _) => " (cluster-scoped)".to_string(),
                },
                message: message.to_string(),
            },
            404 if self.group == GROUP && !self.is_object_not_found(message, detail_name) => {
                KubectlError::CrdMissing { kind: self.kind }
            }
            404 => KubectlError::NotFound {
                kind: self.kind,
                name: self.display_name(),
                hint: String::new(),
            },
            409 if self.verb == "create" => KubectlError::AlreadyExists {
                kind: self.kind,
                name: self.display_name(),
                hint: "use `kubectl hsm update` to change it",
            },
            _ => KubectlError::Api {
                action: format!("{} {} {}", self.verb, self.kind, self.display_name()),
                message: format!("{message} ({code})"),
            },
        }
    }

    /// A 404 for a named object says which object; a 404 for a resource type the server
    /// does not know (CRD not installed) names none.
    fn is_object_not_found(&self, message: &str, detail_name: Option<&str>) -> bool {
        match self.name {
            Some(name) => {
                detail_name.is_some_and(|d| d == name)
                    || message.contains(&format!("\"{name}\" not found"))
            }
            None => false,
        }
    }
}

fn is_admission_denial(message: &str) -> bool {
    message.contains("admission webhook") && message.contains("denied")
}

fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}
