//! When the old primary has certainly stopped accepting writes.
//!
//! The primary accepts a write only while its write lease is fresh: the agent measures
//! the lease duration `T` on its own monotonic clock from the moment it applied the latest
//! renewal, and refuses writes from then on (self-fencing). The controller cannot see that
//! clock, so it reasons from what it does know: the agent applied the renewal before its
//! acknowledgement arrived. Hence the agent's lease ends no later than
//! `confirmed_renewal + T` on the controller's clock, up to clock-rate drift; a write that
//! passed the lease check just before that instant may still be committing. The
//! controller waits a further safety margin covering both before it lets another node
//! accept writes — even when the primary is alive but cut off from the controller.
//!
//! Contract for the agent protocol (so that the bound above holds):
//! * a renewal carries the epoch; an agent refuses a renewal for an epoch other than the
//!   one it was promoted under, and a renewal received after a fence (`FenceWrites`) for
//!   that epoch;
//! * a renewal that was not acknowledged must not extend the lease past what the
//!   controller counted: every grant (renewal or promotion) carries a deadline on the
//!   agent's monotonic clock, computed from the agent's latest Health reading as
//!   `reading + time since the reading + T`, and the agent refuses a grant delivered
//!   after it. On the controller's clock such a lease ends by `computed + T` however late
//!   it arrives, and the controller records `confirmed_renewal` after every grant it
//!   sent, acknowledged or not (`controller::device`, `mirror::fencing::AgentClock`);
//! * the margin must exceed the longest write the agent lets run past its lease check
//!   (its PKCS#11 call timeout) plus drift over `T`.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FencingConfig {
    /// `T`: how long a renewal lets the primary accept writes.
    pub lease_duration: Duration,
    /// Extra wait beyond `T` before another node may accept writes.
    pub safety_margin: Duration,
}

impl Default for FencingConfig {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            safety_margin: Duration::from_secs(5),
        }
    }
}

impl FencingConfig {
    /// How often the controller should renew: three chances per lease.
    pub fn renew_every(&self) -> Duration {
        self.lease_duration / 3
    }
}

/// The controller's timing facts about the current primary's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseFacts {
    /// When the controller finished sending the current primary's latest lease grant
    /// (renewal or promotion) under the current epoch, acknowledged or not: the grant's
    /// deadline was computed before then.
    pub confirmed_renewal: Option<Timestamp>,
    /// Where this controller's knowledge starts: a renewal or promotion it cannot vouch
    /// for (issued by a previous leader, or a promotion whose acknowledgement has not
    /// arrived yet) can only have taken effect before this instant. Normally the instant
    /// this controller became leader; when the primary changes, the send deadline of the
    /// `Promote`, until its acknowledgement sets `confirmed_renewal`.
    pub leader_since: Timestamp,
}

/// Whether the old primary may still accept writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fence {
    /// Its lease has certainly lapsed: another node may be promoted.
    Expired,
    /// It may still be writing until `until` (then plan again).
    Pending { until: Timestamp },
}

/// The instant after which the primary's lease has certainly lapsed.
pub fn lease_certainly_lapsed_at(config: &FencingConfig, facts: &LeaseFacts) -> Timestamp {
    let anchor = facts
        .confirmed_renewal
        .map_or(facts.leader_since, |renewed| {
            renewed.max(facts.leader_since)
        });
    add(add(anchor, config.lease_duration), config.safety_margin)
}

pub fn old_primary_fence(config: &FencingConfig, facts: &LeaseFacts, now: Timestamp) -> Fence {
    let until = lease_certainly_lapsed_at(config, facts);
    if now >= until {
        Fence::Expired
    } else {
        Fence::Pending { until }
    }
}

pub(crate) fn add(at: Timestamp, d: Duration) -> Timestamp {
    at.saturating_add(d).unwrap_or(Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    #[test]
    fn fence_waits_lease_plus_margin_after_the_later_of_renewal_and_leadership() {
        let cfg = FencingConfig {
            lease_duration: Duration::from_secs(15),
            safety_margin: Duration::from_secs(5),
        };
        let cases = [
            // (confirmed renewal, leader since, now, expected)
            (Some(100), 0, 119, Fence::Pending { until: ts(120) }),
            (Some(100), 0, 120, Fence::Expired),
            // Without a renewal of ours, a previous leader may have renewed until we took over.
            (None, 50, 69, Fence::Pending { until: ts(70) }),
            (None, 50, 70, Fence::Expired),
            // A renewal older than our leadership is not the latest one.
            (Some(10), 50, 60, Fence::Pending { until: ts(70) }),
        ];
        for (renewed, leader, now, want) in cases {
            let facts = LeaseFacts {
                confirmed_renewal: renewed.map(ts),
                leader_since: ts(leader),
            };
            assert_eq!(
                old_primary_fence(&cfg, &facts, ts(now)),
                want,
                "{renewed:?} {leader} {now}"
            );
        }
    }

    #[test]
    fn far_future_saturates_instead_of_panicking() {
        let facts = LeaseFacts {
            confirmed_renewal: Some(Timestamp::MAX),
            leader_since: ts(0),
        };
        let cfg = FencingConfig::default();
        assert_eq!(lease_certainly_lapsed_at(&cfg, &facts), Timestamp::MAX);
        assert_eq!(cfg.renew_every(), Duration::from_secs(5));
    }
}
