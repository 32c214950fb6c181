//! `hsm-secrets controller`: the HSMDevice controller (leader-elected), over the
//! Kubernetes API or, with `--state DIR`, the file-backed state of the no-cluster mode.

use crate::telemetry::OpsServer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::shutdown_signal;
use crate::controller::{
    ControllerConfig, ControllerMetrics, GrpcAgents, ops, run_controller_with_leadership,
};
use crate::failover::{FencingConfig, PlanConfig};
use crate::mirror::{AgentTls, NodeAddressEndpoints, StaticEndpoints, TlsFiles};
use crate::secret_sync::{
    AgentDirectory, DigestKey, FileCluster, KubeCluster, SecretReconciler, SecretSyncMetrics,
    load_or_create_digest_key, run_files, run_kube,
};
use crate::state::{FileState, KubeState};
use crate::telemetry::CommonArgs;

#[derive(Args, Clone, Debug)]
pub struct ControllerArgs {
    /// Where state lives: `kube` (the cluster of the current kubeconfig or service
    /// account) or a directory for the no-cluster mode.
    #[arg(long, env = "HSM_STATE", default_value = "kube")]
    pub state: String,
    /// Agents listen on this port at their node's InternalIP (every node plugin serves
    /// its agent on the same port): the controller finds them through the cluster's
    /// Nodes each round. Needs `--state kube`.
    #[arg(long, env = "HSM_AGENT_PORT")]
    pub agent_port: Option<u16>,
    /// An agent, as NODE=https://HOST:PORT (repeatable). With --agent-port these
    /// override the address of the nodes they name; without it they are the agents.
    #[arg(long = "agent", env = "HSM_AGENTS", value_delimiter = ',')]
    pub agents: Vec<String>,
    /// CA certificate that signed every agent's certificate (PEM).
    #[arg(long, alias = "tls-ca", env = "HSM_AGENT_TLS_CA")]
    pub agent_tls_ca: PathBuf,
    /// This controller's client certificate for the agents (PEM).
    #[arg(long, alias = "tls-cert", env = "HSM_AGENT_TLS_CERT")]
    pub agent_tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, alias = "tls-key", env = "HSM_AGENT_TLS_KEY")]
    pub agent_tls_key: PathBuf,
    /// This replica's identity in the leader Lease.
    #[arg(long, env = "POD_NAME", default_value = "hsm-secrets-controller")]
    pub identity: String,
    /// Namespace of the leader Lease (kube state only).
    #[arg(long, env = "POD_NAMESPACE", default_value = "hsm-secrets-system")]
    pub namespace: String,
    /// Milliseconds between agent probes.
    #[arg(long, env = "HSM_PROBE_INTERVAL_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub probe_interval_ms: u64,
    /// Write lease of the primary in milliseconds: it stops accepting writes this long
    /// after the last renewal it received.
    #[arg(long, env = "HSM_WRITE_LEASE_MS", default_value_t = 15_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub write_lease_ms: u64,
    /// Extra wait beyond the write lease before another node may be promoted.
    #[arg(long, env = "HSM_LEASE_MARGIN_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub lease_margin_ms: u64,
    /// Duration of the controller's leader Lease in milliseconds. The leader renews it
    /// every third of that; a standby takes over at most this long after the leader died.
    #[arg(long, env = "HSM_LEADER_LEASE_MS", default_value_t = 6_000, value_parser = clap::value_parser!(u64).range(1_000..=600_000))]
    pub leader_lease_ms: u64,
    /// Run the HSMSecret reconciler (imports and Secret copies) next to the HSMDevice
    /// controller, under the same Lease.
    #[arg(long, env = "HSM_SECRET_SYNC", default_value_t = true, action = clap::ArgAction::Set)]
    pub secret_sync: bool,
}

impl ControllerArgs {
    /// The static `--agent` entries, checked; at least one way to find agents is required.
    fn static_agents(&self) -> anyhow::Result<StaticEndpoints> {
        let statics = StaticEndpoints::parse(&self.agents).context("--agent")?;
        match (self.agent_port, statics.is_empty(), self.state.as_str()) {
            (None, true, _) => bail!(
                "no agents to reach: give --agent-port PORT (each node's InternalIP, the port \
                 the node DaemonSet's --agent-listen uses) or --agent NODE=https://HOST:PORT"
            ),
            (Some(_), _, state) if state != "kube" => bail!(
                "--agent-port finds agents through the cluster's Nodes, which --state {state:?} \
                 has none of: name them with --agent NODE=https://HOST:PORT"
            ),
            _ => Ok(statics),
        }
    }
}

pub fn run(args: ControllerArgs, common: CommonArgs) -> anyhow::Result<()> {
    let statics = args.static_agents()?;
    let tls = AgentTls::from_files(&TlsFiles {
        ca: args.agent_tls_ca.clone(),
        cert: args.agent_tls_cert.clone(),
        key: args.agent_tls_key.clone(),
    })?;
    let lease = Duration::from_millis(args.write_lease_ms);
    let probe_interval = Duration::from_millis(args.probe_interval_ms);
    let plan = PlanConfig {
        fencing: FencingConfig {
            lease_duration: lease,
            safety_margin: Duration::from_millis(args.lease_margin_ms),
        },
        ..PlanConfig::default()
    };
    plan.validate()?;
    if lease < probe_interval * 2 {
        bail!(
            "--write-lease-ms ({}) must be at least twice --probe-interval-ms ({}): the primary would fence itself between renewals",
            args.write_lease_ms,
            args.probe_interval_ms
        );
    }
    let config = ControllerConfig {
        identity: args.identity.clone(),
        lease_duration: Duration::from_millis(args.leader_lease_ms),
        probe_interval,
        plan,
        ..ControllerConfig::default()
    };
    // The controller waits on the network; two workers are plenty, and each extra thread
    // costs a glibc malloc arena (measured by the secret_reconcile bench).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        let agent_timeout = probe_interval.max(Duration::from_millis(500));
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = ControllerMetrics::register(&mut registry);
        // One registry for both reconcilers, scraped on --metrics-addr.
        let sync_metrics = SecretSyncMetrics::register(&mut registry);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        let signalled = shutdown_signal();
        tokio::spawn(async move {
            signalled.await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        });
        let ops_server = match common.metrics_addr {
            Some(addr) => {
                let router = ops::router(
                    Arc::new(registry),
                    metrics.clone(),
                    ops::stale_after(probe_interval),
                );
                let server = OpsServer::start(addr, router, stopped()).await?;
                // How scripts and tests learn a port picked by the kernel.
                println!(
                    "hsm-secrets controller serving /metrics, /healthz and /readyz on {}",
                    server.local_addr()
                );
                Some(server)
            }
            None => None,
        };
        if args.state == "kube" {
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the cluster (use --state DIR for the no-cluster mode)")?;
            let agents = Arc::new(match args.agent_port {
                Some(port) => {
                    let agents = GrpcAgents::discovering(
                        Arc::new(NodeAddressEndpoints::new(client.clone(), port, statics)),
                        &tls,
                        agent_timeout,
                        lease,
                    );
                    // Resolve once before the first round so the HSMSecret reconciler, which
                    // follows the controller's view, finds agents from the start.
                    if let Err(error) = agents.refresh_endpoints().await {
                        tracing::warn!(%error, "cannot resolve agent endpoints yet; retrying every round");
                    }
                    agents
                }
                None => GrpcAgents::new(&statics.peers(), &tls, agent_timeout, lease)?,
            });
            let state = Arc::new(
                KubeState::new(
                    client.clone(),
                    args.namespace.clone(),
                    Some(args.identity.clone()),
                )
                .watching_devices(),
            );
            let (leadership, leading) = tokio::sync::watch::channel(false);
            let secrets = if args.secret_sync {
                let key = load_or_create_digest_key(client.clone(), &args.namespace)
                    .await
                    .context("the HSMSecret status digest key")?;
                let cluster = Arc::new(KubeCluster::new(
                    client.clone(),
                    Some(args.identity.clone()),
                ));
                let reconciler = Arc::new(SecretReconciler::new(
                    cluster,
                    AgentDirectory::following(agents.clone()),
                    key,
                    sync_metrics.clone(),
                ));
                Some(tokio::spawn(run_kube(client, reconciler, leading)))
            } else {
                None
            };
            run_controller_with_leadership(
                state,
                agents,
                config,
                metrics,
                leadership,
                stopped(),
            )
            .await?;
            if let Some(task) = secrets {
                task.await.context("the HSMSecret reconciler")?;
            }
        } else {
            let agents = Arc::new(GrpcAgents::new(
                &statics.peers(),
                &tls,
                agent_timeout,
                lease,
            )?);
            let state = Arc::new(FileState::open(&args.state)?);
            let (leadership, leading) = tokio::sync::watch::channel(false);
            let secrets = if args.secret_sync {
                // The no-cluster mode keeps its digest key next to the state.
                let key = file_digest_key(&state.root().join("digest.key"))?;
                let reconciler = Arc::new(SecretReconciler::new(
                    Arc::new(FileCluster::new(state.clone())),
                    AgentDirectory::following(agents.clone()),
                    key,
                    sync_metrics.clone(),
                ));
                Some(tokio::spawn(run_files(
                    state.clone(),
                    reconciler,
                    leading,
                    probe_interval,
                )))
            } else {
                None
            };
            run_controller_with_leadership(
                state,
                agents,
                config,
                metrics,
                leadership,
                stopped(),
            )
            .await?;
            if let Some(task) = secrets {
                task.await.context("the HSMSecret reconciler")?;
            }
        }
        if let Some(server) = ops_server {
            server.finish().await;
        }
        Ok(())
    })
}

/// Reads the no-cluster mode's digest key file, creating it (mode 0600) when absent.
fn file_digest_key(path: &std::path::Path) -> anyhow::Result<DigestKey> {
    use std::io::Write;
    if let Ok(bytes) = std::fs::read(path) {
        return DigestKey::from_bytes(bytes).with_context(|| {
            format!(
                "{} holds no digest key of at least 16 bytes; delete it to have a new one made",
                path.display()
            )
        });
    }
    let key = DigestKey::generate().context("read /dev/urandom for the digest key")?;
    // Written whole to a temporary file (created 0600) and linked into place only then:
    // a crash never leaves an empty or partial key behind.
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let file = tempfile::NamedTempFile::new_in(dir)
        .and_then(|mut f| {
            f.write_all(key.bytes())?;
            f.as_file().sync_all()?;
            Ok(f)
        })
        .with_context(|| format!("write the digest key {}", path.display()))?;
    match file.persist_noclobber(path) {
        Ok(_) => Ok(key),
        // Another controller process made it first: use that one.
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => file_digest_key(path),
        Err(e) => Err(e.error).with_context(|| format!("write the digest key {}", path.display())),
    }
}
