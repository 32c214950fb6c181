//! Planned switchover (`kubectl hsm failover DEVICE --to NODE`): stop writes on the
//! primary, wait until the target has applied every change, then promote it.
//!
//! Stateless: the controller calls it each round while the request is pending (through
//! [`plan`](super::plan)) and it answers the step the device is at. The fence is
//! permanent for the epoch, so an abandoned switchover resumes writes only through a new
//! promotion (the planner does that when the request goes away).

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crd::HSMDeviceStatus;

use super::PlanConfig;
use super::fencing::{Fence, LeaseFacts, old_primary_fence};
use super::nodes::{diverged_range, highest_known_epoch, probe_for};
use super::observe::{DeviceView, Probe, ProbeResult, WriteLease};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverRequest {
    pub target: String,
    /// Promote even when the primary is unreachable and the target lacks changes the
    /// primary last reported (they are reported as lost writes if it returns).
    #[serde(default)]
    pub force: bool,
}

/// Where a switchover stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwitchoverStep {
    /// Stop writes on the primary now, for good under this epoch.
    FenceWrites { primary: String, epoch: u64 },
    /// Writes are stopped; the target is still applying changes.
    AwaitCatchUp {
        target: String,
        target_sequence: u64,
        primary_sequence: u64,
    },
    /// The primary is unreachable: its lease may still let it write until `until`.
    AwaitFence { primary: String, until: Timestamp },
    /// Promote `target` under `epoch` and demote `old_primary`.
    Promote {
        target: String,
        old_primary: String,
        epoch: u64,
        sequence: u64,
    },
}

/// What [`plan`](super::plan) did with a switchover request; the controller clears the
/// request on `Completed` or `Rejected` and reports the latter to the requester.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwitchoverOutcome {
    InProgress(SwitchoverStep),
    Completed { target: String, epoch: u64 },
    Rejected(SwitchoverError),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SwitchoverError {
    #[error(
        "device {device} has mirroring policy None, so there is no mirror to switch to; set spec.mirroring.policy to ReadOnly or Active first"
    )]
    NotMirrored { device: String },
    #[error(
        "device {device} has no primary yet; wait until the controller elects one (status.phase leaves Pending)"
    )]
    NoPrimary { device: String },
    #[error(
        "node {target:?} is not part of device {device} (nodes: {nodes}); pick one of those or add it to spec.mirroring.targetNodes"
    )]
    UnknownTarget {
        device: String,
        target: String,
        nodes: String,
    },
    #[error("node {target} is already the primary of device {device} (epoch {epoch})")]
    TargetIsPrimary {
        device: String,
        target: String,
        epoch: u64,
    },
    #[error(
        "node {target} of device {device} cannot take over: {detail}; fix it or pick another node"
    )]
    TargetUnhealthy {
        device: String,
        target: String,
        detail: String,
    },
    #[error(
        "the primary {primary} of device {device} is unreachable and last reported change sequence {primary_sequence}, but {target} has applied only {target_sequence}: promoting it may lose {missing} changes; wait for the primary to return, pick a more caught-up node, or repeat with --force"
    )]
    WouldLoseWrites {
        device: String,
        primary: String,
        target: String,
        primary_sequence: u64,
        target_sequence: u64,
        missing: u64,
    },
}

impl SwitchoverError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotMirrored { .. } => "not_mirrored",
            Self::NoPrimary { .. } => "no_primary",
            Self::UnknownTarget { .. } => "unknown_target",
            Self::TargetIsPrimary { .. } => "target_is_primary",
            Self::TargetUnhealthy { .. } => "target_unhealthy",
            Self::WouldLoseWrites { .. } => "would_lose_writes",
        }
    }
}

/// The next step of switching `status`'s primary over to `request.target`.
pub fn plan_switchover(
    view: &DeviceView,
    status: &HSMDeviceStatus,
    request: &SwitchoverRequest,
    probes: &[Probe],
    lease: &LeaseFacts,
    config: &PlanConfig,
    now: Timestamp,
) -> Result<SwitchoverStep, SwitchoverError> {
    let device = view.name.clone();
    let target = request.target.clone();
    if !view.is_mirrored() {
        return Err(SwitchoverError::NotMirrored { device });
    }
    let Some(primary) = status.primary_node.clone() else {
        return Err(SwitchoverError::NoPrimary { device });
    };
    if target == primary {
        return Err(SwitchoverError::TargetIsPrimary {
            device,
            target,
            epoch: status.epoch,
        });
    }
    if !status.nodes.iter().any(|n| n.node == target) {
        let nodes = status
            .nodes
            .iter()
            .map(|n| n.node.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(SwitchoverError::UnknownTarget {
            device,
            target,
            nodes,
        });
    }
    let unhealthy = |detail: String| SwitchoverError::TargetUnhealthy {
        device: device.clone(),
        target: target.clone(),
        detail,
    };
    let target_report = match probe_for(probes, &target).map(|p| &p.result) {
        None => return Err(unhealthy("its agent was not probed".into())),
        Some(ProbeResult::Failed(e)) => return Err(unhealthy(e.to_string())),
        Some(ProbeResult::Reported(r)) if !r.device_usable() => {
            return Err(unhealthy(if r.token_present {
                "its token has no usable session".into()
            } else {
                "its agent does not see the token".into()
            }));
        }
        Some(ProbeResult::Reported(r)) => r,
    };
    let diverged = diverged_range(&status.epoch_history, target_report);
    let promote = || SwitchoverStep::Promote {
        target: target.clone(),
        old_primary: primary.clone(),
        epoch: highest_known_epoch(status, probes) + 1,
        sequence: target_report.applied_sequence,
    };

    match probe_for(probes, &primary).map(|p| &p.result) {
        // Reachable (even with a broken token): its agent controls the lease, fence it.
        Some(ProbeResult::Reported(p)) => {
            if !(p.write_lease == WriteLease::Fenced && p.epoch == status.epoch) {
                return Ok(SwitchoverStep::FenceWrites {
                    primary,
                    epoch: status.epoch,
                });
            }
            if diverged.is_some() || target_report.applied_sequence != p.applied_sequence {
                return Ok(SwitchoverStep::AwaitCatchUp {
                    target,
                    target_sequence: target_report.applied_sequence,
                    primary_sequence: p.applied_sequence,
                });
            }
            Ok(promote())
        }
        // Unreachable: wait out its lease, then promote only without known loss.
        _ => {
            if let Fence::Pending { until } = old_primary_fence(&config.fencing, lease, now) {
                return Ok(SwitchoverStep::AwaitFence { primary, until });
            }
            if let Some((from, _)) = diverged {
                return Err(unhealthy(format!(
                    "it holds changes from sequence {from} on that are not in the current history and must resynchronize from the primary first"
                )));
            }
            let primary_sequence = status
                .nodes
                .iter()
                .find(|n| n.node == primary)
                .map_or(0, |n| n.applied_sequence);
            let target_sequence = target_report.applied_sequence;
            if target_sequence < primary_sequence && !request.force {
                return Err(SwitchoverError::WouldLoseWrites {
                    device,
                    primary,
                    target,
                    primary_sequence,
                    target_sequence,
                    missing: primary_sequence - target_sequence,
                });
            }
            Ok(promote())
        }
    }
}
