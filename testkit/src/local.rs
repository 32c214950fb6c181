//! Running the `hsm-secrets` binary's local system (`demo`, `local`) from tests, and
//! checking that nothing of it is left afterwards: processes, mounts, directories.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether the local system can run here: SoftHSM2 and root (tmpfs mounts). Under CI
/// a missing piece is a failure, never a skip.
pub fn available() -> bool {
    let softhsm = Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .is_ok();
    let root = nix::unistd::geteuid().is_root();
    if softhsm && root {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the demo tests as root with softhsm2 installed (softhsm: {softhsm}, root: {root})"
    );
    eprintln!("skipping: needs root and softhsm2 (softhsm: {softhsm}, root: {root})");
    false
}

/// Whether SoftHSM2 is installed; under CI its absence is a failure, never a skip.
pub fn softhsm_available() -> bool {
    let softhsm = Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        softhsm || std::env::var_os("CI").is_none(),
        "CI must have softhsm2 installed"
    );
    if !softhsm {
        eprintln!("skipping: needs softhsm2");
    }
    softhsm
}

/// The user unprivileged runs switch to (nobody).
pub const UNPRIVILEGED: u32 = 65534;

/// A place an unprivileged user can run the binary from: `<dir>/bin/hsm-secrets` (a
/// copy, since the build tree may sit below a directory only root may enter) and
/// `<dir>/work`, both owned by [`UNPRIVILEGED`]. `dir` itself becomes traversable.
pub struct UnprivilegedRun {
    pub binary: std::path::PathBuf,
    pub work: std::path::PathBuf,
}

impl UnprivilegedRun {
    pub fn prepare(dir: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let owner = Some(nix::unistd::Uid::from_raw(UNPRIVILEGED));
        let group = Some(nix::unistd::Gid::from_raw(UNPRIVILEGED));
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = dir.join("bin");
        let work = dir.join("work");
        std::fs::create_dir(&bin).unwrap();
        std::fs::create_dir(&work).unwrap();
        let binary = bin.join("hsm-secrets");
        std::fs::copy(crate::binary(), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        if nix::unistd::geteuid().is_root() {
            for path in [&bin, &work, &binary] {
                nix::unistd::chown(path.as_path(), owner, group).unwrap();
            }
        }
        Self { binary, work }
    }

    /// The binary, run as [`UNPRIVILEGED`] with no supplementary groups when this test
    /// runs as root (as CI does); as this same unprivileged user otherwise.
    pub fn command(&self) -> Command {
        let mut command = if nix::unistd::geteuid().is_root() {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={UNPRIVILEGED}"))
                .arg(format!("--regid={UNPRIVILEGED}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(&self.binary);
            c
        } else {
            Command::new(&self.binary)
        };
        command
            .env("RUST_BACKTRACE", "0")
            .env("HOME", &self.work)
            .env("TMPDIR", &self.work)
            .env_remove("SOFTHSM2_CONF")
            .stdin(Stdio::null());
        command
    }
}

pub fn command() -> Command {
    let mut command = Command::new(crate::binary());
    command.env("RUST_BACKTRACE", "0").stdin(Stdio::null());
    command
}

/// Appends what `pipe` gives to `sink` as it comes, on a thread of its own, until the
/// pipe closes.
pub fn collect_into(mut pipe: impl Read + Send + 'static, sink: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
}

/// A running command whose stdout and stderr are collected as they come.
pub struct Running {
    pub child: Child,
    output: Arc<Mutex<String>>,
}

impl Running {
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            collect_into(pipe, output.clone());
        }
        Self { child, output }
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits until the output contains `text`.
    pub fn wait_for_output(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(text) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "exited ({status}) before printing {text:?}:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the exit (killing it after `timeout`); the status and all output.
    pub fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(200));
                return (status, self.output());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("no exit within {timeout:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Processes whose command line mentions `dir` (every child of the local system gets
/// paths below its directory).
pub fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with('Z')))
            .unwrap_or(false);
        if cmdline.contains(&needle) && !zombie {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

/// Mount points below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(String::from)
        .collect()
}

/// Waits until no process mentions `dir`.
pub fn wait_no_processes(dir: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = processes_under(dir);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes left behind:\n{}",
            left.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lazily unmounts whatever a failed test left below `dir`.
pub struct UnmountOnDrop<'a>(pub &'a Path);

impl Drop for UnmountOnDrop<'_> {
    fn drop(&mut self) {
        let _ = hsm_secrets::local::cluster::unmount_below(self.0);
    }
}
