//! Publishing, rotating and unpublishing real tmpfs volumes through the gRPC API.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{
    DRIVER, FakeSource, GID, Harness, MODE, assert_nothing_left, is_mounted, mode_and_gid,
    mountinfo_line, read,
};
use hsm_secrets_csi::SourceError;
use tonic::Code;

fn db_and_api() -> Arc<FakeSource> {
    FakeSource::with_files(&[
        ("db/username", "admin"),
        ("db/password", "s3cret"),
        ("api/key", "k1"),
    ])
}

#[tokio::test]
async fn publish_mounts_a_hardened_tmpfs_with_the_files() {
    require_mounts!();
    let h = Harness::start(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();

    assert_eq!(read(&target.join("db/username")), "admin");
    assert_eq!(read(&target.join("db/password")), "s3cret");
    assert_eq!(read(&target.join("api/key")), "k1");
    assert_eq!(mode_and_gid(&target.join("db/password")), (MODE, GID));
    assert_eq!(
        mode_and_gid(&target),
        (0o750, GID),
        "the pod's group may traverse"
    );
    assert_eq!(mode_and_gid(&target.join("db")), (0o750, GID));

    let (options, fs_type, source, super_options) = mountinfo_line(&target).unwrap();
    assert_eq!(fs_type, "tmpfs");
    assert_eq!(source, DRIVER);
    for flag in ["nodev", "noexec", "nosuid"] {
        assert!(
            options.split(',').any(|o| o == flag),
            "{flag} missing: {options}"
        );
    }
    assert!(
        super_options.contains("size="),
        "size-limited: {super_options}"
    );

    let seen = h.source.last_request().unwrap();
    assert_eq!(seen.volume_id, "vol-1");
    assert_eq!(seen.target_path, target);
    assert_eq!(seen.fs_group, Some(GID));
    assert!(seen.read_only && !seen.republish);
    assert_eq!(seen.pod_namespace(), Some("shop"));
    assert_eq!(seen.service_account(), Some("checkout"));
    assert_eq!(h.observer.last_publish(), Some(("ok", false)));
}

#[tokio::test]
async fn publish_without_fs_group_is_world_traversable_and_root_owned() {
    require_mounts!();
    let h = Harness::start(FakeSource::with_files(&[("token", "t")])).await;
    let target = h.target("pod-a", "secrets");
    let mut request = common::publish_request("vol-1", &target);
    if let Some(hsm_secrets_csi::proto::volume_capability::AccessType::Mount(m)) =
        &mut request.volume_capability.as_mut().unwrap().access_type
    {
        m.volume_mount_group.clear();
    }
    h.publish(request).await.unwrap();
    assert_eq!(mode_and_gid(&target), (0o755, 0));
    assert_eq!(mode_and_gid(&target.join("token")), (MODE, 0));
    assert_eq!(h.source.last_request().unwrap().fs_group, None);
}

#[tokio::test]
async fn publish_and_unpublish_are_idempotent() {
    require_mounts!();
    let h = Harness::start(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();
    let generation = std::fs::read_link(target.join("..data")).unwrap();

    h.publish_target("vol-1", &target).await.unwrap();
    assert_eq!(read(&target.join("db/password")), "s3cret");
    assert_eq!(
        std::fs::read_link(target.join("..data")).unwrap(),
        generation,
        "unchanged content is not rewritten"
    );
    assert_eq!(h.observer.last_publish(), Some(("ok", true)));
    assert!(h.source.last_request().unwrap().republish);

    h.unpublish("vol-1", &target).await.unwrap();
    assert_nothing_left(&target);
    h.unpublish("vol-1", &target).await.unwrap();
    assert_nothing_left(&target);
    assert!(
        target.parent().unwrap().exists(),
        "kubelet's directory stays"
    );
    assert_eq!(*h.observer.unpublishes.lock().unwrap(), vec!["ok", "ok"]);
}

#[tokio::test]
async fn source_errors_map_to_their_codes_and_leave_nothing() {
    require_mounts!();
    let h = Harness::start(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    let cases = [
        (
            SourceError::NotFound("HSMSecret shop/db not found".into()),
            Code::NotFound,
        ),
        (
            SourceError::PermissionDenied("service account checkout may not mount db".into()),
            Code::PermissionDenied,
        ),
        (
            SourceError::Unavailable("no local device".into()),
            Code::Unavailable,
        ),
        (
            SourceError::InvalidArgument("bad fileMode".into()),
            Code::InvalidArgument,
        ),
        (SourceError::Internal("bug".into()), Code::Internal),
    ];
    for (error, code) in cases {
        h.source.fail_with(Some(error.clone()));
        let status = h.publish_target("vol-1", &target).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains("vol-1"), "{status:?}");
        assert_nothing_left(&target);
    }
    let kinds: Vec<&str> = h
        .observer
        .publishes
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(
        kinds,
        [
            "source_not_found",
            "source_permission_denied",
            "source_unavailable",
            "source_invalid_argument",
            "source_internal"
        ]
    );

    h.source.fail_with(None);
    h.publish_target("vol-1", &target).await.unwrap();
    assert_eq!(
        read(&target.join("api/key")),
        "k1",
        "a retry after the failure works"
    );
}

#[tokio::test]
async fn failed_publish_keeps_a_target_dir_it_did_not_create() {
    require_mounts!();
    let h = Harness::start(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    std::fs::create_dir(&target).unwrap();
    h.source
        .fail_with(Some(SourceError::Unavailable("down".into())));
    h.publish_target("vol-1", &target).await.unwrap_err();
    assert!(!is_mounted(&target));
    assert!(
        target.is_dir(),
        "the pre-existing directory is not ours to remove"
    );
}

#[tokio::test]
async fn bad_file_names_from_the_source_are_refused_by_name() {
    require_mounts!();
    let h = Harness::start(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    let long = "k".repeat(254);
    for name in [
        "db/key/extra",
        "../escape",
        "db/..",
        "..",
        "db/.",
        "/etc/passwd",
        "db\0key",
        long.as_str(),
        "..data",
        "db//key",
    ] {
        h.source.set_files(&[("db/ok", "v")]);
        h.source.set_raw(name, b"x".to_vec(), MODE);
        let status = h.publish_target("vol-1", &target).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}: {status:?}");
        assert!(
            status.message().contains(&format!("{name:?}")),
            "{:?} should name {name:?}",
            status.message()
        );
        assert_nothing_left(&target);
    }
}

#[tokio::test]
async fn republish_rotates_changed_content() {
    require_mounts!();
    let h = Harness::start(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();

    h.source.set_files(&[
        ("db/username", "admin"),
        ("db/password", "rotated"),
        ("tls/crt", "c"),
    ]);
    h.publish_target("vol-1", &target).await.unwrap();
    assert_eq!(read(&target.join("db/password")), "rotated");
    assert_eq!(read(&target.join("tls/crt")), "c");
    assert!(
        !target.join("api").exists(),
        "a secret no longer in the payload disappears"
    );
    let entries: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("..") && n != "..data")
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "only the current generation remains: {entries:?}"
    );
    assert_eq!(h.observer.last_publish(), Some(("ok", true)));
}

#[tokio::test]
async fn readers_of_one_generation_never_see_a_mix() {
    require_mounts!();
    let h = Harness::start(FakeSource::with_files(&[
        ("s/a", "gen-0"),
        ("s/b", "gen-0"),
    ]))
    .await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, target) = (stop.clone(), target.clone());
        std::thread::spawn(move || {
            let (mut consistent, mut mixed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                // Resolve ..data once, then read everything inside that generation. The
                // generation may be removed under us (a miss), never changed (a mix).
                let Ok(generation) = std::fs::read_link(target.join("..data")) else {
                    continue;
                };
                let dir = target.join(generation);
                match (
                    std::fs::read_to_string(dir.join("s/a")),
                    std::fs::read_to_string(dir.join("s/b")),
                ) {
                    (Ok(a), Ok(b)) if a == b => consistent += 1,
                    (Ok(a), Ok(b)) => mixed.push((a, b)),
                    _ => {}
                }
            }
            (consistent, mixed)
        })
    };

    for n in 1..=40 {
        let value = format!("gen-{n}");
        h.source.set_files(&[("s/a", &value), ("s/b", &value)]);
        h.publish_target("vol-1", &target).await.unwrap();
        assert_eq!(read(&target.join("s/a")), value);
    }
    stop.store(true, Ordering::Relaxed);
    let (consistent, mixed) = reader.join().unwrap();
    assert!(mixed.is_empty(), "mixed generations seen: {mixed:?}");
    assert!(consistent > 0, "the reader read something");
}

#[tokio::test]
async fn failed_republish_keeps_last_good_content_and_reports_it() {
    require_mounts!();
    let h = Harness::start(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();

    h.source
        .fail_with(Some(SourceError::Unavailable("primary down".into())));
    h.publish_target("vol-1", &target).await.unwrap();
    assert_eq!(read(&target.join("db/password")), "s3cret");
    assert_eq!(h.observer.last_publish(), Some(("kept_last_good", true)));

    h.source.fail_with(None);
    h.source.set_files(&[("db/../../escape", "x")]);
    h.publish_target("vol-1", &target).await.unwrap();
    assert_eq!(read(&target.join("db/password")), "s3cret");
    assert!(is_mounted(&target));
    assert_eq!(
        h.observer.kept(),
        vec![
            ("vol-1".to_string(), "source_unavailable"),
            ("vol-1".to_string(), "invalid_payload_file"),
        ]
    );

    h.source.set_files(&[("db/password", "recovered")]);
    h.publish_target("vol-1", &target).await.unwrap();
    assert_eq!(read(&target.join("db/password")), "recovered");
}

/// Revocation: when a republish hears a definite "no" (the pod's service account left
/// spec.access: PermissionDenied; the HSMSecret was deleted: NotFound), keeping the last
/// content would keep serving a revoked secret. The files go at once, atomically; the
/// volume stays mounted (empty) and the RPC succeeds, so kubelet does not tear the pod's
/// volume down; the observer hears of it (an Event on the pod). Access given back
/// restores the files at the next republish.
#[tokio::test]
async fn a_revoked_secret_is_removed_at_the_next_republish() {
    require_mounts!();
    for refusal in [
        SourceError::PermissionDenied("service account checkout left spec.access".into()),
        SourceError::NotFound("HSMSecret db was deleted".into()),
    ] {
        let h = Harness::start(db_and_api()).await;
        let target = h.target("pod-a", "secrets");
        h.publish_target("vol-1", &target).await.unwrap();
        assert_eq!(read(&target.join("db/password")), "s3cret");

        let kind = refusal.code();
        h.source.fail_with(Some(refusal));
        h.publish_target("vol-1", &target).await.unwrap();
        assert!(is_mounted(&target), "{kind:?}: the volume stays mounted");
        assert!(
            !target.join("db/password").exists(),
            "{kind:?}: still served"
        );
        assert!(!target.join("db").exists() && !target.join("api").exists());
        assert_eq!(h.observer.last_publish(), Some(("revoked", true)));
        assert_eq!(h.observer.revoked().len(), 1, "{kind:?}");
        assert!(h.observer.kept().is_empty(), "{kind:?}");

        h.source.fail_with(None);
        h.publish_target("vol-1", &target).await.unwrap();
        assert_eq!(read(&target.join("db/password")), "s3cret");
        h.unpublish("vol-1", &target).await.unwrap();
    }
}

#[tokio::test]
async fn republish_grows_the_tmpfs_for_a_larger_payload() {
    require_mounts!();
    let h = Harness::start(FakeSource::with_files(&[("blob/data", "small")])).await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();
    let size_kib = |target: &Path| -> u64 {
        let (_, _, _, super_options) = mountinfo_line(target).unwrap();
        super_options
            .split(',')
            .find_map(|o| o.strip_prefix("size="))
            .and_then(|s| s.strip_suffix('k'))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(size_kib(&target), 1024);

    let big = vec![b'x'; 3 << 20];
    h.source.set_raw("blob/data", big.clone(), MODE);
    h.publish_target("vol-1", &target).await.unwrap();
    assert!(h.observer.kept().is_empty(), "the larger payload fit");
    assert_eq!(std::fs::read(target.join("blob/data")).unwrap(), big);
    assert!(
        size_kib(&target) >= 2 * 3 * 1024,
        "room for two generations"
    );
    let (options, ..) = mountinfo_line(&target).unwrap();
    assert!(
        options.contains("noexec"),
        "remount kept the flags: {options}"
    );
}

#[tokio::test]
async fn unpublish_detaches_a_busy_volume() {
    require_mounts!();
    let h = Harness::start(db_and_api()).await;
    let target = h.target("pod-a", "secrets");
    h.publish_target("vol-1", &target).await.unwrap();
    let open = std::fs::File::open(target.join("db/password")).unwrap();

    h.unpublish("vol-1", &target).await.unwrap();
    assert_nothing_left(&target);
    drop(open);
}

/// Finding: unpublish unmounted whatever was at the target. A tmpfs of another driver (or
/// anything that is not this driver's tmpfs) is refused and left mounted, with its
/// directory.
#[tokio::test]
async fn unpublish_refuses_a_mount_that_is_not_ours() {
    require_mounts!();
    let h = Harness::start(db_and_api()).await;
    let target = h.target("pod-a", "other");
    std::fs::create_dir(&target).unwrap();
    nix::mount::mount(
        Some("other-driver"),
        &target,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    std::fs::write(target.join("theirs"), b"keep").unwrap();

    let err = h.unpublish("vol-x", &target).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("other-driver"), "{}", err.message());
    assert!(is_mounted(&target), "a foreign mount was unmounted");
    assert_eq!(read(&target.join("theirs")), "keep");
    nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
}

/// Finding: a symlinked directory in the target path led publish, unpublish and the
/// writer outside the kubelet directory. Symlinks are refused in every component, before
/// anything is created, mounted, written or removed.
#[tokio::test]
async fn symlinks_anywhere_in_the_target_path_are_refused() {
    require_mounts!();
    let h = Harness::start(db_and_api()).await;
    let outside = tempfile::tempdir().unwrap();
    // The pod directory is a symlink to a directory outside kubelet's tree, laid out like
    // a pod so the path checks pass.
    let elsewhere = outside.path().join("volumes/kubernetes.io~csi/secrets");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let pod = h.kubelet_dir.join("pods/evil-pod");
    std::os::unix::fs::symlink(outside.path(), &pod).unwrap();
    let target = pod.join("volumes/kubernetes.io~csi/secrets/mount");

    let err = h.publish_target("vol-1", &target).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("symbolic link"), "{}", err.message());
    assert!(
        !elsewhere.join("mount").exists(),
        "publish followed the symlink"
    );

    // A mount of ours outside, reached through the symlink: unpublish leaves it alone.
    let ours = elsewhere.join("mount");
    std::fs::create_dir(&ours).unwrap();
    nix::mount::mount(
        Some(DRIVER),
        &ours,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    let err = h.unpublish("vol-1", &target).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(is_mounted(&ours), "unpublish followed the symlink");
    nix::mount::umount2(&ours, nix::mount::MntFlags::MNT_DETACH).unwrap();

    // The last component as a symlink, inside kubelet's tree, too.
    let volume = h.target("pod-b", "secrets");
    std::os::unix::fs::symlink(outside.path(), &volume).unwrap();
    let err = h.publish_target("vol-2", &volume).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}
