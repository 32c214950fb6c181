//! The HSMSecret reconciler: scenarios, files, redaction, the controller loop.
#![allow(clippy::unwrap_used)]

use hsm_secrets_testkit as kit;

mod controller;
mod files;
mod redaction;
mod scenarios;
