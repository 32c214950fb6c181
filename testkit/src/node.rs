//! Harness of the node plugin tests: the real CSI server (csi crate services over
//! `HsmVolumeSource`) on a Unix socket in a temp dir, a tonic client, a static HSMSecret
//! catalog, and a guard that unmounts whatever a test left mounted.
#![allow(dead_code, clippy::unwrap_used)] // each test binary uses a subset

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hsm_secrets::hsm::{Expect, SecretData, SecretPath, SecretStore};
use hsm_secrets::node::{
    AuditLog, HsmVolumeSource, LocalDevice, Mounts, NodeMetrics, StaticCatalog,
};
use hsm_secrets::telemetry::encode_metrics as encode_text;
use hsm_secrets_csi::proto::identity_client::IdentityClient;
use hsm_secrets_csi::proto::node_client::NodeClient;
use hsm_secrets_csi::proto::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest, ProbeRequest};
use hsm_secrets_csi::{IdentityService, NodeConfig, NodeService};
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;

pub const DRIVER: &str = "csi.hsmsecrets.io";
pub const DEVICE: &str = "prod-hsm";
pub const NAMESPACE: &str = "shop";
pub const SERVICE_ACCOUNT: &str = "checkout";
pub const GID: u32 = 2345;

/// Real tmpfs mounts need root. Locally a non-root run skips; under CI it must fail.
pub fn mounts_available() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the node tests as root: they mount real tmpfs volumes"
    );
    eprintln!("skipping: mounting tmpfs needs root");
    false
}

/// A fresh SoftHSM token, or return (skip) when tmpfs or SoftHSM is unavailable locally.
#[macro_export]
macro_rules! token_or_skip {
    ($label:expr) => {{
        if !$crate::node::mounts_available() {
            return;
        }
        match $crate::softhsm::TestToken::new($label) {
            Some(t) => t,
            None => return,
        }
    }};
}

pub fn data(pairs: &[(&str, &[u8])]) -> SecretData {
    let mut d = SecretData::new();
    for (k, v) in pairs {
        d.insert(k, v.to_vec()).unwrap();
    }
    d
}

pub async fn put(store: &dyn SecretStore, path: &str, pairs: &[(&str, &[u8])]) -> u64 {
    let path: SecretPath = path.parse().unwrap();
    store.put(&path, data(pairs), Expect::Any).await.unwrap()
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), hsm_secrets_csi::Error>>,
}

pub struct NodeHarness {
    pub kubelet_dir: PathBuf,
    pub socket: PathBuf,
    pub catalog: Arc<StaticCatalog>,
    pub source: Arc<HsmVolumeSource>,
    pub registry: Arc<Registry>,
    pub node: NodeClient<Channel>,
    pub identity: IdentityClient<Channel>,
    /// The audit trail the plugin wrote, JSON lines.
    pub audit: AuditBuffer,
    pub mounts: Arc<Mounts>,
    running: Option<Running>,
    dir: tempfile::TempDir,
}

impl NodeHarness {
    /// A plugin whose node has `device` (None: a node without an HSM).
    pub async fn start(catalog: Arc<StaticCatalog>, device: Option<Arc<LocalDevice>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubelet_dir = dir.path().join("kubelet");
        std::fs::create_dir_all(kubelet_dir.join("pods")).unwrap();
        let socket = dir.path().join("plugin/csi.sock");
        let mut registry = Registry::default();
        let metrics = NodeMetrics::register(&mut registry);
        let audit = AuditBuffer::default();
        let mounts = Arc::new(Mounts::default());
        let audit_log = Arc::new(AuditLog::new(
            "worker-1",
            Box::new(audit.clone()),
            mounts.clone(),
            &mut registry,
        ));
        let source = Arc::new(
            HsmVolumeSource::new(catalog.clone(), device)
                .with_metrics(metrics.clone())
                .with_mounts(mounts.clone()),
        );
        let listener = hsm_secrets_csi::bind_unix(socket.to_str().unwrap()).unwrap();
        let identity = IdentityService::new(DRIVER, "0.0.0-test", source.clone());
        let node = NodeService::new(
            NodeConfig::new("worker-1")
                .with_driver_name(DRIVER)
                .with_kubelet_dir(&kubelet_dir),
            source.clone(),
        )
        .with_observer(Arc::new(Observers(metrics, audit_log)));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(hsm_secrets_csi::serve_on(listener, identity, node, async {
            let _ = stopped.await;
        }));
        let channel = hsm_secrets_csi::connect_unix(&socket).await.unwrap();
        Self {
            kubelet_dir,
            socket,
            catalog,
            source,
            registry: Arc::new(registry),
            node: NodeClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
            audit,
            mounts,
            running: Some(Running { stop, task }),
            dir,
        }
    }

    /// A plugin on a node whose token is open as `store`.
    pub async fn with_store(catalog: Arc<StaticCatalog>, store: Arc<dyn SecretStore>) -> Self {
        Self::start(catalog, Some(LocalDevice::open(DEVICE, store))).await
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(30), running.task)
                .await
                .expect("plugin stops within 30s")
                .unwrap()
                .unwrap();
        }
    }

    /// kubelet's target path for a pod volume; like kubelet, create only its parent.
    pub fn target(&self, pod_uid: &str, volume: &str) -> PathBuf {
        target_under(&self.kubelet_dir, pod_uid, volume)
    }

    pub async fn publish(&self, request: NodePublishVolumeRequest) -> Result<(), Status> {
        self.node
            .clone()
            .node_publish_volume(request)
            .await
            .map(drop)
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

    pub async fn probe(&self) -> bool {
        self.identity
            .clone()
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
            .unwrap()
    }

    pub fn metrics_text(&self) -> String {
        encode_text(&self.registry)
    }
}

/// The plugin's metrics and its audit trail, as `hsm-secrets node` wires them.
struct Observers(NodeMetrics, Arc<AuditLog>);

impl hsm_secrets_csi::NodeObserver for Observers {
    fn publish(&self, outcome: &'static str, republish: bool, elapsed: Duration) {
        self.0.publish(outcome, republish, elapsed);
    }
    fn unpublish(&self, outcome: &'static str, elapsed: Duration) {
        self.0.unpublish(outcome, elapsed);
    }
    fn republish_kept_last_good(
        &self,
        request: &hsm_secrets_csi::PublishRequest,
        error: &hsm_secrets_csi::Error,
    ) {
        self.0.republish_kept_last_good(request, error);
    }
    fn finished(&self, operation: &hsm_secrets_csi::Operation<'_>) {
        self.1.finished(operation);
    }
}

/// An in-memory audit sink.
#[derive(Clone, Default)]
pub struct AuditBuffer(Arc<std::sync::Mutex<Vec<u8>>>);

impl AuditBuffer {
    /// Every record written so far.
    pub fn records(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl std::io::Write for AuditBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for NodeHarness {
    fn drop(&mut self) {
        unmount_everything_under(self.dir.path());
    }
}

pub fn target_under(kubelet_dir: &Path, pod_uid: &str, volume: &str) -> PathBuf {
    let parent = kubelet_dir
        .join("pods")
        .join(pod_uid)
        .join("volumes/kubernetes.io~csi")
        .join(volume);
    std::fs::create_dir_all(&parent).unwrap();
    parent.join("mount")
}

/// Tests must not leak mounts even when an assertion fails.
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

/// The pod a volume request speaks for, and the group its volume is mounted with.
pub struct Pod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub service_account: &'a str,
    pub device: &'a str,
    pub gid: u32,
}

/// `checkout-0` in `shop`, run as `checkout`, reading [`DEVICE`].
pub const CHECKOUT: Pod<'static> = Pod {
    namespace: NAMESPACE,
    name: "checkout-0",
    service_account: SERVICE_ACCOUNT,
    device: DEVICE,
    gid: GID,
};

/// The pod UID in a kubelet target path (`…/pods/<uid>/volumes/<driver>/<volume>/mount`).
pub fn pod_uid(target: &Path) -> String {
    target
        .ancestors()
        .nth(4)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .expect("a kubelet target path: …/pods/<uid>/volumes/<driver>/<volume>/mount")
        .to_string()
}

/// What kubelet sends for an inline ephemeral volume of [`CHECKOUT`] asking for `secrets`.
pub fn volume(volume_id: &str, target: &Path, secrets: &str) -> NodePublishVolumeRequest {
    volume_for(&CHECKOUT, volume_id, target, secrets)
}

/// What kubelet sends for an inline ephemeral volume of `pod` asking for `secrets`; the
/// pod's UID is the one in `target`. Built as the local mode builds it.
pub fn volume_for(
    pod: &Pod<'_>,
    volume_id: &str,
    target: &Path,
    secrets: &str,
) -> NodePublishVolumeRequest {
    let uid = pod_uid(target);
    let attributes: BTreeMap<String, String> = [("secrets", secrets), ("device", pod.device)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let identity = hsm_secrets::local::clients::PodIdentity {
        namespace: pod.namespace,
        name: pod.name,
        uid: &uid,
        service_account: pod.service_account,
        fs_group: pod.gid,
    };
    hsm_secrets::local::clients::publish_request(volume_id, target, &attributes, &identity)
}

/// Sets (`Some`) or removes (`None`) one volume context entry.
pub fn with_attribute(
    mut request: NodePublishVolumeRequest,
    key: &str,
    value: Option<&str>,
) -> NodePublishVolumeRequest {
    match value {
        Some(v) => {
            request.volume_context.insert(key.into(), v.into());
        }
        None => {
            request.volume_context.remove(key);
        }
    }
    request
}

pub fn is_mounted(path: &Path) -> bool {
    hsm_secrets_csi::is_mount_point(path).unwrap()
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn mode_and_gid(path: &Path) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.mode() & 0o7777, meta.gid())
}

/// The target after a refused first publish: no mount, no directory.
pub fn assert_nothing_left(target: &Path) {
    assert!(!is_mounted(target), "{} is mounted", target.display());
    assert!(!target.exists(), "{} was left behind", target.display());
}

/// The regular files under `dir` (following the volume's symlinks), relative paths sorted.
pub fn visible_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name.starts_with("..") {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            for inner in std::fs::read_dir(&path).unwrap() {
                let inner = inner.unwrap().file_name().into_string().unwrap();
                out.push(format!("{name}/{inner}"));
            }
        } else {
            out.push(name);
        }
    }
    out.sort();
    out
}
