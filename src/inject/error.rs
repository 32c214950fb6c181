//! Why a pod cannot be injected. Every message names the annotation (or the
//! pod field) at fault and says how to fix it: it is what `kubectl apply`
//! prints.

/// A reason to deny an annotated pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error(
        "annotation hsmsecrets.io/inject is {value:?}; set it to \"true\" to inject HSM \
         secrets, or remove it"
    )]
    InvalidInjectValue { value: String },

    #[error(
        "annotation hsmsecrets.io/secrets is missing or empty; list the HSMSecrets to mount, \
         e.g. hsmsecrets.io/secrets: \"db-credentials,api-key\""
    )]
    MissingSecrets,

    #[error(
        "annotation {annotation} {value:?} has an empty entry; separate names with single \
         commas, without a leading or trailing comma"
    )]
    EmptyEntry {
        annotation: &'static str,
        value: String,
    },

    #[error(
        "annotation hsmsecrets.io/secrets names {name:?}, which is not a valid HSMSecret name: \
         it {reason}"
    )]
    InvalidSecretName { name: String, reason: String },

    #[error("annotation {annotation} lists {name:?} twice; list each name once")]
    DuplicateEntry {
        annotation: &'static str,
        name: String,
    },

    #[error(
        "annotation hsmsecrets.io/secrets lists {count} HSMSecrets; at most {max} fit one volume, \
         split them across fewer, larger HSMSecrets"
    )]
    TooManySecrets { count: usize, max: usize },

    #[error("annotation hsmsecrets.io/mount-path {value:?} {reason}")]
    InvalidMountPath { value: String, reason: String },

    #[error(
        "annotation hsmsecrets.io/mount-path {value:?} is reserved: mounting there would hide \
         {what}; choose a dedicated directory such as /var/run/hsm-secrets"
    )]
    ReservedMountPath { value: String, what: &'static str },

    #[error("annotation hsmsecrets.io/file-mode {value:?} {reason}")]
    InvalidFileMode { value: String, reason: String },

    #[error(
        "annotation hsmsecrets.io/node-affinity is {value:?}; use \"preferred\" (the default), \
         \"required\" or \"none\""
    )]
    InvalidNodeAffinity { value: String },

    #[error("annotation hsmsecrets.io/device {value:?} is not a valid HSMDevice name: it {reason}")]
    InvalidDeviceName { value: String, reason: String },

    #[error(
        "annotation hsmsecrets.io/containers names {name:?}, but the pod has no such container \
         (containers: {available}); fix the name or remove it from the annotation"
    )]
    UnknownContainer { name: String, available: String },

    #[error(
        "annotation hsmsecrets.io/containers selects no container: the pod has none to mount \
         the secrets into"
    )]
    NoContainers,

    #[error(
        "the pod already has a volume named {name:?} (spec.volumes[{index}]); that name is \
         reserved for the volume hsmsecrets.io/inject adds: rename the pod's volume"
    )]
    VolumeNameTaken { name: String, index: usize },

    #[error(
        "container {container:?} already mounts volume {volume:?} at {path} where \
         hsmsecrets.io/mount-path would put the HSM secrets; set hsmsecrets.io/mount-path to a \
         free directory or move that mount"
    )]
    MountPathTaken {
        container: String,
        volume: String,
        path: String,
    },

    #[error(
        "annotation hsmsecrets.io/device names HSMDevice {annotated:?}, but HSMSecret {secret:?} \
         lives in HSMDevice {secret_device:?}; one pod volume reads from one device: fix the \
         annotation or mount only secrets of {annotated:?}"
    )]
    DeviceMismatch {
        annotated: String,
        secret: String,
        secret_device: String,
    },

    #[error(
        "annotation hsmsecrets.io/secrets mixes devices: HSMSecret {first:?} lives in HSMDevice \
         {first_device:?} and {second:?} in {second_device:?}; one pod volume reads from one \
         device: mount secrets of a single device"
    )]
    SecretsOnSeveralDevices {
        first: String,
        first_device: String,
        second: String,
        second_device: String,
    },

    #[error(
        "cannot tell which HSMDevice holds {secrets}: none of these HSMSecrets exists in \
         namespace {namespace:?} yet; create them first, or set annotation \
         hsmsecrets.io/device to the device's name"
    )]
    DeviceUnresolved { secrets: String, namespace: String },

    #[error(
        "HSMSecret {secret:?} names HSMDevice {device:?} in spec.deviceRef, which cannot be \
         injected: the name {reason}; point the HSMSecret at a valid device"
    )]
    UnusableDeviceRef {
        secret: String,
        device: String,
        reason: String,
    },

    #[error(transparent)]
    Layout(#[from] super::LayoutError),

    #[error("the pod spec cannot be read ({detail}); this webhook only injects into valid pods")]
    UnreadablePod { detail: String },
}

impl InjectError {
    /// A bounded, stable name for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            InjectError::InvalidInjectValue { .. } => "invalid_inject_value",
            InjectError::MissingSecrets => "missing_secrets",
            InjectError::EmptyEntry { .. } => "empty_entry",
            InjectError::InvalidSecretName { .. } => "invalid_secret_name",
            InjectError::DuplicateEntry { .. } => "duplicate_entry",
            InjectError::TooManySecrets { .. } => "too_many_secrets",
            InjectError::InvalidMountPath { .. } => "invalid_mount_path",
            InjectError::ReservedMountPath { .. } => "reserved_mount_path",
            InjectError::InvalidFileMode { .. } => "invalid_file_mode",
            InjectError::InvalidNodeAffinity { .. } => "invalid_node_affinity",
            InjectError::InvalidDeviceName { .. } => "invalid_device_name",
            InjectError::UnknownContainer { .. } => "unknown_container",
            InjectError::NoContainers => "no_containers",
            InjectError::VolumeNameTaken { .. } => "volume_name_taken",
            InjectError::MountPathTaken { .. } => "mount_path_taken",
            InjectError::DeviceMismatch { .. } => "device_mismatch",
            InjectError::SecretsOnSeveralDevices { .. } => "secrets_on_several_devices",
            InjectError::DeviceUnresolved { .. } => "device_unresolved",
            InjectError::UnusableDeviceRef { .. } => "unusable_device_ref",
            InjectError::UnreadablePod { .. } => "unreadable_pod",
            InjectError::Layout(_) => "invalid_layout",
        }
    }

    /// The HTTP status of the denial: 400 for a malformed pod or annotation,
    /// 403 for a well-formed request that policy refuses.
    pub fn http_status(&self) -> u16 {
        match self {
            InjectError::DeviceMismatch { .. }
            | InjectError::SecretsOnSeveralDevices { .. }
            | InjectError::DeviceUnresolved { .. }
            | InjectError::UnusableDeviceRef { .. } => 403,
            _ => 400,
        }
    }
}
