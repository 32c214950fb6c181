//! The Kubernetes state store against a scripted API server: exact calls and bodies.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::time::Duration;

use hsm_secrets::crd::{DevicePhase, HSMDeviceStatus};
use hsm_secrets::state::{EventRecord, EventType, KubeState, ObjectRef, StateError, StateStore};
use kit::mock_api::{self, next, status};
use serde_json::json;

#[tokio::test]
async fn status_write_is_a_conditional_json_patch() {
    let (client, mut api) = mock_api::client();
    let state = KubeState::new(client, "hsm-secrets-system", Some("ctl-0".into()));
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(req.method, "PATCH");
        assert_eq!(
            req.path(),
            "/apis/hsmsecrets.io/v1alpha1/hsmdevices/prod-hsm/status"
        );
        assert_eq!(
            req.body[0],
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": "41"})
        );
        assert_eq!(req.body[1]["op"], "add");
        assert_eq!(req.body[1]["path"], "/status");
        assert_eq!(req.body[1]["value"]["epoch"], 7);
        assert_eq!(req.body[1]["value"]["phase"], "Ready");
        let written = req.body[1]["value"].clone();
        req.reply(200, json!({
            "apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMDevice",
            "metadata": {"name": "prod-hsm", "resourceVersion": "42"},
            "spec": {"pkcs11": {"library": "/l.so", "tokenLabel": "t", "pinSecretRef": {"namespace": "n", "name": "p"}}},
            "status": written
        }));
        // A stale write: the API server rejects the failed test operation.
        let req = next(&mut api).await;
        req.reply(
            422,
            status(
                422,
                "Invalid",
                "the server rejected our request: test operation failed",
            ),
        );
    });
    let st = HSMDeviceStatus {
        epoch: 7,
        phase: DevicePhase::Ready,
        ..Default::default()
    };
    let dev = state
        .replace_device_status("prod-hsm", "41", &st)
        .await
        .unwrap();
    assert_eq!(dev.metadata.resource_version.as_deref(), Some("42"));
    let err = state
        .replace_device_status("prod-hsm", "41", &st)
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Conflict { .. }), "{err}");
    server.await.unwrap();
}

#[tokio::test]
async fn lease_is_created_then_refused_while_another_holder_is_fresh() {
    let (client, mut api) = mock_api::client();
    let state = KubeState::new(client, "hsm-secrets-system", None);
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            (
                "GET",
                "/apis/coordination.k8s.io/v1/namespaces/hsm-secrets-system/leases/hsm-secrets-controller"
            )
        );
        req.reply(404, status(404, "NotFound", "not found"));
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            (
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/hsm-secrets-system/leases"
            )
        );
        assert_eq!(req.body["spec"]["holderIdentity"], "ctl-a");
        assert_eq!(req.body["spec"]["leaseDurationSeconds"], 15);
        let created = req.body.clone();
        req.reply(201, created);
        // Another controller holds a fresh lease: no write is attempted.
        let req = next(&mut api).await;
        assert_eq!(req.method, "GET");
        let now = k8s_openapi::jiff::Timestamp::now();
        req.reply(200, json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "hsm-secrets-controller", "namespace": "hsm-secrets-system", "resourceVersion": "9"},
            "spec": {"holderIdentity": "ctl-b", "leaseDurationSeconds": 15, "renewTime": now.to_string()}
        }));
    });
    assert!(
        state
            .acquire_lease("hsm-secrets-controller", "ctl-a", Duration::from_secs(15))
            .await
            .unwrap()
    );
    assert!(
        !state
            .acquire_lease("hsm-secrets-controller", "ctl-a", Duration::from_secs(15))
            .await
            .unwrap()
    );
    server.await.unwrap();
}

/// Expiry is judged on this replica's own clock: a holder whose Lease record stops
/// changing is taken over once the duration has passed here, whatever renewTime it wrote
/// (a holder whose clock runs ahead cannot keep it, and one whose clock runs behind does
/// not lose it early); the takeover writes the resourceVersion it read.
#[tokio::test]
async fn a_lease_whose_record_stops_changing_is_taken_over_whatever_its_renew_time_says() {
    let (client, mut api) = mock_api::client();
    let state = KubeState::new(client, "hsm-secrets-system", None);
    let held = || {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "hsm-secrets-controller", "namespace": "hsm-secrets-system", "resourceVersion": "9"},
            // Far in the future on the holder's clock: not to be trusted.
            "spec": {"holderIdentity": "ctl-b", "leaseDurationSeconds": 1, "renewTime": "2099-01-01T00:00:00.000000Z"}
        })
    };
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(req.method, "GET");
        req.reply(200, held());
        let req = next(&mut api).await;
        assert_eq!(req.method, "GET");
        req.reply(200, held());
        let req = next(&mut api).await;
        assert_eq!(req.method, "PUT");
        assert_eq!(req.body["metadata"]["resourceVersion"], "9");
        assert_eq!(req.body["spec"]["holderIdentity"], "ctl-a");
        assert_eq!(req.body["spec"]["leaseTransitions"], 1);
        let mut taken = req.body.clone();
        taken["metadata"]["resourceVersion"] = json!("10");
        req.reply(200, taken);
    });
    let lease = Duration::from_secs(1);
    assert!(
        !state
            .acquire_lease("hsm-secrets-controller", "ctl-a", lease)
            .await
            .unwrap(),
        "first seen: the holder's renewal is fresh on this clock"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(
        state
            .acquire_lease("hsm-secrets-controller", "ctl-a", lease)
            .await
            .unwrap(),
        "unchanged for a whole duration on this clock: taken over"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn events_and_node_labels() {
    let (client, mut api) = mock_api::client();
    let state = KubeState::new(client, "hsm-secrets-system", None);
    let server = tokio::spawn(async move {
        let req = next(&mut api).await;
        assert_eq!(req.method, "POST");
        assert_eq!(
            req.path(),
            "/apis/events.k8s.io/v1/namespaces/default/events"
        );
        assert_eq!(req.body["reason"], "HSMFailover");
        assert_eq!(req.body["type"], "Warning");
        assert_eq!(req.body["regarding"]["kind"], "HSMDevice");
        assert_eq!(req.body["regarding"]["name"], "prod-hsm");
        assert_eq!(req.body["note"], "promoted worker-2 at epoch 4");
        assert_eq!(req.body["regarding"]["uid"], "dev-uid-1");
        assert_eq!(
            kit::api_rules::event_problems(&req.body),
            Vec::<String>::new()
        );
        let body = req.body.clone();
        req.reply(201, body);
        let req = next(&mut api).await;
        assert_eq!(
            (req.method.as_str(), req.path()),
            ("PATCH", "/api/v1/nodes/worker-1")
        );
        assert_eq!(
            req.body,
            json!({"metadata": {"labels": {"hsmsecrets.io/device.prod-hsm": null}}})
        );
        req.reply(
            200,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "worker-1"}}),
        );
    });
    state
        .record_event(
            &ObjectRef::device("prod-hsm", Some("dev-uid-1")),
            &EventRecord {
                type_: EventType::Warning,
                reason: "HSMFailover".into(),
                action: "Promote".into(),
                message: "promoted worker-2 at epoch 4".into(),
            },
        )
        .await
        .unwrap();
    state
        .set_node_label("worker-1", "hsmsecrets.io/device.prod-hsm", None)
        .await
        .unwrap();
    server.await.unwrap();
}

fn device_object(annotations: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMDevice",
        "metadata": {"name": "prod-hsm", "generation": 1, "annotations": annotations},
        "spec": {"pkcs11": {"library": "/l.so", "tokenLabel": "t",
            "pinSecretRef": {"namespace": "n", "name": "p"}}},
    })
}

/// With the device watch, rounds read HSMDevices from the watch cache (no list per
/// round), a switchover request (an annotation) wakes the controller at once, and its
/// own status writes do not.
#[tokio::test]
async fn watched_devices_are_listed_from_the_cache_and_wake_the_loop_on_spec_changes() {
    let api = kit::fake_api::FakeApi::new();
    api.put(device_object(json!({})));
    let state = KubeState::new(api.client(), "hsm-secrets-system", None).watching_devices();

    // The first change the watch sees (the initial list) wakes a waiting round.
    tokio::time::timeout(
        Duration::from_secs(30),
        state.wait_device_change(Duration::from_secs(60)),
    )
    .await
    .expect("the initial list wakes the loop");
    let lists = api.calls("GET hsmdevices");
    for _ in 0..5 {
        let devices = state.list_devices().await.unwrap();
        assert_eq!(devices.len(), 1);
    }
    assert_eq!(api.calls("GET hsmdevices"), lists, "rounds read the cache");

    // A status write (the controller's own) does not wake the loop.
    let device = state.list_devices().await.unwrap().remove(0);
    let rv = device.metadata.resource_version.clone().unwrap();
    let st = HSMDeviceStatus {
        epoch: 3,
        ..Default::default()
    };
    state
        .replace_device_status("prod-hsm", &rv, &st)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    state.wait_device_change(Duration::from_millis(700)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(650),
        "woken by a status write after {:?}",
        started.elapsed()
    );
    // The cache follows the write.
    for _ in 0..100 {
        if state.list_devices().await.unwrap()[0]
            .status
            .as_ref()
            .is_some_and(|s| s.epoch == 3)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        state.list_devices().await.unwrap()[0]
            .status
            .as_ref()
            .unwrap()
            .epoch,
        3
    );

    // A switchover request wakes it well before the interval.
    let devices: kube::Api<hsm_secrets::crd::HSMDevice> = kube::Api::all(api.client());
    let patch = json!({"metadata": {"annotations": {"hsmsecrets.io/switchover-to": "n2"}}});
    devices
        .patch(
            "prod-hsm",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    state.wait_device_change(Duration::from_secs(30)).await;
    assert!(started.elapsed() < Duration::from_secs(10));
}
