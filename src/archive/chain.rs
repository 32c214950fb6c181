//! Object names and how objects follow one another (pure).
//!
//! ```text
//! <device>/<archive>/base/<epoch>-<last>-<millis>.hsmarc
//! <device>/<archive>/seg/<epoch>-<first>-<last>-<millis>.hsmarc
//! ```
//!
//! Numbers are zero-padded so names sort in order. The name only helps to plan: every
//! figure in it is checked against the object's authenticated header when it is opened,
//! and the chain itself is the `prev` digest each segment carries.

use super::ArchiveError;
use super::envelope::{ObjectHeader, ObjectKind};

pub const SUFFIX: &str = ".hsmarc";

/// Where a device's archive lives in the bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveRoot {
    pub device: String,
    pub archive: String,
}

impl ArchiveRoot {
    pub fn new(device: &str, archive: &str) -> Result<Self, ArchiveError> {
        for (what, value) in [("device", device), ("archive", archive)] {
            let ok = !value.is_empty()
                && value.len() <= 253
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
                && !value.starts_with('.');
            if !ok {
                return Err(ArchiveError::Config(format!(
                    "{what} {value:?} cannot name an archive: use letters, digits, '-', '.' \
                     and '_'"
                )));
            }
        }
        Ok(Self {
            device: device.into(),
            archive: archive.into(),
        })
    }

    pub fn prefix(&self) -> String {
        format!("{}/{}/", self.device, self.archive)
    }

    pub fn base_name(&self, epoch: u64, last: u64, millis: u64) -> String {
        format!(
            "{}base/{epoch:010}-{last:020}-{millis:013}{SUFFIX}",
            self.prefix()
        )
    }

    pub fn segment_name(&self, epoch: u64, first: u64, last: u64, millis: u64) -> String {
        format!(
            "{}seg/{epoch:010}-{first:020}-{last:020}-{millis:013}{SUFFIX}",
            self.prefix()
        )
    }

    /// Checks an opened object against the archive and the name it was stored under.
    pub fn check(&self, name: &str, header: &ObjectHeader) -> Result<(), ArchiveError> {
        if header.device != self.device || header.archive != self.archive {
            return Err(ArchiveError::Foreign {
                object: name.into(),
                found: format!("device {} archive {}", header.device, header.archive),
                expected: format!("device {} archive {}", self.device, self.archive),
            });
        }
        let listed = Entry::parse(self, name);
        let created = header
            .created
            .parse::<k8s_openapi::jiff::Timestamp>()
            .ok()
            .map(|t| t.as_millisecond());
        let matches = listed.is_some_and(|e| {
            e.kind == header.kind
                && e.epoch == header.epoch
                && e.first == header.first
                && e.last == header.last
                && created == Some(e.millis as i64)
        });
        if !matches {
            return Err(ArchiveError::Tampered {
                object: name.into(),
                detail: format!(
                    "its name does not match its authenticated header ({:?} epoch {} {}..={} \
                     written {})",
                    header.kind, header.epoch, header.first, header.last, header.created
                ),
            });
        }
        Ok(())
    }
}

/// An object as its name describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: ObjectKind,
    pub epoch: u64,
    /// 0 for a base.
    pub first: u64,
    pub last: u64,
    /// Unix milliseconds when it was written.
    pub millis: u64,
}

impl Entry {
    /// None for a name that is not one of this archive's objects.
    pub fn parse(root: &ArchiveRoot, name: &str) -> Option<Entry> {
        let rest = name.strip_prefix(&root.prefix())?;
        let (kind, rest) = match rest.split_once('/')? {
            ("base", rest) => (ObjectKind::Base, rest),
            ("seg", rest) => (ObjectKind::Segment, rest),
            _ => return None,
        };
        let numbers: Vec<u64> = rest
            .strip_suffix(SUFFIX)?
            .split('-')
            .map(|n| n.parse().ok())
            .collect::<Option<_>>()?;
        let (epoch, first, last, millis) = match (kind, numbers.as_slice()) {
            (ObjectKind::Base, [epoch, last, millis]) => (*epoch, 0, *last, *millis),
            (ObjectKind::Segment, [epoch, first, last, millis]) if first <= last => {
                (*epoch, *first, *last, *millis)
            }
            _ => return None,
        };
        Some(Entry {
            name: name.into(),
            kind,
            epoch,
            first,
            last,
            millis,
        })
    }
}

/// Where a restore should stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Latest,
    /// The newest point at or before this sequence.
    Sequence(u64),
    /// The newest point written at or before this time (unix milliseconds).
    Time(u64),
}

impl Target {
    fn admits(&self, entry: &Entry) -> bool {
        match *self {
            Target::Latest => true,
            Target::Sequence(n) => entry.last <= n,
            Target::Time(t) => entry.millis <= t,
        }
    }
}

/// The bases a restore to `target` may start from, best first: the newest epoch (after a
/// failover the new primary's history wins over writes its predecessor never replicated,
/// whatever their sequence numbers), then the newest point.
pub fn bases_for(entries: &[Entry], target: Target) -> Vec<&Entry> {
    let mut bases: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.kind == ObjectKind::Base && target.admits(e))
        .collect();
    bases.sort_by_key(|e| std::cmp::Reverse((e.epoch, e.last, e.millis)));
    bases
}

/// Segments that may follow an object covering changes through `covers` at `epoch`, for
/// `target`, best first (the same epoch, then later ones). The caller keeps the one whose
/// authenticated `prev` is the digest of the object it follows.
pub fn successors(entries: &[Entry], covers: u64, epoch: u64, target: Target) -> Vec<&Entry> {
    let mut next: Vec<&Entry> = entries
        .iter()
        .filter(|e| {
            e.kind == ObjectKind::Segment
                && e.first == covers.saturating_add(1)
                && e.epoch >= epoch
                && target.admits(e)
        })
        .collect();
    next.sort_by_key(|e| (e.epoch, e.millis));
    next
}

/// Segments of the archive beyond `covers` that the chain could not reach (a gap): named
/// in the report so a restore that stopped early says why.
pub fn unreachable_after(entries: &[Entry], covers: u64, target: Target) -> Vec<&Entry> {
    entries
        .iter()
        .filter(|e| e.kind == ObjectKind::Segment && e.last > covers && target.admits(e))
        .collect()
}

/// What retention may delete: every object older than the newest base written before
/// `now - window` (that base and everything after it stay, so every point inside the
/// window keeps its base and its chain). With no base that old, nothing is deleted.
pub fn prunable(entries: &[Entry], now_millis: u64, window_millis: u64) -> Vec<&Entry> {
    let horizon = now_millis.saturating_sub(window_millis);
    let Some(keep_from) = entries
        .iter()
        .filter(|e| e.kind == ObjectKind::Base && e.millis <= horizon)
        .map(|e| e.millis)
        .max()
    else {
        return Vec::new();
    };
    entries.iter().filter(|e| e.millis < keep_from).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn root() -> ArchiveRoot {
        ArchiveRoot::new("prod-hsm", "a1").unwrap()
    }

    fn entries(names: &[String]) -> Vec<Entry> {
        names
            .iter()
            .map(|n| Entry::parse(&root(), n).unwrap())
            .collect()
    }

    #[test]
    fn retention_keeps_the_base_every_point_in_the_window_needs() {
        let r = root();
        let all = entries(&[
            r.base_name(1, 10, 100),
            r.segment_name(1, 11, 20, 150),
            r.base_name(1, 20, 200),
            r.segment_name(1, 21, 30, 250),
            r.base_name(1, 30, 300),
        ]);
        // Window reaches back to 260: the base at 200 is the newest before it; it stays.
        let pruned: Vec<u64> = prunable(&all, 360, 100).iter().map(|e| e.millis).collect();
        assert_eq!(pruned, [100, 150]);
        // A window older than every base prunes nothing.
        assert!(prunable(&all, 360, 1000).is_empty());
        // Everything but the newest chain once the window is short.
        let pruned: Vec<u64> = prunable(&all, 301, 0).iter().map(|e| e.millis).collect();
        assert_eq!(pruned, [100, 150, 200, 250]);
    }

    #[test]
    fn names_parse_back_and_sort_in_order() {
        let r = root();
        let base = r.base_name(2, 40, 1_700_000_000_000);
        let seg = r.segment_name(2, 41, 45, 1_700_000_001_000);
        let e = Entry::parse(&r, &seg).unwrap();
        assert_eq!(
            (e.kind, e.epoch, e.first, e.last),
            (ObjectKind::Segment, 2, 41, 45)
        );
        assert_eq!(Entry::parse(&r, &base).unwrap().last, 40);
        assert!(r.segment_name(1, 9, 9, 0) < r.segment_name(1, 10, 10, 0));
        for bad in [
            "prod-hsm/a1/seg/1-2.hsmarc",
            "prod-hsm/a1/seg/1-5-4-0.hsmarc",
            "prod-hsm/other/base/1-2-3.hsmarc",
            "prod-hsm/a1/tmp/1-2-3.hsmarc",
            "prod-hsm/a1/base/1-2-3.txt",
        ] {
            assert!(Entry::parse(&r, bad).is_none(), "{bad}");
        }
        assert!(ArchiveRoot::new("../x", "a").is_err());
    }

    #[test]
    fn a_restore_starts_at_the_newest_base_the_target_admits() {
        let r = root();
        let all = entries(&[
            r.base_name(1, 10, 100),
            r.segment_name(1, 6, 20, 200),
            r.base_name(1, 30, 300),
            r.segment_name(1, 26, 40, 400),
            // A failover: epoch 2 starts a base of its own.
            r.base_name(2, 38, 500),
        ]);
        let pick = |t| bases_for(&all, t).first().map(|e| (e.epoch, e.last));
        assert_eq!(pick(Target::Latest), Some((2, 38)));
        // A newer epoch wins over a higher sequence of an older one (a failed primary's
        // unreplicated writes reuse numbers its successor hands out again).
        let forked = entries(&[r.base_name(1, 100, 100), r.base_name(2, 95, 200)]);
        assert_eq!(bases_for(&forked, Target::Latest)[0].epoch, 2);
        assert_eq!(pick(Target::Sequence(35)), Some((1, 30)));
        assert_eq!(pick(Target::Sequence(9)), None);
        assert_eq!(pick(Target::Time(250)), Some((1, 10)));
        let next = successors(&all, 25, 1, Target::Latest);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].last, 40);
        assert!(successors(&all, 40, 1, Target::Latest).is_empty());
        assert_eq!(unreachable_after(&all, 20, Target::Latest).len(), 1);
    }
}
