//! Reads for devices this node holds no token of: through the device's agents, the
//! primary first and a read-only mirror while the primary is down (DESIGN §5, §9).
//!
//! Who serves comes from the HSMDevice status (the roles the controller assigned) and
//! where they listen from an [`EndpointResolver`]. Both are refreshed at most every
//! [`REFRESH`] so a publish costs no API call in the steady state; a primary that just
//! died is skipped by the [`RemoteStore`] itself (it fails over to the next agent and
//! remembers the dead one for a few seconds).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::VolumeError;
use crate::crd::{DeviceRole, HSMDeviceStatus, NodeHealth};
use crate::hsm::SecretStore;
use crate::mirror::{AgentPool, AgentTls, EndpointResolver, Peer, RemoteStore};
use crate::state::StateStore;

/// How long a device's agent list is reused before status and endpoints are read again.
pub const REFRESH: Duration = Duration::from_secs(5);

/// The nodes to ask for reads, best first: the primary, healthy read-only mirrors,
/// other read-only mirrors, then nodes the status does not know at all (in `known`
/// order; with no status that is the whole static list). Standbys serve no reads.
pub fn read_order(status: Option<&HSMDeviceStatus>, known: &[String]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let push = |node: &str, order: &mut Vec<String>| {
        if !node.is_empty() && !order.iter().any(|n| n == node) {
            order.push(node.to_string());
        }
    };
    if let Some(status) = status {
        if let Some(primary) = &status.primary_node {
            push(primary, &mut order);
        }
        for healthy in [true, false] {
            for n in &status.nodes {
                if n.role == DeviceRole::ReadOnly && (n.health == NodeHealth::Healthy) == healthy {
                    push(&n.node, &mut order);
                }
            }
        }
    }
    for node in known {
        let standby = status.is_some_and(|s| {
            s.nodes
                .iter()
                .any(|n| &n.node == node && n.role == DeviceRole::Standby)
        });
        if !standby {
            push(node, &mut order);
        }
    }
    order
}

struct Cached {
    store: Arc<RemoteStore>,
    agents: Vec<Peer>,
    refreshed: Instant,
}

/// Remote stores per device, kept up to date with status and endpoints.
pub struct RemoteReads {
    tls: AgentTls,
    /// One pool for every device's agents (rebuilt by `with_timeout`).
    pool: AgentPool,
    endpoints: Arc<dyn EndpointResolver>,
    status: Option<Arc<dyn StateStore>>,
    devices: tokio::sync::Mutex<HashMap<String, Cached>>,
}

impl RemoteReads {
    /// `status` is where HSMDevice status is read (None: the endpoints' order alone).
    pub fn new(
        tls: AgentTls,
        endpoints: Arc<dyn EndpointResolver>,
        status: Option<Arc<dyn StateStore>>,
    ) -> Self {
        Self {
            pool: AgentPool::new(&tls, Duration::from_secs(10)),
            tls,
            endpoints,
            status,
            devices: tokio::sync::Mutex::default(),
        }
    }

    /// Deadline of one agent call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.pool = AgentPool::new(&self.tls, timeout);
        self
    }

    /// A store reading `device` through its agents.
    pub async fn store(&self, device: &str) -> Result<Arc<dyn SecretStore>, VolumeError> {
        let mut devices = self.devices.lock().await;
        if let Some(cached) = devices.get(device)
            && cached.refreshed.elapsed() < REFRESH
        {
            return Ok(cached.store.clone());
        }
        let agents = match self.agents(device).await {
            Ok(agents) => agents,
            // Keep serving from what was known when status or discovery is down.
            Err(error) => match devices.get(device) {
                Some(cached) => {
                    tracing::warn!(device, %error, "cannot refresh the device's agents; using the last known ones");
                    return Ok(cached.store.clone());
                }
                None => return Err(error),
            },
        };
        if let Some(cached) = devices.get_mut(device) {
            if cached.agents != agents {
                cached
                    .store
                    .set_agents(&agents)
                    .map_err(|e| no_agents(device, e.to_string()))?;
                cached.agents = agents;
            }
            cached.refreshed = Instant::now();
            return Ok(cached.store.clone());
        }
        let store = Arc::new(
            RemoteStore::new(device, &agents, self.pool.clone())
                .map_err(|e| no_agents(device, e.to_string()))?,
        );
        devices.insert(
            device.to_string(),
            Cached {
                store: store.clone(),
                agents,
                refreshed: Instant::now(),
            },
        );
        Ok(store)
    }

    async fn agents(&self, device: &str) -> Result<Vec<Peer>, VolumeError> {
        let status = match &self.status {
            Some(state) => match state.get_device(device).await {
                Ok(Some(d)) => d.status,
                Ok(None) => None,
                Err(error) => {
                    tracing::warn!(device, %error, "cannot read the HSMDevice status; asking agents in endpoint order");
                    None
                }
            },
            None => None,
        };
        let endpoints = self
            .endpoints
            .resolve()
            .await
            .map_err(|e| no_agents(device, e.to_string()))?;
        // With a status, only nodes it names (or that the static list adds) are asked;
        // discovery knows every node of the cluster, most of which hold no token.
        let known: Vec<String> = if status.is_some() && self.status.is_some() {
            status
                .iter()
                .flat_map(|s| s.nodes.iter().map(|n| n.node.clone()))
                .collect()
        } else {
            endpoints.keys().cloned().collect()
        };
        let agents: Vec<Peer> = read_order(status.as_ref(), &known)
            .into_iter()
            .filter_map(|node| {
                endpoints.get(&node).map(|endpoint| Peer {
                    node,
                    endpoint: endpoint.clone(),
                })
            })
            .collect();
        if agents.is_empty() {
            return Err(no_agents(
                device,
                "no node serving it has a known agent endpoint (HSMDevice status names no \
                 primary or read-only mirror, or --agent / --agent-port resolve none of them)"
                    .into(),
            ));
        }
        Ok(agents)
    }
}

fn no_agents(device: &str, why: String) -> VolumeError {
    VolumeError::NoAgents {
        device: device.into(),
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DeviceNodeStatus;

    fn node(name: &str, role: DeviceRole, health: NodeHealth) -> DeviceNodeStatus {
        DeviceNodeStatus {
            node: name.into(),
            role,
            health,
            token_serial: None,
            applied_sequence: 0,
            last_sync_time: None,
            sync_lag_seconds: None,
            consecutive_failures: 0,
            last_error: None,
            last_successful_probe: None,
            lost_writes: None,
            outside_write_set: false,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_primary_first_then_healthy_mirrors_never_standbys() {
        let status = HSMDeviceStatus {
            primary_node: Some("n2".into()),
            nodes: vec![
                node("n1", DeviceRole::ReadOnly, NodeHealth::Unhealthy),
                node("n2", DeviceRole::Primary, NodeHealth::Healthy),
                node("n3", DeviceRole::Standby, NodeHealth::Healthy),
                node("n4", DeviceRole::ReadOnly, NodeHealth::Healthy),
            ],
            ..Default::default()
        };
        let known = names(&["n1", "n2", "n3", "n4", "n5"]);
        assert_eq!(
            read_order(Some(&status), &known),
            names(&["n2", "n4", "n1", "n5"])
        );
    }

    #[test]
    fn without_status_the_static_order_is_kept() {
        assert_eq!(read_order(None, &names(&["b", "a"])), names(&["b", "a"]));
        let no_primary = HSMDeviceStatus::default();
        assert_eq!(read_order(Some(&no_primary), &names(&["a"])), names(&["a"]));
    }
}
