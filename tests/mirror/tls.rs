//! Agents accept only clients with a certificate from the agent CA, and clients accept
//! only the agent they meant to reach.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::time::Duration;

use hsm_secrets::mirror::{AgentConnection, AgentTls, Peer, generate_pki};
use kit::mirror::{Pki, TestNode, Tokens, manual_sync};

#[tokio::test]
async fn mutual_tls_accepts_agent_certificates_and_refuses_others() {
    let pki = Pki::new(&["n1", "n2"]);
    let tokens = Tokens::new();
    let Some(node) = TestNode::start(&tokens, "n1", "tls-n1", &pki, manual_sync()).await else {
        return;
    };
    let timeout = Duration::from_secs(30);

    // Accepted: a certificate from the agent CA, talking to the node it names.
    let health = pki.controller(&node.peer()).health().await.unwrap();
    assert_eq!(health.node, "n1");
    assert!(health.token_present && health.session_usable, "{health:?}");
    assert!(health.token_serial.is_some_and(|s| !s.is_empty()));
    let peer_client = AgentConnection::new(&node.peer(), &pki.tls("n2"), timeout).unwrap();
    peer_client.health().await.unwrap();

    // Refused: no client certificate.
    let anonymous = AgentConnection::with_tls(
        &node.peer(),
        pki.tls("n2").anonymous_client_config("n1"),
        timeout,
    )
    .unwrap();
    let err = anonymous.health().await.expect_err("no client certificate");
    assert_eq!(err.kind(), "unreachable", "{err}");
    assert!(err.to_string().contains("CertificateRequired"), "{err}");

    // Refused: a client certificate from another CA.
    let other_dir = tempfile::tempdir().unwrap();
    let other = generate_pki(other_dir.path(), &["n2"]).unwrap();
    let other_files = other.files("n2").unwrap();
    let ours = pki.generated.files("n2").unwrap();
    // Trust our CA (so the server is accepted) but present the foreign certificate.
    let foreign = AgentTls::from_pem(
        &std::fs::read(&ours.ca).unwrap(),
        &std::fs::read(&other_files.cert).unwrap(),
        &std::fs::read(&other_files.key).unwrap(),
    );
    let err = AgentConnection::new(&node.peer(), &foreign, timeout)
        .unwrap()
        .health()
        .await
        .expect_err("foreign client certificate");
    assert_eq!(err.kind(), "unreachable", "{err}");
    assert!(
        err.to_string().contains("alert"),
        "the server refused: {err}"
    );

    // Refused by the client: the server's certificate does not name the expected node.
    let impostor = Peer {
        node: "n2".into(),
        endpoint: node.endpoint.clone(),
    };
    let err = AgentConnection::new(&impostor, &pki.tls("n2"), timeout)
        .unwrap()
        .health()
        .await
        .expect_err("server certificate names n1, not n2");
    assert!(
        err.to_string().contains("not valid for name \"n2\""),
        "{err}"
    );

    // Refused by the client: a server from another CA.
    let err = AgentConnection::new(
        &node.peer(),
        &AgentTls::from_files(other_files).unwrap(),
        timeout,
    )
    .unwrap()
    .health()
    .await
    .expect_err("server not signed by the trusted CA");
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );

    // The accepted client still works after the refusals.
    peer_client.health().await.unwrap();
}

#[tokio::test]
async fn plain_http_endpoints_are_refused_with_the_fix() {
    let pki = Pki::new(&["n1"]);
    let peer = Peer {
        node: "n1".into(),
        endpoint: "http://127.0.0.1:1".into(),
    };
    let err = AgentConnection::new(&peer, &pki.tls("n1"), Duration::from_secs(1)).unwrap_err();
    assert!(err.to_string().contains("https://"), "{err}");
}
