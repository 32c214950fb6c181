//! The HSMSecret reconciler: imports Kubernetes Secrets into the HSM and keeps Kubernetes
//! Secret copies equal to the HSM content (DESIGN §4).
//!
//! Layering, as in [`failover`](crate::failover) / [`controller`](crate::controller):
//!
//! - [`plan`] is pure: the HSMSecret, its source Secret, its managed Secret, what the HSM
//!   holds and whether the device takes writes go in; the HSM write, the Secret write,
//!   the status and the Event come out. It carries most of the tests.
//! - [`SecretReconciler`] does the IO: the Kubernetes side through the small [`Cluster`]
//!   trait ([`KubeCluster`] on a cluster, [`FileCluster`] for the no-cluster mode) and the
//!   HSM through the device's agents ([`AgentDirectory`], the agent protocol with mutual
//!   TLS), writing only to the primary under the device epoch.
//! - [`run_kube`] runs it under kube-runtime's `Controller` (HSMSecrets, owned Secrets,
//!   import Secrets mapped back through [`IMPORT_FOR_LABEL`]) while this replica holds
//!   the controller Lease; [`run_files`] polls the file-backed state.
//!
//! # Rules
//!
//! - The HSM path is always `<namespace>/<name>` of the HSMSecret itself, and
//!   `spec.source.secretRef` is always read in the HSMSecret's namespace: a namespace
//!   reaches only its own paths.
//! - Imports write only to the primary, conditionally on the version read
//!   (`Expect::Version`/`Absent`) and under the device epoch; the checksum is verified by
//!   reading the record back. No write is attempted while the device has no writable
//!   primary: the status says why.
//! - `status.importedSourceVersion` is the source Secret's resourceVersion once its data
//!   is in the HSM (the `kubectl hsm` contract, see [`crate::kubectl`]).
//! - A Kubernetes Secret is written only when it differs from the HSM content, and only
//!   one this HSMSecret controls (ownerReference with `controller: true`): a foreign
//!   Secret of the same name is reported, never adopted.
//! - The status digest is an HMAC-SHA256 under a key kept in a Secret of the controller
//!   namespace ([`DigestKey`]); no secret byte reaches logs, Events, status or metrics.

mod cluster;
mod digest;
mod error;
mod files;
mod kube_cluster;
mod metrics;
pub mod plan;
mod reconcile;

pub use cluster::{AgentDirectory, Cluster};
pub use digest::{DIGEST_KEY_FIELD, DIGEST_KEY_SECRET, DigestKey};
pub use error::{Cause, SyncError, SyncErrorKind};
pub use files::{FileCluster, run_files};
pub use kube_cluster::{
    CONCURRENCY, KubeCluster, load_or_create_digest_key, run_kube, strip_for_cache,
};
pub use metrics::SecretSyncMetrics;
pub use reconcile::{ReconcileOutcome, SecretReconciler};

pub use crate::contract::{DEVICE_LABEL, IMPORT_FOR_LABEL, REMOVE_KEYS_ANNOTATION, VERSION_LABEL};
