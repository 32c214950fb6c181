//! Which HSMDevice an injected volume reads from.

use super::error::InjectError;
use super::names::validate_device_name;

/// One name from `hsmsecrets.io/secrets`, with the device its HSMSecret
/// points at, or `None` when no such HSMSecret exists (yet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecretReference<'a> {
    pub name: &'a str,
    pub device: Option<&'a str>,
}

/// The device the volume reads from, and the HSMSecrets that do not exist
/// yet (a warning: GitOps may apply the pod before its HSMSecrets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceResolution {
    pub device: String,
    pub missing_secrets: Vec<String>,
}

/// Settle the device: the annotation's, or the one every existing HSMSecret
/// names. Disagreement, or nothing to go by, is a denial.
pub fn resolve_device(
    annotated: Option<&str>,
    secrets: &[SecretReference<'_>],
    namespace: &str,
) -> Result<DeviceResolution, InjectError> {
    let mut from_secrets: Option<(&str, &str)> = None; // (secret, device)
    for reference in secrets {
        let Some(device) = reference.device else {
            continue;
        };
        if let Some(annotated) = annotated
            && annotated != device
        {
            return Err(InjectError::DeviceMismatch {
                annotated: annotated.to_owned(),
                secret: reference.name.to_owned(),
                secret_device: device.to_owned(),
            });
        }
        match from_secrets {
            Some((first, first_device)) if first_device != device => {
                return Err(InjectError::SecretsOnSeveralDevices {
                    first: first.to_owned(),
                    first_device: first_device.to_owned(),
                    second: reference.name.to_owned(),
                    second_device: device.to_owned(),
                });
            }
            Some(_) => {}
            None => from_secrets = Some((reference.name, device)),
        }
    }
    let device = match (annotated, from_secrets) {
        (Some(device), _) => device,
        (None, Some((secret, device))) => {
            // The CRD only bounds deviceRef's length; the node label needs more.
            if let Some(reason) = validate_device_name(device) {
                return Err(InjectError::UnusableDeviceRef {
                    secret: secret.to_owned(),
                    device: device.to_owned(),
                    reason,
                });
            }
            device
        }
        (None, None) => {
            return Err(InjectError::DeviceUnresolved {
                secrets: secrets
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", "),
                namespace: namespace.to_owned(),
            });
        }
    };
    Ok(DeviceResolution {
        device: device.to_owned(),
        missing_secrets: secrets
            .iter()
            .filter(|s| s.device.is_none())
            .map(|s| s.name.to_owned())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found<'a>(name: &'a str, device: &'a str) -> SecretReference<'a> {
        SecretReference {
            name,
            device: Some(device),
        }
    }

    fn missing(name: &str) -> SecretReference<'_> {
        SecretReference { name, device: None }
    }

    #[test]
    fn resolution_table() {
        type Case<'a> = (
            Option<&'a str>,
            Vec<SecretReference<'a>>,
            Result<(&'a str, Vec<&'a str>), &'a str>,
        );
        let long = "d".repeat(60);
        let cases: Vec<Case> = vec![
            (
                None,
                vec![found("a", "d1"), found("b", "d1")],
                Ok(("d1", vec![])),
            ),
            (
                None,
                vec![found("a", "d1"), missing("b")],
                Ok(("d1", vec!["b"])),
            ),
            (Some("d1"), vec![missing("a")], Ok(("d1", vec!["a"]))),
            (Some("d1"), vec![found("a", "d1")], Ok(("d1", vec![]))),
            (Some("d1"), vec![found("a", "d2")], Err("device_mismatch")),
            (
                None,
                vec![found("a", "d1"), found("b", "d2")],
                Err("secrets_on_several_devices"),
            ),
            (
                None,
                vec![missing("a"), missing("b")],
                Err("device_unresolved"),
            ),
            (None, vec![found("a", &long)], Err("unusable_device_ref")),
            (
                None,
                vec![found("a", "Bad_Name")],
                Err("unusable_device_ref"),
            ),
        ];
        for (annotated, secrets, expected) in cases {
            let got = resolve_device(annotated, &secrets, "shop");
            match (&got, &expected) {
                (Ok(resolution), Ok((device, missing))) => {
                    assert_eq!(resolution.device, *device, "{annotated:?} {secrets:?}");
                    assert_eq!(
                        &resolution.missing_secrets, missing,
                        "{annotated:?} {secrets:?}"
                    );
                }
                (Err(error), Err(kind)) => {
                    assert_eq!(error.kind(), *kind, "{annotated:?} {secrets:?}: {error}")
                }
                _ => panic!("{annotated:?} {secrets:?}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn unresolved_message_names_the_fix() {
        let error = resolve_device(None, &[missing("db")], "shop").expect_err("unresolved");
        let message = error.to_string();
        assert!(message.contains("hsmsecrets.io/device"), "{message}");
        assert!(message.contains("\"shop\""), "{message}");
    }
}
