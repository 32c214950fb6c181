//! The status summary: phase, conditions, mirrors ready/total, lag.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crd::{DeviceNodeStatus, DevicePhase, DeviceRole, NodeHealth, condition_status};

/// The condition types the planner maintains.
pub mod condition_types {
    /// The device has a writable primary.
    pub const READY: &str = "Ready";
    /// Every mirror is healthy and caught up.
    pub const SYNCED: &str = "Synced";
    /// Something needs attention (phase other than Ready and Pending).
    pub const DEGRADED: &str = "Degraded";
}

/// Condition reasons (CamelCase, as Kubernetes expects).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConditionReason {
    PrimaryWritable,
    NoPrimary,
    AwaitingFence,
    ReadOnlyFallback,
    NoEligibleMirror,
    SwitchoverInProgress,
    DeviceFailed,
    MirrorsInSync,
    NotMirrored,
    NoMirrors,
    CatchingUp,
    SyncFailing,
    MirrorsUnavailable,
    AllHealthy,
    PrimaryFailing,
    NodesUnhealthy,
}

impl ConditionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PrimaryWritable => "PrimaryWritable",
            Self::NoPrimary => "NoPrimary",
            Self::AwaitingFence => "AwaitingFence",
            Self::ReadOnlyFallback => "ReadOnlyFallback",
            Self::NoEligibleMirror => "NoEligibleMirror",
            Self::SwitchoverInProgress => "SwitchoverInProgress",
            Self::DeviceFailed => "DeviceFailed",
            Self::MirrorsInSync => "MirrorsInSync",
            Self::NotMirrored => "NotMirrored",
            Self::NoMirrors => "NoMirrors",
            Self::CatchingUp => "CatchingUp",
            Self::SyncFailing => "SyncFailing",
            Self::MirrorsUnavailable => "MirrorsUnavailable",
            Self::AllHealthy => "AllHealthy",
            Self::PrimaryFailing => "PrimaryFailing",
            Self::NodesUnhealthy => "NodesUnhealthy",
        }
    }
}

/// A condition, keeping the previous transition time while its status is unchanged.
pub(crate) fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: ConditionReason,
    message: String,
    now: Timestamp,
    generation: Option<i64>,
) -> Condition {
    let status = condition_status(ok);
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.as_str().to_string(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// A mirror that serves reads: caught up and healthy.
pub(crate) fn serves_reads(n: &DeviceNodeStatus) -> bool {
    n.role == DeviceRole::ReadOnly && n.health == NodeHealth::Healthy
}

/// Healthy, but its latest sync failed.
pub(crate) fn sync_failing(n: &DeviceNodeStatus) -> bool {
    n.health == NodeHealth::Healthy && n.consecutive_failures == 0 && n.last_error.is_some()
}

/// "ready/total" over the mirrors (every node but the primary).
pub(crate) fn mirrors_summary(mirrors: &[&DeviceNodeStatus]) -> String {
    let ready = mirrors.iter().filter(|n| serves_reads(n)).count();
    format!("{ready}/{}", mirrors.len())
}

/// The Synced condition over the mirrors.
pub(crate) fn synced(
    mirrored: bool,
    primary: Option<&str>,
    mirrors: &[&DeviceNodeStatus],
    primary_sequence: u64,
) -> (bool, ConditionReason, String) {
    if !mirrored {
        return (
            true,
            ConditionReason::NotMirrored,
            "mirroring policy None: a single device without mirrors".into(),
        );
    }
    let Some(primary) = primary else {
        return (
            false,
            ConditionReason::NoPrimary,
            "no primary elected yet".into(),
        );
    };
    if mirrors.is_empty() {
        return (
            false,
            ConditionReason::NoMirrors,
            "no mirror node has the token".into(),
        );
    }
    let failing: Vec<String> = mirrors
        .iter()
        .filter(|n| sync_failing(n))
        .map(|n| format!("{}: {}", n.node, n.last_error.as_deref().unwrap_or("")))
        .collect();
    if !failing.is_empty() {
        return (
            false,
            ConditionReason::SyncFailing,
            format!("sync from {primary} failing on {}", failing.join("; ")),
        );
    }
    let unavailable: Vec<&str> = mirrors
        .iter()
        .filter(|n| n.health != NodeHealth::Healthy)
        .map(|n| n.node.as_str())
        .collect();
    if !unavailable.is_empty() {
        return (
            false,
            ConditionReason::MirrorsUnavailable,
            format!("mirrors not healthy: {}", unavailable.join(", ")),
        );
    }
    let behind: Vec<String> = mirrors
        .iter()
        .filter(|n| n.role != DeviceRole::ReadOnly)
        .map(|n| format!("{} at {}", n.node, n.applied_sequence))
        .collect();
    if !behind.is_empty() {
        return (
            false,
            ConditionReason::CatchingUp,
            format!(
                "catching up with {primary} (sequence {primary_sequence}): {}",
                behind.join(", ")
            ),
        );
    }
    (
        true,
        ConditionReason::MirrorsInSync,
        format!(
            "{} mirrors caught up with {primary} (sequence {primary_sequence})",
            mirrors.len()
        ),
    )
}

/// Phase while a primary is writable: `Ready` unless something needs attention.
pub(crate) fn writable_phase(problems: &[String]) -> DevicePhase {
    if problems.is_empty() {
        DevicePhase::Ready
    } else {
        DevicePhase::Degraded
    }
}
