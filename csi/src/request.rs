//! CSI request validation: raw protobuf requests become [`PublishRequest`]s or errors that
//! name the offending field.

use std::path::{Path, PathBuf};

use crate::mountinfo::is_csi_volume_layout;
use crate::proto::NodePublishVolumeRequest;
use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::volume_capability::{AccessType, MountVolume};
use crate::{Error, NodeConfig, PublishRequest};

pub(crate) fn validate_publish(
    config: &NodeConfig,
    raw: NodePublishVolumeRequest,
) -> Result<PublishRequest, Error> {
    // Every missing required field is named before the target's layout is judged, as
    // the CSI spec and its conformance suite (csi-sanity) expect: csi-sanity sends its
    // own `<mountdir>/target` without a capability and must hear about the capability.
    // The layout rule itself is unchanged: such a target is still refused below.
    if raw.volume_id.is_empty() {
        return Err(Error::MissingField { field: "volume_id" });
    }
    if raw.target_path.is_empty() {
        return Err(Error::MissingField {
            field: "target_path",
        });
    }
    let capability = raw.volume_capability.as_ref().ok_or(Error::MissingField {
        field: "volume_capability",
    })?;
    let target_path = validate_target(&config.kubelet_dir, &raw.target_path)?;
    let mount = match &capability.access_type {
        Some(AccessType::Mount(mount)) => mount,
        Some(AccessType::Block(_)) => {
            return Err(Error::invalid(
                "volume_capability",
                "block access is not supported: this driver provides files (mount access)",
            ));
        }
        None => {
            return Err(Error::MissingField {
                field: "volume_capability.access_type",
            });
        }
    };
    if !mount.fs_type.is_empty() && mount.fs_type != "tmpfs" {
        return Err(Error::invalid(
            "volume_capability.mount.fs_type",
            format!("{:?} is not supported; leave fsType empty", mount.fs_type),
        ));
    }
    let mode = capability
        .access_mode
        .as_ref()
        .ok_or(Error::MissingField {
            field: "volume_capability.access_mode",
        })?
        .mode;
    validate_access_mode(mode)?;
    if !raw.readonly {
        return Err(Error::invalid(
            "readonly",
            "the secret volume must be read-only: set readOnly: true on the pod's CSI volume",
        ));
    }
    Ok(PublishRequest {
        volume_id: raw.volume_id,
        target_path,
        volume_context: raw.volume_context.into_iter().collect(),
        read_only: true,
        fs_group: parse_mount_group(mount)?,
        republish: false,
    })
}

/// kubelet sends SINGLE_NODE_WRITER for CSI inline ephemeral volumes whatever the pod
/// says (SINGLE_NODE_SINGLE_WRITER or SINGLE_NODE_MULTI_WRITER with newer access-mode
/// handling), so the writer modes of a single node are accepted: read-only is enforced
/// through the `readonly` field. Modes that promise writes across nodes are refused.
fn validate_access_mode(mode: i32) -> Result<(), Error> {
    match Mode::try_from(mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
            | Mode::SingleNodeReaderOnly
            | Mode::MultiNodeReaderOnly,
        ) => Ok(()),
        Ok(other @ (Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter | Mode::Unknown)) => {
            Err(Error::invalid(
                "volume_capability.access_mode",
                format!(
                    "{} is not supported for a read-only secret volume",
                    other.as_str_name()
                ),
            ))
        }
        Err(_) => Err(Error::invalid(
            "volume_capability.access_mode",
            format!("unknown mode {mode}"),
        )),
    }
}

fn parse_mount_group(mount: &MountVolume) -> Result<Option<u32>, Error> {
    if mount.volume_mount_group.is_empty() {
        return Ok(None);
    }
    mount.volume_mount_group.parse().map(Some).map_err(|_| {
        Error::invalid(
            "volume_capability.mount.volume_mount_group",
            format!("{:?} is not a numeric group id", mount.volume_mount_group),
        )
    })
}

/// Accept only kubelet's CSI volume layout under the configured kubelet dir, spelled
/// plainly: no `.`/`..`, no empty components, no NUL.
pub(crate) fn validate_target(kubelet_dir: &Path, target: &str) -> Result<PathBuf, Error> {
    if target.is_empty() {
        return Err(Error::MissingField {
            field: "target_path",
        });
    }
    let pods = kubelet_dir.join("pods");
    let expected = || {
        Error::invalid(
            "target_path",
            format!(
                "{target:?} must be {}/<pod-uid>/volumes/kubernetes.io~csi/<volume>/mount",
                pods.display()
            ),
        )
    };
    let Some(relative) = target.strip_prefix('/') else {
        return Err(expected());
    };
    if target.contains('\0')
        || relative
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(Error::invalid(
            "target_path",
            format!("{target:?} must not contain '..', '.', empty components or NUL"),
        ));
    }
    let path = PathBuf::from(target);
    if !is_csi_volume_layout(&pods, &path) {
        return Err(expected());
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_must_follow_kubelet_layout() {
        let kubelet = Path::new("/var/lib/kubelet");
        let good = "/var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~csi/secrets/mount";
        assert_eq!(
            validate_target(kubelet, good).expect("valid"),
            Path::new(good)
        );
        for bad in [
            "var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~csi/secrets/mount",
            "/var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~csi/secrets",
            "/var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~csi/../../../../etc/mount",
            "/var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~csi/./secrets/mount",
            "/var/lib/kubelet/pods/0a1b//volumes/kubernetes.io~csi/secrets/mount",
            "/var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~csi/secrets/mount/",
            "/var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~secret/secrets/mount",
            "/var/lib/kubelet/plugins/0a1b/volumes/kubernetes.io~csi/secrets/mount",
            "/tmp/pods/0a1b/volumes/kubernetes.io~csi/secrets/mount",
            "/var/lib/kubelet/pods/0a\0b/volumes/kubernetes.io~csi/secrets/mount",
        ] {
            let err = validate_target(kubelet, bad).expect_err(bad);
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(err.to_string().contains("target_path"), "{err}");
        }
        assert!(matches!(
            validate_target(kubelet, ""),
            Err(Error::MissingField {
                field: "target_path"
            })
        ));
    }

    /// The argument checks of the CSI conformance suite, with its own target path
    /// (`<mountdir>/target`, outside kubelet's layout): each is refused for the field it
    /// leaves out; with every field present, the target is still refused.
    #[test]
    fn required_fields_are_named_before_the_target_layout_is_judged() {
        use crate::proto::VolumeCapability;
        use crate::proto::volume_capability::AccessMode;
        let config = NodeConfig::new("n1").with_kubelet_dir("/var/lib/kubelet");
        let sanity_target = "/tmp/csi-mount/target";
        let refused = |request: NodePublishVolumeRequest| {
            validate_publish(&config, request).expect_err("refused")
        };
        let field = |error: Error| match error {
            Error::MissingField { field } => field.to_string(),
            other => format!("{other}"),
        };
        assert_eq!(
            field(refused(NodePublishVolumeRequest::default())),
            "volume_id"
        );
        let no_target = NodePublishVolumeRequest {
            volume_id: "v".into(),
            ..Default::default()
        };
        assert_eq!(field(refused(no_target)), "target_path");
        let no_capability = NodePublishVolumeRequest {
            volume_id: "v".into(),
            target_path: sanity_target.into(),
            ..Default::default()
        };
        let error = refused(no_capability);
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert_eq!(field(error), "volume_capability");

        let complete = NodePublishVolumeRequest {
            volume_id: "v".into(),
            target_path: sanity_target.into(),
            volume_capability: Some(VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume::default())),
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            }),
            readonly: true,
            ..Default::default()
        };
        let error = refused(complete);
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert!(
            error.to_string().contains("target_path")
                && error.to_string().contains("/volumes/kubernetes.io~csi/"),
            "{error}"
        );
    }

    #[test]
    fn access_modes() {
        for ok in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeReaderOnly,
        ] {
            validate_access_mode(ok as i32).expect("accepted");
        }
        for bad in [
            Mode::MultiNodeMultiWriter,
            Mode::MultiNodeSingleWriter,
            Mode::Unknown,
        ] {
            validate_access_mode(bad as i32).expect_err("refused");
        }
        validate_access_mode(99).expect_err("unknown number refused");
    }

    #[test]
    fn mount_group_must_be_numeric() {
        let mut mount = MountVolume::default();
        assert_eq!(parse_mount_group(&mount).expect("empty"), None);
        mount.volume_mount_group = "1234".into();
        assert_eq!(parse_mount_group(&mount).expect("numeric"), Some(1234));
        mount.volume_mount_group = "wheel".into();
        parse_mount_group(&mount).expect_err("name refused");
    }
}
