//! What the SoftHSM benchmarks share: a private token directory (SoftHSM reads its
//! configuration once per process, so the measurement runs in a re-executed child
//! pointed at it), the module's path and token initialisation.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub const PIN: &str = "1234";

/// In the parent: creates a private SoftHSM configuration, runs this benchmark again as a
/// child pointed at it and exits with the child's status. In the child: returns the
/// private directory.
pub fn private_softhsm_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HSM_BENCH_CHILD") {
        return PathBuf::from(dir);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let tokens = dir.path().join("tokens");
    std::fs::create_dir_all(&tokens).expect("token dir");
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("conf");
    let status = Command::new(std::env::current_exe().expect("exe"))
        .args(std::env::args().skip(1))
        .env("SOFTHSM2_CONF", &conf)
        .env("HSM_BENCH_CHILD", dir.path())
        .status()
        .expect("run bench child");
    std::process::exit(status.code().unwrap_or(1));
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Where Debian puts the SoftHSM module.
pub fn library() -> PathBuf {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("SoftHSM2 not installed: apt-get install -y softhsm2")
}

pub fn init_token(label: &str) {
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", label])
        .args(["--pin", PIN, "--so-pin", "5678"])
        .output()
        .expect("softhsm2-util");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
