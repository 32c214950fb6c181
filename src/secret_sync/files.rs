//! The reconciler in the no-cluster mode (`--state DIR`): HSMSecrets and Events live in
//! the file-backed [`StateStore`]. Only the HSM side is supported there: status reports
//! what the HSM holds (version, keys, digest, servedBy). There are no Kubernetes Secrets
//! in that mode, so `spec.source` (import) and `spec.secretName` (copy) are reported in
//! status as needing a cluster; write secrets with `hsm-secrets` tooling on the agent
//! instead.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Cause, Cluster, SecretReconciler, SyncError};
use crate::crd::{HSMDevice, HSMSecret, HSMSecretStatus};
use crate::state::{EventRecord, ObjectRef, StateError, StateStore};

pub struct FileCluster<S> {
    state: Arc<S>,
}

impl<S: StateStore> FileCluster<S> {
    pub fn new(state: Arc<S>) -> Self {
        Self { state }
    }
}

fn state_err(e: StateError) -> SyncError {
    match e {
        StateError::Conflict { kind, name, .. } => SyncError::Conflict {
            what: format!("{kind} {name}"),
        },
        other => SyncError::Api(Cause::new(other)),
    }
}

fn no_secrets() -> SyncError {
    SyncError::Unsupported(
        "Kubernetes Secrets (spec.secretName copies and spec.source imports) need a cluster; the file-backed state (--state DIR) keeps none: remove those fields in the no-cluster mode".into(),
    )
}

#[async_trait]
impl<S: StateStore> Cluster for FileCluster<S> {
    async fn device(&self, name: &str) -> Result<Option<HSMDevice>, SyncError> {
        self.state.get_device(name).await.map_err(state_err)
    }

    async fn secret(&self, _namespace: &str, _name: &str) -> Result<Option<Secret>, SyncError> {
        Ok(None)
    }

    async fn create_secret(&self, _namespace: &str, _secret: &Secret) -> Result<(), SyncError> {
        Err(no_secrets())
    }

    async fn replace_secret(&self, _namespace: &str, _secret: &Secret) -> Result<(), SyncError> {
        Err(no_secrets())
    }

    async fn delete_secret(&self, _: &str, _: &str, _: &str) -> Result<(), SyncError> {
        Ok(())
    }

    /// Files have no deletion protocol: finalizers are not stored.
    async fn set_finalizers(
        &self,
        object: &HSMSecret,
        finalizers: Vec<String>,
    ) -> Result<HSMSecret, SyncError> {
        let mut next = object.clone();
        next.metadata.finalizers = Some(finalizers);
        Ok(next)
    }

    async fn write_status(
        &self,
        object: &HSMSecret,
        status: &HSMSecretStatus,
    ) -> Result<(), SyncError> {
        self.state
            .replace_secret_status(
                object.metadata.namespace.as_deref().unwrap_or_default(),
                object.metadata.name.as_deref().unwrap_or_default(),
                object
                    .metadata
                    .resource_version
                    .as_deref()
                    .unwrap_or_default(),
                status,
            )
            .await
            .map(|_| ())
            .map_err(state_err)
    }

    async fn record_event(&self, object: &HSMSecret, event: &EventRecord) -> Result<(), SyncError> {
        let regarding = ObjectRef::secret(
            object.metadata.namespace.as_deref().unwrap_or_default(),
            object.metadata.name.as_deref().unwrap_or_default(),
            object.metadata.uid.as_deref(),
        );
        self.state
            .record_event(&regarding, event)
            .await
            .map_err(state_err)
    }
}

/// Polls the file-backed HSMSecrets while `leading` is true, each at its own
/// `syncInterval`; returns when the sender of `leading` is dropped.
pub async fn run_files<S: StateStore>(
    state: Arc<S>,
    reconciler: Arc<SecretReconciler<FileCluster<S>>>,
    mut leading: watch::Receiver<bool>,
    tick: Duration,
) {
    let mut due: HashMap<(String, String), Instant> = HashMap::new();
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        match state.list_secrets().await {
            Ok(objects) => {
                let now = Instant::now();
                for object in objects {
                    if !*leading.borrow() {
                        break;
                    }
                    let key = (
                        object.metadata.namespace.clone().unwrap_or_default(),
                        object.metadata.name.clone().unwrap_or_default(),
                    );
                    if due.get(&key).is_some_and(|at| *at > now) {
                        continue;
                    }
                    let wait = match reconciler.reconcile(&object).await {
                        Ok(o) => o.requeue_after,
                        Err(_) => Duration::from_secs(1),
                    };
                    due.insert(key, Instant::now() + wait);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list HSMSecrets"),
        }
        tokio::select! {
            changed = leading.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(tick) => {}
        }
    }
}
