//! The node's side of `spec.backup`: runs the archiver as the controller (or the node's
//! flags) configure it, takes a base or runs a restore drill when asked, and reports how
//! the archive stands. Drills run in the background so the controller never waits on one.
//!
//! Credentials and the recovery key's public half are read from the Secret the spec
//! names, mounted on the node under the credentials root; nothing secret crosses the wire.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tonic::Status;

use super::archiver::{ArchiverState, now_millis};
use super::chain::ArchiveRoot;
use super::chain::Target;
use super::drill::{self, DrillReport};
use super::restore::{RestoreReport, restore_through_agent};
use super::{
    ArchiveError, ArchiveMetrics, Archiver, ArchiverConfig, Bucket, BucketConfig, KeyUnwrap,
    KeyWrap, RecoveryPublicKey,
};
use crate::crd::DeviceRole;
use crate::mirror::{Agent, ArchiveControl, pb};

/// The file of the mounted Secret holding the recovery key's public half.
pub const RECOVERY_PUBLIC_KEY_FILE: &str = "recovery.pub";
/// Where the node plugin's DaemonSet mounts archive Secrets, one directory each.
pub const DEFAULT_CREDENTIALS_ROOT: &str = "/etc/hsm-secrets/archive";

/// Everything an archiver needs, resolved to files on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveSettings {
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// `access-key-id` and `secret-access-key` (S3), when the bucket needs them.
    pub credentials_dir: Option<PathBuf>,
    pub recovery_public_key: PathBuf,
    pub archive_name: String,
    pub segment_interval: Duration,
    pub base_interval: Duration,
    pub retention: Option<Duration>,
}

impl ArchiveSettings {
    /// The controller's spec, with the Secret it names found under `credentials_root`.
    pub fn from_spec(
        spec: &pb::ArchiveSpec,
        credentials_root: &Path,
    ) -> Result<Self, ArchiveError> {
        let bad =
            |field: &str, fix: &str| ArchiveError::Config(format!("spec.backup.{field}: {fix}"));
        if spec.url.trim().is_empty() {
            return Err(bad("url", "set s3://BUCKET[/PREFIX] or file:///DIRECTORY"));
        }
        let secret = spec.credentials_secret.as_str();
        // The name becomes a path component: no separators, no parent references.
        let plain = !secret.is_empty()
            && secret.len() <= 253
            && secret
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !secret.starts_with('.');
        if !plain {
            return Err(bad(
                "credentialsSecret",
                "name a Secret (lowercase letters, digits, '-' and '.')",
            ));
        }
        if spec.segment_interval_ms == 0 || spec.base_interval_s == 0 {
            return Err(bad(
                "segmentIntervalSeconds",
                "the segment and base intervals must be above 0",
            ));
        }
        let dir = credentials_root.join(secret);
        let recovery_public_key = dir.join(RECOVERY_PUBLIC_KEY_FILE);
        if !recovery_public_key.is_file() {
            return Err(ArchiveError::Config(format!(
                "{} is missing: create Secret {secret} with key {RECOVERY_PUBLIC_KEY_FILE} \
                 (`hsm-secrets archive recovery-keygen` wrote it) and mount it on the node \
                 plugin at {}",
                recovery_public_key.display(),
                dir.display()
            )));
        }
        let nonempty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        Ok(Self {
            url: spec.url.trim().to_string(),
            endpoint: nonempty(&spec.endpoint),
            region: nonempty(&spec.region),
            credentials_dir: Some(dir),
            recovery_public_key,
            archive_name: nonempty(&spec.archive_name).unwrap_or_else(|| "main".into()),
            segment_interval: Duration::from_millis(spec.segment_interval_ms),
            base_interval: Duration::from_secs(spec.base_interval_s),
            retention: (spec.retention_s > 0).then(|| Duration::from_secs(spec.retention_s)),
        })
    }
}

impl ArchiveSettings {
    /// Reads the recovery key and opens the bucket: what `configure` needs first.
    pub fn check(&self) -> Result<(RecoveryPublicKey, Bucket), ArchiveError> {
        let recovery = RecoveryPublicKey::read(&self.recovery_public_key)?;
        let bucket = Bucket::open(&BucketConfig {
            url: self.url.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            credentials_dir: self.credentials_dir.clone(),
            timeout: Duration::from_secs(30),
        })?;
        Ok((recovery, bucket))
    }
}

/// The archive key and recipients of this node's token.
pub trait TokenKey: KeyWrap + KeyUnwrap {}
impl<T: KeyWrap + KeyUnwrap> TokenKey for T {}

struct Running {
    settings: ArchiveSettings,
    bucket: Bucket,
    root: ArchiveRoot,
    state: Arc<Mutex<ArchiverState>>,
    /// Dropping it stops the archiver.
    _stop: tokio::sync::oneshot::Sender<()>,
}

#[derive(Default)]
struct Supervised {
    running: Option<Running>,
    config_error: Option<String>,
    drill_running: Option<String>,
    drill: Option<(String, Result<DrillReport, String>, u64)>,
    restore_running: Option<String>,
    restore: Option<(String, Result<RestoreReport, String>, u64)>,
}

/// Runs this node's archiver and drills.
pub struct Supervisor {
    agent: Agent,
    device: String,
    token: Arc<dyn TokenKey>,
    credentials_root: PathBuf,
    metrics: Option<ArchiveMetrics>,
    state: Arc<Mutex<Supervised>>,
}

impl Supervisor {
    pub fn new(
        agent: Agent,
        device: impl Into<String>,
        token: Arc<dyn TokenKey>,
        credentials_root: impl Into<PathBuf>,
    ) -> Self {
        Self {
            agent,
            device: device.into(),
            token,
            credentials_root: credentials_root.into(),
            metrics: None,
            state: Arc::default(),
        }
    }

    pub fn with_metrics(mut self, metrics: ArchiveMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Supervised> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Archives as `settings` say from now on; a running archiver with other settings is
    /// stopped first. The same settings again change nothing.
    pub fn configure(&self, settings: ArchiveSettings) -> Result<(), ArchiveError> {
        if self
            .lock()
            .running
            .as_ref()
            .is_some_and(|r| r.settings == settings)
        {
            return Ok(());
        }
        let (recovery, bucket) = settings.check()?;
        let root = ArchiveRoot::new(&self.device, &settings.archive_name)?;
        let config = ArchiverConfig {
            root: root.clone(),
            segment_interval: settings.segment_interval,
            base_interval: settings.base_interval,
            retention: settings.retention,
        };
        let token: Arc<dyn KeyWrap> = self.token.clone();
        let mut archiver = Archiver::new(config, bucket.clone(), vec![token, Arc::new(recovery)]);
        if let Some(metrics) = &self.metrics {
            archiver = archiver.with_metrics(metrics.clone());
        }
        let state = archiver.state();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(archiver.run(self.agent.clone(), async move {
            let _ = stopped.await;
        }));
        tracing::info!(url = %settings.url, archive = %settings.archive_name, "archiving the device");
        let mut supervised = self.lock();
        supervised.config_error = None;
        supervised.running = Some(Running {
            settings,
            bucket,
            root,
            state,
            _stop: stop,
        });
        Ok(())
    }

    /// Applies one controller request and reports.
    pub async fn handle(&self, request: pb::ArchiveRequest) -> pb::ArchiveResponse {
        let applied = request
            .spec
            .as_ref()
            .ok_or_else(|| ArchiveError::Config("the request carries no spec.backup".into()))
            .and_then(|spec| ArchiveSettings::from_spec(spec, &self.credentials_root))
            .and_then(|settings| self.configure(settings));
        if let Err(e) = applied {
            tracing::warn!(error = %e, "the archive configuration cannot be applied");
            let mut supervised = self.lock();
            supervised.running = None;
            supervised.config_error = Some(e.to_string());
        }
        if !request.base_request.is_empty()
            && let Some(running) = &self.lock().running
        {
            let mut state = running.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.base_requested = Some(request.base_request.clone());
        }
        if !request.verify_request.is_empty() {
            self.start_drill(&request.verify_request);
        }
        if let Some(restore) = request.restore.as_ref().filter(|r| !r.id.is_empty()) {
            self.start_restore(restore);
        }
        self.report()
    }

    /// Starts a drill for `request` unless one for it is running or done.
    fn start_drill(&self, request: &str) {
        let (bucket, root) = {
            let mut supervised = self.lock();
            let seen = supervised.drill_running.as_deref() == Some(request)
                || supervised
                    .drill
                    .as_ref()
                    .is_some_and(|(r, _, _)| r == request);
            if seen || supervised.drill_running.is_some() {
                return;
            }
            let Some(running) = &supervised.running else {
                return;
            };
            let target = (running.bucket.clone(), running.root.clone());
            supervised.drill_running = Some(request.to_string());
            target
        };
        let (agent, token, state, request) = (
            self.agent.clone(),
            self.token.clone(),
            self.state.clone(),
            request.to_string(),
        );
        tokio::spawn(async move {
            let outcome = async {
                let live = agent
                    .store()
                    .manifest()
                    .await
                    .map_err(ArchiveError::Token)?;
                drill::verify(&bucket, &root, &*token as &dyn KeyUnwrap, &live).await
            }
            .await
            .map_err(|e| e.to_string());
            match &outcome {
                Ok(report) if report.verified() => {
                    tracing::info!(
                        sequence = report.sequence,
                        "restore drill verified the archive"
                    )
                }
                Ok(report) => tracing::warn!(
                    sequence = report.sequence,
                    mismatches = report.mismatches.len(),
                    "restore drill found differences"
                ),
                Err(error) => tracing::warn!(%error, "restore drill failed"),
            }
            let mut supervised = state.lock().unwrap_or_else(PoisonError::into_inner);
            supervised.drill_running = None;
            supervised.drill = Some((request, outcome, now_millis()));
        });
    }

    /// Starts a restore for `request` unless one for its id is running or done. Refused
    /// (as its outcome) while another runs or when nothing archives here.
    fn start_restore(&self, request: &pb::RestoreRequest) {
        let id = request.id.clone();
        let (bucket, root) = {
            let mut supervised = self.lock();
            let seen = supervised.restore_running.as_deref() == Some(id.as_str())
                || supervised
                    .restore
                    .as_ref()
                    .is_some_and(|(r, _, _)| *r == id);
            if seen {
                return;
            }
            let refusal = match (&supervised.restore_running, &supervised.running) {
                (Some(other), _) => Some(format!(
                    "restore {other} is still running on this node; ask again when it ended"
                )),
                (None, None) => Some(
                    "this node does not archive (see the BackupArchived condition); fix \
                     spec.backup first"
                        .to_string(),
                ),
                (None, Some(_)) => None,
            };
            if let Some(why) = refusal {
                supervised.restore = Some((id, Err(why), now_millis()));
                return;
            }
            let Some(running) = &supervised.running else {
                return;
            };
            let target = (running.bucket.clone(), running.root.clone());
            supervised.restore_running = Some(id.clone());
            target
        };
        let target = match (request.to_sequence, request.to_time_ms) {
            (0, 0) => Target::Latest,
            (n, 0) => Target::Sequence(n),
            (_, t) => Target::Time(t),
        };
        let (agent, token, state, force) = (
            self.agent.clone(),
            self.token.clone(),
            self.state.clone(),
            request.force,
        );
        tokio::spawn(async move {
            tracing::info!(%id, ?target, force, "restoring the device from its archive");
            let outcome = restore_through_agent(
                &bucket,
                &root,
                &*token as &dyn KeyUnwrap,
                target,
                &agent,
                force,
            )
            .await
            .map_err(|e| e.to_string());
            match &outcome {
                Ok(report) => tracing::info!(
                    sequence = report.sequence,
                    secrets = report.secrets,
                    "device restored from its archive"
                ),
                Err(error) => tracing::warn!(%error, "restore failed"),
            }
            let mut supervised = state.lock().unwrap_or_else(PoisonError::into_inner);
            supervised.restore_running = None;
            supervised.restore = Some((id, outcome, now_millis()));
        });
    }

    /// How the archive stands, as the RPC answers it.
    pub fn report(&self) -> pb::ArchiveResponse {
        let snapshot = self.agent.snapshot();
        let not_primary =
            snapshot.role != DeviceRole::Primary || snapshot.lease_remaining.is_zero();
        let supervised = self.lock();
        let mut response = pb::ArchiveResponse {
            config_error: supervised.config_error.clone().unwrap_or_default(),
            drill_running: supervised.drill_running.clone().unwrap_or_default(),
            drill: supervised
                .drill
                .as_ref()
                .map(|(request, outcome, finished)| drill_pb(request, outcome, *finished)),
            not_primary,
            restore_running: supervised.restore_running.clone().unwrap_or_default(),
            restore: supervised
                .restore
                .as_ref()
                .map(|(id, outcome, finished)| restore_pb(id, outcome, *finished)),
            ..Default::default()
        };
        if let Some(running) = &supervised.running {
            let state = running
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            response.archived_sequence = state.archived_sequence;
            response.primary_sequence = state.primary_sequence;
            response.up_to_date_ms = state.up_to_date_at.unwrap_or(0);
            response.last_error = state.last_error.unwrap_or_default();
            response.base_done = state.base_done.unwrap_or_default();
            let skip = state.bases.len().saturating_sub(MAX_REPORTED_BASES);
            response.bases = state.bases[skip..]
                .iter()
                .map(|b| pb::ArchivePoint {
                    epoch: b.epoch,
                    sequence: b.sequence,
                    time_ms: b.millis,
                })
                .collect();
        }
        response
    }
}

const MAX_REPORTED_BASES: usize = 32;

fn drill_pb(
    request: &str,
    outcome: &Result<DrillReport, String>,
    finished: u64,
) -> pb::DrillOutcome {
    match outcome {
        Ok(report) => pb::DrillOutcome {
            request: request.into(),
            verified: report.verified(),
            sequence: report.sequence,
            epoch: report.epoch,
            time_ms: rfc3339_millis(&report.time),
            secrets: report.secrets as u64,
            bytes: report.bytes,
            duration_ms: report.duration_ms,
            finished_ms: finished,
            message: drill_message(report),
        },
        Err(error) => pb::DrillOutcome {
            request: request.into(),
            finished_ms: finished,
            message: error.clone(),
            ..Default::default()
        },
    }
}

fn restore_pb(
    id: &str,
    outcome: &Result<RestoreReport, String>,
    finished: u64,
) -> pb::RestoreOutcome {
    match outcome {
        Ok(report) => pb::RestoreOutcome {
            id: id.into(),
            succeeded: true,
            sequence: report.sequence,
            epoch: report.epoch,
            time_ms: rfc3339_millis(&report.time),
            secrets: report.secrets as u64,
            bytes: report.bytes,
            finished_ms: finished,
            message: report
                .stopped
                .as_deref()
                .map(|s| format!("the chain stopped early, at the newest verified point: {s}"))
                .unwrap_or_default(),
        },
        Err(error) => pb::RestoreOutcome {
            id: id.into(),
            finished_ms: finished,
            message: error.clone(),
            ..Default::default()
        },
    }
}

/// What a drill that did not verify found, in one line (paths only).
fn drill_message(report: &DrillReport) -> String {
    let mut parts = Vec::new();
    if !report.mismatches.is_empty() {
        parts.push(format!(
            "{} path(s) differ from the device: {}",
            report.mismatches.len(),
            report.mismatches.join(", ")
        ));
    }
    if let Some(stopped) = &report.stopped {
        parts.push(format!("the rebuild stopped early: {stopped}"));
    }
    parts.join("; ")
}

/// Milliseconds of an RFC 3339 time, 0 when it does not parse.
fn rfc3339_millis(text: &str) -> u64 {
    text.parse::<k8s_openapi::jiff::Timestamp>()
        .map(|t| t.as_millisecond().max(0) as u64)
        .unwrap_or(0)
}

#[async_trait::async_trait]
impl ArchiveControl for Supervisor {
    async fn archive(&self, request: pb::ArchiveRequest) -> Result<pb::ArchiveResponse, Status> {
        Ok(self.handle(request).await)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(secret: &str) -> pb::ArchiveSpec {
        pb::ArchiveSpec {
            url: "s3://bucket/site-a".into(),
            credentials_secret: secret.into(),
            segment_interval_ms: 5000,
            base_interval_s: 3600,
            ..Default::default()
        }
    }

    #[test]
    fn settings_come_from_the_mounted_secret_and_name_what_is_missing() {
        let root = tempfile::tempdir().unwrap();
        let missing = ArchiveSettings::from_spec(&spec("hsm-archive"), root.path()).unwrap_err();
        let text = missing.to_string();
        assert!(
            text.contains("recovery.pub") && text.contains("hsm-archive"),
            "{text}"
        );
        std::fs::create_dir_all(root.path().join("hsm-archive")).unwrap();
        std::fs::write(root.path().join("hsm-archive/recovery.pub"), "x").unwrap();
        let ok = ArchiveSettings::from_spec(&spec("hsm-archive"), root.path()).unwrap();
        assert_eq!(ok.credentials_dir, Some(root.path().join("hsm-archive")));
        assert_eq!(ok.archive_name, "main");
        assert_eq!(ok.retention, None);
        for bad in ["../etc", "a/b", "", ".hidden", "UPPER"] {
            let e = ArchiveSettings::from_spec(&spec(bad), root.path()).unwrap_err();
            assert!(e.to_string().contains("credentialsSecret"), "{bad}: {e}");
        }
    }
}
