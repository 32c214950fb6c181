//! Between the wire messages and the store's types. Decoding validates names and shapes
//! but never checksums: the caller decides what a record that fails verification means.

use crate::crd::DeviceRole;
use crate::hsm::{Body, Checksum, Expect, ManifestEntry, Record, SecretData, SecretPath};

use super::pb;
use crate::mirror::MirrorError;

pub(crate) fn record_to_pb(record: &Record) -> pb::Record {
    let data = match &record.body {
        Body::Live(data) => data
            .iter()
            .map(|(k, v)| pb::KeyValue {
                key: k.to_string(),
                value: v.to_vec(),
            })
            .collect(),
        Body::Deleted => Vec::new(),
    };
    pb::Record {
        path: record.path.to_string(),
        version: record.version,
        checksum: record.checksum.0.to_vec(),
        deleted: record.is_deleted(),
        data,
    }
}

/// Decodes a record as sent; `from` names the sender for the error.
pub(crate) fn record_from_pb(from: &str, record: pb::Record) -> Result<Record, MirrorError> {
    let bad = |why: String| MirrorError::Protocol {
        node: from.into(),
        what: "record",
        why,
    };
    let path: SecretPath = record.path.parse().map_err(|e| bad(format!("path: {e}")))?;
    let checksum = checksum_from(&record.checksum)
        .ok_or_else(|| bad(format!("{path}: checksum is not 32 bytes")))?;
    let body = if record.deleted {
        if !record.data.is_empty() {
            return Err(bad(format!("{path}: a tombstone carries data")));
        }
        Body::Deleted
    } else {
        Body::Live(data_from_pb(record.data).map_err(|e| bad(format!("{path}: {e}")))?)
    };
    Ok(Record {
        path,
        version: record.version,
        checksum,
        body,
    })
}

/// Keys and values as sent by a client; the error names the offending key.
pub(crate) fn data_from_pb(pairs: Vec<pb::KeyValue>) -> Result<SecretData, crate::hsm::StoreError> {
    let mut data = SecretData::new();
    let count = pairs.len();
    for kv in pairs {
        if data.get(&kv.key).is_some() {
            return Err(crate::hsm::StoreError::InvalidName {
                what: "key",
                name: kv.key,
                why: "is given twice".into(),
            });
        }
        data.insert(&kv.key, kv.value)?;
    }
    debug_assert_eq!(data.len(), count);
    Ok(data)
}

pub(crate) fn checksum_from(bytes: &[u8]) -> Option<Checksum> {
    Some(Checksum(bytes.try_into().ok()?))
}

pub(crate) fn entry_to_pb(e: &ManifestEntry) -> pb::ManifestEntry {
    pb::ManifestEntry {
        path: e.path.to_string(),
        version: e.version,
        checksum: e.checksum.0.to_vec(),
        deleted: e.deleted,
    }
}

pub(crate) fn entry_from_pb(
    from: &str,
    e: pb::ManifestEntry,
) -> Result<ManifestEntry, MirrorError> {
    let bad = |why: String| MirrorError::Protocol {
        node: from.into(),
        what: "manifest entry",
        why,
    };
    let path: SecretPath = e.path.parse().map_err(|err| bad(format!("path: {err}")))?;
    let checksum = checksum_from(&e.checksum)
        .ok_or_else(|| bad(format!("{path}: checksum is not 32 bytes")))?;
    Ok(ManifestEntry {
        path,
        version: e.version,
        checksum,
        deleted: e.deleted,
    })
}

pub(crate) fn expect_from_pb(expect: Option<pb::Expect>) -> Expect {
    match expect.and_then(|e| e.condition) {
        None | Some(pb::expect::Condition::Any(_)) => Expect::Any,
        Some(pb::expect::Condition::Absent(_)) => Expect::Absent,
        Some(pb::expect::Condition::Version(v)) => Expect::Version(v),
    }
}

pub fn expect_to_pb(expect: Expect) -> pb::Expect {
    let condition = match expect {
        Expect::Any => pb::expect::Condition::Any(true),
        Expect::Absent => pb::expect::Condition::Absent(true),
        Expect::Version(v) => pb::expect::Condition::Version(v),
    };
    pb::Expect {
        condition: Some(condition),
    }
}

pub fn role_to_pb(role: DeviceRole) -> pb::Role {
    match role {
        DeviceRole::Primary => pb::Role::Primary,
        DeviceRole::ReadOnly => pb::Role::ReadOnly,
        DeviceRole::Standby => pb::Role::Standby,
    }
}

pub fn role_from_pb(role: i32) -> Option<DeviceRole> {
    match pb::Role::try_from(role).ok()? {
        pb::Role::Primary => Some(DeviceRole::Primary),
        pb::Role::ReadOnly => Some(DeviceRole::ReadOnly),
        pb::Role::Standby => Some(DeviceRole::Standby),
        pb::Role::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> SecretPath {
        s.parse().expect("path")
    }

    #[test]
    fn records_round_trip_and_forgeries_still_fail_verification() {
        let mut d = SecretData::new();
        d.insert("user", b"u".to_vec()).expect("insert");
        d.insert("bin", vec![0u8, 255, 7]).expect("insert");
        let live = Record::live(path("ns/a"), 7, d);
        let back = record_from_pb("n1", record_to_pb(&live)).expect("decode");
        assert_eq!(back, live);
        back.verify().expect("verifies");

        let tomb = Record::tombstone(path("ns/a"), 9);
        assert_eq!(
            record_from_pb("n1", record_to_pb(&tomb)).expect("decode"),
            tomb
        );

        let mut forged = record_to_pb(&live);
        forged.data[0].value = b"evil".to_vec();
        let decoded = record_from_pb("n1", forged).expect("decodes");
        assert!(
            decoded.verify().is_err(),
            "content no longer matches checksum"
        );
    }

    #[test]
    fn malformed_records_name_the_problem() {
        let live = Record::live(path("ns/a"), 1, SecretData::new());
        let mut bad_path = record_to_pb(&live);
        bad_path.path = "../x".into();
        let err = record_from_pb("n1", bad_path).expect_err("path");
        assert!(
            err.to_string().contains("path") && err.to_string().contains("n1"),
            "{err}"
        );

        let mut short = record_to_pb(&live);
        short.checksum.truncate(5);
        assert!(record_from_pb("n1", short).is_err());

        let mut tomb = record_to_pb(&Record::tombstone(path("ns/a"), 2));
        tomb.data.push(pb::KeyValue {
            key: "k".into(),
            value: vec![1],
        });
        assert!(record_from_pb("n1", tomb).is_err());

        let dup = vec![
            pb::KeyValue {
                key: "k".into(),
                value: vec![1],
            },
            pb::KeyValue {
                key: "k".into(),
                value: vec![2],
            },
        ];
        let err = data_from_pb(dup).expect_err("duplicate");
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn expectations_and_roles_map_both_ways() {
        for e in [Expect::Any, Expect::Absent, Expect::Version(4)] {
            assert_eq!(expect_from_pb(Some(expect_to_pb(e))), e);
        }
        assert_eq!(expect_from_pb(None), Expect::Any);
        for r in [
            DeviceRole::Primary,
            DeviceRole::ReadOnly,
            DeviceRole::Standby,
        ] {
            assert_eq!(role_from_pb(role_to_pb(r) as i32), Some(r));
        }
        assert_eq!(role_from_pb(0), None);
        assert_eq!(role_from_pb(99), None);
    }
}
