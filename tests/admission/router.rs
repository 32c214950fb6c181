//! The hsm-secrets admission rules behind the webhook router, driven with
//! AdmissionReview fixtures shaped like the API server's requests.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::collections::BTreeMap;

use hsm_secrets::admission::{MemoryState, ReflectorState, Rule};
use hsm_secrets::crd::{HSMDevice, HSMSecret};
use hsm_secrets_webhook::WebhookConfig;
use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use kit::admission::{
    DeviceHealth, app, app_with, body_bytes, cluster, denial_message, fixture, fixture_text,
    patch_of, patched_pod, post, review, warnings,
};
use kube::runtime::watcher;
use serde_json::json;

const MOUNT: &str = "/var/run/hsm-secrets";
const READY_LABEL: &str = "hsmsecrets.io/device.prod-hsm";

fn our_volume(pod: &Pod) -> Volume {
    let volumes = pod
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .clone()
        .unwrap_or_default();
    let ours: Vec<_> = volumes
        .into_iter()
        .filter(|v| v.name == "hsm-secrets")
        .collect();
    assert_eq!(ours.len(), 1, "exactly one injected volume");
    ours[0].clone()
}

fn attributes(volume: &Volume) -> BTreeMap<String, String> {
    let csi = volume.csi.as_ref().expect("a CSI volume");
    assert_eq!(csi.driver, "csi.hsmsecrets.io");
    assert_eq!(csi.read_only, Some(true));
    csi.volume_attributes.clone().unwrap()
}

/// The mount of the injected volume in `container`, if any.
fn our_mount(container: &Container) -> Option<(String, Option<bool>)> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "hsm-secrets")
        .map(|m| (m.mount_path.clone(), m.read_only))
}

fn status_annotation(pod: &Pod) -> Option<String> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("hsmsecrets.io/status").cloned())
}

#[tokio::test]
async fn a_typical_pod_gets_the_volume_mounts_affinity_and_status() {
    let (app, rules, _) = app(cluster(DeviceHealth::Ready));
    let original = fixture("pod_create_typical.json");
    let answer = review(&app, "/mutate", &original).await;
    assert_eq!(
        warnings(&answer),
        ["HSMSecret shop/api-key does not exist yet; the pod starts once it does"]
    );
    let pod = patched_pod(&app, &original, &answer).await;

    let volume = our_volume(&pod);
    assert_eq!(
        attributes(&volume),
        BTreeMap::from([
            ("secrets".to_owned(), "db-credentials,api-key".to_owned()),
            ("device".to_owned(), "prod-hsm".to_owned()),
            ("fileMode".to_owned(), "0440".to_owned()),
        ])
    );
    let spec = pod.spec.as_ref().unwrap();
    // The pod's own volumes and mounts are untouched.
    assert_eq!(spec.volumes.as_ref().unwrap().len(), 4);
    for container in &spec.containers {
        assert_eq!(
            our_mount(container),
            Some((MOUNT.to_owned(), Some(true))),
            "{}",
            container.name
        );
    }
    assert_eq!(spec.containers[0].volume_mounts.as_ref().unwrap().len(), 4);
    let affinity = spec.affinity.as_ref().unwrap();
    assert!(
        affinity.pod_anti_affinity.is_some(),
        "existing anti-affinity kept"
    );
    let preferred = affinity
        .node_affinity
        .as_ref()
        .unwrap()
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap();
    assert_eq!(preferred.len(), 1);
    assert_eq!(preferred[0].weight, 100);
    let expression = &preferred[0].preference.match_expressions.as_ref().unwrap()[0];
    assert_eq!(expression.key, READY_LABEL);
    assert_eq!(expression.operator, "In");
    assert_eq!(expression.values, Some(vec!["ready".to_owned()]));
    assert_eq!(status_annotation(&pod).as_deref(), Some("injected"));
    assert_eq!(
        rules.metrics().count(Rule::PodInjection, "injected"),
        1,
        "the reinvocation is counted as already_injected, not injected"
    );
    assert_eq!(
        rules
            .metrics()
            .count(Rule::PodInjection, "already_injected"),
        1
    );
}

#[tokio::test]
async fn a_pod_without_annotations_is_left_alone() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let answer = review(&app, "/mutate", &fixture("pod_create_plain.json")).await;
    assert_eq!(answer["allowed"], true);
    assert!(answer.get("patch").is_none(), "{answer}");
    assert!(warnings(&answer).is_empty());
    // And it passes validation too.
    let answer = review(&app, "/validate", &fixture("pod_create_plain.json")).await;
    assert_eq!(answer["allowed"], true);
}

#[tokio::test]
async fn named_init_containers_are_mounted_and_required_affinity_joins_every_term() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let original = fixture("pod_create_init_containers.json");
    let answer = review(&app, "/mutate", &original).await;
    // db-credentials is restricted to service account `checkout`; this pod runs as `orders`.
    assert_eq!(
        warnings(&answer),
        [
            "service account orders may not mount HSMSecret db-credentials \
          (spec.access.serviceAccounts); the volume will fail to mount"
        ]
    );
    let pod = patched_pod(&app, &original, &answer).await;
    let spec = pod.spec.as_ref().unwrap();
    let mounted = |containers: &[Container]| -> Vec<(String, bool)> {
        containers
            .iter()
            .map(|c| (c.name.clone(), our_mount(c).is_some()))
            .collect()
    };
    assert_eq!(
        mounted(&spec.containers),
        [("app".to_owned(), true), ("proxy".to_owned(), false)]
    );
    assert_eq!(
        mounted(spec.init_containers.as_ref().unwrap()),
        [("migrate".to_owned(), true), ("wait-db".to_owned(), false)]
    );
    // wait-db had no volumeMounts at all; it must still have none.
    assert!(
        spec.init_containers.as_ref().unwrap()[1]
            .volume_mounts
            .is_none()
    );

    let attributes = attributes(&our_volume(&pod));
    assert_eq!(attributes["secrets"], "db-credentials");
    let terms = &spec
        .affinity
        .as_ref()
        .unwrap()
        .node_affinity
        .as_ref()
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()
        .node_selector_terms;
    assert_eq!(
        terms.len(),
        2,
        "no term added: each existing one is narrowed"
    );
    let keys = |i: usize| -> Vec<String> {
        terms[i]
            .match_expressions
            .iter()
            .flatten()
            .map(|e| e.key.clone())
            .collect()
    };
    assert_eq!(keys(0), ["topology.kubernetes.io/zone", READY_LABEL]);
    assert_eq!(keys(1), [READY_LABEL]);
    assert!(terms[1].match_fields.is_some(), "matchFields kept");
}

#[tokio::test]
async fn a_volume_already_named_like_ours_is_denied() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let answer = review(
        &app,
        "/mutate",
        &fixture("pod_create_volume_collision.json"),
    )
    .await;
    let message = denial_message(&answer);
    assert_eq!(answer["status"]["code"], 400);
    assert!(message.contains("\"hsm-secrets\""), "{message}");
    assert!(message.contains("spec.volumes[3]"), "{message}");
    assert!(message.contains("rename"), "{message}");
}

#[tokio::test]
async fn a_non_default_mount_path_mode_and_device_are_honoured() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let original = fixture("pod_create_custom_mount_path.json");
    let answer = review(&app, "/mutate", &original).await;
    assert_eq!(
        warnings(&answer),
        ["HSMSecret shop/signing-key does not exist yet; the pod starts once it does"]
    );
    let pod = patched_pod(&app, &original, &answer).await;
    let spec = pod.spec.as_ref().unwrap();
    // The pod had no volumes, mounts or affinity: each was added whole.
    assert_eq!(spec.volumes.as_ref().unwrap().len(), 1);
    assert_eq!(
        our_mount(&spec.containers[0]),
        Some(("/etc/hsm".to_owned(), Some(true))),
        "trailing slash normalized"
    );
    let attributes = attributes(&our_volume(&pod));
    assert_eq!(attributes["fileMode"], "0400");
    assert_eq!(attributes["device"], "prod-hsm");
    assert!(
        spec.affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .preferred_during_scheduling_ignored_during_execution
            .is_some()
    );
}

#[tokio::test]
async fn node_affinity_none_adds_no_affinity() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let mut original = fixture("pod_create_custom_mount_path.json");
    original["request"]["object"]["metadata"]["annotations"]["hsmsecrets.io/node-affinity"] =
        "none".into();
    let answer = review(&app, "/mutate", &original).await;
    let pod = patched_pod(&app, &original, &answer).await;
    assert!(pod.spec.unwrap().affinity.is_none());
}

#[tokio::test]
async fn an_update_of_a_running_pod_is_allowed_without_a_patch() {
    let (app, rules, _) = app(cluster(DeviceHealth::Ready));
    let update = fixture("pod_update_running.json");
    let answer = review(&app, "/mutate", &update).await;
    assert_eq!(answer["allowed"], true);
    assert!(answer.get("patch").is_none(), "{answer}");
    assert_eq!(rules.metrics().count(Rule::PodInjection, "not_create"), 1);
    let answer = review(&app, "/validate", &update).await;
    assert_eq!(answer["allowed"], true);

    // A CREATE of a pod already past Pending (a mirror pod, a restore) is not touched either.
    let mut running = fixture("pod_create_typical.json");
    running["request"]["object"]["status"] = json!({"phase": "Running"});
    let answer = review(&app, "/mutate", &running).await;
    assert!(answer.get("patch").is_none(), "{answer}");
    assert_eq!(rules.metrics().count(Rule::PodInjection, "not_pending"), 1);
}

#[tokio::test]
async fn a_dry_run_gets_the_same_answer_and_leaves_no_trace() {
    let (app, rules, _) = app(cluster(DeviceHealth::Ready));
    let dry = fixture("pod_create_dry_run.json");
    assert_eq!(dry["request"]["dryRun"], true);
    let dry_answer = review(&app, "/mutate", &dry).await;
    let dry_patch = patch_of(&dry_answer).expect("a dry run is answered like the real request");
    assert_eq!(
        rules.metrics().count(Rule::PodInjection, "injected"),
        0,
        "dry runs are not counted"
    );

    let mut real = dry.clone();
    real["request"]["dryRun"] = false.into();
    let real_answer = review(&app, "/mutate", &real).await;
    assert_eq!(patch_of(&real_answer), Some(dry_patch));
    assert_eq!(warnings(&real_answer), warnings(&dry_answer));
    assert_eq!(rules.metrics().count(Rule::PodInjection, "injected"), 1);
}

#[tokio::test]
async fn malformed_annotations_are_denied_naming_the_annotation() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    for (annotation, value, expected) in [
        ("hsmsecrets.io/file-mode", "0666", "grants write or execute"),
        ("hsmsecrets.io/file-mode", "0999", "not an octal mode"),
        ("hsmsecrets.io/mount-path", "/proc", "reserved"),
        ("hsmsecrets.io/mount-path", "relative/dir", "relative path"),
        (
            "hsmsecrets.io/containers",
            "app,sidekick",
            "no such container",
        ),
        (
            "hsmsecrets.io/secrets",
            "db-credentials,db-credentials",
            "twice",
        ),
        (
            "hsmsecrets.io/secrets",
            "Db_Credentials",
            "not a valid HSMSecret name",
        ),
        ("hsmsecrets.io/node-affinity", "always", "\"preferred\""),
        ("hsmsecrets.io/inject", "yes", "\"true\""),
    ] {
        let mut original = fixture("pod_create_typical.json");
        original["request"]["object"]["metadata"]["annotations"][annotation] = value.into();
        let answer = review(&app, "/mutate", &original).await;
        let message = denial_message(&answer);
        assert!(
            message.contains(annotation),
            "{annotation}={value}: {message}"
        );
        assert!(
            message.contains(expected),
            "{annotation}={value}: {message}"
        );
    }
}

#[tokio::test]
async fn a_mount_path_taken_by_the_pod_is_denied() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let mut original = fixture("pod_create_typical.json");
    original["request"]["object"]["metadata"]["annotations"]["hsmsecrets.io/mount-path"] =
        "/etc/checkout".into();
    let message = denial_message(&review(&app, "/mutate", &original).await);
    assert!(message.contains("container \"app\""), "{message}");
    assert!(message.contains("\"config\""), "{message}");
    assert!(message.contains("hsmsecrets.io/mount-path"), "{message}");
}

#[tokio::test]
async fn the_device_must_be_one_and_known() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let with = |pairs: &[(&str, &str)]| {
        let mut original = fixture("pod_create_typical.json");
        for (key, value) in pairs {
            original["request"]["object"]["metadata"]["annotations"][*key] = (*value).into();
        }
        original
    };
    // Annotation and HSMSecret disagree.
    let message = denial_message(
        &review(
            &app,
            "/mutate",
            &with(&[("hsmsecrets.io/device", "other-hsm")]),
        )
        .await,
    );
    assert!(
        message.contains("\"other-hsm\"") && message.contains("\"prod-hsm\""),
        "{message}"
    );
    // Two HSMSecrets on two devices.
    let message = denial_message(
        &review(
            &app,
            "/mutate",
            &with(&[("hsmsecrets.io/secrets", "db-credentials,payments-key")]),
        )
        .await,
    );
    assert!(message.contains("mixes devices"), "{message}");
    // Nothing to go by: deny, naming the way out.
    let message = denial_message(
        &review(
            &app,
            "/mutate",
            &with(&[("hsmsecrets.io/secrets", "api-key")]),
        )
        .await,
    );
    assert!(
        message.contains("set annotation hsmsecrets.io/device"),
        "{message}"
    );
    // The annotation alone is enough, with warnings for what is missing.
    let answer = review(
        &app,
        "/mutate",
        &with(&[
            ("hsmsecrets.io/secrets", "api-key"),
            ("hsmsecrets.io/device", "new-hsm"),
        ]),
    )
    .await;
    assert_eq!(
        warnings(&answer),
        [
            "HSMSecret shop/api-key does not exist yet; the pod starts once it does",
            "HSMDevice new-hsm does not exist yet; the volume mounts once it does",
        ]
    );
    let pod = patched_pod(
        &app,
        &with(&[
            ("hsmsecrets.io/secrets", "api-key"),
            ("hsmsecrets.io/device", "new-hsm"),
        ]),
        &answer,
    )
    .await;
    assert_eq!(attributes(&our_volume(&pod))["device"], "new-hsm");
}

#[tokio::test]
async fn a_copied_status_annotation_does_not_stop_injection() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let mut original = fixture("pod_create_typical.json");
    original["request"]["object"]["metadata"]["annotations"]["hsmsecrets.io/status"] =
        "injected".into();
    let answer = review(&app, "/mutate", &original).await;
    let pod = patched_pod(&app, &original, &answer).await;
    our_volume(&pod);
    assert_eq!(status_annotation(&pod).as_deref(), Some("injected"));
}

#[tokio::test]
async fn misspelled_annotations_are_warned_about() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let mut original = fixture("pod_create_typical.json");
    original["request"]["object"]["metadata"]["annotations"]["hsmsecrets.io/mountPath"] =
        "/secrets".into();
    let answer = review(&app, "/mutate", &original).await;
    assert!(
        warnings(&answer).contains(
            &"unknown annotation hsmsecrets.io/mountPath ignored; did you mean \
              hsmsecrets.io/mount-path?"
                .to_owned()
        ),
        "{answer}"
    );
}

#[tokio::test]
async fn a_pod_mounting_the_driver_writable_is_denied() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let answer = review(&app, "/validate", &fixture("pod_create_csi_writable.json")).await;
    let message = denial_message(&answer);
    assert_eq!(answer["status"]["code"], 403);
    assert!(
        message.contains("spec.volumes[0].csi.readOnly"),
        "{message}"
    );
    assert!(message.contains("\"secrets\""), "{message}");

    // Without readOnly at all: same.
    let mut missing = fixture("pod_create_csi_writable.json");
    missing["request"]["object"]["spec"]["volumes"][0]["csi"]
        .as_object_mut()
        .unwrap()
        .remove("readOnly");
    denial_message(&review(&app, "/validate", &missing).await);

    // The injected pod passes the validating webhook that runs after mutation.
    let original = fixture("pod_create_typical.json");
    let answer = review(&app, "/mutate", &original).await;
    let mut pod = original["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&answer).unwrap()).unwrap();
    let mut validated = original.clone();
    validated["request"]["object"] = pod;
    assert_eq!(review(&app, "/validate", &validated).await["allowed"], true);
}

// --- HSMSecret writes against device state ---------------------------------

#[tokio::test]
async fn hsmsecret_writes_are_allowed_while_the_primary_is_ready() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    for name in [
        "hsmsecret_create_import.json",
        "hsmsecret_update_source_changed.json",
        "hsmsecret_update_metadata_only.json",
        "hsmsecret_delete.json",
    ] {
        let answer = review(&app, "/validate", &fixture(name)).await;
        assert_eq!(answer["allowed"], true, "{name}: {answer}");
        assert!(warnings(&answer).is_empty(), "{name}: {answer}");
    }
}

#[tokio::test]
async fn imports_are_denied_in_read_only_fallback_with_what_lifts_the_block() {
    let (app, rules, _) = app(cluster(DeviceHealth::ReadOnlyFallback));
    for name in [
        "hsmsecret_create_import.json",
        "hsmsecret_update_source_changed.json",
    ] {
        let answer = review(&app, "/validate", &fixture(name)).await;
        let message = denial_message(&answer);
        assert_eq!(answer["status"]["code"], 409, "{name}");
        for expected in [
            "HSMSecret shop/db-credentials",
            "HSMDevice prod-hsm",
            "primary worker-1 is unavailable",
            "since 2025-03-01T10:00:00Z",
            "ReadOnlyFallback",
            "when worker-1 recovers",
            // worker-3 is unhealthy: the only failover target offered is worker-2.
            "`kubectl hsm failover prod-hsm --to worker-2`",
        ] {
            assert!(
                message.contains(expected),
                "{name}: missing {expected:?} in {message}"
            );
        }
    }
    assert_eq!(
        rules
            .metrics()
            .count(Rule::HsmSecret, "no_writable_primary"),
        2
    );
    // Changes that write nothing into the HSM go through.
    for name in [
        "hsmsecret_update_metadata_only.json",
        "hsmsecret_delete.json",
    ] {
        let answer = review(&app, "/validate", &fixture(name)).await;
        assert_eq!(answer["allowed"], true, "{name}: {answer}");
    }
    // An HSMSecret without a source (read-only use of existing HSM data) is fine.
    let mut no_import = fixture("hsmsecret_create_import.json");
    no_import["request"]["object"]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("source");
    assert_eq!(review(&app, "/validate", &no_import).await["allowed"], true);
}

#[tokio::test]
async fn an_hsmsecret_for_an_unknown_device_gets_a_warning() {
    let state = cluster(DeviceHealth::Ready);
    state.remove_device("prod-hsm");
    let (app, _, _) = app(state);
    let answer = review(&app, "/validate", &fixture("hsmsecret_create_import.json")).await;
    assert_eq!(answer["allowed"], true);
    assert_eq!(
        warnings(&answer),
        ["HSMDevice prod-hsm does not exist; HSMSecret shop/db-credentials waits until it does"]
    );
}

// --- HSMDevice specs --------------------------------------------------------

#[tokio::test]
async fn hsmdevice_specs_that_cannot_work_are_denied() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let answer = review(&app, "/validate", &fixture("hsmdevice_create_valid.json")).await;
    assert_eq!(answer["allowed"], true, "{answer}");

    let message = denial_message(
        &review(
            &app,
            "/validate",
            &fixture("hsmdevice_create_impossible.json"),
        )
        .await,
    );
    for expected in [
        "HSMDevice edge-hsm cannot work",
        "(1) mirroring.primaryNode \"worker-1\" is also listed",
        "mirroring.targetNodes lists \"worker-9\" twice",
        "mirroring.syncInterval 2 is out of range",
        "mirroring.failoverThreshold 0 is out of range",
    ] {
        assert!(
            message.contains(expected),
            "missing {expected:?} in {message}"
        );
    }

    let message = denial_message(
        &review(
            &app,
            "/validate",
            &fixture("hsmdevice_create_token_conflict.json"),
        )
        .await,
    );
    assert!(
        message.contains("already claimed by HSMDevice prod-hsm on node(s) worker-3"),
        "{message}"
    );
}

#[tokio::test]
async fn a_device_update_that_leaves_the_spec_alone_is_not_rechecked() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    // An existing device whose spec would fail today's checks: only a
    // metadata change (the controller removing its finalizer).
    let mut update = fixture("hsmdevice_create_impossible.json");
    update["request"]["operation"] = "UPDATE".into();
    update["request"]["oldObject"] = update["request"]["object"].clone();
    update["request"]["object"]["metadata"]["finalizers"] = json!([]);
    assert_eq!(review(&app, "/validate", &update).await["allowed"], true);
    // Touching the spec brings the checks back.
    update["request"]["object"]["spec"]["mirroring"]["syncInterval"] = 3.into();
    denial_message(&review(&app, "/validate", &update).await);
}

#[tokio::test]
async fn a_passive_site_turns_active_only_by_promotion_and_a_fenced_one_keeps_spec_site() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let mut update = fixture("hsmdevice_create_valid.json");
    update["request"]["operation"] = "UPDATE".into();
    let follow = json!({"url": "s3://dr/site", "credentialsSecret": "hsm-archive",
        "device": "prod-hsm-a"});
    let mut old = update["request"]["object"].clone();
    old["spec"]["site"] = json!({"name": "site-b", "followArchive": follow});
    old["status"] = json!({"site": {"name": "site-b", "role": "Passive", "siteEpoch": 0}});
    update["request"]["oldObject"] = old.clone();
    update["request"]["object"]["spec"]["site"] = json!({"name": "site-b"});
    let message = denial_message(&review(&app, "/validate", &update).await);
    assert!(
        message.contains("site site-b is passive") && message.contains("kubectl hsm site promote"),
        "{message}"
    );
    // Once promoted (the status says so), followArchive goes.
    old["status"]["site"]["role"] = "Active".into();
    update["request"]["oldObject"] = old.clone();
    assert_eq!(review(&app, "/validate", &update).await["allowed"], true);
    // A fenced site keeps spec.site.
    old["status"]["site"]["role"] = "Fenced".into();
    update["request"]["oldObject"] = old;
    update["request"]["object"]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("site");
    let message = denial_message(&review(&app, "/validate", &update).await);
    assert!(message.contains("kubectl hsm site rejoin"), "{message}");
}

// --- The envelope -------------------------------------------------------------

#[tokio::test]
async fn malformed_json_is_a_clear_400() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let response = post(&app, "/mutate", fixture_text("malformed.json")).await;
    assert_eq!(response.status(), 400);
    let text = String::from_utf8(body_bytes(response).await.to_vec()).unwrap();
    assert!(text.contains("not a valid AdmissionReview"), "{text}");
}

#[tokio::test]
async fn a_v1beta1_review_is_a_clear_400() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let response = post(&app, "/validate", fixture_text("review_v1beta1.json")).await;
    assert_eq!(response.status(), 400);
    let text = String::from_utf8(body_bytes(response).await.to_vec()).unwrap();
    assert!(text.contains("admission.k8s.io/v1beta1"), "{text}");
    assert!(text.contains("admission.k8s.io/v1 only"), "{text}");
}

#[tokio::test]
async fn an_oversized_body_is_a_clear_413() {
    let (app, _, _) = app_with(
        cluster(DeviceHealth::Ready),
        WebhookConfig::default().with_max_body_bytes(64 * 1024),
    );
    let mut big = fixture("pod_create_typical.json");
    big["request"]["object"]["metadata"]["annotations"]["padding"] = "x".repeat(128 * 1024).into();
    let body = serde_json::to_vec(&big).unwrap();
    // Without Content-Length (streamed) and with it (refused before reading).
    let response = post(&app, "/mutate", body.clone()).await;
    assert_eq!(response.status(), 413);
    let request = http::Request::post("/mutate")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(axum::body::Body::from(body))
        .unwrap();
    let response = tower::ServiceExt::oneshot(app.clone(), request)
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let text = String::from_utf8(body_bytes(response).await.to_vec()).unwrap();
    assert!(text.contains("larger than the webhook's limit"), "{text}");
    // The server still answers afterwards.
    let answer = review(&app, "/mutate", &fixture("pod_create_plain.json")).await;
    assert_eq!(answer["allowed"], true);
}

#[tokio::test]
async fn kinds_the_rules_do_not_handle_are_allowed() {
    let (app, rules, _) = app(cluster(DeviceHealth::Ready));
    let mut deployment = fixture("pod_create_plain.json");
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deployment["request"]["object"] =
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}});
    assert_eq!(review(&app, "/mutate", &deployment).await["allowed"], true);
    assert_eq!(
        review(&app, "/validate", &deployment).await["allowed"],
        true
    );
    assert_eq!(rules.metrics().count(Rule::Other, "not_handled"), 2);
}

#[tokio::test]
async fn metrics_show_rule_verdicts_next_to_the_server_metrics() {
    let (app, _, _) = app(cluster(DeviceHealth::ReadOnlyFallback));
    review(&app, "/mutate", &fixture("pod_create_typical.json")).await;
    review(&app, "/validate", &fixture("hsmsecret_create_import.json")).await;
    let request = http::Request::get("/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(app.clone(), request)
        .await
        .unwrap();
    let text = String::from_utf8(body_bytes(response).await.to_vec()).unwrap();
    for series in [
        r#"hsm_secrets_admission_verdicts_total{rule="pod_injection",reason="injected"} 1"#,
        r#"hsm_secrets_admission_verdicts_total{rule="hsmsecret",reason="no_writable_primary"} 1"#,
        r#"hsm_secrets_webhook_admissions_total{operation="validate",result="denied"} 1"#,
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
}

// --- The informer-backed state -----------------------------------------------

#[tokio::test]
async fn the_reflector_state_is_ready_once_both_caches_are_listed() {
    let (devices, mut device_writer) = kube::runtime::reflector::store::<HSMDevice>();
    let (secrets, mut secret_writer) = kube::runtime::reflector::store::<HSMSecret>();
    let state = ReflectorState::from_stores(devices, secrets);
    let mut registry = prometheus_client::registry::Registry::default();
    let rules = std::sync::Arc::new(hsm_secrets::admission::Rules::new(state, &mut registry));
    let app = hsm_secrets_webhook::router(hsm_secrets_webhook::WebhookState::new(
        rules.clone(),
        registry,
    ));
    let readyz = || async {
        let request = http::Request::get("/readyz")
            .body(axum::body::Body::empty())
            .unwrap();
        tower::ServiceExt::oneshot(app.clone(), request)
            .await
            .unwrap()
            .status()
    };
    assert_eq!(readyz().await, 503, "not ready before the initial lists");

    let fixtures = cluster(DeviceHealth::Ready);
    use hsm_secrets::admission::AdmissionState as _;
    device_writer.apply_watcher_event(&watcher::Event::Init);
    for device in fixtures.devices() {
        device_writer.apply_watcher_event(&watcher::Event::InitApply((*device).clone()));
    }
    device_writer.apply_watcher_event(&watcher::Event::InitDone);
    secret_writer.apply_watcher_event(&watcher::Event::Init);
    for name in ["db-credentials", "payments-key"] {
        let secret = fixtures.secret("shop", name).unwrap();
        secret_writer.apply_watcher_event(&watcher::Event::InitApply((*secret).clone()));
    }
    assert_eq!(readyz().await, 503, "secrets not listed completely yet");
    secret_writer.apply_watcher_event(&watcher::Event::InitDone);

    // Readiness is flipped by a task; poll for it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while readyz().await != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The same decisions as with the in-memory state.
    let original = fixture("pod_create_typical.json");
    let answer = review(&app, "/mutate", &original).await;
    let pod = patched_pod(&app, &original, &answer).await;
    assert_eq!(attributes(&our_volume(&pod))["device"], "prod-hsm");
    assert!(rules.state().device("other-hsm").is_some());
    assert!(rules.state().secret("shop", "payments-key").is_some());
    assert!(
        rules
            .state()
            .secret("other-namespace", "payments-key")
            .is_none()
    );
}

/// With no HSMSecret in the cache, only the device annotation can tell
/// which device to read from.
#[tokio::test]
async fn an_empty_cluster_needs_the_device_annotation() {
    let (app, _, _) = app(MemoryState::new());
    let message =
        denial_message(&review(&app, "/mutate", &fixture("pod_create_typical.json")).await);
    assert!(message.contains("db-credentials, api-key"), "{message}");
    assert!(message.contains("namespace \"shop\""), "{message}");
}

#[tokio::test]
async fn an_injected_pod_is_never_refused_on_reinvocation() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let original = fixture("pod_create_typical.json");
    let answer = review(&app, "/mutate", &original).await;
    let mut pod = original["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&answer).unwrap()).unwrap();
    // Something between two invocations rewrote an annotation badly.
    pod["metadata"]["annotations"]["hsmsecrets.io/file-mode"] = "0777".into();
    let mut again = original.clone();
    again["request"]["object"] = pod;
    let answer = review(&app, "/mutate", &again).await;
    assert_eq!(answer["allowed"], true, "{answer}");
    assert!(answer.get("patch").is_none(), "{answer}");
}

/// A CSI volume written by hand (no injection) gets the node plugin's own attribute
/// checks at admission: what the node would refuse at publish is refused here, naming
/// the volume attribute and the fix.
#[tokio::test]
async fn hand_written_volumes_get_the_node_plugins_attribute_checks() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let base = || {
        let mut pod = fixture("pod_create_csi_writable.json");
        pod["request"]["object"]["spec"]["volumes"][0]["csi"]["readOnly"] = true.into();
        pod
    };
    assert_eq!(review(&app, "/validate", &base()).await["allowed"], true);
    for (attribute, value, expected) in [
        ("fileMode", Some("0777"), "write or execute"),
        ("fileMode", Some("0"), "lets nobody read"),
        ("secrets", None, "comma-separated"),
        ("secrets", Some("../other"), "metadata.name"),
        ("device", Some(" "), "HSMDevice"),
    ] {
        let mut pod = base();
        let attributes = pod["request"]["object"]["spec"]["volumes"][0]["csi"]["volumeAttributes"]
            .as_object_mut()
            .unwrap();
        match value {
            Some(v) => {
                attributes.insert(attribute.into(), v.into());
            }
            None => {
                attributes.remove(attribute);
            }
        }
        let answer = review(&app, "/validate", &pod).await;
        let message = denial_message(&answer);
        assert_eq!(answer["status"]["code"], 400, "{attribute}: {message}");
        assert!(
            message.contains("spec.volumes[0].csi.volumeAttributes")
                && message.contains(attribute)
                && message.contains(expected),
            "{attribute}={value:?}: {message}"
        );
    }
}

#[tokio::test]
async fn per_secret_layouts_reach_the_volume_and_the_validating_webhook_accepts_them() {
    let (app, _, _) = app(cluster(DeviceHealth::Ready));
    let mut original = fixture("pod_create_typical.json");
    let annotations = &mut original["request"]["object"]["metadata"]["annotations"];
    annotations["hsmsecrets.io/format.db-credentials"] = "env".into();
    annotations["hsmsecrets.io/key-names.db-credentials"] = "password=DB_PASSWORD".into();
    annotations["hsmsecrets.io/file-mode.db-credentials"] = "0400".into();
    annotations["hsmsecrets.io/file-mode.api-key"] = "0444,tls.key=0400".into();
    annotations["hsmsecrets.io/key-names.api-key"] = "private=tls.key".into();
    annotations["hsmsecrets.io/path.api-key"] = "tls".into();
    let answer = review(&app, "/mutate", &original).await;
    assert!(
        !warnings(&answer)
            .iter()
            .any(|w| w.contains("unknown annotation")),
        "{:?}",
        warnings(&answer)
    );
    let pod = patched_pod(&app, &original, &answer).await;
    let attributes = attributes(&our_volume(&pod));
    assert_eq!(attributes["format.db-credentials"], "env");
    assert_eq!(
        attributes["keyNames.db-credentials"],
        "password=DB_PASSWORD"
    );
    assert_eq!(attributes["fileMode.db-credentials"], "0400");
    assert_eq!(attributes["fileMode.api-key"], "0444,tls.key=0400");
    assert_eq!(attributes["keyNames.api-key"], "private=tls.key");
    assert_eq!(attributes["path.api-key"], "tls");

    // The injected pod passes the validating webhook, which parses the same attributes
    // with the node plugin's parser; a hand-edited bad one does not.
    let mut created = fixture("pod_create_typical.json");
    created["request"]["object"] = serde_json::to_value(&pod).unwrap();
    assert_eq!(review(&app, "/validate", &created).await["allowed"], true);
    let volumes = created["request"]["object"]["spec"]["volumes"]
        .as_array_mut()
        .unwrap();
    let ours = volumes
        .iter_mut()
        .find(|v| v["name"] == "hsm-secrets")
        .unwrap();
    ours["csi"]["volumeAttributes"]["format.db-credentials"] = "yaml".into();
    let message = denial_message(&review(&app, "/validate", &created).await);
    assert!(message.contains("\"format.db-credentials\""), "{message}");
}

#[tokio::test]
async fn bad_layouts_are_denied_naming_the_annotation_and_the_fix() {
    let state = cluster(DeviceHealth::Ready);
    // An HSMSecret whose keys are known from its status: names they cannot take are
    // refused at admission.
    let mut known = kit::resources::secret("shop", "db-credentials")
        .device("prod-hsm")
        .accounts(&["checkout"])
        .build();
    known.status = Some(serde_json::from_value(json!({"keys": ["password", "tls.crt"]})).unwrap());
    state.put_secret(known);
    let (app, _, _) = app(state);
    type Row<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    let rows: &[Row] = &[
        (
            &[("hsmsecrets.io/format.api-key", "yaml")],
            "hsmsecrets.io/format.api-key",
            "\"json\"",
        ),
        (
            &[("hsmsecrets.io/format.payments", "env")],
            "hsmsecrets.io/format.payments",
            "not among the volume's secrets",
        ),
        (
            &[("hsmsecrets.io/key-names.api-key", "a=x,b=x")],
            "hsmsecrets.io/key-names.api-key",
            "own name",
        ),
        (
            &[("hsmsecrets.io/file-mode.api-key", "tls.key=0640")],
            "hsmsecrets.io/file-mode.api-key",
            "read bits only",
        ),
        (
            &[("hsmsecrets.io/path.api-key", "db-credentials")],
            "hsmsecrets.io/path.api-key",
            "own path",
        ),
        (
            &[
                ("hsmsecrets.io/format.api-key", "env"),
                ("hsmsecrets.io/file-mode.api-key", "token=0400"),
            ],
            "hsmsecrets.io/file-mode.api-key",
            "one file",
        ),
        // Known keys: tls.crt is no variable name; a rename of a key it does not hold.
        (
            &[("hsmsecrets.io/format.db-credentials", "env")],
            "hsmsecrets.io/key-names.db-credentials",
            "tls.crt=TLS_CRT",
        ),
        (
            &[("hsmsecrets.io/key-names.db-credentials", "pasword=pw")],
            "hsmsecrets.io/key-names.db-credentials",
            "does not hold",
        ),
        (
            &[("hsmsecrets.io/key-names.db-credentials", "password=tls.crt")],
            "hsmsecrets.io/key-names.db-credentials",
            "both as \"tls.crt\"",
        ),
    ];
    for (annotations, field, hint) in rows {
        let mut original = fixture("pod_create_typical.json");
        for (key, value) in *annotations {
            original["request"]["object"]["metadata"]["annotations"][*key] = (*value).into();
        }
        let answer = review(&app, "/mutate", &original).await;
        let message = denial_message(&answer);
        assert!(message.contains(field), "{annotations:?}: {message}");
        assert!(message.contains(hint), "{annotations:?}: {message}");
    }
}
