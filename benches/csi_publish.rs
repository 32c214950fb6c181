//! NodePublishVolume benchmark: one secret of 10 keys x 1 KiB from SoftHSM2, published
//! over the real CSI Unix socket into real tmpfs volumes, against a floor measured in the
//! same run, interleaved sample by sample: tmpfs mount + the same store read + the csi
//! crate's payload writer, with no gRPC, no catalog, no authorization, no mountinfo check.
//!
//! Then the memory of the real `hsm-secrets node` binary (the release build cargo makes
//! for benches): VmRSS idle and with 1,000 volumes mounted.
//!
//! Run as root (tmpfs): `cargo bench --bench csi_publish`. Knobs: `BENCH_SEQUENTIAL`
//! (default 300), `BENCH_CONCURRENT_ROUNDS` (5 rounds of 100), `BENCH_VOLUMES` (1000).

use hsm_secrets_testkit as kit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsm_secrets::hsm::{Expect, Pkcs11Config, Pkcs11Store, SecretData, SecretPath, SecretStore};
use hsm_secrets::node::{
    AuditLog, HsmVolumeSource, LocalDevice, Mounts, NodeMetrics, StaticCatalog,
};
use hsm_secrets_csi::proto::node_client::NodeClient;
use hsm_secrets_csi::proto::{
    NodeGetCapabilitiesRequest, NodePublishVolumeRequest, NodeUnpublishVolumeRequest, ProbeRequest,
};
use hsm_secrets_csi::{IdentityService, NodeConfig, NodeService, Payload, PayloadFile};
use tonic::transport::Channel;

const LABEL: &str = "bench-node";
const DEVICE: &str = "bench-hsm";
const DRIVER: &str = "csi.hsmsecrets.io";
const GID: u32 = 3000;
const CONCURRENCY: usize = 100;

fn main() {
    let dir = kit::bench::private_softhsm_dir();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("csi_publish mounts tmpfs volumes: run it as root");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let guard = UnmountGuard(dir.clone());
    rt.block_on(run(dir));
    drop(guard);
}

fn ten_keys() -> SecretData {
    let mut d = SecretData::new();
    for k in 0..10u8 {
        d.insert(&format!("key-{k}"), vec![b'a' + k; 1024])
            .expect("insert");
    }
    d
}

/// p50 and p99 (nearest rank).
fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let rank = |p: f64| {
        let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[i - 1]
    };
    (rank(0.50), rank(0.99))
}

struct Row {
    name: String,
    ours: (Duration, Duration),
    floor: (Duration, Duration),
}

async fn run(dir: PathBuf) {
    let lib = kit::bench::library();
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, kit::softhsm::USER_PIN).expect("pin");
    kit::bench::init_token(LABEL);
    let store = Arc::new(
        Pkcs11Store::open(Pkcs11Config::new(&lib, LABEL, &pin_file))
            .await
            .expect("open token"),
    );
    let path: SecretPath = "bench/ten-keys".parse().expect("path");
    store
        .put(&path, ten_keys(), Expect::Any)
        .await
        .expect("put");

    let catalog_yaml = dir.join("catalog.yaml");
    std::fs::write(
        &catalog_yaml,
        format!(
            "apiVersion: hsmsecrets.io/v1alpha1\nkind: HSMSecret\nmetadata: {{name: ten-keys, namespace: bench}}\nspec: {{deviceRef: {DEVICE}}}\n"
        ),
    )
    .expect("catalog");
    let catalog = Arc::new(StaticCatalog::from_yaml_file(&catalog_yaml).expect("catalog"));

    // The plugin in this process, on a real Unix socket.
    let kubelet = dir.join("kubelet");
    std::fs::create_dir_all(kubelet.join("pods")).expect("kubelet dir");
    let socket = dir.join("plugin/csi.sock");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = NodeMetrics::register(&mut registry);
    // The audit trail is on by default in `hsm-secrets node`: measured with it, to a file.
    let mounts = Arc::new(Mounts::default());
    let audit = Arc::new(AuditLog::new(
        "bench-node",
        AuditLog::open_sink(&dir.join("audit.jsonl")).expect("audit log"),
        mounts.clone(),
        &mut registry,
    ));
    let source = Arc::new(
        HsmVolumeSource::new(
            catalog,
            Some(LocalDevice::open(
                DEVICE,
                store.clone() as Arc<dyn SecretStore>,
            )),
        )
        .with_metrics(metrics.clone())
        .with_mounts(mounts),
    );
    let listener = hsm_secrets_csi::bind_unix(socket.to_str().expect("utf-8")).expect("bind");
    let node = NodeService::new(
        NodeConfig::new("bench-node")
            .with_driver_name(DRIVER)
            .with_kubelet_dir(&kubelet),
        source.clone(),
    )
    .with_observer(Arc::new(Observers(metrics, audit)));
    let identity = IdentityService::new(DRIVER, "bench", source);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hsm_secrets_csi::serve_on(listener, identity, node, async {
        let _ = stopped.await;
    }));
    let client = NodeClient::new(
        hsm_secrets_csi::connect_unix(&socket)
            .await
            .expect("connect"),
    );
    let floor_root = dir.join("floor");

    // Warm up both paths (handle caches, first mount, connection).
    for i in 0..20 {
        let target = target(&kubelet, &format!("warm-{i}"));
        publish(&client, &target).await;
        unpublish(&client, &target).await;
        let f = floor_target(&floor_root, &format!("warm-{i}"));
        floor_publish(store.as_ref(), &path, &f).await;
        floor_unpublish(&f);
    }

    let mut rows = Vec::new();
    let sequential = kit::bench::env_usize("BENCH_SEQUENTIAL", 300);
    // What the transport alone costs: an RPC that does no work.
    let mut rpc = Vec::new();
    for _ in 0..sequential {
        let started = Instant::now();
        client
            .clone()
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .expect("capabilities");
        rpc.push(started.elapsed());
    }
    let (rpc_p50, rpc_p99) = percentiles(&mut rpc);
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    let (mut per_key, mut env) = (Vec::new(), Vec::new());
    let mut parts = FloorParts::default();
    for i in 0..sequential {
        let t = target(&kubelet, &format!("seq-{i}"));
        let started = Instant::now();
        publish(&client, &t).await;
        ours.push(started.elapsed());
        unpublish(&client, &t).await;

        for (layout, samples) in [(PER_KEY, &mut per_key), (ENV, &mut env)] {
            let t = target(&kubelet, &format!("seq-{i}-{}", samples.len()));
            let started = Instant::now();
            publish_with(&client, &t, layout).await;
            samples.push(started.elapsed());
            unpublish(&client, &t).await;
        }

        let f = floor_target(&floor_root, &format!("seq-{i}"));
        let started = Instant::now();
        let p = floor_publish(store.as_ref(), &path, &f).await;
        floor.push(started.elapsed());
        parts.add(p);
        floor_unpublish(&f);
    }
    let floor = percentiles(&mut floor);
    rows.push(Row {
        name: format!("sequential, {sequential} publishes"),
        ours: percentiles(&mut ours),
        floor,
    });
    rows.push(Row {
        name: "sequential, per-key modes and names".into(),
        ours: percentiles(&mut per_key),
        floor,
    });
    rows.push(Row {
        name: "sequential, one .env file".into(),
        ours: percentiles(&mut env),
        floor,
    });

    let rounds = kit::bench::env_usize("BENCH_CONCURRENT_ROUNDS", 5);
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    let (mut ours_wall, mut floor_wall) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        let targets: Vec<PathBuf> = (0..CONCURRENCY)
            .map(|i| target(&kubelet, &format!("con-{round}-{i}")))
            .collect();
        let started = Instant::now();
        let tasks: Vec<_> = targets
            .iter()
            .map(|t| {
                let (client, t) = (client.clone(), t.clone());
                tokio::spawn(async move {
                    let started = Instant::now();
                    publish(&client, &t).await;
                    started.elapsed()
                })
            })
            .collect();
        for task in tasks {
            ours.push(task.await.expect("publish task"));
        }
        ours_wall += started.elapsed();
        for t in &targets {
            unpublish(&client, t).await;
        }

        let targets: Vec<PathBuf> = (0..CONCURRENCY)
            .map(|i| floor_target(&floor_root, &format!("con-{round}-{i}")))
            .collect();
        let started = Instant::now();
        let tasks: Vec<_> = targets
            .iter()
            .map(|t| {
                let (store, path, t) = (store.clone(), path.clone(), t.clone());
                tokio::spawn(async move {
                    let started = Instant::now();
                    floor_publish(store.as_ref(), &path, &t).await;
                    started.elapsed()
                })
            })
            .collect();
        for task in tasks {
            floor.push(task.await.expect("floor task"));
        }
        floor_wall += started.elapsed();
        for t in &targets {
            floor_unpublish(t);
        }
    }
    rows.push(Row {
        name: format!("{CONCURRENCY} concurrent, {rounds} rounds"),
        ours: percentiles(&mut ours),
        floor: percentiles(&mut floor),
    });

    let _ = stop.send(());
    let _ = server.await;

    let volumes = kit::bench::env_usize("BENCH_VOLUMES", 1000);
    let rss = measure_binary_rss(&dir, &lib, &pin_file, &catalog_yaml, volumes).await;

    println!();
    println!(
        "NodePublishVolume, one secret of 10 keys x 1 KiB from SoftHSM2 (targets: p50 <= 2 ms, p99 <= 10 ms, <= 1.5x floor)"
    );
    println!();
    println!("| load | plugin p50 | plugin p99 | floor p50 | floor p99 | ratio p50 | ratio p99 |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        println!(
            "| {} | {:.3?} | {:.3?} | {:.3?} | {:.3?} | {:.2}x | {:.2}x |",
            r.name,
            r.ours.0,
            r.ours.1,
            r.floor.0,
            r.floor.1,
            r.ours.0.as_secs_f64() / r.floor.0.as_secs_f64(),
            r.ours.1.as_secs_f64() / r.floor.1.as_secs_f64(),
        );
    }
    println!();
    println!(
        "concurrent wall time per round of {CONCURRENCY}: plugin {:.1?}, floor {:.1?}",
        ours_wall / rounds.max(1) as u32,
        floor_wall / rounds.max(1) as u32
    );
    println!(
        "gRPC round trip over the socket (NodeGetCapabilities, no work): p50 {rpc_p50:.3?}, p99 {rpc_p99:.3?}"
    );
    println!(
        "floor breakdown (sequential medians): store get {:.3?}, mkdir + tmpfs mount {:.3?}, payload write {:.3?}",
        parts.median_get(),
        parts.median_mount(),
        parts.median_write()
    );
    println!();
    let profile = if cfg!(debug_assertions) {
        "debug build: use `cargo bench` for real figures"
    } else {
        "release build"
    };
    println!("| `hsm-secrets node` ({profile}) | VmRSS | VmHWM | threads | target |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, (rss, hwm, threads), target) in [
        ("idle (token open, catalog loaded)", rss.idle, "<= 20 MiB"),
        (
            &format!("{volumes} volumes mounted"),
            rss.loaded,
            "<= 40 MiB",
        ),
        ("after unpublishing them", rss.after, "-"),
    ] {
        println!(
            "| {name} | {:.1} MiB | {:.1} MiB | {threads} | {target} |",
            mib(rss),
            mib(hwm)
        );
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn target(kubelet: &Path, pod: &str) -> PathBuf {
    let parent = kubelet
        .join("pods")
        .join(pod)
        .join("volumes/kubernetes.io~csi/secrets");
    std::fs::create_dir_all(&parent).expect("target parent");
    parent.join("mount")
}

fn floor_target(root: &Path, name: &str) -> PathBuf {
    let parent = root.join(name);
    std::fs::create_dir_all(&parent).expect("floor parent");
    parent.join("mount")
}

/// Per-secret layout attributes of a publish (none: a file per key, the volume's mode).
type Layout = &'static [(&'static str, &'static str)];

const PER_KEY: Layout = &[
    ("fileMode.ten-keys", "0444,key-0=0400,key-1=0400"),
    ("keyNames.ten-keys", "key-0=tls.key,key-1=tls.crt"),
    ("path.ten-keys", "tls"),
];

const ENV: Layout = &[
    ("format.ten-keys", "env"),
    (
        "keyNames.ten-keys",
        "key-0=K0,key-1=K1,key-2=K2,key-3=K3,key-4=K4,key-5=K5,key-6=K6,key-7=K7,key-8=K8,key-9=K9",
    ),
];

/// The bench plugin's metrics and audit trail, as `hsm-secrets node` wires them.
struct Observers(NodeMetrics, Arc<AuditLog>);

impl hsm_secrets_csi::NodeObserver for Observers {
    fn publish(&self, outcome: &'static str, republish: bool, elapsed: Duration) {
        self.0.publish(outcome, republish, elapsed);
    }
    fn unpublish(&self, outcome: &'static str, elapsed: Duration) {
        self.0.unpublish(outcome, elapsed);
    }
    fn finished(&self, operation: &hsm_secrets_csi::Operation<'_>) {
        self.1.finished(operation);
    }
}

fn request(target: &Path) -> NodePublishVolumeRequest {
    request_with(target, &[])
}

fn request_with(target: &Path, layout: Layout) -> NodePublishVolumeRequest {
    const BENCH: kit::node::Pod<'static> = kit::node::Pod {
        namespace: "bench",
        name: "bench-0",
        service_account: "default",
        device: DEVICE,
        gid: GID,
    };
    let volume_id = format!("vol-{}", kit::node::pod_uid(target));
    let mut request = kit::node::volume_for(&BENCH, &volume_id, target, "ten-keys");
    for (key, value) in layout {
        request = kit::node::with_attribute(request, key, Some(value));
    }
    request
}

async fn publish(client: &NodeClient<Channel>, target: &Path) {
    client
        .clone()
        .node_publish_volume(request(target))
        .await
        .expect("publish");
}

async fn publish_with(client: &NodeClient<Channel>, target: &Path, layout: Layout) {
    client
        .clone()
        .node_publish_volume(request_with(target, layout))
        .await
        .expect("publish with a layout");
}

async fn unpublish(client: &NodeClient<Channel>, target: &Path) {
    client
        .clone()
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "v".into(),
            target_path: target.to_str().expect("utf-8").into(),
        })
        .await
        .expect("unpublish");
}

#[derive(Default)]
struct FloorParts {
    get: Vec<Duration>,
    mount: Vec<Duration>,
    write: Vec<Duration>,
}

impl FloorParts {
    fn add(&mut self, (get, mount, write): (Duration, Duration, Duration)) {
        self.get.push(get);
        self.mount.push(mount);
        self.write.push(write);
    }
    fn median_get(&mut self) -> Duration {
        percentiles(&mut self.get).0
    }
    fn median_mount(&mut self) -> Duration {
        percentiles(&mut self.mount).0
    }
    fn median_write(&mut self) -> Duration {
        percentiles(&mut self.write).0
    }
}

/// The least a plugin must do: read the secret, mount a tmpfs, write the files atomically.
/// Returns the time of each part.
async fn floor_publish(
    store: &Pkcs11Store,
    path: &SecretPath,
    target: &Path,
) -> (Duration, Duration, Duration) {
    let t = Instant::now();
    let (_, data) = store.get(path).await.expect("floor get");
    let payload = Payload::new(
        data.iter()
            .map(|(k, v)| PayloadFile::new(format!("ten-keys/{k}"), v.to_vec(), 0o440))
            .collect(),
    );
    let get = t.elapsed();
    let target = target.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        std::fs::create_dir(&target).expect("floor mkdir");
        hsm_secrets_csi::mount::mount_tmpfs(
            &target,
            "bench-floor",
            hsm_secrets_csi::mount::tmpfs_size_for(&payload),
            Some(GID),
        )
        .expect("floor mount");
        let mount = t.elapsed();
        let t = Instant::now();
        hsm_secrets_csi::payload_writer::write_payload(&target, &payload, Some(GID))
            .expect("floor write");
        (get, mount, t.elapsed())
    })
    .await
    .expect("floor task")
}

fn floor_unpublish(target: &Path) {
    nix::mount::umount2(target, nix::mount::MntFlags::empty()).expect("floor unmount");
    std::fs::remove_dir(target).expect("floor rmdir");
}

struct Rss {
    /// (VmRSS, VmHWM) in KiB, and the thread count.
    idle: (u64, u64, u64),
    loaded: (u64, u64, u64),
    after: (u64, u64, u64),
}

fn vm_kib(pid: u32) -> (u64, u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    };
    (field("VmRSS:"), field("VmHWM:"), field("Threads:"))
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

async fn measure_binary_rss(
    dir: &Path,
    lib: &Path,
    pin_file: &Path,
    catalog: &Path,
    volumes: usize,
) -> Rss {
    let kubelet = dir.join("kubelet-binary");
    std::fs::create_dir_all(kubelet.join("pods")).expect("kubelet dir");
    let socket = dir.join("binary/csi.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .env("NODE_NAME", "bench-node")
        .env("HSM_LOG", "warn")
        .args(["node", "--endpoint"])
        .arg(format!("unix://{}", socket.display()))
        .args(["--device", DEVICE, "--pkcs11-library"])
        .arg(lib)
        .args(["--token-label", LABEL, "--pin-file"])
        .arg(pin_file)
        .arg("--kubelet-dir")
        .arg(&kubelet)
        .arg("--catalog")
        .arg(catalog)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn hsm-secrets node");
    let mut child = KillOnDrop(child);
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let channel = loop {
        if let Ok(channel) = hsm_secrets_csi::connect_unix(&socket).await {
            break channel;
        }
        assert!(Instant::now() < deadline, "the node binary did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut identity =
        hsm_secrets_csi::proto::identity_client::IdentityClient::new(channel.clone());
    while identity
        .probe(ProbeRequest {})
        .await
        .expect("probe")
        .into_inner()
        .ready
        != Some(true)
    {
        assert!(
            Instant::now() < deadline,
            "the node binary never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = vm_kib(pid);

    let client = NodeClient::new(channel);
    let targets: Vec<PathBuf> = (0..volumes)
        .map(|i| target(&kubelet, &format!("rss-{i}")))
        .collect();
    // Sixteen at a time: kubelet's pace during a large rollout, not a stampede.
    for chunk in targets.chunks(16) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|t| {
                let (client, t) = (client.clone(), t.clone());
                tokio::spawn(async move { publish(&client, &t).await })
            })
            .collect();
        for task in tasks {
            task.await.expect("publish");
        }
    }
    let loaded = vm_kib(pid);
    for t in &targets {
        unpublish(&client, t).await;
    }
    let after = vm_kib(pid);
    drop(client);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the node binary did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Rss {
        idle,
        loaded,
        after,
    }
}

/// Nothing this benchmark mounted survives it, whatever happens.
struct UnmountGuard(PathBuf);

impl Drop for UnmountGuard {
    fn drop(&mut self) {
        let Ok(mounts) = hsm_secrets_csi::mountinfo::read_mounts() else {
            return;
        };
        for m in mounts.iter().rev() {
            if m.mount_point.starts_with(&self.0) {
                let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}
