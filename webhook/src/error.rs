//! The crate's one error type.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong in the webhook server.
///
/// Certificate errors name the file and the fix because they surface as the
/// last log line of a crash-looping pod; envelope errors become the body of an
/// HTTP 4xx the API server logs next to the webhook's name.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(
        "cannot read {what} file {path}: {source}; mount the serving certificate Secret \
         (tls.crt and tls.key) there or point the webhook at the right paths"
    )]
    ReadPem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{path} holds no usable PEM certificate ({detail}); it must contain the serving \
         certificate, then any intermediates, as `-----BEGIN CERTIFICATE-----` blocks"
    )]
    NoCertificate { path: PathBuf, detail: String },

    #[error(
        "{path} holds no usable PEM private key ({detail}); expected a `PRIVATE KEY` (PKCS#8), \
         `RSA PRIVATE KEY` or `EC PRIVATE KEY` block"
    )]
    NoPrivateKey { path: PathBuf, detail: String },

    #[error(
        "private key {key_path} cannot serve certificate {cert_path}: {source}; the two files \
         must come from the same issuance (re-issue the certificate or fix the Secret)"
    )]
    KeyPair {
        cert_path: PathBuf,
        key_path: PathBuf,
        #[source]
        source: rustls::Error,
    },

    #[error("no CA certificate found in the given PEM ({detail}); pass the issuing CA as PEM")]
    NoCaCertificate { detail: String },

    #[error("CA certificate rejected: {0}")]
    CaCertificate(#[source] rustls::Error),

    #[error("cannot build the TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),

    #[error(
        "cannot listen on {addr}: {source}; another process may hold the port, or binding \
         below 1024 needs privileges the non-root webhook does not have"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("request body is larger than the webhook's limit of {limit} bytes")]
    BodyTooLarge { limit: usize },

    #[error("cannot read the request body: {0}")]
    BodyRead(String),

    #[error("timed out reading the request body")]
    BodyTimeout,

    #[error("request body is not a valid AdmissionReview JSON document: {0}")]
    MalformedReview(#[source] serde_json::Error),

    #[error("unsupported AdmissionReview {field} {found:?}: this webhook speaks {expected} only")]
    UnsupportedReview {
        field: &'static str,
        found: String,
        expected: &'static str,
    },

    #[error("AdmissionReview has no `request`; the API server always sends one")]
    MissingRequest,

    #[error(
        "AdmissionReview request.uid {found:?} is not a uid (1 to 128 characters); the API server always sends one"
    )]
    InvalidUid { found: String },

    #[error("cannot encode the AdmissionReview response: {0}")]
    EncodeResponse(#[source] serde_json::Error),
}

impl Error {
    /// A bounded, stable name for logs and metric labels (never the error text).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::ReadPem { .. } => "read_pem",
            Error::NoCertificate { .. } => "no_certificate",
            Error::NoPrivateKey { .. } => "no_private_key",
            Error::KeyPair { .. } => "key_pair",
            Error::NoCaCertificate { .. } => "no_ca_certificate",
            Error::CaCertificate(_) => "ca_certificate",
            Error::TlsConfig(_) => "tls_config",
            Error::Bind { .. } => "bind",
            Error::BodyTooLarge { .. } => "body_too_large",
            Error::BodyRead(_) => "body_read",
            Error::BodyTimeout => "body_timeout",
            Error::MalformedReview(_) => "malformed_review",
            Error::UnsupportedReview { .. } => "unsupported_review",
            Error::MissingRequest => "missing_request",
            Error::InvalidUid { .. } => "invalid_uid",
            Error::EncodeResponse(_) => "encode_response",
        }
    }

    /// The HTTP status to answer with when this error ends a request.
    pub fn http_status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::BodyRead(_)
            | Error::MalformedReview(_)
            | Error::UnsupportedReview { .. }
            | Error::MissingRequest
            | Error::InvalidUid { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_map_to_client_statuses_and_the_rest_to_500() {
        let cases = [
            (Error::BodyTooLarge { limit: 1 }, 413),
            (Error::BodyTimeout, 408),
            (Error::BodyRead("reset".into()), 400),
            (Error::MissingRequest, 400),
            (
                Error::UnsupportedReview {
                    field: "apiVersion",
                    found: "admission.k8s.io/v1beta1".into(),
                    expected: "admission.k8s.io/v1",
                },
                400,
            ),
            (
                Error::MalformedReview(
                    serde_json::from_str::<serde_json::Value>("{").expect_err("invalid json"),
                ),
                400,
            ),
            (
                Error::NoCaCertificate {
                    detail: "empty".into(),
                },
                500,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(error.http_status().as_u16(), status, "{}", error.kind());
        }
    }

    #[test]
    fn certificate_errors_name_the_file() {
        let error = Error::ReadPem {
            what: "certificate",
            path: "/etc/webhook/tls.crt".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        let text = error.to_string();
        assert!(text.contains("/etc/webhook/tls.crt"), "{text}");
        assert!(text.contains("Secret"), "{text}");
    }
}
