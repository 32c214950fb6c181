//! The HSMDevice controller: probes every node's agent, plans with the pure
//! [`failover`](crate::failover) module, stores the planned status (optimistic
//! concurrency), then executes the plan's actions against agents, node labels and Events.
//!
//! It is generic over where state lives ([`StateStore`](crate::state::StateStore): Kubernetes or files) and how
//! agents are reached ([`Agents`]: gRPC with mutual TLS, or in-process for tests), so the
//! same loop runs on a cluster, in the no-cluster mode and in tests.

mod device;
mod grpc_agents;
mod metrics;
pub mod ops;
mod run;
mod schedule;

pub use device::{DeviceController, RoundOutcome};
pub use grpc_agents::GrpcAgents;
pub use metrics::{ControllerMetrics, LoopState};
pub use run::{ControllerConfig, run_controller, run_controller_with_leadership};

use async_trait::async_trait;

use crate::archive::plan::{ArchiveAsk, ArchiveReport};
use crate::crd::{BackupSpec, HSMDevice, SiteSpec};
use crate::failover::{Action, DeviceView, ProbeResult};

/// How the controller reaches the agents of a device's nodes.
#[async_trait]
pub trait Agents: Send + Sync + 'static {
    /// Called once at the start of every round the leader plans: learn where agents
    /// listen now (nodes come and go, addresses change).
    async fn refresh(&self) {}
    /// Nodes whose agent serves this device: those its spec and status name and, where
    /// the spec leaves membership open, those whose agent reports its token.
    async fn nodes(&self, device: &HSMDevice) -> Vec<String>;
    /// One health probe, answered within the agent deadline or reported as failed.
    async fn probe(&self, device: &DeviceView, node: &str) -> ProbeResult;
    /// Carries out one agent action (RenewLease, FenceWrites, Promote, Demote, SetMirror).
    /// Ok means the agent acknowledged it.
    async fn execute(&self, device: &DeviceView, action: &Action) -> Result<(), AgentCallError>;
    /// Asks the primary's agent to archive as `spec` says (and take a base or start a
    /// drill when `ask` says so), returning how its archive stands.
    async fn archive(
        &self,
        node: &str,
        backup: Option<&BackupSpec>,
        site: Option<&SiteSpec>,
        ask: &ArchiveAsk,
    ) -> Result<ArchiveReport, AgentCallError> {
        let _ = (backup, site, ask);
        Err(AgentCallError {
            node: node.into(),
            cause: AgentCallCause::NotAnAgentAction("Archive".into()),
        })
    }
}

/// An agent call that did not get an acknowledgement.
#[derive(Debug, thiserror::Error)]
#[error("agent on {node}: {cause}")]
pub struct AgentCallError {
    pub node: String,
    #[source]
    pub cause: AgentCallCause,
}

/// Why an agent call was not acknowledged, kept as a cause so logs show the chain and
/// callers can match on the kind.
#[derive(Debug, thiserror::Error)]
pub enum AgentCallCause {
    /// The agent answered with an error, or could not be reached.
    #[error("{0}")]
    Call(#[source] Box<crate::mirror::MirrorError>),
    #[error(
        "no agent endpoint is known for this node (not a Node of the cluster with an \
         InternalIP, and not named by --agent)"
    )]
    NoEndpoint,
    #[error(
        "no clock reading from this node's agent (not probed yet, or an agent that predates \
         lease deadlines: upgrade the node plugin); no lease granted"
    )]
    NoClockReading,
    #[error("not an agent action: {0}")]
    NotAnAgentAction(String),
    /// The agent could not be reached (simulated agents in tests and benches).
    #[error("unreachable")]
    Unreachable,
}
