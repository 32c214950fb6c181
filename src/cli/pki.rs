//! `hsm-secrets pki`: certificates for the agents and the controller.
//!
//! ```text
//! DIR/controller/      -> Secret hsm-secrets-controller-tls  (identity: controller)
//! DIR/nodes/<node>/    -> installed on that node at /etc/hsm-secrets/agent-tls
//!                         (identity: the agent of <node>)
//! DIR/agent/           -> Secret hsm-secrets-agent-tls, only with --shared-agent
//!                         (identity: some agent; development overlay)
//! DIR/ca.crt           the CA certificate (its key is never written: re-run to add nodes)
//! ```
//!
//! Each node gets its own key and certificate, naming it: a mirror accepts a pushed record
//! only from the node its sender's certificate names, so one node's key cannot speak for
//! another. That is why they are files for each node's own disk and not one Secret every
//! node of the DaemonSet would mount.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use crate::mirror::{CertificateAuthority, IssuedCertificate, write_pem};

#[derive(Args, Clone, Debug)]
pub struct PkiArgs {
    /// Directory to write into (created if missing).
    #[arg(long, env = "HSM_PKI_OUT")]
    pub out: PathBuf,
    /// Node names the agent certificate is valid for (comma-separated; the names
    /// Kubernetes gives the nodes, `kubectl get nodes`).
    #[arg(long, env = "HSM_PKI_NODES", value_delimiter = ',', required = true)]
    pub nodes: Vec<String>,
    /// Replace certificates already in DIR.
    #[arg(long)]
    pub force: bool,
    /// Also write one agent certificate shared by every node (DIR/agent), for the
    /// development overlay; pushes are accepted from it only with
    /// `--allow-shared-agent-identity`.
    #[arg(long)]
    pub shared_agent: bool,
}

pub fn run(args: PkiArgs) -> anyhow::Result<()> {
    for node in &args.nodes {
        check_node_name(node)?;
    }
    let existing = args.out.join("controller/tls.key");
    if existing.exists() && !args.force {
        bail!(
            "{} exists; pass --force to replace the certificates in {} (running agents and \
             the controller then need the new Secrets)",
            existing.display(),
            args.out.display()
        );
    }
    let ca = CertificateAuthority::generate()?;
    let nodes: Vec<&str> = args.nodes.iter().map(String::as_str).collect();
    write_secret_dir(&args.out.join("controller"), &ca, &ca.issue_controller()?)?;
    for node in &nodes {
        write_secret_dir(
            &args.out.join("nodes").join(node),
            &ca,
            &ca.issue_node_agent(node)?,
        )?;
    }
    write_pem(&args.out.join("ca.crt"), ca.cert_pem().as_bytes(), false)?;
    let out = args.out.display();
    println!(
        "wrote {out}/controller and one agent certificate per node in {out}/nodes ({}).\n\
         Create the controller's Secret:\n\
         kubectl -n hsm-secrets-system create secret generic hsm-secrets-controller-tls --from-file={out}/controller\n\
         Install each node's directory on that node as /etc/hsm-secrets/agent-tls (root, mode 0700), e.g.:",
        nodes.join(", ")
    );
    for node in &nodes {
        println!(
            "  ssh root@{node} install -d -m 0700 /etc/hsm-secrets/agent-tls && scp {out}/nodes/{node}/* root@{node}:/etc/hsm-secrets/agent-tls/"
        );
    }
    if args.shared_agent {
        write_secret_dir(
            &args.out.join("agent"),
            &ca,
            &ca.issue_shared_agent(&nodes)?,
        )?;
        println!(
            "and the shared agent certificate (development overlay only):\n\
             kubectl -n hsm-secrets-system create secret generic hsm-secrets-agent-tls --from-file={out}/agent"
        );
    }
    Ok(())
}

fn write_secret_dir(
    dir: &Path,
    ca: &CertificateAuthority,
    issued: &IssuedCertificate,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    write_pem(&dir.join("ca.crt"), ca.cert_pem().as_bytes(), false)?;
    write_pem(&dir.join("tls.crt"), issued.cert_pem.as_bytes(), false)?;
    write_pem(&dir.join("tls.key"), issued.key_pem.as_bytes(), true)?;
    Ok(())
}

/// Node names become DNS names in the certificate: RFC 1123 subdomains, as Kubernetes
/// requires of node names.
fn check_node_name(node: &str) -> anyhow::Result<()> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if node.is_empty() || node.len() > 253 || !node.split('.').all(label_ok) {
        bail!(
            "--nodes: {node:?} is not a node name (lowercase letters, digits, '-' and '.', as \
             `kubectl get nodes` shows them)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_checked() {
        for ok in ["worker-1", "ip-10-0-0-7.eu-west-1.compute.internal"] {
            assert!(check_node_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Worker", "a_b", "-a", "a..b"] {
            let err = check_node_name(bad).expect_err(bad).to_string();
            assert!(err.contains("--nodes"), "{err}");
        }
    }
}
