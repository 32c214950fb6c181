//! What a full verification pass must do, from the two manifests. Pure.

use std::collections::HashMap;

use crate::hsm::{ManifestEntry, SecretPath};

/// The work of one full pass on a mirror.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PassPlan {
    /// Missing here or different from the primary: copy the primary's record. In the
    /// primary's version order, each with the version held here (0 = none).
    pub fetch: Vec<(SecretPath, u64)>,
    /// Held here, absent on the primary: remove. `true` marks a lost write (a version
    /// above the primary's fork point: the primary never had it).
    pub purge: Vec<(ManifestEntry, bool)>,
    /// Identical to the primary's entry: read back to prove the stored content is intact.
    pub verify: Vec<ManifestEntry>,
}

pub fn plan_full_pass(
    primary: &[ManifestEntry],
    local: &[ManifestEntry],
    primary_fork: u64,
) -> PassPlan {
    let mut held: HashMap<&SecretPath, &ManifestEntry> =
        local.iter().map(|e| (&e.path, e)).collect();
    let mut plan = PassPlan::default();
    let mut ordered: Vec<&ManifestEntry> = primary.iter().collect();
    ordered.sort_by_key(|e| e.version);
    for theirs in ordered {
        match held.remove(&theirs.path) {
            Some(ours) if ours.version == theirs.version && ours.checksum == theirs.checksum => {
                plan.verify.push(ours.clone());
            }
            Some(ours) => plan.fetch.push((theirs.path.clone(), ours.version)),
            None => plan.fetch.push((theirs.path.clone(), 0)),
        }
    }
    let mut extra: Vec<&ManifestEntry> = held.into_values().collect();
    extra.sort_by_key(|e| e.version);
    plan.purge = extra
        .into_iter()
        .map(|e| (e.clone(), e.version > primary_fork))
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hsm::Checksum;

    fn e(path: &str, version: u64, sum: u8, deleted: bool) -> ManifestEntry {
        ManifestEntry {
            path: path.parse().expect("path"),
            version,
            checksum: Checksum([sum; 32]),
            deleted,
        }
    }

    fn paths(v: &[(SecretPath, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(p, h)| (p.to_string(), *h)).collect()
    }

    #[test]
    fn table() {
        struct Case {
            name: &'static str,
            primary: Vec<ManifestEntry>,
            local: Vec<ManifestEntry>,
            fork: u64,
            fetch: Vec<(&'static str, u64)>,
            purge: Vec<(&'static str, bool)>,
            verify: Vec<&'static str>,
        }
        let cases = vec![
            Case {
                name: "empty mirror fetches everything in version order",
                primary: vec![e("a/y", 5, 1, false), e("a/x", 2, 1, false)],
                local: vec![],
                fork: 0,
                fetch: vec![("a/x", 0), ("a/y", 0)],
                purge: vec![],
                verify: vec![],
            },
            Case {
                name: "in sync: only verification",
                primary: vec![e("a/x", 2, 1, false), e("a/d", 3, 2, true)],
                local: vec![e("a/x", 2, 1, false), e("a/d", 3, 2, true)],
                fork: 0,
                fetch: vec![],
                purge: vec![],
                verify: vec!["a/x", "a/d"],
            },
            Case {
                name: "older, different checksum, tombstone on the primary",
                primary: vec![
                    e("a/x", 9, 1, false),
                    e("a/y", 4, 2, false),
                    e("a/z", 6, 3, true),
                ],
                local: vec![
                    e("a/x", 2, 1, false),
                    e("a/y", 4, 9, false),
                    e("a/z", 1, 3, false),
                ],
                fork: 0,
                fetch: vec![("a/y", 4), ("a/z", 1), ("a/x", 2)],
                purge: vec![],
                verify: vec![],
            },
            Case {
                name: "extra secrets: below the fork purged, above it lost",
                primary: vec![e("a/x", 2, 1, false)],
                local: vec![
                    e("a/x", 2, 1, false),
                    e("a/old", 1, 1, false),
                    e("a/new", 7, 1, false),
                    e("a/gone", 8, 0, true),
                ],
                fork: 5,
                fetch: vec![],
                purge: vec![("a/old", false), ("a/new", true), ("a/gone", true)],
                verify: vec!["a/x"],
            },
        ];
        for c in cases {
            let plan = plan_full_pass(&c.primary, &c.local, c.fork);
            let want: Vec<(String, u64)> =
                c.fetch.iter().map(|(p, h)| (p.to_string(), *h)).collect();
            assert_eq!(paths(&plan.fetch), want, "{}: fetch", c.name);
            let purge: Vec<(String, bool)> = plan
                .purge
                .iter()
                .map(|(e, lost)| (e.path.to_string(), *lost))
                .collect();
            let want: Vec<(String, bool)> =
                c.purge.iter().map(|(p, l)| (p.to_string(), *l)).collect();
            assert_eq!(purge, want, "{}: purge", c.name);
            let verify: Vec<String> = plan.verify.iter().map(|e| e.path.to_string()).collect();
            assert_eq!(verify, c.verify, "{}: verify", c.name);
        }
    }
}
