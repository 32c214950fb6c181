//! The command line (clap) and its validation into [`Request`]s.
//!
//! The connection flags have no `env` fallback of their own: kube-rs already reads
//! `$KUBECONFIG` (a colon-separated list, which one flag value cannot express) the way
//! kubectl does.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand, ValueEnum};

use super::input::{KeySet, KeySourceArgs, Prompt};
use super::{KubectlError, Term};
use crate::crd::ImportMode;
use crate::hsm::validate_key;

/// The `kubectl hsm` command line.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-hsm",
    bin_name = "kubectl hsm",
    version,
    about = "Manage secrets kept in hardware security modules (hsmsecrets.io HSMSecrets and HSMDevices)",
    after_help = "Writes go through Kubernetes objects (an import Secret and the HSMSecret), so \
RBAC and the validating webhook apply. Values are never printed unless you ask with --show-values."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Connection and scope flags, as kubectl spells them.
#[derive(Args, Debug, Clone, Default)]
pub struct GlobalArgs {
    /// Name of the kubeconfig context to use.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace (default: the kubeconfig context's namespace).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// List across all namespaces (list only).
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List HSMSecrets.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Show one HSMSecret: status and key names (values only with --show-values).
    Get(GetArgs),
    /// Create an HSMSecret and import keys into the HSM.
    Create(CreateArgs),
    /// Add or change keys of an HSMSecret (--replace: make the given keys the whole secret).
    Update(UpdateArgs),
    /// Delete an HSMSecret, or only some of its keys with --key.
    Delete(DeleteArgs),
    /// List HSMDevices with roles, phase, mirrors and lag.
    Devices(OutputArgs),
    /// Health of every device and node; exits 1 when a device is not Ready.
    Health(OutputArgs),
    /// Mirroring of one device.
    Mirror(MirrorArgs),
    /// Switch a device's primary to another node (planned: waits for it to catch up).
    Failover(FailoverArgs),
    /// Which pods have HSM secrets (or SECRET) mounted now, at which version, read from
    /// which copy (the node plugins' tables, through the API server's pod proxy).
    Mounts(MountsArgs),
    /// A device's archive: lag, restorable points and drills; take a base or run a
    /// restore drill now.
    Backup(BackupArgs),
    /// Restore a device from its archive to a point, through its primary (mirrors
    /// follow); refused when the device holds secrets unless --force.
    Restore(RestoreArgs),
    /// A device spread over sites: where each stands; promote a passive site (manual
    /// only) or rejoin a fenced one as passive.
    Site(SiteArgs),
    /// Print a shell completion script.
    Completion(CompletionArgs),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    #[value(alias = "wide")]
    Table,
    Json,
    Yaml,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

#[derive(Args, Debug)]
pub struct MountsArgs {
    /// Only pods that mount this HSMSecret.
    pub secret: Option<String>,
    /// Namespace of the node plugin DaemonSet.
    #[arg(long, default_value = "hsm-secrets-system")]
    pub plugin_namespace: String,
    /// Label selector of the node plugin pods.
    #[arg(
        long,
        default_value = "app.kubernetes.io/name=hsm-secrets,app.kubernetes.io/component=node"
    )]
    pub plugin_selector: String,
    /// The node plugins' metrics port, where they serve /mounts.
    #[arg(long, default_value_t = 8080)]
    pub plugin_port: u16,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// HSMSecret name.
    pub name: String,
    /// Only these keys (repeatable or comma-separated).
    #[arg(long = "key", value_name = "KEY", value_delimiter = ',')]
    pub keys: Vec<String>,
    /// Print values, read from the Kubernetes Secret copy (spec.secretName).
    #[arg(long)]
    pub show_values: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct WaitArgs {
    /// Wait for the controller to finish (--wait=false to return at once).
    #[arg(
        long,
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set
    )]
    pub wait: bool,
    /// How long to wait, e.g. 60s, 2m, 1m30s.
    #[arg(long, default_value = "60s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// HSMSecret name.
    pub name: String,
    /// HSMDevice that will hold the secret.
    #[arg(long, required = true)]
    pub device: String,
    #[command(flatten)]
    pub sources: KeySourceArgs,
    /// Print the keys that would be written, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// HSMSecret name.
    pub name: String,
    #[command(flatten)]
    pub sources: KeySourceArgs,
    /// Make the given keys the whole secret: keys not given are removed.
    #[arg(long)]
    pub replace: bool,
    /// Print the keys that would be added, set or removed, and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// HSMSecret name.
    pub name: String,
    /// Remove only these keys (repeatable or comma-separated).
    #[arg(long = "key", value_name = "KEY", value_delimiter = ',')]
    pub keys: Vec<String>,
    /// Also delete the data in the HSM (sets spec.deletionPolicy: Delete first).
    #[arg(long, conflicts_with = "keys")]
    pub purge: bool,
    /// Print what would be deleted, and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct MirrorArgs {
    #[command(subcommand)]
    pub command: MirrorCommand,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: BackupCommand,
}

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// The archive of a device: lag, restorable points, the last restore drill.
    List(BackupListArgs),
    /// Take a base snapshot now: a new restorable point.
    Now(BackupActArgs),
    /// Run a restore drill now: rebuild the newest point in scratch space (never the
    /// live tokens) and compare it with the device; exits 1 when it does not verify.
    Verify(BackupActArgs),
}

#[derive(Args, Debug)]
pub struct SiteArgs {
    #[command(subcommand)]
    pub command: SiteCommand,
}

#[derive(Subcommand, Debug)]
pub enum SiteCommand {
    /// The site's role, what it applied of the active site's archive, its lag.
    Status(BackupListArgs),
    /// Promote this passive site: shows both sites side by side and what would be lost;
    /// promotes only with --yes. The active site is fenced and stops taking writes.
    Promote(SitePromoteArgs),
    /// Stop the active site's writes for a planned switchover (it keeps archiving), so the
    /// passive site can catch up and be promoted with nothing lost; --undo calls it off.
    Drain(SiteDrainArgs),
    /// Turn this fenced site into a passive one that follows the site promoted over it;
    /// its writes after the fence point are reported, never replayed. Needs --yes.
    Rejoin(SitePromoteArgs),
}

#[derive(Args, Debug)]
pub struct SiteDrainArgs {
    /// HSMDevice name.
    pub device: String,
    /// Call the switchover off: the site takes writes again.
    #[arg(long)]
    pub undo: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct SitePromoteArgs {
    /// HSMDevice name.
    pub device: String,
    /// Carry it out (without it, only the preflight is shown).
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Args, Debug)]
pub struct BackupListArgs {
    /// HSMDevice name.
    pub device: String,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug)]
pub struct BackupActArgs {
    /// HSMDevice name.
    pub device: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("point").required(true).args(["to_sequence", "to_time", "latest"])))]
pub struct RestoreArgs {
    /// HSMDevice name.
    pub device: String,
    /// The newest archived point at or before this change sequence.
    #[arg(long, value_name = "N")]
    pub to_sequence: Option<u64>,
    /// The newest archived point written at or before this time (RFC 3339, e.g.
    /// 2026-12-07T08:00:00Z).
    #[arg(long, value_name = "TIME")]
    pub to_time: Option<String>,
    /// The newest point the archive holds.
    #[arg(long)]
    pub latest: bool,
    /// Restore onto a device that holds secrets: it ends equal to the point (secrets
    /// made after it are deleted).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Subcommand, Debug)]
pub enum MirrorCommand {
    /// Per-node replication state of a device.
    Status(MirrorStatusArgs),
}

#[derive(Args, Debug)]
pub struct MirrorStatusArgs {
    /// HSMDevice name.
    pub device: String,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug)]
pub struct FailoverArgs {
    /// HSMDevice name.
    pub device: String,
    /// Node to promote to primary.
    #[arg(long, required = true, value_name = "NODE")]
    pub to: String,
    /// Promote NODE even when the primary is unreachable and NODE has not applied every
    /// change it last reported: those changes may be lost (they are reported in status).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Args, Debug)]
pub struct CompletionArgs {
    pub shell: Shell,
}

/// Parses `60`, `60s`, `2m`, `1m30s`, `1h`.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration; use e.g. 60s, 2m or 1m30s");
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0u64;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() || text.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// Waiting after a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait {
    pub enabled: bool,
    pub timeout: Duration,
}

impl From<WaitArgs> for Wait {
    fn from(w: WaitArgs) -> Self {
        Self {
            enabled: w.wait,
            timeout: w.timeout,
        }
    }
}

/// A validated command, ready to run against a session.
#[derive(Debug)]
pub enum Request {
    List(ListRequest),
    Get(GetRequest),
    Import(ImportRequest),
    Delete(DeleteRequest),
    Devices(OutputFormat),
    Health(OutputFormat),
    MirrorStatus(MirrorStatusRequest),
    Failover(FailoverRequest),
    Mounts(MountsRequest),
    Backup(BackupRequest),
    Restore(RestoreRequest),
    Site(SiteRequest),
}

#[derive(Debug)]
pub struct SiteRequest {
    pub device: String,
    pub action: SiteAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteAction {
    Status(OutputFormat),
    Promote { yes: bool, wait: Wait },
    Rejoin { yes: bool, wait: Wait },
    Drain { undo: bool, wait: Wait },
}

#[derive(Debug)]
pub struct RestoreRequest {
    pub device: String,
    pub to_sequence: Option<u64>,
    pub to_time: Option<k8s_openapi::jiff::Timestamp>,
    pub force: bool,
    pub wait: Wait,
}

#[derive(Debug)]
pub struct BackupRequest {
    pub device: String,
    pub action: BackupAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupAction {
    List(OutputFormat),
    Now(Wait),
    Verify(Wait),
}

#[derive(Debug)]
pub struct MountsRequest {
    pub secret: Option<String>,
    pub all_namespaces: bool,
    pub plugin_namespace: String,
    pub plugin_selector: String,
    pub plugin_port: u16,
    pub output: OutputFormat,
}

#[derive(Debug)]
pub struct ListRequest {
    pub all_namespaces: bool,
    pub output: OutputFormat,
}

#[derive(Debug)]
pub struct GetRequest {
    pub name: String,
    pub keys: Vec<String>,
    pub show_values: bool,
    pub output: OutputFormat,
}

/// `create` (with the device) or `update`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportVerb {
    Create { device: String },
    Update,
}

#[derive(Debug)]
pub struct ImportRequest {
    pub verb: ImportVerb,
    pub name: String,
    pub mode: ImportMode,
    pub keys: KeySet,
    pub dry_run: bool,
    pub wait: Wait,
}

#[derive(Debug)]
pub struct DeleteRequest {
    pub name: String,
    /// Empty: delete the whole HSMSecret.
    pub remove_keys: Vec<String>,
    pub purge: bool,
    pub dry_run: bool,
    pub wait: Wait,
}

#[derive(Debug)]
pub struct MirrorStatusRequest {
    pub device: String,
    pub output: OutputFormat,
}

#[derive(Debug)]
pub struct FailoverRequest {
    pub device: String,
    pub to: String,
    pub force: bool,
    pub wait: Wait,
}

impl Request {
    /// Validates names, keys and flag combinations, and reads key values (files, env
    /// files, literals, or the terminal prompt) for the write commands.
    pub fn from_cli(
        cli: &Cli,
        prompt: &mut dyn Prompt,
        term: &mut Term<'_>,
    ) -> Result<Self, KubectlError> {
        if let Some(ns) = &cli.global.namespace {
            validate_name("namespace", ns, 63, false)?;
        }
        let all = cli.global.all_namespaces;
        let only_list = |cmd: &str| -> Result<(), KubectlError> {
            if all {
                Err(KubectlError::usage(format!(
                    "-A/--all-namespaces applies only to `list` and `mounts`, not to `{cmd}`; use -n NAMESPACE"
                )))
            } else {
                Ok(())
            }
        };
        Ok(match &cli.command {
            Command::List(a) => Request::List(ListRequest {
                all_namespaces: all,
                output: a.output.output,
            }),
            Command::Get(a) => {
                only_list("get")?;
                validate_secret_name(&a.name)?;
                let keys = validate_key_list(&a.keys)?;
                Request::Get(GetRequest {
                    name: a.name.clone(),
                    keys,
                    show_values: a.show_values,
                    output: a.output.output,
                })
            }
            Command::Create(a) => {
                only_list("create")?;
                validate_secret_name(&a.name)?;
                validate_name("device", &a.device, 253, true)?;
                let keys = KeySet::collect(&a.sources, prompt, term)?;
                Request::Import(ImportRequest {
                    verb: ImportVerb::Create {
                        device: a.device.clone(),
                    },
                    name: a.name.clone(),
                    mode: ImportMode::Replace,
                    keys,
                    dry_run: a.dry_run,
                    wait: a.wait.into(),
                })
            }
            Command::Update(a) => {
                only_list("update")?;
                validate_secret_name(&a.name)?;
                let keys = KeySet::collect(&a.sources, prompt, term)?;
                Request::Import(ImportRequest {
                    verb: ImportVerb::Update,
                    name: a.name.clone(),
                    mode: if a.replace {
                        ImportMode::Replace
                    } else {
                        ImportMode::Merge
                    },
                    keys,
                    dry_run: a.dry_run,
                    wait: a.wait.into(),
                })
            }
            Command::Delete(a) => {
                only_list("delete")?;
                validate_secret_name(&a.name)?;
                Request::Delete(DeleteRequest {
                    name: a.name.clone(),
                    remove_keys: validate_key_list(&a.keys)?,
                    purge: a.purge,
                    dry_run: a.dry_run,
                    wait: a.wait.into(),
                })
            }
            Command::Devices(o) => {
                only_list("devices")?;
                Request::Devices(o.output)
            }
            Command::Health(o) => {
                only_list("health")?;
                Request::Health(o.output)
            }
            Command::Mirror(m) => {
                only_list("mirror status")?;
                let MirrorCommand::Status(s) = &m.command;
                validate_name("device", &s.device, 253, true)?;
                Request::MirrorStatus(MirrorStatusRequest {
                    device: s.device.clone(),
                    output: s.output.output,
                })
            }
            Command::Failover(f) => {
                only_list("failover")?;
                validate_name("device", &f.device, 253, true)?;
                validate_name("node", &f.to, 253, true)?;
                Request::Failover(FailoverRequest {
                    device: f.device.clone(),
                    to: f.to.clone(),
                    force: f.force,
                    wait: f.wait.into(),
                })
            }
            Command::Backup(b) => {
                only_list("backup")?;
                let (device, action) = match &b.command {
                    BackupCommand::List(a) => (&a.device, BackupAction::List(a.output.output)),
                    BackupCommand::Now(a) => (&a.device, BackupAction::Now(a.wait.into())),
                    BackupCommand::Verify(a) => (&a.device, BackupAction::Verify(a.wait.into())),
                };
                validate_name("device", device, 253, true)?;
                Request::Backup(BackupRequest {
                    device: device.clone(),
                    action,
                })
            }
            Command::Site(a) => {
                only_list("site")?;
                let (device, action) = match &a.command {
                    SiteCommand::Status(s) => (&s.device, SiteAction::Status(s.output.output)),
                    SiteCommand::Promote(p) => (
                        &p.device,
                        SiteAction::Promote {
                            yes: p.yes,
                            wait: p.wait.into(),
                        },
                    ),
                    SiteCommand::Drain(d) => (
                        &d.device,
                        SiteAction::Drain {
                            undo: d.undo,
                            wait: d.wait.into(),
                        },
                    ),
                    SiteCommand::Rejoin(p) => (
                        &p.device,
                        SiteAction::Rejoin {
                            yes: p.yes,
                            wait: p.wait.into(),
                        },
                    ),
                };
                validate_name("device", device, 253, true)?;
                Request::Site(SiteRequest {
                    device: device.clone(),
                    action,
                })
            }
            Command::Restore(a) => {
                only_list("restore")?;
                validate_name("device", &a.device, 253, true)?;
                let to_time = a
                    .to_time
                    .as_deref()
                    .map(|t| {
                        t.parse::<k8s_openapi::jiff::Timestamp>().map_err(|e| {
                            KubectlError::usage(format!(
                                "--to-time {t:?} is not an RFC 3339 time ({e}); use e.g. 2026-12-07T08:00:00Z"
                            ))
                        })
                    })
                    .transpose()?;
                Request::Restore(RestoreRequest {
                    device: a.device.clone(),
                    to_sequence: a.to_sequence,
                    to_time,
                    force: a.force,
                    wait: a.wait.into(),
                })
            }
            Command::Mounts(m) => {
                if let Some(secret) = &m.secret {
                    validate_name("HSMSecret name", secret, 253, true)?;
                }
                validate_name("--plugin-namespace", &m.plugin_namespace, 63, false)?;
                Request::Mounts(MountsRequest {
                    secret: m.secret.clone(),
                    all_namespaces: all,
                    plugin_namespace: m.plugin_namespace.clone(),
                    plugin_selector: m.plugin_selector.clone(),
                    plugin_port: m.plugin_port,
                    output: m.output.output,
                })
            }
            Command::Completion(_) => {
                return Err(KubectlError::usage(
                    "completion needs no cluster; it is handled before connecting",
                ));
            }
        })
    }
}

/// HSMSecret names are Kubernetes names, and at most 63 characters: the import Secret
/// carries the name in a label value.
fn validate_secret_name(name: &str) -> Result<(), KubectlError> {
    validate_name("HSMSecret name", name, 253, true)?;
    if name.len() > 63 {
        return Err(KubectlError::usage(format!(
            "HSMSecret name {name:?} is longer than 63 characters, which kubectl hsm cannot \
             write (the import Secret's label {} holds the name); choose a shorter name",
            super::IMPORT_FOR_LABEL
        )));
    }
    Ok(())
}

/// A DNS-1123 label (`dots = false`) or subdomain (`dots = true`).
pub fn validate_name(what: &str, name: &str, max: usize, dots: bool) -> Result<(), KubectlError> {
    let why = if name.is_empty() || name.len() > max {
        Some(format!("must be 1 to {max} characters"))
    } else if let Some(c) = name.chars().find(|&c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.'))
    }) {
        Some(format!(
            "contains {c:?}; use lower-case letters, digits, '-'{}",
            if dots { " and '.'" } else { "" }
        ))
    } else if name
        .split('.')
        .any(|p| p.is_empty() || p.starts_with('-') || p.ends_with('-'))
    {
        Some("must start and end with a letter or digit (also around each '.')".to_string())
    } else {
        None
    };
    match why {
        Some(why) => Err(KubectlError::usage(format!(
            "invalid {what} {name:?}: {why}"
        ))),
        None => Ok(()),
    }
}

fn validate_key_list(keys: &[String]) -> Result<Vec<String>, KubectlError> {
    let mut out: Vec<String> = Vec::new();
    for key in keys {
        validate_key(key).map_err(|e| KubectlError::usage(format!("--key: {e}")))?;
        if out.contains(key) {
            return Err(KubectlError::usage(format!(
                "--key {key:?} is given twice; give each key once"
            )));
        }
        out.push(key.clone());
    }
    Ok(out)
}

/// Writes the completion script for `kubectl-hsm` (generated by clap_complete).
pub fn write_completion(shell: Shell, term: &mut Term<'_>) -> Result<(), KubectlError> {
    let script = match shell {
        // clap_complete's bash script mistakes the '-' of a binary name for a subcommand
        // separator (subcommands then never complete): generate under a name without one
        // and register the completion for the real name.
        Shell::Bash => completion_script(clap_complete::Shell::Bash, "kubectl_hsm")
            .replace(" kubectl_hsm\n", " kubectl-hsm\n"),
        Shell::Zsh => completion_script(clap_complete::Shell::Zsh, "kubectl-hsm"),
        Shell::Fish => completion_script(clap_complete::Shell::Fish, "kubectl-hsm"),
    };
    term.print(&script)
}

fn completion_script(shell: clap_complete::Shell, bin_name: &str) -> String {
    let mut cmd = Cli::command().bin_name(bin_name);
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, bin_name, &mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}
