//! A [`SecretStore`] wrapper that fails chosen operations, for failover tests.

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    Expect, FaultPlan, GcReport, ManifestEntry, Record, SecretData, SecretPath, SecretStore,
    StoreError, TokenInfo,
};

/// Consults a [`FaultPlan`] (operation names `get`, `put`, `delete`, `apply`, `purge`,
/// `manifest`, `health`, `gc`) before delegating to the inner store.
pub struct FaultyStore<S> {
    inner: S,
    plan: Arc<FaultPlan>,
}

impl<S: SecretStore> FaultyStore<S> {
    pub fn new(inner: S, plan: Arc<FaultPlan>) -> Self {
        Self { inner, plan }
    }

    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }

    fn check(&self, op: &'static str) -> Result<(), StoreError> {
        self.plan.check(op, self.inner.token_label())
    }
}

#[async_trait]
impl<S: SecretStore> SecretStore for FaultyStore<S> {
    fn token_label(&self) -> &str {
        self.inner.token_label()
    }

    async fn record(&self, path: &SecretPath) -> Result<Record, StoreError> {
        self.check("get")?;
        self.inner.record(path).await
    }

    async fn put(
        &self,
        path: &SecretPath,
        data: SecretData,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        self.check("put")?;
        self.inner.put(path, data, expect).await
    }

    async fn delete(&self, path: &SecretPath, expect: Expect) -> Result<u64, StoreError> {
        self.check("delete")?;
        self.inner.delete(path, expect).await
    }

    async fn apply(&self, record: Record) -> Result<bool, StoreError> {
        self.check("apply")?;
        self.inner.apply(record).await
    }

    async fn purge(&self, path: &SecretPath) -> Result<bool, StoreError> {
        self.check("purge")?;
        self.inner.purge(path).await
    }

    async fn manifest(&self) -> Result<Vec<ManifestEntry>, StoreError> {
        self.check("manifest")?;
        self.inner.manifest().await
    }

    fn latest_sequence(&self) -> u64 {
        self.inner.latest_sequence()
    }

    async fn health(&self) -> Result<TokenInfo, StoreError> {
        self.check("health")?;
        self.inner.health().await
    }

    async fn gc(&self) -> Result<GcReport, StoreError> {
        self.check("gc")?;
        self.inner.gc().await
    }

    async fn load_agent_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.check("load_state")?;
        self.inner.load_agent_state().await
    }

    async fn save_agent_state(&self, bytes: &[u8]) -> Result<(), StoreError> {
        self.check("save_state")?;
        self.inner.save_agent_state(bytes).await
    }
}
