//! A private CA and the webhook's serving certificate, issued with rcgen when
//! no cert-manager is installed. Pure: time and key material in, PEM out.

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use zeroize::Zeroizing;

use crate::private_ca::{Leaf, PrivateCa, Usage, Validity};

/// The CA outlives many serving certificates, so renewals keep the
/// `caBundle` the API server already trusts.
pub const CA_VALIDITY_DAYS: i64 = 3650;
pub const SERVING_VALIDITY_DAYS: i64 = 365;
/// Renew the serving certificate when less than this is left.
pub const RENEW_BEFORE_DAYS: i64 = 30;

const CA_COMMON_NAME: &str = "hsm-secrets-webhook-ca";

pub use crate::private_ca::CaError as CertificateError;

/// The Service the API server calls, which the certificate must name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingIdentity {
    pub service: String,
    pub namespace: String,
}

impl ServingIdentity {
    /// Every name the Service is reached by; the API server uses
    /// `<service>.<namespace>.svc`.
    pub fn dns_names(&self) -> Vec<String> {
        let (service, namespace) = (&self.service, &self.namespace);
        vec![
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            format!("{service}.{namespace}"),
            service.clone(),
        ]
    }
}

/// A CA and a serving certificate it signed. Keys are wiped on drop.
pub struct CertificateBundle {
    pub ca_cert_pem: String,
    pub ca_key_pem: Zeroizing<String>,
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
    /// When the serving certificate expires.
    pub not_after: Timestamp,
}

impl std::fmt::Debug for CertificateBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateBundle")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A new CA and a serving certificate for `identity`.
pub fn issue_authority_and_leaf(
    identity: &ServingIdentity,
    now: Timestamp,
) -> Result<CertificateBundle, CertificateError> {
    let ca = PrivateCa::generate(CA_COMMON_NAME, Validity::days_from(now, CA_VALIDITY_DAYS)?)?;
    leaf(identity, now, &ca)
}

/// A new serving certificate signed by the stored CA, which stays the same.
pub fn issue_leaf(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    identity: &ServingIdentity,
    now: Timestamp,
) -> Result<CertificateBundle, CertificateError> {
    let validity = Validity::days_from(now, CA_VALIDITY_DAYS)?;
    let ca = PrivateCa::load(CA_COMMON_NAME, validity, ca_cert_pem, ca_key_pem)?;
    leaf(identity, now, &ca)
}

fn leaf(
    identity: &ServingIdentity,
    now: Timestamp,
    ca: &PrivateCa,
) -> Result<CertificateBundle, CertificateError> {
    let names = identity.dns_names();
    let validity = Validity::days_from(now, SERVING_VALIDITY_DAYS)?;
    let issued = ca.issue(&Leaf {
        common_name: &names[0],
        names: names.clone(),
        uris: Vec::new(),
        usage: Usage::Server,
        validity,
    })?;
    Ok(CertificateBundle {
        ca_cert_pem: ca.cert_pem().to_owned(),
        ca_key_pem: ca.key_pem().clone(),
        // The chain is the leaf alone: the API server trusts the CA itself.
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        not_after: validity.expires()?,
    })
}

/// Whether a serving certificate expiring at `not_after` for `dns_names`
/// must be replaced to serve `identity` at `now`.
pub fn needs_renewal(
    not_after: Option<Timestamp>,
    dns_names: &[String],
    identity: &ServingIdentity,
    now: Timestamp,
) -> bool {
    let Some(not_after) = not_after else {
        return true;
    };
    let renew_at = not_after
        .checked_sub(SignedDuration::from_hours(24 * RENEW_BEFORE_DAYS))
        .unwrap_or(not_after);
    now >= renew_at || dns_names != identity.dns_names().as_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> ServingIdentity {
        ServingIdentity {
            service: "hsm-secrets-webhook".into(),
            namespace: "hsm-secrets-system".into(),
        }
    }

    #[test]
    fn renewal_is_due_thirty_days_ahead_or_when_the_names_changed() {
        let now: Timestamp = "2025-03-01T00:00:00Z".parse().expect("time");
        let days = |n: i64| now + SignedDuration::from_hours(24 * n);
        let names = identity().dns_names();
        let moved = ServingIdentity {
            namespace: "elsewhere".into(),
            ..identity()
        };
        let cases = [
            (Some(days(365)), &names, &identity(), false),
            (Some(days(31)), &names, &identity(), false),
            (Some(days(30)), &names, &identity(), true),
            (Some(days(-1)), &names, &identity(), true),
            (None, &names, &identity(), true),
            (Some(days(365)), &names, &moved, true),
            (Some(days(365)), &Vec::new(), &identity(), true),
        ];
        for (not_after, dns_names, identity, expected) in cases {
            assert_eq!(
                needs_renewal(not_after, dns_names, identity, now),
                expected,
                "{not_after:?} {dns_names:?} {identity:?}"
            );
        }
    }

    #[test]
    fn issued_certificates_expire_when_they_say() {
        let now: Timestamp = "2025-03-01T15:30:00Z".parse().expect("time");
        let bundle = issue_authority_and_leaf(&identity(), now).expect("issue");
        assert_eq!(bundle.not_after.to_string(), "2026-03-01T00:00:00Z");
        assert!(
            bundle
                .ca_cert_pem
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert!(bundle.key_pem.contains("PRIVATE KEY"));
        assert!(
            !format!("{bundle:?}").contains("PRIVATE"),
            "no key in Debug"
        );
    }

    #[test]
    fn an_unreadable_ca_key_is_reported_as_such() {
        let bundle = issue_authority_and_leaf(&identity(), Timestamp::now()).expect("issue");
        let error = issue_leaf(
            &bundle.ca_cert_pem,
            "not a key",
            &identity(),
            Timestamp::now(),
        )
        .expect_err("bad key");
        assert_eq!(error.kind(), "ca_key");
        assert!(
            error.to_string().contains("delete the certificate Secret"),
            "{error}"
        );
    }
}
