//! HSMSecrets: refuse writes into a device that has no writable primary, or whose site
//! takes no writes (passive or fenced).

use std::fmt;

use hsm_secrets_webhook::{AdmissionRequest, DynamicObject, Operation};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde::Deserialize as _;

use super::Verdict;
use super::state::AdmissionState;
use crate::crd::{DevicePhase, DeviceRole, HSMDevice, HSMSecretSpec, NodeHealth, SiteRole};
use crate::mirror::site::SiteRefusal;

/// Decide on an HSMSecret sent to `/validate`.
pub fn validate(
    request: &AdmissionRequest<DynamicObject>,
    state: &dyn AdmissionState,
    now: Timestamp,
) -> Verdict {
    if request.sub_resource.is_some() {
        return Verdict::allow("subresource");
    }
    match request.operation {
        // Deleting never needs the primary now: the controller writes the
        // tombstone (deletionPolicy: Delete) once a primary can take it.
        Operation::Delete => return Verdict::allow("delete"),
        Operation::Connect => return Verdict::allow("connect"),
        Operation::Create | Operation::Update => {}
    }
    let Some(object) = &request.object else {
        return Verdict::allow("no_object");
    };
    let new = match read_spec(object) {
        Ok(spec) => spec,
        Err(verdict) => return verdict,
    };
    let old = match (&request.operation, &request.old_object) {
        (Operation::Update, Some(old)) => read_spec(old).ok(),
        _ => None,
    };
    let namespace = request
        .namespace
        .as_deref()
        .or(object.metadata.namespace.as_deref())
        .unwrap_or("default");
    let name = object.metadata.name.as_deref().unwrap_or(&request.name);

    let Some(device) = state.device(&new.device_ref) else {
        return Verdict::allow("unknown_device").with_warning(format!(
            "HSMDevice {} does not exist; HSMSecret {namespace}/{name} waits until it does",
            new.device_ref
        ));
    };
    if !writes_into_hsm(old.as_ref(), &new) {
        return Verdict::allow("no_write");
    }
    if let Some(refusal) = site_refusal(&device) {
        return Verdict::deny(
            409,
            refusal.kind(),
            format!("HSMSecret {namespace}/{name} imports data, a write, and {refusal}"),
        );
    }
    match write_block(&device, now) {
        // 409, not 503: clients retry a 503 on their own (kube's client for minutes), and
        // this refusal must reach the user at once.
        Some(block) => Verdict::deny(
            409,
            "no_writable_primary",
            format!(
                "HSMSecret {namespace}/{name} imports data into {block} (spec.source is a write \
                 into the HSM; other HSMSecret changes are not blocked)"
            ),
        ),
        None => Verdict::allow("import_allowed"),
    }
}

fn read_spec(object: &DynamicObject) -> Result<HSMSecretSpec, Verdict> {
    let spec = object.data.get("spec").unwrap_or(&serde_json::Value::Null);
    HSMSecretSpec::deserialize(spec).map_err(|error| {
        Verdict::deny(
            400,
            "unreadable_hsmsecret",
            format!("HSMSecret spec cannot be read: {error}; fix the manifest's spec"),
        )
    })
}

/// Whether admitting `new` (replacing `old`, on UPDATE) makes the controller
/// write into the HSM: an import is declared, or it changed, or it must be
/// redone on another device.
pub fn writes_into_hsm(old: Option<&HSMSecretSpec>, new: &HSMSecretSpec) -> bool {
    let Some(source) = &new.source else {
        return false;
    };
    match old {
        None => true,
        Some(old) => old.source.as_ref() != Some(source) || old.device_ref != new.device_ref,
    }
}

/// Why `device`'s site takes no writes: a passive site (its spec follows another site's
/// archive, until the status says it was promoted) or a fenced one.
pub fn site_refusal(device: &HSMDevice) -> Option<SiteRefusal> {
    let spec = device.spec.site.as_ref()?;
    let status = device.status.as_ref().and_then(|s| s.site.as_ref());
    let name = kube::ResourceExt::name_any(device);
    match (status.map(|s| s.role), &spec.follow_archive) {
        (Some(SiteRole::Fenced), _) => {
            let status = status?;
            Some(SiteRefusal::Fenced {
                site: format!("{} (HSMDevice {name})", spec.name),
                by: status.fenced_by.clone().unwrap_or_else(|| "?".into()),
                site_epoch: status.site_epoch,
                fence_sequence: status.fence_sequence.unwrap_or(0),
            })
        }
        (Some(SiteRole::Active), _) | (_, None) => None,
        (_, Some(follow)) => Some(SiteRefusal::Passive {
            site: format!("{} (HSMDevice {name})", spec.name),
            active: format!("HSMDevice {}", follow.device),
        }),
    }
}

/// Why `device` cannot take a write now, as the user needs to read it.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteBlock {
    pub device: String,
    pub phase: DevicePhase,
    /// The primary that is unavailable (status, else the spec's preferred one).
    pub primary: Option<String>,
    pub since: Option<Time>,
    /// How long that is before `now`.
    pub for_how_long: Option<SignedDuration>,
    /// Healthy nodes a manual failover could promote.
    pub candidates: Vec<String>,
}

/// `Some` when `device` has no writable primary: read-only fallback, failed,
/// or no primary elected.
pub fn write_block(device: &HSMDevice, now: Timestamp) -> Option<WriteBlock> {
    let status = device.status.clone().unwrap_or_default();
    let blocked = matches!(
        status.phase,
        DevicePhase::ReadOnlyFallback | DevicePhase::Failed
    ) || status.primary_node.is_none();
    if !blocked {
        return None;
    }
    let primary = status
        .primary_node
        .clone()
        .or_else(|| device.mirroring().primary_node);
    let candidates = status
        .nodes
        .iter()
        .filter(|node| node.health == NodeHealth::Healthy && node.role != DeviceRole::Primary)
        .filter(|node| Some(&node.node) != primary.as_ref())
        .map(|node| node.node.clone())
        .collect();
    let since = status.primary_unavailable_since.clone();
    Some(WriteBlock {
        device: kube::ResourceExt::name_any(device),
        phase: status.phase,
        for_how_long: since.as_ref().map(|since| now.duration_since(since.0)),
        primary,
        since,
        candidates,
    })
}

impl fmt::Display for WriteBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let device = &self.device;
        write!(f, "HSMDevice {device}, which has no writable primary: ")?;
        match (&self.primary, self.phase) {
            (Some(primary), DevicePhase::ReadOnlyFallback | DevicePhase::Failed) => {
                write!(f, "primary {primary} is unavailable")?
            }
            (Some(primary), _) => write!(
                f,
                "the controller has not confirmed a primary yet (preferred: {primary})"
            )?,
            (None, _) => write!(f, "the controller has not elected a primary yet")?,
        }
        if let Some(since) = &self.since {
            write!(f, " since {}", since.0)?;
            if let Some(elapsed) = self.for_how_long {
                write!(f, " ({} ago)", human(elapsed))?;
            }
        }
        write!(f, ", phase {:?}. ", self.phase)?;
        if self.phase == DevicePhase::ReadOnlyFallback {
            write!(f, "Mounts keep being served by the mirrors. ")?;
        }
        let target = match self.candidates.as_slice() {
            [] => "<node>".to_owned(),
            [only] => only.clone(),
            _ => "<node>".to_owned(),
        };
        match &self.primary {
            Some(primary) => write!(f, "Writes resume when {primary} recovers, or after ")?,
            None => write!(f, "Writes resume once a primary is elected, or after ")?,
        }
        write!(
            f,
            "`kubectl hsm failover {device} --to {target}` promotes a mirror"
        )?;
        if self.candidates.len() > 1 {
            write!(f, " (healthy: {})", self.candidates.join(", "))?;
        }
        Ok(())
    }
}

/// `45s`, `12m`, `3h5m`, `2d4h`: precise enough to tell a blip from an outage.
fn human(elapsed: SignedDuration) -> String {
    let seconds = elapsed.as_secs().max(0);
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{
        DeviceNodeStatus, HSMDeviceSpec, HSMDeviceStatus, LocalSecretRef, SecretSource,
    };

    fn spec(device: &str, source: Option<&str>) -> HSMSecretSpec {
        serde_json::from_value(serde_json::json!({
            "deviceRef": device,
            "source": source.map(|name| SecretSource {
                secret_ref: LocalSecretRef { name: name.into() },
                delete_after_import: None,
                mode: None,
            }),
        }))
        .expect("spec")
    }

    #[test]
    fn only_new_or_changed_imports_are_writes() {
        let cases = [
            (None, spec("d", None), false),
            (None, spec("d", Some("src")), true),
            (Some(spec("d", Some("src"))), spec("d", Some("src")), false),
            (Some(spec("d", None)), spec("d", Some("src")), true),
            (Some(spec("d", Some("src"))), spec("d", Some("other")), true),
            (Some(spec("d", Some("src"))), spec("e", Some("src")), true),
            (Some(spec("d", Some("src"))), spec("d", None), false),
            (Some(spec("d", None)), spec("e", None), false),
        ];
        for (old, new, write) in cases {
            assert_eq!(
                writes_into_hsm(old.as_ref(), &new),
                write,
                "{old:?} -> {new:?}"
            );
        }
    }

    fn device(status: Option<HSMDeviceStatus>) -> HSMDevice {
        let spec: HSMDeviceSpec = serde_json::from_value(serde_json::json!({
            "pkcs11": {"library": "/usr/lib/softhsm/libsofthsm2.so", "tokenLabel": "prod",
                       "pinSecretRef": {"namespace": "hsm", "name": "pin"}},
            "mirroring": {"policy": "ReadOnly", "primaryNode": "worker-1",
                          "targetNodes": ["worker-2", "worker-3"]}
        }))
        .expect("device spec");
        let mut device = HSMDevice::new("prod-hsm", spec);
        device.status = status;
        device
    }

    fn node(name: &str, role: DeviceRole, health: NodeHealth) -> DeviceNodeStatus {
        serde_json::from_value(serde_json::json!({"node": name, "role": role, "health": health}))
            .expect("node status")
    }

    #[test]
    fn passive_and_fenced_sites_refuse_imports_naming_the_active_site() {
        let mut passive = device(None);
        passive.spec.site = Some(
            serde_json::from_value(serde_json::json!({"name": "site-b", "followArchive": {
                "url": "s3://a", "credentialsSecret": "s", "device": "prod-hsm-a"}}))
            .expect("site"),
        );
        let refusal = site_refusal(&passive).expect("passive").to_string();
        assert!(
            refusal.contains("site-b (HSMDevice prod-hsm) is passive")
                && refusal.contains("HSMDevice prod-hsm-a")
                && refusal.contains("kubectl hsm site promote"),
            "{refusal}"
        );
        // Promoted: the status says Active, the spec still names the archive it followed.
        let mut promoted = passive.clone();
        promoted.status = Some(
            serde_json::from_value(
                serde_json::json!({"site": {"name": "site-b", "role": "Active"}}),
            )
            .expect("status"),
        );
        assert_eq!(site_refusal(&promoted), None);
        let mut fenced = device(None);
        fenced.spec.site =
            Some(serde_json::from_value(serde_json::json!({"name": "site-a"})).expect("site"));
        assert_eq!(site_refusal(&fenced), None, "an active site");
        fenced.status = Some(
            serde_json::from_value(
                serde_json::json!({"site": {"name": "site-a", "role": "Fenced",
                "fencedBy": "site-b", "siteEpoch": 1, "fenceSequence": 40}}),
            )
            .expect("status"),
        );
        let refusal = site_refusal(&fenced).expect("fenced").to_string();
        assert!(
            refusal.contains("site site-b was promoted") && refusal.contains("from sequence 40"),
            "{refusal}"
        );
    }

    #[test]
    fn a_ready_primary_takes_writes() {
        let status = HSMDeviceStatus {
            primary_node: Some("worker-1".into()),
            phase: DevicePhase::Ready,
            ..HSMDeviceStatus::default()
        };
        assert_eq!(write_block(&device(Some(status)), Timestamp::now()), None);
        let degraded = HSMDeviceStatus {
            primary_node: Some("worker-1".into()),
            phase: DevicePhase::Degraded,
            ..HSMDeviceStatus::default()
        };
        assert_eq!(write_block(&device(Some(degraded)), Timestamp::now()), None);
    }

    #[test]
    fn read_only_fallback_names_primary_since_and_the_way_out() {
        let since: Timestamp = "2025-03-01T10:00:00Z".parse().expect("time");
        let now: Timestamp = "2025-03-01T10:12:30Z".parse().expect("time");
        let status = HSMDeviceStatus {
            primary_node: Some("worker-1".into()),
            phase: DevicePhase::ReadOnlyFallback,
            primary_unavailable_since: Some(Time(since)),
            nodes: vec![
                node("worker-1", DeviceRole::Primary, NodeHealth::Unhealthy),
                node("worker-2", DeviceRole::ReadOnly, NodeHealth::Healthy),
                node("worker-3", DeviceRole::ReadOnly, NodeHealth::Unhealthy),
            ],
            ..HSMDeviceStatus::default()
        };
        let block = write_block(&device(Some(status)), now).expect("blocked");
        let message = block.to_string();
        for expected in [
            "HSMDevice prod-hsm",
            "primary worker-1 is unavailable",
            "since 2025-03-01T10:00:00Z (12m ago)",
            "ReadOnlyFallback",
            "when worker-1 recovers",
            "`kubectl hsm failover prod-hsm --to worker-2`",
        ] {
            assert!(
                message.contains(expected),
                "missing {expected:?} in: {message}"
            );
        }
    }

    #[test]
    fn no_primary_yet_blocks_writes() {
        for status in [None, Some(HSMDeviceStatus::default())] {
            let message = write_block(&device(status), Timestamp::now())
                .expect("blocked")
                .to_string();
            assert!(message.contains("has not confirmed a primary"), "{message}");
            assert!(
                message.contains("kubectl hsm failover prod-hsm --to <node>"),
                "{message}"
            );
        }
        let failed = HSMDeviceStatus {
            primary_node: Some("worker-1".into()),
            phase: DevicePhase::Failed,
            ..HSMDeviceStatus::default()
        };
        let message = write_block(&device(Some(failed)), Timestamp::now())
            .expect("blocked")
            .to_string();
        assert!(message.contains("phase Failed"), "{message}");
        assert!(!message.contains("Mounts keep"), "{message}");
    }

    #[test]
    fn durations_read_like_an_operator_would_say_them() {
        for (seconds, text) in [
            (5, "5s"),
            (125, "2m"),
            (3 * 3600 + 300, "3h5m"),
            (2 * 86400 + 4 * 3600, "2d4h"),
            (-3, "0s"),
        ] {
            assert_eq!(human(SignedDuration::from_secs(seconds)), text);
        }
    }
}
