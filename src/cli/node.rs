//! `hsm-secrets node`: the CSI node plugin (one per node, a DaemonSet).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use hsm_secrets_csi::{DEFAULT_DRIVER_NAME, IdentityService, NodeConfig, NodeService};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::hsm::{Pkcs11Config, Pkcs11Store, SecretStore};
use crate::node::{
    HsmVolumeSource, KubeCatalog, LocalDevice, NodeMetrics, SecretCatalog, StaticCatalog, ops,
};
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
    /// kubelet's root directory; volumes are published only under its pods/ directory.
    #[arg(long, env = "KUBELET_DIR", default_value = hsm_secrets_csi::DEFAULT_KUBELET_DIR)]
    pub kubelet_dir: PathBuf,
    /// Where HSMSecrets come from: `kube` (watch the cluster) or the path of a YAML file
    /// of HSMSecret documents (no cluster).
    #[arg(long, env = "HSM_CATALOG", default_value = "kube")]
    pub catalog: String,
    /// Development only: write volumes into plain directories instead of mounting tmpfs
    /// (secrets reach the disk); for running without the privilege to mount.
    #[arg(long, env = "HSM_UNSAFE_PLAIN_DIRECTORY")]
    pub unsafe_plain_directory: bool,
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

    let catalog = open_catalog(&args.catalog).await?;
    let device = args.device.clone().map(LocalDevice::opening);
    let mut registry = Registry::default();
    let metrics = NodeMetrics::register(&mut registry);
    let source =
        Arc::new(HsmVolumeSource::new(catalog, device.clone()).with_metrics(metrics.clone()));

    let mut opener = None;
    if let Some(device) = &device {
        let config = pkcs11_config(&args)?;
        let device = device.clone();
        opener = Some(tokio::spawn(async move {
            device
                .open_with_retry(
                    || {
                        let config = config.clone();
                        async move {
                            Pkcs11Store::open(config)
                                .await
                                .map(|s| Arc::new(s) as Arc<dyn SecretStore>)
                        }
                    },
                    Duration::from_secs(1),
                    Duration::from_secs(30),
                )
                .await;
        }));
    } else {
        tracing::info!(
            "no --device: this node has no HSM; publishing answers Unavailable until mirroring brings remote reads"
        );
    }

    let mut ops_server = None;
    if let Some(addr) = common.metrics_addr {
        let router = ops::router(Arc::new(registry), source.clone());
        let (local, server) = ops::bind(addr, router, stopped())
            .await
            .with_context(|| format!("bind the metrics address {addr}"))?;
        tracing::info!(%local, "serving /metrics, /healthz and /readyz");
        ops_server = Some(tokio::spawn(server));
    }

    let config = NodeConfig::new(&args.node_name)
        .with_driver_name(DEFAULT_DRIVER_NAME)
        .with_kubelet_dir(&args.kubelet_dir)
        .with_unsafe_plain_directory(args.unsafe_plain_directory);
    let identity = IdentityService::new(
        DEFAULT_DRIVER_NAME,
        env!("CARGO_PKG_VERSION"),
        source.clone(),
    );
    let node = NodeService::new(config, source.clone()).with_observer(Arc::new(metrics));
    match node.discover_mounts() {
        Ok(mounts) => tracing::info!(volumes = mounts.len(), "found volumes of a previous run"),
        Err(error) => tracing::warn!(%error, "cannot list existing volumes"),
    }

    tokio::spawn(async move {
        shutdown_signal().await;
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

    if let Some(opener) = opener {
        opener.abort();
    }
    if let Some(server) = ops_server {
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(Ok(Err(error))) => tracing::warn!(%error, "metrics server failed"),
            Err(_) => tracing::warn!("metrics server did not stop within 5s"),
            _ => {}
        }
    }
    served.with_context(|| format!("serve CSI on {}", args.endpoint))?;
    tracing::info!("stopped");
    Ok(())
}

fn pkcs11_config(args: &NodeArgs) -> anyhow::Result<Pkcs11Config> {
    match (&args.pkcs11_library, &args.token_label, &args.pin_file) {
        (Some(library), Some(label), Some(pin_file)) => {
            Ok(Pkcs11Config::new(library, label, pin_file))
        }
        _ => {
            bail!("--device needs --pkcs11-library, --token-label and --pin-file to open the token")
        }
    }
}

async fn open_catalog(spec: &str) -> anyhow::Result<Arc<dyn SecretCatalog>> {
    if spec == "kube" {
        let client = kube::Client::try_default().await.context(
            "connect to the Kubernetes API (in-cluster service account or kubeconfig); use \
             --catalog <file.yaml> to run without a cluster",
        )?;
        return Ok(Arc::new(KubeCatalog::spawn(client)));
    }
    let path = PathBuf::from(spec);
    let catalog = StaticCatalog::from_yaml_file(&path)
        .with_context(|| format!("--catalog {spec:?} is neither `kube` nor a usable file"))?;
    tracing::info!(file = %path.display(), secrets = catalog.len(), "static HSMSecret catalog");
    Ok(Arc::new(catalog))
}

/// SIGTERM (kubelet stopping the pod) or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = ctrl_c => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only ctrl-c stops the plugin");
            let _ = ctrl_c.await;
        }
    }
}
