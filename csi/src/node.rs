//! CSI Node service: secrets published as tmpfs volumes, rotated on republish.
//!
//! No volume state lives in memory: "is this a republish" and "what to unmount" come from
//! `/proc/self/mountinfo` (and, for plain-directory volumes, a marker file), so a
//! restarted plugin carries on where the old one stopped.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::mount::{self, tmpfs_size_for};
use crate::mountinfo;
use crate::observer::{
    OUTCOME_KEPT_LAST_GOOD, OUTCOME_OK, OUTCOME_REVOKED, Operation, OperationKind,
};
use crate::payload_writer::{self, WriteOutcome};
use crate::pinned::PinnedDir;
use crate::plain_directory;
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{self, Rpc, rpc};
use crate::proto::{
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse, NodeGetInfoRequest, NodeGetInfoResponse,
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeServiceCapability, NodeStageVolumeRequest,
    NodeStageVolumeResponse, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse,
    NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, Topology,
};
use crate::request::{validate_publish, validate_target};
use crate::{
    DEFAULT_DRIVER_NAME, DEFAULT_KUBELET_DIR, DEFAULT_TOPOLOGY_KEY, Error, NodeObserver,
    NoopObserver, Payload, PublishRequest, VolumeSource,
};

/// Where and as whom the node plugin runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// CSI driver name; also the tmpfs mount source, which marks the mounts as ours.
    pub driver_name: String,
    pub node_id: String,
    /// kubelet's root directory; every target path must lie under its `pods/`.
    pub kubelet_dir: PathBuf,
    /// Segments reported by NodeGetInfo (kubelet also labels the Node with them).
    pub topology: BTreeMap<String, String>,
    /// How new volumes are made: tmpfs unless explicitly told otherwise.
    pub mount_mode: MountMode,
}

/// How a first publish makes the volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MountMode {
    /// A fresh size-limited tmpfs per volume: secrets stay in memory.
    #[default]
    Tmpfs,
    /// The payload written straight into the target directory, without mounting,
    /// whatever the privileges: secrets reach the disk. Development only, for running
    /// without the privilege to mount (see [`crate::plain_directory`]).
    PlainDirectory,
}

impl NodeConfig {
    pub fn new(node_id: impl Into<String>) -> Self {
        let node_id = node_id.into();
        Self {
            driver_name: DEFAULT_DRIVER_NAME.into(),
            kubelet_dir: DEFAULT_KUBELET_DIR.into(),
            topology: BTreeMap::from([(DEFAULT_TOPOLOGY_KEY.to_string(), node_id.clone())]),
            node_id,
            mount_mode: MountMode::Tmpfs,
        }
    }

    pub fn with_mount_mode(mut self, mode: MountMode) -> Self {
        self.mount_mode = mode;
        self
    }

    /// [`MountMode::PlainDirectory`] when `unsafe_plain_directory`, else tmpfs.
    pub fn with_unsafe_plain_directory(self, unsafe_plain_directory: bool) -> Self {
        self.with_mount_mode(if unsafe_plain_directory {
            MountMode::PlainDirectory
        } else {
            MountMode::Tmpfs
        })
    }

    pub fn with_driver_name(mut self, name: impl Into<String>) -> Self {
        self.driver_name = name.into();
        self
    }

    pub fn with_kubelet_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.kubelet_dir = dir.into();
        self
    }

    /// Report the node id under `key` instead of the default topology key.
    pub fn with_topology_key(mut self, key: impl Into<String>) -> Self {
        self.topology = BTreeMap::from([(key.into(), self.node_id.clone())]);
        self
    }
}

pub struct NodeService<S> {
    config: Arc<NodeConfig>,
    source: Arc<S>,
    observer: Arc<dyn NodeObserver>,
    in_flight: Arc<Mutex<HashSet<PathBuf>>>,
    /// Whether the "fsGroup cannot be applied" warning was logged (plain directories).
    group_warned: Arc<AtomicBool>,
}

/// What an existing target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VolumeKind {
    Tmpfs,
    PlainDirectory,
}

impl<S> Clone for NodeService<S> {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            source: self.source.clone(),
            observer: self.observer.clone(),
            in_flight: self.in_flight.clone(),
            group_warned: self.group_warned.clone(),
        }
    }
}

impl<S: VolumeSource> NodeService<S> {
    pub fn new(config: NodeConfig, source: Arc<S>) -> Self {
        if config.mount_mode == MountMode::PlainDirectory {
            tracing::warn!(
                kubelet_dir = %config.kubelet_dir.display(),
                "UNSAFE: plain-directory volumes: secrets are written to disk, not to tmpfs: \
                 development only, never on a real node"
            );
        }
        Self {
            config: Arc::new(config),
            source,
            observer: Arc::new(NoopObserver),
            in_flight: Arc::default(),
            group_warned: Arc::default(),
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn NodeObserver>) -> Self {
        self.observer = observer;
        self
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// This driver's volumes under the kubelet directory: its tmpfs mounts and its
    /// plain-directory volumes (whatever the current mode: an earlier run may have made
    /// either). Sorted, unique.
    pub fn discover_mounts(&self) -> Result<Vec<PathBuf>, Error> {
        let (dir, driver) = (&self.config.kubelet_dir, &self.config.driver_name);
        let mut found = mountinfo::discover_mounts(dir, driver)?;
        found.extend(plain_directory::discover(dir, driver)?);
        found.sort();
        found.dedup();
        Ok(found)
    }

    async fn publish(
        &self,
        raw: NodePublishVolumeRequest,
        trail: &mut Trail,
    ) -> Result<&'static str, Error> {
        let mut request = validate_publish(&self.config, raw)?;
        let _in_flight = self.begin(&request.target_path)?;
        trail.request = Some(request.clone());

        let target = request.target_path.clone();
        let driver = self.config.driver_name.clone();
        let kubelet_dir = self.config.kubelet_dir.clone();
        let (existing, plain) = blocking(move || {
            // A symlink anywhere below the kubelet directory is refused before anything
            // at the target is looked at.
            if let Some((parent, name)) = PinnedDir::open_parent_under(&kubelet_dir, &target)? {
                parent.child(&name)?;
            }
            Ok((
                mountinfo::mount_at(&target)?,
                plain_directory::is_plain_volume(&target, &driver)?,
            ))
        })
        .await?;
        let kind = match existing {
            Some(m) if m.fs_type != "tmpfs" || m.source != self.config.driver_name => {
                return Err(Error::ForeignMount {
                    target: request.target_path,
                    fs_type: m.fs_type,
                    mount_source: m.source,
                });
            }
            Some(_) => Some(VolumeKind::Tmpfs),
            None if plain => Some(VolumeKind::PlainDirectory),
            None => None,
        };
        if let Some(kind) = kind {
            if kind == VolumeKind::PlainDirectory && self.config.mount_mode == MountMode::Tmpfs {
                tracing::warn!(
                    "volume is a plain directory from an --unsafe-plain-directory run; its \
                     secrets stay on disk until it is unpublished"
                );
            }
            request.republish = true;
            trail.republish = true;
            if let Some(request) = &mut trail.request {
                request.republish = true;
            }
            return self.republish(&request, kind, trail).await;
        }
        self.publish_first(&request).await?;
        trail.changed = true;
        Ok(OUTCOME_OK)
    }

    async fn publish_first(&self, request: &PublishRequest) -> Result<(), Error> {
        // Fetch before touching the filesystem: a source error then leaves nothing behind.
        let payload = self.fetch_payload(request).await?;
        let target = request.target_path.clone();
        let driver_name = self.config.driver_name.clone();
        let gid = request.fs_group;
        let kubelet_dir = self.config.kubelet_dir.clone();
        match self.config.mount_mode {
            MountMode::Tmpfs => {
                blocking(move || {
                    mount_fresh_volume(&kubelet_dir, &target, &driver_name, &payload, gid)
                })
                .await?;
                tracing::info!("volume published");
            }
            MountMode::PlainDirectory => {
                let warned = self.group_warned.clone();
                blocking(move || {
                    plain_directory::publish(&target, &driver_name, &payload, gid, &warned)
                })
                .await?;
                tracing::info!("volume published as a plain directory (on disk)");
            }
        }
        Ok(())
    }

    /// Older kubelets tear a volume down when a republish fails, so a failure here keeps
    /// the last good content and reports success; the observer records the failure.
    async fn republish(
        &self,
        request: &PublishRequest,
        kind: VolumeKind,
        trail: &mut Trail,
    ) -> Result<&'static str, Error> {
        let result = async {
            let payload = self.fetch_payload(request).await?;
            let target = request.target_path.clone();
            let gid = request.fs_group;
            let warned = self.group_warned.clone();
            let kubelet_dir = self.config.kubelet_dir.clone();
            blocking(move || match kind {
                VolumeKind::Tmpfs => {
                    // Everything through the directory checked for symlinks.
                    let dir = pinned_tmpfs(&kubelet_dir, &target)?;
                    mount::ensure_capacity(&dir.proc_path(), tmpfs_size_for(&payload))?;
                    payload_writer::write_payload(&dir.proc_path(), &payload, gid)
                }
                VolumeKind::PlainDirectory => {
                    plain_directory::rewrite(&target, &payload, gid, &warned).map(|(_, o)| o)
                }
            })
            .await
        }
        .await;
        let error = match result {
            Ok(WriteOutcome::Unchanged) => return Ok(OUTCOME_OK),
            Ok(WriteOutcome::Written { .. }) => {
                tracing::info!("volume content rotated");
                trail.changed = true;
                return Ok(OUTCOME_OK);
            }
            Err(error) => error,
        };
        // The source's definite "no": the pod may no longer read these secrets (its
        // service account left spec.access, the HSMSecret was deleted). Unlike a
        // transient failure, keeping the last content would keep serving a revoked
        // secret, so the files go, atomically, and the volume stays mounted and empty.
        if revokes_access(&error) {
            self.revoke(request, kind).await?;
            tracing::warn!(%error, "access revoked; the volume's files were removed");
            self.observer.republish_revoked(request, &error);
            trail.changed = true;
            trail.error = Some(error);
            return Ok(OUTCOME_REVOKED);
        }
        // A mount without content (the plugin died mid first publish) has nothing to keep.
        if payload_writer::current_generation(&request.target_path)?.is_none() {
            return Err(error);
        }
        tracing::warn!(%error, kind = error.kind(), "republish failed; keeping last good content");
        self.observer.republish_kept_last_good(request, &error);
        trail.error = Some(error);
        Ok(OUTCOME_KEPT_LAST_GOOD)
    }

    /// Replaces the volume's content with nothing (one atomic generation switch).
    async fn revoke(&self, request: &PublishRequest, kind: VolumeKind) -> Result<(), Error> {
        let target = request.target_path.clone();
        let gid = request.fs_group;
        let warned = self.group_warned.clone();
        let kubelet_dir = self.config.kubelet_dir.clone();
        let empty = Payload::default();
        blocking(move || match kind {
            VolumeKind::Tmpfs => {
                let dir = pinned_tmpfs(&kubelet_dir, &target)?;
                payload_writer::write_payload(&dir.proc_path(), &empty, gid).map(drop)
            }
            VolumeKind::PlainDirectory => {
                plain_directory::rewrite(&target, &empty, gid, &warned).map(drop)
            }
        })
        .await
    }

    async fn fetch_payload(&self, request: &PublishRequest) -> Result<Payload, Error> {
        let payload = self
            .source
            .payload(request)
            .await
            .map_err(|source| Error::Source {
                volume_id: request.volume_id.clone(),
                source,
            })?;
        payload_writer::validate_payload(&payload)?;
        Ok(payload)
    }

    async fn unpublish(&self, raw: NodeUnpublishVolumeRequest) -> Result<(), Error> {
        if raw.volume_id.is_empty() {
            return Err(Error::MissingField { field: "volume_id" });
        }
        let target = validate_target(&self.config.kubelet_dir, &raw.target_path)?;
        let _in_flight = self.begin(&target)?;
        let driver = self.config.driver_name.clone();
        let kubelet_dir = self.config.kubelet_dir.clone();
        blocking(move || {
            // Nothing is followed through a symlink, and only this driver's own tmpfs is
            // unmounted: anything else at the target is refused and left as it is.
            let Some((parent, name)) = PinnedDir::open_parent_under(&kubelet_dir, &target)? else {
                return Ok(());
            };
            if parent.child(&name)?.is_none() {
                return Ok(());
            }
            mount::unmount(&parent, &name, &target, &driver)?;
            if plain_directory::is_plain_volume(&target, &driver)? {
                return plain_directory::remove(&target);
            }
            // rmdir, never a recursive delete: an unmounted target must be empty, and a
            // recursive delete under kubelet's tree is not ours to make.
            parent.remove_child(&name)
        })
        .await?;
        tracing::info!("volume unpublished");
        Ok(())
    }

    /// kubelet serializes operations per volume, but a slow source must not let a retry
    /// race the original; the CSI spec answers a concurrent call with ABORTED.
    fn begin(&self, target: &Path) -> Result<InFlight, Error> {
        let mut set = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !set.insert(target.to_path_buf()) {
            return Err(Error::OperationPending {
                target: target.to_path_buf(),
            });
        }
        Ok(InFlight {
            set: self.in_flight.clone(),
            target: target.to_path_buf(),
        })
    }
}

/// What a publish learned on its way, for [`NodeObserver::finished`].
#[derive(Default)]
struct Trail {
    republish: bool,
    changed: bool,
    request: Option<PublishRequest>,
    /// The failure a republish absorbed (kept the last content, or revoked it).
    error: Option<Error>,
}

struct InFlight {
    set: Arc<Mutex<HashSet<PathBuf>>>,
    target: PathBuf,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.target);
    }
}

async fn blocking<T, F>(work: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Error> + Send + 'static,
{
    tokio::task::spawn_blocking(work).await?
}

/// Create the target (kubelet creates only its parent), mount, write. On failure undo
/// exactly what was done here. Every step goes through directories opened without
/// following a symlink, so the tmpfs lands exactly at the target.
fn mount_fresh_volume(
    kubelet_dir: &Path,
    target: &Path,
    driver_name: &str,
    payload: &Payload,
    gid: Option<u32>,
) -> Result<(), Error> {
    let (parent, name) = PinnedDir::open_parent_under(kubelet_dir, target)?.ok_or_else(|| {
        Error::invalid(
            "target_path",
            format!("the parent of {} does not exist", target.display()),
        )
    })?;
    let created = parent.create_child(&name)?;
    let result = mount_and_write(&parent, &name, target, driver_name, payload, gid);
    if result.is_err()
        && created
        && let Err(e) = parent.remove_child(&name)
    {
        tracing::warn!(error = %e, "could not remove target dir after failed publish");
    }
    result
}

fn mount_and_write(
    parent: &PinnedDir,
    name: &std::ffi::OsStr,
    target: &Path,
    driver_name: &str,
    payload: &Payload,
    gid: Option<u32>,
) -> Result<(), Error> {
    let dir = parent
        .child(name)?
        .ok_or_else(|| Error::invalid("target_path", format!("{} vanished", target.display())))?;
    mount::mount_tmpfs(&dir.proc_path(), driver_name, tmpfs_size_for(payload), gid)
        .map_err(|e| retarget(e, target))?;
    drop(dir);
    let written = parent
        .child(name)?
        .ok_or_else(|| Error::invalid("target_path", format!("{} vanished", target.display())))
        .and_then(|mounted| payload_writer::write_payload(&mounted.proc_path(), payload, gid));
    if written.is_err()
        && let Err(e) = mount::unmount(parent, name, target, driver_name)
    {
        tracing::warn!(error = %e, "could not unmount after failed publish");
    }
    written.map(drop)
}

/// The volume at `target`, opened without following symlinks, and checked to be a tmpfs
/// through that very descriptor before anything is written into it.
fn pinned_tmpfs(kubelet_dir: &Path, target: &Path) -> Result<PinnedDir, Error> {
    let dir = PinnedDir::open_under(kubelet_dir, target)?
        .ok_or_else(|| Error::invalid("target_path", format!("{} vanished", target.display())))?;
    if !dir.is_tmpfs()? {
        return Err(Error::ForeignDirectory {
            target: target.to_path_buf(),
        });
    }
    Ok(dir)
}

/// Whether a republish error means the pod may no longer read the volume's secrets (as
/// opposed to a failure that retrying can cure).
fn revokes_access(error: &Error) -> bool {
    matches!(
        error,
        Error::Source {
            source: crate::SourceError::PermissionDenied(_) | crate::SourceError::NotFound(_),
            ..
        }
    )
}

/// Names the target in a mount error rather than the `/proc/self/fd` path it went through.
fn retarget(error: Error, target: &Path) -> Error {
    match error {
        Error::Mount { source, .. } => Error::Mount {
            target: target.to_path_buf(),
            source,
        },
        other => other,
    }
}

#[tonic::async_trait]
impl<S: VolumeSource> Node for NodeService<S> {
    #[tracing::instrument(skip_all, fields(volume_id, target))]
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let started = Instant::now();
        let raw = request.into_inner();
        let span = tracing::Span::current();
        span.record("volume_id", raw.volume_id.as_str());
        span.record("target", raw.target_path.as_str());
        let (volume_id, target) = (raw.volume_id.clone(), PathBuf::from(&raw.target_path));
        let mut trail = Trail::default();
        let result = self.publish(raw, &mut trail).await;
        let outcome = match &result {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::warn!(%error, kind = error.kind(), "publish failed");
                error.kind()
            }
        };
        self.observer
            .publish(outcome, trail.republish, started.elapsed());
        self.observer.finished(&Operation {
            kind: match trail.republish {
                true => OperationKind::Republish,
                false => OperationKind::Publish,
            },
            volume_id: &volume_id,
            target: &target,
            request: trail.request.as_ref(),
            outcome,
            changed: trail.changed,
            error: result.as_ref().err().or(trail.error.as_ref()),
        });
        result
            .map(|_| Response::new(NodePublishVolumeResponse {}))
            .map_err(Status::from)
    }

    #[tracing::instrument(skip_all, fields(volume_id, target))]
    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let started = Instant::now();
        let raw = request.into_inner();
        let span = tracing::Span::current();
        span.record("volume_id", raw.volume_id.as_str());
        span.record("target", raw.target_path.as_str());
        let (volume_id, target) = (raw.volume_id.clone(), PathBuf::from(&raw.target_path));
        let result = self.unpublish(raw).await;
        let outcome = match &result {
            Ok(()) => OUTCOME_OK,
            Err(error) => {
                tracing::warn!(%error, kind = error.kind(), "unpublish failed");
                error.kind()
            }
        };
        self.observer.unpublish(outcome, started.elapsed());
        self.observer.finished(&Operation {
            kind: OperationKind::Unpublish,
            volume_id: &volume_id,
            target: &target,
            request: None,
            outcome,
            changed: result.is_ok(),
            error: result.as_ref().err(),
        });
        result
            .map(|()| Response::new(NodeUnpublishVolumeResponse {}))
            .map_err(Status::from)
    }

    #[tracing::instrument(skip_all)]
    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        // VOLUME_MOUNT_GROUP makes kubelet pass the pod's fsGroup (it applies none itself
        // to read-only volumes).
        let mount_group = NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(Rpc {
                r#type: rpc::Type::VolumeMountGroup as i32,
            })),
        };
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![mount_group],
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let topology = (!self.config.topology.is_empty()).then(|| Topology {
            segments: self.config.topology.clone().into_iter().collect(),
        });
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: topology,
        }))
    }

    async fn node_stage_volume(
        &self,
        _request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "NodeStageVolume: ephemeral volumes are not staged",
        ))
    }

    async fn node_unstage_volume(
        &self,
        _request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "NodeUnstageVolume: ephemeral volumes are not staged",
        ))
    }

    async fn node_get_volume_stats(
        &self,
        _request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("NodeGetVolumeStats is not supported"))
    }

    async fn node_expand_volume(
        &self,
        _request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeExpandVolume is not supported"))
    }
}
