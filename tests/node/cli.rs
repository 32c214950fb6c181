//! The real `hsm-secrets node` binary: a SoftHSM token, a static catalog, kubelet's calls
//! over its socket, /metrics and /readyz over HTTP, and a clean stop on SIGTERM.
#![allow(clippy::unwrap_used)]

use crate::kit;
use hsm_secrets_testkit::token_or_skip;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hsm_secrets_csi::proto::ProbeRequest;
use hsm_secrets_csi::proto::identity_client::IdentityClient;
use hsm_secrets_csi::proto::node_client::NodeClient;
use kit::node::{DEVICE, GID, mode_and_gid, read, target_under, volume};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const CATALOG: &str = "\
apiVersion: hsmsecrets.io/v1alpha1
kind: HSMSecret
metadata: {name: db, namespace: shop}
spec: {deviceRef: prod-hsm, access: {serviceAccounts: [checkout]}}
";

struct Plugin {
    child: Child,
    stderr: Arc<Mutex<String>>,
    socket: PathBuf,
    metrics: SocketAddr,
}

impl Plugin {
    fn start(dir: &Path, token: &kit::softhsm::TestToken, pin_file: &Path) -> Self {
        let catalog = dir.join("catalog.yaml");
        std::fs::write(&catalog, CATALOG).unwrap();
        let socket = dir.join("plugin/csi.sock");
        let metrics = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
            .env("SOFTHSM2_CONF", kit::softhsm::conf_path())
            .env("NODE_NAME", "worker-1")
            .env("HSM_LOG", "debug")
            .args(["node", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .args(["--device", DEVICE, "--pkcs11-library"])
            .arg(&token.library)
            .args(["--token-label", &token.label, "--pin-file"])
            .arg(pin_file)
            .arg("--kubelet-dir")
            .arg(dir.join("kubelet"))
            .arg("--catalog")
            .arg(&catalog)
            .args(["--metrics-addr", &metrics.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        kit::local::collect_into(child.stderr.take().unwrap(), stderr.clone());
        Self {
            child,
            stderr,
            socket,
            metrics,
        }
    }

    fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    async fn connect(&mut self) -> tonic::transport::Channel {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the plugin exited with {status}:\n{}", self.logs());
            }
            if let Ok(channel) = hsm_secrets_csi::connect_unix(&self.socket).await {
                return channel;
            }
            assert!(Instant::now() < deadline, "no socket:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn http_get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.metrics).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response[9..12].parse().unwrap();
        (status, response)
    }

    /// SIGTERM, then the exit status (within 30 s). Async: the test's client connections
    /// must keep answering the server's graceful-shutdown handshake meanwhile.
    async fn terminate(&mut self) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn wait_ready(identity: &mut IdentityClient<tonic::transport::Channel>, plugin: &Plugin) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready;
        if ready == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", plugin.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_node_command_publishes_serves_metrics_and_stops_on_sigterm() {
    let token = token_or_skip!("node-cli");
    let store = token.open().await;
    kit::node::put(&store, "shop/db", &[("password", b"cli-secret-5b9d")]).await;
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    let mut plugin = Plugin::start(dir.path(), &token, &token.pin_file);
    let channel = plugin.connect().await;
    let mut identity = IdentityClient::new(channel.clone());
    wait_ready(&mut identity, &plugin).await;

    let target = target_under(&dir.path().join("kubelet"), "uid-1", "secrets");
    NodeClient::new(channel.clone())
        .node_publish_volume(volume("vol-1", &target, "db"))
        .await
        .unwrap();
    assert_eq!(read(&target.join("db/password")), b"cli-secret-5b9d");
    assert_eq!(mode_and_gid(&target.join("db/password")), (0o440, GID));
    let denied = NodeClient::new(channel.clone())
        .node_publish_volume(volume(
            "vol-2",
            &target_under(&dir.path().join("kubelet"), "uid-2", "s"),
            "bank/db",
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);

    let (status, metrics) = plugin.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"hsm_secrets_node_publishes_total{operation="publish",outcome="ok"} 1"#),
        "{metrics}"
    );
    assert_eq!(plugin.http_get("/readyz").0, 200);
    assert_eq!(plugin.http_get("/healthz").0, 200);

    NodeClient::new(channel)
        .node_unpublish_volume(hsm_secrets_csi::proto::NodeUnpublishVolumeRequest {
            volume_id: "vol-1".into(),
            target_path: target.to_str().unwrap().into(),
        })
        .await
        .unwrap();
    assert!(!target.exists());

    let status = plugin.terminate().await;
    let logs = plugin.logs();
    assert!(status.success(), "exit {status}:\n{logs}");
    assert!(logs.contains("shutting down"), "{logs}");
    assert!(!plugin.socket.exists(), "the socket is removed on exit");
    assert!(!logs.contains("cli-secret-5b9d"), "{logs}");
}

#[tokio::test]
async fn a_token_that_cannot_be_opened_is_retried_without_exiting() {
    let token = token_or_skip!("node-cli-retry");
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(dir.path().to_path_buf());
    let pin_file = dir.path().join("pin/pin");
    let mut plugin = Plugin::start(dir.path(), &token, &pin_file);
    let channel = plugin.connect().await;
    let mut identity = IdentityClient::new(channel.clone());

    // The PIN Secret is not mounted yet: serving, not ready, and saying why.
    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(false));
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = plugin.http_get("/readyz");
        if body.contains("PIN file") {
            assert_eq!(status, 503);
            break body;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains(pin_file.to_str().unwrap()), "{body}");
    let target = target_under(&dir.path().join("kubelet"), "uid-1", "secrets");
    let status = NodeClient::new(channel.clone())
        .node_publish_volume(volume("vol-1", &target, "db"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("not open yet"), "{status:?}");

    std::fs::create_dir_all(pin_file.parent().unwrap()).unwrap();
    std::fs::write(&pin_file, format!("{}\n", kit::softhsm::USER_PIN)).unwrap();
    wait_ready(&mut identity, &plugin).await;
    assert!(
        plugin.child.try_wait().unwrap().is_none(),
        "still the same process"
    );
    let logs = plugin.logs();
    assert!(logs.contains("cannot open the HSM token"), "{logs}");
    assert!(logs.contains("HSM token open"), "{logs}");
    assert!(plugin.terminate().await.success());
}

struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        kit::node::unmount_everything_under(&self.0);
    }
}

#[test]
fn missing_or_inconsistent_flags_are_refused_by_name() {
    let run = |args: &[&str], node_name: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hsm-secrets"));
        command.env_remove("NODE_NAME").env_remove("HSM_DEVICE");
        if let Some(name) = node_name {
            command.env("NODE_NAME", name);
        }
        let out = command.arg("node").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--catalog", "/nonexistent.yaml"], None);
    assert!(err.contains("--node-name"), "{err}");
    let err = run(
        &["--device", "prod-hsm", "--catalog", "/nonexistent.yaml"],
        Some("n1"),
    );
    assert!(
        err.contains("--pkcs11-library")
            && err.contains("--token-label")
            && err.contains("--pin-file"),
        "{err}"
    );
    let err = run(&["--catalog", "/nonexistent/catalog.yaml"], Some("n1"));
    assert!(
        err.contains("/nonexistent/catalog.yaml") && err.contains("kube"),
        "{err}"
    );
}

/// Serves the plugin without a token (static catalog, no device) with `args` added,
/// stops it with SIGTERM once its socket is up, and returns everything it wrote to its
/// stderr, which is a pipe here as under a container runtime or a log collector.
fn serve_briefly(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.yaml");
    std::fs::write(&catalog, CATALOG).unwrap();
    let socket = dir.path().join("csi.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .args(["node", "--node-name", "n1"])
        .args(args)
        .arg("--catalog")
        .arg(&catalog)
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--kubelet-dir")
        .arg(dir.path().join("kubelet"))
        .env("HSM_LOG", "info")
        .env_remove("HSM_DEVICE")
        .env_remove("HSM_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the plugin never served");
        std::thread::sleep(Duration::from_millis(50));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(status.success(), "exit {status}:\n{logs}");
    logs
}

/// `--log-format json`: every log line is one JSON object with a level and a message,
/// as log collectors expect.
#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let logs = serve_briefly(&["--log-format", "json"]);
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{logs}");
    for line in &lines {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(entry["level"].is_string(), "{line}");
        assert!(entry["fields"]["message"].is_string(), "{line}");
    }
    assert!(logs.contains("\"message\":\"serving CSI\""), "{logs}");
    assert!(logs.contains("\"message\":\"shutting down\""), "{logs}");
}

/// Plain logs into a pipe or a file carry no colour codes: those are for a terminal,
/// and in a log file they are escape sequences around every level and field name.
#[test]
fn plain_logs_written_to_a_pipe_carry_no_colour_codes() {
    let logs = serve_briefly(&["--log-format", "plain"]);
    assert!(logs.contains("serving CSI"), "{logs}");
    assert!(logs.contains("INFO"), "{logs}");
    assert!(
        !logs.contains("\x1b["),
        "ANSI escape codes in piped logs:\n{logs:?}"
    );
}

/// With `RUST_BACKTRACE=1` (common on developer machines) an error that ends the command
/// is still its message and its causes, each said once: no stack trace, no repeated
/// "Caused by" links. Here: `node` without `--catalog`, outside any cluster and with no
/// kubeconfig, is told to pass `--catalog`.
#[test]
fn an_error_is_its_message_and_causes_once_never_a_backtrace() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("no-such-kubeconfig");
    let out = Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .args(["node", "--node-name", "n1", "--endpoint"])
        .arg(format!("unix://{}", dir.path().join("csi.sock").display()))
        .arg("--kubelet-dir")
        .arg(dir.path().join("kubelet"))
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .env("KUBECONFIG", &kubeconfig)
        .env("HSM_LOG", "error")
        .env_remove("HSM_CATALOG")
        .env_remove("HSM_DEVICE")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: connect to the Kubernetes API") && err.contains("--catalog"),
        "{err}"
    );
    for trace in [
        "stack backtrace",
        "Stack backtrace",
        "Caused by",
        "anyhow::",
    ] {
        assert!(!err.contains(trace), "{trace:?} in:\n{err}");
    }
    // kube repeats each link of its chain inside the one above it; the path of the
    // missing kubeconfig is said once.
    let path = kubeconfig.display().to_string();
    assert_eq!(err.matches(&path).count(), 1, "{err}");
    assert!(err.lines().count() <= 2, "{err}");
}
