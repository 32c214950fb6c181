//! When each device's next round is due: every probe interval, sooner when its plan asks
//! (a fence to wait out, a lost status race), later after failures (backoff per device).
//! Devices are reconciled independently, so one whose agents hang or whose rounds fail
//! delays nobody else's probes and failovers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;

use super::RoundOutcome;

/// The longest a failing device waits between rounds.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How soon a round that lost a status race (409) runs again.
pub const AFTER_CONFLICT: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
pub struct Schedule {
    devices: HashMap<String, Entry>,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    due: Instant,
    failures: u32,
}

impl Schedule {
    /// Whether `device` should start a round at `now` (a device never seen is due).
    pub fn is_due(&self, device: &str, now: Instant) -> bool {
        self.devices.get(device).is_none_or(|e| e.due <= now)
    }

    /// Records how a round of `device` ended at `now` and when the next one is due.
    pub fn finished<E>(
        &mut self,
        device: &str,
        result: &Result<RoundOutcome, E>,
        now: Instant,
        probe_interval: Duration,
    ) {
        let entry = self.devices.entry(device.to_string()).or_insert(Entry {
            due: now,
            failures: 0,
        });
        match result {
            Ok(outcome) => {
                entry.failures = 0;
                let mut wait = probe_interval;
                if outcome.conflict {
                    wait = AFTER_CONFLICT;
                }
                if let Some(at) = outcome.replan_at {
                    let until =
                        Duration::try_from(at.duration_since(Timestamp::now())).unwrap_or_default();
                    wait = wait.min(until.max(Duration::from_millis(20)));
                }
                entry.due = now + wait;
            }
            Err(_) => {
                entry.failures = entry.failures.saturating_add(1);
                entry.due = now + backoff(probe_interval, entry.failures);
            }
        }
    }

    /// Every device is due now (a spec or annotation changed, leadership began).
    pub fn all_due(&mut self, now: Instant) {
        for entry in self.devices.values_mut() {
            entry.due = entry.due.min(now);
        }
    }

    /// How long until the earliest due round, if any device is known.
    pub fn next_due_in(&self, now: Instant) -> Option<Duration> {
        self.devices
            .values()
            .map(|e| e.due.saturating_duration_since(now))
            .min()
    }

    /// Forgets devices that no longer exist.
    pub fn retain(&mut self, exists: impl Fn(&str) -> bool) {
        self.devices.retain(|name, _| exists(name));
    }
}

/// The wait after `failures` failed rounds in a row: the probe interval, doubled each
/// time, at most [`MAX_BACKOFF`].
pub fn backoff(probe_interval: Duration, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    probe_interval.saturating_mul(factor).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_device_keeps_its_own_time() {
        let probe = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut s = Schedule::default();
        assert!(s.is_due("a", t0) && s.is_due("b", t0));
        s.finished::<()>("a", &Ok(RoundOutcome::default()), t0, probe);
        s.finished("b", &Err(()), t0, probe);
        s.finished("b", &Err(()), t0, probe);
        assert!(!s.is_due("a", t0) && s.is_due("a", t0 + probe));
        assert!(!s.is_due("b", t0 + probe) && s.is_due("b", t0 + 2 * probe));
        let conflict = RoundOutcome {
            conflict: true,
            ..Default::default()
        };
        s.finished::<()>("a", &Ok(conflict), t0, probe);
        assert!(s.is_due("a", t0 + AFTER_CONFLICT));
        assert_eq!(s.next_due_in(t0), Some(AFTER_CONFLICT));
        s.all_due(t0);
        assert!(s.is_due("b", t0));
        s.retain(|name| name == "a");
        assert_eq!(s.devices.len(), 1);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let probe = Duration::from_secs(1);
        assert_eq!(backoff(probe, 1), probe);
        assert_eq!(backoff(probe, 2), 2 * probe);
        assert_eq!(backoff(probe, 3), 4 * probe);
        assert_eq!(backoff(probe, 40), MAX_BACKOFF);
    }
}
