//! The csi crate's [`VolumeSource`] over the node's local HSM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use hsm_secrets_csi::{Payload, PublishRequest, SourceError, VolumeSource};

use super::attributes::VolumeRequest;
use super::audit::{Mounts, ReadFrom, SecretVersion, VolumeRead};
use super::remote::RemoteReads;
use super::render;
use super::{LocalDevice, NodeMetrics, SecretCatalog, VolumeError, access};
use crate::hsm::{SecretData, SecretPath, SecretStore, StoreError};

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
    /// Where each publish notes what it read, for the audit trail.
    mounts: Option<Arc<Mounts>>,
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
            mounts: None,
        }
    }

    /// Note what each publish read (secret versions, which copy) in `mounts`.
    pub fn with_mounts(mut self, mounts: Arc<Mounts>) -> Self {
        self.mounts = Some(mounts);
        self
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
        let (read_from, secrets) = self.read_all(&volume.device, &paths).await?;

        let mut files = Vec::new();
        for (path, (_, data)) in paths.iter().zip(&secrets) {
            files.extend(render::render_secret(
                path.name(),
                data,
                &volume.layout,
                volume.file_mode,
            )?);
        }
        if let Some(mounts) = &self.mounts {
            let secrets = paths
                .iter()
                .zip(&secrets)
                .map(|(path, (version, _))| SecretVersion {
                    name: path.name().to_string(),
                    version: Some(*version),
                })
                .collect();
            let read = VolumeRead {
                device: volume.device.clone(),
                read_from,
                secrets,
            };
            mounts.read(&request.target_path, read);
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
    ) -> Result<(ReadFrom, Vec<(u64, SecretData)>), VolumeError> {
        let local = self.device.as_ref().filter(|d| d.name() == device);
        let Some(local) = local else {
            let Some(remote) = &self.remote else {
                return Err(VolumeError::NoLocalDevice {
                    device: device.to_string(),
                    node_device: self.device.as_ref().map(|d| d.name().to_string()),
                });
            };
            let store = remote.store(device).await?;
            return Ok((
                ReadFrom::RemoteAgents,
                read_from(store.as_ref(), device, paths).await?,
            ));
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
                return result.map(|read| (ReadFrom::local(local.role()), read));
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
        let store = remote.store(device).await?;
        Ok((
            ReadFrom::RemoteAgents,
            read_from(store.as_ref(), device, paths).await?,
        ))
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
) -> Result<Vec<(u64, SecretData)>, VolumeError> {
    futures::future::try_join_all(paths.iter().map(|path| read_secret(store, device, path))).await
}

async fn read_secret(
    store: &dyn SecretStore,
    device: &str,
    path: &SecretPath,
) -> Result<(u64, SecretData), VolumeError> {
    match store.get(path).await {
        Ok(read) => Ok(read),
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
