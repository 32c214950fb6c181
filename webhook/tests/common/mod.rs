//! Shared test support: a fake rule set, review fixtures, generated
//! certificates and HTTPS clients. Each test binary uses a subset.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hsm_secrets_webhook::json_patch::jsonptr::PointerBuf;
use hsm_secrets_webhook::json_patch::{AddOperation, Patch, PatchOperation};
use hsm_secrets_webhook::{
    AdmissionRequest, AdmissionRules, Decision, DynamicObject, TlsReloader, WebhookConfig,
    WebhookState,
};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Label on the reviewed object that tells [`FakeRules`] what to do.
pub const VERDICT_LABEL: &str = "test.hsmsecrets.io/verdict";
/// Label holding milliseconds [`FakeRules`] sleeps before deciding.
pub const SLEEP_LABEL: &str = "test.hsmsecrets.io/sleep-ms";

/// What the rules were asked.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    pub operation: &'static str,
    pub uid: String,
    pub dry_run: bool,
}

/// Rules driven by labels: `deny` denies, `panic` panics, anything else
/// allows; mutate adds the injected-status annotation and a warning.
#[derive(Default)]
pub struct FakeRules {
    pub seen: Mutex<Vec<Seen>>,
    pub not_ready: AtomicBool,
}

impl FakeRules {
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn common(
        &self,
        operation: &'static str,
        request: &AdmissionRequest<DynamicObject>,
    ) -> Option<Decision> {
        self.seen.lock().unwrap().push(Seen {
            operation,
            uid: request.uid.clone(),
            dry_run: request.dry_run,
        });
        let labels = request
            .object
            .as_ref()
            .and_then(|object| object.metadata.labels.clone())
            .unwrap_or_default();
        if let Some(ms) = labels.get(SLEEP_LABEL) {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        match labels.get(VERDICT_LABEL).map(String::as_str) {
            Some("deny") => Some(
                Decision::deny(
                    403,
                    format!(
                        "{operation}: pod {} is denied by its test label",
                        request.name
                    ),
                )
                .with_warning("denial warning"),
            ),
            Some("panic") => panic!("a bug in the rules"),
            _ => None,
        }
    }
}

pub fn injected_status_patch() -> Patch {
    Patch(vec![PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(["metadata", "annotations", "hsmsecrets.io/status"]),
        value: Value::String("injected".into()),
    })])
}

#[async_trait::async_trait]
impl AdmissionRules for FakeRules {
    async fn mutate(&self, request: &AdmissionRequest<DynamicObject>) -> Decision {
        match self.common("mutate", request).await {
            Some(decision) => decision,
            None => Decision::patch(injected_status_patch())
                .with_warning("HSMSecret shop/api-key does not exist yet"),
        }
    }

    async fn validate(&self, request: &AdmissionRequest<DynamicObject>) -> Decision {
        match self.common("validate", request).await {
            Some(decision) => decision,
            // A patch from validation must never reach the API server.
            None => Decision::patch(injected_status_patch()),
        }
    }

    fn ready(&self) -> bool {
        !self.not_ready.load(Ordering::SeqCst)
    }
}

pub fn state(rules: &Arc<FakeRules>, config: WebhookConfig) -> WebhookState {
    WebhookState::new(rules.clone(), Registry::default()).with_config(config)
}

/// The realistic pod CREATE review, with `labels` added to the pod.
pub fn pod_review(uid: &str, labels: &[(&str, &str)], dry_run: bool) -> Value {
    let mut review: Value =
        serde_json::from_str(include_str!("../fixtures/pod_create_review.json")).unwrap();
    review["request"]["uid"] = uid.into();
    review["request"]["dryRun"] = dry_run.into();
    let pod_labels = review["request"]["object"]["metadata"]["labels"]
        .as_object_mut()
        .unwrap();
    for (key, value) in labels {
        pod_labels.insert((*key).into(), (*value).into());
    }
    review
}

pub fn pod_review_bytes(uid: &str, labels: &[(&str, &str)]) -> Bytes {
    Bytes::from(serde_json::to_vec(&pod_review(uid, labels, false)).unwrap())
}

/// A review POST as the API server sends it.
pub fn review_post(path: &str, body: impl Into<Bytes>) -> http::Request<Full<Bytes>> {
    http::Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::HOST, "localhost")
        .body(Full::new(body.into()))
        .unwrap()
}

pub async fn body_json(
    response: http::Response<impl hyper::body::Body<Error: std::fmt::Debug>>,
) -> Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}", String::from_utf8_lossy(&bytes)))
}

/// A certificate authority made up for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A serving certificate and its key, PEM encoded.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate for `localhost` and 127.0.0.1, as the webhook Service would have.
    pub fn issue(&self, common_name: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// Replace `path` atomically, as cert-manager style writers do.
pub fn write_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Write `leaf` as `tls.crt`/`tls.key` into `dir`; returns the two paths.
pub fn write_pair(dir: &Path, leaf: &Leaf) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    write_atomically(&cert, &leaf.cert_pem);
    write_atomically(&key, &leaf.key_pem);
    (cert, key)
}

pub fn client(ca_pems: &[&str], alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut config = hsm_secrets_webhook::client_config(ca_pems.concat().as_bytes()).unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

pub async fn tls_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

pub fn peer_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// An HTTP/1.1 keep-alive connection over `stream`.
pub async fn http1(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// A webhook served over HTTPS on 127.0.0.1 with a random port.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), hsm_secrets_webhook::Error>>,
}

impl Server {
    pub async fn start(state: WebhookState, tls: TlsReloader) -> Self {
        Self::start_with(state, tls, hsm_secrets_webhook::ServeOptions::default()).await
    }

    pub async fn start_with(
        state: WebhookState,
        tls: TlsReloader,
        options: hsm_secrets_webhook::ServeOptions,
    ) -> Self {
        let listener = hsm_secrets_webhook::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let router = hsm_secrets_webhook::router(state.with_certificate(&tls));
        let task = tokio::spawn(hsm_secrets_webhook::serve_with(
            listener,
            router,
            tls,
            options,
            async {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// Signal shutdown and wait for `serve` to return.
    pub async fn shutdown(mut self) -> Result<(), hsm_secrets_webhook::Error> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
    }
}

/// Re-wrap rcgen's PKCS#8 EC key as the SEC1 `EC PRIVATE KEY` that openssl
/// and older tooling write: PKCS#8 carries the SEC1 structure in its
/// privateKey OCTET STRING.
pub fn pkcs8_to_sec1_pem(pkcs8_pem: &str) -> String {
    use rustls_pki_types::PrivatePkcs8KeyDer;
    use rustls_pki_types::pem::PemObject;
    let der = PrivatePkcs8KeyDer::from_pem_slice(pkcs8_pem.as_bytes()).unwrap();
    let der = der.secret_pkcs8_der();
    // Read one DER element at `pos`: (header length, content length).
    let element = |pos: usize| -> (usize, usize) {
        let first = der[pos + 1] as usize;
        if first < 0x80 {
            (2, first)
        } else {
            let n = first & 0x7f;
            let len = der[pos + 2..pos + 2 + n]
                .iter()
                .fold(0, |acc, b| (acc << 8) | *b as usize);
            (2 + n, len)
        }
    };
    let (outer_header, _) = element(0);
    let mut pos = outer_header;
    for _ in 0..2 {
        // skip version INTEGER and AlgorithmIdentifier SEQUENCE
        let (header, len) = element(pos);
        pos += header + len;
    }
    assert_eq!(der[pos], 0x04, "privateKey OCTET STRING");
    let (header, len) = element(pos);
    let sec1 = &der[pos + header..pos + header + len];
    format!(
        "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
        base64(sec1)
    )
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
