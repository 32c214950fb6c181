//! The PKCS#11 secret store against real SoftHSM2 tokens.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::collections::BTreeMap;
use std::sync::Arc;

use hsm_secrets::hsm::{
    Body, Expect, FaultKind, FaultPlan, Pkcs11Config, Pkcs11Store, Record, SecretData, SecretPath,
    SecretStore, StoreError,
};
use kit::softhsm::TestToken;

fn path(s: &str) -> SecretPath {
    s.parse().unwrap()
}

fn data(pairs: &[(&str, &[u8])]) -> SecretData {
    let mut d = SecretData::new();
    for (k, v) in pairs {
        d.insert(k, v.to_vec()).unwrap();
    }
    d
}

macro_rules! token {
    ($label:expr) => {
        match TestToken::new($label) {
            Some(t) => t,
            None => return,
        }
    };
}

#[tokio::test]
async fn binary_values_round_trip() {
    let tok = token!("roundtrip");
    let store = tok.open().await;
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let big: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let d = data(&[("all", &all_bytes), ("empty", b""), ("big", &big)]);
    let v = store
        .put(&path("shop/bin"), d.clone(), Expect::Absent)
        .await
        .unwrap();
    let (got_v, got) = store.get(&path("shop/bin")).await.unwrap();
    assert_eq!(got_v, v);
    assert_eq!(got.get("all"), Some(all_bytes.as_slice()));
    assert_eq!(got.get("empty"), Some(&b""[..]));
    assert_eq!(got.get("big"), Some(big.as_slice()));
    assert!(got == d);

    // Survives a reopen in a new store instance (same process, same context).
    let again = tok.open().await;
    assert!(again.get(&path("shop/bin")).await.unwrap().1 == d);
    assert_eq!(again.latest_sequence(), v);
}

#[tokio::test]
async fn secrets_with_prefix_names_never_see_each_other() {
    let tok = token!("isolation");
    let store = tok.open().await;
    let db = path("shop/db");
    let db_prod = path("shop/db-prod");
    store
        .put(&db, data(&[("user", b"a")]), Expect::Any)
        .await
        .unwrap();
    store
        .put(&db_prod, data(&[("user", b"b"), ("pw", b"c")]), Expect::Any)
        .await
        .unwrap();
    assert_eq!(
        store.get(&db).await.unwrap().1.keys().collect::<Vec<_>>(),
        ["user"]
    );
    assert_eq!(store.get(&db_prod).await.unwrap().1.len(), 2);

    store
        .put(&db, data(&[("user", b"x")]), Expect::Any)
        .await
        .unwrap();
    assert_eq!(
        store.get(&db_prod).await.unwrap().1.get("user"),
        Some(&b"b"[..])
    );
    store.delete(&db, Expect::Any).await.unwrap();
    assert!(matches!(
        store.get(&db).await,
        Err(StoreError::NotFound { .. })
    ));
    let (_, prod) = store.get(&db_prod).await.unwrap();
    assert_eq!(prod.get("pw"), Some(&b"c"[..]));
    // Another namespace with the same name is another secret.
    assert!(matches!(
        store.get(&path("other/db-prod")).await,
        Err(StoreError::NotFound { .. })
    ));
}

#[tokio::test]
async fn twelve_thousand_objects_list_and_read_completely() {
    let tok = token!("many");
    let store = tok.open().await;
    // 1,000 secrets x 11 keys + 1,000 metadata objects = 12,000 objects.
    let secrets = 1000;
    let mut expected = BTreeMap::new();
    for i in 0..secrets {
        let mut d = SecretData::new();
        for k in 0..11 {
            d.insert(&format!("k{k}"), format!("{i}-{k}").into_bytes())
                .unwrap();
        }
        let p = path(&format!("ns{}/s{i}", i % 7));
        let v = store.put(&p, d, Expect::Absent).await.unwrap();
        expected.insert(p, v);
    }
    let manifest = store.manifest().await.unwrap();
    assert_eq!(manifest.len(), secrets);
    for e in &manifest {
        assert_eq!(expected.get(&e.path), Some(&e.version));
        assert!(!e.deleted);
    }
    for (i, p) in expected.keys().enumerate().step_by(37) {
        let (_, d) = store.get(p).await.unwrap();
        assert_eq!(d.len(), 11, "secret {i} complete");
        let n: String = p.name().trim_start_matches('s').into();
        assert_eq!(d.get("k10"), Some(format!("{n}-10").as_bytes()));
    }
}

#[tokio::test]
async fn a_crash_at_any_step_leaves_old_or_new_never_a_mix() {
    let tok = token!("crash");
    let plan = Arc::new(FaultPlan::new());
    let store = Pkcs11Store::open_with_faults(tok.config(), Some(plan.clone()))
        .await
        .unwrap();
    let p = path("shop/rotating");
    let old = data(&[("a", b"old-a"), ("b", b"old-b"), ("c", b"old-c")]);
    let new = data(&[("a", b"new-a"), ("b", b"new-b"), ("d", b"new-d")]);

    // Count the object operations of one overwrite, and the objects a clean token holds
    // for this secret (one generation of three keys and its metadata).
    store.put(&p, old.clone(), Expect::Any).await.unwrap();
    store.gc().await.unwrap();
    let clean_objects = store.object_count().await.unwrap();
    plan.clear();
    store.put(&p, new.clone(), Expect::Any).await.unwrap();
    let steps = plan.calls();
    assert!(steps >= 8, "a write has several steps, saw {steps}");

    let mut saw_old = 0;
    let mut saw_new = 0;
    for step in 1..=steps {
        store.put(&p, old.clone(), Expect::Any).await.unwrap();
        plan.clear();
        plan.crash_at_call(step);
        let result = store.put(&p, new.clone(), Expect::Any).await;
        plan.clear();
        let (_, seen) = store.get(&p).await.unwrap();
        if seen == old {
            saw_old += 1;
            assert!(
                result.is_err(),
                "step {step}: write reported success but old data remains"
            );
        } else if seen == new {
            saw_new += 1;
        } else {
            panic!("step {step}: mixed content {seen:?}");
        }
    }
    assert!(saw_old > 0 && saw_new > 0, "old {saw_old} new {saw_new}");

    // Leftovers are collected, and the secret is still whole afterwards.
    let report = store.gc().await.unwrap();
    assert!(
        report.orphan_objects + report.stale_metadata > 0,
        "{report:?}"
    );
    assert_eq!(store.gc().await.unwrap().orphan_objects, 0);
    let (_, after) = store.get(&p).await.unwrap();
    assert!(after == old || after == new);
    // Exactly the live objects remain: as many as a clean token holds for it.
    assert_eq!(store.object_count().await.unwrap(), clean_objects);
}

#[tokio::test]
async fn concurrent_mixed_operations_stay_consistent() {
    let tok = token!("concurrent");
    let mut cfg = tok.config();
    cfg.max_sessions = std::env::var("MAXS")
        .map(|s| s.parse().unwrap())
        .unwrap_or(8);
    let store = Arc::new(Pkcs11Store::open(cfg).await.unwrap());
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = BTreeMap::new();
            for i in 0..500u32 {
                let p = path(&format!("t{t}/s{}", i % 10));
                match i % 5 {
                    0 | 1 => {
                        let v = store
                            .put(&p, data(&[("i", &i.to_be_bytes())]), Expect::Any)
                            .await
                            .unwrap();
                        last.insert(p, Some((v, i)));
                    }
                    2 | 3 => match store.get(&p).await {
                        Ok((v, d)) => {
                            let (lv, li) = last[&p].unwrap();
                            assert_eq!((v, d.get("i").unwrap()), (lv, &li.to_be_bytes()[..]));
                        }
                        Err(StoreError::NotFound { .. }) => {
                            assert!(last.get(&p).is_none_or(|x| x.is_none()))
                        }
                        Err(e) => panic!("{e}"),
                    },
                    _ => match store.delete(&p, Expect::Any).await {
                        Ok(_) => {
                            last.insert(p, None);
                        }
                        Err(StoreError::NotFound { .. }) => {}
                        Err(e) => panic!("{e}"),
                    },
                }
            }
            last
        }));
    }
    let mut expected = BTreeMap::new();
    for t in tasks {
        expected.extend(t.await.unwrap());
    }
    let manifest = store.manifest().await.unwrap();
    for e in manifest {
        match expected[&e.path] {
            Some((v, _)) => assert!(!e.deleted && e.version == v, "{e:?}"),
            None => assert!(e.deleted, "{e:?}"),
        }
    }
    let versions: std::collections::BTreeSet<u64> =
        expected.values().flatten().map(|(v, _)| *v).collect();
    assert_eq!(
        versions.len(),
        expected.values().flatten().count(),
        "versions unique"
    );
}

#[tokio::test]
async fn stale_expected_version_conflicts_and_changes_nothing() {
    let tok = token!("conflict");
    let store = tok.open().await;
    let p = path("shop/cas");
    let v1 = store
        .put(&p, data(&[("k", b"1")]), Expect::Absent)
        .await
        .unwrap();
    let v2 = store
        .put(&p, data(&[("k", b"2")]), Expect::Version(v1))
        .await
        .unwrap();
    let err = store
        .put(&p, data(&[("k", b"3")]), Expect::Version(v1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err}");
    assert!(err.to_string().contains(&v2.to_string()), "{err}");
    assert!(!err.to_string().contains('3') || err.to_string().contains(&v1.to_string()));
    let (v, d) = store.get(&p).await.unwrap();
    assert_eq!((v, d.get("k")), (v2, Some(&b"2"[..])));
    assert!(matches!(
        store.put(&p, data(&[("k", b"4")]), Expect::Absent).await,
        Err(StoreError::VersionConflict { .. })
    ));
    assert_eq!(store.latest_sequence(), v2);
}

#[tokio::test]
async fn wrong_pin_and_missing_label_are_explained() {
    let tok = token!("pins");
    let wrong = tok.pin_file.with_extension("wrong");
    std::fs::write(&wrong, "0000\n").unwrap();
    let mut cfg = tok.config();
    cfg.pin_file = wrong;
    let err = Pkcs11Store::open(cfg).await.err().unwrap();
    assert!(matches!(err, StoreError::PinIncorrect { .. }), "{err}");
    assert!(err.to_string().contains("pins") && err.to_string().contains("PIN file"));
    assert!(!err.to_string().contains("0000"), "PIN never in messages");

    let cfg = Pkcs11Config::new(&tok.library, "no-such-token", &tok.pin_file);
    let err = Pkcs11Store::open(cfg).await.err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::TokenNotFound { .. }), "{msg}");
    assert!(
        msg.contains("no-such-token") && msg.contains(&format!("{:?}", tok.label)),
        "{msg}"
    );

    let cfg = Pkcs11Config::new(
        &tok.library,
        &tok.label,
        tok.pin_file.with_extension("missing"),
    );
    let err = Pkcs11Store::open(cfg).await.err().unwrap();
    assert!(matches!(err, StoreError::PinFile { .. }), "{err}");
}

/// SoftHSM cannot be unplugged (a removed token directory just looks empty), so the loss
/// is injected where a real module reports it: PKCS#11 calls answering
/// `CKR_DEVICE_REMOVED`. Recovery then runs the real path: drop the sessions, find the
/// token again by label, log in again.
#[tokio::test]
async fn losing_the_token_is_reported_and_recovered_without_restart() {
    let tok = token!("removable");
    let plan = Arc::new(FaultPlan::new());
    let store = Pkcs11Store::open_with_faults(tok.config(), Some(plan.clone()))
        .await
        .unwrap();
    let p = path("shop/survivor");
    store
        .put(&p, data(&[("k", b"v")]), Expect::Any)
        .await
        .unwrap();
    assert_eq!(store.reconnects(), 0);

    plan.fail_op("read", FaultKind::DeviceUnavailable);
    for _ in 0..3 {
        let err = store.get(&p).await.unwrap_err();
        assert!(matches!(err, StoreError::DeviceUnavailable { .. }), "{err}");
        assert!(err.is_transient());
        assert!(err.to_string().contains("removable") && err.to_string().contains("reconnects"));
    }
    let err = store
        .put(&p, data(&[("k", b"w")]), Expect::Any)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DeviceUnavailable { .. }), "{err}");

    plan.clear();
    let (_, d) = store.get(&p).await.unwrap();
    assert_eq!(d.get("k"), Some(&b"v"[..]), "nothing lost, no restart");
    assert!(store.reconnects() >= 1, "the token was found again");
    store
        .put(&p, data(&[("k", b"w")]), Expect::Any)
        .await
        .unwrap();
    store.health().await.unwrap();
}

#[tokio::test]
async fn tombstones_and_apply_replicate_exactly() {
    let tok = token!("apply");
    let store = tok.open().await;
    let p = path("shop/replica");
    let rec = Record::live(p.clone(), 41, data(&[("k", b"v")]));
    assert!(store.apply(rec.clone()).await.unwrap());
    assert!(!store.apply(rec.clone()).await.unwrap(), "idempotent");
    assert_eq!(store.latest_sequence(), 41);
    assert_eq!(store.record(&p).await.unwrap(), rec);

    let mut forged = Record::live(p.clone(), 42, data(&[("k", b"evil")]));
    forged.checksum = rec.checksum;
    assert!(matches!(
        store.apply(forged).await,
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(
        store.record(&p).await.unwrap(),
        rec,
        "bad data never applied"
    );

    store.apply(Record::tombstone(p.clone(), 43)).await.unwrap();
    assert!(matches!(
        store.record(&p).await.unwrap().body,
        Body::Deleted
    ));
    assert!(matches!(
        store.get(&p).await,
        Err(StoreError::NotFound { .. })
    ));
    let m = store.manifest().await.unwrap();
    assert_eq!((m.len(), m[0].deleted, m[0].version), (1, true, 43));
    assert!(store.purge(&p).await.unwrap());
    assert!(store.manifest().await.unwrap().is_empty());
    // A local write after replication continues above the replicated sequence.
    assert_eq!(
        store
            .put(&p, data(&[("k", b"w")]), Expect::Absent)
            .await
            .unwrap(),
        44
    );
}

/// A wrong PIN is offered to the token once. After `CKR_PIN_INCORRECT` the refusal is kept
/// in the node's directory, so a second open (a retry, or a restarted process) refuses
/// before it even loads the module, until the PIN file holds another PIN.
#[tokio::test]
async fn a_refused_pin_is_never_offered_to_the_token_again() {
    let tok = token!("refused");
    let refusals = tempfile::tempdir().unwrap();
    let pin_file = tok.pin_file.with_extension("mounted");
    std::fs::write(&pin_file, "0000\n").unwrap();
    let mut cfg = tok.config();
    cfg.pin_file = pin_file.clone();
    cfg.pin_refusal_dir = Some(refusals.path().to_path_buf());

    let err = Pkcs11Store::open(cfg.clone()).await.err().unwrap();
    assert!(matches!(err, StoreError::PinIncorrect { .. }), "{err}");

    // The retry never reaches the token: with the module gone it still answers the
    // refusal, not a library error.
    let mut no_module = cfg.clone();
    no_module.library = "/nonexistent/libpkcs11.so".into();
    let err = Pkcs11Store::open(no_module).await.err().unwrap();
    assert!(matches!(err, StoreError::PinRefused { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("not offered to the token again"),
        "{message}"
    );
    assert!(!message.contains("0000"), "PIN never in messages");
    for entry in std::fs::read_dir(refusals.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert!(!text.contains("0000"), "PIN never on disk: {text}");
    }

    // The Secret is fixed: the new PIN is tried and opens the token; the refusal is gone.
    std::fs::copy(&tok.pin_file, &pin_file).unwrap();
    let store = Pkcs11Store::open(cfg.clone()).await.unwrap();
    store.manifest().await.unwrap();
    assert_eq!(std::fs::read_dir(refusals.path()).unwrap().count(), 0);
}

/// A restarted agent verifies its whole token (a rejoin's full pass reads every secret
/// back). Reads after a cold open must not search the token once per secret: on
/// SoftHSM, as on most modules, each search is a linear scan of every object, so a
/// token of a thousand secrets took over a minute to verify, and a returning node
/// stayed out of the mirror set past any timeout.
#[tokio::test]
async fn reads_after_a_cold_open_do_not_search_the_token_per_secret() {
    let tok = token!("cold-open");
    let writer = tok.open().await;
    let paths: Vec<SecretPath> = (0..40).map(|i| path(&format!("shop/s{i}"))).collect();
    for (i, p) in paths.iter().enumerate() {
        let d = data(&[("a", format!("{i}-a").as_bytes()), ("b", b"b")]);
        writer.put(p, d, Expect::Absent).await.unwrap();
    }
    writer.delete(&paths[0], Expect::Any).await.unwrap();
    drop(writer);

    let plan = Arc::new(FaultPlan::new());
    let store = Pkcs11Store::open_with_faults(tok.config(), Some(plan.clone()))
        .await
        .unwrap();
    store.manifest().await.unwrap();
    plan.clear();
    for (i, p) in paths.iter().enumerate().skip(1) {
        let (_, d) = store.get(p).await.unwrap();
        assert_eq!(d.get("a"), Some(format!("{i}-a").as_bytes()));
    }
    assert!(matches!(
        store.get(&paths[0]).await,
        Err(StoreError::NotFound { .. })
    ));
    let searches = plan.calls_of("find");
    assert!(
        searches <= 1,
        "reading {} secrets after a cold open searched the token {searches} times",
        paths.len()
    );
}
