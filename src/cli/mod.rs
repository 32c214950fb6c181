//! Subcommands of the `hsm-secrets` binary, one module each.

pub mod agent;
pub mod archive;
pub mod controller;
pub mod demo;
pub mod local;
pub mod node;
pub mod pki;
pub mod webhook;

/// How `hsm-secrets` prints the error that ends it: `error: <message>`, then each cause
/// that adds something, one per line; never a backtrace, whatever `RUST_BACKTRACE` says
/// (that is for panics). A cause whose text the lines above already hold (a library
/// repeating its source inside its own message) is left out.
pub fn error_report(error: &anyhow::Error) -> String {
    let mut shown = error.to_string();
    let mut report = format!("error: {shown}");
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if text.trim().is_empty() || shown.contains(&text) {
            continue;
        }
        report.push_str("\n  caused by: ");
        report.push_str(&text);
        shown.push('\n');
        shown.push_str(&text);
    }
    report
}

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

#[cfg(test)]
mod tests {
    use super::error_report;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Link {
        text: &'static str,
        #[source]
        source: Option<Box<Link>>,
    }

    fn chain(texts: &[&'static str]) -> anyhow::Error {
        let mut link: Option<Box<Link>> = None;
        for text in texts.iter().rev() {
            link = Some(Box::new(Link { text, source: link }));
        }
        anyhow::Error::new(*link.expect("at least one link"))
    }

    #[test]
    fn causes_already_quoted_above_are_left_out() {
        // What kube's config inference looks like: each link repeats the next.
        let error = chain(&[
            "Failed to infer configuration: failed to infer config: kubeconfig: (failed to read kubeconfig: No such file or directory (os error 2))",
            "failed to infer config: kubeconfig: (failed to read kubeconfig: No such file or directory (os error 2))",
            "failed to read kubeconfig: No such file or directory (os error 2)",
            "No such file or directory (os error 2)",
        ])
        .context("connect to the Kubernetes API; use --catalog <file.yaml> to run without a cluster");
        assert_eq!(
            error_report(&error),
            "error: connect to the Kubernetes API; use --catalog <file.yaml> to run without a cluster\n  \
             caused by: Failed to infer configuration: failed to infer config: kubeconfig: (failed to read kubeconfig: No such file or directory (os error 2))"
        );
    }

    #[test]
    fn causes_that_add_something_are_each_shown_once() {
        let error = chain(&[
            "bind 127.0.0.1:9443",
            "Address already in use (os error 98)",
        ])
        .context("serve the agent");
        assert_eq!(
            error_report(&error),
            "error: serve the agent\n  caused by: bind 127.0.0.1:9443\n  caused by: Address already in use (os error 98)"
        );
        assert_eq!(
            error_report(&anyhow::anyhow!("--node-name is empty")),
            "error: --node-name is empty"
        );
    }
}
