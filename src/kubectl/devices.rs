//! HSMDevice commands: devices, health, mirror status and failover.

use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;

use super::args::{FailoverRequest, MirrorStatusRequest};
use super::error::Call;
use super::render::{self, HealthReport, MirrorStatusView};
use super::wait::{Outcome, Step, poll};
use super::{KubectlError, OutputFormat, Session, Term};
use crate::crd::{HSMDevice, MirroringPolicy, NodeHealth, SWITCHOVER_ANNOTATION};

pub(crate) fn devices_api(s: &Session) -> Api<HSMDevice> {
    Api::all(s.client.clone())
}

async fn list_devices(s: &Session) -> Result<Vec<HSMDevice>, KubectlError> {
    Ok(devices_api(s)
        .list(&ListParams::default())
        .await
        .map_err(|e| Call::hsmdevice("list", None).fail(e))?
        .items)
}

/// A merge patch of one HSMDevice (an annotation the controller acts on, or a spec change).
pub(crate) async fn patch_device(
    s: &Session,
    name: &str,
    patch: &serde_json::Value,
) -> Result<(), KubectlError> {
    devices_api(s)
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|e| Call::hsmdevice("patch", Some(name)).fail(e))?;
    Ok(())
}

pub(crate) async fn get_device(s: &Session, name: &str) -> Result<HSMDevice, KubectlError> {
    devices_api(s)
        .get(name)
        .await
        .map_err(|e| match Call::hsmdevice("get", Some(name)).fail(e) {
            KubectlError::NotFound { kind, name, .. } => KubectlError::NotFound {
                kind,
                name,
                hint: "; see the devices with `kubectl hsm devices`".into(),
            },
            other => other,
        })
}

pub(crate) async fn list(
    s: &Session,
    output: OutputFormat,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let items = list_devices(s).await?;
    if items.is_empty() && output == OutputFormat::Table {
        term.note(&render::empty_notice("HSMDevice", None));
    }
    term.print(&render::device_list(&items, output, Timestamp::now())?)
}

pub(crate) async fn health(
    s: &Session,
    output: OutputFormat,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let report = HealthReport::new(&list_devices(s).await?);
    match output {
        OutputFormat::Table if report.devices.is_empty() => {
            term.note(&render::empty_notice("HSMDevice", None))
        }
        OutputFormat::Table => term.print(&render::health_table(&report))?,
        other => term.print(&render::serialized(&report, other)?)?,
    }
    let not_ready = report.not_ready();
    if not_ready.is_empty() {
        Ok(())
    } else {
        Err(KubectlError::NotReady {
            count: not_ready.len(),
            total: report.devices.len(),
            which: not_ready.join(", "),
        })
    }
}

pub(crate) async fn mirror_status(
    s: &Session,
    r: &MirrorStatusRequest,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let view = MirrorStatusView::new(&get_device(s, &r.device).await?);
    match r.output {
        OutputFormat::Table => term.print(&render::mirror_table(&view, Timestamp::now())),
        other => term.print(&render::serialized(&view, other)?),
    }
}

/// Why a switchover to `to` cannot be asked for, judged from the device as read.
pub fn refuse_switchover(device: &HSMDevice, to: &str) -> Option<String> {
    let name = device.metadata.name.as_deref().unwrap_or_default();
    if device.mirroring().policy == MirroringPolicy::None {
        return Some(format!(
            "HSMDevice {name} has mirroring policy None (one token, no mirrors): there is no \
             other node to fail over to"
        ));
    }
    let status = device.status.clone().unwrap_or_default();
    if status.primary_node.as_deref() == Some(to) {
        return Some(format!(
            "{to} is already the primary of HSMDevice {name} (epoch {}); nothing to do",
            status.epoch
        ));
    }
    let Some(node) = status.nodes.iter().find(|n| n.node == to) else {
        let known: Vec<&str> = status.nodes.iter().map(|n| n.node.as_str()).collect();
        return Some(format!(
            "{to} is not a node of HSMDevice {name} (its nodes: {}); pick one from \
             `kubectl hsm mirror status {name}`",
            if known.is_empty() {
                "none reported in status yet".to_string()
            } else {
                known.join(", ")
            }
        ));
    };
    if node.health == NodeHealth::Unhealthy {
        return Some(format!(
            "{to} is Unhealthy in HSMDevice {name} ({}); promote a healthy node",
            node.last_error.as_deref().unwrap_or("no error reported")
        ));
    }
    None
}

/// One progress line from the device status (phase, primary, conditions).
pub fn progress_line(device: &HSMDevice) -> String {
    let status = device.status.clone().unwrap_or_default();
    let mut line = format!(
        "phase {:?}, primary {}, epoch {}",
        status.phase,
        status.primary_node.as_deref().unwrap_or("<none>"),
        status.epoch
    );
    for c in &status.conditions {
        line.push_str(&format!("; {}={}", c.type_, c.status));
        if !c.reason.is_empty() {
            line.push_str(&format!(" ({})", c.reason));
        }
        if !c.message.is_empty() {
            line.push_str(&format!(": {}", c.message));
        }
    }
    line
}

pub(crate) async fn failover(
    s: &Session,
    r: &FailoverRequest,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let device = get_device(s, &r.device).await?;
    if let Some(why) = refuse_switchover(&device, &r.to) {
        return Err(KubectlError::Refused(format!(
            "refusing to fail over: {why}"
        )));
    }
    // The controller reads `NODE` or `NODE,force`.
    let request = if r.force {
        format!("{},force", r.to)
    } else {
        r.to.clone()
    };
    let patch = json!({"metadata": {"annotations": {SWITCHOVER_ANNOTATION: request}}});
    patch_device(s, &r.device, &patch).await?;
    let from = device
        .status
        .as_ref()
        .and_then(|st| st.primary_node.clone())
        .unwrap_or_else(|| "<none>".into());
    term.note(&format!(
        "switchover of HSMDevice {} from {from} to {} requested",
        r.device, r.to
    ));
    if !r.wait.enabled {
        return term.print(&format!(
            "hsmdevice {}: switchover to {} requested; not waiting (follow with `kubectl hsm mirror status {}`)\n",
            r.device, r.to, r.device
        ));
    }
    let mut last_printed = String::new();
    let outcome = poll(r.wait.timeout, s.poll_interval, async || {
        let dev = get_device(s, &r.device).await?;
        if dev
            .status
            .as_ref()
            .and_then(|st| st.primary_node.as_deref())
            == Some(r.to.as_str())
        {
            return Ok(Step::Done(dev));
        }
        let line = progress_line(&dev);
        if line != last_printed {
            term.note(&format!("  {line}"));
            last_printed = line.clone();
        }
        Ok(Step::Pending(line))
    })
    .await?;
    match outcome {
        Outcome::Done(dev) => {
            let status = dev.status.unwrap_or_default();
            term.print(&format!(
                "hsmdevice {}: {} is now the primary (epoch {}, phase {:?})\n",
                r.device, r.to, status.epoch, status.phase
            ))
        }
        Outcome::TimedOut { last_seen } => Err(KubectlError::Timeout {
            after: r.wait.timeout,
            waiting_for: format!("HSMDevice {} to make {} its primary", r.device, r.to),
            last_seen,
            hint: format!(
                "the request stays in annotation {SWITCHOVER_ANNOTATION} and the controller may \
                 still complete it; watch `kubectl hsm mirror status {}`, or cancel with \
                 `kubectl annotate hsmdevice {} {SWITCHOVER_ANNOTATION}-`",
                r.device, r.device
            ),
        }),
    }
}
