//! API writes an idle installation costs: the HSMDevice controller (default timings: 1 s
//! probes, 6 s leader Lease) against the in-memory API server, with 1, 10 and 100 mirrored
//! devices of three simulated agents each. Once every device is Ready, writes are counted
//! over a window and given per minute, by kind. The floor is the leader Lease alone: one
//! renewal every third of its duration, 30 a minute, whatever the number of devices.
//!
//! Run: `cargo bench --bench api_writes` (no SoftHSM needed).
#![allow(clippy::unwrap_used)]

use hsm_secrets_testkit as kit;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_secrets::controller::{ControllerConfig, ControllerMetrics, run_controller};
use hsm_secrets::crd::DevicePhase;
use hsm_secrets::state::{KubeState, StateStore};
use kit::fake_api::FakeApi;
use kit::sim_agents::SimAgents;
use serde_json::json;

// Longer than the status heartbeat (60 s), so its writes are counted too.
const WINDOW: Duration = Duration::from_secs(90);

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    println!(
        "| idle devices | HSMDevice status PATCH/min | Node PATCH/min | Event POST/min | Lease PUT/min | all writes/min | floor (Lease only) | ratio |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for devices in [1usize, 10, 100] {
        let writes = measure(devices).await;
        let per_minute = |what: &str| {
            writes.get(what).copied().unwrap_or(0) as f64 * 60.0 / WINDOW.as_secs_f64()
        };
        let all: f64 = writes.values().sum::<usize>() as f64 * 60.0 / WINDOW.as_secs_f64();
        let floor = 60.0 / (ControllerConfig::default().lease_duration.as_secs_f64() / 3.0);
        println!(
            "| {devices} | {:.0} | {:.0} | {:.0} | {:.0} | {all:.0} | {floor:.0} | {:.2}x |",
            per_minute("PATCH hsmdevices/status"),
            per_minute("PATCH nodes"),
            per_minute("POST events"),
            per_minute("PUT leases"),
            all / floor,
        );
    }
}

/// Writes by `METHOD plural[/sub]` during [`WINDOW`] once `count` devices are Ready.
async fn measure(count: usize) -> BTreeMap<String, usize> {
    let api = FakeApi::new();
    let mut nodes = Vec::new();
    for d in 0..count {
        let names: Vec<String> = (1..=3).map(|n| format!("d{d}-n{n}")).collect();
        for node in &names {
            api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}));
        }
        let targets: Vec<&str> = names[1..].iter().map(String::as_str).collect();
        let mut device = serde_json::to_value(
            kit::resources::device("prod-hsm")
                .mirrored(Some(&names[0]), &targets)
                .sync_interval(300)
                .auto_failover(3)
                .build(),
        )
        .unwrap();
        device["metadata"]["name"] = json!(format!("dev-{d}"));
        device["metadata"]["uid"] = json!(format!("uid-{d}"));
        api.put(device);
        nodes.extend(names.into_iter().map(|n| (n, 10)));
    }
    let node_refs: Vec<(&str, u64)> = nodes.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let config = ControllerConfig::default();
    let agents = Arc::new(SimAgents::new(
        config.plan.fencing.lease_duration,
        &node_refs,
    ));
    let state = Arc::new(KubeState::new(api.client(), "hsm-secrets-system", None));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(run_controller(
        state.clone(),
        agents,
        config,
        ControllerMetrics::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let devices = state.list_devices().await.unwrap();
        let ready = devices
            .iter()
            .filter(|d| {
                d.status
                    .as_ref()
                    .is_some_and(|s| s.phase == DevicePhase::Ready)
            })
            .count();
        if ready == count {
            break;
        }
        assert!(Instant::now() < deadline, "{ready}/{count} devices Ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the mirrors' roles settle after the first Ready.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = api.writes();
    tokio::time::sleep(WINDOW).await;
    let after = api.writes();
    let _ = stop.send(());
    controller.await.unwrap().unwrap();
    assert!(api.refused().is_empty(), "{:?}", api.refused());
    after
        .into_iter()
        .map(|(what, n)| {
            let grown = n - before.get(&what).copied().unwrap_or(0);
            (what, grown)
        })
        .filter(|(_, n)| *n > 0)
        .collect()
}
