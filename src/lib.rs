//! hsm-secrets: Kubernetes workloads use secrets kept in PKCS#11 hardware security
//! modules, delivered as tmpfs volumes, mirrored across nodes and failed over with fencing.

pub mod cli;
pub mod crd;
pub mod hsm;
pub mod mirror;
pub mod telemetry;
