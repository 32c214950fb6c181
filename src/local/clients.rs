//! The local system as its users reach it: the agents over mutual TLS (as the
//! controller), the webhook over HTTPS (as the API server), the CSI plugins over their
//! Unix sockets (as kubelet).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hsm_secrets_csi::proto::node_client::NodeClient;
use hsm_secrets_csi::proto::volume_capability::access_mode::Mode;
use hsm_secrets_csi::proto::volume_capability::{AccessMode, AccessType, MountVolume};
use hsm_secrets_csi::proto::{
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
};
use hsm_secrets_csi::source::pod_info;
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};
use tonic::transport::Channel;

use super::LocalError;
use crate::mirror::rpc::tls::TlsFiles;
use crate::mirror::{AgentConnection, AgentTls, Peer};

/// Deadline of one agent call.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of `node`'s agent at `endpoint`, authenticated as the controller.
pub fn agent(node: &str, endpoint: &str, tls: &TlsFiles) -> Result<AgentConnection, LocalError> {
    let tls = AgentTls::from_files(tls)?;
    Ok(AgentConnection::new(
        &Peer {
            node: node.into(),
            endpoint: endpoint.into(),
        },
        &tls,
        AGENT_TIMEOUT,
    )?)
}

/// The webhook as the API server calls it: HTTPS to a loopback address, trusting only the
/// webhook's CA and checking the Service's DNS name.
pub struct AdmissionClient {
    url: String,
    server_name: String,
    config: Arc<rustls::ClientConfig>,
}

impl AdmissionClient {
    pub fn new(url: &str, ca_pem: &str, server_name: &str) -> Result<Self, LocalError> {
        let config = hsm_secrets_webhook::client_config(ca_pem.as_bytes())
            .map_err(|e| LocalError::Webhook(format!("client TLS configuration: {e}")))?;
        Ok(Self {
            url: url.into(),
            server_name: server_name.into(),
            config: Arc::new(config),
        })
    }

    fn addr(&self) -> &str {
        self.url.strip_prefix("https://").unwrap_or(&self.url)
    }

    /// One HTTPS request on a fresh connection: status and body.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Bytes), LocalError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            LocalError::Webhook(format!("{what} {}{path}: {e}", self.url))
        };
        let tcp = tokio::net::TcpStream::connect(self.addr())
            .await
            .map_err(|e| fail("cannot connect to", &e))?;
        let name = rustls_pki_types::ServerName::try_from(self.server_name.clone())
            .map_err(|e| fail("bad server name for", &e))?;
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| fail("TLS handshake with", &e))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| fail("HTTP handshake with", &e))?;
        let driver = tokio::spawn(connection);
        let bytes = match body {
            Some(v) => serde_json::to_vec(v).map_err(|e| fail("cannot encode a request to", &e))?,
            None => Vec::new(),
        };
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.server_name)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| fail("cannot build a request to", &e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fail("request failed:", &e))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| fail("cannot read the answer of", &e))?
            .to_bytes();
        driver.abort();
        Ok((status, body))
    }

    /// Sends an AdmissionReview to `/mutate` or `/validate`; returns its `response`.
    pub async fn review(&self, path: &str, review: &Value) -> Result<Value, LocalError> {
        let (status, body) = self.request(http::Method::POST, path, Some(review)).await?;
        if status != 200 {
            return Err(LocalError::Webhook(format!(
                "{path} answered HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let answer: Value = serde_json::from_slice(&body)
            .map_err(|e| LocalError::Webhook(format!("{path} answered invalid JSON: {e}")))?;
        Ok(answer["response"].clone())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), LocalError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = match self.request(http::Method::GET, "/readyz", None).await {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("HTTP {status}: {}", String::from_utf8_lossy(&body)),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(LocalError::Timeout {
                    what: "the webhook to be ready".into(),
                    seconds: timeout.as_secs(),
                    hint: format!(" (last answer: {last})"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// An AdmissionReview v1 for `object` of `kind` (`""`/`Pod`, `hsmsecrets.io`/`HSMSecret`).
pub fn admission_review(
    uid: &str,
    group: &str,
    kind: &str,
    resource: &str,
    namespace: &str,
    object: &Value,
) -> Value {
    let version = if group.is_empty() { "v1" } else { "v1alpha1" };
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": resource},
            "namespace": namespace,
            "name": object.pointer("/metadata/name").cloned().unwrap_or(json!("")),
            "operation": "CREATE",
            "userInfo": {"username": "local-demo"},
            "object": object,
            "dryRun": false
        }
    })
}

/// The CSI plugin of a node, as kubelet reaches it.
pub async fn csi(socket: &Path) -> Result<NodeClient<Channel>, LocalError> {
    let channel = hsm_secrets_csi::connect_unix(socket)
        .await
        .map_err(|e| LocalError::Csi(format!("cannot connect to {}: {e}", socket.display())))?;
    Ok(NodeClient::new(channel))
}

/// Waits until the node plugin at `socket` answers its Identity probe as ready.
pub async fn wait_csi_ready(socket: &Path, timeout: Duration) -> Result<(), LocalError> {
    use hsm_secrets_csi::proto::ProbeRequest;
    use hsm_secrets_csi::proto::identity_client::IdentityClient;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match hsm_secrets_csi::connect_unix(socket).await {
            Ok(channel) => match IdentityClient::new(channel).probe(ProbeRequest {}).await {
                Ok(r) if r.get_ref().ready == Some(true) => return Ok(()),
                Ok(_) => "not ready".to_string(),
                Err(status) => status.message().to_string(),
            },
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(LocalError::Timeout {
                what: format!("the CSI plugin at {}", socket.display()),
                seconds: timeout.as_secs(),
                hint: format!(" (last: {last})"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pod's identity as kubelet passes it to the plugin (`podInfoOnMount`).
pub struct PodIdentity<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub service_account: &'a str,
    pub fs_group: u32,
}

/// kubelet's target path for an inline volume of pod `uid`; like kubelet, only the
/// parent is created.
pub fn target_path(
    kubelet_dir: &Path,
    uid: &str,
    volume: &str,
) -> Result<std::path::PathBuf, LocalError> {
    let parent = kubelet_dir
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~csi")
        .join(volume);
    std::fs::create_dir_all(&parent).map_err(|e| LocalError::io("create", &parent, e))?;
    Ok(parent.join("mount"))
}

/// What kubelet sends to publish an inline CSI volume with `attributes` (the pod spec's
/// `volumeAttributes`) for `pod` at `target`.
pub fn publish_request(
    volume_id: &str,
    target: &Path,
    attributes: &BTreeMap<String, String>,
    pod: &PodIdentity<'_>,
) -> NodePublishVolumeRequest {
    let mut context: BTreeMap<String, String> = attributes.clone();
    for (k, v) in [
        (pod_info::POD_NAMESPACE, pod.namespace),
        (pod_info::POD_NAME, pod.name),
        (pod_info::POD_UID, pod.uid),
        (pod_info::SERVICE_ACCOUNT, pod.service_account),
        (pod_info::EPHEMERAL, "true"),
    ] {
        context.insert(k.into(), v.into());
    }
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: String::new(),
                mount_flags: vec![],
                volume_mount_group: pod.fs_group.to_string(),
            })),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        volume_context: context.into_iter().collect(),
        ..Default::default()
    }
}

pub fn unpublish_request(volume_id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_string_lossy().into_owned(),
    }
}
