//! The controller finds agents in a cluster: each round it lists the Nodes (the scripted
//! API server answers), dials every node's InternalIP at the agents' port, and gives each
//! HSMDevice only the nodes its spec and status name, or, where the spec leaves
//! membership open, the nodes whose agent reports its token. Real agents on SoftHSM
//! tokens serve on loopback addresses 127.0.0.2-4, all on one port, as agents of a
//! cluster do on their nodes.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hsm_secrets::controller::{Agents, GrpcAgents};
use hsm_secrets::crd::{HSMDevice, MirroringPolicy};
use hsm_secrets::failover::{DeviceView, NodeErrorKind, ProbeResult};
use hsm_secrets::mirror::{NodeAddressEndpoints, Peer, StaticEndpoints};
use kit::mirror::*;
use kit::mock_api;
use serde_json::json;

fn node_list(nodes: &[(&str, &str)]) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"},
        "items": nodes.iter().map(|(name, ip)| json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}
        })).collect::<Vec<_>>()
    })
}

/// Serves `node`'s agent on `ip:port` too (the port every agent of the "cluster" uses).
async fn serve_at(node: &TestNode, ip: &str, port: u16) -> u16 {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let listener = hsm_secrets::mirror::bind(addr).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(hsm_secrets::mirror::serve(
        node.agent.clone(),
        listener,
        std::future::pending(),
    ));
    port
}

fn device(name: &str, label: &str, primary: Option<&str>, targets: &[&str]) -> HSMDevice {
    kit::resources::device(name)
        .token(label)
        .mirrored(primary, targets)
        .sync_interval(300)
        .auto_failover(3)
        .build()
}

/// One controller round's resolution: refresh (one Node list, answered by `nodes`).
async fn refresh(agents: &Arc<GrpcAgents>, api: &mut mock_api::Handle, nodes: &[(&str, &str)]) {
    let task = {
        let agents = agents.clone();
        tokio::spawn(async move { agents.refresh().await })
    };
    let seen = mock_api::next(api).await;
    assert_eq!(
        (seen.method.as_str(), seen.path()),
        ("GET", "/api/v1/nodes")
    );
    seen.reply(200, node_list(nodes));
    task.await.unwrap();
}

async fn probe(agents: &GrpcAgents, device: &HSMDevice, node: &str) -> ProbeResult {
    agents.probe(&DeviceView::of(device), node).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_round_resolves_nodes_and_each_device_gets_only_its_own() {
    let pki = Pki::new(&["n1", "n2", "n3"]);
    let tokens = Tokens::new();
    // n1 and n2 name the devices they serve; n3 is an older agent that names none.
    let Some(n1) =
        TestNode::start_serving(&tokens, "n1", "disc-n1", "dev-a", &pki, manual_sync()).await
    else {
        return;
    };
    let n2 = TestNode::start_serving(&tokens, "n2", "disc-n2", "dev-open", &pki, manual_sync())
        .await
        .unwrap();
    let n3 = TestNode::start(&tokens, "n3", "disc-n3", &pki, manual_sync())
        .await
        .unwrap();
    let (l1, l2, l3) = (&n1.token.label, &n2.token.label, &n3.token.label);
    let port = serve_at(&n1, "127.0.0.2", 0).await;
    serve_at(&n2, "127.0.0.3", port).await;

    let (client, mut api) = mock_api::client();
    // n3 lives outside the cluster's addressing: a static entry names its endpoint.
    let overrides = StaticEndpoints::new(&[n3.peer()]);
    let agents = Arc::new(GrpcAgents::discovering(
        Arc::new(NodeAddressEndpoints::new(client, port, overrides)),
        &pki.tls(CONTROLLER),
        Duration::from_secs(10),
        Duration::from_secs(15),
    ));
    assert!(
        agents.connections().is_empty(),
        "nothing known before a round"
    );

    // Two devices on disjoint nodes; a third leaves membership to its token's label.
    let a = device("dev-a", l1, Some("n1"), &["n2"]);
    let b = device("dev-b", l3, Some("n3"), &["n4"]);
    let open = device("dev-open", l2, None, &[]);

    refresh(
        &agents,
        &mut api,
        &[
            ("n1", "127.0.0.2"),
            ("n2", "127.0.0.3"),
            ("n4", "127.0.0.4"),
        ],
    )
    .await;
    assert_eq!(agents.known_nodes(), ["n1", "n2", "n3", "n4"]);
    assert_eq!(agents.nodes(&a).await, ["n1", "n2"]);
    // n4 has an address but no agent listens there: named, so probed (and found dead).
    assert_eq!(agents.nodes(&b).await, ["n3", "n4"]);
    assert_eq!(agents.nodes(&open).await, ["n2"], "only n2 serves dev-open");
    // The device an agent names decides, not the label: dev-open under n1's label is
    // still n2's, and another device on n2's label has no agent.
    let relabelled = device("dev-open", l1, None, &[]);
    assert_eq!(agents.nodes(&relabelled).await, ["n2"]);
    let shares_label = device("dev-other", l2, None, &[]);
    assert!(
        agents.nodes(&shares_label).await.is_empty(),
        "n2 serves dev-open, whatever its token label"
    );
    match probe(&agents, &open, "n2").await {
        ProbeResult::Reported(r) => assert!(r.token_present, "{r:?}"),
        other => panic!("n2 serves dev-open: {other:?}"),
    }
    // An agent naming no device falls back to the token label.
    let older = device("dev-c", l3, None, &[]);
    assert_eq!(agents.nodes(&older).await, ["n3"]);
    match probe(&agents, &a, "n2").await {
        ProbeResult::Reported(r) => assert!(r.token_present, "{r:?}"),
        other => panic!("n2 through its InternalIP: {other:?}"),
    }
    match probe(&agents, &b, "n3").await {
        ProbeResult::Reported(r) => assert!(r.token_present, "{r:?}"),
        other => panic!("n3 through the static override: {other:?}"),
    }
    match probe(&agents, &b, "n4").await {
        ProbeResult::Failed(e) => assert_eq!(e.kind, NodeErrorKind::Unreachable, "{e:?}"),
        other => panic!("nothing listens for n4: {other:?}"),
    }
    // The shared channels other reconcilers use: every known node, n2 at its address.
    let conns = agents.connections();
    let n2_conn = conns.iter().find(|c| c.node() == "n2").unwrap();
    assert_eq!(n2_conn.peer().endpoint, format!("https://127.0.0.3:{port}"));

    // Next round n2 is gone from the cluster: dev-a's n2 is no longer dialled.
    refresh(&agents, &mut api, &[("n1", "127.0.0.2")]).await;
    assert_eq!(agents.nodes(&a).await, ["n1"]);
    match probe(&agents, &a, "n2").await {
        ProbeResult::Failed(e) => {
            assert_eq!(e.kind, NodeErrorKind::Unreachable);
            assert!(e.detail.contains("no agent endpoint"), "{e:?}");
        }
        other => panic!("n2 has no endpoint now: {other:?}"),
    }

    // It comes back at another address (its agent moved there): followed.
    serve_at(&n2, "127.0.0.5", port).await;
    refresh(
        &agents,
        &mut api,
        &[("n1", "127.0.0.2"), ("n2", "127.0.0.5")],
    )
    .await;
    assert_eq!(agents.nodes(&a).await, ["n1", "n2"]);
    match probe(&agents, &a, "n2").await {
        ProbeResult::Reported(r) => assert!(r.token_present),
        other => panic!("n2 at its new address: {other:?}"),
    }

    // The API server fails: the last known endpoints stay in use.
    let task = {
        let agents = agents.clone();
        tokio::spawn(async move { agents.refresh().await })
    };
    mock_api::next(&mut api).await.reply(
        503,
        mock_api::status(503, "ServiceUnavailable", "etcd down"),
    );
    task.await.unwrap();
    assert_eq!(agents.nodes(&a).await, ["n1", "n2"]);
    assert!(matches!(
        probe(&agents, &a, "n1").await,
        ProbeResult::Reported(_)
    ));
}

/// The static list (`--agent` without `--agent-port`): a device's nodes are the ones it
/// names that the list knows, not every agent of the list.
#[tokio::test]
async fn a_static_list_gives_each_device_its_named_nodes() {
    let pki = Pki::new(&["n1", "n2", "n3"]);
    let peer = |node: &str| Peer {
        node: node.into(),
        endpoint: format!("https://127.0.0.1:{}", 1),
    };
    let agents = GrpcAgents::new(
        &[peer("n1"), peer("n2"), peer("n3")],
        &pki.tls(CONTROLLER),
        Duration::from_secs(1),
        Duration::from_secs(15),
    )
    .unwrap();
    let a = device("dev-a", "a", Some("n1"), &["n2", "n9"]);
    let mut b = device("dev-b", "b", None, &[]);
    b.spec.mirroring.as_mut().unwrap().policy = MirroringPolicy::None;
    b.spec.mirroring.as_mut().unwrap().primary_node = Some("n3".into());
    assert_eq!(agents.nodes(&a).await, ["n1", "n2"]);
    assert_eq!(agents.nodes(&b).await, ["n3"]);
    assert_eq!(agents.connections().len(), 3);
}
