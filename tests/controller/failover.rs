//! The controller over real agents: three SoftHSM tokens served by agents on loopback with
//! mutual TLS, the real controller loop with the gRPC adapter and the file-backed state.
//! Bootstrap elects the preferred primary; when it goes away the most caught-up mirror is
//! promoted after the threshold and the fence, and serves every acknowledged write.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_secrets::controller::{ControllerMetrics, DeviceController, GrpcAgents};
use hsm_secrets::crd::{DevicePhase, HSMDeviceStatus};
use hsm_secrets::failover::{FencingConfig, PlanConfig};
use hsm_secrets::hsm::Expect;
use hsm_secrets::mirror::AgentConnection;
use hsm_secrets::state::{FileState, StateStore};
use kit::mirror::*;

async fn round(
    ctl: &DeviceController<FileState, GrpcAgents>,
    state: &FileState,
) -> HSMDeviceStatus {
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

/// Writes `shop/s{i}` on the primary, running a controller round (which renews the write
/// lease) whenever a third of the lease has passed: on a loaded machine 20 SoftHSM writes
/// can outlast the 1.5 s lease, and a lapsed lease rightly refuses them.
async fn write_renewing(
    ctl: &DeviceController<FileState, GrpcAgents>,
    state: &FileState,
    primary: &AgentConnection,
    range: std::ops::Range<u32>,
) {
    let mut renewed = Instant::now();
    for i in range {
        if renewed.elapsed() > Duration::from_millis(400) {
            round(ctl, state).await;
            renewed = Instant::now();
        }
        primary
            .put(
                &path(&format!("shop/s{i}")),
                &data(&[("v", format!("{i}").as_bytes())]),
                Expect::Any,
                1,
            )
            .await
            .unwrap();
    }
}

/// Three agents on their own tokens, the file-backed state with the mirrored device, and a
/// controller over them (1.5 s write lease, 0.5 s margin). None when SoftHSM is absent.
struct Setup {
    pki: Pki,
    n1: TestNode,
    n2: TestNode,
    n3: TestNode,
    _dir: tempfile::TempDir,
    state: Arc<FileState>,
    ctl: DeviceController<FileState, GrpcAgents>,
    lease: Duration,
}

async fn setup() -> Option<Setup> {
    let pki = Pki::new(&["n1", "n2", "n3"]);
    // This test's own tokens: no other test's writes are ever counted here.
    let tokens = Tokens::new();
    let n1 = TestNode::start(&tokens, "n1", "ctl-n1", &pki, eager_sync()).await?;
    let n2 = TestNode::start(&tokens, "n2", "ctl-n2", &pki, eager_sync()).await?;
    let n3 = TestNode::start(&tokens, "n3", "ctl-n3", &pki, eager_sync()).await?;
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(FileState::open(dir.path()).unwrap());
    state
        .apply_device(
            &kit::resources::device("prod-hsm")
                .mirrored(Some("n1"), &["n2", "n3"])
                .sync_interval(300)
                .auto_failover(2)
                .build(),
        )
        .unwrap();
    let lease = Duration::from_millis(1500);
    let agents = Arc::new(
        GrpcAgents::new(
            &[n1.peer(), n2.peer(), n3.peer()],
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
    Some(Setup {
        pki,
        n1,
        n2,
        n3,
        _dir: dir,
        state,
        ctl,
        lease,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_promotes_the_most_caught_up_mirror_and_no_acknowledged_write_is_lost() {
    let Some(Setup {
        pki,
        mut n1,
        n2,
        n3,
        _dir,
        state,
        ctl,
        lease,
    }) = setup().await
    else {
        return;
    };

    // Bootstrap: n1 (preferred) becomes primary; the mirrors follow it.
    let status = wait_for(Duration::from_secs(60), "bootstrap", || async {
        let s = round(&ctl, &state).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        (s.primary_node.as_deref() == Some("n1") && s.phase == DevicePhase::Ready).then_some(s)
    })
    .await;
    assert_eq!(status.epoch, 1);

    // Writes acknowledged by the primary.
    let primary = pki.controller(&n1.peer());
    write_renewing(&ctl, &state, &primary, 0..20).await;
    wait_converged(&n1, &n2, Duration::from_secs(60)).await;
    wait_converged(&n1, &n3, Duration::from_secs(60)).await;
    for _ in 0..3 {
        round(&ctl, &state).await;
    }

    // The primary disappears.
    n1.cut_off().await;
    let cut = Instant::now();
    let status = wait_for(Duration::from_secs(60), "failover", || async {
        let s = round(&ctl, &state).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        (s.primary_node.as_deref().is_some_and(|p| p != "n1")).then_some(s)
    })
    .await;
    let took = cut.elapsed();
    // The old primary is alive but cut off from the controller: by the time a mirror is
    // promoted it has fenced itself, so no write is accepted by two nodes.
    let fenced = n1
        .agent
        .put(
            &path("shop/split-brain"),
            data(&[("v", b"x")]),
            Expect::Any,
            1,
        )
        .await;
    let err = fenced.expect_err("the cut-off old primary must refuse writes");
    assert!(err.to_string().contains("fenced"), "{err}");
    eprintln!("failover took {took:?}");
    assert!(
        took >= lease,
        "no promotion before the old lease lapsed ({took:?})"
    );
    assert_eq!(status.epoch, 2);
    assert_eq!(status.failover_count, 1);
    let new_primary = status.primary_node.clone().unwrap();
    let reasons: Vec<String> = state
        .events()
        .unwrap()
        .into_iter()
        .map(|e| e.event.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "HSMFailover"), "{reasons:?}");

    // Every acknowledged write is served by the new primary, which accepts writes at epoch 2.
    let node = if new_primary == "n2" { &n2 } else { &n3 };
    let conn = pki.controller(&node.peer());
    let manifest = node.manifest().await;
    assert_eq!(manifest.iter().filter(|e| !e.deleted).count(), 20);
    conn.put(&path("shop/after"), &data(&[("v", b"x")]), Expect::Any, 2)
        .await
        .unwrap();
    let stale = conn
        .put(&path("shop/stale"), &data(&[("v", b"x")]), Expect::Any, 1)
        .await;
    assert!(stale.is_err(), "a write under the old epoch is refused");
}

/// `kubectl hsm failover prod-hsm --to n2`: the controller fences the primary, waits until
/// n2 has applied everything, promotes it and clears the request. Nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_switchover_fences_waits_for_catch_up_and_loses_nothing() {
    let Some(Setup {
        pki,
        n1,
        n2,
        n3: _n3,
        _dir,
        state,
        ctl,
        ..
    }) = setup().await
    else {
        return;
    };
    wait_for(Duration::from_secs(60), "bootstrap", || async {
        let s = round(&ctl, &state).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        (s.primary_node.as_deref() == Some("n1") && s.phase == DevicePhase::Ready).then_some(s)
    })
    .await;
    let primary = pki.controller(&n1.peer());
    write_renewing(&ctl, &state, &primary, 0..20).await;

    let mut dev = state.get_device("prod-hsm").await.unwrap().unwrap();
    dev.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(hsm_secrets::crd::SWITCHOVER_ANNOTATION.into(), "n2".into());
    state.apply_device(&dev).unwrap();

    let status = wait_for(Duration::from_secs(60), "switchover", || async {
        let s = round(&ctl, &state).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        (s.primary_node.as_deref() == Some("n2")).then_some(s)
    })
    .await;
    assert_eq!(status.epoch, 2);
    // The request is cleared once the switchover completed.
    wait_for(Duration::from_secs(30), "request cleared", || async {
        round(&ctl, &state).await;
        let d = state.get_device("prod-hsm").await.unwrap().unwrap();
        let pending = d
            .metadata
            .annotations
            .is_some_and(|a| a.contains_key(hsm_secrets::crd::SWITCHOVER_ANNOTATION));
        (!pending).then_some(())
    })
    .await;
    // Zero loss: every write acknowledged by n1 is on n2, which now takes writes.
    let live = n2
        .manifest()
        .await
        .into_iter()
        .filter(|e| !e.deleted)
        .count();
    assert_eq!(live, 20);
    let conn = pki.controller(&n2.peer());
    conn.put(&path("shop/after"), &data(&[("v", b"x")]), Expect::Any, 2)
        .await
        .unwrap();
    // The old primary refuses writes under either epoch.
    assert!(
        n1.agent
            .put(&path("shop/x"), data(&[("v", b"x")]), Expect::Any, 1)
            .await
            .is_err()
    );
    assert!(
        n1.agent
            .put(&path("shop/x"), data(&[("v", b"x")]), Expect::Any, 2)
            .await
            .is_err()
    );
}
