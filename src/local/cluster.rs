//! The processes, tokens, certificates and directories of one local system, owned by
//! [`LocalCluster`]: dropping it (or [`LocalCluster::shutdown`]) stops every process,
//! unmounts every volume and removes the directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::LocalError;
use super::network::Network;
use super::processes::{ChildProcess, Launch, RecordedProcess, stop_all};
use super::tokens::{self, NodeToken};
use crate::admission::certificates::{self, ServingIdentity};
use crate::crd::{
    AccessSpec, HSMDevice, HSMDeviceSpec, HSMSecret, HSMSecretSpec, MirroringPolicy, MirroringSpec,
    Pkcs11Spec, SecretKeyRef,
};
use crate::mirror::generate_pki;
use crate::mirror::rpc::tls::TlsFiles;
use crate::state::FileState;

/// The device of the local system.
pub const DEVICE: &str = "prod-hsm";
/// The simulated nodes; the first is the preferred primary.
pub const NODES: [&str; 3] = ["worker-1", "worker-2", "worker-3"];
/// Every node's token carries this label, as one device's tokens do on a cluster.
pub const TOKEN_LABEL: &str = "prod";
/// The controller's name in the agent PKI.
pub const CONTROLLER: &str = "controller";
/// The node a disaster recovery brings up on a token restored from the archive.
pub const RESTORED_NODE: &str = "worker-4";
/// Where clients run on the private network (`local up --isolated-network`).
pub const CLIENTS: &str = "clients";
/// The Secret `spec.backup.credentialsSecret` names.
const ARCHIVE_SECRET: &str = "demo-archive";
/// The archive's name in the bucket.
pub const ARCHIVE_NAME: &str = "main";
/// The Service the webhook certificate is issued for (what the API server would dial).
pub const WEBHOOK_IDENTITY: (&str, &str) = ("hsm-secrets-webhook", "hsm-secrets-system");
/// Namespace and service account of the example workload.
pub const NAMESPACE: &str = "shop";
pub const SERVICE_ACCOUNT: &str = "checkout";
/// The HSMSecrets the local system declares (in [`NAMESPACE`]).
pub const SECRETS: [&str; 2] = ["db-credentials", "api-key"];

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Probe, lease and pull timing: short, so a failover takes seconds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timing {
    pub probe_interval_ms: u64,
    pub write_lease_ms: u64,
    pub lease_margin_ms: u64,
    pub failover_threshold: u32,
    pub pull_interval_ms: u64,
}

impl Timing {
    /// The sites of a two-site device: a failover inside a site needs 10 missed probes
    /// (3 s), not 3. Two complete systems share this machine, and a node starved for a
    /// second must not fail over to a mirror that has not copied what the site applied
    /// from the archive (mirroring ReadOnly: such a failover loses it, as the policy says).
    pub fn for_sites() -> Self {
        Self {
            failover_threshold: 10,
            ..Self::default()
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            probe_interval_ms: 300,
            write_lease_ms: 1500,
            lease_margin_ms: 500,
            failover_threshold: 3,
            pull_interval_ms: 200,
        }
    }
}

/// Where and how to start.
#[derive(Clone, Debug, Default)]
pub struct ClusterConfig {
    /// Use exactly this directory (`local up --dir`); it must be empty or absent.
    pub dir: Option<PathBuf>,
    /// Otherwise a fresh temporary directory inside this one (default: the system's).
    pub work_root: Option<PathBuf>,
    pub softhsm_module: Option<PathBuf>,
    pub timing: Timing,
    /// Children stop when this process dies (the demo); false for `local up`.
    pub tied_to_parent: bool,
    /// Leave the directory (and, with `local up`, the processes) in place.
    pub keep: bool,
    /// This system is one site of a device spread over two (DESIGN: sites); `None`: the
    /// single-site demo device archiving into a local directory.
    pub site: Option<SiteConfig>,
    /// Each process in its own network namespace on a private bridge (root only), so
    /// that `local fault` can cut, isolate and slow real links.
    pub isolated_network: bool,
    /// The device's mirroring policy (default `ReadOnly`).
    pub policy: Option<MirroringPolicy>,
}

/// One site of a device spread over two local systems, each standing for a cluster.
#[derive(Clone, Debug)]
pub struct SiteConfig {
    /// `spec.site.name`.
    pub name: String,
    /// This site's HSMDevice: each site's device has its own name, so its archive is its own.
    pub device: String,
    /// The bucket both sites archive into.
    pub bucket: BucketConfig,
    /// `spec.site.leaseSeconds`.
    pub lease_seconds: u32,
    /// A passive site: the active site it follows; `None`: the active site.
    pub follows: Option<Follows>,
}

/// A bucket as `spec.backup` and the archive Secret name it.
#[derive(Clone, Serialize, Deserialize)]
pub struct BucketConfig {
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Access key id and secret access key (an S3 bucket), written into the archive Secret.
    #[serde(skip)]
    pub credentials: Option<(String, String)>,
}

/// Never prints the secret access key.
impl std::fmt::Debug for BucketConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketConfig")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(id, _)| (id, "<redacted>")),
            )
            .finish()
    }
}

/// What a passive site takes from the active one: its device, the offline recovery key's
/// public half, and the token its archive key is copied from (the key ceremony between
/// sites, as between a device's tokens).
#[derive(Clone, Debug)]
pub struct Follows {
    pub device: String,
    pub recovery_public: PathBuf,
    pub key_source: NodeToken,
}

impl Follows {
    /// The active site recorded by `local up` in `state`.
    pub fn active_system(state: &StateFile) -> Result<Self, LocalError> {
        let first = state.nodes.first().ok_or_else(|| {
            LocalError::Check(format!("the system in {} has no node", state.dir.display()))
        })?;
        Ok(Self {
            device: state.device.clone(),
            recovery_public: state.dir.join("archive").join("recovery.pub"),
            key_source: NodeToken {
                label: TOKEN_LABEL.into(),
                conf: first.softhsm_conf.clone(),
                pin_file: first.pin_file.clone(),
            },
        })
    }
}

/// Shown wherever volumes are made or checked when the system runs without the
/// privilege to mount.
pub const PLAIN_DIRECTORY_WARNING: &str =
    "plain directory, not tmpfs: run as root for in-memory mounts";

/// One simulated node: its token, agent and CSI plugin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEndpoints {
    pub name: String,
    /// `https://127.0.0.1:PORT` of its agent.
    pub agent: String,
    /// The CSI plugin's Unix socket.
    pub csi_socket: PathBuf,
    /// kubelet's directory of this node (volumes are published below `pods/`).
    pub kubelet_dir: PathBuf,
    pub softhsm_conf: PathBuf,
    pub pin_file: PathBuf,
}

/// What `local up` leaves behind for `status`, `put`, `get` and `down`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateFile {
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub softhsm_module: PathBuf,
    pub nodes: Vec<NodeEndpoints>,
    pub webhook_url: String,
    pub webhook_ca: PathBuf,
    pub webhook_server_name: String,
    /// The controller's agent client certificate (CA, cert, key).
    pub controller_tls: [PathBuf; 3],
    pub processes: Vec<RecordedProcess>,
    /// The CSI plugins write plain directories (no privilege to mount tmpfs).
    #[serde(default)]
    pub plain_directories: bool,
    /// The system's HSMDevice.
    #[serde(default = "default_device")]
    pub device: String,
    /// `spec.site.name`, when the system is one site of a device spread over two.
    #[serde(default)]
    pub site: Option<String>,
    /// The bucket the device archives into.
    #[serde(default)]
    pub bucket: Option<BucketConfig>,
    /// The private network the processes run on (`local up --isolated-network`).
    #[serde(default)]
    pub network: Option<Network>,
}

fn default_device() -> String {
    DEVICE.into()
}

impl StateFile {
    pub const NAME: &'static str = "local.json";

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(Self::NAME)
    }

    pub fn load(dir: &Path) -> Result<Self, LocalError> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).map_err(|e| LocalError::NotRunning {
            dir: dir.to_path_buf(),
            detail: format!("cannot read {}: {e}", path.display()),
        })?;
        let mut state: Self = serde_json::from_str(&text).map_err(|e| LocalError::NotRunning {
            dir: dir.to_path_buf(),
            detail: format!(
                "{} is not a state file of this version: {e}",
                path.display()
            ),
        })?;
        // The directory acted on is the one given, never one named inside the file.
        state.dir = std::fs::canonicalize(dir).map_err(|e| LocalError::io("resolve", dir, e))?;
        Ok(state)
    }

    /// Loads the state to act on it (`down` signals the processes it names and deletes
    /// the directory): only from a directory of our own that nobody else can write to.
    pub fn load_to_stop(dir: &Path) -> Result<Self, LocalError> {
        let state = Self::load(dir)?;
        check_private_dir(dir)?;
        Ok(state)
    }

    pub fn save(&self) -> Result<(), LocalError> {
        let path = Self::path(&self.dir);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| LocalError::Check(format!("cannot encode the state file: {e}")))?;
        std::fs::write(&path, text).map_err(|e| LocalError::io("write", &path, e))
    }

    /// The archive Secret the system's nodes read, as the DaemonSet would mount it.
    pub fn archive_secret(&self) -> PathBuf {
        self.dir
            .join("archive")
            .join("secrets")
            .join(ARCHIVE_SECRET)
    }

    pub fn controller_tls(&self) -> TlsFiles {
        let [ca, cert, key] = self.controller_tls.clone();
        TlsFiles { ca, cert, key }
    }
}

/// What cleanup did, for the report.
#[derive(Clone, Debug, Default)]
pub struct Cleanup {
    pub stopped: usize,
    /// Processes that ignored SIGTERM and were killed.
    pub forced: Vec<String>,
    /// Mounts left behind (e.g. by a killed plugin) and removed here.
    pub unmounted: Vec<PathBuf>,
    /// The directory removed, or kept (`--keep`).
    pub removed: Option<PathBuf>,
    pub kept: Option<PathBuf>,
    pub errors: Vec<String>,
}

/// A running local system.
pub struct LocalCluster {
    pub dir: PathBuf,
    pub module: PathBuf,
    pub timing: Timing,
    /// The system's HSMDevice ([`DEVICE`] unless a site names another).
    pub device: String,
    pub site: Option<SiteConfig>,
    pub state_dir: PathBuf,
    pub nodes: Vec<NodeEndpoints>,
    /// The nodes' tokens, in [`NODES`] order.
    pub tokens: Vec<NodeToken>,
    pub controller_tls: TlsFiles,
    pub webhook_url: String,
    pub webhook_ca_pem: String,
    pub webhook_ca: PathBuf,
    pub webhook_server_name: String,
    /// This process cannot mount tmpfs, so the CSI plugins run with
    /// `--unsafe-plain-directory` and volumes are plain directories on disk.
    pub plain_directories: bool,
    processes: Vec<ChildProcess>,
    /// Each process's own network namespace, when asked for.
    pub network: Option<Network>,
    policy: Option<MirroringPolicy>,
    /// Agent certificate of the node a disaster recovery brings up.
    restored_tls: Option<TlsFiles>,
    tied_to_parent: bool,
    keep: bool,
    detached: bool,
    shut_down: bool,
}

impl LocalCluster {
    /// Creates the tokens, certificates and state, and starts one node process per node
    /// (`hsm-secrets node` with its device agent, as the DaemonSet runs it), the
    /// controller and the webhook. On error everything started so far is stopped and
    /// removed.
    pub fn start(config: &ClusterConfig) -> Result<Self, LocalError> {
        let dir = prepare_dir(config)?;
        let mut cluster = Self {
            dir: dir.clone(),
            module: PathBuf::new(),
            timing: config.timing.clone(),
            device: config
                .site
                .as_ref()
                .map_or_else(|| DEVICE.to_string(), |s| s.device.clone()),
            site: config.site.clone(),
            state_dir: dir.join("state"),
            nodes: Vec::new(),
            tokens: Vec::new(),
            controller_tls: TlsFiles {
                ca: PathBuf::new(),
                cert: PathBuf::new(),
                key: PathBuf::new(),
            },
            webhook_url: String::new(),
            webhook_ca_pem: String::new(),
            webhook_ca: PathBuf::new(),
            webhook_server_name: String::new(),
            plain_directories: false,
            processes: Vec::new(),
            network: None,
            policy: config.policy,
            restored_tls: None,
            tied_to_parent: config.tied_to_parent,
            keep: config.keep,
            detached: false,
            shut_down: false,
        };
        // On error `cluster` is dropped here, which stops and removes what was started.
        cluster.module = tokens::find_module(config.softhsm_module.as_deref())?;
        cluster.plain_directories = !can_mount_tmpfs(&dir);
        if config.isolated_network {
            let mut members = vec![CONTROLLER];
            members.extend(NODES);
            members.extend([RESTORED_NODE, CLIENTS]);
            cluster.network = Some(Network::create(&members)?);
        }
        cluster.boot()?;
        Ok(cluster)
    }

    fn boot(&mut self) -> Result<(), LocalError> {
        let logs = self.dir.join("logs");
        create_dir(&logs)?;
        let mut node_tokens = Vec::new();
        for node in NODES {
            node_tokens.push(tokens::init_token(
                &self.dir.join("nodes").join(node).join("hsm"),
                TOKEN_LABEL,
            )?);
        }
        let mut names: Vec<&str> = NODES.to_vec();
        names.push(CONTROLLER);
        names.push(RESTORED_NODE);
        let pki = generate_pki(&self.dir.join("pki"), &names)?;
        self.restored_tls = pki.files(RESTORED_NODE).cloned();
        self.prepare_archive(&node_tokens)?;
        self.controller_tls = pki
            .files(CONTROLLER)
            .cloned()
            .ok_or_else(|| LocalError::Check("the PKI has no controller certificate".into()))?;
        self.write_webhook_certificate()?;
        let state = FileState::open(&self.state_dir)?;
        let mut device = demo_device(&self.module.to_string_lossy(), &self.timing);
        device.metadata.name = Some(self.device.clone());
        device.spec.backup = Some(self.backup_spec());
        device.spec.site = self.site.as_ref().map(|site| self.site_spec(site));
        if let (Some(policy), Some(mirroring)) = (self.policy, device.spec.mirroring.as_mut()) {
            mirroring.policy = policy;
        }
        state.apply_device(&device)?;
        let secrets = demo_secrets(&self.device);
        for secret in &secrets {
            state.apply_secret(secret)?;
        }

        for (node, token) in NODES.iter().zip(&node_tokens) {
            let files = pki.files(node).cloned().ok_or_else(|| {
                LocalError::Check(format!("the PKI has no certificate for {node}"))
            })?;
            self.start_node(node, token, &files)?;
        }
        self.tokens = node_tokens;
        self.spawn_controller(&logs)?;
        self.spawn_webhook(&logs)?;
        Ok(())
    }

    /// Starts a child; `member`: whose namespace it runs in on the private network, if
    /// there is one.
    fn launch(
        &mut self,
        name: String,
        member: Option<&str>,
        args: Vec<String>,
        env: Vec<(&'static str, String)>,
    ) -> Result<usize, LocalError> {
        let logs = self.dir.join("logs");
        let netns = match (&self.network, member) {
            (Some(network), Some(member)) => Some(network.netns_path(member)?),
            _ => None,
        };
        let process = ChildProcess::spawn(Launch {
            name,
            args,
            env: [
                vec![
                    // Quiet by default; HSM_LOCAL_LOG (e.g. `hsm_secrets=debug`) for a
                    // post-mortem.
                    (
                        "HSM_LOG",
                        std::env::var("HSM_LOCAL_LOG").unwrap_or_else(|_| "warn".into()),
                    ),
                    // Logs go to files: no terminal colours.
                    ("NO_COLOR", "1".to_string()),
                ],
                env,
            ]
            .concat(),
            log_dir: &logs,
            tied_to_parent: self.tied_to_parent,
            netns,
        })?;
        self.processes.push(process);
        Ok(self.processes.len() - 1)
    }

    /// The archive's bucket: the site's, or a local directory.
    pub fn bucket(&self) -> BucketConfig {
        match &self.site {
            Some(site) => site.bucket.clone(),
            None => BucketConfig {
                url: format!(
                    "file://{}",
                    self.dir.join("archive").join("bucket").display()
                ),
                endpoint: None,
                region: None,
                credentials: None,
            },
        }
    }

    pub fn archive_url(&self) -> String {
        self.bucket().url
    }

    /// The offline recovery key (the cluster's nodes only get its `.pub`).
    pub fn recovery_key(&self) -> PathBuf {
        self.dir.join("archive").join("recovery.key")
    }

    /// The device's `spec.backup`: the local bucket, shipped every second; drills on demand
    /// (step 11 asks for one as `kubectl hsm backup verify` would).
    pub fn backup_spec(&self) -> crate::crd::BackupSpec {
        let bucket = self.bucket();
        crate::crd::BackupSpec {
            url: bucket.url,
            endpoint: bucket.endpoint,
            region: bucket.region,
            credentials_secret: ARCHIVE_SECRET.into(),
            archive_name: Some(ARCHIVE_NAME.into()),
            segment_interval_seconds: Some(1),
            base_interval_minutes: None,
            retention_days: None,
            verify_interval_minutes: Some(0),
            lag_alert_seconds: None,
        }
    }

    /// `spec.site`: the site's name and lease, and a passive site's followed archive (the
    /// same bucket and Secret as this site's own `spec.backup`).
    pub fn site_spec(&self, site: &SiteConfig) -> crate::crd::SiteSpec {
        crate::crd::SiteSpec {
            name: site.name.clone(),
            follow_archive: site
                .follows
                .as_ref()
                .map(|follows| crate::crd::FollowArchive {
                    url: site.bucket.url.clone(),
                    endpoint: site.bucket.endpoint.clone(),
                    region: site.bucket.region.clone(),
                    credentials_secret: ARCHIVE_SECRET.into(),
                    device: follows.device.clone(),
                    archive_name: Some(ARCHIVE_NAME.into()),
                }),
            lease_seconds: Some(site.lease_seconds),
            lag_alert_seconds: None,
        }
    }

    /// Where the nodes find the Secrets `spec.backup` names (in a cluster: mounted).
    fn archive_secrets(&self) -> PathBuf {
        self.dir.join("archive").join("secrets")
    }

    /// The offline recovery key pair, and the device's archive key inside every token: made
    /// on the first token (a passive site copies it from the active site's), copied to the
    /// others by the key ceremony, each step a run of `hsm-secrets archive` on a token.
    fn prepare_archive(&self, tokens: &[NodeToken]) -> Result<(), LocalError> {
        let dir = self.dir.join("archive");
        create_dir(&dir)?;
        let follows = self.site.as_ref().and_then(|s| s.follows.as_ref());
        let public = match follows {
            // One recovery key for the device, whichever site archived an object.
            Some(follows) => follows.recovery_public.clone(),
            None => {
                crate::archive::RecoverySecretKey::generate()
                    .and_then(|key| key.write_new(&self.recovery_key()))
                    .map_err(|e| LocalError::Check(format!("recovery key: {e}")))?;
                self.recovery_key().with_extension("pub")
            }
        };
        // The archive Secret as the DaemonSet would mount it: only the public half, and
        // the bucket's credentials.
        let secret = self.archive_secrets().join(ARCHIVE_SECRET);
        create_dir(&secret)?;
        let mounted = secret.join(crate::archive::supervisor::RECOVERY_PUBLIC_KEY_FILE);
        std::fs::copy(&public, &mounted).map_err(|e| LocalError::io("copy", &mounted, e))?;
        if let Some((id, key)) = &self.bucket().credentials {
            write_file(&secret.join("access-key-id"), id.as_bytes())?;
            write_file(&secret.join("secret-access-key"), key.as_bytes())?;
        }
        let (source, receivers) = match follows {
            Some(follows) => (&follows.key_source, tokens),
            None => match tokens.split_first() {
                Some((first, others)) => {
                    self.archive_command(first, &["key-init"])?;
                    (first, others)
                }
                None => return Ok(()),
            },
        };
        for (n, token) in receivers.iter().enumerate() {
            let transport = path_arg(&dir.join(format!("transport-{n}.json")));
            let wrapped = path_arg(&dir.join(format!("wrapped-{n}.bin")));
            self.archive_command(token, &["key-receive-begin", "--out", &transport])?;
            self.archive_command(
                source,
                &["key-export", "--transport", &transport, "--out", &wrapped],
            )?;
            self.archive_command(token, &["key-receive", "--wrapped", &wrapped])?;
        }
        Ok(())
    }

    /// Runs `hsm-secrets archive ARGS` on `token` to completion; its standard output.
    pub fn archive_command(&self, token: &NodeToken, args: &[&str]) -> Result<String, LocalError> {
        let exe = std::env::current_exe().map_err(|e| LocalError::Spawn {
            process: "archive".into(),
            detail: format!("cannot find this program's path: {e}"),
        })?;
        let out = std::process::Command::new(exe)
            .arg("archive")
            .args(args)
            .args(["--pkcs11-library", &path_arg(&self.module)])
            .args(["--token-label", &token.label])
            .args(["--pin-file", &path_arg(&token.pin_file)])
            .env("SOFTHSM2_CONF", &token.conf)
            .env("HSM_LOG", "warn")
            .env("NO_COLOR", "1")
            .output()
            .map_err(|e| LocalError::Spawn {
                process: "archive".into(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(LocalError::Check(format!(
                "hsm-secrets archive {}: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a node on `token` (restored from the archive): its CSI plugin reads the
    /// restored token; no controller assigns it a role.
    pub fn spawn_restored_node(&mut self, token: &NodeToken) -> Result<(), LocalError> {
        let files = self
            .restored_tls
            .clone()
            .ok_or_else(|| LocalError::Check("no certificate for the restored node".into()))?;
        self.start_node(RESTORED_NODE, token, &files)
    }

    /// Starts node `name` on `token` under `<dir>/nodes/<name>` and records its endpoints.
    fn start_node(
        &mut self,
        name: &str,
        token: &NodeToken,
        files: &TlsFiles,
    ) -> Result<(), LocalError> {
        let node_dir = self.dir.join("nodes").join(name);
        let mut endpoints = NodeEndpoints {
            name: name.into(),
            agent: String::new(),
            csi_socket: node_dir.join("csi/csi.sock"),
            kubelet_dir: node_dir.join("kubelet"),
            softhsm_conf: token.conf.clone(),
            pin_file: token.pin_file.clone(),
        };
        endpoints.agent = self.spawn_node(&endpoints, token, files)?;
        self.nodes.push(endpoints);
        Ok(())
    }

    /// Where each node's agent journals the writes it acknowledged, `<node>.jsonl`.
    pub fn journal_dir(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// Where each node plugin writes its audit trail, `<node>.jsonl`.
    pub fn audit_dir(&self) -> PathBuf {
        self.dir.join("audit")
    }

    /// One node: the CSI plugin and the device agent on its token, in one process (the
    /// token's only writer). Returns the agent's endpoint once it listens.
    fn spawn_node(
        &mut self,
        node: &NodeEndpoints,
        token: &NodeToken,
        files: &TlsFiles,
    ) -> Result<String, LocalError> {
        if let Some(csi_dir) = node.csi_socket.parent() {
            create_dir(csi_dir)?;
        }
        create_dir(&node.kubelet_dir.join("pods"))?;
        create_dir(&self.audit_dir())?;
        create_dir(&self.journal_dir())?;
        let mut args = vec![
            "node".into(),
            "--node-name".into(),
            node.name.clone(),
            "--endpoint".into(),
            format!("unix://{}", node.csi_socket.display()),
            "--kubelet-dir".into(),
            path_arg(&node.kubelet_dir),
            // HSMSecrets from the state directory, read at each publish: secrets that
            // `local put` declares later can be mounted too.
            "--catalog".into(),
            path_arg(&self.state_dir),
            "--device".into(),
            self.device.clone(),
            "--pkcs11-library".into(),
            path_arg(&self.module),
            "--token-label".into(),
            token.label.clone(),
            "--pin-file".into(),
            path_arg(&token.pin_file),
            "--pin-refusal-dir".into(),
            path_arg(&self.state_dir.join("pin-refusals")),
            "--agent-listen".into(),
            match self
                .network
                .as_ref()
                .map(|n| n.member(&node.name))
                .transpose()?
            {
                Some(member) => format!("{}:0", member.addr),
                None => "127.0.0.1:0".into(),
            },
            "--agent-tls-ca".into(),
            path_arg(&files.ca),
            "--agent-tls-cert".into(),
            path_arg(&files.cert),
            "--agent-tls-key".into(),
            path_arg(&files.key),
            "--pull-interval-ms".into(),
            self.timing.pull_interval_ms.to_string(),
            "--audit-log".into(),
            path_arg(&self.audit_dir().join(format!("{}.jsonl", node.name))),
            // Every acknowledged write, for checking a run's history (no values).
            "--write-journal".into(),
            path_arg(&self.journal_dir().join(format!("{}.jsonl", node.name))),
            // While its token is the primary, the node archives as the HSMDevice's
            // spec.backup says, reading the Secret it names from here.
            "--archive-credentials-root".into(),
            path_arg(&self.archive_secrets()),
        ];
        if self.plain_directories {
            args.push("--unsafe-plain-directory".into());
        }
        let member = node.name.clone();
        let index = self.launch(
            format!("node {}", node.name),
            Some(&member),
            args,
            vec![("SOFTHSM2_CONF", path_arg(&token.conf))],
        )?;
        let line = self.processes[index].wait_for_output("listening on", START_TIMEOUT)?;
        let addr = line.rsplit(' ').next().unwrap_or_default();
        Ok(format!("https://{addr}"))
    }

    fn spawn_controller(&mut self, _logs: &Path) -> Result<(), LocalError> {
        let agents = self
            .nodes
            .iter()
            .map(|n| format!("{}={}", n.name, n.agent))
            .collect::<Vec<_>>()
            .join(",");
        let t = self.timing.clone();
        let args = vec![
            "controller".into(),
            "--state".into(),
            path_arg(&self.state_dir),
            "--agent".into(),
            agents,
            "--tls-ca".into(),
            path_arg(&self.controller_tls.ca),
            "--tls-cert".into(),
            path_arg(&self.controller_tls.cert),
            "--tls-key".into(),
            path_arg(&self.controller_tls.key),
            "--identity".into(),
            "local-controller".into(),
            "--probe-interval-ms".into(),
            t.probe_interval_ms.to_string(),
            "--write-lease-ms".into(),
            t.write_lease_ms.to_string(),
            "--lease-margin-ms".into(),
            t.lease_margin_ms.to_string(),
        ];
        self.launch("controller".into(), Some(CONTROLLER), args, Vec::new())?;
        Ok(())
    }

    fn write_webhook_certificate(&mut self) -> Result<(), LocalError> {
        let identity = ServingIdentity {
            service: WEBHOOK_IDENTITY.0.into(),
            namespace: WEBHOOK_IDENTITY.1.into(),
        };
        let bundle =
            certificates::issue_authority_and_leaf(&identity, k8s_openapi::jiff::Timestamp::now())?;
        let dir = self.dir.join("webhook");
        create_dir(&dir)?;
        self.webhook_ca = dir.join("ca.crt");
        write_file(&self.webhook_ca, bundle.ca_cert_pem.as_bytes())?;
        write_file(&dir.join("tls.crt"), bundle.cert_pem.as_bytes())?;
        write_file(&dir.join("tls.key"), bundle.key_pem.as_bytes())?;
        self.webhook_ca_pem = bundle.ca_cert_pem.clone();
        self.webhook_server_name = identity.dns_names()[0].clone();
        Ok(())
    }

    fn spawn_webhook(&mut self, _logs: &Path) -> Result<(), LocalError> {
        let port = free_port()?;
        let dir = self.dir.join("webhook");
        let args = vec![
            "webhook".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--tls-cert".into(),
            path_arg(&dir.join("tls.crt")),
            "--tls-key".into(),
            path_arg(&dir.join("tls.key")),
            "--state".into(),
            path_arg(&self.state_dir),
        ];
        // With the clients on the private network: the API server's side of it.
        self.launch("webhook".into(), Some(CLIENTS), args, Vec::new())?;
        self.webhook_url = format!("https://127.0.0.1:{port}");
        Ok(())
    }

    pub fn node(&self, name: &str) -> Option<&NodeEndpoints> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Names and pids of the processes, in start order.
    pub fn processes(&self) -> impl Iterator<Item = (&str, i32)> {
        self.processes.iter().map(|p| (p.name.as_str(), p.pid))
    }

    /// An error naming the first process that has stopped, if any.
    pub fn check_processes(&mut self) -> Result<(), LocalError> {
        self.processes
            .iter_mut()
            .filter(|p| !p.name.starts_with("killed "))
            .try_for_each(ChildProcess::check_alive)
    }

    /// SIGKILL of the named process (`agent worker-1`), as a crash would do it.
    pub fn kill_hard(&mut self, name: &str) -> Result<i32, LocalError> {
        let process = self
            .processes
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| LocalError::Check(format!("no process {name}")))?;
        process.kill_hard()?;
        let pid = process.pid;
        // Remembered as killed on purpose: no longer a failure to report.
        process.name = format!("killed {name}");
        Ok(pid)
    }

    /// The last lines of a process's log, for a failure report.
    pub fn log_tail(&self, name: &str, lines: usize) -> Option<String> {
        let p = self.processes.iter().find(|p| p.name == name)?;
        let text = std::fs::read_to_string(&p.log).ok()?;
        let all: Vec<&str> = text.lines().collect();
        Some(all[all.len().saturating_sub(lines)..].join("\n"))
    }

    /// What `local status|put|get|down` need to find this system again.
    pub fn state_file(&self) -> StateFile {
        StateFile {
            dir: self.dir.clone(),
            state_dir: self.state_dir.clone(),
            softhsm_module: self.module.clone(),
            nodes: self.nodes.clone(),
            webhook_url: self.webhook_url.clone(),
            webhook_ca: self.webhook_ca.clone(),
            webhook_server_name: self.webhook_server_name.clone(),
            controller_tls: [
                self.controller_tls.ca.clone(),
                self.controller_tls.cert.clone(),
                self.controller_tls.key.clone(),
            ],
            processes: self.processes.iter().map(ChildProcess::record).collect(),
            plain_directories: self.plain_directories,
            device: self.device.clone(),
            site: self.site.as_ref().map(|s| s.name.clone()),
            bucket: Some(self.bucket()),
            network: self.network.clone(),
        }
    }

    /// Leaves everything running (`local up`): nothing is stopped or removed on drop.
    pub fn detach(mut self) -> StateFile {
        self.detached = true;
        self.state_file()
    }

    /// Stops every process (SIGTERM, then SIGKILL), unmounts whatever is still mounted
    /// below the directory and removes it (unless kept). Idempotent.
    pub fn shutdown(&mut self) -> Cleanup {
        if self.shut_down {
            return Cleanup::default();
        }
        self.shut_down = true;
        let keep = self.keep;
        let cleanup = stop_and_remove(&self.dir, &mut self.processes, keep);
        if let Some(network) = &self.network {
            network.remove();
        }
        cleanup
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if !self.detached {
            self.shutdown();
        }
    }
}

/// Stops `processes`, unmounts what is left below `dir` and removes `dir` unless `keep`.
pub fn stop_and_remove(dir: &Path, processes: &mut [ChildProcess], keep: bool) -> Cleanup {
    let mut cleanup = Cleanup {
        stopped: processes
            .iter_mut()
            .map(|p| p.is_running())
            .filter(|r| *r)
            .count(),
        ..Cleanup::default()
    };
    cleanup.forced = stop_all(processes, STOP_GRACE);
    match unmount_below(dir) {
        Ok(unmounted) => cleanup.unmounted = unmounted,
        Err(e) => cleanup.errors.push(e.to_string()),
    }
    if keep {
        cleanup.kept = Some(dir.to_path_buf());
    } else {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => cleanup.removed = Some(dir.to_path_buf()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => cleanup
                .errors
                .push(format!("cannot remove {}: {e}", dir.display())),
        }
    }
    cleanup
}

/// Whether this process may mount tmpfs (root with CAP_SYS_ADMIN, and no security
/// policy in the way): tried on a probe directory in `dir`, not guessed from the uid.
pub fn can_mount_tmpfs(dir: &Path) -> bool {
    use nix::mount::MntFlags;
    let probe = dir.join(".mount-probe");
    if std::fs::create_dir(&probe).is_err() {
        return false;
    }
    let mounted = nix::mount::mount(
        Some("hsm-secrets-probe"),
        &probe,
        Some("tmpfs"),
        hsm_secrets_csi::mount::MOUNT_FLAGS,
        Some("size=4k"),
    )
    .is_ok();
    if mounted && let Err(error) = nix::mount::umount2(&probe, MntFlags::MNT_DETACH) {
        tracing::warn!(%error, probe = %probe.display(), "cannot unmount the tmpfs probe");
    }
    let _ = std::fs::remove_dir(&probe);
    mounted
}

/// Unmounts (lazily, deepest first) every mount point below `dir`.
pub fn unmount_below(dir: &Path) -> Result<Vec<PathBuf>, LocalError> {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return Ok(Vec::new());
    };
    let mounts = hsm_secrets_csi::mountinfo::read_mounts()
        .map_err(|e| LocalError::Csi(format!("cannot read the mount table: {e}")))?;
    let mut points: Vec<PathBuf> = mounts
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&dir) && *p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    let mut done = Vec::new();
    for point in points {
        match nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => done.push(point),
            Err(e) => {
                return Err(LocalError::Csi(format!(
                    "cannot unmount {}: {e}",
                    point.display()
                )));
            }
        }
    }
    Ok(done)
}

/// The bucket credentials in `dir` (`access-key-id`, `secret-access-key`, as in the
/// archive Secret); `None` when `dir` holds neither (a `file://` bucket).
pub fn read_bucket_credentials(dir: &Path) -> Result<Option<(String, String)>, LocalError> {
    let read = |name: &str| -> Result<Option<String>, LocalError> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LocalError::io("read", &path, e)),
        }
    };
    match (read("access-key-id")?, read("secret-access-key")?) {
        (Some(id), Some(key)) => Ok(Some((id, key))),
        (None, None) => Ok(None),
        _ => Err(LocalError::Check(format!(
            "{} must hold both access-key-id and secret-access-key, or neither",
            dir.display()
        ))),
    }
}

/// The mirrored device of the local system: primary `worker-1`, mirrors `worker-2` and
/// `worker-3`, automatic failover after `failover_threshold` failed probes.
pub fn demo_device(library: &str, timing: &Timing) -> HSMDevice {
    HSMDevice::new(
        DEVICE,
        HSMDeviceSpec {
            pkcs11: Pkcs11Spec {
                library: library.into(),
                token_label: TOKEN_LABEL.into(),
                token_serial: None,
                pin_secret_ref: SecretKeyRef {
                    namespace: WEBHOOK_IDENTITY.1.into(),
                    name: "prod-hsm-pin".into(),
                    key: "pin".into(),
                },
            },
            mirroring: Some(MirroringSpec {
                policy: MirroringPolicy::ReadOnly,
                sync_interval: Some(300),
                auto_failover: Some(true),
                primary_node: Some(NODES[0].into()),
                target_nodes: NODES[1..].iter().map(|n| n.to_string()).collect(),
                failover_threshold: Some(timing.failover_threshold),
            }),
            backup: None,
            site: None,
        },
    )
}

/// The HSMSecrets of the example workload on `device`: readable by its service account only.
pub fn demo_secrets(device: &str) -> Vec<HSMSecret> {
    SECRETS
        .iter()
        .map(|name| local_hsm_secret(device, NAMESPACE, name, Some(SERVICE_ACCOUNT)))
        .collect()
}

/// An HSMSecret of `device`, mountable by `service_account` (any of the namespace's when
/// `None`).
pub fn local_hsm_secret(
    device: &str,
    namespace: &str,
    name: &str,
    service_account: Option<&str>,
) -> HSMSecret {
    let mut secret = HSMSecret::new(
        name,
        HSMSecretSpec {
            device_ref: device.into(),
            secret_name: None,
            secret_type: None,
            sync_interval: None,
            source: None,
            access: service_account.map(|sa| AccessSpec {
                service_accounts: vec![sa.into()],
            }),
            deletion_policy: None,
        },
    );
    secret.metadata.namespace = Some(namespace.into());
    secret
}

/// A directory of the local system must belong to this user and be closed to others
/// (mode 0700 is set when it is ours): it holds tokens, PINs and the list of processes
/// `down` stops.
fn check_private_dir(dir: &Path) -> Result<(), LocalError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(dir).map_err(|e| LocalError::io("inspect", dir, e))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        return Err(LocalError::Check(format!(
            "{} is not a directory owned by uid {me}; choose another with --dir",
            dir.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| LocalError::io("restrict", dir, e))?;
    }
    Ok(())
}

fn prepare_dir(config: &ClusterConfig) -> Result<PathBuf, LocalError> {
    if let Some(dir) = &config.dir {
        create_dir(dir)?;
        check_private_dir(dir)?;
        let mut entries = std::fs::read_dir(dir).map_err(|e| LocalError::io("read", dir, e))?;
        if entries.next().is_some() {
            return Err(LocalError::Check(format!(
                "{} is not empty: is a local system running there? (`hsm-secrets local down --dir {}`)",
                dir.display(),
                dir.display()
            )));
        }
        return std::fs::canonicalize(dir).map_err(|e| LocalError::io("resolve", dir, e));
    }
    let root = config.work_root.clone().unwrap_or_else(std::env::temp_dir);
    create_dir(&root)?;
    let temp = tempfile::Builder::new()
        .prefix("hsm-secrets-demo-")
        .tempdir_in(&root)
        .map_err(|e| LocalError::io("create a directory in", &root, e))?;
    let dir = temp.keep();
    std::fs::canonicalize(&dir).map_err(|e| LocalError::io("resolve", &dir, e))
}

fn create_dir(dir: &Path) -> Result<(), LocalError> {
    std::fs::create_dir_all(dir).map_err(|e| LocalError::io("create", dir, e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), LocalError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| LocalError::io("write", path, e))
}

pub(crate) fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A loopback port free right now (the webhook binds it a moment later).
fn free_port() -> Result<u16, LocalError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| LocalError::io("bind", "127.0.0.1:0", e))
}

/// Processes recorded by `local up`, to stop them.
pub fn adopt(state: &StateFile) -> Vec<ChildProcess> {
    state.processes.iter().map(ChildProcess::adopt).collect()
}

/// The running process `name` names: `controller`, `webhook` or a node (`worker-1`).
/// Only a live process of this program is named, never a pid since reused.
pub fn process_of(state: &StateFile, name: &str) -> Result<RecordedProcess, LocalError> {
    let recorded = state
        .processes
        .iter()
        .find(|p| p.name == name || p.name == format!("node {name}"))
        .ok_or_else(|| {
            LocalError::Check(format!(
                "no process {name}: name the controller, the webhook or a node ({})",
                state
                    .nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    if !ChildProcess::adopt(recorded).is_running() {
        return Err(LocalError::Check(format!(
            "{name} (pid {}) is not running",
            recorded.pid
        )));
    }
    Ok(recorded.clone())
}
