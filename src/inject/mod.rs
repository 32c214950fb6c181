//! Pod injection (DESIGN §5): the `hsmsecrets.io/*` annotation vocabulary and
//! the JSON patch that gives an annotated pod its HSM secrets volume.
//!
//! Everything here is pure: annotations and the pod spec in, a parsed request
//! or an RFC 6902 patch out. Looking up HSMSecrets and devices is the caller's
//! business ([`crate::admission`]), which hands the results to
//! [`resolve_device`].

mod annotations;
mod device;
mod error;
mod file_mode;
mod layout;
mod mount_path;
mod names;
mod patch;
mod pod_view;

pub use annotations::{InjectRequest, InjectionSpec, NodeAffinityMode, parse_annotations};
pub use device::{DeviceResolution, SecretReference, resolve_device};
pub use error::InjectError;
pub use file_mode::FileMode;
pub use layout::{
    Format, LayoutError, LayoutOption, SecretLayout, Spelling, VolumeLayout, check_variable_name,
    is_layout_annotation,
};
pub use mount_path::MountPath;
pub use names::{
    MAX_DEVICE_NAME_LEN, device_ready_label, validate_device_name, validate_object_name,
};
pub use patch::{injected_volume, injection_patch};
pub use pod_view::{
    AffinityView, ContainerView, CsiView, MountView, NodeAffinityView, NodeSelectorTermView,
    NodeSelectorView, PodView, VolumeView,
};

/// Name of the CSI driver that serves HSM secrets.
pub const CSI_DRIVER: &str = "csi.hsmsecrets.io";
/// Name of the volume the webhook adds; reserved in annotated pods.
pub const VOLUME_NAME: &str = "hsm-secrets";

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

/// CSI volume attribute: comma-separated HSMSecret names.
pub const ATTRIBUTE_SECRETS: &str = "secrets";
/// CSI volume attribute: the HSMDevice name.
pub const ATTRIBUTE_DEVICE: &str = "device";
/// CSI volume attribute: octal file mode, e.g. `0440`.
pub const ATTRIBUTE_FILE_MODE: &str = "fileMode";
