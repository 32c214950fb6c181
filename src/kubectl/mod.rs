//! `kubectl hsm`: list, inspect, write and fail over HSM secrets from a workstation.
//!
//! The plugin never talks to an HSM. Every write goes through Kubernetes objects, so RBAC
//! decides who may write and the validating webhook's read-only check applies; the
//! controller does the HSM work and reports back in status.
//!
//! # Contract with the controller
//!
//! * **Import Secret.** `create NAME` / `update NAME` create a Kubernetes Secret
//!   `<NAME>-import-<suffix>` (`metadata.generateName`, so the API server picks the
//!   suffix) in the HSMSecret's namespace: type `Opaque`, label
//!   [`IMPORT_FOR_LABEL`]`: NAME`, data = the keys. Then the HSMSecret gets
//!   `spec.source = {secretRef: {name}, deleteAfterImport: true, mode}` with mode
//!   `Replace` for `create` and `update --replace`, `Merge` for `update`. The controller
//!   imports the Secret into the HSM, records the Secret's resourceVersion in
//!   `status.importedSourceVersion` and deletes the Secret.
//! * **Key removal.** `delete NAME --key K1 --key K2` creates an import Secret with no data
//!   and the annotation [`REMOVE_KEYS_ANNOTATION`]`: K1,K2`, imported in `Merge` mode:
//!   the controller removes exactly those keys from the HSM secret and keeps the others.
//!   (A `Replace` import cannot express this without sending every other value back.)
//! * **Waiting.** After a write the plugin polls the HSMSecret every 500 ms until
//!   `status.importedSourceVersion` equals the import Secret's resourceVersion (done) or
//!   `status.syncStatus` is `Error` for the generation it wrote (`status.lastError` is
//!   printed), or `--timeout` passes. An `Error` left over from an older generation is
//!   ignored when the controller reports `status.observedGeneration`.
//! * **Switchover.** `failover DEVICE --to NODE` sets the annotation
//!   [`SWITCHOVER_ANNOTATION`](crate::crd::SWITCHOVER_ANNOTATION) on the HSMDevice and
//!   polls until `status.primaryNode == NODE`. It refuses, before writing, a device with
//!   policy `None`, a node that is not in `status.nodes`, an unhealthy node and the
//!   current primary.
//! * **Deletion.** `delete NAME` deletes the HSMSecret; the HSM data stays unless
//!   `spec.deletionPolicy: Delete` (`--purge` sets it first).
//!
//! Secret values are read only from `--from-literal`, `--from-file`, `--from-env-file` or
//! a hidden terminal prompt, are never logged, and are printed only by
//! `get --show-values` (which reads the synced Kubernetes Secret named by
//! `spec.secretName`).
//!
//! Exit codes: 0 success, 1 error (including `health` finding a device that is not
//! Ready), 2 usage.

pub mod args;
mod backup;
mod client;
mod devices;
mod error;
pub mod input;
pub mod mounts;
pub mod plan;
pub mod render;
mod secrets;
pub mod site;
mod wait;

use std::io::Write;
use std::time::Duration;

pub use args::{Cli, Command, OutputFormat};
pub use client::{Session, client_for, connect};
pub use devices::refuse_switchover;
pub use error::KubectlError;
pub use input::{Prompt, SecretValue, TerminalPrompt};

pub use crate::contract::{IMPORT_FOR_LABEL, REMOVE_KEYS_ANNOTATION};
/// Interval between status polls while waiting for the controller.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Where a command writes: results to `out`, progress and notices to `err`.
pub struct Term<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
}

impl Term<'_> {
    pub(crate) fn print(&mut self, text: &str) -> Result<(), KubectlError> {
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(KubectlError::stdout)
    }

    pub(crate) fn note(&mut self, text: &str) {
        // Progress is best effort: a closed stderr must not fail the command.
        let _ = writeln!(self.err, "{text}");
        let _ = self.err.flush();
    }
}

/// Runs a parsed command line: validates the arguments, connects with the kubeconfig
/// flags and executes. `completion` needs no cluster.
pub async fn run(
    cli: Cli,
    prompt: &mut dyn Prompt,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    if let Command::Completion(c) = &cli.command {
        return args::write_completion(c.shell, term);
    }
    let request = args::Request::from_cli(&cli, prompt, term)?;
    let session = connect(&cli.global).await?;
    execute(request, &session, term).await
}

/// Executes a validated request against a session (tests pass a mock-backed session).
pub async fn execute(
    request: args::Request,
    session: &Session,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    use args::Request as R;
    match request {
        R::List(r) => secrets::list(session, &r, term).await,
        R::Get(r) => secrets::get(session, &r, term).await,
        R::Import(r) => secrets::import(session, &r, term).await,
        R::Delete(r) => secrets::delete(session, &r, term).await,
        R::Devices(o) => devices::list(session, o, term).await,
        R::Health(o) => devices::health(session, o, term).await,
        R::MirrorStatus(r) => devices::mirror_status(session, &r, term).await,
        R::Failover(r) => devices::failover(session, &r, term).await,
        R::Mounts(r) => mounts::mounts(session, &r, term).await,
        R::Backup(r) => backup::backup(session, &r, term).await,
        R::Restore(r) => backup::restore(session, &r, term).await,
        R::Site(r) => site::site(session, &r, term).await,
    }
}

/// Parses `args`, runs the command, prints errors, and returns the process exit code.
pub async fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut term = Term {
        out: &mut stdout,
        err: &mut stderr,
    };
    match run(cli, &mut TerminalPrompt, &mut term).await {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            e.exit_code()
        }
    }
}
