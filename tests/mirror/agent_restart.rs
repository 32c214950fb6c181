//! An agent process killed and started again on the same SoftHSM token takes back the
//! epoch and role it held (saved on the token): a mirror resumes following its primary
//! with no new assignment, a primary refuses writes until the controller renews its
//! lease, an assignment from an older epoch is refused, a fence survives the restart,
//! and health reports the saved epoch.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::time::Duration;

use hsm_secrets::hsm::Expect;
use hsm_secrets::mirror::{MirrorError, pb};
use kit::mirror::*;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(120);
const HOUR_MS: u64 = 3_600_000;

fn assign(role: pb::Role, epoch: u64, primary: &AgentProcess) -> pb::AssignRoleRequest {
    pb::AssignRoleRequest {
        role: role as i32,
        epoch,
        primary_node: primary.peer.node.clone(),
        primary_endpoint: primary.peer.endpoint.clone(),
        lease_duration_ms: if role == pb::Role::Primary {
            HOUR_MS
        } else {
            0
        },
        ..Default::default()
    }
}

async fn restart(
    tokens: &Tokens,
    pki: &Pki,
    mut process: AgentProcess,
    label: &str,
) -> AgentProcess {
    let node = process.peer.node.clone();
    process.child.kill().await.unwrap();
    process.child.wait().await.unwrap();
    spawn_agent_process(tokens, pki, &node, label).await
}

fn code(err: MirrorError) -> (Code, String) {
    match err {
        MirrorError::Remote { code, message, .. } => (code, message),
        other => panic!("expected the agent's refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_resumes_its_saved_epoch_and_role_without_the_lease() {
    let tokens = Tokens::new();
    if tokens.get("rs-n1").is_none() {
        return;
    }
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = spawn_agent_process(&tokens, &pki, "n1", "rs-n1").await;
    let n2 = spawn_agent_process(&tokens, &pki, "n2", "rs-n2").await;
    let c1 = pki.controller(&n1.peer);
    c1.assign_role(assign(pb::Role::Primary, 3, &n1))
        .await
        .unwrap();
    pki.controller(&n2.peer)
        .assign_role(assign(pb::Role::ReadOnly, 3, &n1))
        .await
        .unwrap();
    c1.put(&path("shop/a"), &data(&[("v", b"1")]), Expect::Absent, 3)
        .await
        .unwrap();

    // The mirror dies and comes back: ReadOnly at epoch 3, following n1 again on its own
    // (no AssignRole), catching up a write made while it was down.
    let n2 = restart(&tokens, &pki, n2, "rs-n2").await;
    let c2 = pki.controller(&n2.peer);
    let h2 = c2.health().await.unwrap();
    assert_eq!(
        (h2.epoch, role_of(&h2)),
        (3, Some(hsm_secrets::crd::DeviceRole::ReadOnly))
    );
    assert_eq!(h2.primary.as_ref().map(|p| p.node.as_str()), Some("n1"));
    c1.put(&path("shop/b"), &data(&[("v", b"2")]), Expect::Absent, 3)
        .await
        .unwrap();
    let primary_sequence = c1.health().await.unwrap().applied_sequence;
    wait_for(WAIT, "the restarted mirror to catch up", || {
        let c2 = c2.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let h = c2.health().await.ok()?;
            (h.applied_sequence >= primary_sequence).then_some(())
        }
    })
    .await;
    let got = c2.get(&path("shop/b")).await.unwrap();
    assert!(
        !got.record.is_deleted(),
        "the mirror serves what it pulled after its restart"
    );

    // The primary dies and comes back: primary at epoch 3, but no lease.
    let n1 = restart(&tokens, &pki, n1, "rs-n1").await;
    let c1 = pki.controller(&n1.peer);
    let h1 = c1.health().await.unwrap();
    assert_eq!(
        (h1.epoch, role_of(&h1)),
        (3, Some(hsm_secrets::crd::DeviceRole::Primary))
    );
    assert_eq!(
        h1.write_lease_remaining_ms, 0,
        "the lease is never restored"
    );
    let (c, message) = code(
        c1.put(&path("shop/c"), &data(&[("v", b"3")]), Expect::Absent, 3)
            .await
            .unwrap_err(),
    );
    assert_eq!(c, Code::FailedPrecondition, "{message}");
    // A stale assignment from before the restart's epoch is refused.
    let (c, message) = code(
        c1.assign_role(assign(pb::Role::Primary, 2, &n1))
            .await
            .unwrap_err(),
    );
    assert!(
        message.contains('3') && message.contains('2'),
        "{c:?} {message}"
    );
    // The controller renews: writes resume, and the data written before is all there.
    c1.renew_lease(3, Duration::from_secs(60)).await.unwrap();
    c1.put(&path("shop/c"), &data(&[("v", b"3")]), Expect::Absent, 3)
        .await
        .unwrap();
    assert!(!c1.get(&path("shop/a")).await.unwrap().record.is_deleted());

    // A fence outlives a restart: no renewal revives writes under epoch 3.
    c1.fence(3).await.unwrap();
    // The fence is saved in the background; a restart right away may precede it, so
    // wait until a restart shows it (each try a real process restart).
    let mut n1 = n1;
    let mut fenced = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        n1 = restart(&tokens, &pki, n1, "rs-n1").await;
        if pki.controller(&n1.peer).health().await.unwrap().fenced {
            fenced = true;
            break;
        }
    }
    assert!(fenced, "the fence was not restored after a restart");
    let c1 = pki.controller(&n1.peer);
    let (c, message) = code(
        c1.renew_lease(3, Duration::from_secs(60))
            .await
            .unwrap_err(),
    );
    assert!(
        message.contains("fenced") || c == Code::FailedPrecondition,
        "{c:?} {message}"
    );
    // A new epoch from the controller is what brings it back.
    c1.assign_role(assign(pb::Role::Primary, 4, &n1))
        .await
        .unwrap();
    c1.put(&path("shop/d"), &data(&[("v", b"4")]), Expect::Absent, 4)
        .await
        .unwrap();
    let h1 = c1.health().await.unwrap();
    assert_eq!((h1.epoch, h1.fenced), (4, false));
}

/// A save of the agent state crashed at any step leaves the previous or the new state,
/// never a mix or nothing; the next save cleans up; secrets and gc are untouched by it.
#[tokio::test]
async fn saving_the_agent_state_is_crash_safe_at_every_step() {
    use std::sync::Arc;

    use hsm_secrets::hsm::{FaultPlan, Pkcs11Store, SecretStore};
    let Some(tok) = TestToken::new("rs-crash") else {
        return;
    };
    let plan = Arc::new(FaultPlan::new());
    let store = Pkcs11Store::open_with_faults(tok.config(), Some(plan.clone()))
        .await
        .unwrap();
    assert_eq!(store.load_agent_state().await.unwrap(), None);
    store
        .put(&path("shop/kept"), data(&[("k", b"v")]), Expect::Any)
        .await
        .unwrap();
    store.save_agent_state(b"old").await.unwrap();
    plan.clear();
    store.save_agent_state(b"new").await.unwrap();
    let steps = plan.calls();
    assert!(steps >= 3, "find, read, create, destroy...: saw {steps}");

    let (mut saw_old, mut saw_new) = (0, 0);
    for step in 1..=steps {
        store.save_agent_state(b"old").await.unwrap();
        plan.clear();
        plan.crash_at_call(step);
        let result = store.save_agent_state(b"new").await;
        plan.clear();
        match store.load_agent_state().await.unwrap().as_deref() {
            Some(b"old") => {
                saw_old += 1;
                assert!(
                    result.is_err(),
                    "step {step}: reported saved, old state loads"
                );
            }
            Some(b"new") => saw_new += 1,
            other => panic!("step {step}: loaded {other:?}"),
        }
    }
    assert!(saw_old > 0 && saw_new > 0, "old {saw_old} new {saw_new}");
    // The state is no secret: not listed, not collected, secrets intact.
    let report = store.gc().await.unwrap();
    assert_eq!(report.orphan_objects, 0, "{report:?}");
    let paths: Vec<String> = store
        .manifest()
        .await
        .unwrap()
        .iter()
        .map(|e| e.path.to_string())
        .collect();
    assert_eq!(paths, ["shop/kept"]);
    store.save_agent_state(b"last").await.unwrap();
    assert_eq!(
        store.load_agent_state().await.unwrap().as_deref(),
        Some(&b"last"[..])
    );
}

/// Writes interrupted at every step leave objects behind; an agent started on that token
/// collects them at once (under the store's write lock, so never racing a write) and the
/// token holds exactly the live secrets' objects again; the collection is counted.
#[tokio::test]
async fn an_agent_collects_the_leftovers_of_interrupted_writes_at_start() {
    use std::sync::Arc;

    use hsm_secrets::hsm::{FaultPlan, Pkcs11Store, SecretStore};
    use hsm_secrets::mirror::{Agent, AgentConfig};
    let Some(tok) = TestToken::new("rs-gc") else {
        return;
    };
    let plan = Arc::new(FaultPlan::new());
    let store = Arc::new(
        Pkcs11Store::open_with_faults(tok.config(), Some(plan.clone()))
            .await
            .unwrap(),
    );
    let p = path("shop/rotating");
    store
        .put(&p, data(&[("a", b"1"), ("b", b"2")]), Expect::Any)
        .await
        .unwrap();
    let clean = store.object_count().await.unwrap();
    plan.clear();
    store
        .put(&p, data(&[("a", b"3"), ("b", b"4")]), Expect::Any)
        .await
        .unwrap();
    let steps = plan.calls();
    for step in 2..steps {
        plan.clear();
        plan.crash_at_call(step);
        let _ = store
            .put(&p, data(&[("a", b"5"), ("b", b"6")]), Expect::Any)
            .await;
    }
    plan.clear();
    let littered = store.object_count().await.unwrap();
    assert!(
        littered > clean,
        "interrupted writes left objects: {littered} vs {clean}"
    );

    let pki = Pki::new(&["n1"]);
    let agent = Agent::start(AgentConfig::new("n1", pki.tls("n1")), store.clone()).await;
    let deadline = std::time::Instant::now() + WAIT;
    while agent.stats().gc_runs == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no collection at start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.object_count().await.unwrap(), clean);
    assert_eq!(agent.stats().gc_collected as usize, littered - clean);
    assert_eq!(
        store.get(&p).await.unwrap().1.len(),
        2,
        "the secret is whole"
    );
}
