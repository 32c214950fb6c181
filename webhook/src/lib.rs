//! Kubernetes admission webhook server for hsm-secrets.
//!
//! A protocol adapter: HTTPS with hot-reloaded certificates ([`tls`],
//! [`mod@serve`]), the AdmissionReview v1 envelope ([`review`]), routes with body
//! limits and deadlines ([`mod@router`]) and metrics ([`metrics`]). What to admit
//! is decided by an [`AdmissionRules`] implementation supplied by the caller;
//! this crate knows nothing about HSMs.

pub mod bounded;
pub mod error;
pub mod metrics;
pub mod review;
pub mod router;
pub mod rules;
pub mod serve;
pub mod tls;

pub use error::Error;
pub use metrics::Metrics;
pub use router::{WebhookConfig, WebhookState, ops_router, router};
pub use rules::{AdmissionRules, Decision};
pub use serve::{ServeOptions, bind, serve, serve_with};
pub use tls::{TlsReloader, client_config};

// Re-exported so implementors name the exact versions this crate speaks.
pub use json_patch;
pub use kube::core::DynamicObject;
pub use kube::core::admission::{AdmissionRequest, Operation};
