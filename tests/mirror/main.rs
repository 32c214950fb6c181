//! The agent and mirroring: the secret store on SoftHSM, sync, fencing, identity, TLS, endpoints, agent processes.
#![allow(clippy::unwrap_used)]

use hsm_secrets_testkit as kit;

mod agent_restart;
mod endpoints;
mod fencing;
mod identity;
mod process;
mod store;
mod sync;
mod tls;
