//! What an agent tells a probe (the Health RPC): its token, role and epoch, its write
//! lease, its clock, and how its sync (a mirror) or its write set (an Active primary)
//! is doing. Domain types: [`rpc::convert`](super::rpc::convert) maps them to and from
//! the wire.

use std::time::SystemTime;

use crate::crd::DeviceRole;

use super::Peer;
use super::sync::{FullPassReport, LostWrite};

/// One agent's answer to a probe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentHealth {
    pub node: String,
    /// The HSMDevice it serves (empty from agents that name none).
    pub device: String,
    pub token_label: String,
    /// The token is there (a session may still fail).
    pub token_present: bool,
    pub session_usable: bool,
    pub token_serial: Option<String>,
    /// Why the token cannot serve, when it cannot.
    pub token_error: Option<Fault>,
    /// None until the controller assigned one.
    pub role: Option<DeviceRole>,
    pub epoch: u64,
    /// The sequence this node vouches for: a primary's published one, a mirror's cursor.
    pub applied_sequence: u64,
    /// Rounded up: 0 means expired or none.
    pub write_lease_remaining_ms: u64,
    /// The primary a mirror follows.
    pub primary: Option<Peer>,
    /// Writes stopped for good under this epoch (a planned switchover).
    pub fenced: bool,
    /// The agent's clock when it answered: write leases are granted as deadlines on it.
    pub clock: Option<ClockReading>,
    /// A mirror's (or standby's) sync.
    pub sync: Option<SyncStatus>,
    /// A primary's Active write set.
    pub replication: Option<ReplicationStatus>,
}

/// An error's kind (stable, for matching and metrics) and its message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fault {
    pub kind: String,
    pub message: String,
}

/// An agent's monotonic clock, read when it answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockReading {
    /// Which clock (a new one with every agent process).
    pub id: u64,
    pub now_ms: u64,
}

/// How a mirror's sync is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStatus {
    pub last_sync: Option<SystemTime>,
    pub primary_sequence: u64,
    pub checksum_failures: u64,
    pub records_applied: u64,
    pub last_error: Option<Fault>,
    pub consecutive_failures: u32,
    pub last_full_pass: Option<FullPassReport>,
    /// Changes this node held that its primary never had (newest kept).
    pub lost_writes: Vec<LostWrite>,
}

/// A primary's write set under the Active policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicationStatus {
    pub in_sync: Vec<String>,
    /// Failed a push; writes wait for them until the controller takes them out.
    pub dropping: Vec<OutsideMirror>,
    /// Taken out of the write set by the controller.
    pub dropped: Vec<OutsideMirror>,
}

/// A mirror outside (or leaving) the write set, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutsideMirror {
    pub node: String,
    pub reason: String,
    pub since: SystemTime,
}
