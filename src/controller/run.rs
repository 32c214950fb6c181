//! The controller loop: hold the Lease, reconcile every device each probe interval (or
//! sooner when a plan asks, or when a device's spec or annotations change), step down
//! when the Lease is lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::{Agents, ControllerMetrics, DeviceController};
use crate::failover::PlanConfig;
use crate::state::{StateError, StateStore};

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// This replica's identity in the Lease.
    pub identity: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub probe_interval: Duration,
    pub plan: PlanConfig,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            identity: "hsm-secrets-controller".into(),
            lease_name: "hsm-secrets-controller".into(),
            lease_duration: Duration::from_secs(15),
            probe_interval: Duration::from_secs(1),
            plan: PlanConfig::default(),
        }
    }
}

/// Runs until `shutdown` completes. Only the Lease holder reconciles.
pub async fn run_controller<S: StateStore, A: Agents>(
    state: Arc<S>,
    agents: Arc<A>,
    config: ControllerConfig,
    metrics: ControllerMetrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StateError> {
    let (leadership, _) = tokio::sync::watch::channel(false);
    run_controller_with_leadership(state, agents, config, metrics, leadership, shutdown).await
}

/// As [`run_controller`], publishing whether this replica holds the Lease on
/// `leadership`, so other reconcilers of the same process (HSMSecrets) act only while it
/// does. The sender is dropped on return.
pub async fn run_controller_with_leadership<S: StateStore, A: Agents>(
    state: Arc<S>,
    agents: Arc<A>,
    config: ControllerConfig,
    metrics: ControllerMetrics,
    leadership: tokio::sync::watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StateError> {
    let mut controller = DeviceController::new(
        state.clone(),
        agents.clone(),
        config.plan.clone(),
        metrics.clone(),
    );
    let mut leading = false;
    tokio::pin!(shutdown);
    loop {
        let mut wait = config.probe_interval;
        let lease = state
            .acquire_lease(&config.lease_name, &config.identity, config.lease_duration)
            .await;
        match &lease {
            Ok(true) => {
                if !leading {
                    tracing::info!(identity = %config.identity, "became leader");
                    controller.became_leader(Timestamp::now());
                    leading = true;
                }
                leadership.send_replace(true);
                agents.refresh().await;
                match state.list_devices().await {
                    Ok(devices) => {
                        for device in &devices {
                            match controller.reconcile(device).await {
                                Ok(outcome) => {
                                    if outcome.conflict {
                                        wait = Duration::from_millis(50);
                                    }
                                    if let Some(at) = outcome.replan_at {
                                        let until = at.duration_since(Timestamp::now());
                                        let until = Duration::try_from(until).unwrap_or_default();
                                        wait = wait.min(until.max(Duration::from_millis(20)));
                                    }
                                }
                                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot list devices"),
                }
            }
            Ok(false) => {
                leadership.send_replace(false);
                if leading {
                    tracing::warn!("lost the controller lease; standing by");
                    leading = false;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the controller lease");
                leadership.send_replace(false);
                leading = false;
            }
        }
        metrics.round(lease.as_ref().ok().copied());
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = state.wait_device_change(wait) => {}
        }
    }
}
