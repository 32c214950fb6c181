//! Role, epoch and write lease of one agent: the rules that keep two nodes from ever
//! accepting writes under the same authority. Pure: the caller passes the time.
//!
//! - The epoch never goes backwards; an assignment or lease renewal with a lower epoch is
//!   refused, and promotion needs an epoch above the one at which the node was a mirror.
//! - A write is admitted only when the node is primary, the caller's epoch is the node's,
//!   and the write lease (granted by the controller from the time of receipt, on the
//!   monotonic clock) has not lapsed. The controller waits a lease duration before it
//!   promotes another node, so a partitioned primary fences itself first.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::crd::DeviceRole;

use super::MirrorError;

/// The longest lease the controller may grant at once.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);

/// This process's monotonic clock as the agent reports it in Health: milliseconds since
/// an origin fixed at first use, under an id that differs in every process. The
/// controller grants write leases as deadlines on this clock (see [`LeaseDeadline`]).
#[derive(Debug)]
pub struct AgentClock {
    id: u64,
    origin: std::time::Instant,
}

/// A lease end on an agent's clock, computed by the controller from a Health reading:
/// `reading + time since the reading + lease`. The agent read its clock before the
/// controller received the reading, so on the controller's clock the lease ends no later
/// than the moment the controller computed the deadline plus the lease — however late
/// the grant is delivered. A grant that arrives after its deadline is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseDeadline {
    pub clock_id: u64,
    pub until_ms: u64,
}

impl AgentClock {
    /// The clock of this process.
    pub fn process() -> &'static AgentClock {
        static CLOCK: std::sync::OnceLock<AgentClock> = std::sync::OnceLock::new();
        CLOCK.get_or_init(|| {
            use std::hash::BuildHasher;
            let seed = (std::process::id(), SystemTime::now());
            AgentClock {
                // Randomly keyed: two processes (or one restarted) never share an id.
                id: std::collections::hash_map::RandomState::new().hash_one(seed) | 1,
                origin: std::time::Instant::now(),
            }
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// How long a lease of at most `length` from now may run under `deadline`.
    pub fn lease_within(
        &self,
        node: &str,
        length: Duration,
        deadline: Option<LeaseDeadline>,
    ) -> Result<Duration, MirrorError> {
        let Some(deadline) = deadline else {
            return Ok(length);
        };
        let refused = |why| MirrorError::LeaseGrantRefused {
            node: node.into(),
            why,
        };
        if deadline.clock_id != self.id {
            return Err(refused(
                "it names another clock (the agent restarted since the reading it was computed from)",
            ));
        }
        let left = deadline.until_ms.saturating_sub(self.now_ms());
        if left == 0 {
            return Err(refused("it arrived after its deadline"));
        }
        Ok(length.min(Duration::from_millis(left)))
    }
}

/// Another agent: its node name (what its certificate names) and gRPC endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    /// `https://host:port`
    pub endpoint: String,
}

/// What the controller tells an agent to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub role: DeviceRole,
    pub epoch: u64,
    /// The primary, for mirrors; a primary may name itself (its own endpoint) or nothing.
    pub primary: Option<Peer>,
    /// Primary under the Active policy: the mirrors every write waits for.
    pub mirrors: Vec<Peer>,
    /// Primary: the write lease, from the time of receipt.
    pub lease: Duration,
    /// Full verification pass interval, when the controller sets it.
    pub sync_interval: Option<Duration>,
}

/// What an accepted assignment changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: DeviceRole,
    pub to: DeviceRole,
    pub epoch_changed: bool,
    pub primary_changed: bool,
}

impl Transition {
    pub fn promoted(&self) -> bool {
        self.to == DeviceRole::Primary && self.from != DeviceRole::Primary
    }
    pub fn demoted(&self) -> bool {
        self.from == DeviceRole::Primary && self.to != DeviceRole::Primary
    }
}

/// One agent's control state.
#[derive(Clone, Debug)]
pub struct Control {
    node: String,
    role: DeviceRole,
    epoch: u64,
    lease_until: Option<Instant>,
    /// Writes stopped for good under the current epoch (planned switchover).
    fenced: bool,
    primary: Option<Peer>,
    mirrors: Vec<Peer>,
}

impl Control {
    /// A fresh agent: standby at epoch 0, no primary known, until the controller assigns.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            role: DeviceRole::Standby,
            epoch: 0,
            lease_until: None,
            fenced: false,
            primary: None,
            mirrors: Vec::new(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }
    pub fn role(&self) -> DeviceRole {
        self.role
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn primary(&self) -> Option<&Peer> {
        self.primary.as_ref()
    }
    pub fn mirrors(&self) -> &[Peer] {
        &self.mirrors
    }

    /// Applies an assignment from the controller, or says why it is refused.
    pub fn assign(&mut self, a: &Assignment, now: Instant) -> Result<Transition, MirrorError> {
        let invalid = |field, why: String| MirrorError::InvalidArgument { field, why };
        if a.epoch == 0 {
            return Err(invalid(
                "epoch",
                "must be at least 1 (the device epoch from HSMDevice status)".into(),
            ));
        }
        if a.epoch < self.epoch {
            return Err(MirrorError::StaleEpoch {
                node: self.node.clone(),
                operation: "AssignRole",
                current: self.epoch,
                requested: a.epoch,
            });
        }
        if a.lease > MAX_LEASE {
            return Err(invalid(
                "lease_duration_ms",
                format!("must be at most {} ms", MAX_LEASE.as_millis()),
            ));
        }
        match a.role {
            DeviceRole::Primary => {
                if a.lease.is_zero() {
                    return Err(invalid(
                        "lease_duration_ms",
                        "a primary needs a write lease greater than 0".into(),
                    ));
                }
                if let Some(p) = &a.primary
                    && p.node != self.node
                {
                    return Err(invalid(
                        "primary_node",
                        format!(
                            "names {} but this agent is {}; assign Primary to the node that should be primary",
                            p.node, self.node
                        ),
                    ));
                }
                if a.mirrors.iter().any(|m| m.node == self.node) {
                    return Err(invalid(
                        "mirrors",
                        format!("lists this primary ({}) as its own mirror", self.node),
                    ));
                }
                // Two primaries must never share an epoch: a node that was a mirror at this
                // epoch saw another primary under it.
                if self.role != DeviceRole::Primary && a.epoch == self.epoch {
                    return Err(MirrorError::StaleEpoch {
                        node: self.node.clone(),
                        operation: "AssignRole(Primary): promotion needs a new epoch",
                        current: self.epoch,
                        requested: a.epoch,
                    });
                }
            }
            DeviceRole::ReadOnly | DeviceRole::Standby => {
                if let Some(p) = &a.primary
                    && p.node == self.node
                {
                    return Err(invalid(
                        "primary_node",
                        format!("a mirror cannot follow itself ({})", self.node),
                    ));
                }
                if !a.mirrors.is_empty() {
                    return Err(invalid("mirrors", "only a primary has a mirror set".into()));
                }
            }
        }
        let transition = Transition {
            from: self.role,
            to: a.role,
            epoch_changed: a.epoch != self.epoch,
            primary_changed: a.role != DeviceRole::Primary && a.primary != self.primary,
        };
        if a.epoch != self.epoch || a.role != DeviceRole::Primary {
            self.fenced = false;
        }
        self.role = a.role;
        self.epoch = a.epoch;
        if a.role == DeviceRole::Primary {
            self.lease_until = Some(now + a.lease);
            self.primary = Some(Peer {
                node: self.node.clone(),
                endpoint: a
                    .primary
                    .as_ref()
                    .map(|p| p.endpoint.clone())
                    .unwrap_or_default(),
            });
            self.mirrors = a.mirrors.clone();
        } else {
            self.lease_until = None;
            self.primary = a.primary.clone();
            self.mirrors.clear();
        }
        Ok(transition)
    }

    /// Sets the write lease to end at `now + duration`; returns the remaining time.
    pub fn renew(
        &mut self,
        epoch: u64,
        duration: Duration,
        now: Instant,
    ) -> Result<Duration, MirrorError> {
        if duration.is_zero() || duration > MAX_LEASE {
            return Err(MirrorError::InvalidArgument {
                field: "duration_ms",
                why: format!("must be between 1 and {} ms", MAX_LEASE.as_millis()),
            });
        }
        self.check_epoch(epoch, "RenewLease")?;
        if self.role != DeviceRole::Primary {
            return Err(self.not_primary());
        }
        if self.fenced {
            return Err(MirrorError::Fenced {
                node: self.node.clone(),
                epoch: self.epoch,
            });
        }
        self.lease_until = Some(now + duration);
        Ok(duration)
    }

    /// Stops writes now and for good under `epoch` (first step of a planned switchover):
    /// no renewal revives them; only a new assignment does.
    pub fn fence(&mut self, epoch: u64) -> Result<(), MirrorError> {
        self.check_epoch(epoch, "Fence")?;
        if self.role != DeviceRole::Primary {
            return Err(self.not_primary());
        }
        self.fenced = true;
        self.lease_until = None;
        Ok(())
    }

    /// Drops the write lease (a restarted primary: writes wait for a renewal or a new
    /// assignment from the controller).
    pub fn revoke_lease(&mut self) {
        self.lease_until = None;
    }

    /// A fresh agent that remembers only `epoch` (its saved role could not be resumed):
    /// standby, refusing anything older.
    pub fn restored_epoch(node: impl Into<String>, epoch: u64) -> Self {
        Self {
            epoch,
            ..Self::new(node)
        }
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether a client write stamped with `epoch` may proceed now.
    pub fn admit_write(&self, epoch: u64, now: Instant) -> Result<(), MirrorError> {
        if epoch == 0 {
            return Err(MirrorError::InvalidArgument {
                field: "epoch",
                why: "is required: pass the device's current epoch (HSMDevice status.epoch)".into(),
            });
        }
        if self.role != DeviceRole::Primary {
            return Err(self.not_primary());
        }
        self.check_epoch(epoch, "a write")?;
        if self.fenced {
            return Err(MirrorError::Fenced {
                node: self.node.clone(),
                epoch: self.epoch,
            });
        }
        self.check_lease(now)
    }

    /// The lease check alone (again after a write, which may have outlived it).
    pub fn check_lease(&self, now: Instant) -> Result<(), MirrorError> {
        match self.lease_until {
            Some(until) if now < until => Ok(()),
            Some(until) => Err(MirrorError::LeaseExpired {
                node: self.node.clone(),
                expired_at: wall_clock_of(until, now),
                ago_ms: now.duration_since(until).as_millis(),
            }),
            None => Err(self.not_primary()),
        }
    }

    /// Whether a push from `from` stamped with `epoch` may be applied here.
    pub fn admit_replicate(&self, epoch: u64, from: &str) -> Result<(), MirrorError> {
        self.check_epoch(epoch, "Replicate")?;
        if self.role == DeviceRole::Primary {
            return Err(MirrorError::NotMirror {
                node: self.node.clone(),
                epoch: self.epoch,
                from: from.into(),
            });
        }
        match &self.primary {
            Some(p) if p.node == from => Ok(()),
            other => Err(MirrorError::WrongPrimary {
                node: self.node.clone(),
                epoch: self.epoch,
                primary: other
                    .as_ref()
                    .map_or_else(|| "nobody (not assigned)".into(), |p| p.node.clone()),
                from: from.into(),
            }),
        }
    }

    /// Reads are served by the primary and read-only mirrors; a standby may hold stale or
    /// not-yet-discarded data.
    pub fn admit_read(&self) -> Result<(), MirrorError> {
        match self.role {
            DeviceRole::Primary | DeviceRole::ReadOnly => Ok(()),
            DeviceRole::Standby => Err(MirrorError::NotServing {
                node: self.node.clone(),
                redirect: self.redirect("read from"),
            }),
        }
    }

    /// Change feeds come from the primary only.
    pub fn admit_primary_read(&self) -> Result<(), MirrorError> {
        if self.role == DeviceRole::Primary {
            Ok(())
        } else {
            Err(self.not_primary())
        }
    }

    pub fn lease_remaining(&self, now: Instant) -> Duration {
        match (self.role, self.lease_until) {
            (DeviceRole::Primary, Some(until)) => until.saturating_duration_since(now),
            _ => Duration::ZERO,
        }
    }

    fn check_epoch(&self, epoch: u64, operation: &'static str) -> Result<(), MirrorError> {
        if epoch < self.epoch {
            return Err(MirrorError::StaleEpoch {
                node: self.node.clone(),
                operation,
                current: self.epoch,
                requested: epoch,
            });
        }
        if epoch > self.epoch {
            return Err(MirrorError::UnknownEpoch {
                node: self.node.clone(),
                operation,
                current: self.epoch,
                requested: epoch,
            });
        }
        Ok(())
    }

    fn not_primary(&self) -> MirrorError {
        MirrorError::NotPrimary {
            node: self.node.clone(),
            role: match self.role {
                DeviceRole::Primary => "the primary",
                DeviceRole::ReadOnly => "a read-only mirror",
                DeviceRole::Standby => "a standby",
            },
            epoch: self.epoch,
            redirect: self.redirect("writes go to"),
        }
    }

    fn redirect(&self, verb: &str) -> String {
        match &self.primary {
            Some(p) if p.node != self.node => {
                format!("{verb} the primary {} ({})", p.node, p.endpoint)
            }
            _ => "no primary is assigned to this node yet (the controller assigns roles; see kubectl get hsmdevice)".into(),
        }
    }
}

/// Wall-clock rendering of a monotonic instant in the past, for messages.
fn wall_clock_of(then: Instant, now: Instant) -> String {
    let wall = SystemTime::now()
        .checked_sub(now.saturating_duration_since(then))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    match k8s_openapi::jiff::Timestamp::try_from(wall) {
        Ok(ts) => ts
            .round(k8s_openapi::jiff::Unit::Millisecond)
            .map_or_else(|_| ts.to_string(), |t| t.to_string()),
        Err(_) => "an unknown time".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    #[test]
    #[allow(clippy::unwrap_used)]
    fn a_lease_grant_runs_at_most_to_its_deadline_on_this_clock() {
        let clock = AgentClock::process();
        let at = |until_ms| {
            Some(LeaseDeadline {
                clock_id: clock.id(),
                until_ms,
            })
        };
        // Without a deadline: the whole length from receipt.
        assert_eq!(clock.lease_within("n1", LEASE, None).unwrap(), LEASE);
        // A deadline sooner than the length caps the lease.
        let capped = clock
            .lease_within("n1", LEASE, at(clock.now_ms() + 2_000))
            .unwrap();
        assert!(capped <= Duration::from_secs(2) && capped > Duration::ZERO);
        // A later deadline does not lengthen it.
        let full = clock
            .lease_within("n1", LEASE, at(clock.now_ms() + 60_000))
            .unwrap();
        assert_eq!(full, LEASE);
        // Delivered after its deadline: refused, whatever the length.
        let late = clock
            .lease_within("n1", LEASE, at(clock.now_ms()))
            .unwrap_err();
        assert!(
            late.to_string().contains("arrived after its deadline"),
            "{late}"
        );
        assert_eq!(late.kind(), "lease_grant_refused");
        // Computed from another process's clock (the agent restarted): refused.
        let other = Some(LeaseDeadline {
            clock_id: clock.id() ^ 2,
            until_ms: u64::MAX,
        });
        let err = clock.lease_within("n1", LEASE, other).unwrap_err();
        assert!(err.to_string().contains("names another clock"), "{err}");
    }

    fn peer(n: &str) -> Peer {
        Peer {
            node: n.into(),
            endpoint: format!("https://{n}:7443"),
        }
    }

    fn primary(epoch: u64) -> Assignment {
        Assignment {
            role: DeviceRole::Primary,
            epoch,
            primary: None,
            mirrors: vec![],
            lease: LEASE,
            sync_interval: None,
        }
    }

    fn mirror(epoch: u64, of: &str) -> Assignment {
        Assignment {
            role: DeviceRole::ReadOnly,
            epoch,
            primary: Some(peer(of)),
            mirrors: vec![],
            lease: Duration::ZERO,
            sync_interval: None,
        }
    }

    #[test]
    fn a_fence_stops_writes_for_good_until_a_new_assignment() {
        let t0 = Instant::now();
        let mut c = Control::new("n1");
        assert!(matches!(c.fence(1), Err(MirrorError::UnknownEpoch { .. })));
        c.assign(&primary(1), t0).expect("promote");
        assert!(matches!(c.fence(2), Err(MirrorError::UnknownEpoch { .. })));
        c.fence(1).expect("fence");
        assert!(c.is_fenced());
        let err = c.admit_write(1, t0).expect_err("fenced");
        assert!(matches!(err, MirrorError::Fenced { .. }), "{err}");
        assert!(err.to_string().contains("planned switchover"), "{err}");
        assert!(
            matches!(c.renew(1, LEASE, t0), Err(MirrorError::Fenced { .. })),
            "no renewal revives it"
        );
        assert_eq!(c.lease_remaining(t0), Duration::ZERO);
        // Re-sending the same assignment keeps the fence; a new epoch lifts it.
        c.assign(&primary(1), t0).expect("same assignment");
        assert!(c.is_fenced());
        c.assign(&mirror(2, "n2"), t0).expect("demote");
        assert!(!c.is_fenced());
        c.assign(&primary(3), t0).expect("promote again");
        c.admit_write(3, t0)
            .expect("writes again under the new epoch");
    }

    #[test]
    fn writes_need_primary_role_current_epoch_and_fresh_lease() {
        let t0 = Instant::now();
        let mut c = Control::new("n1");
        let err = c.admit_write(1, t0).expect_err("standby");
        assert!(matches!(err, MirrorError::NotPrimary { .. }), "{err}");
        assert!(err.to_string().contains("no primary is assigned"), "{err}");

        c.assign(&primary(3), t0).expect("promote");
        c.admit_write(3, t0).expect("fresh lease");
        let cases: [(u64, Duration, &str); 5] = [
            (0, Duration::ZERO, "invalid_argument"),
            (2, Duration::ZERO, "stale_epoch"),
            (4, Duration::ZERO, "unknown_epoch"),
            (3, LEASE, "lease_expired"),
            (3, LEASE + Duration::from_secs(60), "lease_expired"),
        ];
        for (epoch, after, kind) in cases {
            let err = c.admit_write(epoch, t0 + after).expect_err(kind);
            assert_eq!(err.kind(), kind, "{err}");
        }
        let err = c
            .admit_write(3, t0 + LEASE + Duration::from_millis(1500))
            .expect_err("fenced");
        let msg = err.to_string();
        assert!(
            msg.starts_with("fenced: write lease expired at ")
                && msg.contains("1500 ms ago")
                && msg.contains("the controller has not renewed it"),
            "{msg}"
        );

        // Renewal restores writes, measured from the time of receipt.
        let later = t0 + LEASE * 3;
        c.renew(3, LEASE, later).expect("renew");
        c.admit_write(3, later + LEASE - Duration::from_millis(1))
            .expect("renewed");
        assert_eq!(c.lease_remaining(later), LEASE);
    }

    #[test]
    fn mirrors_refuse_writes_naming_the_primary() {
        let t0 = Instant::now();
        let mut c = Control::new("n2");
        c.assign(&mirror(5, "n1"), t0).expect("mirror");
        let err = c.admit_write(5, t0).expect_err("mirror");
        let msg = err.to_string();
        assert!(
            msg.contains("n2 is a read-only mirror at epoch 5")
                && msg.contains("writes go to the primary n1 (https://n1:7443)"),
            "{msg}"
        );
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(c.renew(5, LEASE, t0).is_err(), "mirrors hold no lease");
        assert_eq!(c.lease_remaining(t0), Duration::ZERO);
    }

    #[test]
    fn epochs_never_go_backwards() {
        let t0 = Instant::now();
        let mut c = Control::new("n1");
        c.assign(&mirror(4, "n2"), t0).expect("mirror at 4");
        for stale in [primary(3), mirror(3, "n2")] {
            let err = c.assign(&stale, t0).expect_err("stale");
            assert_eq!(err.kind(), "stale_epoch", "{err}");
        }
        // Promotion at the epoch it was a mirror under is refused: n2 is primary there.
        let err = c.assign(&primary(4), t0).expect_err("same-epoch promotion");
        assert!(
            err.to_string().contains("promotion needs a new epoch"),
            "{err}"
        );
        let tr = c.assign(&primary(5), t0).expect("promotion");
        assert!(tr.promoted() && tr.epoch_changed);
        assert_eq!(
            c.renew(4, LEASE, t0).expect_err("stale").kind(),
            "stale_epoch"
        );
        assert_eq!(
            c.renew(6, LEASE, t0).expect_err("future").kind(),
            "unknown_epoch"
        );
        // Re-sending the same primary assignment (new mirror set, fresh lease) is fine.
        let tr = c.assign(&primary(5), t0).expect("same epoch");
        assert!(!tr.promoted() && !tr.epoch_changed);
        let tr = c.assign(&mirror(6, "n3"), t0).expect("demotion");
        assert!(tr.demoted() && tr.primary_changed);
        assert_eq!((c.role(), c.epoch()), (DeviceRole::ReadOnly, 6));
    }

    #[test]
    fn bad_assignments_name_the_field() {
        let t0 = Instant::now();
        let mut c = Control::new("n1");
        let mut a = primary(1);
        a.lease = Duration::ZERO;
        assert!(
            c.assign(&a, t0)
                .expect_err("no lease")
                .to_string()
                .contains("lease_duration_ms")
        );
        a.lease = MAX_LEASE + Duration::from_secs(1);
        assert!(
            c.assign(&a, t0)
                .expect_err("huge")
                .to_string()
                .contains("lease_duration_ms")
        );
        let mut a = primary(1);
        a.primary = Some(peer("n9"));
        assert!(
            c.assign(&a, t0)
                .expect_err("other")
                .to_string()
                .contains("primary_node")
        );
        let mut a = primary(1);
        a.mirrors = vec![peer("n1")];
        assert!(
            c.assign(&a, t0)
                .expect_err("self")
                .to_string()
                .contains("mirrors")
        );
        assert!(
            c.assign(&mirror(1, "n1"), t0)
                .expect_err("self")
                .to_string()
                .contains("itself")
        );
        assert!(
            c.assign(&primary(0), t0)
                .expect_err("zero")
                .to_string()
                .contains("epoch")
        );
        assert_eq!(
            (c.role(), c.epoch()),
            (DeviceRole::Standby, 0),
            "nothing applied"
        );
    }

    #[test]
    fn pushes_only_from_the_assigned_primary_at_the_same_epoch() {
        let t0 = Instant::now();
        let mut c = Control::new("n2");
        assert_eq!(
            c.admit_replicate(0, "n1").expect_err("unassigned").kind(),
            "wrong_primary"
        );
        c.assign(&mirror(2, "n1"), t0).expect("mirror");
        c.admit_replicate(2, "n1").expect("ok");
        assert_eq!(
            c.admit_replicate(1, "n1").expect_err("old").kind(),
            "stale_epoch"
        );
        assert_eq!(
            c.admit_replicate(3, "n1").expect_err("new").kind(),
            "unknown_epoch"
        );
        assert_eq!(
            c.admit_replicate(2, "n3").expect_err("other").kind(),
            "wrong_primary"
        );
        c.assign(&primary(3), t0).expect("promote");
        assert_eq!(
            c.admit_replicate(3, "n1").expect_err("primary").kind(),
            "not_mirror"
        );
    }

    #[test]
    fn standbys_do_not_serve_reads() {
        let t0 = Instant::now();
        let mut c = Control::new("n3");
        let mut a = mirror(2, "n1");
        a.role = DeviceRole::Standby;
        c.assign(&a, t0).expect("standby");
        let err = c.admit_read().expect_err("standby");
        assert!(
            err.to_string().contains("read from the primary n1"),
            "{err}"
        );
        c.assign(&mirror(2, "n1"), t0).expect("read-only");
        c.admit_read().expect("serves");
        assert!(c.admit_primary_read().is_err());
    }
}
