//! `hsm-secrets webhook`: the admission webhook server.

use crate::telemetry::OpsServer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use hsm_secrets_webhook::{TlsReloader, WebhookState};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::admission::FileAdmissionState;
use crate::admission::bootstrap::{self, BootstrapConfig, BootstrapTiming};
use crate::admission::certificates::ServingIdentity;
use crate::admission::{AdmissionMetrics, ReflectorState, Rules};
use crate::telemetry::CommonArgs;

/// Flags of `hsm-secrets webhook`.
#[derive(Args, Clone, Debug)]
pub struct WebhookArgs {
    /// Address the HTTPS server listens on.
    #[arg(long, env = "HSM_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM, leaf first); re-read when it changes.
    #[arg(
        long,
        env = "HSM_WEBHOOK_TLS_CERT",
        default_value = "/etc/hsm-secrets/webhook/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// Private key of the serving certificate (PEM).
    #[arg(
        long,
        env = "HSM_WEBHOOK_TLS_KEY",
        default_value = "/etc/hsm-secrets/webhook/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// Namespace the webhook runs in (its Service, certificate Secret and Lease).
    #[arg(long, env = "HSM_NAMESPACE", default_value = "hsm-secrets-system")]
    pub namespace: String,
    /// Issue the serving certificate without cert-manager: the replica holding
    /// the Lease keeps a CA and certificate in --cert-secret and sets the
    /// caBundle of both webhook configurations.
    #[arg(long, env = "HSM_WEBHOOK_BOOTSTRAP_CERTIFICATES")]
    pub bootstrap_certificates: bool,
    /// Secret holding the serving certificate (mounted at --tls-cert/--tls-key).
    #[arg(
        long,
        env = "HSM_WEBHOOK_CERT_SECRET",
        default_value = "hsm-secrets-webhook-tls"
    )]
    pub cert_secret: String,
    /// Service the API server calls; the certificate is issued for its DNS names.
    #[arg(
        long,
        env = "HSM_WEBHOOK_SERVICE",
        default_value = "hsm-secrets-webhook"
    )]
    pub service: String,
    /// MutatingWebhookConfiguration whose caBundle the bootstrap sets.
    #[arg(
        long,
        env = "HSM_WEBHOOK_MUTATING_CONFIGURATION",
        default_value = "hsm-secrets"
    )]
    pub mutating_configuration: String,
    /// ValidatingWebhookConfiguration whose caBundle the bootstrap sets.
    #[arg(
        long,
        env = "HSM_WEBHOOK_VALIDATING_CONFIGURATION",
        default_value = "hsm-secrets"
    )]
    pub validating_configuration: String,
    /// Lease electing the replica that runs the bootstrap.
    #[arg(
        long,
        env = "HSM_WEBHOOK_LEASE",
        default_value = "hsm-secrets-webhook-bootstrap"
    )]
    pub lease: String,
    /// This replica's identity in the Lease (defaults to $HOSTNAME, the pod name).
    #[arg(long, env = "HSM_POD_NAME")]
    pub pod_name: Option<String>,
    /// No cluster: read HSMDevices and HSMSecrets from this state directory (the
    /// controller's `--state DIR`) instead of the Kubernetes API.
    #[arg(
        long,
        env = "HSM_WEBHOOK_STATE",
        conflicts_with = "bootstrap_certificates"
    )]
    pub state: Option<PathBuf>,
}

/// Run the webhook until SIGTERM or Ctrl-C.
pub fn run(args: WebhookArgs, common: CommonArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(args, common))
}

async fn serve(args: WebhookArgs, common: CommonArgs) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let signalled = super::shutdown_signal();
    tokio::spawn(async move {
        signalled.await;
        tracing::info!("shutdown requested; draining");
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let mut registry = Registry::default();
    let metrics = AdmissionMetrics::register(&mut registry);
    let mut client = None;
    let webhook = if let Some(dir) = &args.state {
        let (state, refresh) =
            FileAdmissionState::watch(dir).with_context(|| format!("--state {}", dir.display()))?;
        tokio::spawn(refresh);
        let rules = Arc::new(Rules::with_metrics(state, metrics.clone()));
        WebhookState::new(rules, registry)
    } else {
        let kube = kube::Client::try_default().await.context(
            "cannot configure a Kubernetes client (in-cluster service account or KUBECONFIG); \
             use --state DIR to run without a cluster",
        )?;
        let (state, watches) = ReflectorState::watch(kube.clone());
        tokio::spawn(watches);
        client = Some(kube);
        let rules = Arc::new(Rules::with_metrics(state, metrics.clone()));
        WebhookState::new(rules, registry)
    };

    if let Some(client) = client.filter(|_| args.bootstrap_certificates) {
        let config = bootstrap_config(&args);
        tracing::info!(
            secret = %config.secret_name,
            holder = %config.holder,
            "certificate bootstrap enabled"
        );
        tokio::spawn(bootstrap::run(client, config, metrics, stopped()));
    }

    let Some(tls) = load_certificate(&args, stopped()).await? else {
        return Ok(());
    };
    let webhook = webhook.with_certificate(&tls);
    let ops = match common.metrics_addr {
        Some(addr) => {
            // Over plain HTTP (they stay on the HTTPS port as well).
            let router = hsm_secrets_webhook::ops_router(webhook.clone());
            Some(OpsServer::start(addr, router, stopped()).await?)
        }
        None => None,
    };
    let listener = hsm_secrets_webhook::bind(args.listen).await?;
    let router = hsm_secrets_webhook::router(webhook);
    hsm_secrets_webhook::serve(listener, router, tls, stopped()).await?;
    if let Some(ops) = ops {
        ops.finish().await;
    }
    tracing::info!("webhook stopped");
    Ok(())
}

fn bootstrap_config(args: &WebhookArgs) -> BootstrapConfig {
    let holder = args
        .pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("hsm-secrets-webhook-{}", std::process::id()));
    BootstrapConfig {
        namespace: args.namespace.clone(),
        secret_name: args.cert_secret.clone(),
        identity: ServingIdentity {
            service: args.service.clone(),
            namespace: args.namespace.clone(),
        },
        mutating_configuration: args.mutating_configuration.clone(),
        validating_configuration: args.validating_configuration.clone(),
        lease_name: args.lease.clone(),
        holder,
        timing: BootstrapTiming::default(),
    }
}

/// Load the serving pair. With the bootstrap, the Secret may not exist yet
/// (it is mounted `optional`), so wait for the kubelet to project it;
/// otherwise a missing pair is a configuration error worth crashing on.
async fn load_certificate(
    args: &WebhookArgs,
    stopped: impl Future<Output = ()>,
) -> anyhow::Result<Option<TlsReloader>> {
    tokio::pin!(stopped);
    let mut reported = false;
    loop {
        match TlsReloader::load(&args.tls_cert, &args.tls_key) {
            Ok(tls) => return Ok(Some(tls)),
            Err(error) if args.bootstrap_certificates => {
                if !reported {
                    tracing::info!(
                        %error,
                        "waiting for the bootstrapped certificate Secret {} to be mounted \
                         (the kubelet syncs it within about a minute)",
                        args.cert_secret
                    );
                    reported = true;
                }
            }
            Err(error) => return Err(error).context("cannot load the serving certificate"),
        }
        tokio::select! {
            () = &mut stopped => return Ok(None),
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WebhookArgs,
    }

    #[test]
    fn defaults_match_the_manifests() {
        let cli = Cli::try_parse_from(["webhook"]).expect("defaults parse");
        assert_eq!(cli.args.listen, "0.0.0.0:8443".parse().expect("addr"));
        assert_eq!(cli.args.namespace, "hsm-secrets-system");
        assert!(!cli.args.bootstrap_certificates);
        let cli = Cli::try_parse_from([
            "webhook",
            "--bootstrap-certificates",
            "--listen",
            "127.0.0.1:9443",
            "--pod-name",
            "webhook-0",
        ])
        .expect("flags parse");
        assert!(cli.args.bootstrap_certificates);
        let config = bootstrap_config(&cli.args);
        assert_eq!(config.holder, "webhook-0");
        assert_eq!(
            config.identity.dns_names()[0],
            "hsm-secrets-webhook.hsm-secrets-system.svc"
        );
    }
}
