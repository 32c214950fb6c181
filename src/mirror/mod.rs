//! Mirroring: the device agent's gRPC protocol and the sync engine (DESIGN §9).
//!
//! Every node that holds a token of an HSMDevice runs an [`Agent`] over its local
//! [`SecretStore`](crate::hsm::SecretStore), served with mutual TLS ([`rpc::tls`]). The
//! controller probes agents (`Health`), assigns roles and epochs (`AssignRole`) and keeps
//! the primary's write lease fresh (`RenewLease`); data moves agent to agent:
//!
//! ```text
//!   controller ──AssignRole/RenewLease/Health──► every agent
//!   mirror ──Changes(since)/Manifest/Fetch──► primary        (pull, every pull interval)
//!   primary ──Replicate(record, epoch)──► mirrors            (Active policy, per write)
//!   CSI on a node without a token ──Get──► primary, else a read-only mirror (RemoteStore)
//! ```
//!
//! # Consistency rules
//!
//! - **One writer.** Writes (`Put`, `Delete`) are accepted only by the primary, only
//!   under the caller's epoch equal to the agent's, and only while the write lease granted
//!   by the controller (from the time of receipt, monotonic clock) has not lapsed
//!   ([`fencing`]). A mirror refuses with the primary's name; a fenced primary with
//!   "fenced: write lease expired at …". Epochs never go backwards.
//! - **Pull replication.** A mirror asks `Changes(since)` with its applied sequence; the
//!   primary answers from its [change index](index) (no token access when nothing
//!   changed), reading only the changed records. Mirrors verify every checksum and apply
//!   in version order, tombstones included ([`sync`]).
//! - **Verification.** A full pass every `syncInterval` (and on start, on a new primary,
//!   after a demotion) compares manifests, re-reads every local secret, repairs what is
//!   corrupt or missing, removes what the primary does not have, and reports lost writes.
//! - **Active policy: semi-synchronous.** The primary pushes each write to every mirror
//!   in its sync set and acknowledges it once all of them applied it (`WriteResponse`
//!   lists them). A mirror that fails or times out is dropped from the set, the write is
//!   still acknowledged, and Health shows the dropped mirror and why; it rejoins the set
//!   by itself once its pulls have caught up under the current epoch. So an acknowledged
//!   write is on every mirror that Health lists as in sync, and a failover to one of those
//!   loses nothing.
//!
//! # For the controller
//!
//! Reach agents through an [`AgentPool`] of [`AgentConnection`]s (the controller's
//! certificate from the agent CA: control RPCs and client writes need its identity,
//! Replicate an agent's, reads any certificate of the CA; see [`rpc::identity`]). Agent
//! endpoints come from an [`EndpointResolver`]: a static list, or Node InternalIPs and the
//! agents' port. The failover planner's actions map to calls as follows:
//!
//! | action | call |
//! | --- | --- |
//! | `RenewLease{node, epoch, outside_write_set}` | `renew_lease_until(epoch, lease, deadline on the agent's clock, outside_write_set)` |
//! | `Promote{node, epoch}` | `assign(Assignment { role: Primary, epoch, mirrors: the Active sync set or empty, lease, .. }, deadline)` |
//! | `Demote{node, epoch, primary}` | `assign(Assignment { role: Standby, epoch, primary, .. }, None)`: syncs (full pass, lost writes reported) but serves no reads |
//! | `SetMirror{node, primary, epoch}` | `assign(Assignment { role: ReadOnly, epoch, primary, .. }, None)` |
//!
//! Promote the new primary first, then point the mirrors at it. `Health` gives what the
//! HSMDevice status needs: token presence and serial, role, epoch, applied sequence,
//! lease remaining, the sync state (last sync, checksum failures, last full pass, lost
//! writes) of mirrors and the Active sync set of the primary. An agent keeps its epoch
//! and role on its token across restarts (never its write lease: a restarted primary
//! waits for a renewal), so a returning old primary knows which history it held.
//!
//! # Layout
//!
//! This folder is the agent's domain: the [`Agent`] itself, its [`fencing`] rules, the
//! [change index](index), the sync engine ([`sync`], with the pure [`plan`]), pushes to
//! mirrors (`replication`), the saved [`facts`] and [`site`] gate. [`rpc`] is its wire:
//! the gRPC service and client, the connection pool, protobuf conversion, mutual TLS,
//! identities, endpoint discovery and the remote store.

mod agent;
mod error;
pub mod facts;
pub mod feed;
pub mod fencing;
pub mod health;
pub mod index;
pub mod journal;
mod local;
pub mod metrics;
pub mod plan;
mod replication;
pub mod rpc;
pub mod site;
pub mod sync;

pub use agent::{
    Agent, AgentConfig, AgentSnapshot, AgentStats, PUSH_WINDOW, Served, WriteOutcome,
    push_in_sequence,
};
pub use error::MirrorError;
pub use feed::{Assigned, Changes, ChangesAsk, FetchAsk, Fetched, Manifest, Push};
pub use fencing::{AgentClock, Assignment, LeaseDeadline, Peer};
pub use health::AgentHealth;
pub use metrics::{AgentMetrics, RpcMetrics};
pub(crate) use rpc::convert::{record_from_pb, record_to_pb};
pub use rpc::{
    AgentConnection, AgentPool, AgentService, AgentTls, CONTROLLER_CERT_NAME, CertificateAuthority,
    EndpointResolver, GeneratedPki, Identity, IssuedCertificate, MAX_MESSAGE_BYTES,
    NodeAddressEndpoints, RemoteStore, StaticEndpoints, TlsError, TlsFiles, bind, generate_pki, pb,
    serve, write_pem,
};
pub use sync::{FullPassReport, LostWrite, PullReport, SyncSettings, SyncState};
