//! What the controller executes after storing the planned status.

use serde::{Deserialize, Serialize};

use crate::crd::DeviceRole;

/// One step for the controller, executed in the order given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "camelCase")]
pub enum Action {
    /// Extend the primary's write lease under `epoch` (every round while it is healthy).
    /// Under `Active`, also tell it which mirrors the stored status records as outside
    /// its write set: it stops waiting for those (see `crate::mirror::replication`).
    RenewLease {
        node: String,
        epoch: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        outside_write_set: Vec<String>,
    },
    /// Stop writes now and for good under `epoch` (first step of a planned switchover).
    FenceWrites { node: String, epoch: u64 },
    /// Make `node` the primary under `epoch` (a fresh lease starts with it). Sent until
    /// the agent reports it.
    Promote { node: String, epoch: u64 },
    /// `node` is no longer primary: stop writing, discard anything not in `primary`'s
    /// history and resynchronize from it as a mirror under `epoch`.
    Demote {
        node: String,
        epoch: u64,
        primary: String,
    },
    /// `node` mirrors `primary` under `epoch` in `role` (`ReadOnly` serves reads,
    /// `Standby` only catches up).
    SetMirror {
        node: String,
        primary: String,
        epoch: u64,
        role: DeviceRole,
    },
    /// Desired state of the node label [`crate::contract::node_ready_label`]: `ready` sets it to
    /// [`READY_LABEL_VALUE`], otherwise it is removed. Idempotent; every round.
    LabelNode { node: String, ready: bool },
    /// `node` holds changes `from_sequence..=to_sequence`, made under `epoch`, that the
    /// current primary never received; they are discarded by its resync. Reported once
    /// (metric, log) so that an operator can recover them before they go.
    ReportLostWrites {
        node: String,
        epoch: u64,
        from_sequence: u64,
        to_sequence: u64,
    },
    /// Record a Kubernetes Event on the HSMDevice.
    Event(DeviceEvent),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub reason: EventReason,
    #[serde(rename = "type")]
    pub type_: EventType,
    pub message: String,
}

use crate::contract::reasons;

/// Event reasons of DESIGN §2 that the failover planner records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventReason {
    HSMFailover,
    HSMPromoted,
    HSMDemoted,
    HSMSyncFailed,
    HSMDeviceUnhealthy,
    HSMDeviceRecovered,
    HSMReadOnlyFallback,
}

impl EventReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HSMFailover => reasons::FAILOVER,
            Self::HSMPromoted => reasons::PROMOTED,
            Self::HSMDemoted => reasons::DEMOTED,
            Self::HSMSyncFailed => reasons::SYNC_FAILED,
            Self::HSMDeviceUnhealthy => reasons::DEVICE_UNHEALTHY,
            Self::HSMDeviceRecovered => reasons::DEVICE_RECOVERED,
            Self::HSMReadOnlyFallback => reasons::READ_ONLY_FALLBACK,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Warning => "Warning",
        }
    }
}

pub use crate::contract::READY_LABEL_VALUE;

impl Action {
    pub(crate) fn event(reason: EventReason, type_: EventType, message: String) -> Self {
        Self::Event(DeviceEvent {
            reason,
            type_,
            message,
        })
    }
}
