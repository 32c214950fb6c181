//! The sync engine between agents on real SoftHSM tokens, over gRPC with mutual TLS:
//! convergence, tombstones, repair of damaged tokens, forged records, the cost of a
//! pass with nothing to do, and a returning old primary's lost writes.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hsm_secrets::crd::DeviceRole;
use hsm_secrets::hsm::{
    Body, Expect, GcReport, ManifestEntry, Pkcs11Store, Record, SecretData, SecretPath,
    SecretStore, StoreError, TokenInfo,
};
use hsm_secrets::mirror::{Agent, AgentConfig, Peer, pb};
use kit::mirror::*;
use tonic::Code;

const CONVERGE: Duration = Duration::from_secs(900);

/// A node on the test's own token `label` (see `Tokens`), or return (skip) without SoftHSM.
macro_rules! node {
    ($tokens:expr, $name:expr, $label:expr, $pki:expr, $sync:expr) => {
        match TestNode::start($tokens, $name, $label, $pki, $sync).await {
            Some(n) => n,
            None => return,
        }
    };
}

#[tokio::test]
async fn a_thousand_secrets_converge_on_both_mirrors_with_verified_checksums() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2", "n3"]);
    let n1 = node!(&tokens, "n1", "conv-n1", &pki, eager_sync());
    let n2 = node!(&tokens, "n2", "conv-n2", &pki, eager_sync());
    let n3 = node!(&tokens, "n3", "conv-n3", &pki, eager_sync());
    assign_primary(&pki, &n1, 1, &[], HOUR).await;
    assign_mirror(&pki, &n2, 1, &n1).await;
    assign_mirror(&pki, &n3, 1, &n1).await;

    // Written through the primary's agent while the mirrors pull.
    let client = pki.controller(&n1.peer());
    for i in 0..1000u32 {
        let d = data(&[
            ("user", format!("user-{i}").as_bytes()),
            ("password", &i.to_be_bytes()),
        ]);
        let p = path(&format!("ns{}/secret-{i}", i % 4));
        let r = client.put(&p, &d, Expect::Absent, 1).await.unwrap();
        assert!(r.version > 0);
    }
    let primary = n1.manifest().await;
    assert_eq!(primary.len(), 1000);
    wait_converged(&n1, &n2, CONVERGE).await;
    wait_converged(&n1, &n3, CONVERGE).await;

    // Every record on the mirrors reads back intact (the store verifies each checksum)
    // and carries exactly the primary's version and checksum.
    for mirror in [&n2, &n3] {
        for e in &primary {
            let r = mirror.store.record(&e.path).await.unwrap();
            assert_eq!(
                (r.version, r.checksum),
                (e.version, e.checksum),
                "{}",
                e.path
            );
            r.verify().unwrap();
        }
        let sequence = n1.agent.store().latest_sequence();
        let health = wait_for(
            CONVERGE,
            "the mirror to report the primary's sequence",
            || async {
                let h = pki.controller(&mirror.peer()).health().await.unwrap();
                (h.applied_sequence == sequence).then_some(h)
            },
        )
        .await;
        assert_eq!(role_of(&health), Some(DeviceRole::ReadOnly));
        assert_eq!(health.primary.as_ref().map(|p| p.node.as_str()), Some("n1"));
        let sync = health.sync.unwrap();
        assert!(
            sync.last_sync.is_some() && sync.last_error.is_none(),
            "{sync:?}"
        );
        assert_eq!(sync.checksum_failures, 0);
    }
}

#[tokio::test]
async fn deletes_propagate_as_tombstones_and_never_come_back() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = node!(&tokens, "n1", "del-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "del-n2", &pki, manual_sync());
    assign_primary(&pki, &n1, 1, &[], HOUR).await;
    assign_mirror(&pki, &n2, 1, &n1).await;
    let client = pki.controller(&n1.peer());
    for i in 0..20 {
        client
            .put(
                &path(&format!("shop/s{i}")),
                &data(&[("k", b"v")]),
                Expect::Any,
                1,
            )
            .await
            .unwrap();
    }
    n2.agent.pull_now().await.unwrap();
    wait_converged(&n1, &n2, CONVERGE).await;

    let deleted: Vec<SecretPath> = (0..20)
        .step_by(3)
        .map(|i| path(&format!("shop/s{i}")))
        .collect();
    for p in &deleted {
        client.delete(p, Expect::Any, 1).await.unwrap();
    }
    let report = n2.agent.pull_now().await.unwrap();
    assert_eq!(report.applied, deleted.len() as u64);
    let mirror_client = pki.controller(&n2.peer());
    for p in &deleted {
        let r = n2.store.record(p).await.unwrap();
        assert!(
            matches!(r.body, Body::Deleted),
            "{p} is a tombstone on the mirror"
        );
        let err = mirror_client.get(p).await.unwrap_err();
        assert!(
            matches!(
                err,
                hsm_secrets::mirror::MirrorError::Remote {
                    code: Code::NotFound,
                    ..
                }
            ),
            "{err}"
        );
    }
    wait_converged(&n1, &n2, CONVERGE).await;

    // Neither a full verification pass nor further pulls bring a deleted secret back.
    let pass = n2.agent.full_pass_now().await.unwrap();
    assert_eq!(
        (pass.fetched, pass.purged, pass.repaired),
        (0, 0, 0),
        "{pass:?}"
    );
    n2.agent.pull_now().await.unwrap();
    for p in &deleted {
        assert!(n2.store.record(p).await.unwrap().is_deleted());
        assert!(matches!(
            n2.store.get(p).await,
            Err(StoreError::NotFound { .. })
        ));
    }
    // A secret re-created after its deletion is a new version, not a resurrection.
    let v = client
        .put(&deleted[0], &data(&[("k", b"again")]), Expect::Absent, 1)
        .await
        .unwrap()
        .version;
    n2.agent.pull_now().await.unwrap();
    assert_eq!(n2.store.get(&deleted[0]).await.unwrap().0, v);
    wait_converged(&n1, &n2, CONVERGE).await;
}

#[tokio::test]
async fn damaged_objects_on_a_mirror_are_found_and_repaired_by_the_verification_pass() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = node!(&tokens, "n1", "rep-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "rep-n2", &pki, manual_sync());
    assign_primary(&pki, &n1, 1, &[], HOUR).await;
    assign_mirror(&pki, &n2, 1, &n1).await;
    let client = pki.controller(&n1.peer());
    for i in 0..10 {
        let d = data(&[("a", format!("a{i}").as_bytes()), ("b", b"bbb")]);
        client
            .put(&path(&format!("app/s{i}")), &d, Expect::Any, 1)
            .await
            .unwrap();
    }
    n2.agent.pull_now().await.unwrap();
    wait_converged(&n1, &n2, CONVERGE).await;

    // Behind the store's back: one key's object destroyed, one secret's metadata gone.
    let raw = RawToken::open(&n2.token.label);
    raw.destroy_one_data_object(&path("app/s3"));
    raw.destroy_metadata(&path("app/s7"));
    let err = n2.store.record(&path("app/s3")).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(n2.manifest().await.iter().all(|e| e.path != path("app/s7")));
    // A pull does not notice: nothing changed on the primary.
    assert_eq!(n2.agent.pull_now().await.unwrap().applied, 0);

    let pass = n2.agent.full_pass_now().await.unwrap();
    assert_eq!(pass.repaired, 1, "{pass:?}");
    assert_eq!(
        pass.fetched, 2,
        "the damaged and the missing secret: {pass:?}"
    );
    assert!(pass.lost_writes.is_empty(), "{pass:?}");
    assert_eq!(pass.checked, 10);
    for p in ["app/s3", "app/s7"] {
        let r = n2.store.record(&path(p)).await.unwrap();
        assert_eq!(r, n1.store.record(&path(p)).await.unwrap());
    }
    wait_converged(&n1, &n2, CONVERGE).await;
    let health = pki.controller(&n2.peer()).health().await.unwrap();
    assert_eq!(health.sync.unwrap().last_full_pass.unwrap().repaired, 1);
}

/// What a [`HookedStore`] does around a read of its target secret.
type BeforeRead = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// A store whose reads of one secret can be tampered with: `forging` set answers them
/// with altered content under the original checksum (what a corrupted transfer or a
/// hostile primary would send); `before_read`, once armed, runs just before the next read
/// (a write racing the read).
struct HookedStore {
    inner: Pkcs11Store,
    target: SecretPath,
    forging: Arc<AtomicBool>,
    before_read: std::sync::Mutex<Option<BeforeRead>>,
}

impl HookedStore {
    fn new(inner: Pkcs11Store, target: SecretPath) -> Self {
        Self {
            inner,
            target,
            forging: Arc::default(),
            before_read: std::sync::Mutex::new(None),
        }
    }
}

#[async_trait]
impl SecretStore for HookedStore {
    fn token_label(&self) -> &str {
        self.inner.token_label()
    }
    async fn record(&self, p: &SecretPath) -> Result<Record, StoreError> {
        if *p == self.target {
            let hook = self.before_read.lock().unwrap().take();
            if let Some(hook) = hook {
                hook().await;
            }
        }
        let mut r = self.inner.record(p).await?;
        if *p == self.target && self.forging.load(Ordering::SeqCst) {
            let mut evil = SecretData::new();
            evil.insert("k", b"forged".to_vec()).unwrap();
            r.body = Body::Live(evil);
        }
        Ok(r)
    }
    async fn put(&self, p: &SecretPath, d: SecretData, e: Expect) -> Result<u64, StoreError> {
        self.inner.put(p, d, e).await
    }
    async fn delete(&self, p: &SecretPath, e: Expect) -> Result<u64, StoreError> {
        self.inner.delete(p, e).await
    }
    async fn apply(&self, r: Record) -> Result<bool, StoreError> {
        self.inner.apply(r).await
    }
    async fn purge(&self, p: &SecretPath) -> Result<bool, StoreError> {
        self.inner.purge(p).await
    }
    async fn manifest(&self) -> Result<Vec<ManifestEntry>, StoreError> {
        self.inner.manifest().await
    }
    fn latest_sequence(&self) -> u64 {
        self.inner.latest_sequence()
    }
    async fn health(&self) -> Result<TokenInfo, StoreError> {
        self.inner.health().await
    }
    async fn gc(&self) -> Result<GcReport, StoreError> {
        self.inner.gc().await
    }
}

/// An agent serving `store` as `name`'s primary at epoch 1, and its endpoint.
async fn serve_primary(pki: &Pki, name: &str, store: Arc<dyn SecretStore>) -> (Agent, Peer) {
    let mut cfg = AgentConfig::new(name, pki.tls(name));
    cfg.sync = manual_sync();
    let agent = Agent::start(cfg, store).await;
    let listener = hsm_secrets::mirror::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let peer = Peer {
        node: name.into(),
        endpoint: format!("https://{}", listener.local_addr().unwrap()),
    };
    tokio::spawn(hsm_secrets::mirror::serve(
        agent.clone(),
        listener,
        std::future::pending(),
    ));
    pki.controller(&peer)
        .assign_role(pb::AssignRoleRequest {
            role: pb::Role::Primary as i32,
            epoch: 1,
            lease_duration_ms: HOUR.as_millis() as u64,
            ..Default::default()
        })
        .await
        .unwrap();
    (agent, peer)
}

/// The token keeps only each secret's newest version. A write landing between the change
/// feed's index snapshot and its read of that secret leaves the listed version gone: the
/// answer must not claim the snapshot's point without it (a mirror or an archive segment
/// would then miss that secret's acknowledged writes up to there); it reads on until its
/// records describe the point it claims exactly.
#[tokio::test]
async fn a_write_racing_the_change_feed_never_leaves_a_point_claimed_without_it() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1"]);
    let Some(token) = tokens.get("race-n1") else {
        return;
    };
    let hot = path("bank/hot");
    let store = Arc::new(HookedStore::new(token.open().await, hot.clone()));
    let (agent, peer) = serve_primary(&pki, "n1", store.clone()).await;
    let client = pki.controller(&peer);
    // The history of writes, as (version, path, value).
    let mut history = Vec::new();
    for (p, v) in [("bank/hot", "1"), ("bank/cold", "2"), ("bank/hot", "3")] {
        let version = client
            .put(&path(p), &data(&[("k", v.as_bytes())]), Expect::Any, 1)
            .await
            .unwrap()
            .version;
        history.push((version, p.to_string(), v.to_string()));
    }
    // The hot secret is written again while the feed reads it.
    let racer = pki.controller(&peer);
    let raced = Arc::new(std::sync::Mutex::new(None));
    let seen = raced.clone();
    *store.before_read.lock().unwrap() = Some(Arc::new(move || {
        let (racer, seen) = (racer.clone(), seen.clone());
        Box::pin(async move {
            let version = racer
                .put(&path("bank/hot"), &data(&[("k", b"4")]), Expect::Any, 1)
                .await
                .unwrap()
                .version;
            *seen.lock().unwrap() = Some(version);
        })
    }));
    let answer = agent
        .changes(hsm_secrets::mirror::ChangesAsk {
            since: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    let racing_version = raced.lock().unwrap().expect("the racing write ran");
    history.push((racing_version, "bank/hot".into(), "4".into()));
    // What the answer claims (the state at `through`) is exactly what its records hold.
    let mut expected = std::collections::BTreeMap::new();
    for (version, p, v) in history.iter().filter(|(v, ..)| *v <= answer.through) {
        expected.insert(p.clone(), (*version, v.clone()));
    }
    let mut held = std::collections::BTreeMap::new();
    for record in &answer.records {
        let value = String::from_utf8(only_value(record).unwrap()).unwrap();
        held.insert(record.path.to_string(), (record.version, value));
    }
    assert_eq!(
        held, expected,
        "the answer claims sequence {} ({:?})",
        answer.through, answer
    );
    assert!(
        answer.through >= racing_version,
        "the answer reads on past the racing write ({answer:?})"
    );
}

#[tokio::test]
async fn forged_records_are_never_applied() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2"]);
    // The primary's agent serves a store that forges one secret on demand.
    let Some(token) = tokens.get("forge-n1") else {
        return;
    };
    let target = path("bank/vault");
    let forging_store = HookedStore::new(token.open().await, target.clone());
    let forging = forging_store.forging.clone();
    let (_primary, n1_peer) = serve_primary(&pki, "n1", Arc::new(forging_store)).await;
    let n2 = node!(&tokens, "n2", "forge-n2", &pki, manual_sync());
    let controller = pki.controller(&n1_peer);
    pki.controller(&n2.peer())
        .assign_role(pb::AssignRoleRequest {
            role: pb::Role::ReadOnly as i32,
            epoch: 1,
            primary_node: "n1".into(),
            primary_endpoint: n1_peer.endpoint.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    n2.agent.pull_now().await.unwrap();

    controller
        .put(&path("bank/before"), &data(&[("k", b"1")]), Expect::Any, 1)
        .await
        .unwrap();
    controller
        .put(&target, &data(&[("k", b"genuine")]), Expect::Any, 1)
        .await
        .unwrap();
    controller
        .put(&path("bank/after"), &data(&[("k", b"3")]), Expect::Any, 1)
        .await
        .unwrap();

    // Pulled while forged: refused, counted, and the pull stops before it.
    forging.store(true, Ordering::SeqCst);
    let err = n2.agent.pull_now().await.unwrap_err();
    assert_eq!(err.kind(), "checksum_mismatch", "{err}");
    assert!(err.to_string().contains("bank/vault"), "{err}");
    assert!(matches!(
        n2.store.record(&target).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(n2.store.record(&path("bank/before")).await.is_ok());
    let state = n2.agent.sync_state();
    assert_eq!(state.checksum_failures, 1);
    assert_eq!(
        state.last_error.as_ref().map(|e| e.0),
        Some("checksum_mismatch")
    );
    // Asked again, and refused again, while the forgery lasts; a full pass refuses too.
    assert!(n2.agent.pull_now().await.is_err());
    let pass = n2.agent.full_pass_now().await.unwrap();
    assert_eq!(pass.checksum_failures, 1, "{pass:?}");
    assert!(matches!(
        n2.store.record(&target).await,
        Err(StoreError::NotFound { .. })
    ));
    let health = pki.controller(&n2.peer()).health().await.unwrap();
    assert!(health.sync.unwrap().checksum_failures >= 3);

    // The genuine record is fetched again once the primary serves it intact.
    forging.store(false, Ordering::SeqCst);
    n2.agent.pull_now().await.unwrap();
    let (_, d) = n2.store.get(&target).await.unwrap();
    assert_eq!(d.get("k"), Some(&b"genuine"[..]));
    assert!(n2.store.record(&path("bank/after")).await.is_ok());

    // A forged push is refused the same way and leaves the mirror's copy alone.
    let mut forged = Record::live(target.clone(), 99, data(&[("k", b"genuine")]));
    forged.body = Body::Live(data(&[("k", b"forged")]));
    let err = pki
        .agent("n1", &n2.peer())
        .replicate(push_request(
            &forged.path,
            forged.version,
            &forged.checksum.0,
            &[("k", b"forged")],
            "n1",
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            hsm_secrets::mirror::MirrorError::Remote {
                code: Code::DataLoss,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        n2.store.get(&target).await.unwrap().1.get("k"),
        Some(&b"genuine"[..])
    );
    assert_eq!(n2.agent.stats().pushes_refused, 1);
}

#[tokio::test]
async fn a_pass_with_nothing_new_touches_no_token_whatever_the_size() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = node!(&tokens, "n1", "cost-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "cost-n2", &pki, manual_sync());
    assign_primary(&pki, &n1, 1, &[], HOUR).await;
    assign_mirror(&pki, &n2, 1, &n1).await;
    let client = pki.controller(&n1.peer());
    let mut written = 0u32;
    for total in [10u32, 200] {
        while written < total {
            client
                .put(
                    &path(&format!("ns/s{written}")),
                    &data(&[("v", &written.to_be_bytes())]),
                    Expect::Absent,
                    1,
                )
                .await
                .unwrap();
            written += 1;
        }
        n2.agent.pull_now().await.unwrap();
        wait_converged(&n1, &n2, CONVERGE).await;

        n1.plan.clear();
        n2.plan.clear();
        let before = n1.agent.stats();
        let report = n2.agent.pull_now().await.unwrap();
        let after = n1.agent.stats();
        assert_eq!(report.applied, 0);
        assert_eq!(report.calls, 1, "one Changes call");
        assert_eq!(
            after.changes_answered_from_index - before.changes_answered_from_index,
            1,
            "answered from the change index"
        );
        assert_eq!(
            n1.plan.calls(),
            0,
            "primary store untouched at {total} secrets"
        );
        assert_eq!(
            n2.plan.calls(),
            0,
            "mirror store untouched at {total} secrets"
        );
    }

    // Three changes among 200 cost three reads on the primary and three applies here.
    for i in [5u32, 50, 150] {
        client
            .put(
                &path(&format!("ns/s{i}")),
                &data(&[("v", b"changed")]),
                Expect::Any,
                1,
            )
            .await
            .unwrap();
    }
    n1.plan.clear();
    n2.plan.clear();
    let report = n2.agent.pull_now().await.unwrap();
    assert_eq!(report.applied, 3);
    assert_eq!(n1.plan.calls(), 3, "one read per changed secret");
    assert_eq!(n2.plan.calls(), 3, "one apply per changed secret");
    wait_converged(&n1, &n2, CONVERGE).await;
}

#[tokio::test]
async fn a_demoted_primary_converges_and_reports_its_lost_writes() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2", "n3"]);
    let mut n1 = node!(&tokens, "n1", "lost-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "lost-n2", &pki, manual_sync());
    let n3 = node!(&tokens, "n3", "lost-n3", &pki, manual_sync());
    assign_primary(&pki, &n1, 1, &[], HOUR).await;
    assign_mirror(&pki, &n2, 1, &n1).await;
    assign_mirror(&pki, &n3, 1, &n1).await;
    let c1 = pki.controller(&n1.peer());
    for name in ["a", "b", "c", "d", "e"] {
        c1.put(
            &path(&format!("team/{name}")),
            &data(&[("k", name.as_bytes())]),
            Expect::Any,
            1,
        )
        .await
        .unwrap();
    }
    n2.agent.pull_now().await.unwrap();
    n3.agent.pull_now().await.unwrap();
    wait_converged(&n1, &n2, CONVERGE).await;

    // n1 is cut off from the others but still holds its lease: these writes reach no
    // mirror.
    n1.cut_off().await;
    let mut lost = BTreeSet::new();
    for (name, value) in [("x", "new"), ("y", "new"), ("c", "overwritten")] {
        let p = path(&format!("team/{name}"));
        let v = n1
            .agent
            .put(&p, data(&[("k", value.as_bytes())]), Expect::Any, 1)
            .await
            .unwrap()
            .version;
        lost.insert((p.to_string(), v));
    }
    let v = n1
        .agent
        .delete(&path("team/e"), Expect::Any, 1)
        .await
        .unwrap()
        .version;
    lost.insert(("team/e".to_string(), v));

    // The controller promotes n2 at epoch 2; n3 follows it; n2 takes new writes.
    assign_primary(&pki, &n2, 2, &[], HOUR).await;
    assign_mirror(&pki, &n3, 2, &n2).await;
    let c2 = pki.controller(&n2.peer());
    c2.put(
        &path("team/z"),
        &data(&[("k", b"after failover")]),
        Expect::Any,
        2,
    )
    .await
    .unwrap();
    c2.put(&path("team/a"), &data(&[("k", b"a2")]), Expect::Any, 2)
        .await
        .unwrap();
    c2.delete(&path("team/d"), Expect::Any, 2).await.unwrap();

    // n1 returns and is demoted to a mirror of n2: its first act is a full pass.
    n1.serve().await;
    let c1 = pki.controller(&n1.peer());
    c1.assign_role(mirror_request(2, &n2)).await.unwrap();
    let pass = wait_for(CONVERGE, "n1's rejoin pass", || async {
        n1.agent.sync_state().last_full_pass.filter(|p| p.rejoin)
    })
    .await;
    let reported: BTreeSet<(String, u64)> = pass
        .lost_writes
        .iter()
        .map(|l| (l.path.to_string(), l.version))
        .collect();
    assert_eq!(reported, lost, "{pass:?}");
    assert!(
        pass.lost_writes
            .iter()
            .any(|l| l.deleted && l.path == path("team/e"))
    );
    wait_converged(&n2, &n1, CONVERGE).await;
    assert_eq!(
        n1.store.get(&path("team/c")).await.unwrap().1.get("k"),
        Some(&b"c"[..]),
        "n1 follows the new primary's history"
    );
    assert!(matches!(
        n1.store.record(&path("team/x")).await,
        Err(StoreError::NotFound { .. })
    ));

    // Health keeps the lost writes for the controller to report; n1 refuses writes and
    // names the new primary; n3 (which never saw them) reports none.
    let health = c1.health().await.unwrap();
    assert_eq!(role_of(&health), Some(DeviceRole::ReadOnly));
    assert_eq!(
        (
            health.epoch,
            health.primary.as_ref().map(|p| p.node.as_str())
        ),
        (2, Some("n2"))
    );
    assert_eq!(health.sync.unwrap().lost_writes.len(), lost.len());
    let err = c1
        .put(&path("team/q"), &data(&[("k", b"v")]), Expect::Any, 2)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("writes go to the primary n2"),
        "{err}"
    );
    let n3_pass = n3.agent.full_pass_now().await.unwrap();
    assert!(n3_pass.lost_writes.is_empty(), "{n3_pass:?}");
    n3.agent.pull_now().await.unwrap();
    wait_converged(&n2, &n3, CONVERGE).await;
}

/// A push is accepted only in sequence: a version far ahead of what the mirror applied
/// (the forged replication of a leaked agent certificate), or near the top of the integer
/// range, is refused with a clear error, counted, shown in Health, and never applied; the
/// real primary's next push still goes through.
#[tokio::test]
async fn pushes_out_of_sequence_are_refused_counted_and_shown() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = node!(&tokens, "n1", "seq-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "seq-n2", &pki, manual_sync());
    assign_primary(&pki, &n1, 1, &[], HOUR).await;
    assign_mirror(&pki, &n2, 1, &n1).await;
    let controller = pki.controller(&n1.peer());
    controller
        .put(&path("app/a"), &data(&[("k", b"1")]), Expect::Any, 1)
        .await
        .unwrap();
    n2.agent.pull_now().await.unwrap();
    let applied = n2.store.latest_sequence();

    let push = |version: u64, value: &'static [u8]| {
        let record = Record::live(path("app/forged"), version, data(&[("k", value)]));
        push_request(
            &record.path,
            version,
            &record.checksum.0,
            &[("k", value)],
            "n1",
        )
    };
    for version in [applied + 5_000, u64::MAX] {
        let err = pki
            .agent("n1", &n2.peer())
            .replicate(push(version, b"forged"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                hsm_secrets::mirror::MirrorError::Remote {
                    code: Code::FailedPrecondition,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("refused a pushed record"), "{err}");
    }
    assert!(matches!(
        n2.store.record(&path("app/forged")).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        n2.store.latest_sequence(),
        applied,
        "the sequence did not jump"
    );
    assert_eq!(n2.agent.stats().pushes_refused, 2);
    let health = pki.controller(&n2.peer()).health().await.unwrap();
    assert_eq!(
        health.sync.unwrap().last_error.unwrap().kind,
        "out_of_sequence"
    );

    // The next record in sequence is applied.
    let applied_now = pki
        .agent("n1", &n2.peer())
        .replicate(push(applied + 1, b"next"))
        .await
        .unwrap();
    assert!(applied_now.applied);
    assert_eq!(n2.store.latest_sequence(), applied + 1);
}

/// A full pass vouches for the history of the epoch its node was assigned only when its
/// primary already served that epoch. A mirror told to follow a node at epoch 2 before
/// that node was promoted copies epoch 1's state, and its pass must not let the
/// controller trust it with epoch 2's history.
#[tokio::test]
async fn a_pass_vouches_for_its_epoch_only_once_the_primary_serves_it() {
    let tokens = Tokens::new();
    let pki = Pki::new(&["n1", "n2"]);
    let n1 = node!(&tokens, "n1", "pass-epoch-n1", &pki, manual_sync());
    let n2 = node!(&tokens, "n2", "pass-epoch-n2", &pki, manual_sync());
    assign_primary(&pki, &n1, 1, &[], HOUR).await;
    pki.controller(&n1.peer())
        .put(&path("a/one"), &data(&[("k", b"v")]), Expect::Any, 1)
        .await
        .unwrap();

    // Told to follow n1 at epoch 2 while n1 still serves epoch 1.
    assign_mirror(&pki, &n2, 2, &n1).await;
    n2.agent.full_pass_now().await.unwrap();
    let pass = n2.agent.sync_state().last_full_pass.unwrap();
    assert_eq!(pass.epoch, 0, "{pass:?}");

    // Once n1 is promoted at epoch 2, the next pass vouches for it.
    assign_primary(&pki, &n1, 2, &[], HOUR).await;
    n2.agent.full_pass_now().await.unwrap();
    let pass = n2.agent.sync_state().last_full_pass.unwrap();
    assert_eq!(pass.epoch, 2, "{pass:?}");
    let health = pki.controller(&n2.peer()).health().await.unwrap();
    assert_eq!(health.sync.unwrap().last_full_pass.unwrap().epoch, 2);
}
