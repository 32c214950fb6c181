//! The agent's RPC layer: the gRPC service over an [`Agent`](super::Agent), the client
//! and the pool of connections other components reach agents with, the conversion
//! between wire messages and the domain's types, mutual TLS and caller identities,
//! endpoint discovery and the remote store the node plugin reads through.
//!
//! Generated protobuf code lives in [`pb`] (from `proto/agent.proto`, regenerated and
//! checked fresh by `tests/install/codegen.rs`).

pub mod client;
pub mod convert;
pub mod endpoints;
pub mod identity;
mod pool;
pub mod remote;
mod serve;
mod service;
pub mod tls;

/// Agent protocol messages, client and server (protobuf package `hsmsecrets.agent.v1`).
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    clippy::unwrap_used,
    missing_docs,
    rustdoc::all
)]
pub mod pb {
    include!("generated/hsmsecrets.agent.v1.rs");
}

pub use client::{AgentConnection, MAX_MESSAGE_BYTES};
pub use convert::{expect_to_pb, role_from_pb, role_to_pb};
pub use endpoints::{EndpointResolver, NodeAddressEndpoints, StaticEndpoints};
pub use identity::Identity;
pub use pool::AgentPool;
pub use remote::RemoteStore;
pub use serve::{bind, serve};
pub use service::{AgentService, assignment_from_pb};
pub use tls::{
    AgentTls, CONTROLLER_CERT_NAME, CertificateAuthority, GeneratedPki, IssuedCertificate,
    TlsError, TlsFiles, generate_pki, write_pem,
};
