//! A primary that crashed and restarts after a failover: real agent processes on SoftHSM
//! tokens, the controller in-process over the file-backed state. The restarted agent
//! comes back with the epoch and role saved on its token; the controller demotes it to a
//! mirror of the new primary and reports as lost writes exactly the changes it
//! acknowledged that never reached the mirror the controller promoted, and nothing when
//! every change had been replicated.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_secrets::controller::{ControllerMetrics, DeviceController, GrpcAgents};
use hsm_secrets::crd::{DevicePhase, DeviceRole, HSMDeviceStatus, LostWrites};
use hsm_secrets::failover::{FencingConfig, PlanConfig};
use hsm_secrets::hsm::Expect;
use hsm_secrets::mirror::AgentConnection;
use hsm_secrets::state::{FileState, StateStore};
use kit::mirror::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(120);

type Controller = DeviceController<FileState, GrpcAgents>;

struct Cluster {
    /// The test's tokens: a restarted agent gets its own back.
    tokens: Tokens,
    pki: Pki,
    n1: AgentProcess,
    n2: AgentProcess,
    n1_label: &'static str,
    _dir: tempfile::TempDir,
    state: Arc<FileState>,
    ctl: Controller,
}

/// Two agent processes (n1 preferred primary, n2 its mirror, policy ReadOnly) and a
/// controller over them with a 5 s write lease, long enough for rounds that wait out
/// the probe of a stopped agent. None when SoftHSM is absent.
async fn cluster(l1: &'static str, l2: &'static str) -> Option<Cluster> {
    let tokens = Tokens::new();
    tokens.get(l1)?;
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = spawn_agent_process(&tokens, &pki, "n1", l1).await;
    let n2 = spawn_agent_process(&tokens, &pki, "n2", l2).await;
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(FileState::open(dir.path()).unwrap());
    state
        .apply_device(
            &kit::resources::device("prod-hsm")
                .mirrored(Some("n1"), &["n2"])
                .sync_interval(300)
                .auto_failover(2)
                .build(),
        )
        .unwrap();
    let lease = Duration::from_secs(5);
    let agents = Arc::new(
        GrpcAgents::new(
            &[n1.peer.clone(), n2.peer.clone()],
            &pki.tls(CONTROLLER),
            Duration::from_secs(2),
            lease,
        )
        .unwrap(),
    );
    let config = PlanConfig {
        fencing: FencingConfig {
            lease_duration: lease,
            safety_margin: Duration::from_millis(500),
        },
        ..PlanConfig::default()
    };
    let ctl = DeviceController::new(state.clone(), agents, config, ControllerMetrics::default());
    Some(Cluster {
        tokens,
        pki,
        n1,
        n2,
        n1_label: l1,
        _dir: dir,
        state,
        ctl,
    })
}

async fn round(ctl: &Controller, state: &FileState) -> HSMDeviceStatus {
    let dev = state.get_device("prod-hsm").await.unwrap().unwrap();
    ctl.reconcile(&dev).await.unwrap();
    state
        .get_device("prod-hsm")
        .await
        .unwrap()
        .unwrap()
        .status
        .unwrap_or_default()
}

/// Writes `shop/s{i}` through `primary` at `epoch`, with a controller round (which renews
/// the write lease) whenever a second has passed.
async fn write_renewing(
    c: &Cluster,
    primary: &AgentConnection,
    epoch: u64,
    range: std::ops::Range<u32>,
) {
    let mut renewed = Instant::now();
    for i in range {
        if renewed.elapsed() > Duration::from_secs(1) {
            round(&c.ctl, &c.state).await;
            renewed = Instant::now();
        }
        primary
            .put(
                &path(&format!("shop/s{i}")),
                &data(&[("v", format!("{i}").as_bytes())]),
                Expect::Any,
                epoch,
            )
            .await
            .unwrap();
    }
}

async fn applied(conn: &AgentConnection) -> u64 {
    conn.health().await.unwrap().applied_sequence
}

async fn wait_caught_up(mirror: &AgentConnection, sequence: u64) {
    wait_for(WAIT, "the mirror to catch up", || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        (applied(mirror).await >= sequence).then_some(())
    })
    .await;
}

fn n1_lost(s: &HSMDeviceStatus) -> Option<LostWrites> {
    s.nodes
        .iter()
        .find(|n| n.node == "n1")
        .and_then(|n| n.lost_writes.clone())
}

/// The shared scenario: n1 acknowledges 8 writes, all replicated; with `unreplicated`
/// the mirror is stopped (SIGSTOP) and n1 acknowledges 5 more. n1 is SIGKILLed, n2
/// promoted and written to, n1 restarted on its address. Returns the sequences n2 and
/// n1 had applied before the kill and every lostWrites the status showed for n1 from
/// its restart until it has rejoined and caught up.
async fn crash_promote_restart(mut c: Cluster, unreplicated: bool) -> (u64, u64, Vec<LostWrites>) {
    let bootstrap = wait_for(WAIT, "bootstrap", || async {
        let s = round(&c.ctl, &c.state).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        (s.primary_node.as_deref() == Some("n1") && s.phase == DevicePhase::Ready).then_some(s)
    })
    .await;
    assert_eq!(bootstrap.epoch, 1);
    let c1 = c.pki.controller(&c.n1.peer);
    let c2 = c.pki.controller(&c.n2.peer);

    write_renewing(&c, &c1, 1, 0..8).await;
    wait_caught_up(&c2, applied(&c1).await).await;
    let replicated = applied(&c2).await;
    if unreplicated {
        let pid = Pid::from_raw(c.n2.child.id().unwrap() as i32);
        kill(pid, Signal::SIGSTOP).unwrap();
        write_renewing(&c, &c1, 1, 8..13).await;
        let acknowledged = applied(&c1).await;
        c.n1.child.kill().await.unwrap();
        c.n1.child.wait().await.unwrap();
        kill(pid, Signal::SIGCONT).unwrap();
        assert_eq!(acknowledged - replicated, 5, "one sequence per write");
    } else {
        c.n1.child.kill().await.unwrap();
        c.n1.child.wait().await.unwrap();
    }
    let acknowledged_by_n1 = if unreplicated {
        replicated + 5
    } else {
        replicated
    };

    let promoted = wait_for(WAIT, "n2 promoted", || async {
        let s = round(&c.ctl, &c.state).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        (s.primary_node.as_deref() == Some("n2")).then_some(s)
    })
    .await;
    assert_eq!(promoted.epoch, 2);
    // The new primary takes writes of its own before n1 is back.
    write_renewing(&c, &c2, 2, 100..103).await;
    let n2_sequence = applied(&c2).await;

    let listen =
        c.n1.peer
            .endpoint
            .trim_start_matches("https://")
            .to_string();
    c.n1 = spawn_agent_process_at(&c.tokens, &c.pki, "n1", c.n1_label, &listen, &[]).await;
    let c1 = c.pki.controller(&c.n1.peer);
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let s = round(&c.ctl, &c.state).await;
        seen.extend(n1_lost(&s));
        let rejoined = match (c1.health().await, s.nodes.iter().find(|n| n.node == "n1")) {
            (Ok(h), Some(entry)) => {
                h.epoch == 2
                    && h.role != Some(hsm_secrets::crd::DeviceRole::Primary)
                    && entry.role != DeviceRole::Primary
                    && h.applied_sequence >= n2_sequence
            }
            _ => false,
        };
        if rejoined {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n1 did not rejoin as a caught-up mirror: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A few more rounds: a report may only come once the controller has seen it catch up.
    for _ in 0..3 {
        seen.extend(n1_lost(&round(&c.ctl, &c.state).await));
    }
    assert_eq!(
        round(&c.ctl, &c.state).await.primary_node.as_deref(),
        Some("n2"),
        "no automatic failback"
    );
    // The returned node refuses writes under either epoch and sends writers to n2.
    for epoch in [1, 2] {
        let err = c1
            .put(
                &path("shop/late"),
                &data(&[("v", b"x")]),
                Expect::Any,
                epoch,
            )
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("not the primary") && msg.contains("writes go to the primary n2"),
            "epoch {epoch}: {msg}"
        );
    }
    // Everything the mirror had before the crash, and n2's own writes, are on both.
    for i in (0..8).chain(100..103) {
        let at = path(&format!("shop/s{i}"));
        for conn in [&c1, &c2] {
            let record = conn.get(&at).await.unwrap().record;
            assert_eq!(
                kit::mirror::only_value(&record),
                Some(i.to_string().into_bytes())
            );
        }
    }
    (replicated, acknowledged_by_n1, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_primary_whose_writes_all_reached_the_mirror_reports_no_lost_writes() {
    let Some(c) = cluster("rj-n1", "rj-n2").await else {
        return;
    };
    let (_, _, seen) = crash_promote_restart(c, false).await;
    assert!(seen.is_empty(), "nothing was lost: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_primary_reports_exactly_the_writes_the_mirror_never_received() {
    let Some(c) = cluster("lw-n1", "lw-n2").await else {
        return;
    };
    let (replicated, acknowledged, seen) = crash_promote_restart(c, true).await;
    eprintln!("replicated {replicated}, acknowledged {acknowledged}, reported {seen:?}");
    assert!(!seen.is_empty(), "the unreplicated writes are reported");
    for lost in &seen {
        assert_eq!(
            (lost.epoch, lost.from_sequence, lost.to_sequence),
            (1, replicated + 1, acknowledged),
            "{seen:?}"
        );
    }
}
