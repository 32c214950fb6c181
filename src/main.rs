use clap::{Parser, Subcommand};

/// hsm-secrets: secrets from PKCS#11 HSMs for Kubernetes workloads.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crdgen,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crdgen => print!("{}", hsm_secrets::crd::crd_yaml()?),
    }
    Ok(())
}
