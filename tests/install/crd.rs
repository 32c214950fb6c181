//! The generated CRDs: committed YAML is fresh, parses, has the printer columns, and
//! accepts the mirroring block users already write.
#![allow(clippy::unwrap_used)]

use hsm_secrets::crd::{self, HSMDevice, HSMSecret, MirroringPolicy, schema};
use serde_json::{Value, json};

const COMMITTED: &str = "manifests/crds/crds.yaml";

#[test]
fn committed_crd_yaml_is_fresh() {
    let fresh = crd::crd_yaml().unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(COMMITTED);
    if std::env::var_os("UPDATE_GENERATED").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "{COMMITTED} is stale; run: UPDATE_GENERATED=1 cargo test --test install crd::"
    );
}

fn docs() -> Vec<Value> {
    let text = crd::crd_yaml().unwrap();
    serde_saphyr::from_multiple::<Value>(&text).unwrap()
}

fn columns(crd: &Value) -> Vec<(String, i64)> {
    crd.pointer("/spec/versions/0/additionalPrinterColumns")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c.get("priority").and_then(Value::as_i64).unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn crds_parse_with_printer_columns_and_scopes() {
    let docs = docs();
    assert_eq!(docs.len(), 2);
    let dev = &docs[0];
    assert_eq!(dev["spec"]["scope"], "Cluster");
    assert_eq!(dev["spec"]["names"]["shortNames"][0], "hsmdev");
    assert_eq!(dev["spec"]["group"], "hsmsecrets.io");
    assert!(
        dev.pointer("/spec/versions/0/subresources/status")
            .is_some()
    );
    let cols = columns(dev);
    for (name, prio) in [
        ("Policy", 0),
        ("Primary", 0),
        ("Phase", 0),
        ("Mirrors", 0),
        ("Lag", 0),
        ("Epoch", 1),
        ("Last Sync", 1),
        ("Failovers", 1),
    ] {
        assert!(
            cols.contains(&(name.to_string(), prio)),
            "{name} in {cols:?}"
        );
    }
    let sec = &docs[1];
    assert_eq!(sec["spec"]["scope"], "Namespaced");
    assert_eq!(sec["spec"]["names"]["shortNames"][0], "hsmsec");
    let cols = columns(sec);
    for name in ["Device", "Status", "Version", "Last Sync"] {
        assert!(cols.iter().any(|(n, _)| n == name), "{name} in {cols:?}");
    }
    // The CEL rules reach the schema.
    let text = serde_json::to_string(dev).unwrap();
    assert!(text.contains("x-kubernetes-validations"));
    assert!(text.contains("primaryNode must not also be listed"));
}

/// The HA guide's example device, with its mirroring block exactly as written there.
fn seed_device() -> Value {
    let yaml = r#"
apiVersion: hsmsecrets.io/v1alpha1
kind: HSMDevice
metadata:
  name: hsm-primary
spec:
  pkcs11:
    library: /usr/lib/softhsm/libsofthsm2.so
    tokenLabel: prod
    pinSecretRef: {namespace: hsm-secrets-system, name: prod-hsm-pin, key: pin}
  mirroring:
    policy: "ReadOnly"           # None, ReadOnly, Active
    syncInterval: 300            # Sync every 5 minutes
    autoFailover: true           # Enable automatic failover
    primaryNode: "worker-1"      # Preferred primary node
    targetNodes:                 # Specific mirror nodes
      - "worker-2"
      - "worker-3"
"#;
    serde_saphyr::from_str(yaml).unwrap()
}

#[test]
fn seed_mirroring_block_is_accepted_verbatim() {
    let value = seed_device();
    let crd = serde_json::to_value(crd::device_crd()).unwrap();
    let errors = schema::check(schema::crd_schema(&crd).unwrap(), &value);
    assert!(errors.is_empty(), "{errors:?}");
    let dev: HSMDevice = serde_json::from_value(value.clone()).unwrap();
    let m = dev.mirroring();
    assert_eq!(m.policy, MirroringPolicy::ReadOnly);
    assert_eq!(m.sync_interval(), 300);
    assert!(m.auto_failover());
    assert_eq!(m.primary_node.as_deref(), Some("worker-1"));
    assert_eq!(m.target_nodes, ["worker-2", "worker-3"]);
    assert_eq!(m.failover_threshold(), 3);
    // Round trip keeps every field the user wrote.
    let back = serde_json::to_value(&dev).unwrap();
    assert_eq!(back["spec"]["mirroring"], value["spec"]["mirroring"]);
}

#[test]
fn schema_rejects_bad_device_specs() {
    let crd = serde_json::to_value(crd::device_crd()).unwrap();
    let s = schema::crd_schema(&crd).unwrap();
    let cases = [
        ("/spec/mirroring/policy", json!("Sometimes"), "not one of"),
        ("/spec/mirroring/syncInterval", json!(1), "at least"),
        ("/spec/mirroring/failoverThreshold", json!(0), "at least"),
        (
            "/spec/mirroring/autoFailover",
            json!("yes"),
            "true or false",
        ),
        ("/spec/mirroring/surprise", json!(1), "unknown field"),
    ];
    for (ptr, bad, why) in cases {
        let mut v = seed_device();
        let (parent, field) = ptr.rsplit_once('/').unwrap();
        v.pointer_mut(parent).unwrap()[field] = bad;
        let errors = schema::check(s, &v);
        assert!(errors.iter().any(|e| e.contains(why)), "{ptr}: {errors:?}");
    }
}

#[test]
fn backup_block_takes_defaults_and_refuses_out_of_range_values() {
    let crd = serde_json::to_value(crd::device_crd()).unwrap();
    let s = schema::crd_schema(&crd).unwrap();
    let mut v = seed_device();
    v["spec"]["backup"] =
        json!({"url": "s3://hsm-archive/site-a", "credentialsSecret": "hsm-archive"});
    assert!(
        schema::check(s, &v).is_empty(),
        "{:?}",
        schema::check(s, &v)
    );
    let dev: HSMDevice = serde_json::from_value(v.clone()).unwrap();
    let backup = dev.spec.backup.unwrap();
    assert_eq!(
        (
            backup.archive_name(),
            backup.segment_interval_seconds(),
            backup.base_interval_minutes(),
            backup.retention_days(),
            backup.verify_interval_minutes(),
        ),
        ("main", 5, 360, 7, 1440)
    );
    let cases = [
        ("/spec/backup/segmentIntervalSeconds", json!(0), "at least"),
        ("/spec/backup/retentionDays", json!(0), "at least"),
        ("/spec/backup/verifyIntervalMinutes", json!(-1), "at least"),
        ("/spec/backup/credentialsSecret", json!(""), "at least"),
        ("/spec/backup/url", json!("s3:"), "at least"),
        ("/spec/backup/bucket", json!("x"), "unknown field"),
    ];
    for (ptr, bad, why) in cases {
        let mut bad_device = v.clone();
        let (parent, field) = ptr.rsplit_once('/').unwrap();
        bad_device.pointer_mut(parent).unwrap()[field] = bad;
        let errors = schema::check(s, &bad_device);
        assert!(errors.iter().any(|e| e.contains(why)), "{ptr}: {errors:?}");
    }
    let mut missing = v.clone();
    missing["spec"]["backup"]
        .as_object_mut()
        .unwrap()
        .remove("credentialsSecret");
    let errors = schema::check(s, &missing);
    assert!(
        errors.iter().any(|e| e.contains("credentialsSecret")),
        "{errors:?}"
    );
}

#[test]
fn false_stays_false() {
    let mut v = seed_device();
    v["spec"]["mirroring"]["autoFailover"] = json!(false);
    let dev: HSMDevice = serde_json::from_value(v).unwrap();
    assert!(!dev.mirroring().auto_failover());
    let back = serde_json::to_value(&dev).unwrap();
    assert_eq!(back["spec"]["mirroring"]["autoFailover"], json!(false));
}

#[test]
fn hsmsecret_example_is_accepted() {
    let v: Value = serde_saphyr::from_str(
        r#"
apiVersion: hsmsecrets.io/v1alpha1
kind: HSMSecret
metadata: {name: db-credentials, namespace: shop}
spec:
  deviceRef: prod-hsm
  secretName: db-credentials
  secretType: Opaque
  syncInterval: 30
  source:
    secretRef: {name: db-credentials-import}
    deleteAfterImport: true
  access:
    serviceAccounts: [checkout]
"#,
    )
    .unwrap();
    let crd = serde_json::to_value(crd::secret_crd()).unwrap();
    let errors = schema::check(schema::crd_schema(&crd).unwrap(), &v);
    assert!(errors.is_empty(), "{errors:?}");
    let s: HSMSecret = serde_json::from_value(v).unwrap();
    assert_eq!(s.spec.allowed_service_accounts(), ["checkout"]);
}

/// Every CEL rule of both CRDs as generated: each string, list and map it reaches is
/// bounded, and its worst-case cost (model in `crd::cel_cost`) is within the API server's
/// budgets, per rule and for the schema.
#[test]
fn cel_rules_are_bounded_and_within_the_servers_cost_budget() {
    for doc in docs() {
        let schema = schema::crd_schema(&doc).unwrap();
        let report = crd::cel_cost::check(schema);
        let name = doc["metadata"]["name"].as_str().unwrap();
        assert!(report.problems.is_empty(), "{name}: {:?}", report.problems);
        for rule in &report.rules {
            eprintln!("{name} {} {:?}: cost {}", rule.path, rule.rule, rule.cost);
        }
        assert!(report.total() <= crd::cel_cost::SCHEMA_BUDGET);
    }
}

/// Uniqueness of mirror nodes is a list type the server enforces, not an O(n²) rule, and
/// each node name is bounded like a Node's name.
#[test]
fn target_nodes_is_a_bounded_set() {
    let crd = serde_json::to_value(crd::device_crd()).unwrap();
    let nodes = crd
        .pointer(
            "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/mirroring/properties/targetNodes",
        )
        .unwrap();
    assert_eq!(nodes["x-kubernetes-list-type"], "set");
    assert_eq!(nodes["items"]["maxLength"], 253);
    assert!(nodes["maxItems"].as_u64().is_some());
    assert!(nodes.get("x-kubernetes-validations").is_none());
}

/// The API server warns `unrecognized format "uint32"` on install for any format it does
/// not know; only these are used.
#[test]
fn only_formats_the_server_knows() {
    fn walk(v: &Value, found: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(f) = m.get("format").and_then(Value::as_str) {
                    found.push(f.to_string());
                }
                m.values().for_each(|v| walk(v, found));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    let known = ["int32", "int64", "date-time", "byte", "float", "double"];
    for doc in docs() {
        let mut found = Vec::new();
        walk(&doc, &mut found);
        for f in found {
            assert!(known.contains(&f.as_str()), "unrecognized format {f:?}");
        }
    }
}

/// The device name ends up in a node-label key; the schema itself limits it to 56
/// characters, with or without the webhook.
#[test]
fn device_name_limit_is_in_the_schema() {
    let crd = serde_json::to_value(crd::device_crd()).unwrap();
    let rules = crd
        .pointer("/spec/versions/0/schema/openAPIV3Schema/x-kubernetes-validations")
        .and_then(Value::as_array)
        .unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["rule"] == "self.metadata.name.size() <= 56"),
        "{rules:?}"
    );
    let longest = "d".repeat(56);
    assert!(
        hsm_secrets::crd::node_ready_label(&longest)
            .rsplit('/')
            .next()
            .unwrap()
            .len()
            <= 63
    );
}
