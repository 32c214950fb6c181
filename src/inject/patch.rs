//! The RFC 6902 patch that adds the HSM secrets volume to a pod.
//!
//! Only `add` operations, each at a path whose parent exists in the pod as
//! sent (a missing list or object is added whole), so the API server applies
//! the patch to exactly the pod we looked at.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use serde_json::{Value, json};

use super::annotations::{InjectionSpec, NodeAffinityMode};
use super::error::InjectError;
use super::pod_view::{ContainerView, PodView};
use super::{
    ANNOTATION_STATUS, ATTRIBUTE_DEVICE, ATTRIBUTE_FILE_MODE, ATTRIBUTE_SECRETS, CSI_DRIVER,
    STATUS_INJECTED, VOLUME_NAME,
};
use crate::contract::node_ready_label;

/// Weight of the preferred node affinity term: the strongest preference.
const PREFERRED_WEIGHT: i32 = 100;

/// The CSI inline volume for `spec`, reading from `device`.
pub fn injected_volume(spec: &InjectionSpec, device: &str) -> Value {
    let mut attributes = serde_json::Map::new();
    attributes.insert(ATTRIBUTE_SECRETS.into(), spec.secrets.join(",").into());
    attributes.insert(ATTRIBUTE_DEVICE.into(), device.into());
    attributes.insert(
        ATTRIBUTE_FILE_MODE.into(),
        spec.file_mode.to_string().into(),
    );
    for (key, value) in spec.layout.attributes() {
        attributes.insert(key, value.into());
    }
    json!({
        "name": VOLUME_NAME,
        "csi": {
            "driver": CSI_DRIVER,
            "readOnly": true,
            "volumeAttributes": attributes,
        }
    })
}

/// Which list a selected container is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ContainerList {
    Containers,
    InitContainers,
}

impl ContainerList {
    fn field(self) -> &'static str {
        match self {
            ContainerList::Containers => "containers",
            ContainerList::InitContainers => "initContainers",
        }
    }
}

/// The patch injecting `request` (reading from `device`) into a pod with
/// `spec`; `has_annotations` says whether `metadata.annotations` exists.
/// Empty when the pod already carries the volume.
pub fn injection_patch(
    spec: &PodView,
    has_annotations: bool,
    request: &InjectionSpec,
    device: &str,
) -> Result<Patch, InjectError> {
    if spec.is_injected() {
        return Ok(Patch(Vec::new()));
    }
    if let Some(index) = spec
        .volumes
        .iter()
        .flatten()
        .position(|volume| volume.name == VOLUME_NAME)
    {
        return Err(InjectError::VolumeNameTaken {
            name: VOLUME_NAME.to_owned(),
            index,
        });
    }
    let selected = select_containers(spec, request.containers.as_deref())?;
    let mount_path = request.mount_path.as_str();
    for (_, _, container) in &selected {
        if let Some(mount) = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|mount| normalized(&mount.mount_path) == mount_path)
        {
            return Err(InjectError::MountPathTaken {
                container: container.name.clone(),
                volume: mount.name.clone(),
                path: mount.mount_path.clone(),
            });
        }
    }

    let mut operations = Vec::with_capacity(selected.len() + 3);
    let volume = injected_volume(request, device);
    operations.push(match &spec.volumes {
        Some(_) => add(["spec", "volumes", "-"], volume),
        None => add(["spec", "volumes"], Value::Array(vec![volume])),
    });
    let mount = json!({"name": VOLUME_NAME, "mountPath": mount_path, "readOnly": true});
    for (list, index, container) in &selected {
        let index = index.to_string();
        let at = ["spec", list.field(), index.as_str(), "volumeMounts"];
        operations.push(match &container.volume_mounts {
            Some(_) => add(at.iter().copied().chain(["-"]), mount.clone()),
            None => add(at, Value::Array(vec![mount.clone()])),
        });
    }
    operations.extend(affinity_operations(spec, request.node_affinity, device));
    operations.push(match has_annotations {
        true => add(
            ["metadata", "annotations", ANNOTATION_STATUS],
            Value::from(STATUS_INJECTED),
        ),
        false => add(
            ["metadata", "annotations"],
            json!({ ANNOTATION_STATUS: STATUS_INJECTED }),
        ),
    });
    Ok(Patch(operations))
}

/// The containers to mount into, with where they sit in the pod: every
/// regular container by default; init containers only when named.
fn select_containers<'a>(
    spec: &'a PodView,
    names: Option<&[String]>,
) -> Result<Vec<(ContainerList, usize, &'a ContainerView)>, InjectError> {
    let init = spec.init_containers.as_deref().unwrap_or_default();
    let Some(names) = names else {
        if spec.containers.is_empty() {
            return Err(InjectError::NoContainers);
        }
        return Ok(spec
            .containers
            .iter()
            .enumerate()
            .map(|(index, container)| (ContainerList::Containers, index, container))
            .collect());
    };
    names
        .iter()
        .map(|name| {
            let find = |list: &'a [ContainerView], kind| {
                list.iter()
                    .position(|c| &c.name == name)
                    .map(|index| (kind, index, &list[index]))
            };
            find(&spec.containers, ContainerList::Containers)
                .or_else(|| find(init, ContainerList::InitContainers))
                .ok_or_else(|| InjectError::UnknownContainer {
                    name: name.clone(),
                    available: spec
                        .containers
                        .iter()
                        .map(|c| c.name.clone())
                        .chain(init.iter().map(|c| format!("{} (init)", c.name)))
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        })
        .collect()
}

/// Node affinity towards nodes labelled `hsmsecrets.io/device.<device>=ready`.
fn affinity_operations(
    spec: &PodView,
    mode: NodeAffinityMode,
    device: &str,
) -> Vec<PatchOperation> {
    let expression = json!({
        "key": node_ready_label(device),
        "operator": "In",
        "values": [crate::contract::READY_LABEL_VALUE],
    });
    let affinity = spec.affinity.as_ref();
    let node_affinity = affinity.and_then(|a| a.node_affinity.as_ref());
    const NODE_AFFINITY: [&str; 3] = ["spec", "affinity", "nodeAffinity"];
    match mode {
        NodeAffinityMode::None => Vec::new(),
        NodeAffinityMode::Preferred => {
            let term = json!({"weight": PREFERRED_WEIGHT, "preference": {"matchExpressions": [expression]}});
            const FIELD: &str = "preferredDuringSchedulingIgnoredDuringExecution";
            vec![match node_affinity {
                None if affinity.is_none() => add(
                    ["spec", "affinity"],
                    json!({"nodeAffinity": {FIELD: [term]}}),
                ),
                None => add(NODE_AFFINITY, json!({FIELD: [term]})),
                Some(node)
                    if node
                        .preferred_during_scheduling_ignored_during_execution
                        .is_none() =>
                {
                    add(NODE_AFFINITY.into_iter().chain([FIELD]), json!([term]))
                }
                Some(_) => add(NODE_AFFINITY.into_iter().chain([FIELD, "-"]), term),
            }]
        }
        NodeAffinityMode::Required => {
            // Terms are ORed and expressions within a term ANDed: the device
            // requirement joins every existing term, so no term can bypass it.
            const FIELD: &str = "requiredDuringSchedulingIgnoredDuringExecution";
            let selector =
                json!({"nodeSelectorTerms": [{"matchExpressions": [expression.clone()]}]});
            let required = node_affinity.and_then(|node| {
                node.required_during_scheduling_ignored_during_execution
                    .as_ref()
            });
            match (affinity, node_affinity, required) {
                (None, _, _) => vec![add(
                    ["spec", "affinity"],
                    json!({"nodeAffinity": {FIELD: selector}}),
                )],
                (Some(_), None, _) => vec![add(NODE_AFFINITY, json!({FIELD: selector}))],
                (Some(_), Some(_), None) => {
                    vec![add(NODE_AFFINITY.into_iter().chain([FIELD]), selector)]
                }
                (Some(_), Some(_), Some(required)) if required.node_selector_terms.is_empty() => {
                    vec![add(
                        NODE_AFFINITY
                            .into_iter()
                            .chain([FIELD, "nodeSelectorTerms", "-"]),
                        json!({"matchExpressions": [expression]}),
                    )]
                }
                (Some(_), Some(_), Some(required)) => required
                    .node_selector_terms
                    .iter()
                    .enumerate()
                    .map(|(index, term)| {
                        let index = index.to_string();
                        let at = NODE_AFFINITY.into_iter().chain([
                            FIELD,
                            "nodeSelectorTerms",
                            index.as_str(),
                            "matchExpressions",
                        ]);
                        match &term.match_expressions {
                            Some(_) => add(at.chain(["-"]), expression.clone()),
                            None => add(at, json!([expression])),
                        }
                    })
                    .collect(),
            }
        }
    }
}

fn add<'t>(path: impl IntoIterator<Item = &'t str>, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(path),
        value,
    })
}

/// `/a/b/` and `/a/b` are the same mount point.
fn normalized(path: &str) -> &str {
    match path.strip_suffix('/') {
        Some(rest) if !rest.is_empty() => rest,
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::{InjectRequest, parse_annotations};
    use k8s_openapi::api::core::v1::Pod;

    fn view(pod: &Value) -> PodView {
        PodView::from_spec(&pod["spec"]).expect("pod view")
    }

    fn spec(affinity: &str) -> InjectionSpec {
        let annotations = [
            ("hsmsecrets.io/inject", "true"),
            ("hsmsecrets.io/secrets", "db"),
            ("hsmsecrets.io/node-affinity", affinity),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        match parse_annotations(&annotations) {
            Ok(InjectRequest::Requested(spec)) => spec,
            other => panic!("{other:?}"),
        }
    }

    /// Patch a pod whose spec has `affinity`, and return the resulting
    /// node affinity as JSON.
    fn node_affinity_after(mode: &str, affinity: Value) -> Value {
        let mut pod = json!({
            "metadata": {"annotations": {"hsmsecrets.io/inject": "true"}},
            "spec": {"containers": [{"name": "app"}]},
        });
        if !affinity.is_null() {
            pod["spec"]["affinity"] = affinity;
        }
        let patch = injection_patch(&view(&pod), true, &spec(mode), "d").expect("patch");
        json_patch::patch(&mut pod, &patch).expect("patch applies");
        let _: Pod = serde_json::from_value(pod.clone()).expect("still a pod");
        pod["spec"]["affinity"]["nodeAffinity"].clone()
    }

    fn ours() -> Value {
        json!({"key": "hsmsecrets.io/device.d", "operator": "In", "values": ["ready"]})
    }

    #[test]
    fn affinity_is_added_at_whatever_depth_the_pod_lacks_it() {
        let zone = json!({"key": "zone", "operator": "In", "values": ["a"]});
        let preferred = json!([{"weight": 100, "preference": {"matchExpressions": [ours()]}}]);
        let required = json!({"nodeSelectorTerms": [{"matchExpressions": [ours()]}]});
        let cases = [
            (
                "preferred",
                Value::Null,
                json!({"preferredDuringSchedulingIgnoredDuringExecution": preferred}),
            ),
            (
                "preferred",
                json!({"podAffinity": {}}),
                json!({"preferredDuringSchedulingIgnoredDuringExecution": preferred}),
            ),
            (
                "preferred",
                json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [zone]}]}}}),
                json!({"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [zone]}]},
                       "preferredDuringSchedulingIgnoredDuringExecution": preferred}),
            ),
            (
                "preferred",
                json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 5, "preference": {"matchExpressions": [zone]}}]}}),
                json!({"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 5, "preference": {"matchExpressions": [zone]}},
                    {"weight": 100, "preference": {"matchExpressions": [ours()]}}]}),
            ),
            (
                "required",
                Value::Null,
                json!({"requiredDuringSchedulingIgnoredDuringExecution": required}),
            ),
            (
                "required",
                json!({"podAntiAffinity": {}}),
                json!({"requiredDuringSchedulingIgnoredDuringExecution": required}),
            ),
            (
                "required",
                json!({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}),
                json!({"preferredDuringSchedulingIgnoredDuringExecution": [], "requiredDuringSchedulingIgnoredDuringExecution": required}),
            ),
            (
                "required",
                json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}),
                json!({"requiredDuringSchedulingIgnoredDuringExecution": required}),
            ),
            (
                "required",
                json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [zone]}, {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]}]}}}),
                json!({"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [zone, ours()]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}], "matchExpressions": [ours()]}]}}),
            ),
            ("none", Value::Null, Value::Null),
        ];
        for (mode, before, after) in cases {
            assert_eq!(
                node_affinity_after(mode, before.clone()),
                after,
                "{mode} on {before}"
            );
        }
    }

    #[test]
    fn a_pod_without_annotations_or_containers() {
        let pod = json!({"spec": {"containers": []}});
        let error = injection_patch(&view(&pod), false, &spec("none"), "d")
            .expect_err("nothing to mount into");
        assert_eq!(error.kind(), "no_containers");

        let mut pod = json!({"metadata": {}, "spec": {"containers": [{"name": "app"}]}});
        let patch = injection_patch(&view(&pod), false, &spec("none"), "d").expect("patch");
        json_patch::patch(&mut pod, &patch).expect("applies");
        assert_eq!(
            pod["metadata"]["annotations"]["hsmsecrets.io/status"],
            "injected"
        );
    }
}
