//! Pods: injection on `/mutate`, the read-only rule on `/validate`.

use std::collections::BTreeMap;

use hsm_secrets_webhook::{AdmissionRequest, Decision, DynamicObject, Operation};
use serde_json::Value;

use super::Verdict;
use super::state::AdmissionState;
use crate::inject::{
    self, CSI_DRIVER, InjectError, InjectRequest, InjectionSpec, PodView, SecretReference,
};

/// Decide on a pod sent to `/mutate`.
pub fn mutate(request: &AdmissionRequest<DynamicObject>, state: &dyn AdmissionState) -> Verdict {
    if request.sub_resource.is_some() {
        return Verdict::allow("subresource");
    }
    // Volumes cannot change after creation, and a running pod must never be
    // rewritten: anything but CREATE passes untouched.
    if request.operation != Operation::Create {
        return Verdict::allow("not_create");
    }
    let Some(pod) = &request.object else {
        return Verdict::allow("no_object");
    };
    if let Some(phase) = pod.data.pointer("/status/phase").and_then(Value::as_str)
        && phase != "Pending"
    {
        return Verdict::allow("not_pending");
    }
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let spec = match inject::parse_annotations(annotations) {
        Ok(InjectRequest::Requested(spec)) => Ok(spec),
        Ok(InjectRequest::NotRequested { ignored }) => {
            let mut verdict = Verdict::allow("not_requested");
            if !ignored.is_empty() {
                verdict = verdict.with_warning(format!(
                    "{} ignored: hsmsecrets.io/inject is not \"true\"",
                    ignored.join(", ")
                ));
            }
            return verdict;
        }
        Err(error) => Err(error),
    };
    let pod_spec = match PodView::from_spec(pod.data.get("spec").unwrap_or(&Value::Null)) {
        Ok(pod_spec) => pod_spec,
        Err(error) => {
            return Verdict::refuse(&InjectError::UnreadablePod {
                detail: error.to_string(),
            });
        }
    };
    // A pod that already carries the volume is never patched nor refused
    // again (reinvocation, repeated admission), whatever its annotations say.
    if pod_spec.is_injected() {
        return Verdict::allow("already_injected");
    }
    let spec = match spec {
        Ok(spec) => spec,
        Err(error) => return Verdict::refuse(&error),
    };
    // Pods created by controllers carry no namespace in metadata on CREATE;
    // the request's namespace is the authoritative one.
    let namespace = request
        .namespace
        .as_deref()
        .or(pod.metadata.namespace.as_deref())
        .unwrap_or("default");
    match inject_into(&pod_spec, annotations.is_empty(), &spec, namespace, state) {
        Ok(verdict) => verdict,
        Err(error) => Verdict::refuse(&error),
    }
}

fn inject_into(
    pod_spec: &PodView,
    no_annotations: bool,
    spec: &InjectionSpec,
    namespace: &str,
    state: &dyn AdmissionState,
) -> Result<Verdict, InjectError> {
    let secrets: Vec<_> = spec
        .secrets
        .iter()
        .map(|name| (name, state.secret(namespace, name)))
        .collect();
    let references: Vec<_> = secrets
        .iter()
        .map(|(name, secret)| SecretReference {
            name,
            device: secret.as_ref().map(|s| s.spec.device_ref.as_str()),
        })
        .collect();
    let resolution = inject::resolve_device(spec.device.as_deref(), &references, namespace)?;
    // The keys an HSMSecret reports are what the node will render: a name they cannot
    // take is refused now rather than at every mount attempt.
    for (name, secret) in &secrets {
        let Some(status) = secret.as_ref().and_then(|s| s.status.as_ref()) else {
            continue;
        };
        if !status.keys.is_empty() {
            let keys: Vec<&str> = status.keys.iter().map(String::as_str).collect();
            spec.layout.rendered_names(name, &keys)?;
        }
    }
    let patch = inject::injection_patch(pod_spec, !no_annotations, spec, &resolution.device)?;

    let mut verdict = Verdict {
        decision: Decision::patch(patch),
        reason: "injected",
    };
    for missing in &resolution.missing_secrets {
        verdict = verdict.with_warning(format!(
            "HSMSecret {namespace}/{missing} does not exist yet; the pod starts once it does"
        ));
    }
    if state.device(&resolution.device).is_none() {
        verdict = verdict.with_warning(format!(
            "HSMDevice {} does not exist yet; the volume mounts once it does",
            resolution.device
        ));
    }
    let service_account = pod_spec.service_account();
    for (name, secret) in &secrets {
        let Some(secret) = secret else { continue };
        let allowed = secret.spec.allowed_service_accounts();
        if !allowed.is_empty() && !allowed.iter().any(|sa| sa == service_account) {
            verdict = verdict.with_warning(format!(
                "service account {service_account} may not mount HSMSecret {name} \
                 (spec.access.serviceAccounts); the volume will fail to mount"
            ));
        }
    }
    for unknown in &spec.unknown_annotations {
        verdict = verdict.with_warning(match likely_meant(unknown) {
            Some(known) => format!("unknown annotation {unknown} ignored; did you mean {known}?"),
            None => format!(
                "unknown annotation {unknown} ignored; known: inject, secrets, mount-path, \
                 containers, file-mode, node-affinity, device, and per secret \
                 file-mode.<secret>, key-names.<secret>, path.<secret>, format.<secret>"
            ),
        });
    }
    Ok(verdict)
}

/// The known annotation an unknown one differs from only in case and
/// punctuation (`mountPath`, `mount_path`, `fileMode`).
fn likely_meant(unknown: &str) -> Option<&'static str> {
    let squash = |key: &str| -> String {
        key.chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let wanted = squash(unknown);
    inject::KNOWN_ANNOTATIONS
        .iter()
        .copied()
        .find(|known| squash(known) == wanted)
}

/// Decide on a pod sent to `/validate`: a pod may mount the driver only
/// read-only. Only CREATE is checked: volumes are immutable, and refusing
/// updates of an existing pod would block its finalizers and labels.
pub fn validate(request: &AdmissionRequest<DynamicObject>) -> Verdict {
    if request.sub_resource.is_some() || request.operation != Operation::Create {
        return Verdict::allow("not_create");
    }
    let Some(pod) = &request.object else {
        return Verdict::allow("no_object");
    };
    let volumes = pod
        .data
        .pointer("/spec/volumes")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (index, volume) in volumes.iter().enumerate() {
        let Some(csi) = volume.get("csi") else {
            continue;
        };
        if csi.get("driver").and_then(Value::as_str) != Some(CSI_DRIVER) {
            continue;
        }
        let name = volume.get("name").and_then(Value::as_str).unwrap_or("");
        // The node plugin's own parser: what it would refuse at publish is refused here,
        // for a volume written by hand as for one the injection added.
        let attributes: BTreeMap<String, String> = csi
            .get("volumeAttributes")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let namespace = request
            .namespace
            .as_deref()
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or("default");
        if let Err(error) = crate::node::VolumeAttributes::parse(&attributes, namespace) {
            return Verdict::deny(
                400,
                "invalid_volume_attributes",
                format!("volume {name:?} (spec.volumes[{index}].csi.volumeAttributes): {error}"),
            );
        }
        if csi.get("readOnly").and_then(Value::as_bool) != Some(true) {
            return Verdict::deny(
                403,
                "csi_not_read_only",
                format!(
                    "volume {name:?} (spec.volumes[{index}]) uses CSI driver {CSI_DRIVER} without \
                     readOnly: true; HSM secrets are served read-only: set \
                     spec.volumes[{index}].csi.readOnly to true, or let the hsmsecrets.io/inject \
                     annotation add the volume"
                ),
            );
        }
    }
    Verdict::allow("read_only")
}
