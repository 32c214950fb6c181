//! What the SoftHSM benchmarks share. SoftHSM reads its configuration once per process,
//! so a benchmark re-executes itself as a child pointed at a private token directory:
//! everything it measures (the store, raw cryptoki floors, the node processes it starts)
//! sees only the tokens it made.

use std::path::PathBuf;
use std::process::Command;

use crate::softhsm::{SO_PIN, USER_PIN, write_conf};

/// In the parent: creates a private SoftHSM configuration, runs this benchmark again as a
/// child pointed at it and exits with the child's status. In the child: returns the
/// private directory.
pub fn private_softhsm_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HSM_BENCH_CHILD") {
        return PathBuf::from(dir);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = write_conf(dir.path());
    let status = Command::new(std::env::current_exe().expect("exe"))
        .args(std::env::args().skip(1))
        .env("SOFTHSM2_CONF", &conf)
        .env("HSM_BENCH_CHILD", dir.path())
        .status()
        .expect("run bench child");
    std::process::exit(status.code().unwrap_or(1));
}

/// A size the environment may override (`BENCH_SECRETS=1000 cargo bench …`).
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The SoftHSM module; a benchmark cannot run without it.
pub fn library() -> PathBuf {
    crate::softhsm::library().expect("SoftHSM2 not installed: apt-get install -y softhsm2")
}

/// Initialises token `label` (user PIN [`USER_PIN`]) in the private directory.
pub fn init_token(label: &str) {
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", label])
        .args(["--pin", USER_PIN, "--so-pin", SO_PIN])
        .output()
        .expect("softhsm2-util");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
