//! The controller loop: hold the Lease, reconcile every device each probe interval (or
//! sooner when a plan asks, or when a device's spec or annotations change), step down
//! when the Lease is lost.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use std::collections::HashMap;
use std::time::Instant;

use tokio::task::JoinSet;

use super::schedule::Schedule;
use super::{Agents, ControllerMetrics, DeviceController, RoundOutcome};
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
    let controller = Arc::new(DeviceController::new(
        state.clone(),
        agents.clone(),
        config.plan.clone(),
        metrics.clone(),
    ));
    // Each device's round runs as its own task on its own schedule: a device whose agents
    // hang, or whose rounds keep failing (backed off), holds up no other device.
    let mut rounds: JoinSet<(String, Result<RoundOutcome, StateError>)> = JoinSet::new();
    let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut schedule = Schedule::default();
    let mut leading = false;
    // The leader renews its Lease every third of its duration, not every round: a
    // renewal is an API write, and an idle cluster should cost no more than that.
    let renew_every = config.lease_duration / 3;
    let mut renewed: Option<std::time::Instant> = None;
    // Agent endpoints (a Node LIST) are refreshed at most once per probe interval, not at
    // every wake: the loop wakes whenever a device's round ends.
    let mut refreshed: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let mut wait = config.probe_interval;
        let due = !leading || renewed.is_none_or(|at| at.elapsed() >= renew_every);
        let lease = if due {
            // A renewal that hangs must not outlast the Lease while rounds act on it.
            let result = match tokio::time::timeout(
                renew_every,
                state.acquire_lease(&config.lease_name, &config.identity, config.lease_duration),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Ok(false),
            };
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
                    schedule.all_due(Instant::now());
                    leading = true;
                }
                leadership.send_replace(true);
                if refreshed.is_none_or(|at| at.elapsed() >= config.probe_interval) {
                    let _ = tokio::time::timeout(renew_every, agents.refresh()).await;
                    refreshed = Some(Instant::now());
                }
                let listed = tokio::time::timeout(renew_every, state.list_devices()).await;
                match listed.unwrap_or_else(|_| {
                    Err(StateError::Timeout {
                        what: "listing HSMDevices",
                    })
                }) {
                    Ok(devices) => {
                        let now = Instant::now();
                        schedule.retain(|name| {
                            devices
                                .iter()
                                .any(|d| d.metadata.name.as_deref() == Some(name))
                        });
                        for device in devices {
                            let name = device.metadata.name.clone().unwrap_or_default();
                            if running.values().any(|n| *n == name) || !schedule.is_due(&name, now)
                            {
                                continue;
                            }
                            let controller = controller.clone();
                            let task_name = name.clone();
                            let task = rounds.spawn(async move {
                                let result = controller.reconcile(&device).await;
                                (task_name, result)
                            });
                            running.insert(task.id(), name);
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
                    stop_rounds(&mut rounds, &mut running).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the controller lease");
                leadership.send_replace(false);
                leading = false;
                stop_rounds(&mut rounds, &mut running).await;
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
        if leading && let Some(due) = schedule.next_due_in(Instant::now()) {
            wait = wait.min(due.max(Duration::from_millis(5)));
        }
        tokio::select! {
            _ = &mut shutdown => {
                stop_rounds(&mut rounds, &mut running).await;
                return Ok(());
            }
            Some(done) = rounds.join_next_with_id(), if !rounds.is_empty() => {
                let now = Instant::now();
                match done {
                    Ok((id, (name, result))) => {
                        running.remove(&id);
                        if let Err(e) = &result {
                            tracing::warn!(device = %name, error = %e, "reconcile failed; backing off");
                        }
                        schedule.finished(&name, &result, now, config.probe_interval);
                    }
                    Err(join) => {
                        // A panicked round: back off that device like a failed one.
                        if let Some(name) = running.remove(&join.id()) {
                            tracing::error!(device = %name, "reconcile panicked; backing off");
                            schedule.finished::<()>(&name, &Err(()), now, config.probe_interval);
                        }
                    }
                }
            }
            woke_early = async {
                let started = Instant::now();
                state.wait_device_change(wait).await;
                started.elapsed() + Duration::from_millis(2) < wait
            } => {
                // A spec or annotation change (a switchover request) is acted on at once.
                if woke_early {
                    schedule.all_due(Instant::now());
                }
            }
        }
    }
}

/// Cancels every round in flight (leadership lost, shutdown); their devices are planned
/// afresh by whoever leads next.
async fn stop_rounds(
    rounds: &mut JoinSet<(String, Result<RoundOutcome, StateError>)>,
    running: &mut HashMap<tokio::task::Id, String>,
) {
    rounds.shutdown().await;
    running.clear();
}
