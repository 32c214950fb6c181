//! One planning round: who is primary, what every node's role is, what to tell whom.

use std::cmp::Reverse;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crd::{
    DeviceNodeStatus, DevicePhase, DeviceRole, EpochRecord, HSMDeviceStatus, LostWrites,
    MirroringPolicy, NodeHealth,
};

use super::actions::{Action, DeviceEvent, EventReason, EventType};
use super::fencing::{Fence, old_primary_fence};
use super::nodes::{self, NodeRound, diverged_range, highest_known_epoch, probe_for};
use super::observe::{AgentReport, DeviceView, WriteLease};
use super::status::{self, ConditionReason, condition, condition_types};
use super::switchover::{SwitchoverError, SwitchoverOutcome, SwitchoverStep, plan_switchover};
use super::{Observations, PlanConfig};

/// Promotions kept in `status.epochHistory`.
const EPOCH_HISTORY_LIMIT: usize = 16;

/// The decisions of one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Write this first (optimistic concurrency); execute the actions only if it stored.
    pub status: HSMDeviceStatus,
    /// In execution order: fences and demotions before promotions, events last.
    pub actions: Vec<Action>,
    /// Plan again no later than this (a lease is about to lapse); otherwise at the
    /// controller's probe interval.
    pub replan_at: Option<Timestamp>,
    /// What happened to the switchover request of the observations, if there was one.
    pub switchover: Option<SwitchoverOutcome>,
}

impl Plan {
    pub fn events(&self) -> impl Iterator<Item = &DeviceEvent> {
        self.actions.iter().filter_map(|a| match a {
            Action::Event(e) => Some(e),
            _ => None,
        })
    }

    /// The device accepts writes (what the validating webhook checks).
    pub fn writable(&self) -> bool {
        matches!(
            self.status.phase,
            DevicePhase::Ready | DevicePhase::Degraded
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PromotionReason {
    Bootstrap,
    Failover,
    Switchover,
    /// Same node, new epoch: after an abandoned switchover fenced it, or when an agent
    /// reported an epoch the status did not know.
    Resume,
}

impl PromotionReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Bootstrap => "Bootstrap",
            Self::Failover => "Failover",
            Self::Switchover => "Switchover",
            Self::Resume => "Resume",
        }
    }
}

/// Whether, and why not, the device has a writable primary this round.
#[derive(Debug)]
enum Writer {
    Pending(String),
    Writable,
    AwaitingFence(String),
    Fallback(ConditionReason, String),
    Switchover(String),
    Down(String),
}

/// Plans one round. Pure and deterministic: the same inputs give the same plan.
pub fn plan(
    view: &DeviceView,
    previous: &HSMDeviceStatus,
    observed: &Observations,
    config: &PlanConfig,
) -> Plan {
    let threshold = view.failover_threshold.max(1);
    let rounds = nodes::membership(view, previous, &observed.probes)
        .into_iter()
        .map(|name| {
            let prev = previous.nodes.iter().find(|n| n.node == name);
            nodes::observe(&name, prev, probe_for(&observed.probes, &name), threshold)
        })
        .collect();
    let mut planner = Planner {
        view,
        prev: previous,
        obs: observed,
        config,
        threshold,
        rounds,
        primary: previous.primary_node.clone(),
        epoch: previous.epoch,
        known_epoch: highest_known_epoch(previous, &observed.probes),
        history: previous.epoch_history.clone(),
        failover_count: previous.failover_count,
        last_failover_time: previous.last_failover_time.clone(),
        writer: Writer::Writable,
        actions: Vec::new(),
        replan_at: None,
        switchover: None,
    };
    planner.decide_primary();
    planner.finish()
}

struct Planner<'a> {
    view: &'a DeviceView,
    prev: &'a HSMDeviceStatus,
    obs: &'a Observations,
    config: &'a PlanConfig,
    threshold: u32,
    rounds: Vec<NodeRound<'a>>,
    primary: Option<String>,
    epoch: u64,
    known_epoch: u64,
    history: Vec<EpochRecord>,
    failover_count: u64,
    last_failover_time: Option<Time>,
    writer: Writer,
    actions: Vec<Action>,
    replan_at: Option<Timestamp>,
    switchover: Option<SwitchoverOutcome>,
}

impl<'a> Planner<'a> {
    fn round(&self, node: &str) -> Option<&NodeRound<'a>> {
        self.rounds.iter().find(|r| r.name == node)
    }

    fn event(&mut self, reason: EventReason, type_: EventType, message: String) {
        self.actions.push(Action::event(reason, type_, message));
    }

    fn is_preferred(&self, node: &str) -> bool {
        self.view.preferred_primary.as_deref() == Some(node)
    }

    fn decide_primary(&mut self) {
        if let Some(request) = &self.obs.switchover {
            match plan_switchover(
                self.view,
                self.prev,
                request,
                &self.obs.probes,
                &self.obs.lease,
                self.config,
                self.obs.now,
            ) {
                Ok(step) => return self.follow_switchover(step),
                // Already done (e.g. the request was not cleared yet): nothing to report.
                Err(SwitchoverError::TargetIsPrimary { target, epoch, .. }) => {
                    self.switchover = Some(SwitchoverOutcome::Completed { target, epoch });
                }
                Err(e) => {
                    self.event(
                        EventReason::HSMFailover,
                        EventType::Warning,
                        format!("switchover to {} rejected: {e}", request.target),
                    );
                    self.switchover = Some(SwitchoverOutcome::Rejected(e));
                }
            }
        }
        let Some(primary) = self.primary.clone() else {
            return self.elect_first_primary();
        };
        let Some(round) = self.round(&primary) else {
            // Membership always includes the status primary; stay safe regardless.
            self.writer = Writer::Down(format!("primary {primary} is not a member"));
            return;
        };
        let (usable, failures) = (round.usable(), round.consecutive_failures);
        let error = round
            .failure
            .as_ref()
            .map_or_else(String::new, |e| format!(" ({e})"));
        if let Some(report) = usable {
            return self.keep_primary_writing(&primary, report);
        }
        if failures < self.threshold {
            // Suspected only: it may still be writing; keep it (Degraded).
            self.writer = Writer::Writable;
            return;
        }
        let failed =
            format!("primary {primary} failed {failures} consecutive health checks{error}");
        if !self.view.is_mirrored() {
            self.writer = Writer::Down(format!(
                "{failed}; policy None has no mirror to fall back to"
            ));
            return;
        }
        if !self.view.auto_failover {
            self.writer = Writer::Fallback(
                ConditionReason::ReadOnlyFallback,
                format!(
                    "{failed}; autoFailover is off: reads continue from mirrors and writes are refused until it returns or `kubectl hsm failover {} --to NODE`",
                    self.view.name
                ),
            );
            return;
        }
        let Some(candidate) = self.most_caught_up_eligible_mirror(&primary) else {
            let healthy_mirror = self.rounds.iter().any(|r| r.name != primary && r.ok);
            self.writer = if self.view.policy == MirroringPolicy::Active && healthy_mirror {
                Writer::Fallback(
                    ConditionReason::NoEligibleMirror,
                    format!(
                        "{failed}; no healthy mirror is known to hold every acknowledged write (policy Active), so none is promoted automatically; bring {primary} back or `kubectl hsm failover {} --to NODE --force`",
                        self.view.name
                    ),
                )
            } else {
                Writer::Down(format!("{failed}; no healthy mirror can take over"))
            };
            return;
        };
        match old_primary_fence(&self.config.fencing, &self.obs.lease, self.obs.now) {
            Fence::Expired => self.promote(&candidate, PromotionReason::Failover),
            Fence::Pending { until } => {
                self.replan_at = Some(until);
                self.writer = Writer::AwaitingFence(format!(
                    "{failed}; {candidate} will be promoted at {until}, once {primary}'s write lease has certainly lapsed; writes are refused until then"
                ));
            }
        }
    }

    /// The status primary answered with a usable device: keep its lease fresh, or
    /// (re)assert its promotion when its report says it does not hold it.
    fn keep_primary_writing(&mut self, primary: &str, report: &AgentReport) {
        self.writer = Writer::Writable;
        if report.epoch > self.epoch
            || (report.epoch == self.epoch && report.write_lease == WriteLease::Fenced)
        {
            // Fenced by an abandoned switchover, or holding an epoch the status lost:
            // only a fresh epoch makes it writable again.
            self.promote(primary, PromotionReason::Resume);
        } else if report.role != Some(DeviceRole::Primary) || report.epoch < self.epoch {
            // The promotion has not reached it yet (or was lost): send it again.
            self.actions.push(Action::Promote {
                node: primary.to_string(),
                epoch: self.epoch,
            });
        } else {
            self.actions.push(Action::RenewLease {
                node: primary.to_string(),
                epoch: self.epoch,
            });
        }
    }

    /// Healthy now, data within the current history, and under `Active` holding at least
    /// what the primary last reported; the highest sequence wins, then the preferred
    /// primary, then name order.
    fn most_caught_up_eligible_mirror(&self, old_primary: &str) -> Option<String> {
        let old_sequence = self.round(old_primary).map_or(0, |r| r.applied_sequence());
        let active = self.view.policy == MirroringPolicy::Active;
        self.rounds
            .iter()
            .filter(|r| r.name != old_primary)
            .filter_map(|r| r.usable().map(|report| (r, report)))
            .filter(|(_, report)| diverged_range(&self.history, report).is_none())
            .filter(|(_, report)| !active || report.applied_sequence >= old_sequence)
            .max_by_key(|(r, report)| {
                (
                    report.applied_sequence,
                    self.is_preferred(&r.name),
                    Reverse(r.name.as_str()),
                )
            })
            .map(|(r, _)| r.name.clone())
    }

    /// The first primary: once every known node reported (or failed the threshold), the
    /// one with the most data; the preferred node wins ties and is waited for.
    fn elect_first_primary(&mut self) {
        if let Some(preferred) = self.view.preferred_primary.clone() {
            let round = self.round(&preferred);
            let ok = round.is_some_and(|r| r.ok);
            let given_up = round.is_some_and(|r| r.consecutive_failures >= self.threshold);
            let may_skip = self.view.auto_failover && given_up;
            if !(ok || may_skip) {
                self.writer = Writer::Pending(if given_up {
                    format!(
                        "the preferred primary {preferred} is unavailable and autoFailover is off; bring it back or set spec.mirroring.primaryNode to another node"
                    )
                } else {
                    format!("waiting for the preferred primary {preferred} to report")
                });
                return;
            }
        }
        let waiting: Vec<&str> = self
            .rounds
            .iter()
            .filter(|r| !r.ok && r.consecutive_failures < self.threshold)
            .map(|r| r.name.as_str())
            .collect();
        if !waiting.is_empty() {
            self.writer = Writer::Pending(format!(
                "waiting for {} to report before electing the first primary",
                waiting.join(", ")
            ));
            return;
        }
        let best = self
            .rounds
            .iter()
            .filter_map(|r| r.usable().map(|report| (r, report)))
            .max_by_key(|(r, report)| {
                (
                    report.write_lease != WriteLease::NotHeld,
                    report.applied_sequence,
                    self.is_preferred(&r.name),
                    Reverse(r.name.as_str()),
                )
            })
            .map(|(r, _)| r.name.clone());
        match best {
            Some(node) => self.promote(&node, PromotionReason::Bootstrap),
            None => {
                self.writer = Writer::Pending("no node reports a usable token yet".into());
            }
        }
    }

    fn follow_switchover(&mut self, step: SwitchoverStep) {
        let primary = self.primary.clone().unwrap_or_default();
        let target = self
            .obs
            .switchover
            .as_ref()
            .map_or_else(String::new, |r| r.target.clone());
        let doing = format!("switching the primary from {primary} to {target}");
        match &step {
            SwitchoverStep::FenceWrites { primary, epoch } => {
                self.actions.push(Action::FenceWrites {
                    node: primary.clone(),
                    epoch: *epoch,
                });
                self.writer = Writer::Switchover(format!("{doing}: stopping writes on {primary}"));
            }
            SwitchoverStep::AwaitCatchUp {
                target_sequence,
                primary_sequence,
                ..
            } => {
                self.writer = Writer::Switchover(format!(
                    "{doing}: writes stopped; waiting for {target} to apply changes up to {primary_sequence} (at {target_sequence})"
                ));
            }
            SwitchoverStep::AwaitFence { until, .. } => {
                self.replan_at = Some(*until);
                self.writer = Writer::Switchover(format!(
                    "{doing}: {primary} is unreachable; waiting until {until} for its write lease to lapse"
                ));
            }
            SwitchoverStep::Promote { target, .. } => {
                self.promote(target, PromotionReason::Switchover);
                self.switchover = Some(SwitchoverOutcome::Completed {
                    target: target.clone(),
                    epoch: self.epoch,
                });
                return;
            }
        }
        self.switchover = Some(SwitchoverOutcome::InProgress(step));
    }

    fn promote(&mut self, node: &str, reason: PromotionReason) {
        let sequence = self.round(node).map_or(0, |r| r.applied_sequence());
        let old = self.primary.replace(node.to_string());
        let old_sequence = old
            .as_deref()
            .and_then(|o| self.round(o))
            .map_or(0, |r| r.applied_sequence());
        self.known_epoch += 1;
        self.epoch = self.known_epoch;
        let epoch = self.epoch;
        self.history.push(EpochRecord {
            epoch,
            primary: node.to_string(),
            start_sequence: sequence,
            since: Time(self.obs.now),
            reason: reason.as_str().to_string(),
        });
        let excess = self.history.len().saturating_sub(EPOCH_HISTORY_LIMIT);
        self.history.drain(..excess);
        self.actions.push(Action::Promote {
            node: node.to_string(),
            epoch,
        });
        self.writer = Writer::Writable;
        let old = old.unwrap_or_default();
        match reason {
            PromotionReason::Failover => {
                self.failover_count += 1;
                self.last_failover_time = Some(Time(self.obs.now));
                let loss = if old_sequence > sequence {
                    format!(
                        "; {old} last reported sequence {old_sequence}: changes after {sequence} are reported as lost writes if it returns with them"
                    )
                } else {
                    String::new()
                };
                self.event(
                    EventReason::HSMFailover,
                    EventType::Warning,
                    format!(
                        "primary {old} failed {} consecutive health checks; promoted {node} (applied sequence {sequence}) at epoch {epoch}{loss}",
                        self.round(&old).map_or(0, |r| r.consecutive_failures)
                    ),
                );
            }
            PromotionReason::Switchover => {
                self.failover_count += 1;
                self.last_failover_time = Some(Time(self.obs.now));
                self.event(
                    EventReason::HSMFailover,
                    EventType::Normal,
                    format!(
                        "requested switchover from {old} to {node} at epoch {epoch} (sequence {sequence})"
                    ),
                );
            }
            PromotionReason::Bootstrap | PromotionReason::Resume => {}
        }
        let why = match reason {
            PromotionReason::Bootstrap => "elected the first primary",
            PromotionReason::Failover => "promoted after the primary failed",
            PromotionReason::Switchover => "promoted by a planned switchover",
            PromotionReason::Resume => "re-promoted under a new epoch to resume writes",
        };
        self.event(
            EventReason::HSMPromoted,
            EventType::Normal,
            format!("{node} {why}: primary at epoch {epoch}, sequence {sequence}"),
        );
    }

    /// Every member's role, commands, status entry and transition events.
    fn finish(mut self) -> Plan {
        let primary_sequence = self
            .primary
            .as_deref()
            .and_then(|p| self.round(p))
            .map_or(0, |r| r.applied_sequence());
        let rounds = std::mem::take(&mut self.rounds);
        let mut entries = Vec::with_capacity(rounds.len());
        for round in &rounds {
            let entry = if self.primary.as_deref() == Some(round.name.as_str()) {
                self.primary_entry(round)
            } else {
                self.mirror_entry(round, primary_sequence)
            };
            self.health_events(round, &entry);
            entries.push(entry);
        }
        let serving = self.primary.is_some();
        for entry in &entries {
            self.actions.push(Action::LabelNode {
                node: entry.node.clone(),
                ready: serving
                    && entry.health == NodeHealth::Healthy
                    && matches!(entry.role, DeviceRole::Primary | DeviceRole::ReadOnly),
            });
        }
        for gone in self
            .prev
            .nodes
            .iter()
            .filter(|n| !entries.iter().any(|e| e.node == n.node))
        {
            self.actions.push(Action::LabelNode {
                node: gone.node.clone(),
                ready: false,
            });
        }
        let status = self.summarize(entries, primary_sequence, &rounds);
        let mut actions = std::mem::take(&mut self.actions);
        actions.sort_by_key(execution_rank);
        Plan {
            status,
            actions,
            replan_at: self.replan_at,
            switchover: self.switchover,
        }
    }

    fn primary_entry(&mut self, round: &NodeRound<'_>) -> DeviceNodeStatus {
        let mut entry = self.entry(round, DeviceRole::Primary);
        entry.sync_lag_seconds = None;
        entry.lost_writes = None;
        entry
    }

    fn mirror_entry(&mut self, round: &NodeRound<'_>, primary_sequence: u64) -> DeviceNodeStatus {
        let now = self.obs.now;
        let report = round.usable();
        let diverged = report.and_then(|r| diverged_range(&self.history, r));
        let role = self.mirror_role(round, diverged.is_some(), primary_sequence);
        let mut entry = self.entry(round, role);

        // Lost writes: reported once per divergence, kept until the node has resynced.
        let mut newly_lost = None;
        entry.lost_writes = match (report, diverged) {
            (Some(report), Some((from, to))) => {
                let known = round
                    .prev
                    .and_then(|p| p.lost_writes.clone())
                    .filter(|l| l.epoch == report.history_epoch && l.from_sequence == from);
                Some(known.unwrap_or_else(|| {
                    newly_lost = Some((report.history_epoch, from, to));
                    LostWrites {
                        epoch: report.history_epoch,
                        from_sequence: from,
                        to_sequence: to,
                        detected_at: Time(now),
                    }
                }))
            }
            (Some(_), None) => None,
            (None, _) => round.prev.and_then(|p| p.lost_writes.clone()),
        };
        entry.sync_lag_seconds = if diverged.is_some() || entry.last_successful_probe.is_none() {
            None
        } else if entry.applied_sequence >= primary_sequence {
            Some(0)
        } else {
            // Behind: as stale as its last completed sync.
            entry
                .last_sync_time
                .as_ref()
                .map(|t| now.duration_since(t.0).as_secs().max(0))
        };

        let lost_clause = newly_lost.map(|(epoch, from, to)| {
            self.actions.push(Action::ReportLostWrites {
                node: round.name.clone(),
                epoch,
                from_sequence: from,
                to_sequence: to,
            });
            let acknowledged = if self.view.policy == MirroringPolicy::Active {
                "they were never acknowledged to clients (policy Active)"
            } else {
                "clients may have seen them succeed (policy ReadOnly)"
            };
            format!(
                "{} holds changes {from}..={to} made under epoch {epoch} that the current primary never received; {acknowledged}; its resync discards them, so recover them from it now if they matter",
                round.name
            )
        });

        let (Some(primary), Some(report)) = (self.primary.clone(), report) else {
            if let Some(clause) = lost_clause {
                self.event(EventReason::HSMDemoted, EventType::Warning, clause);
            }
            return entry;
        };
        let claims_primary = report.role == Some(DeviceRole::Primary);
        if claims_primary || (diverged.is_some() && report.epoch != self.epoch) {
            self.actions.push(Action::Demote {
                node: round.name.clone(),
                epoch: self.epoch,
                primary: primary.clone(),
            });
            let first_sight = round
                .prev
                .is_none_or(|p| p.health != NodeHealth::Healthy || p.role == DeviceRole::Primary);
            if first_sight || lost_clause.is_some() {
                let mut message = format!(
                    "{} rejoins as a mirror of {primary} (epoch {}) and resynchronizes; no automatic failback",
                    round.name, self.epoch
                );
                if let Some(clause) = &lost_clause {
                    message = format!("{message}. {clause}");
                }
                let type_ = if lost_clause.is_some() {
                    EventType::Warning
                } else {
                    EventType::Normal
                };
                self.event(EventReason::HSMDemoted, type_, message);
            }
        } else {
            if let Some(clause) = lost_clause {
                self.event(EventReason::HSMDemoted, EventType::Warning, clause);
            }
            if report.role != Some(role) || report.epoch != self.epoch {
                self.actions.push(Action::SetMirror {
                    node: round.name.clone(),
                    primary: primary.clone(),
                    epoch: self.epoch,
                    role,
                });
            }
        }
        if let Some(error) = &report.error {
            let was_failing = round.prev.is_some_and(status::sync_failing);
            if !was_failing {
                self.event(
                    EventReason::HSMSyncFailed,
                    EventType::Warning,
                    format!("{} cannot sync from {primary}: {error}", round.name),
                );
            }
        }
        entry
    }

    /// `ReadOnly` once caught up under the current epoch; stays so until it falls well
    /// behind (hysteresis); `Standby` while catching up, diverged, or not answering.
    fn mirror_role(
        &self,
        round: &NodeRound<'_>,
        diverged: bool,
        primary_sequence: u64,
    ) -> DeviceRole {
        let was_ready = round
            .prev
            .is_some_and(|p| p.role == DeviceRole::ReadOnly && p.health == NodeHealth::Healthy);
        if self.primary.is_none() {
            return DeviceRole::Standby;
        }
        let Some(report) = round.usable() else {
            // A suspected failure keeps a serving mirror serving (no label flapping).
            return if was_ready && round.health == NodeHealth::Healthy {
                DeviceRole::ReadOnly
            } else {
                DeviceRole::Standby
            };
        };
        if diverged || report.role == Some(DeviceRole::Primary) {
            return DeviceRole::Standby;
        }
        let lag = primary_sequence.saturating_sub(report.applied_sequence);
        let caught_up = if was_ready {
            lag <= self.config.falls_behind_after
        } else {
            report.history_epoch == self.epoch && lag <= self.config.caught_up_within
        };
        if caught_up {
            DeviceRole::ReadOnly
        } else {
            DeviceRole::Standby
        }
    }

    fn entry(&self, round: &NodeRound<'_>, role: DeviceRole) -> DeviceNodeStatus {
        let prev = round.prev;
        let report = round.report;
        DeviceNodeStatus {
            node: round.name.clone(),
            role,
            health: round.health,
            token_serial: report
                .and_then(|r| r.token_serial.clone())
                .or_else(|| prev.and_then(|p| p.token_serial.clone())),
            applied_sequence: round.applied_sequence(),
            last_sync_time: report
                .and_then(|r| r.last_sync)
                .map(Time)
                .or_else(|| prev.and_then(|p| p.last_sync_time.clone())),
            sync_lag_seconds: None,
            consecutive_failures: round.consecutive_failures,
            last_error: round
                .failure
                .as_ref()
                .or(report.and_then(|r| r.error.as_ref()))
                .map(ToString::to_string),
            last_successful_probe: if round.ok {
                Some(Time(self.obs.now))
            } else {
                prev.and_then(|p| p.last_successful_probe.clone())
            },
            lost_writes: None,
        }
    }

    fn health_events(&mut self, round: &NodeRound<'_>, entry: &DeviceNodeStatus) {
        let before = round.prev_health();
        let what = if round.prev.is_some_and(|p| p.role == DeviceRole::Primary) {
            "primary"
        } else {
            "mirror"
        };
        if entry.health == NodeHealth::Unhealthy && before != Some(NodeHealth::Unhealthy) {
            self.event(
                EventReason::HSMDeviceUnhealthy,
                EventType::Warning,
                format!(
                    "{what} {} failed {} consecutive health checks: {}",
                    entry.node,
                    entry.consecutive_failures,
                    entry.last_error.as_deref().unwrap_or("unknown error")
                ),
            );
        }
        if entry.health == NodeHealth::Healthy && before == Some(NodeHealth::Unhealthy) {
            self.event(
                EventReason::HSMDeviceRecovered,
                EventType::Normal,
                format!("{} is healthy again (now {:?})", entry.node, entry.role),
            );
        }
    }

    fn summarize(
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
        let readable = mirrors.iter().any(|n| status::serves_reads(n));

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
                NodeHealth::Healthy if status::sync_failing(n) => Some(format!(
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

        let mirrors_text = status::mirrors_summary(&mirrors);
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
                    status::writable_phase(&problems),
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

        let (synced_ok, synced_reason, synced_message) = status::synced(
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
        }
    }
}

/// Fence and demote before promoting; events after the commands they describe.
fn execution_rank(action: &Action) -> u8 {
    match action {
        Action::FenceWrites { .. } | Action::Demote { .. } => 0,
        Action::Promote { .. } => 1,
        Action::RenewLease { .. } => 2,
        Action::SetMirror { .. } => 3,
        Action::ReportLostWrites { .. } => 4,
        Action::LabelNode { .. } => 5,
        Action::Event(_) => 6,
    }
}
