//! Golden tests for `kubectl hsm` output: tables, JSON and YAML of fixture objects
//! compared with files in tests/golden/kubectl/ (refresh: UPDATE_GENERATED=1).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use hsm_secrets::crd::{HSMDevice, HSMSecret, ImportMode};
use hsm_secrets::kubectl::OutputFormat::{self, Json, Table, Yaml};
use hsm_secrets::kubectl::plan::{self, KeyChange};
use hsm_secrets::kubectl::render::{
    self, HealthReport, MirrorStatusView, SecretView, human_duration,
};
use k8s_openapi::ByteString;
use k8s_openapi::jiff::Timestamp;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/kubectl")
}

fn now() -> Timestamp {
    "2025-01-01T12:00:00Z".parse().unwrap()
}

fn secrets() -> Vec<HSMSecret> {
    let text = std::fs::read_to_string(dir().join("fixture-hsmsecrets.yaml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

fn devices() -> Vec<HSMDevice> {
    let text = std::fs::read_to_string(dir().join("fixture-hsmdevices.yaml")).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

fn shop(items: &[HSMSecret]) -> Vec<HSMSecret> {
    items
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some("shop"))
        .cloned()
        .collect()
}

/// Compares with (or, with UPDATE_GENERATED set, rewrites) a golden file.
fn golden(file: &str, actual: &str) {
    let path = dir().join(file);
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "tests/golden/kubectl/{file} differs; review and run: UPDATE_GENERATED=1 cargo test --test kubectl render::\n--- expected\n{expected}\n--- actual\n{actual}"
    );
}

fn ext(output: OutputFormat) -> &'static str {
    match output {
        Table => "txt",
        Json => "json",
        Yaml => "yaml",
    }
}

#[test]
fn secret_list_in_one_namespace_all_formats() {
    let items = shop(&secrets());
    for output in [Table, Json, Yaml] {
        let text = render::secret_list(&items, false, output, now()).unwrap();
        golden(&format!("list.{}", ext(output)), &text);
    }
    // JSON/YAML carry the objects, without managedFields.
    let text = render::secret_list(&items, false, Json, now()).unwrap();
    assert!(!text.contains("managedFields"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["kind"], "List");
    assert_eq!(v["items"][0]["spec"]["deviceRef"], "prod-hsm");
}

#[test]
fn secret_list_all_namespaces_has_a_namespace_column() {
    let text = render::secret_list(&secrets(), true, Table, now()).unwrap();
    golden("list-all-namespaces.txt", &text);
    assert!(text.starts_with("NAMESPACE   NAME"), "{text}");
    assert!(text.contains("billing"));
}

#[test]
fn empty_lists_render_nothing_in_tables_and_an_empty_list_otherwise() {
    assert_eq!(render::secret_list(&[], false, Table, now()).unwrap(), "");
    assert_eq!(render::device_list(&[], Table, now()).unwrap(), "");
    assert_eq!(
        render::empty_notice("HSMSecret", Some("shop")),
        "No HSMSecrets found in namespace shop."
    );
    assert_eq!(
        render::empty_notice("HSMDevice", None),
        "No HSMDevices found."
    );
    golden(
        "list-empty.json",
        &render::secret_list(&[], true, Json, now()).unwrap(),
    );
    golden(
        "list-empty.yaml",
        &render::secret_list(&[], true, Yaml, now()).unwrap(),
    );
    assert_eq!(render::health_table(&HealthReport::new(&[])), "");
}

#[test]
fn devices_all_formats() {
    for output in [Table, Json, Yaml] {
        let text = render::device_list(&devices(), output, now()).unwrap();
        golden(&format!("devices.{}", ext(output)), &text);
    }
}

#[test]
fn get_hides_values_unless_they_were_read() {
    let obj = &secrets()[0];
    let view = SecretView::new(obj, None, &[]);
    golden("get.txt", &render::secret_detail(&view, now()));
    for output in [Json, Yaml] {
        let text = render::serialized(&view, output).unwrap();
        golden(&format!("get.{}", ext(output)), &text);
    }
    let v: serde_json::Value =
        serde_json::from_str(&render::serialized(&view, Json).unwrap()).unwrap();
    assert_eq!(v["valuesShown"], false);
    for key in v["keys"].as_array().unwrap() {
        assert_eq!(
            key.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["name"]
        );
    }
}

#[test]
fn get_with_values_shows_text_binary_and_missing_keys() {
    let obj = &secrets()[0];
    let values = BTreeMap::from([
        ("password".to_string(), ByteString(b"s3cr3t-Pa55".to_vec())),
        ("username".to_string(), ByteString(b"app\nline2".to_vec())),
        ("extra".to_string(), ByteString(vec![0xff, 0x00, 0x10])),
    ]);
    let view = SecretView::new(obj, Some(&values), &[]);
    golden("get-values.txt", &render::secret_detail(&view, now()));
    golden("get-values.json", &render::serialized(&view, Json).unwrap());
    // One key only.
    let view = SecretView::new(obj, Some(&values), &["password".to_string()]);
    let text = render::serialized(&view, Json).unwrap();
    assert!(text.contains("s3cr3t-Pa55"));
    assert!(!text.contains("username"), "{text}");
    assert_eq!(
        render::raw_value(&values, "password").unwrap(),
        b"s3cr3t-Pa55"
    );
}

#[test]
fn health_all_formats_and_not_ready_devices() {
    let report = HealthReport::new(&devices());
    golden("health.txt", &render::health_table(&report));
    golden("health.json", &render::serialized(&report, Json).unwrap());
    golden("health.yaml", &render::serialized(&report, Yaml).unwrap());
    assert!(!report.ready);
    assert_eq!(
        report.not_ready(),
        vec!["edge-hsm (ReadOnlyFallback)", "lab-hsm (Pending)"]
    );
    let ready = HealthReport::new(&devices()[..1]);
    assert!(ready.ready && ready.not_ready().is_empty());
}

#[test]
fn mirror_status_all_formats() {
    for (i, name) in ["prod-hsm", "edge-hsm", "lab-hsm"].iter().enumerate() {
        let view = MirrorStatusView::new(&devices()[i]);
        golden(
            &format!("mirror-{name}.txt"),
            &render::mirror_table(&view, now()),
        );
    }
    let view = MirrorStatusView::new(&devices()[1]);
    assert_eq!(view.switchover_to.as_deref(), Some("edge-2"));
    golden(
        "mirror-edge-hsm.json",
        &render::serialized(&view, Json).unwrap(),
    );
    golden(
        "mirror-edge-hsm.yaml",
        &render::serialized(&view, Yaml).unwrap(),
    );
}

#[test]
fn dry_run_plans_say_add_set_remove() {
    let existing = vec!["password".to_string(), "username".to_string()];
    let given = vec!["api-key".to_string(), "password".to_string()];
    let merge = plan::plan_keys(&existing, &given, ImportMode::Merge, &[]);
    assert_eq!(
        merge,
        vec![
            ("api-key".to_string(), KeyChange::Add),
            ("password".to_string(), KeyChange::Set),
        ]
    );
    let replace = plan::plan_keys(&existing, &given, ImportMode::Replace, &[]);
    assert_eq!(
        replace,
        vec![
            ("api-key".to_string(), KeyChange::Add),
            ("password".to_string(), KeyChange::Set),
            ("username".to_string(), KeyChange::Remove),
        ]
    );
    let remove = plan::plan_keys(&existing, &[], ImportMode::Merge, &["username".to_string()]);
    assert_eq!(remove, vec![("username".to_string(), KeyChange::Remove)]);
    golden(
        "plan-replace.txt",
        &plan::render_plan(
            "update HSMSecret shop/db on device prod-hsm (mode Replace)",
            &replace,
        ),
    );
}

#[test]
fn durations_read_like_kubectl() {
    for (secs, want) in [
        (0, "0s"),
        (119, "119s"),
        (125, "2m5s"),
        (600, "10m"),
        (3 * 3600 + 120, "3h2m"),
        (30 * 3600, "30h"),
        (3 * 86400 + 3600, "3d1h"),
        (40 * 86400, "40d"),
        (3 * 365 * 86400 + 86400, "3y1d"),
        (3 * 365 * 86400, "3y"),
        (9 * 365 * 86400, "9y"),
        (-5, "<invalid>"),
    ] {
        assert_eq!(human_duration(secs), want, "{secs}");
    }
}
