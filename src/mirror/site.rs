//! The site gate: whether this device's site may take writes at all, above the
//! primary's own epoch and write lease. A device spread over clusters has one active site;
//! the others follow its archive and refuse writes, and an active site over which another
//! was promoted refuses them for good. Pure state and decisions; the archive code moves it.

use std::time::{Duration, Instant};

/// Where the site stands, for writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SiteGate {
    /// No site configuration: one site, nothing to check (the default).
    #[default]
    Open,
    /// The active site: writes while `until` (set by each check of the bucket that found
    /// no other site promoted) has not passed.
    Active {
        site: String,
        until: Option<Instant>,
    },
    /// Follows `active`'s archive.
    Passive { site: String, active: String },
    /// The active site stopped taking writes for a planned switchover; it still archives
    /// (and still checks for the promotion that ends it).
    Draining { site: String },
    /// Just promoted: its fence is durable, and the old active site's lease may still run
    /// until `open_at`; a clean check at or after it opens writes.
    Promoting { site: String, open_at: Instant },
    /// `by` was promoted over this site at `site_epoch`, its history starting after
    /// `fence_sequence`.
    Fenced {
        site: String,
        by: String,
        /// The promoted site's HSMDevice.
        by_device: String,
        site_epoch: u64,
        fence_sequence: u64,
    },
}

/// Why the site refused a write. Each names the site, the reason and the way on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SiteRefusal {
    #[error(
        "site {site} is passive: it follows the archive of the active site {active} and takes \
         no writes; write at site {active}, or promote this site with `kubectl hsm site \
         promote` (manual only: it fences {active})"
    )]
    Passive { site: String, active: String },
    #[error(
        "site {site} is draining for a planned switchover: it takes no writes and archives \
         what it has; writes resume at the site promoted next (or here, if the switchover is \
         called off: remove annotation hsmsecrets.io/site-drain)"
    )]
    Draining { site: String },
    #[error(
        "site {site} was just promoted and waits out the old active site's lease (about \
         {wait_ms} ms more) before it takes writes"
    )]
    Promoting { site: String, wait_ms: u128 },
    #[error(
        "site {site} has not confirmed within its site lease that no other site was promoted \
         (the archive bucket could not be checked); writes resume once it can"
    )]
    LeaseLapsed { site: String },
    #[error(
        "site {site} is fenced: site {by} was promoted at site epoch {site_epoch} from sequence \
         {fence_sequence}; this site takes no writes (any it took after that point are lost \
         writes); rejoin as a passive site with `kubectl hsm site rejoin`"
    )]
    Fenced {
        site: String,
        by: String,
        site_epoch: u64,
        fence_sequence: u64,
    },
}

impl SiteRefusal {
    pub fn kind(&self) -> &'static str {
        match self {
            SiteRefusal::Passive { .. } => "site_passive",
            SiteRefusal::LeaseLapsed { .. } => "site_lease_lapsed",
            SiteRefusal::Draining { .. } => "site_draining",
            SiteRefusal::Promoting { .. } => "site_promoting",
            SiteRefusal::Fenced { .. } => "site_fenced",
        }
    }
}

impl SiteGate {
    /// Whether a write may be acknowledged at `now`.
    pub fn admit(&self, now: Instant) -> Result<(), SiteRefusal> {
        match self {
            SiteGate::Open => Ok(()),
            SiteGate::Active {
                until: Some(until), ..
            } if now < *until => Ok(()),
            SiteGate::Active { site, .. } => Err(SiteRefusal::LeaseLapsed { site: site.clone() }),
            SiteGate::Draining { site } => Err(SiteRefusal::Draining { site: site.clone() }),
            SiteGate::Promoting { site, open_at } => Err(SiteRefusal::Promoting {
                site: site.clone(),
                wait_ms: open_at.saturating_duration_since(now).as_millis(),
            }),
            SiteGate::Passive { site, active } => Err(SiteRefusal::Passive {
                site: site.clone(),
                active: active.clone(),
            }),
            SiteGate::Fenced {
                site,
                by,
                site_epoch,
                fence_sequence,
                ..
            } => Err(SiteRefusal::Fenced {
                site: site.clone(),
                by: by.clone(),
                site_epoch: *site_epoch,
                fence_sequence: *fence_sequence,
            }),
        }
    }

    /// The active site checked the bucket, starting at `checked_at`, and found no other
    /// site promoted: writes may go on until `checked_at + lease`. A fenced site stays
    /// fenced.
    ///
    /// Only an active site's lease is extended: a passive, fenced, draining or unconfigured
    /// gate is left as it is (a check still in flight when the site changed must not open
    /// it), and a just-promoted site opens only with a check that began at or after its
    /// opening time.
    pub fn renewed(&self, site: &str, checked_at: Instant, lease: Duration) -> SiteGate {
        let active = || SiteGate::Active {
            site: site.into(),
            until: Some(checked_at + lease),
        };
        match self {
            SiteGate::Active {
                until: Some(until), ..
            } if *until > checked_at + lease => self.clone(),
            SiteGate::Active { .. } => active(),
            SiteGate::Promoting { open_at, .. } if checked_at >= *open_at => active(),
            _ => self.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn each_gate_admits_or_names_the_way_on() {
        let now = Instant::now();
        let lease = Duration::from_secs(30);
        assert!(SiteGate::Open.admit(now).is_ok());
        let unconfirmed = SiteGate::Active {
            site: "a".into(),
            until: None,
        };
        assert_eq!(
            unconfirmed.admit(now).unwrap_err().kind(),
            "site_lease_lapsed"
        );
        let active = unconfirmed.renewed("a", now, lease);
        assert!(active.admit(now + Duration::from_secs(29)).is_ok());
        assert!(active.admit(now + lease).is_err(), "the lease ends");
        // An older check never shortens a newer lease.
        let later = active.renewed("a", now + Duration::from_secs(10), lease);
        assert_eq!(
            later.renewed("a", now, lease),
            later,
            "a check that started earlier does not move the lease back"
        );
        let passive = SiteGate::Passive {
            site: "b".into(),
            active: "a".into(),
        };
        let refusal = passive.admit(now).unwrap_err().to_string();
        assert!(refusal.contains("active site a") && refusal.contains("kubectl hsm site promote"));
        let fenced = SiteGate::Fenced {
            site: "a".into(),
            by: "b".into(),
            by_device: "prod-hsm-b".into(),
            site_epoch: 1,
            fence_sequence: 40,
        };
        assert_eq!(fenced.renewed("a", now, lease), fenced, "fenced for good");
        assert_eq!(SiteGate::Open.renewed("a", now, lease), SiteGate::Open);
        let promoting = SiteGate::Promoting {
            site: "b".into(),
            open_at: now + lease,
        };
        assert_eq!(promoting.admit(now).unwrap_err().kind(), "site_promoting");
        assert_eq!(
            promoting.renewed("b", now, lease),
            promoting,
            "not before its time"
        );
        assert!(
            promoting
                .renewed("b", now + lease, lease)
                .admit(now + lease)
                .is_ok()
        );
        let draining = SiteGate::Draining { site: "a".into() };
        assert_eq!(
            draining.renewed("a", now, lease),
            draining,
            "draining until told"
        );
        assert_eq!(draining.admit(now).unwrap_err().kind(), "site_draining");
        let refusal = fenced.admit(now).unwrap_err().to_string();
        assert!(refusal.contains("site b was promoted") && refusal.contains("rejoin"));
    }
}
