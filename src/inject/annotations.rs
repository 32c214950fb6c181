//! The `hsmsecrets.io/*` pod annotations, parsed into what to inject.

use std::collections::{BTreeMap, BTreeSet};

use super::error::InjectError;
use super::file_mode::FileMode;
use super::layout::{Spelling, VolumeLayout, is_layout_annotation};
use super::mount_path::MountPath;
use super::names::{validate_device_name, validate_object_name};
use super::{
    ANNOTATION_CONTAINERS, ANNOTATION_DEVICE, ANNOTATION_FILE_MODE, ANNOTATION_INJECT,
    ANNOTATION_MOUNT_PATH, ANNOTATION_NODE_AFFINITY, ANNOTATION_SECRETS, ANNOTATION_STATUS,
    KNOWN_ANNOTATIONS,
};

/// At most this many HSMSecrets per pod: each is a directory in one tmpfs
/// and one HSM read at every (re)publish.
pub const MAX_SECRETS: usize = 64;

/// How strongly an injected pod is steered to nodes with the device ready.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NodeAffinityMode {
    /// A soft preference (weight 100): a node without a local device can
    /// still read through a remote agent.
    #[default]
    Preferred,
    /// A hard requirement: the pod runs only where the device is ready.
    Required,
    /// No affinity added.
    None,
}

impl NodeAffinityMode {
    fn parse(value: &str) -> Result<Self, InjectError> {
        match value.trim() {
            "preferred" => Ok(NodeAffinityMode::Preferred),
            "required" => Ok(NodeAffinityMode::Required),
            "none" => Ok(NodeAffinityMode::None),
            _ => Err(InjectError::InvalidNodeAffinity {
                value: value.to_owned(),
            }),
        }
    }
}

/// What the annotations ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InjectRequest {
    /// `hsmsecrets.io/inject` is absent or `"false"`. `ignored` lists other
    /// vocabulary annotations that are set anyway (worth a warning).
    NotRequested {
        ignored: Vec<String>,
    },
    Requested(InjectionSpec),
}

/// A valid injection request, before it meets the pod and the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectionSpec {
    /// HSMSecret names in the pod's namespace, in annotation order, unique.
    pub secrets: Vec<String>,
    pub mount_path: MountPath,
    /// Containers (or init containers) to mount into; `None` means every
    /// regular container.
    pub containers: Option<Vec<String>>,
    pub file_mode: FileMode,
    /// Per-secret names, modes and formats (`hsmsecrets.io/file-mode.<secret>` …).
    pub layout: VolumeLayout,
    pub node_affinity: NodeAffinityMode,
    /// The device named by `hsmsecrets.io/device`, if any.
    pub device: Option<String>,
    /// `hsmsecrets.io/*` annotations this webhook does not know (likely typos).
    pub unknown_annotations: Vec<String>,
}

/// Parse the pod's annotations. Reports the first malformed annotation.
pub fn parse_annotations(
    annotations: &BTreeMap<String, String>,
) -> Result<InjectRequest, InjectError> {
    match annotations.get(ANNOTATION_INJECT).map(|v| v.trim()) {
        Some("true") => {}
        None | Some("false") => {
            let ignored = annotations
                .keys()
                .filter(|key| {
                    key.starts_with(crate::crd::PREFIX)
                        && *key != ANNOTATION_INJECT
                        && *key != ANNOTATION_STATUS
                })
                .cloned()
                .collect();
            return Ok(InjectRequest::NotRequested { ignored });
        }
        Some(_) => {
            return Err(InjectError::InvalidInjectValue {
                value: annotations[ANNOTATION_INJECT].clone(),
            });
        }
    }

    let secrets = match annotations.get(ANNOTATION_SECRETS) {
        Some(value) if !value.trim().is_empty() => parse_list(ANNOTATION_SECRETS, value)?,
        _ => return Err(InjectError::MissingSecrets),
    };
    if secrets.len() > MAX_SECRETS {
        return Err(InjectError::TooManySecrets {
            count: secrets.len(),
            max: MAX_SECRETS,
        });
    }
    for name in &secrets {
        if let Some(reason) = validate_object_name(name) {
            return Err(InjectError::InvalidSecretName {
                name: name.clone(),
                reason,
            });
        }
    }

    let mount_path = match annotations.get(ANNOTATION_MOUNT_PATH) {
        Some(value) => MountPath::parse(value.trim())?,
        None => MountPath::default(),
    };
    let containers = match annotations.get(ANNOTATION_CONTAINERS) {
        // An empty value is most likely a templating accident; refusing it
        // beats silently mounting into every container.
        Some(value) if value.trim().is_empty() => {
            return Err(InjectError::EmptyEntry {
                annotation: ANNOTATION_CONTAINERS,
                value: value.clone(),
            });
        }
        Some(value) => Some(parse_list(ANNOTATION_CONTAINERS, value)?),
        None => None,
    };
    let file_mode = match annotations.get(ANNOTATION_FILE_MODE) {
        Some(value) => FileMode::parse(value)?,
        None => FileMode::DEFAULT,
    };
    let layout = VolumeLayout::parse(
        annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        Spelling::Annotation,
        &secrets.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let node_affinity = match annotations.get(ANNOTATION_NODE_AFFINITY) {
        Some(value) => NodeAffinityMode::parse(value)?,
        None => NodeAffinityMode::default(),
    };
    let device = match annotations.get(ANNOTATION_DEVICE).map(|v| v.trim()) {
        Some(value) => {
            if let Some(reason) = validate_device_name(value) {
                return Err(InjectError::InvalidDeviceName {
                    value: value.to_owned(),
                    reason,
                });
            }
            Some(value.to_owned())
        }
        None => None,
    };
    let unknown_annotations = annotations
        .keys()
        .filter(|key| {
            key.starts_with(crate::crd::PREFIX)
                && !KNOWN_ANNOTATIONS.contains(&key.as_str())
                && !is_layout_annotation(key)
        })
        .cloned()
        .collect();

    Ok(InjectRequest::Requested(InjectionSpec {
        secrets,
        mount_path,
        containers,
        file_mode,
        layout,
        node_affinity,
        device,
        unknown_annotations,
    }))
}

/// Split a comma-separated list, trimming spaces; refuse empty and repeated entries.
fn parse_list(annotation: &'static str, value: &str) -> Result<Vec<String>, InjectError> {
    let mut seen = BTreeSet::new();
    let mut names = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(InjectError::EmptyEntry {
                annotation,
                value: value.to_owned(),
            });
        }
        if !seen.insert(entry) {
            return Err(InjectError::DuplicateEntry {
                annotation,
                name: entry.to_owned(),
            });
        }
        names.push(entry.to_owned());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn requested(pairs: &[(&str, &str)]) -> InjectionSpec {
        let mut all = vec![(ANNOTATION_INJECT, "true"), (ANNOTATION_SECRETS, "db")];
        all.extend_from_slice(pairs);
        match parse_annotations(&annotations(&all)) {
            Ok(InjectRequest::Requested(spec)) => spec,
            other => panic!("{pairs:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults_apply_when_only_inject_and_secrets_are_set() {
        let spec = requested(&[]);
        assert_eq!(spec.secrets, ["db"]);
        assert_eq!(spec.mount_path.as_str(), "/var/run/hsm-secrets");
        assert_eq!(spec.containers, None);
        assert_eq!(spec.file_mode, FileMode::DEFAULT);
        assert_eq!(spec.node_affinity, NodeAffinityMode::Preferred);
        assert_eq!(spec.device, None);
        assert!(spec.unknown_annotations.is_empty());
    }

    #[test]
    fn every_annotation_is_read() {
        let spec = parse_annotations(&annotations(&[
            (ANNOTATION_INJECT, "true"),
            (ANNOTATION_SECRETS, " db-credentials , api-key "),
            (ANNOTATION_MOUNT_PATH, "/etc/hsm/"),
            (ANNOTATION_CONTAINERS, "app,migrate"),
            (ANNOTATION_FILE_MODE, "0400"),
            (ANNOTATION_NODE_AFFINITY, "required"),
            (ANNOTATION_DEVICE, "prod-hsm"),
            ("hsmsecrets.io/mountpath", "/typo"),
        ]))
        .expect("valid");
        let InjectRequest::Requested(spec) = spec else {
            panic!("requested")
        };
        assert_eq!(spec.secrets, ["db-credentials", "api-key"]);
        assert_eq!(spec.mount_path.as_str(), "/etc/hsm");
        assert_eq!(
            spec.containers,
            Some(vec!["app".to_owned(), "migrate".to_owned()])
        );
        assert_eq!(spec.file_mode.to_string(), "0400");
        assert_eq!(spec.node_affinity, NodeAffinityMode::Required);
        assert_eq!(spec.device.as_deref(), Some("prod-hsm"));
        assert_eq!(spec.unknown_annotations, ["hsmsecrets.io/mountpath"]);
        assert_eq!(
            requested(&[(ANNOTATION_NODE_AFFINITY, "none")]).node_affinity,
            NodeAffinityMode::None
        );
    }

    #[test]
    fn absent_or_false_inject_is_not_a_request() {
        for pairs in [
            vec![],
            vec![(ANNOTATION_INJECT, "false")],
            vec![(ANNOTATION_SECRETS, "db"), ("app.example/x", "y")],
        ] {
            let parsed = parse_annotations(&annotations(&pairs)).expect("not an error");
            assert!(
                matches!(parsed, InjectRequest::NotRequested { .. }),
                "{pairs:?}"
            );
        }
        let parsed = parse_annotations(&annotations(&[(ANNOTATION_SECRETS, "db")])).expect("ok");
        assert_eq!(
            parsed,
            InjectRequest::NotRequested {
                ignored: vec![ANNOTATION_SECRETS.to_owned()]
            }
        );
    }

    /// Every malformed annotation is refused with a message that names it.
    #[test]
    fn malformed_annotations_are_refused_naming_the_annotation() {
        /// (annotations, annotation the message must name, error kind)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            // (annotations, annotation named in the message, error kind)
            (
                &[(ANNOTATION_INJECT, "yes")],
                ANNOTATION_INJECT,
                "invalid_inject_value",
            ),
            (
                &[(ANNOTATION_INJECT, "True")],
                ANNOTATION_INJECT,
                "invalid_inject_value",
            ),
            (
                &[(ANNOTATION_INJECT, "true")],
                ANNOTATION_SECRETS,
                "missing_secrets",
            ),
            (
                &[(ANNOTATION_INJECT, "true"), (ANNOTATION_SECRETS, "  ")],
                ANNOTATION_SECRETS,
                "missing_secrets",
            ),
            (
                &[(ANNOTATION_INJECT, "true"), (ANNOTATION_SECRETS, "a,,b")],
                ANNOTATION_SECRETS,
                "empty_entry",
            ),
            (
                &[(ANNOTATION_INJECT, "true"), (ANNOTATION_SECRETS, "a,")],
                ANNOTATION_SECRETS,
                "empty_entry",
            ),
            (
                &[(ANNOTATION_INJECT, "true"), (ANNOTATION_SECRETS, "a, a")],
                ANNOTATION_SECRETS,
                "duplicate_entry",
            ),
            (
                &[(ANNOTATION_INJECT, "true"), (ANNOTATION_SECRETS, "DB")],
                ANNOTATION_SECRETS,
                "invalid_secret_name",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db_creds"),
                ],
                ANNOTATION_SECRETS,
                "invalid_secret_name",
            ),
            (
                &[(ANNOTATION_INJECT, "true"), (ANNOTATION_SECRETS, "ns/db")],
                ANNOTATION_SECRETS,
                "invalid_secret_name",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_MOUNT_PATH, "secrets"),
                ],
                ANNOTATION_MOUNT_PATH,
                "invalid_mount_path",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_MOUNT_PATH, ""),
                ],
                ANNOTATION_MOUNT_PATH,
                "invalid_mount_path",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_MOUNT_PATH, "/var/../etc"),
                ],
                ANNOTATION_MOUNT_PATH,
                "invalid_mount_path",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_MOUNT_PATH, "/a//b"),
                ],
                ANNOTATION_MOUNT_PATH,
                "invalid_mount_path",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_MOUNT_PATH, "/"),
                ],
                ANNOTATION_MOUNT_PATH,
                "reserved_mount_path",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_MOUNT_PATH, "/proc"),
                ],
                ANNOTATION_MOUNT_PATH,
                "reserved_mount_path",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_MOUNT_PATH, "/sys"),
                ],
                ANNOTATION_MOUNT_PATH,
                "reserved_mount_path",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_MOUNT_PATH, "/dev"),
                ],
                ANNOTATION_MOUNT_PATH,
                "reserved_mount_path",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_MOUNT_PATH, "/etc"),
                ],
                ANNOTATION_MOUNT_PATH,
                "reserved_mount_path",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (
                        ANNOTATION_MOUNT_PATH,
                        "/var/run/secrets/kubernetes.io/serviceaccount",
                    ),
                ],
                ANNOTATION_MOUNT_PATH,
                "reserved_mount_path",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_CONTAINERS, ""),
                ],
                ANNOTATION_CONTAINERS,
                "empty_entry",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_CONTAINERS, "app,,sidecar"),
                ],
                ANNOTATION_CONTAINERS,
                "empty_entry",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_CONTAINERS, "app,app"),
                ],
                ANNOTATION_CONTAINERS,
                "duplicate_entry",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "0999"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "abc"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, ""),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "01777"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "4440"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "00000000000000000000001000"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "0666"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "0644"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "0550"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "0000"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "0x1b0"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_FILE_MODE, "-440"),
                ],
                ANNOTATION_FILE_MODE,
                "invalid_file_mode",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_NODE_AFFINITY, "Required"),
                ],
                ANNOTATION_NODE_AFFINITY,
                "invalid_node_affinity",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_NODE_AFFINITY, "hard"),
                ],
                ANNOTATION_NODE_AFFINITY,
                "invalid_node_affinity",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_DEVICE, "Prod_HSM"),
                ],
                ANNOTATION_DEVICE,
                "invalid_device_name",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_DEVICE, ""),
                ],
                ANNOTATION_DEVICE,
                "invalid_device_name",
            ),
            (
                &[
                    (ANNOTATION_INJECT, "true"),
                    (ANNOTATION_SECRETS, "db"),
                    (ANNOTATION_DEVICE, &"d".repeat(57)),
                ],
                ANNOTATION_DEVICE,
                "invalid_device_name",
            ),
        ];
        for (pairs, named, kind) in cases {
            let error = parse_annotations(&annotations(pairs))
                .expect_err(&format!("{pairs:?} must be refused"));
            assert_eq!(error.kind(), *kind, "{pairs:?}: {error}");
            let message = error.to_string();
            assert!(
                message.contains(named),
                "{pairs:?}: message must name {named}: {message}"
            );
        }
        let too_many = (0..=MAX_SECRETS)
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let error = parse_annotations(&annotations(&[
            (ANNOTATION_INJECT, "true"),
            (ANNOTATION_SECRETS, &too_many),
        ]))
        .expect_err("too many");
        assert_eq!(error.kind(), "too_many_secrets");
        assert!(error.to_string().contains(ANNOTATION_SECRETS));
    }
}
