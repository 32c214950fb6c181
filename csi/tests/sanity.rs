//! The CSI sanity-suite cases that apply to a node-only ephemeral plugin, plus request
//! validation: every bad request gets the right code and leaves nothing behind.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use common::{DRIVER, FakeSource, Harness, NODE_ID, assert_nothing_left, publish_request};
use hsm_secrets_csi::proto::node_service_capability::{self, rpc};
use hsm_secrets_csi::proto::plugin_capability::{self, service};
use hsm_secrets_csi::proto::volume_capability::access_mode::Mode;
use hsm_secrets_csi::proto::volume_capability::{AccessType, BlockVolume};
use hsm_secrets_csi::proto::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeExpandVolumeRequest,
    NodeGetCapabilitiesRequest, NodeGetInfoRequest, NodeGetVolumeStatsRequest,
    NodePublishVolumeRequest, NodeStageVolumeRequest, NodeUnpublishVolumeRequest,
    NodeUnstageVolumeRequest, ProbeRequest,
};
use hsm_secrets_csi::{IdentityService, NodeService, SourceError};
use tonic::Code;

fn source() -> Arc<FakeSource> {
    FakeSource::with_files(&[("db/password", "s3cret")])
}

#[tokio::test]
async fn identity_reports_name_version_capabilities_and_readiness() {
    let h = Harness::start(source()).await;
    let mut identity = h.identity.clone();

    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, DRIVER);
    assert!(!info.vendor_version.is_empty());

    let caps = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(service::Type::VolumeAccessibilityConstraints as i32)));
    assert!(
        !services.contains(&(service::Type::ControllerService as i32)),
        "node-only plugin"
    );

    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    h.source
        .set_not_ready(Some(SourceError::Unavailable("token not present".into())));
    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(false));
}

#[tokio::test]
async fn node_reports_id_topology_and_mount_group_capability() {
    let h = Harness::start(source()).await;
    let mut node = h.node.clone();

    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, NODE_ID);
    let segments = info.accessible_topology.unwrap().segments;
    assert_eq!(
        segments
            .get(hsm_secrets_csi::DEFAULT_TOPOLOGY_KEY)
            .map(String::as_str),
        Some(NODE_ID)
    );

    let caps = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpcs: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    assert_eq!(rpcs, vec![rpc::Type::VolumeMountGroup as i32]);

    let unimplemented = [
        node.node_stage_volume(NodeStageVolumeRequest::default())
            .await
            .map(drop),
        node.node_unstage_volume(NodeUnstageVolumeRequest::default())
            .await
            .map(drop),
        node.node_get_volume_stats(NodeGetVolumeStatsRequest::default())
            .await
            .map(drop),
        node.node_expand_volume(NodeExpandVolumeRequest::default())
            .await
            .map(drop),
    ];
    for result in unimplemented {
        assert_eq!(result.unwrap_err().code(), Code::Unimplemented);
    }
}

type Mutation = fn(&mut NodePublishVolumeRequest);

#[tokio::test]
async fn bad_publish_requests_are_invalid_argument_and_leave_nothing() {
    let h = Harness::start(source()).await;
    let target = h.target("pod-a", "secrets");
    let outside = h.kubelet_dir.join("plugins/x/mount");
    let dotdot = format!(
        "{}/pods/pod-a/volumes/kubernetes.io~csi/../../../../escape/mount",
        h.kubelet_dir.display()
    );
    let wrong_plugin = h
        .kubelet_dir
        .join("pods/pod-a/volumes/kubernetes.io~secret/secrets/mount");

    let cases: Vec<(&str, &str, Mutation)> = vec![
        ("missing volume id", "volume_id", |r| r.volume_id.clear()),
        ("missing target", "target_path", |r| r.target_path.clear()),
        ("missing capability", "volume_capability", |r| {
            r.volume_capability = None
        }),
        ("missing access type", "access_type", |r| {
            r.volume_capability.as_mut().unwrap().access_type = None
        }),
        ("block access", "block", |r| {
            r.volume_capability.as_mut().unwrap().access_type =
                Some(AccessType::Block(BlockVolume {}))
        }),
        ("missing access mode", "access_mode", |r| {
            r.volume_capability.as_mut().unwrap().access_mode = None
        }),
        ("multi-node multi-writer", "MULTI_NODE_MULTI_WRITER", |r| {
            r.volume_capability
                .as_mut()
                .unwrap()
                .access_mode
                .as_mut()
                .unwrap()
                .mode = Mode::MultiNodeMultiWriter as i32
        }),
        ("unknown access mode", "UNKNOWN", |r| {
            r.volume_capability
                .as_mut()
                .unwrap()
                .access_mode
                .as_mut()
                .unwrap()
                .mode = Mode::Unknown as i32
        }),
        ("read-write", "set readOnly: true", |r| r.readonly = false),
        ("other fs type", "fs_type", |r| {
            if let Some(AccessType::Mount(m)) =
                &mut r.volume_capability.as_mut().unwrap().access_type
            {
                m.fs_type = "ext4".into();
            }
        }),
        ("group name", "volume_mount_group", |r| {
            if let Some(AccessType::Mount(m)) =
                &mut r.volume_capability.as_mut().unwrap().access_type
            {
                m.volume_mount_group = "wheel".into();
            }
        }),
    ];
    for (name, message_part, mutate) in cases {
        let mut request = publish_request("vol-1", &target);
        mutate(&mut request);
        let status = h.publish(request).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().contains(message_part),
            "{name}: {:?} should mention {message_part:?}",
            status.message()
        );
        assert_nothing_left(&target);
    }

    for (name, path) in [
        ("outside pods", outside.to_str().unwrap().to_string()),
        ("dot-dot", dotdot),
        (
            "not a csi volume dir",
            wrong_plugin.to_str().unwrap().to_string(),
        ),
        (
            "relative",
            "pods/pod-a/volumes/kubernetes.io~csi/secrets/mount".into(),
        ),
    ] {
        let mut request = publish_request("vol-1", &target);
        request.target_path = path.clone();
        let status = h.publish(request).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().contains("target_path"),
            "{name}: {status:?}"
        );
        assert!(
            !std::path::Path::new(&path).exists(),
            "{name}: created {path}"
        );
    }
    assert!(!h.kubelet_dir.join("escape").exists());
    assert_eq!(h.source.calls(), 0, "bad requests never reach the source");
}

/// csi-sanity's own NodePublishVolume argument cases use its mount directory
/// (`<mountdir>/target`), not kubelet's layout: each is refused for the field it leaves
/// out, and a complete request to that target is still refused for its path and creates
/// nothing (the README's "CSI conformance (csi-sanity)" section).
#[tokio::test]
async fn csi_sanity_argument_cases_name_their_field_and_its_target_stays_refused() {
    let h = Harness::start(source()).await;
    let mountdir = tempfile::tempdir().unwrap();
    let sanity_target = mountdir.path().join("target");
    let sanity_target = sanity_target.to_str().unwrap();

    let no_capability = NodePublishVolumeRequest {
        volume_id: "sanity-vol".into(),
        target_path: sanity_target.into(),
        volume_capability: None,
        ..Default::default()
    };
    let status = h.publish(no_capability).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("volume_capability"), "{status:?}");

    let mut complete = publish_request("sanity-vol", &h.target("pod-a", "secrets"));
    complete.target_path = sanity_target.into();
    let status = h.publish(complete).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("target_path"), "{status:?}");
    assert!(!std::path::Path::new(sanity_target).exists());
    assert_eq!(h.source.calls(), 0);

    let status = h
        .unpublish("sanity-vol", std::path::Path::new(sanity_target))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn single_node_writer_modes_are_accepted_for_inline_volumes() {
    require_mounts!();
    let h = Harness::start(source()).await;
    for (i, mode) in [
        Mode::SingleNodeWriter,
        Mode::SingleNodeSingleWriter,
        Mode::SingleNodeReaderOnly,
        Mode::MultiNodeReaderOnly,
    ]
    .into_iter()
    .enumerate()
    {
        let target = h.target(&format!("pod-{i}"), "secrets");
        let mut request = publish_request("vol-1", &target);
        request
            .volume_capability
            .as_mut()
            .unwrap()
            .access_mode
            .as_mut()
            .unwrap()
            .mode = mode as i32;
        h.publish(request).await.unwrap();
        h.unpublish("vol-1", &target).await.unwrap();
    }
}

#[tokio::test]
async fn unpublish_validates_fields_and_succeeds_for_never_published_paths() {
    let h = Harness::start(source()).await;
    let target = h.target("pod-a", "secrets");
    let mut node = h.node.clone();

    let missing_id = NodeUnpublishVolumeRequest {
        volume_id: String::new(),
        target_path: target.to_str().unwrap().into(),
    };
    let status = node.node_unpublish_volume(missing_id).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("volume_id"));

    let missing_target = NodeUnpublishVolumeRequest {
        volume_id: "vol-1".into(),
        target_path: String::new(),
    };
    let status = node
        .node_unpublish_volume(missing_target)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("target_path"));

    let status = h
        .unpublish("vol-1", std::path::Path::new("/etc"))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "never unmount outside kubelet's tree"
    );

    h.unpublish("vol-1", &target).await.unwrap();
    h.unpublish("vol-1", &target).await.unwrap();
    assert!(
        target.parent().unwrap().exists(),
        "kubelet's own directory is untouched"
    );
}

#[tokio::test]
async fn serve_owns_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/csi/csi.sock");
    // A stale socket from a previous run must not stop the plugin from starting.
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());

    let source = source();
    let kubelet = dir.path().join("kubelet");
    let identity = IdentityService::new(DRIVER, "1.2.3", source.clone());
    let node = NodeService::new(common::config(&kubelet), source);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let endpoint = format!("unix://{}", socket.display());
    let server = tokio::spawn(async move {
        hsm_secrets_csi::serve(&endpoint, identity, node, async {
            let _ = stopped.await;
        })
        .await
    });

    let mut client = None;
    for _ in 0..100 {
        if let Ok(channel) = hsm_secrets_csi::connect_unix(&socket).await {
            client = Some(hsm_secrets_csi::proto::identity_client::IdentityClient::new(channel));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let info = client
        .expect("plugin listens")
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.vendor_version, "1.2.3");
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(!socket.exists(), "socket removed on shutdown");

    std::fs::write(&socket, b"not a socket").unwrap();
    let identity = IdentityService::new(DRIVER, "1", FakeSource::with_files(&[]));
    let node = NodeService::new(common::config(&kubelet), FakeSource::with_files(&[]));
    let endpoint = format!("unix://{}", socket.display());
    let refused = hsm_secrets_csi::serve(&endpoint, identity, node, async {}).await;
    assert!(
        refused.is_err(),
        "a regular file at the socket path is not deleted"
    );
    assert!(socket.exists());
}
