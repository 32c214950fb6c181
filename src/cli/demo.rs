//! `hsm-secrets demo`: the whole system on this machine, walked through step by step
//! (see [`crate::local::steps`]).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::local::{ClusterConfig, Report, site_steps, steps};
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
    /// The two-site walk-through instead: an active and a passive site, each a complete
    /// system, one bucket, a manual promotion and a rejoin.
    #[arg(long)]
    pub sites: bool,
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
    let total = if args.sites {
        site_steps::SITE_STEPS.len()
    } else {
        steps::STEPS.len()
    };
    let mut report = Report::stdout(total);
    // Handlers go in before anything starts: a ctrl-c during startup must still clean up.
    let interrupted = {
        let _guard = runtime.enter();
        shutdown_signal().context("install the ctrl-c and SIGTERM handlers")?
    };
    let outcome = if args.sites {
        runtime.block_on(site_steps::run_sites_demo(
            &config,
            &mut report,
            interrupted,
        ))
    } else {
        runtime.block_on(steps::run_demo(&config, &mut report, interrupted))
    };
    outcome.map_err(anyhow::Error::new)
}

/// Completes on ctrl-c or SIGTERM: the demo then stops and cleans up.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
