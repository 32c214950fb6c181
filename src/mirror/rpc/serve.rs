//! Serving an agent on TCP with mutual TLS.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use super::service::AgentService;
use crate::mirror::MirrorError;
use crate::mirror::agent::Agent;

/// Binds the agent's listen address (port 0 picks a free one; see `local_addr`).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MirrorError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| MirrorError::Serve {
            addr: addr.to_string(),
            detail: format!("{e}; is another process listening there?"),
        })
}

/// Serves `agent` on `listener` until `shutdown` completes. Every connection must
/// present a client certificate from the agent CA.
pub async fn serve(
    agent: Agent,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), MirrorError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let tls = agent.config().tls.server_config();
    let serve_err = |detail: String| MirrorError::Serve {
        addr: addr.clone(),
        detail,
    };
    tracing::info!(node = %agent.node(), addr = %addr, "serving the agent (mutual TLS)");
    Server::builder()
        .tls_config(tls.timeout(Duration::from_secs(10)))
        .map_err(|e| serve_err(format!("TLS configuration: {e}")))?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(AgentService::new(agent).into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| serve_err(e.to_string()))
}
