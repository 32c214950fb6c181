//! What an operator installs: manifests, examples, CRDs, the Dockerfile, generated code kept fresh.
#![allow(clippy::unwrap_used)]

use hsm_secrets_testkit as kit;

mod codegen;
mod crd;
mod dockerfile;
mod examples;
mod manifests;
mod node_manifests;
