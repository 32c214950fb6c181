//! HTTPS accept loop: TLS handshake with a deadline, HTTP/1.1 or HTTP/2 per
//! ALPN / preface, keep-alive, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::Service as _;

use crate::error::Error;
use crate::tls::TlsReloader;

/// Connection-level limits of [`serve_with`].
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// A client that has not finished the TLS handshake by then is dropped,
    /// so idle sockets cannot pile up.
    pub handshake_timeout: Duration,
    /// HTTP/1 request headers must arrive within this time.
    pub header_read_timeout: Duration,
    /// HTTP/2 PING interval that detects dead API-server connections.
    pub http2_keep_alive_interval: Duration,
    /// After shutdown is signalled, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// A connection with no request in flight for this long is closed, even when it
    /// answers PINGs: idle clients cannot hold file descriptors without end.
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams on one connection.
    pub max_streams_per_connection: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            handshake_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            http2_keep_alive_interval: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_connections: 512,
            max_streams_per_connection: 64,
        }
    }
}

/// Bind a listener, with an error that says what to check.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Serve `router` over HTTPS on `listener` until `shutdown` completes, with
/// default [`ServeOptions`]. The certificate files are polled meanwhile.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: TlsReloader,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    serve_with(listener, router, tls, ServeOptions::default(), shutdown).await
}

/// [`serve`] with explicit connection limits.
pub async fn serve_with(
    listener: TcpListener,
    router: Router,
    tls: TlsReloader,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let acceptor = TlsAcceptor::from(tls.server_config()?);
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(options.header_read_timeout);
    http.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(options.http2_keep_alive_interval)
        .max_concurrent_streams(options.max_streams_per_connection);

    let (closing_tx, closing_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let poll_certificate = tls.watch();
    tokio::pin!(poll_certificate, shutdown);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "webhook serving HTTPS");
    }

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = &mut poll_certificate => {}
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            // At the cap, new clients wait in the backlog until a connection ends.
            accepted = listener.accept(), if connections.len() < options.max_connections.max(1) => match accepted {
                Ok((tcp, peer)) => {
                    // Admission answers are small; don't let Nagle delay them.
                    let _ = tcp.set_nodelay(true);
                    connections.spawn(serve_connection(
                        tcp,
                        peer,
                        acceptor.clone(),
                        http.clone(),
                        router.clone(),
                        options.clone(),
                        closing_rx.clone(),
                    ));
                }
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    drop(listener);
    let _ = closing_tx.send(true);
    let open = connections.len();
    tracing::info!(open, "webhook shutting down; draining connections");
    let drained = tokio::time::timeout(options.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = connections.len(),
            "connections still open after the grace period; closing them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    http: auto::Builder<TokioExecutor>,
    router: Router,
    options: ServeOptions,
    mut closing: watch::Receiver<bool>,
) {
    let (handshake_timeout, idle_timeout) = (options.handshake_timeout, options.idle_timeout);
    let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let activity = Arc::new(Activity::default());
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
        let mut router = router.clone();
        let busy = seen.begin();
        async move {
            let answer = router.call(request).await;
            drop(busy);
            answer
        }
    });
    let connection = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        }
        () = activity.idle_for(idle_timeout) => {
            tracing::debug!(%peer, "closing an idle connection");
            connection.as_mut().graceful_shutdown();
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "idle connection ended with an error");
            }
        }
        _ = async { closing.wait_for(|closing| *closing).await.map(|_| ()) } => {
            // Finish in-flight requests, refuse new ones on this connection.
            connection.as_mut().graceful_shutdown();
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error while draining");
            }
        }
    }
}

/// Requests in flight on one connection, and when the last one ended.
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    last_end: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            last_end: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }
}

/// One request in flight; its end is recorded when dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last_end.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Resolves once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let since = *self.last_end.lock().unwrap_or_else(|p| p.into_inner());
            let idle_at = since + timeout;
            if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
                && tokio::time::Instant::now() >= idle_at
            {
                return;
            }
            let next = idle_at.max(tokio::time::Instant::now() + Duration::from_millis(10));
            tokio::time::sleep_until(next.min(tokio::time::Instant::now() + timeout)).await;
        }
    }
}
