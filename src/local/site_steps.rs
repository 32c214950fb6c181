//! `hsm-secrets demo --sites`: one device over two sites, each a complete local system
//! (three nodes, controller, webhook) standing for a cluster, sharing one bucket. Site A
//! is active and archives; site B follows its archive, serves reads and refuses writes
//! until a person promotes it; A then fences itself and rejoins as the passive site.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use super::LocalError;
use super::clients;
use super::cluster::{BucketConfig, ClusterConfig, Follows, LocalCluster, NAMESPACE, StateFile};
use super::report::Report;
use super::sites::{self, SiteOperator};
use super::steps::{StepFailure, conclude};
use super::system;
use crate::crd::SiteRole;
use crate::kubectl::site::site_table;

/// The titles of the two-site walk-through, in order.
pub const SITE_STEPS: [&str; 8] = [
    "Start two sites, each a complete system (3 nodes, controller, webhook), one bucket",
    "Site A takes a write; site B applies it from the archive",
    "Reads at site B: a pod's volume on one of its nodes",
    "Writes at site B are refused by its agent and its webhook, naming the active site",
    "Preflight: both sites side by side",
    "Promote site B while site A still runs: A fences itself, B takes writes",
    "Rejoin: site A follows site B; what it took after the fence is reported, not merged",
    "Clean up: stop both sites, remove their directories and the bucket",
];

const TIMEOUT: Duration = Duration::from_secs(120);
/// The secret the walk-through writes and reads at both sites.
const SECRET: &str = "db-credentials";

/// Runs the two-site walk-through; cleans up after a failure or on `interrupted`.
pub async fn run_sites_demo(
    config: &ClusterConfig,
    report: &mut Report,
    interrupted: impl Future<Output = ()>,
) -> Result<(), StepFailure> {
    report.title("hsm-secrets demo --sites: one device, an active and a passive site, no cluster");
    let started = Instant::now();
    let mut walk = SiteWalk {
        config: config.clone(),
        report,
        root: PathBuf::new(),
        sites: Vec::new(),
    };
    tokio::pin!(interrupted);
    let result = tokio::select! {
        r = walk.steps() => r,
        () = &mut interrupted => Err(StepFailure { step: 0, total: SITE_STEPS.len(), title: "interrupted", error: LocalError::Interrupted }),
    };
    if let Err(failure) = &result {
        if failure.step == 0 {
            walk.report.warn("interrupted: cleaning up");
        } else {
            walk.report.fail(failure.step, &failure.error.to_string());
        }
    }
    let n = SITE_STEPS.len();
    if result.is_ok() {
        walk.report.step(n, SITE_STEPS[n - 1]);
    }
    let cleanup = walk.clean_up();
    conclude(
        walk.report,
        &SITE_STEPS,
        "two-site demo",
        started,
        result,
        cleanup,
    )
}

fn failure(step: usize, error: LocalError) -> StepFailure {
    StepFailure::at(&SITE_STEPS, step, error)
}

struct SiteWalk<'a> {
    config: ClusterConfig,
    report: &'a mut Report,
    /// Holds both sites' directories and the bucket.
    root: PathBuf,
    /// Site A, then site B.
    sites: Vec<LocalCluster>,
}

impl SiteWalk<'_> {
    async fn steps(&mut self) -> Result<(), StepFailure> {
        for n in 1..SITE_STEPS.len() {
            self.report.step(n, SITE_STEPS[n - 1]);
            let outcome = match n {
                1 => self.start().await,
                2 => self.follow().await,
                3 => self.read_at_b().await,
                4 => self.refused_at_b().await,
                5 => self.preflight().await,
                6 => self.promote().await,
                7 => self.rejoin().await,
                _ => unreachable!("step numbers come from SITE_STEPS"),
            };
            match outcome {
                Ok(summary) => self.report.pass(n, &summary),
                Err(error) => return Err(failure(n, error)),
            }
        }
        Ok(())
    }

    fn state(&self, site: usize) -> StateFile {
        self.sites[site].state_file()
    }

    fn operator(&self, site: usize) -> Result<SiteOperator, LocalError> {
        SiteOperator::of(&self.sites[site])
    }

    async fn start(&mut self) -> Result<String, LocalError> {
        let parent = self
            .config
            .work_root
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&parent).map_err(|e| LocalError::io("create", &parent, e))?;
        self.root = tempfile::Builder::new()
            .prefix("hsm-secrets-sites-")
            .tempdir_in(&parent)
            .map_err(|e| LocalError::io("create a directory in", &parent, e))?
            .keep();
        let bucket = BucketConfig {
            url: format!("file://{}", self.root.join("bucket").display()),
            endpoint: None,
            region: None,
            credentials: None,
        };
        self.report.detail(&format!(
            "bucket (a directory standing for the object store both clusters reach): {}",
            bucket.url
        ));
        for index in 0..2 {
            let follows = match self.sites.first() {
                Some(active) => Some(Follows::active_system(&active.state_file())?),
                None => None,
            };
            let config = ClusterConfig {
                dir: Some(self.root.join(sites::SITES[index])),
                site: Some(sites::site_config(index, bucket.clone(), follows)),
                timing: super::cluster::Timing::for_sites(),
                ..self.config.clone()
            };
            let cluster = tokio::task::block_in_place(|| LocalCluster::start(&config))?;
            self.sites.push(cluster);
            let cluster = self.sites.last_mut().ok_or(LocalError::Interrupted)?;
            let status = system::bring_up(cluster).await?;
            self.report.detail(&format!(
                "site {} (HSMDevice {}{}): {} processes in {}, primary {} at epoch {}",
                sites::SITES[index],
                cluster.device,
                if index == 0 {
                    ", active, archives".to_string()
                } else {
                    format!(", passive, follows {}", sites::DEVICES[0])
                },
                cluster.processes().count(),
                cluster.dir.display(),
                status.primary_node.unwrap_or_default(),
                status.epoch
            ));
        }
        self.report.detail(
            "the archive key reached site B's tokens by the key ceremony, wrapped token to token; \
             both sites' nodes hold only the recovery key's public half",
        );
        Ok(format!(
            "two sites up, each with its own tokens, state, controller and webhook; site lease {} s",
            sites::LEASE_SECONDS
        ))
    }

    async fn follow(&mut self) -> Result<String, LocalError> {
        let value = format!("written-at-site-a-{}", super::tokens::random_hex(4)?);
        let version =
            sites::write(&self.state(0), SECRET, &[("password", value.as_bytes())]).await?;
        self.report.detail(&format!(
            "$ hsm-secrets local put {SECRET} password=… --dir {}   (version {version})",
            self.sites[0].dir.display()
        ));
        let b = self.state(1);
        let primary = system::primary(&b).await?.0;
        let expected = BTreeMap::from([("password".to_string(), value.into_bytes())]);
        wait_held(&b, &primary, &expected).await?;
        let site = self
            .operator(1)?
            .wait("site B to report what it applied", TIMEOUT, |s| {
                s.role == SiteRole::Passive
                    && s.applied_sequence.unwrap_or(0) > 0
                    && s.lag_seconds == Some(0)
            })
            .await?;
        Ok(format!(
            "site B's primary holds the new value: passive, applied archive sequence {} of {}, \
             lag {} s",
            site.applied_sequence.unwrap_or(0),
            site.source_sequence.unwrap_or(0),
            site.lag_seconds.unwrap_or(0)
        ))
    }

    async fn read_at_b(&mut self) -> Result<String, LocalError> {
        let b = self.state(1);
        let a = self.state(0);
        let primary_a = system::primary(&a).await?.0;
        let expected = sites::read_agent(&a, &primary_a, SECRET)
            .await?
            .ok_or_else(|| LocalError::Check(format!("{SECRET} is gone at site A")))?;
        let primary_b = system::primary(&b).await?.0;
        let mirror = b
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .find(|n| *n != primary_b)
            .unwrap_or_default();
        // The mirror syncs from site B's primary, which applied the archive.
        wait_held(&b, &mirror, &expected).await?;
        let files = sites::read_mounted(&b, &mirror, SECRET, "checkout-b").await?;
        if files != expected {
            return Err(LocalError::Check(format!(
                "the volume at site B holds {:?}, not what site A stored",
                files.keys().collect::<Vec<_>>()
            )));
        }
        self.report.detail(&format!(
            "NodePublishVolume on site B's {mirror}: {} file(s) under {SECRET}/, equal to site A's",
            files.len()
        ));
        Ok(format!(
            "a pod at site B reads {SECRET} from its own site's tokens"
        ))
    }

    async fn refused_at_b(&mut self) -> Result<String, LocalError> {
        let b = self.state(1);
        let refused = sites::write(&b, SECRET, &[("password", b"no")]).await;
        let agent_message = match refused {
            Ok(_) => return Err(LocalError::Check("site B's primary took a write".into())),
            Err(e) => e.to_string(),
        };
        if !agent_message.contains(sites::DEVICES[0]) {
            return Err(LocalError::Check(format!(
                "the agent's refusal does not name the active site: {agent_message}"
            )));
        }
        self.report
            .detail(&format!("write sent to site B's primary: {agent_message}"));
        let import = json!({
            "apiVersion": "hsmsecrets.io/v1alpha1",
            "kind": "HSMSecret",
            "metadata": {"name": "payment-token", "namespace": NAMESPACE},
            "spec": {"deviceRef": sites::DEVICES[1], "source": {"secretRef": {"name": "payment-token-import"}}}
        });
        let review = clients::admission_review(
            "sites-validate-1",
            "hsmsecrets.io",
            "HSMSecret",
            "hsmsecrets",
            NAMESPACE,
            &import,
        );
        let cluster = &self.sites[1];
        let answer = clients::AdmissionClient::new(
            &cluster.webhook_url,
            &cluster.webhook_ca_pem,
            &cluster.webhook_server_name,
        )?
        .review("/validate", &review)
        .await?;
        let message = answer["status"]["message"].as_str().unwrap_or_default();
        if answer["allowed"] != json!(false) || !message.contains("promote") {
            return Err(LocalError::Check(format!(
                "site B's webhook admitted an import, or did not say how promotion works: {answer}"
            )));
        }
        self.report.detail(&format!(
            "HSMSecret import at site B: denied by its validating webhook (HTTP {}): {message}",
            answer["status"]["code"]
        ));
        Ok("site B refuses writes at its agents and its webhook, pointing at site A".into())
    }

    async fn preflight(&mut self) -> Result<String, LocalError> {
        for index in [0, 1] {
            let view = self.operator(index)?.view().await?;
            self.report.detail(&site_table(&view));
        }
        let view = self.operator(1)?.view().await?;
        if let Some(refusal) = crate::kubectl::site::promote_refusal(&view) {
            return Err(LocalError::Check(refusal));
        }
        let behind = view.status.as_ref().map_or(0, |site| {
            site.source_sequence
                .unwrap_or(0)
                .saturating_sub(site.applied_sequence.unwrap_or(0))
        });
        self.report.detail(&format!(
            "$ hsm-secrets local site promote --dir {}   (without --yes: this preflight only)",
            self.sites[1].dir.display()
        ));
        Ok(format!(
            "site B is {behind} archived change(s) behind site A; nothing was promoted"
        ))
    }

    async fn promote(&mut self) -> Result<String, LocalError> {
        self.report.detail(&format!(
            "$ hsm-secrets local site promote --yes --dir {}",
            self.sites[1].dir.display()
        ));
        let started = Instant::now();
        let site = self.operator(1)?.promote(TIMEOUT).await?;
        self.report.detail(&format!(
            "site B is active at site epoch {} after {:.1} s (its fence is in the bucket; it \
             waited out site A's {} s lease)",
            site.site_epoch,
            started.elapsed().as_secs_f64(),
            sites::LEASE_SECONDS
        ));
        let fenced = self
            .operator(0)?
            .wait("site A to fence itself", TIMEOUT, |s| {
                s.role == SiteRole::Fenced
            })
            .await?;
        let a = self.state(0);
        let refused = sites::write(&a, SECRET, &[("password", b"late")]).await;
        let message = match refused {
            Ok(_) => return Err(LocalError::Check("fenced site A took a write".into())),
            Err(e) => e.to_string(),
        };
        self.report
            .detail(&format!("write sent to site A's primary: {message}"));
        let value = format!("written-at-site-b-{}", super::tokens::random_hex(4)?);
        let waited = write_when_open(&self.state(1), &value).await?;
        self.report.detail(&format!(
            "site B took its first write {:.1} s after the promotion was reported",
            waited.as_secs_f64()
        ));
        Ok(format!(
            "site A fenced by site {} from sequence {}; only site B takes writes",
            fenced.fenced_by.unwrap_or_default(),
            fenced.fence_sequence.unwrap_or(0)
        ))
    }

    async fn rejoin(&mut self) -> Result<String, LocalError> {
        self.report.detail(&format!(
            "$ hsm-secrets local site rejoin --dir {}",
            self.sites[0].dir.display()
        ));
        let (summary, rejoined) = self.operator(0)?.rejoin(TIMEOUT).await?;
        self.report.detail(summary.trim_end());
        let b = self.state(1);
        let primary_b = system::primary(&b).await?.0;
        let expected = sites::read_agent(&b, &primary_b, SECRET)
            .await?
            .ok_or_else(|| LocalError::Check(format!("{SECRET} is gone at site B")))?;
        let a = self.state(0);
        let primary_a = system::primary(&a).await?.0;
        wait_held(&a, &primary_a, &expected).await?;
        let site = self
            .operator(0)?
            .wait("site A to report what it applied", TIMEOUT, |s| {
                s.applied_sequence.unwrap_or(0) > 0 && s.lag_seconds == Some(0)
            })
            .await?;
        Ok(format!(
            "site A is passive, following site B, and holds site B's write (applied sequence {}; \
             {} lost write(s) reported)",
            site.applied_sequence.unwrap_or(0),
            rejoined.lost_writes.unwrap_or(0)
        ))
    }

    fn clean_up(&mut self) -> Result<String, LocalError> {
        let mut stopped = 0;
        let mut errors = Vec::new();
        for mut site in self.sites.drain(..) {
            let cleanup = site.shutdown();
            stopped += cleanup.stopped;
            errors.extend(cleanup.errors);
        }
        if !errors.is_empty() {
            return Err(LocalError::Check(errors.join("; ")));
        }
        if self.root.as_os_str().is_empty() {
            return Ok(format!("stopped {stopped} processes"));
        }
        if self.config.keep {
            return Ok(format!(
                "stopped {stopped} processes; kept {}",
                self.root.display()
            ));
        }
        remove(&self.root)?;
        Ok(format!(
            "stopped {stopped} processes; removed {}",
            self.root.display()
        ))
    }
}

/// Waits until `node` of the system in `state` holds `expected` as [`SECRET`].
async fn wait_held(
    state: &StateFile,
    node: &str,
    expected: &BTreeMap<String, Vec<u8>>,
) -> Result<(), LocalError> {
    let deadline = Instant::now() + TIMEOUT;
    while sites::read_agent(state, node, SECRET).await?.as_ref() != Some(expected) {
        if Instant::now() >= deadline {
            return Err(LocalError::Timeout {
                what: format!("{node} of {} to hold the written value", state.device),
                seconds: TIMEOUT.as_secs(),
                hint: format!("; see {}", state.dir.join("logs").display()),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A write at a just promoted site, retried while it waits out the old site's lease; how
/// long that took.
async fn write_when_open(state: &StateFile, value: &str) -> Result<Duration, LocalError> {
    let started = Instant::now();
    loop {
        match sites::write(state, SECRET, &[("password", value.as_bytes())]).await {
            Ok(_) => return Ok(started.elapsed()),
            Err(error) if started.elapsed() > TIMEOUT => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn remove(dir: &Path) -> Result<(), LocalError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LocalError::io("remove", dir, e)),
    }
}
