//! A private certificate authority: the one place certificates are made (rcgen).
//!
//! Two CAs use it: the webhook's, which signs the serving certificate the API server
//! trusts ([`crate::admission::certificates`]), and the agent CA, which signs every agent's
//! and the controller's certificate for mutual TLS ([`crate::mirror::rpc::tls`]). Each issues
//! leaves only (path length 0), for whole days from midnight UTC, backdated a day for
//! nodes with a slow clock. Pure: time and key material in, PEM out.

use k8s_openapi::jiff::civil::Date;
use k8s_openapi::jiff::tz::TimeZone;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use zeroize::Zeroizing;

/// Issue certificates valid from a day back, for nodes with a slow clock.
const BACKDATE_DAYS: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot issue a certificate: {0}")]
    Issue(#[from] rcgen::Error),
    #[error("the stored CA key cannot be read ({0}); delete the certificate Secret to start over")]
    CaKey(#[source] rcgen::Error),
    #[error("date out of range: {0}")]
    Date(String),
}

impl CaError {
    pub fn kind(&self) -> &'static str {
        match self {
            CaError::Issue(_) => "issue",
            CaError::CaKey(_) => "ca_key",
            CaError::Date(_) => "date",
        }
    }
}

/// From midnight UTC a day before `now` to midnight UTC `days` after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: Date,
    pub not_after: Date,
}

impl Validity {
    pub fn days_from(now: Timestamp, days: i64) -> Result<Self, CaError> {
        let date = |days: i64| -> Result<Date, CaError> {
            Ok(now
                .checked_add(SignedDuration::from_hours(24 * days))
                .map_err(|e| CaError::Date(e.to_string()))?
                .to_zoned(TimeZone::UTC)
                .date())
        };
        Ok(Self {
            not_before: date(-BACKDATE_DAYS)?,
            not_after: date(days)?,
        })
    }

    /// When a certificate with this validity expires.
    pub fn expires(&self) -> Result<Timestamp, CaError> {
        Ok(self
            .not_after
            .to_zoned(TimeZone::UTC)
            .map_err(|e| CaError::Date(e.to_string()))?
            .timestamp())
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), CaError> {
        let ymd = |date: Date| -> Result<_, CaError> {
            let bad = |e: std::num::TryFromIntError| CaError::Date(e.to_string());
            Ok(rcgen::date_time_ymd(
                i32::from(date.year()),
                u8::try_from(date.month()).map_err(bad)?,
                u8::try_from(date.day()).map_err(bad)?,
            ))
        };
        params.not_before = ymd(self.not_before)?;
        params.not_after = ymd(self.not_after)?;
        Ok(())
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (the webhook).
    Server,
    /// Both ends of mutual TLS (agents, the controller).
    ServerAndClient,
}

/// A leaf to issue.
#[derive(Clone, Debug)]
pub struct Leaf<'a> {
    pub common_name: &'a str,
    /// DNS names and IP addresses (rcgen tells them apart).
    pub names: Vec<String>,
    /// URI names: the identities mutual TLS checks.
    pub uris: Vec<String>,
    pub usage: Usage,
    pub validity: Validity,
}

/// A certificate and its private key, PEM; the key is wiped on drop.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// A CA's certificate, key and the issuer that signs with them.
pub struct PrivateCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for PrivateCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateCa").finish_non_exhaustive()
    }
}

/// The CA certificate's fields: its name and validity. A stored CA is loaded with the
/// same, since an issuer is identified by its name and key.
fn ca_params(common_name: &str, validity: Validity) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity.apply(&mut params)?;
    Ok(params)
}

impl PrivateCa {
    /// A new CA with a fresh key.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, CaError> {
        let key = KeyPair::generate()?;
        let params = ca_params(common_name, validity)?;
        let cert_pem = params.self_signed(&key)?.pem();
        let key_pem = Zeroizing::new(key.serialize_pem());
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// A stored CA, to issue more leaves under the certificate clients already trust.
    pub fn load(
        common_name: &str,
        validity: Validity,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::CaKey)?;
        // An issuer needs only the CA's name and key (rcgen derives the key identifier
        // from the key), which the parameters rebuild.
        Ok(Self {
            issuer: Issuer::new(ca_params(common_name, validity)?, key),
            cert_pem: cert_pem.to_owned(),
            key_pem: Zeroizing::new(key_pem.to_owned()),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &Zeroizing<String> {
        &self.key_pem
    }

    /// A leaf certificate with a fresh key, signed by this CA.
    pub fn issue(&self, leaf: &Leaf<'_>) -> Result<Issued, CaError> {
        let mut params = CertificateParams::new(leaf.names.clone())?;
        for uri in &leaf.uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match leaf.usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::ServerAndClient => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        leaf.validity.apply(&mut params)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_is_whole_days_backdated_one() {
        let now: Timestamp = "2025-03-01T15:30:00Z".parse().expect("time");
        let validity = Validity::days_from(now, 365).expect("validity");
        assert_eq!(validity.not_before.to_string(), "2025-02-28");
        assert_eq!(validity.not_after.to_string(), "2026-03-01");
        assert_eq!(
            validity.expires().expect("expiry").to_string(),
            "2026-03-01T00:00:00Z"
        );
        assert_eq!(
            Validity::days_from(now, i64::MAX / 1_000_000)
                .expect_err("far")
                .kind(),
            "date"
        );
    }

    #[test]
    fn a_loaded_ca_signs_leaves_that_its_certificate_verifies() {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, UnixTime};
        let validity = Validity::days_from(Timestamp::now(), 30).expect("validity");
        let ca = PrivateCa::generate("test CA", validity).expect("ca");
        let again =
            PrivateCa::load("test CA", validity, ca.cert_pem(), ca.key_pem()).expect("load");
        let leaf = again
            .issue(&Leaf {
                common_name: "node-1",
                names: vec!["node-1".into(), "127.0.0.1".into()],
                uris: vec!["spiffe://example/node-1".into()],
                usage: Usage::ServerAndClient,
                validity,
            })
            .expect("leaf");
        assert!(!format!("{leaf:?}").contains("PRIVATE"), "no key in Debug");

        let root = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).expect("ca der");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).expect("root");
        let leaf_der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("der");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            rustls::crypto::ring::default_provider().into(),
        )
        .build()
        .expect("verifier");
        use rustls::client::danger::ServerCertVerifier as _;
        verifier
            .verify_server_cert(
                &leaf_der,
                &[],
                &"node-1".try_into().expect("name"),
                &[],
                UnixTime::now(),
            )
            .expect("a leaf of the loaded CA verifies against the original certificate");

        assert_eq!(
            PrivateCa::load("test CA", validity, ca.cert_pem(), "not a key")
                .expect_err("bad key")
                .kind(),
            "ca_key"
        );
    }
}
