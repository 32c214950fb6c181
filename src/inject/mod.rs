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
pub use names::{MAX_DEVICE_NAME_LEN, validate_device_name, validate_object_name};
pub use patch::{injected_volume, injection_patch};
pub use pod_view::{
    AffinityView, ContainerView, CsiView, MountView, NodeAffinityView, NodeSelectorTermView,
    NodeSelectorView, PodView, VolumeView,
};

pub use crate::contract::{
    ANNOTATION_CONTAINERS, ANNOTATION_DEVICE, ANNOTATION_FILE_MODE, ANNOTATION_INJECT,
    ANNOTATION_MOUNT_PATH, ANNOTATION_NODE_AFFINITY, ANNOTATION_SECRETS, ANNOTATION_STATUS,
    ATTRIBUTE_DEVICE, ATTRIBUTE_FILE_MODE, ATTRIBUTE_SECRETS, CSI_DRIVER, KNOWN_ANNOTATIONS,
    STATUS_INJECTED, VOLUME_NAME,
};
