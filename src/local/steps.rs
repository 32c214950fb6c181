//! The demo walk-through: each step acts on the running system the way its users would
//! (agent gRPC, AdmissionReview over HTTPS, CSI over the plugin socket, state files as
//! `kubectl` would read them), checks the outcome and reports it.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::LocalError;
use super::clients::{self, AdmissionClient, PodIdentity};
use super::cluster::{
    ARCHIVE_NAME, Cleanup, ClusterConfig, DEVICE, LocalCluster, NAMESPACE, NODES,
    PLAIN_DIRECTORY_WARNING, RESTORED_NODE, SECRETS, SERVICE_ACCOUNT, TOKEN_LABEL, path_arg,
};
use super::report::Report;
use super::tokens;
use crate::crd::{DevicePhase, DeviceRole, HSMDevice, HSMDeviceStatus, NodeHealth};
use crate::hsm::{Expect, SecretData, SecretPath};
use crate::inject::{ATTRIBUTE_DEVICE, ATTRIBUTE_SECRETS, VOLUME_NAME};
use crate::kubectl::OutputFormat;
use crate::kubectl::render::{HealthReport, device_list, health_table};
use crate::mirror::AgentConnection;
use crate::state::{FileState, StateStore};

/// The titles of the walk-through, in order.
pub const STEPS: [&str; 12] = [
    "Start three nodes: SoftHSM tokens, agents, controller, webhook",
    "Store secrets on the primary (agent protocol, mutual TLS)",
    "Mirrors converge; start a CSI node plugin per node",
    "Inject: a real AdmissionReview for an annotated pod (HTTPS)",
    "Mount on a mirror node: NodePublishVolume over the CSI socket",
    "kubectl get hsmdevice",
    "Fail the primary node: SIGKILL",
    "Reads continue from a mirror during the outage",
    "Failover: a mirror is promoted at the next epoch",
    "Read-only enforcement: writes refused while no primary is writable",
    "Disaster recovery: lose every token, restore from the encrypted archive",
    "Clean up: unmount, stop every process, remove the directory",
];

/// Generous bounds for a loaded machine; a healthy run needs a fraction of each.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);
/// The fsGroup of the example pod.
const FS_GROUP: u32 = 2000;

/// A failed step, named.
#[derive(Debug)]
pub struct StepFailure {
    pub step: usize,
    /// Steps of the walk-through it belongs to.
    pub total: usize,
    pub title: &'static str,
    pub error: LocalError,
}

impl std::fmt::Display for StepFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}/{} ({}) failed: {}",
            self.step, self.total, self.title, self.error
        )
    }
}

impl std::error::Error for StepFailure {}

/// Runs the whole demo: starts the system, walks through the steps, cleans up (also
/// after a failure or when `interrupted` completes, e.g. on ctrl-c) and reports.
pub async fn run_demo(
    config: &ClusterConfig,
    report: &mut Report,
    interrupted: impl Future<Output = ()>,
) -> Result<(), StepFailure> {
    report.title("hsm-secrets demo: three simulated nodes on SoftHSM, no cluster");
    report.step(1, STEPS[0]);
    let started = Instant::now();
    let cluster = tokio::task::block_in_place(|| LocalCluster::start(config));
    let mut cluster = match cluster {
        Ok(c) => c,
        Err(error) => {
            report.fail(1, &error.to_string());
            return Err(failure(1, error));
        }
    };
    let mut walk = Walk {
        state: match FileState::open(&cluster.state_dir) {
            Ok(s) => s,
            Err(e) => return Err(failure(1, e.into())),
        },
        cluster: &mut cluster,
        report,
        volumes: Vec::new(),
        stored: BTreeMap::new(),
        epoch: 0,
        primary: String::new(),
        killed_at: started,
    };
    tokio::pin!(interrupted);
    let result = tokio::select! {
        r = walk.steps() => r,
        () = &mut interrupted => Err(StepFailure { step: 0, total: STEPS.len(), title: "interrupted", error: LocalError::Interrupted }),
    };
    if let Err(failure) = &result {
        if failure.step == 0 {
            walk.report.blank();
            walk.report.warn("interrupted: cleaning up");
        } else {
            walk.report.fail(failure.step, &failure.error.to_string());
            walk.explain(&failure.error);
        }
    }
    let cleanup = walk.clean_up().await;
    conclude(walk.report, &STEPS, "demo", started, result, cleanup)
}

fn failure(step: usize, error: LocalError) -> StepFailure {
    StepFailure::at(&STEPS, step, error)
}

impl StepFailure {
    /// Step `step` (1-based) of the walk-through `steps` failed with `error`.
    pub fn at(steps: &[&'static str], step: usize, error: LocalError) -> Self {
        Self {
            step,
            total: steps.len(),
            title: steps[step - 1],
            error,
        }
    }
}

/// Reports how a walk-through ended, its last step being the cleanup (`cleanup`'s
/// outcome); a failed step was reported where it failed. A walk that passed but whose
/// cleanup failed fails at the last step.
#[allow(
    clippy::result_large_err,
    reason = "returned once, at the end of a walk-through, like the async runners' result"
)]
pub(crate) fn conclude(
    report: &mut Report,
    steps: &[&'static str],
    name: &str,
    started: Instant,
    result: Result<(), StepFailure>,
    cleanup: Result<String, LocalError>,
) -> Result<(), StepFailure> {
    let n = steps.len();
    match (&result, cleanup) {
        (Ok(()), Ok(summary)) => {
            report.pass(n, &summary);
            report.blank();
            report.title(&format!(
                "{name} complete: {n}/{n} steps passed in {:.1}s",
                started.elapsed().as_secs_f64()
            ));
            Ok(())
        }
        (Ok(()), Err(error)) => {
            report.fail(n, &error.to_string());
            Err(StepFailure::at(steps, n, error))
        }
        (Err(_), Ok(summary)) => {
            report.detail(&format!("cleanup: {summary}"));
            result
        }
        (Err(_), Err(error)) => {
            report.warn(&format!("cleanup incomplete: {error}"));
            result
        }
    }
}

/// A volume published during the walk-through (unpublished at cleanup).
struct Volume {
    node: String,
    id: String,
    target: PathBuf,
}

struct Walk<'a> {
    cluster: &'a mut LocalCluster,
    report: &'a mut Report,
    state: FileState,
    volumes: Vec<Volume>,
    /// What was stored, per secret path: key → value.
    stored: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    epoch: u64,
    primary: String,
    /// When the primary was killed.
    killed_at: Instant,
}

impl Walk<'_> {
    async fn steps(&mut self) -> Result<(), StepFailure> {
        let summary = self.boot().await.map_err(|e| failure(1, e))?;
        self.report.pass(1, &summary);
        let mut attributes = BTreeMap::new();
        for n in 2..STEPS.len() {
            self.report.step(n, STEPS[n - 1]);
            let outcome = match n {
                2 => self.store().await,
                3 => self.converge().await,
                4 => self.inject().await.map(|(summary, attrs)| {
                    attributes = attrs;
                    summary
                }),
                5 => self.mount_on_mirror(&attributes).await,
                6 => self.table().await,
                7 => self.kill_primary().await,
                8 => self.read_during_outage(&attributes).await,
                9 => self.failover().await,
                10 => self.read_only_enforcement(&attributes).await,
                11 => self.disaster_recovery(&attributes).await,
                _ => unreachable!("step numbers come from STEPS"),
            };
            match outcome {
                Ok(summary) => self.report.pass(n, &summary),
                Err(error) => return Err(failure(n, error)),
            }
        }
        self.report.step(STEPS.len(), STEPS[STEPS.len() - 1]);
        Ok(())
    }

    // ---- step 1 ---------------------------------------------------------------------

    async fn boot(&mut self) -> Result<String, LocalError> {
        let c = &*self.cluster;
        self.report
            .detail(&format!("work directory: {}", c.dir.display()));
        self.report
            .detail(&format!("PKCS#11 module: {}", c.module.display()));
        for node in &c.nodes {
            self.report.detail(&format!(
                "{}: token \"prod\" (SOFTHSM2_CONF {}), agent {}",
                node.name,
                node.softhsm_conf.display(),
                node.agent
            ));
        }
        self.report.detail(&format!(
            "controller: file-backed state {} (probe {} ms, threshold {}, write lease {} ms + {} ms)",
            c.state_dir.display(),
            c.timing.probe_interval_ms,
            c.timing.failover_threshold,
            c.timing.write_lease_ms,
            c.timing.lease_margin_ms
        ));
        self.report.detail(&format!(
            "webhook: {} (certificate for {})",
            c.webhook_url, c.webhook_server_name
        ));
        if c.plain_directories {
            self.report.warn(&format!(
                "{PLAIN_DIRECTORY_WARNING} (this process may not mount tmpfs: the CSI plugins \
                 will run with --unsafe-plain-directory and write the volumes to disk)"
            ));
        }
        let status = self
            .wait_status("the controller to elect a primary", BOOT_TIMEOUT, |s| {
                (s.phase == DevicePhase::Ready
                    && s.primary_node.is_some()
                    && s.mirrors.as_deref() == Some("2/2"))
                .then(|| s.clone())
            })
            .await?;
        self.epoch = status.epoch;
        self.primary = status.primary_node.clone().unwrap_or_default();
        let client = self.admission()?;
        client.wait_ready(BOOT_TIMEOUT).await?;
        Ok(format!(
            "{} processes up; {DEVICE} Ready: primary {} at epoch {}, mirrors 2/2",
            self.cluster.processes().count(),
            self.primary,
            self.epoch
        ))
    }

    // ---- step 2 ---------------------------------------------------------------------

    async fn store(&mut self) -> Result<String, LocalError> {
        let primary = self.agent(&self.primary.clone())?;
        let secrets: [(&str, Vec<(&str, usize)>); 2] = [
            (SECRETS[0], vec![("username", 0), ("password", 24)]),
            (SECRETS[1], vec![("token", 32)]),
        ];
        let mut lines = Vec::new();
        for (name, keys) in secrets {
            let path: SecretPath = format!("{NAMESPACE}/{name}")
                .parse()
                .map_err(|e| LocalError::Check(format!("secret path: {e}")))?;
            let mut data = SecretData::new();
            let mut plain = BTreeMap::new();
            for (key, random_bytes) in keys {
                let value = if random_bytes == 0 {
                    b"db-user-checkout".to_vec()
                } else {
                    super::tokens::random_hex(random_bytes / 2)?.into_bytes()
                };
                data.insert(key, value.clone())
                    .map_err(|e| LocalError::Check(e.to_string()))?;
                plain.insert(key.to_string(), value);
            }
            let written = primary.put(&path, &data, Expect::Any, self.epoch).await?;
            lines.push(format!(
                "{path}: {} key(s) ({}) written, version {}",
                plain.len(),
                plain.keys().cloned().collect::<Vec<_>>().join(", "),
                written.version
            ));
            self.stored.insert(path.to_string(), plain);
        }
        for l in &lines {
            self.report.detail(l);
        }
        Ok(format!(
            "{} secrets stored on {} (primary, epoch {}); values are random and never printed",
            self.stored.len(),
            self.primary,
            self.epoch
        ))
    }

    // ---- step 3 ---------------------------------------------------------------------

    async fn converge(&mut self) -> Result<String, LocalError> {
        let primary = self.agent(&self.primary.clone())?;
        let head = primary.manifest().await?;
        let mirrors: Vec<String> = NODES
            .iter()
            .filter(|n| **n != self.primary)
            .map(|n| n.to_string())
            .collect();
        for mirror in &mirrors {
            let conn = self.agent(mirror)?;
            let deadline = Instant::now() + CONVERGE_TIMEOUT;
            loop {
                let theirs = conn.manifest().await?;
                if theirs.entries == head.entries {
                    self.report.detail(&format!(
                        "{mirror}: manifest equals {}'s ({} secrets, versions and SHA-256 checksums)",
                        self.primary,
                        theirs.entries.len()
                    ));
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(LocalError::Timeout {
                        what: format!("{mirror} to converge with {}", self.primary),
                        seconds: CONVERGE_TIMEOUT.as_secs(),
                        hint: String::new(),
                    });
                }
                self.cluster.check_processes()?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for node in self.cluster.nodes.clone() {
            clients::wait_csi_ready(&node.csi_socket, BOOT_TIMEOUT).await?;
            self.report.detail(&format!(
                "{}: CSI plugin ready on unix://{}",
                node.name,
                node.csi_socket.display()
            ));
        }
        Ok(format!(
            "{} hold the same {} secrets as {}; 3 CSI plugins ready",
            mirrors.join(" and "),
            head.entries.len(),
            self.primary
        ))
    }

    // ---- step 4 ---------------------------------------------------------------------

    async fn inject(&mut self) -> Result<(String, BTreeMap<String, String>), LocalError> {
        let pod = example_pod();
        self.report.detail(&format!(
            "pod {NAMESPACE}/checkout-0 annotated hsmsecrets.io/inject: \"true\", hsmsecrets.io/secrets: \"{}\"",
            SECRETS.join(",")
        ));
        let review = clients::admission_review("demo-mutate-1", "", "Pod", "pods", NAMESPACE, &pod);
        let answer = self.admission()?.review("/mutate", &review).await?;
        if answer["allowed"] != json!(true) {
            return Err(LocalError::Check(format!(
                "the pod was refused: {}",
                answer["status"]["message"]
            )));
        }
        let ByteString(patch) = serde_json::from_value(answer["patch"].clone())
            .map_err(|e| LocalError::Check(format!("no JSON patch in the answer: {e}")))?;
        let patch: json_patch::Patch = serde_json::from_slice(&patch).map_err(|e| {
            LocalError::Check(format!("the answer's patch is not a JSON patch: {e}"))
        })?;
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch)
            .map_err(|e| LocalError::Check(format!("the patch does not apply to the pod: {e}")))?;
        self.report
            .detail(&format!("JSON patch: {} operations", patch.0.len()));
        let summary = summarize_injection(&patched);
        for line in &summary.lines {
            self.report.detail(line);
        }
        for warning in answer["warnings"].as_array().into_iter().flatten() {
            self.report.warn(&format!(
                "admission warning: {}",
                warning.as_str().unwrap_or_default()
            ));
        }
        let attributes = summary.attributes.ok_or_else(|| {
            LocalError::Check(format!("the patch adds no {VOLUME_NAME} CSI volume"))
        })?;
        Ok((
            format!(
                "patched: CSI volume {VOLUME_NAME} (driver csi.hsmsecrets.io, secrets {}, device {})",
                attributes
                    .get(ATTRIBUTE_SECRETS)
                    .cloned()
                    .unwrap_or_default(),
                attributes
                    .get(ATTRIBUTE_DEVICE)
                    .cloned()
                    .unwrap_or_default()
            ),
            attributes,
        ))
    }

    // ---- step 5 ---------------------------------------------------------------------

    async fn mount_on_mirror(
        &mut self,
        attributes: &BTreeMap<String, String>,
    ) -> Result<String, LocalError> {
        let mirror = self
            .mirror_nodes()
            .first()
            .cloned()
            .ok_or_else(|| LocalError::Check("no mirror node to mount on".into()))?;
        let role = self.role_of(&mirror).await?;
        let target = self.publish(&mirror, "checkout-0", attributes).await?;
        let files = self.check_volume(&target)?;
        Ok(format!(
            "{files} files {} on {mirror} ({role}) and equal to what was stored",
            self.published_as()
        ))
    }

    async fn publish(
        &mut self,
        node: &str,
        pod_name: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<PathBuf, LocalError> {
        let endpoints = self
            .cluster
            .node(node)
            .cloned()
            .ok_or_else(|| LocalError::Check(format!("no node {node}")))?;
        let uid = format!("pod-{pod_name}-{node}");
        let target = clients::target_path(&endpoints.kubelet_dir, &uid, VOLUME_NAME)?;
        let volume_id = format!("csi-{uid}");
        let request = clients::publish_request(
            &volume_id,
            &target,
            attributes,
            &PodIdentity {
                namespace: NAMESPACE,
                name: pod_name,
                uid: &uid,
                service_account: SERVICE_ACCOUNT,
                fs_group: FS_GROUP,
            },
        );
        clients::csi(&endpoints.csi_socket)
            .await?
            .node_publish_volume(request)
            .await
            .map_err(|s| {
                LocalError::Csi(format!(
                    "NodePublishVolume on {node}: {:?}: {}",
                    s.code(),
                    s.message()
                ))
            })?;
        self.volumes.push(Volume {
            node: node.into(),
            id: volume_id,
            target: target.clone(),
        });
        self.report.detail(&format!(
            "NodePublishVolume on {node}: {}",
            target.display()
        ));
        Ok(target)
    }

    /// How volumes are delivered in this run, for step summaries.
    fn published_as(&self) -> &'static str {
        if self.cluster.plain_directories {
            "written to a plain directory"
        } else {
            "mounted"
        }
    }

    /// Checks how the volume was made: a tmpfs mount, or (without the privilege to
    /// mount) a marked plain directory, with a warning.
    fn check_volume_kind(&mut self, target: &Path) -> Result<(), LocalError> {
        let mount = hsm_secrets_csi::mountinfo::mount_at(target)
            .map_err(|e| LocalError::Csi(e.to_string()))?;
        if self.cluster.plain_directories {
            if let Some(mount) = mount {
                return Err(LocalError::Check(format!(
                    "{} is a {} mount; a plain directory was expected",
                    target.display(),
                    mount.fs_type
                )));
            }
            let ours = hsm_secrets_csi::plain_directory::is_plain_volume(
                target,
                crate::contract::CSI_DRIVER,
            )
            .map_err(|e| LocalError::Csi(e.to_string()))?;
            if !ours {
                return Err(LocalError::Check(format!(
                    "{} is not a plain-directory volume of the CSI plugin",
                    target.display()
                )));
            }
            self.report.warn(PLAIN_DIRECTORY_WARNING);
            self.report
                .detail("mount: plain directory (not mounted; the files are on disk)");
            return Ok(());
        }
        let mount = mount.ok_or_else(|| {
            LocalError::Check(format!("nothing is mounted at {}", target.display()))
        })?;
        if mount.fs_type != "tmpfs" {
            return Err(LocalError::Check(format!(
                "{} is a {} mount, not tmpfs",
                target.display(),
                mount.fs_type
            )));
        }
        let flags: Vec<&str> = ["nodev", "noexec", "nosuid"]
            .into_iter()
            .filter(|o| mount.has_mount_option(o))
            .collect();
        self.report.detail(&format!(
            "mount: tmpfs ({}), in memory only",
            flags.join(",")
        ));
        Ok(())
    }

    /// Lists the volume's files with their modes, checks the mount and the content.
    fn check_volume(&mut self, target: &Path) -> Result<usize, LocalError> {
        self.check_volume_kind(target)?;
        let mut count = 0;
        for (path, expected) in &self.stored {
            let name = path.rsplit('/').next().unwrap_or_default();
            for (key, value) in expected {
                let file = target.join(name).join(key);
                let meta = std::fs::metadata(&file).map_err(|e| {
                    LocalError::Check(format!("{} is missing: {e}", file.display()))
                })?;
                let content = std::fs::read(&file).map_err(|e| LocalError::io("read", &file, e))?;
                let same = content == *value;
                self.report.detail(&format!(
                    "{:<28} {:04o}  uid {} gid {}  {:>3} bytes  {}",
                    format!("{name}/{key}"),
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid(),
                    meta.len(),
                    if same {
                        "content = stored"
                    } else {
                        "CONTENT DIFFERS"
                    }
                ));
                if !same {
                    return Err(LocalError::Check(format!(
                        "{name}/{key} differs from what was stored in {path}"
                    )));
                }
                count += 1;
            }
        }
        Ok(count)
    }

    // ---- step 6 ---------------------------------------------------------------------

    async fn table(&mut self) -> Result<String, LocalError> {
        let primary = self.primary.clone();
        self.wait_archived(&primary).await?;
        let device = self.show_table().await?;
        let status = device.status.unwrap_or_default();
        Ok(format!(
            "{DEVICE}: primary {}, phase {:?}, mirrors {}",
            status.primary_node.unwrap_or_default(),
            status.phase,
            status.mirrors.unwrap_or_default()
        ))
    }

    /// Waits until the bucket holds every change `node`, the primary, published: its node
    /// archives as the HSMDevice's spec.backup says.
    async fn wait_archived(&mut self, node: &str) -> Result<u64, LocalError> {
        let published = self.agent(node)?.health().await?.applied_sequence;
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        let archived = loop {
            let archived = self.archived_through().await?;
            if archived >= published {
                break archived;
            }
            if Instant::now() >= deadline {
                return Err(LocalError::Check(format!(
                    "the archive holds changes up to {archived}; {node} published {published}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.report.detail(&format!(
            "archive {}: every change {node} published, up to sequence {archived}, is in the bucket, sealed",
            self.cluster.archive_url()
        ));
        Ok(archived)
    }

    /// The highest change sequence an object of the archive covers.
    async fn archived_through(&self) -> Result<u64, LocalError> {
        use crate::archive::chain::{ArchiveRoot, Entry};
        let bucket = crate::archive::Bucket::open(&crate::archive::BucketConfig {
            url: self.cluster.archive_url(),
            timeout: Duration::from_secs(10),
            ..Default::default()
        })
        .map_err(|e| LocalError::Check(e.to_string()))?;
        let root =
            ArchiveRoot::new(DEVICE, ARCHIVE_NAME).map_err(|e| LocalError::Check(e.to_string()))?;
        Ok(bucket
            .list(&root.prefix())
            .await
            .map_err(|e| LocalError::Check(e.to_string()))?
            .iter()
            .filter_map(|l| Entry::parse(&root, &l.name))
            .map(|e| e.last)
            .max()
            .unwrap_or(0))
    }

    async fn show_table(&mut self) -> Result<HSMDevice, LocalError> {
        let devices = self.state.list_devices().await?;
        let now = Timestamp::now();
        self.report.detail("$ kubectl get hsmdevice -o wide");
        let table = device_list(&devices, OutputFormat::Table, now)
            .map_err(|e| LocalError::Check(e.to_string()))?;
        self.report.detail(&table);
        self.report.detail("$ kubectl hsm health");
        self.report
            .detail(&health_table(&HealthReport::new(&devices)));
        devices
            .into_iter()
            .find(|d| d.metadata.name.as_deref() == Some(DEVICE))
            .ok_or_else(|| LocalError::Check(format!("HSMDevice {DEVICE} is missing")))
    }

    // ---- step 7 ---------------------------------------------------------------------

    async fn kill_primary(&mut self) -> Result<String, LocalError> {
        let node = self.primary.clone();
        let pid = tokio::task::block_in_place(|| self.cluster.kill_hard(&format!("node {node}")))?;
        self.report.detail(&format!(
            "kill -9 {pid} (node {node}: its device agent and CSI plugin)"
        ));
        self.killed_at = Instant::now();
        Ok(format!("node {node}, the primary, is gone (SIGKILL)"))
    }

    // ---- step 8 ---------------------------------------------------------------------

    async fn read_during_outage(
        &mut self,
        attributes: &BTreeMap<String, String>,
    ) -> Result<String, LocalError> {
        let reader = self
            .mirror_nodes()
            .last()
            .cloned()
            .ok_or_else(|| LocalError::Check("no mirror left to read from".into()))?;
        let target = self.publish(&reader, "checkout-1", attributes).await?;
        let files = self.check_volume(&target)?;
        let status = self.status().await?;
        let since = self.killed_at.elapsed();
        self.report.detail(&format!(
            "{:.1}s after the kill: phase {:?}, primary in status still {}",
            since.as_secs_f64(),
            status.phase,
            status.primary_node.clone().unwrap_or_default()
        ));
        Ok(format!(
            "a new pod on {reader} got its {files} files from {reader}'s own token while {} is down",
            self.primary
        ))
    }

    // ---- step 9 ---------------------------------------------------------------------

    async fn failover(&mut self) -> Result<String, LocalError> {
        let old = self.primary.clone();
        let old_epoch = self.epoch;
        let status = self
            .wait_status("a mirror to be promoted", FAILOVER_TIMEOUT, |s| {
                (s.primary_node.as_deref().is_some_and(|p| p != old)
                    && s.epoch > old_epoch
                    && s.phase != DevicePhase::ReadOnlyFallback)
                    .then(|| s.clone())
            })
            .await?;
        let took = self.killed_at.elapsed();
        let new = status.primary_node.clone().unwrap_or_default();
        if status.epoch != old_epoch + 1 {
            return Err(LocalError::Check(format!(
                "epoch went from {old_epoch} to {}, expected {}",
                status.epoch,
                old_epoch + 1
            )));
        }
        self.primary = new.clone();
        self.epoch = status.epoch;
        self.report.detail(&format!(
            "{new} promoted at epoch {} ({:.1}s after SIGKILL: {} failed probes, then the old write lease lapsed)",
            status.epoch,
            took.as_secs_f64(),
            self.cluster.timing.failover_threshold
        ));
        // The new primary takes writes, and still serves what was stored before.
        let conn = self.agent(&new)?;
        let path: SecretPath = format!("{NAMESPACE}/after-failover")
            .parse()
            .map_err(|e| LocalError::Check(format!("secret path: {e}")))?;
        let mut data = SecretData::new();
        data.insert("note", b"written after failover".to_vec())
            .map_err(|e| LocalError::Check(e.to_string()))?;
        let written = conn.put(&path, &data, Expect::Any, self.epoch).await?;
        self.report.detail(&format!(
            "write to {new} at epoch {}: {path} version {} accepted",
            self.epoch, written.version
        ));
        for (path, expected) in &self.stored {
            let p: SecretPath = path
                .parse()
                .map_err(|e| LocalError::Check(format!("{e}")))?;
            let got = conn.get(&p).await?;
            let values = super::sites::live_values(&got.record).unwrap_or_default();
            if values != *expected {
                return Err(LocalError::Check(format!(
                    "{new} does not hold {path} as it was stored"
                )));
            }
        }
        self.report.detail(&format!(
            "{new} serves every secret stored on {old} before the kill"
        ));
        // The controller records Events after the status it stored.
        let deadline = Instant::now() + Duration::from_secs(10);
        let failover = loop {
            let events = self.state.events()?;
            if let Some(e) = events
                .into_iter()
                .rev()
                .find(|e| e.event.reason == crate::contract::reasons::FAILOVER)
            {
                break e;
            }
            if Instant::now() >= deadline {
                return Err(LocalError::Check(
                    "no HSMFailover Event was recorded".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.report
            .detail(&format!("Event HSMFailover: {}", failover.event.message));
        self.wait_archived(&new).await?;
        let drill = self.backup_verify().await?;
        self.show_table().await?;
        Ok(format!(
            "new primary {new} at epoch {} (was {old} at epoch {old_epoch}); it continues the archive and a restore drill verified it at sequence {}",
            self.epoch, drill.sequence
        ))
    }

    /// `kubectl hsm backup verify`: the annotation it sets, then the controller's report of
    /// the drill the primary's node ran (rebuild the newest point in memory, compare).
    async fn backup_verify(&mut self) -> Result<crate::crd::BackupDrill, LocalError> {
        let id = k8s_openapi::jiff::Timestamp::now().to_string();
        let mut device = self
            .state
            .get_device(DEVICE)
            .await?
            .ok_or_else(|| LocalError::Check(format!("HSMDevice {DEVICE} is missing")))?;
        device
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(crate::crd::BACKUP_VERIFY_ANNOTATION.into(), id.clone());
        self.state.apply_device(&device)?;
        self.report.detail(&format!(
            "$ kubectl hsm backup verify {DEVICE}   (annotation {}={id})",
            crate::crd::BACKUP_VERIFY_ANNOTATION
        ));
        let drill = self
            .wait_status(
                "the restore drill the controller asked of the primary's node",
                CONVERGE_TIMEOUT,
                |s| {
                    s.backup
                        .as_ref()?
                        .last_verified
                        .clone()
                        .filter(|d| d.request == id)
                },
            )
            .await?;
        if !drill.verified {
            return Err(LocalError::Check(format!(
                "the restore drill did not verify the archive: {}",
                drill.message.as_deref().unwrap_or("no detail")
            )));
        }
        let status = self.status().await?;
        let backup = status.backup.unwrap_or_default();
        self.report.detail(&format!(
            "BackupVerified=True: {} rebuilt archive sequence {} ({} secrets) in {} ms and it matched the device; {} restorable point(s), lag {} s",
            backup.node.as_deref().unwrap_or("?"),
            drill.sequence,
            drill.secrets,
            drill.duration_ms,
            backup.bases.len(),
            backup.lag_seconds.unwrap_or_default()
        ));
        Ok(drill)
    }

    // ---- step 10 --------------------------------------------------------------------

    async fn read_only_enforcement(
        &mut self,
        attributes: &BTreeMap<String, String>,
    ) -> Result<String, LocalError> {
        let primary = self.primary.clone();
        let epoch = self.epoch;
        let survivor = NODES
            .iter()
            .find(|n| !self.is_dead(n) && **n != primary)
            .map(|n| n.to_string())
            .ok_or_else(|| LocalError::Check("no mirror left".into()))?;
        // Manual mode, as for a maintenance window: no automatic promotion.
        let mut device = self
            .state
            .get_device(DEVICE)
            .await?
            .ok_or_else(|| LocalError::Check(format!("HSMDevice {DEVICE} is missing")))?;
        if let Some(m) = device.spec.mirroring.as_mut() {
            m.auto_failover = Some(false);
        }
        device.status = None;
        let generation = self.state.apply_device(&device)?.metadata.generation;
        self.report.detail(&format!(
            "$ kubectl patch hsmdevice {DEVICE} --type merge -p '{{\"spec\":{{\"mirroring\":{{\"autoFailover\":false}}}}}}'"
        ));
        self.wait_status(
            &format!("{survivor} to follow {primary} as a caught-up read-only mirror"),
            CONVERGE_TIMEOUT,
            |s| {
                // The controller has seen the manual mode (it plans with this spec).
                (s.observed_generation >= generation).then_some(())?;
                s.nodes
                    .iter()
                    .any(|n| {
                        n.node == survivor
                            && n.role == DeviceRole::ReadOnly
                            && n.health == NodeHealth::Healthy
                    })
                    .then_some(())
            },
        )
        .await?;
        let pid =
            tokio::task::block_in_place(|| self.cluster.kill_hard(&format!("node {primary}")))?;
        self.report
            .detail(&format!("kill -9 {pid} (node {primary}, the new primary)"));
        let status = self
            .wait_status("read-only fallback", FAILOVER_TIMEOUT, |s| {
                (s.phase == DevicePhase::ReadOnlyFallback).then(|| s.clone())
            })
            .await?;
        self.report.detail(&format!(
            "{DEVICE}: phase {:?}, primary {} unavailable, epoch {} (autoFailover: false)",
            status.phase,
            status.primary_node.clone().unwrap_or_default(),
            status.epoch
        ));

        // The validating webhook refuses an HSMSecret that imports data (a write).
        let import = json!({
            "apiVersion": "hsmsecrets.io/v1alpha1",
            "kind": "HSMSecret",
            "metadata": {"name": "payment-token", "namespace": NAMESPACE},
            "spec": {"deviceRef": DEVICE, "source": {"secretRef": {"name": "payment-token-import"}}}
        });
        let review = clients::admission_review(
            "demo-validate-1",
            "hsmsecrets.io",
            "HSMSecret",
            "hsmsecrets",
            NAMESPACE,
            &import,
        );
        let client = self.admission()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let answer = loop {
            // The webhook re-reads the state directory every 100 ms.
            let answer = client.review("/validate", &review).await?;
            if answer["allowed"] == json!(false) || Instant::now() >= deadline {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if answer["allowed"] != json!(false) {
            return Err(LocalError::Check(
                "the webhook admitted an import into a device without a writable primary".into(),
            ));
        }
        let message = answer["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.report.detail(
            "$ kubectl apply -f payment-token.yaml   (HSMSecret with spec.source: an import)",
        );
        self.report.detail(&format!(
            "denied by the validating webhook (HTTP {}): {message}",
            answer["status"]["code"]
        ));

        // The mirror's agent refuses a write itself, and says where writes go.
        let refused = self
            .agent(&survivor)?
            .put(
                &format!("{NAMESPACE}/payment-token")
                    .parse()
                    .map_err(|e| LocalError::Check(format!("secret path: {e}")))?,
                &SecretData::new(),
                Expect::Any,
                epoch,
            )
            .await;
        let agent_message = match refused {
            Ok(_) => {
                return Err(LocalError::Check(format!(
                    "read-only mirror {survivor} accepted a write"
                )));
            }
            Err(e) => e.to_string(),
        };
        self.report.detail(&format!(
            "write sent to {survivor}'s agent: refused: {agent_message}"
        ));
        if !message.contains(DEVICE) || !message.contains("kubectl hsm failover") {
            return Err(LocalError::Check(format!(
                "the refusal does not name the device and the way out: {message}"
            )));
        }
        // Reads go on: a new pod on the surviving mirror gets its files.
        let target = self.publish(&survivor, "checkout-2", attributes).await?;
        let files = self.check_volume(&target)?;
        self.show_table().await?;
        Ok(format!(
            "import refused while {DEVICE} is in ReadOnlyFallback; {survivor} still served {files} files to a new pod"
        ))
    }

    // ---- step 11 --------------------------------------------------------------------

    async fn disaster_recovery(
        &mut self,
        attributes: &BTreeMap<String, String>,
    ) -> Result<String, LocalError> {
        use crate::archive::chain::{ArchiveRoot, Entry};
        use crate::archive::envelope::ObjectKind;
        // What the primaries shipped while they were primary (every 200 ms here).
        let bucket = crate::archive::Bucket::open(&crate::archive::BucketConfig {
            url: self.cluster.archive_url(),
            timeout: Duration::from_secs(10),
            ..Default::default()
        })
        .map_err(|e| LocalError::Check(e.to_string()))?;
        let root =
            ArchiveRoot::new(DEVICE, ARCHIVE_NAME).map_err(|e| LocalError::Check(e.to_string()))?;
        let entries: Vec<Entry> = bucket
            .list(&root.prefix())
            .await
            .map_err(|e| LocalError::Check(e.to_string()))?
            .iter()
            .filter_map(|l| Entry::parse(&root, &l.name))
            .collect();
        let bases = entries
            .iter()
            .filter(|e| e.kind == ObjectKind::Base)
            .count();
        let epochs: std::collections::BTreeSet<u64> = entries.iter().map(|e| e.epoch).collect();
        self.report.detail(&format!(
            "archive {}: {bases} base(s), {} segment(s), epochs {:?}, every object sealed for the \
             tokens' archive key and the offline recovery key",
            self.cluster.archive_url(),
            entries.len() - bases,
            epochs
        ));
        // The disaster: every token of the device is gone.
        for node in NODES {
            if !self.is_dead(node) {
                let pid = tokio::task::block_in_place(|| {
                    self.cluster.kill_hard(&format!("node {node}"))
                })?;
                self.report.detail(&format!("kill -9 {pid} (node {node})"));
            }
            let hsm = self.cluster.dir.join("nodes").join(node).join("hsm");
            std::fs::remove_dir_all(&hsm).map_err(|e| LocalError::io("remove", &hsm, e))?;
        }
        self.report.detail(&format!(
            "the token directories of {} are deleted: no token of {DEVICE} is left",
            NODES.join(", ")
        ));
        // A new, empty token, restored from the bucket with the offline recovery key.
        let token = tokens::init_token(
            &self
                .cluster
                .dir
                .join("nodes")
                .join(RESTORED_NODE)
                .join("hsm"),
            TOKEN_LABEL,
        )?;
        let recovery = path_arg(&self.cluster.recovery_key());
        let url = self.cluster.archive_url();
        let bucket_flags = ["--bucket-url", url.as_str(), "--device", DEVICE];
        let text = tokio::task::block_in_place(|| {
            self.cluster.archive_command(
                &token,
                &[
                    &["restore"],
                    &bucket_flags[..],
                    &["--recovery-key", recovery.as_str(), "--json"],
                ]
                .concat(),
            )
        })?;
        let report: Value = serde_json::from_str(&text)
            .map_err(|e| LocalError::Check(format!("the restore report: {e}")))?;
        self.report.detail(&format!(
            "$ hsm-secrets archive restore --recovery-key … into a new token on {RESTORED_NODE}: \
             sequence {} (epoch {}), {} secrets, {} bytes, from a base and {} segment(s)",
            report["sequence"],
            report["epoch"],
            report["secrets"],
            report["bytes"],
            report["segments"]
        ));
        if let Some(stopped) = report["stopped"].as_str() {
            return Err(LocalError::Check(format!(
                "the restore stopped early: {stopped}"
            )));
        }
        let verified = tokio::task::block_in_place(|| {
            self.cluster.archive_command(
                &token,
                &[
                    &["verify"],
                    &bucket_flags[..],
                    &["--recovery-key", recovery.as_str()],
                ]
                .concat(),
            )
        })?;
        if let Some(line) = verified.lines().next() {
            self.report
                .detail(&format!("$ hsm-secrets archive verify: {line}"));
        }
        // A node on the restored token serves the secrets as they were stored.
        tokio::task::block_in_place(|| self.cluster.spawn_restored_node(&token))?;
        let node = self
            .cluster
            .node(RESTORED_NODE)
            .cloned()
            .ok_or_else(|| LocalError::Check("the restored node did not start".into()))?;
        clients::wait_csi_ready(&node.csi_socket, CONVERGE_TIMEOUT).await?;
        let target = self
            .publish(RESTORED_NODE, "checkout-3", attributes)
            .await?;
        let files = self.check_volume(&target)?;
        Ok(format!(
            "every token lost; restored to sequence {} from the archive with the offline \
             recovery key, verified, and {RESTORED_NODE} serves the {files} files as stored",
            report["sequence"]
        ))
    }

    /// The node plugins' audit trails: every record parses, each publish names the pod,
    /// its service account and the versions read, and no stored value appears anywhere.
    fn audit_summary(&self) -> Result<String, LocalError> {
        let dir = self.cluster.audit_dir();
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let (mut records, mut nodes) = (0, 0);
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| LocalError::Check(format!("audit directory {}: {e}", dir.display())))?;
        for entry in entries {
            let path = entry
                .map_err(|e| LocalError::Check(format!("audit directory: {e}")))?
                .path();
            let bytes = std::fs::read(&path)
                .map_err(|e| LocalError::Check(format!("{}: {e}", path.display())))?;
            for value in self.stored.values().flat_map(|keys| keys.values()) {
                if bytes.windows(value.len()).any(|w| w == value.as_slice()) {
                    return Err(LocalError::Check(format!(
                        "a secret value appears in the audit trail {}",
                        path.display()
                    )));
                }
            }
            nodes += 1;
            for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let record: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
                    LocalError::Check(format!("{}: a record is not JSON: {e}", path.display()))
                })?;
                let field = |name: &str| record[name].as_str().unwrap_or_default().to_string();
                let (operation, outcome) = (field("operation"), field("outcome"));
                if operation == "publish" && outcome == "ok" {
                    let complete = record["pod"]["serviceAccount"] == "checkout"
                        && record["secrets"].as_array().is_some_and(|s| {
                            !s.is_empty() && s.iter().all(|s| s["version"].is_u64())
                        });
                    if !complete {
                        return Err(LocalError::Check(format!(
                            "audit record without pod or versions in {}",
                            path.display()
                        )));
                    }
                }
                records += 1;
                *counts.entry(format!("{operation} {outcome}")).or_default() += 1;
            }
        }
        let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        Ok(format!(
            "audit trail: {records} records from {nodes} node plugins ({}); each publish names \
             the pod, its service account and the versions read; no secret value in it",
            counts.join(", ")
        ))
    }

    async fn clean_up(&mut self) -> Result<String, LocalError> {
        let mut unpublished = 0;
        let mut on_killed_nodes = 0;
        let mut errors = Vec::new();
        for volume in std::mem::take(&mut self.volumes) {
            let Some(node) = self.cluster.node(&volume.node).cloned() else {
                continue;
            };
            if self.is_dead(&volume.node) {
                // Its plugin went with the node (step 7 or 10); the shutdown below
                // unmounts what it left, as kubelet's cleanup would after a node loss.
                on_killed_nodes += 1;
                continue;
            }
            let result = async {
                clients::csi(&node.csi_socket)
                    .await?
                    .node_unpublish_volume(clients::unpublish_request(&volume.id, &volume.target))
                    .await
                    .map_err(|s| {
                        LocalError::Csi(format!(
                            "NodeUnpublishVolume on {}: {}",
                            volume.node,
                            s.message()
                        ))
                    })
            };
            match tokio::time::timeout(Duration::from_secs(20), result).await {
                Ok(Ok(_)) if !volume.target.exists() => unpublished += 1,
                Ok(Ok(_)) => errors.push(format!(
                    "{} still exists after unpublish",
                    volume.target.display()
                )),
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(_) => errors.push(format!("NodeUnpublishVolume on {} timed out", volume.node)),
            }
        }
        // Read before the shutdown removes the directory.
        match self.audit_summary() {
            Ok(summary) => self.report.detail(&summary),
            Err(e) => errors.push(e.to_string()),
        }
        let cleanup: Cleanup = tokio::task::block_in_place(|| self.cluster.shutdown());
        errors.extend(cleanup.errors.iter().cloned());
        self.report.detail(&format!(
            "{unpublished} volumes unpublished over CSI, {on_killed_nodes} on killed nodes left to the shutdown"
        ));
        if !cleanup.unmounted.is_empty() {
            self.report.detail(&format!(
                "{} leftover mounts unmounted: {}",
                cleanup.unmounted.len(),
                cleanup
                    .unmounted
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !cleanup.forced.is_empty() {
            self.report
                .warn(&format!("needed SIGKILL: {}", cleanup.forced.join(", ")));
        }
        self.report
            .detail(&format!("{} processes stopped", cleanup.stopped));
        let place = match (&cleanup.removed, &cleanup.kept) {
            (_, Some(kept)) => {
                self.report.detail(&format!(
                    "--keep: everything stays in {} (logs in logs/, state in state/, tokens in nodes/*/hsm)",
                    kept.display()
                ));
                format!("{} kept", kept.display())
            }
            (Some(removed), None) => format!("{} removed", removed.display()),
            (None, None) => "nothing to remove".into(),
        };
        if !errors.is_empty() {
            return Err(LocalError::Check(errors.join("; ")));
        }
        let unpublished_as = if self.cluster.plain_directories {
            "removed"
        } else {
            "unmounted"
        };
        Ok(format!(
            "{} volumes {unpublished_as}, {} processes stopped, {place}",
            unpublished + on_killed_nodes,
            cleanup.stopped
        ))
    }

    // ---- helpers --------------------------------------------------------------------

    fn admission(&self) -> Result<AdmissionClient, LocalError> {
        AdmissionClient::new(
            &self.cluster.webhook_url,
            &self.cluster.webhook_ca_pem,
            &self.cluster.webhook_server_name,
        )
    }

    fn agent(&self, node: &str) -> Result<AgentConnection, LocalError> {
        let endpoint = self
            .cluster
            .node(node)
            .map(|n| n.agent.clone())
            .ok_or_else(|| LocalError::Check(format!("no node {node}")))?;
        clients::agent(node, &endpoint, &self.cluster.controller_tls)
    }

    fn is_dead(&self, node: &str) -> bool {
        self.cluster
            .processes()
            .any(|(name, _)| name == format!("killed node {node}"))
    }

    /// Live nodes other than the primary, in name order.
    fn mirror_nodes(&self) -> Vec<String> {
        NODES
            .iter()
            .filter(|n| **n != self.primary && !self.is_dead(n))
            .map(|n| n.to_string())
            .collect()
    }

    async fn role_of(&self, node: &str) -> Result<String, LocalError> {
        let health = self.agent(node)?.health().await?;
        Ok(match health.role {
            Some(role) => format!("{role:?} at epoch {}", health.epoch),
            None => "no role".into(),
        })
    }

    async fn status(&self) -> Result<HSMDeviceStatus, LocalError> {
        Ok(self
            .state
            .get_device(DEVICE)
            .await?
            .and_then(|d| d.status)
            .unwrap_or_default())
    }

    /// Polls the device status until `check` accepts it; fails early when a process
    /// that should run has exited.
    async fn wait_status<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&HSMDeviceStatus) -> Option<T>,
    ) -> Result<T, LocalError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status().await?;
            if let Some(found) = check(&status) {
                return Ok(found);
            }
            self.cluster.check_processes()?;
            if Instant::now() >= deadline {
                return Err(LocalError::Timeout {
                    what: what.into(),
                    seconds: timeout.as_secs(),
                    hint: format!(
                        " (phase {:?}, primary {:?}); controller log: {}",
                        status.phase,
                        status.primary_node,
                        self.cluster.dir.join("logs/controller.log").display()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// After a failure: the tail of the log of the process that stopped, if one did.
    fn explain(&mut self, error: &LocalError) {
        if let LocalError::Exited { process, .. } = error
            && let Some(tail) = self.cluster.log_tail(process, 10)
        {
            self.report
                .detail(&format!("last lines of {process}'s log:"));
            self.report.detail(&tail);
        }
    }
}

/// The example workload: one container, the service account allowed by the HSMSecrets.
fn example_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "checkout-0",
            "namespace": NAMESPACE,
            "labels": {"app": "checkout"},
            "annotations": {
                "hsmsecrets.io/inject": "true",
                "hsmsecrets.io/secrets": SECRETS.join(","),
            }
        },
        "spec": {
            "serviceAccountName": SERVICE_ACCOUNT,
            "securityContext": {"fsGroup": FS_GROUP},
            "containers": [{"name": "app", "image": "registry.example/checkout:1.4"}]
        }
    })
}

/// What an injection did to a pod, read from the patched pod.
pub struct InjectionSummary {
    pub lines: Vec<String>,
    /// The injected CSI volume's attributes (what kubelet passes to the plugin).
    pub attributes: Option<BTreeMap<String, String>>,
}

/// Describes the injected volume, mounts, node affinity and annotation of `pod`.
pub fn summarize_injection(pod: &Value) -> InjectionSummary {
    let mut lines = Vec::new();
    let mut attributes = None;
    for volume in pod
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if volume["name"] != json!(VOLUME_NAME) {
            continue;
        }
        let csi = &volume["csi"];
        let attrs: BTreeMap<String, String> = csi["volumeAttributes"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        lines.push(format!(
            "+ volume {VOLUME_NAME}: CSI driver {}, readOnly {}, {}",
            csi["driver"].as_str().unwrap_or_default(),
            csi["readOnly"],
            attrs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        attributes = Some(attrs);
    }
    for container in pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            if mount["name"] == json!(VOLUME_NAME) {
                lines.push(format!(
                    "+ container {}: mounts it at {} (readOnly {})",
                    container["name"].as_str().unwrap_or_default(),
                    mount["mountPath"].as_str().unwrap_or_default(),
                    mount["readOnly"]
                ));
            }
        }
    }
    let affinity = pod.pointer("/spec/affinity/nodeAffinity");
    let preferred = affinity
        .and_then(|a| a.get("preferredDuringSchedulingIgnoredDuringExecution"))
        .and_then(Value::as_array);
    for term in preferred.into_iter().flatten() {
        for expr in term
            .pointer("/preference/matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            lines.push(format!(
                "+ node affinity (preferred, weight {}): {} {} {}",
                term["weight"],
                expr["key"].as_str().unwrap_or_default(),
                expr["operator"].as_str().unwrap_or_default(),
                expr["values"]
            ));
        }
    }
    if let Some(required) =
        affinity.and_then(|a| a.get("requiredDuringSchedulingIgnoredDuringExecution"))
    {
        lines.push(format!("+ node affinity (required): {required}"));
    }
    if let Some(status) = pod.pointer("/metadata/annotations/hsmsecrets.io~1status") {
        lines.push(format!(
            "+ annotation hsmsecrets.io/status: {}",
            status.as_str().unwrap_or_default()
        ));
    }
    InjectionSummary { lines, attributes }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_injected_pod_is_summarized_with_the_attributes_kubelet_passes() {
        let mut pod = example_pod();
        pod["spec"]["volumes"] = json!([{"name": VOLUME_NAME, "csi": {
            "driver": "csi.hsmsecrets.io", "readOnly": true,
            "volumeAttributes": {"secrets": "db-credentials", "device": DEVICE, "fileMode": "0440"}}}]);
        pod["spec"]["containers"][0]["volumeMounts"] =
            json!([{"name": VOLUME_NAME, "mountPath": "/var/run/hsm-secrets", "readOnly": true}]);
        pod["metadata"]["annotations"]["hsmsecrets.io/status"] = json!("injected");
        let summary = summarize_injection(&pod);
        let attributes = summary.attributes.expect("volume found");
        assert_eq!(
            attributes.get(ATTRIBUTE_DEVICE).map(String::as_str),
            Some(DEVICE)
        );
        assert_eq!(
            summary.lines,
            [
                "+ volume hsm-secrets: CSI driver csi.hsmsecrets.io, readOnly true, device=prod-hsm, fileMode=0440, secrets=db-credentials",
                "+ container app: mounts it at /var/run/hsm-secrets (readOnly true)",
                "+ annotation hsmsecrets.io/status: injected",
            ]
        );
        assert!(summarize_injection(&example_pod()).attributes.is_none());
    }
}
