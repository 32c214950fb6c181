//! The node plugin end to end: secrets written to a real SoftHSM token, published through
//! the real CSI server on a Unix socket into real tmpfs volumes.
#![allow(clippy::unwrap_used)]

use crate::kit;
use hsm_secrets_testkit::token_or_skip;
use std::sync::Arc;

use hsm_secrets::hsm::{FaultKind, FaultPlan, FaultyStore, SecretStore};
use hsm_secrets::node::{LocalDevice, StaticCatalog};
use hsm_secrets_csi::source::pod_info;
use kit::node::{
    DEVICE, GID, NAMESPACE, NodeHarness, SERVICE_ACCOUNT, assert_nothing_left, is_mounted,
    mode_and_gid, put, read, visible_files, volume, with_attribute,
};
use tonic::Code;

fn catalog(secrets: &[(&str, &str, &str, &[&str])]) -> Arc<StaticCatalog> {
    Arc::new(StaticCatalog::new(secrets.iter().map(
        |(ns, name, device, accounts)| {
            kit::resources::secret(ns, name)
                .device(device)
                .accounts(accounts)
                .build()
        },
    )))
}

#[tokio::test]
async fn publish_writes_the_secret_with_mode_and_group() {
    let token = token_or_skip!("node-publish");
    let store = Arc::new(token.open().await);
    put(
        store.as_ref(),
        "shop/db",
        &[("username", b"admin"), ("password", b"hunter2\0\xff")],
    )
    .await;
    let h = NodeHarness::with_store(
        catalog(&[(NAMESPACE, "db", DEVICE, &[SERVICE_ACCOUNT])]),
        store,
    )
    .await;
    assert!(h.probe().await, "token open and catalog loaded: ready");

    let target = h.target("uid-1", "secrets");
    h.publish(volume("vol-1", &target, "db")).await.unwrap();
    assert!(is_mounted(&target));
    assert_eq!(visible_files(&target), ["db/password", "db/username"]);
    assert_eq!(read(&target.join("db/username")), b"admin");
    assert_eq!(read(&target.join("db/password")), b"hunter2\0\xff");
    assert_eq!(mode_and_gid(&target.join("db/password")), (0o440, GID));
    assert_eq!(mode_and_gid(&target.join("db/username")), (0o440, GID));

    // The requested mode applies to every file.
    let other = h.target("uid-2", "secrets");
    let request = with_attribute(volume("vol-2", &other, "db"), "fileMode", Some("0400"));
    h.publish(request).await.unwrap();
    assert_eq!(mode_and_gid(&other.join("db/password")), (0o400, GID));

    h.unpublish("vol-1", &target).await.unwrap();
    assert_nothing_left(&target);
    let metrics = h.metrics_text();
    assert!(
        metrics.contains(r#"hsm_secrets_node_publishes_total{operation="publish",outcome="ok"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"hsm_secrets_node_unpublishes_total{outcome="ok"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn two_secrets_share_one_volume() {
    let token = token_or_skip!("node-two");
    let store = Arc::new(token.open().await);
    put(store.as_ref(), "shop/db", &[("password", b"pw")]).await;
    put(
        store.as_ref(),
        "shop/api-key",
        &[("key", b"k"), ("tls.crt", b"c")],
    )
    .await;
    let h = NodeHarness::with_store(
        catalog(&[
            (NAMESPACE, "db", DEVICE, &[]),
            (NAMESPACE, "api-key", DEVICE, &[]),
        ]),
        store,
    )
    .await;
    let target = h.target("uid-1", "secrets");
    h.publish(volume("vol-1", &target, "db, api-key"))
        .await
        .unwrap();
    assert_eq!(
        visible_files(&target),
        ["api-key/key", "api-key/tls.crt", "db/password"]
    );
    assert_eq!(read(&target.join("api-key/tls.crt")), b"c");
    assert_eq!(read(&target.join("db/password")), b"pw");
}

#[tokio::test]
async fn refusals_have_their_codes_and_leave_nothing_mounted() {
    let token = token_or_skip!("node-refuse");
    let store = Arc::new(token.open().await);
    put(store.as_ref(), "shop/db", &[("password", b"pw")]).await;
    put(store.as_ref(), "bank/vault", &[("password", b"bank")]).await;
    put(store.as_ref(), "shop/other-device", &[("k", b"v")]).await;
    let h = NodeHarness::with_store(
        catalog(&[
            (NAMESPACE, "db", DEVICE, &[]),
            (NAMESPACE, "restricted", DEVICE, &["batch", "cron"]),
            (NAMESPACE, "other-device", "backup-hsm", &[]),
            (NAMESPACE, "not-written", DEVICE, &[]),
            ("bank", "vault", DEVICE, &[]),
        ]),
        store,
    )
    .await;
    let target = h.target("uid-1", "secrets");
    let base = |secrets: &str| volume("vol-1", &target, secrets);
    let rows = vec![
        // Another namespace's HSMSecret cannot be named, even when it exists.
        (
            base("bank/vault"),
            Code::PermissionDenied,
            vec!["bank/vault", "own namespace"],
        ),
        (
            base("db,bank/vault"),
            Code::PermissionDenied,
            vec!["bank/vault"],
        ),
        // Without a prefix the name means shop/vault, which does not exist.
        (
            base("vault"),
            Code::NotFound,
            vec!["shop/vault", "create it"],
        ),
        (
            base("restricted"),
            Code::PermissionDenied,
            vec!["\"checkout\"", "shop/restricted", "batch"],
        ),
        (
            base("other-device"),
            Code::PermissionDenied,
            vec!["backup-hsm", "prod-hsm", "\"device\""],
        ),
        (
            base("missing"),
            Code::NotFound,
            vec!["shop/missing", "create it"],
        ),
        (
            base("not-written"),
            // Not yet on the token (a mirror catching up, an import running): retried.
            Code::Unavailable,
            vec!["shop/not-written", "holds no secret", "node-refuse"],
        ),
        (
            with_attribute(base("db"), "fileMode", Some("0999")),
            Code::InvalidArgument,
            vec!["fileMode", "0440"],
        ),
        (
            with_attribute(base("db"), pod_info::POD_NAMESPACE, None),
            Code::InvalidArgument,
            vec![pod_info::POD_NAMESPACE, "podInfoOnMount"],
        ),
        (
            with_attribute(base("db"), pod_info::SERVICE_ACCOUNT, None),
            Code::InvalidArgument,
            vec![pod_info::SERVICE_ACCOUNT],
        ),
        (
            with_attribute(base("db"), pod_info::EPHEMERAL, Some("false")),
            Code::InvalidArgument,
            vec![pod_info::EPHEMERAL, "inline ephemeral"],
        ),
        (
            with_attribute(base("db"), "device", None),
            Code::InvalidArgument,
            vec!["\"device\"", "HSMDevice"],
        ),
        (
            with_attribute(base("db"), "secrets", None),
            Code::InvalidArgument,
            vec!["\"secrets\""],
        ),
    ];
    for (request, code, parts) in rows {
        let context = request.volume_context.clone();
        let status = h.publish(request).await.unwrap_err();
        assert_eq!(status.code(), code, "{context:?}: {status:?}");
        for part in parts {
            assert!(
                status.message().contains(part),
                "{:?} should mention {part:?}",
                status.message()
            );
        }
        assert_nothing_left(&target);
    }
    let metrics = h.metrics_text();
    for line in [
        r#"hsm_secrets_node_volume_errors_total{kind="other_namespace"} 2"#,
        r#"hsm_secrets_node_volume_errors_total{kind="service_account_denied"} 1"#,
        r#"hsm_secrets_node_volume_errors_total{kind="device_mismatch"} 1"#,
        r#"hsm_secrets_node_volume_errors_total{kind="unknown_secret"} 2"#,
        r#"hsm_secrets_node_volume_errors_total{kind="not_on_token"} 1"#,
        r#"hsm_secrets_node_volume_errors_total{kind="invalid_attribute"} 6"#,
        r#"hsm_secrets_node_publishes_total{operation="publish",outcome="source_permission_denied"} 4"#,
    ] {
        assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
    }

    // The same pod, allowed, still gets its own secret afterwards.
    h.publish(base("db")).await.unwrap();
    assert_eq!(read(&target.join("db/password")), b"pw");
}

#[tokio::test]
async fn a_failing_device_is_unavailable_then_republish_keeps_the_last_good_content() {
    let token = token_or_skip!("node-faulty");
    let plan = Arc::new(FaultPlan::new());
    let store = Arc::new(FaultyStore::new(token.open().await, plan.clone()));
    put(store.as_ref(), "shop/db", &[("password", b"v1")]).await;
    let h = NodeHarness::with_store(catalog(&[(NAMESPACE, "db", DEVICE, &[])]), store).await;
    let target = h.target("uid-1", "secrets");

    plan.fail_op("get", FaultKind::DeviceUnavailable);
    let status = h.publish(volume("vol-1", &target, "db")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("node-faulty"), "{status:?}");
    assert_nothing_left(&target);

    plan.clear();
    h.publish(volume("vol-1", &target, "db")).await.unwrap();
    assert_eq!(read(&target.join("db/password")), b"v1");

    plan.fail_op("get", FaultKind::DeviceUnavailable);
    h.publish(volume("vol-1", &target, "db"))
        .await
        .expect("a failed republish succeeds and keeps the volume");
    assert!(is_mounted(&target));
    assert_eq!(read(&target.join("db/password")), b"v1");

    let metrics = h.metrics_text();
    for line in [
        r#"hsm_secrets_node_republish_kept_last_good_total{kind="source_unavailable"} 1"#,
        r#"hsm_secrets_node_publishes_total{operation="republish",outcome="kept_last_good"} 1"#,
        r#"hsm_secrets_node_publishes_total{operation="publish",outcome="source_unavailable"} 1"#,
        r#"hsm_secrets_node_volume_errors_total{kind="store_device_unavailable"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} missing in:\n{metrics}");
    }
    plan.fail_op("health", FaultKind::DeviceUnavailable);
    assert!(!h.probe().await, "a device that fails is not ready");
}

#[tokio::test]
async fn republish_after_rotation_serves_the_new_version() {
    let token = token_or_skip!("node-rotate");
    let store: Arc<dyn SecretStore> = Arc::new(token.open().await);
    put(
        store.as_ref(),
        "shop/db",
        &[("password", b"v1"), ("old-key", b"x")],
    )
    .await;
    let h =
        NodeHarness::with_store(catalog(&[(NAMESPACE, "db", DEVICE, &[])]), store.clone()).await;
    let target = h.target("uid-1", "secrets");
    h.publish(volume("vol-1", &target, "db")).await.unwrap();
    assert_eq!(read(&target.join("db/password")), b"v1");

    put(
        store.as_ref(),
        "shop/db",
        &[("password", b"v2"), ("new-key", b"y")],
    )
    .await;
    h.publish(volume("vol-1", &target, "db")).await.unwrap();
    assert_eq!(read(&target.join("db/password")), b"v2");
    assert_eq!(visible_files(&target), ["db/new-key", "db/password"]);
    assert_eq!(mode_and_gid(&target.join("db/new-key")), (0o440, GID));
    let metrics = h.metrics_text();
    assert!(
        metrics
            .contains(r#"hsm_secrets_node_publishes_total{operation="republish",outcome="ok"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_node_without_the_device_answers_unavailable() {
    if !kit::node::mounts_available() {
        return;
    }
    let catalog = catalog(&[(NAMESPACE, "db", DEVICE, &[])]);

    // No HSM on this node at all: ready (nothing to wait for), but publishing is refused.
    let h = NodeHarness::start(catalog.clone(), None).await;
    assert!(h.probe().await);
    let target = h.target("uid-1", "secrets");
    let status = h.publish(volume("vol-1", &target, "db")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("no HSM for device \"prod-hsm\"")
            && status.message().contains("remote reads are not configured"),
        "{status:?}"
    );
    assert_nothing_left(&target);
    drop(h);

    // An HSM for another device.
    let other = Arc::new(hsm_secrets::hsm::MemoryStore::new("backup"));
    let h = NodeHarness::start(
        catalog.clone(),
        Some(LocalDevice::open("backup-hsm", other)),
    )
    .await;
    let target = h.target("uid-1", "secrets");
    let status = h.publish(volume("vol-1", &target, "db")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("\"backup-hsm\""), "{status:?}");
    drop(h);

    // The device's token is still being opened: not ready, Unavailable with the reason.
    let opening = LocalDevice::opening(DEVICE);
    opening.set_opening_failed("no token labelled \"prod\" in libsofthsm2.so".into());
    let h = NodeHarness::start(catalog, Some(opening)).await;
    assert!(!h.probe().await);
    let target = h.target("uid-1", "secrets");
    let status = h.publish(volume("vol-1", &target, "db")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("not open yet") && status.message().contains("no token labelled"),
        "{status:?}"
    );
    assert_nothing_left(&target);
}

#[tokio::test]
async fn ops_endpoints_report_metrics_health_and_readiness() {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    let catalog = catalog(&[]);
    let opening = LocalDevice::opening(DEVICE);
    opening.set_opening_failed("cannot read the PIN file /etc/hsm/pin".into());
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = hsm_secrets::node::NodeMetrics::register(&mut registry);
    let source = Arc::new(
        hsm_secrets::node::HsmVolumeSource::new(catalog, Some(opening.clone()))
            .with_metrics(metrics),
    );
    let router = hsm_secrets::node::ops::router(Arc::new(registry), source, None);
    let get = |path: &str| {
        let router = router.clone();
        let request = http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        async move {
            let response = router.oneshot(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        }
    };
    assert_eq!(get("/healthz").await.0, http::StatusCode::OK);
    let (status, body) = get("/readyz").await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("/etc/hsm/pin"), "{body}");

    opening.set_open(Arc::new(hsm_secrets::hsm::MemoryStore::new("tok")));
    assert_eq!(get("/readyz").await.0, http::StatusCode::OK);
    let (status, body) = get("/metrics").await;
    assert_eq!(status, http::StatusCode::OK);
    assert!(body.contains("hsm_secrets_node_device_ready 1"), "{body}");
}

/// Publishes `secrets` with the layout `attributes` into a new pod's volume.
fn laid_out(
    target: &std::path::Path,
    secrets: &str,
    attributes: &[(&str, &str)],
) -> hsm_secrets_csi::proto::NodePublishVolumeRequest {
    attributes
        .iter()
        .fold(volume("vol-1", target, secrets), |request, (k, v)| {
            with_attribute(request, k, Some(v))
        })
}

/// What `sh` makes of an env file: `set -a; . FILE`, then the variable's exact bytes.
fn sourced(file: &std::path::Path, variable: &str) -> Vec<u8> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("set -a; . \"$1\"; printf %s \"${variable}\""))
        .arg("sh")
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[tokio::test]
async fn per_key_names_modes_and_formats_are_rendered_and_re_rendered_on_rotation() {
    let token = token_or_skip!("node-layout");
    let store: Arc<dyn SecretStore> = Arc::new(token.open().await);
    put(
        store.as_ref(),
        "shop/tls",
        &[
            ("private", b"PRIVATE-KEY"),
            ("certificate", b"CERT"),
            ("ca.crt", b"CA"),
        ],
    )
    .await;
    put(
        store.as_ref(),
        "shop/db",
        &[
            ("username", b"app"),
            ("password", b"it's $HOME `x`\n\"two\""),
        ],
    )
    .await;
    put(store.as_ref(), "shop/api", &[("token", b"t\"o\\k")]).await;
    let h = NodeHarness::with_store(
        catalog(&[
            (NAMESPACE, "tls", DEVICE, &[]),
            (NAMESPACE, "db", DEVICE, &[]),
            (NAMESPACE, "api", DEVICE, &[]),
        ]),
        store.clone(),
    )
    .await;
    let target = h.target("uid-1", "secrets");
    let request = laid_out(
        &target,
        "tls,db,api",
        &[
            ("fileMode.tls", "0444,private=0400"),
            ("keyNames.tls", "private=tls.key,certificate=tls.crt"),
            ("path.tls", "web"),
            ("format.db", "env"),
            ("keyNames.db", "username=DB_USER,password=DB_PASSWORD"),
            ("fileMode.db", "0400"),
            ("format.api", "json"),
        ],
    );
    h.publish(request.clone()).await.unwrap();
    assert!(is_mounted(&target));
    assert_eq!(
        visible_files(&target),
        [
            "api.json",
            "db.env",
            "web/ca.crt",
            "web/tls.crt",
            "web/tls.key"
        ]
    );
    assert_eq!(mode_and_gid(&target.join("web/tls.key")), (0o400, GID));
    assert_eq!(mode_and_gid(&target.join("web/tls.crt")), (0o444, GID));
    assert_eq!(read(&target.join("web/tls.key")), b"PRIVATE-KEY");
    assert_eq!(mode_and_gid(&target.join("db.env")), (0o400, GID));
    assert_eq!(mode_and_gid(&target.join("api.json")), (0o440, GID));
    assert_eq!(
        sourced(&target.join("db.env"), "DB_PASSWORD"),
        b"it's $HOME `x`\n\"two\""
    );
    assert_eq!(sourced(&target.join("db.env"), "DB_USER"), b"app");
    let json: serde_json::Value = serde_json::from_slice(&read(&target.join("api.json"))).unwrap();
    assert_eq!(json, serde_json::json!({"token": "t\"o\\k"}));

    // A rotation re-renders the env file, atomically, through the same layout.
    put(
        store.as_ref(),
        "shop/db",
        &[("username", b"app"), ("password", b"rotated")],
    )
    .await;
    h.publish(request.clone()).await.unwrap();
    assert_eq!(sourced(&target.join("db.env"), "DB_PASSWORD"), b"rotated");
    h.publish(request).await.unwrap(); // unchanged: no record
    h.unpublish("vol-1", &target).await.unwrap();
    assert_nothing_left(&target);

    let records = h.audit.records();
    let summary: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("publish", "ok"), ("republish", "ok"), ("unpublish", "ok")]
    );
    let versions = |r: &serde_json::Value| -> Vec<(String, u64)> {
        r["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().into(),
                    s["version"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let first = versions(&records[0]);
    let rotated = versions(&records[1]);
    assert_eq!(
        first.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["tls", "db", "api"]
    );
    assert!(
        rotated[1].1 > first[1].1,
        "db's version moved: {first:?} {rotated:?}"
    );
    assert_eq!(rotated[0], first[0], "tls unchanged");
    for record in &records {
        assert_eq!(record["pod"]["name"], "checkout-0");
        assert_eq!(record["pod"]["serviceAccount"], SERVICE_ACCOUNT);
        assert_eq!(record["device"], DEVICE);
        assert_eq!(record["readFrom"], "local");
        assert_eq!(record["node"], "worker-1");
    }
    assert_no_value(
        &h.audit.bytes(),
        &[b"PRIVATE-KEY", b"it's $HOME", b"rotated", b"t\"o"],
    );
    assert!(h.mounts.list(None, None).is_empty(), "unpublished");
}

fn assert_no_value(trail: &[u8], values: &[&[u8]]) {
    for value in values {
        assert!(
            !trail.windows(value.len()).any(|w| w == *value),
            "a secret value reached the audit trail: {}",
            String::from_utf8_lossy(trail)
        );
    }
}

#[tokio::test]
async fn layouts_the_secret_cannot_take_are_invalid_argument_audited_and_leave_nothing() {
    let token = token_or_skip!("node-layout-bad");
    let store: Arc<dyn SecretStore> = Arc::new(token.open().await);
    put(
        store.as_ref(),
        "shop/db",
        &[("password", b"pw-value"), ("tls.crt", b"cert-value")],
    )
    .await;
    put(store.as_ref(), "shop/bin", &[("blob", b"\xff\xfe-binary")]).await;
    let h = NodeHarness::with_store(
        catalog(&[
            (NAMESPACE, "db", DEVICE, &[]),
            (NAMESPACE, "bin", DEVICE, &[]),
        ]),
        store,
    )
    .await;
    type Row<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let rows: &[Row] = &[
        // Two keys rendered to one file.
        (
            "db",
            &[("keyNames.db", "password=tls.crt")],
            "both as \"tls.crt\"",
        ),
        // A key that is no variable name.
        ("db", &[("format.db", "env")], "tls.crt=TLS_CRT"),
        // A format the plugin does not know.
        ("db", &[("format.db", "yaml")], "\"format.db\""),
        // A rename of a key the secret does not hold.
        ("db", &[("keyNames.db", "pasword=PW")], "does not hold"),
        // Binary data cannot be JSON text.
        ("bin", &[("format.bin", "json")], "not UTF-8"),
        // Per-key modes on a single-file format.
        (
            "db",
            &[("format.db", "json"), ("fileMode.db", "password=0400")],
            "one file",
        ),
    ];
    for (i, (secrets, attributes, hint)) in rows.iter().enumerate() {
        let target = h.target(&format!("uid-{i}"), "secrets");
        let status = h
            .publish(laid_out(&target, secrets, attributes))
            .await
            .expect_err(&format!("{attributes:?}"));
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{attributes:?}: {status:?}"
        );
        assert!(
            status.message().contains(hint),
            "{attributes:?}: {}",
            status.message()
        );
        assert_nothing_left(&target);
    }
    let records = h.audit.records();
    assert_eq!(records.len(), rows.len());
    for record in &records {
        assert_eq!(record["operation"], "publish");
        assert_ne!(record["outcome"], "ok");
        assert!(record["reason"].as_str().unwrap().len() > 10, "{record}");
    }
    assert_no_value(&h.audit.bytes(), &[b"pw-value", b"cert-value", b"-binary"]);
    let metrics = h.metrics_text();
    assert!(
        metrics.contains(
            r#"hsm_secrets_node_audit_records_total{operation="publish",outcome="source_invalid_argument"} 6"#
        ),
        "{metrics}"
    );
}
