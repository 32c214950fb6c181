//! The child processes of the local mode: this same binary re-executed with a
//! subcommand, each in its own process group with its output in a log file.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::LocalError;

/// How a child is started.
pub struct Launch<'a> {
    /// What it is, for messages and log names: `agent worker-1`.
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(&'static str, String)>,
    pub log_dir: &'a Path,
    /// Stop the child when this process dies (the demo); false for `local up`, whose
    /// processes outlive the command that started them.
    pub tied_to_parent: bool,
    /// Run in this network namespace (its `/run/netns` path), entered by `nsenter`, which
    /// then becomes this program: the pid is the program's.
    pub netns: Option<String>,
}

/// Has the kernel stop the child (SIGTERM) when the thread that starts it ends: the demo's
/// runtime threads live as long as the demo, so its children stop with it even when it is
/// killed with SIGKILL and runs no cleanup. The signal survives the `exec` of `nsenter`
/// and of this program; a child whose parent is already gone by the time it runs stops
/// at once rather than outliving it.
#[allow(unsafe_code)]
fn exit_with_this_process(command: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and makes only two
    // async-signal-safe system calls (prctl, getppid); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            if nix::unistd::getppid() != parent {
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

/// A running child (or, after `local up`, one recorded in the state file).
#[derive(Debug)]
pub struct ChildProcess {
    pub name: String,
    pub pid: i32,
    /// stdout (where an agent announces its address).
    pub out: PathBuf,
    /// stderr: the process's log.
    pub log: PathBuf,
    /// Present when this process started it (so it can reap it).
    child: Option<Child>,
}

/// What the state file keeps of a child.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordedProcess {
    pub name: String,
    pub pid: i32,
    pub log: PathBuf,
}

impl ChildProcess {
    pub fn spawn(launch: Launch<'_>) -> Result<Self, LocalError> {
        let exe = std::env::current_exe().map_err(|e| LocalError::Spawn {
            process: launch.name.clone(),
            detail: format!("cannot find this program's path: {e}"),
        })?;
        let file_name = launch.name.replace(' ', "-");
        let out = launch.log_dir.join(format!("{file_name}.out"));
        let log = launch.log_dir.join(format!("{file_name}.log"));
        let open = |path: &Path| {
            std::fs::File::create(path).map_err(|e| LocalError::io("create", path, e))
        };
        let mut command = match &launch.netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net={netns}")).arg("--").arg(&exe);
                command
            }
            None => Command::new(&exe),
        };
        command
            .args(&launch.args)
            .stdin(Stdio::null())
            .stdout(open(&out)?)
            .stderr(open(&log)?)
            // Its own group: a terminal's ctrl-c reaches only the demo, which then stops
            // the children in order; and a whole group can be signalled at once.
            .process_group(0);
        for (key, value) in &launch.env {
            command.env(key, value);
        }
        if launch.tied_to_parent {
            exit_with_this_process(&mut command);
        }
        let child = command.spawn().map_err(|e| LocalError::Spawn {
            process: launch.name.clone(),
            detail: e.to_string(),
        })?;
        Ok(Self {
            name: launch.name,
            pid: child.id() as i32,
            out,
            log,
            child: Some(child),
        })
    }

    /// A process started by an earlier command (`local up`), found in the state file.
    pub fn adopt(recorded: &RecordedProcess) -> Self {
        Self {
            name: recorded.name.clone(),
            pid: recorded.pid,
            out: PathBuf::new(),
            log: recorded.log.clone(),
            child: None,
        }
    }

    pub fn record(&self) -> RecordedProcess {
        RecordedProcess {
            name: self.name.clone(),
            pid: self.pid,
            log: self.log.clone(),
        }
    }

    /// Whether it still runs (a zombie of ours is reaped and counts as gone).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => is_our_program(self.pid),
        }
    }

    /// Its exit, as an error naming its log, when it has stopped.
    pub fn check_alive(&mut self) -> Result<(), LocalError> {
        let status = match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => status.to_string(),
                _ => return Ok(()),
            },
            None if is_our_program(self.pid) => return Ok(()),
            None => "gone".into(),
        };
        Err(LocalError::Exited {
            process: self.name.clone(),
            status,
            log: self.log.clone(),
        })
    }

    /// SIGKILL, as a node failure would; waits until it is gone.
    pub fn kill_hard(&mut self) -> Result<(), LocalError> {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        self.wait_gone(Duration::from_secs(10));
        if self.is_running() {
            return Err(LocalError::Check(format!(
                "{} (pid {}) survived SIGKILL",
                self.name, self.pid
            )));
        }
        Ok(())
    }

    fn signal_group(&self, signal: Signal) {
        if killpg(Pid::from_raw(self.pid), signal) == Err(Errno::ESRCH) {
            let _ = kill(Pid::from_raw(self.pid), signal);
        }
    }

    fn wait_gone(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Waits for a stdout line containing `marker` (how an agent announces the port the
    /// kernel gave it) and returns it.
    pub fn wait_for_output(
        &mut self,
        marker: &str,
        timeout: Duration,
    ) -> Result<String, LocalError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.out)
                && let Some(line) = text.lines().find(|l| l.contains(marker))
            {
                return Ok(line.trim().to_string());
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                return Err(LocalError::Timeout {
                    what: format!("{} to start", self.name),
                    seconds: timeout.as_secs(),
                    hint: format!("; see {}", self.log.display()),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Stops every process: SIGTERM to each group, then SIGKILL to what is left after
/// `grace`. Returns the names of those that needed SIGKILL.
pub fn stop_all(processes: &mut [ChildProcess], grace: Duration) -> Vec<String> {
    for p in processes.iter() {
        p.signal_group(Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut forced = Vec::new();
    for p in processes.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if !p.wait_gone(left) {
            forced.push(p.name.clone());
            p.signal_group(Signal::SIGKILL);
            p.wait_gone(Duration::from_secs(10));
        }
    }
    forced
}

/// `pid` runs this same program (guards against a recycled pid in an old state file).
fn is_our_program(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    // A rebuilt binary shows as "<path> (deleted)" for processes started before.
    let strip = |p: PathBuf| {
        let text = p.to_string_lossy().into_owned();
        text.strip_suffix(" (deleted)")
            .map(String::from)
            .unwrap_or(text)
    };
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(strip);
    let ours = std::env::current_exe().ok().map(strip);
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false);
    !zombie && exe.is_some() && exe == ours
}

/// How a process was started, kept by `local fault kill` so that `local fault restart`
/// starts it again the same way.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedCommand {
    pub argv: Vec<String>,
    /// Only the variables this mode sets: the rest of an environment may hold credentials.
    pub env: Vec<(String, String)>,
}

/// The variables a restarted child gets back.
const KEPT_ENV: [&str; 3] = ["SOFTHSM2_CONF", "HSM_LOG", "NO_COLOR"];

/// `pid`'s command line and the environment this mode gave it.
pub fn capture(pid: i32) -> Result<SavedCommand, LocalError> {
    let read = |what: &str| {
        let path = format!("/proc/{pid}/{what}");
        std::fs::read(&path).map_err(|e| LocalError::io("read", path, e))
    };
    let split = |bytes: Vec<u8>| -> Vec<String> {
        bytes
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    let argv = split(read("cmdline")?);
    let env = split(read("environ")?)
        .into_iter()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            KEPT_ENV
                .contains(&k)
                .then(|| (k.to_string(), v.to_string()))
        })
        .collect();
    if argv.is_empty() {
        return Err(LocalError::Check(format!(
            "process {pid} shows no command line"
        )));
    }
    Ok(SavedCommand { argv, env })
}

/// Starts `saved` again, detached in its own process group, appending to `log` (stderr)
/// and `out` (stdout); its pid.
pub fn respawn(saved: &SavedCommand, log: &Path, out: &Path) -> Result<i32, LocalError> {
    let append = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| LocalError::io("open", path, e))
    };
    let mut command = Command::new(&saved.argv[0]);
    command
        .args(&saved.argv[1..])
        .stdin(Stdio::null())
        .stdout(append(out)?)
        .stderr(append(log)?)
        .process_group(0);
    for (key, value) in &saved.env {
        command.env(key, value);
    }
    let child = command.spawn().map_err(|e| LocalError::Spawn {
        process: saved.argv.join(" "),
        detail: e.to_string(),
    })?;
    Ok(child.id() as i32)
}
