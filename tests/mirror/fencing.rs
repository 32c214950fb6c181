//! Who may write, and when: mirrors refuse writes naming the primary, a primary whose
//! lease lapsed fences itself until renewed, stale epochs are refused everywhere, and
//! under the Active policy an acknowledged write is already on every in-sync mirror.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::time::Duration;

use hsm_secrets::crd::DeviceRole;
use hsm_secrets::hsm::{Expect, FaultKind};
use hsm_secrets::mirror::{MirrorError, pb};
use kit::mirror::*;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(300);

macro_rules! node {
    ($tokens:expr, $name:expr, $label:expr, $pki:expr, $sync:expr) => {
        match TestNode::start($tokens, $name, $label, $pki, $sync).await {
            Some(n) => n,
            None => return,
        }
    };
}

fn until(epoch: u64, length: Duration, deadline: pb::LeaseDeadline) -> pb::RenewLeaseRequest {
    pb::RenewLeaseRequest {
        epoch,
        duration_ms: length.as_millis() as u64,
        deadline: Some(deadline),
        ..Default::default()
    }
}

fn code(e: &MirrorError) -> Code {
    match e {
        MirrorError::Remote { code, .. } => *code,
        other => panic!("expected the agent's refusal, got {other}"),
    }
}

#[tokio::test]
async fn a_mirror_refuses_client_writes_and_names_the_primary() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = node!(&tokens, "n1", "ro-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "ro-n2", &pki, manual_sync());
    assign_primary(&pki, &n1, 1, &[], HOUR).await;
    assign_mirror(&pki, &n2, 1, &n1).await;
    let mirror = pki.controller(&n2.peer());
    let p = path("shop/db");
    let err = mirror
        .put(&p, &data(&[("k", b"v")]), Expect::Any, 1)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::FailedPrecondition);
    let msg = err.to_string();
    assert!(
        msg.contains("n2 is a read-only mirror at epoch 1")
            && msg.contains(&format!("writes go to the primary n1 ({})", n1.endpoint)),
        "{msg}"
    );
    let err = mirror.delete(&p, Expect::Any, 1).await.unwrap_err();
    assert!(
        err.to_string().contains("writes go to the primary n1"),
        "{err}"
    );
    assert!(
        n2.manifest().await.is_empty(),
        "nothing written on the mirror"
    );
    // Changes and Fetch are the primary's too.
    let err = mirror
        .changes(&hsm_secrets::mirror::ChangesAsk::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::FailedPrecondition);
    // The primary takes the same write.
    pki.controller(&n1.peer())
        .put(&p, &data(&[("k", b"v")]), Expect::Any, 1)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_primary_with_an_expired_lease_refuses_writes_until_renewed() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1"]);
    let n1 = node!(&tokens, "n1", "lease-n1", &pki, manual_sync());
    // Before any assignment the agent is a standby without a primary.
    let client = pki.controller(&n1.peer());
    let err = client
        .put(&path("a/b"), &data(&[("k", b"v")]), Expect::Any, 1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no primary is assigned"), "{err}");

    assign_primary(&pki, &n1, 7, &[], HOUR).await;
    client
        .put(&path("a/b"), &data(&[("k", b"1")]), Expect::Any, 7)
        .await
        .unwrap();
    // The controller stops renewing: the lease runs out (shortened here to 1 ms so the
    // test never depends on how fast the machine is).
    client
        .renew_lease(7, Duration::from_millis(1))
        .await
        .unwrap();
    wait_for(WAIT, "the lease to lapse", || async {
        (client.health().await.unwrap().write_lease_remaining_ms == 0).then_some(())
    })
    .await;
    let err = client
        .put(&path("a/b"), &data(&[("k", b"2")]), Expect::Any, 7)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::Unavailable);
    let msg = err.to_string();
    assert!(
        msg.contains("fenced: write lease expired at ")
            && msg.contains("the controller has not renewed it"),
        "{msg}"
    );
    let err = client
        .delete(&path("a/b"), Expect::Any, 7)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    let (v, d) = n1.store.get(&path("a/b")).await.unwrap();
    assert_eq!(
        d.get("k"),
        Some(&b"1"[..]),
        "the fenced write changed nothing"
    );

    // Reads continue while fenced.
    assert!(client.get(&path("a/b")).await.is_ok());

    // Renewed: writes are accepted again.
    let renewed = client.renew_lease(7, HOUR).await.unwrap();
    assert!(renewed.remaining_ms > 0);
    let w = client
        .put(&path("a/b"), &data(&[("k", b"3")]), Expect::Version(v), 7)
        .await
        .unwrap();
    assert!(w.version > v);
    assert!(client.health().await.unwrap().write_lease_remaining_ms > 0);
}

/// A grant delivered late (a partition healed, a queued request) must not let the
/// primary write past what the controller counted: leases are deadlines on the agent's
/// clock, read from its Health answer.
#[tokio::test]
async fn a_lease_grant_ends_at_its_deadline_however_late_it_arrives() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1"]);
    let n1 = node!(&tokens, "n1", "lease-n1", &pki, manual_sync());
    assign_primary(&pki, &n1, 7, &[], HOUR).await;
    let client = pki.controller(&n1.peer());
    let clock = client.health().await.unwrap().clock.unwrap();
    let deadline = |until_ms| pb::LeaseDeadline {
        clock_id: clock.id,
        until_ms,
    };

    // Delivered after its deadline: refused, and the lease held stays as it was.
    let err = client
        .renew_lease_with(until(7, HOUR, deadline(clock.now_ms)))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::FailedPrecondition);
    assert!(
        err.to_string().contains("arrived after its deadline"),
        "{err}"
    );
    let held = client.health().await.unwrap().write_lease_remaining_ms;
    assert!(
        held > 60_000,
        "the refused grant changed the lease: {held} ms"
    );

    // Computed from another process's clock: refused.
    let err = client
        .renew_lease_with(until(
            7,
            HOUR,
            pb::LeaseDeadline {
                clock_id: clock.id ^ 2,
                until_ms: u64::MAX,
            },
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("names another clock"), "{err}");

    // An hour asked for, but the deadline is 300 ms after the reading: writes stop then.
    let now = client.health().await.unwrap().clock.unwrap().now_ms;
    let granted = client
        .renew_lease_with(until(7, HOUR, deadline(now + 300)))
        .await
        .unwrap();
    assert!(granted.remaining_ms <= 300, "{}", granted.remaining_ms);
    wait_for(WAIT, "the capped lease to lapse", || async {
        (client.health().await.unwrap().write_lease_remaining_ms == 0).then_some(())
    })
    .await;
    let err = client
        .put(&path("a/b"), &data(&[("k", b"v")]), Expect::Any, 7)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("write lease expired"), "{err}");

    // A promotion delivered after its deadline is refused too: the node keeps its epoch.
    let late_promotion = client
        .assign_role(pb::AssignRoleRequest {
            role: pb::Role::Primary as i32,
            epoch: 8,
            primary_node: "n1".into(),
            primary_endpoint: n1.endpoint.clone(),
            lease_duration_ms: HOUR.as_millis() as u64,
            lease_deadline: Some(deadline(now)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        late_promotion
            .to_string()
            .contains("arrived after its deadline"),
        "{late_promotion}"
    );
    assert_eq!(client.health().await.unwrap().epoch, 7);
}

#[tokio::test]
async fn stale_epochs_are_refused_everywhere() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = node!(&tokens, "n1", "epoch-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "epoch-n2", &pki, manual_sync());
    assign_primary(&pki, &n1, 5, &[], HOUR).await;
    assign_mirror(&pki, &n2, 5, &n1).await;
    let c1 = pki.controller(&n1.peer());
    let c2 = pki.controller(&n2.peer());

    // A client still at epoch 4 (it has not seen the last promotion).
    let err = c1
        .put(&path("a/b"), &data(&[("k", b"v")]), Expect::Any, 4)
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::FailedPrecondition);
    assert!(err.to_string().contains("stale epoch 4"), "{err}");
    // A client ahead of this node: it may have been demoted meanwhile.
    let err = c1
        .put(&path("a/b"), &data(&[("k", b"v")]), Expect::Any, 6)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("newer than node n1's epoch 5"),
        "{err}"
    );
    assert!(n1.manifest().await.is_empty());

    // A controller acting on an old view is refused: role, lease.
    let err = c1.assign_role(mirror_request(4, &n2)).await.unwrap_err();
    assert!(err.to_string().contains("stale epoch 4"), "{err}");
    let err = c1.renew_lease(4, HOUR).await.unwrap_err();
    assert!(err.to_string().contains("stale epoch 4"), "{err}");
    assert_eq!(
        role_of(&c1.health().await.unwrap()),
        Some(DeviceRole::Primary)
    );

    // A push from an old term is refused by the mirror.
    let err = pki
        .agent("n1", &n2.peer())
        .replicate(pb::ReplicateRequest {
            record: None,
            epoch: 4,
            primary_node: "n1".into(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stale epoch 4"), "{err}");

    // Promoting the mirror at the epoch it follows n1 under would make two primaries.
    let err = c2
        .assign_role(pb::AssignRoleRequest {
            role: pb::Role::Primary as i32,
            epoch: 5,
            lease_duration_ms: 10_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("promotion needs a new epoch"),
        "{err}"
    );

    // After n2 is promoted at 6 and n1 demoted, n1 refuses epoch-5 writes as a mirror.
    assign_primary(&pki, &n2, 6, &[], HOUR).await;
    assign_mirror(&pki, &n1, 6, &n2).await;
    let err = c1
        .put(&path("a/b"), &data(&[("k", b"v")]), Expect::Any, 5)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("writes go to the primary n2"),
        "{err}"
    );
    c2.put(&path("a/b"), &data(&[("k", b"v")]), Expect::Any, 6)
        .await
        .unwrap();
    let err = c1.assign_role(mirror_request(5, &n2)).await.unwrap_err();
    assert!(err.to_string().contains("stale epoch 5"), "{err}");
}

#[tokio::test]
async fn under_the_active_policy_an_acknowledged_write_is_on_every_in_sync_mirror() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2", "n3"]);
    // Mirrors never pull on their own here: only the primary's pushes can deliver.
    let n1 = node!(&tokens, "n1", "act-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "act-n2", &pki, manual_sync());
    let n3 = node!(&tokens, "n3", "act-n3", &pki, manual_sync());
    assign_mirror(&pki, &n2, 1, &n1).await;
    assign_mirror(&pki, &n3, 1, &n1).await;
    assign_primary(&pki, &n1, 1, &[&n2, &n3], HOUR).await;
    let c1 = pki.controller(&n1.peer());

    for i in 0..5 {
        let p = path(&format!("pay/key-{i}"));
        let w = c1
            .put(
                &p,
                &data(&[("k", format!("v{i}").as_bytes())]),
                Expect::Any,
                1,
            )
            .await
            .unwrap();
        let mut acked = w.replicated_to.clone();
        acked.sort();
        assert_eq!(acked, ["n2", "n3"], "{w:?}");
        // Already there, at the acknowledged version, before any pull.
        for mirror in [&n2, &n3] {
            let (v, d) = mirror.store.get(&p).await.unwrap();
            assert_eq!(v, w.version);
            assert_eq!(d.get("k"), Some(format!("v{i}").as_bytes()));
        }
    }
    let w = c1.delete(&path("pay/key-0"), Expect::Any, 1).await.unwrap();
    assert_eq!(w.replicated_to.len(), 2);
    assert!(
        n3.store
            .record(&path("pay/key-0"))
            .await
            .unwrap()
            .is_deleted()
    );

    // n3 stops applying pushes: a write it did not apply is not acknowledged (it names
    // n3), and neither is the next one, until the controller takes n3 out of the write
    // set. Health shows n3 as dropping meanwhile.
    n3.plan.fail_op("apply", FaultKind::DeviceUnavailable);
    for key in ["pay/key-9", "pay/key-10"] {
        let err = c1
            .put(&path(key), &data(&[("k", b"v")]), Expect::Any, 1)
            .await
            .unwrap_err();
        assert_eq!(code(&err), Code::Unavailable);
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("write of {key} not acknowledged"))
                && msg.contains("mirror(s) n3 of the Active write set did not apply it"),
            "{msg}"
        );
    }
    assert!(n2.store.get(&path("pay/key-9")).await.is_ok());
    let replication = c1.health().await.unwrap().replication.unwrap();
    assert_eq!(replication.in_sync, ["n2"]);
    assert!(replication.dropped.is_empty(), "{replication:?}");
    assert_eq!(replication.dropping.len(), 1);
    assert_eq!(replication.dropping[0].node, "n3");
    assert!(
        replication.dropping[0].reason.contains("n3"),
        "{:?}",
        replication.dropping[0]
    );

    // The controller recorded n3 (and, wrongly, n2) outside the write set: the primary
    // stops waiting for the dropping n3 only; an in-sync mirror is never dropped this way.
    c1.renew_lease_with(pb::RenewLeaseRequest {
        epoch: 1,
        duration_ms: HOUR.as_millis() as u64,
        outside_write_set: vec!["n3".into(), "n2".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let replication = c1.health().await.unwrap().replication.unwrap();
    assert_eq!(replication.in_sync, ["n2"]);
    assert_eq!(replication.dropped.len(), 1, "{replication:?}");
    assert_eq!(replication.dropped[0].node, "n3");
    assert!(replication.dropping.is_empty());
    let w = c1
        .put(&path("pay/key-10"), &data(&[("k", b"v10")]), Expect::Any, 1)
        .await
        .unwrap();
    assert_eq!(w.replicated_to, ["n2"]);
    n3.plan.clear();

    // n3 catches up by pulling, which brings it back into the sync set.
    n3.agent.pull_now().await.unwrap();
    n3.agent.pull_now().await.unwrap();
    wait_converged(&n1, &n3, WAIT).await;
    let replication = c1.health().await.unwrap().replication.unwrap();
    let mut in_sync = replication.in_sync.clone();
    in_sync.sort();
    assert_eq!(in_sync, ["n2", "n3"], "{replication:?}");
    let w = c1
        .put(&path("pay/key-11"), &data(&[("k", b"v11")]), Expect::Any, 1)
        .await
        .unwrap();
    assert_eq!(w.replicated_to.len(), 2, "{w:?}");
    assert!(n3.store.get(&path("pay/key-11")).await.is_ok());
}

/// Under the Active policy a mirror's applied sequence follows the pushes it applies, not
/// only its pulls. The controller promotes, under Active, only a mirror whose sequence
/// reaches the cut-off primary's; a mirror holding every acknowledged write by push but
/// reporting its last pull never qualified, and the device stayed without a writer
/// until the old primary came back (seen in the partition runs: a killed Active primary
/// was never replaced).
#[tokio::test]
async fn under_the_active_policy_a_mirror_reports_what_pushes_brought_it() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = node!(&tokens, "n1", "push-seq-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "push-seq-n2", &pki, manual_sync());
    assign_mirror(&pki, &n2, 1, &n1).await;
    assign_primary(&pki, &n1, 1, &[&n2], HOUR).await;
    let (c1, c2) = (pki.controller(&n1.peer()), pki.controller(&n2.peer()));
    let first = c1
        .put(&path("pay/first"), &data(&[("k", b"v")]), Expect::Any, 1)
        .await
        .unwrap();
    // The mirror's first pass sets its cursor in the primary's history.
    n2.agent.full_pass_now().await.unwrap();
    assert_eq!(c2.health().await.unwrap().applied_sequence, first.version);
    for i in 0..4 {
        let w = c1
            .put(
                &path(&format!("pay/key-{i}")),
                &data(&[("k", format!("v{i}").as_bytes())]),
                Expect::Any,
                1,
            )
            .await
            .unwrap();
        assert_eq!(w.replicated_to, ["n2"]);
        // No pull ran: the push alone moved what the mirror vouches for.
        assert_eq!(c2.health().await.unwrap().applied_sequence, w.version);
        assert_eq!(
            c1.health().await.unwrap().applied_sequence,
            w.version,
            "the primary's sequence, for comparison"
        );
    }
}

/// Under the Active policy a mirror taken out of the write set returns to it with the
/// pull that brings it up to everything published, even when that pull had something to
/// bring. Before, only a pull finding nothing new did it, which under steady writes (a
/// write between any two pulls) never happened: a dropped mirror stayed out for as long
/// as clients wrote (seen in the partition runs).
#[tokio::test]
async fn under_the_active_policy_a_dropped_mirror_rejoins_while_writes_go_on() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = node!(&tokens, "n1", "rejoin-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "rejoin-n2", &pki, manual_sync());
    assign_mirror(&pki, &n2, 1, &n1).await;
    assign_primary(&pki, &n1, 1, &[&n2], HOUR).await;
    let c1 = pki.controller(&n1.peer());
    n2.agent.full_pass_now().await.unwrap();

    // n2 fails a push and the controller takes it out of the write set.
    n2.plan.fail_op("apply", FaultKind::DeviceUnavailable);
    c1.put(&path("pay/a"), &data(&[("k", b"a")]), Expect::Any, 1)
        .await
        .unwrap_err();
    c1.renew_lease_with(pb::RenewLeaseRequest {
        epoch: 1,
        duration_ms: HOUR.as_millis() as u64,
        outside_write_set: vec!["n2".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    n2.plan.clear();
    for round in 0..3 {
        // A write between two pulls, as under steady load: acknowledged without n2.
        let w = c1
            .put(
                &path(&format!("pay/b{round}")),
                &data(&[("k", b"b")]),
                Expect::Any,
                1,
            )
            .await
            .unwrap();
        let replication = c1.health().await.unwrap().replication.unwrap();
        if round == 0 {
            assert!(w.replicated_to.is_empty(), "{w:?}");
            assert!(replication.in_sync.is_empty(), "{replication:?}");
        } else {
            // The previous round's pull brought n2 back: this write waited for it.
            assert_eq!(w.replicated_to, ["n2"], "round {round}");
            assert_eq!(replication.in_sync, ["n2"], "round {round}");
        }
        // One pull, which has something new to bring.
        let pulled = n2.agent.pull_now().await.unwrap();
        assert!(pulled.applied > 0 || round > 0, "{pulled:?}");
    }
}
