//! The node plugin as a device agent and as a remote reader, as real processes: a node
//! with a token serves CSI and the agent from one process (one store per token) and
//! mirrors; a node without a token, or whose token cannot be opened, publishes through
//! the agents, from the primary and, once the primary is killed, from a mirror.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hsm_secrets::hsm::Expect;
use hsm_secrets::mirror::{AgentConnection, Peer, pb};
use hsm_secrets_csi::proto::node_client::NodeClient;
use kit::mirror::{
    HOUR, Pki, TestToken, Tokens, data, path, spawn_agent_process, spawn_agent_process_with,
    wait_for,
};
use kit::node::{read, target_under, unmount_everything_under, volume};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(180);
const CATALOG: &str = "\
apiVersion: hsmsecrets.io/v1alpha1
kind: HSMSecret
metadata: {name: db, namespace: shop}
spec: {deviceRef: prod-hsm}
";

/// An `hsm-secrets node` process; `agent` is its agent's endpoint when it serves one.
struct NodeProcess {
    _child: Child,
    socket: PathBuf,
    kubelet_dir: PathBuf,
    agent: Option<Peer>,
}

impl NodeProcess {
    async fn spawn(
        dir: &Path,
        pki: &Pki,
        name: &str,
        extra: &[&str],
        token: Option<&TestToken>,
    ) -> Self {
        std::fs::write(dir.join("catalog.yaml"), CATALOG).unwrap();
        let socket = dir.join("plugin/csi.sock");
        let kubelet_dir = dir.join("kubelet");
        std::fs::create_dir_all(kubelet_dir.join("pods")).unwrap();
        let files = pki.generated.files(name).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_hsm-secrets"));
        command
            .args(["node", "--node-name", name, "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--kubelet-dir")
            .arg(&kubelet_dir)
            .arg("--catalog")
            .arg(dir.join("catalog.yaml"))
            .arg("--agent-tls-ca")
            .arg(&files.ca)
            .arg("--agent-tls-cert")
            .arg(&files.cert)
            .arg("--agent-tls-key")
            .arg(&files.key)
            .args(extra)
            .env("SOFTHSM2_CONF", kit::softhsm::conf_path())
            .env("HSM_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(t) = token {
            command
                .args(["--device", "prod-hsm", "--pkcs11-library"])
                .arg(&t.library)
                .args(["--token-label", &t.label, "--pin-file"])
                .arg(&t.pin_file)
                .args(["--agent-listen", "127.0.0.1:0", "--pull-interval-ms", "200"]);
        }
        let mut child = command.spawn().unwrap();
        let mut agent = None;
        if token.is_some() {
            let stdout = child.stdout.take().unwrap();
            let mut line = String::new();
            tokio::time::timeout(WAIT, BufReader::new(stdout).read_line(&mut line))
                .await
                .expect("the node prints its agent's address")
                .unwrap();
            assert!(
                line.contains(&format!("node {name} agent listening on")),
                "{line:?}"
            );
            let addr = line.trim().rsplit(' ').next().unwrap();
            agent = Some(Peer {
                node: name.into(),
                endpoint: format!("https://{addr}"),
            });
        }
        Self {
            _child: child,
            socket,
            kubelet_dir,
            agent,
        }
    }

    async fn csi(&self) -> NodeClient<tonic::transport::Channel> {
        let channel = wait_for(WAIT, "the CSI socket", || async {
            hsm_secrets_csi::connect_unix(&self.socket).await.ok()
        })
        .await;
        NodeClient::new(channel)
    }

    /// Publishes `db` for a new pod and returns the password file's content.
    async fn publish(&self, uid: &str) -> Result<Vec<u8>, tonic::Status> {
        let target = target_under(&self.kubelet_dir, uid, "secrets");
        self.csi()
            .await
            .node_publish_volume(volume(uid, &target, "db"))
            .await?;
        Ok(read(&target.join("db/password")))
    }
}

fn assign(role: pb::Role, epoch: u64, primary: &Peer) -> pb::AssignRoleRequest {
    pb::AssignRoleRequest {
        role: role as i32,
        epoch,
        primary_node: primary.node.clone(),
        primary_endpoint: primary.endpoint.clone(),
        lease_duration_ms: if role == pb::Role::Primary {
            HOUR.as_millis() as u64
        } else {
            0
        },
        ..Default::default()
    }
}

async fn wait_applied(conn: &AgentConnection, sequence: u64) {
    wait_for(
        WAIT,
        &format!("{} to apply {sequence}", conn.node()),
        || async {
            let h = conn.health().await.ok()?;
            (h.applied_sequence >= sequence).then_some(())
        },
    )
    .await;
}

fn prerequisites(tokens: &Tokens) -> bool {
    kit::node::mounts_available() && tokens.get("na-n1").is_some()
}

#[tokio::test]
async fn a_node_with_its_agent_serves_csi_and_mirrors() {
    let tokens = Tokens::new();
    if !prerequisites(&tokens) {
        return;
    }
    let pki = Pki::new(&["n1", "n2"]);
    let dir = tempfile::tempdir().unwrap();
    let n1_token = tokens.get("na-n1");
    let node = NodeProcess::spawn(dir.path(), &pki, "n1", &[], n1_token.as_deref()).await;
    let n1 = node.agent.clone().unwrap();
    let n2 = spawn_agent_process(&tokens, &pki, "n2", "na-n2").await;
    let c1 = pki.controller(&n1);
    let c2 = pki.controller(&n2.peer);
    c1.assign_role(assign(pb::Role::Primary, 1, &n1))
        .await
        .unwrap();
    c2.assign_role(assign(pb::Role::ReadOnly, 1, &n1))
        .await
        .unwrap();

    // A write through the node's agent is what its CSI side serves: one store.
    let v1 = c1
        .put(
            &path("shop/db"),
            &data(&[("password", b"first-0a1f")]),
            Expect::Absent,
            1,
        )
        .await
        .unwrap()
        .version;
    assert_eq!(node.publish("uid-1").await.unwrap(), b"first-0a1f");
    let v2 = c1
        .put(
            &path("shop/db"),
            &data(&[("password", b"second-77c2")]),
            Expect::Version(v1),
            1,
        )
        .await
        .unwrap()
        .version;
    assert_eq!(node.publish("uid-2").await.unwrap(), b"second-77c2");

    // The mirror follows the node's agent.
    wait_applied(&c2, v2).await;
    let got = c2.get(&path("shop/db")).await.unwrap();
    assert_eq!(got.node, "n2");
    let h1 = c1.health().await.unwrap();
    assert_eq!((h1.epoch, h1.applied_sequence), (1, v2));
    unmount_everything_under(dir.path());
}

#[tokio::test]
async fn nodes_without_a_usable_token_read_from_the_primary_then_from_a_mirror() {
    let tokens = Tokens::new();
    if !prerequisites(&tokens) {
        return;
    }
    let pki = Pki::new(&["n1", "n2", "worker-9", "worker-8"]);
    let mut n1 = spawn_agent_process(&tokens, &pki, "n1", "na-n1").await;
    let n2 = spawn_agent_process(&tokens, &pki, "n2", "na-n2").await;
    let c1 = pki.controller(&n1.peer);
    let c2 = pki.controller(&n2.peer);
    c1.assign_role(assign(pb::Role::Primary, 1, &n1.peer))
        .await
        .unwrap();
    c2.assign_role(assign(pb::Role::ReadOnly, 1, &n1.peer))
        .await
        .unwrap();
    let v = c1
        .put(
            &path("shop/db"),
            &data(&[("password", b"remote-3c4d")]),
            Expect::Absent,
            1,
        )
        .await
        .unwrap()
        .version;
    wait_applied(&c2, v).await;

    let dir = tempfile::tempdir().unwrap();
    let agents = format!("n1={},n2={}", n1.peer.endpoint, n2.peer.endpoint);
    let node = NodeProcess::spawn(
        dir.path(),
        &pki,
        "worker-9",
        &["--agent", &agents, "--state", "none"],
        None,
    )
    .await;
    assert_eq!(node.publish("uid-1").await.unwrap(), b"remote-3c4d");
    // A node named as the device's holder (the DaemonSet sets HSM_DEVICE everywhere)
    // whose token is absent reads through the agents too, and counts it.
    let lost_dir = tempfile::tempdir().unwrap();
    let lost_metrics = free_port();
    let t = tokens.get("na-n1").unwrap();
    let (library, pin_file) = (
        t.library.display().to_string(),
        t.pin_file.display().to_string(),
    );
    let lost = NodeProcess::spawn(
        lost_dir.path(),
        &pki,
        "worker-8",
        &[
            "--agent",
            &agents,
            "--state",
            "none",
            "--metrics-addr",
            &lost_metrics,
            "--device",
            "prod-hsm",
            "--pkcs11-library",
            &library,
            "--token-label",
            "na-unplugged",
            "--pin-file",
            &pin_file,
        ],
        None,
    )
    .await;
    assert_eq!(lost.publish("uid-3").await.unwrap(), b"remote-3c4d");
    let (_, text) = http_get(&lost_metrics, "/metrics").await;
    let fallback = r#"hsm_secrets_node_remote_fallback_reads_total{kind="device_not_open"} 1"#;
    assert!(text.contains(fallback), "{fallback} missing in:\n{text}");

    // The primary dies: the next pod's volume comes from the mirror.
    kill(
        Pid::from_raw(n1.child.id().unwrap() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    n1.child.wait().await.unwrap();
    assert_eq!(node.publish("uid-2").await.unwrap(), b"remote-3c4d");
    assert_eq!(lost.publish("uid-4").await.unwrap(), b"remote-3c4d");
    unmount_everything_under(dir.path());
    unmount_everything_under(lost_dir.path());
}

fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = wait_for(WAIT, &format!("{addr} to accept"), || async {
        tokio::net::TcpStream::connect(addr).await.ok()
    })
    .await;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    (response[9..12].parse().unwrap(), response)
}

#[tokio::test]
async fn agents_alone_and_inside_the_node_serve_metrics_without_secret_values() {
    let tokens = Tokens::new();
    if !prerequisites(&tokens) {
        return;
    }
    let pki = Pki::new(&["n1", "n2"]);
    let (m1, m2) = (free_port(), free_port());
    let n1 = spawn_agent_process_with(&tokens, &pki, "n1", "na-n1", &["--metrics-addr", &m1]).await;
    let dir = tempfile::tempdir().unwrap();
    let n2_token = tokens.get("na-n2");
    let node = NodeProcess::spawn(
        dir.path(),
        &pki,
        "n2",
        &["--metrics-addr", &m2],
        n2_token.as_deref(),
    )
    .await;
    let n2 = node.agent.clone().unwrap();
    let c1 = pki.controller(&n1.peer);
    let c2 = pki.controller(&n2);
    c1.assign_role(assign(pb::Role::Primary, 1, &n1.peer))
        .await
        .unwrap();
    c2.assign_role(assign(pb::Role::ReadOnly, 1, &n1.peer))
        .await
        .unwrap();
    let v = c1
        .put(
            &path("shop/db"),
            &data(&[("password", b"metric-leak-9e1b")]),
            Expect::Absent,
            1,
        )
        .await
        .unwrap()
        .version;
    wait_applied(&c2, v).await;
    // A write the mirror refuses is counted by reason.
    c2.put(
        &path("shop/db"),
        &data(&[("password", b"x")]),
        Expect::Any,
        1,
    )
    .await
    .unwrap_err();

    let (status, primary) = http_get(&m1, "/metrics").await;
    assert_eq!(status, 200, "{primary}");
    for line in [
        "hsm_secrets_agent_epoch 1",
        r#"hsm_secrets_agent_role{role="primary"} 1"#,
        &format!("hsm_secrets_agent_applied_sequence {v}"),
        r#"hsm_secrets_agent_rpc_duration_seconds_count{method="Put",code="ok"} 1"#,
        r#"hsm_secrets_agent_rpc_duration_seconds_count{method="AssignRole",code="ok"} 1"#,
    ] {
        assert!(primary.contains(line), "{line} missing in:\n{primary}");
    }
    // The mirror inside the node plugin, next to the node's own metrics.
    let mirror = wait_for(WAIT, "the mirror's pull counter", || async {
        let (_, text) = http_get(&m2, "/metrics").await;
        text.contains("hsm_secrets_agent_sync_pulls_total")
            .then_some(text)
    })
    .await;
    for line in [
        r#"hsm_secrets_agent_role{role="read_only"} 1"#,
        "hsm_secrets_agent_sync_lag_sequence 0",
        "hsm_secrets_agent_sync_lag_seconds ",
        "hsm_secrets_agent_sync_full_passes_total 1",
        "hsm_secrets_agent_sync_repairs_total 0",
        "hsm_secrets_agent_checksum_failures_total 0",
        r#"hsm_secrets_agent_writes_refused_total{reason="not_primary"} 1"#,
        "# TYPE hsm_secrets_agent_hsm_errors counter",
        r#"hsm_secrets_agent_rpc_duration_seconds_count{method="Put",code="failed_precondition"} 1"#,
        "hsm_secrets_node_publishes_total",
    ] {
        assert!(mirror.contains(line), "{line} missing in:\n{mirror}");
    }
    for text in [&primary, &mirror] {
        assert!(!text.contains("metric-leak-9e1b"));
        assert!(!text.contains("shop/db"));
    }
    for addr in [&m1, &m2] {
        assert_eq!(http_get(addr, "/healthz").await.0, 200);
        let (status, body) = http_get(addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
    }
}
