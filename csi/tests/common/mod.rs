//! Shared harness: a real plugin on a Unix socket in a temp dir, a fake source, a tonic
//! client, and a guard that unmounts whatever the test left mounted.
#![allow(dead_code, clippy::unwrap_used)] // each test binary uses a subset

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hsm_secrets_csi::proto::identity_client::IdentityClient;
use hsm_secrets_csi::proto::node_client::NodeClient;
use hsm_secrets_csi::proto::volume_capability::access_mode::Mode;
use hsm_secrets_csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use hsm_secrets_csi::proto::{
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
};
use hsm_secrets_csi::source::pod_info;
use hsm_secrets_csi::{
    Error, IdentityService, MountMode, NodeConfig, NodeObserver, NodeService, Payload, PayloadFile,
    PublishRequest, SourceError, VolumeSource,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;

pub const DRIVER: &str = "csi.hsmsecrets.io";
pub const NODE_ID: &str = "worker-1";
pub const GID: u32 = 1234;
pub const MODE: u32 = 0o440;

/// Real tmpfs mounts need root. Locally a non-root run skips; in CI it must fail.
pub fn mounts_available() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the csi tests as root: they mount real tmpfs volumes"
    );
    eprintln!("skipping: mounting tmpfs needs root");
    false
}

#[allow(unused_macros)] // not every test binary mounts
macro_rules! require_mounts {
    () => {
        if !common::mounts_available() {
            return;
        }
    };
}

/// In-memory volume source whose files and failures tests change on the fly.
#[derive(Default)]
pub struct FakeSource {
    files: Mutex<BTreeMap<String, (Vec<u8>, u32)>>,
    failure: Mutex<Option<SourceError>>,
    not_ready: Mutex<Option<SourceError>>,
    last_request: Mutex<Option<PublishRequest>>,
    calls: AtomicUsize,
}

impl FakeSource {
    pub fn with_files(files: &[(&str, &str)]) -> Arc<Self> {
        let source = Arc::new(Self::default());
        source.set_files(files);
        source
    }

    pub fn set_files(&self, files: &[(&str, &str)]) {
        *self.files.lock().unwrap() = files
            .iter()
            .map(|(p, c)| (p.to_string(), (c.as_bytes().to_vec(), MODE)))
            .collect();
    }

    pub fn set_raw(&self, path: &str, contents: Vec<u8>, mode: u32) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), (contents, mode));
    }

    pub fn fail_with(&self, failure: Option<SourceError>) {
        *self.failure.lock().unwrap() = failure;
    }

    pub fn set_not_ready(&self, reason: Option<SourceError>) {
        *self.not_ready.lock().unwrap() = reason;
    }

    pub fn last_request(&self) -> Option<PublishRequest> {
        self.last_request.lock().unwrap().clone()
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl VolumeSource for FakeSource {
    async fn payload(&self, request: &PublishRequest) -> Result<Payload, SourceError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        *self.last_request.lock().unwrap() = Some(request.clone());
        if let Some(failure) = self.failure.lock().unwrap().clone() {
            return Err(failure);
        }
        let files = self.files.lock().unwrap();
        Ok(Payload::new(
            files
                .iter()
                .map(|(p, (c, m))| PayloadFile::new(p.clone(), c.clone(), *m))
                .collect(),
        ))
    }

    async fn ready(&self) -> Result<(), SourceError> {
        match self.not_ready.lock().unwrap().clone() {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }
}

#[derive(Default)]
pub struct RecordingObserver {
    pub publishes: Mutex<Vec<(&'static str, bool)>>,
    pub unpublishes: Mutex<Vec<&'static str>>,
    pub kept_last_good: Mutex<Vec<(String, &'static str)>>,
    pub revoked: Mutex<Vec<(String, &'static str)>>,
}

impl NodeObserver for RecordingObserver {
    fn publish(&self, outcome: &'static str, republish: bool, _elapsed: Duration) {
        self.publishes.lock().unwrap().push((outcome, republish));
    }

    fn unpublish(&self, outcome: &'static str, _elapsed: Duration) {
        self.unpublishes.lock().unwrap().push(outcome);
    }

    fn republish_kept_last_good(&self, request: &PublishRequest, error: &Error) {
        self.kept_last_good
            .lock()
            .unwrap()
            .push((request.volume_id.clone(), error.kind()));
    }

    fn republish_revoked(&self, request: &PublishRequest, error: &Error) {
        self.revoked
            .lock()
            .unwrap()
            .push((request.volume_id.clone(), error.kind()));
    }
}

impl RecordingObserver {
    pub fn last_publish(&self) -> Option<(&'static str, bool)> {
        self.publishes.lock().unwrap().last().copied()
    }

    pub fn kept(&self) -> Vec<(String, &'static str)> {
        self.kept_last_good.lock().unwrap().clone()
    }

    pub fn revoked(&self) -> Vec<(String, &'static str)> {
        self.revoked.lock().unwrap().clone()
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), Error>>,
}

pub struct Harness {
    pub kubelet_dir: PathBuf,
    pub socket: PathBuf,
    pub source: Arc<FakeSource>,
    pub observer: Arc<RecordingObserver>,
    pub node: NodeClient<Channel>,
    pub identity: IdentityClient<Channel>,
    pub mode: MountMode,
    running: Option<Running>,
    dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start(source: Arc<FakeSource>) -> Self {
        Self::start_in_mode(source, MountMode::Tmpfs).await
    }

    pub async fn start_in_mode(source: Arc<FakeSource>, mode: MountMode) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubelet_dir = dir.path().join("kubelet");
        std::fs::create_dir_all(kubelet_dir.join("pods")).unwrap();
        let socket = dir.path().join("plugin/csi.sock");
        let observer = Arc::new(RecordingObserver::default());
        let running = spawn_plugin(&socket, &kubelet_dir, mode, &source, &observer);
        let channel = hsm_secrets_csi::connect_unix(&socket).await.unwrap();
        Self {
            kubelet_dir,
            socket,
            source,
            observer,
            node: NodeClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
            mode,
            running: Some(running),
            dir,
        }
    }

    pub fn config(&self) -> NodeConfig {
        config(&self.kubelet_dir).with_mount_mode(self.mode)
    }

    /// Stop the plugin (as a DaemonSet pod restart would) and start a fresh one on the
    /// same socket path, with no memory of the old one.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.observer = Arc::new(RecordingObserver::default());
        self.running = Some(spawn_plugin(
            &self.socket,
            &self.kubelet_dir,
            self.mode,
            &self.source,
            &self.observer,
        ));
        let channel = hsm_secrets_csi::connect_unix(&self.socket).await.unwrap();
        self.node = NodeClient::new(channel.clone());
        self.identity = IdentityClient::new(channel);
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(10), running.task)
                .await
                .expect("plugin stops within 10s")
                .unwrap()
                .unwrap();
        }
    }

    /// kubelet's target path for a pod volume; like kubelet, create only its parent.
    pub fn target(&self, pod_uid: &str, volume: &str) -> PathBuf {
        let parent = self
            .kubelet_dir
            .join("pods")
            .join(pod_uid)
            .join("volumes/kubernetes.io~csi")
            .join(volume);
        std::fs::create_dir_all(&parent).unwrap();
        parent.join("mount")
    }

    pub async fn publish(&self, request: NodePublishVolumeRequest) -> Result<(), Status> {
        self.node
            .clone()
            .node_publish_volume(request)
            .await
            .map(drop)
    }

    pub async fn publish_target(&self, volume_id: &str, target: &Path) -> Result<(), Status> {
        self.publish(publish_request(volume_id, target)).await
    }

    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), Status> {
        self.node
            .clone()
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                target_path: target.to_str().unwrap().into(),
            })
            .await
            .map(drop)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        unmount_everything_under(self.dir.path());
    }
}

pub fn config(kubelet_dir: &Path) -> NodeConfig {
    NodeConfig::new(NODE_ID)
        .with_driver_name(DRIVER)
        .with_kubelet_dir(kubelet_dir)
}

fn spawn_plugin(
    socket: &Path,
    kubelet_dir: &Path,
    mode: MountMode,
    source: &Arc<FakeSource>,
    observer: &Arc<RecordingObserver>,
) -> Running {
    let listener = hsm_secrets_csi::bind_unix(socket.to_str().unwrap()).unwrap();
    let identity = IdentityService::new(DRIVER, "0.0.0-test", source.clone());
    let node = NodeService::new(config(kubelet_dir).with_mount_mode(mode), source.clone())
        .with_observer(observer.clone());
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(hsm_secrets_csi::serve_on(listener, identity, node, async {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

/// Drop guard body: tests must not leak mounts even when an assertion fails.
pub fn unmount_everything_under(dir: &Path) {
    let Ok(mounts) = hsm_secrets_csi::mountinfo::read_mounts() else {
        return;
    };
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    for mount in mounts.iter().rev() {
        if mount.mount_point.starts_with(&dir) {
            let _ = nix::mount::umount2(&mount.mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

pub fn publish_request(volume_id: &str, target: &Path) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_str().unwrap().into(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: String::new(),
                mount_flags: vec![],
                volume_mount_group: GID.to_string(),
            })),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        volume_context: [
            (pod_info::POD_NAMESPACE, "shop"),
            (pod_info::POD_NAME, "checkout-0"),
            (pod_info::POD_UID, "uid-1"),
            (pod_info::SERVICE_ACCOUNT, "checkout"),
            (pod_info::EPHEMERAL, "true"),
            ("secrets", "db,api"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Default::default()
    }
}

/// The mountinfo line for `path`, parsed independently of the crate's parser:
/// (mount options, fs type, source).
pub fn mountinfo_line(path: &Path) -> Option<(String, String, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if Path::new(fields[4]) != path {
            return None;
        }
        let dash = fields.iter().position(|f| *f == "-")?;
        Some((
            fields[5].to_string(),
            fields[dash + 1].to_string(),
            fields[dash + 2].to_string(),
            fields[dash + 3].to_string(),
        ))
    })
}

pub fn is_mounted(path: &Path) -> bool {
    mountinfo_line(path).is_some()
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn mode_and_gid(path: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.gid())
}

/// The target after a failed first publish: no mount, no directory we created.
pub fn assert_nothing_left(target: &Path) {
    assert!(!is_mounted(target), "{} is still mounted", target.display());
    assert!(!target.exists(), "{} was left behind", target.display());
}
