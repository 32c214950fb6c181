//! Calling another agent over mutual TLS: one lazily connected channel per peer, every
//! call under a deadline, every failure turned into a [`MirrorError`] naming the peer.

use std::future::Future;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::convert;
use super::pb;
use super::pb::agent_client::AgentClient;
use super::tls::AgentTls;
use crate::archive::ArchiveRequest;
use crate::archive::plan::ArchiveReport;
use crate::hsm::{Expect, SecretData, SecretPath};
use crate::mirror::MirrorError;
use crate::mirror::feed::{Changes, ChangesAsk, FetchAsk, Fetched, Manifest, Push};
use crate::mirror::fencing::Peer;
use crate::mirror::{AgentHealth, Assignment, LeaseDeadline, Served, WriteOutcome};

/// Largest message an agent sends or accepts: one secret may hold 256 keys of 1 MiB.
pub const MAX_MESSAGE_BYTES: usize = 300 * 1024 * 1024;

/// A client for one agent. Cheap to clone (clones share the connection).
#[derive(Clone)]
pub struct AgentConnection {
    peer: Peer,
    client: AgentClient<Channel>,
    timeout: Duration,
    /// Shared by the clones of one connection: which channel this is.
    #[cfg_attr(not(test), allow(dead_code))]
    channel: std::sync::Arc<()>,
}

impl std::fmt::Debug for AgentConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConnection")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl AgentConnection {
    /// Prepares a connection to `peer`, whose certificate must name `peer.node`. Nothing
    /// is dialled until the first call; a broken connection is re-dialled by the next.
    pub fn new(peer: &Peer, tls: &AgentTls, timeout: Duration) -> Result<Self, MirrorError> {
        Self::with_tls(peer, tls.client_config(&peer.node), timeout)
    }

    /// As [`new`](Self::new) with an explicit client TLS configuration.
    pub fn with_tls(
        peer: &Peer,
        tls: tonic::transport::ClientTlsConfig,
        timeout: Duration,
    ) -> Result<Self, MirrorError> {
        let invalid = |why: String| MirrorError::InvalidArgument {
            field: "endpoint",
            why,
        };
        if !peer.endpoint.starts_with("https://") {
            return Err(invalid(format!(
                "{:?} of node {} must start with https:// (agents speak mutual TLS)",
                peer.endpoint, peer.node
            )));
        }
        let endpoint = Endpoint::from_shared(peer.endpoint.clone())
            .map_err(|e| invalid(format!("{:?}: {e}", peer.endpoint)))?
            .tls_config(tls)
            .map_err(|e| invalid(format!("TLS for {:?}: {e}", peer.endpoint)))?
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let client = AgentClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            peer: peer.clone(),
            client,
            timeout,
            channel: std::sync::Arc::default(),
        })
    }

    /// Whether `other` is a clone of this connection (one channel).
    #[cfg(test)]
    pub(crate) fn shares_channel_with(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.channel, &other.channel)
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    pub fn node(&self) -> &str {
        &self.peer.node
    }

    /// Runs one call under the deadline and maps its failure.
    async fn call<T, F, Fut>(&self, rpc: &'static str, f: F) -> Result<T, MirrorError>
    where
        F: FnOnce(AgentClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.timeout, f(self.client.clone())).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(
                match MirrorError::from_status(&self.peer.node, rpc, status) {
                    MirrorError::Unreachable { node, detail, .. } => MirrorError::Unreachable {
                        node,
                        endpoint: self.peer.endpoint.clone(),
                        detail,
                    },
                    other => other,
                },
            ),
            Err(_) => Err(MirrorError::Timeout {
                node: self.peer.node.clone(),
                rpc,
                timeout_ms: self.timeout.as_millis(),
            }),
        }
    }

    pub async fn health(&self) -> Result<AgentHealth, MirrorError> {
        let answer = self
            .call("Health", |mut c| async move {
                c.health(pb::HealthRequest {}).await
            })
            .await?;
        convert::health_from_pb(&self.peer.node, answer)
    }

    pub async fn manifest(&self) -> Result<Manifest, MirrorError> {
        let answer = self
            .call("Manifest", |mut c| async move {
                c.manifest(pb::ManifestRequest {}).await
            })
            .await?;
        convert::manifest_from_pb(&self.peer.node, answer)
    }

    /// The primary's change feed after `ask.since` (records not yet verified: the caller
    /// verifies their checksums).
    pub async fn changes(&self, ask: &ChangesAsk) -> Result<Changes, MirrorError> {
        let request = convert::changes_ask_to_pb(ask);
        let answer = self
            .call("Changes", |mut c| async move { c.changes(request).await })
            .await?;
        convert::changes_from_pb(&self.peer.node, answer)
    }

    pub async fn fetch(&self, ask: &FetchAsk) -> Result<Fetched, MirrorError> {
        let request = convert::fetch_ask_to_pb(ask);
        let answer = self
            .call("Fetch", |mut c| async move { c.fetch(request).await })
            .await?;
        convert::fetched_from_pb(&self.peer.node, answer)
    }

    /// A secret as the agent holds it (its checksum not yet verified: the caller does).
    pub async fn get(&self, path: &SecretPath) -> Result<Served, MirrorError> {
        let request = pb::GetRequest {
            path: path.to_string(),
        };
        let answer = self
            .call("Get", |mut c| async move { c.get(request).await })
            .await?;
        convert::served_from_pb(&self.peer.node, answer)
    }

    pub async fn put(
        &self,
        path: &SecretPath,
        data: &SecretData,
        expect: Expect,
        epoch: u64,
    ) -> Result<WriteOutcome, MirrorError> {
        let request = pb::PutRequest {
            path: path.to_string(),
            data: data
                .iter()
                .map(|(k, v)| pb::KeyValue {
                    key: k.into(),
                    value: v.to_vec(),
                })
                .collect(),
            expect: Some(convert::expect_to_pb(expect)),
            epoch,
        };
        self.call("Put", |mut c| async move { c.put(request).await })
            .await
            .map(convert::write_from_pb)
    }

    pub async fn delete(
        &self,
        path: &SecretPath,
        expect: Expect,
        epoch: u64,
    ) -> Result<WriteOutcome, MirrorError> {
        let request = pb::DeleteRequest {
            path: path.to_string(),
            expect: Some(convert::expect_to_pb(expect)),
            epoch,
        };
        self.call("Delete", |mut c| async move { c.delete(request).await })
            .await
            .map(convert::write_from_pb)
    }

    /// Pushes one write of an Active primary; whether the mirror stored it (false: it
    /// held that version or a newer one already).
    pub async fn push(&self, push: &Push) -> Result<bool, MirrorError> {
        self.replicate(convert::push_to_pb(push))
            .await
            .map(|r| r.applied)
    }

    /// The Replicate call as sent on the wire (tests of the agent's checks use it).
    pub async fn replicate(
        &self,
        request: pb::ReplicateRequest,
    ) -> Result<pb::ReplicateResponse, MirrorError> {
        self.call(
            "Replicate",
            |mut c| async move { c.replicate(request).await },
        )
        .await
    }

    /// Assigns a role; `deadline` bounds a primary's write lease on the agent's clock.
    pub async fn assign(
        &self,
        assignment: &Assignment,
        deadline: Option<LeaseDeadline>,
    ) -> Result<(), MirrorError> {
        self.assign_role(convert::assignment_to_pb(assignment, deadline))
            .await
            .map(|_| ())
    }

    /// The AssignRole call as sent on the wire (tests of the agent's checks use it).
    pub async fn assign_role(
        &self,
        request: pb::AssignRoleRequest,
    ) -> Result<pb::AssignRoleResponse, MirrorError> {
        self.call(
            "AssignRole",
            |mut c| async move { c.assign_role(request).await },
        )
        .await
    }

    /// Tells a primary's archive supervisor the device's archive and site settings and
    /// what is asked of it; its report.
    pub async fn ask_archive(
        &self,
        request: &ArchiveRequest,
    ) -> Result<ArchiveReport, MirrorError> {
        self.archive(convert::archive_request_to_pb(request))
            .await
            .map(convert::archive_report_from_pb)
    }

    /// The Archive call as sent on the wire.
    pub async fn archive(
        &self,
        request: pb::ArchiveRequest,
    ) -> Result<pb::ArchiveResponse, MirrorError> {
        self.call("Archive", |mut c| async move { c.archive(request).await })
            .await
    }

    pub async fn fence(&self, epoch: u64) -> Result<pb::FenceResponse, MirrorError> {
        let request = pb::FenceRequest { epoch };
        self.call("Fence", |mut c| async move { c.fence(request).await })
            .await
    }

    /// Renews the write lease for `duration` from the agent's receipt of the request.
    /// The controller uses [`renew_lease_with`](Self::renew_lease_with) and a deadline: a request
    /// delivered late would otherwise extend the lease past what the controller counted.
    pub async fn renew_lease(
        &self,
        epoch: u64,
        duration: Duration,
    ) -> Result<pb::RenewLeaseResponse, MirrorError> {
        self.renew_lease_with(pb::RenewLeaseRequest {
            epoch,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            ..Default::default()
        })
        .await
    }

    /// Renews with everything the controller says: a deadline on the agent's clock and,
    /// under Active, the mirrors it recorded as outside the write set.
    pub async fn renew_lease_until(
        &self,
        epoch: u64,
        lease: Duration,
        deadline: LeaseDeadline,
        outside_write_set: &[String],
    ) -> Result<(), MirrorError> {
        self.renew_lease_with(pb::RenewLeaseRequest {
            epoch,
            duration_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
            deadline: Some(convert::lease_deadline_to_pb(deadline)),
            outside_write_set: outside_write_set.to_vec(),
        })
        .await
        .map(|_| ())
    }

    /// The RenewLease call as sent on the wire.
    pub async fn renew_lease_with(
        &self,
        request: pb::RenewLeaseRequest,
    ) -> Result<pb::RenewLeaseResponse, MirrorError> {
        self.call(
            "RenewLease",
            |mut c| async move { c.renew_lease(request).await },
        )
        .await
    }
}
