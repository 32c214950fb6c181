//! `hsm-secrets controller --metrics-addr` serves `/metrics` (the device controller's and
//! the HSMSecret reconciler's metrics), `/healthz` and `/readyz` over HTTP, and the
//! Deployment's probes name paths it answers. A real controller process runs over the
//! file-backed state with a real agent process on a SoftHSM token.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::time::Duration;

use hsm_secrets::state::FileState;
use kit::mirror::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 GET over a fresh connection: (status code, body).
async fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("the ops server answers")
    .unwrap();
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// The paths of the controller Deployment's probes.
fn probe_paths() -> Vec<String> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("manifests/controller/deployment.yaml"),
    )
    .unwrap();
    let deployment: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    let paths: Vec<String> = ["livenessProbe", "readinessProbe"]
        .iter()
        .map(|p| c[p]["httpGet"]["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(paths.len(), 2);
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_are_served_over_http() {
    let tokens = Tokens::new();
    if tokens.get("ops-n1").is_none() {
        return;
    }
    let pki = Pki::new(&["n1"]);
    let n1 = spawn_agent_process(&tokens, &pki, "n1", "ops-n1").await;
    let dir = tempfile::tempdir().unwrap();
    let state = FileState::open(dir.path()).unwrap();
    state
        .apply_device(
            &kit::resources::device("prod-hsm")
                .mirrored(Some("n1"), &[])
                .sync_interval(300)
                .auto_failover(3)
                .build(),
        )
        .unwrap();
    let files = pki.generated.files(CONTROLLER).unwrap();
    let mut controller = tokio::process::Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .arg("controller")
        .arg("--state")
        .arg(dir.path())
        .args(["--agent", &format!("n1={}", n1.peer.endpoint)])
        .arg("--agent-tls-ca")
        .arg(&files.ca)
        .arg("--agent-tls-cert")
        .arg(&files.cert)
        .arg("--agent-tls-key")
        .arg(&files.key)
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("HSM_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(controller.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line))
        .await
        .expect("the controller prints its ops address")
        .unwrap();
    assert!(line.contains("/metrics"), "{line}");
    let addr = line.trim().rsplit(' ').next().unwrap().to_string();

    // The loop goes round, takes the Lease and promotes n1.
    let metrics = wait_for(
        Duration::from_secs(60),
        "the device's epoch in /metrics",
        || {
            let addr = addr.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let (code, body) = get(&addr, "/metrics").await;
                assert_eq!(code, 200);
                body.contains("hsm_secrets_device_epoch{device=\"prod-hsm\"} 1")
                    .then_some(body)
            }
        },
    )
    .await;
    for expected in [
        "hsm_secrets_controller_leader 1",
        "# TYPE hsm_secrets_controller_last_round_timestamp_seconds gauge",
        "hsm_secrets_device_ready{device=\"prod-hsm\"} 1",
        // The HSMSecret reconciler's metrics are in the same registry.
        "hsm_secrets_secret_hsm_writes_total 0",
    ] {
        assert!(metrics.contains(expected), "{expected} missing:\n{metrics}");
    }
    let (code, body) = get(&addr, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = get(&addr, "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready (leader)\n"));
    for path in probe_paths() {
        assert_eq!(
            get(&addr, &path).await.0,
            200,
            "the Deployment probes {path}"
        );
    }
    assert_eq!(get(&addr, "/nothing").await.0, 404);

    // SIGTERM stops the controller and its ops server.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(controller.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), controller.wait())
        .await
        .expect("the controller exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err());
}
