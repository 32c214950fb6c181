//! The write journal: one line per write this agent acknowledged (node, epoch, path,
//! version and the host's monotonic clock), for checking a run's history after the fact
//! (`--write-journal`). Never a secret byte: paths and versions only.

use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One acknowledged write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub node: String,
    pub epoch: u64,
    pub path: String,
    pub version: u64,
    /// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host, whatever
    /// network namespace it runs in.
    pub mono_ns: u64,
}

/// An append-only file of [`Accepted`] lines.
#[derive(Debug)]
pub struct WriteJournal {
    file: Mutex<std::fs::File>,
}

impl WriteJournal {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Appends `accepted` as one line (one `write` call, so lines never interleave).
    /// A journal that cannot be written is logged, never a reason to fail the write.
    pub fn record(&self, accepted: &Accepted) {
        let Ok(mut line) = serde_json::to_vec(accepted) else {
            return;
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = file.write_all(&line) {
            tracing::warn!(%error, "cannot append to the write journal");
        }
    }
}

/// The host's monotonic clock in nanoseconds.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Every line of the journals in `paths`, skipping none: a line that does not decode is
/// an error naming its file.
pub fn read(paths: &[std::path::PathBuf]) -> Result<Vec<Accepted>, String> {
    let mut all = Vec::new();
    for path in paths {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("read {}: {e}", path.display())),
        };
        for (n, line) in text.lines().enumerate() {
            let accepted = serde_json::from_str(line)
                .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
            all.push(accepted);
        }
    }
    Ok(all)
}
