#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::crd::{DeviceRole, HSMSecretSpec, LocalSecretRef, SecretSource, ServedBy, SyncStatus};
use crate::hsm::{Expect, SecretData};
use crate::secret_sync::SyncErrorKind;

fn key() -> DigestKey {
    DigestKey::from_bytes(vec![7; 32]).unwrap()
}

fn object(source: Option<(&str, ImportMode)>, secret_name: Option<&str>) -> HSMSecret {
    let mut o = HSMSecret::new(
        "db",
        HSMSecretSpec {
            device_ref: "dev".into(),
            secret_name: secret_name.map(String::from),
            secret_type: None,
            sync_interval: None,
            source: source.map(|(name, mode)| SecretSource {
                secret_ref: LocalSecretRef { name: name.into() },
                delete_after_import: Some(true),
                mode: Some(mode),
            }),
            access: None,
            deletion_policy: None,
        },
    );
    o.metadata.namespace = Some("shop".into());
    o.metadata.uid = Some("uid-1".into());
    o.metadata.generation = Some(1);
    o
}

fn data(pairs: &[(&str, &str)]) -> SecretData {
    let mut d = SecretData::new();
    for (k, v) in pairs {
        d.insert(k, v.as_bytes().to_vec()).unwrap();
    }
    d
}

fn live(version: u64, pairs: &[(&str, &str)]) -> HsmContent {
    HsmContent::Live {
        version,
        data: data(pairs),
        served_by: ServedBy {
            node: "n1".into(),
            role: DeviceRole::Primary,
        },
    }
}

fn source(rv: &str, pairs: &[(&str, &str)], remove: Option<&str>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("db-import-x".into()),
            namespace: Some("shop".into()),
            resource_version: Some(rv.into()),
            labels: Some(BTreeMap::from([(IMPORT_FOR_LABEL.into(), "db".into())])),
            annotations: remove
                .map(|r| BTreeMap::from([(REMOVE_KEYS_ANNOTATION.into(), r.into())])),
            ..Default::default()
        },
        data: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

fn writable() -> DeviceAccess {
    DeviceAccess::Writable {
        primary: "n1".into(),
        epoch: 3,
    }
}

fn read_only() -> DeviceAccess {
    DeviceAccess::NoWritablePrimary {
        device: "dev".into(),
        why: "phase ReadOnlyFallback, primary n1 unavailable".into(),
    }
}

fn inputs<'a>(
    object: &'a HSMSecret,
    device: &'a DeviceAccess,
    hsm: &'a HsmContent,
    source: Option<&'a Secret>,
    managed: Option<&'a Secret>,
    key: &'a DigestKey,
) -> Inputs<'a> {
    Inputs {
        object,
        device,
        hsm,
        source,
        managed,
        key,
        now: Timestamp::UNIX_EPOCH,
    }
}

fn written_keys(import: &Import) -> Option<(Vec<String>, Expect)> {
    match import {
        Import::Write { data, expect, .. } => {
            Some((data.keys().map(String::from).collect(), *expect))
        }
        _ => None,
    }
}

#[test]
fn import_table() {
    let k = key();
    struct Case {
        name: &'static str,
        mode: ImportMode,
        device: DeviceAccess,
        hsm: HsmContent,
        source: Option<Secret>,
        imported: Option<&'static str>,
        want: &'static str,
        keys: &'static [&'static str],
    }
    let cases = vec![
        Case {
            name: "first import writes, expecting absence",
            mode: ImportMode::Replace,
            device: writable(),
            hsm: HsmContent::Absent,
            source: Some(source("10", &[("user", "u"), ("pass", "p")], None)),
            imported: None,
            want: "write-absent",
            keys: &["pass", "user"],
        },
        Case {
            name: "replace drops keys not given, expects the version read",
            mode: ImportMode::Replace,
            device: writable(),
            hsm: live(4, &[("user", "u"), ("old", "o")]),
            source: Some(source("11", &[("user", "u2")], None)),
            imported: Some("10"),
            want: "write-4",
            keys: &["user"],
        },
        Case {
            name: "merge keeps existing keys and removes the named ones",
            mode: ImportMode::Merge,
            device: writable(),
            hsm: live(4, &[("user", "u"), ("old", "o"), ("keep", "k")]),
            source: Some(source("12", &[("new", "n")], Some("old, "))),
            imported: Some("11"),
            want: "write-4",
            keys: &["keep", "new", "user"],
        },
        Case {
            name: "the same source version is not imported again",
            mode: ImportMode::Replace,
            device: writable(),
            hsm: live(4, &[("user", "u")]),
            source: Some(source("10", &[("user", "changed")], None)),
            imported: Some("10"),
            want: "nothing",
            keys: &[],
        },
        Case {
            name: "content already in the HSM is recorded without a write",
            mode: ImportMode::Replace,
            device: read_only(),
            hsm: live(4, &[("user", "u")]),
            source: Some(source("13", &[("user", "u")], None)),
            imported: Some("10"),
            want: "already",
            keys: &[],
        },
        Case {
            name: "read-only device refuses a changing import",
            mode: ImportMode::Replace,
            device: read_only(),
            hsm: live(4, &[("user", "u")]),
            source: Some(source("13", &[("user", "v")], None)),
            imported: None,
            want: "refused-read_only",
            keys: &[],
        },
        Case {
            name: "missing source never imported is an error",
            mode: ImportMode::Replace,
            device: writable(),
            hsm: HsmContent::Absent,
            source: None,
            imported: None,
            want: "refused-source_not_found",
            keys: &[],
        },
        Case {
            name: "missing source after an import is the normal end state",
            mode: ImportMode::Replace,
            device: writable(),
            hsm: live(4, &[("user", "u")]),
            source: None,
            imported: Some("10"),
            want: "nothing",
            keys: &[],
        },
        Case {
            name: "removing every key is refused",
            mode: ImportMode::Merge,
            device: writable(),
            hsm: live(4, &[("user", "u")]),
            source: Some(source("14", &[], Some("user"))),
            imported: None,
            want: "refused-empty_result",
            keys: &[],
        },
        Case {
            name: "a key that cannot be a file name is refused",
            mode: ImportMode::Replace,
            device: writable(),
            hsm: HsmContent::Absent,
            source: Some(source("15", &[("../x", "v")], None)),
            imported: None,
            want: "refused-invalid_key",
            keys: &[],
        },
    ];
    for c in cases {
        let mut o = object(Some(("db-import-x", c.mode)), None);
        o.status = c.imported.map(|v| HSMSecretStatus {
            imported_source_version: Some(v.into()),
            ..Default::default()
        });
        let i = inputs(&o, &c.device, &c.hsm, c.source.as_ref(), None, &k);
        let got = plan_import(&i);
        let label = match &got {
            Import::Nothing => "nothing".to_string(),
            Import::AlreadyThere { .. } => "already".to_string(),
            Import::Refused(e) => format!("refused-{}", e.kind()),
            Import::Write {
                expect: Expect::Absent,
                ..
            } => "write-absent".to_string(),
            Import::Write {
                expect: Expect::Version(v),
                epoch,
                ..
            } => {
                assert_eq!(*epoch, 3, "{}", c.name);
                format!("write-{v}")
            }
            Import::Write { .. } => "write-any".to_string(),
        };
        assert_eq!(label, c.want, "{}", c.name);
        if let Some((keys, _)) = written_keys(&got) {
            assert_eq!(keys, c.keys, "{}", c.name);
        }
        if let Import::Refused(e) = &got {
            let text = e.to_string();
            assert!(
                !text.contains("changed") && !text.contains("\"v\""),
                "{text}"
            );
        }
    }
}

#[test]
fn a_source_reference_naming_another_namespace_is_refused_before_any_lookup() {
    let w = writable();
    let k = key();
    for name in ["other/db", "../db", "Other", ""] {
        let o = object(Some((name, ImportMode::Replace)), None);
        let e = source_name(&o).unwrap_err();
        assert_eq!(e.kind(), SyncErrorKind::InvalidSource, "{name}");
        let i = inputs(&o, &w, &HsmContent::Absent, None, None, &k);
        assert!(matches!(plan_import(&i), Import::Refused(_)));
    }
    let o = object(None, None);
    assert_eq!(hsm_path(&o).unwrap().to_string(), "shop/db");
}

#[test]
fn a_source_not_labelled_for_this_hsmsecret_is_never_imported() {
    let w = writable();
    let k = key();
    let o = object(Some(("db-import-x", ImportMode::Replace)), None);
    for label in [None, Some("other")] {
        let mut s = source("7", &[("k", "v")], None);
        s.metadata.labels = label.map(|l| BTreeMap::from([(IMPORT_FOR_LABEL.into(), l.into())]));
        let i = inputs(&o, &w, &HsmContent::Absent, Some(&s), None, &k);
        let Import::Refused(e) = plan_import(&i) else {
            panic!("imported a Secret labelled {label:?}");
        };
        assert_eq!(e.kind(), SyncErrorKind::SourceNotLabelled);
        assert!(
            e.to_string()
                .contains("label secret db-import-x hsmsecrets.io/import-for=db"),
            "{e}"
        );
    }
}

#[test]
fn a_copy_name_that_is_not_a_plain_secret_name_is_refused_before_any_lookup() {
    let w = writable();
    let k = key();
    let hsm = live(3, &[("k", "v")]);
    for name in ["other/db", "../db", "Db", "", "db-"] {
        let o = object(None, Some(name));
        let e = copy_name(&o).unwrap_err();
        assert_eq!(e.kind(), SyncErrorKind::InvalidCopyName, "{name}");
        assert!(e.to_string().contains("spec.secretName"), "{e}");
        let i = inputs(&o, &w, &hsm, None, None, &k);
        assert_eq!(
            plan_secret(&i).unwrap_err(),
            e,
            "no Secret write for {name:?}"
        );
    }
    let o = object(None, Some("db.copy-1"));
    assert_eq!(copy_name(&o).unwrap(), Some("db.copy-1"));
}

fn managed(owner_uid: Option<&str>, rv: &str, pairs: &[(&str, &str)], version: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("db-copy".into()),
            namespace: Some("shop".into()),
            resource_version: Some(rv.into()),
            labels: Some(BTreeMap::from([
                (DEVICE_LABEL.into(), "dev".into()),
                (VERSION_LABEL.into(), version.into()),
            ])),
            owner_references: owner_uid.map(|uid| {
                vec![OwnerReference {
                    api_version: "hsmsecrets.io/v1alpha1".into(),
                    kind: "HSMSecret".into(),
                    name: "db".into(),
                    uid: uid.into(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]
            }),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

#[test]
fn secret_copy_table() {
    let w = writable();
    let k = key();
    let o = object(None, Some("db-copy"));
    let hsm = live(5, &[("user", "u")]);
    let cases: Vec<(&str, Option<Secret>, &HsmContent, &str)> = vec![
        ("absent copy is created", None, &hsm, "create"),
        (
            "equal copy is left alone",
            Some(managed(Some("uid-1"), "7", &[("user", "u")], "5")),
            &hsm,
            "none",
        ),
        (
            "drifted data is replaced",
            Some(managed(Some("uid-1"), "7", &[("user", "tampered")], "5")),
            &hsm,
            "replace",
        ),
        (
            "an extra key is drift",
            Some(managed(
                Some("uid-1"),
                "7",
                &[("user", "u"), ("x", "y")],
                "5",
            )),
            &hsm,
            "replace",
        ),
        (
            "stale version label is replaced",
            Some(managed(Some("uid-1"), "7", &[("user", "u")], "4")),
            &hsm,
            "replace",
        ),
        (
            "a Secret without our controller reference is not adopted",
            Some(managed(None, "7", &[("user", "u")], "5")),
            &hsm,
            "not-owned",
        ),
        (
            "another HSMSecret's Secret is not adopted",
            Some(managed(Some("uid-2"), "7", &[("user", "u")], "5")),
            &hsm,
            "not-owned",
        ),
        (
            "deleted in the HSM: the copy goes",
            Some(managed(Some("uid-1"), "7", &[("user", "u")], "5")),
            &HsmContent::Absent,
            "delete",
        ),
    ];
    for (name, existing, hsm, want) in cases {
        let i = inputs(&o, &w, hsm, None, existing.as_ref(), &k);
        let got = match plan_secret(&i) {
            Ok(None) => "none",
            Ok(Some(SecretWrite::Create(s))) => {
                let refs = s.metadata.owner_references.unwrap();
                assert_eq!(refs[0].controller, Some(true));
                assert_eq!(refs[0].uid, "uid-1");
                assert_eq!(s.metadata.labels.unwrap()[VERSION_LABEL], "5");
                "create"
            }
            Ok(Some(SecretWrite::Replace(s))) => {
                assert_eq!(s.metadata.resource_version.as_deref(), Some("7"));
                assert_eq!(s.data.unwrap().len(), 1);
                "replace"
            }
            Ok(Some(SecretWrite::Recreate { .. })) => "recreate",
            Ok(Some(SecretWrite::Delete { .. })) => "delete",
            Err(e) => {
                assert_eq!(e.kind(), SyncErrorKind::SecretNotOwned);
                "not-owned"
            }
        };
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn status_changes_only_when_something_changed_and_never_carries_values() {
    let k = key();
    let o = object(None, Some("db-copy"));
    let hsm = live(5, &[("user", "secret-value-xyz")]);
    let device = writable();
    let i = inputs(&o, &device, &hsm, None, None, &k);
    let first = plan_status(&i, &ImportResult::Nothing, true, None);
    assert!(first.changed);
    assert_eq!(first.status.sync_status, SyncStatus::InSync);
    assert_eq!(first.status.version, Some(5));
    assert_eq!(first.status.keys, vec!["user".to_string()]);
    assert!(
        first
            .status
            .digest
            .as_deref()
            .unwrap()
            .starts_with("hmac-sha256:")
    );
    assert!(first.status.last_sync_time.is_some());
    assert_eq!(first.event.as_ref().unwrap().reason, "HSMSecretSynced");
    let text = format!(
        "{}{:?}",
        serde_json::to_string(&first.status).unwrap(),
        first.event
    );
    assert!(!text.contains("secret-value-xyz"), "{text}");

    let mut o2 = o.clone();
    o2.status = Some(first.status.clone());
    let i = Inputs {
        object: &o2,
        now: Timestamp::from_second(1000).unwrap(),
        ..i
    };
    let again = plan_status(&i, &ImportResult::Nothing, false, None);
    assert!(!again.changed, "{:?}", again.status);
    assert!(again.event.is_none());

    let err = SyncError::SecretNotOwned {
        namespace: "shop".into(),
        name: "db-copy".into(),
    };
    let failed = plan_status(&i, &ImportResult::Nothing, false, Some(&err));
    assert!(failed.changed);
    assert_eq!(failed.status.sync_status, SyncStatus::Error);
    assert_eq!(failed.status.conditions[0].reason, "SecretNotOwned");
    assert_eq!(failed.event.as_ref().unwrap().reason, "HSMSecretSyncFailed");
    let mut o3 = o2.clone();
    o3.status = Some(failed.status.clone());
    let i = Inputs { object: &o3, ..i };
    let repeated = plan_status(&i, &ImportResult::Nothing, false, Some(&err));
    assert!(!repeated.changed);
    assert!(
        repeated.event.is_none(),
        "the same error is not announced twice"
    );
}

#[test]
fn cleanup_table() {
    let w = writable();
    let k = key();
    let mut retain = object(None, Some("db-copy"));
    retain.metadata.finalizers = Some(vec![crate::crd::FINALIZER.into()]);
    let mut delete = retain.clone();
    delete.spec.deletion_policy = Some(DeletionPolicy::Delete);
    let copy = managed(Some("uid-1"), "7", &[("user", "u")], "5");
    let foreign = managed(None, "7", &[("user", "u")], "5");
    let hsm = live(5, &[("user", "u")]);

    let i = inputs(&retain, &w, &hsm, None, Some(&copy), &k);
    let c = plan_cleanup(&i);
    assert_eq!(c.delete_secret, Some(("db-copy".into(), "7".into())));
    assert!(c.tombstone.is_none() && c.blocked.is_none());

    let i = inputs(&retain, &w, &hsm, None, Some(&foreign), &k);
    assert_eq!(
        plan_cleanup(&i).delete_secret,
        None,
        "never delete a foreign Secret"
    );

    let i = inputs(&delete, &w, &hsm, None, Some(&copy), &k);
    let c = plan_cleanup(&i);
    assert_eq!(
        c.tombstone,
        Some(Tombstone {
            expect: Expect::Version(5),
            epoch: 3,
            primary: "n1".into()
        })
    );

    let ro = read_only();
    let i = inputs(&delete, &ro, &hsm, None, Some(&copy), &k);
    let c = plan_cleanup(&i);
    assert!(c.tombstone.is_none());
    assert_eq!(c.blocked.unwrap().kind(), SyncErrorKind::ReadOnly);

    let i = inputs(&delete, &w, &HsmContent::Absent, None, None, &k);
    assert_eq!(
        plan_cleanup(&i),
        Cleanup {
            delete_secret: None,
            tombstone: None,
            blocked: None
        }
    );
}

#[test]
fn device_access_follows_the_device_status() {
    use crate::crd::{DevicePhase, HSMDeviceSpec, HSMDeviceStatus, Pkcs11Spec, SecretKeyRef};
    let mut d = HSMDevice::new(
        "dev",
        HSMDeviceSpec {
            pkcs11: Pkcs11Spec {
                library: "/x.so".into(),
                token_label: "t".into(),
                token_serial: None,
                pin_secret_ref: SecretKeyRef {
                    namespace: "ns".into(),
                    name: "pin".into(),
                    key: "pin".into(),
                },
            },
            mirroring: None,
            backup: None,
            site: None,
        },
    );
    assert!(matches!(
        DeviceAccess::of("dev", None),
        DeviceAccess::Missing { .. }
    ));
    assert!(matches!(
        DeviceAccess::of("dev", Some(&d)),
        DeviceAccess::NoWritablePrimary { .. }
    ));
    d.status = Some(HSMDeviceStatus {
        primary_node: Some("n1".into()),
        epoch: 2,
        phase: DevicePhase::Ready,
        ..Default::default()
    });
    assert_eq!(
        DeviceAccess::of("dev", Some(&d)),
        DeviceAccess::Writable {
            primary: "n1".into(),
            epoch: 2
        }
    );
    d.status.as_mut().unwrap().phase = DevicePhase::ReadOnlyFallback;
    assert!(matches!(
        DeviceAccess::of("dev", Some(&d)),
        DeviceAccess::NoWritablePrimary { .. }
    ));
}

#[test]
fn debug_shows_secrets_by_name_and_key_names_only() {
    let value = b"hunter2-distinctive".to_vec();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("db".into()),
            ..Default::default()
        },
        data: Some([("password".to_string(), ByteString(value.clone()))].into()),
        ..Default::default()
    };
    let shown = format!("{:?}", SecretWrite::Create(secret));
    assert!(
        shown.contains("db") && shown.contains("password"),
        "{shown}"
    );
    let as_numbers = format!("{value:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(
        !shown.contains(&as_numbers[1..as_numbers.len() - 1]),
        "{shown}"
    );
}
