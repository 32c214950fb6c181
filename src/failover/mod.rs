//! Failover planning for an `HSMDevice`: observations in, decisions out.
//!
//! Pure: no IO, no clock, no async. The controller probes every node's agent, calls
//! [`plan`] with the spec, the previous status, the probes, its lease facts and `now`,
//! writes [`Plan::status`] (optimistic concurrency) and only then executes
//! [`Plan::actions`] in order. If the status write conflicts it drops the actions and
//! plans again: an action is never executed for a status that was not stored, so an agent
//! can never hold an epoch the status does not know. Actions that describe a desired state
//! (`RenewLease`, `LabelNode`) come every round; commands (`Promote`, `Demote`,
//! `SetMirror`) come until the agent's report shows them applied; events come only on
//! transitions.
//!
//! # The rules
//!
//! * **Health is debounced.** A node's consecutive failed probes reset on any success; it
//!   is marked `Unhealthy` (and `HSMDeviceUnhealthy` recorded) only at
//!   `failoverThreshold` consecutive failures, so alternating health neither promotes nor
//!   spams events. A failing primary below the threshold stays primary; the phase is
//!   `Degraded`.
//! * **Promotion** (`autoFailover: true`, primary at the threshold) picks the eligible
//!   mirror with the highest applied sequence; ties prefer `primaryNode`, then name order.
//!   Eligible: probed healthy this round, its data a prefix of the current history (see
//!   [`EpochRecord`](crate::crd::EpochRecord)) and, under policy `Active`, holding at
//!   least the primary's last reported sequence and not recorded outside the primary's
//!   write set — an `Active` write is acknowledged only once every mirror of the write
//!   set applied it, and a mirror leaves that set only after the status records it, so
//!   only such a mirror is known to hold every acknowledged write. With no eligible mirror under `Active` the device stays in
//!   `ReadOnlyFallback` rather than lose acknowledged writes (a manual `--force`
//!   switchover can still promote).
//! * **Fencing.** No promotion before the old primary's write lease has certainly
//!   lapsed ([`fencing`]): until then the phase is `ReadOnlyFallback` and
//!   [`Plan::replan_at`] says when to plan again. The new epoch is one more than any
//!   epoch seen in status or reported by an agent.
//! * **No automatic failback.** A returning old primary (even the preferred
//!   `primaryNode`) is demoted, resynchronizes as `Standby` and becomes `ReadOnly` once
//!   caught up. Changes it made that the new primary never received are reported once
//!   ([`Action::ReportLostWrites`]), never dropped silently.
//! * `autoFailover: false`: the device enters `ReadOnlyFallback` (reads from mirrors,
//!   writes refused) until the primary returns or a manual switchover.
//! * No healthy `ReadOnly` mirror to read from, and no writable primary: `Failed`.
//! * Policy `None`: one node, no mirrors, no promotion. A failed primary means `Failed`
//!   (there is no mirror to fall back to, so `ReadOnlyFallback` would promise reads that
//!   nothing serves).
//! * Roles: `Standby` for healthy mirrors that are catching up (behind the primary by more
//!   than [`PlanConfig::caught_up_within`], or rejoined and not yet synchronized under the
//!   current epoch); `ReadOnly` once caught up, until they fall more than
//!   [`PlanConfig::falls_behind_after`] behind (hysteresis keeps node labels steady).
//!   A `targetNodes` entry that never reported is listed with health `Unknown`.
//! * The first primary (empty status) is elected once every known node has reported or
//!   failed `failoverThreshold` probes: the node with the most data, ties preferring
//!   `primaryNode`; a preferred node that has not reported yet is waited for.

mod actions;
pub mod fencing;
mod nodes;
mod observe;
mod plan;
mod roles;
mod status;
mod switchover;
mod trust;

#[cfg(test)]
mod fixture;
#[cfg(test)]
mod tests;

pub use actions::{Action, DeviceEvent, EventReason, EventType, READY_LABEL_VALUE};
pub use fencing::{Fence, FencingConfig, LeaseFacts};
pub use nodes::{membership_is_open, named_nodes};
pub use observe::{
    AgentReport, DeviceView, NodeError, NodeErrorKind, Probe, ProbeResult, WriteLease,
    WriteSetReport,
};
pub use plan::{Plan, plan};
pub use status::{ConditionReason, condition_types};
pub use switchover::{
    SwitchoverError, SwitchoverOutcome, SwitchoverRequest, SwitchoverStep, plan_switchover,
};
pub use trust::{history_epoch, write_lease};

use k8s_openapi::jiff::Timestamp;

/// Everything the controller observed in one round.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Observations {
    /// One probe per node the controller knows (a node without a probe counts as a failed
    /// check if it was known before, and as `Unknown` if it never reported).
    pub probes: Vec<Probe>,
    /// When the current primary's write lease could last have been extended.
    pub lease: LeaseFacts,
    /// A pending `kubectl hsm failover --to` request, if any.
    pub switchover: Option<SwitchoverRequest>,
    pub now: Timestamp,
}

/// Tuning of the planner; the controller builds it from its flags.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlanConfig {
    pub fencing: FencingConfig,
    /// A mirror this many changes behind the primary (or fewer) is caught up: `ReadOnly`.
    pub caught_up_within: u64,
    /// A `ReadOnly` mirror more than this many changes behind goes back to `Standby`.
    pub falls_behind_after: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            fencing: FencingConfig::default(),
            caught_up_within: 8,
            falls_behind_after: 64,
        }
    }
}

/// A planner configuration that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("the write lease duration must be positive; set --lease-duration to e.g. 15s")]
    ZeroLease,
    #[error(
        "the fencing safety margin must be positive (it covers clock-rate drift and writes in flight when the lease lapses); set --lease-safety-margin to e.g. 5s"
    )]
    ZeroMargin,
    #[error(
        "falls_behind_after ({falls_behind_after}) must be at least caught_up_within ({caught_up_within}); raise --mirror-falls-behind-after"
    )]
    Hysteresis {
        caught_up_within: u64,
        falls_behind_after: u64,
    },
}

impl ConfigError {
    /// Stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ZeroLease => "zero_lease",
            Self::ZeroMargin => "zero_margin",
            Self::Hysteresis { .. } => "hysteresis",
        }
    }
}

impl PlanConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.fencing.lease_duration.is_zero() {
            return Err(ConfigError::ZeroLease);
        }
        if self.fencing.safety_margin.is_zero() {
            return Err(ConfigError::ZeroMargin);
        }
        if self.falls_behind_after < self.caught_up_within {
            return Err(ConfigError::Hysteresis {
                caught_up_within: self.caught_up_within,
                falls_behind_after: self.falls_behind_after,
            });
        }
        Ok(())
    }
}
