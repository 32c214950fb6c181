//! One planning round: who is primary, what every node's role is, what to tell whom.

use std::cmp::Reverse;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crd::{
    DeviceNodeStatus, DevicePhase, DeviceRole, EpochRecord, HSMDeviceStatus, MirroringPolicy,
    NodeHealth,
};

use super::actions::{Action, DeviceEvent, EventReason, EventType};
use super::fencing::{Fence, old_primary_fence};
use super::nodes::{self, NodeRound, diverged_range, highest_known_epoch, probe_for};
use super::observe::{AgentReport, DeviceView, WriteLease};
use super::status::{self, ConditionReason};
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
pub(super) enum Writer {
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
    let mut plan = planner.finish();
    plan.status = status::settle(previous, plan.status, observed.now);
    plan
}

pub(super) struct Planner<'a> {
    pub(super) view: &'a DeviceView,
    pub(super) prev: &'a HSMDeviceStatus,
    pub(super) obs: &'a Observations,
    pub(super) config: &'a PlanConfig,
    pub(super) threshold: u32,
    pub(super) rounds: Vec<NodeRound<'a>>,
    pub(super) primary: Option<String>,
    pub(super) epoch: u64,
    pub(super) known_epoch: u64,
    pub(super) history: Vec<EpochRecord>,
    pub(super) failover_count: u64,
    pub(super) last_failover_time: Option<Time>,
    pub(super) writer: Writer,
    pub(super) actions: Vec<Action>,
    pub(super) replan_at: Option<Timestamp>,
    pub(super) switchover: Option<SwitchoverOutcome>,
}

impl<'a> Planner<'a> {
    pub(super) fn round(&self, node: &str) -> Option<&NodeRound<'a>> {
        self.rounds.iter().find(|r| r.name == node)
    }

    pub(super) fn event(&mut self, reason: EventReason, type_: EventType, message: String) {
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
                // Filled in from the status entries this round stores, in `finish`.
                outside_write_set: Vec::new(),
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
            .filter(|(r, report)| {
                !active || (report.applied_sequence >= old_sequence && !outside_write_set(r))
            })
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
        if self.view.policy == MirroringPolicy::Active {
            self.mark_write_set(&mut entries, &rounds);
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
}

impl Planner<'_> {
    /// `Active`: which mirrors are outside the primary's write set, as the primary
    /// reports this round (kept from the last status when it did not report). The
    /// renewal tells the primary the same set only after this status is stored, so the
    /// status never shows a mirror as eligible that the primary already stopped waiting
    /// for.
    fn mark_write_set(&mut self, entries: &mut [DeviceNodeStatus], rounds: &[NodeRound<'_>]) {
        let primary = self.primary.clone().unwrap_or_default();
        let reported = rounds
            .iter()
            .find(|r| r.name == primary)
            .and_then(|r| r.usable())
            .and_then(|r| r.write_set.as_ref());
        for entry in entries.iter_mut().filter(|e| e.node != primary) {
            let prev = rounds
                .iter()
                .find(|r| r.name == entry.node)
                .is_some_and(outside_write_set);
            entry.outside_write_set = match reported {
                Some(set) if set.outside.contains(&entry.node) => true,
                Some(set) if set.in_sync.contains(&entry.node) => false,
                _ => prev,
            };
        }
        let outside: Vec<String> = entries
            .iter()
            .filter(|e| e.outside_write_set)
            .map(|e| e.node.clone())
            .collect();
        for action in &mut self.actions {
            if let Action::RenewLease {
                outside_write_set, ..
            } = action
            {
                *outside_write_set = outside.clone();
            }
        }
    }
}

/// As the stored status says: the primary may have stopped waiting for this mirror.
fn outside_write_set(round: &NodeRound<'_>) -> bool {
    round.prev.is_some_and(|p| p.outside_write_set)
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
