//! The node's side of `spec.backup`: runs the archiver as the controller (or the node's
//! flags) configure it, takes a base or runs a restore drill when asked, and reports how
//! the archive stands. Drills run in the background so the controller never waits on one.
//!
//! Credentials and the recovery key's public half are read from the Secret the spec
//! names, mounted on the node under the credentials root; nothing secret crosses the wire.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::archiver::SiteGuard;
use super::archiver::{ArchiverState, now_millis};
use super::chain::ArchiveRoot;
use super::chain::Target;
use super::drill::{self, DrillReport};
use super::plan::{ArchiveReport, DrillResult, RestoreAsk, RestoreResult, SiteReport};
use super::request::{ArchiveControl, ArchiveRequest, BackupConfig, BucketRef, SiteConfig};
use super::restore::{RestoreReport, restore_through_agent};
use super::site::{FollowState, Follower, follow as follow_archive, promotion_wait};
use super::{
    ArchiveError, ArchiveMetrics, Archiver, ArchiverConfig, Bucket, BucketConfig, KeyUnwrap,
    KeyWrap, RecoveryPublicKey,
};
use crate::crd::{DeviceRole, SiteRole};
use crate::mirror::Agent;
use crate::mirror::site::SiteGate;

/// The file of the mounted Secret holding the recovery key's public half.
pub const RECOVERY_PUBLIC_KEY_FILE: &str = "recovery.pub";
/// Where the node plugin's DaemonSet mounts archive Secrets, one directory each.
pub const DEFAULT_CREDENTIALS_ROOT: &str = "/etc/hsm-secrets/archive";

/// A bucket resolved to files on this node: what the archiver and the follower open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketSettings {
    pub url: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// `access-key-id` and `secret-access-key` (S3), when the bucket needs them.
    pub credentials_dir: Option<PathBuf>,
    pub recovery_public_key: PathBuf,
    pub archive_name: String,
}

/// Everything an archiver needs, resolved to files on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveSettings {
    pub bucket: BucketSettings,
    pub segment_interval: Duration,
    pub base_interval: Duration,
    pub retention: Option<Duration>,
}

impl BucketSettings {
    /// `bucket` (the spec's `field`), with the Secret it names found under
    /// `credentials_root`. Errors name the field and the fix.
    pub fn resolve(
        bucket: &BucketRef,
        credentials_root: &Path,
        field: &str,
    ) -> Result<Self, ArchiveError> {
        let bad = |name: &str, fix: &str| ArchiveError::Config(format!("{field}.{name}: {fix}"));
        if bucket.url.trim().is_empty() {
            return Err(bad("url", "set s3://BUCKET[/PREFIX] or file:///DIRECTORY"));
        }
        let secret = bucket.credentials_secret.as_str();
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
        let dir = credentials_root.join(secret);
        let recovery_public_key = dir.join(RECOVERY_PUBLIC_KEY_FILE);
        if !recovery_public_key.is_file() {
            return Err(ArchiveError::Config(format!(
                "{field}.credentialsSecret: {} is missing: create Secret {secret} with key \
                 {RECOVERY_PUBLIC_KEY_FILE} (`hsm-secrets archive recovery-keygen` wrote it) \
                 and mount it on the node plugin at {}",
                recovery_public_key.display(),
                dir.display()
            )));
        }
        let nonempty = |s: &Option<String>| {
            s.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let name = bucket.archive_name.trim();
        Ok(Self {
            url: bucket.url.trim().to_string(),
            endpoint: nonempty(&bucket.endpoint),
            region: nonempty(&bucket.region),
            credentials_dir: Some(dir),
            recovery_public_key,
            archive_name: if name.is_empty() { "main" } else { name }.to_string(),
        })
    }

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

impl ArchiveSettings {
    /// The controller's `spec.backup`, resolved on this node.
    pub fn resolve(config: &BackupConfig, credentials_root: &Path) -> Result<Self, ArchiveError> {
        for (interval, field) in [
            (config.segment_interval, "segmentIntervalSeconds"),
            (config.base_interval, "baseIntervalMinutes"),
        ] {
            if interval.is_zero() {
                return Err(ArchiveError::Config(format!(
                    "spec.backup.{field}: must be above 0"
                )));
            }
        }
        Ok(Self {
            bucket: BucketSettings::resolve(&config.bucket, credentials_root, "spec.backup")?,
            segment_interval: config.segment_interval,
            base_interval: config.base_interval,
            retention: config.retention.filter(|r| !r.is_zero()),
        })
    }

    /// Reads the recovery key and opens the bucket: what `configure` needs first.
    pub fn check(&self) -> Result<(RecoveryPublicKey, Bucket), ArchiveError> {
        self.bucket.check()
    }
}

/// The archive key and recipients of this node's token.
pub trait TokenKey: KeyWrap + KeyUnwrap {}
impl<T: KeyWrap + KeyUnwrap> TokenKey for T {}

struct Running {
    settings: ArchiveSettings,
    /// The site guard it runs with (site name, lease, active since), if any.
    guard: Option<(String, Duration, u64)>,
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
    site: Option<SiteRunning>,
    promotion_running: Option<String>,
    promotion_done: Option<String>,
    promotion_error: Option<String>,
    /// The promotion made here.
    promotion_fence: Option<super::site::Fence>,
    /// This site's own archive (spec.backup), for the fences of its past.
    own_archive: Option<ArchiveSettings>,
}

/// A passive site's follower, as configured.
struct SiteRunning {
    settings: SiteSettings,
    follower: Option<Arc<tokio::sync::Mutex<Follower>>>,
    follow_state: Option<Arc<Mutex<FollowState>>>,
    /// Dropping it stops the follower.
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// `spec.site` as this node applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteSettings {
    pub name: String,
    pub lease: Duration,
    pub follow: Option<FollowSettings>,
}

/// The archive a passive site applies, resolved to files on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FollowSettings {
    pub bucket: BucketSettings,
    pub device: String,
}

impl SiteSettings {
    /// The controller's `spec.site`, resolved on this node.
    pub fn resolve(config: &SiteConfig, credentials_root: &Path) -> Result<Self, ArchiveError> {
        if config.name.is_empty() || config.lease.is_zero() {
            return Err(ArchiveError::Config(
                "spec.site needs a name and a lease above 0".into(),
            ));
        }
        let follow = match &config.follow {
            None => None,
            Some(f) => Some(FollowSettings {
                bucket: BucketSettings::resolve(
                    &f.bucket,
                    credentials_root,
                    "spec.site.followArchive",
                )?,
                device: f.device.clone(),
            }),
        };
        Ok(Self {
            name: config.name.clone(),
            lease: config.lease,
            follow,
        })
    }
}

/// How often a passive site looks for new archive objects.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

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
        self.configure_guarded(settings, None)
    }

    /// As [`configure`](Self::configure), checking before every step that no other site
    /// was promoted (`guard`: this site's name and lease).
    pub fn configure_guarded(
        &self,
        settings: ArchiveSettings,
        guard: Option<(String, Duration, u64)>,
    ) -> Result<(), ArchiveError> {
        if self
            .lock()
            .running
            .as_ref()
            .is_some_and(|r| r.settings == settings && r.guard == guard)
        {
            return Ok(());
        }
        let (recovery, bucket) = settings.check()?;
        let root = ArchiveRoot::new(&self.device, &settings.bucket.archive_name)?;
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
        if let Some((site, lease, active_since)) = &guard {
            let key: Arc<dyn KeyUnwrap> = self.token.clone();
            archiver = archiver.with_site(SiteGuard {
                site: site.clone(),
                lease: *lease,
                key,
                active_since: *active_since,
            });
        }
        let state = archiver.state();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(archiver.run(self.agent.clone(), async move {
            let _ = stopped.await;
        }));
        tracing::info!(url = %settings.bucket.url, archive = %settings.bucket.archive_name, "archiving the device");
        let mut supervised = self.lock();
        supervised.config_error = None;
        supervised.running = Some(Running {
            settings,
            guard,
            bucket,
            root,
            state,
            _stop: stop,
        });
        Ok(())
    }

    /// Applies one controller request and reports.
    pub async fn handle(&self, request: ArchiveRequest) -> ArchiveReport {
        let ArchiveRequest { backup, site, ask } = request;
        let resolved = site
            .as_ref()
            .map(|config| SiteSettings::resolve(config, &self.credentials_root))
            .transpose();
        let applied = match resolved {
            Err(e) => Err(e),
            Ok(resolved) => self.apply(backup.as_ref(), resolved, ask.drain),
        };
        if let Err(e) = applied {
            tracing::warn!(error = %e, "the archive configuration cannot be applied");
            // A site whose configuration did not apply takes no writes until it does.
            if let Some(site) = &site {
                self.agent.update_site_gate(|gate| match gate {
                    SiteGate::Fenced { .. }
                    | SiteGate::Draining { .. }
                    | SiteGate::Promoting { .. } => gate.clone(),
                    _ => SiteGate::Active {
                        site: site.name.clone(),
                        until: None,
                    },
                });
            }
            let mut supervised = self.lock();
            supervised.running = None;
            supervised.config_error = Some(e.to_string());
        }
        if let Some(request) = ask.promote_request.as_deref().filter(|r| !r.is_empty()) {
            self.start_promotion(request);
        }
        if let Some(request) = ask.base_request.filter(|r| !r.is_empty())
            && let Some(running) = &self.lock().running
        {
            let mut state = running.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.base_requested = Some(request);
        }
        if let Some(request) = ask.verify_request.as_deref().filter(|r| !r.is_empty()) {
            self.start_drill(request);
        }
        if let Some(restore) = ask.restore.as_ref().filter(|r| !r.id.is_empty()) {
            self.start_restore(restore);
        }
        self.report()
    }

    /// The archive and the site as the controller's request says. A passive site follows
    /// and does not archive; an active one archives with the site guard; a promoted one
    /// archives as active.
    fn apply(
        &self,
        backup: Option<&BackupConfig>,
        site: Option<SiteSettings>,
        drain: bool,
    ) -> Result<(), ArchiveError> {
        let backup = backup
            .map(|config| ArchiveSettings::resolve(config, &self.credentials_root))
            .transpose()?;
        let Some(site) = site else {
            // A fenced site stays fenced even if spec.site is removed: it never archives
            // into the history another site took over.
            if let SiteGate::Fenced { by, .. } = self.agent.site_gate() {
                return Err(ArchiveError::Config(format!(
                    "this site was fenced by site {by}'s promotion and archives nothing more; \
                     keep spec.site and rejoin it as passive (kubectl hsm site rejoin)"
                )));
            }
            self.lock().site = None;
            self.agent.update_site_gate(|_| SiteGate::Open);
            return match backup {
                Some(settings) => self.configure(settings),
                None => Err(ArchiveError::Config(
                    "the request carries neither spec.backup nor spec.site".into(),
                )),
            };
        };
        if let Some(settings) = &backup
            && site.lease < settings.segment_interval * 3
        {
            return Err(ArchiveError::Config(format!(
                "spec.site.leaseSeconds ({} s) must be at least three archive segment intervals \
                 ({} s each): the site renews its lease at each archive step",
                site.lease.as_secs(),
                settings.segment_interval.as_secs_f64()
            )));
        }
        // A fenced site told to follow rejoins: its past promotion no longer counts.
        if site.follow.is_some() && matches!(self.agent.site_gate(), SiteGate::Fenced { .. }) {
            let mut supervised = self.lock();
            supervised.promotion_done = None;
            supervised.promotion_fence = None;
            supervised.site = None;
            supervised.running = None;
        }
        self.lock().own_archive = backup.clone();
        let promoted = self.promoted();
        if let (Some(follow), false) = (&site.follow, promoted) {
            self.follow(&site, follow)?;
            let mut supervised = self.lock();
            supervised.running = None;
            supervised.config_error = None;
            return Ok(());
        }
        // Active (or promoted): the gate waits for the archiver's first clean check (a
        // promoted site also for the old site's lease, even after a restart); a drain
        // stops writes until it is called off or a promotion elsewhere fences.
        let promoted_fence = self.promoted_fence();
        let wait = promotion_wait(site.lease);
        self.agent.update_site_gate(|gate| match (gate, drain) {
            (SiteGate::Fenced { .. }, _) => gate.clone(),
            (_, true) => SiteGate::Draining {
                site: site.name.clone(),
            },
            (SiteGate::Active { .. } | SiteGate::Promoting { .. }, false) => gate.clone(),
            (_, false) => match &promoted_fence {
                Some(fence) => SiteGate::Promoting {
                    site: site.name.clone(),
                    open_at: opening(fence, wait),
                },
                None => SiteGate::Active {
                    site: site.name.clone(),
                    until: None,
                },
            },
        });
        let guard = Some((site.name.clone(), site.lease, self.active_since()));
        {
            let mut supervised = self.lock();
            match &mut supervised.site {
                Some(running) if running.settings == site => {}
                other => {
                    *other = Some(SiteRunning {
                        settings: site,
                        follower: None,
                        follow_state: None,
                        _stop: None,
                    })
                }
            }
        }
        match backup {
            Some(settings) => self.configure_guarded(settings, guard),
            None => Err(ArchiveError::Config(
                "an active site needs spec.backup: its archive is how the other sites follow \
                 it and how it learns of a promotion; it takes no writes until then"
                    .into(),
            )),
        }
    }

    /// This site's own promotion, made here or found in the archive it followed.
    fn promoted_fence(&self) -> Option<super::site::Fence> {
        let supervised = self.lock();
        supervised.promotion_fence.clone().or_else(|| {
            supervised
                .site
                .as_ref()
                .and_then(|s| s.follow_state.as_ref())
                .and_then(|st| {
                    st.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .promoted
                        .clone()
                })
        })
    }

    /// The site epoch of this site's own promotion, 0 when it never was promoted.
    fn active_since(&self) -> u64 {
        self.promoted_fence().map_or(0, |f| f.site_epoch)
    }

    /// Whether this site's own promotion is known (made here, or found in the archive).
    fn promoted(&self) -> bool {
        self.promoted_fence().is_some()
    }

    /// Starts (or keeps) the follower of `follow`; the agent refuses writes meanwhile.
    fn follow(&self, site: &SiteSettings, follow: &FollowSettings) -> Result<(), ArchiveError> {
        if follow.device == self.device {
            return Err(ArchiveError::Config(format!(
                "spec.site.followArchive.device names this device ({}): a passive site follows \
                 the active site's device",
                self.device
            )));
        }
        self.agent.update_site_gate(|_| SiteGate::Passive {
            site: site.name.clone(),
            active: follow.device.clone(),
        });
        if self
            .lock()
            .site
            .as_ref()
            .is_some_and(|r| r.settings == *site && r.follower.is_some())
        {
            return Ok(());
        }
        let (_, bucket) = follow.bucket.check()?;
        let root = ArchiveRoot::new(&follow.device, &follow.bucket.archive_name)?;
        let key: Arc<dyn KeyUnwrap> = self.token.clone();
        let follower = Follower::new(&site.name, bucket, root, key);
        let state = follower.state();
        let follower = Arc::new(tokio::sync::Mutex::new(follower));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(follow_archive(
            follower.clone(),
            self.agent.clone(),
            FOLLOW_INTERVAL,
            async move {
                let _ = stopped.await;
            },
        ));
        tracing::info!(site = %site.name, device = %follow.device, url = %follow.bucket.url, "following the active site's archive");
        self.lock().site = Some(SiteRunning {
            settings: site.clone(),
            follower: Some(follower),
            follow_state: Some(state),
            _stop: Some(stop),
        });
        Ok(())
    }

    /// Promotes this passive site, once per request id: a last catch-up, the fence, then
    /// the active site's lease (and a margin) before this site takes writes.
    fn start_promotion(&self, request: &str) {
        let (follower, site) = {
            let mut supervised = self.lock();
            if supervised.promotion_running.is_some()
                || supervised.promotion_done.as_deref() == Some(request)
            {
                return;
            }
            let Some(running) = &supervised.site else {
                supervised.promotion_error = Some(format!(
                    "{request}: this device has no spec.site: nothing to promote"
                ));
                return;
            };
            let Some(follower) = running.follower.clone() else {
                supervised.promotion_error = Some(format!(
                    "{request}: site {} is not passive (it follows no archive): nothing to promote",
                    running.settings.name
                ));
                return;
            };
            let settings = running.settings.clone();
            supervised.promotion_running = Some(request.to_string());
            (follower, settings)
        };
        let Some(follow) = site.follow.clone() else {
            return;
        };
        let own_archive = self.lock().own_archive.clone();
        let (agent, token, state, device, request) = (
            self.agent.clone(),
            self.token.clone(),
            self.state.clone(),
            self.device.clone(),
            request.to_string(),
        );
        tokio::spawn(async move {
            let outcome = async {
                let (recovery, _) = follow.bucket.check()?;
                let wrap: Arc<dyn KeyWrap> = token.clone();
                let wrap_unwrap: Arc<dyn KeyUnwrap> = token.clone();
                let keys: [&dyn KeyWrap; 2] = [&*wrap, &recovery];
                let history = match &own_archive {
                    Some(own) => Some((own.check()?.1, ArchiveRoot::new(&device, &own.bucket.archive_name)?)),
                    None => None,
                };
                let fence = follower
                    .lock()
                    .await
                    .promote(&agent, &keys, &device, history.as_ref().map(|(b, r)| (b, r)))
                    .await?;
                let wait = promotion_wait(site.lease);
                // No write before the old site's lease has run out, whatever else happens.
                agent.update_site_gate(|_| SiteGate::Promoting {
                    site: site.name.clone(),
                    open_at: opening(&fence, wait),
                });
                if let Some((bucket, own)) = &history {
                    super::site::record_promotion(bucket, own, &keys, &*wrap_unwrap, &fence).await?;
                }
                tracing::warn!(site = %site.name, wait_ms = wait.as_millis() as u64, "waiting out the active site's lease before taking writes");
                tokio::time::sleep(wait).await;
                Ok::<_, ArchiveError>(fence)
            }
            .await;
            let mut supervised = state.lock().unwrap_or_else(PoisonError::into_inner);
            supervised.promotion_running = None;
            match outcome {
                Ok(fence) => {
                    tracing::warn!(site = %site.name, site_epoch = fence.site_epoch, "site promoted: active");
                    supervised.promotion_done = Some(request);
                    supervised.promotion_error = None;
                    supervised.promotion_fence = Some(fence);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "site promotion failed");
                    supervised.promotion_error = Some(format!("{request}: {e}"));
                }
            }
        });
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
    fn start_restore(&self, request: &RestoreAsk) {
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
            (_, Some(t)) => Target::Time(t),
            (Some(n), None) => Target::Sequence(n),
            (None, None) => Target::Latest,
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

    /// How the archive stands.
    pub fn report(&self) -> ArchiveReport {
        let snapshot = self.agent.snapshot();
        let not_primary =
            snapshot.role != DeviceRole::Primary || snapshot.lease_remaining.is_zero();
        let supervised = self.lock();
        let mut report = ArchiveReport {
            config_error: supervised.config_error.clone(),
            drill_running: supervised.drill_running.clone(),
            drill: supervised
                .drill
                .as_ref()
                .map(|(request, outcome, finished)| drill_result(request, outcome, *finished)),
            not_primary,
            restore_running: supervised.restore_running.clone(),
            restore: supervised
                .restore
                .as_ref()
                .map(|(id, outcome, finished)| restore_result(id, outcome, *finished)),
            site: supervised
                .site
                .as_ref()
                .map(|site| self.site_report(&supervised, site)),
            ..Default::default()
        };
        if let Some(running) = &supervised.running {
            let state = running
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            report.archived_sequence = state.archived_sequence;
            report.primary_sequence = state.primary_sequence;
            report.up_to_date_ms = state.up_to_date_at;
            report.last_error = state.last_error;
            report.base_done = state.base_done;
            let skip = state.bases.len().saturating_sub(MAX_REPORTED_BASES);
            report.bases = state.bases[skip..]
                .iter()
                .map(|b| (b.epoch, b.sequence, b.millis))
                .collect();
        }
        report
    }
}

const MAX_REPORTED_BASES: usize = 32;

/// When a site promoted by `fence` may take writes: the fence's time (on this site's
/// clock, which wrote it) plus `wait`, as an instant of this process.
fn opening(fence: &super::site::Fence, wait: Duration) -> std::time::Instant {
    let ready_at = fence.millis.saturating_add(wait.as_millis() as u64);
    std::time::Instant::now() + Duration::from_millis(ready_at.saturating_sub(now_millis()))
}

impl Supervisor {
    /// The site's report: its role from the agent's gate, a passive site's progress
    /// through the archive, a fenced site's fence and lost writes.
    fn site_report(&self, supervised: &Supervised, site: &SiteRunning) -> SiteReport {
        let mut report = SiteReport {
            role: SiteRole::Active,
            site_epoch: 0,
            source_sequence: 0,
            source_time_ms: None,
            applied_sequence: 0,
            applied_time_ms: None,
            lag_ms: 0,
            fenced_by: None,
            fenced_by_device: None,
            fence_sequence: 0,
            lost_writes: 0,
            promotion_done: supervised.promotion_done.clone(),
            promotion_running: supervised.promotion_running.clone(),
            error: supervised.promotion_error.clone(),
            draining: false,
        };
        match self.agent.site_gate() {
            SiteGate::Passive { .. } => report.role = SiteRole::Passive,
            SiteGate::Fenced {
                by,
                by_device,
                site_epoch,
                fence_sequence,
                ..
            } => {
                report.role = SiteRole::Fenced;
                report.fenced_by = Some(by).filter(|s| !s.is_empty());
                report.fenced_by_device = Some(by_device).filter(|s| !s.is_empty());
                report.site_epoch = site_epoch;
                report.fence_sequence = fence_sequence;
            }
            SiteGate::Draining { .. } => report.draining = true,
            SiteGate::Active { .. } | SiteGate::Open | SiteGate::Promoting { .. } => {}
        }
        let millis = |v: u64| (v > 0).then_some(v);
        if let Some(state) = &site.follow_state {
            let state = state.lock().unwrap_or_else(PoisonError::into_inner).clone();
            report.site_epoch = report.site_epoch.max(state.site_epoch);
            report.source_sequence = state.source_sequence;
            report.source_time_ms = millis(state.source_millis);
            report.applied_sequence = state.applied_sequence;
            report.applied_time_ms = millis(state.applied_millis);
            report.lag_ms = state
                .behind_since_millis
                .map_or(0, |since| now_millis().saturating_sub(since));
            if report.error.is_none() {
                report.error = state.last_error;
            }
        }
        if let Some(running) = &supervised.running {
            let state = running.state.lock().unwrap_or_else(PoisonError::into_inner);
            report.site_epoch = report.site_epoch.max(state.site_epoch);
            report.lost_writes = state.lost_writes;
        }
        report
    }
}

fn drill_result(
    request: &str,
    outcome: &Result<DrillReport, String>,
    finished: u64,
) -> DrillResult {
    match outcome {
        Ok(report) => DrillResult {
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
        Err(error) => DrillResult {
            request: request.into(),
            finished_ms: finished,
            message: Some(error.clone()),
            ..Default::default()
        },
    }
}

fn restore_result(
    id: &str,
    outcome: &Result<RestoreReport, String>,
    finished: u64,
) -> RestoreResult {
    match outcome {
        Ok(report) => RestoreResult {
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
                .map(|s| format!("the chain stopped early, at the newest verified point: {s}")),
        },
        Err(error) => RestoreResult {
            id: id.into(),
            finished_ms: finished,
            message: Some(error.clone()),
            ..Default::default()
        },
    }
}

/// What a drill that did not verify found, in one line (paths only).
fn drill_message(report: &DrillReport) -> Option<String> {
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
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Milliseconds of an RFC 3339 time; none when it does not parse or is not after 1970.
fn rfc3339_millis(text: &str) -> Option<u64> {
    text.parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
        .filter(|ms| *ms > 0)
        .map(|ms| ms as u64)
}

#[async_trait::async_trait]
impl ArchiveControl for Supervisor {
    async fn archive(&self, request: ArchiveRequest) -> ArchiveReport {
        self.handle(request).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(secret: &str) -> BackupConfig {
        BackupConfig {
            bucket: BucketRef {
                url: "s3://bucket/site-a".into(),
                credentials_secret: secret.into(),
                ..Default::default()
            },
            segment_interval: Duration::from_secs(5),
            base_interval: Duration::from_secs(3600),
            retention: None,
        }
    }

    #[test]
    fn settings_come_from_the_mounted_secret_and_name_what_is_missing() {
        let root = tempfile::tempdir().unwrap();
        let missing = ArchiveSettings::resolve(&spec("hsm-archive"), root.path()).unwrap_err();
        let text = missing.to_string();
        assert!(
            text.contains("recovery.pub") && text.contains("hsm-archive"),
            "{text}"
        );
        std::fs::create_dir_all(root.path().join("hsm-archive")).unwrap();
        std::fs::write(root.path().join("hsm-archive/recovery.pub"), "x").unwrap();
        let ok = ArchiveSettings::resolve(&spec("hsm-archive"), root.path()).unwrap();
        assert_eq!(
            ok.bucket.credentials_dir,
            Some(root.path().join("hsm-archive"))
        );
        assert_eq!(ok.bucket.archive_name, "main");
        assert_eq!(ok.retention, None);
        for bad in ["../etc", "a/b", "", ".hidden", "UPPER"] {
            let e = ArchiveSettings::resolve(&spec(bad), root.path()).unwrap_err();
            assert!(
                e.to_string().contains("spec.backup.credentialsSecret"),
                "{bad}: {e}"
            );
        }
        let never = BackupConfig {
            segment_interval: Duration::ZERO,
            ..spec("hsm-archive")
        };
        let e = ArchiveSettings::resolve(&never, root.path()).unwrap_err();
        assert!(e.to_string().contains("segmentIntervalSeconds"), "{e}");
        let no_base = BackupConfig {
            base_interval: Duration::ZERO,
            ..spec("hsm-archive")
        };
        let e = ArchiveSettings::resolve(&no_base, root.path()).unwrap_err();
        assert!(e.to_string().contains("baseIntervalMinutes"), "{e}");
    }

    #[test]
    fn a_followed_archive_is_named_by_its_own_field() {
        let root = tempfile::tempdir().unwrap();
        let site = SiteConfig {
            name: "b".into(),
            lease: Duration::from_secs(30),
            follow: Some(crate::archive::request::FollowConfig {
                bucket: BucketRef {
                    url: "s3://bucket/site-a".into(),
                    credentials_secret: "../etc".into(),
                    ..Default::default()
                },
                device: "prod-hsm".into(),
            }),
        };
        let e = SiteSettings::resolve(&site, root.path()).unwrap_err();
        assert!(
            e.to_string()
                .contains("spec.site.followArchive.credentialsSecret"),
            "{e}"
        );
        let leaseless = SiteConfig {
            lease: Duration::ZERO,
            ..site
        };
        let e = SiteSettings::resolve(&leaseless, root.path()).unwrap_err();
        assert!(e.to_string().contains("spec.site"), "{e}");
    }
}
