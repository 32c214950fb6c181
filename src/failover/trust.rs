//! What the controller believes of an agent's report before planning with it. These rules
//! decide whether a node may be promoted, so they live here, pure and table-tested, and
//! the agent adapter (`controller::grpc_agents`) only converts the wire answer and calls
//! them.

use std::time::Duration;

use super::observe::WriteLease;
use crate::crd::DeviceRole;

/// The epoch whose history a node's data is known to hold.
///
/// A primary holds its own epoch's history. A mirror reporting epoch `e` holds `e`'s
/// history only once a full pass ran under its assignment of `e`: its sync engine starts
/// when it takes an assignment, so such a pass started after it (an earlier pass may
/// predate the new history). Until then it is trusted with `e - 1` only.
///
/// The rule compares epochs the agent reports, never clocks or the time this controller
/// sent the assignment: an assignment whose answer was lost, and that the controller
/// therefore sent again after the pass, would otherwise leave a caught-up mirror
/// distrusted for good.
pub fn history_epoch(role: Option<DeviceRole>, epoch: u64, full_pass_epoch: Option<u64>) -> u64 {
    if role == Some(DeviceRole::Primary) || full_pass_epoch == Some(epoch) {
        return epoch;
    }
    epoch.saturating_sub(1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirror_is_trusted_with_its_epoch_only_after_a_full_pass_under_its_assignment() {
        use DeviceRole::{Primary, ReadOnly, Standby};
        let cases = [
            // (role, epoch, epoch of the last full pass, trusted epoch, why)
            (Some(Primary), 5, None, 5, "a primary holds its own history"),
            (Some(Primary), 5, Some(3), 5, "a promoted mirror's old pass"),
            (Some(ReadOnly), 5, Some(5), 5, "pass under its assignment"),
            (
                Some(Standby),
                5,
                Some(5),
                5,
                "a demoted primary that resynchronized",
            ),
            (
                Some(ReadOnly),
                5,
                Some(4),
                4,
                "pass under the previous assignment",
            ),
            (Some(Standby), 5, Some(4), 4, "rejoined, pass not finished"),
            (Some(ReadOnly), 5, None, 4, "no pass yet"),
            (
                Some(ReadOnly),
                5,
                Some(6),
                4,
                "a pass claiming a later epoch",
            ),
            (None, 0, None, 0, "never assigned"),
            (None, 3, None, 2, "no role, no pass"),
        ];
        for (role, epoch, pass, want, why) in cases {
            assert_eq!(history_epoch(role, epoch, pass), want, "{why}");
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
}
