//! HSMDevices: refuse specs that cannot work.

use std::collections::BTreeSet;
use std::sync::Arc;

use hsm_secrets_webhook::{AdmissionRequest, DynamicObject, Operation};
use kube::ResourceExt as _;
use serde::Deserialize as _;

use super::Verdict;
use super::state::AdmissionState;
use crate::crd::{HSMDevice, HSMDeviceSpec, MirroringPolicy, MirroringSpec, SiteRole};
use crate::inject::{validate_device_name, validate_object_name};

const SYNC_INTERVAL_RANGE: (u32, u32) = (10, 86_400);
const FAILOVER_THRESHOLD_RANGE: (u32, u32) = (1, 100);

/// Decide on an HSMDevice sent to `/validate`.
pub fn validate(request: &AdmissionRequest<DynamicObject>, state: &dyn AdmissionState) -> Verdict {
    if request.sub_resource.is_some() {
        return Verdict::allow("subresource");
    }
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return Verdict::allow("not_a_write");
    }
    let Some(object) = &request.object else {
        return Verdict::allow("no_object");
    };
    let name = object.metadata.name.as_deref().unwrap_or(&request.name);
    let spec = match read_spec(object) {
        Ok(spec) => spec,
        Err(error) => {
            return Verdict::deny(
                400,
                "unreadable_hsmdevice",
                format!("HSMDevice {name} spec cannot be read: {error}; fix the manifest's spec"),
            );
        }
    };
    // A device created before this webhook may not pass today's checks; its
    // metadata (finalizers, labels) must stay editable as long as its spec
    // is left alone.
    if request.operation == Operation::Update
        && let Some(old) = &request.old_object
        && read_spec(old).ok().as_ref() == Some(&spec)
    {
        return Verdict::allow("spec_unchanged");
    }
    if request.operation == Operation::Update
        && let Some(old) = &request.old_object
        && let Ok(old_spec) = read_spec(old)
        && let Some(refusal) = site_transition_refusal(name, &old_spec, site_role(old), &spec)
    {
        return Verdict::deny(409, "site_change_needs_promotion", refusal);
    }
    let mut problems = spec_problems(&spec);
    if request.operation == Operation::Create
        && let Some(reason) = validate_device_name(name)
    {
        problems.insert(0, format!("metadata.name {name:?} {reason}"));
    }
    problems.extend(token_conflicts(name, &spec, &state.devices()));
    let mut verdict = if problems.is_empty() {
        Verdict::allow("valid")
    } else {
        let numbered: Vec<String> = problems
            .iter()
            .enumerate()
            .map(|(i, problem)| format!("({}) {problem}", i + 1))
            .collect();
        Verdict::deny(
            400,
            "invalid_spec",
            format!("HSMDevice {name} cannot work: {}", numbered.join("; ")),
        )
    };
    if let Some(mirroring) = &spec.mirroring
        && mirroring.policy == MirroringPolicy::None
        && mirroring.auto_failover == Some(true)
    {
        verdict = verdict.with_warning(
            "mirroring.autoFailover has no effect with policy None: there is no mirror to promote",
        );
    }
    verdict
}

/// The site role the stored object's status reports (`status.site.role`).
fn site_role(object: &DynamicObject) -> Option<SiteRole> {
    let role = object.data.pointer("/status/site/role")?;
    SiteRole::deserialize(role).ok()
}

/// Why a spec change must go through the site commands instead: a passive site that loses
/// its `followArchive` would take writes without fencing the active site (two sites
/// writing); an active site that gains one would turn passive without being fenced (and
/// without its lost writes reported); a fenced site that loses `spec.site` would forget
/// that it was fenced. A site that never reported is judged by its spec.
pub fn site_transition_refusal(
    name: &str,
    old: &HSMDeviceSpec,
    role: Option<SiteRole>,
    new: &HSMDeviceSpec,
) -> Option<String> {
    let old_site = old.site.as_ref()?;
    let new_site = new.site.as_ref();
    let old_follows = old_site.follow_archive.is_some();
    let new_follows = new_site.is_some_and(|s| s.follow_archive.is_some());
    let passive = match role {
        Some(role) => role == SiteRole::Passive,
        None => old_follows,
    };
    match role {
        Some(SiteRole::Fenced) if new_site.is_none() => Some(format!(
            "HSMDevice {name}: spec.site cannot be removed from site {}: another site was \
             promoted over it, and without spec.site it would forget that; keep spec.site and \
             rejoin it as a passive site (kubectl hsm site rejoin {name})",
            old_site.name
        )),
        _ if passive && old_follows && !new_follows => Some(format!(
            "HSMDevice {name}: site {} is passive; removing spec.site{} would let it take \
             writes while the active site still does; promote it instead (kubectl hsm site \
             promote {name}): that fences the active site first, then removes followArchive",
            old_site.name,
            if new_site.is_none() {
                ""
            } else {
                ".followArchive"
            }
        )),
        Some(SiteRole::Active) if !old_follows && new_follows => Some(format!(
            "HSMDevice {name}: site {} is active; adding spec.site.followArchive would make it \
             passive without fencing it; promote the other site (kubectl hsm site promote on \
             its device), which fences this one, then rejoin this one (kubectl hsm site rejoin \
             {name}); if this is a manifest re-applied after a promotion, remove \
             followArchive from it",
            old_site.name
        )),
        _ => None,
    }
}

fn read_spec(object: &DynamicObject) -> Result<HSMDeviceSpec, serde_json::Error> {
    HSMDeviceSpec::deserialize(object.data.get("spec").unwrap_or(&serde_json::Value::Null))
}

/// Every reason `spec` cannot work on its own, each naming the field and the fix.
pub fn spec_problems(spec: &HSMDeviceSpec) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(mirroring) = &spec.mirroring else {
        return problems;
    };
    if let Some(primary) = &mirroring.primary_node {
        if mirroring.target_nodes.contains(primary) {
            problems.push(format!(
                "mirroring.primaryNode {primary:?} is also listed in mirroring.targetNodes; a node \
                 is either the primary or a mirror: remove it from targetNodes"
            ));
        }
        if let Some(reason) = validate_object_name(primary) {
            problems.push(format!(
                "mirroring.primaryNode {primary:?} is not a node name: it {reason}"
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for (index, node) in mirroring.target_nodes.iter().enumerate() {
        if !seen.insert(node) {
            problems.push(format!(
                "mirroring.targetNodes lists {node:?} twice; list each mirror node once"
            ));
        }
        if let Some(reason) = validate_object_name(node) {
            problems.push(format!(
                "mirroring.targetNodes[{index}] {node:?} is not a node name: it {reason}"
            ));
        }
    }
    if mirroring.policy == MirroringPolicy::None && !mirroring.target_nodes.is_empty() {
        problems.push(
            "mirroring.policy None has no mirrors, yet mirroring.targetNodes is set; use policy \
             ReadOnly or Active to mirror to those nodes, or remove targetNodes"
                .into(),
        );
    }
    if let Some(interval) = mirroring.sync_interval {
        let (min, max) = SYNC_INTERVAL_RANGE;
        if !(min..=max).contains(&interval) {
            problems.push(format!(
                "mirroring.syncInterval {interval} is out of range; use {min} to {max} seconds"
            ));
        }
    }
    if let Some(threshold) = mirroring.failover_threshold {
        let (min, max) = FAILOVER_THRESHOLD_RANGE;
        if !(min..=max).contains(&threshold) {
            problems.push(format!(
                "mirroring.failoverThreshold {threshold} is out of range; use {min} to {max} \
                 consecutive failed checks"
            ));
        }
    }
    problems
}

/// The nodes whose token a device claims; `None` means every node that has
/// the token (no explicit node list).
fn claimed_nodes(mirroring: Option<&MirroringSpec>) -> Option<BTreeSet<&str>> {
    let mirroring = mirroring?;
    let mut nodes: BTreeSet<&str> = mirroring.target_nodes.iter().map(String::as_str).collect();
    if nodes.is_empty() && mirroring.policy != MirroringPolicy::None {
        return None; // mirrors on every node that has the token
    }
    nodes.extend(mirroring.primary_node.as_deref());
    (!nodes.is_empty()).then_some(nodes)
}

/// Other devices that claim the same token (same module, label and serial)
/// on a node this one claims too: two devices would write one token.
pub fn token_conflicts(name: &str, spec: &HSMDeviceSpec, others: &[Arc<HSMDevice>]) -> Vec<String> {
    let mine = claimed_nodes(spec.mirroring.as_ref());
    let mut conflicts = Vec::new();
    for other in others {
        let other_name = other.name_any();
        if other_name == name {
            continue;
        }
        let (a, b) = (&spec.pkcs11, &other.spec.pkcs11);
        let same_token = a.library == b.library
            && a.token_label == b.token_label
            && match (&a.token_serial, &b.token_serial) {
                (Some(x), Some(y)) => x == y,
                _ => true,
            };
        if !same_token {
            continue;
        }
        let theirs = claimed_nodes(other.spec.mirroring.as_ref());
        let overlap = match (&mine, &theirs) {
            (Some(mine), Some(theirs)) => {
                let shared: Vec<&str> = mine.intersection(theirs).copied().collect();
                if shared.is_empty() {
                    continue;
                }
                format!("on node(s) {}", shared.join(", "))
            }
            _ => "on every node that has the token (one of them lists no mirroring.targetNodes)"
                .to_owned(),
        };
        conflicts.push(format!(
            "pkcs11.tokenLabel {:?} of {} is already claimed by HSMDevice {other_name} {overlap}; \
             give each device its own token (another label or tokenSerial), or list disjoint \
             nodes",
            a.token_label, a.library
        ));
    }
    conflicts
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: serde_json::Value) -> HSMDeviceSpec {
        let mut base = json!({
            "pkcs11": {"library": "/usr/lib/softhsm/libsofthsm2.so", "tokenLabel": "prod",
                       "pinSecretRef": {"namespace": "hsm", "name": "pin"}}
        });
        if let Some(mirroring) = value.get("mirroring") {
            base["mirroring"] = mirroring.clone();
        }
        if let Some(pkcs11) = value.get("pkcs11").and_then(|p| p.as_object()) {
            for (k, v) in pkcs11 {
                base["pkcs11"][k] = v.clone();
            }
        }
        serde_json::from_value(base).expect("spec")
    }

    #[test]
    fn impossible_specs_are_named() {
        let cases = [
            (
                json!({"mirroring": {"policy": "ReadOnly", "primaryNode": "a", "targetNodes": ["a", "b"]}}),
                "also listed",
            ),
            (
                json!({"mirroring": {"policy": "ReadOnly", "targetNodes": ["b", "b"]}}),
                "twice",
            ),
            (
                json!({"mirroring": {"policy": "None", "targetNodes": ["b"]}}),
                "policy None",
            ),
            (
                json!({"mirroring": {"policy": "ReadOnly", "syncInterval": 5}}),
                "syncInterval 5",
            ),
            (
                json!({"mirroring": {"policy": "ReadOnly", "syncInterval": 100000}}),
                "syncInterval 100000",
            ),
            (
                json!({"mirroring": {"policy": "Active", "failoverThreshold": 0}}),
                "failoverThreshold 0",
            ),
            (
                json!({"mirroring": {"policy": "Active", "failoverThreshold": 101}}),
                "failoverThreshold 101",
            ),
            (
                json!({"mirroring": {"policy": "Active", "targetNodes": ["Worker_2"]}}),
                "targetNodes[0]",
            ),
        ];
        for (input, expected) in cases {
            let problems = spec_problems(&spec(input.clone()));
            assert_eq!(problems.len(), 1, "{input}: {problems:?}");
            assert!(problems[0].contains(expected), "{input}: {problems:?}");
        }
        for good in [
            json!({}),
            json!({"mirroring": {"policy": "None", "primaryNode": "a"}}),
            json!({"mirroring": {"policy": "ReadOnly", "primaryNode": "a", "targetNodes": ["b", "c"],
                                 "syncInterval": 10, "failoverThreshold": 100}}),
        ] {
            assert_eq!(
                spec_problems(&spec(good.clone())),
                Vec::<String>::new(),
                "{good}"
            );
        }
    }

    fn device(name: &str, value: serde_json::Value) -> Arc<HSMDevice> {
        Arc::new(HSMDevice::new(name, spec(value)))
    }

    #[test]
    fn a_token_is_claimed_by_one_device_per_node() {
        let existing = vec![
            device(
                "a",
                json!({"mirroring": {"policy": "ReadOnly", "primaryNode": "n1", "targetNodes": ["n2"]}}),
            ),
            device("other-token", json!({"pkcs11": {"tokenLabel": "other"}})),
        ];
        let cases = [
            (
                json!({"mirroring": {"policy": "ReadOnly", "primaryNode": "n2", "targetNodes": ["n3"]}}),
                Some("n2"),
            ),
            (
                json!({"mirroring": {"policy": "ReadOnly", "primaryNode": "n3", "targetNodes": ["n4"]}}),
                None,
            ),
            (
                json!({"mirroring": {"policy": "ReadOnly"}}),
                Some("every node"),
            ),
            (json!({}), Some("every node")),
            (
                json!({"mirroring": {"policy": "None", "primaryNode": "n1"}}),
                Some("n1"),
            ),
            (
                json!({"pkcs11": {"library": "/opt/yubihsm/pkcs11.so"}}),
                None,
            ),
            (
                json!({"pkcs11": {"tokenLabel": "third"}, "mirroring": {"policy": "None", "primaryNode": "n1"}}),
                None,
            ),
        ];
        for (input, expected) in cases {
            let conflicts = token_conflicts("b", &spec(input.clone()), &existing);
            match expected {
                None => assert!(conflicts.is_empty(), "{input}: {conflicts:?}"),
                Some(text) => {
                    assert_eq!(conflicts.len(), 1, "{input}: {conflicts:?}");
                    assert!(conflicts[0].contains("HSMDevice a"), "{conflicts:?}");
                    assert!(conflicts[0].contains(text), "{input}: {conflicts:?}");
                }
            }
        }
        // Distinct serials are distinct tokens, even with one label.
        let serial = |s: &str| json!({"pkcs11": {"tokenSerial": s}});
        let with_serial = vec![device("a", serial("1111"))];
        assert!(token_conflicts("b", &spec(serial("2222")), &with_serial).is_empty());
        assert_eq!(
            token_conflicts("b", &spec(serial("1111")), &with_serial).len(),
            1
        );
        // A device never conflicts with itself (UPDATE).
        assert!(token_conflicts("a", &spec(json!({})), &existing).is_empty());
    }

    #[test]
    fn a_site_leaves_passive_or_fenced_only_through_the_site_commands() {
        let with_site = |site: serde_json::Value| {
            let mut spec = spec(json!({}));
            spec.site = serde_json::from_value(site).expect("site");
            spec
        };
        let passive = with_site(json!({"name": "b", "followArchive": {"url": "s3://dr",
            "credentialsSecret": "s", "device": "prod-hsm-a"}}));
        let active = with_site(json!({"name": "b"}));
        let none = spec(json!({}));
        let refused = |old, role, new| site_transition_refusal("prod-hsm-b", old, role, new);
        let cases = [
            (
                &passive,
                Some(SiteRole::Passive),
                &active,
                Some("promote prod-hsm-b"),
            ),
            (
                &passive,
                Some(SiteRole::Passive),
                &none,
                Some("removing spec.site would"),
            ),
            // Promoted: the promotion itself removes followArchive.
            (&passive, Some(SiteRole::Active), &active, None),
            // Never reported: judged by its spec, still passive.
            (&passive, None, &active, Some("promote prod-hsm-b")),
            // An active site gains followArchive: only through a fence and a rejoin.
            (
                &active,
                Some(SiteRole::Active),
                &passive,
                Some("without fencing it"),
            ),
            (&active, None, &passive, None),
            (
                &active,
                Some(SiteRole::Fenced),
                &none,
                Some("rejoin prod-hsm-b"),
            ),
            // Rejoin: a fenced site gains followArchive.
            (&active, Some(SiteRole::Fenced), &passive, None),
            (&active, Some(SiteRole::Active), &none, None),
            (&none, None, &passive, None),
        ];
        for (n, (old, role, new, expected)) in cases.into_iter().enumerate() {
            let refusal = refused(old, role, new);
            match expected {
                Some(text) => assert!(
                    refusal.as_deref().is_some_and(|r| r.contains(text)),
                    "case {n}: {refusal:?}"
                ),
                None => assert_eq!(refusal, None, "case {n}"),
            }
        }
    }
}
