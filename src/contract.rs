//! Every name another component or a user depends on, in one place: the API group,
//! annotations and labels on pods, devices, nodes and Secrets, the CSI driver and its
//! volume attributes, the finalizer. Changing one of these breaks running clusters,
//! manifests or scripts: it is a contract, not an implementation detail.
//!
//! The modules that act on a name re-export it from here; nothing defines one twice.

/// API group of every resource this project defines.
pub const GROUP: &str = "hsmsecrets.io";
/// Prefix of every annotation and label this project reads or writes.
pub const PREFIX: &str = "hsmsecrets.io/";
/// Finalizer placed on HSMSecrets that manage a Kubernetes Secret copy.
pub const FINALIZER: &str = "hsmsecrets.io/finalizer";

// ---- the CSI driver and the volume the webhook injects ----------------------------

/// Name of the CSI driver that serves HSM secrets (the `CSIDriver` object, the pods'
/// volumes, the node plugin's identity).
pub const CSI_DRIVER: &str = hsm_secrets_csi::DEFAULT_DRIVER_NAME;
/// Name of the volume the webhook adds; reserved in annotated pods.
pub const VOLUME_NAME: &str = "hsm-secrets";
/// CSI volume attribute: comma-separated HSMSecret names.
pub const ATTRIBUTE_SECRETS: &str = "secrets";
/// CSI volume attribute: the HSMDevice name.
pub const ATTRIBUTE_DEVICE: &str = "device";
/// CSI volume attribute: octal file mode, e.g. `0440`.
pub const ATTRIBUTE_FILE_MODE: &str = "fileMode";

// ---- pod annotations (the injection webhook) ---------------------------------------

/// `"true"` asks for injection.
pub const ANNOTATION_INJECT: &str = "hsmsecrets.io/inject";
/// Comma-separated HSMSecret names in the pod's namespace.
pub const ANNOTATION_SECRETS: &str = "hsmsecrets.io/secrets";
/// Where the secrets appear in the containers.
pub const ANNOTATION_MOUNT_PATH: &str = "hsmsecrets.io/mount-path";
/// Comma-separated container names that get the mount (default: every container).
pub const ANNOTATION_CONTAINERS: &str = "hsmsecrets.io/containers";
/// Octal permission of the secret files.
pub const ANNOTATION_FILE_MODE: &str = "hsmsecrets.io/file-mode";
/// `preferred`, `required` or `none`.
pub const ANNOTATION_NODE_AFFINITY: &str = "hsmsecrets.io/node-affinity";
/// The HSMDevice to read from, when the HSMSecrets cannot tell (yet).
pub const ANNOTATION_DEVICE: &str = "hsmsecrets.io/device";
/// Written by the webhook once the pod carries the volume.
pub const ANNOTATION_STATUS: &str = "hsmsecrets.io/status";
/// Value of [`ANNOTATION_STATUS`] after injection.
pub const STATUS_INJECTED: &str = "injected";

/// Every annotation the webhook reads or writes on pods.
pub const KNOWN_ANNOTATIONS: &[&str] = &[
    ANNOTATION_INJECT,
    ANNOTATION_SECRETS,
    ANNOTATION_MOUNT_PATH,
    ANNOTATION_CONTAINERS,
    ANNOTATION_FILE_MODE,
    ANNOTATION_NODE_AFFINITY,
    ANNOTATION_DEVICE,
    ANNOTATION_STATUS,
];

// ---- HSMDevice annotations: requests to the controller (set by `kubectl hsm`) ------

/// Asks the controller for a planned switchover to a node (`kubectl hsm failover DEVICE
/// --to NODE`); removed by the controller when done.
pub const SWITCHOVER_ANNOTATION: &str = "hsmsecrets.io/switchover-to";
/// Asks for a base snapshot now (`kubectl hsm backup now`): its value, a request id, is
/// copied to `status.backup.lastBaseRequest` once the base is durable.
pub const BACKUP_NOW_ANNOTATION: &str = "hsmsecrets.io/backup-now";
/// Asks for a restore drill now (`kubectl hsm backup verify`): its value is copied to
/// `status.backup.lastVerified.request` when the drill ends.
pub const BACKUP_VERIFY_ANNOTATION: &str = "hsmsecrets.io/backup-verify";
/// Asks for a restore of the device from its archive (`kubectl hsm restore`), a JSON
/// `RestoreAnnotation`; its id is copied to `status.backup.lastRestore.request` when the
/// restore ends.
pub const RESTORE_ANNOTATION: &str = "hsmsecrets.io/restore";
/// Asks to promote this passive site (`kubectl hsm site promote`, after its preflight and
/// confirmation): its value, a request id, is copied to `status.site.lastPromotion` once
/// the site is active.
pub const SITE_PROMOTE_ANNOTATION: &str = "hsmsecrets.io/site-promote";
/// Any value drains the active site for a planned switchover: it stops taking writes and
/// archives what it has (`kubectl hsm site drain`); removing it calls the switchover off.
pub const SITE_DRAIN_ANNOTATION: &str = "hsmsecrets.io/site-drain";

// ---- labels ---------------------------------------------------------------------------

/// `hsmsecrets.io/device.<device>`: the label a node carries (value
/// [`READY_LABEL_VALUE`]) while its copy of the device serves; the controller sets it and
/// pod injection's affinity matches it. The name part of a label key is limited to 63
/// characters, so device names longer than 56 characters cannot be labelled; the
/// admission webhook refuses them.
pub fn node_ready_label(device: &str) -> String {
    format!("{PREFIX}device.{device}")
}
/// Value of the node label while the node serves the device (primary or caught-up mirror).
pub const READY_LABEL_VALUE: &str = "ready";
/// Label on a managed Secret naming the HSMDevice it comes from.
pub const DEVICE_LABEL: &str = "hsmsecrets.io/device";
/// Label on a managed Secret carrying the HSM version it holds.
pub const VERSION_LABEL: &str = "hsmsecrets.io/version";
/// Label on an import Secret naming the HSMSecret it feeds.
pub const IMPORT_FOR_LABEL: &str = "hsmsecrets.io/import-for";
/// Annotation on an import Secret listing keys to remove (comma-separated).
pub const REMOVE_KEYS_ANNOTATION: &str = "hsmsecrets.io/remove-keys";

// ---- the webhook's serving certificate Secret ------------------------------------------

/// When the serving certificate expires (RFC 3339), so renewal needs no X.509 parsing.
pub const ANNOTATION_NOT_AFTER: &str = "hsmsecrets.io/certificate-not-after";
/// The DNS names the serving certificate covers, comma-separated.
pub const ANNOTATION_DNS_NAMES: &str = "hsmsecrets.io/certificate-dns-names";

// ---- Event reasons and condition types --------------------------------------------
// Alerts, `kubectl get events --field-selector reason=...` and dashboards match on these.

/// Reasons of the Events this project records.
pub mod reasons {
    // HSMDevice: health, failover, roles (the failover planner).
    pub const FAILOVER: &str = "HSMFailover";
    pub const PROMOTED: &str = "HSMPromoted";
    pub const DEMOTED: &str = "HSMDemoted";
    pub const SYNC_FAILED: &str = "HSMSyncFailed";
    pub const DEVICE_UNHEALTHY: &str = "HSMDeviceUnhealthy";
    pub const DEVICE_RECOVERED: &str = "HSMDeviceRecovered";
    pub const READ_ONLY_FALLBACK: &str = "HSMReadOnlyFallback";
    // HSMDevice: the archive, restores and sites.
    pub const BACKUP_FAILING: &str = "BackupFailing";
    pub const BACKUP_VERIFIED: &str = "BackupVerified";
    pub const BACKUP_VERIFY_FAILED: &str = "BackupVerifyFailed";
    pub const RESTORED: &str = "Restored";
    pub const RESTORE_FAILED: &str = "RestoreFailed";
    pub const SITE_FENCED: &str = "SiteFenced";
    pub const SITE_PROMOTED: &str = "SitePromoted";
    pub const SITE_LAGGING: &str = "SiteLagging";
    pub const SITE_ERROR: &str = "SiteError";
    // HSMSecret (the controller) and pods (the node plugin).
    pub const SECRET_SYNCED: &str = "HSMSecretSynced";
    pub const SECRET_SYNC_FAILED: &str = "HSMSecretSyncFailed";
    pub const SECRET_REVOKED: &str = "HSMSecretRevoked";
    // Node: a PIN the token refused (never retried).
    pub const PIN_REFUSED: &str = "HSMPinRefused";
}

/// Condition types in the status of HSMDevices and HSMSecrets.
pub mod conditions {
    /// HSMDevice: the device has a writable primary; HSMSecret: it is served (and its
    /// Secret copy matches).
    pub const READY: &str = "Ready";
    /// HSMDevice: every mirror is healthy and caught up.
    pub const SYNCED: &str = "Synced";
    /// HSMDevice: something needs attention (phase other than Ready and Pending).
    pub const DEGRADED: &str = "Degraded";
    /// HSMDevice: the archive holds every acknowledged change, or lags less than the alert.
    pub const BACKUP_ARCHIVED: &str = "BackupArchived";
    /// HSMDevice: the last restore drill rebuilt the archive and it matched the device.
    pub const BACKUP_VERIFIED: &str = "BackupVerified";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_annotation_and_label_carries_the_project_prefix() {
        let names = [
            FINALIZER,
            SWITCHOVER_ANNOTATION,
            BACKUP_NOW_ANNOTATION,
            BACKUP_VERIFY_ANNOTATION,
            RESTORE_ANNOTATION,
            SITE_PROMOTE_ANNOTATION,
            SITE_DRAIN_ANNOTATION,
            DEVICE_LABEL,
            VERSION_LABEL,
            IMPORT_FOR_LABEL,
            REMOVE_KEYS_ANNOTATION,
            ANNOTATION_NOT_AFTER,
            ANNOTATION_DNS_NAMES,
        ];
        for name in names.iter().chain(KNOWN_ANNOTATIONS) {
            assert!(name.starts_with(PREFIX), "{name}");
        }
        assert_eq!(PREFIX, format!("{GROUP}/"));
        assert_eq!(
            node_ready_label("prod-hsm"),
            "hsmsecrets.io/device.prod-hsm"
        );
        assert_eq!(CSI_DRIVER, "csi.hsmsecrets.io");
    }
}
