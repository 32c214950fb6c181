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
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, Resource};

use super::{EventRecord, ObjectRef, StateError, StateStore};
use crate::crd::{HSMDevice, HSMDeviceStatus, HSMSecret, HSMSecretStatus};
use crate::kube_events::{self, Reporter};
use crate::lease::LeaseLock;

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
    /// The elections this replica takes part in, by Lease and identity: each keeps what
    /// it observed of its Lease, since expiry is judged on this replica's own clock.
    leases: Arc<std::sync::Mutex<Elections>>,
}

/// A reflector of every HSMDevice, and a signal when one's spec or annotations change.
#[derive(Clone)]
struct DeviceCache {
    store: reflector::Store<HSMDevice>,
    changed: Arc<Notify>,
    _task: Arc<AbortOnDrop>,
}

/// Elections by (Lease name, identity).
type Elections = BTreeMap<(String, String), Arc<LeaseLock>>;

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
            leases: Arc::default(),
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
        let lock = {
            let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
            let lock = leases
                .entry((lease.to_string(), holder.to_string()))
                .or_insert_with(|| {
                    Arc::new(LeaseLock::new(
                        self.client.clone(),
                        &self.lease_namespace,
                        lease,
                        holder,
                        duration,
                    ))
                });
            // A new duration is a new election setting: start its observation afresh.
            if lock.duration() != duration {
                *lock = Arc::new(LeaseLock::new(
                    self.client.clone(),
                    &self.lease_namespace,
                    lease,
                    holder,
                    duration,
                ));
            }
            lock.clone()
        };
        lock.try_acquire_or_renew().await.map_err(api_err)
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
