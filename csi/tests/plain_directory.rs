//! `MountMode::PlainDirectory`: volumes written straight into the target directory,
//! never mounted — also when the tests run as root, as they do in CI. Runs whatever the
//! privileges (no skip): the mode exists for unprivileged runs.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{
    DRIVER, FakeSource, GID, Harness, MODE, assert_nothing_left, is_mounted, mode_and_gid, read,
};
use hsm_secrets_csi::plain_directory::{self, MARKER};
use hsm_secrets_csi::proto::volume_capability::AccessType;
use hsm_secrets_csi::{MountMode, NodeService, SourceError};
use tonic::Code;

fn db_and_api() -> Arc<FakeSource> {
    FakeSource::with_files(&[
        ("db/username", "admin"),
        ("db/password", "s3cret"),
        ("api/key", "k1"),
    ])
}

async fn plain(source: Arc<FakeSource>) -> Harness {
    Harness::start_in_mode(source, MountMode::PlainDirectory).await
}

/// The group the files get: the pod's fsGroup when this process may give it (root),
/// else the process's own.
fn expected_gid() -> u32 {
    if nix::unistd::geteuid().is_root() {
        GID
    } else {
        nix::unistd::getegid().as_raw()
    }
}

/// No mount at all below the harness's kubelet directory.
fn assert_no_mounts_under(dir: &Path) {
    let dir = std::fs::canonicalize(dir).unwrap();
    let mounts: Vec<_> = hsm_secrets_csi::mountinfo::read_mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&dir))
        .collect();
    assert!(
        mounts.is_empty(),
        "plain-directory mode mounted: {mounts:?}"
    );
}

fn generation(target: &Path) -> std::path::PathBuf {
    std::fs::read_link(target.join("..data")).unwrap()
}

#[tokio::test]
async fn publish_writes_the_files_into_the_directory_without_mounting() {
    let h = plain(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();

    assert!(!is_mounted(&target), "nothing is mounted, even as root");
    assert_no_mounts_under(&h.kubelet_dir);
    assert_eq!(read(&target.join("db/username")), "admin");
    assert_eq!(read(&target.join("db/password")), "s3cret");
    assert_eq!(read(&target.join("api/key")), "k1");
    assert_eq!(
        mode_and_gid(&target.join("db/password")),
        (MODE, expected_gid())
    );
    // Without the pod's group the directory must stay traversable for the pod.
    let dir_mode = if nix::unistd::geteuid().is_root() {
        0o750
    } else {
        0o755
    };
    assert_eq!(mode_and_gid(&target), (dir_mode, expected_gid()));
    assert_eq!(read(&target.join(MARKER)), format!("{DRIVER}\n"));
    assert!(plain_directory::is_plain_volume(&target, DRIVER).unwrap());
    assert_eq!(h.observer.last_publish(), Some(("ok", false)));
    let seen = h.source.last_request().unwrap();
    assert!(!seen.republish);
    assert_eq!(seen.fs_group, Some(GID));
}

#[tokio::test]
async fn without_fs_group_the_directory_is_traversable_by_all() {
    let h = plain(FakeSource::with_files(&[("token", "t")])).await;
    let target = h.target("pod-a", "secrets");
    let mut request = common::publish_request("vol-1", &target);
    if let Some(AccessType::Mount(m)) = &mut request.volume_capability.as_mut().unwrap().access_type
    {
        m.volume_mount_group.clear();
    }
    h.publish(request).await.unwrap();
    let own_gid = nix::unistd::getegid().as_raw();
    assert_eq!(mode_and_gid(&target), (0o755, own_gid));
    assert_eq!(mode_and_gid(&target.join("token")), (MODE, own_gid));
    // Unchanged content with no group is recognised as unchanged.
    let before = generation(&target);
    let mut again = common::publish_request("vol-1", &target);
    if let Some(AccessType::Mount(m)) = &mut again.volume_capability.as_mut().unwrap().access_type {
        m.volume_mount_group.clear();
    }
    h.publish(again).await.unwrap();
    assert_eq!(generation(&target), before);
}

#[tokio::test]
async fn republish_rotates_content_and_leaves_unchanged_content_alone() {
    let h = plain(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();
    let first = generation(&target);

    h.publish_target("vol-1", &target).await.unwrap();
    assert_eq!(generation(&target), first, "same content: nothing written");
    assert_eq!(h.observer.last_publish(), Some(("ok", true)));
    assert!(h.source.last_request().unwrap().republish);

    h.source.set_files(&[("db/password", "rotated")]);
    h.publish_target("vol-1", &target).await.unwrap();
    assert_ne!(generation(&target), first);
    assert_eq!(read(&target.join("db/password")), "rotated");
    assert!(!target.join("api").exists(), "a removed secret is gone");
    assert!(
        !target.join(&first).exists(),
        "the old generation is removed"
    );
    assert!(
        plain_directory::is_plain_volume(&target, DRIVER).unwrap(),
        "the marker survives rotation"
    );
    assert!(!is_mounted(&target));
}

#[tokio::test]
async fn failed_republish_keeps_the_last_good_content() {
    let h = plain(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();
    h.source
        .fail_with(Some(SourceError::Unavailable("primary down".into())));
    h.publish_target("vol-1", &target).await.unwrap();
    assert_eq!(read(&target.join("db/password")), "s3cret");
    assert_eq!(h.observer.last_publish(), Some(("kept_last_good", true)));
    assert_eq!(
        h.observer.kept(),
        vec![("vol-1".to_string(), "source_unavailable")]
    );
}

#[tokio::test]
async fn unpublish_removes_the_directory_and_is_idempotent() {
    let h = plain(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();
    // A pod holding a file open does not keep the volume.
    let open = std::fs::File::open(target.join("db/password")).unwrap();
    h.unpublish("vol-1", &target).await.unwrap();
    drop(open);
    assert_nothing_left(&target);
    assert!(target.parent().unwrap().exists(), "kubelet's parent stays");
    h.unpublish("vol-1", &target).await.unwrap();
    assert_eq!(
        h.observer.unpublishes.lock().unwrap().as_slice(),
        ["ok", "ok"]
    );
}

#[tokio::test]
async fn a_failed_first_publish_leaves_nothing() {
    let h = plain(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    h.source
        .fail_with(Some(SourceError::NotFound("no such secret".into())));
    let status = h.publish_target("vol-1", &target).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_nothing_left(&target);

    h.source.fail_with(None);
    h.source.set_files(&[("db/../../escape", "x")]);
    let status = h.publish_target("vol-1", &target).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_nothing_left(&target);

    // kubelet's own empty target directory is used, and emptied again on failure.
    std::fs::create_dir(&target).unwrap();
    let status = h.publish_target("vol-1", &target).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    h.source.set_files(&[("db/password", "ok")]);
    h.publish_target("vol-1", &target).await.unwrap();
    assert_eq!(read(&target.join("db/password")), "ok");
}

#[tokio::test]
async fn a_foreign_directory_with_content_is_refused_and_kept() {
    let h = plain(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("precious"), "keep me").unwrap();
    let status = h.publish_target("vol-1", &target).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("not a volume of this driver"));
    assert_eq!(read(&target.join("precious")), "keep me");
    // Unpublish of a directory that is not ours removes nothing of it.
    let status = h.unpublish("vol-1", &target).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(read(&target.join("precious")), "keep me");
}

#[tokio::test]
async fn a_restarted_plugin_finds_rotates_and_removes_plain_volumes() {
    let mut h = plain(FakeSource::with_files(&[("db/password", "v1")])).await;
    let a = h.target("pod-a", "secrets");
    let b = h.target("pod-b", "secrets");
    h.publish_target("vol-a", &a).await.unwrap();
    h.publish_target("vol-b", &b).await.unwrap();
    // A directory in the same layout without our marker is not ours.
    let other = h.target("pod-c", "secrets");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("file"), "x").unwrap();

    h.restart().await;
    let node = NodeService::new(h.config(), h.source.clone());
    assert_eq!(node.discover_mounts().unwrap(), vec![a.clone(), b.clone()]);
    assert!(
        hsm_secrets_csi::discover_mounts(&h.kubelet_dir, DRIVER)
            .unwrap()
            .is_empty(),
        "no tmpfs mounts"
    );

    h.source.set_files(&[("db/password", "v2")]);
    h.publish_target("vol-a", &a).await.unwrap();
    assert_eq!(read(&a.join("db/password")), "v2");
    assert_eq!(h.observer.last_publish(), Some(("ok", true)));

    // Dropping the flag must not strand volumes on disk: a tmpfs-mode plugin still
    // recognises, republishes and removes them.
    h.mode = MountMode::Tmpfs;
    h.restart().await;
    let node = NodeService::new(h.config(), h.source.clone());
    assert_eq!(node.discover_mounts().unwrap(), vec![a.clone(), b.clone()]);
    h.publish_target("vol-b", &b).await.unwrap();
    assert_eq!(read(&b.join("db/password")), "v2");
    assert!(!is_mounted(&b), "a plain volume stays plain");
    h.unpublish("vol-a", &a).await.unwrap();
    h.unpublish("vol-b", &b).await.unwrap();
    assert_nothing_left(&a);
    assert_nothing_left(&b);
    assert!(node.discover_mounts().unwrap().is_empty());
    assert_eq!(read(&other.join("file")), "x");
    assert_no_mounts_under(&h.kubelet_dir);
}

#[test]
fn tmpfs_is_the_default() {
    assert_eq!(MountMode::default(), MountMode::Tmpfs);
    assert_eq!(common::config(Path::new("/k")).mount_mode, MountMode::Tmpfs);
    assert_eq!(
        common::config(Path::new("/k"))
            .with_unsafe_plain_directory(true)
            .mount_mode,
        MountMode::PlainDirectory
    );
}
