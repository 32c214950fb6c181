//! The admission webhooks: bootstrap, router, TLS, their manifests, and property tests of every parser of outside input.
#![allow(clippy::unwrap_used)]

use hsm_secrets_testkit as kit;

mod bootstrap;
mod manifests;
mod properties;
mod router;
mod tls;
