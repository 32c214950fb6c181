//! The csi crate's [`VolumeSource`] over the node's local HSM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use hsm_secrets_csi::{Payload, PayloadFile, PublishRequest, SourceError, VolumeSource};

use super::attributes::VolumeRequest;
use super::remote::RemoteReads;
use super::{LocalDevice, NodeMetrics, SecretCatalog, VolumeError, access};
use crate::hsm::{SecretData, SecretPath, SecretStore, StoreError, validate_key};

/// Fills volumes with HSM secrets: parses the volume context, authorizes the pod against
/// each HSMSecret, reads the secrets from the local device.
pub struct HsmVolumeSource {
    catalog: Arc<dyn SecretCatalog>,
    device: Option<Arc<LocalDevice>>,
    remote: Option<Arc<RemoteReads>>,
    metrics: Option<NodeMetrics>,
    /// Whether reads of the node's own device currently go through its agents (logged
    /// once per change, not per publish).
    falling_back: AtomicBool,
}

impl HsmVolumeSource {
    /// `device` is this node's HSM; None for a node without one (publishing then answers
    /// Unavailable).
    pub fn new(catalog: Arc<dyn SecretCatalog>, device: Option<Arc<LocalDevice>>) -> Self {
        Self {
            catalog,
            device,
            remote: None,
            metrics: None,
            falling_back: AtomicBool::new(false),
        }
    }

    /// Read devices this node holds no token of through their agents, and this node's
    /// own device while its token cannot serve.
    pub fn with_remote_reads(mut self, remote: Arc<RemoteReads>) -> Self {
        self.remote = Some(remote);
        self
    }

    /// Count refused and failed volumes by [`VolumeError::kind`].
    pub fn with_metrics(mut self, metrics: NodeMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn device(&self) -> Option<&Arc<LocalDevice>> {
        self.device.as_ref()
    }

    /// The files of the volume `request` describes.
    pub async fn resolve(&self, request: &PublishRequest) -> Result<Payload, VolumeError> {
        let volume = VolumeRequest::parse(&request.volume_context, &request.target_path)?;
        let mut paths = Vec::with_capacity(volume.secrets.len());
        for secret in &volume.secrets {
            access::require_own_namespace(&volume.pod, secret)?;
            let found = self
                .catalog
                .hsm_secret(&secret.namespace, &secret.name)
                .await?;
            let path = access::authorize(&volume.pod, &volume.device, secret, found.as_ref())?;
            paths.push(path);
        }
        let secrets = self.read_all(&volume.device, &paths).await?;

        let mut files = Vec::new();
        for (path, data) in paths.iter().zip(&secrets) {
            for (key, value) in data.iter() {
                // The store validates keys on write; checked again because they become
                // file names on the node.
                validate_key(key).map_err(|source| VolumeError::Store {
                    path: path.to_string(),
                    device: volume.device.clone(),
                    source: Box::new(source),
                })?;
                files.push(PayloadFile::new(
                    format!("{}/{key}", path.name()),
                    value.to_vec(),
                    volume.file_mode,
                ));
            }
        }
        Ok(Payload::new(files))
    }

    /// Reads `paths` from the node's own token when it holds the device, else through
    /// the device's agents. A node whose token is not open (absent, PIN missing) or not
    /// answering reads through the agents too when it has remote reads: the DaemonSet
    /// names the device on every node, including nodes whose HSM is gone.
    async fn read_all(
        &self,
        device: &str,
        paths: &[SecretPath],
    ) -> Result<Vec<SecretData>, VolumeError> {
        let local = self.device.as_ref().filter(|d| d.name() == device);
        let Some(local) = local else {
            let Some(remote) = &self.remote else {
                return Err(VolumeError::NoLocalDevice {
                    device: device.to_string(),
                    node_device: self.device.as_ref().map(|d| d.name().to_string()),
                });
            };
            return read_from(remote.store(device).await?.as_ref(), device, paths).await;
        };
        let local_read = match local.store() {
            Ok(store) => read_from(store.as_ref(), device, paths).await,
            Err(not_open) => Err(not_open),
        };
        let error = match (local_read, &self.remote) {
            (Err(error), Some(_)) if local_unavailable(&error) => error,
            (result, _) => {
                if result.is_ok() && self.falling_back.swap(false, Ordering::Relaxed) {
                    tracing::info!(device, "the local token serves reads again");
                }
                return result;
            }
        };
        if !self.falling_back.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                device,
                %error,
                kind = error.kind(),
                "the local token cannot serve; reading through the device's agents"
            );
        } else {
            tracing::debug!(
                device,
                kind = error.kind(),
                "reading through the device's agents"
            );
        }
        if let Some(metrics) = &self.metrics {
            metrics.remote_fallback(error.kind());
        }
        let remote = self.remote.as_ref().ok_or(error)?;
        read_from(remote.store(device).await?.as_ref(), device, paths).await
    }
}

/// Whether the local token's failure is one the device's agents can cover: the token is
/// not open or not answering, not a missing secret or a corrupt object.
fn local_unavailable(error: &VolumeError) -> bool {
    match error {
        VolumeError::DeviceNotOpen { .. } => true,
        VolumeError::Store { source, .. } => source.is_transient(),
        _ => false,
    }
}

/// Secrets are independent objects on the token: read them concurrently.
async fn read_from(
    store: &dyn SecretStore,
    device: &str,
    paths: &[SecretPath],
) -> Result<Vec<SecretData>, VolumeError> {
    futures::future::try_join_all(paths.iter().map(|path| read_secret(store, device, path))).await
}

async fn read_secret(
    store: &dyn SecretStore,
    device: &str,
    path: &SecretPath,
) -> Result<SecretData, VolumeError> {
    match store.get(path).await {
        Ok((_version, data)) => Ok(data),
        Err(StoreError::NotFound { token, .. }) => Err(VolumeError::NotOnToken {
            path: path.to_string(),
            token,
            device: device.to_string(),
        }),
        Err(source) => Err(VolumeError::Store {
            path: path.to_string(),
            device: device.to_string(),
            source: Box::new(source),
        }),
    }
}

#[async_trait]
impl VolumeSource for HsmVolumeSource {
    async fn payload(&self, request: &PublishRequest) -> Result<Payload, SourceError> {
        self.resolve(request).await.map_err(|error| {
            if let Some(metrics) = &self.metrics {
                metrics.volume_error(error.kind());
            }
            SourceError::from(error)
        })
    }

    /// Ready when HSMSecrets can be looked up and, on a node with an HSM, its token answers.
    async fn ready(&self) -> Result<(), SourceError> {
        self.catalog
            .ready()
            .await
            .map_err(|e| SourceError::from(VolumeError::from(e)))?;
        let Some(device) = &self.device else {
            return Ok(());
        };
        let health = match device.store() {
            Ok(store) => {
                store
                    .health()
                    .await
                    .map(drop)
                    .map_err(|source| VolumeError::DeviceUnhealthy {
                        device: device.name().to_string(),
                        source: Box::new(source),
                    })
            }
            Err(not_open) => Err(not_open),
        };
        if let Some(metrics) = &self.metrics {
            metrics.set_device_ready(health.is_ok());
        }
        health.map_err(SourceError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_token_that_cannot_answer_falls_back_to_the_agents() {
        let store = |source| VolumeError::Store {
            path: "shop/db".into(),
            device: "prod-hsm".into(),
            source: Box::new(source),
        };
        let not_open = VolumeError::DeviceNotOpen {
            device: "prod-hsm".into(),
            reason: "no token".into(),
        };
        let unplugged = store(StoreError::DeviceUnavailable {
            token: "t".into(),
            detail: "removed".into(),
        });
        let missing = VolumeError::NotOnToken {
            path: "shop/db".into(),
            token: "t".into(),
            device: "prod-hsm".into(),
        };
        assert!(local_unavailable(&not_open));
        assert!(local_unavailable(&unplugged));
        // A secret the token lacks is an answer, not an outage: no second opinion.
        assert!(!local_unavailable(&missing));
    }
}
