//! `kubectl hsm backup list|now|verify`: the archive as the controller reports it in
//! `status.backup`, and requests carried to the primary's node by annotation.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde_json::json;

use super::args::{BackupAction, BackupRequest, RestoreRequest, Wait};
use super::devices::{get_device, patch_device};
use super::render::{self, Table};
use super::wait::{Outcome, Step, poll};
use super::{KubectlError, OutputFormat, Session, Term};
use crate::archive::plan::condition_types;
use crate::crd::{
    BACKUP_NOW_ANNOTATION, BACKUP_VERIFY_ANNOTATION, BackupSpec, BackupStatus, HSMDevice,
    RESTORE_ANNOTATION, RestoreAnnotation,
};

/// What `backup list -o json|yaml` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupView {
    pub device: String,
    pub spec: BackupSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<BackupStatus>,
    pub conditions: Vec<Condition>,
}

impl BackupView {
    pub fn new(device: &HSMDevice) -> Result<Self, KubectlError> {
        let name = device.metadata.name.clone().unwrap_or_default();
        let spec = device.spec.backup.clone().ok_or_else(|| no_backup(&name))?;
        let status = device.status.clone().unwrap_or_default();
        Ok(Self {
            device: name,
            spec,
            status: status.backup,
            conditions: status
                .conditions
                .into_iter()
                .filter(|c| condition_types::ALL.contains(&c.type_.as_str()))
                .collect(),
        })
    }
}

fn no_backup(device: &str) -> KubectlError {
    KubectlError::Refused(format!(
        "HSMDevice {device} has no spec.backup, so nothing archives it; add spec.backup (url, \
         credentialsSecret) as in examples/mirrored-hsm-device.yaml"
    ))
}

/// The archive as a person reads it.
pub fn backup_table(view: &BackupView, now: Timestamp) -> String {
    let mut out = format!(
        "HSMDevice {}  archive {} ({})\n",
        view.device,
        view.spec.archive_name(),
        view.spec.url
    );
    for c in &view.conditions {
        out.push_str(&format!(
            "  {}={} {}: {}\n",
            c.type_, c.status, c.reason, c.message
        ));
    }
    let Some(status) = &view.status else {
        out.push_str("  no report from the primary's node yet\n");
        return out;
    };
    let lag = status
        .lag_seconds
        .map_or_else(|| "unknown".to_string(), render::human_duration);
    out.push_str(&format!(
        "  archived through sequence {} on {} ({} behind; lag {lag}; reported {})\n",
        status.archived_sequence,
        status.node.as_deref().unwrap_or("<none>"),
        status.lag_sequences,
        render::age(status.observed_time.as_ref(), now, "never"),
    ));
    if let Some(error) = &status.last_error {
        out.push_str(&format!("  last error: {error}\n"));
    }
    match &status.last_verified {
        Some(d) => out.push_str(&format!(
            "  last drill: {} at sequence {} ({} secrets, {} ms), {} ago{}\n",
            if d.verified { "verified" } else { "FAILED" },
            d.sequence,
            d.secrets,
            d.duration_ms,
            render::age(Some(&d.finished_at), now, "never"),
            d.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        )),
        None => out.push_str("  last drill: none yet (kubectl hsm backup verify)\n"),
    }
    if let Some(r) = &status.last_restore {
        out.push_str(&format!(
            "  last restore: {} to sequence {} ({} secrets), {} ago{}\n",
            if r.succeeded { "succeeded" } else { "FAILED" },
            r.sequence,
            r.secrets,
            render::age(Some(&r.finished_at), now, "never"),
            r.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ));
    }
    if status.bases.is_empty() {
        out.push_str("  restorable points: none yet\n");
        return out;
    }
    out.push_str("  restorable points (a restore starts at a base and replays what follows):\n");
    let mut table = Table::new(&["BASE", "EPOCH", "SEQUENCE", "WRITTEN", "AGE"]);
    for (i, b) in status.bases.iter().enumerate().rev() {
        table.row(vec![
            (i + 1).to_string(),
            b.epoch.to_string(),
            b.sequence.to_string(),
            b.time.0.to_string(),
            render::age(Some(&b.time), now, "-"),
        ]);
    }
    out.push_str(&table.render("  "));
    out
}

pub(crate) async fn backup(
    s: &Session,
    r: &BackupRequest,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let device = get_device(s, &r.device).await?;
    let view = BackupView::new(&device)?;
    match r.action {
        BackupAction::List(OutputFormat::Table) => {
            term.print(&backup_table(&view, Timestamp::now()))
        }
        BackupAction::List(other) => term.print(&render::serialized(&view, other)?),
        BackupAction::Now(wait) => ask(s, r, wait, BACKUP_NOW_ANNOTATION, term).await,
        BackupAction::Verify(wait) => ask(s, r, wait, BACKUP_VERIFY_ANNOTATION, term).await,
    }
}

/// Sets the request annotation (its value, the time now, is the request id) and waits
/// for the controller to report it done.
async fn ask(
    s: &Session,
    r: &BackupRequest,
    wait: Wait,
    annotation: &str,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let id = Timestamp::now().to_string();
    let patch = json!({"metadata": {"annotations": {annotation: id}}});
    patch_device(s, &r.device, &patch).await?;
    let verify = annotation == BACKUP_VERIFY_ANNOTATION;
    let what = if verify {
        "restore drill"
    } else {
        "base snapshot"
    };
    term.note(&format!(
        "{what} of HSMDevice {} requested ({id})",
        r.device
    ));
    if !wait.enabled {
        return term.print(&format!(
            "hsmdevice {}: {what} requested; not waiting (follow with `kubectl hsm backup list {}`)\n",
            r.device, r.device
        ));
    }
    let outcome = poll(wait.timeout, s.poll_interval, async || {
        let device = get_device(s, &r.device).await?;
        let backup = device.status.and_then(|st| st.backup).unwrap_or_default();
        if verify {
            match backup.last_verified {
                Some(d) if d.request == id => Ok(Step::Done(Some(d))),
                _ => Ok(Step::Pending(format!(
                    "last drill: {}",
                    backup
                        .last_verified
                        .map_or("none".into(), |d| d.finished_at.0.to_string())
                ))),
            }
        } else if backup.last_base_request.as_deref() == Some(id.as_str()) {
            Ok(Step::Done(None))
        } else {
            Ok(Step::Pending(format!(
                "{} restorable points, archived through sequence {}{}",
                backup.bases.len(),
                backup.archived_sequence,
                error_suffix(backup.last_error)
            )))
        }
    })
    .await?;
    match outcome {
        Outcome::Done(Some(drill)) if drill.verified => term.print(&format!(
            "hsmdevice {}: restore drill verified the archive at sequence {} ({} secrets in {} ms)\n",
            r.device, drill.sequence, drill.secrets, drill.duration_ms
        )),
        Outcome::Done(Some(drill)) => Err(KubectlError::Refused(format!(
            "the restore drill of HSMDevice {} did not verify the archive: {}; see the \
             BackupVerified condition and the node plugin's log on {}",
            r.device,
            drill.message.as_deref().unwrap_or("no detail"),
            view_node(s, &r.device).await
        ))),
        Outcome::Done(None) => term.print(&format!(
            "hsmdevice {}: base snapshot written (a new restorable point)\n",
            r.device
        )),
        Outcome::TimedOut { last_seen } => Err(KubectlError::Timeout {
            after: wait.timeout,
            waiting_for: format!("the {what} of HSMDevice {}", r.device),
            last_seen,
            hint: format!(
                "the request stays in annotation {annotation} and the controller carries it \
                 out when the primary's node answers; watch `kubectl hsm backup list {}`",
                r.device
            ),
        }),
    }
}

async fn view_node(s: &Session, device: &str) -> String {
    get_device(s, device)
        .await
        .ok()
        .and_then(|d| d.status)
        .and_then(|st| st.backup)
        .and_then(|b| b.node)
        .unwrap_or_else(|| "the primary's node".into())
}

/// `kubectl hsm restore`: says which base the point starts from, asks the controller by
/// annotation, and waits for the primary's node to report the restore.
pub(crate) async fn restore(
    s: &Session,
    r: &RestoreRequest,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let device = get_device(s, &r.device).await?;
    let view = BackupView::new(&device)?;
    let bases = view
        .status
        .as_ref()
        .map(|b| b.bases.clone())
        .unwrap_or_default();
    let admits = |b: &&crate::crd::BackupPoint| match (r.to_sequence, r.to_time) {
        (Some(n), _) => b.sequence <= n,
        (None, Some(t)) => b.time.0 <= t,
        (None, None) => true,
    };
    match bases
        .iter()
        .filter(admits)
        .max_by_key(|b| (b.epoch, b.time.0))
    {
        Some(b) => term.note(&format!(
            "restoring HSMDevice {} from the base at sequence {} (epoch {}, written {})",
            r.device, b.sequence, b.epoch, b.time.0
        )),
        None if !bases.is_empty() => {
            return Err(KubectlError::Refused(format!(
                "HSMDevice {} has no archived point that early: its oldest base is sequence {} \
                 written {}; `kubectl hsm backup list {}` shows every restorable point",
                r.device, bases[0].sequence, bases[0].time.0, r.device
            )));
        }
        None => term.note(&format!(
            "HSMDevice {} reports no restorable point yet; the node checks the bucket itself",
            r.device
        )),
    }
    let id = Timestamp::now().to_string();
    let request = RestoreAnnotation {
        id: id.clone(),
        to_sequence: r.to_sequence,
        to_time: r.to_time.map(|t| t.to_string()),
        force: r.force,
    };
    let value = serde_json::to_string(&request)
        .map_err(|e| KubectlError::Refused(format!("encode the restore request: {e}")))?;
    let patch = json!({"metadata": {"annotations": {RESTORE_ANNOTATION: value}}});
    patch_device(s, &r.device, &patch).await?;
    term.note(&format!(
        "restore of HSMDevice {} requested ({id})",
        r.device
    ));
    if !r.wait.enabled {
        return term.print(&format!(
            "hsmdevice {}: restore requested; not waiting (follow with `kubectl hsm backup list {}`)\n",
            r.device, r.device
        ));
    }
    let outcome = poll(r.wait.timeout, s.poll_interval, async || {
        let device = get_device(s, &r.device).await?;
        let backup = device.status.and_then(|st| st.backup).unwrap_or_default();
        match backup.last_restore {
            Some(done) if done.request == id => Ok(Step::Done(done)),
            _ => Ok(Step::Pending(format!(
                "archived through sequence {}{}",
                backup.archived_sequence,
                error_suffix(backup.last_error)
            ))),
        }
    })
    .await?;
    match outcome {
        Outcome::Done(done) if done.succeeded => term.print(&format!(
            "hsmdevice {}: restored to archive sequence {}{} ({} secrets, {} bytes){}\n",
            r.device,
            done.sequence,
            done.time
                .map(|t| format!(" written {}", t.0))
                .unwrap_or_default(),
            done.secrets,
            done.bytes,
            done.message.map(|m| format!("; {m}")).unwrap_or_default()
        )),
        Outcome::Done(done) => Err(KubectlError::Refused(format!(
            "the restore of HSMDevice {} failed: {}",
            r.device,
            done.message.as_deref().unwrap_or("no detail")
        ))),
        Outcome::TimedOut { last_seen } => Err(KubectlError::Timeout {
            after: r.wait.timeout,
            waiting_for: format!("the restore of HSMDevice {}", r.device),
            last_seen,
            hint: format!(
                "the request stays in annotation {RESTORE_ANNOTATION} and the primary's node \
                 may still complete it; watch `kubectl hsm backup list {}`",
                r.device
            ),
        }),
    }
}

/// "; last error: …" when the archive reports one, for progress lines.
fn error_suffix(error: Option<String>) -> String {
    error
        .map(|e| format!("; last error: {e}"))
        .unwrap_or_default()
}
