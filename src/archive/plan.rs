//! What the controller asks of the primary's archive each round, and how the answer
//! shows in `status.backup`, the Backup* conditions and Events. Pure: no IO, no clock.

use crate::contract::reasons;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::{
    BackupDrill, BackupPoint, BackupRestore, BackupSpec, BackupStatus, RESTORE_ANNOTATION,
    RestoreAnnotation, SiteRole, SiteSpec, SiteStatus,
};

/// Condition types this module owns on an HSMDevice.
pub mod condition_types {
    pub use crate::contract::conditions::{BACKUP_ARCHIVED, BACKUP_VERIFIED};
    pub const ALL: [&str; 2] = [BACKUP_ARCHIVED, BACKUP_VERIFIED];
}

/// Requests without a schedule start with this; the rest is the due time (unix ms).
const SCHEDULED: &str = "scheduled";

/// What one round asks of the primary's agent beyond "archive as the spec says".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveAsk {
    pub base_request: Option<String>,
    pub verify_request: Option<String>,
    pub restore: Option<RestoreAsk>,
    /// `kubectl hsm site promote`, not yet reported done.
    pub promote_request: Option<String>,
    /// `kubectl hsm site drain`: the active site stops taking writes.
    pub drain: bool,
}

/// A restore to carry out through the primary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreAsk {
    pub id: String,
    pub to_sequence: Option<u64>,
    /// Unix ms.
    pub to_time_ms: Option<u64>,
    pub force: bool,
}

/// Reads the restore annotation; the error names the annotation and the fix.
pub fn parse_restore(value: &str) -> Result<RestoreAsk, String> {
    let bad = |why: String| {
        format!(
            "annotation {RESTORE_ANNOTATION} is not a restore request ({why}); use \
             `kubectl hsm restore DEVICE --to-sequence N | --to-time T`"
        )
    };
    let parsed: RestoreAnnotation = serde_json::from_str(value).map_err(|e| bad(e.to_string()))?;
    if parsed.id.is_empty() || parsed.id.len() > 64 {
        return Err(bad("id must be 1 to 64 characters".into()));
    }
    let to_time_ms = match &parsed.to_time {
        None => None,
        Some(t) => Some(
            t.parse::<Timestamp>()
                .map_err(|e| bad(format!("toTime {t:?}: {e}")))?
                .as_millisecond()
                .max(0) as u64,
        ),
    };
    if parsed.to_sequence.is_some() && to_time_ms.is_some() {
        return Err(bad("give toSequence or toTime, not both".into()));
    }
    Ok(RestoreAsk {
        id: parsed.id,
        to_sequence: parsed.to_sequence,
        to_time_ms,
        force: parsed.force,
    })
}

/// The agent's answer, as domain values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    pub config_error: Option<String>,
    pub archived_sequence: u64,
    pub primary_sequence: u64,
    pub up_to_date_ms: Option<u64>,
    pub last_error: Option<String>,
    /// (epoch, sequence, unix ms), oldest first.
    pub bases: Vec<(u64, u64, u64)>,
    pub base_done: Option<String>,
    pub drill_running: Option<String>,
    pub drill: Option<DrillResult>,
    pub restore_running: Option<String>,
    pub restore: Option<RestoreResult>,
    pub site: Option<SiteReport>,
    pub not_primary: bool,
}

/// The site part of the agent's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteReport {
    pub role: SiteRole,
    pub site_epoch: u64,
    pub source_sequence: u64,
    pub source_time_ms: Option<u64>,
    pub applied_sequence: u64,
    pub applied_time_ms: Option<u64>,
    pub lag_ms: u64,
    pub fenced_by: Option<String>,
    pub fenced_by_device: Option<String>,
    pub fence_sequence: u64,
    pub lost_writes: u64,
    pub promotion_done: Option<String>,
    pub promotion_running: Option<String>,
    pub error: Option<String>,
    pub draining: bool,
}

/// `status.site` after `report`, with the Events a change deserves: a fence, a
/// promotion, a lag above the alert, an error.
pub fn observe_site(
    spec: &SiteSpec,
    prev: Option<&SiteStatus>,
    report: &SiteReport,
) -> (SiteStatus, Vec<BackupEvent>) {
    let time = |ms: Option<u64>| {
        ms.and_then(|ms| Timestamp::from_millisecond(ms as i64).ok())
            .map(Time)
    };
    let passive = report.role == SiteRole::Passive;
    let fenced = report.role == SiteRole::Fenced;
    let lag_seconds = passive.then_some((report.lag_ms / 1000) as i64);
    let fresh = SiteStatus {
        name: spec.name.clone(),
        role: report.role,
        site_epoch: report.site_epoch,
        source_sequence: passive.then_some(report.source_sequence),
        source_time: passive.then(|| time(report.source_time_ms)).flatten(),
        applied_sequence: passive.then_some(report.applied_sequence),
        applied_time: passive.then(|| time(report.applied_time_ms)).flatten(),
        lag_seconds,
        fenced_by: fenced.then(|| report.fenced_by.clone()).flatten(),
        fenced_by_device: fenced.then(|| report.fenced_by_device.clone()).flatten(),
        fence_sequence: fenced.then_some(report.fence_sequence),
        lost_writes: fenced.then_some(report.lost_writes),
        last_promotion: report
            .promotion_done
            .clone()
            .or_else(|| prev.and_then(|p| p.last_promotion.clone())),
        last_error: report.error.as_deref().map(|e| truncate(e, 1024)),
        draining: report.draining,
    };
    let mut events = Vec::new();
    let was = prev.map(|p| p.role);
    if fenced && was != Some(SiteRole::Fenced) {
        events.push(BackupEvent {
            warning: true,
            reason: reasons::SITE_FENCED,
            message: format!(
                "site {} was promoted over site {} at site epoch {} from sequence {}; this site \
                 takes no writes; {} write(s) it took after that point are lost, never merged; \
                 rejoin it as passive with `kubectl hsm site rejoin`",
                report.fenced_by.as_deref().unwrap_or("?"),
                spec.name,
                report.site_epoch,
                report.fence_sequence,
                report.lost_writes
            ),
        });
    }
    if report.promotion_done.is_some()
        && prev.and_then(|p| p.last_promotion.as_ref()) != report.promotion_done.as_ref()
    {
        events.push(BackupEvent {
            warning: false,
            reason: reasons::SITE_PROMOTED,
            message: format!(
                "site {} promoted to active at site epoch {}; it takes writes",
                spec.name, report.site_epoch
            ),
        });
    }
    let alert = u64::from(spec.lag_alert_seconds()) * 1000;
    let lagging = |lag: Option<i64>| lag.is_some_and(|l| l * 1000 > alert as i64);
    if lagging(lag_seconds) && !lagging(prev.and_then(|p| p.lag_seconds)) {
        events.push(BackupEvent {
            warning: true,
            reason: reasons::SITE_LAGGING,
            message: format!(
                "passive site {} is more than {} s behind the active site's archive (applied \
                 sequence {}, archive at {})",
                spec.name,
                spec.lag_alert_seconds(),
                report.applied_sequence,
                report.source_sequence
            ),
        });
    }
    // Once per spell of errors, not once per changed wording.
    if let Some(error) = &fresh.last_error
        && prev.is_none_or(|p| p.last_error.is_none())
    {
        events.push(BackupEvent {
            warning: true,
            reason: reasons::SITE_ERROR,
            message: error.clone(),
        });
    }
    // Moving figures (applied sequence, lag) wait for the heartbeat like the archive's.
    let steady = prev.is_some_and(|p| {
        let fixed = |s: &SiteStatus| SiteStatus {
            source_sequence: None,
            source_time: None,
            applied_sequence: None,
            applied_time: None,
            lag_seconds: None,
            ..s.clone()
        };
        fixed(p) == fixed(&fresh) && lagging(p.lag_seconds) == lagging(fresh.lag_seconds)
    });
    let status = match (steady, prev) {
        (true, Some(p)) if events.is_empty() && !site_heartbeat_due(p, &fresh) => p.clone(),
        _ => fresh,
    };
    (status, events)
}

/// A passive site's figures are rewritten when they moved and the previous ones are older
/// than the heartbeat (by the source time they name), when it caught up, and when a
/// caught-up site moved on by more than [`SITE_CAUGHT_UP_REFRESH_MS`]: a promotion's
/// preflight reads them, and a quiet device must not show a point a minute old.
fn site_heartbeat_due(prev: &SiteStatus, fresh: &SiteStatus) -> bool {
    if prev.lag_seconds != Some(0) && fresh.lag_seconds == Some(0) {
        return true;
    }
    let older_than = |ms: i64| {
        fresh
            .applied_time
            .as_ref()
            .zip(prev.applied_time.as_ref())
            .is_none_or(|(f, p)| f.0.as_millisecond() - p.0.as_millisecond() >= ms)
    };
    let caught_up = fresh.lag_seconds == Some(0);
    prev.applied_sequence != fresh.applied_sequence
        && (older_than(BACKUP_HEARTBEAT_MS) || (caught_up && older_than(SITE_CAUGHT_UP_REFRESH_MS)))
}

/// How far a caught-up passive site moves on before its figures are rewritten.
pub const SITE_CAUGHT_UP_REFRESH_MS: i64 = 10_000;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreResult {
    pub id: String,
    pub succeeded: bool,
    pub sequence: u64,
    /// The primary epoch of the restored point.
    pub epoch: u64,
    pub time_ms: Option<u64>,
    pub secrets: u64,
    pub bytes: u64,
    pub finished_ms: u64,
    pub message: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrillResult {
    pub request: String,
    pub verified: bool,
    pub sequence: u64,
    /// The primary epoch of the rebuilt point.
    pub epoch: u64,
    pub time_ms: Option<u64>,
    pub secrets: u64,
    pub bytes: u64,
    pub duration_ms: u64,
    pub finished_ms: u64,
    pub message: Option<String>,
}

/// An Event the round should record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// A base when `kubectl hsm backup now` asked for one not yet done; a drill when
/// `kubectl hsm backup verify` asked for one not yet reported, or when the schedule says
/// one is due.
pub fn ask(
    spec: &BackupSpec,
    status: Option<&BackupStatus>,
    base_annotation: Option<&str>,
    verify_annotation: Option<&str>,
    restore: Option<&RestoreAsk>,
    now: Timestamp,
) -> ArchiveAsk {
    let base_request = base_annotation
        .filter(|r| !r.is_empty())
        .filter(|r| status.and_then(|s| s.last_base_request.as_deref()) != Some(*r))
        .map(str::to_string);
    let last = status.and_then(|s| s.last_verified.as_ref());
    let on_demand = verify_annotation
        .filter(|r| !r.is_empty())
        .filter(|r| last.map(|d| d.request.as_str()) != Some(*r))
        .map(str::to_string);
    let interval_ms = i64::from(spec.verify_interval_minutes()) * 60_000;
    let scheduled = (interval_ms > 0)
        .then(|| match last {
            None => Some(format!("{SCHEDULED}:first")),
            Some(d) => {
                let due = d.finished_at.0.as_millisecond() + interval_ms;
                (due <= now.as_millisecond()).then(|| format!("{SCHEDULED}:{due}"))
            }
        })
        .flatten();
    let restore = restore
        .filter(|r| {
            status
                .and_then(|s| s.last_restore.as_ref())
                .is_none_or(|done| done.request != r.id)
        })
        .cloned();
    ArchiveAsk {
        base_request,
        verify_request: on_demand.or(scheduled),
        restore,
        promote_request: None,
        drain: false,
    }
}

/// Seconds since the archive last held every acknowledged change: 0 while it does, None
/// before it ever did.
pub fn lag_seconds(report: &ArchiveReport, now: Timestamp) -> Option<i64> {
    let behind = report.primary_sequence > report.archived_sequence;
    match (behind, report.up_to_date_ms) {
        (false, Some(_)) => Some(0),
        (true, Some(at)) => Some(((now.as_millisecond() - at as i64) / 1000).max(0)),
        (_, None) => None,
    }
}

/// `status.backup` and the Backup* conditions after `report` from `node`, with the Events
/// a change deserves. `prev_conditions` are the device's conditions before the round.
pub fn observe(
    spec: &BackupSpec,
    prev: Option<&BackupStatus>,
    prev_conditions: &[Condition],
    node: &str,
    report: &ArchiveReport,
    now: Timestamp,
    generation: Option<i64>,
) -> (BackupStatus, Vec<Condition>, Vec<BackupEvent>) {
    let time = |ms: u64| Timestamp::from_millisecond(ms as i64).ok().map(Time);
    let lag_sequences = report
        .primary_sequence
        .saturating_sub(report.archived_sequence);
    let lag_seconds = lag_seconds(report, now);
    let error = report
        .config_error
        .clone()
        .or_else(|| report.last_error.clone());
    let drill = match (&report.drill, prev.and_then(|p| p.last_verified.clone())) {
        (Some(d), _) => Some(BackupDrill {
            request: truncate(&d.request, 64),
            verified: d.verified,
            sequence: d.sequence,
            time: d.time_ms.and_then(time),
            secrets: d.secrets,
            duration_ms: d.duration_ms,
            finished_at: time(d.finished_ms).unwrap_or(Time(now)),
            message: d.message.as_deref().map(|m| truncate(m, 2048)),
        }),
        (None, kept) => kept,
    };
    let restored = match (&report.restore, prev.and_then(|p| p.last_restore.clone())) {
        (Some(r), _) => Some(BackupRestore {
            request: truncate(&r.id, 64),
            succeeded: r.succeeded,
            sequence: r.sequence,
            time: r.time_ms.and_then(time),
            secrets: r.secrets,
            bytes: r.bytes,
            finished_at: time(r.finished_ms).unwrap_or(Time(now)),
            message: r.message.as_deref().map(|m| truncate(m, 2048)),
        }),
        (None, kept) => kept,
    };
    let fresh = BackupStatus {
        node: Some(node.to_string()),
        archived_sequence: report.archived_sequence,
        lag_sequences,
        lag_seconds,
        up_to_date_time: report.up_to_date_ms.and_then(time),
        observed_time: Some(Time(now)),
        last_error: error.as_deref().map(|e| truncate(e, 1024)),
        bases: report
            .bases
            .iter()
            .rev()
            .take(32)
            .rev()
            .filter_map(|&(epoch, sequence, ms)| {
                time(ms).map(|time| BackupPoint {
                    epoch,
                    sequence,
                    time,
                })
            })
            .collect(),
        last_base_request: report
            .base_done
            .clone()
            .or_else(|| prev.and_then(|p| p.last_base_request.clone())),
        last_verified: drill.clone(),
        last_restore: restored.clone(),
    };

    let alert = i64::from(spec.lag_alert_seconds());
    let (archived_ok, archived_reason, archived_message) = match (&report.config_error, &error) {
        (Some(e), _) => (false, "ConfigurationError", e.clone()),
        (None, Some(e)) => (false, "ArchiveFailing", e.clone()),
        (None, None) => match lag_seconds {
            None => (
                false,
                "Starting",
                "the archive has not caught up with the primary yet".to_string(),
            ),
            // Messages hold no moving figure, so a steady state writes no status.
            Some(lag) if lag > alert => (
                false,
                "Lagging",
                format!(
                    "the archive lags the primary by more than {alert} s (status.backup.lagSeconds); \
                     check the bucket's reachability and the node plugin's archive metrics"
                ),
            ),
            Some(_) => (
                true,
                "UpToDate",
                format!("the archive keeps within {alert} s of the primary"),
            ),
        },
    };
    let (verified_status, verified_reason, verified_message) = match &drill {
        None => (
            "Unknown",
            "NotVerifiedYet",
            "no restore drill has finished yet".to_string(),
        ),
        Some(d) if d.verified => (
            "True",
            "DrillPassed",
            format!(
                "restored sequence {} ({} secrets) in {} ms and it matched the device",
                d.sequence, d.secrets, d.duration_ms
            ),
        ),
        Some(d) => (
            "False",
            "DrillFailed",
            d.message
                .clone()
                .unwrap_or_else(|| "the drill did not verify the archive".into()),
        ),
    };
    let conditions = vec![
        condition(
            prev_conditions,
            condition_types::BACKUP_ARCHIVED,
            if archived_ok { "True" } else { "False" },
            archived_reason,
            archived_message.clone(),
            now,
            generation,
        ),
        condition(
            prev_conditions,
            condition_types::BACKUP_VERIFIED,
            verified_status,
            verified_reason,
            verified_message.clone(),
            now,
            generation,
        ),
    ];

    let mut events = Vec::new();
    let was = |type_: &str| {
        prev_conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    // Starting is not worth a Warning: a new archive has not caught up yet.
    if !archived_ok
        && archived_reason != "Starting"
        && was(condition_types::BACKUP_ARCHIVED)
            != Some(("False".into(), archived_reason.to_string()))
    {
        events.push(BackupEvent {
            warning: true,
            reason: reasons::BACKUP_FAILING,
            message: archived_message,
        });
    }
    let new_drill = report.drill.as_ref().is_some_and(|d| {
        prev.and_then(|p| p.last_verified.as_ref())
            .is_none_or(|old| old.request != truncate(&d.request, 64))
    });
    if new_drill && let Some(d) = &drill {
        events.push(BackupEvent {
            warning: !d.verified,
            reason: if d.verified {
                reasons::BACKUP_VERIFIED
            } else {
                reasons::BACKUP_VERIFY_FAILED
            },
            message: verified_message,
        });
    }

    let new_restore = report.restore.as_ref().is_some_and(|r| {
        prev.and_then(|p| p.last_restore.as_ref())
            .is_none_or(|old| old.request != truncate(&r.id, 64))
    });
    if new_restore && let Some(r) = &restored {
        events.push(BackupEvent {
            warning: !r.succeeded,
            reason: if r.succeeded {
                reasons::RESTORED
            } else {
                reasons::RESTORE_FAILED
            },
            message: match (r.succeeded, &r.message) {
                (true, _) => format!(
                    "restored the device to archive sequence {} ({} secrets, {} bytes)",
                    r.sequence, r.secrets, r.bytes
                ),
                (false, m) => format!(
                    "restore {} failed: {}",
                    r.request,
                    m.as_deref().unwrap_or("no detail")
                ),
            },
        });
    }
    let steady = conditions.iter().all(|c| {
        prev_conditions
            .iter()
            .any(|p| p.type_ == c.type_ && p.status == c.status && p.message == c.message)
    });
    let status = if steady {
        settle(prev, fresh, now)
    } else {
        fresh
    };
    (status, conditions, events)
}

/// How long the moving figures (sequence, lag) may stay unwritten when nothing else
/// changed: every round writing them would cost an API write per device per round.
pub const BACKUP_HEARTBEAT_MS: i64 = 60_000;

/// `prev` when `fresh` differs only in the moving figures and `prev` is recent.
fn settle(prev: Option<&BackupStatus>, fresh: BackupStatus, now: Timestamp) -> BackupStatus {
    let Some(prev) = prev else { return fresh };
    let recent = prev.observed_time.as_ref().is_some_and(|t| {
        (0..BACKUP_HEARTBEAT_MS).contains(&(now.as_millisecond() - t.0.as_millisecond()))
    });
    let moving = |s: &BackupStatus| BackupStatus {
        archived_sequence: 0,
        lag_sequences: 0,
        lag_seconds: None,
        up_to_date_time: None,
        observed_time: None,
        ..s.clone()
    };
    if recent && moving(prev) == moving(&fresh) {
        prev.clone()
    } else {
        fresh
    }
}

fn condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    now: Timestamp,
    generation: Option<i64>,
) -> Condition {
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub(1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end.saturating_sub(2)])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> BackupSpec {
        BackupSpec {
            url: "s3://b".into(),
            endpoint: None,
            region: None,
            credentials_secret: "s".into(),
            archive_name: None,
            segment_interval_seconds: None,
            base_interval_minutes: None,
            retention_days: None,
            verify_interval_minutes: Some(60),
            lag_alert_seconds: Some(30),
        }
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millisecond(ms).unwrap()
    }

    fn drilled(request: &str, finished_ms: i64, verified: bool) -> BackupStatus {
        BackupStatus {
            last_verified: Some(BackupDrill {
                request: request.into(),
                verified,
                sequence: 9,
                time: None,
                secrets: 3,
                duration_ms: 5,
                finished_at: Time(at(finished_ms)),
                message: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn drills_are_asked_on_schedule_and_on_demand_once_each() {
        let hour = 3_600_000;
        type Case<'a> = (
            &'a str,
            Option<BackupStatus>,
            Option<&'a str>,
            i64,
            Option<&'a str>,
        );
        let cases: [Case; 6] = [
            ("never drilled", None, None, 0, Some("scheduled:first")),
            (
                "drilled recently",
                Some(drilled("x", 0, true)),
                None,
                hour - 1,
                None,
            ),
            (
                "due",
                Some(drilled("x", 0, true)),
                None,
                hour,
                Some("scheduled:3600000"),
            ),
            (
                "asked",
                Some(drilled("x", 0, true)),
                Some("t1"),
                5,
                Some("t1"),
            ),
            (
                "asked and done",
                Some(drilled("t1", 0, true)),
                Some("t1"),
                5,
                None,
            ),
            (
                "asked, done, due",
                Some(drilled("t1", 0, true)),
                Some("t1"),
                hour,
                Some("scheduled:3600000"),
            ),
        ];
        for (name, status, annotation, now, want) in cases {
            let got = ask(&spec(), status.as_ref(), None, annotation, None, at(now));
            assert_eq!(got.verify_request.as_deref(), want, "{name}");
        }
        let mut only_on_demand = spec();
        only_on_demand.verify_interval_minutes = Some(0);
        assert_eq!(
            ask(&only_on_demand, None, None, None, None, at(0)).verify_request,
            None
        );
    }

    #[test]
    fn a_base_is_asked_until_the_agent_reports_it_done() {
        let done = BackupStatus {
            last_base_request: Some("b1".into()),
            ..Default::default()
        };
        let spec = spec();
        assert_eq!(
            ask(&spec, None, Some("b1"), None, None, at(0))
                .base_request
                .as_deref(),
            Some("b1")
        );
        assert_eq!(
            ask(&spec, Some(&done), Some("b1"), None, None, at(0)).base_request,
            None
        );
        assert_eq!(
            ask(&spec, Some(&done), Some("b2"), None, None, at(0))
                .base_request
                .as_deref(),
            Some("b2")
        );
    }

    fn report(archived: u64, primary: u64, up_to_date_ms: Option<u64>) -> ArchiveReport {
        ArchiveReport {
            archived_sequence: archived,
            primary_sequence: primary,
            up_to_date_ms,
            ..Default::default()
        }
    }

    #[test]
    fn lag_turns_the_condition_false_above_the_alert_with_one_event() {
        let spec = spec();
        let now = at(100_000);
        let (status, conditions, events) = observe(
            &spec,
            None,
            &[],
            "n1",
            &report(7, 7, Some(99_000)),
            now,
            None,
        );
        assert_eq!((status.lag_seconds, status.lag_sequences), (Some(0), 0));
        assert_eq!(conditions[0].status, "True");
        assert!(events.is_empty());

        let (status, conditions, events) = observe(
            &spec,
            Some(&status),
            &conditions,
            "n1",
            &report(7, 20, Some(60_000)),
            now,
            None,
        );
        assert_eq!((status.lag_seconds, status.lag_sequences), (Some(40), 13));
        assert_eq!(
            (conditions[0].status.as_str(), conditions[0].reason.as_str()),
            ("False", "Lagging")
        );
        assert_eq!(events.len(), 1);
        assert!(events[0].warning && events[0].message.contains("more than 30 s"));

        // Still lagging: no second Event.
        let (_, _, events) = observe(
            &spec,
            Some(&status),
            &conditions,
            "n1",
            &report(7, 21, Some(60_000)),
            at(101_000),
            None,
        );
        assert!(events.is_empty(), "{events:?}");
    }

    #[test]
    fn errors_and_drills_reach_conditions_and_events() {
        let spec = spec();
        let failing = ArchiveReport {
            config_error: Some("archive configuration: /etc/x/recovery.pub is missing".into()),
            ..Default::default()
        };
        let (status, conditions, events) = observe(&spec, None, &[], "n1", &failing, at(0), None);
        assert_eq!(conditions[0].reason, "ConfigurationError");
        assert!(status.last_error.unwrap().contains("recovery.pub"));
        assert_eq!(events[0].reason, "BackupFailing");
        assert_eq!(conditions[1].status, "Unknown");

        let failed_drill = ArchiveReport {
            drill: Some(DrillResult {
                request: "t1".into(),
                verified: false,
                finished_ms: 5,
                message: Some("1 path(s) differ from the device: shop/db".into()),
                ..Default::default()
            }),
            ..report(3, 3, Some(0))
        };
        let (status, conditions, events) =
            observe(&spec, None, &[], "n1", &failed_drill, at(10), None);
        assert_eq!(
            (conditions[1].status.as_str(), conditions[1].reason.as_str()),
            ("False", "DrillFailed")
        );
        assert!(
            events
                .iter()
                .any(|e| e.reason == "BackupVerifyFailed" && e.warning)
        );
        // Reported again next round: no new Event.
        let (_, _, again) = observe(
            &spec,
            Some(&status),
            &conditions,
            "n1",
            &failed_drill,
            at(20),
            None,
        );
        assert!(
            again.iter().all(|e| e.reason != "BackupVerifyFailed"),
            "{again:?}"
        );
    }

    #[test]
    fn moving_figures_are_written_at_most_once_a_heartbeat() {
        let spec = spec();
        let (first, conditions, _) =
            observe(&spec, None, &[], "n1", &report(5, 5, Some(0)), at(0), None);
        let (next, _, _) = observe(
            &spec,
            Some(&first),
            &conditions,
            "n1",
            &report(6, 6, Some(1000)),
            at(1000),
            None,
        );
        assert_eq!(next, first, "a moving figure alone waits for the heartbeat");
        let (later, _, _) = observe(
            &spec,
            Some(&first),
            &conditions,
            "n1",
            &report(6, 6, Some(61_000)),
            at(61_000),
            None,
        );
        assert_eq!(later.archived_sequence, 6);
    }

    #[test]
    fn restore_requests_are_read_once_and_bad_ones_named() {
        let ok =
            parse_restore(r#"{"id":"t1","toTime":"2026-12-07T08:00:00Z","force":true}"#).unwrap();
        assert_eq!(
            (ok.to_time_ms, ok.to_sequence, ok.force),
            (Some(1_796_630_400_000), None, true)
        );
        for (bad, why) in [
            ("not json", "expected"),
            (
                r#"{"id":"t1","toSequence":3,"toTime":"2026-12-07T08:00:00Z"}"#,
                "not both",
            ),
            (r#"{"id":"t1","toTime":"yesterday"}"#, "toTime"),
            (r#"{"id":"","toSequence":3}"#, "id must be"),
            (r#"{"id":"t1","to":3}"#, "unknown field"),
        ] {
            let e = parse_restore(bad).unwrap_err();
            assert!(
                e.contains(why) && e.contains("hsmsecrets.io/restore"),
                "{bad}: {e}"
            );
        }
        let spec = spec();
        let done = BackupStatus {
            last_restore: Some(BackupRestore {
                request: "t1".into(),
                succeeded: true,
                sequence: 3,
                time: None,
                secrets: 1,
                bytes: 1,
                finished_at: Time(at(0)),
                message: None,
            }),
            ..drilled("x", 0, true)
        };
        assert_eq!(
            ask(&spec, Some(&done), None, None, Some(&ok), at(0)).restore,
            None
        );
        let again = RestoreAsk {
            id: "t2".into(),
            ..ok.clone()
        };
        assert_eq!(
            ask(&spec, Some(&done), None, None, Some(&again), at(0)).restore,
            Some(again)
        );
    }

    fn site_spec() -> SiteSpec {
        SiteSpec {
            name: "b".into(),
            follow_archive: None,
            lease_seconds: None,
            lag_alert_seconds: Some(10),
        }
    }

    fn site_report(role: SiteRole) -> SiteReport {
        SiteReport {
            role,
            site_epoch: 0,
            source_sequence: 50,
            source_time_ms: Some(1_000),
            applied_sequence: 50,
            applied_time_ms: Some(1_000),
            lag_ms: 0,
            fenced_by: None,
            fenced_by_device: None,
            fence_sequence: 0,
            lost_writes: 0,
            promotion_done: None,
            promotion_running: None,
            error: None,
            draining: false,
        }
    }

    #[test]
    fn site_lag_fences_and_promotions_reach_status_and_events_once() {
        let spec = site_spec();
        let (passive, events) = observe_site(&spec, None, &site_report(SiteRole::Passive));
        assert_eq!(
            (passive.role, passive.lag_seconds),
            (SiteRole::Passive, Some(0))
        );
        assert!(events.is_empty(), "{events:?}");
        let lagging = SiteReport {
            lag_ms: 12_000,
            ..site_report(SiteRole::Passive)
        };
        let (behind, events) = observe_site(&spec, Some(&passive), &lagging);
        assert_eq!(behind.lag_seconds, Some(12));
        assert_eq!(
            events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["SiteLagging"]
        );
        let (_, again) = observe_site(&spec, Some(&behind), &lagging);
        assert!(again.is_empty(), "still lagging: no second Event");

        let fenced = SiteReport {
            fenced_by: Some("c".into()),
            fenced_by_device: Some("prod-hsm-c".into()),
            site_epoch: 2,
            fence_sequence: 48,
            lost_writes: 3,
            ..site_report(SiteRole::Fenced)
        };
        let (status, events) = observe_site(&spec, Some(&passive), &fenced);
        assert_eq!(
            (status.fenced_by.as_deref(), status.lost_writes),
            (Some("c"), Some(3))
        );
        assert!(events[0].warning && events[0].message.contains("3 write(s)"));
        let (_, again) = observe_site(&spec, Some(&status), &fenced);
        assert!(again.is_empty());

        let promoted = SiteReport {
            promotion_done: Some("p1".into()),
            site_epoch: 1,
            ..site_report(SiteRole::Active)
        };
        let (status, events) = observe_site(&spec, Some(&passive), &promoted);
        assert_eq!(status.last_promotion.as_deref(), Some("p1"));
        assert_eq!(
            events.iter().map(|e| e.reason).collect::<Vec<_>>(),
            ["SitePromoted"]
        );
        assert_eq!(
            status.applied_sequence, None,
            "an active site applies no archive"
        );
    }

    #[test]
    fn a_caught_up_site_refreshes_its_point_within_seconds_a_lagging_one_once_a_heartbeat() {
        let spec = site_spec();
        let (first, _) = observe_site(&spec, None, &site_report(SiteRole::Passive));
        let moved = |sequence: u64, time_ms: u64, lag_ms: u64| SiteReport {
            source_sequence: sequence,
            source_time_ms: Some(time_ms),
            applied_sequence: sequence,
            applied_time_ms: Some(time_ms),
            lag_ms,
            ..site_report(SiteRole::Passive)
        };
        let (soon, _) = observe_site(&spec, Some(&first), &moved(51, 5_000, 0));
        assert_eq!(soon, first, "4 s later: the same point");
        let (later, _) = observe_site(&spec, Some(&first), &moved(52, 11_000, 0));
        assert_eq!(later.applied_sequence, Some(52), "caught up, 10 s on");
        let (lagging, _) = observe_site(&spec, Some(&first), &moved(52, 11_000, 2_000));
        assert_eq!(
            lagging.applied_sequence,
            Some(50),
            "behind: waits for the heartbeat"
        );
        let (heartbeat, _) = observe_site(&spec, Some(&first), &moved(60, 61_000, 2_000));
        assert_eq!(heartbeat.applied_sequence, Some(60));
    }
}
