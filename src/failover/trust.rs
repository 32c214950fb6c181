//! What the controller believes of an agent's report before planning with it. These rules
//! decide whether a node may be promoted, so they live here, pure and table-tested, and
//! the agent adapter (`controller::grpc_agents`) only converts the wire answer and calls
//! them.

use std::time::Duration;

use super::observe::WriteLease;
use crate::crd::DeviceRole;

/// When this controller last sent a mirror its assignment: the epoch, and the moment it
/// was sent (unix ms, taken before sending).
pub type Assignment = (u64, i64);

/// The epoch whose history a node's data is known to hold.
///
/// A primary holds its own epoch's history. A mirror reporting epoch `e` holds `e`'s
/// history only once it finished a full pass that started after this controller assigned
/// it `e` (a pass that finished earlier may predate the new history); until then it is
/// trusted with `e - 1` only. A controller that restarted, and so never sent the
/// assignment, trusts a completed pass under the reported epoch: the agent only runs
/// passes under the epoch it was assigned.
pub fn history_epoch(
    role: Option<DeviceRole>,
    epoch: u64,
    full_pass_finished_ms: Option<i64>,
    assigned: Option<Assignment>,
) -> u64 {
    if role == Some(DeviceRole::Primary) {
        return epoch;
    }
    match (full_pass_finished_ms, assigned) {
        (Some(finished), Some((assigned_epoch, sent_at)))
            if assigned_epoch == epoch && finished >= sent_at =>
        {
            epoch
        }
        (Some(_), None) => epoch,
        _ => epoch.saturating_sub(1),
    }
}

/// The write lease a node's report describes: only a primary holds one; a fenced primary
/// never writes under its epoch again; a lease at zero has lapsed (a renewal revives it).
pub fn write_lease(role: Option<DeviceRole>, fenced: bool, remaining_ms: u64) -> WriteLease {
    match role {
        Some(DeviceRole::Primary) if fenced => WriteLease::Fenced,
        Some(DeviceRole::Primary) if remaining_ms > 0 => WriteLease::Valid {
            remaining: Duration::from_millis(remaining_ms),
        },
        Some(DeviceRole::Primary) => WriteLease::Lapsed,
        _ => WriteLease::NotHeld,
    }
}

/// Whether an assignment just sent replaces the one recorded: only a new epoch does. The
/// planner re-sends an assignment every round until the report shows it, and a re-send
/// must not move the time a full pass has to start after.
pub fn records_assignment(recorded: Option<Assignment>, epoch: u64) -> bool {
    recorded.is_none_or(|(e, _)| e != epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_is_trusted_with_its_epoch_only_after_a_full_pass_since_its_assignment() {
        use DeviceRole::{Primary, ReadOnly, Standby};
        let cases = [
            // (role, epoch, pass finished, assigned, trusted epoch, why)
            (
                Some(Primary),
                5,
                None,
                None,
                5,
                "a primary holds its own history",
            ),
            (
                Some(ReadOnly),
                5,
                Some(2_000),
                Some((5, 1_000)),
                5,
                "pass after assignment",
            ),
            (
                Some(ReadOnly),
                5,
                Some(2_000),
                Some((5, 2_000)),
                5,
                "pass ending as sent",
            ),
            (
                Some(ReadOnly),
                5,
                Some(900),
                Some((5, 1_000)),
                4,
                "pass before assignment",
            ),
            (
                Some(Standby),
                5,
                Some(2_000),
                Some((4, 1_000)),
                4,
                "assigned another epoch",
            ),
            (Some(ReadOnly), 5, None, Some((5, 1_000)), 4, "no pass yet"),
            (
                Some(ReadOnly),
                5,
                Some(2_000),
                None,
                5,
                "controller restarted",
            ),
            (None, 0, None, None, 0, "never assigned"),
            (None, 3, None, None, 2, "no role, no pass"),
        ];
        for (role, epoch, pass, assigned, want, why) in cases {
            assert_eq!(history_epoch(role, epoch, pass, assigned), want, "{why}");
        }
    }

    #[test]
    fn only_a_primary_holds_a_write_lease_and_a_fence_is_final() {
        use DeviceRole::{Primary, ReadOnly};
        assert_eq!(write_lease(Some(Primary), true, 900), WriteLease::Fenced);
        assert_eq!(
            write_lease(Some(Primary), false, 900),
            WriteLease::Valid {
                remaining: Duration::from_millis(900)
            }
        );
        assert_eq!(write_lease(Some(Primary), false, 0), WriteLease::Lapsed);
        assert_eq!(write_lease(Some(ReadOnly), true, 900), WriteLease::NotHeld);
        assert_eq!(write_lease(None, false, 900), WriteLease::NotHeld);
    }

    #[test]
    fn a_re_sent_assignment_keeps_its_first_send_time() {
        assert!(records_assignment(None, 3));
        assert!(!records_assignment(Some((3, 1_000)), 3));
        assert!(records_assignment(Some((2, 1_000)), 3));
    }
}
