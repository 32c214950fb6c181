//! An in-process [`SecretStore`] with the same semantics as the PKCS#11 one, for tests and
//! benchmarks of the code above the store (controllers, admission, mirroring logic).

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    Body, Expect, GcReport, ManifestEntry, Record, SecretData, SecretPath, SecretStore, StoreError,
    TokenInfo,
};

#[derive(Default)]
pub struct MemoryStore {
    label: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    records: BTreeMap<SecretPath, Record>,
    sequence: u64,
    agent_state: Option<Vec<u8>>,
}

impl MemoryStore {
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, path: &SecretPath, body: Body, expect: Expect) -> Result<u64, StoreError> {
        let mut st = self.state();
        let live = st
            .records
            .get(path)
            .filter(|r| !r.is_deleted())
            .map(|r| r.version);
        if matches!(body, Body::Deleted) && live.is_none() {
            return Err(StoreError::NotFound {
                token: self.label.clone(),
                path: path.to_string(),
            });
        }
        if !expect.admits(live) {
            return Err(StoreError::VersionConflict {
                token: self.label.clone(),
                path: path.to_string(),
                expected: format!("{expect:?}"),
                actual: live.map_or("absent".into(), |v| v.to_string()),
            });
        }
        st.sequence = st
            .sequence
            .checked_add(1)
            .ok_or_else(|| StoreError::SequenceExhausted {
                token: self.label.clone(),
            })?;
        let version = st.sequence;
        let record = match body {
            Body::Live(data) => Record::live(path.clone(), version, data),
            Body::Deleted => Record::tombstone(path.clone(), version),
        };
        st.records.insert(path.clone(), record);
        Ok(version)
    }
}

#[async_trait]
impl SecretStore for MemoryStore {
    fn token_label(&self) -> &str {
        &self.label
    }

    async fn record(&self, path: &SecretPath) -> Result<Record, StoreError> {
        self.state()
            .records
            .get(path)
            .cloned()
            .ok_or_else(|| StoreError::NotFound {
                token: self.label.clone(),
                path: path.to_string(),
            })
    }

    async fn put(
        &self,
        path: &SecretPath,
        data: SecretData,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        self.write(path, Body::Live(data), expect)
    }

    async fn delete(&self, path: &SecretPath, expect: Expect) -> Result<u64, StoreError> {
        self.write(path, Body::Deleted, expect)
    }

    async fn apply(&self, record: Record) -> Result<bool, StoreError> {
        record.verify()?;
        let mut st = self.state();
        if st
            .records
            .get(&record.path)
            .is_some_and(|r| r.version == record.version && r.checksum == record.checksum)
        {
            return Ok(false);
        }
        st.sequence = st.sequence.max(record.version);
        st.records.insert(record.path.clone(), record);
        Ok(true)
    }

    async fn purge(&self, path: &SecretPath) -> Result<bool, StoreError> {
        Ok(self.state().records.remove(path).is_some())
    }

    async fn manifest(&self) -> Result<Vec<ManifestEntry>, StoreError> {
        Ok(self.state().records.values().map(Record::entry).collect())
    }

    fn latest_sequence(&self) -> u64 {
        self.state().sequence
    }

    async fn health(&self) -> Result<TokenInfo, StoreError> {
        Ok(TokenInfo {
            label: self.label.clone(),
            serial: "memory".into(),
            manufacturer: "hsm-secrets".into(),
            model: "in-process".into(),
        })
    }

    async fn gc(&self) -> Result<GcReport, StoreError> {
        Ok(GcReport::default())
    }

    async fn load_agent_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state().agent_state.clone())
    }

    async fn save_agent_state(&self, bytes: &[u8]) -> Result<(), StoreError> {
        self.state().agent_state = Some(bytes.to_vec());
        Ok(())
    }
}
