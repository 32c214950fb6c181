//! `hsm-secrets local`: up in the background, status, put/get through the agents, a
//! volume over a plugin's CSI socket, and down leaving nothing behind.
#![allow(clippy::unwrap_used)]

mod local_support;

use std::collections::BTreeMap;
use std::time::Duration;

use hsm_secrets::local::StateFile;
use hsm_secrets::local::clients::{self, PodIdentity};
use local_support::{
    Running, UNPRIVILEGED, UnmountOnDrop, UnprivilegedRun, available, command, mounts_under,
    processes_under, softhsm_available,
};

const TIMEOUT: Duration = Duration::from_secs(600);

fn local(args: &[&str], dir: &std::path::Path) -> (bool, String) {
    let mut c = command();
    c.arg("local").args(args).arg("--dir").arg(dir);
    let (status, out) = Running::start(c).finish(TIMEOUT);
    (status.success(), out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_status_put_get_mount_and_down() {
    if !available() {
        return;
    }
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("system");
    let _unmount = UnmountOnDrop(parent.path());
    // `down` runs even when an assertion fails.
    struct Down<'a>(&'a std::path::Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if self.0.exists() {
                let _ = local(&["down"], self.0);
            }
        }
    }
    let _down = Down(&dir);

    let (ok, out) = local(&["up"], &dir);
    assert!(ok, "{out}");
    assert!(
        out.contains("device prod-hsm: primary worker-1 at epoch 1"),
        "{out}"
    );
    assert!(out.contains("CSI unix://"), "{out}");
    assert!(out.contains("webhook: https://127.0.0.1:"), "{out}");
    // `up` has returned; the system keeps running on its own.
    assert!(!processes_under(&dir).is_empty());

    let (ok, out) = local(&["status"], &dir);
    assert!(ok, "{out}");
    assert!(
        out.lines().any(|l| l
            .split_whitespace()
            .take(4)
            .eq(["prod-hsm", "ReadOnly", "worker-1", "Ready"])),
        "{out}"
    );
    for process in [
        "node worker-1",
        "node worker-2",
        "node worker-3",
        "controller",
        "webhook",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(process) && l.contains("running")),
            "{process} not running:\n{out}"
        );
    }

    let (ok, out) = local(
        &["put", "payment-token", "token=tok-51e2", "issuer=bank"],
        &dir,
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("shop/payment-token: 2 key(s) written on worker-1"),
        "{out}"
    );
    assert!(
        out.contains("declared HSMSecret shop/payment-token on prod-hsm"),
        "{out}"
    );
    let (ok, out) = local(&["get", "payment-token", "--reveal"], &dir);
    assert!(ok, "{out}");
    assert!(
        out.contains("token: tok-51e2") && out.contains("issuer: bank"),
        "{out}"
    );
    let (ok, out) = local(&["get", "payment-token"], &dir);
    assert!(
        ok && out.contains("token: 8 bytes") && !out.contains("tok-51e2"),
        "{out}"
    );

    // A seeded secret through a mirror's CSI socket, as kubelet would ask for it.
    let state = StateFile::load(&dir).unwrap();
    let node = state.nodes.iter().find(|n| n.name == "worker-3").unwrap();
    let target = clients::target_path(&node.kubelet_dir, "uid-1", "hsm-secrets").unwrap();
    let attributes: BTreeMap<String, String> = [
        ("secrets".to_string(), "db-credentials".to_string()),
        ("device".to_string(), "prod-hsm".to_string()),
    ]
    .into();
    clients::csi(&node.csi_socket)
        .await
        .unwrap()
        .node_publish_volume(clients::publish_request(
            "vol-1",
            &target,
            &attributes,
            &PodIdentity {
                namespace: "shop",
                name: "checkout-0",
                uid: "uid-1",
                service_account: "checkout",
                fs_group: 3000,
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("db-credentials/value"))
            .unwrap()
            .len(),
        32
    );
    assert!(!mounts_under(&dir).is_empty());

    // The secret written with `put` mounts too, from the mirror once it has pulled it.
    let target = clients::target_path(&node.kubelet_dir, "uid-2", "hsm-secrets").unwrap();
    let attributes: BTreeMap<String, String> = [
        ("secrets".to_string(), "payment-token".to_string()),
        ("device".to_string(), "prod-hsm".to_string()),
    ]
    .into();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let published = clients::csi(&node.csi_socket)
            .await
            .unwrap()
            .node_publish_volume(clients::publish_request(
                "vol-2",
                &target,
                &attributes,
                &PodIdentity {
                    namespace: "shop",
                    name: "payments-0",
                    uid: "uid-2",
                    service_account: "payments",
                    fs_group: 3000,
                },
            ))
            .await;
        match published {
            Ok(_) => break,
            Err(status) if std::time::Instant::now() < deadline => {
                assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("payment-token never mounted: {status:?}"),
        }
    }
    assert_eq!(
        std::fs::read(target.join("payment-token/token")).unwrap(),
        b"tok-51e2"
    );

    // down: the mounted volumes too.
    let (ok, out) = local(&["down"], &dir);
    assert!(ok, "{out}");
    assert!(out.contains("unmounted 2 volumes"), "{out}");
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        processes_under(&dir).is_empty(),
        "{:?}",
        processes_under(&dir)
    );
    assert!(mounts_under(&dir).is_empty(), "{:?}", mounts_under(&dir));

    let (ok, out) = local(&["status"], &dir);
    assert!(!ok);
    assert!(out.contains("hsm-secrets local up --dir"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_without_the_privilege_to_mount_publishes_plain_directories() {
    if !softhsm_available() {
        return;
    }
    let parent = tempfile::tempdir().unwrap();
    let _unmount = UnmountOnDrop(parent.path());
    let run = UnprivilegedRun::prepare(parent.path());
    let dir = run.work.join("system");
    let local = |args: &[&str]| {
        let mut c = run.command();
        c.arg("local").args(args).arg("--dir").arg(&dir);
        let (status, out) = Running::start(c).finish(TIMEOUT);
        (status.success(), out)
    };
    struct Down<'a>(&'a dyn Fn(&[&str]) -> (bool, String), &'a std::path::Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if self.1.exists() {
                let _ = (self.0)(&["down"]);
            }
        }
    }
    let _down = Down(&local, &dir);

    let (ok, out) = local(&["up"]);
    assert!(ok, "{out}");
    let warning = "warning: plain directory, not tmpfs: run as root for in-memory mounts";
    assert!(out.contains(warning), "{out}");
    let (ok, out) = local(&["status"]);
    assert!(ok && out.contains(warning), "{out}");

    // kubelet's part, done here as the plugin's user: the volume's parent directory.
    let state = StateFile::load(&dir).unwrap();
    assert!(state.plain_directories);
    let node = state.nodes.iter().find(|n| n.name == "worker-2").unwrap();
    let target = clients::target_path(&node.kubelet_dir, "uid-1", "hsm-secrets").unwrap();
    if nix::unistd::geteuid().is_root() {
        let pods = node.kubelet_dir.join("pods");
        let mut path = target.parent().unwrap();
        while path.starts_with(&pods) && path != pods {
            nix::unistd::chown(
                path,
                Some(nix::unistd::Uid::from_raw(UNPRIVILEGED)),
                Some(nix::unistd::Gid::from_raw(UNPRIVILEGED)),
            )
            .unwrap();
            path = path.parent().unwrap();
        }
    }
    let attributes: BTreeMap<String, String> = [
        ("secrets".to_string(), "db-credentials".to_string()),
        ("device".to_string(), "prod-hsm".to_string()),
    ]
    .into();
    clients::csi(&node.csi_socket)
        .await
        .unwrap()
        .node_publish_volume(clients::publish_request(
            "vol-1",
            &target,
            &attributes,
            &PodIdentity {
                namespace: "shop",
                name: "checkout-0",
                uid: "uid-1",
                service_account: "checkout",
                fs_group: 3000,
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("db-credentials/value"))
            .unwrap()
            .len(),
        32
    );
    assert!(mounts_under(parent.path()).is_empty(), "nothing is mounted");
    assert!(
        hsm_secrets_csi::plain_directory::is_plain_volume(
            &target,
            hsm_secrets_csi::DEFAULT_DRIVER_NAME
        )
        .unwrap()
    );

    let (ok, out) = local(&["down"]);
    assert!(ok, "{out}");
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        processes_under(&dir).is_empty(),
        "{:?}",
        processes_under(&dir)
    );
}
