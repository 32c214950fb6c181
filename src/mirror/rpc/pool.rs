//! The one way to reach agents: a pool of connections, one lazily dialled channel per
//! node, kept while the node's endpoint stays the same. The controller (and the HSMSecret
//! reconciler through it), a primary pushing to its mirrors, a mirror pulling from its
//! primary and the node plugin's remote reads each hold one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::client::AgentConnection;
use super::tls::AgentTls;
use crate::mirror::{MirrorError, Peer};

/// Connections to agents under one client identity. Cheap to clone (clones share the
/// connections).
#[derive(Clone)]
pub struct AgentPool {
    tls: AgentTls,
    timeout: Duration,
    channels: Arc<Mutex<BTreeMap<String, AgentConnection>>>,
}

impl std::fmt::Debug for AgentPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentPool")
            .field("timeout", &self.timeout)
            .field("nodes", &self.lock().keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl AgentPool {
    /// Connections presenting `tls`'s certificate, every call under `timeout`.
    pub fn new(tls: &AgentTls, timeout: Duration) -> Self {
        Self {
            tls: tls.clone(),
            timeout,
            channels: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, AgentConnection>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The connection to `peer`: the pooled one while the node's endpoint is unchanged,
    /// else a new one that replaces it. A malformed endpoint is refused here.
    pub fn connect(&self, peer: &Peer) -> Result<AgentConnection, MirrorError> {
        let mut channels = self.lock();
        if let Some(conn) = channels.get(&peer.node)
            && conn.peer() == peer
        {
            return Ok(conn.clone());
        }
        let conn = AgentConnection::new(peer, &self.tls, self.timeout)?;
        channels.insert(peer.node.clone(), conn.clone());
        Ok(conn)
    }

    /// A new connection to `peer`, replacing the pooled one: a channel that lived through
    /// a partition waits out TCP's retransmission backoff (seconds) after the link heals,
    /// where a new one answers at once.
    pub fn redial(&self, peer: &Peer) -> Result<AgentConnection, MirrorError> {
        self.forget(&peer.node);
        self.connect(peer)
    }

    /// The pooled connection to `node`, if there is one.
    pub fn get(&self, node: &str) -> Option<AgentConnection> {
        self.lock().get(node).cloned()
    }

    /// Drops the pooled connection to `node`: the next [`connect`](Self::connect) dials
    /// afresh.
    pub fn forget(&self, node: &str) {
        self.lock().remove(node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A lazy channel needs a runtime to be made in.
    #[tokio::test]
    async fn a_node_keeps_its_channel_until_its_endpoint_changes_or_it_is_forgotten() {
        let dir = tempfile::tempdir().expect("dir");
        let pki = crate::mirror::generate_pki(dir.path(), &["n1"]).expect("pki");
        let tls = AgentTls::from_files(pki.files("n1").expect("n1")).expect("tls");
        let pool = AgentPool::new(&tls, Duration::from_secs(1));
        let at = |endpoint: &str| Peer {
            node: "n1".into(),
            endpoint: endpoint.into(),
        };
        let first = pool.connect(&at("https://127.0.0.1:1")).expect("connect");
        let again = pool.connect(&at("https://127.0.0.1:1")).expect("connect");
        assert!(
            first.shares_channel_with(&again),
            "same endpoint: one channel"
        );
        let moved = pool.connect(&at("https://127.0.0.1:2")).expect("connect");
        assert!(
            !moved.shares_channel_with(&first),
            "a new endpoint: a new channel"
        );
        assert_eq!(pool.get("n1").expect("pooled").peer(), moved.peer());
        let fresh = pool.redial(&at("https://127.0.0.1:2")).expect("redial");
        assert!(!fresh.shares_channel_with(&moved), "a redial dials afresh");
        pool.forget("n1");
        assert!(pool.get("n1").is_none());
        let error = pool
            .connect(&at("http://127.0.0.1:1"))
            .expect_err("plain HTTP");
        assert!(error.to_string().contains("https://"), "{error}");
    }
}
