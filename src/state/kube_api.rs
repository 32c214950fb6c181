//! The state store on a cluster: HSMDevice/HSMSecret through the API server, Events via
//! events.k8s.io, node labels by merge patch, and a coordination.k8s.io Lease.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher::{self, watcher};
use tokio::sync::Notify;

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource};

use super::{EventRecord, ObjectRef, StateError, StateStore};
use crate::crd::{HSMDevice, HSMDeviceStatus, HSMSecret, HSMSecretStatus};
use crate::kube_events::{self, Reporter};

/// Field manager and Event reporter name.
pub const MANAGER: &str = "hsm-secrets-controller";

#[derive(Clone)]
pub struct KubeState {
    client: Client,
    reporter: Reporter,
    /// Namespace holding the controller's Lease.
    lease_namespace: String,
    /// HSMDevices from a watch, when [`watching_devices`](Self::watching_devices).
    devices: Option<DeviceCache>,
}

/// A reflector of every HSMDevice, and a signal when one's spec or annotations change.
#[derive(Clone)]
struct DeviceCache {
    store: reflector::Store<HSMDevice>,
    changed: Arc<Notify>,
    _task: Arc<AbortOnDrop>,
}

/// What a round must follow: the spec (generation) and the annotations.
type SpecVersion = (Option<i64>, Option<BTreeMap<String, String>>);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl KubeState {
    pub fn new(
        client: Client,
        lease_namespace: impl Into<String>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: instance.unwrap_or_else(|| MANAGER.into()),
        };
        Self {
            client,
            reporter,
            lease_namespace: lease_namespace.into(),
            devices: None,
        }
    }

    /// Lists HSMDevices from a watch instead of the API server each round, and wakes the
    /// controller when a device's spec or annotations change (its own status writes do
    /// not wake it: they would make every round start the next). Spawns the watch.
    pub fn watching_devices(mut self) -> Self {
        let (store, writer) = reflector::store();
        let changed = Arc::new(Notify::new());
        let stream = watcher(
            Api::<HSMDevice>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(writer)
        .applied_objects();
        let notify = changed.clone();
        let task = tokio::spawn(async move {
            let mut seen: HashMap<String, SpecVersion> = HashMap::new();
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                let device = match event {
                    Ok(device) => device,
                    Err(error) => {
                        tracing::warn!(%error, "HSMDevice watch failed; retrying");
                        continue;
                    }
                };
                let key = device.metadata.name.clone().unwrap_or_default();
                let now = (
                    device.metadata.generation,
                    device.metadata.annotations.clone(),
                );
                if seen.get(&key) != Some(&now) {
                    seen.insert(key, now);
                    notify.notify_one();
                }
            }
        });
        self.devices = Some(DeviceCache {
            store,
            changed,
            _task: Arc::new(AbortOnDrop(task)),
        });
        self
    }
}

fn api_err(e: kube::Error) -> StateError {
    StateError::Api(e)
}

/// 409, or 422 from a failed JSON Patch `test` (our resourceVersion precondition).
fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 422)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

#[async_trait]
impl StateStore for KubeState {
    async fn list_devices(&self) -> Result<Vec<HSMDevice>, StateError> {
        if let Some(cache) = &self.devices {
            // Ready once the watch listed everything; until then, ask the API server.
            if tokio::time::timeout(Duration::ZERO, cache.store.wait_until_ready())
                .await
                .is_ok_and(|ready| ready.is_ok())
            {
                return Ok(cache.store.state().iter().map(|d| (**d).clone()).collect());
            }
        }
        let api: Api<HSMDevice> = Api::all(self.client.clone());
        Ok(api
            .list(&ListParams::default())
            .await
            .map_err(api_err)?
            .items)
    }

    async fn wait_device_change(&self, max: Duration) {
        match &self.devices {
            Some(cache) => {
                let _ = tokio::time::timeout(max, cache.changed.notified()).await;
            }
            None => tokio::time::sleep(max).await,
        }
    }

    async fn get_device(&self, name: &str) -> Result<Option<HSMDevice>, StateError> {
        let api: Api<HSMDevice> = Api::all(self.client.clone());
        api.get_opt(name).await.map_err(api_err)
    }

    async fn replace_device_status(
        &self,
        name: &str,
        resource_version: &str,
        status: &HSMDeviceStatus,
    ) -> Result<HSMDevice, StateError> {
        let api: Api<HSMDevice> = Api::all(self.client.clone());
        let patch = status_patch(resource_version, status)?;
        api.patch_status(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
            .map_err(|e| {
                if is_conflict(&e) {
                    StateError::Conflict {
                        kind: "HSMDevice",
                        name: name.into(),
                        expected: resource_version.into(),
                    }
                } else if is_not_found(&e) {
                    StateError::NotFound {
                        kind: "HSMDevice",
                        name: name.into(),
                    }
                } else {
                    api_err(e)
                }
            })
    }

    async fn clear_device_annotation(&self, name: &str, key: &str) -> Result<(), StateError> {
        let api: Api<HSMDevice> = Api::all(self.client.clone());
        let patch = serde_json::json!({"metadata": {"annotations": {key: null}}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(api_err)
    }

    async fn list_secrets(&self) -> Result<Vec<HSMSecret>, StateError> {
        let api: Api<HSMSecret> = Api::all(self.client.clone());
        Ok(api
            .list(&ListParams::default())
            .await
            .map_err(api_err)?
            .items)
    }

    async fn get_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<HSMSecret>, StateError> {
        let api: Api<HSMSecret> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name).await.map_err(api_err)
    }

    async fn replace_secret_status(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
        status: &HSMSecretStatus,
    ) -> Result<HSMSecret, StateError> {
        let api: Api<HSMSecret> = Api::namespaced(self.client.clone(), namespace);
        let patch = status_patch(resource_version, status)?;
        api.patch_status(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
            .map_err(|e| {
                if is_conflict(&e) {
                    StateError::Conflict {
                        kind: "HSMSecret",
                        name: format!("{namespace}/{name}"),
                        expected: resource_version.into(),
                    }
                } else {
                    api_err(e)
                }
            })
    }

    async fn record_event(
        &self,
        regarding: &ObjectRef,
        event: &EventRecord,
    ) -> Result<(), StateError> {
        let reference = ObjectReference {
            api_version: Some(HSMDevice::api_version(&()).into_owned()),
            kind: Some(regarding.kind.clone()),
            name: Some(regarding.name.clone()),
            namespace: regarding.namespace.clone(),
            uid: regarding.uid.clone(),
            ..Default::default()
        };
        let what = event.occurrence();
        kube_events::publish(
            &self.client,
            &kube_events::build(reference, &self.reporter, &what),
        )
        .await
        .map_err(api_err)
    }

    async fn set_node_label(
        &self,
        node: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), StateError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let patch = serde_json::json!({"metadata": {"labels": {key: value}}});
        api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(api_err)
    }

    async fn acquire_lease(
        &self,
        lease: &str,
        holder: &str,
        duration: Duration,
    ) -> Result<bool, StateError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.lease_namespace);
        let now = MicroTime(jiff_now());
        let seconds = duration.as_secs().max(1) as i32;
        let current = api.get_opt(lease).await.map_err(api_err)?;
        let Some(mut current) = current else {
            let fresh = Lease {
                metadata: ObjectMeta {
                    name: Some(lease.into()),
                    namespace: Some(self.lease_namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.into()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &fresh).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(api_err(e)),
            };
        };
        let spec = current.spec.get_or_insert_with(Default::default);
        let held_by_other = spec.holder_identity.as_deref().is_some_and(|h| h != holder);
        let fresh = spec.renew_time.as_ref().is_some_and(|t| {
            let age = now.0.duration_since(t.0);
            age.as_secs() < i64::from(spec.lease_duration_seconds.unwrap_or(15))
        });
        if held_by_other && fresh {
            return Ok(false);
        }
        if held_by_other || spec.holder_identity.is_none() {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(holder.into());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        // replace carries the resourceVersion we read: a racing holder gets a 409.
        match api.replace(lease, &PostParams::default(), &current).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(api_err(e)),
        }
    }
}

/// Replaces the whole status only if the object is still at `resource_version`: a JSON
/// Patch `test` on the resourceVersion makes the API server refuse a stale write (409).
fn status_patch(
    resource_version: &str,
    status: &impl serde::Serialize,
) -> Result<json_patch::Patch, StateError> {
    let value = serde_json::to_value(status).map_err(|source| StateError::Encode {
        what: "a status",
        source,
    })?;
    serde_json::from_value(serde_json::json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version},
        {"op": "add", "path": "/status", "value": value},
    ]))
    .map_err(|source| StateError::Encode {
        what: "a status patch",
        source,
    })
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
