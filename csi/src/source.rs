//! The boundary to the domain: what a volume should contain.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// Supplies the files of a volume. Implemented by the root package (HSM reads).
#[async_trait::async_trait]
pub trait VolumeSource: Send + Sync + 'static {
    /// Resolve a validated publish request into the files to write.
    /// Called for the first publish and for every republish.
    async fn payload(&self, request: &PublishRequest) -> Result<Payload, SourceError>;

    /// Readiness of the secret source, reported by Identity.Probe.
    async fn ready(&self) -> Result<(), SourceError>;
}

/// kubelet's pod-info keys in the volume context (`CSIDriver.podInfoOnMount: true`).
pub mod pod_info {
    pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
    pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
    pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
    pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
    pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
    /// Present only when `CSIDriver.tokenRequests` is set: bearer tokens, never log it.
    pub const SERVICE_ACCOUNT_TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
}

/// A NodePublishVolume request after validation.
#[derive(Clone, PartialEq, Eq)]
pub struct PublishRequest {
    pub volume_id: String,
    /// `<kubelet_dir>/pods/<pod-uid>/volumes/kubernetes.io~csi/<volume>/mount`.
    pub target_path: PathBuf,
    /// The pod's CSI volume attributes plus kubelet's pod info ([`pod_info`]).
    pub volume_context: BTreeMap<String, String>,
    /// Always true: publishing is refused otherwise. Kept so the source can assert it.
    pub read_only: bool,
    /// The pod's fsGroup, delivered by kubelet as CSI `volume_mount_group`.
    pub fs_group: Option<u32>,
    /// True when the target is already mounted (kubelet's periodic republish or a retry).
    pub republish: bool,
}

impl PublishRequest {
    pub fn pod_namespace(&self) -> Option<&str> {
        self.context(pod_info::POD_NAMESPACE)
    }

    pub fn pod_name(&self) -> Option<&str> {
        self.context(pod_info::POD_NAME)
    }

    pub fn pod_uid(&self) -> Option<&str> {
        self.context(pod_info::POD_UID)
    }

    pub fn service_account(&self) -> Option<&str> {
        self.context(pod_info::SERVICE_ACCOUNT)
    }

    fn context(&self, key: &str) -> Option<&str> {
        self.volume_context
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

// Context values are printed by key only: kubelet may put service account tokens there.
impl fmt::Debug for PublishRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublishRequest")
            .field("volume_id", &self.volume_id)
            .field("target_path", &self.target_path)
            .field("volume_context_keys", &self.volume_context.keys())
            .field("read_only", &self.read_only)
            .field("fs_group", &self.fs_group)
            .field("republish", &self.republish)
            .finish()
    }
}

/// The complete content of a volume. Replaces the previous content as a whole.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct Payload {
    pub files: Vec<PayloadFile>,
}

impl Payload {
    pub fn new(files: Vec<PayloadFile>) -> Self {
        Self { files }
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.contents.len() as u64).sum()
    }
}

/// One file of a volume.
#[derive(Clone, PartialEq, Eq)]
pub struct PayloadFile {
    /// `<secret>/<key>` or `<key>`: relative, at most two components, none starting with
    /// `..`, no NUL, each at most 253 bytes.
    pub path: String,
    pub contents: Vec<u8>,
    /// Permission bits (at most `0o777`).
    pub mode: u32,
}

impl PayloadFile {
    pub fn new(path: impl Into<String>, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            path: path.into(),
            contents: contents.into(),
            mode,
        }
    }
}

impl fmt::Debug for PayloadFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayloadFile")
            .field("path", &self.path)
            .field("len", &self.contents.len())
            .field("mode", &format_args!("{:#o}", self.mode))
            .finish()
    }
}

// Best effort without a zeroize dependency: black_box keeps the fill from being elided.
impl Drop for PayloadFile {
    fn drop(&mut self) {
        self.contents.fill(0);
        std::hint::black_box(&self.contents);
    }
}

/// Why a source could not produce a payload. The message reaches kubelet and pod events:
/// it must never contain secret bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl SourceError {
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Self::NotFound(_) => tonic::Code::NotFound,
            Self::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::Internal(_) => tonic::Code::Internal,
        }
    }
}
