//! Real SoftHSM2 tokens for tests, in a per-process temporary token directory.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, when the module is initialised, and lists the
//! tokens of its directory only then: a token another process (`softhsm2-util`) creates
//! later stays invisible to this one. Tests of one binary may share a process (`cargo
//! test` runs them as threads) or not (nextest), so every token is created here, through
//! this process's own module, and gets a label no other token of the process has: each
//! test sees its own tokens, whatever the runner. Child processes started afterwards read
//! the same directory and see them too. Under CI a missing SoftHSM is a failure, never a
//! silent skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
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
        let conf = write_conf(dir.path());
        set_conf_env(&conf);
        Env { dir, conf }
    })
}

/// Writes a SoftHSM configuration whose tokens live in `dir/tokens` (as the local mode
/// does for each node); its path.
pub fn write_conf(dir: &Path) -> PathBuf {
    hsm_secrets::local::tokens::write_softhsm_conf(dir).expect("write the SoftHSM configuration")
}

#[allow(unsafe_code)]
fn set_conf_env(conf: &Path) {
    // SAFETY: runs once per test process, before the PKCS#11 module is loaded; the test
    // harness threads only read this variable through SoftHSM after this point.
    unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
}

/// This process's PKCS#11 context on the SoftHSM module, initialised on first use after
/// `SOFTHSM2_CONF` points at the private configuration. The stores under test load the
/// same module (one per process) and find it initialised.
pub fn pkcs11(library: &Path) -> &'static Pkcs11 {
    static CTX: OnceLock<Pkcs11> = OnceLock::new();
    CTX.get_or_init(|| {
        env();
        let ctx = Pkcs11::new(library).expect("load the SoftHSM module");
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => panic!("C_Initialize of SoftHSM failed: {e}"),
        }
        ctx
    })
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
    /// The token's label: the name the test asked for, made unique in this process
    /// (`<name>.<n>`), so no two tests ever open one token.
    pub label: String,
    pub library: PathBuf,
    pub pin_file: PathBuf,
}

impl TestToken {
    /// Creates a new token for `name`; None when SoftHSM is absent outside CI.
    pub fn new(name: &str) -> Option<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        // One token initialisation at a time: each takes the module's one free slot.
        static CREATING: Mutex<()> = Mutex::new(());
        let library = available()?;
        let label = format!("{name}.{}", NEXT.fetch_add(1, Ordering::Relaxed));
        assert!(
            label.len() <= 32,
            "token label {label:?} is longer than PKCS#11's 32 bytes: shorten {name:?}"
        );
        let ctx = pkcs11(&library);
        let so_pin = AuthPin::from(SO_PIN.to_string());
        {
            let _creating = CREATING.lock().unwrap_or_else(|p| p.into_inner());
            // SoftHSM always offers one slot with an uninitialised token; initialising it
            // adds the token to this process's list and to the directory on disk.
            let slot = ctx
                .get_all_slots()
                .expect("C_GetSlotList")
                .into_iter()
                .find(|slot| {
                    ctx.get_token_info(*slot)
                        .is_ok_and(|info| !info.token_initialized())
                })
                .expect("SoftHSM offers a slot with an uninitialised token");
            ctx.init_token(slot, &so_pin, &label)
                .unwrap_or_else(|e| panic!("C_InitToken {label}: {e}"));
            let session = ctx
                .open_rw_session(slot)
                .unwrap_or_else(|e| panic!("C_OpenSession on {label}: {e}"));
            session
                .login(UserType::So, Some(&so_pin))
                .unwrap_or_else(|e| panic!("SO login on {label}: {e}"));
            session
                .init_pin(&AuthPin::from(USER_PIN.to_string()))
                .unwrap_or_else(|e| panic!("C_InitPIN on {label}: {e}"));
            session
                .logout()
                .unwrap_or_else(|e| panic!("logout of {label}: {e}"));
        }
        let pin_file = env().dir.path().join(format!("{label}.pin"));
        std::fs::write(&pin_file, format!("{USER_PIN}\n")).expect("pin file");
        Some(Self {
            label,
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
