//! Certificate bootstrap without cert-manager: the replica holding the Lease
//! keeps a CA and serving certificate in a Secret and the CA in the
//! `caBundle` of both webhook configurations. Every replica (leader or not)
//! serves the pair the kubelet mounts from that Secret.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::certificates::{
    self, CertificateBundle, CertificateError, ServingIdentity, needs_renewal,
};
use super::metrics::AdmissionMetrics;
use crate::lease::LeaseLock;

/// Keys of the certificate Secret (`kubernetes.io/tls` plus the CA).
pub const KEY_TLS_CERT: &str = "tls.crt";
pub const KEY_TLS_KEY: &str = "tls.key";
pub const KEY_CA_CERT: &str = "ca.crt";
pub const KEY_CA_KEY: &str = "ca.key";
pub use crate::contract::{ANNOTATION_DNS_NAMES, ANNOTATION_NOT_AFTER};

/// Where the bootstrap keeps and publishes the certificates.
#[derive(Clone, Debug)]
pub struct BootstrapConfig {
    pub namespace: String,
    pub secret_name: String,
    pub identity: ServingIdentity,
    pub mutating_configuration: String,
    pub validating_configuration: String,
    pub lease_name: String,
    /// This replica's name in the Lease.
    pub holder: String,
    pub timing: BootstrapTiming,
}

#[derive(Clone, Debug)]
pub struct BootstrapTiming {
    pub lease_duration: Duration,
    /// How often the lease is renewed (or tried for).
    pub retry_period: Duration,
    /// How often the leader re-checks the Secret and caBundles when nothing
    /// failed (expiry, someone re-applying the manifests).
    pub recheck_period: Duration,
    /// Bound on one pass against the API.
    pub pass_timeout: Duration,
}

impl Default for BootstrapTiming {
    fn default() -> Self {
        BootstrapTiming {
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(5),
            recheck_period: Duration::from_secs(600),
            pass_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error(
        "{kind} {name} does not exist; apply manifests/webhook (or fix \
         --{flag}) so its caBundle can be set"
    )]
    ConfigurationMissing {
        kind: &'static str,
        name: String,
        flag: &'static str,
    },
    #[error("Secret {name} was written by someone else meanwhile; retrying")]
    Conflict { name: String },
}

impl BootstrapError {
    pub fn kind(&self) -> &'static str {
        match self {
            BootstrapError::Kube { .. } => "kube",
            BootstrapError::Certificate(error) => error.kind(),
            BootstrapError::ConfigurationMissing { .. } => "configuration_missing",
            BootstrapError::Conflict { .. } => "conflict",
        }
    }
}

fn kube_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> BootstrapError {
    let action = action.into();
    move |source| BootstrapError::Kube { action, source }
}

/// What happened to the certificate Secret in one pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretOutcome {
    Unchanged,
    /// There was none: a new CA and serving certificate.
    Created,
    /// The serving certificate was close to expiry or named other hosts; the
    /// CA stayed.
    Renewed,
    /// The Secret lacked a usable CA: everything was issued anew.
    Reissued,
}

/// The result of one leader pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassReport {
    pub secret: SecretOutcome,
    /// `<Kind>/<name>` of configurations whose caBundle was written.
    pub patched: Vec<String>,
}

impl PassReport {
    pub fn changed(&self) -> bool {
        self.secret != SecretOutcome::Unchanged || !self.patched.is_empty()
    }
}

impl fmt::Display for PassReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "secret {:?}, caBundle written to [{}]",
            self.secret,
            self.patched.join(", ")
        )
    }
}

/// One leader pass: make the Secret hold a valid pair and both webhook
/// configurations trust its CA. Idempotent; writes only what differs.
pub async fn ensure_certificates(
    client: &Client,
    config: &BootstrapConfig,
    now: Timestamp,
) -> Result<PassReport, BootstrapError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let name = &config.secret_name;
    let current = secrets.get_opt(name).await.map_err(kube_error(format!(
        "read Secret {}/{name}",
        config.namespace
    )))?;

    let (ca_pem, outcome) = match current {
        None => {
            let bundle = certificates::issue_authority_and_leaf(&config.identity, now)?;
            let secret = certificate_secret(config, &bundle, ObjectMeta::default());
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    return Err(BootstrapError::Conflict { name: name.clone() });
                }
                Err(source) => {
                    return Err(kube_error(format!(
                        "create Secret {}/{name}",
                        config.namespace
                    ))(source));
                }
            }
            (bundle.ca_cert_pem.clone(), SecretOutcome::Created)
        }
        Some(secret) => {
            let stored = Stored::read(&secret);
            let (bundle, outcome) = match &stored {
                Stored {
                    ca_cert: Some(_),
                    ca_key: Some(_),
                    leaf_present: true,
                    not_after,
                    dns_names,
                } if !needs_renewal(*not_after, dns_names, &config.identity, now) => {
                    (None, SecretOutcome::Unchanged)
                }
                Stored {
                    ca_cert: Some(ca_cert),
                    ca_key: Some(ca_key),
                    ..
                } => match certificates::issue_leaf(ca_cert, ca_key, &config.identity, now) {
                    Ok(bundle) => (Some(bundle), SecretOutcome::Renewed),
                    Err(CertificateError::CaKey(error)) => {
                        tracing::warn!(%error, "stored CA key unusable; issuing a new CA");
                        (
                            Some(certificates::issue_authority_and_leaf(
                                &config.identity,
                                now,
                            )?),
                            SecretOutcome::Reissued,
                        )
                    }
                    Err(error) => return Err(error.into()),
                },
                _ => (
                    Some(certificates::issue_authority_and_leaf(
                        &config.identity,
                        now,
                    )?),
                    SecretOutcome::Reissued,
                ),
            };
            match bundle {
                None => (stored.ca_cert.unwrap_or_default(), outcome),
                Some(bundle) => {
                    // Replacing with the resourceVersion we read: a concurrent
                    // writer makes this fail (409) instead of being overwritten.
                    let replacement = certificate_secret(config, &bundle, secret.metadata);
                    match secrets
                        .replace(name, &PostParams::default(), &replacement)
                        .await
                    {
                        Ok(_) => {}
                        Err(kube::Error::Api(status)) if status.code == 409 => {
                            return Err(BootstrapError::Conflict { name: name.clone() });
                        }
                        Err(source) => {
                            return Err(kube_error(format!(
                                "update Secret {}/{name}",
                                config.namespace
                            ))(source));
                        }
                    }
                    (bundle.ca_cert_pem.clone(), outcome)
                }
            }
        }
    };

    let mut patched = Vec::new();
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    if ensure_ca_bundle(
        &mutating,
        &config.mutating_configuration,
        &ca_pem,
        "mutating-configuration",
        |c| {
            c.webhooks
                .iter()
                .flatten()
                .map(|w| (w.name.clone(), w.client_config.ca_bundle.clone()))
                .collect()
        },
    )
    .await?
    {
        patched.push(format!(
            "MutatingWebhookConfiguration/{}",
            config.mutating_configuration
        ));
    }
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    if ensure_ca_bundle(
        &validating,
        &config.validating_configuration,
        &ca_pem,
        "validating-configuration",
        |c| {
            c.webhooks
                .iter()
                .flatten()
                .map(|w| (w.name.clone(), w.client_config.ca_bundle.clone()))
                .collect()
        },
    )
    .await?
    {
        patched.push(format!(
            "ValidatingWebhookConfiguration/{}",
            config.validating_configuration
        ));
    }
    Ok(PassReport {
        secret: outcome,
        patched,
    })
}

/// What the stored Secret holds, as far as renewal decisions need.
struct Stored {
    ca_cert: Option<String>,
    ca_key: Option<zeroize::Zeroizing<String>>,
    leaf_present: bool,
    not_after: Option<Timestamp>,
    dns_names: Vec<String>,
}

impl Stored {
    fn read(secret: &Secret) -> Self {
        let data = secret.data.clone().unwrap_or_default();
        let text = |key: &str| {
            data.get(key)
                .and_then(|ByteString(bytes)| String::from_utf8(bytes.clone()).ok())
                .filter(|text| !text.trim().is_empty())
        };
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        Stored {
            ca_cert: text(KEY_CA_CERT),
            ca_key: text(KEY_CA_KEY).map(zeroize::Zeroizing::new),
            leaf_present: text(KEY_TLS_CERT).is_some() && text(KEY_TLS_KEY).is_some(),
            not_after: annotations
                .get(ANNOTATION_NOT_AFTER)
                .and_then(|value| value.parse().ok()),
            dns_names: annotations
                .get(ANNOTATION_DNS_NAMES)
                .map(|names| names.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
        }
    }
}

/// The Secret holding `bundle`, keeping `metadata` (resourceVersion,
/// user labels) of the Secret it replaces.
fn certificate_secret(
    config: &BootstrapConfig,
    bundle: &CertificateBundle,
    mut metadata: ObjectMeta,
) -> Secret {
    metadata.name = Some(config.secret_name.clone());
    metadata.namespace = Some(config.namespace.clone());
    metadata.managed_fields = None;
    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert("app.kubernetes.io/name".into(), "hsm-secrets".into());
    labels.insert("app.kubernetes.io/component".into(), "webhook".into());
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "hsm-secrets-webhook".into(),
    );
    let annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(ANNOTATION_NOT_AFTER.into(), bundle.not_after.to_string());
    annotations.insert(
        ANNOTATION_DNS_NAMES.into(),
        config.identity.dns_names().join(","),
    );
    let bytes = |text: &str| ByteString(text.as_bytes().to_vec());
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (KEY_TLS_CERT.to_owned(), bytes(&bundle.cert_pem)),
            (KEY_TLS_KEY.to_owned(), bytes(&bundle.key_pem)),
            (KEY_CA_CERT.to_owned(), bytes(&bundle.ca_cert_pem)),
            (KEY_CA_KEY.to_owned(), bytes(&bundle.ca_key_pem)),
        ])),
        ..Secret::default()
    }
}

/// Set `caBundle` to `ca_pem` on every webhook of configuration `name` that
/// differs. Returns whether anything was written.
async fn ensure_ca_bundle<K>(
    api: &Api<K>,
    name: &str,
    ca_pem: &str,
    flag: &'static str,
    webhooks: impl Fn(&K) -> Vec<(String, Option<ByteString>)>,
) -> Result<bool, BootstrapError>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + fmt::Debug,
{
    let kind = K::kind(&());
    let Some(configuration) = api
        .get_opt(name)
        .await
        .map_err(kube_error(format!("read {kind} {name}")))?
    else {
        return Err(BootstrapError::ConfigurationMissing {
            kind: match kind.as_ref() {
                "MutatingWebhookConfiguration" => "MutatingWebhookConfiguration",
                _ => "ValidatingWebhookConfiguration",
            },
            name: name.to_owned(),
            flag,
        });
    };
    let wanted = ByteString(ca_pem.as_bytes().to_vec());
    let stale: Vec<String> = webhooks(&configuration)
        .into_iter()
        .filter(|(_, bundle)| bundle.as_ref() != Some(&wanted))
        .map(|(webhook, _)| webhook)
        .collect();
    if stale.is_empty() {
        return Ok(false);
    }
    // A strategic merge patch merges `webhooks` by name, touching only the
    // caBundle; the resourceVersion makes it fail if the object changed
    // since we read it.
    let patch = json!({
        "metadata": {"resourceVersion": configuration.meta().resource_version},
        "webhooks": stale
            .iter()
            .map(|webhook| json!({"name": webhook, "clientConfig": {"caBundle": &wanted}}))
            .collect::<Vec<_>>(),
    });
    api.patch(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map_err(kube_error(format!("set caBundle of {kind} {name}")))?;
    tracing::info!(kind = %kind, name, webhooks = ?stale, "caBundle updated");
    Ok(true)
}

/// Campaign for the lease and, while holding it, keep the certificates in
/// place, until `shutdown` completes (then the lease is released).
pub async fn run(
    client: Client,
    config: BootstrapConfig,
    metrics: AdmissionMetrics,
    shutdown: impl Future<Output = ()> + Send,
) {
    let timing = config.timing.clone();
    let lock = LeaseLock::new(
        client.clone(),
        &config.namespace,
        &config.lease_name,
        &config.holder,
        timing.lease_duration,
    );
    tokio::pin!(shutdown);
    let mut leader = false;
    let mut last_pass: Option<Instant> = None;
    loop {
        let holding = match lock.try_acquire_or_renew().await {
            Ok(holding) => holding,
            Err(error) => {
                tracing::warn!(%error, lease = %config.lease_name, "cannot read or renew the bootstrap lease");
                false
            }
        };
        if holding != leader {
            tracing::info!(holder = %config.holder, leader = holding, "certificate bootstrap leadership changed");
            leader = holding;
            metrics.set_leader(leader);
            last_pass = None; // a new term checks at once
        }
        if leader && last_pass.is_none_or(|at| at.elapsed() >= timing.recheck_period) {
            match tokio::time::timeout(
                timing.pass_timeout,
                ensure_certificates(&client, &config, Timestamp::now()),
            )
            .await
            {
                Ok(Ok(report)) => {
                    if report.changed() {
                        tracing::info!(%report, "webhook certificates bootstrapped");
                        metrics.observe_bootstrap("changed");
                    } else {
                        tracing::debug!("webhook certificates up to date");
                        metrics.observe_bootstrap("unchanged");
                    }
                    last_pass = Some(Instant::now());
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, kind = error.kind(), "certificate bootstrap pass failed; retrying");
                    metrics.observe_bootstrap("error");
                }
                Err(_) => {
                    tracing::warn!(timeout = ?timing.pass_timeout, "certificate bootstrap pass timed out; retrying");
                    metrics.observe_bootstrap("error");
                }
            }
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(timing.retry_period) => {}
        }
    }
    if leader {
        if let Err(error) = lock.release().await {
            tracing::warn!(%error, "cannot release the bootstrap lease; it expires on its own");
        }
        metrics.set_leader(false);
    }
}
