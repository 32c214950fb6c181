//! The HSMSecret reconciler in the no-cluster mode (file-backed state): status reports
//! what the HSM holds, read through a real agent; Kubernetes Secret features are reported
//! as needing a cluster.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::sync::Arc;

use hsm_secrets::crd::{DevicePhase, HSMDeviceStatus, HSMSecret, HSMSecretSpec, SyncStatus};
use hsm_secrets::secret_sync::{
    AgentDirectory, DigestKey, FileCluster, SecretReconciler, SecretSyncMetrics, SyncErrorKind,
};
use hsm_secrets::state::{FileState, StateStore};
use kit::secret::Env;

fn hsmsecret(secret_name: Option<&str>) -> HSMSecret {
    let mut o = HSMSecret::new(
        "db",
        HSMSecretSpec {
            device_ref: "prod-hsm".into(),
            secret_name: secret_name.map(String::from),
            secret_type: None,
            sync_interval: None,
            source: None,
            access: None,
            deletion_policy: None,
        },
    );
    o.metadata.namespace = Some("shop".into());
    o
}

#[tokio::test]
async fn file_state_status_follows_the_hsm_through_the_agent() {
    let env = Env::start().await;
    let version = env.seed(&[("user", b"app"), ("password", b"pw")]).await;
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(FileState::open(dir.path()).unwrap());
    let device = state
        .apply_device(
            &kit::resources::device("prod-hsm")
                .mirrored(Some("n1"), &[])
                .sync_interval(300)
                .auto_failover(3)
                .build(),
        )
        .unwrap();
    state
        .replace_device_status(
            "prod-hsm",
            device.metadata.resource_version.as_deref().unwrap(),
            &HSMDeviceStatus {
                primary_node: Some("n1".into()),
                epoch: 1,
                phase: DevicePhase::Ready,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    state.apply_secret(&hsmsecret(None)).unwrap();
    let reconciler = SecretReconciler::new(
        Arc::new(FileCluster::new(state.clone())),
        AgentDirectory::new([env.primary.clone()]),
        DigestKey::from_bytes(vec![3; 32]).unwrap(),
        SecretSyncMetrics::default(),
    );

    let object = state.get_secret("shop", "db").await.unwrap().unwrap();
    let out = reconciler.reconcile(&object).await.unwrap();
    assert!(out.status_written && !out.hsm_written);
    let status = state
        .get_secret("shop", "db")
        .await
        .unwrap()
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.sync_status, SyncStatus::InSync);
    assert_eq!(status.version, Some(version));
    assert_eq!(
        status.keys,
        vec!["password".to_string(), "user".to_string()]
    );
    assert_eq!(status.served_by.unwrap().node, "n1");
    let reasons: Vec<String> = state
        .events()
        .unwrap()
        .into_iter()
        .map(|e| e.event.reason)
        .collect();
    assert_eq!(reasons, vec!["HSMSecretSynced".to_string()]);

    // Nothing changed: nothing written.
    let object = state.get_secret("shop", "db").await.unwrap().unwrap();
    let out = reconciler.reconcile(&object).await.unwrap();
    assert!(!out.status_written);

    // A Secret copy needs a cluster: said in status, not silently ignored.
    state.apply_secret(&hsmsecret(Some("db-copy"))).unwrap();
    let object = state.get_secret("shop", "db").await.unwrap().unwrap();
    let out = reconciler.reconcile(&object).await.unwrap();
    assert_eq!(out.error, Some(SyncErrorKind::Unsupported));
    let status = state
        .get_secret("shop", "db")
        .await
        .unwrap()
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.sync_status, SyncStatus::Error);
    assert!(
        status.last_error.unwrap().contains("need a cluster"),
        "the error says why"
    );
}
