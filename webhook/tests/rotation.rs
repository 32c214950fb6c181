//! Certificate hot reload: new pairs are picked up by polling, bad ones are
//! refused and the old pair keeps serving, without a restart.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{FakeRules, Leaf, Server, TestCa, body_json, pod_review_bytes, review_post};
use hsm_secrets_webhook::tls::Reload;
use hsm_secrets_webhook::{TlsReloader, WebhookConfig};
use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;

const POLL: Duration = Duration::from_millis(100);

/// One review on a fresh connection; the certificate the server presented.
async fn review_on_new_connection(
    addr: SocketAddr,
    client: Arc<ClientConfig>,
) -> Result<CertificateDer<'static>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(client)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let leaf = common::peer_leaf(&stream);
    let mut sender = common::http1(stream).await;
    let response = sender
        .send_request(review_post("/mutate", pod_review_bytes("rotation", &[])))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let answer = body_json(response).await["response"].clone();
    if answer["allowed"] != true {
        return Err(format!("unexpected answer {answer}"));
    }
    Ok(leaf)
}

/// Clients keep opening connections while `swap` replaces the pair; asserts
/// every request succeeds and `new` is presented within a second. The client
/// config (and its session cache) is shared, so this also proves the server
/// offers no resumption that would skip presenting the new certificate.
async fn assert_rotation_under_load(
    addr: SocketAddr,
    client: Arc<ClientConfig>,
    old: &Leaf,
    new: &Leaf,
    swap: impl FnOnce(),
) {
    assert_eq!(
        review_on_new_connection(addr, client.clone())
            .await
            .unwrap(),
        old.der
    );
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    seen.push((
                        Instant::now(),
                        review_on_new_connection(addr, client.clone()).await,
                    ));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let swapped = Instant::now();
    swap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    stop.store(true, Ordering::SeqCst);

    for client in clients {
        let seen = client.await.unwrap();
        let failures: Vec<_> = seen.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
        assert!(
            failures.is_empty(),
            "requests failed during rotation: {failures:?}"
        );
        let first_new = seen
            .iter()
            .position(|(_, leaf)| leaf.as_ref().unwrap() == &new.der)
            .expect("the new certificate was never presented");
        let (at, _) = seen[first_new];
        assert!(
            at.saturating_duration_since(swapped) < Duration::from_secs(1),
            "new certificate took {:?}",
            at - swapped
        );
        for (_, leaf) in &seen[..first_new] {
            assert_eq!(leaf.as_ref().unwrap(), &old.der);
        }
        for (_, leaf) in &seen[first_new..] {
            assert_eq!(
                leaf.as_ref().unwrap(),
                &new.der,
                "old certificate came back"
            );
        }
        assert!(
            seen.len() - first_new >= 5,
            "too few requests after the swap"
        );
    }
}

fn state() -> hsm_secrets_webhook::WebhookState {
    common::state(&Arc::new(FakeRules::default()), WebhookConfig::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_replaced_by_rename_are_served_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, ca_b) = (TestCa::new("CA A"), TestCa::new("CA B"));
    let (leaf_a, leaf_b) = (ca_a.issue("webhook A"), ca_b.issue("webhook B"));
    let (cert, key) = common::write_pair(dir.path(), &leaf_a);
    let tls = TlsReloader::load(&cert, &key)
        .unwrap()
        .with_poll_interval(POLL);
    let server = Server::start(state(), tls).await;

    let client = common::client(&[&ca_a.pem, &ca_b.pem], &[]);
    assert_rotation_under_load(server.addr, client, &leaf_a, &leaf_b, || {
        // Two renames: a poll may see the new certificate with the old key,
        // which must be refused without disturbing service.
        common::write_pair(dir.path(), &leaf_b);
    })
    .await;
    server.shutdown().await.unwrap();
}

/// The layout kubelet gives a Secret volume: files are symlinks through
/// `..data`, which is itself a symlink swapped atomically on update.
struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(dir: &Path, leaf: &Leaf) -> Self {
        let mut volume = SecretVolume {
            dir: dir.to_owned(),
            generation: 0,
        };
        volume.update(leaf);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
        }
        volume
    }

    fn timestamped(&self) -> PathBuf {
        self.dir
            .join(format!("..2026_01_01_00_00_0{}.000000001", self.generation))
    }

    fn update(&mut self, leaf: &Leaf) {
        let previous = (self.generation > 0).then(|| self.timestamped());
        self.generation += 1;
        let fresh = self.timestamped();
        std::fs::create_dir(&fresh).unwrap();
        std::fs::write(fresh.join("tls.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(fresh.join("tls.key"), &leaf.key_pem).unwrap();
        let tmp_link = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(fresh.file_name().unwrap(), &tmp_link).unwrap();
        std::fs::rename(&tmp_link, self.dir.join("..data")).unwrap();
        if let Some(previous) = previous {
            std::fs::remove_dir_all(previous).unwrap();
        }
    }

    fn paths(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("tls.crt"), self.dir.join("tls.key"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_secret_volume_updates_are_served_to_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, ca_b) = (TestCa::new("CA A"), TestCa::new("CA B"));
    let (leaf_a, leaf_b) = (ca_a.issue("webhook A"), ca_b.issue("webhook B"));
    let mut volume = SecretVolume::new(dir.path(), &leaf_a);
    let (cert, key) = volume.paths();
    let tls = TlsReloader::load(cert, key)
        .unwrap()
        .with_poll_interval(POLL);
    let server = Server::start(state(), tls).await;

    let client = common::client(&[&ca_a.pem, &ca_b.pem], &[]);
    assert_rotation_under_load(server.addr, client, &leaf_a, &leaf_b, || {
        volume.update(&leaf_b)
    })
    .await;
    server.shutdown().await.unwrap();
}

async fn presented(addr: SocketAddr, client: &Arc<ClientConfig>) -> CertificateDer<'static> {
    review_on_new_connection(addr, client.clone())
        .await
        .unwrap()
}

async fn metric_line(addr: SocketAddr, client: &Arc<ClientConfig>, prefix: &str) -> String {
    let stream = common::tls_connect(addr, client.clone()).await;
    let mut sender = common::http1(stream).await;
    let request = http::Request::get("/metrics")
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.lines()
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_new_pair_is_refused_and_the_old_one_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_a, ca_b) = (TestCa::new("CA A"), TestCa::new("CA B"));
    let (leaf_a, leaf_b) = (ca_a.issue("webhook A"), ca_b.issue("webhook B"));
    let (cert, key) = common::write_pair(dir.path(), &leaf_a);
    let tls = TlsReloader::load(&cert, &key)
        .unwrap()
        .with_poll_interval(POLL);
    let server = Server::start(state(), tls).await;
    let client = common::client(&[&ca_a.pem, &ca_b.pem], &[]);
    let rejected = r#"hsm_secrets_webhook_certificate_reloads_total{result="rejected"}"#;
    let reloaded = r#"hsm_secrets_webhook_certificate_reloads_total{result="reloaded"}"#;

    // B's certificate with A's key: does not match.
    common::write_atomically(&cert, &leaf_b.cert_pem);
    tokio::time::sleep(POLL * 5).await;
    assert_eq!(presented(server.addr, &client).await, leaf_a.der);
    assert_eq!(
        metric_line(server.addr, &client, rejected).await,
        format!("{rejected} 1")
    );

    // Not a certificate at all.
    common::write_atomically(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    tokio::time::sleep(POLL * 5).await;
    assert_eq!(presented(server.addr, &client).await, leaf_a.der);
    assert_eq!(
        metric_line(server.addr, &client, rejected).await,
        format!("{rejected} 2")
    );

    // Gone for a while (e.g. a volume being remounted).
    std::fs::remove_file(&cert).unwrap();
    tokio::time::sleep(POLL * 5).await;
    assert_eq!(presented(server.addr, &client).await, leaf_a.der);

    // A good pair again is taken, so polling survived the failures.
    common::write_pair(dir.path(), &leaf_b);
    let deadline = Instant::now() + Duration::from_secs(1);
    while presented(server.addr, &client).await != leaf_b.der {
        assert!(
            Instant::now() < deadline,
            "valid pair not taken after bad ones"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric_line(server.addr, &client, reloaded).await,
        format!("{reloaded} 1")
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn reload_reports_a_bad_pair_once_and_keeps_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("CA");
    let (leaf_a, leaf_b) = (ca.issue("A"), ca.issue("B"));
    let (cert, key) = common::write_pair(dir.path(), &leaf_a);
    let tls = TlsReloader::load(&cert, &key).unwrap();
    assert_eq!(tls.reload().await.unwrap(), Reload::Unchanged);

    common::write_atomically(&key, &leaf_b.key_pem);
    let error = tls
        .reload()
        .await
        .expect_err("key of B does not match certificate of A");
    assert_eq!(error.kind(), "key_pair");
    assert_eq!(tls.current().cert[0], leaf_a.der);
    assert_eq!(
        tls.reload().await.unwrap(),
        Reload::Unchanged,
        "reported once"
    );

    common::write_atomically(&cert, &leaf_b.cert_pem);
    assert_eq!(tls.reload().await.unwrap(), Reload::Reloaded);
    assert_eq!(tls.current().cert[0], leaf_b.der);
}

#[test]
fn load_errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("CA");
    let (leaf, other) = (ca.issue("A"), ca.issue("B"));
    let (cert, key) = common::write_pair(dir.path(), &leaf);
    let missing = dir.path().join("missing.crt");

    let error = TlsReloader::load(&missing, &key).unwrap_err();
    assert_eq!(error.kind(), "read_pem");
    assert!(
        error.to_string().contains(&missing.display().to_string()),
        "{error}"
    );

    let error = TlsReloader::load(&key, &key).unwrap_err();
    assert_eq!(error.kind(), "no_certificate");
    assert!(error.to_string().contains("tls.key"), "{error}");

    let error = TlsReloader::load(&cert, &cert).unwrap_err();
    assert_eq!(error.kind(), "no_private_key");
    assert!(error.to_string().contains("tls.crt"), "{error}");

    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    let error = TlsReloader::load(&cert, &other_key).unwrap_err();
    assert_eq!(error.kind(), "key_pair");
    assert!(error.to_string().contains("other.key"), "{error}");
}

#[test]
fn sec1_ec_private_keys_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("CA");
    let leaf = ca.issue("A");
    let (cert, _) = common::write_pair(dir.path(), &leaf);
    let sec1_key = dir.path().join("ec.key");
    std::fs::write(&sec1_key, common::pkcs8_to_sec1_pem(&leaf.key_pem)).unwrap();
    let tls = TlsReloader::load(&cert, &sec1_key).unwrap();
    assert_eq!(tls.current().cert[0], leaf.der);
}
