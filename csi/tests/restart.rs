//! A restarted plugin finds its volumes in mountinfo: nothing depends on memory.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use common::{DRIVER, FakeSource, Harness, assert_nothing_left, is_mounted, read};
use hsm_secrets_csi::discover_mounts;

#[tokio::test]
async fn restarted_plugin_unpublishes_and_rotates_existing_volumes() {
    require_mounts!();
    let mut h = Harness::start(FakeSource::with_files(&[("db/password", "v1")])).await;
    let a = h.target("pod-a", "secrets");
    let b = h.target("pod-b", "secrets");
    h.publish_target("vol-a", &a).await.unwrap();
    h.publish_target("vol-b", &b).await.unwrap();

    // A tmpfs that is not ours, in the same layout, must not be discovered.
    let foreign = h.target("pod-c", "other");
    std::fs::create_dir(&foreign).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &foreign,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();

    h.restart().await;
    assert_eq!(
        discover_mounts(&h.kubelet_dir, DRIVER).unwrap(),
        vec![a.clone(), b.clone()]
    );

    h.source.set_files(&[("db/password", "v2")]);
    h.publish_target("vol-a", &a).await.unwrap();
    assert_eq!(read(&a.join("db/password")), "v2");
    assert_eq!(
        h.observer.last_publish(),
        Some(("ok", true)),
        "recognised as a republish"
    );

    h.unpublish("vol-b", &b).await.unwrap();
    assert_nothing_left(&b);
    assert_eq!(
        discover_mounts(&h.kubelet_dir, DRIVER).unwrap(),
        vec![a.clone()]
    );

    let status = h.publish_target("vol-c", &foreign).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(is_mounted(&foreign));

    h.unpublish("vol-a", &a).await.unwrap();
    assert_nothing_left(&a);
    assert!(discover_mounts(&h.kubelet_dir, DRIVER).unwrap().is_empty());
}
