// kube-derive repeats `type_` across printcolumn(...) lists, which this lint mistakes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A secret that lives in an HSMDevice at `<namespace>/<name>`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "hsmsecrets.io",
    version = "v1alpha1",
    kind = "HSMSecret",
    namespaced,
    shortname = "hsmsec",
    category = "hsmsecrets",
    status = "HSMSecretStatus",
    printcolumn(name = "Device", type_ = "string", json_path = ".spec.deviceRef"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.syncStatus"),
    printcolumn(name = "Version", type_ = "integer", json_path = ".status.version"),
    printcolumn(name = "Last Sync", type_ = "date", json_path = ".status.lastSyncTime"),
    printcolumn(
        name = "Served By",
        type_ = "string",
        json_path = ".status.servedBy.node",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct HSMSecretSpec {
    /// Name of the HSMDevice holding the secret.
    #[schemars(length(min = 1, max = 253))]
    pub device_ref: String,
    /// Keep a Kubernetes Secret of this name equal to the HSM content (HSM -> Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: Option<String>,
    /// Type of the Kubernetes Secret copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_type: Option<String>,
    /// Seconds between re-checks of the Secret copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 5, max = 86400))]
    pub sync_interval: Option<u32>,
    /// Import a Kubernetes Secret into the HSM (a write to the primary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SecretSource>,
    /// Who may mount the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessSpec>,
    /// What happens to the HSM data when this HSMSecret is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<DeletionPolicy>,
}

impl HSMSecretSpec {
    pub const DEFAULT_SYNC_INTERVAL: u32 = 30;

    pub fn secret_type(&self) -> &str {
        self.secret_type.as_deref().unwrap_or("Opaque")
    }
    pub fn sync_interval(&self) -> u32 {
        self.sync_interval.unwrap_or(Self::DEFAULT_SYNC_INTERVAL)
    }
    pub fn deletion_policy(&self) -> DeletionPolicy {
        self.deletion_policy.unwrap_or_default()
    }
    /// Service accounts allowed to mount; empty means any in the namespace.
    pub fn allowed_service_accounts(&self) -> &[String] {
        self.access
            .as_ref()
            .map(|a| a.service_accounts.as_slice())
            .unwrap_or(&[])
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretSource {
    pub secret_ref: LocalSecretRef,
    /// Delete the source Secret once its data is verified in the HSM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_after_import: Option<bool>,
    /// Replace the HSM secret with the source's keys (default), or merge them into it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ImportMode>,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum ImportMode {
    #[default]
    Replace,
    Merge,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalSecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AccessSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum DeletionPolicy {
    /// Keep the HSM data (default): the secret travels with the token.
    #[default]
    Retain,
    /// Delete the HSM data (a tombstone, replicated to mirrors).
    Delete,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum SyncStatus {
    #[default]
    Pending,
    InSync,
    OutOfSync,
    Error,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HSMSecretStatus {
    #[serde(default)]
    pub sync_status: SyncStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// HMAC-SHA256 of the content under a cluster key: detects change without letting
    /// anyone brute-force low-entropy values from status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// Key names held in the HSM (names only, never values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// Version of the source Secret last imported (its resourceVersion), so an unchanged
    /// source is not written again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_source_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<ServedBy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServedBy {
    pub node: String,
    pub role: crate::crd::DeviceRole,
}
