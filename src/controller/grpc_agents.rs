//! [`Agents`] over the agent gRPC protocol with mutual TLS: maps planner actions onto
//! `AssignRole` / `RenewLease` and agent health onto probe reports.
//!
//! Where agents listen comes from an [`EndpointResolver`], asked once per round: a static
//! list (`--agent`), or every Node's InternalIP at the agents' port (`--agent-port`) with
//! static entries overriding. Channels are dialled lazily and kept per node while its
//! endpoint stays the same, so a round costs one Node list and no new handshakes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::jiff::Timestamp;

use super::{AgentCallCause, AgentCallError, Agents};
use crate::archive::plan::{ArchiveAsk, ArchiveReport, DrillResult, RestoreResult, SiteReport};
use crate::crd::{BackupSpec, DeviceRole, HSMDevice, MirroringPolicy, SiteRole, SiteSpec};
use crate::failover::{
    Action, AgentReport, DeviceView, NodeError, NodeErrorKind, ProbeResult, WriteSetReport,
};
use crate::mirror::{
    AgentConnection, AgentHealth, AgentPool, AgentTls, EndpointResolver, MirrorError, Peer,
    StaticEndpoints, pb,
};

/// The agents of every node, found through an [`EndpointResolver`] and reached with
/// mutual TLS.
pub struct GrpcAgents {
    resolver: Arc<dyn EndpointResolver>,
    lease: Duration,
    /// node → endpoint, as of the last successful [`refresh`](Agents::refresh).
    known: RwLock<BTreeMap<String, String>>,
    /// One lazily dialled channel per node; replaced when the node's endpoint changes.
    pool: AgentPool,
    /// Per device, the nodes [`Agents::nodes`] found last (mirrors of an Active primary).
    members: Mutex<HashMap<String, Vec<String>>>,
    /// Per node, the agent's clock as of its latest Health answer: write leases are
    /// granted as deadlines on it.
    clocks: Mutex<HashMap<String, ClockReading>>,
}

/// An agent's clock reading and when its answer arrived here.
#[derive(Clone, Copy, Debug)]
struct ClockReading {
    id: u64,
    agent_ms: u64,
    received: std::time::Instant,
}

impl ClockReading {
    /// The deadline of a lease of `lease` granted now: on this process's clock it ends
    /// no later than now + `lease`, since the agent read its clock before we received
    /// the reading.
    fn deadline(&self, lease: Duration) -> pb::LeaseDeadline {
        let since = u64::try_from(self.received.elapsed().as_millis()).unwrap_or(u64::MAX);
        let lease = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        pb::LeaseDeadline {
            clock_id: self.id,
            until_ms: self.agent_ms.saturating_add(since).saturating_add(lease),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GrpcAgents {
    /// A fixed directory of agents (`--agent NODE=https://HOST:PORT`). Every endpoint is
    /// checked now, so a malformed one fails at start rather than in a round.
    pub fn new(
        peers: &[Peer],
        tls: &AgentTls,
        timeout: Duration,
        lease: Duration,
    ) -> Result<Self, MirrorError> {
        let agents = Self::discovering(Arc::new(StaticEndpoints::new(peers)), tls, timeout, lease);
        let known: BTreeMap<String, String> = peers
            .iter()
            .map(|p| (p.node.clone(), p.endpoint.clone()))
            .collect();
        for peer in peers {
            agents.pool.connect(peer)?;
        }
        *agents.known.write().unwrap_or_else(|p| p.into_inner()) = known;
        Ok(agents)
    }

    /// Agents wherever `resolver` says, asked again every round. Nothing is known until
    /// the first [`refresh`](Agents::refresh).
    pub fn discovering(
        resolver: Arc<dyn EndpointResolver>,
        tls: &AgentTls,
        timeout: Duration,
        lease: Duration,
    ) -> Self {
        Self {
            resolver,
            lease,
            known: RwLock::default(),
            pool: AgentPool::new(tls, timeout),
            members: Mutex::default(),
            clocks: Mutex::default(),
        }
    }

    /// Asks the resolver where agents listen now. On failure the last known endpoints
    /// stay in use (a passing API outage must not make every agent unreachable).
    pub async fn refresh_endpoints(&self) -> Result<usize, MirrorError> {
        let endpoints = self.resolver.resolve().await?;
        let count = endpoints.len();
        *self.known.write().unwrap_or_else(|p| p.into_inner()) = endpoints;
        Ok(count)
    }

    /// Every node with a known endpoint.
    pub fn known_nodes(&self) -> Vec<String> {
        self.known_endpoints().into_keys().collect()
    }

    fn known_endpoints(&self) -> BTreeMap<String, String> {
        self.known.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Connections to every node with a known endpoint (clones share the channels), for
    /// other reconcilers of the process. A snapshot: call after a refresh.
    pub fn connections(&self) -> Vec<AgentConnection> {
        self.known_nodes()
            .iter()
            .filter_map(|node| self.connection(node).ok())
            .collect()
    }

    /// The shared channel to `node` at its endpoint as of the last round, for other
    /// reconcilers of the process that need the agents a round found (not a snapshot).
    pub fn connection_to(&self, node: &str) -> Option<AgentConnection> {
        self.connection(node).ok()
    }

    /// The channel to `node` at its current endpoint, dialled on first use.
    fn connection(&self, node: &str) -> Result<AgentConnection, AgentCallError> {
        let endpoint = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
            .ok_or_else(|| AgentCallError {
                node: node.into(),
                cause: AgentCallCause::NoEndpoint,
            })?;
        let peer = Peer {
            node: node.into(),
            endpoint,
        };
        self.pool.connect(&peer).map_err(|e| call_error(node, e))
    }

    fn peer(&self, node: &str) -> Result<Peer, AgentCallError> {
        Ok(self.connection(node)?.peer().clone())
    }

    /// Known nodes outside `named` whose agent reports serving the device with its token
    /// present. Agents that name no device (older ones) are matched by the token label
    /// in the spec, which the node plugins of a device open.
    async fn reporting_token(&self, device: &HSMDevice, named: &BTreeSet<String>) -> Vec<String> {
        let name = device.metadata.name.as_deref().unwrap_or_default();
        let label = device.spec.pkcs11.token_label.as_str();
        let candidates: Vec<String> = self
            .known_nodes()
            .into_iter()
            .filter(|n| !named.contains(n))
            .collect();
        let answers = futures::future::join_all(candidates.into_iter().map(|node| async move {
            let conn = self.connection(&node).ok()?;
            let h = conn.health().await.ok()?;
            (h.token_present && serves(&h, name, label)).then_some(node)
        }))
        .await;
        answers.into_iter().flatten().collect()
    }

    /// A write lease for `node` as a deadline on its agent's clock, from its latest
    /// Health answer (every round probes before it renews or promotes).
    fn lease_deadline(&self, node: &str) -> Result<pb::LeaseDeadline, AgentCallError> {
        lock(&self.clocks)
            .get(node)
            .map(|reading| reading.deadline(self.lease))
            .ok_or_else(|| AgentCallError {
                node: node.into(),
                cause: AgentCallCause::NoClockReading,
            })
    }

    fn report(h: AgentHealth) -> AgentReport {
        // An agent never assigned a role answers epoch 0 in its standby state.
        let role = h.role.filter(|_| h.epoch > 0);
        let full_pass_epoch = h
            .sync
            .as_ref()
            .and_then(|s| s.last_full_pass.as_ref())
            .map(|p| p.epoch);
        let history_epoch = crate::failover::history_epoch(role, h.epoch, full_pass_epoch);
        let write_lease = crate::failover::write_lease(role, h.fenced, h.write_lease_remaining_ms);
        let last_sync = h
            .sync
            .as_ref()
            .and_then(|s| s.last_sync)
            .and_then(|t| Timestamp::try_from(t).ok());
        let error = match &h.token_error {
            Some(fault) => Some(NodeError::new(
                if h.token_present {
                    NodeErrorKind::SessionFailed
                } else {
                    NodeErrorKind::TokenMissing
                },
                fault.message.clone(),
            )),
            None => h
                .sync
                .as_ref()
                .and_then(|s| s.last_error.as_ref())
                .map(|f| NodeError::new(NodeErrorKind::SyncFailed, f.message.clone())),
        };
        AgentReport {
            token_present: h.token_present,
            session_usable: h.session_usable,
            token_serial: h.token_serial,
            role,
            epoch: h.epoch,
            history_epoch,
            applied_sequence: h.applied_sequence,
            last_sync,
            write_lease,
            error,
            write_set: h.replication.map(|r| WriteSetReport {
                in_sync: r.in_sync,
                outside: r
                    .dropping
                    .into_iter()
                    .chain(r.dropped)
                    .map(|d| d.node)
                    .collect(),
            }),
        }
    }

    async fn assign(
        &self,
        node: &str,
        request: pb::AssignRoleRequest,
    ) -> Result<(), AgentCallError> {
        self.connection(node)?
            .assign_role(request)
            .await
            .map_err(|e| call_error(node, e))?;
        Ok(())
    }
}

fn archive_spec_pb(spec: &BackupSpec) -> pb::ArchiveSpec {
    pb::ArchiveSpec {
        url: spec.url.clone(),
        endpoint: spec.endpoint.clone().unwrap_or_default(),
        region: spec.region.clone().unwrap_or_default(),
        credentials_secret: spec.credentials_secret.clone(),
        archive_name: spec.archive_name().to_string(),
        segment_interval_ms: u64::from(spec.segment_interval_seconds()) * 1000,
        base_interval_s: u64::from(spec.base_interval_minutes()) * 60,
        retention_s: u64::from(spec.retention_days()) * 86_400,
    }
}

fn site_spec_pb(site: &SiteSpec) -> pb::SiteSpec {
    pb::SiteSpec {
        name: site.name.clone(),
        lease_ms: u64::from(site.lease_seconds()) * 1000,
        follow: site.follow_archive.as_ref().map(|f| pb::FollowSpec {
            url: f.url.clone(),
            endpoint: f.endpoint.clone().unwrap_or_default(),
            region: f.region.clone().unwrap_or_default(),
            credentials_secret: f.credentials_secret.clone(),
            device: f.device.clone(),
            archive_name: f
                .archive_name
                .clone()
                .unwrap_or_else(|| BackupSpec::DEFAULT_ARCHIVE_NAME.into()),
        }),
    }
}

fn site_report(r: pb::SiteReport) -> SiteReport {
    let text = |s: String| (!s.is_empty()).then_some(s);
    let ms = |v: u64| (v > 0).then_some(v);
    SiteReport {
        role: match pb::SiteRole::try_from(r.role) {
            Ok(pb::SiteRole::Passive) => SiteRole::Passive,
            Ok(pb::SiteRole::Fenced) => SiteRole::Fenced,
            _ => SiteRole::Active,
        },
        site_epoch: r.site_epoch,
        source_sequence: r.source_sequence,
        source_time_ms: ms(r.source_time_ms),
        applied_sequence: r.applied_sequence,
        applied_time_ms: ms(r.applied_time_ms),
        lag_ms: r.lag_ms,
        fenced_by: text(r.fenced_by),
        fenced_by_device: text(r.fenced_by_device),
        fence_sequence: r.fence_sequence,
        lost_writes: r.lost_writes,
        promotion_done: text(r.promotion_done),
        promotion_running: text(r.promotion_running),
        error: text(r.error),
        draining: r.draining,
    }
}

fn archive_report(r: pb::ArchiveResponse) -> ArchiveReport {
    let text = |s: String| (!s.is_empty()).then_some(s);
    ArchiveReport {
        config_error: text(r.config_error),
        archived_sequence: r.archived_sequence,
        primary_sequence: r.primary_sequence,
        up_to_date_ms: (r.up_to_date_ms > 0).then_some(r.up_to_date_ms),
        last_error: text(r.last_error),
        bases: r
            .bases
            .into_iter()
            .map(|b| (b.epoch, b.sequence, b.time_ms))
            .collect(),
        base_done: text(r.base_done),
        drill_running: text(r.drill_running),
        drill: r.drill.map(|d| DrillResult {
            request: d.request,
            verified: d.verified,
            sequence: d.sequence,
            time_ms: (d.time_ms > 0).then_some(d.time_ms),
            secrets: d.secrets,
            duration_ms: d.duration_ms,
            finished_ms: d.finished_ms,
            message: text(d.message),
        }),
        restore_running: text(r.restore_running),
        restore: r.restore.map(|o| RestoreResult {
            id: o.id,
            succeeded: o.succeeded,
            sequence: o.sequence,
            time_ms: (o.time_ms > 0).then_some(o.time_ms),
            secrets: o.secrets,
            bytes: o.bytes,
            finished_ms: o.finished_ms,
            message: text(o.message),
        }),
        site: r.site.map(site_report),
        not_primary: r.not_primary,
    }
}

fn call_error(node: &str, e: MirrorError) -> AgentCallError {
    AgentCallError {
        node: node.into(),
        cause: AgentCallCause::Call(Box::new(e)),
    }
}

/// Whether an agent's health answer says it serves the HSMDevice `name`: by the device it
/// names, or, from an agent that names none, by the token label `label`.
fn serves(h: &AgentHealth, name: &str, label: &str) -> bool {
    if h.device.is_empty() {
        h.token_label == label
    } else {
        h.device == name
    }
}

fn role_pb(role: DeviceRole) -> i32 {
    match role {
        DeviceRole::Primary => pb::Role::Primary as i32,
        DeviceRole::ReadOnly => pb::Role::ReadOnly as i32,
        DeviceRole::Standby => pb::Role::Standby as i32,
    }
}

#[async_trait]
impl Agents for GrpcAgents {
    async fn refresh(&self) {
        match self.refresh_endpoints().await {
            Ok(count) => tracing::debug!(agents = count, "agent endpoints resolved"),
            Err(error) => {
                tracing::warn!(%error, "cannot resolve agent endpoints; using the last known")
            }
        }
    }

    async fn nodes(&self, device: &HSMDevice) -> Vec<String> {
        let named = crate::failover::named_nodes(device);
        let known = self.known_endpoints();
        let mut nodes: Vec<String> = named
            .iter()
            .filter(|n| known.contains_key(*n))
            .cloned()
            .collect();
        if crate::failover::membership_is_open(device) {
            nodes.extend(self.reporting_token(device, &named).await);
            nodes.sort();
        }
        lock(&self.members).insert(
            device.metadata.name.clone().unwrap_or_default(),
            nodes.clone(),
        );
        nodes
    }

    async fn probe(&self, _device: &DeviceView, node: &str) -> ProbeResult {
        let Ok(conn) = self.connection(node) else {
            return ProbeResult::Failed(NodeError::new(
                NodeErrorKind::Unreachable,
                "no agent endpoint is known for this node",
            ));
        };
        match conn.health().await {
            Ok(h) => {
                let received = std::time::Instant::now();
                let mut clocks = lock(&self.clocks);
                match &h.clock {
                    Some(c) => clocks.insert(
                        node.into(),
                        ClockReading {
                            id: c.id,
                            agent_ms: c.now_ms,
                            received,
                        },
                    ),
                    None => clocks.remove(node),
                };
                drop(clocks);
                ProbeResult::Reported(Self::report(h))
            }
            Err(e) => {
                // The next probe dials afresh: a connection that lived through a partition
                // waits out TCP's retransmission backoff (seconds) after the link heals,
                // where a new one answers at once.
                self.pool.forget(node);
                let kind = match &e {
                    MirrorError::Timeout { .. }
                    | MirrorError::Remote {
                        code: tonic::Code::DeadlineExceeded,
                        ..
                    } => NodeErrorKind::Timeout,
                    _ => NodeErrorKind::Unreachable,
                };
                ProbeResult::Failed(NodeError::new(kind, e.to_string()))
            }
        }
    }

    async fn archive(
        &self,
        node: &str,
        backup: Option<&BackupSpec>,
        site: Option<&SiteSpec>,
        ask: &ArchiveAsk,
    ) -> Result<ArchiveReport, AgentCallError> {
        let request = pb::ArchiveRequest {
            spec: backup.map(archive_spec_pb),
            site: site.map(site_spec_pb),
            promote_request: ask.promote_request.clone().unwrap_or_default(),
            drain: ask.drain,
            base_request: ask.base_request.clone().unwrap_or_default(),
            verify_request: ask.verify_request.clone().unwrap_or_default(),
            restore: ask.restore.as_ref().map(|r| pb::RestoreRequest {
                id: r.id.clone(),
                to_sequence: r.to_sequence.unwrap_or(0),
                to_time_ms: r.to_time_ms.unwrap_or(0),
                force: r.force,
            }),
        };
        let response = self
            .connection(node)?
            .archive(request)
            .await
            .map_err(|e| call_error(node, e))?;
        Ok(archive_report(response))
    }

    async fn execute(&self, device: &DeviceView, action: &Action) -> Result<(), AgentCallError> {
        let lease_ms = self.lease.as_millis() as u64;
        match action {
            Action::RenewLease {
                node,
                epoch,
                outside_write_set,
            } => {
                let request = pb::RenewLeaseRequest {
                    epoch: *epoch,
                    duration_ms: lease_ms,
                    deadline: Some(self.lease_deadline(node)?),
                    outside_write_set: outside_write_set.clone(),
                };
                self.connection(node)?
                    .renew_lease_with(request)
                    .await
                    .map(|_| ())
                    .map_err(|e| call_error(node, e))
            }
            Action::Promote { node, epoch } => {
                let me = self.peer(node)?;
                let mirrors = if device.policy == MirroringPolicy::Active {
                    // The device's own nodes, as found this round: another device's
                    // agents must not hold up this primary's writes.
                    let members = lock(&self.members)
                        .get(&device.name)
                        .cloned()
                        .unwrap_or_default();
                    members
                        .iter()
                        .filter(|n| *n != node)
                        .filter_map(|n| self.peer(n).ok())
                        .map(|p| pb::MirrorTarget {
                            node: p.node,
                            endpoint: p.endpoint,
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                self.assign(
                    node,
                    pb::AssignRoleRequest {
                        role: pb::Role::Primary as i32,
                        epoch: *epoch,
                        primary_node: me.node,
                        primary_endpoint: me.endpoint,
                        mirrors,
                        lease_duration_ms: lease_ms,
                        sync_interval_seconds: device.sync_interval.as_secs() as u32,
                        lease_deadline: Some(self.lease_deadline(node)?),
                    },
                )
                .await
            }
            Action::Demote {
                node,
                epoch,
                primary,
            }
            | Action::SetMirror {
                node,
                epoch,
                primary,
                ..
            } => {
                let role = match action {
                    Action::SetMirror { role, .. } => *role,
                    _ => DeviceRole::Standby,
                };
                let p = self.peer(primary)?;
                self.assign(
                    node,
                    pb::AssignRoleRequest {
                        role: role_pb(role),
                        epoch: *epoch,
                        primary_node: p.node,
                        primary_endpoint: p.endpoint,
                        mirrors: Vec::new(),
                        lease_duration_ms: 0,
                        sync_interval_seconds: device.sync_interval.as_secs() as u32,
                        lease_deadline: None,
                    },
                )
                .await
            }
            Action::FenceWrites { node, epoch } => self
                .connection(node)?
                .fence(*epoch)
                .await
                .map(|_| ())
                .map_err(|e| call_error(node, e)),
            other => Err(AgentCallError {
                node: String::new(),
                cause: AgentCallCause::NotAnAgentAction(format!("{other:?}")),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(device: &str, label: &str) -> AgentHealth {
        AgentHealth {
            device: device.into(),
            token_label: label.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_agent_serves_the_device_it_names_or_by_label_when_it_names_none() {
        let cases = [
            (health("prod-hsm", "prod"), true, "named device, same label"),
            (
                health("prod-hsm", "other"),
                true,
                "the name decides, not the label",
            ),
            (
                health("test-hsm", "prod"),
                false,
                "another device sharing the label",
            ),
            (health("", "prod"), true, "an older agent: the label"),
            (
                health("", "other"),
                false,
                "an older agent on another token",
            ),
        ];
        for (h, expected, why) in cases {
            assert_eq!(serves(&h, "prod-hsm", "prod"), expected, "{why}");
        }
    }
}
