//! Failover planning, table-driven over single rounds, plus multi-round scenarios on a
//! simulated cluster whose agents obey the plans.
#![allow(clippy::unwrap_used)]

use crate::crd::{DevicePhase, DeviceRole, EpochRecord, MirroringPolicy, NodeHealth};

use super::fixture::{Cluster, DeviceFixture, t};
use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use Action::*;
use EventReason::*;

fn commands(plan: &Plan) -> Vec<Action> {
    plan.actions
        .iter()
        .filter(|a| !matches!(a, LabelNode { .. } | Event(_)))
        .cloned()
        .collect()
}

fn reasons(plan: &Plan) -> Vec<EventReason> {
    plan.events().map(|e| e.reason).collect()
}

fn event(plan: &Plan, reason: EventReason) -> &DeviceEvent {
    plan.events()
        .find(|e| e.reason == reason)
        .unwrap_or_else(|| panic!("no {reason:?} event in {:#?}", plan.actions))
}

fn role(plan: &Plan, node: &str) -> DeviceRole {
    node_status(plan, node).role
}

fn node_status<'a>(plan: &'a Plan, node: &str) -> &'a crate::crd::DeviceNodeStatus {
    plan.status
        .nodes
        .iter()
        .find(|n| n.node == node)
        .unwrap_or_else(|| panic!("{node} not in status {:#?}", plan.status.nodes))
}

fn labelled_ready(plan: &Plan, node: &str) -> bool {
    plan.actions
        .iter()
        .find_map(|a| match a {
            LabelNode { node: n, ready } if n == node => Some(*ready),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no label action for {node}"))
}

fn condition<'a>(
    plan: &'a Plan,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    plan.status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap()
}

fn promote(node: &str, epoch: u64) -> Action {
    Promote {
        node: node.into(),
        epoch,
    }
}
fn renew(node: &str, epoch: u64) -> Action {
    renew_outside(node, epoch, &[])
}
fn renew_outside(node: &str, epoch: u64, outside: &[&str]) -> Action {
    RenewLease {
        node: node.into(),
        epoch,
        outside_write_set: outside.iter().map(|n| n.to_string()).collect(),
    }
}
fn demote(node: &str, epoch: u64, primary: &str) -> Action {
    Demote {
        node: node.into(),
        epoch,
        primary: primary.into(),
    }
}
fn set_mirror(node: &str, primary: &str, epoch: u64, role: DeviceRole) -> Action {
    SetMirror {
        node: node.into(),
        primary: primary.into(),
        epoch,
        role,
    }
}

/// A healthy two-mirror device at epoch 1, primary n1 at sequence 10.
fn three_nodes() -> DeviceFixture {
    DeviceFixture::new()
        .primary("n1", 10)
        .mirror("n2", 10)
        .mirror("n3", 10)
}

struct Case {
    name: &'static str,
    fx: DeviceFixture,
    phase: DevicePhase,
    primary: &'static str,
    epoch: u64,
    commands: Vec<Action>,
    events: Vec<EventReason>,
}

#[test]
fn single_round_decisions() {
    let cases = vec![
        Case {
            name: "primary healthy: renew its lease, Ready, no events",
            fx: three_nodes().ok("n1", 10).ok("n2", 10).ok("n3", 10),
            phase: DevicePhase::Ready,
            primary: "n1",
            epoch: 1,
            commands: vec![renew("n1", 1)],
            events: vec![],
        },
        Case {
            name: "primary failing below the threshold: kept, Degraded, no lease, no promotion",
            fx: three_nodes()
                .failing("n1", 1)
                .down("n1")
                .ok("n2", 10)
                .ok("n3", 10),
            phase: DevicePhase::Degraded,
            primary: "n1",
            epoch: 1,
            commands: vec![],
            events: vec![],
        },
        Case {
            name: "primary at the threshold, lease lapsed long ago: most caught-up mirror promoted",
            fx: three_nodes()
                .failing("n1", 2)
                .renewed_at(900)
                .down("n1")
                .ok("n2", 9)
                .ok("n3", 10),
            phase: DevicePhase::Degraded,
            primary: "n3",
            epoch: 2,
            commands: vec![
                promote("n3", 2),
                set_mirror("n2", "n3", 2, DeviceRole::ReadOnly),
            ],
            events: vec![HSMFailover, HSMPromoted, HSMDeviceUnhealthy],
        },
        Case {
            name: "threshold 1: the first failed check is enough",
            fx: three_nodes()
                .threshold(1)
                .renewed_at(900)
                .down("n1")
                .ok("n2", 10)
                .ok("n3", 10),
            phase: DevicePhase::Degraded,
            primary: "n2",
            epoch: 2,
            commands: vec![
                promote("n2", 2),
                set_mirror("n3", "n2", 2, DeviceRole::ReadOnly),
            ],
            events: vec![HSMFailover, HSMPromoted, HSMDeviceUnhealthy],
        },
        Case {
            name: "primary at the threshold, lease maybe still held: read-only until it lapses",
            fx: three_nodes()
                .failing("n1", 2)
                .renewed_at(990)
                .down("n1")
                .ok("n2", 10)
                .ok("n3", 10),
            phase: DevicePhase::ReadOnlyFallback,
            primary: "n1",
            epoch: 1,
            commands: vec![],
            events: vec![HSMDeviceUnhealthy, HSMReadOnlyFallback],
        },
        Case {
            name: "autoFailover off: read-only fallback, never a promotion",
            fx: three_nodes()
                .auto_failover(false)
                .failing("n1", 2)
                .renewed_at(0)
                .down("n1")
                .ok("n2", 10)
                .ok("n3", 10),
            phase: DevicePhase::ReadOnlyFallback,
            primary: "n1",
            epoch: 1,
            commands: vec![],
            events: vec![HSMDeviceUnhealthy, HSMReadOnlyFallback],
        },
        Case {
            name: "no healthy mirror: Failed",
            fx: three_nodes()
                .failing("n1", 2)
                .failing("n2", 2)
                .failing("n3", 5)
                .renewed_at(0)
                .down("n1")
                .down("n2")
                .down("n3"),
            phase: DevicePhase::Failed,
            primary: "n1",
            epoch: 1,
            commands: vec![],
            events: vec![HSMDeviceUnhealthy, HSMDeviceUnhealthy, HSMDeviceUnhealthy],
        },
        Case {
            name: "policy None: a failed primary is a failed device",
            fx: DeviceFixture::new()
                .policy(MirroringPolicy::None)
                .primary("n1", 10)
                .failing("n1", 2)
                .renewed_at(0)
                .down("n1")
                .ok("n2", 10),
            phase: DevicePhase::Failed,
            primary: "n1",
            epoch: 1,
            commands: vec![],
            events: vec![HSMDeviceUnhealthy, HSMDeviceUnhealthy],
        },
        Case {
            name: "policy Active: a mirror behind the primary's last sequence is not promoted",
            fx: DeviceFixture::new()
                .policy(MirroringPolicy::Active)
                .primary("n1", 10)
                .mirror("n2", 9)
                .failing("n1", 2)
                .renewed_at(0)
                .down("n1")
                .ok("n2", 9),
            phase: DevicePhase::ReadOnlyFallback,
            primary: "n1",
            epoch: 1,
            commands: vec![],
            events: vec![HSMDeviceUnhealthy, HSMReadOnlyFallback],
        },
        Case {
            name: "policy Active: a caught-up mirror the primary stopped waiting for is not promoted",
            fx: DeviceFixture::new()
                .policy(MirroringPolicy::Active)
                .primary("n1", 10)
                .mirror("n2", 10)
                .mirror("n3", 10)
                .outside_write_set("n2")
                .failing("n1", 2)
                .renewed_at(0)
                .down("n1")
                .ok("n2", 10)
                .ok("n3", 10),
            phase: DevicePhase::Degraded,
            primary: "n3",
            epoch: 2,
            commands: vec![
                promote("n3", 2),
                set_mirror("n2", "n3", 2, DeviceRole::ReadOnly),
            ],
            events: vec![HSMFailover, HSMPromoted, HSMDeviceUnhealthy],
        },
        Case {
            name: "policy Active: an in-sync mirror is promoted",
            fx: DeviceFixture::new()
                .policy(MirroringPolicy::Active)
                .primary("n1", 10)
                .mirror("n2", 9)
                .mirror("n3", 10)
                .failing("n1", 2)
                .renewed_at(0)
                .down("n1")
                .ok("n2", 9)
                .ok("n3", 10),
            phase: DevicePhase::Degraded,
            primary: "n3",
            epoch: 2,
            commands: vec![
                promote("n3", 2),
                set_mirror("n2", "n3", 2, DeviceRole::ReadOnly),
            ],
            events: vec![HSMFailover, HSMPromoted, HSMDeviceUnhealthy],
        },
        Case {
            name: "policy ReadOnly: a lagging mirror is promoted (writes may be lost)",
            fx: DeviceFixture::new()
                .primary("n1", 10)
                .mirror("n2", 9)
                .failing("n1", 2)
                .renewed_at(0)
                .down("n1")
                .ok("n2", 9),
            phase: DevicePhase::Degraded,
            primary: "n2",
            epoch: 2,
            commands: vec![promote("n2", 2)],
            events: vec![HSMFailover, HSMPromoted, HSMDeviceUnhealthy],
        },
        Case {
            name: "epoch goes above any epoch an agent reports, not just status + 1",
            fx: three_nodes()
                .failing("n1", 2)
                .renewed_at(0)
                .down("n1")
                .report("n2", 10, |r| r.epoch = 7)
                .ok("n3", 10),
            phase: DevicePhase::Degraded,
            primary: "n2",
            epoch: 8,
            commands: vec![
                promote("n2", 8),
                set_mirror("n3", "n2", 8, DeviceRole::ReadOnly),
            ],
            events: vec![HSMFailover, HSMPromoted, HSMDeviceUnhealthy],
        },
        Case {
            name: "promotion not yet applied by the agent: sent again, no event",
            fx: DeviceFixture::new()
                .primary("n2", 10)
                .epoch(2)
                .mirror("n3", 10)
                .report("n2", 10, |r| {
                    r.role = Some(DeviceRole::ReadOnly);
                    r.epoch = 1;
                    r.history_epoch = 1;
                })
                .ok("n3", 10),
            phase: DevicePhase::Ready,
            primary: "n2",
            epoch: 2,
            commands: vec![promote("n2", 2)],
            events: vec![],
        },
    ];
    for case in cases {
        let plan = case.fx.plan();
        let name = case.name;
        assert_eq!(plan.status.phase, case.phase, "{name}: phase");
        assert_eq!(
            plan.status.primary_node.as_deref(),
            Some(case.primary),
            "{name}: primary"
        );
        assert_eq!(plan.status.epoch, case.epoch, "{name}: epoch");
        assert_eq!(commands(&plan), case.commands, "{name}: commands");
        let mut got = reasons(&plan);
        let mut want = case.events.clone();
        got.sort_by_key(|r| r.as_str());
        want.sort_by_key(|r| r.as_str());
        assert_eq!(
            got,
            want,
            "{name}: events {:#?}",
            plan.events().collect::<Vec<_>>()
        );
        assert_eq!(
            plan.writable(),
            matches!(case.phase, DevicePhase::Ready | DevicePhase::Degraded),
            "{name}: writable"
        );
    }
}

/// The status records a mirror outside the write set as soon as the primary reports it
/// (dropping or dropped), and the renewal of the same round, executed after the status
/// is stored, tells the primary it may stop waiting; back in sync, the mark goes.
#[test]
fn active_write_set_is_recorded_before_the_primary_is_told() {
    use super::observe::WriteSetReport;
    let set = |in_sync: &[&str], outside: &[&str]| {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect();
        Some(WriteSetReport {
            in_sync: names(in_sync),
            outside: names(outside),
        })
    };
    let fx = || {
        DeviceFixture::new()
            .policy(MirroringPolicy::Active)
            .primary("n1", 10)
            .mirror("n2", 10)
            .mirror("n3", 10)
    };
    let plan = fx()
        .report("n1", 12, |r| r.write_set = set(&["n2"], &["n3"]))
        .ok("n2", 12)
        .ok("n3", 10)
        .plan();
    assert!(node_status(&plan, "n3").outside_write_set);
    assert!(!node_status(&plan, "n2").outside_write_set);
    assert_eq!(commands(&plan), vec![renew_outside("n1", 1, &["n3"])]);

    // The primary does not answer this round: the stored mark stays.
    let plan = fx()
        .outside_write_set("n3")
        .failing("n1", 0)
        .down("n1")
        .ok("n2", 12)
        .ok("n3", 12)
        .plan();
    assert!(node_status(&plan, "n3").outside_write_set);

    // Back in the write set: cleared, and the renewal names nobody.
    let plan = fx()
        .outside_write_set("n3")
        .report("n1", 14, |r| r.write_set = set(&["n2", "n3"], &[]))
        .ok("n2", 14)
        .ok("n3", 14)
        .plan();
    assert!(!node_status(&plan, "n3").outside_write_set);
    assert_eq!(commands(&plan), vec![renew("n1", 1)]);
}

#[test]
fn healthy_device_status_summary() {
    let plan = three_nodes().ok("n1", 10).ok("n2", 10).ok("n3", 7).plan();
    assert_eq!(plan.status.mirrors.as_deref(), Some("2/2"));
    assert_eq!(plan.status.max_sync_lag_seconds, Some(0));
    assert_eq!(condition(&plan, "Ready").status, "True");
    assert_eq!(condition(&plan, "Ready").reason, "PrimaryWritable");
    assert_eq!(condition(&plan, "Synced").status, "True");
    assert_eq!(condition(&plan, "Degraded").status, "False");
    assert_eq!(plan.status.observed_generation, Some(1));
    assert!(plan.status.primary_unavailable_since.is_none());
    for n in ["n1", "n2", "n3"] {
        assert!(labelled_ready(&plan, n), "{n} labelled ready");
        assert_eq!(node_status(&plan, n).health, NodeHealth::Healthy);
        assert_eq!(
            node_status(&plan, n).last_successful_probe,
            Some(Time(t(1000)))
        );
    }
    assert_eq!(node_status(&plan, "n1").sync_lag_seconds, None);
    // n3 is 3 behind: within the catch-up window, still serving.
    assert_eq!(role(&plan, "n3"), DeviceRole::ReadOnly);
    assert_eq!(
        node_status(&plan, "n2").token_serial.as_deref(),
        Some("serial-n2")
    );
}

#[test]
fn suspected_primary_shows_in_degraded_condition_and_keeps_serving() {
    let plan = three_nodes()
        .failing("n1", 1)
        .down("n1")
        .ok("n2", 10)
        .ok("n3", 10)
        .plan();
    let degraded = condition(&plan, "Degraded");
    assert_eq!(degraded.status, "True");
    assert_eq!(degraded.reason, "PrimaryFailing");
    assert!(
        degraded.message.contains("n1 failed 2 of 3"),
        "{}",
        degraded.message
    );
    assert_eq!(condition(&plan, "Ready").status, "True");
    let n1 = node_status(&plan, "n1");
    assert_eq!(
        n1.health,
        NodeHealth::Healthy,
        "debounced below the threshold"
    );
    assert_eq!(n1.consecutive_failures, 2);
    assert_eq!(
        n1.last_error.as_deref(),
        Some("Unreachable: connection refused")
    );
    assert!(labelled_ready(&plan, "n1"));
}

#[test]
fn awaiting_fence_says_when_to_replan_then_promotes_without_repeating_events() {
    // Partitioned but maybe alive: renewed at 990, T = 15 s, margin 5 s.
    let fx = three_nodes()
        .failing("n1", 2)
        .renewed_at(990)
        .down("n1")
        .ok("n2", 10)
        .ok("n3", 10);
    let waiting = fx.plan();
    assert_eq!(waiting.replan_at, Some(t(1010)));
    assert!(!waiting.writable());
    let ready = condition(&waiting, "Ready");
    assert_eq!(ready.reason, "AwaitingFence");
    assert!(
        ready.message.contains("n2 will be promoted"),
        "{}",
        ready.message
    );
    assert_eq!(
        waiting.status.primary_unavailable_since,
        Some(Time(t(1000)))
    );
    // Reads continue from the mirrors; the failed primary is not labelled.
    assert!(labelled_ready(&waiting, "n2"));
    assert!(!labelled_ready(&waiting, "n1"));

    // One second before the deadline: still waiting, no new events.
    let fx = fx
        .then(&waiting)
        .at(1009)
        .down("n1")
        .ok("n2", 10)
        .ok("n3", 10);
    let still = fx.plan();
    assert_eq!(commands(&still), vec![]);
    assert_eq!(reasons(&still), vec![]);
    assert_eq!(
        still.status.primary_unavailable_since,
        Some(Time(t(1000))),
        "since when is kept"
    );

    // At the deadline: promotion, only the failover events.
    let fx = fx
        .then(&still)
        .at(1010)
        .down("n1")
        .ok("n2", 10)
        .ok("n3", 10);
    let promoted = fx.plan();
    assert_eq!(promoted.status.primary_node.as_deref(), Some("n2"));
    assert_eq!(promoted.status.epoch, 2);
    assert_eq!(reasons(&promoted), vec![HSMFailover, HSMPromoted]);
    assert_eq!(promoted.status.failover_count, 1);
    assert_eq!(promoted.status.last_failover_time, Some(Time(t(1010))));
    assert!(promoted.status.primary_unavailable_since.is_none());
    assert_eq!(role(&promoted, "n1"), DeviceRole::Standby);
    assert_eq!(promoted.replan_at, None);
    let history = promoted.status.epoch_history.last().unwrap();
    assert_eq!(
        (
            history.epoch,
            history.primary.as_str(),
            history.start_sequence
        ),
        (2, "n2", 10)
    );
}

#[test]
fn without_a_renewal_of_its_own_a_new_leader_waits_a_full_lease_from_taking_over() {
    let mut fx = three_nodes()
        .failing("n1", 2)
        .down("n1")
        .ok("n2", 10)
        .ok("n3", 10)
        .at(1000);
    fx.lease = LeaseFacts {
        confirmed_renewal: None,
        leader_since: t(995),
    };
    let plan = fx.plan();
    assert_eq!(plan.status.phase, DevicePhase::ReadOnlyFallback);
    assert_eq!(plan.replan_at, Some(t(1015)));
}

#[test]
fn read_only_fallback_event_once_and_reads_continue() {
    let fx = three_nodes()
        .auto_failover(false)
        .failing("n1", 2)
        .renewed_at(0)
        .down("n1")
        .ok("n2", 10)
        .ok("n3", 10);
    let first = fx.plan();
    let e = event(&first, HSMReadOnlyFallback);
    assert_eq!(e.type_, EventType::Warning);
    assert!(e.message.contains("autoFailover is off"), "{}", e.message);
    assert!(
        e.message.contains("kubectl hsm failover prod-hsm"),
        "{}",
        e.message
    );
    assert!(labelled_ready(&first, "n2") && labelled_ready(&first, "n3"));
    assert_eq!(first.status.mirrors.as_deref(), Some("2/2"));
    assert_eq!(condition(&first, "Ready").reason, "ReadOnlyFallback");
    let mut fx = fx;
    let mut last = first;
    for i in 1..=10 {
        fx = fx
            .then(&last)
            .at(1000 + i * 5)
            .down("n1")
            .ok("n2", 10)
            .ok("n3", 10);
        last = fx.plan();
        assert_eq!(last.status.phase, DevicePhase::ReadOnlyFallback);
        assert_eq!(reasons(&last), vec![], "round {i}");
        assert_eq!(commands(&last), vec![], "round {i}: no promotion ever");
    }
    // The primary comes back: writable again, recovered, same epoch.
    fx = fx
        .then(&last)
        .at(1100)
        .ok("n1", 10)
        .ok("n2", 10)
        .ok("n3", 10);
    let back = fx.plan();
    assert_eq!(back.status.phase, DevicePhase::Ready);
    assert_eq!(back.status.epoch, 1);
    assert_eq!(commands(&back), vec![renew("n1", 1)]);
    assert_eq!(reasons(&back), vec![HSMDeviceRecovered]);
    assert!(back.status.primary_unavailable_since.is_none());
}

#[test]
fn promotion_prefers_highest_sequence_then_preferred_node_then_name() {
    type Mirrors = Vec<(&'static str, Option<u64>)>;
    let cases: Vec<(&str, Option<&str>, Mirrors, &str)> = vec![
        // (name, preferred, mirrors with Some(seq) = healthy / None = down, expected)
        (
            "highest applied sequence wins",
            None,
            vec![("n2", Some(8)), ("n3", Some(10)), ("n4", Some(9))],
            "n3",
        ),
        (
            "an unreachable mirror with more data is not eligible",
            None,
            vec![("n2", Some(8)), ("n3", None), ("n4", Some(9))],
            "n4",
        ),
        (
            "ties go to the preferred primary",
            Some("n4"),
            vec![("n2", Some(10)), ("n3", Some(10)), ("n4", Some(10))],
            "n4",
        ),
        (
            "ties without preference go to name order",
            None,
            vec![("n4", Some(10)), ("n3", Some(10)), ("n2", Some(10))],
            "n2",
        ),
        (
            "preference never beats more data",
            Some("n2"),
            vec![("n2", Some(9)), ("n3", Some(10))],
            "n3",
        ),
    ];
    for (name, preferred, mirrors, want) in cases {
        let mut fx = DeviceFixture::new()
            .primary("n1", 10)
            .failing("n1", 2)
            .renewed_at(0)
            .down("n1");
        if let Some(p) = preferred {
            fx = fx.preferred(p);
        }
        for (node, seq) in &mirrors {
            fx = fx.mirror(node, 8);
            fx = match seq {
                Some(s) => fx.ok(node, *s),
                None => fx.down(node),
            };
        }
        let plan = fx.plan();
        assert_eq!(plan.status.primary_node.as_deref(), Some(want), "{name}");
        assert!(commands(&plan).contains(&promote(want, 2)), "{name}");
    }
}

#[test]
fn failover_event_names_the_changes_the_promoted_mirror_lacks() {
    let plan = DeviceFixture::new()
        .primary("n1", 12)
        .mirror("n2", 9)
        .failing("n1", 2)
        .renewed_at(0)
        .down("n1")
        .ok("n2", 9)
        .plan();
    let e = event(&plan, HSMFailover);
    assert_eq!(e.type_, EventType::Warning);
    assert!(e.message.contains("promoted n2"), "{}", e.message);
    assert!(
        e.message.contains("last reported sequence 12"),
        "{}",
        e.message
    );
}

#[test]
fn no_healthy_mirror_means_failed_with_reason() {
    let plan = three_nodes()
        .failing("n1", 2)
        .failing("n2", 2)
        .failing("n3", 2)
        .renewed_at(0)
        .down("n1")
        .down("n2")
        .down("n3")
        .plan();
    assert_eq!(plan.status.phase, DevicePhase::Failed);
    let ready = condition(&plan, "Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "DeviceFailed")
    );
    assert!(
        ready.message.contains("no healthy mirror"),
        "{}",
        ready.message
    );
    assert!(plan.status.primary_unavailable_since.is_some());
    for n in ["n1", "n2", "n3"] {
        assert!(!labelled_ready(&plan, n));
    }
    assert_eq!(plan.status.mirrors.as_deref(), Some("0/2"));
}

#[test]
fn old_primary_returns_as_mirror_resyncs_and_no_failback_even_if_preferred() {
    // n1 (preferred) failed; n2 took over at epoch 2 from sequence 10 and wrote to 14.
    let after_failover = three_nodes()
        .preferred("n1")
        .failing("n1", 2)
        .renewed_at(0)
        .down("n1")
        .ok("n2", 10)
        .ok("n3", 10)
        .plan();
    assert_eq!(after_failover.status.primary_node.as_deref(), Some("n2"));

    // n1 comes back believing it is primary at epoch 1 with exactly the shared history.
    let fx = three_nodes()
        .preferred("n1")
        .then(&after_failover)
        .at(1100)
        .report("n1", 10, |r| {
            r.role = Some(DeviceRole::Primary);
            r.epoch = 1;
            r.history_epoch = 1;
            r.write_lease = WriteLease::Lapsed;
        })
        .ok("n2", 14)
        .ok("n3", 14);
    let back = fx.plan();
    assert_eq!(
        back.status.primary_node.as_deref(),
        Some("n2"),
        "no failback"
    );
    assert_eq!(back.status.epoch, 2);
    assert_eq!(commands(&back), vec![demote("n1", 2, "n2"), renew("n2", 2)]);
    let mut got = reasons(&back);
    got.sort_by_key(|r| r.as_str());
    assert_eq!(got, vec![HSMDemoted, HSMDeviceRecovered]);
    assert_eq!(event(&back, HSMDemoted).type_, EventType::Normal);
    assert_eq!(role(&back, "n1"), DeviceRole::Standby);
    assert!(!labelled_ready(&back, "n1"));
    assert!(node_status(&back, "n1").lost_writes.is_none());
    let ready = condition(&back, "Ready");
    assert!(
        ready
            .message
            .contains("preferred primary n1 is not primary"),
        "{}",
        ready.message
    );

    // Demote applied, resync under way: nothing to repeat.
    let fx = fx
        .then(&back)
        .at(1105)
        .report("n1", 10, |r| {
            r.role = Some(DeviceRole::Standby);
            r.epoch = 2;
            r.history_epoch = 1;
        })
        .ok("n2", 14)
        .ok("n3", 14);
    let resyncing = fx.plan();
    assert_eq!(commands(&resyncing), vec![renew("n2", 2)]);
    assert_eq!(reasons(&resyncing), vec![]);
    assert_eq!(role(&resyncing, "n1"), DeviceRole::Standby);

    // Caught up under epoch 2: serves reads; n2 stays primary.
    let fx = fx
        .then(&resyncing)
        .at(1110)
        .report("n1", 14, |r| {
            r.role = Some(DeviceRole::Standby);
            r.epoch = 2;
            r.history_epoch = 2;
        })
        .ok("n2", 14)
        .ok("n3", 14);
    let caught_up = fx.plan();
    assert_eq!(role(&caught_up, "n1"), DeviceRole::ReadOnly);
    assert_eq!(
        commands(&caught_up),
        vec![
            renew("n2", 2),
            set_mirror("n1", "n2", 2, DeviceRole::ReadOnly)
        ]
    );
    assert_eq!(caught_up.status.primary_node.as_deref(), Some("n2"));
    assert_eq!(caught_up.status.phase, DevicePhase::Ready);
    assert_eq!(caught_up.status.mirrors.as_deref(), Some("2/2"));
}

#[test]
fn old_primary_with_writes_the_new_primary_never_got_reports_them_once() {
    // Epoch 2 started on n2 at sequence 95; n1 wrote up to 100 under epoch 1 meanwhile.
    let mut fx = DeviceFixture::new()
        .primary("n2", 97)
        .epoch(2)
        .standby("n1", 90)
        .mirror("n3", 97)
        .failing("n1", 5);
    fx.status.epoch_history = vec![
        EpochRecord {
            epoch: 1,
            primary: "n1".into(),
            start_sequence: 0,
            since: Time(t(0)),
            reason: "Bootstrap".into(),
        },
        EpochRecord {
            epoch: 2,
            primary: "n2".into(),
            start_sequence: 95,
            since: Time(t(500)),
            reason: "Failover".into(),
        },
    ];
    let returning = |fx: DeviceFixture, role: DeviceRole, epoch: u64| {
        fx.report("n1", 100, move |r| {
            r.role = Some(role);
            r.epoch = epoch;
            r.history_epoch = 1;
            r.write_lease = WriteLease::Lapsed;
        })
        .ok("n2", 97)
        .ok("n3", 97)
    };
    let fx = returning(fx, DeviceRole::Primary, 1);
    let plan = fx.plan();
    assert!(commands(&plan).contains(&ReportLostWrites {
        node: "n1".into(),
        epoch: 1,
        from_sequence: 96,
        to_sequence: 100,
    }));
    assert!(commands(&plan).contains(&demote("n1", 2, "n2")));
    let demoted = event(&plan, HSMDemoted);
    assert_eq!(demoted.type_, EventType::Warning);
    assert!(demoted.message.contains("96..=100"), "{}", demoted.message);
    assert!(demoted.message.contains("ReadOnly"), "{}", demoted.message);
    let lost = node_status(&plan, "n1").lost_writes.clone().unwrap();
    assert_eq!(
        (lost.epoch, lost.from_sequence, lost.to_sequence),
        (1, 96, 100)
    );
    assert_eq!(role(&plan, "n1"), DeviceRole::Standby);

    // Next rounds (demote applied, resync not done): reported once, never again.
    let fx = returning(fx.then(&plan).at(1005), DeviceRole::Standby, 2);
    let again = fx.plan();
    assert!(
        !commands(&again)
            .iter()
            .any(|a| matches!(a, ReportLostWrites { .. }))
    );
    assert!(!commands(&again).iter().any(|a| matches!(a, Demote { .. })));
    assert_eq!(reasons(&again), vec![]);
    assert!(node_status(&again, "n1").lost_writes.is_some());

    // A diverged node is never a promotion candidate, even with the most data.
    let fx = fx
        .then(&again)
        .failing("n2", 2)
        .renewed_at(0)
        .at(1010)
        .report("n1", 100, |r| {
            r.role = Some(DeviceRole::Standby);
            r.epoch = 2;
            r.history_epoch = 1;
        })
        .down("n2")
        .ok("n3", 97);
    let failover = fx.plan();
    assert_eq!(failover.status.primary_node.as_deref(), Some("n3"));

    // Resynchronized: the record goes, the node serves again.
    let fx = fx
        .then(&failover)
        .at(1015)
        .report("n1", 97, |r| {
            r.role = Some(DeviceRole::Standby);
            r.epoch = 3;
            r.history_epoch = 3;
        })
        .down("n2")
        .report("n3", 97, |r| {
            r.role = Some(DeviceRole::Primary);
            r.epoch = 3;
            r.history_epoch = 3;
        });
    let resynced = fx.plan();
    assert!(node_status(&resynced, "n1").lost_writes.is_none());
    assert_eq!(role(&resynced, "n1"), DeviceRole::ReadOnly);
}

#[test]
fn lost_writes_under_active_are_described_as_unacknowledged() {
    let mut fx = DeviceFixture::new()
        .policy(MirroringPolicy::Active)
        .primary("n2", 95)
        .epoch(2)
        .standby("n1", 90)
        .failing("n1", 5);
    fx.status.epoch_history.push(EpochRecord {
        epoch: 2,
        primary: "n2".into(),
        start_sequence: 95,
        since: Time(t(500)),
        reason: "Failover".into(),
    });
    fx.status.epoch_history[0].epoch = 1;
    let plan = fx
        .report("n1", 96, |r| {
            r.role = Some(DeviceRole::Primary);
            r.epoch = 1;
            r.history_epoch = 1;
        })
        .ok("n2", 95)
        .plan();
    assert!(
        event(&plan, HSMDemoted)
            .message
            .contains("never acknowledged")
    );
}

#[test]
fn standby_mirrors_catch_up_before_serving_and_hysteresis_keeps_labels_steady() {
    let config = PlanConfig {
        caught_up_within: 2,
        falls_behind_after: 20,
        ..PlanConfig::default()
    };
    let base = |fx: DeviceFixture| {
        let mut fx = fx;
        fx.config = config.clone();
        fx
    };
    let cases = [
        // (name, previous role of n2, n2's sequence, expected role)
        (
            "far behind stays Standby",
            DeviceRole::Standby,
            50,
            DeviceRole::Standby,
        ),
        (
            "within the catch-up window becomes ReadOnly",
            DeviceRole::Standby,
            98,
            DeviceRole::ReadOnly,
        ),
        (
            "a serving mirror tolerates some lag",
            DeviceRole::ReadOnly,
            85,
            DeviceRole::ReadOnly,
        ),
        (
            "a serving mirror far behind stops serving",
            DeviceRole::ReadOnly,
            79,
            DeviceRole::Standby,
        ),
    ];
    for (name, prev_role, seq, want) in cases {
        let fx = base(DeviceFixture::new().primary("n1", 100));
        let fx = match prev_role {
            DeviceRole::Standby => fx.standby("n2", 0),
            _ => fx.mirror("n2", 100),
        };
        let plan = fx.ok("n1", 100).ok("n2", seq).plan();
        assert_eq!(role(&plan, "n2"), want, "{name}");
        assert_eq!(
            labelled_ready(&plan, "n2"),
            want == DeviceRole::ReadOnly,
            "{name}"
        );
        let changed = prev_role != want;
        assert_eq!(
            commands(&plan).contains(&set_mirror("n2", "n1", 1, want)),
            changed,
            "{name}: SetMirror only on a change"
        );
        if want == DeviceRole::Standby {
            assert_eq!(condition(&plan, "Synced").reason, "CatchingUp", "{name}");
            assert_eq!(
                plan.status.phase,
                DevicePhase::Ready,
                "{name}: catching up is not degraded"
            );
        }
    }

    // A mirror that has not yet synced under the current epoch is Standby however close.
    let plan = DeviceFixture::new()
        .primary("n1", 100)
        .epoch(3)
        .standby("n2", 100)
        .ok("n1", 100)
        .report("n2", 100, |r| r.history_epoch = 2)
        .plan();
    assert_eq!(role(&plan, "n2"), DeviceRole::Standby);
}

#[test]
fn target_node_that_never_reported_is_unknown() {
    let plan = DeviceFixture::new()
        .targets(&["n2", "n3"])
        .primary("n1", 10)
        .mirror("n2", 10)
        .ok("n1", 10)
        .ok("n2", 10)
        .plan();
    let n3 = node_status(&plan, "n3");
    assert_eq!(n3.health, NodeHealth::Unknown);
    assert_eq!(n3.role, DeviceRole::Standby);
    assert_eq!(n3.sync_lag_seconds, None);
    assert!(!labelled_ready(&plan, "n3"));
    assert_eq!(plan.status.mirrors.as_deref(), Some("1/2"));
    assert_eq!(plan.status.phase, DevicePhase::Degraded);
    assert!(
        condition(&plan, "Degraded")
            .message
            .contains("n3 has not reported")
    );
    // Still Unknown (not Unhealthy, no event) after many rounds without a report.
    let mut fx = DeviceFixture::new()
        .targets(&["n2", "n3"])
        .primary("n1", 10)
        .mirror("n2", 10);
    let mut last = plan;
    for i in 0..6 {
        fx = fx
            .then(&last)
            .at(1005 + i * 5)
            .ok("n1", 10)
            .ok("n2", 10)
            .down("n3");
        last = fx.plan();
        assert_eq!(node_status(&last, "n3").health, NodeHealth::Unknown);
        assert_eq!(reasons(&last), vec![]);
    }
}

#[test]
fn membership_follows_the_spec() {
    // targetNodes given: a stranger reporting the token is ignored.
    let plan = DeviceFixture::new()
        .targets(&["n2"])
        .primary("n1", 10)
        .mirror("n2", 10)
        .ok("n1", 10)
        .ok("n2", 10)
        .ok("n9", 10)
        .plan();
    assert!(plan.status.nodes.iter().all(|n| n.node != "n9"));

    // targetNodes empty: every node whose agent reports the token joins (as Standby).
    let plan = DeviceFixture::new()
        .primary("n1", 10)
        .ok("n1", 10)
        .report("n9", 0, |r| r.role = None)
        .plan();
    assert_eq!(role(&plan, "n9"), DeviceRole::Standby);
    assert!(commands(&plan).contains(&set_mirror("n9", "n1", 1, DeviceRole::Standby)));

    // Policy switched to None: mirrors leave and lose their label.
    let plan = three_nodes()
        .policy(MirroringPolicy::None)
        .ok("n1", 10)
        .ok("n2", 10)
        .ok("n3", 10)
        .plan();
    assert_eq!(plan.status.nodes.len(), 1);
    assert_eq!(plan.status.mirrors.as_deref(), Some("0/0"));
    assert!(!labelled_ready(&plan, "n2") && !labelled_ready(&plan, "n3"));
    assert_eq!(condition(&plan, "Synced").reason, "NotMirrored");
    assert_eq!(plan.status.phase, DevicePhase::Ready);
}

#[test]
fn broken_token_counts_as_a_failed_check_with_its_reason() {
    let plan = three_nodes()
        .report("n1", 10, |r| {
            r.token_present = false;
            r.error = None;
        })
        .ok("n2", 10)
        .ok("n3", 10)
        .report("n3", 10, |r| {
            r.session_usable = false;
            r.error = Some(NodeError::new(
                NodeErrorKind::SessionFailed,
                "CKR_PIN_LOCKED",
            ));
        })
        .plan();
    let n1 = node_status(&plan, "n1");
    assert_eq!(n1.consecutive_failures, 1);
    assert_eq!(
        n1.last_error.as_deref(),
        Some("TokenMissing: the agent does not see the token")
    );
    assert_eq!(
        node_status(&plan, "n3").last_error.as_deref(),
        Some("SessionFailed: CKR_PIN_LOCKED")
    );
    assert_eq!(
        commands(&plan),
        vec![],
        "no lease for a primary without its token"
    );
}

#[test]
fn long_agent_errors_are_shortened_in_status() {
    let long = "é".repeat(400);
    let plan = three_nodes()
        .ok("n1", 10)
        .ok("n3", 10)
        .report("n2", 10, |r| {
            r.error = Some(NodeError::new(
                NodeErrorKind::ChecksumMismatch,
                long.clone(),
            ));
        })
        .plan();
    let shown = node_status(&plan, "n2").last_error.clone().unwrap();
    assert!(shown.starts_with("ChecksumMismatch: éé"), "{shown}");
    assert!(shown.ends_with('…') && shown.len() < 300, "{}", shown.len());
}

#[test]
fn sync_failures_are_reported_on_transition_only() {
    let fx = three_nodes().ok("n1", 10).sync_error("n2", 8).ok("n3", 10);
    let first = fx.plan();
    assert_eq!(reasons(&first), vec![HSMSyncFailed]);
    assert!(
        event(&first, HSMSyncFailed)
            .message
            .contains("pull timed out")
    );
    assert_eq!(first.status.phase, DevicePhase::Degraded);
    assert_eq!(condition(&first, "Synced").reason, "SyncFailing");
    let fx = fx
        .then(&first)
        .at(1005)
        .ok("n1", 10)
        .sync_error("n2", 8)
        .ok("n3", 10);
    let second = fx.plan();
    assert_eq!(reasons(&second), vec![], "still failing: no new event");
    let fx = fx
        .then(&second)
        .at(1010)
        .ok("n1", 10)
        .ok("n2", 10)
        .ok("n3", 10);
    let healed = fx.plan();
    assert_eq!(healed.status.phase, DevicePhase::Ready);
    assert!(node_status(&healed, "n2").last_error.is_none());
    let fx = fx
        .then(&healed)
        .at(1015)
        .ok("n1", 10)
        .sync_error("n2", 10)
        .ok("n3", 10);
    assert_eq!(
        reasons(&fx.plan()),
        vec![HSMSyncFailed],
        "a new episode is reported"
    );
}

#[test]
fn condition_transition_times_only_move_on_change() {
    let fx = three_nodes().ok("n1", 10).ok("n2", 10).ok("n3", 10);
    let first = fx.plan();
    let fx = fx
        .then(&first)
        .at(2000)
        .ok("n1", 10)
        .ok("n2", 10)
        .ok("n3", 10);
    let second = fx.plan();
    assert_eq!(
        condition(&second, "Ready").last_transition_time,
        Time(t(1000))
    );
    let fx = fx
        .then(&second)
        .at(3000)
        .sync_error("n2", 10)
        .ok("n1", 10)
        .ok("n3", 10);
    let third = fx.plan();
    assert_eq!(
        condition(&third, "Ready").last_transition_time,
        Time(t(1000))
    );
    assert_eq!(
        condition(&third, "Degraded").last_transition_time,
        Time(t(3000))
    );
    assert_eq!(condition(&third, "Degraded").status, "True");
}

#[test]
fn first_primary_election() {
    // The preferred node is waited for.
    let fx = DeviceFixture::new()
        .preferred("n1")
        .targets(&["n2"])
        .ok("n2", 0);
    let plan = fx.plan();
    assert_eq!(plan.status.phase, DevicePhase::Pending);
    assert_eq!(plan.status.primary_node, None);
    assert!(commands(&plan).is_empty());
    assert!(
        condition(&plan, "Ready")
            .message
            .contains("waiting for the preferred primary n1")
    );
    assert!(!labelled_ready(&plan, "n2"));

    // Both report: n1 elected at epoch 1; n2 follows as Standby until it synced.
    let fx = fx.then(&plan).at(1005).ok("n1", 0).ok("n2", 0);
    let plan = fx.plan();
    assert_eq!(plan.status.primary_node.as_deref(), Some("n1"));
    assert_eq!(plan.status.epoch, 1);
    assert_eq!(
        commands(&plan),
        vec![
            promote("n1", 1),
            set_mirror("n2", "n1", 1, DeviceRole::Standby)
        ]
    );
    assert_eq!(reasons(&plan), vec![HSMPromoted]);
    assert_eq!(
        plan.status.failover_count, 0,
        "an election is not a failover"
    );
    assert_eq!(plan.status.epoch_history.len(), 1);

    let cases: Vec<(&str, DeviceFixture, Option<&str>, u64)> = vec![
        (
            "without preference the node with the most data wins",
            DeviceFixture::new().ok("n1", 3).ok("n2", 50).ok("n3", 50),
            Some("n2"),
            1,
        ),
        (
            "a node that still holds a write lease is adopted",
            DeviceFixture::new()
                .ok("n1", 3)
                .ok("n2", 50)
                .report("n3", 40, |r| {
                    r.write_lease = WriteLease::Valid {
                        remaining: std::time::Duration::from_secs(3),
                    };
                }),
            Some("n3"),
            1,
        ),
        (
            "epochs left on the agents are exceeded (status was lost)",
            DeviceFixture::new()
                .report("n1", 5, |r| r.epoch = 4)
                .ok("n2", 5),
            Some("n1"),
            5,
        ),
        (
            "a target that has not answered yet is waited for",
            DeviceFixture::new()
                .targets(&["n2", "n3"])
                .ok("n1", 0)
                .ok("n2", 0)
                .down("n3"),
            None,
            0,
        ),
        (
            "an unavailable preferred node with autoFailover off keeps it pending",
            {
                let mut fx = DeviceFixture::new()
                    .auto_failover(false)
                    .preferred("n1")
                    .ok("n2", 0);
                fx.status.nodes = DeviceFixture::new()
                    .standby("n1", 0)
                    .failing("n1", 3)
                    .status
                    .nodes;
                fx.down("n1")
            },
            None,
            0,
        ),
        (
            "policy None elects the only node with the token",
            DeviceFixture::new()
                .policy(MirroringPolicy::None)
                .ok("n7", 3),
            Some("n7"),
            1,
        ),
    ];
    for (name, fx, want, epoch) in cases {
        let plan = fx.plan();
        assert_eq!(plan.status.primary_node.as_deref(), want, "{name}");
        assert_eq!(plan.status.epoch, epoch, "{name}");
        if want.is_none() {
            assert_eq!(plan.status.phase, DevicePhase::Pending, "{name}");
        }
    }
}

// --- switchover ---

fn switchover_fixture() -> DeviceFixture {
    DeviceFixture::new()
        .primary("n1", 10)
        .mirror("n2", 9)
        .mirror("n3", 10)
        .switchover("n2")
}

#[test]
fn planned_switchover_fences_waits_for_catch_up_then_promotes() {
    // Step 1: stop writes on n1; nothing renews its lease.
    let fx = switchover_fixture().ok("n1", 10).ok("n2", 9).ok("n3", 10);
    let fence = fx.plan();
    assert_eq!(
        commands(&fence),
        vec![FenceWrites {
            node: "n1".into(),
            epoch: 1
        }]
    );
    assert_eq!(
        fence.switchover,
        Some(SwitchoverOutcome::InProgress(SwitchoverStep::FenceWrites {
            primary: "n1".into(),
            epoch: 1
        }))
    );
    assert_eq!(fence.status.phase, DevicePhase::ReadOnlyFallback);
    assert_eq!(condition(&fence, "Ready").reason, "SwitchoverInProgress");
    assert_eq!(
        reasons(&fence),
        vec![],
        "a planned switchover is not an alarm"
    );

    // Step 2: fenced, but n2 is one change behind.
    let fenced = |fx: DeviceFixture| fx.report("n1", 10, |r| r.write_lease = WriteLease::Fenced);
    let fx = fenced(fx.then(&fence).at(1005)).ok("n2", 9).ok("n3", 10);
    let waiting = fx.plan();
    assert_eq!(
        waiting.switchover,
        Some(SwitchoverOutcome::InProgress(
            SwitchoverStep::AwaitCatchUp {
                target: "n2".into(),
                target_sequence: 9,
                primary_sequence: 10
            }
        ))
    );
    assert!(
        !commands(&waiting)
            .iter()
            .any(|a| matches!(a, RenewLease { .. } | Promote { .. }))
    );

    // Step 3: caught up: promote n2 at epoch 2, demote n1. Zero loss.
    let fx = fenced(fx.then(&waiting).at(1010)).ok("n2", 10).ok("n3", 10);
    let done = fx.plan();
    assert_eq!(
        done.switchover,
        Some(SwitchoverOutcome::Completed {
            target: "n2".into(),
            epoch: 2
        })
    );
    assert_eq!(done.status.primary_node.as_deref(), Some("n2"));
    assert_eq!(
        commands(&done),
        vec![
            demote("n1", 2, "n2"),
            promote("n2", 2),
            set_mirror("n3", "n2", 2, DeviceRole::ReadOnly)
        ]
    );
    let mut got = reasons(&done);
    got.sort_by_key(|r| r.as_str());
    assert_eq!(got, vec![HSMDemoted, HSMFailover, HSMPromoted]);
    assert_eq!(event(&done, HSMFailover).type_, EventType::Normal);
    assert_eq!(done.status.failover_count, 1);
    assert_eq!(
        done.status.epoch_history.last().unwrap().reason,
        "Switchover"
    );
    assert_eq!(done.status.phase, DevicePhase::Ready);

    // The request not cleared yet: already done, no event.
    let fx = fx
        .then(&done)
        .at(1015)
        .ok("n2", 10)
        .ok("n3", 10)
        .report("n1", 10, |r| {
            r.role = Some(DeviceRole::Standby);
            r.epoch = 2;
        });
    let mut fx = fx;
    fx.switchover = Some(SwitchoverRequest {
        target: "n2".into(),
        force: false,
    });
    let again = fx.plan();
    assert!(matches!(
        again.switchover,
        Some(SwitchoverOutcome::Completed { epoch: 2, .. })
    ));
    assert_eq!(reasons(&again), vec![]);
}

#[test]
fn switchover_errors_name_the_problem() {
    let cfg = PlanConfig::default();
    let lease = LeaseFacts {
        confirmed_renewal: Some(t(900)),
        leader_since: t(0),
    };
    let request = |target: &str, force: bool| SwitchoverRequest {
        target: target.into(),
        force,
    };
    let healthy = three_nodes().ok("n1", 10).ok("n2", 10).ok("n3", 10);
    let cases: Vec<(&str, DeviceFixture, SwitchoverRequest, &str, &str)> = vec![
        (
            "policy None",
            healthy.clone().policy(MirroringPolicy::None),
            request("n2", false),
            "not_mirrored",
            "policy None",
        ),
        (
            "unknown target",
            healthy.clone(),
            request("n7", false),
            "unknown_target",
            "nodes: n1, n2, n3",
        ),
        (
            "target already primary",
            healthy.clone(),
            request("n1", false),
            "target_is_primary",
            "already the primary",
        ),
        (
            "target unhealthy",
            three_nodes().ok("n1", 10).down("n2").ok("n3", 10),
            request("n2", false),
            "target_unhealthy",
            "connection refused",
        ),
        (
            "no primary yet",
            DeviceFixture::new().ok("n1", 0).ok("n2", 0),
            request("n2", false),
            "no_primary",
            "no primary yet",
        ),
        (
            "dead primary, target behind, not forced",
            DeviceFixture::new()
                .primary("n1", 10)
                .mirror("n2", 8)
                .down("n1")
                .ok("n2", 8),
            request("n2", false),
            "would_lose_writes",
            "may lose 2 changes",
        ),
    ];
    for (name, fx, req, kind, text) in cases {
        let err = plan_switchover(
            &fx.view,
            &fx.status,
            &req,
            &fx.probes,
            &lease,
            &cfg,
            t(1000),
        )
        .unwrap_err();
        assert_eq!(err.kind(), kind, "{name}");
        assert!(err.to_string().contains(text), "{name}: {err}");
    }
}

#[test]
fn switchover_with_an_unreachable_primary_waits_out_its_lease() {
    let cfg = PlanConfig::default();
    let fx = DeviceFixture::new()
        .primary("n1", 10)
        .mirror("n2", 8)
        .down("n1")
        .ok("n2", 8);
    let at = |renewed: i64, force: bool| {
        plan_switchover(
            &fx.view,
            &fx.status,
            &SwitchoverRequest {
                target: "n2".into(),
                force,
            },
            &fx.probes,
            &LeaseFacts {
                confirmed_renewal: Some(t(renewed)),
                leader_since: t(0),
            },
            &cfg,
            t(1000),
        )
    };
    assert_eq!(
        at(990, true),
        Ok(SwitchoverStep::AwaitFence {
            primary: "n1".into(),
            until: t(1010)
        })
    );
    assert_eq!(
        at(900, true),
        Ok(SwitchoverStep::Promote {
            target: "n2".into(),
            old_primary: "n1".into(),
            epoch: 2,
            sequence: 8
        })
    );
}

#[test]
fn rejected_or_abandoned_switchover_resumes_writes() {
    // Rejected request: reported once, the device carries on normally.
    let plan = three_nodes()
        .switchover("n7")
        .ok("n1", 10)
        .ok("n2", 10)
        .ok("n3", 10)
        .plan();
    assert!(matches!(
        plan.switchover,
        Some(SwitchoverOutcome::Rejected(
            SwitchoverError::UnknownTarget { .. }
        ))
    ));
    assert_eq!(event(&plan, HSMFailover).type_, EventType::Warning);
    assert!(event(&plan, HSMFailover).message.contains("rejected"));
    assert_eq!(commands(&plan), vec![renew("n1", 1)]);

    // The request went away after n1 was fenced: only a new epoch lets it write again.
    let plan = three_nodes()
        .report("n1", 10, |r| r.write_lease = WriteLease::Fenced)
        .ok("n2", 10)
        .ok("n3", 10)
        .plan();
    assert_eq!(plan.status.primary_node.as_deref(), Some("n1"));
    assert_eq!(plan.status.epoch, 2);
    assert_eq!(commands(&plan)[0], promote("n1", 2));
    assert_eq!(plan.status.epoch_history.last().unwrap().reason, "Resume");
    assert_eq!(plan.status.failover_count, 0);
    assert_eq!(plan.status.phase, DevicePhase::Ready);
}

// --- multi-round scenarios on a simulated cluster ---

/// At most one agent may accept writes at any instant.
fn assert_single_writer(c: &Cluster) {
    let writers: Vec<&String> = c
        .agents
        .iter()
        .filter(|(_, a)| {
            let lease = c.fx.config.fencing.lease_duration.as_secs() as i64;
            a.role == Some(DeviceRole::Primary)
                && !a.fenced
                && a.renewed.is_some_and(|r| c.clock < r + lease)
        })
        .map(|(n, _)| n)
        .collect();
    assert!(
        writers.len() <= 1,
        "two writers at {}: {writers:?}",
        c.clock
    );
}

fn cluster(nodes: &[&str]) -> Cluster {
    let mut c = Cluster::new(DeviceFixture::new().preferred("n1"), nodes);
    let plan = c.run_until(10, |p| {
        p.status.phase == DevicePhase::Ready && p.status.mirrors.as_deref() == Some("2/2")
    });
    assert_eq!(plan.status.primary_node.as_deref(), Some("n1"));
    c
}

#[test]
fn flapping_primary_never_fails_over_and_does_not_spam_events() {
    let mut c = cluster(&["n1", "n2", "n3"]);
    let before = c.plans.len();
    for i in 0..40 {
        c.agent("n1").up = i % 2 == 0;
        c.round();
        c.sync_mirrors();
        assert_single_writer(&c);
    }
    let flapping = &c.plans[before..];
    assert!(
        flapping
            .iter()
            .all(|p| p.status.primary_node.as_deref() == Some("n1"))
    );
    assert!(flapping.iter().all(|p| p.status.epoch == 1));
    let events: Vec<EventReason> = flapping.iter().flat_map(reasons).collect();
    assert_eq!(events, vec![], "alternating health is not a transition");
    // The phase does say something is off while it fails.
    assert!(
        flapping
            .iter()
            .any(|p| p.status.phase == DevicePhase::Degraded)
    );

    // Two failures, one success, repeated: still below a threshold of 3.
    c.agent("n1").up = true;
    c.round();
    for i in 0..30 {
        c.agent("n1").up = i % 3 == 2;
        c.round();
        c.sync_mirrors();
    }
    assert_eq!(c.fx.status.primary_node.as_deref(), Some("n1"));
    assert_eq!(c.fx.status.failover_count, 0);
}

#[test]
fn partitioned_primary_keeps_writing_until_its_lease_lapses_and_nobody_overlaps() {
    let mut c = cluster(&["n1", "n2", "n3"]);
    c.write("n1", 5);
    c.round();
    c.sync_mirrors();
    // n1 is cut off from the controller but alive: clients next to it keep writing.
    c.agent("n1").up = false;
    let mut accepted_while_cut_off = 0;
    let plan = loop {
        accepted_while_cut_off += c.write("n1", 1);
        let plan = c.round();
        assert_single_writer(&c);
        if plan.status.primary_node.as_deref() != Some("n1") {
            break plan;
        }
        assert!(c.clock < 200, "never failed over");
    };
    assert!(
        accepted_while_cut_off > 0,
        "the partitioned primary wrote until fenced"
    );
    let new_primary = plan.status.primary_node.clone().unwrap();
    // The promotion came only after n1's own lease had lapsed (plus margin).
    let n1_renewed = c.agents["n1"].renewed.unwrap();
    let promoted_at = c.clock - c.step;
    assert!(
        promoted_at >= n1_renewed + 15 + 5,
        "promoted at {promoted_at}, n1 renewed at {n1_renewed}"
    );
    assert_eq!(plan.status.epoch, 2);

    // The partition heals: n1 rejoins as a mirror, its extra writes reported, no failback.
    c.write(&new_primary, 2);
    c.agent("n1").up = true;
    let back = c.round();
    assert_single_writer(&c);
    assert_eq!(
        back.status.primary_node.as_deref(),
        Some(new_primary.as_str())
    );
    let lost: Vec<&Action> = back
        .actions
        .iter()
        .filter(|a| matches!(a, ReportLostWrites { .. }))
        .collect();
    assert_eq!(lost.len(), 1, "{:#?}", back.actions);
    c.sync_mirrors();
    let settled = c.run_until(10, |p| p.status.mirrors.as_deref() == Some("2/2"));
    assert_eq!(
        settled.status.primary_node.as_deref(),
        Some(new_primary.as_str())
    );
    assert!(node_status(&settled, "n1").lost_writes.is_none());
    assert_eq!(settled.status.phase, DevicePhase::Ready);
}

#[test]
fn epoch_strictly_increases_over_repeated_failovers_and_switchovers() {
    let mut c = cluster(&["n1", "n2", "n3"]);
    for victim_round in 0..6 {
        let primary = c.fx.status.primary_node.clone().unwrap();
        c.write(&primary, 3);
        c.sync_mirrors();
        if victim_round % 3 == 2 {
            // A planned switchover to the next node in name order.
            let target = ["n1", "n2", "n3"]
                .into_iter()
                .find(|n| *n > primary.as_str())
                .unwrap_or("n1")
                .to_string();
            c.fx.switchover = Some(SwitchoverRequest {
                target: target.clone(),
                force: false,
            });
            c.run_until(10, |p| {
                assert!(!matches!(
                    p.switchover,
                    Some(SwitchoverOutcome::Rejected(_))
                ));
                matches!(p.switchover, Some(SwitchoverOutcome::Completed { .. }))
            });
            c.fx.switchover = None;
            assert_eq!(c.fx.status.primary_node.as_deref(), Some(target.as_str()));
        } else {
            c.agent(&primary).up = false;
            c.run_until(20, |p| {
                p.status.primary_node.as_deref() != Some(primary.as_str())
            });
            c.agent(&primary).up = true;
        }
        c.run_until(20, |p| {
            p.status.phase == DevicePhase::Ready && p.status.mirrors.as_deref() == Some("2/2")
        });
        assert_single_writer(&c);
    }
    let primaries = c.primaries();
    assert!(primaries.len() >= 7, "{primaries:?}");
    assert!(
        primaries.windows(2).all(|w| w[0].0 < w[1].0),
        "epochs strictly increase: {primaries:?}"
    );
    assert!(
        primaries.windows(2).all(|w| w[0].1 != w[1].1),
        "each promotion changed the primary: {primaries:?}"
    );
    assert_eq!(c.fx.status.failover_count, 6);
    assert!(c.fx.status.epoch_history.len() <= 16);
}

#[test]
fn preferred_primary_coming_back_stays_a_mirror() {
    let mut c = cluster(&["n1", "n2", "n3"]);
    c.agent("n1").up = false;
    c.run_until(20, |p| p.status.primary_node.as_deref() != Some("n1"));
    let new_primary = c.fx.status.primary_node.clone().unwrap();
    c.agent("n1").up = true;
    let plan = c.run_until(20, |p| p.status.mirrors.as_deref() == Some("2/2"));
    for _ in 0..10 {
        c.round();
        c.sync_mirrors();
    }
    assert_eq!(
        c.fx.status.primary_node.as_deref(),
        Some(new_primary.as_str())
    );
    assert_eq!(
        c.fx.status
            .nodes
            .iter()
            .find(|n| n.node == "n1")
            .unwrap()
            .role,
        DeviceRole::ReadOnly
    );
    assert!(
        condition(&plan, "Ready")
            .message
            .contains("preferred primary n1 is not primary")
    );
}

#[test]
fn every_transition_event_appears_once_across_a_failover() {
    let mut c = cluster(&["n1", "n2", "n3"]);
    let start = c.plans.len();
    c.agent("n1").up = false;
    c.run_until(20, |p| p.status.primary_node.as_deref() != Some("n1"));
    for _ in 0..5 {
        c.round();
        c.sync_mirrors();
    }
    c.agent("n1").up = true;
    c.run_until(20, |p| p.status.mirrors.as_deref() == Some("2/2"));
    for _ in 0..5 {
        c.round();
        c.sync_mirrors();
    }
    let mut events: Vec<&str> = c.plans[start..]
        .iter()
        .flat_map(|p| p.events().map(|e| e.reason.as_str()))
        .collect();
    events.sort();
    assert_eq!(
        events,
        vec![
            "HSMDemoted",
            "HSMDeviceRecovered",
            "HSMDeviceUnhealthy",
            "HSMFailover",
            "HSMPromoted",
            "HSMReadOnlyFallback",
        ]
    );
}

#[test]
fn plans_are_deterministic_and_serializable() {
    let fx = three_nodes()
        .failing("n1", 2)
        .renewed_at(0)
        .down("n1")
        .ok("n2", 10)
        .ok("n3", 9);
    let a = fx.plan();
    let b = fx.plan();
    assert_eq!(a, b);
    let json = serde_json::to_string(&a).unwrap();
    let back: Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, a);
    let obs = serde_json::to_string(&fx.observations()).unwrap();
    let _: Observations = serde_json::from_str(&obs).unwrap();
    // Actions read as the controller will log them.
    let promote = serde_json::to_value(&a.actions[0]).unwrap();
    assert_eq!(promote["action"], "promote");
    assert_eq!(
        crate::contract::node_ready_label("prod-hsm"),
        "hsmsecrets.io/device.prod-hsm"
    );
}

#[test]
fn config_validation_names_the_setting() {
    let mut cfg = PlanConfig::default();
    assert_eq!(cfg.validate(), Ok(()));
    cfg.fencing.safety_margin = std::time::Duration::ZERO;
    let err = cfg.validate().unwrap_err();
    assert_eq!(err.kind(), "zero_margin");
    assert!(err.to_string().contains("--lease-safety-margin"));
    let cfg = PlanConfig {
        caught_up_within: 10,
        falls_behind_after: 5,
        ..PlanConfig::default()
    };
    assert_eq!(cfg.validate().unwrap_err().kind(), "hysteresis");
    let mut cfg = PlanConfig::default();
    cfg.fencing.lease_duration = std::time::Duration::ZERO;
    assert_eq!(cfg.validate().unwrap_err().kind(), "zero_lease");
}

#[test]
fn device_view_applies_spec_defaults() {
    let spec: crate::crd::MirroringSpec =
        serde_json::from_value(serde_json::json!({"policy": "ReadOnly", "primaryNode": "w1"}))
            .unwrap();
    let view = DeviceView::new("d", &spec);
    assert_eq!(view.failover_threshold, 3);
    assert!(!view.auto_failover);
    assert_eq!(view.sync_interval, std::time::Duration::from_secs(300));
    assert_eq!(view.preferred_primary.as_deref(), Some("w1"));
    assert!(view.is_mirrored());
}
