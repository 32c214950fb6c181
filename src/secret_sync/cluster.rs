//! The two sides the reconciler talks to: the Kubernetes objects ([`Cluster`]) and the
//! device's agents ([`AgentDirectory`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use tonic::Code;

use super::SyncError;
use super::plan::HsmContent;
use crate::crd::{
    DeviceRole, HSMDevice, HSMDeviceStatus, HSMSecret, HSMSecretStatus, NodeHealth, ServedBy,
};
use crate::hsm::{Body, Checksum, Expect, SecretData, SecretPath};
use crate::mirror::{AgentConnection, MirrorError};
use crate::state::EventRecord;

/// The Kubernetes side of the reconciler. Secrets are always addressed in the namespace
/// of the HSMSecret being reconciled.
#[async_trait]
pub trait Cluster: Send + Sync + 'static {
    async fn device(&self, name: &str) -> Result<Option<HSMDevice>, SyncError>;
    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<Secret>, SyncError>;
    async fn create_secret(&self, namespace: &str, secret: &Secret) -> Result<(), SyncError>;
    /// Replaces under the resourceVersion the Secret carries.
    async fn replace_secret(&self, namespace: &str, secret: &Secret) -> Result<(), SyncError>;
    /// Deletes only if the Secret is still at `resource_version`; a missing one is fine.
    async fn delete_secret(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
    ) -> Result<(), SyncError>;
    /// Sets `metadata.finalizers` if the object is still at its resourceVersion.
    async fn set_finalizers(
        &self,
        object: &HSMSecret,
        finalizers: Vec<String>,
    ) -> Result<HSMSecret, SyncError>;
    /// Writes the status if the object is still at its resourceVersion.
    async fn write_status(
        &self,
        object: &HSMSecret,
        status: &HSMSecretStatus,
    ) -> Result<(), SyncError>;
    async fn record_event(&self, object: &HSMSecret, event: &EventRecord) -> Result<(), SyncError>;
}

/// Where the agent of a node is reached.
pub trait AgentLookup: Send + Sync {
    /// The (shared) connection to `node`'s agent, if its endpoint is known.
    fn connection_to(&self, node: &str) -> Option<AgentConnection>;
}

/// A fixed set of agents (static `--agent` lists and tests).
#[derive(Clone, Debug, Default)]
struct FixedAgents(BTreeMap<String, AgentConnection>);

impl AgentLookup for FixedAgents {
    fn connection_to(&self, node: &str) -> Option<AgentConnection> {
        self.0.get(node).cloned()
    }
}

impl AgentLookup for crate::controller::GrpcAgents {
    fn connection_to(&self, node: &str) -> Option<AgentConnection> {
        crate::controller::GrpcAgents::connection_to(self, node)
    }
}

/// The agents of the devices' nodes: reads from the primary, or a serving mirror when
/// the primary does not answer; writes to the primary only.
#[derive(Clone)]
pub struct AgentDirectory {
    agents: Arc<dyn AgentLookup>,
}

impl std::fmt::Debug for AgentDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentDirectory").finish_non_exhaustive()
    }
}

impl Default for AgentDirectory {
    fn default() -> Self {
        Self::new([])
    }
}

impl AgentDirectory {
    /// A fixed set of agents.
    pub fn new(agents: impl IntoIterator<Item = AgentConnection>) -> Self {
        Self {
            agents: Arc::new(FixedAgents(
                agents
                    .into_iter()
                    .map(|c| (c.node().to_string(), c))
                    .collect(),
            )),
        }
    }

    /// Agents as the device controller currently knows them (it re-resolves node
    /// addresses every round when discovering them through the cluster).
    pub fn following(agents: Arc<dyn AgentLookup>) -> Self {
        Self { agents }
    }

    fn connection(&self, node: &str) -> Result<AgentConnection, SyncError> {
        self.agents.connection_to(node).ok_or_else(|| SyncError::hsm_detail(
            "no_agent",
            format!(
                "no agent endpoint is known for node {node}; give the controller --agent-port (cluster discovery) or --agent {node}=https://HOST:PORT"
            ),
        ))
    }

    /// What the device holds at `path`: asks the primary, then the serving mirrors.
    pub async fn read(&self, status: &HSMDeviceStatus, path: &SecretPath) -> HsmContent {
        let mut order: Vec<&str> = status.primary_node.as_deref().into_iter().collect();
        order.extend(
            status
                .nodes
                .iter()
                .filter(|n| n.role == DeviceRole::ReadOnly && n.health == NodeHealth::Healthy)
                .map(|n| n.node.as_str())
                .filter(|n| Some(*n) != status.primary_node.as_deref()),
        );
        let mut last = SyncError::hsm_detail(
            "no_primary",
            "the device has no primary and no serving mirror".into(),
        );
        for node in order {
            let from_primary = Some(node) == status.primary_node.as_deref();
            match self.read_from(node, path).await {
                // Only the primary may say a secret does not exist: a lagging mirror's
                // "absent" would delete the copy or skip a tombstone.
                Ok(HsmContent::Absent) if !from_primary => {
                    last = SyncError::hsm_detail(
                        "primary_unavailable",
                        format!(
                            "the primary did not answer and mirror {node} does not hold {path}; only the primary can confirm that it does not exist"
                        ),
                    );
                }
                Ok(content) => return content,
                Err(e) => last = e,
            }
        }
        HsmContent::Unavailable(last)
    }

    /// Reads from one node, verifying the record's checksum.
    pub async fn read_from(&self, node: &str, path: &SecretPath) -> Result<HsmContent, SyncError> {
        let conn = self.connection(node)?;
        let answer = match conn.get(path).await {
            Ok(a) => a,
            Err(MirrorError::Remote {
                code: Code::NotFound,
                ..
            }) => return Ok(HsmContent::Absent),
            Err(e) => return Err(SyncError::hsm(e)),
        };
        let record = answer.record;
        if record.verify().is_err() || record.path != *path {
            return Err(SyncError::ChecksumMismatch {
                path: path.to_string(),
                version: record.version,
            });
        }
        match record.body {
            Body::Deleted => Ok(HsmContent::Absent),
            Body::Live(data) => Ok(HsmContent::Live {
                version: record.version,
                data,
                served_by: ServedBy {
                    node: answer.node,
                    role: answer.role,
                },
            }),
        }
    }

    /// Writes on the primary under `epoch`, then reads the record back and checks it
    /// carries the checksum of what was written.
    pub async fn put_verified(
        &self,
        primary: &str,
        path: &SecretPath,
        data: &SecretData,
        expect: Expect,
        epoch: u64,
    ) -> Result<HsmContent, SyncError> {
        let conn = self.connection(primary)?;
        let written = conn
            .put(path, data, expect, epoch)
            .await
            .map_err(SyncError::hsm)?;
        let content = self.read_from(primary, path).await?;
        let expected = Checksum::of_data(path, data);
        match &content {
            HsmContent::Live {
                version, data: got, ..
            } if *version == written.version && Checksum::of_data(path, got) == expected => {
                Ok(content)
            }
            // A later write replaced ours before it could be read back: ours is not
            // verified, so report a conflict (the source is kept) and plan again from
            // what the HSM holds now.
            HsmContent::Live { version, .. } if *version > written.version => {
                Err(SyncError::Conflict {
                    what: format!("HSM secret {path}"),
                })
            }
            _ => Err(SyncError::ChecksumMismatch {
                path: path.to_string(),
                version: written.version,
            }),
        }
    }

    /// Writes a tombstone on the primary.
    pub async fn delete(
        &self,
        primary: &str,
        path: &SecretPath,
        expect: Expect,
        epoch: u64,
    ) -> Result<u64, SyncError> {
        let conn = self.connection(primary)?;
        match conn.delete(path, expect, epoch).await {
            Ok(w) => Ok(w.version),
            Err(MirrorError::Remote {
                code: Code::NotFound,
                ..
            }) => Ok(0),
            Err(e) => Err(SyncError::hsm(e)),
        }
    }
}
