//! Whole local systems of processes: the demo, `local` with partitions on real links, two sites and the archive.
#![allow(clippy::unwrap_used)]

#[path = "../kit/mod.rs"]
mod kit;

mod archive;
mod demo;
mod local;
