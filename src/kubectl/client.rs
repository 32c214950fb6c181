//! Connecting like kubectl: kubeconfig (or in-cluster), `--context`, default namespace.

use std::time::Duration;

use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig, KubeconfigError};

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
/// `~/.kube/config`, then the in-cluster service account, as kubectl does). A kubeconfig
/// that names no usable cluster is a [`KubectlError::Kubeconfig`]: nothing was sent yet,
/// so the cluster is not the one to blame.
pub async fn connect(global: &GlobalArgs) -> Result<Session, KubectlError> {
    let options = KubeConfigOptions {
        context: global.context.clone(),
        cluster: None,
        user: None,
    };
    let config = match &global.kubeconfig {
        Some(path) => {
            let file = path.display().to_string();
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| kubeconfig_error(&file, global.context.as_deref(), &e))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| kubeconfig_error(&file, global.context.as_deref(), &e))?
        }
        None if global.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| kubeconfig_error(&default_file(), global.context.as_deref(), &e))?,
        None => Config::infer().await.map_err(|e| {
            match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<KubeconfigError>()) {
                Some(KubeconfigError::ReadConfig(io, path))
                    if io.kind() == std::io::ErrorKind::NotFound =>
                {
                    KubectlError::Kubeconfig {
                        file: path.display().to_string(),
                        problem: "no such file, and this is not a pod in a cluster either \
                                  (no in-cluster service account)"
                            .into(),
                        fix:
                            "pass --kubeconfig FILE or set $KUBECONFIG to your cluster's kubeconfig"
                                .into(),
                    }
                }
                Some(kubeconfig) => kubeconfig_error(&default_file(), None, kubeconfig),
                None => KubectlError::Kubeconfig {
                    file: default_file(),
                    problem: format!("no usable kubeconfig or in-cluster config: {e}"),
                    fix: "pass --kubeconfig FILE or set $KUBECONFIG to your cluster's kubeconfig"
                        .into(),
                },
            }
        })?,
    };
    let namespace = global
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = client_for(config)?;
    Ok(Session::new(client, namespace))
}

/// The kubeconfig kube reads without `--kubeconfig`, as the user would name it.
fn default_file() -> String {
    match std::env::var("KUBECONFIG") {
        Ok(paths) if !paths.is_empty() => paths,
        _ => "~/.kube/config".into(),
    }
}

/// What is wrong with the kubeconfig `file`, and what to do about it.
fn kubeconfig_error(file: &str, context: Option<&str>, e: &KubeconfigError) -> KubectlError {
    const LIST: &str = "list the contexts with `kubectl config get-contexts`";
    let (file, problem, fix) = match e {
        KubeconfigError::LoadContext(name) => (
            file.to_string(),
            format!("no context named {name:?}"),
            format!("{LIST} and pass one of them to --context"),
        ),
        KubeconfigError::CurrentContextNotSet => (
            file.to_string(),
            "no current context is set".to_string(),
            format!(
                "{LIST} and pass one to --context, or set one with `kubectl config use-context NAME`"
            ),
        ),
        KubeconfigError::LoadClusterOfContext(cluster) => (
            file.to_string(),
            match context {
                Some(context) => {
                    format!("context {context:?} names cluster {cluster:?}, which is not defined")
                }
                None => {
                    format!("the current context names cluster {cluster:?}, which is not defined")
                }
            },
            format!("add the cluster or {LIST} and choose another with --context"),
        ),
        KubeconfigError::ReadConfig(io, path) => (
            path.display().to_string(),
            format!("cannot be read: {io}"),
            "check --kubeconfig or $KUBECONFIG".to_string(),
        ),
        other => (
            file.to_string(),
            other.to_string(),
            "fix the file, or choose another with --kubeconfig".to_string(),
        ),
    };
    KubectlError::Kubeconfig { file, problem, fix }
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
