//! The plaintext inside an archive object: records as the agents exchange them
//! (protobuf), each verified against its checksum when read back.

use prost::Message;

use super::ArchiveError;
use crate::hsm::Record;
use crate::mirror::pb;

#[derive(Clone, PartialEq, prost::Message)]
struct Payload {
    #[prost(message, repeated, tag = "1")]
    records: Vec<pb::Record>,
}

/// Encodes `records` (in version order).
pub fn encode(records: &[Record]) -> Vec<u8> {
    Payload {
        records: records.iter().map(crate::mirror::record_to_pb).collect(),
    }
    .encode_to_vec()
}

/// Decodes the records of object `name`, refusing any whose content does not match its
/// checksum, or a count other than the header's.
pub fn decode(name: &str, bytes: &[u8], expected: u64) -> Result<Vec<Record>, ArchiveError> {
    let bad = |detail: String| ArchiveError::BadRecord {
        object: name.to_string(),
        detail,
    };
    let payload = Payload::decode(bytes).map_err(|e| bad(format!("does not decode ({e})")))?;
    if payload.records.len() as u64 != expected {
        return Err(bad(format!(
            "holds {} records where its header says {expected}",
            payload.records.len()
        )));
    }
    payload
        .records
        .into_iter()
        .map(|r| {
            let record = crate::mirror::record_from_pb(name, r).map_err(|e| bad(e.to_string()))?;
            record.verify().map_err(|e| bad(e.to_string()))?;
            Ok(record)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::hsm::{Body, SecretData};

    #[test]
    fn records_round_trip_and_a_forged_one_is_refused() {
        let mut data = SecretData::new();
        data.insert("password", b"pw".to_vec()).unwrap();
        let live = Record::live("ns/a".parse().unwrap(), 4, data);
        let gone = Record::tombstone("ns/b".parse().unwrap(), 5);
        let bytes = encode(&[live.clone(), gone.clone()]);
        assert_eq!(decode("o", &bytes, 2).unwrap(), [live.clone(), gone]);
        assert!(decode("o", &bytes, 3).is_err(), "count is checked");
        let mut forged = live;
        if let Body::Live(d) = &mut forged.body {
            d.insert("password", b"other".to_vec()).unwrap();
        }
        let error = decode("o", &encode(&[forged]), 1).unwrap_err();
        assert!(matches!(error, ArchiveError::BadRecord { .. }), "{error}");
    }
}
