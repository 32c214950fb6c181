//! The controller: failover rounds, discovery, its process and restarts, operations, and its state (file and Kubernetes API).
#![allow(clippy::unwrap_used)]

use hsm_secrets_testkit as kit;

mod cli;
mod discovery;
mod failover;
mod failover_api;
mod ops;
mod process;
mod restart;
mod rounds;
mod state_file;
mod state_kube;
