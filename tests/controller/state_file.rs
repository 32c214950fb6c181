//! The file-backed state store of the no-cluster mode.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hsm_secrets::crd::{DevicePhase, HSMDevice, HSMDeviceStatus};
use hsm_secrets::state::{EventRecord, EventType, FileState, ObjectRef, StateError, StateStore};

fn device(name: &str) -> HSMDevice {
    crate::kit::resources::device(name).build()
}

#[tokio::test]
async fn status_writes_are_conditional_on_resource_version() {
    let dir = tempfile::tempdir().unwrap();
    let state = FileState::open(dir.path()).unwrap();
    let created = state.apply_device(&device("prod-hsm")).unwrap();
    let rv = created.metadata.resource_version.clone().unwrap();
    let status = HSMDeviceStatus {
        epoch: 3,
        phase: DevicePhase::Ready,
        ..Default::default()
    };
    let written = state
        .replace_device_status("prod-hsm", &rv, &status)
        .await
        .unwrap();
    assert_ne!(
        written.metadata.resource_version.as_deref(),
        Some(rv.as_str())
    );
    let err = state
        .replace_device_status("prod-hsm", &rv, &HSMDeviceStatus::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StateError::Conflict { .. }), "{err}");
    let back = state.get_device("prod-hsm").await.unwrap().unwrap();
    assert_eq!(back.status.unwrap().epoch, 3, "stale write changed nothing");
    assert_eq!(state.list_devices().await.unwrap().len(), 1);

    // Re-applying the spec keeps the status; a spec change bumps the generation.
    let mut changed = device("prod-hsm");
    changed.spec.pkcs11.token_label = "other".into();
    let applied = state.apply_device(&changed).unwrap();
    assert_eq!(applied.status.unwrap().epoch, 3);
    assert_eq!(applied.metadata.generation, Some(2));
    assert!(matches!(
        state
            .replace_device_status("missing", "1", &HSMDeviceStatus::default())
            .await,
        Err(StateError::NotFound { .. })
    ));
    assert!(
        state.get_device("../etc").await.is_err(),
        "names are checked"
    );
}

#[tokio::test]
async fn events_labels_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let state = FileState::open(dir.path()).unwrap();
    let ev = EventRecord {
        type_: EventType::Warning,
        reason: "HSMFailover".into(),
        action: "Promote".into(),
        message: "promoted n2".into(),
    };
    state
        .record_event(&ObjectRef::device("d", None), &ev)
        .await
        .unwrap();
    let events = state.events().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, ev);

    state
        .set_node_label("n1", "hsmsecrets.io/device.d", Some("ready"))
        .await
        .unwrap();
    assert_eq!(
        state.node_labels("n1").unwrap()["hsmsecrets.io/device.d"],
        "ready"
    );
    state
        .set_node_label("n1", "hsmsecrets.io/device.d", None)
        .await
        .unwrap();
    assert!(state.node_labels("n1").unwrap().is_empty());

    let short = Duration::from_millis(300);
    assert!(state.acquire_lease("controller", "a", short).await.unwrap());
    assert!(!state.acquire_lease("controller", "b", short).await.unwrap());
    assert!(
        state.acquire_lease("controller", "a", short).await.unwrap(),
        "renewal"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        state.acquire_lease("controller", "b", short).await.unwrap(),
        "expired lease taken over"
    );
}
