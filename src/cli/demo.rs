//! `hsm-secrets demo`: the whole system on this machine, walked through step by step
//! (see [`crate::local::steps`]).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::local::{ClusterConfig, Report, steps};
use crate::telemetry::CommonArgs;

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// Keep the work directory (logs, state, tokens, certificates) and print where it
    /// is; the processes still stop with the demo (`hsm-secrets local up` keeps a
    /// system running).
    #[arg(long, env = "HSM_DEMO_KEEP")]
    pub keep: bool,
    /// The SoftHSM2 PKCS#11 module (default: the usual Debian/Ubuntu paths).
    #[arg(long, env = "HSM_SOFTHSM_MODULE")]
    pub softhsm_module: Option<PathBuf>,
    /// Directory in which the demo creates its temporary directory (default: the
    /// system's temporary directory).
    #[arg(long, env = "HSM_DEMO_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
}

pub fn run(args: DemoArgs, _common: CommonArgs) -> anyhow::Result<()> {
    let config = ClusterConfig {
        work_root: args.work_dir,
        softhsm_module: args.softhsm_module,
        tied_to_parent: true,
        keep: args.keep,
        ..ClusterConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let mut report = Report::stdout(steps::STEPS.len());
    runtime
        .block_on(steps::run_demo(&config, &mut report, shutdown_signal()))
        .map_err(anyhow::Error::new)
}

/// ctrl-c or SIGTERM: the demo stops and cleans up.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
