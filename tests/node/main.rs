//! The CSI node plugin: publishing, its agent, catalog, CLI, Events, redaction.
#![allow(clippy::unwrap_used)]

use hsm_secrets_testkit as kit;

mod agent;
mod catalog;
mod cli;
mod events;
mod publish;
mod redaction;
