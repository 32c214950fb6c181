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
            lease_duration: Duration::from_secs(6),
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
    // The leader renews its Lease every third of its duration, not every round: a
    // renewal is an API write, and an idle cluster should cost no more than that.
    let renew_every = config.lease_duration / 3;
    let mut renewed: Option<std::time::Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let mut wait = config.probe_interval;
        let due = !leading || renewed.is_none_or(|at| at.elapsed() >= renew_every);
        let lease = if due {
            let result = state
                .acquire_lease(&config.lease_name, &config.identity, config.lease_duration)
                .await;
            if matches!(result, Ok(true)) {
                renewed = Some(std::time::Instant::now());
            }
            result
        } else {
            Ok(true)
        };
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
        if leading {
            // Wake in time for the next renewal even when devices ask for no round sooner.
            let until_renewal = renewed.map_or(Duration::ZERO, |at| {
                renew_every.saturating_sub(at.elapsed())
            });
            wait = wait.min(until_renewal.max(Duration::from_millis(20)));
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = state.wait_device_change(wait) => {}
        }
    }
}
