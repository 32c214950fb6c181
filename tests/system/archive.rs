//! The archive against a real S3 API (moto on loopback) and real SoftHSM tokens: the
//! archiver beside a primary agent ships bases and segments, a restore rebuilds any point
//! into an empty token with the token's archive key or with the offline recovery key, and
//! every kind of bad object stops the restore before it, by name.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::sync::Arc;
use std::time::Duration;

use hsm_secrets::archive::archiver::Step;
use hsm_secrets::archive::chain::{ArchiveRoot, Target};
use hsm_secrets::archive::plan::ArchiveReport;
use hsm_secrets::archive::{
    ARCHIVE_KEY_LABEL, ArchiveError, ArchiveRequest, Archiver, ArchiverConfig, BackupConfig,
    Bucket, BucketConfig, BucketRef, FollowConfig, KeyWrap, RecoverySecretKey, SiteConfig,
    TokenArchiveKey, restore,
};
use hsm_secrets::crd::{DeviceRole, SiteRole};
use hsm_secrets::hsm::{Expect, Pkcs11Store, SecretData, SecretPath, SecretStore};
use hsm_secrets::mirror::{Agent, AgentConfig, AgentTls, Assignment, generate_pki};
use kit::s3::S3Server;
use kit::softhsm::TestToken;

const DEVICE: &str = "prod-hsm";

fn path(p: &str) -> SecretPath {
    p.parse().unwrap()
}

fn data(pairs: &[(&str, &[u8])]) -> SecretData {
    let mut d = SecretData::new();
    for (k, v) in pairs {
        d.insert(k, v.to_vec()).unwrap();
    }
    d
}

struct Primary {
    agent: Agent,
    store: Arc<Pkcs11Store>,
    _pki: tempfile::TempDir,
}

/// A primary agent at `epoch` on a fresh token holding the device's archive key.
async fn start_primary(name: &str, epoch: u64) -> Primary {
    let token = TestToken::new(name).unwrap();
    let store = Arc::new(token.open().await);
    store.archive_key_generate(ARCHIVE_KEY_LABEL).await.unwrap();
    primary_on(store, "n1", epoch).await
}

/// An agent on `store`, assigned the primary at `epoch`.
async fn primary_on(store: Arc<Pkcs11Store>, node: &str, epoch: u64) -> Primary {
    let pki = tempfile::tempdir().unwrap();
    let files = generate_pki(pki.path(), &[node]).unwrap();
    let tls = AgentTls::from_files(files.files(node).unwrap()).unwrap();
    let agent = Agent::start(AgentConfig::new(node, tls), store.clone()).await;
    agent
        .assign(Assignment {
            role: DeviceRole::Primary,
            epoch,
            primary: None,
            mirrors: Vec::new(),
            lease: Duration::from_secs(3600),
            sync_interval: None,
        })
        .await
        .unwrap();
    Primary {
        agent,
        store,
        _pki: pki,
    }
}

fn s3_bucket(server: &S3Server, bucket: &str) -> Bucket {
    server.create_bucket(bucket);
    let credentials = tempfile::tempdir().unwrap().keep();
    std::fs::write(credentials.join("access-key-id"), "testing\n").unwrap();
    std::fs::write(credentials.join("secret-access-key"), "testing\n").unwrap();
    Bucket::open(&BucketConfig {
        url: format!("s3://{bucket}/archives"),
        endpoint: Some(server.endpoint.clone()),
        region: None,
        credentials_dir: Some(credentials),
        timeout: Duration::from_secs(10),
    })
    .unwrap()
}

fn archiver(bucket: &Bucket, primary: &Primary, recovery: &RecoverySecretKey) -> Archiver {
    let keys: Vec<Arc<dyn KeyWrap>> = vec![
        Arc::new(TokenArchiveKey::new(
            primary.store.clone(),
            ARCHIVE_KEY_LABEL,
        )),
        Arc::new(recovery.public()),
    ];
    Archiver::new(
        ArchiverConfig {
            root: ArchiveRoot::new(DEVICE, "a1").unwrap(),
            segment_interval: Duration::from_millis(100),
            base_interval: Duration::from_secs(3600),
            retention: None,
        },
        bucket.clone(),
        keys,
    )
}

async fn put(primary: &Primary, p: &str, pairs: &[(&str, &[u8])]) -> u64 {
    let epoch = primary.agent.epoch();
    primary
        .agent
        .put(&path(p), data(pairs), Expect::Any, epoch)
        .await
        .unwrap();
    primary.store.latest_sequence()
}

async fn empty_token(name: &str) -> Pkcs11Store {
    TestToken::new(name).unwrap().open().await
}

async fn value(store: &dyn SecretStore, p: &str, key: &str) -> Option<Vec<u8>> {
    match store.get(&path(p)).await {
        Ok((_, d)) => d.get(key).map(<[u8]>::to_vec),
        Err(_) => None,
    }
}

#[tokio::test]
async fn the_archive_restores_any_point_with_the_token_key_or_the_recovery_key() {
    let Some(s3) = S3Server::start() else { return };
    let bucket = s3_bucket(&s3, "restore-points");
    let recovery = RecoverySecretKey::generate().unwrap();
    let primary = start_primary("arc-primary", 1).await;
    let root = ArchiveRoot::new(DEVICE, "a1").unwrap();
    let mut archiver = archiver(&bucket, &primary, &recovery);

    put(&primary, "shop/db", &[("password", b"pw-one")]).await;
    let step = archiver.step(&primary.agent).await.unwrap();
    assert!(matches!(step, Step::Base { records: 1, .. }), "{step:?}");
    put(&primary, "shop/api", &[("token", b"tok-one")]).await;
    let first_point = put(&primary, "shop/db", &[("password", b"pw-two")]).await;
    let step = archiver.step(&primary.agent).await.unwrap();
    assert!(
        matches!(step, Step::Segment { records: 2, sequence, .. } if sequence == first_point),
        "{step:?}"
    );
    primary
        .agent
        .delete(&path("shop/api"), Expect::Any, 1)
        .await
        .unwrap();
    put(&primary, "shop/tls", &[("tls.key", b"key-bytes")]).await;
    assert!(matches!(
        archiver.step(&primary.agent).await.unwrap(),
        Step::Segment { .. }
    ));
    assert!(matches!(
        archiver.step(&primary.agent).await.unwrap(),
        Step::UpToDate { .. }
    ));

    // Every token of the device lost: the offline recovery key opens the archive.
    let rebuilt = empty_token("arc-rebuilt").await;
    let report = restore(&bucket, &root, &recovery, Target::Latest, &rebuilt, false)
        .await
        .unwrap();
    assert_eq!(report.secrets, 2, "{report:?}");
    assert_eq!(report.segments, 2);
    assert_eq!(report.sequence, primary.store.latest_sequence());
    assert!(report.stopped.is_none(), "{report:?}");
    assert_eq!(
        value(&rebuilt, "shop/db", "password").await.unwrap(),
        b"pw-two"
    );
    assert_eq!(
        value(&rebuilt, "shop/tls", "tls.key").await.unwrap(),
        b"key-bytes"
    );
    assert!(
        value(&rebuilt, "shop/api", "token").await.is_none(),
        "deleted before the point"
    );

    // An earlier point, opened with the token's own archive key.
    let earlier = empty_token("arc-earlier").await;
    let key = TokenArchiveKey::new(primary.store.clone(), ARCHIVE_KEY_LABEL);
    let report = restore(
        &bucket,
        &root,
        &key,
        Target::Sequence(first_point),
        &earlier,
        false,
    )
    .await
    .unwrap();
    assert_eq!(report.sequence, first_point);
    assert_eq!(
        value(&earlier, "shop/api", "token").await.unwrap(),
        b"tok-one"
    );
    assert!(value(&earlier, "shop/tls", "tls.key").await.is_none());

    // A token that holds data is refused unless forced; a stranger's key opens nothing.
    let error = restore(&bucket, &root, &recovery, Target::Latest, &rebuilt, false)
        .await
        .unwrap_err();
    assert!(
        matches!(error, ArchiveError::TargetNotEmpty { secrets: 2, .. }),
        "{error}"
    );
    let stranger = RecoverySecretKey::generate().unwrap();
    let error = restore(
        &bucket,
        &root,
        &stranger,
        Target::Latest,
        &empty_token("arc-x").await,
        false,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, ArchiveError::NoMatchingKey { .. }),
        "{error}"
    );

    // No secret value is readable in the bucket.
    for object in bucket.list("").await.unwrap() {
        let bytes = bucket.get(&object.name).await.unwrap();
        for secret in [&b"pw-one"[..], b"pw-two", b"tok-one", b"key-bytes"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "{}",
                object.name
            );
        }
    }
}

#[tokio::test]
async fn tampered_truncated_reordered_replayed_foreign_and_missing_objects_stop_the_restore() {
    let Some(s3) = S3Server::start() else { return };
    let bucket = s3_bucket(&s3, "bad-objects");
    let recovery = RecoverySecretKey::generate().unwrap();
    let primary = start_primary("arc-bad", 1).await;
    let root = ArchiveRoot::new(DEVICE, "a1").unwrap();
    let mut archiver = archiver(&bucket, &primary, &recovery);
    archiver.step(&primary.agent).await.unwrap(); // the base
    let mut segments = Vec::new();
    for i in 0..3u8 {
        put(&primary, &format!("shop/s{i}"), &[("v", &[b'a' + i; 8])]).await;
        match archiver.step(&primary.agent).await.unwrap() {
            Step::Segment { name, .. } => segments.push(name),
            other => panic!("{other:?}"),
        }
    }
    let original = bucket.get(&segments[1]).await.unwrap();
    let restore_latest = || async {
        let target = empty_token("arc-bad-target").await;
        restore(&bucket, &root, &recovery, Target::Latest, &target, false).await
    };
    // Whole chain: three segments.
    assert_eq!(restore_latest().await.unwrap().segments, 3);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "tampered",
            {
                let mut b = original.clone();
                let at = b.len() - 20;
                b[at] ^= 0x40;
                b
            },
            "authentication failed",
        ),
        (
            "truncated",
            original[..original.len() / 2].to_vec(),
            "cut short",
        ),
        // The first segment stored again in the second's place (a replay or reordering).
        (
            "replayed",
            bucket.get(&segments[0]).await.unwrap(),
            "does not match its authenticated header",
        ),
    ];
    for (what, bytes, hint) in cases {
        bucket.put(&segments[1], bytes).await.unwrap();
        let report = restore_latest().await.unwrap();
        assert_eq!(
            report.segments, 1,
            "{what}: applied up to the bad object only"
        );
        let stopped = report.stopped.unwrap_or_default();
        assert!(
            stopped.contains(&segments[1]) && stopped.contains(hint),
            "{what}: {stopped}"
        );
    }

    // An object of another device's archive under this name.
    let other = start_primary("arc-other", 1).await;
    let other_bucket = s3_bucket(&s3, "other-device");
    let mut foreign_archiver = Archiver::new(
        ArchiverConfig {
            root: ArchiveRoot::new("other-hsm", "a1").unwrap(),
            segment_interval: Duration::from_millis(100),
            base_interval: Duration::from_secs(3600),
            retention: None,
        },
        other_bucket.clone(),
        vec![Arc::new(recovery.public()) as Arc<dyn KeyWrap>],
    );
    foreign_archiver.step(&other.agent).await.unwrap();
    put(&other, "bank/vault", &[("k", b"v")]).await;
    let Step::Segment { name, .. } = foreign_archiver.step(&other.agent).await.unwrap() else {
        panic!("no foreign segment");
    };
    bucket
        .put(&segments[1], other_bucket.get(&name).await.unwrap())
        .await
        .unwrap();
    let stopped = restore_latest().await.unwrap().stopped.unwrap_or_default();
    assert!(stopped.contains("belongs to device other-hsm"), "{stopped}");

    // A missing segment: a gap, named, and nothing after it applied.
    bucket.delete(&segments[1]).await.unwrap();
    let report = restore_latest().await.unwrap();
    assert_eq!(report.segments, 1);
    let stopped = report.stopped.unwrap_or_default();
    assert!(
        stopped.contains("a gap") && stopped.contains(&segments[2]),
        "{stopped}"
    );
}

#[tokio::test]
async fn bucket_failures_name_the_object_store_and_the_fix_and_never_block_writes() {
    let Some(s3) = S3Server::start() else { return };
    let recovery = RecoverySecretKey::generate().unwrap();
    let primary = start_primary("arc-fail", 1).await;
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("access-key-id"), "testing").unwrap();
    std::fs::write(credentials.path().join("secret-access-key"), "testing").unwrap();
    let open = |url: &str, endpoint: String| {
        Bucket::open(&BucketConfig {
            url: url.into(),
            endpoint: Some(endpoint),
            region: None,
            credentials_dir: Some(credentials.path().to_path_buf()),
            timeout: Duration::from_secs(3),
        })
        .unwrap()
    };
    let missing = open("s3://no-such-bucket", s3.endpoint.clone());
    let error = archiver(&missing, &primary, &recovery)
        .step(&primary.agent)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("create the bucket"), "{error}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable = open("s3://archive", format!("http://{closed}"));
    let error = archiver(&unreachable, &primary, &recovery)
        .step(&primary.agent)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("check the endpoint"), "{error}");
    // Wrong credentials, against a server that checks them.
    let checking = S3Server::start_checking_credentials("guarded").unwrap();
    let guarded = open("s3://guarded/archives", checking.endpoint.clone());
    let error = archiver(&guarded, &primary, &recovery)
        .step(&primary.agent)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("check the credentials Secret") && error.contains("s3://guarded"),
        "{error}"
    );
    assert!(
        !error.contains("testing"),
        "no credential in the message: {error}"
    );
    // A server answering 503 to everything, and one that is full (507, as MinIO says it).
    for (status, code, hint) in [
        (
            "503 Service Unavailable",
            "SlowDown",
            "check the object store's health",
        ),
        (
            "507 Insufficient Storage",
            "XMinioStorageFull",
            "the object store is full",
        ),
    ] {
        let endpoint = answering(status, code).await;
        let failing = open("s3://archive", endpoint);
        let error = archiver(&failing, &primary, &recovery)
            .step(&primary.agent)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(hint) && error.contains("s3://archive"),
            "{status}: {error}"
        );
    }
    // The device goes on taking writes.
    put(&primary, "shop/db", &[("password", b"still-writable")]).await;

    for (url, hint) in [
        ("ftp://x", "no known scheme"),
        ("s3://", "names no bucket"),
        ("file://relative", "absolute"),
    ] {
        let error = Bucket::open(&BucketConfig {
            url: url.into(),
            ..BucketConfig::default()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(error.contains(hint), "{url}: {error}");
    }
    let error = Bucket::open(&BucketConfig {
        url: "s3://b".into(),
        credentials_dir: Some("/nonexistent".into()),
        ..BucketConfig::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(error.contains("access-key-id"), "{error}");
}

/// The archive Secret as the node plugin mounts it (`hsm-archive`: moto's test
/// credentials and the recovery key's public half), under a fresh credentials root.
fn archive_secret(recovery: &RecoverySecretKey) -> (tempfile::TempDir, std::path::PathBuf) {
    let mounts = tempfile::tempdir().unwrap();
    let secret = mounts.path().join("hsm-archive");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("access-key-id"), "testing\n").unwrap();
    std::fs::write(secret.join("secret-access-key"), "testing\n").unwrap();
    std::fs::write(secret.join("recovery.pub"), recovery.public().to_text()).unwrap();
    (mounts, secret)
}

/// An HTTP server on loopback that answers every request with `status` and an S3 error
/// document of `code`; its endpoint.
async fn answering(status: &'static str, code: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 64 * 1024];
                let _ = stream.read(&mut request).await;
                let body = format!(
                    "<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>{status}</Message></Error>"
                );
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    endpoint
}

/// The archive key goes to the device's other tokens only wrapped, token to token.
async fn copy_archive_key(from: &Pkcs11Store, to: &Pkcs11Store) {
    let transport = to.archive_transport_begin(ARCHIVE_KEY_LABEL).await.unwrap();
    let wrapped = from
        .archive_key_export(ARCHIVE_KEY_LABEL, &transport)
        .await
        .unwrap();
    to.archive_key_import(ARCHIVE_KEY_LABEL, wrapped)
        .await
        .unwrap();
}

#[tokio::test]
async fn after_a_failover_the_new_primary_continues_the_archive_and_restores_follow_it() {
    let Some(s3) = S3Server::start() else { return };
    let bucket = s3_bucket(&s3, "failover");
    let recovery = RecoverySecretKey::generate().unwrap();
    let root = ArchiveRoot::new(DEVICE, "a1").unwrap();
    let old = start_primary("arc-old", 1).await;
    let mut old_archiver = archiver(&bucket, &old, &recovery);
    put(&old, "shop/db", &[("password", b"before")]).await;
    old_archiver.step(&old.agent).await.unwrap();
    put(&old, "shop/db", &[("password", b"replicated")]).await;
    old_archiver.step(&old.agent).await.unwrap();

    // The mirror: its token received the archive key in the ceremony, and holds what was
    // replicated to it.
    let token = TestToken::new("arc-new").unwrap();
    let store = Arc::new(token.open().await);
    let error = store
        .archive_key_import(ARCHIVE_KEY_LABEL, vec![0; 384])
        .await
        .unwrap_err();
    assert!(error.to_string().contains("key-receive-begin"), "{error}");
    copy_archive_key(&old.store, &store).await;
    for entry in old.store.manifest().await.unwrap() {
        store
            .apply(old.store.record(&entry.path).await.unwrap())
            .await
            .unwrap();
    }
    // A write the old primary takes and archives, which never reaches the mirror.
    put(&old, "shop/lost", &[("k", b"lost-write")]).await;
    old_archiver.step(&old.agent).await.unwrap();

    // The mirror is promoted at epoch 2 and takes writes; its archiver starts a new chain.
    let new = primary_on(store, "n2", 2).await;
    let mut new_archiver = archiver(&bucket, &new, &recovery);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let promoted_at = hsm_secrets::archive::archiver::now_millis();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let step = new_archiver.step(&new.agent).await.unwrap();
    assert!(
        matches!(step, Step::Base { .. }),
        "a new epoch starts a new chain: {step:?}"
    );
    put(&new, "shop/db", &[("password", b"after-failover")]).await;
    assert!(matches!(
        new_archiver.step(&new.agent).await.unwrap(),
        Step::Segment { .. }
    ));

    // A fenced old primary writes nothing more into the archive.
    old.agent.fence(1).await.unwrap();
    assert_eq!(
        old_archiver.step(&old.agent).await.unwrap(),
        Step::NotPrimary
    );

    let target = empty_token("arc-failover-target").await;
    let report = restore(&bucket, &root, &recovery, Target::Latest, &target, false)
        .await
        .unwrap();
    assert_eq!(report.epoch, 2, "{report:?}");
    assert_eq!(
        value(&target, "shop/db", "password").await.unwrap(),
        b"after-failover"
    );
    assert!(
        value(&target, "shop/lost", "k").await.is_none(),
        "the old primary's unreplicated write is not in its successor's history"
    );
    // A point in time before the promotion restores the history as it was then: the old
    // primary's chain, its last write included. (A sequence number names a point of the
    // newest epoch: after a failover the new primary reuses the numbers its predecessor's
    // lost writes had.)
    let before = empty_token("arc-old-point").await;
    let report = restore(
        &bucket,
        &root,
        &recovery,
        Target::Time(promoted_at),
        &before,
        false,
    )
    .await
    .unwrap();
    assert_eq!(report.epoch, 1, "{report:?}");
    assert_eq!(
        value(&before, "shop/lost", "k").await.unwrap(),
        b"lost-write"
    );
}

/// `hsm-secrets archive …` as an operator runs it, on this process's SoftHSM tokens.
fn cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .arg("archive")
        .args(args)
        .env("SOFTHSM2_CONF", kit::softhsm::conf_path())
        .env_remove("HSM_LOG_FORMAT")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "archive {args:?}: {stdout}{stderr}");
    stdout
}

fn token_flags(token: &TestToken) -> Vec<String> {
    vec![
        "--pkcs11-library".into(),
        token.library.display().to_string(),
        "--token-label".into(),
        token.label.clone(),
        "--pin-file".into(),
        token.pin_file.display().to_string(),
    ]
}

#[tokio::test]
async fn the_ceremony_and_a_restore_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let Some(holder) = TestToken::new("arc-cli-holder") else {
        return;
    };
    let receiver = TestToken::new("arc-cli-receiver").unwrap();
    let fresh = TestToken::new("arc-cli-fresh").unwrap();
    let at = |name: &str| dir.path().join(name).display().to_string();
    let text = cli(&["recovery-keygen", "--out", &at("recovery.key")]);
    assert!(text.contains("keep it offline"), "{text}");

    let flags = |t: &TestToken| token_flags(t);
    let mut args: Vec<String> = vec!["key-init".into()];
    args.extend(flags(&holder));
    cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args: Vec<String> = vec!["key-receive-begin".into()];
    args.extend(flags(&receiver));
    args.extend(["--out".into(), at("transport.json")]);
    cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args: Vec<String> = vec!["key-export".into()];
    args.extend(flags(&holder));
    args.extend([
        "--transport".into(),
        at("transport.json"),
        "--out".into(),
        at("wrapped.bin"),
    ]);
    cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args: Vec<String> = vec!["key-receive".into()];
    args.extend(flags(&receiver));
    args.extend(["--wrapped".into(), at("wrapped.bin")]);
    cli(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // The receiving token archives as the primary; the bucket is a local directory.
    let store = Arc::new(receiver.open().await);
    assert!(store.archive_key_exists(ARCHIVE_KEY_LABEL).await.unwrap());
    let primary = primary_on(store, "n1", 1).await;
    let url = format!("file://{}", at("bucket"));
    let bucket = Bucket::open(&BucketConfig {
        url: url.clone(),
        ..BucketConfig::default()
    })
    .unwrap();
    let recovery =
        hsm_secrets::archive::RecoveryPublicKey::read(&dir.path().join("recovery.pub")).unwrap();
    let mut archiver = Archiver::new(
        ArchiverConfig {
            root: ArchiveRoot::new(DEVICE, "main").unwrap(),
            segment_interval: Duration::from_millis(100),
            base_interval: Duration::from_secs(3600),
            retention: None,
        },
        bucket,
        vec![
            Arc::new(TokenArchiveKey::new(
                primary.store.clone(),
                ARCHIVE_KEY_LABEL,
            )),
            Arc::new(recovery),
        ],
    );
    archiver.step(&primary.agent).await.unwrap();
    put(&primary, "shop/db", &[("password", b"from-the-cli")]).await;
    archiver.step(&primary.agent).await.unwrap();

    let listing = cli(&["list", "--bucket-url", &url, "--device", DEVICE]);
    assert_eq!(
        listing.lines().filter(|l| l.starts_with("base")).count(),
        1,
        "{listing}"
    );
    assert_eq!(
        listing.lines().filter(|l| l.starts_with("segment")).count(),
        1,
        "{listing}"
    );

    let mut args: Vec<String> = vec![
        "restore".into(),
        "--bucket-url".into(),
        url,
        "--device".into(),
        DEVICE.into(),
        "--recovery-key".into(),
        at("recovery.key"),
        "--json".into(),
    ];
    args.extend(flags(&fresh));
    let report: serde_json::Value =
        serde_json::from_str(&cli(&args.iter().map(String::as_str).collect::<Vec<_>>())).unwrap();
    assert_eq!(report["secrets"], 1, "{report}");
    assert_eq!(report["segments"], 1);
    let restored = fresh.open().await;
    assert_eq!(
        value(&restored, "shop/db", "password").await.unwrap(),
        b"from-the-cli"
    );
}

#[tokio::test]
async fn a_restore_drill_rebuilds_in_memory_and_agrees_with_the_device_until_it_does_not() {
    let Some(s3) = S3Server::start() else { return };
    let bucket = s3_bucket(&s3, "drills");
    let recovery = RecoverySecretKey::generate().unwrap();
    let primary = start_primary("arc-drill", 1).await;
    let root = ArchiveRoot::new(DEVICE, "a1").unwrap();
    let mut archiver = archiver(&bucket, &primary, &recovery);
    for i in 0..20u8 {
        put(&primary, &format!("shop/s{i}"), &[("v", &[i; 16])]).await;
    }
    archiver.step(&primary.agent).await.unwrap();
    put(&primary, "shop/s1", &[("v", b"changed")]).await;
    archiver.step(&primary.agent).await.unwrap();
    // The device moves on after the archived point: still verified.
    put(&primary, "shop/s2", &[("v", b"not archived yet")]).await;

    let key = TokenArchiveKey::new(primary.store.clone(), ARCHIVE_KEY_LABEL);
    let live = primary.store.manifest().await.unwrap();
    let report = hsm_secrets::archive::drill::verify(&bucket, &root, &key, &live)
        .await
        .unwrap();
    assert!(report.verified(), "{report:?}");
    assert_eq!(report.secrets, 20);
    assert_eq!(report.sequence + 1, primary.store.latest_sequence());

    // Against another device's content the drill fails, naming the paths.
    let other = start_primary("arc-drill-other", 1).await;
    put(&other, "shop/s0", &[("v", &[9; 16])]).await;
    let live = other.store.manifest().await.unwrap();
    let report = hsm_secrets::archive::drill::verify(&bucket, &root, &key, &live)
        .await
        .unwrap();
    assert!(!report.verified());
    assert!(
        report.mismatches.iter().any(|m| m.starts_with("shop/s0")),
        "{report:?}"
    );
}

#[tokio::test]
async fn retention_deletes_only_what_no_point_in_the_window_needs() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_) = TestToken::new("arc-retention-probe") else {
        return;
    };
    let bucket = Bucket::open(&BucketConfig {
        url: format!("file://{}", dir.path().join("bucket").display()),
        ..BucketConfig::default()
    })
    .unwrap();
    let recovery = RecoverySecretKey::generate().unwrap();
    let primary = start_primary("arc-retention", 1).await;
    let root = ArchiveRoot::new(DEVICE, "a1").unwrap();
    let mut first = archiver(&bucket, &primary, &recovery);
    first.step(&primary.agent).await.unwrap();
    for i in 0..2u8 {
        put(&primary, &format!("shop/s{i}"), &[("v", &[i; 4])]).await;
        first.step(&primary.agent).await.unwrap();
    }
    let before_second_base = hsm_secrets::archive::archiver::now_millis();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // A base is due at once, and the window keeps only what points from now on need.
    let mut second = Archiver::new(
        ArchiverConfig {
            root: root.clone(),
            segment_interval: Duration::from_millis(100),
            base_interval: Duration::ZERO,
            retention: Some(Duration::ZERO),
        },
        bucket.clone(),
        vec![Arc::new(recovery.public()) as Arc<dyn KeyWrap>],
    );
    assert!(matches!(
        second.step(&primary.agent).await.unwrap(),
        Step::Base { .. }
    ));
    let left = bucket.list("").await.unwrap();
    assert_eq!(left.len(), 1, "only the new base: {left:?}");
    let report = restore(
        &bucket,
        &root,
        &recovery,
        Target::Latest,
        &empty_token("arc-ret-t").await,
        false,
    )
    .await
    .unwrap();
    assert_eq!(report.secrets, 2);
    let error = restore(
        &bucket,
        &root,
        &recovery,
        Target::Time(before_second_base),
        &empty_token("arc-ret-old").await,
        false,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, ArchiveError::NothingToRestore(_)),
        "{error}"
    );
}

/// An object store whose PUTs fail from a chosen one on, as if the archiver's process
/// died while uploading: the object is not there.
#[derive(Debug)]
struct Crashing {
    inner: Arc<dyn object_store::ObjectStore>,
    puts: std::sync::atomic::AtomicUsize,
    fail_at: usize,
}

impl std::fmt::Display for Crashing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "crashing({})", self.inner)
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for Crashing {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        let n = self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n >= self.fail_at {
            return Err(object_store::Error::Generic {
                store: "crashing",
                source: "the archiver died during the upload".into(),
            });
        }
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &object_store::path::Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
    ) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[tokio::test]
async fn an_archiver_killed_at_any_upload_leaves_a_restorable_archive_that_catches_up() {
    let Some(_) = TestToken::new("arc-crash-probe") else {
        return;
    };
    let recovery = RecoverySecretKey::generate().unwrap();
    let root = ArchiveRoot::new(DEVICE, "a1").unwrap();
    // Each run dies at its k-th upload, is restarted from nothing, and catches up; the
    // writes never stop. Uploads are a base then segments, or (every base due) only bases.
    let runs = (0..4)
        .map(|k| (k, Duration::from_secs(3600)))
        .chain((1..3).map(|k| (k, Duration::ZERO)));
    for (fail_at, doomed_base_interval) in runs {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let url = format!("file://{}", dir.path().display());
        let primary = start_primary(
            &format!("arc-crash-{fail_at}-{}", doomed_base_interval.as_secs()),
            1,
        )
        .await;
        let crashing = Bucket::from_store(
            Arc::new(Crashing {
                inner: local.clone(),
                puts: Default::default(),
                fail_at,
            }),
            url.clone(),
        );
        let config = |base_interval| ArchiverConfig {
            root: root.clone(),
            segment_interval: Duration::from_millis(100),
            base_interval,
            retention: None,
        };
        let keys = || vec![Arc::new(recovery.public()) as Arc<dyn KeyWrap>];
        let mut doomed = Archiver::new(config(doomed_base_interval), crashing, keys());
        let mut died = false;
        for i in 0..4u8 {
            put(&primary, &format!("shop/s{i}"), &[("v", &[i; 8])]).await;
            if doomed.step(&primary.agent).await.is_err() {
                died = true;
                break;
            }
        }
        assert!(
            died || fail_at >= 5,
            "run {fail_at} never reached its crash"
        );
        // More acknowledged writes while nothing archives.
        put(&primary, "shop/while-down", &[("v", b"x")]).await;
        // A new process: no memory of the old one, only the bucket.
        let healthy = Bucket::from_store(local.clone(), url);
        let mut restarted =
            Archiver::new(config(Duration::from_secs(3600)), healthy.clone(), keys());
        let mut steps = 0;
        while !matches!(
            restarted.step(&primary.agent).await.unwrap(),
            Step::UpToDate { .. }
        ) {
            steps += 1;
            assert!(steps < 10, "run {fail_at}: never caught up");
        }
        let target = empty_token(&format!(
            "arc-crash-t{fail_at}-{}",
            doomed_base_interval.as_secs()
        ))
        .await;
        let report = restore(&healthy, &root, &recovery, Target::Latest, &target, false)
            .await
            .unwrap();
        assert!(report.stopped.is_none(), "run {fail_at}: {report:?}");
        assert_eq!(
            report.sequence,
            primary.store.latest_sequence(),
            "run {fail_at}"
        );
        let live = primary.store.manifest().await.unwrap();
        let restored = target.manifest().await.unwrap();
        let key = |m: &[hsm_secrets::hsm::ManifestEntry]| -> Vec<(String, u64)> {
            m.iter()
                .filter(|e| !e.deleted)
                .map(|e| (e.path.to_string(), e.version))
                .collect()
        };
        assert_eq!(
            key(&restored),
            key(&live),
            "run {fail_at}: nothing acknowledged is missing"
        );
    }
}

#[tokio::test]
async fn a_damaged_newest_base_is_skipped_for_the_one_before_it_and_said() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_) = TestToken::new("arc-fallback-probe") else {
        return;
    };
    let bucket = Bucket::open(&BucketConfig {
        url: format!("file://{}", dir.path().join("bucket").display()),
        ..BucketConfig::default()
    })
    .unwrap();
    let recovery = RecoverySecretKey::generate().unwrap();
    let primary = start_primary("arc-fallback", 1).await;
    let root = ArchiveRoot::new(DEVICE, "a1").unwrap();
    let mut first = archiver(&bucket, &primary, &recovery);
    first.step(&primary.agent).await.unwrap();
    let first_point = put(&primary, "shop/a", &[("v", b"one")]).await;
    first.step(&primary.agent).await.unwrap();
    put(&primary, "shop/b", &[("v", b"two")]).await;
    let mut second = Archiver::new(
        ArchiverConfig {
            root: root.clone(),
            segment_interval: Duration::from_millis(100),
            base_interval: Duration::ZERO,
            retention: None,
        },
        bucket.clone(),
        vec![Arc::new(recovery.public()) as Arc<dyn KeyWrap>],
    );
    let Step::Base { name, .. } = second.step(&primary.agent).await.unwrap() else {
        panic!("no second base");
    };
    let mut bytes = bucket.get(&name).await.unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 1;
    bucket.put(&name, bytes).await.unwrap();
    let target = empty_token("arc-fallback-t").await;
    let report = restore(&bucket, &root, &recovery, Target::Latest, &target, false)
        .await
        .unwrap();
    assert_eq!(report.sequence, first_point, "{report:?}");
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert!(
        report.skipped[0].contains(&name) && report.skipped[0].contains("authentication failed")
    );
}

/// The cluster path end to end: `spec.backup` on the HSMDevice, the controller's rounds
/// over gRPC with mutual TLS, the node's supervisor reading the mounted Secret, moto as
/// the bucket. A Secret that is not mounted is a condition naming the file; fixed, the
/// archive catches up, a drill asked for by annotation verifies it (condition, Event),
/// and a base asked for is taken.
#[tokio::test]
async fn the_controller_archives_per_spec_backup_and_verifies_on_demand() {
    use hsm_secrets::archive::Supervisor;
    use hsm_secrets::controller::{ControllerMetrics, DeviceController, GrpcAgents};
    use hsm_secrets::crd::{
        BACKUP_NOW_ANNOTATION, BACKUP_VERIFY_ANNOTATION, BackupSpec, HSMDevice, RESTORE_ANNOTATION,
    };
    use hsm_secrets::failover::{FencingConfig, PlanConfig};
    use hsm_secrets::mirror::Peer;
    use hsm_secrets::state::{FileState, StateStore};

    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket("spec-backup");
    let recovery = RecoverySecretKey::generate().unwrap();
    let (mounts, secret) = archive_secret(&recovery);

    let token = TestToken::new("spec-primary").unwrap();
    let store = Arc::new(token.open().await);
    store.archive_key_generate(ARCHIVE_KEY_LABEL).await.unwrap();
    let pki = tempfile::tempdir().unwrap();
    let files = generate_pki(pki.path(), &["n1", "controller"]).unwrap();
    let tls = AgentTls::from_files(files.files("n1").unwrap()).unwrap();
    let agent = Agent::start(
        AgentConfig::new("n1", tls).with_device(DEVICE),
        store.clone(),
    )
    .await;
    let key = Arc::new(TokenArchiveKey::new(store.clone(), ARCHIVE_KEY_LABEL));
    agent.set_archive_control(Arc::new(Supervisor::new(
        agent.clone(),
        DEVICE,
        key,
        mounts.path(),
    )));
    let listener = hsm_secrets::mirror::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let endpoint = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(hsm_secrets::mirror::serve(
        agent.clone(),
        listener,
        std::future::pending(),
    ));

    let dir = tempfile::tempdir().unwrap();
    let state = Arc::new(FileState::open(dir.path()).unwrap());
    let mut device = kit::resources::device("prod-hsm")
        .mirrored(Some("n1"), &[])
        .sync_interval(300)
        .auto_failover(2)
        .build();
    device.spec.backup = Some(BackupSpec {
        url: "s3://spec-backup/site-a".into(),
        endpoint: Some(s3.endpoint.clone()),
        region: None,
        credentials_secret: "not-mounted".into(),
        archive_name: None,
        segment_interval_seconds: Some(1),
        base_interval_minutes: None,
        retention_days: None,
        verify_interval_minutes: Some(0),
        lag_alert_seconds: None,
    });
    state.apply_device(&device).unwrap();
    let lease = Duration::from_secs(30);
    let agents = Arc::new(
        GrpcAgents::new(
            &[Peer {
                node: "n1".into(),
                endpoint,
            }],
            &AgentTls::from_files(files.files("controller").unwrap()).unwrap(),
            Duration::from_secs(5),
            lease,
        )
        .unwrap(),
    );
    let config = PlanConfig {
        fencing: FencingConfig {
            lease_duration: lease,
            safety_margin: Duration::from_millis(500),
        },
        ..PlanConfig::default()
    };
    let ctl = DeviceController::new(state.clone(), agents, config, ControllerMetrics::default());
    let current = || async { state.get_device(DEVICE).await.unwrap().unwrap() };
    let condition = |d: &HSMDevice, type_: &str| {
        d.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_).cloned())
    };
    // Rounds until `done` holds of the device, or fails after 60 s naming `what`.
    macro_rules! rounds_until {
        ($what:expr, $done:expr) => {{
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let d = current().await;
                ctl.reconcile(&d).await.unwrap();
                let d = current().await;
                if $done(&d) {
                    break d;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{}: {:#?}",
                    $what,
                    d.status
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }};
    }

    // The Secret is not mounted: said, with the file and the fix; writes go on.
    let d = rounds_until!("a configuration error", |d: &HSMDevice| {
        condition(d, "BackupArchived").is_some_and(|c| c.reason == "ConfigurationError")
    });
    let message = condition(&d, "BackupArchived").unwrap().message;
    assert!(
        message.contains("not-mounted/recovery.pub") && message.contains("mount it"),
        "{message}"
    );
    let epoch = agent.epoch();
    for i in 0..5 {
        let p = path(&format!("shop/s{i}"));
        agent
            .put(&p, data(&[("v", b"1")]), Expect::Any, epoch)
            .await
            .unwrap();
    }

    // Mounted: the archive catches up with every acknowledged write.
    let mut fixed = current().await;
    fixed.spec.backup.as_mut().unwrap().credentials_secret = "hsm-archive".into();
    state.apply_device(&fixed).unwrap();
    let written = store.latest_sequence();
    let d = rounds_until!("the archive catching up", |d: &HSMDevice| {
        let b = d.status.as_ref().and_then(|s| s.backup.clone());
        condition(d, "BackupArchived").is_some_and(|c| c.status == "True")
            && b.is_some_and(|b| b.archived_sequence >= written && !b.bases.is_empty())
    });
    let backup = d.status.clone().unwrap().backup.unwrap();
    assert_eq!(backup.node.as_deref(), Some("n1"));
    assert_eq!(backup.lag_sequences, 0);
    assert_eq!(
        condition(&d, "BackupVerified").unwrap().status,
        "Unknown",
        "no drill asked for yet (verifyIntervalMinutes 0)"
    );

    // `kubectl hsm backup verify` and `backup now`, as annotations.
    let mut asked = current().await;
    let annotations = asked.metadata.annotations.get_or_insert_default();
    annotations.insert(
        BACKUP_VERIFY_ANNOTATION.into(),
        "2026-12-07T08:00:00Z".into(),
    );
    annotations.insert(BACKUP_NOW_ANNOTATION.into(), "2026-12-07T08:00:01Z".into());
    state.apply_device(&asked).unwrap();
    let bases_before = backup.bases.len();
    let d = rounds_until!("the drill and the base", |d: &HSMDevice| {
        let b = d.status.as_ref().and_then(|s| s.backup.clone());
        b.is_some_and(|b| {
            b.last_verified
                .as_ref()
                .is_some_and(|v| v.request == "2026-12-07T08:00:00Z")
                && b.last_base_request.as_deref() == Some("2026-12-07T08:00:01Z")
                && b.bases.len() > bases_before
        })
    });
    let drill = d
        .status
        .clone()
        .unwrap()
        .backup
        .unwrap()
        .last_verified
        .unwrap();
    assert!(drill.verified, "{drill:?}");
    assert!(drill.sequence >= written && drill.secrets == 5, "{drill:?}");
    let verified = condition(&d, "BackupVerified").unwrap();
    assert_eq!(
        (verified.status.as_str(), verified.reason.as_str()),
        ("True", "DrillPassed")
    );
    let events = state.events().unwrap();
    assert!(
        events.iter().any(|e| e.event.reason == "BackupVerified"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.event.reason == "BackupFailing" && e.event.message.contains("not-mounted")),
        "{events:?}"
    );
    // The failover planner's own conditions are still there beside the archive's.
    assert!(condition(&d, "Ready").is_some());

    // `kubectl hsm restore`: refused on a device holding secrets unless forced.
    let restore_to = |d: &mut HSMDevice, id: &str, force: bool| {
        let value = serde_json::json!({"id": id, "toSequence": written, "force": force});
        d.metadata
            .annotations
            .get_or_insert_default()
            .insert(RESTORE_ANNOTATION.into(), value.to_string());
    };
    let mut asked = current().await;
    restore_to(&mut asked, "r1", false);
    state.apply_device(&asked).unwrap();
    let d = rounds_until!("the refused restore", |d: &HSMDevice| {
        d.status
            .as_ref()
            .and_then(|s| s.backup.as_ref())
            .and_then(|b| b.last_restore.as_ref())
            .is_some_and(|r| r.request == "r1")
    });
    let refused = d.status.unwrap().backup.unwrap().last_restore.unwrap();
    assert!(!refused.succeeded);
    assert!(
        refused
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("already holds 5 secrets"),
        "{refused:?}"
    );

    // Writes after the point, then a forced restore to it: the device equals the point
    // again, through the primary (the sequence moves on), and the archive follows.
    for i in 5..8 {
        agent
            .put(
                &path(&format!("shop/s{i}")),
                data(&[("v", b"2")]),
                Expect::Any,
                epoch,
            )
            .await
            .unwrap();
    }
    agent
        .put(
            &path("shop/s0"),
            data(&[("v", b"changed")]),
            Expect::Any,
            epoch,
        )
        .await
        .unwrap();
    let before_restore = store.latest_sequence();
    let mut asked = current().await;
    restore_to(&mut asked, "r2", true);
    state.apply_device(&asked).unwrap();
    let d = rounds_until!("the forced restore", |d: &HSMDevice| {
        d.status
            .as_ref()
            .and_then(|s| s.backup.as_ref())
            .and_then(|b| b.last_restore.as_ref())
            .is_some_and(|r| r.request == "r2")
    });
    let restored = d.status.unwrap().backup.unwrap().last_restore.unwrap();
    assert!(restored.succeeded, "{restored:?}");
    assert_eq!((restored.sequence, restored.secrets), (written, 5));
    for i in 0..5 {
        assert_eq!(
            value(store.as_ref(), &format!("shop/s{i}"), "v")
                .await
                .as_deref(),
            Some(&b"1"[..]),
            "shop/s{i} is back at the point"
        );
    }
    for i in 5..8 {
        assert_eq!(
            value(store.as_ref(), &format!("shop/s{i}"), "v").await,
            None
        );
    }
    assert!(
        store.latest_sequence() > before_restore,
        "restored as new writes"
    );
    let events = state.events().unwrap();
    assert!(
        events.iter().any(|e| e.event.reason == "RestoreFailed"
            && e.event.message.contains("already holds")),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.event.reason == "Restored"),
        "{events:?}"
    );
    // The archive follows: its newest point, opened with the offline recovery key, is the
    // restored device.
    let after = store.latest_sequence();
    let bucket = Bucket::open(&BucketConfig {
        url: "s3://spec-backup/site-a".into(),
        endpoint: Some(s3.endpoint.clone()),
        region: None,
        credentials_dir: Some(secret.clone()),
        timeout: Duration::from_secs(10),
    })
    .unwrap();
    let root = ArchiveRoot::new(DEVICE, "main").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let newest = loop {
        ctl.reconcile(&current().await).await.unwrap();
        let rebuilt =
            hsm_secrets::archive::restore::rebuild(&bucket, &root, &recovery, Target::Latest)
                .await
                .unwrap();
        if rebuilt.report.sequence >= after {
            break rebuilt;
        }
        assert!(std::time::Instant::now() < deadline, "{:?}", rebuilt.report);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let live: Vec<String> = newest
        .records
        .values()
        .filter(|r| !r.is_deleted())
        .map(|r| r.path.to_string())
        .collect();
    assert_eq!(
        live,
        ["shop/s0", "shop/s1", "shop/s2", "shop/s3", "shop/s4"]
    );
}

/// A wiped or replaced token (empty) promoted over an archive that holds the device must
/// not write its empty base: it would become the newest point. The archiver says to
/// restore first, writes nothing, and the device keeps taking writes.
#[tokio::test]
async fn an_empty_token_never_writes_an_empty_base_over_a_real_archive() {
    let Some(s3) = S3Server::start() else { return };
    let bucket = s3_bucket(&s3, "wiped");
    let recovery = RecoverySecretKey::generate().unwrap();
    let root = ArchiveRoot::new(DEVICE, "a1").unwrap();
    let old = start_primary("arc-wiped-old", 1).await;
    let mut old_archiver = archiver(&bucket, &old, &recovery);
    put(&old, "shop/db", &[("password", b"kept")]).await;
    old_archiver.step(&old.agent).await.unwrap();
    let before = bucket.list(&root.prefix()).await.unwrap();

    let token = TestToken::new("arc-wiped-new").unwrap();
    let store = Arc::new(token.open().await);
    copy_archive_key(&old.store, &store).await;
    let wiped = primary_on(store, "n2", 2).await;
    let mut wiped_archiver = archiver(&bucket, &wiped, &recovery);
    let error = wiped_archiver.step(&wiped.agent).await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("holds no change")
            && text.contains("up to sequence 1")
            && text.contains("restore it first")
            && text.contains("archiveName"),
        "{text}"
    );
    assert_eq!(bucket.list(&root.prefix()).await.unwrap(), before);
    let rebuilt = hsm_secrets::archive::restore::rebuild(&bucket, &root, &recovery, Target::Latest)
        .await
        .unwrap();
    assert_eq!(rebuilt.report.secrets, 1, "the real point stays the newest");

    // Once it holds a change (restored, or a first write), it archives again.
    put(&wiped, "shop/new", &[("k", b"v")]).await;
    assert!(matches!(
        wiped_archiver.step(&wiped.agent).await.unwrap(),
        Step::Base { .. }
    ));
}

/// One site of a device spread over two clusters: its own token (holding the device's
/// archive key), its primary agent and the node's archive supervisor, driven as the
/// controller drives it (an Archive call per round).
struct Site {
    name: &'static str,
    agent: Agent,
    store: Arc<Pkcs11Store>,
    supervisor: Arc<hsm_secrets::archive::Supervisor>,
    _pki: tempfile::TempDir,
}

impl Site {
    async fn start(
        name: &'static str,
        device: &str,
        store: Arc<Pkcs11Store>,
        mounts: &std::path::Path,
    ) -> Site {
        let primary = primary_on(store.clone(), name, 1).await;
        let agent = primary.agent.clone();
        let key = Arc::new(TokenArchiveKey::new(store.clone(), ARCHIVE_KEY_LABEL));
        let supervisor = Arc::new(hsm_secrets::archive::Supervisor::new(
            agent.clone(),
            device,
            key,
            mounts,
        ));
        Site {
            name,
            agent,
            store,
            supervisor,
            _pki: primary._pki,
        }
    }

    async fn round(&self, request: &ArchiveRequest) -> ArchiveReport {
        self.supervisor.handle(request.clone()).await
    }

    async fn write(&self, p: &str, v: &[u8]) -> Result<u64, String> {
        self.agent
            .put(&path(p), data(&[("v", v)]), Expect::Any, self.agent.epoch())
            .await
            .map(|o| o.version)
            .map_err(|e| e.to_string())
    }
}

/// Rounds of `site` every 100 ms until `done` holds of its answer (30 s at most).
async fn rounds_until(
    site: &Site,
    request: &ArchiveRequest,
    what: &str,
    done: impl Fn(&ArchiveReport) -> bool,
) -> ArchiveReport {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = site.round(request).await;
        if done(&answer) {
            return answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: {what}: {answer:#?}",
            site.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `url` on the test's S3 server, opened with the mounted `hsm-archive` Secret.
fn site_bucket(s3: &S3Server, url: &str) -> BucketRef {
    BucketRef {
        url: url.into(),
        endpoint: Some(s3.endpoint.clone()),
        region: None,
        credentials_secret: "hsm-archive".into(),
        archive_name: "main".into(),
    }
}

/// A site that archives into `bucket` every 200 ms (a base only when asked).
fn site_backup(bucket: BucketRef) -> BackupConfig {
    BackupConfig {
        bucket,
        segment_interval: Duration::from_millis(200),
        base_interval: Duration::from_secs(3600),
        retention: None,
    }
}

/// Site `name`, following `device`'s archive in `bucket` while passive.
fn following(name: &str, lease: Duration, bucket: BucketRef, device: &str) -> SiteConfig {
    SiteConfig {
        name: name.into(),
        lease,
        follow: Some(FollowConfig {
            bucket,
            device: device.into(),
        }),
    }
}

/// Site `name`, active.
fn active(name: &str, lease: Duration) -> SiteConfig {
    SiteConfig {
        name: name.into(),
        lease,
        follow: None,
    }
}

/// Two sites share one real S3 bucket: the active site archives and the passive one
/// follows it (reads work there, writes are refused naming the active site). A person
/// promotes the passive site while the active one still takes writes: the fence stops
/// the old site at its next step, and the history of every acknowledged write shows no
/// write acknowledged by both sites after the fence, every write up to the fence point
/// present at the new site and the rest counted as lost. A second promotion over the
/// same archive fails naming the first.
#[tokio::test]
async fn a_passive_site_follows_the_archive_and_a_manual_promotion_fences_the_active_one() {
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket("sites");
    let recovery = RecoverySecretKey::generate().unwrap();
    let (mounts, _) = archive_secret(&recovery);
    let lease = Duration::from_millis(1500);

    // Site a: the device's tokens there hold the archive key; b and c receive it by the
    // ceremony (token to token, wrapped).
    let a_token = TestToken::new("site-a").unwrap();
    let a_store = Arc::new(a_token.open().await);
    a_store
        .archive_key_generate(ARCHIVE_KEY_LABEL)
        .await
        .unwrap();
    let b_token = TestToken::new("site-b").unwrap();
    let b_store = Arc::new(b_token.open().await);
    copy_archive_key(&a_store, &b_store).await;
    let c_token = TestToken::new("site-c").unwrap();
    let c_store = Arc::new(c_token.open().await);
    copy_archive_key(&a_store, &c_store).await;
    let a = Site::start("a", "prod-hsm", a_store, mounts.path()).await;
    let b = Site::start("b", "prod-hsm-b", b_store, mounts.path()).await;
    let c = Site::start("c", "prod-hsm-c", c_store, mounts.path()).await;

    let bucket = || site_bucket(&s3, "s3://sites/dr");
    let follow = |site: &str| following(site, lease, bucket(), "prod-hsm");
    let a_request = ArchiveRequest {
        backup: Some(site_backup(bucket())),
        site: Some(active("a", lease)),
        ..Default::default()
    };
    let b_request = ArchiveRequest {
        backup: Some(site_backup(bucket())),
        site: Some(follow("b")),
        ..Default::default()
    };
    let c_request = ArchiveRequest {
        site: Some(follow("c")),
        ..Default::default()
    };

    // Until its first look at the bucket the active site takes no write.
    let answer = a.round(&a_request).await;
    assert_eq!(answer.site.unwrap().role, SiteRole::Active);
    let early = a.write("shop/early", b"x").await;
    if let Err(e) = &early {
        assert!(e.contains("site lease"), "{e}");
    }
    rounds_until(&a, &a_request, "a's first clean check", |_| {
        a.agent.site_gate().admit(std::time::Instant::now()).is_ok()
    })
    .await;
    for i in 0..5 {
        a.write(&format!("shop/s{i}"), b"1").await.unwrap();
    }

    // The passive sites follow; reads work there, writes are refused naming the active one.
    b.round(&b_request).await;
    c.round(&c_request).await;
    let written = a.store.latest_sequence();
    let answer = rounds_until(&b, &b_request, "b catching up", |r| {
        r.site
            .as_ref()
            .is_some_and(|s| s.applied_sequence >= written && s.lag_ms == 0)
    })
    .await;
    assert_eq!(answer.site.unwrap().role, SiteRole::Passive);
    rounds_until(&c, &c_request, "c catching up", |r| {
        r.site
            .as_ref()
            .is_some_and(|s| s.applied_sequence >= written)
    })
    .await;
    assert_eq!(
        value(b.store.as_ref(), "shop/s4", "v").await.as_deref(),
        Some(&b"1"[..])
    );
    let refused = b.write("shop/at-b", b"no").await.unwrap_err();
    assert!(
        refused.contains("site b is passive")
            && refused.contains("prod-hsm")
            && refused.contains("kubectl hsm site promote"),
        "{refused}"
    );
    assert!(
        b.agent.get(&path("shop/s0")).await.is_ok(),
        "reads on the passive site"
    );

    // A new base at the active site (`kubectl hsm backup now`) starts a new chain there;
    // the passive site follows onto it.
    let mut base_now = a_request.clone();
    base_now.ask.base_request = Some("b1".into());
    rounds_until(&a, &base_now, "a's new base", |r| {
        r.base_done.as_deref() == Some("b1")
    })
    .await;
    a.write("shop/after-base", b"2").await.unwrap();
    let after_base = a.store.latest_sequence();
    rounds_until(&a, &a_request, "a archiving", |r| {
        r.archived_sequence >= after_base
    })
    .await;
    rounds_until(&b, &b_request, "b following the new chain", |r| {
        r.site
            .as_ref()
            .is_some_and(|s| s.applied_sequence >= after_base && s.error.is_none())
    })
    .await;
    assert_eq!(
        value(b.store.as_ref(), "shop/after-base", "v")
            .await
            .as_deref(),
        Some(&b"2"[..])
    );

    // A writer at site a records every acknowledged write (sequence, instant).
    let a_writer = {
        let agent = a.agent.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..400 {
                let p = path(&format!("shop/w{i}"));
                if let Ok(o) = agent
                    .put(&p, data(&[("v", b"w")]), Expect::Any, agent.epoch())
                    .await
                {
                    acked.push((o.version, std::time::Instant::now(), i));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A person promotes b while a is alive and writing.
    let mut promote = b_request.clone();
    promote.ask.promote_request = Some("p1".into());
    let a_rounds = {
        let (supervisor, request) = (a.supervisor.clone(), a_request.clone());
        tokio::spawn(async move {
            for _ in 0..80 {
                supervisor.handle(request.clone()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // The controller keeps calling during the promotion; b takes no write before the
    // old site's lease ran out, whatever those calls do.
    let mut b_successes = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let promoted = loop {
        let answer = b.round(&promote).await;
        if answer
            .site
            .as_ref()
            .is_some_and(|s| s.promotion_done.as_deref() == Some("p1"))
        {
            break answer;
        }
        if b.write("shop/during-promotion", b"x").await.is_ok() {
            b_successes.push(std::time::Instant::now());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b's promotion: {answer:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let site = promoted.site.unwrap();
    assert_eq!(site.site_epoch, 1, "the first promotion is site epoch 1");
    // b takes writes once its own archiver checked its archive.
    rounds_until(&b, &b_request, "b active", |_| {
        b.agent.site_gate().admit(std::time::Instant::now()).is_ok()
    })
    .await;
    let b_first_ack = std::time::Instant::now();
    let b_version = b.write("shop/at-b", b"yes").await.unwrap();
    assert!(b_version > written);

    // a saw the fence: it refuses writes, names b, and counts what it took after the point.
    let a_answer = rounds_until(&a, &a_request, "a fenced", |r| {
        r.site.as_ref().is_some_and(|s| s.role == SiteRole::Fenced)
    })
    .await;
    let a_site = a_answer.site.unwrap();
    assert_eq!(a_site.fenced_by.as_deref(), Some("b"));
    let refused = a.write("shop/late", b"no").await.unwrap_err();
    assert!(
        refused.contains("site b was promoted") && refused.contains("rejoin"),
        "{refused}"
    );
    a_rounds.await.unwrap();
    let acked = a_writer.await.unwrap();
    assert!(!acked.is_empty());

    // The history: no write acknowledged at a after b's first acknowledged write; every
    // write a acknowledged up to the fence point is at b; the rest are a's lost writes.
    let last_a_ack = acked.iter().map(|(_, at, _)| *at).max().unwrap();
    let b_first_ack = b_successes.into_iter().min().unwrap_or(b_first_ack);
    assert!(
        last_a_ack < b_first_ack,
        "a acknowledged a write after b took writes"
    );
    let fence_point = a_site.fence_sequence;
    let mut at_b = 0;
    for (version, _, i) in &acked {
        let there = value(b.store.as_ref(), &format!("shop/w{i}"), "v")
            .await
            .is_some();
        if *version <= fence_point {
            assert!(
                there,
                "shop/w{i} (version {version}) is up to the fence point but not at b"
            );
            at_b += 1;
        }
    }
    let lost = acked.iter().filter(|(v, _, _)| *v > fence_point).count() as u64;
    assert!(
        a_site.lost_writes >= lost,
        "{} lost writes counted, {lost} seen",
        a_site.lost_writes
    );
    assert!(at_b > 0, "some of a's writes reached b before the fence");

    // c, promoted over the same archive afterwards, is refused naming b.
    let mut promote_c = c_request.clone();
    promote_c.ask.promote_request = Some("p2".into());
    let refused = rounds_until(&c, &promote_c, "c's refused promotion", |r| {
        r.site.as_ref().is_some_and(|s| s.error.is_some())
    })
    .await;
    let error = refused.site.unwrap().error.unwrap_or_default();
    assert!(
        error.contains("site b was promoted first") && error.contains("stays passive"),
        "{error}"
    );
    assert!(
        c.write("shop/at-c", b"no").await.is_err(),
        "c stays passive"
    );
}

/// What a passive site is pointed at wrongly says so, naming the fix; two passive sites
/// promoted at the same moment over one archive: one wins, the other stays passive and
/// names the winner.
#[tokio::test]
async fn passive_sites_name_bad_archives_and_concurrent_promotions_have_one_winner() {
    let Some(s3) = S3Server::start() else { return };
    s3.create_bucket("sites-bad");
    let recovery = RecoverySecretKey::generate().unwrap();
    let (mounts, _) = archive_secret(&recovery);
    let a_store = Arc::new(TestToken::new("bad-a").unwrap().open().await);
    a_store
        .archive_key_generate(ARCHIVE_KEY_LABEL)
        .await
        .unwrap();
    let b_store = Arc::new(TestToken::new("bad-b").unwrap().open().await);
    copy_archive_key(&a_store, &b_store).await;
    let c_store = Arc::new(TestToken::new("bad-c").unwrap().open().await);
    copy_archive_key(&a_store, &c_store).await;
    // A token that never received the device's archive key.
    let stranger_store = Arc::new(TestToken::new("bad-stranger").unwrap().open().await);
    stranger_store
        .archive_key_generate(ARCHIVE_KEY_LABEL)
        .await
        .unwrap();
    let a = Site::start("a", "prod-hsm", a_store, mounts.path()).await;
    let b = Site::start("b", "prod-hsm-b", b_store, mounts.path()).await;
    let c = Site::start("c", "prod-hsm-c", c_store, mounts.path()).await;
    let stranger = Site::start("s", "prod-hsm-s", stranger_store, mounts.path()).await;
    let lease = Duration::from_secs(1);
    let bucket = || site_bucket(&s3, "s3://sites-bad/dr");
    let follow = |site: &str, device: &str| ArchiveRequest {
        site: Some(following(site, lease, bucket(), device)),
        ..Default::default()
    };
    let error_of = |r: &ArchiveReport| {
        r.config_error
            .clone()
            .or_else(|| r.site.as_ref().and_then(|s| s.error.clone()))
            .unwrap_or_default()
    };

    // No archive yet, or the wrong device: nothing there, named.
    let r = rounds_until(&b, &follow("b", "prod-hsm"), "no archive", |r| {
        !error_of(r).is_empty()
    })
    .await;
    assert!(
        error_of(&r).contains("holds no object of device prod-hsm"),
        "{}",
        error_of(&r)
    );
    // Its own archive.
    let r = b.round(&follow("b", "prod-hsm-b")).await;
    assert!(
        error_of(&r).contains("names this device"),
        "{}",
        error_of(&r)
    );

    // The active site archives; a site without the device's archive key cannot open it.
    let a_request = ArchiveRequest {
        backup: Some(site_backup(bucket())),
        site: Some(active("a", lease)),
        ..Default::default()
    };
    rounds_until(&a, &a_request, "a archiving", |r| !r.bases.is_empty()).await;
    a.write("shop/s0", b"1").await.unwrap();
    let r = rounds_until(&stranger, &follow("s", "prod-hsm"), "wrong keys", |r| {
        error_of(r).contains("does not unwrap")
    })
    .await;
    assert!(error_of(&r).contains("key ceremony"), "{}", error_of(&r));
    assert_eq!(
        value(stranger.store.as_ref(), "shop/s0", "v").await,
        None,
        "nothing applied"
    );

    // b and c follow; both are promoted at once: one fence wins.
    rounds_until(&b, &follow("b", "prod-hsm"), "b following", |r| {
        r.site
            .as_ref()
            .is_some_and(|s| s.error.is_none() && s.lag_ms == 0)
    })
    .await;
    rounds_until(&c, &follow("c", "prod-hsm"), "c following", |r| {
        r.site
            .as_ref()
            .is_some_and(|s| s.error.is_none() && s.lag_ms == 0)
    })
    .await;
    let mut promote_b = follow("b", "prod-hsm");
    promote_b.ask.promote_request = Some("pb".into());
    let mut promote_c = follow("c", "prod-hsm");
    promote_c.ask.promote_request = Some("pc".into());
    let (rb, rc) = tokio::join!(b.round(&promote_b), c.round(&promote_c));
    let _ = (rb, rc);
    let done = |r: &ArchiveReport, id: &str| {
        r.site
            .as_ref()
            .is_some_and(|s| s.promotion_done.as_deref() == Some(id) || s.error.is_some())
    };
    let rb = rounds_until(&b, &promote_b, "b's promotion ends", |r| done(r, "pb")).await;
    let rc = rounds_until(&c, &promote_c, "c's promotion ends", |r| done(r, "pc")).await;
    let (sb, sc) = (rb.site.unwrap(), rc.site.unwrap());
    let winners = [&sb, &sc]
        .iter()
        .filter(|s| s.promotion_done.is_some())
        .count();
    assert_eq!(winners, 1, "exactly one promotion: {sb:?} {sc:?}");
    let (loser, winner) = if sb.promotion_done.is_none() {
        (&sb, "c")
    } else {
        (&sc, "b")
    };
    let loser_error = loser.error.clone().unwrap_or_default();
    assert!(
        loser_error.contains(&format!("site {winner} was promoted first")),
        "{loser_error}"
    );
    assert_eq!(loser.role, SiteRole::Passive);

    // Promoting a site that is not passive is refused, naming why.
    let mut promote_a = a_request.clone();
    promote_a.ask.promote_request = Some("pa".into());
    let r = a.round(&promote_a).await;
    assert!(error_of(&r).contains("is not passive"), "{}", error_of(&r));
}

/// A base of many secrets takes longer than the site lease: the fences are checked on
/// their own timer meanwhile, so the active site keeps taking writes through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_base_does_not_let_the_site_lease_lapse() {
    use hsm_secrets::archive::archiver::SiteGuard;
    use hsm_secrets::mirror::site::SiteGate;
    let Some(s3) = S3Server::start() else { return };
    let bucket = s3_bucket(&s3, "long-base");
    let recovery = RecoverySecretKey::generate().unwrap();
    let primary = start_primary("long-base", 1).await;
    for n in 0..2000 {
        put(&primary, &format!("bulk/s{n}"), &[("v", &[7u8; 64])]).await;
    }
    let lease = Duration::from_millis(240);
    let mut archiver = archiver(&bucket, &primary, &recovery).with_site(SiteGuard {
        site: "site-a".into(),
        lease,
        key: Arc::new(TokenArchiveKey::new(
            primary.store.clone(),
            ARCHIVE_KEY_LABEL,
        )),
        active_since: 0,
    });
    primary.agent.update_site_gate(|_| SiteGate::Active {
        site: "site-a".into(),
        until: None,
    });
    // A client writes every 50 ms while the first step writes the base.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (agent, stop) = (primary.agent.clone(), stop.clone());
        tokio::spawn(async move {
            // From the step's first check on: the lease starts there.
            while matches!(agent.site_gate(), SiteGate::Active { until: None, .. }) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let (mut acknowledged, mut refused) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match agent
                    .put(
                        &path("shop/live"),
                        data(&[("v", b"x")]),
                        Expect::Any,
                        agent.epoch(),
                    )
                    .await
                {
                    Ok(_) => acknowledged += 1,
                    Err(e) => refused.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (acknowledged, refused)
        })
    };
    let started = std::time::Instant::now();
    let step = archiver.step(&primary.agent).await.unwrap();
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (acknowledged, refused) = client.await.unwrap();
    assert!(
        matches!(step, Step::Base { records, .. } if records >= 2000),
        "{step:?}"
    );
    assert!(
        took > lease * 2,
        "the base took {took:?}: too quick to outlast the {lease:?} lease"
    );
    assert!(acknowledged > 0);
    assert!(
        refused.is_empty(),
        "writes refused during a {took:?} base: {refused:?}"
    );
}
