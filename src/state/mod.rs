//! Where device specs, status, Events, node labels and the controller Lease live: the
//! Kubernetes API ([`KubeState`]) or, with no cluster, a directory of YAML files
//! ([`FileState`]) shared by the local processes. The controller and the local mode
//! only see the [`StateStore`] trait.

mod file;
mod kube_api;

pub use file::FileState;
pub use kube_api::KubeState;

use std::time::Duration;

use async_trait::async_trait;

use crate::crd::{HSMDevice, HSMDeviceStatus, HSMSecret, HSMSecretStatus};

/// Errors of the state layer.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "{kind} {name} changed since it was read (resourceVersion {expected}); re-read and retry"
    )]
    Conflict {
        kind: &'static str,
        name: String,
        expected: String,
    },
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("state file {path}: {detail}")]
    File { path: String, detail: String },
    /// The API server's answer or the transport's failure, kept as the cause so logs show
    /// the chain and callers can match on the kind (`kube::Error::Api` carries the code).
    #[error("Kubernetes API: {0}")]
    Api(#[source] kube::Error),
    #[error("{what} did not finish in time")]
    Timeout { what: &'static str },
    #[error("cannot encode {what} for the Kubernetes API: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl StateError {
    pub fn kind(&self) -> &'static str {
        match self {
            StateError::Conflict { .. } => "conflict",
            StateError::NotFound { .. } => "not_found",
            StateError::File { .. } => "file",
            StateError::Api(_) => "api",
            StateError::Encode { .. } => "encode",
            StateError::Timeout { .. } => "timeout",
        }
    }
}

/// Severity of an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EventType {
    Normal,
    Warning,
}

/// An Event about one object. The message never carries secret bytes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EventRecord {
    pub type_: EventType,
    /// One of the reasons of DESIGN §2, e.g. `HSMFailover`.
    pub reason: String,
    pub action: String,
    pub message: String,
}

impl EventRecord {
    /// The occurrence [`crate::kube_events`] turns into an Event.
    pub fn occurrence(&self) -> crate::kube_events::Occurrence<'_> {
        crate::kube_events::Occurrence {
            severity: match self.type_ {
                EventType::Normal => crate::kube_events::Severity::Normal,
                EventType::Warning => crate::kube_events::Severity::Warning,
            },
            reason: &self.reason,
            action: &self.action,
            note: &self.message,
        }
    }
}

/// The object an Event is about.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectRef {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// The object's uid: `kubectl describe` lists only Events that carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl ObjectRef {
    pub fn device(name: &str, uid: Option<&str>) -> Self {
        Self {
            kind: "HSMDevice".into(),
            namespace: None,
            name: name.into(),
            uid: uid.map(String::from),
        }
    }

    pub fn secret(namespace: &str, name: &str, uid: Option<&str>) -> Self {
        Self {
            kind: "HSMSecret".into(),
            namespace: Some(namespace.into()),
            name: name.into(),
            uid: uid.map(String::from),
        }
    }
}

#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    async fn list_devices(&self) -> Result<Vec<HSMDevice>, StateError>;
    /// Waits at most `max`, returning early when an HSMDevice's spec or annotations (a
    /// switchover request) change, so the controller's next round follows at once. A
    /// store that does not watch just sleeps.
    async fn wait_device_change(&self, max: std::time::Duration) {
        tokio::time::sleep(max).await;
    }
    async fn get_device(&self, name: &str) -> Result<Option<HSMDevice>, StateError>;
    /// Writes the status if the object's resourceVersion is still `resource_version`
    /// (optimistic concurrency: the fencing epoch must never go backwards).
    async fn replace_device_status(
        &self,
        name: &str,
        resource_version: &str,
        status: &HSMDeviceStatus,
    ) -> Result<HSMDevice, StateError>;
    /// Removes one annotation from a device (e.g. a completed switchover request).
    async fn clear_device_annotation(&self, name: &str, key: &str) -> Result<(), StateError>;
    async fn list_secrets(&self) -> Result<Vec<HSMSecret>, StateError>;
    async fn get_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<HSMSecret>, StateError>;
    async fn replace_secret_status(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
        status: &HSMSecretStatus,
    ) -> Result<HSMSecret, StateError>;
    async fn record_event(
        &self,
        regarding: &ObjectRef,
        event: &EventRecord,
    ) -> Result<(), StateError>;
    /// Sets (Some) or removes (None) a node label.
    async fn set_node_label(
        &self,
        node: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), StateError>;
    /// Takes or renews the named lease for `holder`; false while another holder's lease
    /// is fresh.
    async fn acquire_lease(
        &self,
        lease: &str,
        holder: &str,
        duration: Duration,
    ) -> Result<bool, StateError>;
}

#[cfg(test)]
mod error_tests {
    use super::*;

    /// The API server's answer stays the cause: a log shows the chain, and code can match
    /// on its status code instead of parsing text.
    #[test]
    fn api_errors_keep_their_cause() {
        let status =
            kube::core::Status::failure("lease held by another", "Conflict").with_code(409);
        let error = StateError::Api(kube::Error::Api(Box::new(status)));
        assert!(
            error.to_string().contains("lease held by another"),
            "{error}"
        );
        let cause = std::error::Error::source(&error)
            .and_then(|e| e.downcast_ref::<kube::Error>())
            .expect("the kube::Error is the source");
        assert!(matches!(cause, kube::Error::Api(s) if s.code == 409));
        assert_eq!(error.kind(), "api");
    }
}
