//! Finding agents in a cluster: every Node's InternalIP and the agents' port, listed on
//! each resolve (a moved node is followed), static entries taking precedence, and a clear
//! error when Nodes cannot be listed.
#![allow(clippy::unwrap_used)]

use crate::kit;
use hsm_secrets::mirror::{EndpointResolver, NodeAddressEndpoints, Peer, StaticEndpoints};
use kit::mock_api;
use serde_json::json;

fn node_list(nodes: &[(&str, &str)]) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"},
        "items": nodes.iter().map(|(name, ip)| json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [
                {"type": "Hostname", "address": name},
                {"type": "InternalIP", "address": ip}
            ]}
        })).collect::<Vec<_>>()
    })
}

#[tokio::test]
async fn nodes_resolve_to_their_internal_ip_on_every_round() {
    let (client, mut api) = mock_api::client();
    let overrides = StaticEndpoints::new(&[Peer {
        node: "edge-1".into(),
        endpoint: "https://edge.example:7443".into(),
    }]);
    let resolver = NodeAddressEndpoints::new(client, 9443, overrides);

    let round = tokio::spawn(async move {
        let first = resolver.resolve().await.unwrap();
        let second = resolver.resolve().await.unwrap();
        let third = resolver.resolve().await;
        (first, second, third)
    });
    for (i, nodes) in [
        vec![("worker-1", "10.0.0.1"), ("worker-2", "10.0.0.2")],
        vec![("worker-1", "10.0.0.9"), ("worker-2", "fd00::2")],
    ]
    .into_iter()
    .enumerate()
    {
        let seen = mock_api::next(&mut api).await;
        assert_eq!(
            (seen.method.as_str(), seen.path()),
            ("GET", "/api/v1/nodes"),
            "round {i}"
        );
        seen.reply(200, node_list(&nodes));
    }
    mock_api::next(&mut api).await.reply(
        403,
        mock_api::status(403, "Forbidden", "nodes is forbidden"),
    );
    let (first, second, third) = round.await.unwrap();
    assert_eq!(first["worker-1"], "https://10.0.0.1:9443");
    assert_eq!(first["edge-1"], "https://edge.example:7443");
    assert_eq!(second["worker-1"], "https://10.0.0.9:9443");
    assert_eq!(second["worker-2"], "https://[fd00::2]:9443");
    let err = third.unwrap_err().to_string();
    assert!(
        err.contains("list") && err.contains("--agent NODE=https://"),
        "{err}"
    );
}
