//! The one builder for the custom resources tests and benchmarks make: `HSMDevice` and
//! `HSMSecret` objects, typed or as the JSON an API server answers with.
//!
//! ```ignore
//! let device = resources::device("prod-hsm").mirrored(Some("n1"), &["n2"]).auto_failover(3).build();
//! let secret = resources::secret("shop", "db").device("prod-hsm").accounts(&["checkout"]).build();
//! ```

use hsm_secrets::crd::{
    AccessSpec, HSMDevice, HSMDeviceSpec, HSMDeviceStatus, HSMSecret, HSMSecretSpec,
    MirroringPolicy, MirroringSpec, Pkcs11Spec, SecretKeyRef,
};
use serde_json::Value;

/// SoftHSM's module where Debian installs it.
pub const SOFTHSM_LIBRARY: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A device `name` on SoftHSM, token `prod`, PIN in Secret `hsm-secrets-system/pin`, not
/// mirrored, without status.
pub fn device(name: &str) -> DeviceBuilder {
    DeviceBuilder(HSMDevice::new(
        name,
        HSMDeviceSpec {
            pkcs11: Pkcs11Spec {
                library: SOFTHSM_LIBRARY.into(),
                token_label: "prod".into(),
                token_serial: None,
                pin_secret_ref: SecretKeyRef {
                    namespace: "hsm-secrets-system".into(),
                    name: "pin".into(),
                    key: "pin".into(),
                },
            },
            mirroring: None,
            backup: None,
            site: None,
        },
    ))
}

#[must_use]
pub struct DeviceBuilder(HSMDevice);

impl DeviceBuilder {
    pub fn token(mut self, label: &str) -> Self {
        self.0.spec.pkcs11.token_label = label.into();
        self
    }

    pub fn library(mut self, library: &str) -> Self {
        self.0.spec.pkcs11.library = library.into();
        self
    }

    /// The Secret holding the PIN (key `pin`).
    pub fn pin_secret(mut self, namespace: &str, name: &str) -> Self {
        self.0.spec.pkcs11.pin_secret_ref.namespace = namespace.into();
        self.0.spec.pkcs11.pin_secret_ref.name = name.into();
        self
    }

    /// Mirrored under the ReadOnly policy; other mirroring fields left to their defaults.
    pub fn mirrored(mut self, primary: Option<&str>, targets: &[&str]) -> Self {
        self.0.spec.mirroring = Some(read_only(primary, targets));
        self
    }

    fn mirroring(&mut self) -> &mut MirroringSpec {
        self.0
            .spec
            .mirroring
            .get_or_insert_with(|| read_only(None, &[]))
    }

    pub fn policy(mut self, policy: MirroringPolicy) -> Self {
        self.mirroring().policy = policy;
        self
    }

    /// Automatic failover after `threshold` failed probes.
    pub fn auto_failover(mut self, threshold: u32) -> Self {
        let mirroring = self.mirroring();
        mirroring.auto_failover = Some(true);
        mirroring.failover_threshold = Some(threshold);
        self
    }

    /// Failover only by hand.
    pub fn manual_failover(mut self) -> Self {
        self.mirroring().auto_failover = Some(false);
        self
    }

    pub fn sync_interval(mut self, seconds: u32) -> Self {
        self.mirroring().sync_interval = Some(seconds);
        self
    }

    pub fn generation(mut self, generation: i64) -> Self {
        self.0.metadata.generation = Some(generation);
        self
    }

    pub fn resource_version(mut self, version: &str) -> Self {
        self.0.metadata.resource_version = Some(version.into());
        self
    }

    pub fn status(mut self, status: HSMDeviceStatus) -> Self {
        self.0.status = Some(status);
        self
    }

    /// The status as the API would hold it (fields not given take their defaults).
    pub fn status_json(self, status: Value) -> Self {
        let status = serde_json::from_value(status).expect("an HSMDevice status");
        self.status(status)
    }

    pub fn build(self) -> HSMDevice {
        self.0
    }

    /// As an API server answers with it.
    pub fn json(self) -> Value {
        serde_json::to_value(self.0).expect("an HSMDevice serializes")
    }
}

fn read_only(primary: Option<&str>, targets: &[&str]) -> MirroringSpec {
    MirroringSpec {
        policy: MirroringPolicy::ReadOnly,
        sync_interval: None,
        auto_failover: None,
        primary_node: primary.map(String::from),
        target_nodes: targets.iter().map(|t| (*t).to_string()).collect(),
        failover_threshold: None,
    }
}

/// An HSMSecret `namespace/name` on device `prod-hsm`, open to any service account.
pub fn secret(namespace: &str, name: &str) -> SecretBuilder {
    let mut secret = HSMSecret::new(
        name,
        HSMSecretSpec {
            device_ref: "prod-hsm".into(),
            secret_name: None,
            secret_type: None,
            sync_interval: None,
            source: None,
            access: None,
            deletion_policy: None,
        },
    );
    secret.metadata.namespace = Some(namespace.into());
    SecretBuilder(secret)
}

#[must_use]
pub struct SecretBuilder(HSMSecret);

impl SecretBuilder {
    pub fn device(mut self, device: &str) -> Self {
        self.0.spec.device_ref = device.into();
        self
    }

    /// Only these service accounts may mount it (none given: any).
    pub fn accounts(mut self, accounts: &[&str]) -> Self {
        self.0.spec.access = (!accounts.is_empty()).then(|| AccessSpec {
            service_accounts: accounts.iter().map(|a| (*a).to_string()).collect(),
        });
        self
    }

    pub fn build(self) -> HSMSecret {
        self.0
    }

    pub fn json(self) -> Value {
        serde_json::to_value(self.0).expect("an HSMSecret serializes")
    }
}
