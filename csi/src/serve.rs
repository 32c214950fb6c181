//! Serving the CSI services on kubelet's Unix socket, and a client for the same socket.

use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Endpoint, Server, Uri};

use crate::proto::identity_server::IdentityServer;
use crate::proto::node_server::NodeServer;
use crate::{Error, IdentityService, NodeService, VolumeSource};

/// Socket path from a CSI endpoint: `unix:///csi/csi.sock`, `unix:/csi/csi.sock` or a
/// plain absolute path (the forms CSI sidecars accept).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, Error> {
    let invalid = |reason| Error::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    let path = match endpoint.strip_prefix("unix:") {
        Some(rest) => rest.strip_prefix("//").unwrap_or(rest),
        None if endpoint.contains("://") => return Err(invalid("only unix:// endpoints")),
        None => endpoint,
    };
    if !path.starts_with('/') {
        return Err(invalid("the socket path must be absolute"));
    }
    Ok(PathBuf::from(path))
}

/// Bind the endpoint's socket: create the parent directory, replace a stale socket left
/// by a previous run (but nothing that is not a socket), restrict it to the owner.
/// Must be called inside a tokio runtime.
pub fn bind_unix(endpoint: &str) -> Result<UnixListener, Error> {
    let path = socket_path(endpoint)?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io("create socket dir", parent, e))?;
    }
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(&path).map_err(|e| Error::io("remove stale socket", &path, e))?;
        }
        Ok(_) => {
            return Err(Error::io(
                "bind",
                &path,
                io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket"),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("inspect socket", &path, e)),
    }
    let listener = UnixListener::bind(&path).map_err(|e| Error::io("bind", &path, e))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("chmod socket", &path, e))?;
    Ok(listener)
}

/// Serve Identity and Node on an already bound listener until `shutdown` completes.
pub async fn serve_on<S: VolumeSource>(
    listener: UnixListener,
    identity: IdentityService<S>,
    node: NodeService<S>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// Bind `endpoint` and serve until `shutdown` completes; the socket is removed afterwards.
pub async fn serve<S: VolumeSource>(
    endpoint: &str,
    identity: IdentityService<S>,
    node: NodeService<S>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let listener = bind_unix(endpoint)?;
    let path = socket_path(endpoint)?;
    tracing::info!(socket = %path.display(), "serving CSI");
    let served = serve_on(listener, identity, node, shutdown).await;
    if let Err(e) = fs::remove_file(&path) {
        tracing::debug!(error = %e, "socket already gone");
    }
    served
}

/// A gRPC channel over the Unix socket at `path`. Connects eagerly, so it fails fast when
/// nothing listens.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Channel, Error> {
    let path = path.as_ref().to_path_buf();
    // The URI is required by the API but unused: the connector ignores it.
    let channel = Endpoint::from_static("http://csi.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        for (endpoint, path) in [
            ("unix:///csi/csi.sock", "/csi/csi.sock"),
            ("unix:/csi/csi.sock", "/csi/csi.sock"),
            ("/csi/csi.sock", "/csi/csi.sock"),
        ] {
            assert_eq!(socket_path(endpoint).expect(endpoint), Path::new(path));
        }
        for bad in ["tcp://127.0.0.1:1", "unix://relative.sock", "csi.sock", ""] {
            assert!(
                matches!(socket_path(bad), Err(Error::InvalidEndpoint { .. })),
                "{bad}"
            );
        }
    }
}
