//! Subcommands of the `hsm-secrets` binary, one module each.

pub mod agent;
pub mod controller;
pub mod demo;
pub mod local;
pub mod node;
pub mod pki;
pub mod webhook;

/// Completes on SIGTERM (kubelet or the Deployment stopping the pod) or SIGINT (ctrl-c).
/// The handlers are installed when this is called, not when the future is first polled:
/// call it before serving, so a signal that arrives once the process serves never takes
/// the default (immediate) exit.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = signal(SignalKind::terminate()).and_then(|term| {
        let int = signal(SignalKind::interrupt())?;
        Ok((term, int))
    });
    async move {
        match handlers {
            Ok((mut term, mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; stopping on ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
