//! examples/ is accepted as written: every HSMDevice and HSMSecret passes the generated
//! CRD schema and deserializes into the Rust types, every pod's injection annotations
//! parse with the webhook's parser and the real admission rules inject it, references
//! between the examples resolve, and the `kubectl hsm` commands shown parse.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser as _;
use hsm_secrets::admission::{MemoryState, device_spec_problems};
use hsm_secrets::crd::{HSMDevice, HSMSecret, SWITCHOVER_ANNOTATION, schema};
use hsm_secrets::inject::{
    ANNOTATION_CONTAINERS, ANNOTATION_INJECT, ANNOTATION_STATUS, InjectRequest, KNOWN_ANNOTATIONS,
    STATUS_INJECTED, parse_annotations,
};
use hsm_secrets::kubectl::Cli as KubectlCli;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::CustomResourceExt;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// The mirroring block of the HA guide, exactly as users write it.
const HA_GUIDE_MIRRORING: &str = r#"mirroring:
  policy: "ReadOnly"           # None, ReadOnly, Active
  syncInterval: 300            # Sync every 5 minutes
  autoFailover: true           # Enable automatic failover
  primaryNode: "worker-1"      # Preferred primary node
  targetNodes:                 # Specific mirror nodes
    - "worker-2"
    - "worker-3""#;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

struct Example {
    /// e.g. `examples/complete-setup.yaml`
    file: String,
    value: Value,
}

impl Example {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("<no kind>")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"]
            .as_str()
            .unwrap_or("<no name>")
    }
    fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }
    fn at(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{}: {} {ns}/{}", self.file, self.kind(), self.name()),
            None => format!("{}: {} {}", self.file, self.kind(), self.name()),
        }
    }
}

fn load(dir: &Path, problems: &mut Vec<String>) -> Vec<Example> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let file = format!("examples/{}", path.file_name().unwrap().to_string_lossy());
        let text = std::fs::read_to_string(&path).unwrap();
        match serde_saphyr::from_multiple::<Value>(&text) {
            Ok(values) => {
                out.extend(
                    values
                        .into_iter()
                        .filter(|v| !v.is_null())
                        .map(|value| Example {
                            file: file.clone(),
                            value,
                        }),
                )
            }
            Err(e) => problems.push(format!("{file}: not valid YAML: {e}")),
        }
    }
    out
}

fn typed<T: DeserializeOwned>(example: &Example, problems: &mut Vec<String>) -> Option<T> {
    serde_json::from_value(example.value.clone())
        .map_err(|e| {
            problems.push(format!(
                "{}: not a valid {}: {e}",
                example.at(),
                example.kind()
            ))
        })
        .ok()
}

fn schema_problems<K: CustomResourceExt>(example: &Example, problems: &mut Vec<String>) {
    let crd = serde_json::to_value(K::crd()).unwrap();
    for error in schema::check(schema::crd_schema(&crd).unwrap(), &example.value) {
        problems.push(format!("{}: {error}", example.at()));
    }
}

/// Every problem of the examples in `dir`, each naming the file and object.
fn validate(dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let examples = load(dir, &mut problems);
    let mut devices = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    for example in &examples {
        match example.kind() {
            "HSMDevice" => {
                schema_problems::<HSMDevice>(example, &mut problems);
                if let Some(device) = typed::<HSMDevice>(example, &mut problems) {
                    for problem in device_spec_problems(&device.spec) {
                        problems.push(format!("{}: {problem}", example.at()));
                    }
                    // Two devices over one token on shared nodes would fight over it.
                    let nodes = |d: &HSMDevice| {
                        let m = d.mirroring();
                        m.primary_node
                            .into_iter()
                            .chain(m.target_nodes)
                            .collect::<Vec<_>>()
                    };
                    for (other, seen) in &devices {
                        let overlap = nodes(&device).iter().any(|n| nodes(seen).contains(n))
                            || nodes(&device).is_empty()
                            || nodes(seen).is_empty();
                        if seen.spec.pkcs11.token_label == device.spec.pkcs11.token_label && overlap
                        {
                            problems.push(format!(
                                "{}: token {} on the same nodes is already HSMDevice {other}; the examples must make one consistent setup",
                                example.at(),
                                device.spec.pkcs11.token_label
                            ));
                        }
                    }
                    if devices.contains_key(example.name()) {
                        problems.push(format!("{}: HSMDevice defined twice", example.at()));
                    }
                    devices.insert(example.name().to_owned(), device);
                }
            }
            "HSMSecret" => {
                schema_problems::<HSMSecret>(example, &mut problems);
                if example.namespace().is_none() {
                    problems.push(format!(
                        "{}: metadata.namespace: HSMSecrets are namespaced",
                        example.at()
                    ));
                }
                if let Some(secret) = typed::<HSMSecret>(example, &mut problems) {
                    let key = (
                        example.namespace().unwrap_or("").to_owned(),
                        example.name().to_owned(),
                    );
                    secrets.insert(key, secret);
                }
            }
            "Pod" => {
                typed::<Pod>(example, &mut problems);
            }
            "Secret" => {
                typed::<Secret>(example, &mut problems);
            }
            "Namespace" => {
                typed::<Namespace>(example, &mut problems);
            }
            "ServiceAccount" => {
                typed::<ServiceAccount>(example, &mut problems);
            }
            "Role" => {
                typed::<k8s_openapi::api::rbac::v1::Role>(example, &mut problems);
            }
            "RoleBinding" => {
                typed::<k8s_openapi::api::rbac::v1::RoleBinding>(example, &mut problems);
            }
            other => problems.push(format!(
                "{}: kind {other} is not expected in examples",
                example.at()
            )),
        }
    }
    // References between examples resolve.
    for example in examples.iter().filter(|e| e.kind() == "HSMSecret") {
        let device = example.value["spec"]["deviceRef"].as_str().unwrap_or("");
        if !devices.contains_key(device) {
            problems.push(format!(
                "{}: spec.deviceRef: no example defines HSMDevice {device}",
                example.at()
            ));
        }
        if let Some(source) = example.value["spec"]["source"]["secretRef"]["name"].as_str() {
            let defined = examples.iter().any(|e| {
                e.kind() == "Secret" && e.name() == source && e.namespace() == example.namespace()
            });
            if !defined {
                problems.push(format!(
                    "{}: spec.source.secretRef: no Secret {source} beside it",
                    example.at()
                ));
            }
        }
    }
    for example in examples.iter().filter(|e| e.kind() == "Pod") {
        pod_problems(example, &secrets, &mut problems);
    }
    problems
}

fn pod_problems(
    pod: &Example,
    secrets: &BTreeMap<(String, String), HSMSecret>,
    problems: &mut Vec<String>,
) {
    let annotations: BTreeMap<String, String> =
        serde_json::from_value(pod.value["metadata"]["annotations"].clone()).unwrap_or_default();
    let spec = match parse_annotations(&annotations) {
        Ok(InjectRequest::Requested(spec)) => spec,
        Ok(InjectRequest::NotRequested { ignored }) => {
            if annotations.contains_key(ANNOTATION_INJECT) || !ignored.is_empty() {
                problems.push(format!(
                    "{}: metadata.annotations: injection not requested, yet {ignored:?} set",
                    pod.at()
                ));
            }
            return;
        }
        Err(e) => {
            problems.push(format!("{}: metadata.annotations: {e}", pod.at()));
            return;
        }
    };
    for unknown in &spec.unknown_annotations {
        problems.push(format!("{}: metadata.annotations.{unknown}: not an annotation of the webhook ({KNOWN_ANNOTATIONS:?})", pod.at()));
    }
    let containers: Vec<&str> = pod.value["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for name in spec.containers.iter().flatten() {
        if !containers.contains(&name.as_str()) {
            problems.push(format!(
                "{}: metadata.annotations.{ANNOTATION_CONTAINERS}: no container {name}",
                pod.at()
            ));
        }
    }
    let namespace = pod.namespace().unwrap_or("default").to_owned();
    let account = pod.value["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or("default");
    for name in &spec.secrets {
        match secrets.get(&(namespace.clone(), name.clone())) {
            None => problems.push(format!(
                "{}: metadata.annotations: HSMSecret {namespace}/{name} is defined by no example",
                pod.at()
            )),
            Some(secret) => {
                let allowed = secret.spec.allowed_service_accounts();
                if !allowed.is_empty() && !allowed.iter().any(|a| a == account) {
                    problems.push(format!(
                        "{}: spec.serviceAccountName: {account} may not mount HSMSecret {name} (access: {allowed:?})",
                        pod.at()
                    ));
                }
            }
        }
    }
}

#[test]
fn every_example_is_accepted_and_references_resolve() {
    let problems = validate(&examples_dir());
    assert!(
        problems.is_empty(),
        "examples/:\n  {}",
        problems.join("\n  ")
    );
    let mut none = Vec::new();
    let examples = load(&examples_dir(), &mut none);
    for kind in ["HSMDevice", "HSMSecret", "Pod"] {
        assert!(
            examples.iter().any(|e| e.kind() == kind),
            "no {kind} example"
        );
    }
    let secrets: Vec<HSMSecret> = examples
        .iter()
        .filter(|e| e.kind() == "HSMSecret")
        .map(|e| serde_json::from_value(e.value.clone()).unwrap())
        .collect();
    assert!(
        secrets.iter().any(|s| s.spec.source.is_some()),
        "an import example (spec.source)"
    );
    // Every Secret an example imports carries the consent label the controller requires.
    for s in secrets.iter().filter(|s| s.spec.source.is_some()) {
        let source = &s.spec.source.as_ref().unwrap().secret_ref.name;
        let labelled = examples.iter().any(|e| {
            e.kind() == "Secret"
                && e.value["metadata"]["name"] == source.as_str()
                && e.value["metadata"]["labels"]["hsmsecrets.io/import-for"]
                    == s.metadata.name.as_deref().unwrap()
        });
        assert!(
            labelled,
            "the example Secret {source} is labelled hsmsecrets.io/import-for"
        );
    }
    assert!(
        secrets.iter().any(|s| s.spec.secret_name.is_some()),
        "a sync example (spec.secretName)"
    );
}

#[test]
fn a_broken_example_fails_with_its_file_name() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    assert_eq!(
        validate(dir.path()),
        Vec::<String>::new(),
        "the copies are fine"
    );

    let breakages: &[(&str, &str, &str, &str)] = &[
        (
            "mirrored-hsm-device.yaml",
            "policy: \"ReadOnly\"",
            "policy: \"ReadWrite\"",
            "examples/mirrored-hsm-device.yaml: HSMDevice prod-hsm: .spec.mirroring.policy",
        ),
        (
            "mirrored-hsm-device.yaml",
            "- \"worker-3\"",
            "- \"worker-1\"",
            "examples/mirrored-hsm-device.yaml: HSMDevice prod-hsm: ",
        ),
        (
            "complete-setup.yaml",
            "deviceRef: prod-hsm",
            "deviceRef: prod-hsn",
            "examples/complete-setup.yaml: HSMSecret shop/db-credentials: spec.deviceRef",
        ),
        (
            "complete-setup.yaml",
            "hsmsecrets.io/inject: \"true\"",
            "hsmsecrets.io/inject: \"yes\"",
            "examples/complete-setup.yaml: Pod shop/checkout: metadata.annotations: ",
        ),
        (
            "annotated-pod.yaml",
            "hsmsecrets.io/file-mode: \"0440\"",
            "hsmsecrets.io/file-mode: \"0999\"",
            "examples/annotated-pod.yaml: Pod shop/payments: metadata.annotations: ",
        ),
        (
            "annotated-pod.yaml",
            "hsmsecrets.io/containers: \"app\"",
            "hsmsecrets.io/containers: \"api\"",
            "examples/annotated-pod.yaml: Pod shop/payments: metadata.annotations.hsmsecrets.io/containers: no container api",
        ),
        (
            "complete-setup.yaml",
            "serviceAccountName: checkout",
            "serviceAccountName: intruder",
            "examples/complete-setup.yaml: Pod shop/checkout: spec.serviceAccountName: intruder may not mount",
        ),
    ];
    for (file, from, to, expected) in breakages {
        let path = dir.path().join(file);
        let good = std::fs::read_to_string(&path).unwrap();
        assert!(good.contains(from), "{file} has {from}");
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        let problems = validate(dir.path());
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(expected) || p.contains(expected)),
            "{file}: {from} -> {to}: expected a problem starting with\n  {expected}\ngot:\n  {}",
            problems.join("\n  ")
        );
        std::fs::write(&path, good).unwrap();
    }
}

#[test]
fn the_mirrored_device_carries_the_ha_guide_block_verbatim() {
    let text = std::fs::read_to_string(examples_dir().join("mirrored-hsm-device.yaml")).unwrap();
    let indented: String = HA_GUIDE_MIRRORING
        .lines()
        .map(|l| format!("  {l}\n"))
        .collect();
    assert!(
        text.contains(&indented),
        "examples/mirrored-hsm-device.yaml: spec.mirroring must be the HA guide's block as written:\n{indented}"
    );
    let value: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(
        value["spec"]["mirroring"],
        json!({"policy": "ReadOnly", "syncInterval": 300, "autoFailover": true,
               "primaryNode": "worker-1", "targetNodes": ["worker-2", "worker-3"]})
    );
}

/// The annotated pods of the examples, through the real admission rules with the
/// examples' devices and secrets: each is injected (allowed, with a patch).
#[tokio::test]
async fn the_webhook_injects_every_annotated_example_pod() {
    let mut problems = Vec::new();
    let examples = load(&examples_dir(), &mut problems);
    let state = MemoryState::new();
    for e in &examples {
        match e.kind() {
            "HSMDevice" => state.put_device(serde_json::from_value(e.value.clone()).unwrap()),
            "HSMSecret" => state.put_secret(serde_json::from_value(e.value.clone()).unwrap()),
            _ => {}
        }
    }
    let (app, _, _) = kit::admission::app(state);
    let mut injected = 0;
    for pod in examples.iter().filter(|e| e.kind() == "Pod") {
        if pod.value["metadata"]["annotations"][ANNOTATION_INJECT] != "true" {
            continue;
        }
        let mut review = kit::admission::fixture("pod_create_plain.json");
        review["request"]["object"] = pod.value.clone();
        review["request"]["name"] = json!(pod.name());
        review["request"]["namespace"] = json!(pod.namespace().unwrap());
        let answer = kit::admission::review(&app, "/mutate", &review).await;
        if answer["allowed"] != true {
            problems.push(format!(
                "{}: denied: {}",
                pod.at(),
                answer["status"]["message"]
            ));
            continue;
        }
        let Some(patch) = kit::admission::patch_of(&answer) else {
            problems.push(format!("{}: allowed without injection", pod.at()));
            continue;
        };
        let mut patched = pod.value.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        if patched["metadata"]["annotations"][ANNOTATION_STATUS] != STATUS_INJECTED {
            problems.push(format!("{}: not marked injected", pod.at()));
        }
        injected += 1;
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        injected >= 2,
        "the complete setup and the annotated pod are injected"
    );
}

/// Shell lines of a Markdown or YAML example: fenced `sh` blocks, and `#   ` comments,
/// with `\` continuations joined.
fn shell_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in text.lines() {
        let line = raw.trim().trim_start_matches('#').trim();
        let (body, continues) = match line.strip_suffix('\\') {
            Some(body) => (body.trim(), true),
            None => (line, false),
        };
        current.push_str(body);
        current.push(' ');
        if !continues {
            let command = current.split('#').next().unwrap().trim().to_owned();
            if !command.is_empty() {
                lines.push(command);
            }
            current.clear();
        }
    }
    lines
}

#[test]
fn every_kubectl_hsm_command_in_the_examples_parses() {
    let mut commands = Vec::new();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in shell_lines(&text) {
            if let Some(args) = line.strip_prefix("kubectl hsm ") {
                let argv = std::iter::once("kubectl-hsm").chain(args.split_whitespace());
                if let Err(e) = KubectlCli::try_parse_from(argv) {
                    panic!("examples/{file}: `{line}` does not parse:\n{e}");
                }
                commands.push(line);
            }
        }
    }
    assert!(
        commands
            .iter()
            .any(|c| c.starts_with("kubectl hsm failover ")),
        "{commands:?}"
    );
}

#[test]
fn the_failover_walkthrough_uses_the_switchover_annotation_the_controller_reads() {
    let text = std::fs::read_to_string(examples_dir().join("failover.md")).unwrap();
    let annotate: Vec<String> = shell_lines(&text)
        .into_iter()
        .filter(|l| l.starts_with("kubectl annotate hsmdevice "))
        .collect();
    assert!(annotate.len() >= 2, "{annotate:?}");
    for line in &annotate {
        assert!(
            line.contains(&format!(" {SWITCHOVER_ANNOTATION}="))
                || line.ends_with(&format!(" {SWITCHOVER_ANNOTATION}-")),
            "examples/failover.md: `{line}` must set or remove {SWITCHOVER_ANNOTATION}"
        );
    }
    assert!(text.contains("kubectl hsm failover prod-hsm --to worker-2"));
}
