//! Where a node's agent listens: a static list (`--agent NODE=https://HOST:PORT`, the
//! no-cluster mode and tests) or, in a cluster, the node's InternalIP and the agents' port
//! (every node plugin serves its agent on the same port).
//!
//! The endpoint only says where to dial: the client still expects the server certificate
//! to name the node ([`AgentTls::client_config`](crate::mirror::AgentTls::client_config)), so an
//! address outside the hsm-secrets PKI fails the handshake. It does not tell one agent
//! from another: `hsm-secrets pki` issues one agent certificate naming every node.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};

use crate::mirror::{MirrorError, Peer};

/// Resolves node names to agent endpoints.
#[async_trait]
pub trait EndpointResolver: Send + Sync + 'static {
    /// The endpoints of every node it can name now (static entries, or every Node of the
    /// cluster with an address). Called once per controller round or remote-read refresh.
    async fn resolve(&self) -> Result<BTreeMap<String, String>, MirrorError>;
}

/// A fixed directory of agents.
#[derive(Clone, Debug, Default)]
pub struct StaticEndpoints {
    endpoints: BTreeMap<String, String>,
}

impl StaticEndpoints {
    pub fn new(peers: &[Peer]) -> Self {
        Self {
            endpoints: peers
                .iter()
                .map(|p| (p.node.clone(), p.endpoint.clone()))
                .collect(),
        }
    }

    /// Parses `NODE=https://HOST:PORT` entries (the `--agent` flag), naming the bad one.
    pub fn parse(entries: &[String]) -> Result<Self, MirrorError> {
        Ok(Self::new(&parse_agents(entries)?))
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn peers(&self) -> Vec<Peer> {
        self.endpoints
            .iter()
            .map(|(node, endpoint)| Peer {
                node: node.clone(),
                endpoint: endpoint.clone(),
            })
            .collect()
    }
}

#[async_trait]
impl EndpointResolver for StaticEndpoints {
    async fn resolve(&self) -> Result<BTreeMap<String, String>, MirrorError> {
        Ok(self.endpoints.clone())
    }
}

/// Parses `NODE=https://HOST:PORT` entries.
pub fn parse_agents(entries: &[String]) -> Result<Vec<Peer>, MirrorError> {
    entries
        .iter()
        .map(|entry| match entry.split_once('=') {
            Some((node, endpoint)) if !node.is_empty() && endpoint.starts_with("https://") => {
                Ok(Peer {
                    node: node.into(),
                    endpoint: endpoint.into(),
                })
            }
            _ => Err(MirrorError::InvalidArgument {
                field: "agent",
                why: format!("{entry:?}: expected NODE=https://HOST:PORT"),
            }),
        })
        .collect()
}

/// Agents at `https://<node InternalIP>:<port>`, from the cluster's Node objects (listed
/// on every resolve, so a node that changed address is followed), plus static entries
/// that take precedence (nodes outside the cluster, overrides).
pub struct NodeAddressEndpoints {
    nodes: Api<Node>,
    port: u16,
    overrides: StaticEndpoints,
}

impl NodeAddressEndpoints {
    pub fn new(client: kube::Client, port: u16, overrides: StaticEndpoints) -> Self {
        Self {
            nodes: Api::all(client),
            port,
            overrides,
        }
    }
}

#[async_trait]
impl EndpointResolver for NodeAddressEndpoints {
    async fn resolve(&self) -> Result<BTreeMap<String, String>, MirrorError> {
        let nodes =
            self.nodes
                .list(&ListParams::default())
                .await
                .map_err(|e| MirrorError::Discovery {
                    detail: format!(
                        "cannot list Nodes to find agent addresses: {e}; grant the service account \
                     `list` on nodes, or name agents with --agent NODE=https://HOST:PORT"
                    ),
                })?;
        let mut endpoints: BTreeMap<String, String> = nodes
            .items
            .iter()
            .filter_map(|node| {
                let name = node.metadata.name.clone()?;
                Some((name, node_endpoint(node, self.port)?))
            })
            .collect();
        endpoints.extend(self.overrides.endpoints.clone());
        Ok(endpoints)
    }
}

/// `https://<InternalIP>:<port>` of a Node (IPv6 in brackets); None without an
/// InternalIP (a node not yet registered its addresses).
pub fn node_endpoint(node: &Node, port: u16) -> Option<String> {
    let addresses = node.status.as_ref()?.addresses.as_ref()?;
    let ip = addresses
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())?;
    Some(if ip.contains(':') {
        format!("https://[{ip}]:{port}")
    } else {
        format!("https://{ip}:{port}")
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};

    fn node(addresses: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: (*t).into(),
                            address: (*a).into(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_internal_ip_is_the_endpoint() {
        let n = node(&[("Hostname", "w1"), ("InternalIP", "10.0.0.7")]);
        assert_eq!(
            node_endpoint(&n, 9443).as_deref(),
            Some("https://10.0.0.7:9443")
        );
        let n = node(&[("InternalIP", "fd00::7")]);
        assert_eq!(
            node_endpoint(&n, 9443).as_deref(),
            Some("https://[fd00::7]:9443")
        );
        assert_eq!(node_endpoint(&node(&[("ExternalIP", "1.2.3.4")]), 1), None);
        assert_eq!(node_endpoint(&Node::default(), 1), None);
    }

    #[test]
    fn agent_entries_are_parsed_or_named() {
        let peers = parse_agents(&["n1=https://10.0.0.1:7443".into()]).unwrap();
        assert_eq!(peers[0].node, "n1");
        for bad in ["n1", "=https://x:1", "n1=http://x:1"] {
            let err = parse_agents(&[bad.into()]).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("NODE=https://"), "{err}");
        }
    }
}
