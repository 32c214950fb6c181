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
use crate::archive::ArchiveRequest;
use crate::archive::plan::{ArchiveAsk, ArchiveReport};
use crate::crd::{BackupSpec, DeviceRole, HSMDevice, MirroringPolicy, SiteSpec};
use crate::failover::{
    Action, AgentReport, DeviceView, NodeError, NodeErrorKind, ProbeResult, WriteSetReport,
};
use crate::mirror::{
    AgentConnection, AgentHealth, AgentPool, AgentTls, Assignment, EndpointResolver, LeaseDeadline,
    MirrorError, Peer, StaticEndpoints,
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
    fn deadline(&self, lease: Duration) -> LeaseDeadline {
        let since = u64::try_from(self.received.elapsed().as_millis()).unwrap_or(u64::MAX);
        let lease = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
        LeaseDeadline {
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
    fn lease_deadline(&self, node: &str) -> Result<LeaseDeadline, AgentCallError> {
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
        assignment: Assignment,
        deadline: Option<LeaseDeadline>,
    ) -> Result<(), AgentCallError> {
        self.connection(node)?
            .assign(&assignment, deadline)
            .await
            .map_err(|e| call_error(node, e))
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
        self.connection(node)?
            .ask_archive(&ArchiveRequest::from_specs(backup, site, ask.clone()))
            .await
            .map_err(|e| call_error(node, e))
    }

    async fn execute(&self, device: &DeviceView, action: &Action) -> Result<(), AgentCallError> {
        match action {
            Action::RenewLease {
                node,
                epoch,
                outside_write_set,
            } => {
                let deadline = self.lease_deadline(node)?;
                self.connection(node)?
                    .renew_lease_until(*epoch, self.lease, deadline, outside_write_set)
                    .await
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
                        .collect()
                } else {
                    Vec::new()
                };
                let assignment = Assignment {
                    role: DeviceRole::Primary,
                    epoch: *epoch,
                    primary: Some(me),
                    mirrors,
                    lease: self.lease,
                    sync_interval: Some(device.sync_interval),
                };
                let deadline = self.lease_deadline(node)?;
                self.assign(node, assignment, Some(deadline)).await
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
                let assignment = Assignment {
                    role,
                    epoch: *epoch,
                    primary: Some(self.peer(primary)?),
                    mirrors: Vec::new(),
                    lease: Duration::ZERO,
                    sync_interval: Some(device.sync_interval),
                };
                self.assign(node, assignment, None).await
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
