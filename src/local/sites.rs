//! A device spread over two local systems, each standing for a cluster of one site: what
//! an operator does to them (the no-cluster `kubectl hsm site`), and the reads and writes
//! the two-site walk-through and its tests check.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use super::LocalError;
use super::clients::{self, PodIdentity};
use super::cluster::{
    BucketConfig, Follows, LocalCluster, NAMESPACE, SERVICE_ACCOUNT, SiteConfig, StateFile,
};
use crate::crd::{HSMDevice, SITE_DRAIN_ANNOTATION, SITE_PROMOTE_ANNOTATION, SiteRole, SiteStatus};
use crate::hsm::{Expect, SecretData, SecretPath};
use crate::inject::{ATTRIBUTE_DEVICE, ATTRIBUTE_SECRETS, VOLUME_NAME};
use crate::kubectl::site::{
    Rejoin, SiteView, drain_refusal, promote_refusal, promotion_outcome, role_line,
};
use crate::state::{FileState, StateStore};

/// The active site's device, and the passive one's.
pub const DEVICES: [&str; 2] = ["prod-hsm", "prod-hsm-b"];
/// Their `spec.site.name`.
pub const SITES: [&str; 2] = ["site-a", "site-b"];
/// `spec.site.leaseSeconds` of the local sites: the least the API accepts, so a promotion
/// waits seconds, not half a minute.
pub const LEASE_SECONDS: u32 = 5;
/// fsGroup of the pods the walk-through mounts volumes for.
const FS_GROUP: u32 = 2000;

/// The configuration of site `index` (0 active, 1 passive following `follows`).
pub fn site_config(index: usize, bucket: BucketConfig, follows: Option<Follows>) -> SiteConfig {
    SiteConfig {
        name: SITES[index].into(),
        device: DEVICES[index].into(),
        bucket,
        lease_seconds: LEASE_SECONDS,
        follows,
    }
}

/// The operator of one site's system: reads its device and asks for promotion, drain or
/// rejoin through annotations and spec, as `kubectl hsm site` does on a cluster.
pub struct SiteOperator {
    state: FileState,
    device: String,
}

impl SiteOperator {
    pub fn new(state: &StateFile) -> Result<Self, LocalError> {
        Ok(Self {
            state: FileState::open(&state.state_dir)?,
            device: state.device.clone(),
        })
    }

    pub fn of(cluster: &LocalCluster) -> Result<Self, LocalError> {
        Ok(Self {
            state: FileState::open(&cluster.state_dir)?,
            device: cluster.device.clone(),
        })
    }

    pub async fn device(&self) -> Result<HSMDevice, LocalError> {
        self.state
            .get_device(&self.device)
            .await?
            .ok_or_else(|| LocalError::Check(format!("HSMDevice {} is missing", self.device)))
    }

    pub async fn view(&self) -> Result<SiteView, LocalError> {
        SiteView::new(&self.device().await?).map_err(|e| LocalError::Check(e.to_string()))
    }

    pub async fn site(&self) -> Result<Option<SiteStatus>, LocalError> {
        Ok(self.device().await?.status.and_then(|s| s.site))
    }

    /// Waits until the site's status satisfies `done`.
    pub async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&SiteStatus) -> bool,
    ) -> Result<SiteStatus, LocalError> {
        let deadline = Instant::now() + timeout;
        loop {
            let site = self.site().await?;
            if let Some(site) = site.as_ref().filter(|s| done(s)) {
                return Ok(site.clone());
            }
            if Instant::now() >= deadline {
                return Err(LocalError::Timeout {
                    what: what.into(),
                    seconds: timeout.as_secs(),
                    hint: format!(
                        " ({}; last error {})",
                        role_line(site.as_ref()),
                        site.as_ref()
                            .and_then(|s| s.last_error.clone())
                            .unwrap_or_else(|| "none".into())
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn annotate(&self, key: &str, value: Option<String>) -> Result<(), LocalError> {
        let mut device = self.device().await?;
        let annotations = device.metadata.annotations.get_or_insert_default();
        match value {
            Some(value) => annotations.insert(key.into(), value),
            None => annotations.remove(key),
        };
        self.state.apply_device(&device)?;
        Ok(())
    }

    /// Promotes this passive site and waits until it is active (it fences the site it
    /// followed and waits out that site's lease first).
    pub async fn promote(&self, timeout: Duration) -> Result<SiteStatus, LocalError> {
        if let Some(refusal) = promote_refusal(&self.view().await?) {
            return Err(LocalError::Check(refusal));
        }
        let id = Timestamp::now().to_string();
        // A drain left from an earlier switchover must not hold the promoted site.
        self.annotate(SITE_DRAIN_ANNOTATION, None).await?;
        self.annotate(SITE_PROMOTE_ANNOTATION, Some(id.clone()))
            .await?;
        let deadline = Instant::now() + timeout;
        loop {
            let site = self.site().await?;
            match promotion_outcome(&id, site.as_ref()) {
                Some(Ok(site)) => {
                    // As `kubectl hsm site promote`: the promoted site follows nothing.
                    let mut device = self.device().await?;
                    if let Some(spec) = device.spec.site.as_mut() {
                        spec.follow_archive = None;
                    }
                    self.state.apply_device(&device)?;
                    return Ok(site);
                }
                Some(Err(error)) => {
                    return Err(LocalError::Check(format!("the promotion failed: {error}")));
                }
                None if Instant::now() >= deadline => {
                    return Err(LocalError::Timeout {
                        what: format!("the promotion of HSMDevice {}", self.device),
                        seconds: timeout.as_secs(),
                        hint: format!(" ({})", role_line(site.as_ref())),
                    });
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Drains this active site (no more writes; it keeps archiving), or calls it off.
    pub async fn drain(&self, undo: bool, timeout: Duration) -> Result<SiteStatus, LocalError> {
        if let Some(refusal) = drain_refusal(&self.view().await?) {
            return Err(LocalError::Check(refusal));
        }
        let value = (!undo).then(|| Timestamp::now().to_string());
        self.annotate(SITE_DRAIN_ANNOTATION, value).await?;
        self.wait("the drain", timeout, |s| s.draining != undo)
            .await
    }

    /// Turns this fenced site into a passive one following the site promoted over it; the
    /// rejoin's summary (whom it follows, what is lost) and the passive status.
    pub async fn rejoin(&self, timeout: Duration) -> Result<(String, SiteStatus), LocalError> {
        let mut device = self.device().await?;
        let view = SiteView::new(&device).map_err(|e| LocalError::Check(e.to_string()))?;
        let rejoin = Rejoin::plan(&device, &view).map_err(LocalError::Check)?;
        if let Some(site) = device.spec.site.as_mut() {
            site.follow_archive = Some(rejoin.follow);
        }
        if let Some(annotations) = device.metadata.annotations.as_mut() {
            annotations.remove(SITE_DRAIN_ANNOTATION);
        }
        self.state.apply_device(&device)?;
        let site = self
            .wait("the rejoined site to follow", timeout, |s| {
                s.role == SiteRole::Passive
            })
            .await?;
        Ok((rejoin.summary, site))
    }
}

/// A write through the current primary's agent (what a writing client does); the version.
pub async fn write(
    state: &StateFile,
    secret: &str,
    values: &[(&str, &[u8])],
) -> Result<u64, LocalError> {
    let (_, epoch, conn) = super::system::primary(state).await?;
    let path = secret_path(secret)?;
    let mut data = SecretData::new();
    for (key, value) in values {
        data.insert(key, value.to_vec())
            .map_err(|e| LocalError::Check(e.to_string()))?;
    }
    Ok(conn.put(&path, &data, Expect::Any, epoch).await?.version)
}

/// A secret as node `node`'s agent holds it (`None`: not there or deleted).
pub async fn read_agent(
    state: &StateFile,
    node: &str,
    secret: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, LocalError> {
    let endpoint = state
        .nodes
        .iter()
        .find(|n| n.name == node)
        .ok_or_else(|| LocalError::Check(format!("no node {node}")))?;
    let conn = clients::agent(node, &endpoint.agent, &state.controller_tls())?;
    let answer = match conn.get(&secret_path(secret)?).await {
        Err(crate::mirror::MirrorError::Remote {
            code: tonic::Code::NotFound,
            ..
        }) => return Ok(None),
        answer => answer?,
    };
    Ok(live_values(&answer.record))
}

/// What a pod on `node` reads: a volume published over the node's CSI socket, its files
/// read, and unpublished again.
pub async fn read_mounted(
    state: &StateFile,
    node: &str,
    secret: &str,
    pod: &str,
) -> Result<BTreeMap<String, Vec<u8>>, LocalError> {
    let endpoints = state
        .nodes
        .iter()
        .find(|n| n.name == node)
        .ok_or_else(|| LocalError::Check(format!("no node {node}")))?;
    let uid = format!("pod-{pod}-{node}");
    let target = clients::target_path(&endpoints.kubelet_dir, &uid, VOLUME_NAME)?;
    let volume_id = format!("csi-{uid}");
    let attributes = BTreeMap::from([
        (ATTRIBUTE_SECRETS.to_string(), secret.to_string()),
        (ATTRIBUTE_DEVICE.to_string(), state.device.clone()),
    ]);
    let request = clients::publish_request(
        &volume_id,
        &target,
        &attributes,
        &PodIdentity {
            namespace: NAMESPACE,
            name: pod,
            uid: &uid,
            service_account: SERVICE_ACCOUNT,
            fs_group: FS_GROUP,
        },
    );
    let mut csi = clients::csi(&endpoints.csi_socket).await?;
    csi.node_publish_volume(request)
        .await
        .map_err(|s| LocalError::Csi(format!("NodePublishVolume on {node}: {}", s.message())))?;
    let dir = target.join(secret);
    let read = (|| {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| LocalError::io("read", &dir, e))? {
            let path = entry.map_err(|e| LocalError::io("read", &dir, e))?.path();
            let content = std::fs::read(&path).map_err(|e| LocalError::io("read", &path, e))?;
            let key = path.file_name().unwrap_or_default().to_string_lossy();
            files.insert(key.into_owned(), content);
        }
        Ok(files)
    })();
    csi.node_unpublish_volume(clients::unpublish_request(&volume_id, &target))
        .await
        .map_err(|s| LocalError::Csi(format!("NodeUnpublishVolume on {node}: {}", s.message())))?;
    read
}

fn secret_path(secret: &str) -> Result<SecretPath, LocalError> {
    format!("{NAMESPACE}/{secret}")
        .parse()
        .map_err(|e| LocalError::Check(format!("secret {secret}: {e}")))
}

/// A record's keys and values; None for a tombstone.
pub(crate) fn live_values(record: &crate::hsm::Record) -> Option<BTreeMap<String, Vec<u8>>> {
    match &record.body {
        crate::hsm::Body::Live(data) => Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
        ),
        crate::hsm::Body::Deleted => None,
    }
}
