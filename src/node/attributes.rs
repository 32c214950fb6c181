//! The volume context of a publish request: our attributes (set on the pod's CSI volume,
//! normally by the injection webhook) and kubelet's pod information.
//!
//! Pure parsing: every problem becomes [`VolumeError::InvalidAttribute`] naming the
//! attribute and the fix.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use hsm_secrets_csi::source::pod_info;

use super::VolumeError;
use crate::hsm::SecretPath;
use crate::inject::{FileMode, Spelling, VolumeLayout};

/// Comma-separated HSMSecret names of the pod's namespace.
pub const SECRETS: &str = crate::contract::ATTRIBUTE_SECRETS;
/// Name of the HSMDevice that holds the secrets.
pub const DEVICE: &str = crate::contract::ATTRIBUTE_DEVICE;
/// Octal permission bits of every file, e.g. `0440`.
pub const FILE_MODE: &str = crate::contract::ATTRIBUTE_FILE_MODE;
/// Owner and group may read; the pod reads through its fsGroup.
pub const DEFAULT_FILE_MODE: FileMode = FileMode::DEFAULT;
/// Bounds the work (and the tmpfs) of one volume.
pub const MAX_SECRETS_PER_VOLUME: usize = 64;

/// Who is asking, as kubelet reports it (`CSIDriver.podInfoOnMount: true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

/// One entry of the `secrets` attribute. `namespace` is the pod's unless the entry was
/// spelled `<namespace>/<name>`; access control refuses any other namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

impl SecretRef {
    pub fn path(&self) -> Result<SecretPath, VolumeError> {
        SecretPath::new(&self.namespace, &self.name).map_err(|e| VolumeError::InvalidAttribute {
            attribute: SECRETS,
            problem: format!("entry {:?} is not a valid HSMSecret name ({e})", self.name),
            fix: "use the metadata.name of an HSMSecret in the pod's namespace".into(),
        })
    }
}

/// This driver's own attributes of a volume, validated: the one parser the node plugin
/// applies at every publish and the validating webhook applies to a pod's CSI volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeAttributes {
    pub secrets: Vec<SecretRef>,
    pub device: String,
    pub file_mode: FileMode,
    /// Per-secret names, modes and formats (`fileMode.<secret>` …).
    pub layout: VolumeLayout,
}

impl VolumeAttributes {
    /// Parses the `secrets`, `device` and `fileMode` attributes of a volume of a pod in
    /// `pod_namespace`.
    pub fn parse(
        context: &BTreeMap<String, String>,
        pod_namespace: &str,
    ) -> Result<Self, VolumeError> {
        let secrets = parse_secrets(context.get(SECRETS).map(String::as_str), pod_namespace)?;
        let device = match context.get(DEVICE).map(|d| d.trim()) {
            Some(d) if !d.is_empty() => d.to_string(),
            _ => {
                return Err(VolumeError::InvalidAttribute {
                    attribute: DEVICE,
                    problem: "is missing".into(),
                    fix: "set it to the name of the HSMDevice holding the secrets (the \
                          injection webhook sets it from the HSMSecrets' deviceRef)"
                        .into(),
                });
            }
        };
        let file_mode = match context.get(FILE_MODE).map(|m| m.trim()) {
            None | Some("") => DEFAULT_FILE_MODE,
            Some(raw) => parse_file_mode(raw)?,
        };
        let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
        let layout = VolumeLayout::parse(
            context.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            Spelling::Attribute,
            &names,
        )?;
        Ok(Self {
            secrets,
            device,
            file_mode,
            layout,
        })
    }
}

/// A validated volume context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRequest {
    pub pod: PodIdentity,
    pub secrets: Vec<SecretRef>,
    pub device: String,
    pub file_mode: FileMode,
    pub layout: VolumeLayout,
}

impl VolumeRequest {
    /// Parses `context`; `target_path` (already validated as kubelet's layout by the csi
    /// crate) must belong to the pod kubelet names.
    pub fn parse(
        context: &BTreeMap<String, String>,
        target_path: &Path,
    ) -> Result<Self, VolumeError> {
        let ephemeral = context.get(pod_info::EPHEMERAL).map(String::as_str);
        if ephemeral != Some("true") {
            return Err(VolumeError::InvalidAttribute {
                attribute: pod_info::EPHEMERAL,
                problem: match ephemeral {
                    Some(v) => format!("is {v:?}"),
                    None => "is missing".into(),
                },
                fix: "only CSI inline ephemeral volumes are supported: declare the volume in \
                      the pod under spec.volumes[].csi (the CSIDriver lists \
                      volumeLifecycleModes: [Ephemeral]), not through a PersistentVolume"
                    .into(),
            });
        }
        let pod = PodIdentity {
            namespace: pod_attribute(context, pod_info::POD_NAMESPACE)?,
            name: pod_attribute(context, pod_info::POD_NAME)?,
            uid: pod_attribute(context, pod_info::POD_UID)?,
            service_account: pod_attribute(context, pod_info::SERVICE_ACCOUNT)?,
        };
        check_pod_uid(&pod.uid, target_path)?;
        let VolumeAttributes {
            secrets,
            device,
            file_mode,
            layout,
        } = VolumeAttributes::parse(context, &pod.namespace)?;
        Ok(Self {
            pod,
            secrets,
            device,
            file_mode,
            layout,
        })
    }
}

fn pod_attribute(
    context: &BTreeMap<String, String>,
    key: &'static str,
) -> Result<String, VolumeError> {
    match context.get(key) {
        Some(v) if !v.is_empty() => Ok(v.clone()),
        _ => Err(VolumeError::InvalidAttribute {
            attribute: key,
            problem: "is missing".into(),
            fix: "kubelet sends pod information only when the CSIDriver csi.hsmsecrets.io has \
                  podInfoOnMount: true (manifests/node/csidriver.yaml)"
                .into(),
        }),
    }
}

/// The target is `<kubelet>/pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount`: the files
/// of one pod must never land in another pod's directory.
fn check_pod_uid(uid: &str, target_path: &Path) -> Result<(), VolumeError> {
    let target_uid = target_path
        .ancestors()
        .nth(4)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str());
    if target_uid == Some(uid) {
        return Ok(());
    }
    Err(VolumeError::InvalidAttribute {
        attribute: pod_info::POD_UID,
        problem: format!(
            "is {uid:?} but the target path belongs to pod {:?}",
            target_uid.unwrap_or("")
        ),
        fix: "the request must come from kubelet for the pod that owns the target path".into(),
    })
}

fn parse_secrets(raw: Option<&str>, pod_namespace: &str) -> Result<Vec<SecretRef>, VolumeError> {
    let invalid = |problem: String, fix: &str| VolumeError::InvalidAttribute {
        attribute: SECRETS,
        problem,
        fix: fix.into(),
    };
    let raw = raw.map(str::trim).unwrap_or("");
    if raw.is_empty() {
        return Err(invalid(
            "is missing".into(),
            "list the HSMSecret names to mount, comma-separated (e.g. \"db-credentials,api-key\")",
        ));
    }
    let mut seen = BTreeSet::new();
    let mut secrets = Vec::new();
    for entry in raw.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(invalid(
                format!("{raw:?} has an empty entry"),
                "separate HSMSecret names with single commas",
            ));
        }
        let secret = match entry.split_once('/') {
            Some((namespace, name)) => SecretRef {
                namespace: namespace.into(),
                name: name.into(),
            },
            None => SecretRef {
                namespace: pod_namespace.into(),
                name: entry.into(),
            },
        };
        secret.path()?;
        if !seen.insert(secret.name.clone()) {
            return Err(invalid(
                format!("names {:?} twice", secret.name),
                "list each HSMSecret once",
            ));
        }
        secrets.push(secret);
    }
    if secrets.len() > MAX_SECRETS_PER_VOLUME {
        return Err(invalid(
            format!(
                "lists {} HSMSecrets, more than {MAX_SECRETS_PER_VOLUME}",
                secrets.len()
            ),
            "split them across several volumes",
        ));
    }
    Ok(secrets)
}

/// The webhook's own file-mode rule (read bits only, not 0), so a hand-written volume
/// cannot get past the node what an annotation could not get past admission.
fn parse_file_mode(raw: &str) -> Result<FileMode, VolumeError> {
    let digits = raw.strip_prefix("0o").unwrap_or(raw);
    FileMode::parse(digits).map_err(|error| VolumeError::InvalidAttribute {
        attribute: FILE_MODE,
        problem: match error {
            crate::inject::InjectError::InvalidFileMode { value, reason } => {
                format!("{value:?} {reason}")
            }
            other => other.to_string(),
        },
        fix: "use read bits only, e.g. \"0440\" (owner and group read) or \"0400\"".into(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::PathBuf;

    const TARGET: &str = "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/secrets/mount";

    fn context(overrides: &[(&str, Option<&str>)]) -> BTreeMap<String, String> {
        let mut c: BTreeMap<String, String> = [
            (pod_info::POD_NAMESPACE, "shop"),
            (pod_info::POD_NAME, "checkout-0"),
            (pod_info::POD_UID, "uid-1"),
            (pod_info::SERVICE_ACCOUNT, "checkout"),
            (pod_info::EPHEMERAL, "true"),
            (SECRETS, "db,api"),
            (DEVICE, "prod-hsm"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in overrides {
            match v {
                Some(v) => c.insert(k.to_string(), v.to_string()),
                None => c.remove(*k),
            };
        }
        c
    }

    fn parse(overrides: &[(&str, Option<&str>)]) -> Result<VolumeRequest, VolumeError> {
        VolumeRequest::parse(&context(overrides), &PathBuf::from(TARGET))
    }

    #[test]
    fn a_complete_context_parses() {
        let v = parse(&[]).unwrap();
        assert_eq!(v.pod.namespace, "shop");
        assert_eq!(v.pod.service_account, "checkout");
        assert_eq!(v.device, "prod-hsm");
        assert_eq!(v.file_mode.bits(), 0o440);
        let names: Vec<_> = v.secrets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db", "api"]);
        assert!(v.secrets.iter().all(|s| s.namespace == "shop"));
    }

    #[test]
    fn spelling_variants_are_accepted() {
        for (raw, mode) in [
            ("0440", 0o440),
            ("440", 0o440),
            ("0o400", 0o400),
            ("0444", 0o444),
        ] {
            assert_eq!(
                parse(&[(FILE_MODE, Some(raw))]).unwrap().file_mode.bits(),
                mode,
                "{raw}"
            );
        }
        assert_eq!(
            parse(&[(FILE_MODE, Some(""))]).unwrap().file_mode.bits(),
            0o440
        );
        let v = parse(&[(SECRETS, Some(" db , api "))]).unwrap();
        assert_eq!(v.secrets[1].name, "api");
        let v = parse(&[(SECRETS, Some("other/db"))]).unwrap();
        assert_eq!(
            v.secrets[0],
            SecretRef {
                namespace: "other".into(),
                name: "db".into()
            },
            "kept as written: access control refuses it"
        );
    }

    /// Each bad context names its attribute and says what to do.
    #[test]
    fn bad_contexts_name_the_attribute_and_the_fix() {
        let long = (0..=MAX_SECRETS_PER_VOLUME)
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(",");
        type Overrides<'a> = Vec<(&'a str, Option<&'a str>)>;
        let rows: Vec<(Overrides, &str, &str)> = vec![
            (
                vec![(pod_info::EPHEMERAL, Some("false"))],
                pod_info::EPHEMERAL,
                "inline ephemeral",
            ),
            (
                vec![(pod_info::EPHEMERAL, None)],
                pod_info::EPHEMERAL,
                "spec.volumes[].csi",
            ),
            (
                vec![(pod_info::POD_NAMESPACE, None)],
                pod_info::POD_NAMESPACE,
                "podInfoOnMount",
            ),
            (
                vec![(pod_info::POD_NAME, Some(""))],
                pod_info::POD_NAME,
                "podInfoOnMount",
            ),
            (
                vec![(pod_info::POD_UID, None)],
                pod_info::POD_UID,
                "podInfoOnMount",
            ),
            (
                vec![(pod_info::POD_UID, Some("uid-2"))],
                pod_info::POD_UID,
                "owns the target",
            ),
            (
                vec![(pod_info::SERVICE_ACCOUNT, None)],
                pod_info::SERVICE_ACCOUNT,
                "podInfoOnMount",
            ),
            (vec![(SECRETS, None)], SECRETS, "comma-separated"),
            (vec![(SECRETS, Some(" "))], SECRETS, "comma-separated"),
            (vec![(SECRETS, Some("db,,api"))], SECRETS, "single commas"),
            (vec![(SECRETS, Some("db,"))], SECRETS, "single commas"),
            (vec![(SECRETS, Some("Bad_Name"))], SECRETS, "metadata.name"),
            (vec![(SECRETS, Some("a/b/c"))], SECRETS, "metadata.name"),
            (vec![(SECRETS, Some("../db"))], SECRETS, "metadata.name"),
            (vec![(SECRETS, Some("db,db"))], SECRETS, "once"),
            (
                vec![(SECRETS, Some(long.as_str()))],
                SECRETS,
                "several volumes",
            ),
            (vec![(DEVICE, None)], DEVICE, "HSMDevice"),
            (vec![(DEVICE, Some(" "))], DEVICE, "HSMDevice"),
            (vec![(FILE_MODE, Some("999"))], FILE_MODE, "0440"),
            (vec![(FILE_MODE, Some("rw"))], FILE_MODE, "0440"),
            (vec![(FILE_MODE, Some("04440"))], FILE_MODE, "0440"),
            (vec![(FILE_MODE, Some("4440"))], FILE_MODE, "setuid"),
            (vec![(FILE_MODE, Some("-440"))], FILE_MODE, "0440"),
            // The webhook's rule: read bits only, and someone must be able to read.
            (
                vec![(FILE_MODE, Some("0777"))],
                FILE_MODE,
                "write or execute",
            ),
            (vec![(FILE_MODE, Some("0600"))], FILE_MODE, "\"0400\""),
            (vec![(FILE_MODE, Some("0"))], FILE_MODE, "lets nobody read"),
        ];
        for (overrides, attribute, hint) in rows {
            let err = parse(&overrides).expect_err(&format!("{overrides:?}"));
            let VolumeError::InvalidAttribute { attribute: a, .. } = &err else {
                panic!("{overrides:?}: {err:?}");
            };
            assert_eq!(*a, attribute, "{overrides:?}");
            let message = err.to_string();
            assert!(message.contains(attribute), "{message}");
            assert!(message.contains(hint), "{overrides:?}: {message}");
        }
    }
}
