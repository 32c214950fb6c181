//! The csi crate's [`VolumeSource`] over the node's local HSM.

use std::sync::Arc;

use async_trait::async_trait;
use hsm_secrets_csi::{Payload, PayloadFile, PublishRequest, SourceError, VolumeSource};

use super::attributes::VolumeRequest;
use super::remote::RemoteReads;
use super::{LocalDevice, NodeMetrics, SecretCatalog, VolumeError, access};
use crate::hsm::{SecretPath, SecretStore, StoreError, validate_key};

/// Fills volumes with HSM secrets: parses the volume context, authorizes the pod against
/// each HSMSecret, reads the secrets from the local device.
pub struct HsmVolumeSource {
    catalog: Arc<dyn SecretCatalog>,
    device: Option<Arc<LocalDevice>>,
    remote: Option<Arc<RemoteReads>>,
    metrics: Option<NodeMetrics>,
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
        }
    }

    /// Read devices this node holds no token of through their agents.
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
        let store = self.store_for(&volume.device).await?;
        // Secrets are independent objects on the token: read them concurrently.
        let reads = paths
            .iter()
            .map(|path| read_secret(store.as_ref(), &volume.device, path));
        let secrets = futures::future::try_join_all(reads).await?;

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

    /// The node's own token when it holds the device, else the device's agents.
    async fn store_for(&self, device: &str) -> Result<Arc<dyn SecretStore>, VolumeError> {
        match (&self.device, &self.remote) {
            (Some(local), _) if local.name() == device => local.store(),
            (_, Some(remote)) => remote.store(device).await,
            (other, None) => Err(VolumeError::NoLocalDevice {
                device: device.to_string(),
                node_device: other.as_ref().map(|d| d.name().to_string()),
            }),
        }
    }
}

async fn read_secret(
    store: &dyn SecretStore,
    device: &str,
    path: &SecretPath,
) -> Result<crate::hsm::SecretData, VolumeError> {
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
