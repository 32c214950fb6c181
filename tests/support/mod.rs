//! Shared fixtures for the integration tests: SoftHSM2 tokens in a private directory.
#![allow(dead_code)]

pub mod api_rules;
pub mod fake_api;
pub mod fixtures;
pub mod mock_api;
pub mod s3;
pub mod sim_agents;
pub mod softhsm;
