//! Bringing the local system up for `local up`, and reading it back for `local status`,
//! `put` and `get`.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use super::LocalError;
use super::clients;
use super::cluster::{LocalCluster, NAMESPACE, NODES, SECRETS, StateFile};
use crate::crd::{DevicePhase, HSMDeviceStatus};
use crate::hsm::{Expect, SecretData, SecretPath};
use crate::kubectl::OutputFormat;
use crate::kubectl::render::{HealthReport, device_list, health_table};
use crate::mirror::{AgentConnection, MirrorError};
use crate::state::{FileState, StateStore};

const TIMEOUT: Duration = Duration::from_secs(90);

/// Waits for the first primary, seeds the example secrets (a passive site takes them from
/// the archive it follows instead), waits for the mirrors and starts the CSI plugins;
/// returns the device status.
pub async fn bring_up(cluster: &mut LocalCluster) -> Result<HSMDeviceStatus, LocalError> {
    let state = FileState::open(&cluster.state_dir)?;
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        let status = device_status(&state, &cluster.device).await?;
        if status.phase == DevicePhase::Ready && status.mirrors.as_deref() == Some("2/2") {
            break status;
        }
        cluster.check_processes()?;
        if Instant::now() >= deadline {
            return Err(LocalError::Timeout {
                what: "the controller to elect a primary".into(),
                seconds: TIMEOUT.as_secs(),
                hint: format!("; see {}", cluster.dir.join("logs").display()),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let primary = status.primary_node.clone().unwrap_or_default();
    let endpoint = |node: &str| {
        cluster
            .node(node)
            .map(|n| n.agent.clone())
            .ok_or_else(|| LocalError::Check(format!("no node {node}")))
    };
    let conn = clients::agent(&primary, &endpoint(&primary)?, &cluster.controller_tls)?;
    let passive = cluster
        .site
        .as_ref()
        .is_some_and(|site| site.follows.is_some());
    for name in SECRETS.iter().filter(|_| !passive) {
        let path: SecretPath = format!("{NAMESPACE}/{name}")
            .parse()
            .map_err(|e| LocalError::Check(format!("{e}")))?;
        let mut data = SecretData::new();
        data.insert("value", super::tokens::random_hex(16)?.into_bytes())
            .map_err(|e| LocalError::Check(e.to_string()))?;
        // An active site takes writes once its node has confirmed its first site lease
        // in the bucket (seconds after start).
        loop {
            match conn.put(&path, &data, Expect::Any, status.epoch).await {
                Ok(_) => break,
                Err(MirrorError::Remote {
                    code: tonic::Code::FailedPrecondition,
                    ..
                }) if cluster.site.is_some() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
    let head = conn.manifest().await?.entries;
    for node in NODES.iter().filter(|n| **n != primary) {
        let mirror = clients::agent(node, &endpoint(node)?, &cluster.controller_tls)?;
        while mirror.manifest().await?.entries != head {
            if Instant::now() >= deadline {
                return Err(LocalError::Timeout {
                    what: format!("{node} to converge"),
                    seconds: TIMEOUT.as_secs(),
                    hint: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for node in cluster.nodes.clone() {
        clients::wait_csi_ready(&node.csi_socket, TIMEOUT).await?;
    }
    clients::AdmissionClient::new(
        &cluster.webhook_url,
        &cluster.webhook_ca_pem,
        &cluster.webhook_server_name,
    )?
    .wait_ready(TIMEOUT)
    .await?;
    Ok(status)
}

/// The device's status as the state directory holds it (default: none reported yet).
pub async fn device_status(state: &FileState, device: &str) -> Result<HSMDeviceStatus, LocalError> {
    Ok(state
        .get_device(device)
        .await?
        .and_then(|d| d.status)
        .unwrap_or_default())
}

/// `kubectl get hsmdevice -o wide` and `kubectl hsm health` over the state directory.
pub async fn device_tables(state: &StateFile) -> Result<String, LocalError> {
    let files = FileState::open(&state.state_dir)?;
    let devices = files.list_devices().await?;
    let list = device_list(&devices, OutputFormat::Table, Timestamp::now())
        .map_err(|e| LocalError::Check(e.to_string()))?;
    Ok(format!(
        "{list}\n{}",
        health_table(&HealthReport::new(&devices))
    ))
}

/// The current primary's name, epoch and agent client.
pub async fn primary(state: &StateFile) -> Result<(String, u64, AgentConnection), LocalError> {
    let files = FileState::open(&state.state_dir)?;
    let status = device_status(&files, &state.device).await?;
    let node = status.primary_node.clone().ok_or_else(|| {
        LocalError::Check(format!(
            "{} has no primary yet (phase {:?})",
            state.device, status.phase
        ))
    })?;
    let endpoint = state
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.agent.clone())
        .ok_or_else(|| LocalError::Check(format!("primary {node} is not a local node")))?;
    let conn = clients::agent(&node, &endpoint, &state.controller_tls())?;
    Ok((node, status.epoch, conn))
}

/// Asks the controller for a planned switchover of the primary to `to` (as `kubectl hsm
/// failover --to` does on a cluster): refused with the reason when it cannot be done.
pub async fn request_switchover(state: &StateFile, to: &str) -> Result<(), LocalError> {
    let files = FileState::open(&state.state_dir)?;
    let mut device = files
        .get_device(&state.device)
        .await?
        .ok_or_else(|| LocalError::Check(format!("no HSMDevice {}", state.device)))?;
    if let Some(why) = crate::kubectl::refuse_switchover(&device, to) {
        return Err(LocalError::Check(format!("refusing to switch over: {why}")));
    }
    device
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(crate::contract::SWITCHOVER_ANNOTATION.into(), to.into());
    files.apply_device(&device)?;
    Ok(())
}
