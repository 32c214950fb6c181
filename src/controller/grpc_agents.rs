//! [`Agents`] over the agent gRPC protocol with mutual TLS: maps planner actions onto
//! `AssignRole` / `RenewLease` and agent health onto probe reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use k8s_openapi::jiff::Timestamp;

use super::{AgentCallError, Agents};
use crate::crd::{DeviceRole, MirroringPolicy};
use crate::failover::{
    Action, AgentReport, DeviceView, NodeError, NodeErrorKind, ProbeResult, WriteLease,
};
use crate::mirror::{AgentConnection, AgentTls, MirrorError, Peer, pb};

/// A static directory of agents (node → endpoint), each reached with mutual TLS.
pub struct GrpcAgents {
    peers: BTreeMap<String, AgentConnection>,
    lease: Duration,
    /// When each node was last given a mirror role (epoch, unix ms): its data is a prefix
    /// of the primary's history only once a full pass finished after that.
    assigned: Mutex<HashMap<String, (u64, i64)>>,
}

impl GrpcAgents {
    pub fn new(
        peers: &[Peer],
        tls: &AgentTls,
        timeout: Duration,
        lease: Duration,
    ) -> Result<Self, MirrorError> {
        let peers = peers
            .iter()
            .map(|p| Ok((p.node.clone(), AgentConnection::new(p, tls, timeout)?)))
            .collect::<Result<_, MirrorError>>()?;
        Ok(Self {
            peers,
            lease,
            assigned: Mutex::default(),
        })
    }

    /// The connections (clones share the channels), for other reconcilers of the process.
    pub fn connections(&self) -> impl Iterator<Item = AgentConnection> + '_ {
        self.peers.values().cloned()
    }

    fn connection(&self, node: &str) -> Result<&AgentConnection, AgentCallError> {
        self.peers.get(node).ok_or_else(|| AgentCallError {
            node: node.into(),
            detail: "no agent endpoint is known for this node".into(),
        })
    }

    fn peer(&self, node: &str) -> Result<Peer, AgentCallError> {
        Ok(self.connection(node)?.peer().clone())
    }

    fn assigned(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, i64)>> {
        self.assigned.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn report(&self, node: &str, h: pb::HealthResponse) -> AgentReport {
        let role = match pb::Role::try_from(h.role).unwrap_or(pb::Role::Unspecified) {
            _ if h.epoch == 0 => None,
            pb::Role::Primary => Some(DeviceRole::Primary),
            pb::Role::ReadOnly => Some(DeviceRole::ReadOnly),
            pb::Role::Standby => Some(DeviceRole::Standby),
            pb::Role::Unspecified => None,
        };
        let full_pass = h.sync.as_ref().and_then(|s| s.last_full_pass.as_ref());
        let history_epoch = match role {
            Some(DeviceRole::Primary) => h.epoch,
            _ => match (full_pass, self.assigned().get(node).copied()) {
                (Some(p), Some((epoch, at))) if epoch == h.epoch && p.finished_unix_ms >= at => {
                    h.epoch
                }
                // A controller that restarted trusts a completed pass under this epoch.
                (Some(_), None) => h.epoch,
                _ => h.epoch.saturating_sub(1),
            },
        };
        let write_lease = match role {
            Some(DeviceRole::Primary) if h.fenced => WriteLease::Fenced,
            Some(DeviceRole::Primary) if h.write_lease_remaining_ms > 0 => WriteLease::Valid {
                remaining: Duration::from_millis(h.write_lease_remaining_ms),
            },
            Some(DeviceRole::Primary) => WriteLease::Lapsed,
            _ => WriteLease::NotHeld,
        };
        let last_sync = h
            .sync
            .as_ref()
            .filter(|s| s.last_sync_unix_ms > 0)
            .and_then(|s| Timestamp::from_millisecond(s.last_sync_unix_ms).ok());
        let error = if !h.token_error.is_empty() {
            Some(NodeError::new(
                if h.token_present {
                    NodeErrorKind::SessionFailed
                } else {
                    NodeErrorKind::TokenMissing
                },
                h.token_error.clone(),
            ))
        } else {
            h.sync
                .as_ref()
                .filter(|s| !s.last_error.is_empty())
                .map(|s| NodeError::new(NodeErrorKind::SyncFailed, s.last_error.clone()))
        };
        AgentReport {
            token_present: h.token_present,
            session_usable: h.session_usable,
            token_serial: (!h.token_serial.is_empty()).then_some(h.token_serial),
            role,
            epoch: h.epoch,
            history_epoch,
            applied_sequence: h.applied_sequence,
            last_sync,
            write_lease,
            error,
        }
    }

    async fn assign(
        &self,
        node: &str,
        request: pb::AssignRoleRequest,
    ) -> Result<(), AgentCallError> {
        let mirror = request.role != pb::Role::Primary as i32;
        let epoch = request.epoch;
        // Taken before sending (the agent may start its pass at once); kept while the
        // epoch stays the same, since the planner re-sends an assignment until it shows.
        let sent_at = now_ms();
        self.connection(node)?
            .assign_role(request)
            .await
            .map_err(|e| call_error(node, e))?;
        if mirror {
            let mut assigned = self.assigned();
            if assigned.get(node).is_none_or(|(e, _)| *e != epoch) {
                assigned.insert(node.into(), (epoch, sent_at));
            }
        }
        Ok(())
    }
}

fn call_error(node: &str, e: MirrorError) -> AgentCallError {
    AgentCallError {
        node: node.into(),
        detail: e.to_string(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
    async fn nodes(&self, _device: &DeviceView) -> Vec<String> {
        self.peers.keys().cloned().collect()
    }

    async fn probe(&self, _device: &DeviceView, node: &str) -> ProbeResult {
        let Ok(conn) = self.connection(node) else {
            return ProbeResult::Failed(NodeError::new(
                NodeErrorKind::Unreachable,
                "no agent endpoint is known for this node",
            ));
        };
        match conn.health().await {
            Ok(h) => ProbeResult::Reported(self.report(node, h)),
            Err(e) => {
                let text = e.to_string();
                let kind = if text.contains("deadline") || text.contains("timed out") {
                    NodeErrorKind::Timeout
                } else {
                    NodeErrorKind::Unreachable
                };
                ProbeResult::Failed(NodeError::new(kind, text))
            }
        }
    }

    async fn execute(&self, device: &DeviceView, action: &Action) -> Result<(), AgentCallError> {
        let lease_ms = self.lease.as_millis() as u64;
        match action {
            Action::RenewLease { node, epoch } => self
                .connection(node)?
                .renew_lease(*epoch, self.lease)
                .await
                .map(|_| ())
                .map_err(|e| call_error(node, e)),
            Action::Promote { node, epoch } => {
                let me = self.peer(node)?;
                let mirrors = if device.policy == MirroringPolicy::Active {
                    self.peers
                        .values()
                        .filter(|c| c.node() != node)
                        .map(|c| pb::MirrorTarget {
                            node: c.peer().node.clone(),
                            endpoint: c.peer().endpoint.clone(),
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
                detail: format!("not an agent action: {other:?}"),
            }),
        }
    }
}
