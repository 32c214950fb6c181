//! Simulated device agents for controller tests and benches: each node answers probes
//! from its own state and obeys promotions, demotions, renewals and fences, so the
//! controller's rounds run without tokens or network.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hsm_secrets::controller::{AgentCallError, Agents};
use hsm_secrets::crd::{DeviceRole, HSMDevice};
use hsm_secrets::failover::{
    Action, AgentReport, DeviceView, NodeError, NodeErrorKind, ProbeResult, WriteLease,
};

#[derive(Clone)]
pub struct SimAgent {
    pub up: bool,
    pub role: Option<DeviceRole>,
    pub epoch: u64,
    pub history_epoch: u64,
    pub seq: u64,
    pub lease_until: Option<Instant>,
    /// Probes never answer (an agent stuck behind a dead network path).
    pub hanging: bool,
}

#[derive(Default)]
pub struct SimAgents {
    nodes: Mutex<BTreeMap<String, SimAgent>>,
    lease: Duration,
}

impl SimAgents {
    pub fn new(lease: Duration, nodes: &[(&str, u64)]) -> Self {
        let map = nodes
            .iter()
            .map(|(n, seq)| {
                (
                    n.to_string(),
                    SimAgent {
                        up: true,
                        role: None,
                        epoch: 0,
                        history_epoch: 0,
                        seq: *seq,
                        lease_until: None,
                        hanging: false,
                    },
                )
            })
            .collect();
        Self {
            nodes: Mutex::new(map),
            lease,
        }
    }

    pub fn set_hanging(&self, node: &str, hanging: bool) {
        self.nodes.lock().unwrap().get_mut(node).unwrap().hanging = hanging;
    }

    pub fn set_up(&self, node: &str, up: bool) {
        self.nodes.lock().unwrap().get_mut(node).unwrap().up = up;
    }

    pub fn agent(&self, node: &str) -> SimAgent {
        self.nodes.lock().unwrap()[node].clone()
    }
}

#[async_trait]
impl Agents for SimAgents {
    /// The nodes the device's spec names, when it names any this simulation has (so
    /// several devices can run side by side on nodes of their own); else every node.
    async fn nodes(&self, device: &HSMDevice) -> Vec<String> {
        let nodes = self.nodes.lock().unwrap();
        let m = device.mirroring();
        let named: Vec<String> = m
            .primary_node
            .into_iter()
            .chain(m.target_nodes)
            .filter(|n| nodes.contains_key(n))
            .collect();
        if named.is_empty() {
            nodes.keys().cloned().collect()
        } else {
            named
        }
    }

    async fn probe(&self, _device: &DeviceView, node: &str) -> ProbeResult {
        let a = self.agent(node);
        if a.hanging {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if !a.up {
            return ProbeResult::Failed(NodeError::new(
                NodeErrorKind::Unreachable,
                "connection refused",
            ));
        }
        let write_lease = match (a.role, a.lease_until) {
            (Some(DeviceRole::Primary), Some(until)) if until > Instant::now() => {
                WriteLease::Valid {
                    remaining: until - Instant::now(),
                }
            }
            (Some(DeviceRole::Primary), _) => WriteLease::Lapsed,
            _ => WriteLease::NotHeld,
        };
        ProbeResult::Reported(AgentReport {
            token_present: true,
            session_usable: true,
            token_serial: Some(format!("serial-{node}")),
            role: a.role,
            epoch: a.epoch,
            history_epoch: a.history_epoch,
            applied_sequence: a.seq,
            last_sync: Some(k8s_openapi::jiff::Timestamp::now()),
            write_lease,
            error: None,
            write_set: None,
        })
    }

    async fn execute(&self, _device: &DeviceView, action: &Action) -> Result<(), AgentCallError> {
        let mut nodes = self.nodes.lock().unwrap();
        let node = match action {
            Action::RenewLease { node, .. }
            | Action::FenceWrites { node, .. }
            | Action::Promote { node, .. }
            | Action::Demote { node, .. }
            | Action::SetMirror { node, .. } => node.clone(),
            _ => unreachable!("controller handles {action:?} itself"),
        };
        let a = nodes.get_mut(&node).unwrap();
        if !a.up {
            return Err(AgentCallError {
                node,
                cause: hsm_secrets::controller::AgentCallCause::Unreachable,
            });
        }
        match action {
            Action::RenewLease { epoch, .. } if *epoch == a.epoch => {
                a.lease_until = Some(Instant::now() + self.lease)
            }
            Action::Promote { epoch, .. } => {
                a.role = Some(DeviceRole::Primary);
                a.epoch = *epoch;
                a.history_epoch = *epoch;
                a.lease_until = Some(Instant::now() + self.lease);
            }
            Action::Demote { epoch, .. } => {
                a.role = Some(DeviceRole::Standby);
                a.epoch = *epoch;
                a.lease_until = None;
            }
            Action::SetMirror { epoch, role, .. } => {
                a.role = Some(*role);
                a.epoch = *epoch;
                a.history_epoch = *epoch;
            }
            Action::FenceWrites { .. } => a.lease_until = None,
            _ => {}
        }
        Ok(())
    }
}
