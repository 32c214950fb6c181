//! The agent's role facts kept on its own token (a private `CKO_DATA` object written
//! through [`SecretStore::save_agent_state`](crate::hsm::SecretStore::save_agent_state)),
//! so a restarted agent knows the epoch and role it held: it refuses assignments from
//! an older epoch, a mirror resumes following its primary, and its health shows the
//! epoch its data belongs to (the planner then sees history, not a blank node whose data
//! would all look like lost writes).
//!
//! What is never restored is the write lease: a restarted primary refuses writes until
//! the controller renews its lease or assigns it again. Lease renewals are not saved
//! (one per probe interval would wear a hardware token's storage); the duration granted
//! with the last assignment is.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Assignment, MirrorError, Peer};
use crate::crd::DeviceRole;

/// The saved facts. Holds no secret and no PIN.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentFacts {
    /// Format version of this encoding.
    pub f: u32,
    /// The node that saved them: a token moved to another node does not carry its roles.
    pub node: String,
    pub epoch: u64,
    pub role: DeviceRole,
    /// Writes stopped for good under `epoch` (planned switchover).
    pub fenced: bool,
    /// `[node, endpoint]` of the primary (a primary's own endpoint).
    pub primary: Option<[String; 2]>,
    /// `[node, endpoint]` of the mirrors an Active primary's writes wait for.
    pub mirrors: Vec<[String; 2]>,
    /// The write lease the last assignment granted, in milliseconds (not restored as
    /// time left: see the module documentation).
    pub lease_ms: u64,
    pub sync_interval_seconds: Option<u64>,
}

impl AgentFacts {
    pub const FORMAT: u32 = 1;

    /// The facts after `assignment` was accepted (and, for `fenced`, any fence since).
    pub fn new(node: &str, assignment: &Assignment, fenced: bool) -> Self {
        let pair = |p: &Peer| [p.node.clone(), p.endpoint.clone()];
        Self {
            f: Self::FORMAT,
            node: node.into(),
            epoch: assignment.epoch,
            role: assignment.role,
            fenced,
            primary: assignment.primary.as_ref().map(pair),
            mirrors: assignment.mirrors.iter().map(pair).collect(),
            lease_ms: assignment.lease.as_millis() as u64,
            sync_interval_seconds: assignment.sync_interval.map(|d| d.as_secs()),
        }
    }

    /// The assignment that puts a fresh agent back in this role and epoch.
    pub fn assignment(&self) -> Assignment {
        let peer = |[node, endpoint]: &[String; 2]| Peer {
            node: node.clone(),
            endpoint: endpoint.clone(),
        };
        Assignment {
            role: self.role,
            epoch: self.epoch,
            primary: self.primary.as_ref().map(peer),
            mirrors: self.mirrors.iter().map(peer).collect(),
            lease: Duration::from_millis(self.lease_ms),
            sync_interval: self.sync_interval_seconds.map(Duration::from_secs),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MirrorError> {
        let invalid = |why: String| MirrorError::InvalidArgument {
            field: "saved agent state",
            why,
        };
        let facts: Self =
            serde_json::from_slice(bytes).map_err(|e| invalid(format!("unreadable: {e}")))?;
        if facts.f != Self::FORMAT {
            return Err(invalid(format!(
                "format {} is not supported by this version (expects {})",
                facts.f,
                Self::FORMAT
            )));
        }
        Ok(facts)
    }

    /// Whether these facts describe `node` in a role worth restoring.
    pub fn applies_to(&self, node: &str) -> bool {
        self.node == node && self.epoch > 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn facts_round_trip_into_the_same_assignment() {
        let a = Assignment {
            role: DeviceRole::Primary,
            epoch: 4,
            primary: Some(Peer {
                node: "n1".into(),
                endpoint: "https://10.0.0.1:9443".into(),
            }),
            mirrors: vec![Peer {
                node: "n2".into(),
                endpoint: "https://10.0.0.2:9443".into(),
            }],
            lease: Duration::from_millis(15_000),
            sync_interval: Some(Duration::from_secs(300)),
        };
        let facts = AgentFacts::new("n1", &a, true);
        let back = AgentFacts::decode(&facts.encode()).unwrap();
        assert_eq!(back, facts);
        assert_eq!(back.assignment(), a);
        assert!(back.fenced && back.applies_to("n1"));
        assert!(
            !back.applies_to("n2"),
            "a token moved to n2 keeps n1's roles out"
        );
        let err = AgentFacts::decode(br#"{"f":9}"#).unwrap_err().to_string();
        assert!(err.contains("saved agent state"), "{err}");
    }
}
