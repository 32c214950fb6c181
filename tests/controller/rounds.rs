//! The HSMDevice controller's rounds against simulated agents and the file-backed state
//! store: bootstrap, failover after the threshold and the fence, rejoin without failback.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_secrets::controller::{ControllerMetrics, DeviceController};
use hsm_secrets::crd::{DevicePhase, DeviceRole};
use hsm_secrets::failover::{FencingConfig, PlanConfig};
use hsm_secrets::state::{FileState, KubeState, StateStore};

use kit::mock_api;
use kit::sim_agents::SimAgents;
use serde_json::json;

async fn round(
    ctl: &DeviceController<FileState, SimAgents>,
    state: &FileState,
) -> hsm_secrets::crd::HSMDeviceStatus {
    let dev = state.get_device("prod-hsm").await.unwrap().unwrap();
    let outcome = ctl.reconcile(&dev).await.unwrap();
    assert!(!outcome.conflict);
    state
        .get_device("prod-hsm")
        .await
        .unwrap()
        .unwrap()
        .status
        .unwrap_or_default()
}

#[tokio::test]
async fn bootstrap_failover_after_fence_and_rejoin_without_failback() {
    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(FileState::open(dir.path()).unwrap());
    state
        .apply_device(
            &kit::resources::device("prod-hsm")
                .mirrored(Some("n1"), &["n2", "n3"])
                .sync_interval(300)
                .auto_failover(3)
                .build(),
        )
        .unwrap();
    let lease = Duration::from_millis(300);
    let agents = Arc::new(SimAgents::new(lease, &[("n1", 10), ("n2", 10), ("n3", 7)]));
    let config = PlanConfig {
        fencing: FencingConfig {
            lease_duration: lease,
            safety_margin: Duration::from_millis(200),
        },
        ..PlanConfig::default()
    };
    let ctl = DeviceController::new(
        state.clone(),
        agents.clone(),
        config,
        ControllerMetrics::default(),
    );

    // Bootstrap: the preferred node becomes primary at epoch 1, mirrors follow.
    let mut status = round(&ctl, &state).await;
    for _ in 0..3 {
        status = round(&ctl, &state).await;
    }
    assert_eq!(status.primary_node.as_deref(), Some("n1"));
    assert_eq!(status.epoch, 1);
    assert_eq!(status.phase, DevicePhase::Ready, "{status:?}");
    assert_eq!(agents.agent("n1").role, Some(DeviceRole::Primary));
    assert_eq!(
        state.node_labels("n1").unwrap()["hsmsecrets.io/device.prod-hsm"],
        "ready"
    );

    // The primary goes away: below the threshold nothing is promoted.
    agents.set_up("n1", false);
    status = round(&ctl, &state).await;
    assert_eq!(status.primary_node.as_deref(), Some("n1"));
    assert_ne!(status.phase, DevicePhase::Ready);
    // At the threshold the controller still waits for the old lease to lapse.
    round(&ctl, &state).await;
    status = round(&ctl, &state).await;
    assert_eq!(
        status.primary_node.as_deref(),
        Some("n1"),
        "no promotion before the fence"
    );
    assert_eq!(status.phase, DevicePhase::ReadOnlyFallback);
    assert!(status.primary_unavailable_since.is_some());

    // After lease + margin, the most caught-up healthy mirror is promoted.
    tokio::time::sleep(Duration::from_millis(600)).await;
    status = round(&ctl, &state).await;
    assert_eq!(status.primary_node.as_deref(), Some("n2"), "{status:?}");
    assert_eq!(status.epoch, 2);
    assert_eq!(status.failover_count, 1);
    assert_eq!(agents.agent("n2").role, Some(DeviceRole::Primary));
    let reasons: Vec<String> = state
        .events()
        .unwrap()
        .into_iter()
        .map(|e| e.event.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "HSMFailover"), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r == "HSMDeviceUnhealthy"),
        "{reasons:?}"
    );
    assert!(
        !state
            .node_labels("n1")
            .unwrap()
            .contains_key("hsmsecrets.io/device.prod-hsm")
    );

    // The old primary returns: it rejoins as a mirror; no failback.
    agents.set_up("n1", true);
    for _ in 0..3 {
        status = round(&ctl, &state).await;
    }
    assert_eq!(status.primary_node.as_deref(), Some("n2"));
    assert_ne!(agents.agent("n1").role, Some(DeviceRole::Primary));
    assert_eq!(agents.agent("n1").epoch, 2);
    assert_eq!(status.epoch, 2, "epoch only moves on promotion");
}

type Call = (String, String, serde_json::Value);

/// Answers every call until none comes for 800 ms, and returns them in order (method,
/// path, body). A status patch is answered with the device at `resource_version`
/// carrying the written status; anything else with its own body.
fn answer_every_call(
    mut api: mock_api::Handle,
    spec: serde_json::Value,
    resource_version: &'static str,
) -> tokio::task::JoinHandle<Vec<Call>> {
    tokio::spawn(async move {
        let mut calls = Vec::new();
        while let Ok(Some((req, respond))) =
            tokio::time::timeout(Duration::from_millis(800), api.next_request()).await
        {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let body: serde_json::Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            let reply = if path.ends_with("/status") {
                json!({"apiVersion": "hsmsecrets.io/v1alpha1", "kind": "HSMDevice",
                       "metadata": {"name": "prod-hsm", "resourceVersion": resource_version},
                       "spec": spec, "status": body[1]["value"].clone()})
            } else {
                body.clone()
            };
            respond.send_response(
                http::Response::builder()
                    .status(200)
                    .body(kube::client::Body::from(
                        serde_json::to_vec(&reply).unwrap(),
                    ))
                    .unwrap(),
            );
            calls.push((method, path, body));
        }
        calls
    })
}

/// One bootstrap round against a scripted API server: exactly one conditional status
/// patch, node label patches and an Event; nothing else.
#[tokio::test]
async fn bootstrap_round_makes_exactly_the_expected_api_calls() {
    let (client, api) = mock_api::client();
    let state = Arc::new(KubeState::new(client, "hsm-secrets-system", None));
    let agents = Arc::new(SimAgents::new(
        Duration::from_secs(15),
        &[("n1", 4), ("n2", 4), ("n3", 4)],
    ));
    let ctl = DeviceController::new(
        state,
        agents.clone(),
        PlanConfig::default(),
        ControllerMetrics::default(),
    );
    let mut dev = kit::resources::device("prod-hsm")
        .mirrored(Some("n1"), &["n2", "n3"])
        .sync_interval(300)
        .auto_failover(3)
        .build();
    dev.metadata.resource_version = Some("100".into());
    dev.metadata.generation = Some(1);
    let server = answer_every_call(api, serde_json::to_value(&dev.spec).unwrap(), "101");
    ctl.reconcile(&dev).await.unwrap();
    let calls = server.await.unwrap();
    let (method, path, body) = &calls[0];
    assert_eq!(
        (method.as_str(), path.as_str()),
        (
            "PATCH",
            "/apis/hsmsecrets.io/v1alpha1/hsmdevices/prod-hsm/status"
        )
    );
    assert_eq!(
        body[0],
        json!({"op": "test", "path": "/metadata/resourceVersion", "value": "100"})
    );
    let status = &body[1]["value"];
    assert_eq!(status["primaryNode"], "n1");
    assert_eq!(status["epoch"], 1);
    assert_eq!(status["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(status["observedGeneration"], 1);
    let label_patches: Vec<_> = calls
        .iter()
        .filter(|(m, p, _)| m == "PATCH" && p.starts_with("/api/v1/nodes/"))
        .collect();
    assert!(
        label_patches.iter().any(|(_, p, b)| p.ends_with("/n1")
            && b["metadata"]["labels"]["hsmsecrets.io/device.prod-hsm"] == "ready"),
        "{label_patches:?}"
    );
    let events: Vec<_> = calls
        .iter()
        .filter(|(m, p, _)| m == "POST" && p.ends_with("/events"))
        .map(|(_, _, b)| b["reason"].as_str().unwrap().to_string())
        .collect();
    assert!(events.contains(&"HSMPromoted".to_string()), "{events:?}");
    assert!(
        calls.iter().all(|(m, p, _)| (m == "PATCH"
            && (p.ends_with("/status") || p.starts_with("/api/v1/nodes/")))
            || (m == "POST" && p.ends_with("/events"))),
        "unexpected calls: {calls:?}"
    );
    assert_eq!(
        calls
            .iter()
            .filter(|(_, p, _)| p.ends_with("/status"))
            .count(),
        1,
        "one status write"
    );
    assert_eq!(agents.agent("n1").role, Some(DeviceRole::Primary));
}

/// The failover round against a scripted API server, call by call: one conditional
/// status patch (epoch 2, n2 primary), the node labels in name order (n1 no longer
/// ready), then the Events of the transition. Nothing else reaches the API server.
#[tokio::test]
async fn failover_round_makes_exactly_the_expected_api_calls() {
    // Reach a Ready device and a primary at its failure threshold on the file state.
    let dir = tempfile::tempdir().unwrap();
    let files = Arc::new(FileState::open(dir.path()).unwrap());
    files
        .apply_device(
            &kit::resources::device("prod-hsm")
                .mirrored(Some("n1"), &["n2", "n3"])
                .sync_interval(300)
                .auto_failover(3)
                .build(),
        )
        .unwrap();
    let lease = Duration::from_millis(50);
    let agents = Arc::new(SimAgents::new(lease, &[("n1", 4), ("n2", 4), ("n3", 3)]));
    let config = PlanConfig {
        fencing: FencingConfig {
            lease_duration: lease,
            safety_margin: Duration::from_millis(10),
        },
        ..PlanConfig::default()
    };
    let on_files = DeviceController::new(
        files.clone(),
        agents.clone(),
        config.clone(),
        ControllerMetrics::default(),
    );
    for _ in 0..4 {
        round(&on_files, &files).await;
    }
    agents.set_up("n1", false);
    for _ in 0..2 {
        round(&on_files, &files).await;
    }
    let mut dev = files.get_device("prod-hsm").await.unwrap().unwrap();
    let before = dev.status.clone().unwrap();
    assert_eq!(before.primary_node.as_deref(), Some("n1"));
    assert_eq!(before.nodes[0].consecutive_failures, 2);
    dev.metadata.resource_version = Some("200".into());

    // The third failure, on the cluster: this controller leads since long before.
    let (client, api) = mock_api::client();
    let ctl = DeviceController::new(
        Arc::new(KubeState::new(client, "hsm-secrets-system", None)),
        agents.clone(),
        config,
        ControllerMetrics::default(),
    );
    ctl.became_leader(
        k8s_openapi::jiff::Timestamp::now()
            .checked_sub(k8s_openapi::jiff::SignedDuration::from_hours(1))
            .unwrap(),
    );
    let server = answer_every_call(api, serde_json::to_value(&dev.spec).unwrap(), "201");
    ctl.reconcile(&dev).await.unwrap();
    let calls = server.await.unwrap();

    let summary: Vec<String> = calls
        .iter()
        .map(|(method, path, body)| {
            if path.ends_with("/status") {
                let s = &body[1]["value"];
                format!(
                    "{method} {path} test={} primary={} epoch={} phase={} failovers={}",
                    body[0]["value"], s["primaryNode"], s["epoch"], s["phase"], s["failoverCount"]
                )
            } else if path.starts_with("/api/v1/nodes/") {
                format!(
                    "{method} {path} label={}",
                    body["metadata"]["labels"]["hsmsecrets.io/device.prod-hsm"]
                )
            } else {
                format!(
                    "{method} {path} reason={} type={}",
                    body["reason"], body["type"]
                )
            }
        })
        .collect();
    let events = "/apis/events.k8s.io/v1/namespaces/default/events";
    let expected = vec![
        "PATCH /apis/hsmsecrets.io/v1alpha1/hsmdevices/prod-hsm/status test=\"200\" primary=\"n2\" epoch=2 phase=\"Degraded\" failovers=1".to_string(),
        "PATCH /api/v1/nodes/n1 label=null".into(),
        "PATCH /api/v1/nodes/n2 label=\"ready\"".into(),
        "PATCH /api/v1/nodes/n3 label=\"ready\"".into(),
        format!("POST {events} reason=\"HSMFailover\" type=\"Warning\""),
        format!("POST {events} reason=\"HSMPromoted\" type=\"Normal\""),
        format!("POST {events} reason=\"HSMDeviceUnhealthy\" type=\"Warning\""),
    ];
    assert_eq!(summary, expected, "{calls:#?}");
    assert_eq!(agents.agent("n2").role, Some(DeviceRole::Primary));
    assert_eq!(agents.agent("n2").epoch, 2);
    assert_eq!(agents.agent("n3").epoch, 2, "n3 follows the new primary");
}

/// Steady state on a real-shaped API: once a device is Ready, rounds every 100 ms for
/// three seconds write no HSMDevice status, no Node label and no Event; the only writes
/// are the leader Lease's renewals (every third of its duration). Reads are free to
/// happen. Every round's agent report carries a new `lastSync`, so this also holds the
/// status heartbeat.
#[tokio::test]
async fn idle_rounds_write_nothing_but_the_leader_lease() {
    use kit::fake_api::FakeApi;

    let api = FakeApi::new();
    for node in ["n1", "n2", "n3"] {
        api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}));
    }
    let mut device = serde_json::to_value(
        kit::resources::device("prod-hsm")
            .mirrored(Some("n1"), &["n2", "n3"])
            .sync_interval(300)
            .auto_failover(3)
            .build(),
    )
    .unwrap();
    device["metadata"]["uid"] = json!("dev-uid-1");
    api.put(device);
    let state = Arc::new(KubeState::new(api.client(), "hsm-secrets-system", None));
    let lease = Duration::from_millis(400);
    let agents = Arc::new(SimAgents::new(lease, &[("n1", 10), ("n2", 10), ("n3", 10)]));
    let (stop, controller) = spawn_controller(&state, &agents, lease, Duration::from_millis(1500));
    // Bootstrap: primary, mirrors, labels, Events.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dev = state.get_device("prod-hsm").await.unwrap().unwrap();
        let status = dev.status.unwrap_or_default();
        if status.phase == DevicePhase::Ready
            && status
                .nodes
                .iter()
                .all(|n| n.role == DeviceRole::Primary || n.role == DeviceRole::ReadOnly)
        {
            break;
        }
        assert!(Instant::now() < deadline, "never Ready: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = api.writes();
    let idle = Duration::from_secs(3);
    tokio::time::sleep(idle).await;
    let after = api.writes();
    let _ = stop.send(());
    controller.await.unwrap().unwrap();

    let grown: BTreeMap<String, usize> = after
        .iter()
        .map(|(what, n)| (what.clone(), n - before.get(what).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let lease_renewals = grown.get("PUT leases").copied().unwrap_or(0);
    let others: Vec<_> = grown.iter().filter(|(w, _)| *w != "PUT leases").collect();
    assert!(others.is_empty(), "idle rounds wrote {others:?}");
    // One renewal per 500 ms (a third of 1.5 s), give or take a round.
    assert!(
        (4..=8).contains(&lease_renewals),
        "{lease_renewals} Lease renewals in {idle:?}"
    );
    assert!(api.refused().is_empty(), "{:?}", api.refused());
}

/// Each failover is its own Event with its own message, regarding the device by uid:
/// nothing is merged into an earlier Event with the same reason.
#[tokio::test]
async fn every_event_is_its_own_record_with_the_devices_uid() {
    use hsm_secrets::state::{EventRecord, EventType, ObjectRef};
    use kit::fake_api::FakeApi;

    let api = FakeApi::new();
    let state = KubeState::new(api.client(), "hsm-secrets-system", None);
    for epoch in 2..=6 {
        state
            .record_event(
                &ObjectRef::device("prod-hsm", Some("dev-uid-1")),
                &EventRecord {
                    type_: EventType::Warning,
                    reason: "HSMFailover".into(),
                    action: "Reconcile".into(),
                    message: format!("promoted n{epoch} at epoch {epoch}"),
                },
            )
            .await
            .unwrap();
    }
    assert!(api.refused().is_empty(), "{:?}", api.refused());
    let events: Vec<serde_json::Value> = api.list("events.k8s.io/v1", "Event");
    assert_eq!(events.len(), 5, "{events:?}");
    for (event, epoch) in events.iter().zip(2..=6) {
        assert_eq!(event["metadata"]["namespace"], "default");
        assert_eq!(event["regarding"]["uid"], "dev-uid-1");
        assert!(
            events
                .iter()
                .any(|e| e["note"] == format!("promoted n{epoch} at epoch {epoch}")),
            "{event}"
        );
    }
    kit::api_rules::event_names_unique(&events).unwrap();
}

/// One device whose agents hang (probes never answer) must not stall another device: its
/// primary is killed and its failover happens in its usual time, while the hanging
/// device's round is still waiting.
#[tokio::test]
async fn a_hanging_device_does_not_delay_another_devices_failover() {
    use kit::fake_api::FakeApi;

    let api = FakeApi::new();
    for node in ["n1", "n2", "n3", "s1", "s2"] {
        api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}));
    }
    let mut prod = serde_json::to_value(
        kit::resources::device("prod-hsm")
            .mirrored(Some("n1"), &["n2", "n3"])
            .sync_interval(300)
            .auto_failover(3)
            .build(),
    )
    .unwrap();
    prod["metadata"]["uid"] = json!("uid-prod");
    api.put(prod);
    let mut stuck = serde_json::to_value(
        kit::resources::device("prod-hsm")
            .mirrored(Some("s1"), &["s2"])
            .sync_interval(300)
            .auto_failover(3)
            .build(),
    )
    .unwrap();
    stuck["metadata"]["name"] = json!("stuck-hsm");
    stuck["metadata"]["uid"] = json!("uid-stuck");
    api.put(stuck);
    let state = Arc::new(KubeState::new(api.client(), "hsm-secrets-system", None));
    let lease = Duration::from_millis(300);
    let agents = Arc::new(SimAgents::new(
        lease,
        &[("n1", 10), ("n2", 10), ("n3", 10), ("s1", 5), ("s2", 5)],
    ));
    let (stop, controller) = spawn_controller(&state, &agents, lease, Duration::from_secs(3));
    let primary_of = |name: &'static str| {
        let state = state.clone();
        async move {
            state
                .get_device(name)
                .await
                .unwrap()
                .and_then(|d| d.status)
                .and_then(|s| s.primary_node)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while primary_of("prod-hsm").await.as_deref() != Some("n1") {
        assert!(Instant::now() < deadline, "prod-hsm never got its primary");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The other device's agents stop answering, then prod-hsm's primary dies.
    agents.set_hanging("s1", true);
    agents.set_hanging("s2", true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    agents.set_up("n1", false);
    let killed = Instant::now();
    loop {
        if let Some(primary) = primary_of("prod-hsm").await
            && primary != "n1"
        {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "prod-hsm did not fail over while stuck-hsm hung"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Threshold 3 × 100 ms, then write lease 300 ms + margin 100 ms after the last renewal.
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(3), "failover took {took:?}");
    let _ = stop.send(());
    controller.await.unwrap().unwrap();
}

/// The controller loop on `state` and `agents` with 100 ms probes, the primary's write
/// `lease` plus 100 ms margin and a leader Lease of `leader_lease`; send on the returned
/// channel to stop it.
fn spawn_controller(
    state: &Arc<KubeState>,
    agents: &Arc<SimAgents>,
    lease: Duration,
    leader_lease: Duration,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), hsm_secrets::state::StateError>>,
) {
    use hsm_secrets::controller::{ControllerConfig, run_controller};
    let config = ControllerConfig {
        lease_duration: leader_lease,
        probe_interval: Duration::from_millis(100),
        plan: PlanConfig {
            fencing: FencingConfig {
                lease_duration: lease,
                safety_margin: Duration::from_millis(100),
            },
            ..PlanConfig::default()
        },
        ..ControllerConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(run_controller(
        state.clone(),
        agents.clone(),
        config,
        ControllerMetrics::default(),
        async {
            let _ = stopped.await;
        },
    ));
    (stop, handle)
}
