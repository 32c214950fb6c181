//! `hsm-secrets local`: up in the background, status, put/get through the agents, a
//! volume over a plugin's CSI socket, and down leaving nothing behind.
#![allow(clippy::unwrap_used)]

use crate::kit;
use crate::kit::s3;

use std::collections::BTreeMap;
use std::time::Duration;

use hsm_secrets::crd::SiteRole;
use hsm_secrets::local::StateFile;
use hsm_secrets::local::clients::{self, PodIdentity};
use hsm_secrets::local::sites;
use kit::local::{
    Running, UNPRIVILEGED, UnmountOnDrop, UnprivilegedRun, available, command, mounts_under,
    processes_under, softhsm_available,
};

const TIMEOUT: Duration = Duration::from_secs(600);
/// How long a site waits for another: generous, far below the CLI's own timeout.
const SITE_TIMEOUT: Duration = Duration::from_secs(120);

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

/// `local down` for each directory that still exists, even when an assertion fails.
struct DownAll(Vec<std::path::PathBuf>);
impl Drop for DownAll {
    fn drop(&mut self) {
        for dir in &self.0 {
            if dir.exists() {
                let keep = std::env::var_os("HSM_KEEP_TEST_DIR").is_some();
                let _ = local(if keep { &["down", "--keep"] } else { &["down"] }, dir);
            }
        }
    }
}

/// Polls `f` every 100 ms until it yields, failing after `timeout` with `what`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(found) = f().await {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One acknowledged write: its value and when the acknowledgement arrived.
#[derive(Clone, Debug)]
struct Ack {
    value: u64,
    at: std::time::Instant,
}

/// What a writing client saw: the writes acknowledged (and when), and every value it
/// issued. A write refused after it reached the token (the site's gate closed during it)
/// may still be there: refused means "not promised", not "not written".
struct History {
    acks: Vec<Ack>,
    issued: u64,
}

/// A client writing `secret` = `from`, `from + 1`… at one site until told to stop.
fn writer(
    dir: &std::path::Path,
    secret: &'static str,
    from: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<History> {
    let state = StateFile::load(dir).unwrap();
    tokio::spawn(async move {
        let mut acks = Vec::new();
        let mut value = from;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let text = value.to_string();
            if sites::write(&state, secret, &[("n", text.as_bytes())])
                .await
                .is_ok()
            {
                acks.push(Ack {
                    value,
                    at: std::time::Instant::now(),
                });
            }
            value += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        History {
            acks,
            issued: value - 1,
        }
    })
}

/// The value of `secret` the primary of the system in `dir` holds.
async fn history_at(dir: &std::path::Path, secret: &str) -> Option<u64> {
    let state = StateFile::load(dir).unwrap();
    let (node, _, _) = hsm_secrets::local::system::primary(&state).await.ok()?;
    let held = sites::read_agent(&state, &node, secret).await.ok()??;
    String::from_utf8(held.get("n")?.clone()).ok()?.parse().ok()
}

async fn site_status(dir: &std::path::Path) -> hsm_secrets::crd::SiteStatus {
    let state = StateFile::load(dir).unwrap();
    sites::SiteOperator::new(&state)
        .unwrap()
        .site()
        .await
        .unwrap()
        .expect("status.site")
}

/// Two complete local systems (each with its tokens, controller, webhook and nodes) stand
/// for two clusters sharing one real S3 server: the passive site follows, serves reads and
/// refuses writes; a promotion while the active site runs fences it with no write
/// acknowledged by both after the fence; rejoin; a planned switchover loses nothing; a
/// promotion while the old site is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sites_follow_promote_fence_rejoin_and_switch_over_without_loss() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !available() {
        return;
    }
    let Some(s3) = s3::S3Server::start() else {
        return;
    };
    s3.create_bucket("sites");
    let mut parent = tempfile::tempdir().unwrap();
    // HSM_KEEP_TEST_DIR=1 keeps the two sites' directories (their logs) for a post-mortem.
    if std::env::var_os("HSM_KEEP_TEST_DIR").is_some() {
        parent.disable_cleanup(true);
        eprintln!("keeping {}", parent.path().display());
    }
    let _unmount = UnmountOnDrop(parent.path());
    let (a, b) = (parent.path().join("site-a"), parent.path().join("site-b"));
    let _down = DownAll(vec![a.clone(), b.clone()]);
    let credentials = parent.path().join("bucket-credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::write(credentials.join("access-key-id"), "testing\n").unwrap();
    std::fs::write(credentials.join("secret-access-key"), "testing\n").unwrap();

    let (ok, out) = local(
        &[
            "up",
            "--active-site",
            "--bucket-url",
            "s3://sites/dr",
            "--bucket-endpoint",
            &s3.endpoint,
            "--bucket-credentials",
            credentials.to_str().unwrap(),
        ],
        &a,
    );
    assert!(
        ok && out.contains("site site-a, archiving into s3://sites/dr"),
        "{out}"
    );
    // Bad input: following a directory with no system in it.
    let (ok, out) = local(&["up", "--follow", "/nonexistent-site"], &b);
    assert!(!ok && out.contains("--follow /nonexistent-site"), "{out}");
    let (ok, out) = local(&["up", "--follow", a.to_str().unwrap()], &b);
    assert!(ok && out.contains("device prod-hsm-b"), "{out}");

    // Continuous follow: a write at site A reaches site B's tokens, and its status.
    let (ok, out) = local(&["put", "db-credentials", "password=one"], &a);
    assert!(ok, "{out}");
    let b_state = StateFile::load(&b).unwrap();
    for node in &b_state.nodes {
        eventually(
            "site B's nodes to hold site A's write",
            SITE_TIMEOUT,
            || async {
                let held = sites::read_agent(&b_state, &node.name, "db-credentials")
                    .await
                    .unwrap()?;
                (held.get("password").map(Vec::as_slice) == Some(b"one".as_slice())).then_some(())
            },
        )
        .await;
    }
    let passive = eventually("site B to report its lag", SITE_TIMEOUT, || async {
        let site = site_status(&b).await;
        (site.applied_sequence.unwrap_or(0) > 0 && site.lag_seconds == Some(0)).then_some(site)
    })
    .await;
    assert_eq!(passive.role, hsm_secrets::crd::SiteRole::Passive);
    assert_eq!(passive.applied_sequence, passive.source_sequence);
    let (ok, out) = local(&["site", "status"], &b);
    assert!(
        ok && out.contains("Passive") && out.contains("follows HSMDevice prod-hsm"),
        "{out}"
    );

    // Reads at the passive site: a pod's volume on a mirror node.
    let files = sites::read_mounted(&b_state, "worker-2", "db-credentials", "reader")
        .await
        .unwrap();
    assert_eq!(
        files.get("password").map(Vec::as_slice),
        Some(b"one".as_slice())
    );

    // Writes at the passive site are refused, naming the active site.
    let (ok, out) = local(&["put", "db-credentials", "password=two"], &b);
    assert!(
        !ok && out.contains("is passive") && out.contains("prod-hsm"),
        "{out}"
    );
    // Only a passive site is promoted.
    let (ok, out) = local(&["site", "promote", "--yes"], &a);
    assert!(!ok && out.contains("is not passive (Active)"), "{out}");
    let (ok, out) = local(&["site", "drain"], &b);
    assert!(
        !ok && out.contains("is passive: drain the active site"),
        "{out}"
    );

    // Promotion while site A runs and a client keeps writing to it.
    let stop_a = Arc::new(AtomicBool::new(false));
    let writing_a = writer(&a, "history-a", 1, stop_a.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, out) = local(&["site", "promote", "--yes"], &b);
    assert!(
        ok && out.contains("site site-b is active at site epoch 1"),
        "{out}"
    );
    let stop_b = Arc::new(AtomicBool::new(false));
    let writing_b = writer(&b, "history-b", 1, stop_b.clone());
    eventually("site A to fence itself", SITE_TIMEOUT, || async {
        (site_status(&a).await.role == SiteRole::Fenced).then_some(())
    })
    .await;
    eventually("site B to take a write", SITE_TIMEOUT, || async {
        history_at(&b, "history-b").await
    })
    .await;
    // Both clients write on for a while; then the history is checked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_a.store(true, Ordering::SeqCst);
    stop_b.store(true, Ordering::SeqCst);
    let (history_a, history_b) = (writing_a.await.unwrap(), writing_b.await.unwrap());
    let (acks_a, acks_b) = (history_a.acks, history_b.acks);
    assert!(!acks_a.is_empty() && !acks_b.is_empty());
    let last_a = acks_a.iter().map(|a| a.at).max().unwrap();
    let first_b = acks_b.iter().map(|a| a.at).min().unwrap();
    assert!(
        last_a < first_b,
        "site A acknowledged a write after site B took its first: both sites took writes"
    );
    // What site B holds of site A's history is a value site A's client wrote (a write
    // refused after it reached the token may be there too); every later acknowledged
    // value is reported lost, never silently gone.
    let applied = history_at(&b, "history-a")
        .await
        .expect("site A's history at site B");
    assert!(
        (1..=history_a.issued).contains(&applied),
        "site B holds {applied}, a value site A's client never wrote"
    );
    let lost = acks_a.iter().filter(|ack| ack.value > applied).count() as u64;
    let fenced = site_status(&a).await;
    assert_eq!(fenced.fenced_by.as_deref(), Some("site-b"));
    assert!(
        lost <= fenced.lost_writes.unwrap_or(0),
        "{lost} acknowledged write(s) missing at site B (it holds {applied}; site A \
         acknowledged {:?}), {fenced:?}",
        acks_a.iter().map(|a| a.value).collect::<Vec<_>>()
    );
    let (ok, out) = local(&["site", "status"], &a);
    assert!(ok && out.contains("fenced by site site-b"), "{out}");
    let (ok, out) = local(&["put", "db-credentials", "password=late"], &a);
    assert!(!ok && out.contains("is fenced"), "{out}");

    // Rejoin: site A follows site B and gets its writes; its lost writes are not replayed.
    let (ok, out) = local(&["site", "rejoin"], &a);
    assert!(
        ok && out.contains("are lost, not replayed") && out.contains("is passive"),
        "{out}"
    );
    let last_b = acks_b.iter().map(|a| a.value).max().unwrap();
    let final_b = history_at(&b, "history-b").await.expect("site B's history");
    assert!((last_b..=history_b.issued).contains(&final_b), "{final_b}");
    eventually("site A to hold site B's writes", SITE_TIMEOUT, || async {
        (history_at(&a, "history-b").await == Some(final_b)).then_some(())
    })
    .await;
    assert_eq!(
        history_at(&a, "history-a").await,
        Some(applied),
        "A's lost writes are gone"
    );

    // Planned switchover back to site A with zero loss: drain B, let A catch up, promote.
    let stop_b = Arc::new(AtomicBool::new(false));
    let writing_b = writer(&b, "history-b", history_b.issued + 1, stop_b.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, out) = local(&["site", "drain"], &b);
    assert!(ok && out.contains("takes no writes"), "{out}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_b.store(true, Ordering::SeqCst);
    let drained = writing_b.await.unwrap();
    let last_b = drained
        .acks
        .iter()
        .map(|a| a.value)
        .max()
        .expect("writes before the drain");
    let (ok, out) = local(&["put", "db-credentials", "password=drained"], &b);
    assert!(!ok && out.contains("draining"), "{out}");
    // Site B's final state holds every write it acknowledged (and perhaps one it refused
    // after it reached the token, as the drain closed its gate); site A must come to hold
    // exactly that state.
    let final_b = history_at(&b, "history-b").await.expect("site B's history");
    assert!(
        (last_b..=drained.issued).contains(&final_b),
        "site B holds {final_b}: neither its last acknowledged write {last_b} nor a later one"
    );
    eventually(
        "site A to apply everything site B took",
        SITE_TIMEOUT,
        || async { (history_at(&a, "history-b").await == Some(final_b)).then_some(()) },
    )
    .await;
    let (ok, out) = local(&["site", "promote", "--yes"], &a);
    assert!(
        ok && out.contains("site site-a is active at site epoch 2"),
        "{out}"
    );
    assert_eq!(
        history_at(&a, "history-b").await,
        Some(final_b),
        "zero loss"
    );
    eventually("site B to be fenced", SITE_TIMEOUT, || async {
        let site = site_status(&b).await;
        (site.role == SiteRole::Fenced).then_some(site)
    })
    .await;
    assert_eq!(
        site_status(&b).await.lost_writes.unwrap_or(0),
        0,
        "nothing lost"
    );

    // Promotion while the old site is down: B rejoins, follows, then site A is lost.
    let (ok, out) = local(&["site", "rejoin"], &b);
    assert!(ok, "{out}");
    let (ok, out) = local(&["put", "db-credentials", "password=before-the-loss"], &a);
    // A just promoted site may still be waiting out the old site's lease.
    let (ok, out) = if ok {
        (ok, out)
    } else {
        eventually("site A to take writes", SITE_TIMEOUT, || async {
            let (ok, out) = local(&["put", "db-credentials", "password=before-the-loss"], &a);
            ok.then_some((ok, out))
        })
        .await
    };
    assert!(ok, "{out}");
    let b_state = StateFile::load(&b).unwrap();
    eventually("site B to follow site A again", SITE_TIMEOUT, || async {
        let node = hsm_secrets::local::system::primary(&b_state).await.ok()?.0;
        let held = sites::read_agent(&b_state, &node, "db-credentials")
            .await
            .ok()??;
        (held.get("password").map(Vec::as_slice) == Some(b"before-the-loss".as_slice()))
            .then_some(())
    })
    .await;
    let (ok, out) = local(&["down"], &a);
    assert!(ok, "{out}");
    let (ok, out) = local(&["site", "promote", "--yes"], &b);
    assert!(
        ok && out.contains("site site-b is active at site epoch 3"),
        "{out}"
    );
    eventually(
        "site B to take writes after site A's loss",
        SITE_TIMEOUT,
        || async {
            let (ok, _) = local(&["put", "db-credentials", "password=after-the-loss"], &b);
            ok.then_some(())
        },
    )
    .await;
    let (ok, out) = local(&["get", "db-credentials", "--reveal"], &b);
    assert!(ok && out.contains("password: after-the-loss"), "{out}");
}

/// Partitions on real links: a system whose processes each have their own network
/// namespace, faults set with `local fault` as an operator would, clients writing (each
/// write to a secret of its own) and reading mirrors from their own namespace, and the
/// recorded history checked (`hsm_secrets::local::history`): one writer at a time, no
/// acknowledged write silently gone, reads real and never going back. Named scenarios,
/// then `HSM_PARTITION_RANDOM` (default 2) random schedules from `HSM_PARTITION_SEED`
/// (printed, so a failure replays).
#[test]
fn partitions_on_real_links_keep_one_writer_and_every_acknowledged_write() {
    use hsm_secrets::local::network;
    if !available() {
        return;
    }
    if let Err(e) = network::can_create() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to create network namespaces (root, iproute2): {e}"
        );
        eprintln!("skipped: cannot create network namespaces: {e}");
        return;
    }
    let seed: u64 = std::env::var("HSM_PARTITION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| hsm_secrets::mirror::journal::monotonic_ns() % 1_000_000);
    let random: usize = std::env::var("HSM_PARTITION_RANDOM")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    eprintln!("random schedules: {random} from seed {seed} (HSM_PARTITION_SEED={seed} replays)");
    // HSM_PARTITION_ONLY=KillPrimary,IsolateMirror runs only the named scenarios.
    let only: Option<Vec<String>> = std::env::var("HSM_PARTITION_ONLY")
        .ok()
        .map(|s| s.split(',').map(|n| n.trim().to_string()).collect());
    let chosen = |s: &&partition::Schedule| {
        only.as_ref()
            .is_none_or(|names| names.contains(&format!("{:?}", s.fault)))
    };
    let pool: Vec<partition::Schedule> = partition::NAMED.iter().filter(chosen).copied().collect();
    let mut schedules = pool.clone();
    let mut rng = partition::Rng(seed.max(1));
    for n in (0..random).filter(|_| !pool.is_empty()) {
        schedules.push(partition::Schedule::random(&mut rng, n, &pool));
    }
    let mut failures = partition::run_system("read-only", &schedules);
    // Under Active, the faults that cut the primary off: nothing acknowledged is lost.
    let active: Vec<_> = partition::NAMED
        .iter()
        .filter(|s| {
            partition::ACTIVE_FAULTS
                .iter()
                .any(|f| partition::same(f, &s.fault))
        })
        .filter(chosen)
        .copied()
        .collect();
    failures.extend(partition::run_system("active", &active));
    assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
}

mod partition {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use hsm_secrets::hsm::{Expect, SecretData, SecretPath};
    use hsm_secrets::local::history::{self, Ack, ClientRead, ClientWrite, History, LostRange};
    use hsm_secrets::local::{StateFile, clients, network, system};
    use hsm_secrets::mirror::journal::{self, monotonic_ns};

    use super::local;

    /// A fault, by the processes it hits; `Primary` is whichever node is primary when
    /// the fault starts.
    #[derive(Clone, Copy, Debug)]
    pub enum Fault {
        IsolatePrimary,
        PrimaryControllerPartition,
        ControllerToPrimaryOneWay,
        IsolateMirror,
        IsolateController,
        FlapPrimary,
        SlowPrimary,
        PausePrimary,
        /// The primary's process killed (SIGKILL), started again after the hold.
        KillPrimary,
        /// A planned switchover to a mirror, and the old primary cut off right after.
        PartitionDuringSwitchover,
        /// The primary cut off, and healed the moment the controller promotes another.
        HealDuringPromotion,
    }

    impl Fault {
        /// Whether a named run of this fault must end with another primary (Some(true)),
        /// must keep the one it had (Some(false)), or may do either (a flapping link).
        pub fn replaces_primary(&self) -> Option<bool> {
            match self {
                Fault::IsolatePrimary
                | Fault::PrimaryControllerPartition
                | Fault::ControllerToPrimaryOneWay
                | Fault::PausePrimary
                | Fault::KillPrimary
                | Fault::PartitionDuringSwitchover
                | Fault::HealDuringPromotion => Some(true),
                Fault::IsolateMirror | Fault::IsolateController | Fault::SlowPrimary => Some(false),
                Fault::FlapPrimary => None,
            }
        }
    }

    #[derive(Clone, Copy, Debug)]
    pub struct Schedule {
        pub fault: Fault,
        pub hold: Duration,
        pub random: Option<usize>,
    }

    const HOLD: Duration = Duration::from_secs(6);

    pub const NAMED: [Schedule; 11] = [
        Schedule::named(Fault::IsolatePrimary),
        Schedule::named(Fault::PrimaryControllerPartition),
        Schedule::named(Fault::ControllerToPrimaryOneWay),
        Schedule::named(Fault::IsolateMirror),
        Schedule::named(Fault::IsolateController),
        Schedule::named(Fault::FlapPrimary),
        Schedule::named(Fault::SlowPrimary),
        Schedule::named(Fault::PausePrimary),
        Schedule::named(Fault::KillPrimary),
        Schedule::named(Fault::PartitionDuringSwitchover),
        Schedule::named(Fault::HealDuringPromotion),
    ];

    /// xorshift: a replayable sequence from the printed seed.
    pub struct Rng(pub u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    impl Schedule {
        const fn named(fault: Fault) -> Self {
            Self {
                fault,
                hold: HOLD,
                random: None,
            }
        }

        pub fn random(rng: &mut Rng, n: usize, from: &[Schedule]) -> Self {
            let fault = from[(rng.next() % from.len() as u64) as usize].fault;
            Self {
                fault,
                hold: Duration::from_millis(1_000 + rng.next() % 9_000),
                random: Some(n),
            }
        }

        pub fn name(&self) -> String {
            match self.random {
                Some(n) => format!("random {n}: {:?} {:?}", self.fault, self.hold),
                None => format!("{:?}", self.fault),
            }
        }
    }

    fn fault(dir: &Path, args: &[&str]) {
        let mut all = vec!["fault"];
        all.extend(args);
        let (ok, out) = local(&all, dir);
        assert!(ok, "local fault {args:?}: {out}");
    }

    fn path(name: &str) -> SecretPath {
        format!("shop/{name}").parse().unwrap()
    }

    pub fn same(a: &Fault, b: &Fault) -> bool {
        std::mem::discriminant(a) == std::mem::discriminant(b)
    }

    /// The faults also run under policy Active.
    pub const ACTIVE_FAULTS: [Fault; 5] = [
        Fault::IsolatePrimary,
        Fault::PrimaryControllerPartition,
        Fault::PausePrimary,
        Fault::KillPrimary,
        Fault::IsolateMirror,
    ];

    /// A system with `policy` on its private network, every schedule run against it in
    /// turn; the failures, named.
    pub fn run_system(policy: &str, schedules: &[Schedule]) -> Vec<String> {
        if schedules.is_empty() {
            return Vec::new();
        }
        let mut parent = tempfile::tempdir().unwrap();
        // HSM_KEEP_TEST_DIR=1 keeps the system's directory (its logs) for a post-mortem.
        if std::env::var_os("HSM_KEEP_TEST_DIR").is_some() {
            parent.disable_cleanup(true);
            eprintln!("keeping {}", parent.path().display());
        }
        let dir = parent.path().join("system");
        let _unmount = super::UnmountOnDrop(parent.path());
        let _down = super::DownAll(vec![dir.clone()]);
        let (ok, out) = local(
            &["up", "--isolated-network", "--mirroring-policy", policy],
            &dir,
        );
        assert!(ok, "{out}");
        let state = StateFile::load(&dir).unwrap();
        let mut failures = Vec::new();
        for schedule in schedules {
            let verdict = run(&dir, &state, schedule, policy == "active");
            eprintln!(
                "{policy:<9} {:<34} acknowledged {:>4}, reported lost {:>3}, reads during the fault {:>4}, writers {:?}{}",
                schedule.name(),
                verdict.acknowledged,
                verdict.reported_lost,
                verdict.reads_during_fault,
                verdict.writers,
                if verdict.ok() { "" } else { "  FAILED" }
            );
            if !verdict.ok() || verdict.reads_during_fault == 0 || verdict.acknowledged == 0 {
                failures.push(format!("{policy} {}: {verdict:?}", schedule.name()));
            }
            // Availability, for the named scenarios (a random hold may be too short to
            // fail over): a primary cut off for the hold is replaced, under either
            // policy; a fault that leaves the primary reachable replaces nobody.
            let replaced = verdict.writers.len() > 1;
            match schedule.fault.replaces_primary() {
                Some(expected) if schedule.random.is_none() && replaced != expected => failures
                    .push(format!(
                        "{policy} {}: {} (writers {:?})",
                        schedule.name(),
                        if expected {
                            "the cut-off primary was never replaced"
                        } else {
                            "a failover although the primary stayed reachable"
                        },
                        verdict.writers
                    )),
                _ => {}
            }
        }
        failures
    }

    /// Runs `schedule` against the running system in `dir` and checks its history.
    pub fn run(
        dir: &Path,
        state: &StateFile,
        schedule: &Schedule,
        active: bool,
    ) -> history::Verdict {
        let network = state.network.clone().unwrap();
        let clients_ns = network.netns_path("clients").unwrap();
        let tag = format!(
            "hist-{}-{}",
            schedule
                .name()
                .split(':')
                .next()
                .unwrap()
                .replace(' ', "-")
                .to_lowercase(),
            monotonic_ns() % 100_000
        );
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(Mutex::new(Vec::<ClientWrite>::new()));
        let reads = Arc::new(Mutex::new(Vec::<ClientRead>::new()));
        let primary_now = || {
            network::block_on_in(&clients_ns, system::primary(state))
                .unwrap()
                .map(|(node, _, _)| node)
        };
        let writer = {
            let (state, stop, writes, tag, ns) = (
                state.clone(),
                stop.clone(),
                writes.clone(),
                tag.clone(),
                clients_ns.clone(),
            );
            std::thread::spawn(move || {
                network::block_on_in(&ns, async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let (name, value) = (format!("{tag}-{n}"), n.to_string());
                        let mut data = SecretData::new();
                        data.insert("n", value.clone().into_bytes()).unwrap();
                        let issued_ns = monotonic_ns();
                        // As a client would: a write unanswered within 2 s is given up
                        // (indeterminate), and the next one goes to whoever is primary.
                        let acked = match system::primary(&state).await {
                            Ok((node, epoch, conn)) => tokio::time::timeout(
                                Duration::from_secs(2),
                                conn.put(&path(&name), &data, Expect::Any, epoch),
                            )
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .map(|o| Ack {
                                node,
                                version: o.version,
                                at_ns: monotonic_ns(),
                            }),
                            Err(_) => None,
                        };
                        writes.lock().unwrap().push(ClientWrite {
                            client: "writer".into(),
                            path: name,
                            value,
                            issued_ns,
                            acked,
                        });
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                })
                .unwrap()
            })
        };
        let reader = {
            let (state, stop, writes, reads, ns) = (
                state.clone(),
                stop.clone(),
                writes.clone(),
                reads.clone(),
                clients_ns.clone(),
            );
            std::thread::spawn(move || {
                network::block_on_in(&ns, async move {
                    let mut turn = 0usize;
                    while !stop.load(Ordering::SeqCst) {
                        turn += 1;
                        let node = &state.nodes[turn % state.nodes.len()];
                        let last = writes
                            .lock()
                            .unwrap()
                            .iter()
                            .rev()
                            .find(|w| w.acked.is_some())
                            .map(|w| w.path.clone());
                        if let Some(name) = last {
                            let answer = match clients::agent(
                                &node.name,
                                &node.agent,
                                &state.controller_tls(),
                            ) {
                                Ok(conn) => match tokio::time::timeout(
                                    Duration::from_millis(500),
                                    conn.get(&path(&name)),
                                )
                                .await
                                {
                                    Ok(Ok(answer)) => {
                                        Some(crate::local::written_value(&answer.record))
                                    }
                                    Ok(Err(hsm_secrets::mirror::MirrorError::Remote {
                                        code: tonic::Code::NotFound,
                                        ..
                                    })) => Some(None),
                                    _ => None,
                                },
                                Err(_) => None,
                            };
                            reads.lock().unwrap().push(ClientRead {
                                client: "reader".into(),
                                node: node.name.clone(),
                                path: name,
                                answer,
                                at_ns: monotonic_ns(),
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(40)).await;
                    }
                })
                .unwrap()
            })
        };

        std::thread::sleep(Duration::from_secs(2));
        let primary = primary_now().expect("a primary before the fault");
        let mirror = state
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .find(|n| *n != primary)
            .unwrap();
        let fault_from = monotonic_ns();
        let started = Instant::now();
        match schedule.fault {
            Fault::IsolatePrimary => fault(dir, &["isolate", &primary]),
            Fault::PrimaryControllerPartition => {
                fault(dir, &["cut", "controller", &primary, "--both"])
            }
            Fault::ControllerToPrimaryOneWay => fault(dir, &["cut", "controller", &primary]),
            Fault::IsolateMirror => fault(dir, &["isolate", &mirror]),
            Fault::IsolateController => fault(dir, &["isolate", "controller"]),
            Fault::SlowPrimary => fault(
                dir,
                &["slow", &primary, "--rate-kbit", "256", "--queue-ms", "300"],
            ),
            Fault::PausePrimary => fault(dir, &["pause", &primary]),
            Fault::KillPrimary => fault(dir, &["kill", &primary]),
            Fault::PartitionDuringSwitchover => {
                let (ok, out) = local(&["switchover", &mirror], dir);
                assert!(ok, "{out}");
                std::thread::sleep(Duration::from_millis(100));
                fault(dir, &["isolate", &primary]);
            }
            Fault::HealDuringPromotion => {
                fault(dir, &["isolate", &primary]);
                while started.elapsed() < Duration::from_secs(30)
                    && primary_now().ok().is_none_or(|now| now == primary)
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                fault(dir, &["heal"]);
            }
            Fault::FlapPrimary => {
                while started.elapsed() < schedule.hold {
                    fault(dir, &["isolate", &primary]);
                    std::thread::sleep(Duration::from_millis(1_500));
                    fault(dir, &["reconnect", &primary]);
                    std::thread::sleep(Duration::from_millis(1_500));
                }
            }
        }
        if let Some(rest) = schedule
            .hold
            .checked_sub(started.elapsed())
            .filter(|_| !matches!(schedule.fault, Fault::HealDuringPromotion))
        {
            std::thread::sleep(rest);
        }
        fault(dir, &["heal"]);
        match schedule.fault {
            Fault::PausePrimary => fault(dir, &["resume", &primary]),
            Fault::KillPrimary => fault(dir, &["restart", &primary]),
            _ => {}
        }
        let fault_to = monotonic_ns();
        // Healed: every node healthy again and the mirrors caught up.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let healed = network::block_on_in(&clients_ns, async {
                let files = hsm_secrets::state::FileState::open(&state.state_dir).ok()?;
                let status = system::device_status(&files, &state.device).await.ok()?;
                // Under Active, also back in the primary's write set: until then no
                // mirror may be promoted, and the next fault would test nothing.
                let healthy = status.nodes.iter().all(|n| {
                    n.health == hsm_secrets::crd::NodeHealth::Healthy
                        && n.consecutive_failures == 0
                        && !n.outside_write_set
                });
                (healthy && status.mirrors.as_deref() == Some("2/2")).then_some(())
            })
            .unwrap();
            if healed.is_some() {
                break;
            }
            if Instant::now() >= deadline {
                // What the system looks like, for a post-mortem of the run.
                let (_, status) = local(&["status"], dir);
                let events = std::fs::read_to_string(state.state_dir.join("events.jsonl"))
                    .unwrap_or_default();
                let tail: Vec<&str> = events.lines().rev().take(12).collect();
                panic!(
                    "{}: no recovery within 90 s of healing\n{status}\nlast events:\n{}",
                    schedule.name(),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        reader.join().unwrap();

        // The final state, from the primary.
        let writes = writes.lock().unwrap().clone();
        let final_state = network::block_on_in(&clients_ns, async {
            let (_, _, conn) = system::primary(state).await.unwrap();
            let mut held = std::collections::BTreeMap::new();
            for w in &writes {
                if let Ok(answer) = conn.get(&path(&w.path)).await
                    && let Some(value) = crate::local::written_value(&answer.record)
                {
                    held.insert(w.path.clone(), value);
                }
            }
            held
        })
        .unwrap();
        let journals: Vec<_> = std::fs::read_dir(dir.join("journal"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        let accepted = journal::read(&journals)
            .unwrap()
            .into_iter()
            .filter(|a| a.path.starts_with(&format!("shop/{tag}-")))
            .collect();
        let history = History {
            writes: writes
                .into_iter()
                .map(|mut w| {
                    w.path = format!("shop/{}", w.path);
                    w
                })
                .collect(),
            reads: reads
                .lock()
                .unwrap()
                .iter()
                .cloned()
                .map(|mut r| {
                    r.path = format!("shop/{}", r.path);
                    r
                })
                .collect(),
            accepted,
            lost: lost_ranges(&state.state_dir.join("events.jsonl")),
            final_state: final_state
                .into_iter()
                .map(|(p, v)| (format!("shop/{p}"), v))
                .collect(),
            fault: (fault_from, fault_to),
            active,
        };
        history::check(&history)
    }

    /// The lost ranges the controller reported in its Events: "NODE holds changes
    /// FROM..=TO made under epoch E".
    fn lost_ranges(events: &Path) -> Vec<LostRange> {
        let text = std::fs::read_to_string(events).unwrap_or_default();
        let mut ranges = Vec::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(message) = v["event"]["message"].as_str() else {
                continue;
            };
            for clause in message.split("; ") {
                let Some((node, rest)) = clause.split_once(" holds changes ") else {
                    continue;
                };
                let Some((range, rest)) = rest.split_once(" made under epoch ") else {
                    continue;
                };
                let Some((from, to)) = range.split_once("..=") else {
                    continue;
                };
                let epoch = rest.split(' ').next().unwrap_or("0");
                if let (Ok(from), Ok(to), Ok(epoch)) = (from.parse(), to.parse(), epoch.parse()) {
                    ranges.push(LostRange {
                        node: node.rsplit(' ').next().unwrap_or(node).to_string(),
                        epoch,
                        from,
                        to,
                    });
                }
            }
        }
        ranges
    }
}

/// The value a client wrote (key `n`); None for a tombstone.
fn written_value(record: &hsm_secrets::hsm::Record) -> Option<String> {
    match &record.body {
        hsm_secrets::hsm::Body::Live(data) => data
            .get("n")
            .map(|v| String::from_utf8_lossy(v).into_owned()),
        hsm_secrets::hsm::Body::Deleted => None,
    }
}
