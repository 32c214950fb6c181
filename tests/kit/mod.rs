//! Shared fixtures for the integration tests: SoftHSM2 tokens in a private directory.
#![allow(dead_code, clippy::unwrap_used)]

pub mod admission;
pub mod api_rules;
pub mod fake_api;
pub mod fixtures;
pub mod local;
pub mod mirror;
pub mod mock_api;
pub mod node;
pub mod s3;
pub mod secret;
pub mod sim_agents;
pub mod softhsm;
