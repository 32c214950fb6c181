//! SoftHSM2 tokens standing for the HSMs of the simulated nodes: one private token
//! directory and configuration per node, so every node's token carries the same label,
//! as the same device's tokens do on a real cluster.

use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::LocalError;

/// Where Debian and Ubuntu install the SoftHSM2 module.
pub const MODULE_CANDIDATES: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
];

/// The module to use: `explicit` if given (it must exist), else the first usual path.
pub fn find_module(explicit: Option<&Path>) -> Result<PathBuf, LocalError> {
    if let Some(path) = explicit {
        if path.exists() {
            return Ok(path.to_path_buf());
        }
        return Err(LocalError::SoftHsm {
            detail: format!(
                "--softhsm-module {} does not exist; install softhsm2 or point at libsofthsm2.so",
                path.display()
            ),
        });
    }
    MODULE_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| LocalError::SoftHsm {
            detail: format!(
                "no PKCS#11 module found at {}; install it (apt-get install -y softhsm2) or pass \
                 --softhsm-module PATH",
                MODULE_CANDIDATES.join(", ")
            ),
        })
}

/// One node's token: its SoftHSM configuration and the user PIN file.
#[derive(Clone, Debug)]
pub struct NodeToken {
    pub label: String,
    /// The `SOFTHSM2_CONF` of every process of this node.
    pub conf: PathBuf,
    pub pin_file: PathBuf,
}

/// Writes a SoftHSM configuration whose tokens live in `dir/tokens`; its path.
pub fn write_softhsm_conf(dir: &Path) -> Result<PathBuf, LocalError> {
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| LocalError::io("create", &tokens, e))?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
            tokens.display()
        ),
    )
    .map_err(|e| LocalError::io("write", &conf, e))?;
    Ok(conf)
}

/// Creates a token labelled `label` in `dir` (its own token directory and
/// configuration), with a random user PIN written to a 0600 file. The PINs never
/// appear in output.
pub fn init_token(dir: &Path, label: &str) -> Result<NodeToken, LocalError> {
    let conf = write_softhsm_conf(dir)?;
    let pin = random_hex(8)?;
    let so_pin = random_hex(8)?;
    let pin_file = dir.join("user.pin");
    write_private(&pin_file, format!("{pin}\n").as_bytes())?;
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", label])
        .args(["--pin", &pin, "--so-pin", &so_pin])
        .output()
        .map_err(|e| LocalError::SoftHsm {
            detail: format!(
                "cannot run softhsm2-util ({e}); install it: apt-get install -y softhsm2"
            ),
        })?;
    if !out.status.success() {
        return Err(LocalError::SoftHsm {
            detail: format!(
                "softhsm2-util --init-token failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(NodeToken {
        label: label.into(),
        conf,
        pin_file,
    })
}

pub(crate) fn random_hex(bytes: usize) -> Result<String, LocalError> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| LocalError::io("read", "/dev/urandom", e))?;
    Ok(hex::encode(buf))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), LocalError> {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| LocalError::io("write", path, e))
}
