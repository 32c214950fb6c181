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
        name = "Site",
        type_ = "string",
        json_path = ".status.site.role",
        description = "Active, Passive or Fenced (with spec.site)",
        priority = "1"
    ),
    printcolumn(
        name = "Site Lag",
        type_ = "integer",
        json_path = ".status.site.lagSeconds",
        description = "passive site: seconds behind the active site's archive",
        priority = "1"
    ),
    printcolumn(
        name = "Archive Lag",
        type_ = "integer",
        json_path = ".status.backup.lagSeconds",
        description = "seconds of acknowledged writes the archive does not hold yet (the RPO now)",
        priority = "1"
    ),
    printcolumn(
        name = "Verified",
        type_ = "date",
        json_path = ".status.backup.lastVerified.finishedAt",
        description = "when a restore drill last verified the archive",
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
    /// Continuous encrypted archive to object storage, restore drills. Omitted: no archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
    /// This device's site, when the device exists in several clusters (an active site and
    /// passive ones that follow its archive). Omitted: a single site, no site fencing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteSpec>,
}

/// A site of a device spread over clusters. The active site archives (`spec.backup`) and
/// acknowledges writes only while it has seen, within `leaseSeconds`, that no other site
/// was promoted; a passive site (`followArchive`) applies the active site's archive to its
/// own tokens, serves reads and refuses writes. Only a person promotes a site
/// (`kubectl hsm site promote`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SiteSpec {
    /// This site's name, unique among the sites of the device (a region, a data center).
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("site.name must be lowercase letters, digits and '-'"))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Follow another site's archive: this site is passive until promoted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_archive: Option<FollowArchive>,
    /// Seconds the active site keeps acknowledging writes after it last saw that no other
    /// site was promoted; a promotion waits this long (and a margin) before its site takes
    /// writes. The same on every site of the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 3600))]
    pub lease_seconds: Option<u32>,
    /// Site lag, in seconds, above which a Warning Event is recorded (passive sites).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub lag_alert_seconds: Option<u32>,
}

impl SiteSpec {
    pub const DEFAULT_LEASE_SECONDS: u32 = 30;
    pub const DEFAULT_LAG_ALERT_SECONDS: u32 = 120;

    pub fn lease_seconds(&self) -> u32 {
        self.lease_seconds.unwrap_or(Self::DEFAULT_LEASE_SECONDS)
    }
    pub fn lag_alert_seconds(&self) -> u32 {
        self.lag_alert_seconds
            .unwrap_or(Self::DEFAULT_LAG_ALERT_SECONDS)
    }
}

/// The archive a passive site follows: the active site's `spec.backup` bucket and device.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FollowArchive {
    #[x_kube(validation = Rule::new("self.startsWith('s3://') || self.startsWith('file:///')").message("site.followArchive.url must be s3://BUCKET[/PREFIX] or file:///DIRECTORY"))]
    #[schemars(length(min = 6, max = 1024))]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 8, max = 1024))]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,
    /// Secret mounted on the nodes at `/etc/hsm-secrets/archive/<name>`, as for
    /// `spec.backup`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("site.followArchive.credentialsSecret must be a Secret name"))]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: String,
    /// The active site's HSMDevice, whose archive this site applies.
    #[schemars(length(min = 1, max = 56))]
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub archive_name: Option<String>,
}

/// Where and how often the primary archives the device (disaster recovery).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// `s3://BUCKET[/PREFIX]`, or `file:///DIRECTORY` on the primary's node (single-node
    /// setups and the no-cluster mode).
    #[x_kube(validation = Rule::new("self.startsWith('s3://') || self.startsWith('file:///')").message("backup.url must be s3://BUCKET[/PREFIX] or file:///DIRECTORY"))]
    #[schemars(length(min = 6, max = 1024))]
    pub url: String,
    /// Endpoint of an S3-compatible server (MinIO, Ceph): `http(s)://HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("backup.endpoint must be an http(s):// URL"))]
    #[schemars(length(min = 8, max = 1024))]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub region: Option<String>,
    /// Secret in the node plugin's namespace, mounted on every node at
    /// `/etc/hsm-secrets/archive/<name>` (never read through the API): `recovery.pub`
    /// (the offline recovery key's public half) and, for S3, `access-key-id` and
    /// `secret-access-key`.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("backup.credentialsSecret must be a Secret name (lowercase letters, digits, '-' and '.')"))]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: String,
    /// The archive's name under the device's prefix; a new name starts a new archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("backup.archiveName must be lowercase letters, digits and '-'"))]
    #[schemars(length(min = 1, max = 63))]
    pub archive_name: Option<String>,
    /// Seconds between shipped segments: the most writes losing every token costs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub segment_interval_seconds: Option<u32>,
    /// Minutes between base snapshots (a restore replays at most this much).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 43200))]
    pub base_interval_minutes: Option<u32>,
    /// Days every point stays restorable; older objects no retained point needs are
    /// deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3650))]
    pub retention_days: Option<u32>,
    /// Minutes between restore drills (0: only on demand, `kubectl hsm backup verify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 43200))]
    pub verify_interval_minutes: Option<u32>,
    /// Archive lag, in seconds, above which the BackupArchived condition turns False and
    /// a Warning Event is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub lag_alert_seconds: Option<u32>,
}

impl BackupSpec {
    pub const DEFAULT_ARCHIVE_NAME: &str = "main";
    pub const DEFAULT_SEGMENT_INTERVAL_SECONDS: u32 = 5;
    pub const DEFAULT_BASE_INTERVAL_MINUTES: u32 = 360;
    pub const DEFAULT_RETENTION_DAYS: u32 = 7;
    pub const DEFAULT_VERIFY_INTERVAL_MINUTES: u32 = 1440;
    pub const DEFAULT_LAG_ALERT_SECONDS: u32 = 60;

    pub fn archive_name(&self) -> &str {
        self.archive_name
            .as_deref()
            .unwrap_or(Self::DEFAULT_ARCHIVE_NAME)
    }
    pub fn segment_interval_seconds(&self) -> u32 {
        self.segment_interval_seconds
            .unwrap_or(Self::DEFAULT_SEGMENT_INTERVAL_SECONDS)
    }
    pub fn base_interval_minutes(&self) -> u32 {
        self.base_interval_minutes
            .unwrap_or(Self::DEFAULT_BASE_INTERVAL_MINUTES)
    }
    pub fn retention_days(&self) -> u32 {
        self.retention_days.unwrap_or(Self::DEFAULT_RETENTION_DAYS)
    }
    pub fn verify_interval_minutes(&self) -> u32 {
        self.verify_interval_minutes
            .unwrap_or(Self::DEFAULT_VERIFY_INTERVAL_MINUTES)
    }
    pub fn lag_alert_seconds(&self) -> u32 {
        self.lag_alert_seconds
            .unwrap_or(Self::DEFAULT_LAG_ALERT_SECONDS)
    }
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
    /// The archive, as the primary's node reports it (with `spec.backup`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatus>,
    /// The site, as the primary's node reports it (with `spec.site`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteStatus>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SiteRole {
    /// Archives and takes writes (while its site lease holds).
    Active,
    /// Applies the active site's archive; serves reads; refuses writes.
    Passive,
    /// Another site was promoted: takes no writes until it rejoins as passive.
    Fenced,
}

/// Where the site stands.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    #[schemars(length(max = 63))]
    pub name: String,
    pub role: SiteRole,
    /// Site epoch: grows with every promotion of any site of the device.
    #[serde(default)]
    pub site_epoch: u64,
    /// Passive: the active site's archive, newest object seen in the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_time: Option<Time>,
    /// Passive: every archived change up to this sequence is applied here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_time: Option<Time>,
    /// Passive: seconds since the first archived object not applied here was written (0
    /// when everything in the bucket is applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<i64>,
    /// Fenced: the site promoted over this one, and the sequence its history starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub fenced_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 56))]
    pub fenced_by_device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_sequence: Option<u64>,
    /// Fenced: the changes this site made after the fence point (never merged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_writes: Option<u64>,
    /// Active, draining for a planned switchover (`kubectl hsm site drain`): writes
    /// refused, still archiving, until another site is promoted or the drain is called off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// The last `kubectl hsm site promote` carried out (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub last_promotion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub last_error: Option<String>,
}

/// The archive's state: what a failure would cost now, what can be restored, and the
/// last restore drill.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// The node whose agent archives (the primary's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Every change up to this sequence is durable in the bucket.
    #[serde(default)]
    pub archived_sequence: u64,
    /// Changes the primary acknowledged that the bucket does not hold yet.
    #[serde(default)]
    pub lag_sequences: u64,
    /// Seconds since the archive last held every acknowledged change (0 while it does):
    /// the writes losing every token would cost now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<i64>,
    /// When the archive last held every acknowledged change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_to_date_time: Option<Time>,
    /// When this was last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_time: Option<Time>,
    /// Why the last archive step failed (names the object and the fix; never a value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub last_error: Option<String>,
    /// The points a restore can start from (newest last).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub bases: Vec<BackupPoint>,
    /// The last `kubectl hsm backup now` carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub last_base_request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified: Option<BackupDrill>,
    /// The last `kubectl hsm restore` carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore: Option<BackupRestore>,
}

/// The outcome of one restore from the archive.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRestore {
    /// The request's id (`kubectl hsm restore` sets the time it was asked).
    #[schemars(length(max = 64))]
    pub request: String,
    pub succeeded: bool,
    /// The archive point the device now equals.
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    pub secrets: u64,
    pub bytes: u64,
    pub finished_at: Time,
    /// Why it failed, or what it could not reach (names only, never a value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub message: Option<String>,
}

/// What `kubectl hsm restore` asks, as the value of [`RESTORE_ANNOTATION`] (JSON).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreAnnotation {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_sequence: Option<u64>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_time: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// A base snapshot in the bucket.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupPoint {
    pub epoch: u64,
    pub sequence: u64,
    pub time: Time,
}

/// The outcome of one restore drill.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupDrill {
    /// What asked for it: `scheduled` or the time `kubectl hsm backup verify` was run.
    #[schemars(length(max = 64))]
    pub request: String,
    pub verified: bool,
    /// The archive point restored.
    pub sequence: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    pub secrets: u64,
    pub duration_ms: u64,
    pub finished_at: Time,
    /// What disagreed or failed (names only, never a value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub message: Option<String>,
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

pub use crate::contract::{
    BACKUP_NOW_ANNOTATION, BACKUP_VERIFY_ANNOTATION, RESTORE_ANNOTATION, SITE_DRAIN_ANNOTATION,
    SITE_PROMOTE_ANNOTATION, SWITCHOVER_ANNOTATION, node_ready_label,
};

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
