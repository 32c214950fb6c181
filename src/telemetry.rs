//! Logging setup shared by every subcommand.

use clap::{Args, ValueEnum};
use std::net::SocketAddr;

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Flags every long-running subcommand takes.
#[derive(Args, Clone, Debug)]
pub struct CommonArgs {
    /// Log filter, e.g. `info` or `hsm_secrets=debug,info`.
    #[arg(long, env = "HSM_LOG", default_value = "info", global = true)]
    pub log: String,
    /// Log line format.
    #[arg(long, env = "HSM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,
    /// Address for /metrics, /healthz and /readyz (empty to disable).
    #[arg(long, env = "HSM_METRICS_ADDR", global = true)]
    pub metrics_addr: Option<SocketAddr>,
}

/// Installs the global tracing subscriber. Safe to call more than once (later calls are
/// ignored), so tests and the demo can share a process.
pub fn init(args: &CommonArgs) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: a file, a pipe or a log collector would
    // keep the escape codes as text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match args.log_format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Content type of `/metrics`: OpenMetrics text, as [`encode_metrics`] renders it.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders `registry` in the OpenMetrics text format.
pub fn encode_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail; an error would be a bug in a metric.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(%error, "cannot encode metrics");
    }
    text
}

/// The answer of every component's `/metrics`.
pub fn metrics_response(
    registry: &prometheus_client::registry::Registry,
) -> impl axum::response::IntoResponse + use<> {
    (
        [(http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        encode_metrics(registry),
    )
}

/// The operator endpoints' HTTP server on `--metrics-addr` (`/metrics`, `/healthz`,
/// `/readyz`: each component brings its own router), the same for every component.
pub struct OpsServer {
    local: SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl OpsServer {
    /// Binds `addr` now, so a bad address fails at start-up, and serves `router` until
    /// `shutdown` completes.
    pub async fn start(
        addr: SocketAddr,
        router: axum::Router,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind the metrics address {addr} (--metrics-addr)"))?;
        let local = listener
            .local_addr()
            .context("read the bound metrics address")?;
        tracing::info!(%local, "serving /metrics, /healthz and /readyz");
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown)
                .await
        });
        Ok(Self { local, task })
    }

    /// The bound address (the port the kernel picked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Waits for the graceful stop that `shutdown` began, at most 5 s.
    pub async fn finish(self) {
        match tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "the metrics server failed"),
            Ok(Err(error)) => tracing::warn!(%error, "the metrics server task failed"),
            Err(_) => tracing::warn!("the metrics server did not stop within 5 s"),
        }
    }
}
