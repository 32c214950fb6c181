//! Subcommands of the `hsm-secrets` binary, one module each.
pub mod agent;
