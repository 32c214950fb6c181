//! One reconcile of one HSMSecret: observe, decide with [`plan`](super::plan), act.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::plan::{
    self, DeviceAccess, HsmContent, Import, ImportResult, Inputs, SecretWrite, StatusPlan,
};
use super::{AgentDirectory, Cluster, DigestKey, SecretSyncMetrics, SyncError, SyncErrorKind};
use crate::crd::{FINALIZER, HSMSecret};

/// What a reconcile did (for the runtime, the tests and the benchmark).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileOutcome {
    /// Look again after this long (spec.syncInterval, sooner after an error).
    pub requeue_after: Duration,
    pub hsm_written: bool,
    pub secret_written: bool,
    pub status_written: bool,
    pub source_deleted: bool,
    /// The error reported in status, if any.
    pub error: Option<SyncErrorKind>,
    /// The object is gone from our point of view (finalizer removed).
    pub finalized: bool,
}

/// Longest wait before retrying after an error reported in status.
const ERROR_RETRY: Duration = Duration::from_secs(10);

pub struct SecretReconciler<C> {
    cluster: Arc<C>,
    agents: AgentDirectory,
    key: DigestKey,
    metrics: SecretSyncMetrics,
}

impl<C: Cluster> SecretReconciler<C> {
    pub fn new(
        cluster: Arc<C>,
        agents: AgentDirectory,
        key: DigestKey,
        metrics: SecretSyncMetrics,
    ) -> Self {
        Self {
            cluster,
            agents,
            key,
            metrics,
        }
    }

    /// Reconciles one HSMSecret as read. Errors are Kubernetes API failures (the runtime
    /// retries); everything about the secret itself ends up in status.
    #[tracing::instrument(skip_all, fields(
        namespace = %object.metadata.namespace.as_deref().unwrap_or_default(),
        name = %object.metadata.name.as_deref().unwrap_or_default(),
    ))]
    pub async fn reconcile(&self, object: &HSMSecret) -> Result<ReconcileOutcome, SyncError> {
        let result = self.reconcile_inner(object).await;
        match &result {
            Ok(o) => self.metrics.reconciled(o.error.map(SyncErrorKind::as_str)),
            Err(e) => {
                tracing::warn!(error = %e, "HSMSecret reconcile failed; retrying");
                self.metrics.reconciled(Some(e.kind().as_str()));
            }
        }
        result
    }

    async fn reconcile_inner(&self, object: &HSMSecret) -> Result<ReconcileOutcome, SyncError> {
        let ns = object.metadata.namespace.clone().unwrap_or_default();
        let interval = Duration::from_secs(object.spec.sync_interval().into());
        let device_name = object.spec.device_ref.as_str();
        let device = self.cluster.device(device_name).await?;
        let access = DeviceAccess::of(device_name, device.as_ref());
        let path = plan::hsm_path(object);
        let hsm = match (&device, &path) {
            (_, Err(e)) => HsmContent::Unavailable(e.clone()),
            (None, _) => HsmContent::Unavailable(SyncError::DeviceNotFound {
                device: device_name.into(),
            }),
            (Some(d), Ok(p)) => {
                self.agents
                    .read(&d.status.clone().unwrap_or_default(), p)
                    .await
            }
        };
        // An invalid spec.secretName is reported by the Secret plan, never looked up.
        let managed = match plan::copy_name(object) {
            Ok(Some(name)) => self.cluster.secret(&ns, name).await?,
            _ => None,
        };

        if object.metadata.deletion_timestamp.is_some() {
            return self
                .finalize(object, &access, &hsm, managed.as_ref(), interval)
                .await;
        }
        let has_finalizer = object
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == FINALIZER);
        let owned_object;
        let object = if has_finalizer {
            object
        } else {
            let mut finalizers = object.metadata.finalizers.clone().unwrap_or_default();
            finalizers.push(FINALIZER.into());
            owned_object = self.cluster.set_finalizers(object, finalizers).await?;
            &owned_object
        };

        // Invalid references are reported by the import plan, never looked up.
        let source = match plan::source_name(object) {
            Ok(Some(name)) => self.cluster.secret(&ns, name).await?,
            _ => None,
        };
        let mut outcome = ReconcileOutcome {
            requeue_after: interval,
            ..Default::default()
        };
        let before = hsm;
        let inputs = Inputs {
            object,
            device: &access,
            hsm: &before,
            source: source.as_ref(),
            managed: managed.as_ref(),
            key: &self.key,
            now: Timestamp::now(),
        };
        let mut written = None;
        let import = match plan::plan_import(&inputs) {
            Import::Nothing => ImportResult::Nothing,
            Import::AlreadyThere { source_version } => ImportResult::Imported {
                source_version,
                wrote: false,
            },
            Import::Refused(e) => ImportResult::Failed(e),
            Import::Write {
                data,
                expect,
                epoch,
                primary,
                source_version,
            } => {
                let Ok(path) = &path else {
                    return Err(SyncError::Unsupported("no HSM path".into()));
                };
                match self
                    .agents
                    .put_verified(&primary, path, &data, expect, epoch)
                    .await
                {
                    Ok(content) => {
                        self.metrics.hsm_write();
                        outcome.hsm_written = true;
                        if let HsmContent::Live { version, .. } = &content {
                            tracing::info!(%path, version, "imported into the HSM");
                        }
                        written = Some(content);
                        ImportResult::Imported {
                            source_version,
                            wrote: true,
                        }
                    }
                    Err(e) => ImportResult::Failed(e),
                }
            }
        };
        let hsm = written.as_ref().unwrap_or(&before);
        let inputs = Inputs { hsm, ..inputs };

        let mut secret_error = None;
        match plan::plan_secret(&inputs) {
            Ok(Some(write)) => match self.write_secret(&ns, write).await {
                Ok(()) => {
                    self.metrics.secret_write();
                    outcome.secret_written = true;
                }
                Err(e) => secret_error = Some(e),
            },
            Ok(None) => {}
            Err(e) => secret_error = Some(e),
        }

        let StatusPlan {
            status,
            changed,
            event,
        } = plan::plan_status(
            &inputs,
            &import,
            outcome.secret_written,
            secret_error.as_ref(),
        );
        if changed {
            self.cluster.write_status(object, &status).await?;
            self.metrics.status_write();
            outcome.status_written = true;
        }
        if let Some(event) = &event
            && let Err(e) = self.cluster.record_event(object, event).await
        {
            tracing::warn!(error = %e, reason = %event.reason, "cannot record the Event");
        }
        if let Some((name, rv)) = plan::plan_source_cleanup(&inputs, &import) {
            self.cluster.delete_secret(&ns, &name, &rv).await?;
            outcome.source_deleted = true;
        }
        let error = match (&import, hsm, &secret_error) {
            (ImportResult::Failed(e), _, _) => Some(e),
            (_, HsmContent::Unavailable(e), _) => Some(e),
            (_, _, Some(e)) => Some(e),
            _ => None,
        };
        if let Some(e) = error {
            tracing::warn!(error = %e, kind = %e.kind(), "HSMSecret not in sync");
            outcome.error = Some(e.kind());
            outcome.requeue_after = interval.min(ERROR_RETRY);
            if e.kind() == SyncErrorKind::Conflict {
                outcome.requeue_after = Duration::from_secs(1);
            }
        }
        Ok(outcome)
    }

    async fn write_secret(&self, ns: &str, write: SecretWrite) -> Result<(), SyncError> {
        match write {
            SecretWrite::Create(secret) => self.cluster.create_secret(ns, &secret).await,
            SecretWrite::Replace(secret) => self.cluster.replace_secret(ns, &secret).await,
            SecretWrite::Recreate {
                resource_version,
                secret,
            } => {
                let name = secret.metadata.name.clone().unwrap_or_default();
                self.cluster
                    .delete_secret(ns, &name, &resource_version)
                    .await?;
                self.cluster.create_secret(ns, &secret).await
            }
            SecretWrite::Delete {
                name,
                resource_version,
            } => {
                self.cluster
                    .delete_secret(ns, &name, &resource_version)
                    .await
            }
        }
    }

    /// Deletion: remove the managed Secret, tombstone the HSM data under deletionPolicy
    /// Delete, then release the finalizer.
    async fn finalize(
        &self,
        object: &HSMSecret,
        access: &DeviceAccess,
        hsm: &HsmContent,
        managed: Option<&k8s_openapi::api::core::v1::Secret>,
        interval: Duration,
    ) -> Result<ReconcileOutcome, SyncError> {
        let ns = object.metadata.namespace.clone().unwrap_or_default();
        let finalizers = object.metadata.finalizers.clone().unwrap_or_default();
        if !finalizers.iter().any(|f| f == FINALIZER) {
            return Ok(ReconcileOutcome {
                finalized: true,
                ..Default::default()
            });
        }
        let inputs = Inputs {
            object,
            device: access,
            hsm,
            source: None,
            managed,
            key: &self.key,
            now: Timestamp::now(),
        };
        let cleanup = plan::plan_cleanup(&inputs);
        let mut outcome = ReconcileOutcome::default();
        if let Some((name, rv)) = &cleanup.delete_secret {
            self.cluster.delete_secret(&ns, name, rv).await?;
            outcome.secret_written = true;
        }
        let mut blocked = cleanup.blocked;
        if let (Some(t), Ok(path)) = (&cleanup.tombstone, plan::hsm_path(object)) {
            match self
                .agents
                .delete(&t.primary, &path, t.expect, t.epoch)
                .await
            {
                Ok(version) => {
                    self.metrics.hsm_write();
                    outcome.hsm_written = true;
                    tracing::info!(%path, version, "HSM secret deleted (deletionPolicy Delete)");
                }
                Err(e) => blocked = Some(e),
            }
        }
        if let Some(e) = blocked {
            tracing::warn!(error = %e, "HSMSecret deletion waits");
            let plan = plan::plan_status(&inputs, &ImportResult::Failed(e.clone()), false, None);
            if plan.changed {
                self.cluster.write_status(object, &plan.status).await?;
                outcome.status_written = true;
            }
            if let Some(event) = &plan.event {
                let _ = self.cluster.record_event(object, event).await;
            }
            outcome.error = Some(e.kind());
            outcome.requeue_after = interval.min(ERROR_RETRY);
            return Ok(outcome);
        }
        let rest: Vec<String> = finalizers.into_iter().filter(|f| f != FINALIZER).collect();
        self.cluster.set_finalizers(object, rest).await?;
        outcome.finalized = true;
        Ok(outcome)
    }
}
