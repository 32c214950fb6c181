//! One reconcile round of one device.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::jiff::Timestamp;

use super::{Agents, ControllerMetrics};
use crate::archive::plan::{self as backup_plan, ArchiveAsk, ArchiveReport, BackupEvent};
use crate::crd::{
    BACKUP_NOW_ANNOTATION, BACKUP_VERIFY_ANNOTATION, HSMDevice, HSMDeviceStatus,
    RESTORE_ANNOTATION, SITE_DRAIN_ANNOTATION, SITE_PROMOTE_ANNOTATION, SWITCHOVER_ANNOTATION,
};
use crate::failover::{
    self, Action, DeviceView, LeaseFacts, Observations, PlanConfig, Probe, SwitchoverOutcome,
    SwitchoverRequest,
};
use crate::state::{EventRecord, EventType, ObjectRef, StateError, StateStore};

/// What a round did (for the loop and for tests).
#[derive(Debug, Default)]
pub struct RoundOutcome {
    /// Plan again no later than this.
    pub replan_at: Option<Timestamp>,
    /// The status write lost a race: plan again at once.
    pub conflict: bool,
    pub actions_failed: usize,
}

/// Reconciles devices; keeps the timing facts the fencing rule needs between rounds.
pub struct DeviceController<S, A> {
    state: Arc<S>,
    agents: Arc<A>,
    config: PlanConfig,
    metrics: ControllerMetrics,
    /// When this controller started acting: renewals issued before are not ours to vouch for.
    leader_since: Mutex<Timestamp>,
    /// Per device: (epoch, instant the primary's last renewal or promotion was acknowledged).
    renewals: Mutex<HashMap<String, (u64, Timestamp)>>,
    /// Per (device, node): the ready label last written and when. A round writes a label
    /// only when it changes, or to repair drift once [`LABEL_RESYNC`] has passed.
    labels: Mutex<HashMap<(String, String), (bool, Timestamp)>>,
    /// Restore annotations already reported as unreadable, per device.
    bad_restores: Mutex<BTreeSet<(String, String)>>,
}

/// How long a node label written by this leader is trusted before it is written again
/// (someone may have edited it).
pub const LABEL_RESYNC: std::time::Duration = std::time::Duration::from_secs(600);

impl<S: StateStore, A: Agents> DeviceController<S, A> {
    pub fn new(
        state: Arc<S>,
        agents: Arc<A>,
        config: PlanConfig,
        metrics: ControllerMetrics,
    ) -> Self {
        Self {
            state,
            agents,
            config,
            metrics,
            leader_since: Mutex::new(Timestamp::now()),
            renewals: Mutex::default(),
            labels: Mutex::default(),
            bad_restores: Mutex::default(),
        }
    }

    /// Marks the start of leadership (renewals by a previous leader cannot be vouched for).
    pub fn became_leader(&self, at: Timestamp) {
        *self.leader_since.lock().unwrap_or_else(|p| p.into_inner()) = at;
        self.renewals_mut().clear();
        self.labels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn renewals_mut(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Timestamp)>> {
        self.renewals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Probe, plan, store the status, execute the actions.
    #[tracing::instrument(skip_all, fields(device = %device.metadata.name.as_deref().unwrap_or_default()))]
    pub async fn reconcile(&self, device: &HSMDevice) -> Result<RoundOutcome, StateError> {
        let name = device.metadata.name.clone().unwrap_or_default();
        let regarding = ObjectRef::device(&name, device.metadata.uid.as_deref());
        let view = DeviceView::of(device);
        let status = device.status.clone().unwrap_or_default();

        let mut nodes: BTreeSet<String> = self.agents.nodes(device).await.into_iter().collect();
        nodes.extend(view.target_nodes.iter().cloned());
        nodes.extend(view.preferred_primary.iter().cloned());
        nodes.extend(status.nodes.iter().map(|n| n.node.clone()));
        let probes = futures::future::join_all(nodes.iter().map(|node| {
            let agents = self.agents.clone();
            let view = view.clone();
            let node = node.clone();
            async move {
                let result = agents.probe(&view, &node).await;
                Probe { node, result }
            }
        }))
        .await;
        for p in &probes {
            if let failover::ProbeResult::Failed(e) = &p.result {
                self.metrics.probe_failed(e.kind.as_str());
            }
        }

        let epoch = status.epoch;
        let confirmed_renewal = self
            .renewals_mut()
            .get(&name)
            .filter(|(e, _)| *e == epoch)
            .map(|(_, at)| *at);
        let switchover = device
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SWITCHOVER_ANNOTATION))
            .map(|target| parse_switchover(target));
        let observations = Observations {
            probes,
            lease: LeaseFacts {
                confirmed_renewal,
                leader_since: *self.leader_since.lock().unwrap_or_else(|p| p.into_inner()),
            },
            switchover,
            now: Timestamp::now(),
        };
        let plan = failover::plan(&view, &status, &observations, &self.config);
        let mut next = plan.status.clone();
        let (backup_events, site_confirmed) = self.backup_round(device, &mut next).await;

        let rv = device.metadata.resource_version.clone().unwrap_or_default();
        if next != status {
            match self.state.replace_device_status(&name, &rv, &next).await {
                Ok(_) => {}
                Err(StateError::Conflict { .. }) => {
                    return Ok(RoundOutcome {
                        conflict: true,
                        ..Default::default()
                    });
                }
                Err(e) => return Err(e),
            }
        }
        self.metrics.observe_status(&name, &next);
        for event in backup_events {
            let type_ = match event.warning {
                true => EventType::Warning,
                false => EventType::Normal,
            };
            self.record(&regarding, type_, event.reason, "Archive", event.message)
                .await?;
        }

        let mut outcome = RoundOutcome {
            replan_at: plan.replan_at,
            ..Default::default()
        };
        for action in &plan.actions {
            // A multi-site device's primary gets a lease only once its node has its site
            // configuration (a passive site's agent must refuse writes before any lease).
            let lease = matches!(action, Action::RenewLease { .. } | Action::Promote { .. });
            if lease && device.spec.site.is_some() && !site_confirmed {
                tracing::warn!(
                    "the site configuration did not reach the primary's node; no lease this round"
                );
                outcome.actions_failed += 1;
                continue;
            }
            if let Err(e) = self.execute(&view, &regarding, action).await {
                outcome.actions_failed += 1;
                tracing::warn!(error = %e, "action failed; it is planned again next round");
            }
        }
        match &plan.switchover {
            Some(SwitchoverOutcome::Completed { target, epoch }) => {
                tracing::info!(%target, epoch, "switchover completed");
                self.state
                    .clear_device_annotation(&name, SWITCHOVER_ANNOTATION)
                    .await?;
            }
            Some(SwitchoverOutcome::Rejected(err)) => {
                self.record(
                    &regarding,
                    EventType::Warning,
                    crate::contract::reasons::FAILOVER,
                    "Switchover",
                    format!("switchover refused: {err}"),
                )
                .await?;
                self.state
                    .clear_device_annotation(&name, SWITCHOVER_ANNOTATION)
                    .await?;
            }
            _ => {}
        }
        Ok(outcome)
    }

    /// With `spec.backup`: asks the primary's agent to archive as the spec says (a base or
    /// a drill when due or asked for) and folds its answer into `status`. Returns the
    /// Events to record once the status is stored.
    async fn backup_round(
        &self,
        device: &HSMDevice,
        status: &mut HSMDeviceStatus,
    ) -> (Vec<BackupEvent>, bool) {
        let name = device.metadata.name.clone().unwrap_or_default();
        let backup = device.spec.backup.as_ref();
        let site = device.spec.site.as_ref();
        if backup.is_none() {
            status.backup = None;
            status
                .conditions
                .retain(|c| !backup_plan::condition_types::ALL.contains(&c.type_.as_str()));
        }
        if site.is_none() {
            status.site = None;
        }
        if backup.is_none() && site.is_none() {
            return (Vec::new(), true);
        }
        let Some(primary) = status.primary_node.clone() else {
            return (Vec::new(), false);
        };
        let now = Timestamp::now();
        let annotation = |key: &str| {
            device
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(key))
                .map(String::as_str)
        };
        let mut events = Vec::new();
        let mut site_confirmed = true;
        let restore = match annotation(RESTORE_ANNOTATION).map(backup_plan::parse_restore) {
            Some(Ok(restore)) => Some(restore),
            Some(Err(why)) => {
                // Said once per distinct value: the annotation stays until replaced.
                let mut seen = self.bad_restores.lock().unwrap_or_else(|p| p.into_inner());
                if seen.insert((name.clone(), why.clone())) {
                    events.push(BackupEvent {
                        warning: true,
                        reason: crate::contract::reasons::RESTORE_FAILED,
                        message: why,
                    });
                }
                None
            }
            None => None,
        };
        let mut ask = match backup {
            Some(spec) => backup_plan::ask(
                spec,
                status.backup.as_ref(),
                annotation(BACKUP_NOW_ANNOTATION),
                annotation(BACKUP_VERIFY_ANNOTATION),
                restore.as_ref(),
                now,
            ),
            None => ArchiveAsk::default(),
        };
        ask.promote_request = annotation(SITE_PROMOTE_ANNOTATION)
            .filter(|id| {
                status
                    .site
                    .as_ref()
                    .and_then(|s| s.last_promotion.as_deref())
                    != Some(*id)
            })
            .map(str::to_string);
        ask.drain = annotation(SITE_DRAIN_ANNOTATION).is_some();
        let report = match self.agents.archive(&primary, backup, site, &ask).await {
            // The site's configuration reached the node that is (or is about to be) the
            // primary: its gate is set before any lease lets it write.
            Ok(report) if report.not_primary => {
                let applied =
                    report.config_error.is_none() && (site.is_none() || report.site.is_some());
                return (events, applied);
            }
            Ok(report) => {
                if site.is_some() && (report.config_error.is_some() || report.site.is_none()) {
                    site_confirmed = false;
                }
                report
            }
            // What the archive held when last heard of still stands; the lag grows.
            Err(e) if backup.is_none() => {
                tracing::warn!(error = %e, "the primary's agent did not answer the site's Archive call");
                return (events, false);
            }
            Err(e) => {
                site_confirmed = false;
                let prev = status.backup.clone().unwrap_or_default();
                ArchiveReport {
                    archived_sequence: prev.archived_sequence,
                    primary_sequence: prev.archived_sequence + prev.lag_sequences,
                    up_to_date_ms: prev
                        .up_to_date_time
                        .map(|t| t.0.as_millisecond().max(0) as u64),
                    last_error: Some(format!("the primary's agent did not answer: {e}")),
                    bases: prev
                        .bases
                        .iter()
                        .map(|b| (b.epoch, b.sequence, b.time.0.as_millisecond().max(0) as u64))
                        .collect(),
                    ..Default::default()
                }
            }
        };
        if let (Some(spec), Some(reported)) = (site, &report.site) {
            let (site_status, site_events) =
                backup_plan::observe_site(spec, status.site.as_ref(), reported);
            self.metrics
                .observe_site(&name, &site_status, reported.lag_ms);
            status.site = Some(site_status);
            events.extend(site_events);
        }
        let Some(spec) = backup else {
            return (events, site_confirmed);
        };
        let (backup, conditions, observed) = backup_plan::observe(
            spec,
            status.backup.as_ref(),
            &status.conditions,
            &primary,
            &report,
            now,
            device.metadata.generation,
        );
        events.extend(observed);
        let new_drill = events.iter().any(|e| {
            [
                crate::contract::reasons::BACKUP_VERIFIED,
                crate::contract::reasons::BACKUP_VERIFY_FAILED,
            ]
            .contains(&e.reason)
        });
        self.metrics.observe_backup(
            &name,
            &backup,
            backup_plan::lag_seconds(&report, now),
            new_drill,
        );
        status
            .conditions
            .retain(|c| !backup_plan::condition_types::ALL.contains(&c.type_.as_str()));
        status.conditions.extend(conditions);
        status.backup = Some(backup);
        (events, site_confirmed)
    }

    async fn execute(
        &self,
        view: &DeviceView,
        regarding: &ObjectRef,
        action: &Action,
    ) -> Result<(), String> {
        let device = view.name.as_str();
        match action {
            Action::Event(e) => self
                .record(
                    regarding,
                    match e.type_ {
                        failover::EventType::Normal => EventType::Normal,
                        failover::EventType::Warning => EventType::Warning,
                    },
                    e.reason.as_str(),
                    "Reconcile",
                    e.message.clone(),
                )
                .await
                .map_err(|e| e.to_string()),
            Action::LabelNode { node, ready } => {
                let key = (device.to_string(), node.clone());
                let now = Timestamp::now();
                let written = self
                    .labels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&key)
                    .copied();
                if written.is_some_and(|(was, at)| {
                    was == *ready && now.duration_since(at).unsigned_abs().lt(&LABEL_RESYNC)
                }) {
                    return Ok(());
                }
                self.state
                    .set_node_label(
                        node,
                        &crate::contract::node_ready_label(device),
                        ready.then_some(failover::READY_LABEL_VALUE),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                self.labels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, (*ready, now));
                Ok(())
            }
            Action::ReportLostWrites {
                node,
                epoch,
                from_sequence,
                to_sequence,
            } => {
                let count = to_sequence.saturating_sub(*from_sequence) + 1;
                self.metrics.lost_writes(device, count);
                tracing::error!(%node, epoch, from_sequence, to_sequence, "writes lost by failover");
                Ok(())
            }
            Action::RenewLease { epoch, .. } | Action::Promote { epoch, .. } => {
                let result = self.agents.execute(view, action).await;
                // Recorded whether or not the grant was acknowledged: it may still be
                // delivered later, and it ends no later than its deadline, which was
                // computed before this instant (lease + time of computing, on our clock).
                self.renewals_mut()
                    .insert(device.to_string(), (*epoch, Timestamp::now()));
                result.map_err(|e| e.to_string())?;
                if matches!(action, Action::Promote { .. }) {
                    self.metrics.promoted(device);
                }
                Ok(())
            }
            Action::FenceWrites { .. } | Action::Demote { .. } | Action::SetMirror { .. } => self
                .agents
                .execute(view, action)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    async fn record(
        &self,
        regarding: &ObjectRef,
        type_: EventType,
        reason: &str,
        action: &str,
        message: String,
    ) -> Result<(), StateError> {
        self.state
            .record_event(
                regarding,
                &EventRecord {
                    type_,
                    reason: reason.into(),
                    action: action.into(),
                    message,
                },
            )
            .await
    }
}

/// `NODE` or `NODE,force`.
fn parse_switchover(value: &str) -> SwitchoverRequest {
    let mut parts = value.split(',').map(str::trim);
    let target = parts.next().unwrap_or_default().to_string();
    let force = parts.any(|p| p == "force");
    SwitchoverRequest { target, force }
}
