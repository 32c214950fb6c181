//! The webhook over real HTTPS with generated certificates.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakeRules, SLEEP_LABEL, Server, TestCa, body_json, pod_review_bytes, review_post};
use hsm_secrets_webhook::{ServeOptions, TlsReloader, WebhookConfig};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Fixture {
    _dir: tempfile::TempDir,
    ca: TestCa,
    tls: TlsReloader,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("webhook test CA");
    let (cert, key) = common::write_pair(dir.path(), &ca.issue("hsm-secrets-webhook"));
    let tls = TlsReloader::load(cert, key).unwrap();
    Fixture { _dir: dir, ca, tls }
}

fn rules_state() -> hsm_secrets_webhook::WebhookState {
    common::state(&Arc::new(FakeRules::default()), WebhookConfig::default())
}

#[tokio::test]
async fn reviews_over_one_keep_alive_https_connection() {
    let f = fixture();
    let server = Server::start(rules_state(), f.tls.clone()).await;

    let stream = common::tls_connect(server.addr, common::client(&[&f.ca.pem], &[])).await;
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let mut sender = common::http1(stream).await;
    for uid in ["first", "second", "third"] {
        sender
            .ready()
            .await
            .expect("connection kept alive between reviews");
        let response = sender
            .send_request(review_post("/mutate", pod_review_bytes(uid, &[])))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let answer = body_json(response).await["response"].clone();
        assert_eq!(answer["uid"], uid);
        assert_eq!(answer["allowed"], true);
        assert_eq!(answer["patchType"], "JSONPatch");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn http2_is_negotiated_by_alpn() {
    let f = fixture();
    let server = Server::start(rules_state(), f.tls.clone()).await;

    let stream = common::tls_connect(server.addr, common::client(&[&f.ca.pem], &[b"h2"])).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    // Two reviews multiplexed on one connection.
    let requests = ["h2-a", "h2-b"].map(|uid| {
        let mut sender = sender.clone();
        async move {
            let response = sender
                .send_request(review_post(
                    "https://localhost/validate",
                    pod_review_bytes(uid, &[]),
                ))
                .await
                .unwrap();
            body_json(response).await["response"]["uid"].clone()
        }
    });
    let uids = futures::future::join_all(requests).await;
    assert_eq!(uids, ["h2-a", "h2-b"]);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn tls_1_2_clients_are_served() {
    let f = fixture();
    let server = Server::start(rules_state(), f.tls.clone()).await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(f.ca.pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let stream = common::tls_connect(server.addr, Arc::new(config)).await;
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let mut sender = common::http1(stream).await;
    let response = sender
        .send_request(review_post("/mutate", pod_review_bytes("tls12", &[])))
        .await
        .unwrap();
    assert_eq!(body_json(response).await["response"]["uid"], "tls12");
    server.shutdown().await.unwrap();
}

use rustls_pki_types::pem::PemObject as _;

/// A ClientHello a TLS 1.2 server would accept, except that it claims
/// `version`: the only thing a refusal can be about is the protocol version.
fn client_hello(version: [u8; 2]) -> Vec<u8> {
    let mut extensions = Vec::new();
    for (kind, data) in [
        (0x000a_u16, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17][..]), // groups: x25519, P-256
        (0x000b, &[0x01, 0x00][..]),                             // uncompressed points
        (
            0x000d,
            &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01][..],
        ), // ECDSA/PSS/PKCS1 SHA-256
    ] {
        extensions.extend_from_slice(&kind.to_be_bytes());
        extensions.extend_from_slice(&(data.len() as u16).to_be_bytes());
        extensions.extend_from_slice(data);
    }
    let mut body = Vec::new();
    body.extend_from_slice(&version);
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]); // ECDHE-{ECDSA,RSA}-AES128-GCM-SHA256
    body.extend_from_slice(&[0x01, 0x00]); // null compression only
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// The first record the server answers `hello` with.
async fn first_reply(addr: std::net::SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(hello).await.unwrap();
    let mut reply = vec![0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut reply))
        .await
        .expect("server answers the hello")
        .unwrap();
    reply
}

#[tokio::test]
async fn tls_1_0_and_1_1_handshakes_are_refused() {
    let f = fixture();
    let server = Server::start(rules_state(), f.tls.clone()).await;
    // Control: the same hello claiming TLS 1.2 gets a ServerHello (handshake record).
    let reply = first_reply(server.addr, &client_hello([0x03, 0x03])).await;
    assert_eq!(reply[0], 0x16, "TLS 1.2 hello must be served: {reply:02x?}");
    assert_eq!(reply[5], 0x02, "expected ServerHello: {reply:02x?}");

    for version in [[0x03, 0x01], [0x03, 0x02]] {
        let reply = first_reply(server.addr, &client_hello(version)).await;
        // An alert record (0x15) saying protocol_version (70), never a ServerHello.
        assert_eq!(reply[0], 0x15, "version {version:02x?}: {reply:02x?}");
        assert_eq!(reply[6], 70, "version {version:02x?}: {reply:02x?}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    let f = fixture();
    let options = ServeOptions {
        handshake_timeout: Duration::from_millis(200),
        ..ServeOptions::default()
    };
    let server = Server::start_with(rules_state(), f.tls.clone(), options).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf))
        .await
        .expect("server hangs up on a client that never says hello");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_the_review_in_flight_finish() {
    let f = fixture();
    let server = Server::start(rules_state(), f.tls.clone()).await;
    let stream = common::tls_connect(server.addr, common::client(&[&f.ca.pem], &[])).await;
    let mut sender = common::http1(stream).await;
    let in_flight = tokio::spawn(async move {
        let response = sender
            .send_request(review_post(
                "/mutate",
                pod_review_bytes("slow", &[(SLEEP_LABEL, "300")]),
            ))
            .await
            .unwrap();
        body_json(response).await["response"]["allowed"].clone()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown().await.unwrap();
    assert_eq!(in_flight.await.unwrap(), true);
}

#[tokio::test]
async fn health_endpoints_over_https_report_the_certificate() {
    let f = fixture();
    let server = Server::start(rules_state(), f.tls.clone()).await;
    let stream = common::tls_connect(server.addr, common::client(&[&f.ca.pem], &[])).await;
    let mut sender = common::http1(stream).await;
    let request = http::Request::get("/readyz")
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("certificate: loaded"));
    server.shutdown().await.unwrap();
}

/// An HTTP/2 client that keeps its connection alive with PINGs but sends no request is
/// closed after the idle timeout (GOAWAY), so idle clients cannot hold descriptors.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_even_when_it_answers_pings() {
    let f = fixture();
    let options = ServeOptions {
        idle_timeout: Duration::from_millis(300),
        http2_keep_alive_interval: Duration::from_millis(50),
        ..ServeOptions::default()
    };
    let server = Server::start_with(rules_state(), f.tls.clone(), options).await;
    let stream = common::tls_connect(server.addr, common::client(&[&f.ca.pem], &[b"h2"])).await;
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(50))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let closed = tokio::spawn(connection);
    let response = sender
        .send_request(review_post(
            "https://localhost/validate",
            pod_review_bytes("once", &[]),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the server closed the idle connection");
    assert!(ended.is_ok(), "{ended:?}");
    server.shutdown().await.unwrap();
}

/// Beyond the connection cap, a new client waits (its handshake does not complete) until
/// a connection ends.
#[tokio::test]
async fn connections_beyond_the_cap_wait_for_one_to_end() {
    let f = fixture();
    let options = ServeOptions {
        max_connections: 2,
        ..ServeOptions::default()
    };
    let server = Server::start_with(rules_state(), f.tls.clone(), options).await;
    let first = common::tls_connect(server.addr, common::client(&[&f.ca.pem], &[])).await;
    let _second = common::tls_connect(server.addr, common::client(&[&f.ca.pem], &[])).await;
    let third = tokio::spawn(common::tls_connect(
        server.addr,
        common::client(&[&f.ca.pem], &[]),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served at a cap of 2"
    );
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once a connection ended")
        .unwrap();
    server.shutdown().await.unwrap();
}
