//! `hsm-secrets local`: the demo's system kept running for interactive use.
//!
//! `up` starts it in the background and records it in `<dir>/local.json`; `status`,
//! `put`, `get` and `down` find it there.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use crate::local::cluster::{self, NAMESPACE, PLAIN_DIRECTORY_WARNING};
use crate::local::{ClusterConfig, LocalCluster, StateFile, clients, system};
use crate::telemetry::CommonArgs;

#[derive(Args, Clone, Debug)]
pub struct LocalArgs {
    #[command(subcommand)]
    pub command: LocalCommand,
}

#[derive(Args, Clone, Debug)]
pub struct DirArg {
    /// Directory of the local system.
    #[arg(long, env = "HSM_LOCAL_DIR", default_value_os_t = default_dir())]
    pub dir: PathBuf,
}

#[derive(Subcommand, Clone, Debug)]
pub enum LocalCommand {
    /// Start tokens, agents, controller, webhook and CSI plugins in the background.
    Up {
        #[command(flatten)]
        dir: DirArg,
        /// The SoftHSM2 PKCS#11 module (default: the usual Debian/Ubuntu paths).
        #[arg(long, env = "HSM_SOFTHSM_MODULE")]
        softhsm_module: Option<PathBuf>,
    },
    /// The device table and the health of every process.
    Status {
        #[command(flatten)]
        dir: DirArg,
    },
    /// Write a secret on the primary: `put NAME KEY=VALUE...`.
    Put {
        #[command(flatten)]
        dir: DirArg,
        /// Namespace of the secret.
        #[arg(long, short = 'n', default_value = NAMESPACE)]
        namespace: String,
        name: String,
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
    },
    /// Read a secret (keys and sizes; values with --reveal).
    Get {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long, short = 'n', default_value = NAMESPACE)]
        namespace: String,
        name: String,
        /// Print the values too.
        #[arg(long)]
        reveal: bool,
    },
    /// Stop everything: unmount volumes, stop processes, remove the directory.
    Down {
        #[command(flatten)]
        dir: DirArg,
    },
}

fn default_dir() -> PathBuf {
    std::env::temp_dir().join("hsm-secrets-local")
}

pub fn run(args: LocalArgs, _common: CommonArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        match args.command {
            LocalCommand::Up {
                dir,
                softhsm_module,
            } => up(dir.dir, softhsm_module).await,
            LocalCommand::Status { dir } => status(dir.dir).await,
            LocalCommand::Put {
                dir,
                namespace,
                name,
                pairs,
            } => put(dir.dir, &namespace, &name, &pairs).await,
            LocalCommand::Get {
                dir,
                namespace,
                name,
                reveal,
            } => get(dir.dir, &namespace, &name, reveal).await,
            LocalCommand::Down { dir } => down(dir.dir),
        }
    })
}

async fn up(dir: PathBuf, softhsm_module: Option<PathBuf>) -> anyhow::Result<()> {
    if StateFile::path(&dir).exists() {
        bail!(
            "a local system is recorded in {}; stop it first: hsm-secrets local down --dir {}",
            dir.display(),
            dir.display()
        );
    }
    let config = ClusterConfig {
        dir: Some(dir),
        softhsm_module,
        tied_to_parent: false,
        ..ClusterConfig::default()
    };
    let mut cluster = tokio::task::block_in_place(|| LocalCluster::start(&config))?;
    let status = system::bring_up(&mut cluster).await?;
    let state = cluster.detach();
    state.save()?;
    println!("hsm-secrets local: running in {}", state.dir.display());
    println!(
        "  device {}: primary {} at epoch {}",
        state.device,
        status.primary_node.unwrap_or_default(),
        status.epoch
    );
    for node in &state.nodes {
        println!(
            "  {}: agent {}, CSI unix://{}, kubelet dir {}",
            node.name,
            node.agent,
            node.csi_socket.display(),
            node.kubelet_dir.display()
        );
    }
    println!(
        "  webhook: {} (CA {}, server name {})",
        state.webhook_url,
        state.webhook_ca.display(),
        state.webhook_server_name
    );
    println!(
        "  state (HSMDevice/HSMSecret YAML, events.jsonl): {}",
        state.state_dir.display()
    );
    println!("  logs: {}", state.dir.join("logs").display());
    if state.plain_directories {
        print_plain_directory_warning();
    }
    let dir = state.dir.display();
    println!("next:");
    println!("  hsm-secrets local status --dir {dir}");
    println!("  hsm-secrets local get db-credentials --dir {dir}");
    println!("  hsm-secrets local down --dir {dir}");
    Ok(())
}

async fn status(dir: PathBuf) -> anyhow::Result<()> {
    let state = StateFile::load(&dir)?;
    print!("{}", system::device_tables(&state).await?);
    println!();
    let mut down = 0;
    let mut table = crate::kubectl::render::Table::new(&["PROCESS", "PID", "STATE", "LOG"]);
    for mut p in cluster::adopt(&state) {
        let running = p.is_running();
        down += usize::from(!running);
        table.row(vec![
            p.name.clone(),
            p.pid.to_string(),
            if running { "running" } else { "stopped" }.into(),
            p.log.display().to_string(),
        ]);
    }
    print!("{}", table.render(""));
    if state.plain_directories {
        print_plain_directory_warning();
    }
    if down > 0 {
        bail!("{down} process(es) stopped; see their logs, or restart: local down && local up");
    }
    Ok(())
}

async fn put(dir: PathBuf, namespace: &str, name: &str, pairs: &[String]) -> anyhow::Result<()> {
    let state = StateFile::load(&dir)?;
    let mut data = crate::hsm::SecretData::new();
    for (n, pair) in pairs.iter().enumerate() {
        let Some((key, value)) = pair.split_once('=') else {
            // Not echoed: without its `=` the argument may be a bare value.
            bail!("argument {} after the name: expected KEY=VALUE", n + 1);
        };
        data.insert(key, value.as_bytes().to_vec())
            .with_context(|| format!("key {key:?}"))?;
    }
    let (node, epoch, conn) = system::primary(&state).await?;
    let path = format!("{namespace}/{name}")
        .parse()
        .with_context(|| format!("secret name {namespace}/{name}"))?;
    let written = conn
        .put(&path, &data, crate::hsm::Expect::Any, epoch)
        .await
        .with_context(|| format!("write {path} on {node}"))?;
    println!(
        "{path}: {} key(s) written on {node} (primary, epoch {epoch}), version {}",
        data.len(),
        written.version
    );
    if declare_hsm_secret(&state, namespace, name).await? {
        println!(
            "declared HSMSecret {namespace}/{name} on {}: any service account of {namespace} may mount it",
            state.device
        );
    }
    Ok(())
}

/// Declares the HSMSecret of a secret written with `put` (the node plugins read the
/// state at each publish), unless one exists. Returns whether it was created.
async fn declare_hsm_secret(
    state: &StateFile,
    namespace: &str,
    name: &str,
) -> anyhow::Result<bool> {
    use crate::state::{FileState, StateStore};
    let files = FileState::open(&state.state_dir)?;
    if files.get_secret(namespace, name).await?.is_some() {
        return Ok(false);
    }
    files.apply_secret(&cluster::local_hsm_secret(
        &state.device,
        namespace,
        name,
        None,
    ))?;
    Ok(true)
}

async fn get(dir: PathBuf, namespace: &str, name: &str, reveal: bool) -> anyhow::Result<()> {
    let state = StateFile::load(&dir)?;
    let path = format!("{namespace}/{name}")
        .parse()
        .with_context(|| format!("secret name {namespace}/{name}"))?;
    let mut last = None;
    for node in &state.nodes {
        let conn = clients::agent(&node.name, &node.agent, &state.controller_tls())?;
        match conn.get(&path).await {
            Ok(answer) => {
                let Some(record) = answer.record.filter(|r| !r.deleted) else {
                    bail!("{path} does not exist (answered by {})", node.name);
                };
                println!(
                    "{path} version {} (from {}, epoch {})",
                    record.version, node.name, answer.epoch
                );
                for kv in record.data {
                    if reveal {
                        println!("  {}: {}", kv.key, String::from_utf8_lossy(&kv.value));
                    } else {
                        println!("  {}: {} bytes", kv.key, kv.value.len());
                    }
                }
                return Ok(());
            }
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e).context("no agent answered"),
        None => bail!("no nodes recorded"),
    }
}

/// On stdout with the rest: whoever reads the output sees where the secrets went.
fn print_plain_directory_warning() {
    println!(
        "warning: {PLAIN_DIRECTORY_WARNING}: the CSI plugins run with --unsafe-plain-directory \
         and write volumes to disk (development only)"
    );
}

fn down(dir: PathBuf) -> anyhow::Result<()> {
    let state = StateFile::load_to_stop(&dir)?;
    let mut processes = cluster::adopt(&state);
    let cleanup = cluster::stop_and_remove(&state.dir, &mut processes, false);
    println!(
        "stopped {} processes{}; unmounted {} volumes; removed {}",
        cleanup.stopped,
        if cleanup.forced.is_empty() {
            String::new()
        } else {
            format!(" ({} needed SIGKILL)", cleanup.forced.len())
        },
        cleanup.unmounted.len(),
        state.dir.display()
    );
    if !cleanup.errors.is_empty() {
        bail!("cleanup incomplete: {}", cleanup.errors.join("; "));
    }
    Ok(())
}
