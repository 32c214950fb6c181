//! Each member's role, the commands that bring its agent there, its status entry and
//! the events of its transitions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{DeviceNodeStatus, DeviceRole, LostWrites, MirroringPolicy, NodeHealth};

use super::actions::{Action, EventReason, EventType};
use super::nodes::{NodeRound, diverged_range};
use super::plan::Planner;
use super::status;

impl Planner<'_> {
    pub(super) fn primary_entry(&mut self, round: &NodeRound<'_>) -> DeviceNodeStatus {
        let mut entry = self.entry(round, DeviceRole::Primary);
        entry.sync_lag_seconds = None;
        entry.lost_writes = None;
        entry
    }

    pub(super) fn mirror_entry(
        &mut self,
        round: &NodeRound<'_>,
        primary_sequence: u64,
    ) -> DeviceNodeStatus {
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
            outside_write_set: false,
        }
    }

    pub(super) fn health_events(&mut self, round: &NodeRound<'_>, entry: &DeviceNodeStatus) {
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
}
