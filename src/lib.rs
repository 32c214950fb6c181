//! hsm-secrets: Kubernetes workloads use secrets kept in PKCS#11 hardware security
//! modules, delivered as tmpfs volumes, mirrored across nodes and failed over with fencing.

pub mod admission;
pub mod archive;
pub mod cli;
pub mod contract;
pub mod controller;
pub mod crd;
pub mod failover;
pub mod hsm;
pub mod inject;
pub mod kube_events;
pub mod kubectl;
pub mod lease;
pub mod local;
pub mod mirror;
pub mod node;
pub mod private_ca;
pub mod secret_sync;
pub mod state;
pub mod telemetry;
