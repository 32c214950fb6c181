//! What the controller asks of a primary's archive supervisor each round, as domain
//! values: the device's archive and site as its spec gives them, and this round's asks.
//!
//! Intervals and leases are durations, not the CRD's whole seconds, so the benchmarks and
//! the tests can archive every 200 ms through the same call. Names are as written:
//! resolving them to files on the node (and refusing bad ones, naming the field) is the
//! supervisor's work, since only the node knows what is mounted.

use std::time::Duration;

use super::plan::{ArchiveAsk, ArchiveReport};
use crate::crd::{BackupSpec, FollowArchive, SiteSpec};

/// One round's call: archive and site settings, and what is asked beyond applying them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveRequest {
    /// `spec.backup`: this device's own archive.
    pub backup: Option<BackupConfig>,
    /// `spec.site`: the device is spread over sites.
    pub site: Option<SiteConfig>,
    pub ask: ArchiveAsk,
}

/// A bucket a spec names, and the Secret (mounted on the node) that opens it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketRef {
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials_secret: String,
    pub archive_name: String,
}

/// This device's archive: where, and how often.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupConfig {
    pub bucket: BucketRef,
    pub segment_interval: Duration,
    pub base_interval: Duration,
    /// `None` keeps everything.
    pub retention: Option<Duration>,
}

/// This site's name and lease, and the archive it follows while passive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SiteConfig {
    pub name: String,
    pub lease: Duration,
    /// Set: this site is passive and applies the active site's archive.
    pub follow: Option<FollowConfig>,
}

/// The archive a passive site applies: the active site's bucket and device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FollowConfig {
    pub bucket: BucketRef,
    pub device: String,
}

/// What answers an archive request: the node's archive supervisor, which lives outside
/// the agent (it needs the bucket, the credentials and the token's archive key).
#[async_trait::async_trait]
pub trait ArchiveControl: Send + Sync + 'static {
    async fn archive(&self, request: ArchiveRequest) -> ArchiveReport;
}

impl ArchiveRequest {
    /// The call a device's spec makes, with this round's asks.
    pub fn from_specs(
        backup: Option<&BackupSpec>,
        site: Option<&SiteSpec>,
        ask: ArchiveAsk,
    ) -> Self {
        Self {
            backup: backup.map(BackupConfig::from_spec),
            site: site.map(SiteConfig::from_spec),
            ask,
        }
    }
}

impl BackupConfig {
    pub fn from_spec(spec: &BackupSpec) -> Self {
        Self {
            bucket: BucketRef {
                url: spec.url.clone(),
                endpoint: spec.endpoint.clone(),
                region: spec.region.clone(),
                credentials_secret: spec.credentials_secret.clone(),
                archive_name: spec.archive_name().to_string(),
            },
            segment_interval: Duration::from_secs(spec.segment_interval_seconds().into()),
            base_interval: Duration::from_secs(u64::from(spec.base_interval_minutes()) * 60),
            retention: match spec.retention_days() {
                0 => None,
                days => Some(Duration::from_secs(u64::from(days) * 86_400)),
            },
        }
    }
}

impl SiteConfig {
    pub fn from_spec(spec: &SiteSpec) -> Self {
        Self {
            name: spec.name.clone(),
            lease: Duration::from_secs(spec.lease_seconds().into()),
            follow: spec.follow_archive.as_ref().map(FollowConfig::from_spec),
        }
    }
}

impl FollowConfig {
    pub fn from_spec(spec: &FollowArchive) -> Self {
        Self {
            bucket: BucketRef {
                url: spec.url.clone(),
                endpoint: spec.endpoint.clone(),
                region: spec.region.clone(),
                credentials_secret: spec.credentials_secret.clone(),
                archive_name: spec
                    .archive_name
                    .clone()
                    .unwrap_or_else(|| BackupSpec::DEFAULT_ARCHIVE_NAME.into()),
            },
            device: spec.device.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_becomes_durations_with_its_defaults() {
        let backup: BackupSpec = serde_json::from_value(serde_json::json!({
            "url": "s3://bucket/a",
            "credentialsSecret": "hsm-archive",
            "retentionDays": 0,
        }))
        .expect("backup");
        let config = BackupConfig::from_spec(&backup);
        assert_eq!(config.bucket.archive_name, BackupSpec::DEFAULT_ARCHIVE_NAME);
        assert_eq!(
            config.segment_interval,
            Duration::from_secs(backup.segment_interval_seconds().into())
        );
        assert_eq!(
            config.base_interval,
            Duration::from_secs(u64::from(backup.base_interval_minutes()) * 60)
        );
        assert_eq!(config.retention, None, "0 days keeps everything");

        let site: SiteSpec = serde_json::from_value(serde_json::json!({
            "name": "b",
            "leaseSeconds": 20,
            "followArchive": {
                "url": "s3://bucket/a",
                "credentialsSecret": "hsm-archive",
                "device": "prod-hsm",
            },
        }))
        .expect("site");
        let config = SiteConfig::from_spec(&site);
        assert_eq!(config.lease, Duration::from_secs(20));
        let follow = config.follow.expect("follow");
        assert_eq!(follow.device, "prod-hsm");
        assert_eq!(follow.bucket.archive_name, BackupSpec::DEFAULT_ARCHIVE_NAME);
    }
}
