//! The HSMSecret reconciler: scenarios, files, redaction, the controller loop.
#![allow(clippy::unwrap_used)]

#[path = "../kit/mod.rs"]
mod kit;

mod controller;
mod files;
mod redaction;
mod scenarios;
