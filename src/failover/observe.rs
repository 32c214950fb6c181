//! The planner's inputs: the part of the spec it decides on, and one probe per node.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crd::{DeviceRole, HSMDevice, MirroringPolicy, MirroringSpec};

/// The part of an `HSMDevice` spec that failover decisions depend on, defaults applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Device name (used in messages and the node label key).
    pub name: String,
    /// `metadata.generation`, copied to `observedGeneration`.
    pub generation: Option<i64>,
    pub policy: MirroringPolicy,
    pub auto_failover: bool,
    /// Preferred primary: chosen at bootstrap and on ties; never failed back to.
    pub preferred_primary: Option<String>,
    /// Mirror nodes; empty means every node whose agent reports the token.
    pub target_nodes: Vec<String>,
    pub failover_threshold: u32,
    pub sync_interval: Duration,
}

impl DeviceView {
    pub fn new(name: impl Into<String>, mirroring: &MirroringSpec) -> Self {
        Self {
            name: name.into(),
            generation: None,
            policy: mirroring.policy,
            auto_failover: mirroring.auto_failover(),
            preferred_primary: mirroring.primary_node.clone(),
            target_nodes: mirroring.target_nodes.clone(),
            // The schema bounds it to 1..=100; 0 would promote on the first probe.
            failover_threshold: mirroring.failover_threshold().max(1),
            sync_interval: Duration::from_secs(mirroring.sync_interval().into()),
        }
    }

    pub fn of(device: &HSMDevice) -> Self {
        let mut view = Self::new(
            device.metadata.name.clone().unwrap_or_default(),
            &device.mirroring(),
        );
        view.generation = device.metadata.generation;
        view
    }

    pub fn is_mirrored(&self) -> bool {
        self.policy != MirroringPolicy::None
    }
}

/// One node's probe this round.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub node: String,
    pub result: ProbeResult,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeResult {
    /// The agent could not be reached or did not answer.
    Failed(NodeError),
    Reported(AgentReport),
}

/// What a node's agent says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub token_present: bool,
    /// A logged-in session works (a test operation succeeded).
    pub session_usable: bool,
    pub token_serial: Option<String>,
    /// The role the agent was last told; `None` before any assignment.
    pub role: Option<DeviceRole>,
    /// The epoch the agent was last told (by Promote, Demote, SetMirror or RenewLease).
    pub epoch: u64,
    /// The epoch whose history the node's data is a prefix of: a primary's own epoch; a
    /// mirror takes its primary's epoch once it has discarded anything not in that
    /// primary's history (at the latest with the first change it applies from it). A
    /// demoted old primary keeps reporting its old epoch until then, which is how the
    /// planner knows its extra changes are not (yet) gone.
    pub history_epoch: u64,
    pub applied_sequence: u64,
    /// When the node last completed a sync from the primary (mirrors).
    pub last_sync: Option<Timestamp>,
    pub write_lease: WriteLease,
    /// The agent's latest operational error (e.g. a failing sync), if any.
    pub error: Option<NodeError>,
    /// A primary under `Active`: its write set as it reports it.
    #[serde(default)]
    pub write_set: Option<WriteSetReport>,
}

/// The mirrors an `Active` primary's writes wait for, and those that failed a push
/// (waiting for the controller to take them out, or already out).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteSetReport {
    pub in_sync: Vec<String>,
    pub outside: Vec<String>,
}

impl AgentReport {
    /// The device on this node works: token there and a session usable.
    pub fn device_usable(&self) -> bool {
        self.token_present && self.session_usable
    }
}

/// The write lease as the agent sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteLease {
    /// Not a primary.
    #[default]
    NotHeld,
    /// Accepting writes for this much longer unless renewed.
    Valid { remaining: Duration },
    /// Expired by time; a renewal for the same epoch revives it.
    Lapsed,
    /// Fenced on purpose (switchover): no write under this epoch ever again.
    Fenced,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeError {
    pub kind: NodeErrorKind,
    /// Human-readable detail from the agent or transport (never secret bytes).
    pub detail: String,
}

impl NodeError {
    pub fn new(kind: NodeErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// Longest detail carried into status and events (agents may return long error chains).
const MAX_DETAIL: usize = 256;

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut end = self.detail.len().min(MAX_DETAIL);
        while !self.detail.is_char_boundary(end) {
            end -= 1;
        }
        let more = if end < self.detail.len() { "…" } else { "" };
        write!(f, "{}: {}{more}", self.kind.as_str(), &self.detail[..end])
    }
}

/// Why a node's probe or its sync failed; also a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NodeErrorKind {
    /// No connection to the agent.
    Unreachable,
    /// The agent did not answer in time.
    Timeout,
    /// The agent answered but the token is not there.
    TokenMissing,
    /// The token is there but no session works (PIN, locked, PKCS#11 error).
    SessionFailed,
    /// A mirror could not pull or apply changes.
    SyncFailed,
    /// A mirror found data whose checksum does not match the primary's manifest.
    ChecksumMismatch,
    /// Anything else the agent reported.
    Other,
}

impl NodeErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreachable => "Unreachable",
            Self::Timeout => "Timeout",
            Self::TokenMissing => "TokenMissing",
            Self::SessionFailed => "SessionFailed",
            Self::SyncFailed => "SyncFailed",
            Self::ChecksumMismatch => "ChecksumMismatch",
            Self::Other => "Other",
        }
    }
}
