//! The pod Event of a republish that kept the last good content, against a scripted
//! API server: the exact events.k8s.io/v1 POST, and the per-volume rate limit.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hsm_secrets::node::events::PodEventSink;
use hsm_secrets::node::{KubePodEvents, SyncFailureEvents};
use hsm_secrets_csi::PublishRequest;
use hsm_secrets_csi::source::pod_info;
use kit::mock_api::{self, next};
use serde_json::json;

fn republish(volume: &str) -> PublishRequest {
    PublishRequest {
        volume_id: volume.into(),
        target_path: "/var/lib/kubelet/pods/5b2c/volumes/kubernetes.io~csi/certs/mount".into(),
        volume_context: BTreeMap::from([
            (pod_info::POD_NAME.into(), "web-0".into()),
            (pod_info::POD_NAMESPACE.into(), "shop".into()),
            (pod_info::POD_UID.into(), "5b2c".into()),
            (
                pod_info::SERVICE_ACCOUNT_TOKENS.into(),
                "{\"token\":\"bearer-must-not-leak\"}".into(),
            ),
            ("secrets".into(), "db-creds,api-key".into()),
            ("device".into(), "prod-hsm".into()),
        ]),
        read_only: true,
        fs_group: None,
        republish: true,
    }
}

#[tokio::test]
async fn a_kept_last_good_republish_posts_one_warning_on_the_pod_per_volume() {
    let (client, mut api) = mock_api::client();
    let sink = Arc::new(KubePodEvents::new(client, "node-a")) as Arc<dyn PodEventSink>;
    let events = Arc::new(SyncFailureEvents::new(Some(sink)));

    let first = {
        let events = events.clone();
        tokio::spawn(async move {
            events
                .republish_kept_last_good(&republish("csi-123"), "source_unavailable")
                .await
        })
    };
    let seen = next(&mut api).await;
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path(), "/apis/events.k8s.io/v1/namespaces/shop/events");
    // What the API server checks: a name (a `generateName` ending in '.' is refused),
    // the required fields, and (for `kubectl describe`) the pod's uid.
    assert_eq!(
        kit::api_rules::event_problems(&seen.body),
        Vec::<String>::new()
    );
    let mut body = seen.body.clone();
    let name = body["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("name")
        .unwrap();
    assert!(name.as_str().unwrap().starts_with("web-0."), "{name}");
    let event_time = body.as_object_mut().unwrap().remove("eventTime").unwrap();
    assert!(event_time.as_str().unwrap().ends_with('Z'), "{event_time}");
    assert_eq!(
        body,
        json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"namespace": "shop"},
            "action": "Republish",
            "reason": "HSMSecretSyncFailed",
            "type": "Warning",
            "note": "cannot refresh HSMSecret db-creds, api-key in volume csi-123 \
                     (source_unavailable); the last good content is kept",
            "regarding": {
                "apiVersion": "v1", "kind": "Pod",
                "name": "web-0", "namespace": "shop", "uid": "5b2c"
            },
            "reportingController": "hsm-secrets.io/node",
            "reportingInstance": "node-a"
        })
    );
    assert!(!seen.body.to_string().contains("bearer-must-not-leak"));
    let mut created = body.clone();
    created["metadata"]["name"] = json!("web-0.abc12");
    seen.reply(201, created);
    tokio::time::timeout(Duration::from_secs(10), first)
        .await
        .unwrap()
        .unwrap();

    // The same volume failing again makes no API call (an unanswered POST would hang).
    tokio::time::timeout(
        Duration::from_secs(10),
        events.republish_kept_last_good(&republish("csi-123"), "source_unavailable"),
    )
    .await
    .expect("a rate-limited Event must not call the API");

    // Another volume of the same pod gets its own Event; a refused POST is only logged.
    let other = {
        let events = events.clone();
        tokio::spawn(async move {
            events
                .republish_kept_last_good(&republish("csi-456"), "source_not_found")
                .await
        })
    };
    let seen = next(&mut api).await;
    assert!(seen.body["note"].as_str().unwrap().contains("csi-456"));
    seen.reply(
        403,
        mock_api::status(403, "Forbidden", "events is forbidden"),
    );
    tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .unwrap()
        .unwrap();
}
