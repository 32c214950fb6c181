//! The reconciler on a cluster: [`Cluster`] over the API server, the digest key Secret,
//! and the kube-runtime `Controller` that drives reconciles while this replica leads.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use tokio::sync::watch;

use super::digest::{DIGEST_KEY_FIELD, DIGEST_KEY_SECRET, DigestKey};
use super::{
    Cause, Cluster, DEVICE_LABEL, IMPORT_FOR_LABEL, SecretReconciler, SyncError, SyncErrorKind,
};
use crate::crd::{HSMDevice, HSMSecret, HSMSecretStatus};
use crate::kube_events::{self, Reporter};
use crate::state::EventRecord;

/// Field manager and Event reporter of the HSMSecret reconciler.
pub const MANAGER: &str = "hsm-secrets-controller";

#[derive(Clone)]
pub struct KubeCluster {
    client: Client,
    /// Reporting instance of Events (this replica).
    instance: String,
}

impl KubeCluster {
    pub fn new(client: Client, instance: Option<String>) -> Self {
        Self {
            client,
            instance: instance.unwrap_or_else(|| MANAGER.into()),
        }
    }

    fn secrets(&self, ns: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), ns)
    }

    fn hsmsecrets(&self, object: &HSMSecret) -> Api<HSMSecret> {
        Api::namespaced(
            self.client.clone(),
            object.metadata.namespace.as_deref().unwrap_or_default(),
        )
    }
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// 409, or 422 from a failed JSON Patch `test` (our resourceVersion precondition).
fn map_err(what: impl FnOnce() -> String, e: kube::Error) -> SyncError {
    match code(&e) {
        Some(409 | 422) => SyncError::Conflict { what: what() },
        _ => SyncError::Api(Cause::new(e)),
    }
}

/// A create or replace of the Secret copy: 409 is a conflict, 422 means the API server
/// refused the object itself (name, type, or the keys that type requires) — retrying
/// cannot help until the HSMSecret or the HSM content changes.
fn map_secret_write_err(what: impl FnOnce() -> String, e: kube::Error) -> SyncError {
    match &e {
        kube::Error::Api(status) if status.code == 422 => SyncError::Rejected {
            what: what(),
            reason: status.message.clone(),
        },
        _ => map_err(what, e),
    }
}

fn params() -> PostParams {
    PostParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

fn guarded_patch(
    object: &HSMSecret,
    path: &str,
    value: serde_json::Value,
) -> Result<Patch<()>, SyncError> {
    let rv = object.metadata.resource_version.clone().unwrap_or_default();
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": path, "value": value},
    ]))
    .map_err(|e| SyncError::Api(Cause::new(e)))?;
    Ok(Patch::Json(patch))
}

fn name_of(object: &HSMSecret) -> String {
    format!(
        "HSMSecret {}/{}",
        object.metadata.namespace.as_deref().unwrap_or_default(),
        object.metadata.name.as_deref().unwrap_or_default()
    )
}

#[async_trait]
impl Cluster for KubeCluster {
    async fn device(&self, name: &str) -> Result<Option<HSMDevice>, SyncError> {
        Api::<HSMDevice>::all(self.client.clone())
            .get_opt(name)
            .await
            .map_err(|e| SyncError::Api(Cause::new(e)))
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>, SyncError> {
        self.secrets(namespace)
            .get_opt(name)
            .await
            .map_err(|e| SyncError::Api(Cause::new(e)))
    }

    async fn create_secret(&self, namespace: &str, secret: &Secret) -> Result<(), SyncError> {
        self.secrets(namespace)
            .create(&params(), secret)
            .await
            .map(|_| ())
            .map_err(|e| {
                map_secret_write_err(
                    || {
                        format!(
                            "Secret {namespace}/{}",
                            secret.metadata.name.as_deref().unwrap_or_default()
                        )
                    },
                    e,
                )
            })
    }

    async fn replace_secret(&self, namespace: &str, secret: &Secret) -> Result<(), SyncError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        self.secrets(namespace)
            .replace(&name, &params(), secret)
            .await
            .map(|_| ())
            .map_err(|e| map_secret_write_err(|| format!("Secret {namespace}/{name}"), e))
    }

    async fn delete_secret(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
    ) -> Result<(), SyncError> {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(resource_version.into()),
                uid: None,
            }),
            ..Default::default()
        };
        match self.secrets(namespace).delete(name, &dp).await {
            Ok(_) => Ok(()),
            Err(e) if code(&e) == Some(404) => Ok(()),
            Err(e) => Err(map_err(|| format!("Secret {namespace}/{name}"), e)),
        }
    }

    async fn set_finalizers(
        &self,
        object: &HSMSecret,
        finalizers: Vec<String>,
    ) -> Result<HSMSecret, SyncError> {
        let patch = guarded_patch(
            object,
            "/metadata/finalizers",
            serde_json::json!(finalizers),
        )?;
        let name = object.metadata.name.clone().unwrap_or_default();
        self.hsmsecrets(object)
            .patch(&name, &PatchParams::default(), &patch)
            .await
            .map_err(|e| map_err(|| name_of(object), e))
    }

    async fn write_status(
        &self,
        object: &HSMSecret,
        status: &HSMSecretStatus,
    ) -> Result<(), SyncError> {
        let value = serde_json::to_value(status).map_err(|e| SyncError::Api(Cause::new(e)))?;
        let patch = guarded_patch(object, "/status", value)?;
        let name = object.metadata.name.clone().unwrap_or_default();
        self.hsmsecrets(object)
            .patch_status(&name, &PatchParams::default(), &patch)
            .await
            .map(|_| ())
            .map_err(|e| map_err(|| name_of(object), e))
    }

    async fn record_event(&self, object: &HSMSecret, event: &EventRecord) -> Result<(), SyncError> {
        let what = event.occurrence();
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: self.instance.clone(),
        };
        kube_events::publish(
            &self.client,
            &kube_events::build(object.object_ref(&()), &reporter, &what),
        )
        .await
        .map_err(|e| SyncError::Api(Cause::new(e)))
    }
}

/// Reads the digest key from `<namespace>/hsm-secrets-digest-key`, creating the Secret
/// with a fresh random key when it does not exist.
pub async fn load_or_create_digest_key(
    client: Client,
    namespace: &str,
) -> Result<DigestKey, SyncError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let read = |secret: Secret| {
        secret
            .data
            .and_then(|mut d| d.remove(DIGEST_KEY_FIELD))
            .and_then(|b| DigestKey::from_bytes(b.0))
            .ok_or_else(|| {
                SyncError::Unsupported(format!(
                    "Secret {namespace}/{DIGEST_KEY_SECRET} has no data key {DIGEST_KEY_FIELD:?} of at least 16 bytes; delete it and the controller creates a new one (status digests then change once)"
                ))
            })
    };
    let missing = |e: kube::Error| SyncError::Api(Cause::new(e));
    if let Some(secret) = api.get_opt(DIGEST_KEY_SECRET).await.map_err(missing)? {
        return read(secret);
    }
    let key = DigestKey::generate().map_err(|e| {
        SyncError::Unsupported(format!("cannot read /dev/urandom for the digest key: {e}"))
    })?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(DIGEST_KEY_SECRET.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            [(
                DIGEST_KEY_FIELD.to_string(),
                ByteString(key.bytes().to_vec()),
            )]
            .into_iter()
            .collect(),
        ),
        ..Default::default()
    };
    match api.create(&params(), &secret).await {
        Ok(_) => Ok(key),
        // Another replica created it first: use theirs.
        Err(e) if code(&e) == Some(409) => match api.get_opt(DIGEST_KEY_SECRET).await {
            Ok(Some(secret)) => read(secret),
            Ok(None) => Err(SyncError::Conflict {
                what: format!("Secret {namespace}/{DIGEST_KEY_SECRET}"),
            }),
            Err(e) => Err(missing(e)),
        },
        Err(e) => Err(missing(e)),
    }
}

struct Context {
    reconciler: Arc<SecretReconciler<KubeCluster>>,
    leading: watch::Receiver<bool>,
}

/// Reconciles in flight at most: each holds a device, two Secrets and agent calls, so
/// this bounds the controller's working memory whatever the number of HSMSecrets.
pub const CONCURRENCY: u16 = 16;

/// The annotation `kubectl apply` leaves, a second copy of the whole spec.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what the reconciler never reads before the object enters the cache:
/// managedFields and the last-applied copy are often larger than the object itself.
pub fn strip_for_cache(object: &mut HSMSecret) {
    let meta = &mut object.metadata;
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// The HSMSecret an import Secret names (label `hsmsecrets.io/import-for`, same
/// namespace).
fn import_target(secret: PartialObjectMeta<Secret>) -> Option<ObjectRef<HSMSecret>> {
    let ns = secret.metadata.namespace?;
    let name = secret.metadata.labels?.remove(IMPORT_FOR_LABEL)?;
    Some(ObjectRef::<HSMSecret>::new(&name).within(&ns))
}

/// Runs the HSMSecret controller while `leading` is true (the controller Lease is held):
/// watches HSMSecrets, the Secrets they own (label `hsmsecrets.io/device`) and import
/// Secrets (label `hsmsecrets.io/import-for`, mapped back to the HSMSecret of that name
/// in the same namespace). Returns when the sender of `leading` is dropped.
///
/// Memory: only HSMSecrets are cached, stripped by [`strip_for_cache`]; Secrets are
/// watched as metadata only (their data never reaches this process through a watch,
/// each reconcile reads the two it needs), and at most [`CONCURRENCY`] reconciles run.
pub async fn run_kube(
    client: Client,
    reconciler: Arc<SecretReconciler<KubeCluster>>,
    mut leading: watch::Receiver<bool>,
) {
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        tracing::info!("HSMSecret controller starts (leader)");
        let mut stop = leading.clone();
        let stopped = async move {
            let _ = stop.wait_for(|l| !*l).await;
        };
        let ctx = Arc::new(Context {
            reconciler: reconciler.clone(),
            leading: leading.clone(),
        });
        // A fresh cache per term: what was seen while following is stale.
        let (reader, writer) = reflector::store();
        let hsmsecrets = watcher(
            Api::<HSMSecret>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(strip_for_cache)
        .reflect(writer)
        .applied_objects();
        let owned = watcher(
            Api::<PartialObjectMeta<Secret>>::all(client.clone()),
            watcher::Config::default().labels(DEVICE_LABEL),
        )
        .default_backoff()
        .touched_objects();
        let imports = watcher(
            Api::<PartialObjectMeta<Secret>>::all(client.clone()),
            watcher::Config::default().labels(IMPORT_FOR_LABEL),
        )
        .default_backoff()
        .touched_objects();
        Controller::for_stream(hsmsecrets, reader)
            .with_config(controller::Config::default().concurrency(CONCURRENCY))
            .owns_stream(owned)
            .watches_stream(imports, import_target)
            .graceful_shutdown_on(stopped)
            .run(reconcile, error_policy, ctx)
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HSMSecret controller event");
                }
            })
            .await;
        tracing::info!("HSMSecret controller stopped (not the leader)");
        if leading.has_changed().is_err() {
            return;
        }
    }
}

async fn reconcile(object: Arc<HSMSecret>, ctx: Arc<Context>) -> Result<Action, SyncError> {
    // The Lease may have been lost since the Controller started: write nothing then.
    if !*ctx.leading.borrow() {
        return Ok(Action::await_change());
    }
    let outcome = ctx.reconciler.reconcile(&object).await?;
    Ok(if outcome.finalized {
        Action::await_change()
    } else {
        Action::requeue(outcome.requeue_after)
    })
}

fn error_policy(_object: Arc<HSMSecret>, error: &SyncError, _ctx: Arc<Context>) -> Action {
    match error.kind() {
        SyncErrorKind::Conflict => Action::requeue(Duration::from_millis(500)),
        _ => Action::requeue(Duration::from_secs(5)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, message: &str) -> kube::Error {
        let mut status = kube::core::Status::failure(message, "Invalid");
        status.code = code;
        kube::Error::Api(Box::new(status))
    }

    /// An API failure keeps the API server's answer as its cause: a log shows the chain,
    /// and code matches on the status instead of parsing text.
    #[test]
    fn an_api_failure_keeps_its_cause() {
        let error = map_err(
            || "HSMSecret shop/db".into(),
            api_error(500, "etcd timeout"),
        );
        assert_eq!(error.kind(), SyncErrorKind::Api);
        assert!(error.to_string().contains("etcd timeout"), "{error}");
        let SyncError::Api(cause) = &error else {
            panic!("{error:?}")
        };
        let Some(kube::Error::Api(status)) = cause.downcast_ref::<kube::Error>() else {
            panic!("the kube::Error is kept: {cause:?}")
        };
        assert_eq!(status.code, 500);
        assert!(std::error::Error::source(&error).is_some());
        assert_eq!(error.clone(), error, "still Clone and comparable");
    }

    #[test]
    fn a_secret_the_api_server_refuses_is_reported_as_such_not_retried_as_a_conflict() {
        let what = || "Secret shop/db".to_string();
        let refused = map_secret_write_err(
            what,
            api_error(
                422,
                "Secret \"db\" is invalid: data[tls.crt]: Required value",
            ),
        );
        assert_eq!(refused.kind(), SyncErrorKind::Rejected);
        let text = refused.to_string();
        assert!(
            text.contains("refused Secret shop/db")
                && text.contains("data[tls.crt]: Required value"),
            "{text}"
        );
        assert!(text.contains("spec.secretType"), "{text}");
        // A lost race on a create is a conflict; a patch whose precondition failed too.
        assert_eq!(
            map_secret_write_err(what, api_error(409, "already exists")).kind(),
            SyncErrorKind::Conflict
        );
        assert_eq!(
            map_err(what, api_error(422, "the test operation failed")).kind(),
            SyncErrorKind::Conflict
        );
        assert_eq!(
            map_secret_write_err(what, api_error(500, "etcd")).kind(),
            SyncErrorKind::Api
        );
    }
}
