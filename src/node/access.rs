//! Who may mount what: pure decisions over the pod's identity and the HSMSecret.

use super::VolumeError;
use super::attributes::{PodIdentity, SecretRef};
use crate::crd::HSMSecret;
use crate::hsm::SecretPath;

/// A pod reaches only its own namespace: checked before any lookup, so another namespace's
/// HSMSecrets are not even probed for existence.
pub fn require_own_namespace(pod: &PodIdentity, secret: &SecretRef) -> Result<(), VolumeError> {
    if secret.namespace == pod.namespace {
        return Ok(());
    }
    Err(VolumeError::OtherNamespace {
        pod_namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        namespace: secret.namespace.clone(),
        name: secret.name.clone(),
    })
}

/// Decides whether `pod` may mount `secret` (looked up as `found`) from `volume_device`.
/// Returns the HSM path to read: always `<pod namespace>/<name>`.
pub fn authorize(
    pod: &PodIdentity,
    volume_device: &str,
    secret: &SecretRef,
    found: Option<&HSMSecret>,
) -> Result<SecretPath, VolumeError> {
    require_own_namespace(pod, secret)?;
    let Some(found) = found else {
        return Err(VolumeError::UnknownSecret {
            namespace: secret.namespace.clone(),
            name: secret.name.clone(),
        });
    };
    let allowed = found.spec.allowed_service_accounts();
    if !allowed.is_empty() && !allowed.contains(&pod.service_account) {
        return Err(VolumeError::ServiceAccountDenied {
            namespace: secret.namespace.clone(),
            name: secret.name.clone(),
            service_account: pod.service_account.clone(),
            allowed: allowed.to_vec(),
        });
    }
    if found.spec.device_ref != volume_device {
        return Err(VolumeError::DeviceMismatch {
            namespace: secret.namespace.clone(),
            name: secret.name.clone(),
            device_ref: found.spec.device_ref.clone(),
            volume_device: volume_device.to_string(),
        });
    }
    secret.path()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::crd::{AccessSpec, HSMSecretSpec};

    fn pod(sa: &str) -> PodIdentity {
        PodIdentity {
            namespace: "shop".into(),
            name: "checkout-0".into(),
            uid: "uid-1".into(),
            service_account: sa.into(),
        }
    }

    fn secret_ref(namespace: &str, name: &str) -> SecretRef {
        SecretRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn hsm_secret(device: &str, accounts: &[&str]) -> HSMSecret {
        let mut s = HSMSecret::new(
            "db",
            HSMSecretSpec {
                device_ref: device.into(),
                secret_name: None,
                secret_type: None,
                sync_interval: None,
                source: None,
                access: (!accounts.is_empty()).then(|| AccessSpec {
                    service_accounts: accounts.iter().map(|a| a.to_string()).collect(),
                }),
                deletion_policy: None,
            },
        );
        s.metadata.namespace = Some("shop".into());
        s
    }

    #[test]
    fn decisions() {
        let open = hsm_secret("prod-hsm", &[]);
        let restricted = hsm_secret("prod-hsm", &["checkout", "batch"]);
        let elsewhere = hsm_secret("other-hsm", &[]);
        let db = secret_ref("shop", "db");
        let foreign = secret_ref("bank", "db");
        type Row<'a> = (
            &'a str,
            &'a SecretRef,
            Option<&'a HSMSecret>,
            Result<(), &'a str>,
        );
        let rows: Vec<Row> = vec![
            ("checkout", &db, Some(&open), Ok(())),
            ("anyone", &db, Some(&open), Ok(())),
            ("checkout", &db, Some(&restricted), Ok(())),
            ("batch", &db, Some(&restricted), Ok(())),
            ("web", &db, Some(&restricted), Err("service_account_denied")),
            ("checkout", &db, Some(&elsewhere), Err("device_mismatch")),
            ("checkout", &db, None, Err("unknown_secret")),
            ("checkout", &foreign, Some(&open), Err("other_namespace")),
            ("checkout", &foreign, None, Err("other_namespace")),
        ];
        for (sa, secret, found, expected) in rows {
            let got = authorize(&pod(sa), "prod-hsm", secret, found);
            match (got, expected) {
                (Ok(path), Ok(())) => assert_eq!(path.to_string(), "shop/db"),
                (Err(e), Err(kind)) => assert_eq!(e.kind(), kind, "{sa} {secret:?}: {e}"),
                (got, expected) => panic!("{sa} {secret:?}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn denials_name_the_service_account_and_the_secret() {
        let e = authorize(
            &pod("web"),
            "prod-hsm",
            &secret_ref("shop", "db"),
            Some(&hsm_secret("prod-hsm", &["checkout"])),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("\"web\"") && e.contains("shop/db") && e.contains("checkout"),
            "{e}"
        );
    }
}
