//! Every manifest under manifests/ parses, every field is one Kubernetes knows, and the
//! objects agree with each other and with the code: kustomizations reach every file,
//! ServiceAccounts are bound, roles resolve, Services select pods and ports, mounts name
//! volumes, the webhook configurations reach routes the webhook serves, the CSIDriver is
//! the driver the plugin registers, RBAC is exactly what each component does, and every
//! flag and variable a container sets is one `hsm-secrets <subcommand> --help` lists.
//!
//! Problems are collected and reported together, each as `file: Kind namespace/name:
//! field: what is wrong`.
#![allow(clippy::unwrap_used)]

use crate::kit;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use hsm_secrets::controller::ControllerConfig;
use hsm_secrets_csi::DEFAULT_DRIVER_NAME;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const NAMESPACE: &str = "hsm-secrets-system";
/// Our image as the manifests name it: the crate version is the tag.
const IMAGE: &str = concat!("hsm-secrets:", env!("CARGO_PKG_VERSION"));
/// The uid of the image's non-root user (Dockerfile `USER`, checked in tests/install/dockerfile.rs).
const NON_ROOT_UID: i64 = 65532;

/// What the controller does with the API, and nothing more: `group/resource:verb`,
/// with `@namespace[names]` for namespaced, name-limited grants.
const CONTROLLER_GRANTS: &[&str] = &[
    // HSMDevice specs; `patch` clears a handled switchover annotation.
    "hsmsecrets.io/hsmdevices:get",
    "hsmsecrets.io/hsmdevices:list",
    "hsmsecrets.io/hsmdevices:watch",
    "hsmsecrets.io/hsmdevices:patch",
    // Roles, epoch, health: status written with a resourceVersion precondition.
    "hsmsecrets.io/hsmdevices/status:get",
    "hsmsecrets.io/hsmdevices/status:patch",
    "hsmsecrets.io/hsmdevices/status:update",
    // HSMSecrets, their finalizer, status, and ownerReferences on their Secret copies.
    "hsmsecrets.io/hsmsecrets:get",
    "hsmsecrets.io/hsmsecrets:list",
    "hsmsecrets.io/hsmsecrets:watch",
    "hsmsecrets.io/hsmsecrets:patch",
    "hsmsecrets.io/hsmsecrets/status:patch",
    "hsmsecrets.io/hsmsecrets/finalizers:update",
    // Secret sync (HSM -> Secret) and import (Secret -> HSM, delete after import), the
    // digest key Secret; no patch (copies are replaced under their resourceVersion).
    "/secrets:get",
    "/secrets:list",
    "/secrets:watch",
    "/secrets:create",
    "/secrets:update",
    "/secrets:delete",
    // Agent discovery by InternalIP and the device-ready node label.
    "/nodes:get",
    "/nodes:list",
    "/nodes:watch",
    "/nodes:patch",
    // Events through kube-runtime's Recorder.
    "events.k8s.io/events:create",
    // The leader Lease.
    "coordination.k8s.io/leases:get@hsm-secrets-system[hsm-secrets-controller]",
    "coordination.k8s.io/leases:update@hsm-secrets-system[hsm-secrets-controller]",
    "coordination.k8s.io/leases:create@hsm-secrets-system",
];

/// The node plugin and its agent read the HSMSecret catalog (a reflector), the status of
/// devices it reads through their agents and the Nodes' InternalIPs; they only create
/// the pods' HSMSecretSyncFailed Events.
const NODE_GRANTS: &[&str] = &[
    "hsmsecrets.io/hsmsecrets:list",
    "hsmsecrets.io/hsmsecrets:watch",
    "hsmsecrets.io/hsmdevices:get",
    "/nodes:list",
    "events.k8s.io/events:create",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One document of a manifest file, or the result of patching one.
#[derive(Clone, Debug)]
struct Doc {
    /// Path relative to the repository, e.g. `manifests/node/daemonset.yaml`.
    file: String,
    value: Value,
}

impl Doc {
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
    /// `file: Kind ns/name: field`
    fn at(&self, field: &str) -> String {
        let object = match self.namespace() {
            Some(ns) => format!("{ns}/{}", self.name()),
            None => self.name().to_owned(),
        };
        format!("{}: {} {object}: {field}", self.file, self.kind())
    }
    fn is(&self, kind: &str, name: &str) -> bool {
        self.kind() == kind && self.name() == name
    }
}

#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn add(&mut self, doc: &Doc, field: &str, problem: impl std::fmt::Display) {
        self.0.push(format!("{}: {problem}", doc.at(field)));
    }
    fn file(&mut self, file: &str, field: &str, problem: impl std::fmt::Display) {
        self.0.push(format!("{file}: {field}: {problem}"));
    }
    fn assert_none(self, what: &str) {
        assert!(
            self.0.is_empty(),
            "{what}: {} problem(s):\n  {}",
            self.0.len(),
            self.0.join("\n  ")
        );
    }
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn parse_file(path: &Path) -> Vec<Doc> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let values: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", relative(path)));
    values
        .into_iter()
        .filter(|v| !v.is_null())
        .map(|value| Doc {
            file: relative(path),
            value,
        })
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// What a kustomization directory builds, resolved the way kustomize does for what we
/// use: `resources` (files and directories), strategic-merge `patches`, `images`.
struct Build {
    docs: Vec<Doc>,
    /// Every file read to produce `docs`.
    files: BTreeSet<PathBuf>,
}

fn build(dir: &Path, findings: &mut Findings) -> Build {
    let file = dir.join("kustomization.yaml");
    let kustomization_file = relative(&file);
    let mut out = Build {
        docs: Vec::new(),
        files: BTreeSet::from([file.clone()]),
    };
    let [kustomization]: [Doc; 1] = parse_file(&file).try_into().unwrap_or_else(|_| {
        panic!("{kustomization_file}: expected exactly one document");
    });
    let k = &kustomization.value;
    if k["kind"] != "Kustomization" {
        findings.file(&kustomization_file, "kind", "is not Kustomization");
    }
    for (i, resource) in k["resources"].as_array().into_iter().flatten().enumerate() {
        let field = format!("resources[{i}]");
        let Some(resource) = resource.as_str() else {
            findings.file(&kustomization_file, &field, "is not a string");
            continue;
        };
        let path = dir.join(resource);
        if path.is_dir() {
            if !path.join("kustomization.yaml").is_file() {
                findings.file(
                    &kustomization_file,
                    &field,
                    format!("directory `{resource}` has no kustomization.yaml"),
                );
                continue;
            }
            let inner = build(&path, findings);
            out.docs.extend(inner.docs);
            out.files.extend(inner.files);
        } else if path.is_file() {
            out.docs.extend(parse_file(&path));
            out.files.insert(path);
        } else {
            findings.file(
                &kustomization_file,
                &field,
                format!("`{resource}` does not exist"),
            );
        }
    }
    for (i, patch) in k["patches"].as_array().into_iter().flatten().enumerate() {
        let field = format!("patches[{i}].path");
        let Some(name) = patch["path"].as_str() else {
            findings.file(
                &kustomization_file,
                &field,
                "only file patches are used here",
            );
            continue;
        };
        let path = dir.join(name);
        if !path.is_file() {
            findings.file(
                &kustomization_file,
                &field,
                format!("`{name}` does not exist"),
            );
            continue;
        }
        out.files.insert(path.clone());
        for patch in parse_file(&path) {
            let target = out.docs.iter_mut().find(|d| {
                d.kind() == patch.kind()
                    && d.name() == patch.name()
                    && d.namespace() == patch.namespace()
            });
            match target {
                Some(target) => {
                    strategic_merge(&mut target.value, &patch.value);
                    target.file = format!("{} (patched by {})", target.file, patch.file);
                }
                None => findings.add(&patch, "metadata", "patches no object of the build"),
            }
        }
    }
    for (i, image) in k["images"].as_array().into_iter().flatten().enumerate() {
        let (name, tag) = (image["name"].as_str(), image["newTag"].as_str());
        if name == Some("hsm-secrets") && tag != Some(env!("CARGO_PKG_VERSION")) {
            findings.file(
                &kustomization_file,
                &format!("images[{i}].newTag"),
                format!(
                    "{tag:?} is not the crate version {}",
                    env!("CARGO_PKG_VERSION")
                ),
            );
        }
    }
    out
}

/// Strategic merge as kustomize applies it to what our patches touch: maps merge, lists
/// of named items (containers, volumes, env) merge by name (volumeMounts by mountPath),
/// other lists are replaced.
fn strategic_merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (key, value) in patch {
                match base.get_mut(key) {
                    Some(existing) => strategic_merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(base), Value::Array(patch)) => {
            let key = ["mountPath", "name", "containerPort"]
                .into_iter()
                .find(|k| patch.iter().all(|item| item.get(k).is_some()));
            let Some(key) = key else {
                *base = patch.clone();
                return;
            };
            for item in patch {
                match base.iter_mut().find(|b| b.get(key) == item.get(key)) {
                    Some(existing) => strategic_merge(existing, item),
                    None => base.push(item.clone()),
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

fn top_level(findings: &mut Findings) -> Build {
    build(&root().join("manifests"), findings)
}

fn overlays() -> Vec<PathBuf> {
    let dir = root().join("manifests/overlays");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    dirs.sort();
    dirs
}

// ---------------------------------------------------------------------------------------
// Checks over one build. Each takes the built documents and reports into `findings`.

fn check_all(docs: &[Doc], findings: &mut Findings) {
    check_known_fields(docs, findings);
    check_namespaces(docs, findings);
    check_workloads(docs, findings);
    check_rbac_references(docs, findings);
    check_services(docs, findings);
    check_webhook_targets(docs, findings);
    check_csi_driver(docs, findings);
    check_component_grants(docs, findings);
    check_flags(docs, findings);
    check_agent_contract(docs, findings);
    check_controller(docs, findings);
}

/// Deserializes into the Kubernetes type and back: a field that does not survive is one
/// the API server would reject or silently drop (a typo such as `serviceAcountName`).
fn check_known_fields(docs: &[Doc], findings: &mut Findings) {
    use k8s_openapi::api::admissionregistration::v1 as admission;
    use k8s_openapi::api::{apps, core, policy, rbac, storage};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiext;

    fn round_trip<T: DeserializeOwned + Serialize>(doc: &Doc, findings: &mut Findings) {
        match serde_json::from_value::<T>(doc.value.clone()) {
            Ok(typed) => {
                let back = serde_json::to_value(&typed).unwrap();
                lost_fields(&doc.value, &back, "", doc, findings);
            }
            Err(e) => findings.add(doc, "(object)", format!("not a valid {}: {e}", doc.kind())),
        }
    }
    for doc in docs {
        match doc.kind() {
            "Namespace" => round_trip::<core::v1::Namespace>(doc, findings),
            "ServiceAccount" => round_trip::<core::v1::ServiceAccount>(doc, findings),
            "Secret" => round_trip::<core::v1::Secret>(doc, findings),
            "Service" => round_trip::<core::v1::Service>(doc, findings),
            "ClusterRole" => round_trip::<rbac::v1::ClusterRole>(doc, findings),
            "ClusterRoleBinding" => round_trip::<rbac::v1::ClusterRoleBinding>(doc, findings),
            "Role" => round_trip::<rbac::v1::Role>(doc, findings),
            "RoleBinding" => round_trip::<rbac::v1::RoleBinding>(doc, findings),
            "Deployment" => round_trip::<apps::v1::Deployment>(doc, findings),
            "DaemonSet" => round_trip::<apps::v1::DaemonSet>(doc, findings),
            "PodDisruptionBudget" => round_trip::<policy::v1::PodDisruptionBudget>(doc, findings),
            "MutatingWebhookConfiguration" => {
                round_trip::<admission::MutatingWebhookConfiguration>(doc, findings)
            }
            "ValidatingWebhookConfiguration" => {
                round_trip::<admission::ValidatingWebhookConfiguration>(doc, findings)
            }
            "CSIDriver" => round_trip::<storage::v1::CSIDriver>(doc, findings),
            "CustomResourceDefinition" => {
                round_trip::<apiext::CustomResourceDefinition>(doc, findings)
            }
            other => findings.add(doc, "kind", format!("`{other}` is not expected here")),
        }
    }
}

fn lost_fields(original: &Value, back: &Value, at: &str, doc: &Doc, findings: &mut Findings) {
    match (original, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (key, value) in o {
                let field = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                match b.get(key) {
                    Some(kept) => lost_fields(value, kept, &field, doc, findings),
                    None if value.is_null() => {}
                    None => findings.add(doc, &field, format!("is not a {} field", doc.kind())),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (o, b)) in o.iter().zip(b).enumerate() {
                lost_fields(o, b, &format!("{at}[{i}]"), doc, findings);
            }
        }
        (o, b) if o != b => findings.add(doc, at, format!("{o} reads back as {b}")),
        _ => {}
    }
}

fn is_cluster_scoped(kind: &str) -> bool {
    matches!(
        kind,
        "Namespace"
            | "ClusterRole"
            | "ClusterRoleBinding"
            | "MutatingWebhookConfiguration"
            | "ValidatingWebhookConfiguration"
            | "CSIDriver"
            | "CustomResourceDefinition"
    )
}

fn check_namespaces(docs: &[Doc], findings: &mut Findings) {
    if !docs.iter().any(|d| d.is("Namespace", NAMESPACE)) {
        findings
            .0
            .push(format!("no Namespace {NAMESPACE} is installed"));
    }
    let mut seen = BTreeSet::new();
    for doc in docs {
        let namespace = doc.namespace();
        if is_cluster_scoped(doc.kind()) {
            if namespace.is_some() {
                findings.add(
                    doc,
                    "metadata.namespace",
                    "cluster-scoped objects have none",
                );
            }
        } else if namespace != Some(NAMESPACE) {
            findings.add(doc, "metadata.namespace", format!("must be {NAMESPACE}"));
        }
        if !seen.insert((doc.kind().to_owned(), namespace, doc.name().to_owned())) {
            findings.add(doc, "metadata.name", "defined twice");
        }
    }
}

fn workloads(docs: &[Doc]) -> impl Iterator<Item = &Doc> {
    docs.iter()
        .filter(|d| matches!(d.kind(), "Deployment" | "DaemonSet"))
}

/// `(field prefix, container)` for init and regular containers of a workload.
fn containers(doc: &Doc) -> Vec<(String, &Value)> {
    let pod = &doc.value["spec"]["template"]["spec"];
    let mut out = Vec::new();
    for list in ["initContainers", "containers"] {
        for (i, c) in pod[list].as_array().into_iter().flatten().enumerate() {
            let name = c["name"].as_str().unwrap_or("?");
            out.push((format!("spec.template.spec.{list}[{i}] ({name})"), c));
        }
    }
    out
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Secrets a workload may mount without a manifest creating them: made by the operator
/// (documented in manifests/README.md) or by the webhook's certificate bootstrap.
fn documented_secrets() -> String {
    std::fs::read_to_string(root().join("manifests/README.md")).unwrap()
}

fn check_workloads(docs: &[Doc], findings: &mut Findings) {
    let readme = documented_secrets();
    for doc in workloads(docs) {
        let spec = &doc.value["spec"];
        let pod = &spec["template"]["spec"];
        let labels = &spec["template"]["metadata"]["labels"];
        if !labels_match(&spec["selector"]["matchLabels"], labels) {
            findings.add(
                doc,
                "spec.selector.matchLabels",
                "does not select the pod template's labels",
            );
        }
        match pod["serviceAccountName"].as_str() {
            None => findings.add(
                doc,
                "spec.template.spec.serviceAccountName",
                "missing: every component runs under its own ServiceAccount",
            ),
            Some(sa) => {
                if !docs
                    .iter()
                    .any(|d| d.is("ServiceAccount", sa) && d.namespace() == doc.namespace())
                {
                    findings.add(
                        doc,
                        "spec.template.spec.serviceAccountName",
                        format!("ServiceAccount {sa} is not defined"),
                    );
                }
            }
        }
        let volumes: BTreeMap<&str, &Value> = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| Some((v["name"].as_str()?, v)))
            .collect();
        for (i, volume) in pod["volumes"].as_array().into_iter().flatten().enumerate() {
            let Some(secret) = volume["secret"]["secretName"].as_str() else {
                continue;
            };
            let created = docs
                .iter()
                .any(|d| d.is("Secret", secret) && d.namespace() == doc.namespace());
            if !created && !readme.contains(&format!("`{secret}`")) {
                findings.add(
                    doc,
                    &format!("spec.template.spec.volumes[{i}].secret.secretName"),
                    format!(
                        "Secret {secret} is neither created by a manifest nor documented in manifests/README.md"
                    ),
                );
            }
        }
        let mut used_volumes = BTreeSet::new();
        for (at, c) in containers(doc) {
            for (i, mount) in c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let name = mount["name"].as_str().unwrap_or("");
                used_volumes.insert(name);
                if !volumes.contains_key(name) {
                    findings.add(
                        doc,
                        &format!("{at}.volumeMounts[{i}].name"),
                        format!("no volume named `{name}`"),
                    );
                }
            }
            let port_names: BTreeSet<&str> = c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["name"].as_str())
                .collect();
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                for action in ["httpGet", "tcpSocket", "grpc"] {
                    // kubelet resolves a named probe port in the same container only.
                    if let Some(port) = c[probe][action]["port"].as_str()
                        && !port_names.contains(port)
                    {
                        findings.add(
                            doc,
                            &format!("{at}.{probe}.{action}.port"),
                            format!("`{port}` is not a port of this container"),
                        );
                    }
                }
            }
            let resources = &c["resources"];
            if resources["requests"]["memory"].is_null() || resources["limits"]["memory"].is_null()
            {
                findings.add(
                    doc,
                    &format!("{at}.resources"),
                    "needs memory requests and limits",
                );
            }
            let image = c["image"].as_str().unwrap_or("");
            if image.starts_with("hsm-secrets:") || image.starts_with("hsm-secrets@") {
                if image != IMAGE {
                    findings.add(doc, &format!("{at}.image"), format!("must be {IMAGE}"));
                }
            } else if !image.contains(':') || image.ends_with(":latest") {
                findings.add(doc, &format!("{at}.image"), "pin a version tag");
            }
            check_container_security(doc, &at, c, pod, findings);
        }
        for name in volumes.keys() {
            if !used_volumes.contains(name) {
                findings.add(
                    doc,
                    "spec.template.spec.volumes",
                    format!("volume `{name}` is mounted by no container"),
                );
            }
        }
    }
}

/// Controller and webhook: non-root, read-only root, no capabilities. The node plugin:
/// privileged root (tmpfs mounts, /dev). Every other container: no capabilities.
fn check_container_security(doc: &Doc, at: &str, c: &Value, pod: &Value, findings: &mut Findings) {
    let sc = &c["securityContext"];
    let component = doc.value["metadata"]["labels"]["app.kubernetes.io/component"]
        .as_str()
        .unwrap_or("");
    let is_node_plugin = component == "node" && c["name"] == "node-plugin";
    if is_node_plugin {
        if sc["privileged"] != true || sc["runAsUser"] != 0 {
            findings.add(
                doc,
                &format!("{at}.securityContext"),
                "the node plugin mounts tmpfs: privileged: true, runAsUser: 0",
            );
        }
    } else {
        let drops = strings(&sc["capabilities"]["drop"]);
        if !drops.contains(&"ALL") {
            findings.add(
                doc,
                &format!("{at}.securityContext.capabilities.drop"),
                "must drop ALL",
            );
        }
        if sc["allowPrivilegeEscalation"] != false {
            findings.add(
                doc,
                &format!("{at}.securityContext.allowPrivilegeEscalation"),
                "must be false",
            );
        }
        if sc["privileged"] == true {
            findings.add(
                doc,
                &format!("{at}.securityContext.privileged"),
                "must not be set",
            );
        }
    }
    if sc["readOnlyRootFilesystem"] != true {
        findings.add(
            doc,
            &format!("{at}.securityContext.readOnlyRootFilesystem"),
            "must be true",
        );
    }
    if matches!(component, "controller" | "webhook") {
        let pod_sc = &pod["securityContext"];
        if pod_sc["runAsNonRoot"] != true || pod_sc["runAsUser"] != NON_ROOT_UID {
            findings.add(
                doc,
                "spec.template.spec.securityContext",
                format!("runAsNonRoot: true and runAsUser: {NON_ROOT_UID} (the image's user)"),
            );
        }
    }
}

/// `(kind, namespace, name)` of a role a binding refers to.
fn role_of(binding: &Doc) -> (String, Option<String>, String) {
    let role_ref = &binding.value["roleRef"];
    let kind = role_ref["kind"].as_str().unwrap_or("").to_owned();
    let namespace = (kind == "Role").then(|| binding.namespace().unwrap_or("").to_owned());
    (
        kind,
        namespace,
        role_ref["name"].as_str().unwrap_or("").to_owned(),
    )
}

fn bindings(docs: &[Doc]) -> impl Iterator<Item = &Doc> {
    docs.iter()
        .filter(|d| matches!(d.kind(), "RoleBinding" | "ClusterRoleBinding"))
}

fn find_role<'a>(docs: &'a [Doc], binding: &Doc) -> Option<&'a Doc> {
    let (kind, namespace, name) = role_of(binding);
    docs.iter()
        .find(|d| d.is(&kind, &name) && d.namespace().map(str::to_owned) == namespace)
}

fn check_rbac_references(docs: &[Doc], findings: &mut Findings) {
    for binding in bindings(docs) {
        let role_ref = &binding.value["roleRef"];
        if role_ref["apiGroup"] != "rbac.authorization.k8s.io" {
            findings.add(
                binding,
                "roleRef.apiGroup",
                "must be rbac.authorization.k8s.io",
            );
        }
        if binding.kind() == "ClusterRoleBinding" && role_ref["kind"] != "ClusterRole" {
            findings.add(
                binding,
                "roleRef.kind",
                "a ClusterRoleBinding binds a ClusterRole",
            );
        }
        if find_role(docs, binding).is_none() {
            let (kind, _, name) = role_of(binding);
            findings.add(binding, "roleRef", format!("{kind} {name} is not defined"));
        }
        for (i, subject) in binding.value["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let name = subject["name"].as_str().unwrap_or("");
            let namespace = subject["namespace"].as_str();
            if subject["kind"] != "ServiceAccount" {
                findings.add(
                    binding,
                    &format!("subjects[{i}].kind"),
                    "only ServiceAccounts",
                );
            } else if !docs
                .iter()
                .any(|d| d.is("ServiceAccount", name) && d.namespace() == namespace)
            {
                findings.add(
                    binding,
                    &format!("subjects[{i}]"),
                    format!(
                        "ServiceAccount {}/{name} is not defined",
                        namespace.unwrap_or("?")
                    ),
                );
            }
        }
    }
    for sa in docs.iter().filter(|d| d.kind() == "ServiceAccount") {
        let bound = bindings(docs).any(|b| {
            b.value["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"].as_str() == Some(sa.name())
                        && s["namespace"].as_str() == sa.namespace()
                })
        });
        if !bound {
            findings.add(
                sa,
                "metadata.name",
                "no RoleBinding or ClusterRoleBinding names it",
            );
        }
    }
    for role in docs
        .iter()
        .filter(|d| matches!(d.kind(), "Role" | "ClusterRole"))
    {
        for (i, rule) in role.value["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            if !rule["nonResourceURLs"].is_null() {
                findings.add(role, &format!("rules[{i}].nonResourceURLs"), "not needed");
            }
            for field in ["apiGroups", "resources", "verbs"] {
                if strings(&rule[field]).contains(&"*") {
                    findings.add(role, &format!("rules[{i}].{field}"), "no wildcards");
                }
            }
        }
    }
}

/// Every grant the ServiceAccount holds through the roles bound to it.
fn grants_of(docs: &[Doc], service_account: &str) -> BTreeSet<String> {
    let mut grants = BTreeSet::new();
    for binding in bindings(docs) {
        let names_it = binding.value["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == service_account && s["namespace"] == NAMESPACE);
        let Some(role) = names_it.then(|| find_role(docs, binding)).flatten() else {
            continue;
        };
        let scope = match role.namespace() {
            Some(ns) => format!("@{ns}"),
            None => String::new(),
        };
        for rule in role.value["rules"].as_array().into_iter().flatten() {
            let names = strings(&rule["resourceNames"]);
            let names = if names.is_empty() {
                String::new()
            } else {
                format!("[{}]", names.join(","))
            };
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        grants.insert(format!("{group}/{resource}:{verb}{scope}{names}"));
                    }
                }
            }
        }
    }
    grants
}

fn check_component_grants(docs: &[Doc], findings: &mut Findings) {
    for (sa, expected) in [
        ("hsm-secrets-controller", CONTROLLER_GRANTS),
        ("hsm-secrets-node", NODE_GRANTS),
    ] {
        let Some(doc) = docs.iter().find(|d| d.is("ServiceAccount", sa)) else {
            findings.0.push(format!("no ServiceAccount {sa}"));
            continue;
        };
        let held = grants_of(docs, sa);
        let expected: BTreeSet<String> = expected.iter().map(|g| g.to_string()).collect();
        for extra in held.difference(&expected) {
            findings.add(
                doc,
                "(RBAC)",
                format!("grant {extra} is broader than what the component does"),
            );
        }
        for missing in expected.difference(&held) {
            findings.add(doc, "(RBAC)", format!("grant {missing} is missing"));
        }
    }
}

/// Pod templates a selector picks.
fn selected<'a>(docs: &'a [Doc], selector: &Value) -> Vec<&'a Doc> {
    workloads(docs)
        .filter(|w| labels_match(selector, &w.value["spec"]["template"]["metadata"]["labels"]))
        .collect()
}

fn container_ports(workload: &Doc) -> Vec<&Value> {
    containers(workload)
        .into_iter()
        .flat_map(|(_, c)| c["ports"].as_array().into_iter().flatten())
        .collect()
}

fn check_services(docs: &[Doc], findings: &mut Findings) {
    for service in docs.iter().filter(|d| d.kind() == "Service") {
        let pods = selected(docs, &service.value["spec"]["selector"]);
        if pods.is_empty() {
            findings.add(service, "spec.selector", "selects no pod template");
        }
        for (i, port) in service.value["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let target = port.get("targetPort").unwrap_or(&port["port"]);
            for pod in &pods {
                let found = container_ports(pod).iter().any(|p| match target {
                    Value::String(name) => p["name"] == *name,
                    number => p["containerPort"] == *number,
                });
                if !found {
                    findings.add(
                        service,
                        &format!("spec.ports[{i}].targetPort"),
                        format!(
                            "{target} is no container port of {} {}",
                            pod.kind(),
                            pod.name()
                        ),
                    );
                }
            }
        }
    }
    for pdb in docs.iter().filter(|d| d.kind() == "PodDisruptionBudget") {
        if selected(docs, &pdb.value["spec"]["selector"]["matchLabels"]).is_empty() {
            findings.add(pdb, "spec.selector.matchLabels", "selects no pod template");
        }
    }
}

/// `(webhook configuration doc, field, path)` of every webhook's service target.
fn webhook_paths(docs: &[Doc]) -> Vec<(&Doc, String, String)> {
    let mut out = Vec::new();
    for doc in docs
        .iter()
        .filter(|d| d.kind().ends_with("WebhookConfiguration"))
    {
        for (i, hook) in doc.value["webhooks"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let field = format!("webhooks[{i}].clientConfig.service.path");
            let path = hook["clientConfig"]["service"]["path"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            out.push((doc, field, path));
        }
    }
    out
}

fn check_webhook_targets(docs: &[Doc], findings: &mut Findings) {
    for doc in docs
        .iter()
        .filter(|d| d.kind().ends_with("WebhookConfiguration"))
    {
        for (i, hook) in doc.value["webhooks"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let target = &hook["clientConfig"]["service"];
            let at = format!("webhooks[{i}].clientConfig.service");
            let name = target["name"].as_str().unwrap_or("");
            let namespace = target["namespace"].as_str();
            let Some(service) = docs
                .iter()
                .find(|d| d.is("Service", name) && d.namespace() == namespace)
            else {
                findings.add(doc, &at, format!("Service {name} is not defined"));
                continue;
            };
            let port = target.get("port").cloned().unwrap_or(json!(443));
            let ports = service.value["spec"]["ports"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !ports.iter().any(|p| p["port"] == port) {
                findings.add(
                    doc,
                    &format!("{at}.port"),
                    format!("Service {name} has no port {port}"),
                );
            }
            if !hook["clientConfig"]["url"].is_null() {
                findings.add(
                    doc,
                    &format!("webhooks[{i}].clientConfig.url"),
                    "use the Service",
                );
            }
        }
    }
}

fn check_csi_driver(docs: &[Doc], findings: &mut Findings) {
    let drivers: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "CSIDriver").collect();
    if drivers.len() != 1 {
        findings
            .0
            .push(format!("expected one CSIDriver, found {}", drivers.len()));
    }
    for driver in drivers {
        if driver.name() != DEFAULT_DRIVER_NAME {
            findings.add(
                driver,
                "metadata.name",
                format!("the plugin registers as {DEFAULT_DRIVER_NAME}"),
            );
        }
    }
    let expected = format!("/var/lib/kubelet/plugins/{DEFAULT_DRIVER_NAME}/csi.sock");
    for doc in workloads(docs) {
        for (at, c) in containers(doc) {
            for (i, arg) in strings(&c["args"]).into_iter().enumerate() {
                if let Some(path) = arg.strip_prefix("--kubelet-registration-path=")
                    && path != expected
                {
                    findings.add(
                        doc,
                        &format!("{at}.args[{i}]"),
                        format!("must be {expected}"),
                    );
                }
            }
        }
    }
}

/// `hsm-secrets <subcommand> --help`, from the binary this test builds.
fn help(subcommand: &str) -> Result<String, String> {
    let output = Command::new(env!("CARGO_BIN_EXE_hsm-secrets"))
        .args([subcommand, "--help"])
        .env_clear()
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn lists_flag(help: &str, flag: &str) -> bool {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == ']')
        .any(|word| word == flag)
}

/// Every flag and environment variable our containers set is one the binary takes.
fn check_flags(docs: &[Doc], findings: &mut Findings) {
    let mut helps: BTreeMap<String, Result<String, String>> = BTreeMap::new();
    for doc in workloads(docs) {
        for (at, c) in containers(doc) {
            if c["image"] != IMAGE || !c["command"].is_null() {
                continue; // other images, and our image running a shell (init containers)
            }
            let args = strings(&c["args"]);
            let Some(subcommand) = args.first() else {
                findings.add(doc, &format!("{at}.args"), "must start with a subcommand");
                continue;
            };
            let help = helps
                .entry(subcommand.to_string())
                .or_insert_with(|| help(subcommand));
            let help = match help {
                Ok(help) => help,
                Err(e) => {
                    findings.add(
                        doc,
                        &format!("{at}.args[0]"),
                        format!("`hsm-secrets {subcommand} --help` fails: {e}"),
                    );
                    continue;
                }
            };
            for (i, arg) in args.iter().enumerate().skip(1) {
                let Some(flag) = arg
                    .starts_with("--")
                    .then(|| arg.split('=').next().unwrap())
                else {
                    continue;
                };
                if !lists_flag(help, flag) {
                    findings.add(
                        doc,
                        &format!("{at}.args[{i}]"),
                        format!("`hsm-secrets {subcommand} --help` has no {flag}"),
                    );
                }
            }
            for (i, env) in c["env"].as_array().into_iter().flatten().enumerate() {
                let name = env["name"].as_str().unwrap_or("");
                if !help.contains(&format!("[env: {name}=")) {
                    findings.add(
                        doc,
                        &format!("{at}.env[{i}]"),
                        format!("{name} is no variable of `hsm-secrets {subcommand}`"),
                    );
                }
            }
        }
    }
}

/// The value of `--flag=value` among a container's args.
fn flag_value<'a>(c: &'a Value, flag: &str) -> Option<&'a str> {
    strings(&c["args"])
        .into_iter()
        .find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

fn container<'a>(doc: &'a Doc, name: &str) -> Option<(String, &'a Value)> {
    containers(doc).into_iter().find(|(_, c)| c["name"] == name)
}

/// The Secret and key behind a file path in a container, through its mounts.
fn secret_file(doc: &Doc, c: &Value, path: &str) -> Option<(String, String)> {
    let mount = c["volumeMounts"].as_array()?.iter().find(|m| {
        m["mountPath"]
            .as_str()
            .is_some_and(|p| path.starts_with(&format!("{}/", p.trim_end_matches('/'))))
    })?;
    let file = path
        .strip_prefix(mount["mountPath"].as_str()?)?
        .trim_start_matches('/');
    let volume = doc.value["spec"]["template"]["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == mount["name"])?;
    if let Some(host) = volume["hostPath"]["path"].as_str() {
        return Some((format!("hostPath {host}"), file.to_owned()));
    }
    let secret = &volume["secret"];
    let items = secret["items"].as_array()?;
    let key = items.iter().find(|i| i["path"] == file)?["key"].as_str()?;
    Some((secret["secretName"].as_str()?.to_owned(), key.to_owned()))
}

/// The node's agent certificate: its own, a file on the node (hostPath), or, only where
/// pushes from a shared certificate are explicitly allowed, the shared Secret.
fn check_node_identity(node: &Doc, at: &str, plugin: &Value, findings: &mut Findings) {
    let shared_allowed = plugin["env"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["name"] == "HSM_ALLOW_SHARED_AGENT_IDENTITY" && e["value"] == "true");
    let wanted = if shared_allowed {
        "hsm-secrets-agent-tls".to_string()
    } else {
        "hostPath /etc/hsm-secrets/agent-tls".to_string()
    };
    for (flag, key) in [
        ("--agent-tls-ca", "ca.crt"),
        ("--agent-tls-cert", "tls.crt"),
        ("--agent-tls-key", "tls.key"),
    ] {
        let found = flag_value(plugin, flag).and_then(|path| secret_file(node, plugin, path));
        if found != Some((wanted.clone(), key.to_owned())) {
            findings.add(
                node,
                &format!("{at}.args {flag}"),
                format!("must name {key} of {wanted} as mounted: {found:?}"),
            );
        }
    }
}

/// The agent contract: the node serves on a port the controller dials, both with the
/// certificates of their own Secret (keys ca.crt, tls.crt, tls.key).
fn check_agent_contract(docs: &[Doc], findings: &mut Findings) {
    let node = workloads(docs).find(|d| d.is("DaemonSet", "hsm-secrets-node"));
    let controller = workloads(docs).find(|d| d.is("Deployment", "hsm-secrets-controller"));
    let (Some(node), Some(controller)) = (node, controller) else {
        findings
            .0
            .push("the node DaemonSet or the controller Deployment is missing".into());
        return;
    };
    let Some((node_at, plugin)) = container(node, "node-plugin") else {
        findings.add(
            node,
            "spec.template.spec.containers",
            "no node-plugin container",
        );
        return;
    };
    let Some((controller_at, ctl)) = container(controller, "controller") else {
        findings.add(
            controller,
            "spec.template.spec.containers",
            "no controller container",
        );
        return;
    };
    let listen_port = flag_value(plugin, "--agent-listen")
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<i64>().ok());
    let agent_port = plugin["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "agent");
    match (listen_port, agent_port) {
        (Some(port), Some(declared))
            if declared["containerPort"] == port && declared["hostPort"] == port => {}
        _ => findings.add(
            node,
            &format!("{node_at}.ports"),
            "port `agent` (containerPort and hostPort) must be the --agent-listen port",
        ),
    }
    let dialed = flag_value(ctl, "--agent-port").and_then(|p| p.parse::<i64>().ok());
    if dialed.is_none() || dialed != listen_port {
        findings.add(
            controller,
            &format!("{controller_at}.args"),
            format!(
                "--agent-port {dialed:?} is not the node's --agent-listen port {listen_port:?}"
            ),
        );
    }
    check_node_identity(node, &node_at, plugin, findings);
    {
        let (doc, at, c, secret) = (
            controller,
            &controller_at,
            ctl,
            "hsm-secrets-controller-tls",
        );
        for (flag, key) in [
            ("--agent-tls-ca", "ca.crt"),
            ("--agent-tls-cert", "tls.crt"),
            ("--agent-tls-key", "tls.key"),
        ] {
            let found = flag_value(c, flag).and_then(|path| secret_file(doc, c, path));
            if found != Some((secret.to_owned(), key.to_owned())) {
                findings.add(
                    doc,
                    &format!("{at}.args {flag}"),
                    format!("must name key {key} of Secret {secret} as mounted: {found:?}"),
                );
            }
        }
    }
}

fn check_controller(docs: &[Doc], findings: &mut Findings) {
    let Some(doc) = workloads(docs).find(|d| d.is("Deployment", "hsm-secrets-controller")) else {
        return;
    };
    if doc.value["spec"]["replicas"] != 2 {
        findings.add(doc, "spec.replicas", "two replicas, one holding the Lease");
    }
    let config = ControllerConfig::default();
    let lease = format!(
        "coordination.k8s.io/leases:update@{NAMESPACE}[{}]",
        config.lease_name
    );
    if !grants_of(docs, "hsm-secrets-controller").contains(&lease) {
        findings.add(
            doc,
            "(RBAC)",
            format!("the Lease the controller takes is {lease}"),
        );
    }
    let Some((at, c)) = container(doc, "controller") else {
        return;
    };
    // Each replica needs its own Lease identity, and the Lease lives in this namespace.
    for (i, env) in c["env"].as_array().into_iter().flatten().enumerate() {
        let field = &env["valueFrom"]["fieldRef"]["fieldPath"];
        let expected = match env["name"].as_str() {
            Some("POD_NAME") => "metadata.name",
            Some("POD_NAMESPACE") => "metadata.namespace",
            _ => continue,
        };
        if field != expected {
            findings.add(
                doc,
                &format!("{at}.env[{i}]"),
                format!("must come from {expected}"),
            );
        }
    }
    let env_names: Vec<&str> = c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    if !env_names.contains(&"POD_NAME") {
        findings.add(
            doc,
            &format!("{at}.env"),
            "POD_NAME (the Lease identity) is missing",
        );
    }
}

// ---------------------------------------------------------------------------------------

#[test]
fn kustomizations_reach_every_manifest_and_only_existing_files() {
    let mut findings = Findings::default();
    let mut reached = top_level(&mut findings).files;
    for overlay in overlays() {
        reached.extend(build(&overlay, &mut findings).files);
    }
    let mut files = Vec::new();
    yaml_files(&root().join("manifests"), &mut files);
    for file in files {
        if !reached.contains(&file) {
            findings.file(
                &relative(&file),
                "(file)",
                "no kustomization lists it: `kubectl apply -k` would not install it",
            );
        }
    }
    findings.assert_none("kustomizations");
}

#[test]
fn the_installation_has_the_components_of_the_design() {
    let mut findings = Findings::default();
    let docs = top_level(&mut findings).docs;
    for (kind, name) in [
        ("Namespace", NAMESPACE),
        ("CustomResourceDefinition", "hsmdevices.hsmsecrets.io"),
        ("CustomResourceDefinition", "hsmsecrets.hsmsecrets.io"),
        ("Deployment", "hsm-secrets-controller"),
        ("Deployment", "hsm-secrets-webhook"),
        ("Service", "hsm-secrets-webhook"),
        ("PodDisruptionBudget", "hsm-secrets-webhook"),
        ("MutatingWebhookConfiguration", "hsm-secrets"),
        ("ValidatingWebhookConfiguration", "hsm-secrets"),
        ("DaemonSet", "hsm-secrets-node"),
        ("CSIDriver", DEFAULT_DRIVER_NAME),
    ] {
        if !docs.iter().any(|d| d.is(kind, name)) {
            findings.0.push(format!(
                "manifests/kustomization.yaml installs no {kind} {name}"
            ));
        }
    }
    let node = docs.iter().find(|d| d.is("DaemonSet", "hsm-secrets-node"));
    for sidecar in ["node-driver-registrar", "liveness-probe"] {
        if node.and_then(|n| container(n, sidecar)).is_none() {
            findings
                .0
                .push(format!("the node DaemonSet has no {sidecar} container"));
        }
    }
    // The generated CRDs are installed as generated.
    let generated: Vec<Value> =
        serde_saphyr::from_multiple(&hsm_secrets::crd::crd_yaml().unwrap()).unwrap();
    for crd in generated {
        let name = crd["metadata"]["name"].as_str().unwrap();
        match docs.iter().find(|d| d.is("CustomResourceDefinition", name)) {
            Some(doc) if doc.value == crd => {}
            _ => findings.0.push(format!(
                "manifests/crds/crds.yaml: CRD {name} differs from crdgen: UPDATE_GENERATED=1 cargo test --test install crd::"
            )),
        }
    }
    findings.assert_none("components");
}

#[test]
fn the_installation_is_consistent_least_privilege_and_matches_the_binary() {
    let mut findings = Findings::default();
    let docs = top_level(&mut findings).docs;
    check_all(&docs, &mut findings);
    findings.assert_none("manifests/kustomization.yaml");
}

#[test]
fn every_overlay_is_the_full_installation_patched_consistently() {
    let mut top = Findings::default();
    let base = top_level(&mut top);
    let top_kustomization = parse_file(&root().join("manifests/kustomization.yaml"));
    let components: Vec<&str> = strings(&top_kustomization[0].value["resources"]);
    for overlay in overlays() {
        let mut findings = Findings::default();
        let built = build(&overlay, &mut findings);
        let name = relative(&overlay);
        // The overlay lists the components one by one (kustomize refuses the parent
        // directory that contains it); none may be forgotten.
        for component in &components {
            let path = root().join("manifests").join(component);
            let listed = parse_file(&overlay.join("kustomization.yaml"))[0].value["resources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .any(|r| overlay.join(r).canonicalize().ok() == path.canonicalize().ok());
            if !listed {
                findings.file(
                    &format!("{name}/kustomization.yaml"),
                    "resources",
                    format!("does not include ../../{component}"),
                );
            }
        }
        for doc in &base.docs {
            if !built.docs.iter().any(|d| d.is(doc.kind(), doc.name())) {
                findings.add(doc, "(object)", format!("missing from {name}"));
            }
        }
        check_all(&built.docs, &mut findings);
        findings.assert_none(&name);
    }
}

#[test]
fn the_softhsm_overlay_creates_the_token_the_plugin_opens() {
    let mut findings = Findings::default();
    let built = build(
        &root().join("manifests/overlays/softhsm-dev"),
        &mut findings,
    );
    findings.assert_none("softhsm-dev");
    let ds = built
        .docs
        .iter()
        .find(|d| d.is("DaemonSet", "hsm-secrets-node"))
        .unwrap();
    let (_, init) = container(ds, "softhsm-init").expect("an init container creating the token");
    let (_, plugin) = container(ds, "node-plugin").unwrap();
    let env = |name: &str| {
        plugin["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap()
            .to_owned()
    };
    assert_eq!(env("HSM_PKCS11_LIBRARY"), "/usr/lib/softhsm/libsofthsm2.so");
    let script = strings(&init["args"]).join("\n");
    assert!(script.contains("softhsm2-util --init-token"), "{script}");
    assert!(
        script.contains(&format!("--label {}", env("HSM_TOKEN_LABEL"))),
        "the token created is the one the plugin opens: {script}"
    );
    // The init container and the plugin share SoftHSM's token directory.
    let token_dir = |c: &Value| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == "/var/lib/softhsm/tokens")
            .map(|m| m["name"].clone())
    };
    assert!(token_dir(init).is_some());
    assert_eq!(token_dir(init), token_dir(plugin));
    // It reads the PIN from the same file the plugin does.
    assert!(
        script.contains(&format!("cat {}", env("HSM_PIN_FILE"))),
        "{script}"
    );
    let pin = built
        .docs
        .iter()
        .find(|d| d.is("Secret", "prod-hsm-pin"))
        .expect("a development PIN Secret");
    assert!(pin.value["stringData"]["pin"].is_string());
}

/// The paths of both webhook configurations and the webhook's probes are routes of the
/// real router with the real rules: a POST with an AdmissionReview is answered.
#[tokio::test]
async fn webhook_configurations_and_probes_reach_routes_the_webhook_serves() {
    let mut findings = Findings::default();
    let docs = top_level(&mut findings).docs;
    let (app, _, _) = kit::admission::app(hsm_secrets::admission::MemoryState::new());
    let review = kit::admission::fixture("pod_create_plain.json");
    let paths = webhook_paths(&docs);
    assert!(paths.len() >= 4, "{paths:?}");
    for (doc, field, path) in paths {
        let response =
            kit::admission::post(&app, &path, serde_json::to_vec(&review).unwrap()).await;
        if response.status() != 200 {
            findings.add(
                doc,
                &field,
                format!(
                    "POST {path} answers {}, not an AdmissionReview",
                    response.status()
                ),
            );
        }
    }
    let webhook = docs
        .iter()
        .find(|d| d.is("Deployment", "hsm-secrets-webhook"))
        .unwrap();
    for (at, c) in containers(webhook) {
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let Some(path) = c[probe]["httpGet"]["path"].as_str() else {
                continue;
            };
            let request = http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap();
            let status = tower::ServiceExt::oneshot(app.clone(), request)
                .await
                .unwrap()
                .status();
            if status == 404 || status == 405 {
                findings.add(
                    webhook,
                    &format!("{at}.{probe}.httpGet.path"),
                    format!("GET {path} answers {status}"),
                );
            }
        }
    }
    findings.assert_none("webhook routes");
}

/// The checks above can fail, and say where: break copies of the real manifests.
#[test]
fn a_broken_manifest_is_reported_with_file_object_and_field() {
    let mut findings = Findings::default();
    let docs = top_level(&mut findings).docs;
    findings.assert_none("setup");

    type Breakage = (&'static str, fn(&mut Vec<Doc>), &'static str);
    let cases: &[Breakage] = &[
        (
            "volumeMount without volume",
            |docs| {
                let ds = docs
                    .iter_mut()
                    .find(|d| d.is("DaemonSet", "hsm-secrets-node"))
                    .unwrap();
                ds.value["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["name"] =
                    json!("sockets");
            },
            "manifests/node/daemonset.yaml: DaemonSet hsm-secrets-system/hsm-secrets-node: spec.template.spec.containers[0] (node-plugin).volumeMounts[0].name: no volume named `sockets`",
        ),
        (
            "misspelled field",
            |docs| {
                let d = docs
                    .iter_mut()
                    .find(|d| d.is("Deployment", "hsm-secrets-controller"))
                    .unwrap();
                let spec = d.value["spec"]["template"]["spec"].as_object_mut().unwrap();
                let sa = spec.remove("serviceAccountName").unwrap();
                spec.insert("serviceAcountName".into(), sa);
            },
            "manifests/controller/deployment.yaml: Deployment hsm-secrets-system/hsm-secrets-controller: spec.template.spec.serviceAcountName: is not a Deployment field",
        ),
        (
            "wildcard verb",
            |docs| {
                let r = docs
                    .iter_mut()
                    .find(|d| d.is("ClusterRole", "hsm-secrets-controller"))
                    .unwrap();
                r.value["rules"][0]["verbs"] = json!(["*"]);
            },
            "manifests/controller/rbac.yaml: ClusterRole hsm-secrets-controller: rules[0].verbs: no wildcards",
        ),
        (
            "node allowed to write",
            |docs| {
                let r = docs
                    .iter_mut()
                    .find(|d| d.is("ClusterRole", "hsm-secrets-node"))
                    .unwrap();
                r.value["rules"][0]["verbs"] = json!(["get", "list", "watch", "update"]);
            },
            "grant hsmsecrets.io/hsmsecrets:update is broader than what the component does",
        ),
        (
            "controller without finalizers",
            |docs| {
                let r = docs
                    .iter_mut()
                    .find(|d| d.is("ClusterRole", "hsm-secrets-controller"))
                    .unwrap();
                r.value["rules"].as_array_mut().unwrap().remove(4);
            },
            "grant hsmsecrets.io/hsmsecrets/finalizers:update is missing",
        ),
        (
            "unknown flag",
            |docs| {
                let d = docs
                    .iter_mut()
                    .find(|d| d.is("Deployment", "hsm-secrets-webhook"))
                    .unwrap();
                d.value["spec"]["template"]["spec"]["containers"][0]["args"][1] =
                    json!("--bootstrap-certs");
            },
            "manifests/webhook/deployment.yaml: Deployment hsm-secrets-system/hsm-secrets-webhook: spec.template.spec.containers[0] (webhook).args[1]: `hsm-secrets webhook --help` has no --bootstrap-certs",
        ),
        (
            "Service port to nowhere",
            |docs| {
                let s = docs
                    .iter_mut()
                    .find(|d| d.is("Service", "hsm-secrets-webhook"))
                    .unwrap();
                s.value["spec"]["ports"][0]["targetPort"] = json!("http");
            },
            "manifests/webhook/service.yaml: Service hsm-secrets-system/hsm-secrets-webhook: spec.ports[0].targetPort: \"http\" is no container port of Deployment hsm-secrets-webhook",
        ),
        (
            "webhook to a missing Service",
            |docs| {
                let w = docs
                    .iter_mut()
                    .find(|d| d.is("ValidatingWebhookConfiguration", "hsm-secrets"))
                    .unwrap();
                w.value["webhooks"][1]["clientConfig"]["service"]["name"] = json!("hsm-webhook");
            },
            "manifests/webhook/webhooks.yaml: ValidatingWebhookConfiguration hsm-secrets: webhooks[1].clientConfig.service: Service hsm-webhook is not defined",
        ),
        (
            "root controller",
            |docs| {
                let d = docs
                    .iter_mut()
                    .find(|d| d.is("Deployment", "hsm-secrets-controller"))
                    .unwrap();
                d.value["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = json!(0);
            },
            "Deployment hsm-secrets-system/hsm-secrets-controller: spec.template.spec.securityContext: runAsNonRoot: true and runAsUser: 65532",
        ),
        (
            "agent port mismatch",
            |docs| {
                let d = docs
                    .iter_mut()
                    .find(|d| d.is("Deployment", "hsm-secrets-controller"))
                    .unwrap();
                d.value["spec"]["template"]["spec"]["containers"][0]["args"][1] =
                    json!("--agent-port=7443");
            },
            "--agent-port Some(7443) is not the node's --agent-listen port Some(9443)",
        ),
        (
            "unbound ServiceAccount",
            |docs| {
                docs.retain(|d| !d.is("ClusterRoleBinding", "hsm-secrets-node"));
            },
            "manifests/node/serviceaccount.yaml: ServiceAccount hsm-secrets-system/hsm-secrets-node: metadata.name: no RoleBinding or ClusterRoleBinding names it",
        ),
    ];
    for (what, break_it, expected) in cases {
        let mut broken = docs.clone();
        break_it(&mut broken);
        let mut findings = Findings::default();
        check_all(&broken, &mut findings);
        assert!(
            findings.0.iter().any(|f| f.contains(expected)),
            "{what}: expected a finding containing\n  {expected}\ngot:\n  {}",
            findings.0.join("\n  ")
        );
    }
}
