//! Per-node facts for one round: membership, debounced health, and whether a node's data
//! belongs to the current history.

use std::collections::BTreeSet;

use crate::crd::{DeviceNodeStatus, EpochRecord, HSMDevice, HSMDeviceStatus, NodeHealth};

use super::observe::{AgentReport, DeviceView, NodeError, NodeErrorKind, Probe, ProbeResult};

/// One member node as seen this round.
#[derive(Debug)]
pub(crate) struct NodeRound<'a> {
    pub name: String,
    pub prev: Option<&'a DeviceNodeStatus>,
    /// The agent's report, when it answered (even with an unusable token).
    pub report: Option<&'a AgentReport>,
    /// The device on the node worked this round.
    pub ok: bool,
    /// Why it did not.
    pub failure: Option<NodeError>,
    pub consecutive_failures: u32,
    /// Debounced: `Unhealthy` only at the failover threshold; `Unknown` until it ever
    /// reported a usable device.
    pub health: NodeHealth,
}

impl<'a> NodeRound<'a> {
    /// The usable report, when the device worked this round.
    pub fn usable(&self) -> Option<&'a AgentReport> {
        self.report.filter(|_| self.ok)
    }

    pub fn prev_health(&self) -> Option<NodeHealth> {
        self.prev.map(|p| p.health)
    }

    /// The applied sequence reported now, or the last one known.
    pub fn applied_sequence(&self) -> u64 {
        self.report
            .map(|r| r.applied_sequence)
            .or(self.prev.map(|p| p.applied_sequence))
            .unwrap_or(0)
    }
}

/// The nodes that make up the device this round, in name order.
///
/// Mirrored: `targetNodes`, the preferred and current primary, and — when `targetNodes`
/// is empty ("every node that has the token") — every node already listed in status or
/// whose agent reports the token. Policy `None`: only the primary (or, before one is
/// elected, the preferred node or any node reporting the token).
pub(crate) fn membership(
    view: &DeviceView,
    prev: &HSMDeviceStatus,
    probes: &[Probe],
) -> BTreeSet<String> {
    let reports_token =
        |p: &Probe| matches!(&p.result, ProbeResult::Reported(r) if r.token_present);
    let mut members = BTreeSet::new();
    members.extend(prev.primary_node.clone());
    if !view.is_mirrored() {
        if members.is_empty() {
            match &view.preferred_primary {
                Some(p) => {
                    members.insert(p.clone());
                }
                None => members.extend(
                    probes
                        .iter()
                        .filter(|p| reports_token(p))
                        .map(|p| p.node.clone()),
                ),
            }
        }
        return members;
    }
    members.extend(view.preferred_primary.clone());
    members.extend(view.target_nodes.iter().cloned());
    if view.target_nodes.is_empty() {
        members.extend(prev.nodes.iter().map(|n| n.node.clone()));
        members.extend(
            probes
                .iter()
                .filter(|p| reports_token(p))
                .map(|p| p.node.clone()),
        );
    }
    members
}

/// One node's facts for this round, health debounced against `threshold`.
pub(crate) fn observe<'a>(
    name: &str,
    prev: Option<&'a DeviceNodeStatus>,
    probe: Option<&'a Probe>,
    threshold: u32,
) -> NodeRound<'a> {
    let (report, failure) = match probe.map(|p| &p.result) {
        None => (
            None,
            Some(NodeError::new(
                NodeErrorKind::Unreachable,
                "not probed this round (no agent found for the node)",
            )),
        ),
        Some(ProbeResult::Failed(e)) => (None, Some(e.clone())),
        Some(ProbeResult::Reported(r)) => (Some(r), unusable_reason(r)),
    };
    let ok = failure.is_none();
    let ever_reported = prev.is_some_and(|p| p.last_successful_probe.is_some());
    let consecutive_failures = if ok {
        0
    } else {
        prev.map_or(0, |p| p.consecutive_failures).saturating_add(1)
    };
    let health = if ok {
        NodeHealth::Healthy
    } else if !ever_reported {
        NodeHealth::Unknown
    } else if consecutive_failures >= threshold {
        NodeHealth::Unhealthy
    } else {
        // Below the threshold a failure is only suspected: keep the last verdict.
        prev.map_or(NodeHealth::Unknown, |p| p.health)
    };
    NodeRound {
        name: name.to_string(),
        prev,
        report,
        ok,
        failure,
        consecutive_failures,
        health,
    }
}

fn unusable_reason(r: &AgentReport) -> Option<NodeError> {
    let detail = |default: &str| {
        r.error
            .as_ref()
            .map_or_else(|| default.to_string(), |e| e.detail.clone())
    };
    if !r.token_present {
        Some(NodeError::new(
            NodeErrorKind::TokenMissing,
            detail("the agent does not see the token"),
        ))
    } else if !r.session_usable {
        Some(NodeError::new(
            NodeErrorKind::SessionFailed,
            detail("no usable session on the token"),
        ))
    } else {
        None
    }
}

/// The last sequence that a node whose data belongs to `history_epoch` shares with the
/// current history: the smallest start of any later epoch. `None`: no later epoch, all of
/// its data is current history.
pub(crate) fn shared_until(history: &[EpochRecord], history_epoch: u64) -> Option<u64> {
    history
        .iter()
        .filter(|r| r.epoch > history_epoch)
        .map(|r| r.start_sequence)
        .min()
}

/// The changes a node holds that the current history does not: `(from, to)`.
pub(crate) fn diverged_range(history: &[EpochRecord], report: &AgentReport) -> Option<(u64, u64)> {
    let shared = shared_until(history, report.history_epoch)?;
    (report.applied_sequence > shared).then_some((shared + 1, report.applied_sequence))
}

/// The highest epoch anyone has seen; a new promotion must go above it.
pub(crate) fn highest_known_epoch(prev: &HSMDeviceStatus, probes: &[Probe]) -> u64 {
    probes
        .iter()
        .filter_map(|p| match &p.result {
            ProbeResult::Reported(r) => Some(r.epoch.max(r.history_epoch)),
            ProbeResult::Failed(_) => None,
        })
        .chain(prev.epoch_history.iter().map(|r| r.epoch))
        .fold(prev.epoch, u64::max)
}

pub(crate) fn probe_for<'a>(probes: &'a [Probe], node: &str) -> Option<&'a Probe> {
    // The last probe wins if the controller sent two for one node.
    probes.iter().rev().find(|p| p.node == node)
}

/// The nodes a device's spec and status name: where the controller probes first, before
/// `membership` decides with the probes in hand.
pub fn named_nodes(device: &HSMDevice) -> BTreeSet<String> {
    let mirroring = device.mirroring();
    let mut named = BTreeSet::new();
    named.extend(mirroring.primary_node.clone());
    named.extend(mirroring.target_nodes.iter().cloned());
    if let Some(status) = &device.status {
        named.extend(status.primary_node.clone());
        named.extend(status.nodes.iter().map(|n| n.node.clone()));
    }
    named.retain(|n| !n.is_empty());
    named
}

/// Whether the spec leaves membership to "every node that has the token": mirrored
/// with no targetNodes, or unmirrored with no node to start from.
pub fn membership_is_open(device: &HSMDevice) -> bool {
    let mirroring = device.mirroring();
    let view = DeviceView::of(device);
    if view.is_mirrored() {
        mirroring.target_nodes.is_empty()
    } else {
        mirroring.primary_node.is_none()
            && device
                .status
                .as_ref()
                .is_none_or(|s| s.primary_node.is_none())
    }
}
