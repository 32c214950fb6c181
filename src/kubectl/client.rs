//! Connecting like kubectl: kubeconfig (or in-cluster), `--context`, default namespace.

use std::time::Duration;

use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig};

use super::args::GlobalArgs;
use super::{KubectlError, POLL_INTERVAL};

/// A client and the namespace commands act in.
pub struct Session {
    pub client: Client,
    /// `-n`, else the kubeconfig context's namespace, else `default`.
    pub namespace: String,
    /// Interval between status polls while waiting (500 ms; tests shorten it).
    pub poll_interval: Duration,
}

impl Session {
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            poll_interval: POLL_INTERVAL,
        }
    }
}

/// Builds a client from `--kubeconfig` / `--context` (falling back to `$KUBECONFIG`,
/// `~/.kube/config`, then the in-cluster service account, as kubectl does).
pub async fn connect(global: &GlobalArgs) -> Result<Session, KubectlError> {
    let options = KubeConfigOptions {
        context: global.context.clone(),
        cluster: None,
        user: None,
    };
    let unreachable = |detail: String| KubectlError::Unreachable { detail };
    let config = match &global.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
                unreachable(format!("cannot read kubeconfig {}: {e}", path.display()))
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| unreachable(format!("kubeconfig {}: {e}", path.display())))?
        }
        None if global.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| unreachable(format!("kubeconfig: {e}")))?,
        None => Config::infer()
            .await
            .map_err(|e| unreachable(format!("no usable kubeconfig or in-cluster config: {e}")))?,
    };
    let namespace = global
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = client_for(config)?;
    Ok(Session::new(client, namespace))
}

/// A client that answers as kubectl does: a dead endpoint fails fast instead of after
/// kube's 30 s default, and no request is retried on its own. kube retries 429, 503 and
/// 504 with backoff by default, which turned one admission denial into minutes of
/// repeated writes; the user (or the poll loop) decides what to try again.
pub fn client_for(mut config: Config) -> Result<Client, KubectlError> {
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(60));
    config.default_retry = false;
    Client::try_from(config).map_err(|e| KubectlError::Unreachable {
        detail: format!("building the client: {e}"),
    })
}
