//! The Active policy's sync set on the primary: the mirrors every write waits for.
//!
//! Semi-synchronous rule: after the local write, the record is pushed to every mirror of
//! the write set, and the write is acknowledged once all of them applied it. A mirror
//! that fails or does not answer within the replication timeout becomes *dropping*: the
//! write is not acknowledged (it may still reach every node), and later writes keep
//! waiting for the mirror until the controller has recorded in HSMDevice status that it
//! is outside the write set — so it is never promoted automatically — and says so with
//! the next lease renewal. Only then is it *dropped* and writes go on without it. This
//! costs writes about one probe interval when a mirror fails, and is what makes an
//! acknowledged write survive any automatic failover. A dropping or dropped mirror
//! rejoins the set by itself once its pulls have brought it to the primary's sequence
//! under the current epoch.

use std::time::{Duration, SystemTime};

use futures::future::join_all;

use super::MirrorError;
use super::feed::Push;
use super::fencing::Peer;
use super::health::{OutsideMirror, ReplicationStatus};
use super::rpc::AgentPool;
use super::rpc::client::AgentConnection;

#[derive(Debug)]
enum MemberState {
    InSync,
    /// Failed a push; writes still wait for it until the controller takes it out.
    Dropping {
        reason: String,
        since: SystemTime,
    },
    /// Taken out of the write set by the controller.
    Dropped {
        reason: String,
        since: SystemTime,
    },
}

struct Member {
    conn: AgentConnection,
    state: MemberState,
}

#[derive(Default)]
pub(crate) struct SyncSet {
    members: Vec<Member>,
}

impl SyncSet {
    /// Sets the mirror set from an assignment. Mirrors already known keep their state
    /// (a re-sent assignment does not re-admit a dropped mirror); new ones start in sync:
    /// every later write reaches them before it is acknowledged.
    pub fn configure(&mut self, mirrors: &[Peer], pool: &AgentPool) -> Result<(), MirrorError> {
        let mut next = Vec::with_capacity(mirrors.len());
        for peer in mirrors {
            match self.members.iter().position(|m| m.conn.peer() == peer) {
                Some(i) => next.push(self.members.swap_remove(i)),
                None => next.push(Member {
                    conn: pool.connect(peer)?,
                    state: MemberState::InSync,
                }),
            }
        }
        self.members = next;
        Ok(())
    }

    pub fn clear(&mut self) {
        self.members.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The mirrors a write waits for: in sync, or dropping until the controller says.
    pub fn write_targets(&self) -> Vec<AgentConnection> {
        self.members
            .iter()
            .filter(|m| !matches!(m.state, MemberState::Dropped { .. }))
            .map(|m| m.conn.clone())
            .collect()
    }

    /// `node` failed a push: writes are not acknowledged without it until the controller
    /// takes it out of the write set.
    pub fn mark_dropping(&mut self, node: &str, reason: String) {
        for m in self.members.iter_mut().filter(|m| m.conn.node() == node) {
            if matches!(m.state, MemberState::InSync) {
                tracing::warn!(mirror = %node, reason = %reason, "mirror failed a push; writes are not acknowledged until the controller takes it out of the Active write set");
                m.state = MemberState::Dropping {
                    reason: reason.clone(),
                    since: SystemTime::now(),
                };
            }
        }
    }

    /// The controller recorded `outside` as outside the write set: stop waiting for those
    /// of them that are dropping. Mirrors in sync are never dropped this way.
    pub fn acknowledge_outside(&mut self, outside: &[String]) {
        for m in self.members.iter_mut() {
            if let MemberState::Dropping { reason, since } = &m.state
                && outside.iter().any(|n| n == m.conn.node())
            {
                tracing::warn!(mirror = %m.conn.node(), "mirror out of the Active write set; writes no longer wait for it");
                m.state = MemberState::Dropped {
                    reason: reason.clone(),
                    since: *since,
                };
            }
        }
    }

    /// A mirror that has pulled everything is back in the set.
    pub fn rejoin(&mut self, node: &str) {
        for m in self.members.iter_mut().filter(|m| m.conn.node() == node) {
            if !matches!(m.state, MemberState::InSync) {
                tracing::info!(mirror = %node, "mirror caught up and rejoined the Active sync set");
                m.state = MemberState::InSync;
            }
        }
    }

    pub fn status(&self) -> ReplicationStatus {
        let mut status = ReplicationStatus::default();
        for m in &self.members {
            let outside = |reason: &str, since: SystemTime| OutsideMirror {
                node: m.conn.node().to_string(),
                reason: reason.to_string(),
                since,
            };
            match &m.state {
                MemberState::InSync => status.in_sync.push(m.conn.node().to_string()),
                MemberState::Dropping { reason, since } => {
                    status.dropping.push(outside(reason, *since))
                }
                MemberState::Dropped { reason, since } => {
                    status.dropped.push(outside(reason, *since))
                }
            }
        }
        status
    }
}

/// Pushes one record to `targets` concurrently; each result names its mirror.
pub(crate) async fn push(
    targets: Vec<AgentConnection>,
    request: Push,
    timeout: Duration,
) -> Vec<(String, Result<(), MirrorError>)> {
    let request = &request;
    let calls = targets.into_iter().map(|conn| async move {
        {
            let node = conn.node().to_string();
            let result = match tokio::time::timeout(timeout, conn.push(request)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(MirrorError::Timeout {
                    node: node.clone(),
                    rpc: "Replicate",
                    timeout_ms: timeout.as_millis(),
                }),
            };
            (node, result)
        }
    });
    join_all(calls).await
}
