//! manifests/webhook: every object is a valid Kubernetes object, and the
//! names, ports and paths agree with each other and with the
//! `hsm-secrets webhook` defaults.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use clap::Parser;
use hsm_secrets::cli::webhook::WebhookArgs;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde_json::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/webhook");

/// Every document of every YAML file, keyed by kind (one object per kind).
fn objects() -> BTreeMap<String, Value> {
    let mut objects = BTreeMap::new();
    for entry in std::fs::read_dir(DIR).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") || path.ends_with("kustomization.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_saphyr::from_multiple::<Value>(&text).unwrap() {
            let kind = doc["kind"].as_str().unwrap().to_owned();
            assert!(
                objects.insert(kind.clone(), doc).is_none(),
                "two {kind}s in manifests/webhook"
            );
        }
    }
    objects
}

fn typed<T: DeserializeOwned>(objects: &BTreeMap<String, Value>, kind: &str) -> T {
    serde_json::from_value(objects[kind].clone())
        .unwrap_or_else(|e| panic!("{kind} is not a valid {kind}: {e}"))
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: WebhookArgs,
}

fn defaults() -> WebhookArgs {
    Cli::try_parse_from(["webhook"]).unwrap().args
}

#[test]
fn kustomization_lists_every_file() {
    let text = std::fs::read_to_string(format!("{DIR}/kustomization.yaml")).unwrap();
    let kustomization: Value = serde_saphyr::from_str(&text).unwrap();
    let mut listed: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let mut files: Vec<String> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    files.sort();
    assert_eq!(listed, files);
}

#[test]
fn the_deployment_runs_the_webhook_hardened_and_highly_available() {
    let objects = objects();
    let deployment: Deployment = typed(&objects, "Deployment");
    let args = defaults();
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
    assert_eq!(pod_labels["hsmsecrets.io/component"], "webhook");
    assert_eq!(
        pod.service_account_name.as_deref(),
        Some("hsm-secrets-webhook")
    );
    let security = pod.security_context.unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert!(pod.affinity.unwrap().pod_anti_affinity.is_some());

    let container = &pod.containers[0];
    assert_eq!(
        container.args.as_deref().unwrap(),
        ["webhook", "--bootstrap-certificates"]
    );
    let sc = container.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let resources = container.resources.as_ref().unwrap();
    assert!(resources.requests.is_some() && resources.limits.is_some());
    let port = &container.ports.as_ref().unwrap()[0];
    assert_eq!(port.container_port, i32::from(args.listen.port()));
    for probe in [
        &container.readiness_probe,
        &container.liveness_probe,
        &container.startup_probe,
    ] {
        let http = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(http.scheme.as_deref(), Some("HTTPS"));
    }

    // The mounted Secret is the one the bootstrap writes, at the default paths.
    let env: BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    assert_eq!(env["HSM_WEBHOOK_TLS_CERT"], args.tls_cert.to_str().unwrap());
    assert_eq!(env["HSM_WEBHOOK_TLS_KEY"], args.tls_key.to_str().unwrap());
    let mount = &container.volume_mounts.as_ref().unwrap()[0];
    assert!(args.tls_cert.starts_with(&mount.mount_path));
    let volume = &pod.volumes.as_ref().unwrap()[0];
    let secret = volume.secret.as_ref().unwrap();
    assert_eq!(
        secret.secret_name.as_deref(),
        Some(args.cert_secret.as_str())
    );
    assert_eq!(secret.optional, Some(true));
    let keys: Vec<&str> = secret
        .items
        .iter()
        .flatten()
        .map(|i| i.key.as_str())
        .collect();
    assert_eq!(keys, ["tls.crt", "tls.key"], "the CA key is not mounted");

    let pdb: PodDisruptionBudget = typed(&objects, "PodDisruptionBudget");
    let pdb = pdb.spec.unwrap();
    assert_eq!(pdb.min_available, Some(IntOrString::Int(1)));
    for (key, value) in pdb.selector.unwrap().match_labels.unwrap() {
        assert_eq!(pod_labels.get(&key), Some(&value), "PDB selects the pods");
    }
}

#[test]
fn the_service_and_webhook_configurations_point_at_the_webhook() {
    let objects = objects();
    let args = defaults();
    let service: Service = typed(&objects, "Service");
    assert_eq!(
        service.metadata.name.as_deref(),
        Some(args.service.as_str())
    );
    let port = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
    assert_eq!(port.port, 443);
    assert_eq!(port.target_port, Some(IntOrString::String("https".into())));

    let mutating: MutatingWebhookConfiguration = typed(&objects, "MutatingWebhookConfiguration");
    assert_eq!(
        mutating.metadata.name.as_deref(),
        Some(args.mutating_configuration.as_str())
    );
    let webhooks = mutating.webhooks.unwrap();
    assert_eq!(webhooks.len(), 1);
    let inject = &webhooks[0];
    let target = inject.client_config.service.as_ref().unwrap();
    assert_eq!(
        (
            target.name.as_str(),
            target.namespace.as_str(),
            target.path.as_deref(),
            target.port
        ),
        (
            args.service.as_str(),
            args.namespace.as_str(),
            Some("/mutate"),
            Some(443)
        )
    );
    assert_eq!(inject.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(inject.side_effects, "None");
    assert_eq!(inject.timeout_seconds, Some(5));
    assert_eq!(inject.reinvocation_policy.as_deref(), Some("IfNeeded"));
    assert_eq!(inject.admission_review_versions, ["v1"]);
    let condition = &inject.match_conditions.as_ref().unwrap()[0].expression;
    assert!(condition.contains("'hsmsecrets.io/inject'") && condition.contains("== 'true'"));
    let excluded = &inject
        .namespace_selector
        .as_ref()
        .unwrap()
        .match_expressions
        .as_ref()
        .unwrap()[0];
    assert_eq!(excluded.operator, "NotIn");
    assert_eq!(
        excluded.values.as_deref().unwrap(),
        ["kube-system", args.namespace.as_str()]
    );
    let own_pods = &inject
        .object_selector
        .as_ref()
        .unwrap()
        .match_expressions
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        (own_pods.key.as_str(), own_pods.operator.as_str()),
        ("hsmsecrets.io/component", "NotIn")
    );
    let rule = &inject.rules.as_ref().unwrap()[0];
    assert_eq!(rule.resources.as_deref().unwrap(), ["pods"]);
    assert_eq!(rule.operations.as_deref().unwrap(), ["CREATE"]);

    let validating: ValidatingWebhookConfiguration =
        typed(&objects, "ValidatingWebhookConfiguration");
    assert_eq!(
        validating.metadata.name.as_deref(),
        Some(args.validating_configuration.as_str())
    );
    let mut resources = Vec::new();
    for webhook in validating.webhooks.unwrap() {
        let target = webhook.client_config.service.as_ref().unwrap();
        assert_eq!(
            target.path.as_deref(),
            Some("/validate"),
            "{}",
            webhook.name
        );
        assert_eq!(target.name, args.service);
        assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(webhook.side_effects, "None");
        assert_eq!(webhook.timeout_seconds, Some(5));
        assert_eq!(webhook.admission_review_versions, ["v1"]);
        let rules = webhook.rules.unwrap();
        // With failurePolicy Fail, every UPDATE a webhook sees stops while it is down:
        // the controller's own edits (finalizers, annotations) must never be among them.
        let updates = rules
            .iter()
            .any(|r| r.operations.iter().flatten().any(|o| o == "UPDATE"));
        if updates {
            let conditions = webhook.match_conditions.as_deref().unwrap_or_default();
            assert!(
                !conditions.is_empty(),
                "{} judges every UPDATE; add matchConditions",
                webhook.name
            );
            let expression = &conditions[0].expression;
            assert!(
                expression.contains("oldObject.spec"),
                "{}: {expression}",
                webhook.name
            );
        }
        for rule in rules {
            resources.extend(rule.resources.unwrap());
        }
    }
    resources.sort();
    assert_eq!(resources, ["hsmdevices", "hsmsecrets", "pods"]);
}

fn grants(rules: &[PolicyRule], resource: &str, verb: &str) -> Vec<Option<Vec<String>>> {
    rules
        .iter()
        .filter(|r| r.resources.iter().flatten().any(|x| x == resource))
        .filter(|r| r.verbs.iter().any(|v| v == verb || v == "*"))
        .map(|r| r.resource_names.clone())
        .collect()
}

#[test]
fn rbac_is_least_privilege_by_name() {
    let objects = objects();
    let args = defaults();
    let _: ServiceAccount = typed(&objects, "ServiceAccount");
    let _: ClusterRoleBinding = typed(&objects, "ClusterRoleBinding");
    let _: RoleBinding = typed(&objects, "RoleBinding");
    let cluster_role: ClusterRole = typed(&objects, "ClusterRole");
    let role: Role = typed(&objects, "Role");
    let cluster_rules = cluster_role.rules.unwrap();
    let rules = role.rules.unwrap();

    for verb in ["get", "list", "watch"] {
        assert_eq!(grants(&cluster_rules, "hsmdevices", verb), [None]);
        assert_eq!(grants(&cluster_rules, "hsmsecrets", verb), [None]);
    }
    for resource in [
        "mutatingwebhookconfigurations",
        "validatingwebhookconfigurations",
    ] {
        for verb in ["get", "patch"] {
            assert_eq!(
                grants(&cluster_rules, resource, verb),
                [Some(vec![args.mutating_configuration.clone()])],
                "{verb} {resource}"
            );
        }
        assert!(grants(&cluster_rules, resource, "update").is_empty());
    }
    for verb in ["create", "update", "delete", "patch"] {
        assert!(
            grants(&cluster_rules, "hsmsecrets", verb).is_empty(),
            "{verb}"
        );
    }
    assert!(
        grants(&cluster_rules, "secrets", "get").is_empty(),
        "no cluster-wide Secret access"
    );

    for verb in ["get", "update"] {
        assert_eq!(
            grants(&rules, "secrets", verb),
            [Some(vec![args.cert_secret.clone()])]
        );
        assert_eq!(
            grants(&rules, "leases", verb),
            [Some(vec![args.lease.clone()])]
        );
    }
    // `create` cannot be limited by name; it is the only unnamed grant.
    assert_eq!(grants(&rules, "secrets", "create"), [None]);
    assert_eq!(grants(&rules, "leases", "create"), [None]);
    assert!(grants(&rules, "secrets", "list").is_empty());
    assert_eq!(
        role.metadata.namespace.as_deref(),
        Some(args.namespace.as_str())
    );
}
