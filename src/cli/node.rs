//! `hsm-secrets node`: the CSI node plugin (one per node, a DaemonSet).

use crate::telemetry::OpsServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use hsm_secrets_csi::{IdentityService, NodeConfig, NodeService};

use crate::contract::CSI_DRIVER;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::agent::{SyncTuning, serve_agent};
use super::shutdown_signal;
use crate::archive::{
    ARCHIVE_KEY_LABEL, ArchiveMetrics, ArchiveSettings, BucketSettings, Supervisor, TokenArchiveKey,
};
use crate::hsm::{Pkcs11Config, Pkcs11Store, SecretStore, StoreError};
use crate::mirror::{
    AgentMetrics, AgentTls, EndpointResolver, NodeAddressEndpoints, StaticEndpoints, TlsFiles,
};
use crate::node::events::PodEventSink;
use crate::node::{
    AuditLog, HsmVolumeSource, KubeCatalog, KubePodEvents, LocalDevice, Mounts, NodeMetrics,
    NodeReporter, RemoteReads, SecretCatalog, StateCatalog, StaticCatalog, SyncFailureEvents, ops,
    record_node_event,
};
use crate::state::{FileState, KubeState, StateStore};
use crate::telemetry::CommonArgs;

/// Time in-flight CSI calls get to finish after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `hsm-secrets node`. The PIN comes only from a file (a mounted Secret).
#[derive(Args, Clone, Debug)]
pub struct NodeArgs {
    /// CSI endpoint kubelet connects to (a Unix socket).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// This node's name (the DaemonSet sets it from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The HSMDevice whose token is plugged into this node; omit on nodes without an HSM.
    #[arg(long, env = "HSM_DEVICE", requires_all = ["pkcs11_library", "token_label", "pin_file"])]
    pub device: Option<String>,
    /// Path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[arg(long, env = "HSM_PKCS11_LIBRARY", requires = "device")]
    pub pkcs11_library: Option<PathBuf>,
    /// Label of the token to open (matched exactly).
    #[arg(long, env = "HSM_TOKEN_LABEL", requires = "device")]
    pub token_label: Option<String>,
    /// File holding the token's user PIN (mount the PIN Secret read-only).
    #[arg(long, env = "HSM_PIN_FILE", requires = "device")]
    pub pin_file: Option<PathBuf>,
    /// Directory on the node where a PIN the token refused is remembered (a salted
    /// digest, never the PIN), so no restart offers the token that PIN again.
    #[arg(
        long,
        env = "HSM_PIN_REFUSAL_DIR",
        default_value = "/var/lib/hsm-secrets/pin-refusals"
    )]
    pub pin_refusal_dir: PathBuf,
    /// kubelet's root directory; volumes are published only under its pods/ directory.
    #[arg(long, env = "KUBELET_DIR", default_value = hsm_secrets_csi::DEFAULT_KUBELET_DIR)]
    pub kubelet_dir: PathBuf,
    /// Where HSMSecrets come from: `kube` (watch the cluster), the path of a YAML file
    /// of HSMSecret documents, or the state directory of the no-cluster mode (read at
    /// every publish).
    #[arg(long, env = "HSM_CATALOG", default_value = "kube")]
    pub catalog: String,
    /// Serve this node's token as the device agent (mirroring, the controller's probes)
    /// on this address, in this process: one process per token.
    #[arg(long, env = "HSM_AGENT_LISTEN", requires_all = ["device", "agent_tls_ca"])]
    pub agent_listen: Option<SocketAddr>,
    /// PEM file of the agent CA (agent serving and remote reads).
    #[arg(long, env = "HSM_AGENT_TLS_CA", requires_all = ["agent_tls_cert", "agent_tls_key"])]
    pub agent_tls_ca: Option<PathBuf>,
    /// PEM file of this node's agent certificate (it must name the node).
    #[arg(long, env = "HSM_AGENT_TLS_CERT", requires = "agent_tls_ca")]
    pub agent_tls_cert: Option<PathBuf>,
    /// PEM file of its private key.
    #[arg(long, env = "HSM_AGENT_TLS_KEY", requires = "agent_tls_ca")]
    pub agent_tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub sync: SyncTuning,
    /// Remote reads: an agent as NODE=https://HOST:PORT (repeatable), for devices this
    /// node holds no token of.
    #[arg(
        long = "agent",
        env = "HSM_AGENTS",
        value_delimiter = ',',
        requires = "agent_tls_ca"
    )]
    pub agents: Vec<String>,
    /// Remote reads in a cluster: agents listen on this port at their node's InternalIP.
    #[arg(long, env = "HSM_AGENT_PORT", requires = "agent_tls_ca")]
    pub agent_port: Option<u16>,
    /// Where remote reads learn the device's roles (HSMDevice status): `kube`, a state
    /// directory of the no-cluster mode, or `none` (agents in --agent order). Default:
    /// `kube` with `--catalog kube`, else `none`.
    #[arg(long, env = "HSM_STATE")]
    pub state: Option<String>,
    /// Development only: write volumes into plain directories instead of mounting tmpfs
    /// (secrets reach the disk); for running without the privilege to mount.
    #[arg(long, env = "HSM_UNSAFE_PLAIN_DIRECTORY")]
    pub unsafe_plain_directory: bool,
    /// Where the audit trail goes, one JSON record per line: `-` (standard output, the
    /// default), a file appended to, or `none`.
    #[arg(long, env = "HSM_AUDIT_LOG", default_value = "-")]
    pub audit_log: PathBuf,
    /// Archive every change to this bucket while this node's token is the primary
    /// (`s3://BUCKET[/PREFIX]` or `file:///DIRECTORY`). Needs --agent-listen and
    /// --archive-recovery-public-key.
    #[arg(long, env = "HSM_ARCHIVE_URL", requires_all = ["archive_recovery_public_key", "agent_listen"])]
    pub archive_url: Option<String>,
    /// S3 endpoint of an S3-compatible server (MinIO, Ceph): http(s)://HOST:PORT.
    #[arg(long, env = "HSM_ARCHIVE_ENDPOINT")]
    pub archive_endpoint: Option<String>,
    #[arg(long, env = "HSM_ARCHIVE_REGION")]
    pub archive_region: Option<String>,
    /// Directory with the files access-key-id and secret-access-key (a mounted Secret).
    #[arg(long, env = "HSM_ARCHIVE_CREDENTIALS_DIR")]
    pub archive_credentials_dir: Option<PathBuf>,
    /// The archive's name within the device's prefix.
    #[arg(long, env = "HSM_ARCHIVE_NAME", default_value = "main")]
    pub archive_name: String,
    /// The offline recovery key's public half (`archive recovery-keygen` wrote FILE.pub):
    /// every object is sealed for it too, so the archive opens when every token is lost.
    #[arg(long, env = "HSM_ARCHIVE_RECOVERY_PUBLIC_KEY")]
    pub archive_recovery_public_key: Option<PathBuf>,
    /// How often changes are shipped: the most writes losing every token would cost.
    #[arg(long, env = "HSM_ARCHIVE_SEGMENT_INTERVAL_MS", default_value_t = 5000)]
    pub archive_segment_interval_ms: u64,
    /// How often a new base snapshot starts a chain (restores replay at most this much).
    #[arg(long, env = "HSM_ARCHIVE_BASE_INTERVAL_S", default_value_t = 21600)]
    pub archive_base_interval_s: u64,
    /// How far back points stay restorable (seconds); older bases and segments are
    /// deleted after each new base. 0 keeps everything.
    #[arg(long, env = "HSM_ARCHIVE_RETENTION_S", default_value_t = 7 * 24 * 3600)]
    pub archive_retention_s: u64,
    /// Where the Secrets an HSMDevice's spec.backup names are mounted, one directory per
    /// Secret (recovery.pub, access-key-id, secret-access-key).
    #[arg(long, env = "HSM_ARCHIVE_CREDENTIALS_ROOT", default_value = crate::archive::supervisor::DEFAULT_CREDENTIALS_ROOT)]
    pub archive_credentials_root: PathBuf,
}

/// Runs the node plugin until SIGTERM or ctrl-c.
pub fn run(args: NodeArgs, common: CommonArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve(args, common))
}

async fn serve(args: NodeArgs, common: CommonArgs) -> anyhow::Result<()> {
    if args.node_name.trim().is_empty() {
        bail!("--node-name (NODE_NAME) is empty; set it from the pod's spec.nodeName");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let (catalog, client) = open_catalog(&args.catalog).await?;
    let node_events = client.clone();
    // Events go to the pod only in a cluster; without one the failure is logged.
    let events = SyncFailureEvents::new(client.map(|client| {
        Arc::new(KubePodEvents::new(client, &args.node_name)) as Arc<dyn PodEventSink>
    }));
    let device = args.device.clone().map(LocalDevice::opening);
    let tls = agent_tls(&args)?;
    let mut registry = Registry::default();
    let metrics = NodeMetrics::register(&mut registry);
    // Registered now, reporting once the token is open and the agent runs.
    let agent_metrics = args
        .agent_listen
        .is_some()
        .then(|| AgentMetrics::register(&mut registry));
    let audit = match args.audit_log.as_os_str() == "none" {
        true => None,
        false => {
            let sink = AuditLog::open_sink(&args.audit_log).with_context(|| {
                format!(
                    "open the audit log {} (--audit-log: a writable file, - or none)",
                    args.audit_log.display()
                )
            })?;
            let mounts = Arc::new(Mounts::default());
            Some(Arc::new(AuditLog::new(
                &args.node_name,
                sink,
                mounts,
                &mut registry,
            )))
        }
    };
    let mut source = HsmVolumeSource::new(catalog, device.clone()).with_metrics(metrics.clone());
    if let Some(audit) = &audit {
        source = source.with_mounts(audit.mounts().clone());
    }
    match remote_reads(&args, tls.as_ref()).await? {
        Some(remote) => source = source.with_remote_reads(Arc::new(remote)),
        None if device.is_none() => tracing::info!(
            "no --device and no remote reads (--agent-tls-* with --agent or --agent-port): publishing answers Unavailable"
        ),
        None => {}
    }
    let source = Arc::new(source);

    let archive = archive_setup(&args)?;
    let archive_metrics = ArchiveMetrics::register(&mut registry);
    let credentials_root = args.archive_credentials_root.clone();
    let mut opener = None;
    if let Some(device) = &device {
        let config = pkcs11_config(&args)?;
        // The archiver uses the token's archive key through the token itself.
        let token: Arc<std::sync::Mutex<Option<Arc<Pkcs11Store>>>> = Arc::default();
        let opened = token.clone();
        let device = device.clone();
        let device_name = args.device.clone().unwrap_or_default();
        let agent = match (args.agent_listen, &tls) {
            (Some(listen), Some(tls)) => {
                let cfg = args.sync.config(&args.node_name, tls.clone())?;
                Some((
                    listen,
                    cfg.with_device(args.device.clone().unwrap_or_default()),
                ))
            }
            _ => None,
        };
        let stop = stopped();
        let open_metrics = metrics.clone();
        let node_name = args.node_name.clone();
        opener = Some(tokio::spawn(async move {
            device
                .open_with_retry(
                    || {
                        let (config, opened) = (config.clone(), opened.clone());
                        async move {
                            let store = Arc::new(Pkcs11Store::open(config).await?);
                            *opened.lock().unwrap_or_else(|p| p.into_inner()) = Some(store.clone());
                            Ok(store as Arc<dyn SecretStore>)
                        }
                    },
                    Duration::from_secs(1),
                    Duration::from_secs(30),
                    pin_failure_reporter(open_metrics, node_events, node_name),
                )
                .await;
            let Some((listen, cfg)) = agent else {
                return Ok(());
            };
            // The agent shares the plugin's store: the only handle on the token.
            let store = device.store()?;
            let node = cfg.node.clone();
            let served = serve_agent(cfg, store, listen, stop, agent_metrics.as_ref()).await?;
            let agent = served.agent.clone();
            device.set_role_source(move || agent.role());
            let token = token.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(token) = token {
                let key = Arc::new(TokenArchiveKey::new(token, ARCHIVE_KEY_LABEL));
                let supervisor =
                    Supervisor::new(served.agent.clone(), device_name, key, credentials_root)
                        .with_metrics(archive_metrics);
                if let Some(settings) = archive {
                    supervisor.configure(settings)?;
                }
                served.agent.set_archive_control(Arc::new(supervisor));
            }
            // How scripts and tests learn a port picked by the kernel.
            println!("hsm-secrets node {node} agent listening on {}", served.addr);
            served.wait().await
        }));
    }

    let mut ops_server = None;
    if let Some(addr) = common.metrics_addr {
        let mounts = audit.as_ref().map(|a| a.mounts().clone());
        let router = ops::router(Arc::new(registry), source.clone(), mounts);
        ops_server = Some(OpsServer::start(addr, router, stopped()).await?);
    }

    let config = NodeConfig::new(&args.node_name)
        .with_driver_name(CSI_DRIVER)
        .with_kubelet_dir(&args.kubelet_dir)
        .with_unsafe_plain_directory(args.unsafe_plain_directory);
    let identity = IdentityService::new(CSI_DRIVER, env!("CARGO_PKG_VERSION"), source.clone());
    let mut reporter = NodeReporter::new(metrics, events);
    if let Some(audit) = audit {
        reporter = reporter.with_audit(audit);
    }
    let node = NodeService::new(config, source.clone()).with_observer(Arc::new(reporter));
    match node.discover_mounts() {
        Ok(mounts) => tracing::info!(volumes = mounts.len(), "found volumes of a previous run"),
        Err(error) => tracing::warn!(%error, "cannot list existing volumes"),
    }

    let signalled = shutdown_signal();
    tokio::spawn(async move {
        signalled.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let serve = hsm_secrets_csi::serve(&args.endpoint, identity, node, stopped());
    let drain_deadline = async {
        stopped().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    // Sidecars (registrar, livenessprobe) keep connections open; after the grace period
    // the plugin exits anyway rather than waiting for kubelet's SIGKILL.
    let served = tokio::select! {
        served = serve => served,
        () = drain_deadline => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "CSI connections still open; exiting");
            if let Ok(path) = hsm_secrets_csi::socket_path(&args.endpoint) {
                let _ = std::fs::remove_file(path);
            }
            Ok(())
        }
    };

    if let Some(mut opener) = opener {
        // The agent stops with the plugin; a token still being opened is abandoned.
        match tokio::time::timeout(Duration::from_secs(5), &mut opener).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "the device agent failed"),
            Err(_) => opener.abort(),
            _ => {}
        }
    }
    if let Some(server) = ops_server {
        server.finish().await;
    }
    served.with_context(|| format!("serve CSI on {}", args.endpoint))?;
    tracing::info!("stopped");
    Ok(())
}

/// The archive the node's flags configure, if any (a spec.backup the controller sends
/// replaces it).
fn archive_setup(args: &NodeArgs) -> anyhow::Result<Option<ArchiveSettings>> {
    let Some(url) = &args.archive_url else {
        return Ok(None);
    };
    if args.device.is_none() {
        bail!("--archive-url needs --device: the archive is of this node's device");
    }
    if args.archive_segment_interval_ms == 0 || args.archive_base_interval_s == 0 {
        bail!("--archive-segment-interval-ms and --archive-base-interval-s must be above 0");
    }
    let settings = ArchiveSettings {
        bucket: BucketSettings {
            url: url.clone(),
            endpoint: args.archive_endpoint.clone(),
            region: args.archive_region.clone(),
            credentials_dir: args.archive_credentials_dir.clone(),
            recovery_public_key: args
                .archive_recovery_public_key
                .clone()
                .context("--archive-url needs --archive-recovery-public-key")?,
            archive_name: args.archive_name.clone(),
        },
        segment_interval: Duration::from_millis(args.archive_segment_interval_ms),
        base_interval: Duration::from_secs(args.archive_base_interval_s),
        retention: (args.archive_retention_s > 0)
            .then(|| Duration::from_secs(args.archive_retention_s)),
    };
    // Refuse a bad key file or bucket URL at start, not once the token opens.
    settings.check()?;
    Ok(Some(settings))
}

fn pkcs11_config(args: &NodeArgs) -> anyhow::Result<Pkcs11Config> {
    match (&args.pkcs11_library, &args.token_label, &args.pin_file) {
        (Some(library), Some(label), Some(pin_file)) => {
            let mut config = Pkcs11Config::new(library, label, pin_file);
            config.pin_refusal_dir = Some(args.pin_refusal_dir.clone());
            Ok(config)
        }
        _ => {
            bail!("--device needs --pkcs11-library, --token-label and --pin-file to open the token")
        }
    }
}

fn agent_tls(args: &NodeArgs) -> anyhow::Result<Option<AgentTls>> {
    match (
        &args.agent_tls_ca,
        &args.agent_tls_cert,
        &args.agent_tls_key,
    ) {
        (Some(ca), Some(cert), Some(key)) => Ok(Some(AgentTls::from_files(&TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        })?)),
        (None, None, None) => Ok(None),
        _ => bail!("--agent-tls-ca, --agent-tls-cert and --agent-tls-key go together"),
    }
}

/// Remote reads when agents can be found: a static list, or discovery in the cluster.
async fn remote_reads(
    args: &NodeArgs,
    tls: Option<&AgentTls>,
) -> anyhow::Result<Option<RemoteReads>> {
    let Some(tls) = tls else {
        return Ok(None);
    };
    let statics = StaticEndpoints::parse(&args.agents)?;
    let needs_cluster = args.agent_port.is_some()
        || args.state.as_deref() == Some("kube")
        || (args.state.is_none() && args.catalog == "kube");
    if statics.is_empty() && args.agent_port.is_none() {
        if args.device.is_none() {
            bail!(
                "--agent-tls-* without --device serve remote reads: name the agents with \
                 --agent NODE=https://HOST:PORT or give --agent-port (cluster discovery)"
            );
        }
        return Ok(None);
    }
    let client = if needs_cluster {
        Some(kube::Client::try_default().await.context(
            "connect to the Kubernetes API for agent discovery and HSMDevice status; use \
             --agent NODE=https://HOST:PORT with --state DIR|none to run without a cluster",
        )?)
    } else {
        None
    };
    let endpoints: Arc<dyn EndpointResolver> = match (args.agent_port, &client) {
        (Some(port), Some(client)) => {
            Arc::new(NodeAddressEndpoints::new(client.clone(), port, statics))
        }
        _ => Arc::new(statics),
    };
    let kube_state = |client: &Option<kube::Client>| -> Option<Arc<dyn StateStore>> {
        let client = client.clone()?;
        Some(Arc::new(KubeState::new(client, "default", None)))
    };
    let state: Option<Arc<dyn StateStore>> = match args.state.as_deref() {
        Some("none") => None,
        Some("kube") => kube_state(&client),
        Some(dir) => Some(Arc::new(FileState::open(dir)?)),
        None if args.catalog == "kube" => kube_state(&client),
        None => None,
    };
    tracing::info!(
        status = state.is_some(),
        "remote reads through the devices' agents"
    );
    Ok(Some(RemoteReads::new(tls.clone(), endpoints, state)))
}

/// The catalog, and the API client when it is the cluster's.
async fn open_catalog(
    spec: &str,
) -> anyhow::Result<(Arc<dyn SecretCatalog>, Option<kube::Client>)> {
    if spec == "kube" {
        let client = kube::Client::try_default().await.context(
            "connect to the Kubernetes API (in-cluster service account or kubeconfig); use \
             --catalog <file.yaml> to run without a cluster",
        )?;
        return Ok((Arc::new(KubeCatalog::spawn(client.clone())), Some(client)));
    }
    let path = PathBuf::from(spec);
    if path.is_dir() {
        let catalog = StateCatalog::open(&path).with_context(|| {
            format!("--catalog {spec:?}: a directory must be a state directory")
        })?;
        tracing::info!(dir = %path.display(), "HSMSecrets from the no-cluster state");
        return Ok((Arc::new(catalog), None));
    }
    let catalog = StaticCatalog::from_yaml_file(&path)
        .with_context(|| format!("--catalog {spec:?} is neither `kube` nor a usable file"))?;
    tracing::info!(file = %path.display(), secrets = catalog.len(), "static HSMSecret catalog");
    Ok((Arc::new(catalog), None))
}

/// Counts every failure to open the token by kind, and records one Warning Event on the
/// Node each time the token refuses a PIN (not for the quiet retries that follow, which
/// offer the token nothing until the PIN file changes).
fn pin_failure_reporter(
    metrics: NodeMetrics,
    client: Option<kube::Client>,
    node: String,
) -> impl FnMut(&StoreError) {
    move |error| {
        metrics.token_open_failed(error.kind());
        if !matches!(error, StoreError::PinIncorrect { .. }) {
            return;
        }
        let Some(client) = client.clone() else {
            return;
        };
        let (node, note) = (node.clone(), error.to_string());
        tokio::spawn(async move {
            let note = format!(
                "{note}; it is not offered again until the PIN Secret changes (hsm_secrets_node_token_open_failures_total{{kind=\"pin_refused\"}} counts the waits)"
            );
            if let Err(error) = record_node_event(
                &client,
                &node,
                crate::contract::reasons::PIN_REFUSED,
                "OpenToken",
                &note,
            )
            .await
            {
                tracing::warn!(%error, "cannot record the HSMPinRefused Event");
            }
        });
    }
}
