//! A checker over a run's recorded history: what clients issued, what they were told,
//! what they read, and what each agent journaled as acknowledged
//! ([`crate::mirror::journal`]). Pure: it judges records, it runs nothing.
//!
//! What it proves for a run (README, "Guarantees under partition"):
//! - **One writer at a time.** The intervals in which agents acknowledged writes (per
//!   node and epoch) never overlap, and epochs only grow with time.
//! - **No silent loss.** Every write a client saw acknowledged is, after healing, in the
//!   final state, or (policy ReadOnly only) within a range the controller reported lost.
//!   Under policy Active nothing acknowledged may be lost at all.
//! - **Reads are real and do not go back.** A read returns a value some client issued for
//!   that secret; once a node served a secret, it keeps serving it, unless that write
//!   was reported lost or never acknowledged.

use std::collections::{BTreeMap, BTreeSet};

use crate::mirror::journal::Accepted;

/// A write a client issued: each to a secret of its own, so presence is exact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientWrite {
    pub client: String,
    pub path: String,
    pub value: String,
    pub issued_ns: u64,
    /// Set when the client was told it succeeded.
    pub acked: Option<Ack>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub node: String,
    pub version: u64,
    pub at_ns: u64,
}

/// A read a client made from one node's agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRead {
    pub client: String,
    pub node: String,
    pub path: String,
    /// `Some(None)`: the node answered that it does not hold the secret; `None`: no answer.
    pub answer: Option<Option<String>>,
    pub at_ns: u64,
}

/// Changes a node held that the new primary never received, as the controller reported
/// them (`from..=to` under `epoch`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostRange {
    pub node: String,
    pub epoch: u64,
    pub from: u64,
    pub to: u64,
}

#[derive(Clone, Debug, Default)]
pub struct History {
    pub writes: Vec<ClientWrite>,
    pub reads: Vec<ClientRead>,
    pub accepted: Vec<Accepted>,
    pub lost: Vec<LostRange>,
    /// After healing: each written secret as the primary holds it (absent: not there).
    pub final_state: BTreeMap<String, String>,
    /// When the fault was in force (monotonic ns).
    pub fault: (u64, u64),
    /// The device's policy is Active: a reported loss excuses no acknowledged write.
    pub active: bool,
}

/// The verdict, and the figures behind it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub violations: Vec<String>,
    pub acknowledged: usize,
    /// Acknowledged, absent at the end, and reported lost.
    pub reported_lost: usize,
    /// Reads answered (found or not found) while the fault was in force.
    pub reads_during_fault: usize,
    /// The (node, epoch) groups that acknowledged writes, in time order.
    pub writers: Vec<(String, u64)>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

pub fn check(history: &History) -> Verdict {
    let mut verdict = Verdict {
        writers: Vec::new(),
        ..Verdict::default()
    };
    one_writer_at_a_time(history, &mut verdict);
    no_silent_loss(history, &mut verdict);
    reads_are_real(history, &mut verdict);
    verdict
}

fn one_writer_at_a_time(history: &History, verdict: &mut Verdict) {
    let mut groups: BTreeMap<(String, u64), (u64, u64)> = BTreeMap::new();
    for a in &history.accepted {
        let span = groups
            .entry((a.node.clone(), a.epoch))
            .or_insert((a.mono_ns, a.mono_ns));
        span.0 = span.0.min(a.mono_ns);
        span.1 = span.1.max(a.mono_ns);
    }
    let mut spans: Vec<_> = groups.into_iter().collect();
    spans.sort_by_key(|(_, (start, _))| *start);
    for (i, ((node, epoch), (start, end))) in spans.iter().enumerate() {
        for ((other, other_epoch), (other_start, other_end)) in &spans[i + 1..] {
            if other_start <= end {
                verdict.violations.push(format!(
                    "{node} (epoch {epoch}) acknowledged writes from {start} to {end} ns while \
                     {other} (epoch {other_epoch}) did from {other_start} to {other_end} ns"
                ));
            }
            if other_epoch <= epoch {
                verdict.violations.push(format!(
                    "{other} acknowledged under epoch {other_epoch} after {node} had under \
                     epoch {epoch}: epochs went back"
                ));
            }
        }
    }
    verdict.writers = spans.into_iter().map(|(group, _)| group).collect();
}

fn no_silent_loss(history: &History, verdict: &mut Verdict) {
    let journaled: BTreeSet<(&str, &str, u64)> = history
        .accepted
        .iter()
        .map(|a| (a.node.as_str(), a.path.as_str(), a.version))
        .collect();
    for write in &history.writes {
        let Some(ack) = &write.acked else { continue };
        verdict.acknowledged += 1;
        if !journaled.contains(&(ack.node.as_str(), write.path.as_str(), ack.version)) {
            verdict.violations.push(format!(
                "{} = {} was acknowledged to {} by {} at version {} but {} never journaled it",
                write.path, write.value, write.client, ack.node, ack.version, ack.node
            ));
        }
        if history.final_state.get(&write.path) == Some(&write.value) {
            continue;
        }
        let reported = is_reported_lost(history, &ack.node, ack.version);
        if reported {
            verdict.reported_lost += 1;
            if !history.active {
                continue;
            }
        }
        verdict.violations.push(format!(
            "{} = {} (acknowledged by {} at version {}) is gone after healing {} (final: {:?})",
            write.path,
            write.value,
            ack.node,
            ack.version,
            if reported {
                "under policy Active, where nothing acknowledged may be lost"
            } else {
                "and was never reported lost"
            },
            history.final_state.get(&write.path)
        ));
    }
}

fn is_reported_lost(history: &History, node: &str, version: u64) -> bool {
    history
        .lost
        .iter()
        .any(|r| r.node == node && (r.from..=r.to).contains(&version))
}

fn reads_are_real(history: &History, verdict: &mut Verdict) {
    let issued: BTreeMap<(&str, &str), &ClientWrite> = history
        .writes
        .iter()
        .map(|w| ((w.path.as_str(), w.value.as_str()), w))
        .collect();
    let by_path: BTreeMap<&str, &ClientWrite> = history
        .writes
        .iter()
        .map(|w| (w.path.as_str(), w))
        .collect();
    let (from, to) = history.fault;
    // (client, node, path) that has served the secret.
    let mut served: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    let mut reads: Vec<&ClientRead> = history.reads.iter().collect();
    reads.sort_by_key(|r| r.at_ns);
    for read in reads {
        let Some(answer) = &read.answer else { continue };
        if (from..=to).contains(&read.at_ns) {
            verdict.reads_during_fault += 1;
        }
        let key = (read.client.as_str(), read.node.as_str(), read.path.as_str());
        match answer {
            Some(value) => {
                if !issued.contains_key(&(read.path.as_str(), value.as_str())) {
                    verdict.violations.push(format!(
                        "{} read {} = {value:?} from {}: no client ever wrote that",
                        read.client, read.path, read.node
                    ));
                }
                served.insert(key);
            }
            None if served.contains(&key) => {
                // Gone again: allowed only for a write that was never acknowledged or
                // was reported lost.
                let excused = by_path.get(read.path.as_str()).is_none_or(|w| {
                    w.acked
                        .as_ref()
                        .is_none_or(|ack| is_reported_lost(history, &ack.node, ack.version))
                });
                if !excused {
                    verdict.violations.push(format!(
                        "{} read {} from {} after it had served it, and it was gone: reads went \
                         back in time",
                        read.client, read.path, read.node
                    ));
                }
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(node: &str, epoch: u64, path: &str, version: u64, at: u64) -> Accepted {
        Accepted {
            node: node.into(),
            epoch,
            path: path.into(),
            version,
            mono_ns: at,
        }
    }

    fn write(path: &str, value: &str, ack: Option<(&str, u64)>) -> ClientWrite {
        ClientWrite {
            client: "c1".into(),
            path: path.into(),
            value: value.into(),
            issued_ns: 0,
            acked: ack.map(|(node, version)| Ack {
                node: node.into(),
                version,
                at_ns: 0,
            }),
        }
    }

    fn clean() -> History {
        History {
            writes: vec![
                write("p1", "1", Some(("w1", 5))),
                write("p2", "2", Some(("w2", 7))),
            ],
            accepted: vec![
                accepted("w1", 1, "p1", 5, 100),
                accepted("w2", 2, "p2", 7, 300),
            ],
            final_state: [("p1".into(), "1".into()), ("p2".into(), "2".into())].into(),
            ..History::default()
        }
    }

    #[test]
    fn a_clean_failover_passes() {
        let verdict = check(&clean());
        assert!(verdict.ok(), "{verdict:?}");
        assert_eq!(verdict.acknowledged, 2);
        assert_eq!(
            verdict.writers,
            vec![("w1".to_string(), 1), ("w2".to_string(), 2)]
        );
    }

    #[test]
    fn two_writers_at_once_are_found() {
        let mut history = clean();
        history.accepted.push(accepted("w1", 1, "p3", 6, 400));
        let verdict = check(&history);
        assert!(
            verdict.violations[0].contains("w1 (epoch 1) acknowledged writes from 100 to 400"),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_missing_write_is_a_violation_unless_reported_lost() {
        let mut history = clean();
        history.final_state.remove("p1");
        assert!(check(&history).violations[0].contains("never reported lost"));
        history.lost.push(LostRange {
            node: "w1".into(),
            epoch: 1,
            from: 5,
            to: 6,
        });
        let verdict = check(&history);
        assert!(verdict.ok(), "{verdict:?}");
        assert_eq!(verdict.reported_lost, 1);
        // Under policy Active an acknowledged write is never lost, reported or not.
        history.active = true;
        assert!(!check(&history).ok());
    }

    #[test]
    fn reads_of_values_never_written_or_going_back_are_found() {
        let mut history = clean();
        let read = |answer: Option<&str>, at| ClientRead {
            client: "r".into(),
            node: "w3".into(),
            path: "p1".into(),
            answer: Some(answer.map(String::from)),
            at_ns: at,
        };
        history.fault = (0, 1000);
        history.reads = vec![read(None, 10), read(Some("1"), 20), read(None, 30)];
        let verdict = check(&history);
        assert_eq!(verdict.reads_during_fault, 3);
        assert!(verdict.violations[0].contains("went back"), "{verdict:?}");
        history.reads = vec![read(Some("forged"), 20)];
        assert!(check(&history).violations[0].contains("no client ever wrote"));
    }

    #[test]
    fn an_acknowledgement_no_agent_journaled_is_found() {
        let mut history = clean();
        history.accepted.remove(0);
        assert!(check(&history).violations[0].contains("never journaled"));
    }
}
