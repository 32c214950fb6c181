//! The archive, on a real S3 API (moto_server on loopback) and SoftHSM tokens, each figure
//! beside its floor measured in the same run:
//!
//! - throughput: archiving records already written (pull from the primary's change feed,
//!   read from the token, encode, seal, PUT) vs one raw PUT of the same bytes;
//! - lag under a steady write load: acknowledgement to durable in the bucket, p50 / p99;
//! - restore of N secrets into an empty token vs applying the same records in process;
//! - a restore drill (rebuild in memory, compare with the device) of the same archive.
//!
//! - sites: a passive site following the archive (first follow of N secrets; site lag
//!   p50/p99 under a steady write load at the active site, from acknowledgement there to
//!   applied at the passive site) and a planned switchover (drain, catch up, promote, the
//!   new site takes writes) beside its floor, the site lease the promotion must wait out.
//!
//! Run: `cargo bench --bench archive`. Knobs: `BENCH_SECRETS` (10000), `BENCH_RATE`
//! (writes/s, 100), `BENCH_LOAD_SECONDS` (10).

use hsm_secrets_testkit as kit;
use kit::s3;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hsm_secrets::archive::archiver::Step;
use hsm_secrets::archive::chain::{ArchiveRoot, Target};
use hsm_secrets::archive::{
    ARCHIVE_KEY_LABEL, Archiver, ArchiverConfig, Bucket, BucketConfig, KeyWrap, RecoverySecretKey,
    TokenArchiveKey, drill, restore,
};
use hsm_secrets::crd::DeviceRole;
use hsm_secrets::hsm::{Expect, Pkcs11Config, Pkcs11Store, SecretData, SecretPath, SecretStore};
use hsm_secrets::mirror::{Agent, AgentConfig, AgentTls, Assignment, generate_pki};

fn main() {
    let dir = kit::bench::private_softhsm_dir();
    let Some(server) = s3::S3Server::start() else {
        eprintln!("the archive bench needs moto_server: pip install 'moto[server]'");
        std::process::exit(1);
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(dir, server));
}

fn median_p99(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |p: f64| samples[((p * samples.len() as f64) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99))
}

/// Opens a token `run` initialised (SoftHSM lists its tokens once per process).
async fn open(dir: &std::path::Path, label: &str) -> Arc<Pkcs11Store> {
    let pin = dir.join(format!("{label}.pin"));
    std::fs::write(&pin, kit::softhsm::USER_PIN).expect("pin");
    Arc::new(
        Pkcs11Store::open(Pkcs11Config::new(kit::bench::library(), label, &pin))
            .await
            .expect("open token"),
    )
}

fn secret(i: usize) -> SecretData {
    let mut d = SecretData::new();
    d.insert("value", vec![(i % 251) as u8; 1024])
        .expect("insert");
    d
}

async fn run(dir: std::path::PathBuf, server: s3::S3Server) {
    let secrets = kit::bench::env_usize("BENCH_SECRETS", 10_000);
    let rate = kit::bench::env_usize("BENCH_RATE", 100);
    let load_seconds = kit::bench::env_usize("BENCH_LOAD_SECONDS", 10);

    for label in [
        "bench-archive",
        "bench-restored",
        "bench-floor",
        "bench-site-b",
    ] {
        kit::bench::init_token(label);
    }
    let store = open(&dir, "bench-archive").await;
    store
        .archive_key_generate(ARCHIVE_KEY_LABEL)
        .await
        .expect("archive key");
    let pki = generate_pki(&dir.join("pki"), &["n1"]).expect("pki");
    let tls = AgentTls::from_files(pki.files("n1").expect("files")).expect("tls");
    let agent = Agent::start(AgentConfig::new("n1", tls), store.clone()).await;
    agent
        .assign(Assignment {
            role: DeviceRole::Primary,
            epoch: 1,
            primary: None,
            mirrors: Vec::new(),
            lease: Duration::from_secs(3600),
            sync_interval: None,
        })
        .await
        .expect("primary");
    server.create_bucket("bench");
    let creds = dir.join("creds");
    std::fs::create_dir_all(&creds).expect("creds dir");
    std::fs::write(creds.join("access-key-id"), "bench").expect("creds");
    std::fs::write(creds.join("secret-access-key"), "bench").expect("creds");
    let bucket = Bucket::open(&BucketConfig {
        url: "s3://bench/archive".into(),
        endpoint: Some(server.endpoint.clone()),
        region: None,
        credentials_dir: Some(creds),
        timeout: Duration::from_secs(60),
    })
    .expect("bucket");
    let recovery = RecoverySecretKey::generate().expect("recovery key");
    let root = ArchiveRoot::new("bench-hsm", "main").expect("root");
    let keys: Vec<Arc<dyn KeyWrap>> = vec![
        Arc::new(TokenArchiveKey::new(store.clone(), ARCHIVE_KEY_LABEL)),
        Arc::new(recovery.public()),
    ];
    let mut archiver = Archiver::new(
        ArchiverConfig {
            root: root.clone(),
            segment_interval: Duration::from_millis(200),
            base_interval: Duration::from_secs(24 * 3600),
            retention: None,
        },
        bucket.clone(),
        keys,
    );
    archiver.step(&agent).await.expect("first base");

    // Throughput: N records written, then archived as segments; floor: a raw PUT of the
    // same bytes.
    eprintln!("writing {secrets} secrets of 1 KiB to the primary (SoftHSM: this takes a while)");
    for i in 0..secrets {
        let path: SecretPath = format!("bench/s{i}").parse().expect("path");
        agent
            .put(&path, secret(i), Expect::Any, 1)
            .await
            .expect("put");
    }
    let started = Instant::now();
    let mut objects = Vec::new();
    loop {
        match archiver.step(&agent).await.expect("archive") {
            Step::Segment { name, .. } => objects.push(name),
            Step::UpToDate { .. } => break,
            other => panic!("{other:?}"),
        }
    }
    let archive_time = started.elapsed();
    let mut bytes = 0usize;
    for name in &objects {
        bytes += bucket.get(name).await.expect("get").len();
    }
    let blob = vec![7u8; bytes];
    let started = Instant::now();
    bucket.put("floor/blob", blob).await.expect("raw put");
    let floor_time = started.elapsed();

    // Lag at a steady rate: each write's acknowledgement to the step that made it durable.
    let acked: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let writer = {
        let (agent, store, acked) = (agent.clone(), store.clone(), acked.clone());
        tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut tick = tokio::time::interval(period);
            for i in 0..rate * load_seconds {
                tick.tick().await;
                let path: SecretPath = format!("bench/load{}", i % 500).parse().expect("path");
                agent
                    .put(&path, secret(i), Expect::Any, 1)
                    .await
                    .expect("put");
                acked
                    .lock()
                    .expect("lock")
                    .insert(store.latest_sequence(), Instant::now());
            }
        })
    };
    let mut lags = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(load_seconds as u64 + 5);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let durable = match archiver.step(&agent).await.expect("archive") {
            Step::Segment { sequence, .. } | Step::UpToDate { sequence } => sequence,
            other => panic!("{other:?}"),
        };
        let now = Instant::now();
        let mut acked = acked.lock().expect("lock");
        let done: Vec<u64> = acked.range(..=durable).map(|(s, _)| *s).collect();
        for seq in done {
            if let Some(at) = acked.remove(&seq) {
                lags.push(now - at);
            }
        }
    }
    writer.await.expect("writer");
    let (lag_p50, lag_p99) = median_p99(&mut lags);

    // Restore of everything into an empty token vs applying the same records in process.
    let target = open(&dir, "bench-restored").await;
    let started = Instant::now();
    let report = restore(
        &bucket,
        &root,
        &recovery,
        Target::Latest,
        target.as_ref(),
        false,
    )
    .await
    .expect("restore");
    let restore_time = started.elapsed();
    let floor_token = open(&dir, "bench-floor").await;
    let manifest = store.manifest().await.expect("manifest");
    let mut records = Vec::new();
    for entry in manifest.iter().filter(|e| !e.deleted) {
        records.push(store.record(&entry.path).await.expect("record"));
    }
    let started = Instant::now();
    for record in records {
        floor_token.apply(record).await.expect("apply");
    }
    let apply_time = started.elapsed();
    let key = TokenArchiveKey::new(store.clone(), ARCHIVE_KEY_LABEL);
    let started = Instant::now();
    let drilled = drill::verify(&bucket, &root, &key, &manifest)
        .await
        .expect("drill");
    let drill_time = started.elapsed();
    assert!(drilled.verified(), "{drilled:?}");

    let sites = sites(&dir, &server, &agent, &store, &recovery, rate, load_seconds).await;

    println!();
    println!("Archive on a real S3 API (moto on loopback), SoftHSM2 tokens");
    println!();
    println!("| what | figure | floor | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| archive {secrets} records (1 KiB) as {} segment(s), {:.1} MiB | {:.0} records/s ({:.2?}) | raw PUT of the same bytes {:.2?} | {:.2}x |",
        objects.len(),
        bytes as f64 / 1048576.0,
        secrets as f64 / archive_time.as_secs_f64(),
        archive_time,
        floor_time,
        archive_time.as_secs_f64() / floor_time.as_secs_f64()
    );
    println!(
        "| lag, acknowledgement to durable, {rate} writes/s for {load_seconds} s, 200 ms segments ({} writes) | p50 {:.0?} / p99 {:.0?} | the 200 ms segment interval | - |",
        lags.len(),
        lag_p50,
        lag_p99
    );
    println!(
        "| restore of {} secrets into an empty token | {:.2?} | in-process apply of the same records {:.2?} | {:.2}x |",
        report.secrets,
        restore_time,
        apply_time,
        restore_time.as_secs_f64() / apply_time.as_secs_f64()
    );
    println!(
        "| restore drill (rebuild in memory, compare) of {} secrets | {:.2?} | restore into a token {:.2?} | {:.2}x |",
        drilled.secrets,
        drill_time,
        restore_time,
        drill_time.as_secs_f64() / restore_time.as_secs_f64()
    );
    println!(
        "| passive site: first follow of {} secrets (newest base applied to its token) | {:.2?} | in-process apply of the same records {:.2?} | {:.2}x |",
        sites.secrets,
        sites.first_follow,
        apply_time,
        sites.first_follow.as_secs_f64() / apply_time.as_secs_f64()
    );
    println!(
        "| site lag, acknowledged at the active site to applied at the passive one, {rate} writes/s for {load_seconds} s, 200 ms segments ({} writes) | p50 {:.0?} / p99 {:.0?} | archive lag above p50 {:.0?} | - |",
        sites.lags, sites.lag_p50, sites.lag_p99, lag_p50
    );
    println!(
        "| planned switchover with {} secrets (drain, catch up, promote, first write at the new site) | {:.2?} | the {:.1?} the promotion waits out (site lease and margin) | {:.2}x |",
        sites.secrets,
        sites.switchover,
        sites.lease_wait,
        sites.switchover.as_secs_f64() / sites.lease_wait.as_secs_f64()
    );
    let [drained, applied, promoted, first_write] = sites.phases;
    println!(
        "\nswitchover phases: active site drained and archived {drained:.2?}, passive site applied \
         it {applied:.2?}, promoted (catch-up, fence, its own archive's record) {promoted:.2?}, \
         first write taken {first_write:.2?}"
    );
}

struct SiteFigures {
    secrets: u64,
    first_follow: Duration,
    lags: usize,
    lag_p50: Duration,
    lag_p99: Duration,
    switchover: Duration,
    /// The switchover's phases: drained and archived, applied at b, promoted, first write.
    phases: [Duration; 4],
    lease_wait: Duration,
}

/// The active site is the bench's primary (through its node's supervisor, archiving under
/// a second archive name); the passive site a second token that received the archive key.
async fn sites(
    dir: &std::path::Path,
    server: &s3::S3Server,
    agent: &Agent,
    store: &Arc<Pkcs11Store>,
    recovery: &RecoverySecretKey,
    rate: usize,
    load_seconds: usize,
) -> SiteFigures {
    use hsm_secrets::archive::Supervisor;
    use hsm_secrets::archive::plan::ArchiveReport;
    use hsm_secrets::archive::{ArchiveRequest, BackupConfig, BucketRef, FollowConfig, SiteConfig};
    let mounts = dir.join("mounts");
    let mounted = mounts.join("bench-archive");
    std::fs::create_dir_all(&mounted).expect("mounts");
    std::fs::write(mounted.join("access-key-id"), "bench").expect("creds");
    std::fs::write(mounted.join("secret-access-key"), "bench").expect("creds");
    std::fs::write(mounted.join("recovery.pub"), recovery.public().to_text()).expect("pub");
    let b_store = open(dir, "bench-site-b").await;
    let transport = b_store
        .archive_transport_begin(ARCHIVE_KEY_LABEL)
        .await
        .expect("transport");
    let wrapped = store
        .archive_key_export(ARCHIVE_KEY_LABEL, &transport)
        .await
        .expect("export");
    b_store
        .archive_key_import(ARCHIVE_KEY_LABEL, wrapped)
        .await
        .expect("import");
    let pki = generate_pki(&dir.join("pki-b"), &["b1"]).expect("pki");
    let tls = AgentTls::from_files(pki.files("b1").expect("files")).expect("tls");
    let b_agent = Agent::start(AgentConfig::new("b1", tls), b_store.clone()).await;
    b_agent
        .assign(Assignment {
            role: DeviceRole::Primary,
            epoch: 1,
            primary: None,
            mirrors: Vec::new(),
            lease: Duration::from_secs(3600),
            sync_interval: None,
        })
        .await
        .expect("primary");
    let key = |s: &Arc<Pkcs11Store>| Arc::new(TokenArchiveKey::new(s.clone(), ARCHIVE_KEY_LABEL));
    let a = Supervisor::new(agent.clone(), "bench-hsm", key(store), &mounts);
    let b = Supervisor::new(b_agent.clone(), "bench-hsm-b", key(&b_store), &mounts);
    let lease = Duration::from_secs(5);
    let bucket = BucketRef {
        url: "s3://bench/sites".into(),
        endpoint: Some(server.endpoint.clone()),
        region: None,
        credentials_secret: "bench-archive".into(),
        archive_name: "main".into(),
    };
    let backup = BackupConfig {
        bucket: bucket.clone(),
        segment_interval: Duration::from_millis(200),
        base_interval: Duration::from_secs(24 * 3600),
        retention: None,
    };
    let mut a_request = ArchiveRequest {
        backup: Some(backup.clone()),
        site: Some(SiteConfig {
            name: "a".into(),
            lease,
            follow: None,
        }),
        ..Default::default()
    };
    let mut b_request = ArchiveRequest {
        backup: Some(backup),
        site: Some(SiteConfig {
            name: "b".into(),
            lease,
            follow: Some(FollowConfig {
                bucket,
                device: "bench-hsm".into(),
            }),
        }),
        ..Default::default()
    };
    async fn until(
        sup: &Supervisor,
        request: &ArchiveRequest,
        done: impl Fn(&ArchiveReport) -> bool,
    ) -> ArchiveReport {
        loop {
            let answer = sup.handle(request.clone()).await;
            if done(&answer) {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("sites: the active site archives its secrets, the passive one follows");
    let published = store.latest_sequence();
    until(&a, &a_request, |r| r.archived_sequence >= published).await;
    let started = Instant::now();
    let answer = until(&b, &b_request, |r| {
        r.site
            .as_ref()
            .is_some_and(|s| s.applied_sequence >= published && s.lag_ms == 0)
    })
    .await;
    let first_follow = started.elapsed();
    let _ = answer;
    let secrets = b_store.manifest().await.expect("manifest").len() as u64;

    // Site lag under a steady load at the active site.
    let acked: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let writer = {
        let (agent, acked) = (agent.clone(), acked.clone());
        tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
            let mut tick = tokio::time::interval(period);
            for i in 0..rate * load_seconds {
                tick.tick().await;
                let path: SecretPath = format!("bench/site{}", i % 500).parse().expect("path");
                if let Ok(o) = agent.put(&path, secret(i), Expect::Any, 1).await {
                    acked
                        .lock()
                        .expect("lock")
                        .insert(o.version, Instant::now());
                }
            }
        })
    };
    let mut lags = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(load_seconds as u64 + 10);
    while Instant::now() < deadline {
        a.handle(a_request.clone()).await;
        let answer = b.handle(b_request.clone()).await;
        let applied = answer.site.map_or(0, |s| s.applied_sequence);
        let now = Instant::now();
        {
            let mut acked = acked.lock().expect("lock");
            let done: Vec<u64> = acked.range(..=applied).map(|(s, _)| *s).collect();
            for seq in done {
                if let Some(at) = acked.remove(&seq) {
                    lags.push(now - at);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer.await.expect("writer");
    let (lag_p50, lag_p99) = median_p99(&mut lags);

    // A planned switchover: drain a, let b catch up, promote b, first write at b.
    eprintln!("sites: planned switchover");
    let started = Instant::now();
    let mut marks = Vec::new();
    a_request.ask.drain = true;
    a.handle(a_request.clone()).await;
    let last = store.latest_sequence();
    until(&a, &a_request, |r| r.archived_sequence >= last).await;
    marks.push(started.elapsed());
    until(&b, &b_request, |r| {
        r.site.as_ref().is_some_and(|s| s.applied_sequence >= last)
    })
    .await;
    marks.push(started.elapsed());
    b_request.ask.promote_request = Some("bench".into());
    until(&b, &b_request, |r| {
        r.site
            .as_ref()
            .is_some_and(|s| s.promotion_done.as_deref() == Some("bench"))
    })
    .await;
    marks.push(started.elapsed());
    loop {
        b.handle(b_request.clone()).await;
        let path: SecretPath = "bench/after-switchover".parse().expect("path");
        if b_agent.put(&path, secret(1), Expect::Any, 1).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let switchover = started.elapsed();
    marks.push(switchover);
    let phases = [
        marks[0],
        marks[1] - marks[0],
        marks[2] - marks[1],
        marks[3] - marks[2],
    ];
    SiteFigures {
        secrets,
        first_follow,
        lags: lags.len(),
        lag_p50,
        lag_p99,
        switchover,
        phases,
        lease_wait: hsm_secrets::archive::site::promotion_wait(lease),
    }
}
