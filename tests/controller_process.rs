//! The whole failover path as separate processes: three `hsm-secrets agent` processes on
//! their own SoftHSM tokens and one `hsm-secrets controller` on the file-backed state.
//! The primary is killed with SIGKILL; the controller promotes a mirror once the old
//! write lease has lapsed, and the new primary serves every acknowledged write.
#![allow(clippy::unwrap_used)]

mod mirror_support;
mod support;

use std::time::{Duration, Instant};

use hsm_secrets::crd::{DevicePhase, HSMDeviceStatus};
use hsm_secrets::hsm::Expect;
use hsm_secrets::mirror::AgentConnection;
use hsm_secrets::state::{FileState, StateStore};
use mirror_support::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;

const TOKENS: &[&str] = &["cp-n1", "cp-n2", "cp-n3"];
const WAIT: Duration = Duration::from_secs(120);

async fn status(state: &FileState) -> HSMDeviceStatus {
    state
        .get_device("prod-hsm")
        .await
        .unwrap()
        .unwrap()
        .status
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_the_primary_process_fails_over_to_a_caught_up_mirror() {
    if token(TOKENS, "cp-n1").is_none() {
        return;
    }
    let pki = Pki::new(&["n1", "n2", "n3"]);
    let mut n1 = spawn_agent_process(TOKENS, &pki, "n1", "cp-n1").await;
    let n2 = spawn_agent_process(TOKENS, &pki, "n2", "cp-n2").await;
    let n3 = spawn_agent_process(TOKENS, &pki, "n3", "cp-n3").await;

    let dir = tempfile::tempdir().unwrap();
    let state = FileState::open(dir.path()).unwrap();
    state
        .apply_device(&support::fixtures::mirrored_device(
            Some("n1"),
            &["n2", "n3"],
            3,
        ))
        .unwrap();
    let files = pki.generated.files(CONTROLLER).unwrap();
    let agents = [&n1, &n2, &n3]
        .iter()
        .map(|p| format!("{}={}", p.peer.node, p.peer.endpoint))
        .collect::<Vec<_>>()
        .join(",");
    let _controller = Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .arg("controller")
        .arg("--state")
        .arg(dir.path())
        .args(["--agent", &agents])
        .arg("--tls-ca")
        .arg(&files.ca)
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .args([
            "--probe-interval-ms",
            "1000",
            "--write-lease-ms",
            "2000",
            "--lease-margin-ms",
            "500",
        ])
        .env("HSM_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let st = wait_for(WAIT, "bootstrap", || async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = status(&state).await;
        (s.primary_node.as_deref() == Some("n1")
            && s.phase == DevicePhase::Ready
            && s.mirrors.as_deref() == Some("2/2"))
        .then_some(s)
    })
    .await;

    let primary = pki.controller(&n1.peer);
    for i in 0..10 {
        primary
            .put(
                &path(&format!("shop/s{i}")),
                &data(&[("v", format!("{i}").as_bytes())]),
                Expect::Any,
                st.epoch,
            )
            .await
            .unwrap();
    }
    let head = primary.health().await.unwrap().applied_sequence;
    for p in [&n2, &n3] {
        let c = pki.controller(&p.peer);
        wait_for(WAIT, "mirror caught up", || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            (c.health().await.ok()?.applied_sequence >= head).then_some(())
        })
        .await;
    }

    kill(
        Pid::from_raw(n1.child.id().unwrap() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    n1.child.wait().await.unwrap();
    let killed = Instant::now();
    let (new_primary, epoch) = wait_for(WAIT, "a writable new primary", || async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = status(&state).await;
        let node = s.primary_node.filter(|p| p != "n1")?;
        let peer = [&n2, &n3]
            .into_iter()
            .find(|p| p.peer.node == node)?
            .peer
            .clone();
        let conn: AgentConnection = pki.controller(&peer);
        conn.put(
            &path("shop/after"),
            &data(&[("v", b"x")]),
            Expect::Any,
            s.epoch,
        )
        .await
        .ok()?;
        Some((peer, s.epoch))
    })
    .await;
    eprintln!("SIGKILL to a writable new primary: {:?}", killed.elapsed());
    assert_eq!(epoch, st.epoch + 1);

    let conn = pki.controller(&new_primary);
    for i in 0..10 {
        let got = conn.get(&path(&format!("shop/s{i}"))).await.unwrap();
        let record = got.record.unwrap();
        assert_eq!(
            record.data[0].value,
            format!("{i}").into_bytes(),
            "acknowledged write shop/s{i} survived"
        );
    }
    let reasons: Vec<String> = state
        .events()
        .unwrap()
        .into_iter()
        .map(|e| e.event.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "HSMFailover"), "{reasons:?}");
    assert_eq!(status(&state).await.failover_count, 1);
}
