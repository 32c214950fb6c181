//! `hsm-secrets local`: the demo's system kept running for interactive use.
//!
//! `up` starts it in the background and records it in `<dir>/local.json`; `status`,
//! `put`, `get` and `down` find it there.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};

use crate::kubectl::site::site_table;
use crate::local::cluster::{self, NAMESPACE, PLAIN_DIRECTORY_WARNING};
use crate::local::cluster::{BucketConfig, Follows, SiteConfig};
use crate::local::sites::{self, SiteOperator};
use crate::local::{ClusterConfig, LocalCluster, StateFile, clients, system};
use crate::telemetry::CommonArgs;

/// Output lines; a closed stdout (`local status | head`) ends the output quietly instead
/// of failing the command.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Args, Clone, Debug)]
pub struct LocalArgs {
    #[command(subcommand)]
    pub command: LocalCommand,
}

#[derive(Args, Clone, Debug)]
pub struct DirArg {
    /// Directory of the local system.
    #[arg(long, global = true, env = "HSM_LOCAL_DIR", default_value_os_t = default_dir())]
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
        #[command(flatten)]
        site: SiteUpArgs,
        /// Run each process in its own network namespace on a private bridge (root), so
        /// that `local fault` can cut, isolate and slow real links. `put`, `get` and
        /// `status` then speak from the clients' namespace.
        #[arg(long, conflicts_with_all = ["active_site", "follow"])]
        isolated_network: bool,
        /// The device's mirroring policy: `read-only` (acknowledge on the primary, mirrors
        /// pull) or `active` (acknowledge once the mirrors hold the write).
        #[arg(long, value_enum, default_value_t = PolicyArg::ReadOnly)]
        mirroring_policy: PolicyArg,
    },
    /// Real network faults on a system started with --isolated-network, and process
    /// faults on any: isolate, reconnect, cut, uncut, slow, impair, heal; pause, resume,
    /// kill, restart.
    Fault {
        #[command(flatten)]
        dir: DirArg,
        #[command(subcommand)]
        action: FaultAction,
    },
    /// A device spread over two local systems: status, promote, drain, rejoin (as
    /// `kubectl hsm site` on a cluster).
    Site {
        #[command(flatten)]
        dir: DirArg,
        #[command(subcommand)]
        action: LocalSiteAction,
    },
    /// A planned switchover of the primary to node TO (as `kubectl hsm failover --to`).
    Switchover {
        #[command(flatten)]
        dir: DirArg,
        to: String,
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
        /// Keep the directory (its logs and state) for a post-mortem.
        #[arg(long)]
        keep: bool,
    },
}

/// `local up` as one site of a device spread over two systems.
#[derive(Args, Clone, Debug)]
pub struct SiteUpArgs {
    /// Start the active site (`site-a`, device prod-hsm) of a two-site device, archiving
    /// into the bucket of --bucket-url (default: a directory of this system).
    #[arg(long, conflicts_with = "follow")]
    pub active_site: bool,
    /// Start the passive site (`site-b`, device prod-hsm-b) following the active site
    /// running in this directory, through its bucket.
    #[arg(long, value_name = "ACTIVE_SITE_DIR")]
    pub follow: Option<PathBuf>,
    /// The active site's bucket: `s3://BUCKET[/PREFIX]` (with --bucket-endpoint) or
    /// `file:///DIRECTORY`.
    #[arg(long, requires = "active_site")]
    pub bucket_url: Option<String>,
    /// Endpoint of the S3-compatible server (`http://127.0.0.1:9000`).
    #[arg(long, requires = "bucket_url")]
    pub bucket_endpoint: Option<String>,
    #[arg(long, requires = "bucket_url")]
    pub bucket_region: Option<String>,
    /// Directory holding `access-key-id` and `secret-access-key` for the bucket (never
    /// on the command line).
    #[arg(long, requires = "bucket_url")]
    pub bucket_credentials: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyArg {
    ReadOnly,
    Active,
}

/// A fault, named by the processes it hits: `controller`, `worker-1`..`worker-3`,
/// `clients` (where `put`/`get` and the webhook run).
#[derive(Subcommand, Clone, Debug)]
pub enum FaultAction {
    /// Cut NAME off from everything (its link down).
    Isolate { name: String },
    /// Bring NAME's link back.
    Reconnect { name: String },
    /// Drop FROM's packets to TO (one way; --both for a partition between them).
    Cut {
        from: String,
        to: String,
        #[arg(long)]
        both: bool,
    },
    /// Undo a cut.
    Uncut {
        from: String,
        to: String,
        #[arg(long)]
        both: bool,
    },
    /// Limit NAME's link both ways to RATE kbit/s, queueing at most QUEUE ms.
    Slow {
        name: String,
        #[arg(long, default_value_t = 256)]
        rate_kbit: u32,
        #[arg(long, default_value_t = 300)]
        queue_ms: u32,
    },
    /// Add DELAY ms of latency and LOSS % random loss to NAME's link, both ways (needs
    /// netem in the kernel).
    Impair {
        name: String,
        #[arg(long, default_value_t = 300)]
        delay_ms: u32,
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=100))]
        loss_percent: u32,
    },
    /// Undo every network fault.
    Heal,
    /// Stop NAME's process (SIGSTOP): it holds its connections but answers nothing.
    Pause { name: String },
    /// Continue a paused process (SIGCONT).
    Resume { name: String },
    /// Kill NAME's process (SIGKILL), as a crashed node; `restart` starts it again.
    Kill { name: String },
    /// Start a killed process again, as it was started (a node at its agent address).
    Restart { name: String },
}

#[derive(Subcommand, Clone, Debug)]
pub enum LocalSiteAction {
    /// The site's role; for a passive site both sites side by side.
    Status,
    /// Promote this passive site: a preflight, then with --yes the promotion.
    Promote {
        #[arg(long)]
        yes: bool,
    },
    /// Stop the active site taking writes for a planned switchover (--undo: take them
    /// again).
    Drain {
        #[arg(long)]
        undo: bool,
    },
    /// A fenced site follows the site promoted over it.
    Rejoin,
}

fn default_dir() -> PathBuf {
    std::env::temp_dir().join("hsm-secrets-local")
}

pub fn run(args: LocalArgs, _common: CommonArgs) -> anyhow::Result<()> {
    // A system on its private network is spoken to from the clients' namespace: entered
    // before the runtime starts, so that every thread of it is there.
    if let LocalCommand::Status { dir }
    | LocalCommand::Put { dir, .. }
    | LocalCommand::Get { dir, .. } = &args.command
        && let Ok(StateFile {
            network: Some(network),
            ..
        }) = StateFile::load(&dir.dir)
    {
        crate::local::network::enter(&network.netns_path(cluster::CLIENTS)?)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        match args.command {
            LocalCommand::Up {
                dir,
                softhsm_module,
                site,
                isolated_network,
                mirroring_policy,
            } => {
                let policy = match mirroring_policy {
                    PolicyArg::ReadOnly => crate::crd::MirroringPolicy::ReadOnly,
                    PolicyArg::Active => crate::crd::MirroringPolicy::Active,
                };
                up(dir.dir, softhsm_module, site, isolated_network, policy).await
            }
            LocalCommand::Fault { dir, action } => fault(dir.dir, action),
            LocalCommand::Switchover { dir, to } => {
                system::request_switchover(&StateFile::load(&dir.dir)?, &to).await?;
                say!("switchover to {to} requested; follow it with `hsm-secrets local status`");
                Ok(())
            }
            LocalCommand::Site { dir, action } => site_action(dir.dir, action).await,
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
            LocalCommand::Down { dir, keep } => down(dir.dir, keep),
        }
    })
}

async fn up(
    dir: PathBuf,
    softhsm_module: Option<PathBuf>,
    site: SiteUpArgs,
    isolated_network: bool,
    policy: crate::crd::MirroringPolicy,
) -> anyhow::Result<()> {
    if StateFile::path(&dir).exists() {
        bail!(
            "a local system is recorded in {}; stop it first: hsm-secrets local down --dir {}",
            dir.display(),
            dir.display()
        );
    }
    let site = site_config(&dir, site)?;
    let timing = if site.is_some() {
        crate::local::Timing::for_sites()
    } else {
        crate::local::Timing::default()
    };
    let config = ClusterConfig {
        dir: Some(dir),
        softhsm_module,
        tied_to_parent: false,
        site,
        timing,
        isolated_network,
        policy: Some(policy),
        ..ClusterConfig::default()
    };
    let mut cluster = tokio::task::block_in_place(|| LocalCluster::start(&config))?;
    let status = match cluster.network.clone() {
        Some(network) => {
            let clients = network.netns_path(cluster::CLIENTS)?;
            tokio::task::block_in_place(|| {
                crate::local::network::block_on_in(&clients, system::bring_up(&mut cluster))
            })??
        }
        None => system::bring_up(&mut cluster).await?,
    };
    let state = cluster.detach();
    state.save()?;
    say!("hsm-secrets local: running in {}", state.dir.display());
    say!(
        "  device {}: primary {} at epoch {}",
        state.device,
        status.primary_node.unwrap_or_default(),
        status.epoch
    );
    for node in &state.nodes {
        say!(
            "  {}: agent {}, CSI unix://{}, kubelet dir {}",
            node.name,
            node.agent,
            node.csi_socket.display(),
            node.kubelet_dir.display()
        );
    }
    say!(
        "  webhook: {} (CA {}, server name {})",
        state.webhook_url,
        state.webhook_ca.display(),
        state.webhook_server_name
    );
    say!(
        "  state (HSMDevice/HSMSecret YAML, events.jsonl): {}",
        state.state_dir.display()
    );
    say!("  logs: {}", state.dir.join("logs").display());
    if let (Some(site), Some(bucket)) = (&state.site, &state.bucket) {
        say!("  site {site}, archiving into {}", bucket.url);
    }
    if state.plain_directories {
        print_plain_directory_warning();
    }
    let dir = state.dir.display();
    say!("next:");
    say!("  hsm-secrets local status --dir {dir}");
    say!("  hsm-secrets local get db-credentials --dir {dir}");
    say!("  hsm-secrets local down --dir {dir}");
    Ok(())
}

async fn status(dir: PathBuf) -> anyhow::Result<()> {
    let state = StateFile::load(&dir)?;
    say_raw!("{}", system::device_tables(&state).await?);
    say!();
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
    say_raw!("{}", table.render(""));
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
    say!(
        "{path}: {} key(s) written on {node} (primary, epoch {epoch}), version {}",
        data.len(),
        written.version
    );
    if declare_hsm_secret(&state, namespace, name).await? {
        say!(
            "declared HSMSecret {namespace}/{name} on {}: any service account of {namespace} may mount it",
            state.device
        );
    }
    Ok(())
}

/// The site `local up` starts, from its flags.
fn site_config(dir: &std::path::Path, args: SiteUpArgs) -> anyhow::Result<Option<SiteConfig>> {
    if let Some(active) = &args.follow {
        let active = StateFile::load(active)
            .with_context(|| format!("--follow {}: the active site", active.display()))?;
        let follows = Follows::active_system(&active)?;
        let bucket = active.bucket.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "--follow {}: that system records no bucket; start it again with --active-site",
                active.dir.display()
            )
        })?;
        let bucket = BucketConfig {
            credentials: cluster::read_bucket_credentials(&active.archive_secret())?,
            ..bucket
        };
        return Ok(Some(sites::site_config(1, bucket, Some(follows))));
    }
    if !args.active_site {
        return Ok(None);
    }
    let url = args.bucket_url.unwrap_or_else(|| {
        format!(
            "file://{}",
            std::path::absolute(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .join("archive/bucket")
                .display()
        )
    });
    let credentials = args
        .bucket_credentials
        .as_deref()
        .map(cluster::read_bucket_credentials)
        .transpose()?
        .flatten();
    Ok(Some(sites::site_config(
        0,
        BucketConfig {
            url,
            endpoint: args.bucket_endpoint,
            region: args.bucket_region,
            credentials,
        },
        None,
    )))
}

async fn site_action(dir: PathBuf, action: LocalSiteAction) -> anyhow::Result<()> {
    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
    let state = StateFile::load(&dir)?;
    let operator = SiteOperator::new(&state)?;
    let view = operator.view().await?;
    match action {
        LocalSiteAction::Status => say_raw!("{}", site_table(&view)),
        LocalSiteAction::Promote { yes } => {
            if let Some(refusal) = crate::kubectl::site::promote_refusal(&view) {
                bail!(refusal);
            }
            say_raw!("{}", site_table(&view));
            if !yes {
                say!(
                    "not promoted: this is the preflight. Promoting fences the active site (it \
                     stops taking writes at its next archive step) and is never automatic; to go \
                     ahead: hsm-secrets local site promote --yes --dir {}",
                    dir.display()
                );
                return Ok(());
            }
            let site = operator.promote(TIMEOUT).await?;
            say!(
                "{}: site {} is active at site epoch {}; the old active site is fenced",
                state.device,
                site.name,
                site.site_epoch
            );
        }
        LocalSiteAction::Drain { undo } => {
            operator.drain(undo, TIMEOUT).await?;
            say!(
                "{}: site {} {}",
                state.device,
                view.spec.name,
                if undo {
                    "takes writes again"
                } else {
                    "takes no writes and archives what it has"
                }
            );
        }
        LocalSiteAction::Rejoin => {
            let (summary, site) = operator.rejoin(TIMEOUT).await?;
            say_raw!("{summary}");
            say!(
                "{}: site {} is passive (applied sequence {})",
                state.device,
                site.name,
                site.applied_sequence.unwrap_or(0)
            );
        }
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
                let record = answer.record;
                let crate::hsm::Body::Live(data) = &record.body else {
                    bail!("{path} does not exist (answered by {})", node.name);
                };
                say!(
                    "{path} version {} (from {}, epoch {})",
                    record.version,
                    node.name,
                    answer.epoch
                );
                for (key, value) in data.iter() {
                    if reveal {
                        say!("  {key}: {}", String::from_utf8_lossy(value));
                    } else {
                        say!("  {key}: {} bytes", value.len());
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
    say!(
        "warning: {PLAIN_DIRECTORY_WARNING}: the CSI plugins run with --unsafe-plain-directory \
         and write volumes to disk (development only)"
    );
}

fn down(dir: PathBuf, keep: bool) -> anyhow::Result<()> {
    let state = StateFile::load_to_stop(&dir)?;
    let mut processes = cluster::adopt(&state);
    let cleanup = cluster::stop_and_remove(&state.dir, &mut processes, keep);
    if let Some(network) = &state.network {
        network.remove();
    }
    say!(
        "stopped {} processes{}; unmounted {} volumes; {} {}",
        cleanup.stopped,
        if cleanup.forced.is_empty() {
            String::new()
        } else {
            format!(" ({} needed SIGKILL)", cleanup.forced.len())
        },
        cleanup.unmounted.len(),
        if keep { "kept" } else { "removed" },
        state.dir.display()
    );
    if !cleanup.errors.is_empty() {
        bail!("cleanup incomplete: {}", cleanup.errors.join("; "));
    }
    Ok(())
}

fn fault(dir: PathBuf, action: FaultAction) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    let state = StateFile::load_to_stop(&dir)?;
    let network = || {
        state.network.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "{} runs on the host's loopback: network faults need a system started with \
                 `local up --isolated-network` (pause and resume work on any)",
                dir.display()
            )
        })
    };
    let signal = |name: &str, signal: Signal| -> anyhow::Result<()> {
        let process = cluster::process_of(&state, name)?;
        kill(nix::unistd::Pid::from_raw(process.pid), signal)
            .with_context(|| format!("signal {name} (pid {})", process.pid))
    };
    match &action {
        FaultAction::Isolate { name } => network()?.isolate(name)?,
        FaultAction::Reconnect { name } => network()?.reconnect(name)?,
        FaultAction::Cut { from, to, both } => {
            network()?.cut(from, to)?;
            if *both {
                network()?.cut(to, from)?;
            }
        }
        FaultAction::Uncut { from, to, both } => {
            network()?.uncut(from, to)?;
            if *both {
                network()?.uncut(to, from)?;
            }
        }
        FaultAction::Slow {
            name,
            rate_kbit,
            queue_ms,
        } => network()?.slow(
            name,
            crate::local::network::Slow {
                rate_kbit: *rate_kbit,
                queue_ms: *queue_ms,
            },
        )?,
        FaultAction::Impair {
            name,
            delay_ms,
            loss_percent,
        } => network()?.impair(name, *delay_ms, *loss_percent)?,
        FaultAction::Heal => network()?.heal()?,
        FaultAction::Pause { name } => signal(name, Signal::SIGSTOP)?,
        FaultAction::Resume { name } => signal(name, Signal::SIGCONT)?,
        FaultAction::Kill { name } => {
            let process = cluster::process_of(&state, name)?;
            let saved = crate::local::processes::capture(process.pid)?;
            let path = restart_file(&state, name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("create {}", parent.display()))?;
            }
            std::fs::write(&path, serde_json::to_vec_pretty(&saved)?)
                .with_context(|| format!("write {}", path.display()))?;
            crate::local::processes::ChildProcess::adopt(&process).kill_hard()?;
        }
        FaultAction::Restart { name } => restart(state, name)?,
    }
    say!("{action:?}: done");
    Ok(())
}

/// Where `fault kill` keeps how a process was started.
fn restart_file(state: &StateFile, name: &str) -> PathBuf {
    state.dir.join("restart").join(format!("{name}.json"))
}

/// Starts a process `fault kill` stopped, as it was started. A node listens at the agent
/// address it had (the controller knows it by that), not at a fresh port.
fn restart(mut state: StateFile, name: &str) -> anyhow::Result<()> {
    let path = restart_file(&state, name);
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "{name} was not stopped by `local fault kill` ({} is missing)",
            path.display()
        )
    })?;
    let mut saved: crate::local::processes::SavedCommand = serde_json::from_slice(&text)?;
    if let Some(node) = state.nodes.iter().find(|n| n.name == name)
        && let Some(at) = saved.argv.iter().position(|a| a == "--agent-listen")
        && let Some(addr) = node.agent.strip_prefix("https://")
        && at + 1 < saved.argv.len()
    {
        saved.argv[at + 1] = addr.to_string();
    }
    let recorded = state
        .processes
        .iter_mut()
        .find(|p| p.name == name || p.name == format!("node {name}"))
        .ok_or_else(|| anyhow::anyhow!("no process {name} in {}", state.dir.display()))?;
    if crate::local::processes::ChildProcess::adopt(recorded).is_running() {
        bail!("{name} (pid {}) is running: kill it first", recorded.pid);
    }
    // The command line shows the program after `nsenter` entered its namespace: enter
    // it again.
    if let Some(network) = &state.network
        && let Ok(netns) = network.netns_path(name)
    {
        let mut argv = vec!["nsenter".to_string(), format!("--net={netns}"), "--".into()];
        argv.append(&mut saved.argv);
        saved.argv = argv;
    }
    let log = recorded.log.clone();
    let out = log.with_extension("out");
    recorded.pid = crate::local::processes::respawn(&saved, &log, &out)?;
    // The saved command stays: a restart that did not come up can be asked again.
    state.save()?;
    Ok(())
}
