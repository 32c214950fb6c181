//! Real SoftHSM2 tokens for tests, in a per-process temporary token directory.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, when the module is initialised, so the first use
//! in a process points it at a private configuration. Under CI a missing SoftHSM is a
//! failure, never a silent skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use hsm_secrets::hsm::{Pkcs11Config, Pkcs11Store};

pub const USER_PIN: &str = "1234";
pub const SO_PIN: &str = "5678";

/// Where Debian puts the module.
pub fn library() -> Option<PathBuf> {
    [
        "/usr/lib/softhsm/libsofthsm2.so",
        "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

struct Env {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .expect("write softhsm conf");
        set_conf_env(&conf);
        Env { dir, conf }
    })
}

#[allow(unsafe_code)]
fn set_conf_env(conf: &Path) {
    // SAFETY: runs once per test process, before the PKCS#11 module is loaded; the test
    // harness threads only read this variable through SoftHSM after this point.
    unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
}

/// The SoftHSM configuration file of this process (for child processes).
pub fn conf_path() -> PathBuf {
    env().conf.clone()
}

/// The token directory of this process.
pub fn token_dir() -> PathBuf {
    env().dir.path().join("tokens")
}

/// Returns the module path, or None to skip when SoftHSM is absent outside CI.
pub fn available() -> Option<PathBuf> {
    let lib = library();
    let util = Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .is_ok();
    match (lib, util) {
        (Some(lib), true) => Some(lib),
        _ if std::env::var_os("CI").is_some() => {
            panic!("SoftHSM2 is required under CI: apt-get install -y softhsm2")
        }
        _ => {
            eprintln!("skipping: SoftHSM2 not installed (apt-get install -y softhsm2)");
            None
        }
    }
}

/// A freshly initialised token with a user PIN file.
pub struct TestToken {
    pub label: String,
    pub library: PathBuf,
    pub pin_file: PathBuf,
}

impl TestToken {
    /// Creates a token; None when SoftHSM is absent outside CI.
    pub fn new(label: &str) -> Option<Self> {
        let library = available()?;
        let e = env();
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &e.conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", USER_PIN, "--so-pin", SO_PIN])
            .output()
            .expect("run softhsm2-util");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pin_file = e.dir.path().join(format!("{label}.pin"));
        std::fs::write(&pin_file, format!("{USER_PIN}\n")).expect("pin file");
        Some(Self {
            label: label.into(),
            library,
            pin_file,
        })
    }

    pub fn config(&self) -> Pkcs11Config {
        Pkcs11Config::new(&self.library, &self.label, &self.pin_file)
    }

    pub async fn open(&self) -> Pkcs11Store {
        Pkcs11Store::open(self.config()).await.expect("open token")
    }

    /// The token's directory inside the token dir (SoftHSM names it by serial/uuid).
    pub fn directory(&self) -> PathBuf {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", conf_path())
            .arg("--show-slots")
            .output()
            .expect("show slots");
        let text = String::from_utf8_lossy(&out.stdout);
        // Each token block lists its serial number before its label.
        let mut serial = None;
        let mut last_serial = None;
        for line in text.lines().map(str::trim) {
            if let Some(s) = line.strip_prefix("Serial number:") {
                last_serial = Some(s.trim().to_string());
            }
            if line.strip_prefix("Label:").map(str::trim) == Some(self.label.as_str()) {
                serial = last_serial.clone();
            }
        }
        let serial = serial.expect("token serial");
        for entry in std::fs::read_dir(token_dir()).expect("token dir") {
            let path = entry.expect("entry").path();
            let token_object = path.join("token.object");
            if let Ok(bytes) = std::fs::read(&token_object)
                && bytes.windows(serial.len()).any(|w| w == serial.as_bytes())
            {
                return path;
            }
        }
        panic!("no directory found for token {}", self.label)
    }
}
