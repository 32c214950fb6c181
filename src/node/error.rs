//! Why a volume could not be filled, and the one mapping to the csi crate's
//! [`SourceError`] (hence to gRPC codes).

use hsm_secrets_csi::SourceError;

use super::CatalogError;
use crate::hsm::StoreError;

/// Errors of the node's volume source. Messages reach kubelet and the pod's Events: they
/// name the object and the fix, and never carry secret bytes or PINs.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Layout(#[from] crate::inject::LayoutError),

    #[error("HSMSecret {secret:?}: key {key:?} {problem}; {fix}")]
    Unrenderable {
        secret: String,
        key: String,
        problem: String,
        fix: &'static str,
    },

    #[error("volume attribute {attribute:?} {problem}; {fix}")]
    InvalidAttribute {
        attribute: &'static str,
        problem: String,
        fix: String,
    },

    #[error(
        "pod {pod_namespace}/{pod} may not mount HSMSecret {namespace}/{name}: a pod can only \
         mount HSMSecrets of its own namespace; create an HSMSecret in {pod_namespace}"
    )]
    OtherNamespace {
        pod_namespace: String,
        pod: String,
        namespace: String,
        name: String,
    },

    #[error(
        "HSMSecret {namespace}/{name} not found; create it (kind: HSMSecret, metadata.name: \
         {name}, metadata.namespace: {namespace}) or fix the name in the pod's \
         hsmsecrets.io/secrets annotation"
    )]
    UnknownSecret { namespace: String, name: String },

    #[error(
        "service account {service_account:?} may not mount HSMSecret {namespace}/{name}: \
         spec.access.serviceAccounts allows only {allowed:?}; add the service account there \
         or run the pod as one of them"
    )]
    ServiceAccountDenied {
        namespace: String,
        name: String,
        service_account: String,
        allowed: Vec<String>,
    },

    #[error(
        "HSMSecret {namespace}/{name} lives in HSMDevice {device_ref:?}, not in the volume's \
         device {volume_device:?}; set the volume attribute \"device\" to {device_ref:?} or \
         mount the secrets of each device in their own volume"
    )]
    DeviceMismatch {
        namespace: String,
        name: String,
        device_ref: String,
        volume_device: String,
    },

    #[error(
        "this node has no HSM for device {device:?}{local} and remote reads are not \
         configured: start the node plugin with --agent-tls-ca/--agent-tls-cert/--agent-tls-key \
         and --agent or --agent-port, or schedule the pod on a node with the device \
         (hsmsecrets.io/node-affinity: required)",
        local = match node_device {
            Some(d) => format!(" (its local device is {d:?})"),
            None => String::new(),
        }
    )]
    NoLocalDevice {
        device: String,
        node_device: Option<String>,
    },

    #[error(
        "device {device:?} cannot be read remotely: {why}; check the HSMDevice status \
         (kubectl get hsmdevice {device} -o wide) and the --agent / --agent-port flags"
    )]
    NoAgents { device: String, why: String },

    #[error(
        "the HSM for device {device:?} on this node is not open yet: {reason}; the plugin \
         keeps retrying in the background"
    )]
    DeviceNotOpen { device: String, reason: String },

    #[error(
        "HSMSecret {path} exists but token {token:?} of device {device:?} holds no secret at \
         {path}; import it (spec.source) or write it (kubectl hsm create), and on a mirror \
         wait for the next sync"
    )]
    NotOnToken {
        path: String,
        token: String,
        device: String,
    },

    #[error("the HSM for device {device:?} on this node does not answer: {source}")]
    DeviceUnhealthy {
        device: String,
        source: Box<StoreError>,
    },

    #[error("HSMSecrets are not available: {0}")]
    Catalog(#[from] CatalogError),

    #[error("reading {path} from device {device:?}: {source}")]
    Store {
        path: String,
        device: String,
        // Boxed: store errors are large and errors travel by value.
        source: Box<StoreError>,
    },
}

impl VolumeError {
    /// Bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidAttribute { .. } => "invalid_attribute",
            Self::Layout(_) => "invalid_layout",
            Self::Unrenderable { .. } => "unrenderable_value",
            Self::OtherNamespace { .. } => "other_namespace",
            Self::UnknownSecret { .. } => "unknown_secret",
            Self::ServiceAccountDenied { .. } => "service_account_denied",
            Self::DeviceMismatch { .. } => "device_mismatch",
            Self::NoLocalDevice { .. } => "no_local_device",
            Self::NoAgents { .. } => "no_agents",
            Self::DeviceNotOpen { .. } => "device_not_open",
            Self::NotOnToken { .. } => "not_on_token",
            Self::DeviceUnhealthy { .. } => "device_unhealthy",
            Self::Catalog(_) => "catalog_unavailable",
            Self::Store { source, .. } => match **source {
                StoreError::DeviceUnavailable { .. } => "store_device_unavailable",
                StoreError::Timeout { .. } => "store_timeout",
                StoreError::Corrupt { .. } => "store_corrupt",
                _ => "store_other",
            },
        }
    }
}

impl From<VolumeError> for SourceError {
    fn from(error: VolumeError) -> Self {
        let message = error.to_string();
        match error {
            VolumeError::InvalidAttribute { .. }
            | VolumeError::Layout(_)
            | VolumeError::Unrenderable { .. } => SourceError::InvalidArgument(message),
            VolumeError::OtherNamespace { .. }
            | VolumeError::ServiceAccountDenied { .. }
            | VolumeError::DeviceMismatch { .. } => SourceError::PermissionDenied(message),
            // A deleted HSMSecret is a definite "no" (a republish then removes its files);
            // a secret the token does not hold yet is not: a mirror catching up, an import
            // in progress. kubelet retries Unavailable.
            VolumeError::UnknownSecret { .. } => SourceError::NotFound(message),
            VolumeError::NotOnToken { .. } => SourceError::Unavailable(message),
            VolumeError::NoLocalDevice { .. }
            | VolumeError::NoAgents { .. }
            | VolumeError::DeviceNotOpen { .. }
            | VolumeError::DeviceUnhealthy { .. }
            | VolumeError::Catalog(_) => SourceError::Unavailable(message),
            VolumeError::Store { source, .. } => match *source {
                // Retrying can help: the token comes back, the HSM catches up, a mirror
                // repairs a corrupt copy on its next verification pass, the PIN file is
                // fixed. kubelet retries Unavailable on its own.
                StoreError::DeviceUnavailable { .. }
                | StoreError::Timeout { .. }
                | StoreError::TokenNotFound { .. }
                | StoreError::Corrupt { .. }
                | StoreError::PinIncorrect { .. }
                | StoreError::PinLocked { .. }
                | StoreError::PinFinalTry { .. }
                | StoreError::PinRefused { .. }
                | StoreError::PinFile { .. }
                | StoreError::Library { .. } => SourceError::Unavailable(message),
                #[cfg(feature = "fault-injection")]
                StoreError::Injected { .. } => SourceError::Unavailable(message),
                // The store's NotFound is mapped to NotOnToken before this; the rest are
                // bugs or module failures, not the caller's doing.
                StoreError::NotFound { .. }
                | StoreError::VersionConflict { .. }
                | StoreError::InvalidName { .. }
                | StoreError::SequenceExhausted { .. }
                | StoreError::Pkcs11 { .. } => SourceError::Internal(message),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tonic::Code;

    fn store(source: StoreError) -> VolumeError {
        VolumeError::Store {
            path: "shop/db".into(),
            device: "prod-hsm".into(),
            source: Box::new(source),
        }
    }

    fn t() -> String {
        "tok".into()
    }

    /// Every variant (and every store error) has a row: code, kind and a message part.
    #[test]
    fn every_error_maps_to_its_code() {
        let rows: Vec<(VolumeError, Code, &str, &str)> = vec![
            (
                VolumeError::InvalidAttribute {
                    attribute: "fileMode",
                    problem: "is \"9\"".into(),
                    fix: "use 0440".into(),
                },
                Code::InvalidArgument,
                "invalid_attribute",
                "fileMode",
            ),
            (
                VolumeError::OtherNamespace {
                    pod_namespace: "shop".into(),
                    pod: "p".into(),
                    namespace: "bank".into(),
                    name: "db".into(),
                },
                Code::PermissionDenied,
                "other_namespace",
                "bank/db",
            ),
            (
                VolumeError::UnknownSecret {
                    namespace: "shop".into(),
                    name: "db".into(),
                },
                Code::NotFound,
                "unknown_secret",
                "create it",
            ),
            (
                VolumeError::ServiceAccountDenied {
                    namespace: "shop".into(),
                    name: "db".into(),
                    service_account: "web".into(),
                    allowed: vec!["checkout".into()],
                },
                Code::PermissionDenied,
                "service_account_denied",
                "\"web\"",
            ),
            (
                VolumeError::DeviceMismatch {
                    namespace: "shop".into(),
                    name: "db".into(),
                    device_ref: "a".into(),
                    volume_device: "b".into(),
                },
                Code::PermissionDenied,
                "device_mismatch",
                "HSMDevice \"a\"",
            ),
            (
                VolumeError::NoAgents {
                    device: "prod-hsm".into(),
                    why: "none resolved".into(),
                },
                Code::Unavailable,
                "no_agents",
                "--agent-port",
            ),
            (
                VolumeError::NoLocalDevice {
                    device: "prod-hsm".into(),
                    node_device: None,
                },
                Code::Unavailable,
                "no_local_device",
                "remote reads are not configured",
            ),
            (
                VolumeError::DeviceNotOpen {
                    device: "prod-hsm".into(),
                    reason: "no token".into(),
                },
                Code::Unavailable,
                "device_not_open",
                "retrying",
            ),
            (
                VolumeError::NotOnToken {
                    path: "shop/db".into(),
                    token: t(),
                    device: "prod-hsm".into(),
                },
                Code::Unavailable,
                "not_on_token",
                "holds no secret",
            ),
            (
                VolumeError::DeviceUnhealthy {
                    device: "prod-hsm".into(),
                    source: Box::new(StoreError::DeviceUnavailable {
                        token: t(),
                        detail: "removed".into(),
                    }),
                },
                Code::Unavailable,
                "device_unhealthy",
                "does not answer",
            ),
            (
                VolumeError::Catalog(CatalogError::NotSynced {
                    reason: "first list pending".into(),
                }),
                Code::Unavailable,
                "catalog_unavailable",
                "first list pending",
            ),
            (
                store(StoreError::DeviceUnavailable {
                    token: t(),
                    detail: "gone".into(),
                }),
                Code::Unavailable,
                "store_device_unavailable",
                "plugged in",
            ),
            (
                store(StoreError::Timeout {
                    token: t(),
                    operation: "get",
                    timeout: Duration::from_secs(10),
                }),
                Code::Unavailable,
                "store_timeout",
                "did not finish",
            ),
            (
                store(StoreError::Corrupt {
                    path: "shop/db".into(),
                    detail: "checksum".into(),
                }),
                Code::Unavailable,
                "store_corrupt",
                "corrupt",
            ),
            (
                store(StoreError::TokenNotFound {
                    label: "x".into(),
                    library: "l".into(),
                    present: "".into(),
                }),
                Code::Unavailable,
                "store_other",
                "no token",
            ),
            (
                store(StoreError::PinIncorrect { token: t() }),
                Code::Unavailable,
                "store_other",
                "PIN",
            ),
            (
                store(StoreError::PinLocked { token: t() }),
                Code::Unavailable,
                "store_other",
                "locked",
            ),
            (
                store(StoreError::PinFile {
                    path: "/pin".into(),
                    detail: "missing".into(),
                }),
                Code::Unavailable,
                "store_other",
                "/pin",
            ),
            (
                store(StoreError::Library {
                    library: "/lib.so".into(),
                    detail: "dlopen".into(),
                }),
                Code::Unavailable,
                "store_other",
                "/lib.so",
            ),
            (
                store(StoreError::Injected { operation: "get" }),
                Code::Unavailable,
                "store_other",
                "injected",
            ),
            (
                store(StoreError::NotFound {
                    token: t(),
                    path: "shop/db".into(),
                }),
                Code::Internal,
                "store_other",
                "shop/db",
            ),
            (
                store(StoreError::VersionConflict {
                    token: t(),
                    path: "shop/db".into(),
                    expected: "1".into(),
                    actual: "2".into(),
                }),
                Code::Internal,
                "store_other",
                "version",
            ),
            (
                store(StoreError::InvalidName {
                    what: "key",
                    name: "a/b".into(),
                    why: "slash".into(),
                }),
                Code::Internal,
                "store_other",
                "key",
            ),
            (
                store(StoreError::Pkcs11 {
                    token: t(),
                    function: "C_FindObjects".into(),
                    rv: "CKR_GENERAL_ERROR".into(),
                }),
                Code::Internal,
                "store_other",
                "C_FindObjects",
            ),
        ];
        for (error, code, kind, part) in rows {
            assert_eq!(error.kind(), kind, "{error}");
            let source = SourceError::from(error);
            assert_eq!(source.code(), code, "{source}");
            assert!(source.to_string().contains(part), "{source} lacks {part:?}");
        }
    }
}
