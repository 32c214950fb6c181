//! The test kit: what the integration tests (`tests/<component>/`) and the benchmarks
//! share. SoftHSM2 tokens in a private directory, the scripted and in-memory API servers
//! and their rules, agents, node plugins and whole local systems as processes, an S3
//! server, and one builder for the custom resources.
#![allow(dead_code, clippy::unwrap_used)]

pub mod admission;
pub mod api_rules;
pub mod bench;
pub mod fake_api;
pub mod local;
pub mod mirror;
pub mod mock_api;
pub mod node;
pub mod resources;
pub mod s3;
pub mod secret;
pub mod sim_agents;
pub mod softhsm;

use std::path::{Path, PathBuf};

/// The repository's root (where `tests/fixtures` and `manifests` are).
pub fn repo_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The `hsm-secrets` binary that cargo built beside the running test or benchmark
/// (`target/<profile>/hsm-secrets`, one level above `deps/`), or `HSM_SECRETS_BIN`.
pub fn binary() -> PathBuf {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("HSM_SECRETS_BIN") {
                return PathBuf::from(path);
            }
            let exe = std::env::current_exe().expect("the running test's own path");
            let mut dir = exe.parent().expect("a directory").to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            let binary = dir.join("hsm-secrets");
            assert!(
                binary.is_file(),
                "{} is missing: build it (cargo build --bins) or set HSM_SECRETS_BIN",
                binary.display()
            );
            binary
        })
        .clone()
}
