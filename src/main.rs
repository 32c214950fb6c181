use clap::{Parser, Subcommand};
use hsm_secrets::telemetry::CommonArgs;

/// hsm-secrets: secrets from PKCS#11 HSMs for Kubernetes workloads.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crdgen,
    /// Run the CSI node plugin: mount HSM secrets into pods as tmpfs volumes.
    Node(Box<hsm_secrets::cli::node::NodeArgs>),
    /// Run the admission webhook (pod injection and validation).
    Webhook(Box<hsm_secrets::cli::webhook::WebhookArgs>),
    /// Run the HSMDevice controller: health, roles, failover with fencing.
    Controller(Box<hsm_secrets::cli::controller::ControllerArgs>),
    /// Serve one node's token as a device agent (mirroring, mutual TLS gRPC).
    Agent(Box<hsm_secrets::cli::agent::AgentArgs>),
    /// Run the whole system on this machine (SoftHSM, no cluster) and walk through
    /// inject, mount, mirror, failover and read-only enforcement.
    Demo(hsm_secrets::cli::demo::DemoArgs),
    /// Keep the demo's system running for interactive use (up, status, put, get, down).
    Local(hsm_secrets::cli::local::LocalArgs),
    /// Write a CA, the controller's and the agents' certificates for their Secrets.
    Pki(hsm_secrets::cli::pki::PkiArgs),
    /// Disaster recovery: the archive key ceremony, the offline recovery key, listing
    /// and point-in-time restore of a device's archive.
    Archive(hsm_secrets::cli::archive::ArchiveArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    hsm_secrets::telemetry::init(&cli.common);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The message and its causes, never anyhow's backtrace (RUST_BACKTRACE=1 is
            // common on developer machines).
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "{}",
                hsm_secrets::cli::error_report(&error)
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crdgen => print!("{}", hsm_secrets::crd::crd_yaml()?),
        Command::Node(args) => hsm_secrets::cli::node::run(*args, cli.common)?,
        Command::Webhook(args) => hsm_secrets::cli::webhook::run(*args, cli.common)?,
        Command::Controller(args) => hsm_secrets::cli::controller::run(*args, cli.common)?,
        Command::Agent(args) => hsm_secrets::cli::agent::run(*args, &cli.common)?,
        Command::Demo(args) => hsm_secrets::cli::demo::run(args, cli.common)?,
        Command::Local(args) => hsm_secrets::cli::local::run(args, cli.common)?,
        Command::Pki(args) => hsm_secrets::cli::pki::run(args)?,
        Command::Archive(args) => hsm_secrets::cli::archive::run(args)?,
    }
    Ok(())
}
