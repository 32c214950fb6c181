//! A private CA and the webhook's serving certificate, issued with rcgen when
//! no cert-manager is installed. Pure: time and key material in, PEM out.

use k8s_openapi::jiff::civil::Date;
use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use zeroize::Zeroizing;

/// The CA outlives many serving certificates, so renewals keep the
/// `caBundle` the API server already trusts.
pub const CA_VALIDITY_DAYS: i64 = 3650;
pub const SERVING_VALIDITY_DAYS: i64 = 365;
/// Renew the serving certificate when less than this is left.
pub const RENEW_BEFORE_DAYS: i64 = 30;
/// Issue certificates valid from a day back, for nodes with a slow clock.
const BACKDATE_DAYS: i64 = 1;

const CA_COMMON_NAME: &str = "hsm-secrets-webhook-ca";

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("cannot issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("the stored CA key cannot be read ({0}); delete the certificate Secret to start over")]
    CaKey(rcgen::Error),
    #[error("date out of range: {0}")]
    Date(String),
}

impl CertificateError {
    pub fn kind(&self) -> &'static str {
        match self {
            CertificateError::Issue(_) => "issue",
            CertificateError::CaKey(_) => "ca_key",
            CertificateError::Date(_) => "date",
        }
    }
}

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

fn ca_params(now: Timestamp) -> Result<CertificateParams, CertificateError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, now, CA_VALIDITY_DAYS)?;
    Ok(params)
}

/// A new CA and a serving certificate for `identity`.
pub fn issue_authority_and_leaf(
    identity: &ServingIdentity,
    now: Timestamp,
) -> Result<CertificateBundle, CertificateError> {
    let ca_key = KeyPair::generate()?;
    let params = ca_params(now)?;
    let ca_cert_pem = params.self_signed(&ca_key)?.pem();
    let ca_key_pem = Zeroizing::new(ca_key.serialize_pem());
    let issuer = Issuer::new(params, ca_key);
    leaf(identity, now, ca_cert_pem, ca_key_pem, &issuer)
}

/// A new serving certificate signed by the stored CA, which stays the same.
pub fn issue_leaf(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    identity: &ServingIdentity,
    now: Timestamp,
) -> Result<CertificateBundle, CertificateError> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(CertificateError::CaKey)?;
    // An issuer needs only the CA's name, key identifier method and usages,
    // which `ca_params` fixes; rcgen derives the key identifier from the key.
    let issuer = Issuer::new(ca_params(now)?, ca_key);
    leaf(
        identity,
        now,
        ca_cert_pem.to_owned(),
        Zeroizing::new(ca_key_pem.to_owned()),
        &issuer,
    )
}

fn leaf(
    identity: &ServingIdentity,
    now: Timestamp,
    ca_cert_pem: String,
    ca_key_pem: Zeroizing<String>,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<CertificateBundle, CertificateError> {
    let names = identity.dns_names();
    let mut params = CertificateParams::new(names.clone())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, &names[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let not_after = set_validity(&mut params, now, SERVING_VALIDITY_DAYS)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok(CertificateBundle {
        ca_cert_pem,
        ca_key_pem,
        // The chain is the leaf alone: the API server trusts the CA itself.
        cert_pem: cert.pem(),
        key_pem: Zeroizing::new(key.serialize_pem()),
        not_after,
    })
}

/// Set `params` valid from a day before `now` to `days` after it (midnight
/// UTC); returns the expiry.
fn set_validity(
    params: &mut CertificateParams,
    now: Timestamp,
    days: i64,
) -> Result<Timestamp, CertificateError> {
    let date_error = |error: &dyn std::fmt::Display| CertificateError::Date(error.to_string());
    let date = |days: i64| -> Result<(i32, u8, u8, Timestamp), CertificateError> {
        let date: Date = now
            .checked_add(SignedDuration::from_hours(24 * days))
            .map_err(|e| date_error(&e))?
            .to_zoned(TimeZone::UTC)
            .date();
        let midnight = date
            .to_zoned(TimeZone::UTC)
            .map_err(|e| date_error(&e))?
            .timestamp();
        let month = u8::try_from(date.month()).map_err(|e| date_error(&e))?;
        let day = u8::try_from(date.day()).map_err(|e| date_error(&e))?;
        Ok((i32::from(date.year()), month, day, midnight))
    };
    let (y, m, d, _) = date(-BACKDATE_DAYS)?;
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d, not_after) = date(days)?;
    params.not_after = rcgen::date_time_ymd(y, m, d);
    Ok(not_after)
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
