//! What an operator installs: manifests, examples, CRDs, the Dockerfile, generated code kept fresh.
#![allow(clippy::unwrap_used)]

#[path = "../kit/mod.rs"]
mod kit;

mod codegen;
mod crd;
mod dockerfile;
mod examples;
mod manifests;
mod node_manifests;
