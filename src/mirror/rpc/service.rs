//! The gRPC face of an [`Agent`]: decodes requests, calls the agent, maps errors once.

use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::crd::DeviceRole;
use crate::hsm::{SecretPath, StoreError};

use super::client::MAX_MESSAGE_BYTES;
use super::convert;
use super::identity::{self, Identity};
use super::pb;
use super::pb::agent_server::AgentServer;
use crate::mirror::MirrorError;
use crate::mirror::agent::Agent;
use crate::mirror::fencing::{AgentClock, Assignment, Peer};

/// Implements the generated `Agent` service over an [`Agent`].
#[derive(Clone)]
pub struct AgentService {
    agent: Agent,
}

impl AgentService {
    pub fn new(agent: Agent) -> Self {
        Self { agent }
    }

    fn observe<T>(
        &self,
        rpc: &'static str,
        started: std::time::Instant,
        result: &Result<T, Status>,
    ) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        self.agent
            .config()
            .rpc_metrics
            .observe(rpc, code, started.elapsed());
    }

    /// The tonic service, with message limits large enough for the biggest secret.
    pub fn into_server(self) -> AgentServer<Self> {
        AgentServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// Refuses the call unless the caller's certificate carries the identity `rpc` needs;
/// the identity proven, for calls that act on who the sender is.
fn authorize<T>(request: &Request<T>, rpc: &'static str) -> Result<Identity, Status> {
    let certs = request.peer_certs();
    let caller = Identity::of_chain(certs.as_deref().map(Vec::as_slice));
    identity::authorize(rpc, &caller).map_err(|e| {
        tracing::warn!(
            rpc,
            caller = caller.describe(),
            "call refused: wrong identity"
        );
        Status::from(e)
    })?;
    Ok(caller)
}

fn parse_path(raw: &str) -> Result<SecretPath, MirrorError> {
    raw.parse()
        .map_err(|e: StoreError| MirrorError::InvalidArgument {
            field: "path",
            why: e.to_string(),
        })
}

fn peer(node: &str, endpoint: &str) -> Option<Peer> {
    (!node.is_empty() || !endpoint.is_empty()).then(|| Peer {
        node: node.into(),
        endpoint: endpoint.into(),
    })
}

/// Decodes an AssignRole request into an assignment, naming the field that is wrong.
pub fn assignment_from_pb(r: pb::AssignRoleRequest) -> Result<Assignment, MirrorError> {
    let invalid = |field, why: &str| MirrorError::InvalidArgument {
        field,
        why: why.into(),
    };
    let role = convert::role_from_pb(r.role).ok_or_else(|| {
        invalid(
            "role",
            "must be ROLE_PRIMARY, ROLE_READ_ONLY or ROLE_STANDBY",
        )
    })?;
    let primary = peer(&r.primary_node, &r.primary_endpoint);
    if let Some(p) = &primary
        && role != DeviceRole::Primary
        && (p.node.is_empty() || p.endpoint.is_empty())
    {
        return Err(invalid(
            "primary_node",
            "a mirror needs both primary_node and primary_endpoint (or neither, when no primary is known)",
        ));
    }
    let mut mirrors = Vec::with_capacity(r.mirrors.len());
    for m in r.mirrors {
        if m.node.is_empty() || m.endpoint.is_empty() {
            return Err(invalid(
                "mirrors",
                "every mirror needs a node and an endpoint",
            ));
        }
        mirrors.push(Peer {
            node: m.node,
            endpoint: m.endpoint,
        });
    }
    Ok(Assignment {
        role,
        epoch: r.epoch,
        primary,
        mirrors,
        lease: Duration::from_millis(r.lease_duration_ms),
        sync_interval: (r.sync_interval_seconds > 0)
            .then(|| Duration::from_secs(u64::from(r.sync_interval_seconds))),
    })
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn health(
        &self,
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::HealthResponse>, Status> = async move {
            authorize(&request, "Health")?;
            Ok(Response::new(convert::health_to_pb(
                &self.agent.health().await,
            )))
        }
        .await;
        self.observe("Health", started, &result);
        result
    }

    async fn manifest(
        &self,
        request: Request<pb::ManifestRequest>,
    ) -> Result<Response<pb::ManifestResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::ManifestResponse>, Status> = async move {
            authorize(&request, "Manifest")?;
            Ok(Response::new(convert::manifest_to_pb(
                &self.agent.manifest().await?,
            )))
        }
        .await;
        self.observe("Manifest", started, &result);
        result
    }

    async fn changes(
        &self,
        request: Request<pb::ChangesRequest>,
    ) -> Result<Response<pb::ChangesResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::ChangesResponse>, Status> = async move {
            authorize(&request, "Changes")?;
            let ask = convert::changes_ask_from_pb(request.into_inner());
            Ok(Response::new(convert::changes_to_pb(
                &self.agent.changes(ask).await?,
            )))
        }
        .await;
        self.observe("Changes", started, &result);
        result
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::FetchResponse>, Status> = async move {
            authorize(&request, "Fetch")?;
            let ask = convert::fetch_ask_from_pb(request.into_inner())?;
            Ok(Response::new(convert::fetched_to_pb(
                &self.agent.fetch(ask).await?,
            )))
        }
        .await;
        self.observe("Fetch", started, &result);
        result
    }

    #[tracing::instrument(skip_all, fields(node = %self.agent.node(), path = %request.get_ref().path))]
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::GetResponse>, Status> = async move {
            authorize(&request, "Get")?;
            let path = parse_path(&request.get_ref().path)?;
            Ok(Response::new(convert::served_to_pb(
                &self.agent.serve(&path).await?,
            )))
        }
        .await;
        self.observe("Get", started, &result);
        result
    }

    #[tracing::instrument(skip_all, fields(node = %self.agent.node(), path = %request.get_ref().path, epoch = request.get_ref().epoch))]
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::WriteResponse>, Status> = async move {
            authorize(&request, "Put")?;
            let r = request.into_inner();
            let path = parse_path(&r.path)?;
            let data = convert::data_from_pb(r.data).map_err(|e| MirrorError::InvalidArgument {
                field: "data",
                why: e.to_string(),
            })?;
            let outcome = self
                .agent
                .put(&path, data, convert::expect_from_pb(r.expect), r.epoch)
                .await?;
            Ok(Response::new(convert::write_to_pb(outcome)))
        }
        .await;
        self.observe("Put", started, &result);
        result
    }

    #[tracing::instrument(skip_all, fields(node = %self.agent.node(), path = %request.get_ref().path, epoch = request.get_ref().epoch))]
    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::WriteResponse>, Status> = async move {
            authorize(&request, "Delete")?;
            let r = request.into_inner();
            let path = parse_path(&r.path)?;
            let outcome = self
                .agent
                .delete(&path, convert::expect_from_pb(r.expect), r.epoch)
                .await?;
            Ok(Response::new(convert::write_to_pb(outcome)))
        }
        .await;
        self.observe("Delete", started, &result);
        result
    }

    async fn replicate(
        &self,
        request: Request<pb::ReplicateRequest>,
    ) -> Result<Response<pb::ReplicateResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::ReplicateResponse>, Status> = async move {
            let sender = authorize(&request, "Replicate")?;
            let request = request.into_inner();
            let (epoch, claimed) = (request.epoch, request.primary_node.clone());
            let push = match convert::push_from_pb(request) {
                Ok(push) => push,
                // Who pushes, and under which epoch, is judged before what it carries.
                Err(invalid) => {
                    self.agent.admit_push(epoch, &claimed, &sender)?;
                    return Err(invalid.into());
                }
            };
            let applied = self.agent.replicate(push, &sender).await?;
            Ok(Response::new(pb::ReplicateResponse { applied }))
        }
        .await;
        self.observe("Replicate", started, &result);
        result
    }

    #[tracing::instrument(skip_all, fields(node = %self.agent.node(), epoch = request.get_ref().epoch, role = request.get_ref().role))]
    async fn assign_role(
        &self,
        request: Request<pb::AssignRoleRequest>,
    ) -> Result<Response<pb::AssignRoleResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::AssignRoleResponse>, Status> = async move {
            authorize(&request, "AssignRole")?;
            let r = request.into_inner();
            let deadline = r.lease_deadline.map(convert::lease_deadline_from_pb);
            let mut assignment = assignment_from_pb(r)?;
            if assignment.role == DeviceRole::Primary {
                // Measured at receipt: the lease runs from now, and not past its deadline.
                assignment.lease = AgentClock::process().lease_within(
                    self.agent.node(),
                    assignment.lease,
                    deadline,
                )?;
            }
            Ok(Response::new(convert::assigned_to_pb(
                self.agent.assign(assignment).await?,
            )))
        }
        .await;
        self.observe("AssignRole", started, &result);
        result
    }

    async fn renew_lease(
        &self,
        request: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::RenewLeaseResponse>, Status> = async move {
            authorize(&request, "RenewLease")?;
            let r = request.into_inner();
            let lease = AgentClock::process().lease_within(
                self.agent.node(),
                Duration::from_millis(r.duration_ms),
                r.deadline.map(convert::lease_deadline_from_pb),
            )?;
            let remaining = self
                .agent
                .renew_lease(r.epoch, lease, &r.outside_write_set)?;
            Ok(Response::new(pb::RenewLeaseResponse {
                remaining_ms: u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX),
            }))
        }
        .await;
        self.observe("RenewLease", started, &result);
        result
    }

    async fn fence(
        &self,
        request: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::FenceResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::FenceResponse>, Status> = async move {
            authorize(&request, "Fence")?;
            let applied_sequence = self.agent.fence(request.into_inner().epoch).await?;
            Ok(Response::new(pb::FenceResponse { applied_sequence }))
        }
        .await;
        self.observe("Fence", started, &result);
        result
    }

    async fn archive(
        &self,
        request: Request<pb::ArchiveRequest>,
    ) -> Result<Response<pb::ArchiveResponse>, Status> {
        let started = std::time::Instant::now();
        let result: Result<Response<pb::ArchiveResponse>, Status> = async move {
            authorize(&request, "Archive")?;
            let Some(control) = self.agent.archive_control() else {
                return Err(Status::failed_precondition(
                    "this node does not archive: it runs without a token archive key \
                     supervisor (start the node plugin with --agent-listen and a token)",
                ));
            };
            let request = convert::archive_request_from_pb(request.into_inner());
            let report = control.archive(request).await;
            Ok(Response::new(convert::archive_report_to_pb(&report)))
        }
        .await;
        self.observe("Archive", started, &result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_decode_and_name_bad_fields() {
        let ok = assignment_from_pb(pb::AssignRoleRequest {
            role: pb::Role::ReadOnly as i32,
            epoch: 3,
            primary_node: "n1".into(),
            primary_endpoint: "https://n1:7443".into(),
            sync_interval_seconds: 60,
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(ok.role, DeviceRole::ReadOnly);
        assert_eq!(ok.primary.as_ref().map(|p| p.node.as_str()), Some("n1"));
        assert_eq!(ok.sync_interval, Some(Duration::from_secs(60)));

        let err = assignment_from_pb(pb::AssignRoleRequest {
            role: 0,
            epoch: 3,
            ..Default::default()
        })
        .expect_err("role");
        assert!(err.to_string().contains("role"), "{err}");
        let err = assignment_from_pb(pb::AssignRoleRequest {
            role: pb::Role::Standby as i32,
            epoch: 3,
            primary_node: "n1".into(),
            ..Default::default()
        })
        .expect_err("endpoint");
        assert!(err.to_string().contains("primary_endpoint"), "{err}");
        let err = assignment_from_pb(pb::AssignRoleRequest {
            role: pb::Role::Primary as i32,
            epoch: 3,
            mirrors: vec![pb::MirrorTarget {
                node: "n2".into(),
                endpoint: String::new(),
            }],
            ..Default::default()
        })
        .expect_err("mirror endpoint");
        assert!(err.to_string().contains("mirrors"), "{err}");
    }
}
