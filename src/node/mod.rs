//! The node plugin's domain side: what a pod's `csi.hsmsecrets.io` volume contains.
//!
//! The `csi` crate speaks CSI to kubelet and asks a [`VolumeSource`] for the files of each
//! volume; [`HsmVolumeSource`] answers from the node's local HSM:
//!
//! ```text
//! PublishRequest ─► attributes::VolumeRequest::parse   (InvalidArgument)
//!                ─► SecretCatalog::hsm_secret           (NotFound / Unavailable)
//!                ─► access::authorize                   (PermissionDenied)
//!                ─► LocalDevice::store ─► SecretStore::get  (Unavailable / NotFound)
//!                   or, without a local token (or one not open / not answering),
//!                   RemoteReads ─► the device's agents (primary, then a mirror)
//!                ─► Payload: <secret>/<key>, fileMode, the pod's fsGroup
//! ```
//!
//! - A pod can only name HSMSecrets of its own namespace; the HSM path is always
//!   `<pod namespace>/<secret name>`.
//! - HSMSecrets come from a [`SecretCatalog`]: [`KubeCatalog`] (a reflector cache, no API
//!   call per publish) or [`StaticCatalog`] (a YAML file, for tests and clusterless runs).
//! - The node's device is a [`LocalDevice`]: the token on this node (primary or mirror,
//!   reads do not care), opened in the background so a missing HSM never crash-loops the
//!   plugin.
//! - [`NodeMetrics`] implements the csi crate's observer with Prometheus counters;
//!   [`ops::router`] serves them with `/healthz` and `/readyz`; [`NodeReporter`] adds the
//!   pod Event of a republish that kept the last good content ([`events`]).
//!
//! [`VolumeSource`]: hsm_secrets_csi::VolumeSource

pub mod access;
pub mod attributes;
pub mod audit;
pub mod catalog;
pub mod device;
mod error;
pub mod events;
pub mod kube_catalog;
pub mod metrics;
pub mod ops;
pub mod remote;
pub mod render;
mod source;

pub use attributes::{VolumeAttributes, VolumeRequest};
pub use audit::{AuditLog, Mounts};
pub use catalog::{CatalogError, SecretCatalog, StateCatalog, StaticCatalog};
pub use device::LocalDevice;
pub use error::VolumeError;
pub use events::{KubePodEvents, NodeReporter, SyncFailureEvents, record_node_event};
pub use kube_catalog::KubeCatalog;
pub use metrics::NodeMetrics;
pub use remote::RemoteReads;
pub use source::HsmVolumeSource;
