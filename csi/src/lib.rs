//! CSI v1 node plugin adapter for hsm-secrets.
//!
//! This crate speaks the Container Storage Interface to kubelet and knows nothing about
//! HSMs. The domain (the root package) implements [`VolumeSource`]; this crate validates
//! the requests, mounts a fresh tmpfs per volume, writes the files atomically and keeps
//! them rotated on kubelet's periodic republish.
//!
//! ```text
//! kubelet ──gRPC/unix──► IdentityService ──ready()────► VolumeSource (root)
//!                     └► NodeService ─────payload()──► VolumeSource (root)
//!                            │
//!                            ├─ mount: tmpfs nodev,noexec,nosuid, size-limited
//!                            └─ payload_writer: ..<generation>/ + ..data symlink swap
//! ```
//!
//! # Contract with the [`VolumeSource`]
//!
//! - [`VolumeSource::payload`] receives a validated [`PublishRequest`]: volume id, target
//!   path, the volume context (the pod's CSI volume attributes plus kubelet's pod info,
//!   see [`PublishRequest::pod_namespace`] and friends), the pod's fsGroup (from CSI
//!   `volume_mount_group`) and whether this is a republish. It returns a [`Payload`]:
//!   files with relative paths `<secret>/<key>` (or a bare `<key>`), contents and mode.
//!   File modes come from the source (for example from a `fileMode` volume attribute);
//!   files are owned `root:<fsGroup>` (or `root:root` without one), so a mode like
//!   `0440` is readable by the pod through its fsGroup.
//! - A first publish that fails (source error, invalid file name, mount error) leaves no
//!   mount and no directory behind, and returns the error's gRPC code.
//! - A republish (the target is already our mount) that fails keeps the last good content
//!   and returns success; the failure reaches [`NodeObserver::republish_kept_last_good`].
//! - [`VolumeSource::ready`] answers Identity.Probe.
//!
//! # Without the privilege to mount
//!
//! [`MountMode::PlainDirectory`] (never the default) writes the same layout straight
//! into the target directory, marked as ours by a file (see [`plain_directory`]):
//! secrets reach the disk, so it is for development only, and the plugin says so loudly
//! at start. Files get the pod's fsGroup only when the process may give it.
//!
//! Errors map to gRPC codes in one place (`impl From<Error> for tonic::Status`);
//! metric labels come from [`Error::kind`], never from error text.
//!
//! # Serving
//!
//! [`serve()`] binds the Unix socket (removing a stale one, mode 0600) and runs both
//! services until the shutdown future completes; [`connect_unix()`] opens a client
//! channel to such a socket.

pub mod error;
pub mod identity;
pub mod mount;
pub mod mountinfo;
pub mod node;
pub mod observer;
pub mod payload_writer;
pub mod pinned;
pub mod plain_directory;
mod request;
pub mod serve;
pub mod source;

/// CSI v1 messages, clients and servers (protobuf package `csi.v1`), generated from
/// `proto/csi.proto` by `tests/codegen.rs`.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    clippy::unwrap_used,
    missing_docs,
    rustdoc::all
)]
pub mod proto {
    include!("generated/csi.v1.rs");
}

pub use error::Error;
pub use identity::IdentityService;
pub use mountinfo::{discover_mounts, is_mount_point};
pub use node::{MountMode, NodeConfig, NodeService};
pub use observer::{NodeObserver, NoopObserver, Operation, OperationKind};
pub use serve::{bind_unix, connect_unix, serve, serve_on, socket_path};
pub use source::{Payload, PayloadFile, PublishRequest, SourceError, VolumeSource};

/// The CSI driver name from the design (`CSIDriver` object, pod volumes, tmpfs source).
pub const DEFAULT_DRIVER_NAME: &str = "csi.hsmsecrets.io";
/// Topology key reported by NodeGetInfo; kubelet copies it onto the Node as a label.
pub const DEFAULT_TOPOLOGY_KEY: &str = "topology.hsmsecrets.io/node";
/// kubelet's default root directory.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";
