//! HSMSecrets from the Kubernetes API through a kube-runtime reflector: one list and a
//! watch for the whole cluster, lookups answered from memory (no API call per publish).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::StreamExt as _;
use kube::runtime::reflector::{ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::task::JoinHandle;

use super::{CatalogError, SecretCatalog};
use crate::crd::HSMSecret;

#[derive(Default)]
struct SyncState {
    synced: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// A cache of every HSMSecret in the cluster, kept current by a watch.
pub struct KubeCatalog {
    store: Store<HSMSecret>,
    state: Arc<SyncState>,
    task: JoinHandle<()>,
}

impl KubeCatalog {
    /// Starts listing and watching HSMSecrets in all namespaces. Must be called inside a
    /// tokio runtime; the watch stops when the catalog is dropped.
    pub fn spawn(client: Client) -> Self {
        let (store, writer) = kube::runtime::reflector::store();
        let state = Arc::new(SyncState::default());
        let api: Api<HSMSecret> = Api::all(client);
        let stream = reflector(
            writer,
            watcher(api, watcher::Config::default()).default_backoff(),
        );
        let task = tokio::spawn(run(stream, state.clone()));
        Self { store, state, task }
    }

    fn lock_error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.state
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn not_synced(&self) -> CatalogError {
        let reason = self.lock_error().clone().unwrap_or_else(|| {
            "waiting for the first list of HSMSecrets from the Kubernetes API".into()
        });
        CatalogError::NotSynced { reason }
    }
}

async fn run(
    stream: impl futures::Stream<Item = Result<watcher::Event<HSMSecret>, watcher::Error>>,
    state: Arc<SyncState>,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::InitDone) => {
                if !state.synced.swap(true, Ordering::SeqCst) {
                    tracing::info!("HSMSecret cache synchronized");
                }
                *state.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            Ok(_) => {}
            Err(error) => {
                // Keeps serving from the cache it has; the watcher backs off and relists.
                let reason = format!(
                    "{error}; check that the node plugin's ClusterRole allows get, list and \
                     watch on hsmsecrets.hsmsecrets.io and that the CRDs are installed"
                );
                tracing::warn!(%reason, "HSMSecret watch failed");
                *state.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
            }
        }
    }
}

impl Drop for KubeCatalog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[async_trait]
impl SecretCatalog for KubeCatalog {
    async fn hsm_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<HSMSecret>, CatalogError> {
        // Before the first list, "absent" would be a lie that kubelet turns into a NotFound
        // event: answer Unavailable so it retries.
        if !self.state.synced.load(Ordering::SeqCst) {
            return Err(self.not_synced());
        }
        let key = ObjectRef::new(name).within(namespace);
        Ok(self.store.get(&key).map(|s| (*s).clone()))
    }

    async fn ready(&self) -> Result<(), CatalogError> {
        if self.state.synced.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(self.not_synced())
        }
    }
}
