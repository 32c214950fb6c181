//! The failover planner through its public API, the way the controller will drive it:
//! an `HSMDevice` as users write it (the HA guide's example), probes, a plan whose status
//! passes the CRD schema, and a failover of that device.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use hsm_secrets::crd::{DevicePhase, HSMDevice, schema};
use hsm_secrets::failover::{
    Action, AgentReport, DeviceView, EventReason, LeaseFacts, NodeError, NodeErrorKind,
    Observations, PlanConfig, Probe, ProbeResult, WriteLease, plan,
};
use k8s_openapi::jiff::Timestamp;
use kube::CustomResourceExt;

fn seed_device() -> HSMDevice {
    serde_saphyr::from_str(
        r#"
apiVersion: hsmsecrets.io/v1alpha1
kind: HSMDevice
metadata:
  name: hsm-primary
  generation: 4
spec:
  pkcs11:
    library: /usr/lib/softhsm/libsofthsm2.so
    tokenLabel: prod
    pinSecretRef: {namespace: hsm-secrets-system, name: prod-hsm-pin, key: pin}
  mirroring:
    policy: "ReadOnly"
    syncInterval: 300
    autoFailover: true
    primaryNode: "worker-1"
    targetNodes:
      - "worker-2"
      - "worker-3"
"#,
    )
    .unwrap()
}

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_760_000_000 + secs).unwrap()
}

/// What an agent that obeyed every command so far would report.
fn agent(
    role: Option<hsm_secrets::crd::DeviceRole>,
    epoch: u64,
    seq: u64,
    now: Timestamp,
) -> ProbeResult {
    ProbeResult::Reported(AgentReport {
        token_present: true,
        session_usable: true,
        token_serial: Some("a1b2".into()),
        role,
        epoch,
        history_epoch: epoch,
        applied_sequence: seq,
        last_sync: Some(now),
        write_lease: if role == Some(hsm_secrets::crd::DeviceRole::Primary) {
            WriteLease::Valid {
                remaining: Duration::from_secs(12),
            }
        } else {
            WriteLease::NotHeld
        },
        error: None,
        write_set: None,
    })
}

fn probe(node: &str, result: ProbeResult) -> Probe {
    Probe {
        node: node.into(),
        result,
    }
}

#[test]
fn seed_device_elects_its_preferred_primary_then_fails_over() {
    use hsm_secrets::crd::DeviceRole::*;
    let device = seed_device();
    let view = DeviceView::of(&device);
    let config = PlanConfig::default();
    config.validate().unwrap();
    let crd = serde_json::to_value(HSMDevice::crd()).unwrap();
    let schema_root = schema::crd_schema(&crd).unwrap();

    // Round 1: every agent answers with an empty token.
    let now = at(0);
    let observed = Observations {
        probes: ["worker-1", "worker-2", "worker-3"]
            .iter()
            .map(|n| probe(n, agent(None, 0, 0, now)))
            .collect(),
        lease: LeaseFacts {
            confirmed_renewal: None,
            leader_since: at(-60),
        },
        switchover: None,
        now,
    };
    let first = plan(&view, &Default::default(), &observed, &config);
    assert_eq!(first.status.primary_node.as_deref(), Some("worker-1"));
    assert_eq!(first.status.epoch, 1);
    assert_eq!(first.status.observed_generation, Some(4));
    assert!(first.actions.contains(&Action::Promote {
        node: "worker-1".into(),
        epoch: 1
    }));
    assert!(first.actions.contains(&Action::LabelNode {
        node: "worker-1".into(),
        ready: true
    }));

    // The planned status is what the API server would store.
    let mut stored = serde_json::to_value(&device).unwrap();
    stored["status"] = serde_json::to_value(&first.status).unwrap();
    let errors = schema::check(schema_root, &stored);
    assert!(errors.is_empty(), "{errors:?}");

    // Rounds 2..: worker-1 stops answering; after the threshold and its lease, failover.
    let mut status = first.status;
    let mut promoted = None;
    for round in 1..=10 {
        let now = at(round * 5);
        let observed = Observations {
            probes: vec![
                probe(
                    "worker-1",
                    ProbeResult::Failed(NodeError::new(
                        NodeErrorKind::Timeout,
                        "deadline exceeded",
                    )),
                ),
                probe("worker-2", agent(Some(ReadOnly), 1, 0, now)),
                probe("worker-3", agent(Some(ReadOnly), 1, 0, now)),
            ],
            lease: LeaseFacts {
                confirmed_renewal: Some(at(0)),
                leader_since: at(-60),
            },
            switchover: None,
            now,
        };
        let next = plan(&view, &status, &observed, &config);
        status = next.status.clone();
        if next.status.primary_node.as_deref() != Some("worker-1") {
            promoted = Some((round, next));
            break;
        }
    }
    let (round, failover) = promoted.expect("a failover within 10 rounds");
    // Threshold 3 is reached at round 3 (t=15 s); the lease lapses for sure at 0+15+5 s.
    assert_eq!(round, 4);
    assert_eq!(failover.status.primary_node.as_deref(), Some("worker-2"));
    assert_eq!(failover.status.epoch, 2);
    assert_eq!(failover.status.phase, DevicePhase::Degraded);
    assert!(
        failover
            .events()
            .any(|e| e.reason == EventReason::HSMFailover)
    );
    let mut stored = serde_json::to_value(&device).unwrap();
    stored["status"] = serde_json::to_value(&failover.status).unwrap();
    let errors = schema::check(schema_root, &stored);
    assert!(errors.is_empty(), "{errors:?}");
}
