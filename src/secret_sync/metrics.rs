//! HSMSecret reconciler metrics. Labels are bounded: outcomes and error kinds only (no
//! names, never values).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Default)]
pub struct SecretSyncMetrics {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    reconciles: Family<ResultLabel, Counter>,
    errors: Family<KindLabel, Counter>,
    hsm_writes: Counter,
    secret_writes: Counter,
    status_writes: Counter,
}

impl SecretSyncMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("hsm_secrets");
        r.register(
            "secret_reconciles",
            "HSMSecret reconciles by result (ok, error)",
            m.inner.reconciles.clone(),
        );
        r.register(
            "secret_sync_errors",
            "HSMSecret reconcile errors by kind",
            m.inner.errors.clone(),
        );
        r.register(
            "secret_hsm_writes",
            "Writes into the HSM (imports and tombstones)",
            m.inner.hsm_writes.clone(),
        );
        r.register(
            "secret_copy_writes",
            "Writes of managed Kubernetes Secrets",
            m.inner.secret_writes.clone(),
        );
        r.register(
            "secret_status_writes",
            "HSMSecret status writes",
            m.inner.status_writes.clone(),
        );
        m
    }

    pub(super) fn reconciled(&self, error: Option<&str>) {
        let result = if error.is_some() { "error" } else { "ok" };
        self.inner
            .reconciles
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        if let Some(kind) = error {
            self.inner
                .errors
                .get_or_create(&KindLabel { kind: kind.into() })
                .inc();
        }
    }

    pub(super) fn hsm_write(&self) {
        self.inner.hsm_writes.inc();
    }

    pub(super) fn secret_write(&self) {
        self.inner.secret_writes.inc();
    }

    pub(super) fn status_write(&self) {
        self.inner.status_writes.inc();
    }
}
