//! `hsm-secrets controller` refuses bad flags with messages that name them.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use hsm_secrets::mirror::generate_pki;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .arg("controller")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let pki = generate_pki(dir.path(), &["controller"]).unwrap();
    let files = pki.files("controller").unwrap();
    let tls = [
        "--tls-ca",
        files.ca.to_str().unwrap(),
        "--tls-cert",
        files.cert.to_str().unwrap(),
        "--tls-key",
        files.key.to_str().unwrap(),
    ];
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();

    let mut args = vec!["--state", state, "--agent", "n1=http://127.0.0.1:1"];
    args.extend(tls);
    let (ok, err) = run(&args);
    assert!(
        !ok && err.contains("--agent") && err.contains("NODE=https://HOST:PORT"),
        "{err}"
    );

    let mut args = vec![
        "--state",
        state,
        "--agent",
        "n1=https://127.0.0.1:1",
        "--write-lease-ms",
        "500",
        "--probe-interval-ms",
        "1000",
    ];
    args.extend(tls);
    let (ok, err) = run(&args);
    assert!(
        !ok && err.contains("--write-lease-ms") && err.contains("twice"),
        "{err}"
    );

    // Neither way to find agents (the TLS flags under their manifest names).
    let agent_tls = [
        "--agent-tls-ca",
        files.ca.to_str().unwrap(),
        "--agent-tls-cert",
        files.cert.to_str().unwrap(),
        "--agent-tls-key",
        files.key.to_str().unwrap(),
    ];
    let mut args = vec!["--state", state];
    args.extend(agent_tls);
    let (ok, err) = run(&args);
    assert!(
        !ok && err.contains("--agent-port PORT") && err.contains("--agent NODE=https://"),
        "{err}"
    );

    // Discovery needs the cluster's Nodes.
    let mut args = vec!["--state", state, "--agent-port", "9443"];
    args.extend(agent_tls);
    let (ok, err) = run(&args);
    assert!(
        !ok && err.contains("--agent-port") && err.contains("--state"),
        "{err}"
    );

    let mut args = vec![
        "--state",
        state,
        "--agent",
        "n1=https://127.0.0.1:1",
        "--probe-interval-ms",
        "5",
    ];
    args.extend(tls);
    let (ok, err) = run(&args);
    assert!(!ok && err.contains("--probe-interval-ms"), "{err}");
}
