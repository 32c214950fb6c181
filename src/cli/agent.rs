//! `hsm-secrets agent`: serve one node's token as a device agent (mutual TLS gRPC).
//!
//! The node plugin embeds the same agent (`hsm-secrets node --agent-listen`); this
//! subcommand runs it alone, for the local mode, the demo and multi-process tests. It
//! starts as a standby at epoch 0 and waits for the controller to assign a role.

use crate::telemetry::OpsServer;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::task::JoinHandle;

use super::shutdown_signal;
use crate::hsm::{Pkcs11Config, Pkcs11Store, SecretStore, StoreError};
use crate::mirror::{self, Agent, AgentConfig, AgentMetrics, AgentTls, MirrorError, TlsFiles};
use crate::telemetry::CommonArgs;

/// How an agent follows its primary; shared by `hsm-secrets agent` and `hsm-secrets node`.
#[derive(Args, Clone, Debug)]
pub struct SyncTuning {
    /// Milliseconds between two pulls from the primary (mirrors).
    #[arg(long, env = "HSM_PULL_INTERVAL_MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub pull_interval_ms: u64,
    /// Seconds between full verification passes (until the controller sets it).
    #[arg(long, env = "HSM_SYNC_INTERVAL", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub sync_interval: u64,
    /// Milliseconds a write waits for a mirror under the Active policy before dropping it.
    #[arg(long, env = "HSM_REPLICATE_TIMEOUT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub replicate_timeout_ms: u64,
    /// Seconds between collections of what interrupted writes left on the token (one
    /// also runs at start); 0 collects at start and then once a day.
    #[arg(long, env = "HSM_GC_INTERVAL", default_value_t = 600, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub gc_interval: u64,
    /// Accept pushes from an agent certificate shared by every node, trusting the sender
    /// the request names (development setups only: with per-node certificates from
    /// `hsm-secrets pki`, each push is known to come from the node its certificate names).
    #[arg(long, env = "HSM_ALLOW_SHARED_AGENT_IDENTITY")]
    pub allow_shared_agent_identity: bool,
    /// Append a line per acknowledged write (node, epoch, path, version, monotonic
    /// clock; never a value) to this file, for checking a run's history.
    #[arg(long, env = "HSM_WRITE_JOURNAL")]
    pub write_journal: Option<PathBuf>,
}

impl SyncTuning {
    /// The agent configuration of `node` with these settings.
    pub fn config(&self, node: &str, tls: AgentTls) -> anyhow::Result<AgentConfig> {
        let mut cfg = AgentConfig::new(node, tls);
        cfg.sync.pull_interval = Duration::from_millis(self.pull_interval_ms);
        cfg.sync.sync_interval = Duration::from_secs(self.sync_interval);
        cfg.replicate_timeout = Duration::from_millis(self.replicate_timeout_ms);
        cfg.allow_shared_agent_identity = self.allow_shared_agent_identity;
        // 0: at start only (the first collection runs, then the interval is a day).
        cfg.gc_interval = Some(Duration::from_secs(if self.gc_interval == 0 {
            86_400
        } else {
            self.gc_interval
        }));
        if let Some(path) = &self.write_journal {
            let journal = mirror::journal::WriteJournal::open(path).with_context(|| {
                format!(
                    "open the write journal {} (--write-journal: a writable file)",
                    path.display()
                )
            })?;
            cfg.write_journal = Some(Arc::new(journal));
        }
        Ok(cfg)
    }
}

#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// This node's name; the agent's certificate must name it.
    #[arg(long, env = "HSM_NODE_NAME")]
    pub node: String,
    /// The HSMDevice whose token this agent serves, reported to the controller (which
    /// falls back to matching the token label when it is empty).
    #[arg(long, env = "HSM_DEVICE", default_value = "")]
    pub device: String,
    /// Address to serve the agent on (port 0 picks a free port, printed on stdout).
    #[arg(long, env = "HSM_AGENT_LISTEN", default_value = "0.0.0.0:7443")]
    pub listen: SocketAddr,
    /// PKCS#11 module path.
    #[arg(long, env = "HSM_PKCS11_LIBRARY")]
    pub pkcs11_library: PathBuf,
    /// Label of the token to serve (matched exactly).
    #[arg(long, env = "HSM_TOKEN_LABEL")]
    pub token_label: String,
    /// Serial number, when several tokens share the label.
    #[arg(long, env = "HSM_TOKEN_SERIAL")]
    pub token_serial: Option<String>,
    /// File holding the user PIN (a mounted Secret; never a flag or variable).
    #[arg(long, env = "HSM_PIN_FILE")]
    pub pin_file: PathBuf,
    /// Directory on the node where a PIN the token refused is remembered (a salted
    /// digest, never the PIN), so no restart offers the token that PIN again.
    #[arg(
        long,
        env = "HSM_PIN_REFUSAL_DIR",
        default_value = "/var/lib/hsm-secrets/pin-refusals"
    )]
    pub pin_refusal_dir: PathBuf,
    /// PEM file of the agent CA.
    #[arg(long, env = "HSM_AGENT_TLS_CA")]
    pub tls_ca: PathBuf,
    /// PEM file of this node's agent certificate.
    #[arg(long, env = "HSM_AGENT_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM file of its private key.
    #[arg(long, env = "HSM_AGENT_TLS_KEY")]
    pub tls_key: PathBuf,
    #[command(flatten)]
    pub sync: SyncTuning,
}

pub fn run(args: AgentArgs, common: &CommonArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(serve(args, common.clone()))
}

async fn serve(args: AgentArgs, common: CommonArgs) -> anyhow::Result<()> {
    let tls = AgentTls::from_files(&TlsFiles {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
    })?;
    let mut pkcs11 = Pkcs11Config::new(&args.pkcs11_library, &args.token_label, &args.pin_file);
    pkcs11.token_serial = args.token_serial.clone();
    pkcs11.pin_refusal_dir = Some(args.pin_refusal_dir.clone());
    let store = open_store(pkcs11).await?;

    let cfg = args.sync.config(&args.node, tls)?.with_device(&args.device);
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = AgentMetrics::register(&mut registry);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let served = serve_agent(cfg, store, args.listen, stopped(), Some(&metrics)).await?;
    let mut ops = None;
    if let Some(addr) = common.metrics_addr {
        let router = mirror::metrics::ops_router(Arc::new(registry), served.agent.clone());
        ops = Some(OpsServer::start(addr, router, stopped()).await?);
    }
    // The one line on stdout: how scripts and tests learn a port picked by the kernel.
    println!(
        "hsm-secrets agent {} listening on {}",
        args.node, served.addr
    );
    let signalled = shutdown_signal();
    tokio::spawn(async move {
        signalled.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    served.wait().await?;
    if let Some(ops) = ops {
        ops.finish().await;
    }
    Ok(())
}

/// An agent being served.
pub struct ServedAgent {
    pub agent: Agent,
    /// The bound address (the port the kernel picked for port 0).
    pub addr: SocketAddr,
    task: JoinHandle<Result<(), MirrorError>>,
}

impl ServedAgent {
    /// Waits until the server stopped (its shutdown future completed), then stops the
    /// sync engine.
    pub async fn wait(self) -> anyhow::Result<()> {
        let served = self.task.await.context("the agent server task failed")?;
        self.agent.shutdown().await;
        served.context("serve the agent")
    }
}

/// Starts an agent over `store` and serves it with mutual TLS on `listen` until
/// `shutdown` completes. The store is the process's only handle on the token: the store
/// caches object handles and assumes it is the token's only writer.
pub async fn serve_agent(
    mut cfg: AgentConfig,
    store: Arc<dyn SecretStore>,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
    metrics: Option<&AgentMetrics>,
) -> anyhow::Result<ServedAgent> {
    let listener = mirror::bind(listen).await?;
    let addr = listener.local_addr().context("read the bound address")?;
    if let Some(metrics) = metrics {
        cfg.rpc_metrics = metrics.rpc();
    }
    let agent = Agent::start(cfg, store).await;
    if let Some(metrics) = metrics {
        metrics.attach(&agent);
    }
    let task = tokio::spawn(mirror::serve(agent.clone(), listener, shutdown));
    Ok(ServedAgent { agent, addr, task })
}

/// Opens the token, waiting for it when it is not (yet) present: the agent of a node
/// whose HSM is unplugged starts serving as soon as it is plugged in.
async fn open_store(cfg: Pkcs11Config) -> anyhow::Result<Arc<dyn SecretStore>> {
    let mut delay = Duration::from_millis(500);
    loop {
        match Pkcs11Store::open(cfg.clone()).await {
            Ok(store) => return Ok(Arc::new(store)),
            // A refused PIN waits for the PIN file to change (the store offers the token
            // nothing meanwhile) instead of exiting into a restart loop.
            Err(e)
                if e.is_transient()
                    || matches!(
                        e,
                        StoreError::PinIncorrect { .. }
                            | StoreError::PinRefused { .. }
                            | StoreError::PinFile { .. }
                    ) =>
            {
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "token not available yet");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown_signal() => anyhow::bail!("stopped while waiting for the token"),
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e).context("open the token"),
        }
    }
}
