//! The admission webhooks: bootstrap, router, TLS, their manifests, and property tests of every parser of outside input.
#![allow(clippy::unwrap_used)]

#[path = "../kit/mod.rs"]
mod kit;

mod bootstrap;
mod manifests;
mod properties;
mod router;
mod tls;
