//! Whole local systems of processes: the demo, `local` with partitions on real links, two sites and the archive.
#![allow(clippy::unwrap_used)]

use hsm_secrets_testkit as kit;

mod archive;
mod demo;
mod local;
