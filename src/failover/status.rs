//! The status summary: phase, conditions, mirrors ready/total, lag.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crd::{
    DeviceNodeStatus, DevicePhase, DeviceRole, HSMDeviceStatus, NodeHealth, condition_status,
};

use super::actions::{EventReason, EventType};
use super::nodes::NodeRound;
use super::plan::{Planner, Writer};

/// The condition types the planner maintains.
pub mod condition_types {
    pub use crate::contract::conditions::{DEGRADED, READY, SYNCED};
    /// Every type above: the planner replaces these and keeps any other.
    pub const ALL: [&str; 3] = [READY, SYNCED, DEGRADED];
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

impl Planner<'_> {
    /// The device-level status: phase, conditions, summary columns; device-level events
    /// on phase transitions.
    pub(super) fn summarize(
        &mut self,
        mut nodes: Vec<DeviceNodeStatus>,
        primary_sequence: u64,
        rounds: &[NodeRound<'_>],
    ) -> HSMDeviceStatus {
        let now = self.obs.now;
        let view = self.view;
        let primary = self.primary.clone();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        let mirrors: Vec<&DeviceNodeStatus> = nodes
            .iter()
            .filter(|n| Some(&n.node) != primary.as_ref())
            .collect();
        let readable = mirrors.iter().any(|n| serves_reads(n));

        // What needs attention while a primary is writable.
        let mut problems = Vec::new();
        let mut degraded_reason = ConditionReason::AllHealthy;
        if let Some(p) = primary
            .as_deref()
            .and_then(|p| rounds.iter().find(|r| r.name == p))
            && p.consecutive_failures > 0
        {
            degraded_reason = ConditionReason::PrimaryFailing;
            problems.push(format!(
                "primary {} failed {} of {} consecutive health checks ({})",
                p.name,
                p.consecutive_failures,
                self.threshold,
                p.failure
                    .as_ref()
                    .map_or_else(String::new, ToString::to_string)
            ));
        }
        for n in &mirrors {
            let problem = match n.health {
                NodeHealth::Unhealthy => Some(format!(
                    "{} is unhealthy ({})",
                    n.node,
                    n.last_error.as_deref().unwrap_or("unknown error")
                )),
                NodeHealth::Unknown => Some(format!("{} has not reported", n.node)),
                NodeHealth::Healthy if sync_failing(n) => Some(format!(
                    "{} cannot sync ({})",
                    n.node,
                    n.last_error.as_deref().unwrap_or("")
                )),
                NodeHealth::Healthy => None,
            };
            if let Some(problem) = problem {
                if degraded_reason == ConditionReason::AllHealthy {
                    degraded_reason = ConditionReason::NodesUnhealthy;
                }
                problems.push(problem);
            }
        }
        if view.is_mirrored() && mirrors.is_empty() && primary.is_some() {
            if degraded_reason == ConditionReason::AllHealthy {
                degraded_reason = ConditionReason::NoMirrors;
            }
            problems.push("mirrored device without any mirror node".into());
        }

        let mirrors_text = mirrors_summary(&mirrors);
        let (phase, ready_reason, ready_message) = match &self.writer {
            Writer::Pending(m) => (DevicePhase::Pending, ConditionReason::NoPrimary, m.clone()),
            Writer::Writable => {
                let p = primary.clone().unwrap_or_default();
                let mut m = format!(
                    "{p} is primary at epoch {}; mirrors ready {mirrors_text}",
                    self.epoch
                );
                if let Some(pref) = view.preferred_primary.as_deref().filter(|pref| *pref != p) {
                    m.push_str(&format!(
                        "; the preferred primary {pref} is not primary (no automatic failback; `kubectl hsm failover {} --to {pref}` switches back)",
                        view.name
                    ));
                }
                (
                    writable_phase(&problems),
                    ConditionReason::PrimaryWritable,
                    m,
                )
            }
            Writer::AwaitingFence(m) => (
                DevicePhase::ReadOnlyFallback,
                ConditionReason::AwaitingFence,
                m.clone(),
            ),
            Writer::Fallback(reason, m) => (DevicePhase::ReadOnlyFallback, *reason, m.clone()),
            Writer::Switchover(m) => (
                DevicePhase::ReadOnlyFallback,
                ConditionReason::SwitchoverInProgress,
                m.clone(),
            ),
            Writer::Down(m) => (
                DevicePhase::ReadOnlyFallback,
                ConditionReason::NoEligibleMirror,
                m.clone(),
            ),
        };
        // Without a writable primary, reads need a serving mirror; else the device failed.
        let (phase, ready_reason, ready_message) =
            if phase == DevicePhase::ReadOnlyFallback && !readable {
                (
                    DevicePhase::Failed,
                    ConditionReason::DeviceFailed,
                    format!("{ready_message}; no healthy mirror serves reads"),
                )
            } else {
                (phase, ready_reason, ready_message)
            };

        if phase != self.prev.phase {
            match phase {
                DevicePhase::ReadOnlyFallback if !matches!(self.writer, Writer::Switchover(_)) => {
                    self.event(
                        EventReason::HSMReadOnlyFallback,
                        EventType::Warning,
                        ready_message.clone(),
                    );
                }
                DevicePhase::Failed => self.event(
                    EventReason::HSMDeviceUnhealthy,
                    EventType::Warning,
                    format!("device {} failed: {ready_message}", view.name),
                ),
                _ => {}
            }
        }

        let (synced_ok, synced_reason, synced_message) = synced(
            view.is_mirrored(),
            primary.as_deref(),
            &mirrors,
            primary_sequence,
        );
        let (degraded, degraded_reason, degraded_message) = match phase {
            DevicePhase::Ready => (
                false,
                ConditionReason::AllHealthy,
                "all nodes healthy".into(),
            ),
            DevicePhase::Pending => (false, ConditionReason::NoPrimary, ready_message.clone()),
            DevicePhase::Degraded => (true, degraded_reason, problems.join("; ")),
            DevicePhase::ReadOnlyFallback | DevicePhase::Failed => {
                (true, ready_reason, ready_message.clone())
            }
        };
        let generation = view.generation;
        let prev_conditions = &self.prev.conditions;
        let conditions = vec![
            condition(
                prev_conditions,
                condition_types::READY,
                matches!(phase, DevicePhase::Ready | DevicePhase::Degraded),
                ready_reason,
                ready_message,
                now,
                generation,
            ),
            condition(
                prev_conditions,
                condition_types::SYNCED,
                synced_ok,
                synced_reason,
                synced_message,
                now,
                generation,
            ),
            condition(
                prev_conditions,
                condition_types::DEGRADED,
                degraded,
                degraded_reason,
                degraded_message,
                now,
                generation,
            ),
        ];
        // Conditions other loops own (the archive's) are carried over untouched.
        let mut conditions = conditions;
        conditions.extend(
            prev_conditions
                .iter()
                .filter(|c| !condition_types::ALL.contains(&c.type_.as_str()))
                .cloned(),
        );
        let no_writer = matches!(phase, DevicePhase::ReadOnlyFallback | DevicePhase::Failed);
        let max_sync_lag_seconds = mirrors.iter().filter_map(|n| n.sync_lag_seconds).max();
        let last_sync_time = mirrors
            .iter()
            .filter_map(|n| n.last_sync_time.clone())
            .max();
        let mirrors = Some(mirrors_text);
        HSMDeviceStatus {
            primary_node: primary,
            epoch: self.epoch,
            phase,
            nodes,
            mirrors,
            max_sync_lag_seconds,
            last_sync_time,
            primary_unavailable_since: no_writer.then(|| {
                self.prev
                    .primary_unavailable_since
                    .clone()
                    .unwrap_or(Time(now))
            }),
            failover_count: self.failover_count,
            last_failover_time: self.last_failover_time.clone(),
            observed_generation: generation,
            conditions,
            epoch_history: std::mem::take(&mut self.history),
            backup: self.prev.backup.clone(),
            site: self.prev.site.clone(),
        }
    }
}

/// How stale a timestamp in status (a node's last successful probe, its last sync) may
/// grow before it is written again when nothing else changed. Rounds run every probe
/// interval; writing their timestamps each time would cost an API write per device per
/// round, fanned out to every watcher. Live values are in the metrics.
pub const STATUS_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(60);

/// `fresh`, unless it differs from `prev` only in timestamps younger than
/// [`STATUS_HEARTBEAT`]: then `prev` itself, so an idle round writes nothing.
pub fn settle(prev: &HSMDeviceStatus, fresh: HSMDeviceStatus, now: Timestamp) -> HSMDeviceStatus {
    let recent = |t: &Option<Time>| {
        t.as_ref().is_some_and(|t| {
            let age = now.duration_since(t.0);
            !age.is_negative() && age.unsigned_abs() < STATUS_HEARTBEAT
        })
    };
    let keep = |old: &Option<Time>, new: &mut Option<Time>| {
        if new.is_some() && recent(old) {
            new.clone_from(old);
        }
    };
    let mut settled = fresh.clone();
    for node in &mut settled.nodes {
        if let Some(old) = prev.nodes.iter().find(|p| p.node == node.node) {
            keep(&old.last_successful_probe, &mut node.last_successful_probe);
            keep(&old.last_sync_time, &mut node.last_sync_time);
        }
    }
    keep(&prev.last_sync_time, &mut settled.last_sync_time);
    if settled == *prev { settled } else { fresh }
}
