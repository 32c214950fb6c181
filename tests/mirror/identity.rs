//! Who may call what on an agent: roles, leases, fencing and client writes only with the
//! controller's certificate, pushes only from an agent's, reads from either; and the
//! certificates `hsm-secrets pki` writes for the Kubernetes Secrets work that way.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use hsm_secrets::hsm::{Expect, Pkcs11Store};
use hsm_secrets::mirror::{
    Agent, AgentConfig, AgentConnection, AgentTls, MirrorError, Peer, TlsFiles, pb,
};
use kit::mirror::*;
use tonic::Code;

fn assert_denied(err: MirrorError, rpc: &str, required: &str) {
    match &err {
        MirrorError::Remote { code, message, .. } => {
            assert_eq!(*code, Code::PermissionDenied, "{err}");
            assert!(message.contains(rpc), "{message}");
            assert!(
                message.contains(&format!("only to the {required}")),
                "{message}"
            );
        }
        other => panic!("expected PermissionDenied, got {other}"),
    }
}

#[tokio::test]
async fn agents_cannot_control_or_write_and_the_controller_cannot_push() {
    let tokens = Tokens::new();
    if tokens.get("id-n1").is_none() {
        return;
    }
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = TestNode::start(&tokens, "n1", "id-n1", &pki, eager_sync())
        .await
        .unwrap();
    let n2 = TestNode::start(&tokens, "n2", "id-n2", &pki, eager_sync())
        .await
        .unwrap();

    // A node's certificate (on every node) cannot take over the device or write into it.
    let rogue = pki.agent("n2", &n1.peer());
    let err = rogue
        .assign_role(pb::AssignRoleRequest {
            role: pb::Role::Primary as i32,
            epoch: 1,
            lease_duration_ms: 60_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_denied(err, "AssignRole", "controller");
    assert_eq!(
        n1.agent.epoch(),
        0,
        "the refused assignment changed nothing"
    );

    // The controller's certificate does all of it; mirroring works under the split.
    assign_primary(&pki, &n1, 1, &[&n2], HOUR).await;
    assign_mirror(&pki, &n2, 1, &n1).await;
    for (rpc, err) in [
        (
            "Put",
            rogue
                .put(&path("shop/db"), &data(&[("k", b"v")]), Expect::Any, 1)
                .await
                .unwrap_err(),
        ),
        (
            "Delete",
            rogue
                .delete(&path("shop/db"), Expect::Any, 1)
                .await
                .unwrap_err(),
        ),
        ("RenewLease", rogue.renew_lease(1, HOUR).await.unwrap_err()),
        ("Fence", rogue.fence(1).await.unwrap_err()),
    ] {
        assert_denied(err, rpc, "controller");
    }
    let written = pki
        .controller(&n1.peer())
        .put(&path("shop/db"), &data(&[("k", b"v1")]), Expect::Absent, 1)
        .await
        .unwrap();
    // Active policy: the primary's push (agent identity) reached the mirror.
    assert_eq!(written.replicated_to, vec!["n2".to_string()]);
    wait_converged(&n1, &n2, Duration::from_secs(120)).await;

    // Reads are open to agents (remote reads, pulls) and to the controller.
    assert!(rogue.get(&path("shop/db")).await.is_ok());
    assert!(
        rogue
            .changes(&hsm_secrets::mirror::ChangesAsk::default())
            .await
            .is_ok()
    );
    assert!(pki.controller(&n1.peer()).health().await.is_ok());

    // The controller's certificate cannot push records into a mirror.
    let err = pki
        .controller(&n2.peer())
        .replicate(pb::ReplicateRequest {
            record: None,
            epoch: 1,
            primary_node: "n1".into(),
        })
        .await
        .unwrap_err();
    assert_denied(err, "Replicate", "agent");
}

#[tokio::test]
async fn the_pki_command_writes_working_secrets_with_private_keys() {
    let tokens = Tokens::new();
    let Some(token) = tokens.get("id-pki") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
            .arg("pki")
            .arg("--out")
            .arg(&out)
            .args(["--nodes", "worker-1,worker-2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&["--shared-agent"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("hsm-secrets-agent-tls"), "{stdout}");
    assert!(stdout.contains("/etc/hsm-secrets/agent-tls"), "{stdout}");
    for secret in ["controller", "agent", "nodes/worker-1", "nodes/worker-2"] {
        for (file, mode) in [("ca.crt", 0o644), ("tls.crt", 0o644), ("tls.key", 0o600)] {
            let meta = std::fs::metadata(out.join(secret).join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{secret}/{file}");
        }
    }
    // Not overwritten by accident.
    let again = run(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .args(["pki", "--out"])
        .arg(dir.path().join("other"))
        .args(["--nodes", "Worker_1"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"Worker_1\" is not a node name"));

    let tls = |secret: &str| {
        AgentTls::from_files(&TlsFiles {
            ca: out.join(secret).join("ca.crt"),
            cert: out.join(secret).join("tls.crt"),
            key: out.join(secret).join("tls.key"),
        })
        .unwrap()
    };
    // worker-2 serves with its own certificate, which names it.
    let store = Pkcs11Store::open(token.config()).await.unwrap();
    let agent = Agent::start(
        AgentConfig::new("worker-2", tls("nodes/worker-2")),
        Arc::new(store),
    )
    .await;
    let listener = hsm_secrets::mirror::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let peer = Peer {
        node: "worker-2".into(),
        endpoint: format!("https://{}", listener.local_addr().unwrap()),
    };
    tokio::spawn(hsm_secrets::mirror::serve(
        agent.clone(),
        listener,
        std::future::pending(),
    ));
    let timeout = Duration::from_secs(60);
    let controller = AgentConnection::new(&peer, &tls("controller"), timeout).unwrap();
    controller
        .assign_role(pb::AssignRoleRequest {
            role: pb::Role::Primary as i32,
            epoch: 1,
            lease_duration_ms: 60_000,
            ..Default::default()
        })
        .await
        .unwrap();
    controller
        .put(&path("shop/db"), &data(&[("k", b"v")]), Expect::Absent, 1)
        .await
        .unwrap();
    // The shared certificate (`--shared-agent`) proves no node: worker-2, not configured
    // to allow it, refuses a push from it whatever the request claims.
    let shared = AgentConnection::new(&peer, &tls("agent"), timeout).unwrap();
    let err = shared
        .replicate(push_request(&path("shop/x"), 9, &[0; 32], &[], "worker-1"))
        .await
        .unwrap_err();
    match &err {
        MirrorError::Remote { code, message, .. } => {
            assert_eq!(*code, Code::PermissionDenied, "{err}");
            assert!(message.contains("shared agent identity"), "{message}");
        }
        other => panic!("expected PermissionDenied, got {other}"),
    }
    let node_client = AgentConnection::new(&peer, &tls("nodes/worker-1"), timeout).unwrap();
    assert!(node_client.get(&path("shop/db")).await.is_ok());
    assert_denied(
        node_client
            .put(&path("shop/db"), &data(&[("k", b"x")]), Expect::Any, 1)
            .await
            .unwrap_err(),
        "Put",
        "controller",
    );
}

/// The sender of a push is the node its certificate names, never what the request says:
/// a mirror's certificate claiming to be the primary is refused, counted, and nothing is
/// applied; a certificate shared by every node proves no node and is refused unless the
/// operator allowed it.
#[tokio::test]
async fn a_push_comes_from_the_node_its_certificate_names() {
    let tokens = Tokens::new();
    if tokens.get("id-n1").is_none() {
        return;
    }
    let pki = Pki::new(&["n1", "n2", "n3"]);
    let n2 = TestNode::start(&tokens, "n2", "id-n2", &pki, eager_sync())
        .await
        .unwrap();
    let controller = pki.controller(&n2.peer());
    controller
        .assign_role(pb::AssignRoleRequest {
            role: pb::Role::ReadOnly as i32,
            epoch: 1,
            primary_node: "n1".into(),
            primary_endpoint: "https://127.0.0.1:9".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let record = hsm_secrets::hsm::Record::live(path("shop/forged"), 1, data(&[("k", b"x")]));
    let push = push_request(&record.path, 1, &record.checksum.0, &[("k", b"x")], "n1");
    // n3's certificate claiming to be the primary n1.
    let err = pki
        .agent("n3", &n2.peer())
        .replicate(push.clone())
        .await
        .unwrap_err();
    match &err {
        MirrorError::Remote { code, message, .. } => {
            assert_eq!(*code, Code::PermissionDenied, "{err}");
            assert!(
                message.contains("node n3 claiming to push as \"n1\""),
                "{message}"
            );
        }
        other => panic!("expected PermissionDenied, got {other}"),
    }
    assert_eq!(n2.agent.stats().pushes_refused, 1);
    assert!(n2.store.record(&path("shop/forged")).await.is_err());

    // The primary's own certificate is accepted (and names the sender by itself).
    let mut unnamed = push.clone();
    unnamed.primary_node.clear();
    let applied = pki
        .agent("n1", &n2.peer())
        .replicate(unnamed)
        .await
        .unwrap();
    assert!(applied.applied);

    // A hostile 10 KB path comes back in a bounded status, not a 20 KB one.
    let mut hostile = push.clone();
    if let Some(record) = hostile.record.as_mut() {
        record.path = format!("shop/{}", "x".repeat(10_000));
        record.version = 3;
    }
    let err = pki
        .agent("n1", &n2.peer())
        .replicate(hostile)
        .await
        .unwrap_err();
    match &err {
        MirrorError::Remote { message, .. } => {
            assert!(message.len() <= 1100, "a status of {} bytes", message.len());
        }
        other => panic!("expected the agent's refusal, got {other}"),
    }
}

#[test]
fn identities_come_from_the_certificate() {
    use hsm_secrets::mirror::{CertificateAuthority, Identity};
    let ca = CertificateAuthority::generate().unwrap();
    let der = |pem: &str| {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    };
    let node = ca.issue_node_agent("worker-1").unwrap();
    assert_eq!(
        Identity::of_certificate(&der(&node.cert_pem)),
        Identity::Agent(Some("worker-1".into()))
    );
    let shared = ca.issue_shared_agent(&["worker-1", "worker-2"]).unwrap();
    assert_eq!(
        Identity::of_certificate(&der(&shared.cert_pem)),
        Identity::Agent(None)
    );
    let controller = ca.issue_controller().unwrap();
    assert_eq!(
        Identity::of_certificate(&der(&controller.cert_pem)),
        Identity::Controller
    );
}
