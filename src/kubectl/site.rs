//! `kubectl hsm site status|promote|rejoin`: a device spread over clusters, as its
//! controller reports it in `status.site`. Promotion is manual only and shows both sites
//! side by side first; the request reaches the primary's node by annotation.

use k8s_openapi::jiff::Timestamp;
use serde::Serialize;
use serde_json::json;

use super::args::{SiteAction, SiteRequest, Wait};
use super::devices::{get_device, patch_device};
use super::render;
use super::wait::{Outcome, Step, poll};
use super::{KubectlError, OutputFormat, Session, Term};
use crate::crd::{
    FollowArchive, HSMDevice, SITE_DRAIN_ANNOTATION, SITE_PROMOTE_ANNOTATION, SiteRole, SiteSpec,
    SiteStatus,
};

/// What `site status -o json|yaml` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteView {
    pub device: String,
    pub spec: SiteSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<SiteStatus>,
}

impl SiteView {
    pub fn new(device: &HSMDevice) -> Result<Self, KubectlError> {
        let name = device.metadata.name.clone().unwrap_or_default();
        let spec = device.spec.site.clone().ok_or_else(|| {
            KubectlError::Refused(format!(
                "HSMDevice {name} has no spec.site: it is a single-site device; add spec.site \
                 (name, and followArchive on a passive site) to spread it over clusters"
            ))
        })?;
        Ok(Self {
            device: name,
            spec,
            status: device.status.clone().and_then(|s| s.site),
        })
    }
}

fn time(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    t.map_or_else(|| "-".to_string(), |t| t.0.to_string())
}

/// The site, and for a passive one both sites side by side: what a promotion now loses.
pub fn site_table(view: &SiteView) -> String {
    let Some(status) = &view.status else {
        return format!(
            "HSMDevice {} site {}: no report from the primary's node yet\n",
            view.device, view.spec.name
        );
    };
    let mut out = format!(
        "HSMDevice {} site {}: {:?} at site epoch {}\n",
        view.device, view.spec.name, status.role, status.site_epoch
    );
    if let Some(follow) = &view.spec.follow_archive {
        let source = status.source_sequence.unwrap_or(0);
        let applied = status.applied_sequence.unwrap_or(0);
        out.push_str(&format!(
            "  follows HSMDevice {} through {}\n",
            follow.device, follow.url
        ));
        let mut table = render::Table::new(&["", "ACTIVE SITE (ARCHIVE)", "THIS SITE (APPLIED)"]);
        table.row(vec![
            "sequence".into(),
            source.to_string(),
            applied.to_string(),
        ]);
        table.row(vec![
            "written".into(),
            time(status.source_time.as_ref()),
            time(status.applied_time.as_ref()),
        ]);
        out.push_str(&table.render("  "));
        out.push_str(&format!(
            "  lag {}; a promotion now loses {} archived change(s) not applied here, and \
             whatever the active site acknowledged after its last archive step\n",
            status
                .lag_seconds
                .map_or("unknown".into(), render::human_duration),
            source.saturating_sub(applied)
        ));
    }
    if status.role == SiteRole::Fenced {
        out.push_str(&format!(
            "  fenced by site {} (HSMDevice {}) from sequence {}; {} write(s) taken here after \
             that point are lost, never merged\n",
            status.fenced_by.as_deref().unwrap_or("?"),
            status.fenced_by_device.as_deref().unwrap_or("?"),
            status.fence_sequence.unwrap_or(0),
            status.lost_writes.unwrap_or(0)
        ));
    }
    if status.draining {
        out.push_str("  draining for a planned switchover: no writes taken, still archiving\n");
    }
    if let Some(error) = &status.last_error {
        out.push_str(&format!("  last error: {error}\n"));
    }
    out
}

/// Why the site cannot be promoted, if it cannot: only a passive site is.
pub fn promote_refusal(view: &SiteView) -> Option<String> {
    let role = view.status.as_ref().map(|st| st.role);
    (view.spec.follow_archive.is_none() || role != Some(SiteRole::Passive)).then(|| {
        format!(
            "site {} of HSMDevice {} is not passive ({}): only a passive site is promoted",
            view.spec.name,
            view.device,
            role.map_or("no report yet".into(), |r| format!("{r:?}"))
        )
    })
}

/// Why the site cannot drain, if it cannot: only an active site takes writes to stop (a
/// promoted site keeps its `followArchive` and is active by its status).
pub fn drain_refusal(view: &SiteView) -> Option<String> {
    let role = view.status.as_ref().map(|st| st.role);
    let passive = match role {
        Some(role) => role != SiteRole::Active,
        None => view.spec.follow_archive.is_some(),
    };
    passive.then(|| match role {
        Some(SiteRole::Fenced) => format!(
            "site {} of HSMDevice {} is fenced and takes no writes to drain; rejoin it as a \
             passive site (kubectl hsm site rejoin {})",
            view.spec.name, view.device, view.device
        ),
        _ => format!(
            "site {} of HSMDevice {} is passive: drain the active site, then promote this one",
            view.spec.name, view.device
        ),
    })
}

/// How promotion request `id` ended, as `status.site` reports it; `None` while pending.
pub fn promotion_outcome(
    id: &str,
    site: Option<&SiteStatus>,
) -> Option<Result<SiteStatus, String>> {
    let site = site?;
    if site.last_promotion.as_deref() == Some(id) {
        return Some(Ok(site.clone()));
    }
    site.last_error
        .as_deref()
        .filter(|e| e.starts_with(id))
        .map(|e| Err(e.to_string()))
}

/// The site's role for a progress line.
pub fn role_line(site: Option<&SiteStatus>) -> String {
    format!(
        "site role {}",
        site.map_or("unknown".into(), |st| format!("{:?}", st.role))
    )
}

/// A fenced site's way back: it follows the site promoted over it, through the bucket of
/// its own `spec.backup`.
pub struct Rejoin {
    pub follow: FollowArchive,
    /// What the rejoin means, for the operator: whom it follows, what is lost.
    pub summary: String,
}

impl Rejoin {
    pub fn plan(device: &HSMDevice, view: &SiteView) -> Result<Self, String> {
        let status = view.status.as_ref();
        let role = status.map(|st| st.role);
        let (Some(SiteRole::Fenced), Some(status), Some(by_device)) = (
            role,
            status,
            status.and_then(|st| st.fenced_by_device.clone()),
        ) else {
            return Err(format!(
                "site {} of HSMDevice {} is {}, not fenced: only a site another was promoted \
                 over rejoins",
                view.spec.name,
                view.device,
                role.map_or("not reported yet".into(), |r| format!("{r:?}"))
            ));
        };
        let Some(backup) = &device.spec.backup else {
            return Err(format!(
                "HSMDevice {} has no spec.backup to learn the bucket from; set \
                 spec.site.followArchive by hand",
                view.device
            ));
        };
        let by = status.fenced_by.as_deref().unwrap_or("?");
        let summary = format!(
            "site {} rejoins as passive, following site {by} (HSMDevice {by_device}) in {}; the \
             {} write(s) it took after sequence {} are lost, not replayed: its tokens become a \
             copy of site {by}'s archive\n",
            view.spec.name,
            backup.url,
            status.lost_writes.unwrap_or(0),
            status.fence_sequence.unwrap_or(0),
        );
        Ok(Self {
            follow: FollowArchive {
                url: backup.url.clone(),
                endpoint: backup.endpoint.clone(),
                region: backup.region.clone(),
                credentials_secret: backup.credentials_secret.clone(),
                device: by_device,
                archive_name: Some(backup.archive_name().to_string()),
            },
            summary,
        })
    }
}

/// Drains the active site (or calls the drain off) and waits until its node says so.
async fn drain(
    s: &Session,
    r: &SiteRequest,
    view: &SiteView,
    undo: bool,
    wait: Wait,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    if let Some(refusal) = drain_refusal(view) {
        return Err(KubectlError::Refused(refusal));
    }
    let value = if undo {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(Timestamp::now().to_string())
    };
    let patch = json!({"metadata": {"annotations": {SITE_DRAIN_ANNOTATION: value}}});
    patch_device(s, &r.device, &patch).await?;
    if !wait.enabled {
        return term.print(&format!(
            "hsmdevice {}: drain {}\n",
            r.device,
            if undo { "called off" } else { "requested" }
        ));
    }
    let outcome = poll(wait.timeout, s.poll_interval, async || {
        let device = get_device(s, &r.device).await?;
        match device.status.and_then(|st| st.site) {
            Some(st) if st.draining != undo => Ok(Step::Done(st)),
            other => Ok(Step::Pending(format!(
                "draining {}",
                other.is_some_and(|st| st.draining)
            ))),
        }
    })
    .await?;
    match outcome {
        Outcome::Done(_) if undo => term.print(&format!(
            "hsmdevice {}: site {} takes writes again\n",
            r.device, view.spec.name
        )),
        Outcome::Done(_) => term.print(&format!(
            "hsmdevice {}: site {} takes no writes and archives what it has; promote the \
             passive site once its preflight shows nothing to lose\n",
            r.device, view.spec.name
        )),
        Outcome::TimedOut { last_seen } => Err(KubectlError::Timeout {
            after: wait.timeout,
            waiting_for: format!(
                "site {} to {}",
                view.spec.name,
                if undo { "take writes again" } else { "drain" }
            ),
            last_seen,
            hint: format!("watch `kubectl hsm site status {}`", r.device),
        }),
    }
}

pub(crate) async fn site(
    s: &Session,
    r: &SiteRequest,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let device = get_device(s, &r.device).await?;
    let view = SiteView::new(&device)?;
    match r.action {
        SiteAction::Status(OutputFormat::Table) => term.print(&site_table(&view)),
        SiteAction::Status(other) => term.print(&render::serialized(&view, other)?),
        SiteAction::Promote { yes, wait } => promote(s, r, &view, yes, wait, term).await,
        SiteAction::Rejoin { yes, wait } => rejoin(s, r, &device, &view, yes, wait, term).await,
        SiteAction::Drain { undo, wait } => drain(s, r, &view, undo, wait, term).await,
    }
}

async fn promote(
    s: &Session,
    r: &SiteRequest,
    view: &SiteView,
    yes: bool,
    wait: Wait,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    if let Some(refusal) = promote_refusal(view) {
        return Err(KubectlError::Refused(refusal));
    }
    term.print(&site_table(view))?;
    if !yes {
        return term.print(&format!(
            "not promoted: this is the preflight. Promoting fences the active site (it stops \
             taking writes at its next archive step) and is never automatic; to go ahead: \
             kubectl hsm site promote {} --yes\n",
            r.device
        ));
    }
    let id = Timestamp::now().to_string();
    // A drain left from an earlier switchover must not hold the promoted site.
    let patch = json!({"metadata": {"annotations": {
        SITE_PROMOTE_ANNOTATION: id,
        SITE_DRAIN_ANNOTATION: null,
    }}});
    patch_device(s, &r.device, &patch).await?;
    term.note(&format!(
        "promotion of site {} requested ({id}); it waits out the active site's lease ({} s) \
         before taking writes",
        view.spec.name,
        view.spec.lease_seconds()
    ));
    if !wait.enabled {
        return term.print(&format!(
            "hsmdevice {}: promotion requested; not waiting (follow with `kubectl hsm site status {}`; once it is active, remove spec.site.followArchive: only a waiting promote removes it)\n",
            r.device, r.device
        ));
    }
    let outcome = poll(wait.timeout, s.poll_interval, async || {
        let device = get_device(s, &r.device).await?;
        let site = device.status.and_then(|st| st.site);
        Ok(match promotion_outcome(&id, site.as_ref()) {
            Some(done) => Step::Done(done),
            None => Step::Pending(role_line(site.as_ref())),
        })
    })
    .await?;
    match outcome {
        Outcome::Done(Ok(st)) => {
            // The promoted site follows nothing any more: a followArchive left in its spec
            // would make it follow again, unasked, once another site is promoted over it.
            patch_device(
                s,
                &r.device,
                &json!({"spec": {"site": {"followArchive": null}}}),
            )
            .await?;
            term.print(&format!(
                "hsmdevice {}: site {} is active at site epoch {}; the old active site is \
                 fenced; spec.site.followArchive removed (remove it from your manifests too)\n",
                r.device, view.spec.name, st.site_epoch
            ))
        }
        Outcome::Done(Err(error)) => Err(KubectlError::Refused(format!(
            "the promotion of site {} failed: {error}",
            view.spec.name
        ))),
        Outcome::TimedOut { last_seen } => Err(KubectlError::Timeout {
            after: wait.timeout,
            waiting_for: format!("the promotion of site {}", view.spec.name),
            last_seen,
            hint: format!(
                "the request stays in annotation {SITE_PROMOTE_ANNOTATION}; watch `kubectl hsm \
                 site status {}`",
                r.device
            ),
        }),
    }
}

/// A fenced site follows the site promoted over it, through the same bucket as its own
/// archive: `spec.site.followArchive` is set from `spec.backup` and the fence.
async fn rejoin(
    s: &Session,
    r: &SiteRequest,
    device: &HSMDevice,
    view: &SiteView,
    yes: bool,
    wait: Wait,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let rejoin = Rejoin::plan(device, view).map_err(KubectlError::Refused)?;
    let by_device = rejoin.follow.device.clone();
    term.print(&rejoin.summary)?;
    let follow = json!({
        "url": rejoin.follow.url,
        "endpoint": rejoin.follow.endpoint,
        "region": rejoin.follow.region,
        "credentialsSecret": rejoin.follow.credentials_secret,
        "device": rejoin.follow.device,
        "archiveName": rejoin.follow.archive_name,
    });
    if !yes {
        return term.print(&format!(
            "not changed: to go ahead: kubectl hsm site rejoin {} --yes\n",
            r.device
        ));
    }
    let patch = json!({
        "metadata": {"annotations": {SITE_DRAIN_ANNOTATION: null}},
        "spec": {"site": {"followArchive": follow}},
    });
    patch_device(s, &r.device, &patch).await?;
    if !wait.enabled {
        return term.print(&format!("hsmdevice {}: rejoining\n", r.device));
    }
    let outcome = poll(wait.timeout, s.poll_interval, async || {
        let device = get_device(s, &r.device).await?;
        match device.status.and_then(|st| st.site) {
            Some(st) if st.role == SiteRole::Passive => Ok(Step::Done(st)),
            other => Ok(Step::Pending(role_line(other.as_ref()))),
        }
    })
    .await?;
    match outcome {
        Outcome::Done(st) => term.print(&format!(
            "hsmdevice {}: site {} is passive, following HSMDevice {by_device} (applied sequence {})\n",
            r.device,
            view.spec.name,
            st.applied_sequence.unwrap_or(0)
        )),
        Outcome::TimedOut { last_seen } => Err(KubectlError::Timeout {
            after: wait.timeout,
            waiting_for: format!("site {} to follow HSMDevice {by_device}", view.spec.name),
            last_seen,
            hint: format!("watch `kubectl hsm site status {}`", r.device),
        }),
    }
}
