//! What the admission rules know about the cluster: HSMDevices and
//! HSMSecrets, read from memory on every review (never an API call).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use futures::StreamExt as _;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, ResourceExt as _};

use crate::crd::{HSMDevice, HSMSecret};

/// Read access to the cached HSMDevices and HSMSecrets.
pub trait AdmissionState: Send + Sync + 'static {
    /// The HSMDevice called `name`.
    fn device(&self, name: &str) -> Option<Arc<HSMDevice>>;
    /// Every HSMDevice (for checks across devices, e.g. token claims).
    fn devices(&self) -> Vec<Arc<HSMDevice>>;
    /// The HSMSecret `namespace/name`.
    fn secret(&self, namespace: &str, name: &str) -> Option<Arc<HSMSecret>>;
    /// Whether the cache holds a complete picture; until then the webhook is
    /// not ready and the Service sends it no reviews.
    fn is_synced(&self) -> bool;
}

impl<S: AdmissionState + ?Sized> AdmissionState for Arc<S> {
    fn device(&self, name: &str) -> Option<Arc<HSMDevice>> {
        (**self).device(name)
    }
    fn devices(&self) -> Vec<Arc<HSMDevice>> {
        (**self).devices()
    }
    fn secret(&self, namespace: &str, name: &str) -> Option<Arc<HSMSecret>> {
        (**self).secret(namespace, name)
    }
    fn is_synced(&self) -> bool {
        (**self).is_synced()
    }
}

/// State held in plain maps: for tests, benchmarks and the local demo.
#[derive(Default)]
pub struct MemoryState {
    devices: RwLock<BTreeMap<String, Arc<HSMDevice>>>,
    secrets: RwLock<BTreeMap<(String, String), Arc<HSMSecret>>>,
}

impl MemoryState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add or replace a device (keyed by its name).
    pub fn put_device(&self, device: HSMDevice) {
        self.devices
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(device.name_any(), Arc::new(device));
    }

    pub fn remove_device(&self, name: &str) {
        self.devices
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
    }

    /// Add or replace a secret (keyed by namespace and name).
    pub fn put_secret(&self, secret: HSMSecret) {
        let key = (secret.namespace().unwrap_or_default(), secret.name_any());
        self.secrets
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, Arc::new(secret));
    }

    pub fn remove_secret(&self, namespace: &str, name: &str) {
        self.secrets
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(namespace.to_owned(), name.to_owned()));
    }
}

impl AdmissionState for MemoryState {
    fn device(&self, name: &str) -> Option<Arc<HSMDevice>> {
        self.devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn devices(&self) -> Vec<Arc<HSMDevice>> {
        self.devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<Arc<HSMSecret>> {
        self.secrets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    fn is_synced(&self) -> bool {
        true
    }
}

/// State from kube-runtime reflectors watching every HSMDevice and HSMSecret.
#[derive(Clone)]
pub struct ReflectorState {
    devices: Store<HSMDevice>,
    secrets: Store<HSMSecret>,
    synced: Arc<AtomicBool>,
}

impl ReflectorState {
    /// Watch both kinds through `client`. The returned future drives the
    /// watches (reconnecting with backoff) and must be polled for the state
    /// to fill and stay current; it runs until dropped.
    pub fn watch(client: Client) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (devices, device_writer) = reflector::store::<HSMDevice>();
        let (secrets, secret_writer) = reflector::store::<HSMSecret>();
        let state = ReflectorState::from_stores(devices, secrets);
        let device_stream = reflector::reflector(
            device_writer,
            watcher(
                Api::<HSMDevice>::all(client.clone()),
                watcher::Config::default(),
            )
            .modify(|device| device.managed_fields_mut().clear()),
        )
        .default_backoff();
        let secret_stream = reflector::reflector(
            secret_writer,
            watcher(Api::<HSMSecret>::all(client), watcher::Config::default())
                .modify(|secret| secret.managed_fields_mut().clear()),
        )
        .default_backoff();
        let drive = async move {
            let devices = device_stream.for_each(|event| async move {
                if let Err(error) = event {
                    tracing::warn!(%error, kind = "HSMDevice", "watch failed; retrying with backoff");
                }
            });
            let secrets = secret_stream.for_each(|event| async move {
                if let Err(error) = event {
                    tracing::warn!(%error, kind = "HSMSecret", "watch failed; retrying with backoff");
                }
            });
            futures::join!(devices, secrets);
        };
        (state, drive)
    }

    /// State over existing stores; synced once both stores have received
    /// their initial list (the returned state's readiness task must run on a
    /// Tokio runtime).
    pub fn from_stores(devices: Store<HSMDevice>, secrets: Store<HSMSecret>) -> Self {
        let synced = Arc::new(AtomicBool::new(false));
        let (d, s, flag) = (devices.clone(), secrets.clone(), synced.clone());
        tokio::spawn(async move {
            if d.wait_until_ready().await.is_ok() && s.wait_until_ready().await.is_ok() {
                flag.store(true, Ordering::Release);
                tracing::info!(
                    devices = d.len(),
                    secrets = s.len(),
                    "HSMDevice and HSMSecret caches synced"
                );
            }
        });
        ReflectorState {
            devices,
            secrets,
            synced,
        }
    }
}

impl AdmissionState for ReflectorState {
    fn device(&self, name: &str) -> Option<Arc<HSMDevice>> {
        self.devices.get(&ObjectRef::new(name))
    }

    fn devices(&self) -> Vec<Arc<HSMDevice>> {
        self.devices.state()
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<Arc<HSMSecret>> {
        self.secrets.get(&ObjectRef::new(name).within(namespace))
    }

    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}
