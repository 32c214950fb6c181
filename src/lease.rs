//! Leader election on a `coordination.k8s.io/v1` Lease with optimistic
//! concurrency: every write carries the resourceVersion it read, so of two
//! replicas racing for the lease exactly one write succeeds. The one election of the
//! project: the controller's replicas and the webhook's certificate bootstrap use it.
//!
//! Expiry is judged by how long this replica has seen the lease record
//! unchanged on its own monotonic clock (as client-go does), never by
//! comparing another node's `renewTime` with ours, so clock skew between
//! nodes cannot hand the lease to two holders.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// What a candidate should do about the lease it just read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseAction {
    /// No lease exists: create it, holding it.
    Create,
    /// We hold it: write a fresh renewTime.
    Renew,
    /// Nobody holds it, or the holder stopped renewing: take it over.
    TakeOver,
    /// Someone else holds it and is renewing.
    Follow { holder: String },
}

/// Decide from the lease as read and how long its record has stayed
/// unchanged in our observation.
pub fn next_action(
    lease: Option<&Lease>,
    identity: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> LeaseAction {
    let Some(lease) = lease else {
        return LeaseAction::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder == identity {
        return LeaseAction::Renew;
    }
    if holder.is_empty() {
        return LeaseAction::TakeOver;
    }
    let duration = spec
        .lease_duration_seconds
        .and_then(|seconds| u64::try_from(seconds).ok())
        .map(Duration::from_secs)
        .unwrap_or(default_duration);
    if unchanged_for >= duration {
        LeaseAction::TakeOver
    } else {
        LeaseAction::Follow { holder }
    }
}

/// One replica's handle on the election.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The record (resourceVersion) last seen and when we first saw it.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaseLock {
    pub fn new(
        client: Client,
        namespace: &str,
        name: impl Into<String>,
        identity: impl Into<String>,
        duration: Duration,
    ) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Read the lease and take, keep or leave it. `Ok(true)` while we hold it.
    /// A lost race (HTTP 409) is `Ok(false)`, not an error.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let unchanged_for = self.observe(current.as_ref());
        let action = next_action(
            current.as_ref(),
            &self.identity,
            unchanged_for,
            self.duration,
        );
        let now = MicroTime(Timestamp::now());
        let written = match (action, current) {
            (LeaseAction::Follow { .. }, _) => return Ok(false),
            (LeaseAction::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(self.duration_seconds()),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (LeaseAction::Renew, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(now);
                spec.lease_duration_seconds = Some(self.duration_seconds());
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            (LeaseAction::TakeOver, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if let Some(previous) = spec.holder_identity.as_deref().filter(|h| !h.is_empty()) {
                    tracing::info!(previous, "taking over a lease its holder stopped renewing");
                }
                spec.holder_identity = Some(self.identity.clone());
                spec.acquire_time = Some(now.clone());
                spec.renew_time = Some(now);
                spec.lease_duration_seconds = Some(self.duration_seconds());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
            // Renew/TakeOver are only decided on an existing lease.
            (LeaseAction::Renew | LeaseAction::TakeOver, None) => return Ok(false),
        };
        match written {
            Ok(lease) => {
                self.observe(Some(&lease));
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Give the lease up (on shutdown) so another replica need not wait for
    /// it to expire. Does nothing when someone else holds it.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Record the lease's resourceVersion; how long it has been unchanged.
    fn observe(&self, lease: Option<&Lease>) -> Duration {
        let version = lease
            .and_then(|lease| lease.metadata.resource_version.clone())
            .unwrap_or_default();
        let mut observed = self.observed.lock().unwrap_or_else(PoisonError::into_inner);
        match &*observed {
            Some((seen, since)) if *seen == version => since.elapsed(),
            _ => {
                *observed = Some((version, Instant::now()));
                Duration::ZERO
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, seconds: Option<i32>) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_duration_seconds: seconds,
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn lease_decisions() {
        let d = Duration::from_secs(15);
        let cases = [
            (None, Duration::ZERO, LeaseAction::Create),
            (
                Some(lease(Some("me"), Some(15))),
                Duration::ZERO,
                LeaseAction::Renew,
            ),
            (
                Some(lease(Some("me"), Some(15))),
                Duration::from_secs(60),
                LeaseAction::Renew,
            ),
            (
                Some(lease(None, Some(15))),
                Duration::ZERO,
                LeaseAction::TakeOver,
            ),
            (
                Some(lease(Some(""), Some(15))),
                Duration::ZERO,
                LeaseAction::TakeOver,
            ),
            (
                Some(lease(Some("other"), Some(15))),
                Duration::from_secs(14),
                LeaseAction::Follow {
                    holder: "other".into(),
                },
            ),
            (
                Some(lease(Some("other"), Some(15))),
                Duration::from_secs(15),
                LeaseAction::TakeOver,
            ),
            // The lease's own duration wins over ours.
            (
                Some(lease(Some("other"), Some(60))),
                Duration::from_secs(30),
                LeaseAction::Follow {
                    holder: "other".into(),
                },
            ),
            (
                Some(lease(Some("other"), None)),
                Duration::from_secs(15),
                LeaseAction::TakeOver,
            ),
        ];
        for (observed, unchanged_for, expected) in cases {
            assert_eq!(
                next_action(observed.as_ref(), "me", unchanged_for, d),
                expected,
                "{observed:?} unchanged for {unchanged_for:?}"
            );
        }
    }
}
