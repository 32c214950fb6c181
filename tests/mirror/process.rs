//! Agents as separate `hsm-secrets agent` processes, each on its own SoftHSM token: 1,000
//! secrets converge on both mirrors (manifests of versions and checksums equal), a mirror
//! killed with SIGKILL catches up after a restart, reads continue from the mirrors when
//! the primary is killed, and a promoted mirror takes over.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::time::Duration;

use hsm_secrets::hsm::{Expect, SecretStore, StoreError};
use hsm_secrets::mirror::{AgentConnection, RemoteStore, pb};
use kit::mirror::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(300);
/// Secrets written before the mirrors are compared.
const INITIAL: u32 = 1_000;

/// An agent process of the device `proc-dev` (the kit's launcher).
async fn spawn(tokens: &Tokens, pki: &Pki, name: &str, label: &str) -> AgentProcess {
    spawn_agent_process_with(tokens, pki, name, label, &["--device", "proc-dev"]).await
}

async fn sigkill(mut agent: AgentProcess) {
    let pid = agent.child.id().unwrap();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let status = agent.child.wait().await.unwrap();
    assert!(!status.success());
}

fn assign(role: pb::Role, epoch: u64, primary: &AgentProcess) -> pb::AssignRoleRequest {
    pb::AssignRoleRequest {
        role: role as i32,
        epoch,
        primary_node: primary.peer.node.clone(),
        primary_endpoint: primary.peer.endpoint.clone(),
        lease_duration_ms: if role == pb::Role::Primary {
            HOUR.as_millis() as u64
        } else {
            0
        },
        ..Default::default()
    }
}

/// (path, version, checksum, deleted) of every entry, as the agent lists them.
async fn listing(conn: &AgentConnection) -> Option<Vec<(String, u64, [u8; 32], bool)>> {
    let m = conn.manifest().await.ok()?;
    let mut entries: Vec<_> = m
        .entries
        .into_iter()
        .map(|e| (e.path.to_string(), e.version, e.checksum.0, e.deleted))
        .collect();
    entries.sort();
    Some(entries)
}

async fn wait_same(a: &AgentConnection, b: &AgentConnection, what: &str) {
    wait_for(WAIT, what, || async {
        let (x, y) = (listing(a).await?, listing(b).await?);
        (x == y).then_some(())
    })
    .await;
}

#[tokio::test]
async fn killed_agents_reads_continue_from_mirrors_and_a_restarted_mirror_catches_up() {
    let tokens = Tokens::new();
    if tokens.get("proc-n1").is_none() {
        return;
    }
    let pki = Pki::new(&["n1", "n2", "n3", "n4"]);
    let n1 = spawn(&tokens, &pki, "n1", "proc-n1").await;
    let n2 = spawn(&tokens, &pki, "n2", "proc-n2").await;
    let mut n3 = spawn(&tokens, &pki, "n3", "proc-n3").await;
    let c1 = pki.controller(&n1.peer.clone());
    let c2 = pki.controller(&n2.peer.clone());
    c1.assign_role(assign(pb::Role::Primary, 1, &n1))
        .await
        .unwrap();
    c2.assign_role(assign(pb::Role::ReadOnly, 1, &n1))
        .await
        .unwrap();
    pki.controller(&n3.peer.clone())
        .assign_role(assign(pb::Role::ReadOnly, 1, &n1))
        .await
        .unwrap();

    let value = |i: u32| format!("value-{i}").into_bytes();
    for i in 0..INITIAL {
        c1.put(
            &path(&format!("web/s{i}")),
            &data(&[("v", &value(i))]),
            Expect::Absent,
            1,
        )
        .await
        .unwrap();
    }
    wait_same(&c1, &c2, "n2 to converge").await;
    wait_same(&c1, &pki.controller(&n3.peer.clone()), "n3 to converge").await;

    // A node without a token (n4) reads through the agents, primary first.
    let remote = RemoteStore::new(
        "proc",
        &[n1.peer.clone(), n2.peer.clone(), n3.peer.clone()],
        hsm_secrets::mirror::AgentPool::new(&pki.tls("n4"), Duration::from_secs(30)),
    )
    .unwrap();
    let (_, d) = remote.get(&path("web/s7")).await.unwrap();
    assert_eq!(d.get("v"), Some(value(7).as_slice()));

    // A mirror dies; writes go on; it comes back on the same token and catches up.
    sigkill(n3).await;
    for i in INITIAL..INITIAL + 10 {
        c1.put(
            &path(&format!("web/s{i}")),
            &data(&[("v", &value(i))]),
            Expect::Absent,
            1,
        )
        .await
        .unwrap();
    }
    c1.delete(&path("web/s0"), Expect::Any, 1).await.unwrap();
    n3 = spawn(&tokens, &pki, "n3", "proc-n3").await;
    let c3 = pki.controller(&n3.peer.clone());
    c3.assign_role(assign(pb::Role::ReadOnly, 1, &n1))
        .await
        .unwrap();
    wait_same(&c1, &c3, "the restarted n3 to catch up").await;
    let h3 = c3.health().await.unwrap();
    assert_eq!(
        h3.device, "proc-dev",
        "the agent names the device of --device"
    );
    assert_eq!(
        h3.applied_sequence,
        c1.health().await.unwrap().applied_sequence
    );

    // The primary dies: reads continue from the mirrors, verified, without a write path.
    sigkill(n1).await;
    for i in (1..INITIAL + 10).step_by(7) {
        let (_, d) = remote.get(&path(&format!("web/s{i}"))).await.unwrap();
        assert_eq!(d.get("v"), Some(value(i).as_slice()), "web/s{i}");
    }
    assert!(matches!(
        remote.get(&path("web/s0")).await,
        Err(StoreError::NotFound { .. })
    ));
    let info = remote.health().await.unwrap();
    assert!(
        info.manufacturer.contains("n2") || info.manufacturer.contains("n3"),
        "{info:?}"
    );
    let err = remote
        .put(&path("web/new"), data(&[("v", b"x")]), Expect::Any)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("writes go to the primary's agent"),
        "{err}"
    );
    let err = c1.health().await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");

    // The controller promotes n2 at epoch 2 and points n3 at it; writes resume there.
    c2.assign_role(assign(pb::Role::Primary, 2, &n2))
        .await
        .unwrap();
    c3.assign_role(assign(pb::Role::ReadOnly, 2, &n2))
        .await
        .unwrap();
    c2.put(
        &path("web/after"),
        &data(&[("v", b"failover")]),
        Expect::Absent,
        2,
    )
    .await
    .unwrap();
    wait_same(&c2, &c3, "n3 to follow the new primary").await;
    remote
        .set_agents(&[n2.peer.clone(), n3.peer.clone()])
        .unwrap();
    let (_, d) = remote.get(&path("web/after")).await.unwrap();
    assert_eq!(d.get("v"), Some(&b"failover"[..]));
    let h3 = c3.health().await.unwrap();
    assert_eq!(
        (h3.epoch, h3.primary.as_ref().map(|p| p.node.as_str())),
        (2, Some("n2"))
    );
}
