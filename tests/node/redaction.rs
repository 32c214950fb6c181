//! Secret bytes never reach a log line, a metric or a gRPC error: every node plugin path
//! (publish, rotation, refusals, a failing device, unpublish) runs with every log level of
//! every crate captured.
//!
//! One test in this binary: it installs the process-wide log subscriber.
#![allow(clippy::unwrap_used)]

use crate::kit;
use hsm_secrets_testkit::token_or_skip;
use std::io::Write;
use std::sync::{Arc, Mutex};

use hsm_secrets::hsm::{FaultKind, FaultPlan, FaultyStore, SecretStore};
use hsm_secrets::node::StaticCatalog;
use kit::node::{DEVICE, NAMESPACE, NodeHarness, put, read, volume};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const FIRST: &[u8] = b"s3cr3t-first-9f4c2e";
const ROTATED: &[u8] = b"s3cr3t-rotated-71d0aa";

fn spellings(secret: &[u8]) -> Vec<String> {
    let text = String::from_utf8(secret.to_vec()).unwrap();
    vec![
        text.clone(),
        hex::encode(secret),
        hex::encode_upper(secret),
        format!("{secret:?}"),
        format!("{:?}", text.as_bytes().to_vec()),
        text[4..14].to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_log_line_metric_or_error_carries_secret_bytes() {
    let token = token_or_skip!("node-redact");
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let plan = Arc::new(FaultPlan::new());
    let store: Arc<dyn SecretStore> = Arc::new(FaultyStore::new(token.open().await, plan.clone()));
    put(store.as_ref(), "shop/db", &[("password", FIRST)]).await;
    let catalog = Arc::new(StaticCatalog::new([
        kit::resources::secret(NAMESPACE, "db")
            .device(DEVICE)
            .accounts(&["checkout"])
            .build(),
        kit::resources::secret(NAMESPACE, "locked")
            .device(DEVICE)
            .accounts(&["batch"])
            .build(),
    ]));
    let h = NodeHarness::with_store(catalog, store.clone()).await;
    let target = h.target("uid-1", "secrets");
    let mut errors = Vec::new();

    h.publish(volume("vol-1", &target, "db")).await.unwrap();
    assert_eq!(read(&target.join("db/password")), FIRST);
    put(store.as_ref(), "shop/db", &[("password", ROTATED)]).await;
    h.publish(volume("vol-1", &target, "db")).await.unwrap();
    assert_eq!(read(&target.join("db/password")), ROTATED);
    plan.fail_op("get", FaultKind::DeviceUnavailable);
    h.publish(volume("vol-1", &target, "db")).await.unwrap();
    plan.clear();
    let other = h.target("uid-2", "secrets");
    for secrets in ["locked", "missing", "bank/db", "db,locked"] {
        let status = h
            .publish(volume("vol-2", &other, secrets))
            .await
            .unwrap_err();
        errors.push(status.message().to_string());
    }
    h.unpublish("vol-1", &target).await.unwrap();
    let metrics = h.metrics_text();

    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains("volume published") && logs.contains("keeping last good content"),
        "the capture saw the plugin's logs:\n{logs}"
    );
    assert!(
        metrics.contains(r#"kind="source_unavailable"} 1"#),
        "the failed republish was counted:\n{metrics}"
    );
    for secret in [FIRST, ROTATED] {
        for spelling in spellings(secret) {
            assert!(
                !logs.contains(&spelling),
                "logs contain {spelling:?}:\n{logs}"
            );
            assert!(!metrics.contains(&spelling), "metrics contain {spelling:?}");
            for e in &errors {
                assert!(!e.contains(&spelling), "error contains {spelling:?}: {e}");
            }
        }
    }
}
