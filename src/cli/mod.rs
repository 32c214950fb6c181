//! Subcommands of the `hsm-secrets` binary, one module each.

pub mod agent;
pub mod controller;
pub mod demo;
pub mod local;
pub mod node;
pub mod pki;
pub mod webhook;
