//! Resources shared by the controller tests and benchmarks.

use hsm_secrets::crd::{
    HSMDevice, HSMDeviceSpec, MirroringPolicy, MirroringSpec, Pkcs11Spec, SecretKeyRef,
};

/// A mirrored `prod-hsm` device with automatic failover under the ReadOnly policy.
pub fn mirrored_device(primary: Option<&str>, targets: &[&str], threshold: u32) -> HSMDevice {
    HSMDevice::new(
        "prod-hsm",
        HSMDeviceSpec {
            pkcs11: Pkcs11Spec {
                library: "/usr/lib/softhsm/libsofthsm2.so".into(),
                token_label: "prod".into(),
                token_serial: None,
                pin_secret_ref: SecretKeyRef {
                    namespace: "hsm-secrets-system".into(),
                    name: "pin".into(),
                    key: "pin".into(),
                },
            },
            mirroring: Some(MirroringSpec {
                policy: MirroringPolicy::ReadOnly,
                sync_interval: Some(300),
                auto_failover: Some(true),
                primary_node: primary.map(String::from),
                target_nodes: targets.iter().map(|t| t.to_string()).collect(),
                failover_threshold: Some(threshold),
            }),
            backup: None,
            site: None,
        },
    )
}
