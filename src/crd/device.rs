// kube-derive repeats `type_` across printcolumn(...) lists, which this lint mistakes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// One logical HSM: the tokens with the same label on several nodes, one primary and
/// read-only mirrors.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hsmsecrets.io",
    version = "v1alpha1",
    kind = "HSMDevice",
    shortname = "hsmdev",
    category = "hsmsecrets",
    status = "HSMDeviceStatus",
    // The name becomes part of a node-label key (`hsmsecrets.io/device.<name>`), whose
    // name part is limited to 63 characters.
    validation = Rule::new("self.metadata.name.size() <= 56").message("metadata.name of an HSMDevice must be at most 56 characters: it becomes part of the node label hsmsecrets.io/device.<name>"),
    printcolumn(
        name = "Policy",
        type_ = "string",
        json_path = ".spec.mirroring.policy"
    ),
    printcolumn(name = "Primary", type_ = "string", json_path = ".status.primaryNode"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Mirrors",
        type_ = "string",
        json_path = ".status.mirrors",
        description = "mirrors ready / total"
    ),
    printcolumn(
        name = "Lag",
        type_ = "integer",
        json_path = ".status.maxSyncLagSeconds",
        description = "largest mirror sync lag in seconds"
    ),
    printcolumn(
        name = "Epoch",
        type_ = "integer",
        json_path = ".status.epoch",
        priority = "1"
    ),
    printcolumn(
        name = "Last Sync",
        type_ = "date",
        json_path = ".status.lastSyncTime",
        priority = "1"
    ),
    printcolumn(
        name = "Failovers",
        type_ = "integer",
        json_path = ".status.failoverCount",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct HSMDeviceSpec {
    /// How every node opens its token.
    pub pkcs11: Pkcs11Spec,
    /// Mirroring and failover. Omitted means policy `None` (one device, no mirrors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirroring: Option<MirroringSpec>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pkcs11Spec {
    /// Path of the PKCS#11 module on the node, e.g. /usr/lib/softhsm/libsofthsm2.so.
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("pkcs11.library must be an absolute path on the node"))]
    #[schemars(length(min = 1, max = 4096))]
    pub library: String,
    /// Label of the token to open on each node (matched exactly).
    #[schemars(length(min = 1, max = 32))]
    pub token_label: String,
    /// Optional serial number, when several tokens share a label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub token_serial: Option<String>,
    /// Secret holding the user PIN; mounted as a file on the nodes, never put in env or flags.
    pub pin_secret_ref: SecretKeyRef,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default = "default_pin_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_pin_key() -> String {
    "pin".into()
}

/// The mirroring block, accepted exactly as users already write it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.primaryNode) || !has(self.targetNodes) || !(self.primaryNode in self.targetNodes)").message("mirroring.primaryNode must not also be listed in mirroring.targetNodes"))]
pub struct MirroringSpec {
    /// None: no mirrors. ReadOnly: asynchronous read-only mirrors. Active: writes are
    /// acknowledged only after every healthy mirror applied them.
    #[serde(default)]
    pub policy: MirroringPolicy,
    /// Seconds between full verification passes (manifest and checksums).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub sync_interval: Option<u32>,
    /// Promote the most caught-up healthy mirror when the primary fails. When false the
    /// device falls back to read-only until `kubectl hsm failover`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_failover: Option<bool>,
    /// Preferred primary node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub primary_node: Option<String>,
    /// Mirror nodes; empty means every node that has the token. A set: the API server
    /// refuses a node listed twice (`x-kubernetes-list-type: set`, no CEL needed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub target_nodes: Vec<String>,
    /// Consecutive failed health checks of the primary before it is declared failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub failover_threshold: Option<u32>,
}

impl MirroringSpec {
    pub const DEFAULT_SYNC_INTERVAL: u32 = 300;
    pub const DEFAULT_FAILOVER_THRESHOLD: u32 = 3;

    pub fn sync_interval(&self) -> u32 {
        self.sync_interval.unwrap_or(Self::DEFAULT_SYNC_INTERVAL)
    }
    pub fn auto_failover(&self) -> bool {
        self.auto_failover.unwrap_or(false)
    }
    pub fn failover_threshold(&self) -> u32 {
        self.failover_threshold
            .unwrap_or(Self::DEFAULT_FAILOVER_THRESHOLD)
    }
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum MirroringPolicy {
    #[default]
    None,
    ReadOnly,
    Active,
}

/// Role of one node's token within a device.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceRole {
    /// Read/write, the source of truth.
    Primary,
    /// Synchronized read-only copy that serves reads.
    ReadOnly,
    /// Healthy and eligible for promotion, not serving (catching up or returning).
    Standby,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum DevicePhase {
    #[default]
    Pending,
    Ready,
    Degraded,
    ReadOnlyFallback,
    Failed,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeHealth {
    Healthy,
    Unhealthy,
    Unknown,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HSMDeviceStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_node: Option<String>,
    /// Fencing token: grows on every promotion; the primary accepts writes only under it.
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub phase: DevicePhase,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<DeviceNodeStatus>,
    /// "ready/total" mirrors, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirrors: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sync_lag_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// Since when the device has had no writable primary (read-only fallback or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_unavailable_since: Option<Time>,
    #[serde(default)]
    pub failover_count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failover_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The most recent promotions, newest last (bounded). Each records the sequence the
    /// new primary's history starts from, so a node that returns with changes beyond that
    /// point is known to hold writes the current primary never received.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub epoch_history: Vec<EpochRecord>,
}

/// One promotion: from `epoch` on, `primary` is the source of truth, its history
/// continuing from `startSequence`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EpochRecord {
    pub epoch: u64,
    pub primary: String,
    /// The applied sequence the new primary had when promoted: every node's changes up to
    /// here are shared history; changes after it made under an older epoch are lost writes.
    pub start_sequence: u64,
    pub since: Time,
    /// Why: Bootstrap, Failover, Switchover or Resume.
    pub reason: String,
}

/// Changes a node made under an older epoch that the current primary never received.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LostWrites {
    /// The epoch under which the changes were made.
    pub epoch: u64,
    pub from_sequence: u64,
    pub to_sequence: u64,
    pub detected_at: Time,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceNodeStatus {
    pub node: String,
    pub role: DeviceRole,
    pub health: NodeHealth,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_serial: Option<String>,
    /// Highest change sequence this node has applied.
    #[serde(default)]
    pub applied_sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_lag_seconds: Option<i64>,
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the controller last reached this node's agent with a usable token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_probe: Option<Time>,
    /// Set when the node returned holding changes the current primary never received
    /// (possible under policy ReadOnly); cleared once the node has resynchronized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_writes: Option<LostWrites>,
    /// Policy Active: the primary stopped waiting for this mirror (it failed a push), so
    /// it may lack acknowledged writes and is never promoted automatically; cleared once
    /// the primary reports it back in its write set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outside_write_set: bool,
}

/// Annotation on an HSMDevice asking the controller for a planned switchover to a node
/// (set by `kubectl hsm failover DEVICE --to NODE`; removed by the controller when done).
pub const SWITCHOVER_ANNOTATION: &str = "hsmsecrets.io/switchover-to";

/// `hsmsecrets.io/device.<device>`: the label a node carries (value `ready`) while its copy
/// of the device serves; the controller sets it and pod injection's affinity matches it.
/// The name part of a label key is limited to 63 characters, so device names longer than
/// 56 characters cannot be labelled; the admission webhook refuses them.
pub fn node_ready_label(device: &str) -> String {
    format!("{}device.{device}", super::PREFIX)
}

impl HSMDevice {
    /// The mirroring block with its defaults applied (policy None when omitted).
    pub fn mirroring(&self) -> MirroringSpec {
        self.spec.mirroring.clone().unwrap_or(MirroringSpec {
            policy: MirroringPolicy::None,
            sync_interval: None,
            auto_failover: None,
            primary_node: None,
            target_nodes: Vec::new(),
            failover_threshold: None,
        })
    }
}
