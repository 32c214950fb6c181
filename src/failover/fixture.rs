//! Test fixtures: a builder for one planning round, and a small simulated cluster whose
//! agents obey the plan's commands, for multi-round scenarios.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::crd::{
    DeviceNodeStatus, DevicePhase, DeviceRole, EpochRecord, HSMDeviceStatus, MirroringPolicy,
    NodeHealth,
};

use super::{
    Action, AgentReport, DeviceView, LeaseFacts, NodeError, NodeErrorKind, Observations, Plan,
    PlanConfig, Probe, ProbeResult, SwitchoverRequest, WriteLease, plan,
};

/// `secs` seconds after a fixed instant.
pub(crate) fn t(secs: i64) -> Timestamp {
    Timestamp::from_second(1_750_000_000 + secs).unwrap()
}

/// One round: spec, previous status, this round's probes, lease facts and time.
#[derive(Clone, Debug)]
pub(crate) struct DeviceFixture {
    pub view: DeviceView,
    pub status: HSMDeviceStatus,
    pub config: PlanConfig,
    pub now: Timestamp,
    pub lease: LeaseFacts,
    pub probes: Vec<Probe>,
    pub switchover: Option<SwitchoverRequest>,
}

impl DeviceFixture {
    /// Device `prod-hsm`, policy ReadOnly, autoFailover on, threshold 3, lease 15 s +
    /// 5 s margin, now = t(1000), primary's lease last confirmed at t(1000).
    pub fn new() -> Self {
        Self {
            view: DeviceView {
                name: "prod-hsm".into(),
                generation: Some(1),
                policy: MirroringPolicy::ReadOnly,
                auto_failover: true,
                preferred_primary: None,
                target_nodes: Vec::new(),
                failover_threshold: 3,
                sync_interval: Duration::from_secs(300),
            },
            status: HSMDeviceStatus::default(),
            config: PlanConfig::default(),
            now: t(1000),
            lease: LeaseFacts {
                confirmed_renewal: Some(t(1000)),
                leader_since: t(0),
            },
            probes: Vec::new(),
            switchover: None,
        }
    }

    // --- spec ---

    pub fn policy(mut self, policy: MirroringPolicy) -> Self {
        self.view.policy = policy;
        self
    }
    pub fn auto_failover(mut self, on: bool) -> Self {
        self.view.auto_failover = on;
        self
    }
    pub fn threshold(mut self, n: u32) -> Self {
        self.view.failover_threshold = n;
        self
    }
    pub fn preferred(mut self, node: &str) -> Self {
        self.view.preferred_primary = Some(node.into());
        self
    }
    pub fn targets(mut self, nodes: &[&str]) -> Self {
        self.view.target_nodes = nodes.iter().map(|n| n.to_string()).collect();
        self
    }

    // --- previous status ---

    /// `node` is primary (healthy, at `seq`) at the current epoch (1 unless set).
    pub fn primary(mut self, node: &str, seq: u64) -> Self {
        self.status.primary_node = Some(node.into());
        self.status.epoch = self.status.epoch.max(1);
        self.status.phase = DevicePhase::Ready;
        if self.status.epoch_history.is_empty() {
            self.status.epoch_history.push(EpochRecord {
                epoch: self.status.epoch,
                primary: node.into(),
                start_sequence: 0,
                since: Time(t(0)),
                reason: "Bootstrap".into(),
            });
        }
        self.node(node, DeviceRole::Primary, seq)
    }
    /// A caught-up, serving mirror.
    pub fn mirror(self, node: &str, seq: u64) -> Self {
        self.node(node, DeviceRole::ReadOnly, seq)
    }
    /// A healthy mirror still catching up.
    pub fn standby(self, node: &str, seq: u64) -> Self {
        self.node(node, DeviceRole::Standby, seq)
    }
    fn node(mut self, node: &str, role: DeviceRole, seq: u64) -> Self {
        self.status.nodes.retain(|n| n.node != node);
        self.status.nodes.push(DeviceNodeStatus {
            node: node.into(),
            role,
            health: NodeHealth::Healthy,
            token_serial: None,
            applied_sequence: seq,
            last_sync_time: Some(Time(t(990))),
            sync_lag_seconds: Some(0),
            consecutive_failures: 0,
            last_error: None,
            last_successful_probe: Some(Time(t(990))),
            lost_writes: None,
            outside_write_set: false,
        });
        self.status.nodes.sort_by(|a, b| a.node.cmp(&b.node));
        self
    }
    /// Current epoch `epoch` (history: the primary took it at sequence 0).
    pub fn epoch(mut self, epoch: u64) -> Self {
        self.status.epoch = epoch;
        for r in &mut self.status.epoch_history {
            r.epoch = epoch;
        }
        self
    }
    /// `node` already failed `n` consecutive checks (Unhealthy at the threshold).
    pub fn failing(mut self, node: &str, n: u32) -> Self {
        let threshold = self.view.failover_threshold;
        let entry = self.entry_mut(node);
        entry.consecutive_failures = n;
        entry.last_error = Some("Unreachable: connection refused".into());
        if n >= threshold {
            entry.health = NodeHealth::Unhealthy;
        }
        self
    }
    /// The stored status records `node` outside the Active primary's write set.
    pub fn outside_write_set(mut self, node: &str) -> Self {
        self.entry_mut(node).outside_write_set = true;
        self
    }
    fn entry_mut(&mut self, node: &str) -> &mut DeviceNodeStatus {
        self.status
            .nodes
            .iter_mut()
            .find(|n| n.node == node)
            .unwrap()
    }

    // --- this round ---

    pub fn at(mut self, secs: i64) -> Self {
        self.now = t(secs);
        self
    }
    pub fn renewed_at(mut self, secs: i64) -> Self {
        self.lease.confirmed_renewal = Some(t(secs));
        self
    }
    /// `node` answers with a usable token at `seq`, agreeing with the status.
    pub fn ok(self, node: &str, seq: u64) -> Self {
        self.report(node, seq, |_| {})
    }
    /// Like [`ok`](Self::ok), then `edit` the report.
    pub fn report(mut self, node: &str, seq: u64, edit: impl FnOnce(&mut AgentReport)) -> Self {
        let role = self
            .status
            .nodes
            .iter()
            .find(|n| n.node == node)
            .map(|n| n.role);
        let mut report = AgentReport {
            token_present: true,
            session_usable: true,
            token_serial: Some(format!("serial-{node}")),
            role,
            epoch: self.status.epoch,
            history_epoch: self.status.epoch,
            applied_sequence: seq,
            last_sync: Some(self.now),
            write_lease: if role == Some(DeviceRole::Primary) {
                WriteLease::Valid {
                    remaining: Duration::from_secs(10),
                }
            } else {
                WriteLease::NotHeld
            },
            error: None,
            write_set: None,
        };
        edit(&mut report);
        self.probes.push(Probe {
            node: node.into(),
            result: ProbeResult::Reported(report),
        });
        self
    }
    pub fn down(mut self, node: &str) -> Self {
        self.probes.push(Probe {
            node: node.into(),
            result: ProbeResult::Failed(NodeError::new(
                NodeErrorKind::Unreachable,
                "connection refused",
            )),
        });
        self
    }
    pub fn sync_error(self, node: &str, seq: u64) -> Self {
        self.report(node, seq, |r| {
            r.error = Some(NodeError::new(NodeErrorKind::SyncFailed, "pull timed out"));
        })
    }
    pub fn switchover(mut self, target: &str) -> Self {
        self.switchover = Some(SwitchoverRequest {
            target: target.into(),
            force: false,
        });
        self
    }

    pub fn observations(&self) -> Observations {
        Observations {
            probes: self.probes.clone(),
            lease: self.lease.clone(),
            switchover: self.switchover.clone(),
            now: self.now,
        }
    }

    pub fn plan(&self) -> Plan {
        self.config.validate().unwrap();
        plan(&self.view, &self.status, &self.observations(), &self.config)
    }

    /// The next round starts from `plan`'s status, with no probes yet.
    pub fn then(mut self, plan: &Plan) -> Self {
        self.status = plan.status.clone();
        self.probes.clear();
        self
    }
}

/// A simulated node agent that obeys the controller's commands.
#[derive(Clone, Debug)]
pub(crate) struct SimAgent {
    pub up: bool,
    pub role: Option<DeviceRole>,
    pub epoch: u64,
    pub history_epoch: u64,
    pub seq: u64,
    /// Controller time (seconds) of the lease's last renewal.
    pub renewed: Option<i64>,
    pub fenced: bool,
}

/// Several agents, the controller's lease bookkeeping and a clock: each `round` probes,
/// plans, stores the status and executes the commands, like the controller will.
pub(crate) struct Cluster {
    pub fx: DeviceFixture,
    pub agents: BTreeMap<String, SimAgent>,
    pub clock: i64,
    pub step: i64,
    /// Every plan so far.
    pub plans: Vec<Plan>,
}

impl Cluster {
    pub fn new(fx: DeviceFixture, nodes: &[&str]) -> Self {
        let agents = nodes
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    SimAgent {
                        up: true,
                        role: None,
                        epoch: 0,
                        history_epoch: 0,
                        seq: 0,
                        renewed: None,
                        fenced: false,
                    },
                )
            })
            .collect();
        let mut fx = fx;
        fx.lease.confirmed_renewal = None;
        Self {
            fx,
            agents,
            clock: 0,
            step: 5,
            plans: Vec::new(),
        }
    }

    pub fn agent(&mut self, node: &str) -> &mut SimAgent {
        self.agents.get_mut(node).unwrap()
    }

    fn lease_valid(&self, a: &SimAgent) -> bool {
        let lease = self.fx.config.fencing.lease_duration.as_secs() as i64;
        a.role == Some(DeviceRole::Primary)
            && !a.fenced
            && a.renewed.is_some_and(|r| self.clock < r + lease)
    }

    /// The primary accepts `n` writes from local clients if its own lease lets it — also
    /// when the controller cannot reach it (`up == false` models a partition); returns
    /// how many it took.
    pub fn write(&mut self, node: &str, n: u64) -> u64 {
        let a = self.agents[node].clone();
        if !self.lease_valid(&a) {
            return 0;
        }
        self.agent(node).seq += n;
        n
    }

    /// Every reachable mirror pulls everything from the reachable primary.
    pub fn sync_mirrors(&mut self) {
        let Some(primary) = self.fx.status.primary_node.clone() else {
            return;
        };
        let p = self.agents[&primary].clone();
        if !p.up || p.role != Some(DeviceRole::Primary) {
            return;
        }
        for (name, a) in self.agents.iter_mut() {
            if *name != primary && a.up && a.epoch == p.epoch && a.role != Some(DeviceRole::Primary)
            {
                // A resync replaces any divergent tail with the primary's history.
                a.seq = p.seq;
                a.history_epoch = p.epoch;
            }
        }
    }

    pub fn round(&mut self) -> Plan {
        self.fx.now = t(self.clock);
        self.fx.probes.clear();
        let probes: Vec<Probe> = self
            .agents
            .iter()
            .map(|(name, a)| Probe {
                node: name.clone(),
                result: if a.up {
                    ProbeResult::Reported(AgentReport {
                        token_present: true,
                        session_usable: true,
                        token_serial: None,
                        role: a.role,
                        epoch: a.epoch,
                        history_epoch: a.history_epoch,
                        applied_sequence: a.seq,
                        last_sync: Some(t(self.clock)),
                        write_lease: if a.fenced {
                            WriteLease::Fenced
                        } else if self.lease_valid(a) {
                            WriteLease::Valid {
                                remaining: Duration::from_secs(1),
                            }
                        } else if a.role == Some(DeviceRole::Primary) {
                            WriteLease::Lapsed
                        } else {
                            WriteLease::NotHeld
                        },
                        error: None,
                        write_set: None,
                    })
                } else {
                    ProbeResult::Failed(NodeError::new(NodeErrorKind::Timeout, "no answer"))
                },
            })
            .collect();
        self.fx.probes = probes;
        let plan = self.fx.plan();
        let primary_before = self.fx.status.primary_node.clone();
        self.fx.status = plan.status.clone();
        if self.fx.status.primary_node != primary_before {
            // New primary: nothing confirmed yet; the Promote below is sent now.
            self.fx.lease.confirmed_renewal = None;
            self.fx.lease.leader_since = t(self.clock);
        }
        let now = self.clock;
        for action in &plan.actions {
            match action {
                Action::Promote { node, epoch } if self.agents[node].up => {
                    let a = self.agent(node);
                    a.role = Some(DeviceRole::Primary);
                    a.epoch = *epoch;
                    a.history_epoch = *epoch;
                    a.renewed = Some(now);
                    a.fenced = false;
                    self.fx.lease.confirmed_renewal = Some(t(now));
                }
                Action::RenewLease { node, epoch, .. } if self.agents[node].up => {
                    let a = self.agent(node);
                    if a.epoch == *epoch && !a.fenced {
                        a.renewed = Some(now);
                        self.fx.lease.confirmed_renewal = Some(t(now));
                    }
                }
                Action::FenceWrites { node, .. } if self.agents[node].up => {
                    self.agent(node).fenced = true;
                }
                Action::Demote { node, epoch, .. } if self.agents[node].up => {
                    let a = self.agent(node);
                    a.role = Some(DeviceRole::Standby);
                    a.epoch = *epoch;
                    a.renewed = None;
                    a.fenced = false;
                }
                Action::SetMirror {
                    node, epoch, role, ..
                } if self.agents[node].up => {
                    let a = self.agent(node);
                    a.role = Some(*role);
                    a.epoch = *epoch;
                }
                _ => {}
            }
        }
        self.clock += self.step;
        self.plans.push(plan.clone());
        plan
    }

    /// Rounds until `done` holds (at most `max`), each followed by a mirror sync.
    pub fn run_until(&mut self, max: usize, done: impl Fn(&Plan) -> bool) -> Plan {
        for _ in 0..max {
            let plan = self.round();
            self.sync_mirrors();
            if done(&plan) {
                return plan;
            }
        }
        panic!(
            "condition not reached in {max} rounds; last status: {:#?}",
            self.fx.status
        );
    }

    /// Every node a primary (by plan) in order.
    pub fn primaries(&self) -> Vec<(u64, String)> {
        let mut out: Vec<(u64, String)> = Vec::new();
        for p in &self.plans {
            for a in &p.actions {
                if let Action::Promote { node, epoch } = a
                    && out.last().is_none_or(|(e, _)| e != epoch)
                {
                    out.push((*epoch, node.clone()));
                }
            }
        }
        out
    }
}
