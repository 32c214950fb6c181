//! After a full sync (import, copy, drift correction, refused imports, deletion) with
//! distinctive secret values, none of those values, nor their base64, appears in any
//! log line, Event, status patch or metrics text.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kit::mock_api;
use kit::secret::*;
use serde_json::{Value, json};

const VALUES: [&[u8]; 3] = [
    b"Zebra-Quartz-9931-password",
    b"Mongoose-Vellum-4417-token",
    b"Ocelot-Tundra-2288-edited",
];

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the generic API server saw that must stay free of secret bytes.
#[derive(Default)]
struct Seen {
    events: Vec<Value>,
    statuses: Vec<Value>,
}

/// Answers every call from an in-memory view of the namespace, recording Events and
/// status patches. `phase` is the device phase served.
async fn serve(
    api: &mut mock_api::Handle,
    secrets: &mut BTreeMap<String, Value>,
    phase: &str,
    seen: &mut Seen,
    until: &mut tokio::task::JoinHandle<
        Result<hsm_secrets::secret_sync::ReconcileOutcome, hsm_secrets::secret_sync::SyncError>,
    >,
) -> hsm_secrets::secret_sync::ReconcileOutcome {
    let mut rv = 100;
    loop {
        let call = tokio::select! {
            out = &mut *until => return out.unwrap().unwrap(),
            call = mock_api::next(api) => call,
        };
        rv += 1;
        let path = call.path().to_string();
        let name = path.rsplit('/').next().unwrap().to_string();
        match (call.method.as_str(), path.as_str()) {
            ("GET", DEVICE) => call.reply(200, device(phase)),
            ("GET", p) if p.starts_with(SECRETS) => match secrets.get(&name) {
                Some(s) => call.reply(200, s.clone()),
                None => call.reply(404, mock_api::status(404, "NotFound", "not found")),
            },
            ("POST", SECRETS) | ("PUT", _) if path.starts_with(SECRETS) => {
                let mut body = call.body.clone();
                body["metadata"]["resourceVersion"] = json!(rv.to_string());
                let n = body["metadata"]["name"].as_str().unwrap().to_string();
                secrets.insert(n, body.clone());
                call.reply(201, body);
            }
            ("DELETE", p) if p.starts_with(SECRETS) => {
                secrets.remove(&name);
                call.reply(200, mock_api::status(200, "", ""));
            }
            ("PATCH", p) if p.ends_with("/status") => {
                seen.statuses.push(call.body.clone());
                call.reply(200, hsmsecret(json!({}), None, true));
            }
            ("PATCH", p) if p.starts_with(HSMSECRETS) => {
                call.reply(200, hsmsecret(json!({}), None, true))
            }
            (_, p) if p.starts_with(EVENTS) => {
                seen.events.push(call.body.clone());
                let body = call.body.clone();
                call.reply(201, body);
            }
            (m, p) => panic!("unexpected call {m} {p}"),
        }
    }
}

#[tokio::test]
async fn no_secret_value_reaches_logs_events_status_or_metrics() {
    let logs = Buffer::default();
    let writer = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "debug,hsm_secrets=trace",
            ))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    )
    .unwrap();

    let mut env = Env::start().await;
    let mut api = std::mem::replace(&mut env.api, mock_api::client().1);
    let mut secrets = BTreeMap::new();
    let mut seen = Seen::default();
    secrets.insert(
        "db-import-x7k2p".to_string(),
        import(
            "500",
            &[("password", VALUES[0]), ("token", VALUES[1])],
            None,
        ),
    );
    let spec = json!({"secretName": "db-copy", "source": {"secretRef": {"name": "db-import-x7k2p"}, "deleteAfterImport": true}});

    // Import, copy, source deleted.
    let obj = hsmsecret(spec.clone(), None, true);
    let mut task = env.reconcile(&obj);
    let out = serve(&mut api, &mut secrets, "Ready", &mut seen, &mut task).await;
    assert!(out.hsm_written && out.secret_written && out.source_deleted);
    let status = seen.statuses.last().unwrap()[1]["value"].clone();
    assert_eq!(status["syncStatus"], "InSync");

    // Someone edits the copy: corrected.
    let mut copy = secrets["db-copy"].clone();
    copy["data"]["password"] = json!(b64(VALUES[2]));
    secrets.insert("db-copy".into(), copy);
    let obj = hsmsecret(spec.clone(), Some(status.clone()), true);
    let mut task = env.reconcile(&obj);
    assert!(
        serve(&mut api, &mut secrets, "Ready", &mut seen, &mut task)
            .await
            .secret_written
    );
    assert_eq!(
        data_of(&secrets["db-copy"]),
        pairs(&[("password", VALUES[0]), ("token", VALUES[1])])
    );

    // A new import while the device is read-only: refused.
    secrets.insert(
        "db-import-x7k2p".to_string(),
        import("700", &[("password", VALUES[2])], None),
    );
    let mut task = env.reconcile(&obj);
    let out = serve(
        &mut api,
        &mut secrets,
        "ReadOnlyFallback",
        &mut seen,
        &mut task,
    )
    .await;
    assert!(out.error.is_some());

    // An import from a Secret not labelled for this HSMSecret: refused, nothing read
    // into the status or the logs.
    let mut unlabelled = import("800", &[("password", VALUES[2])], None);
    unlabelled["metadata"]["labels"] = json!({});
    secrets.insert("db-import-x7k2p".to_string(), unlabelled);
    let mut task = env.reconcile(&obj);
    let out = serve(&mut api, &mut secrets, "Ready", &mut seen, &mut task).await;
    assert!(!out.hsm_written);
    assert_eq!(
        out.error,
        Some(hsm_secrets::secret_sync::SyncErrorKind::SourceNotLabelled)
    );
    let refused = &seen.statuses.last().unwrap()[1]["value"];
    let message = refused["lastError"].as_str().unwrap_or_default();
    assert!(message.contains("not labelled"), "{refused}");

    // Deletion with deletionPolicy Delete.
    let mut obj = hsmsecret(
        json!({"secretName": "db-copy", "deletionPolicy": "Delete"}),
        Some(status),
        true,
    );
    obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let mut task = env.reconcile(&obj);
    assert!(
        serve(&mut api, &mut secrets, "Ready", &mut seen, &mut task)
            .await
            .finalized
    );

    let mut metrics = String::new();
    prometheus_client::encoding::text::encode(&mut metrics, &env.registry).unwrap();
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("imported into the HSM"),
        "the capture works: {logs}"
    );
    assert!(
        metrics.contains("hsm_secrets_secret_hsm_writes_total 2"),
        "{metrics}"
    );
    assert!(!seen.events.is_empty() && seen.statuses.len() >= 3);
    let places = [
        ("logs", logs),
        ("metrics", metrics),
        ("events", serde_json::to_string(&seen.events).unwrap()),
        (
            "status patches",
            serde_json::to_string(&seen.statuses).unwrap(),
        ),
    ];
    for value in VALUES {
        let plain = String::from_utf8(value.to_vec()).unwrap();
        for needle in [plain.clone(), b64(value)] {
            for (place, text) in &places {
                assert!(!text.contains(&needle), "{place} contain {needle:?}");
            }
        }
    }
}
