//! Between the wire messages and the store's types. Decoding validates names and shapes
//! but never checksums: the caller decides what a record that fails verification means.

use std::time::{Duration, SystemTime};

use crate::archive::plan::{
    ArchiveAsk, ArchiveReport, DrillResult, RestoreAsk, RestoreResult, SiteReport,
};
use crate::archive::{ArchiveRequest, BackupConfig, BucketRef, FollowConfig, SiteConfig};
use crate::crd::{DeviceRole, SiteRole};
use crate::hsm::{Body, Checksum, Expect, ManifestEntry, Record, SecretData, SecretPath};
use crate::mirror::feed::{Assigned, Changes, ChangesAsk, FetchAsk, Fetched, Manifest, Push};
use crate::mirror::health::{
    AgentHealth, ClockReading, Fault, OutsideMirror, ReplicationStatus, SyncStatus,
};
use crate::mirror::sync::{FullPassReport, LostWrite};
use crate::mirror::{Assignment, LeaseDeadline, Peer, Served, WriteOutcome};

use super::pb;
use crate::mirror::MirrorError;

pub(crate) fn record_to_pb(record: &Record) -> pb::Record {
    let data = match &record.body {
        Body::Live(data) => data
            .iter()
            .map(|(k, v)| pb::KeyValue {
                key: k.to_string(),
                value: v.to_vec(),
            })
            .collect(),
        Body::Deleted => Vec::new(),
    };
    pb::Record {
        path: record.path.to_string(),
        version: record.version,
        checksum: record.checksum.0.to_vec(),
        deleted: record.is_deleted(),
        data,
    }
}

/// Decodes a record as sent; `from` names the sender for the error.
pub(crate) fn record_from_pb(from: &str, record: pb::Record) -> Result<Record, MirrorError> {
    let bad = |why: String| MirrorError::Protocol {
        node: from.into(),
        what: "record",
        why,
    };
    let path: SecretPath = record.path.parse().map_err(|e| bad(format!("path: {e}")))?;
    let checksum = checksum_from(&record.checksum)
        .ok_or_else(|| bad(format!("{path}: checksum is not 32 bytes")))?;
    let body = if record.deleted {
        if !record.data.is_empty() {
            return Err(bad(format!("{path}: a tombstone carries data")));
        }
        Body::Deleted
    } else {
        Body::Live(data_from_pb(record.data).map_err(|e| bad(format!("{path}: {e}")))?)
    };
    Ok(Record {
        path,
        version: record.version,
        checksum,
        body,
    })
}

/// Keys and values as sent by a client; the error names the offending key.
pub(crate) fn data_from_pb(pairs: Vec<pb::KeyValue>) -> Result<SecretData, crate::hsm::StoreError> {
    let mut data = SecretData::new();
    let count = pairs.len();
    for kv in pairs {
        if data.get(&kv.key).is_some() {
            return Err(crate::hsm::StoreError::InvalidName {
                what: "key",
                name: kv.key,
                why: "is given twice".into(),
            });
        }
        data.insert(&kv.key, kv.value)?;
    }
    debug_assert_eq!(data.len(), count);
    Ok(data)
}

pub(crate) fn checksum_from(bytes: &[u8]) -> Option<Checksum> {
    Some(Checksum(bytes.try_into().ok()?))
}

pub(crate) fn entry_to_pb(e: &ManifestEntry) -> pb::ManifestEntry {
    pb::ManifestEntry {
        path: e.path.to_string(),
        version: e.version,
        checksum: e.checksum.0.to_vec(),
        deleted: e.deleted,
    }
}

pub(crate) fn entry_from_pb(
    from: &str,
    e: pb::ManifestEntry,
) -> Result<ManifestEntry, MirrorError> {
    let bad = |why: String| MirrorError::Protocol {
        node: from.into(),
        what: "manifest entry",
        why,
    };
    let path: SecretPath = e.path.parse().map_err(|err| bad(format!("path: {err}")))?;
    let checksum = checksum_from(&e.checksum)
        .ok_or_else(|| bad(format!("{path}: checksum is not 32 bytes")))?;
    Ok(ManifestEntry {
        path,
        version: e.version,
        checksum,
        deleted: e.deleted,
    })
}

pub(crate) fn expect_from_pb(expect: Option<pb::Expect>) -> Expect {
    match expect.and_then(|e| e.condition) {
        None | Some(pb::expect::Condition::Any(_)) => Expect::Any,
        Some(pb::expect::Condition::Absent(_)) => Expect::Absent,
        Some(pb::expect::Condition::Version(v)) => Expect::Version(v),
    }
}

pub fn expect_to_pb(expect: Expect) -> pb::Expect {
    let condition = match expect {
        Expect::Any => pb::expect::Condition::Any(true),
        Expect::Absent => pb::expect::Condition::Absent(true),
        Expect::Version(v) => pb::expect::Condition::Version(v),
    };
    pb::Expect {
        condition: Some(condition),
    }
}

pub fn role_to_pb(role: DeviceRole) -> pb::Role {
    match role {
        DeviceRole::Primary => pb::Role::Primary,
        DeviceRole::ReadOnly => pb::Role::ReadOnly,
        DeviceRole::Standby => pb::Role::Standby,
    }
}

pub fn role_from_pb(role: i32) -> Option<DeviceRole> {
    match pb::Role::try_from(role).ok()? {
        pb::Role::Primary => Some(DeviceRole::Primary),
        pb::Role::ReadOnly => Some(DeviceRole::ReadOnly),
        pb::Role::Standby => Some(DeviceRole::Standby),
        pb::Role::Unspecified => None,
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// 0 on the wire means "never".
fn time_from_unix_ms(ms: i64) -> Option<SystemTime> {
    let ms = u64::try_from(ms).ok().filter(|ms| *ms > 0)?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// An empty string on the wire means "none".
fn some(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn fault_to_pb(fault: Option<&Fault>) -> (String, String) {
    fault.map_or_else(Default::default, |f| (f.kind.clone(), f.message.clone()))
}

fn fault_from_pb(kind: String, message: String) -> Option<Fault> {
    (!message.is_empty() || !kind.is_empty()).then_some(Fault { kind, message })
}

pub(crate) fn health_to_pb(h: &AgentHealth) -> pb::HealthResponse {
    let (token_error_kind, token_error) = fault_to_pb(h.token_error.as_ref());
    pb::HealthResponse {
        node: h.node.clone(),
        device: h.device.clone(),
        token_label: h.token_label.clone(),
        token_present: h.token_present,
        session_usable: h.session_usable,
        token_serial: h.token_serial.clone().unwrap_or_default(),
        token_error,
        token_error_kind,
        role: h.role.map_or(pb::Role::Unspecified, role_to_pb) as i32,
        epoch: h.epoch,
        applied_sequence: h.applied_sequence,
        write_lease_remaining_ms: h.write_lease_remaining_ms,
        primary_known: h.primary.is_some(),
        primary_node: h
            .primary
            .as_ref()
            .map(|p| p.node.clone())
            .unwrap_or_default(),
        primary_endpoint: h
            .primary
            .as_ref()
            .map(|p| p.endpoint.clone())
            .unwrap_or_default(),
        fenced: h.fenced,
        clock: h.clock.map(|c| pb::AgentClock {
            id: c.id,
            now_ms: c.now_ms,
        }),
        sync: h.sync.as_ref().map(sync_to_pb),
        replication: h.replication.as_ref().map(|r| pb::ReplicationStatus {
            in_sync: r.in_sync.clone(),
            dropping: r.dropping.iter().map(outside_to_pb).collect(),
            dropped: r.dropped.iter().map(outside_to_pb).collect(),
        }),
    }
}

/// Decodes a Health answer; `from` names the agent asked, for the error.
pub(crate) fn health_from_pb(
    from: &str,
    h: pb::HealthResponse,
) -> Result<AgentHealth, MirrorError> {
    let primary = h.primary_known.then_some(Peer {
        node: h.primary_node,
        endpoint: h.primary_endpoint,
    });
    Ok(AgentHealth {
        node: h.node,
        device: h.device,
        token_label: h.token_label,
        token_present: h.token_present,
        session_usable: h.session_usable,
        token_serial: some(h.token_serial),
        token_error: fault_from_pb(h.token_error_kind, h.token_error),
        role: role_from_pb(h.role),
        epoch: h.epoch,
        applied_sequence: h.applied_sequence,
        write_lease_remaining_ms: h.write_lease_remaining_ms,
        primary,
        fenced: h.fenced,
        clock: h.clock.map(|c| ClockReading {
            id: c.id,
            now_ms: c.now_ms,
        }),
        sync: h.sync.map(|s| sync_from_pb(from, s)).transpose()?,
        replication: h.replication.map(|r| ReplicationStatus {
            in_sync: r.in_sync,
            dropping: r.dropping.into_iter().map(outside_from_pb).collect(),
            dropped: r.dropped.into_iter().map(outside_from_pb).collect(),
        }),
    })
}

fn outside_to_pb(m: &OutsideMirror) -> pb::DroppedMirror {
    pb::DroppedMirror {
        node: m.node.clone(),
        reason: m.reason.clone(),
        since_unix_ms: unix_ms(m.since),
    }
}

fn outside_from_pb(m: pb::DroppedMirror) -> OutsideMirror {
    OutsideMirror {
        node: m.node,
        reason: m.reason,
        since: time_from_unix_ms(m.since_unix_ms).unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

fn sync_to_pb(s: &SyncStatus) -> pb::SyncStatus {
    let (last_error_kind, last_error) = fault_to_pb(s.last_error.as_ref());
    pb::SyncStatus {
        last_sync_unix_ms: s.last_sync.map_or(0, unix_ms),
        primary_sequence: s.primary_sequence,
        checksum_failures: s.checksum_failures,
        records_applied: s.records_applied,
        last_error,
        last_error_kind,
        consecutive_failures: s.consecutive_failures,
        last_full_pass: s.last_full_pass.as_ref().map(full_pass_to_pb),
        lost_writes: s.lost_writes.iter().map(lost_write_to_pb).collect(),
    }
}

fn sync_from_pb(from: &str, s: pb::SyncStatus) -> Result<SyncStatus, MirrorError> {
    Ok(SyncStatus {
        last_sync: time_from_unix_ms(s.last_sync_unix_ms),
        primary_sequence: s.primary_sequence,
        checksum_failures: s.checksum_failures,
        records_applied: s.records_applied,
        last_error: fault_from_pb(s.last_error_kind, s.last_error),
        consecutive_failures: s.consecutive_failures,
        last_full_pass: s
            .last_full_pass
            .map(|p| full_pass_from_pb(from, p))
            .transpose()?,
        lost_writes: lost_writes_from_pb(from, s.lost_writes)?,
    })
}

fn full_pass_to_pb(p: &FullPassReport) -> pb::FullPassReport {
    pb::FullPassReport {
        finished_unix_ms: p.finished.map_or(0, unix_ms),
        duration_ms: u64::try_from(p.duration.as_millis()).unwrap_or(u64::MAX),
        checked: p.checked,
        fetched: p.fetched,
        purged: p.purged,
        repaired: p.repaired,
        checksum_failures: p.checksum_failures,
        lost_writes: p.lost_writes.iter().map(lost_write_to_pb).collect(),
        sequence: p.sequence,
        rejoin: p.rejoin,
        unreadable_on_primary: p.unreadable_on_primary,
        epoch: p.epoch,
    }
}

fn full_pass_from_pb(from: &str, p: pb::FullPassReport) -> Result<FullPassReport, MirrorError> {
    Ok(FullPassReport {
        finished: time_from_unix_ms(p.finished_unix_ms),
        duration: Duration::from_millis(p.duration_ms),
        checked: p.checked,
        fetched: p.fetched,
        purged: p.purged,
        repaired: p.repaired,
        checksum_failures: p.checksum_failures,
        unreadable_on_primary: p.unreadable_on_primary,
        lost_writes: lost_writes_from_pb(from, p.lost_writes)?,
        sequence: p.sequence,
        rejoin: p.rejoin,
        epoch: p.epoch,
    })
}

fn lost_write_to_pb(w: &LostWrite) -> pb::LostWrite {
    pb::LostWrite {
        path: w.path.to_string(),
        version: w.version,
        deleted: w.deleted,
    }
}

fn lost_writes_from_pb(
    from: &str,
    writes: Vec<pb::LostWrite>,
) -> Result<Vec<LostWrite>, MirrorError> {
    writes
        .into_iter()
        .map(|w| {
            let path: SecretPath = w.path.parse().map_err(|e| MirrorError::Protocol {
                node: from.into(),
                what: "lost write",
                why: format!("path: {e}"),
            })?;
            Ok(LostWrite {
                path,
                version: w.version,
                deleted: w.deleted,
            })
        })
        .collect()
}

/// Turns a decoding error of a request into the caller's invalid argument `field`.
fn invalid(field: &'static str) -> impl Fn(MirrorError) -> MirrorError {
    move |e| match e {
        MirrorError::Protocol { why, .. } => MirrorError::InvalidArgument { field, why },
        other => other,
    }
}

fn paths_from_pb(
    from: &str,
    what: &'static str,
    raw: Vec<String>,
) -> Result<Vec<SecretPath>, MirrorError> {
    raw.into_iter()
        .map(|p| {
            p.parse()
                .map_err(|e: crate::hsm::StoreError| MirrorError::Protocol {
                    node: from.into(),
                    what,
                    why: e.to_string(),
                })
        })
        .collect()
}

fn paths_to_pb(paths: &[SecretPath]) -> Vec<String> {
    paths.iter().map(ToString::to_string).collect()
}

pub(crate) fn manifest_to_pb(m: &Manifest) -> pb::ManifestResponse {
    pb::ManifestResponse {
        sequence: m.sequence,
        epoch: m.epoch,
        fork_sequence: m.fork_sequence,
        entries: m.entries.iter().map(entry_to_pb).collect(),
        node: m.node.clone(),
    }
}

pub(crate) fn manifest_from_pb(
    from: &str,
    m: pb::ManifestResponse,
) -> Result<Manifest, MirrorError> {
    Ok(Manifest {
        node: m.node,
        sequence: m.sequence,
        epoch: m.epoch,
        fork_sequence: m.fork_sequence,
        entries: m
            .entries
            .into_iter()
            .map(|e| entry_from_pb(from, e))
            .collect::<Result<_, _>>()?,
    })
}

pub(crate) fn changes_ask_to_pb(a: &ChangesAsk) -> pb::ChangesRequest {
    pb::ChangesRequest {
        since: a.since,
        limit: a.limit,
        node: a.node.clone(),
        verified_epoch: a.verified_epoch,
    }
}

pub(crate) fn changes_ask_from_pb(r: pb::ChangesRequest) -> ChangesAsk {
    ChangesAsk {
        since: r.since,
        limit: r.limit,
        node: r.node,
        verified_epoch: r.verified_epoch,
    }
}

pub(crate) fn changes_to_pb(c: &Changes) -> pb::ChangesResponse {
    pb::ChangesResponse {
        records: c.records.iter().map(record_to_pb).collect(),
        through: c.through,
        sequence: c.sequence,
        epoch: c.epoch,
        more: c.more,
    }
}

pub(crate) fn changes_from_pb(from: &str, c: pb::ChangesResponse) -> Result<Changes, MirrorError> {
    Ok(Changes {
        records: c
            .records
            .into_iter()
            .map(|r| record_from_pb(from, r))
            .collect::<Result<_, _>>()?,
        through: c.through,
        sequence: c.sequence,
        epoch: c.epoch,
        more: c.more,
    })
}

pub(crate) fn fetch_ask_to_pb(a: &FetchAsk) -> pb::FetchRequest {
    pb::FetchRequest {
        paths: paths_to_pb(&a.paths),
        held: a.held.iter().map(entry_to_pb).collect(),
    }
}

/// Decodes a Fetch request, naming the field that is wrong.
pub(crate) fn fetch_ask_from_pb(r: pb::FetchRequest) -> Result<FetchAsk, MirrorError> {
    Ok(FetchAsk {
        paths: paths_from_pb("the caller", "path", r.paths).map_err(invalid("paths"))?,
        held: r
            .held
            .into_iter()
            .map(|e| entry_from_pb("the caller", e).map_err(invalid("held")))
            .collect::<Result<_, _>>()?,
    })
}

pub(crate) fn fetched_to_pb(f: &Fetched) -> pb::FetchResponse {
    pb::FetchResponse {
        covered: f.covered,
        records: f.records.iter().map(record_to_pb).collect(),
        missing: paths_to_pb(&f.missing),
        unreadable: paths_to_pb(&f.unreadable),
        lost: paths_to_pb(&f.lost),
    }
}

pub(crate) fn fetched_from_pb(from: &str, f: pb::FetchResponse) -> Result<Fetched, MirrorError> {
    Ok(Fetched {
        covered: f.covered,
        records: f
            .records
            .into_iter()
            .map(|r| record_from_pb(from, r))
            .collect::<Result<_, _>>()?,
        missing: paths_from_pb(from, "missing path", f.missing)?,
        unreadable: paths_from_pb(from, "unreadable path", f.unreadable)?,
        lost: paths_from_pb(from, "lost path", f.lost)?,
    })
}

pub(crate) fn push_to_pb(p: &Push) -> pb::ReplicateRequest {
    pb::ReplicateRequest {
        record: Some(record_to_pb(&p.record)),
        epoch: p.epoch,
        primary_node: p.primary_node.clone(),
    }
}

/// Decodes a push, naming the field that is wrong.
pub fn push_from_pb(r: pb::ReplicateRequest) -> Result<Push, MirrorError> {
    let wire = r.record.ok_or(MirrorError::InvalidArgument {
        field: "record",
        why: "is required".into(),
    })?;
    Ok(Push {
        record: record_from_pb(&r.primary_node, wire).map_err(invalid("record"))?,
        epoch: r.epoch,
        primary_node: r.primary_node,
    })
}

pub(crate) fn assigned_to_pb(a: Assigned) -> pb::AssignRoleResponse {
    pb::AssignRoleResponse {
        role: role_to_pb(a.role) as i32,
        epoch: a.epoch,
        applied_sequence: a.applied_sequence,
    }
}

/// An assignment as the controller sends it; `deadline` bounds a primary's lease on the
/// agent's clock.
pub(crate) fn assignment_to_pb(
    a: &Assignment,
    deadline: Option<LeaseDeadline>,
) -> pb::AssignRoleRequest {
    pb::AssignRoleRequest {
        role: role_to_pb(a.role) as i32,
        epoch: a.epoch,
        primary_node: a
            .primary
            .as_ref()
            .map(|p| p.node.clone())
            .unwrap_or_default(),
        primary_endpoint: a
            .primary
            .as_ref()
            .map(|p| p.endpoint.clone())
            .unwrap_or_default(),
        mirrors: a
            .mirrors
            .iter()
            .map(|p| pb::MirrorTarget {
                node: p.node.clone(),
                endpoint: p.endpoint.clone(),
            })
            .collect(),
        lease_duration_ms: u64::try_from(a.lease.as_millis()).unwrap_or(u64::MAX),
        sync_interval_seconds: a
            .sync_interval
            .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
        lease_deadline: deadline.map(lease_deadline_to_pb),
    }
}

pub(crate) fn lease_deadline_to_pb(d: LeaseDeadline) -> pb::LeaseDeadline {
    pb::LeaseDeadline {
        clock_id: d.clock_id,
        until_ms: d.until_ms,
    }
}

pub(crate) fn lease_deadline_from_pb(d: pb::LeaseDeadline) -> LeaseDeadline {
    LeaseDeadline {
        clock_id: d.clock_id,
        until_ms: d.until_ms,
    }
}

pub(crate) fn write_to_pb(outcome: WriteOutcome) -> pb::WriteResponse {
    pb::WriteResponse {
        version: outcome.version,
        replicated_to: outcome.replicated_to,
        // Kept on the wire for older clients: an acknowledged write drops no mirror.
        dropped: Vec::new(),
    }
}

pub(crate) fn write_from_pb(w: pb::WriteResponse) -> WriteOutcome {
    WriteOutcome {
        version: w.version,
        replicated_to: w.replicated_to,
    }
}

pub(crate) fn served_to_pb(s: &Served) -> pb::GetResponse {
    pb::GetResponse {
        record: Some(record_to_pb(&s.record)),
        node: s.node.clone(),
        role: role_to_pb(s.role) as i32,
        epoch: s.epoch,
        applied_sequence: s.applied_sequence,
    }
}

pub(crate) fn served_from_pb(from: &str, g: pb::GetResponse) -> Result<Served, MirrorError> {
    let bad = |why: &str| MirrorError::Protocol {
        node: from.into(),
        what: "Get answer",
        why: why.into(),
    };
    let record = g.record.ok_or_else(|| bad("it carries no record"))?;
    Ok(Served {
        record: record_from_pb(from, record)?,
        role: role_from_pb(g.role).ok_or_else(|| bad("its role is unknown"))?,
        node: g.node,
        epoch: g.epoch,
        applied_sequence: g.applied_sequence,
    })
}

/// What the controller asks of a primary's archive supervisor, as sent.
pub(crate) fn archive_request_to_pb(request: &ArchiveRequest) -> pb::ArchiveRequest {
    let ask = &request.ask;
    pb::ArchiveRequest {
        spec: request.backup.as_ref().map(|b| pb::ArchiveSpec {
            url: b.bucket.url.clone(),
            endpoint: b.bucket.endpoint.clone().unwrap_or_default(),
            region: b.bucket.region.clone().unwrap_or_default(),
            credentials_secret: b.bucket.credentials_secret.clone(),
            archive_name: b.bucket.archive_name.clone(),
            segment_interval_ms: millis(b.segment_interval),
            base_interval_s: b.base_interval.as_secs(),
            retention_s: b.retention.map_or(0, |r| r.as_secs()),
        }),
        site: request.site.as_ref().map(|site| pb::SiteSpec {
            name: site.name.clone(),
            lease_ms: millis(site.lease),
            follow: site.follow.as_ref().map(|f| pb::FollowSpec {
                url: f.bucket.url.clone(),
                endpoint: f.bucket.endpoint.clone().unwrap_or_default(),
                region: f.bucket.region.clone().unwrap_or_default(),
                credentials_secret: f.bucket.credentials_secret.clone(),
                device: f.device.clone(),
                archive_name: f.bucket.archive_name.clone(),
            }),
        }),
        promote_request: ask.promote_request.clone().unwrap_or_default(),
        drain: ask.drain,
        base_request: ask.base_request.clone().unwrap_or_default(),
        verify_request: ask.verify_request.clone().unwrap_or_default(),
        restore: ask.restore.as_ref().map(|r| pb::RestoreRequest {
            id: r.id.clone(),
            to_sequence: r.to_sequence.unwrap_or(0),
            to_time_ms: r.to_time_ms.unwrap_or(0),
            force: r.force,
        }),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a primary's archive supervisor was asked. Zero intervals and empty names are
/// kept as they came: the supervisor refuses them naming the spec's field.
pub(crate) fn archive_request_from_pb(r: pb::ArchiveRequest) -> ArchiveRequest {
    let bucket = |url, endpoint, region, credentials_secret, archive_name| BucketRef {
        url,
        endpoint: some(endpoint),
        region: some(region),
        credentials_secret,
        archive_name,
    };
    ArchiveRequest {
        backup: r.spec.map(|b| BackupConfig {
            bucket: bucket(
                b.url,
                b.endpoint,
                b.region,
                b.credentials_secret,
                b.archive_name,
            ),
            segment_interval: Duration::from_millis(b.segment_interval_ms),
            base_interval: Duration::from_secs(b.base_interval_s),
            retention: (b.retention_s > 0).then(|| Duration::from_secs(b.retention_s)),
        }),
        site: r.site.map(|site| SiteConfig {
            name: site.name,
            lease: Duration::from_millis(site.lease_ms),
            follow: site.follow.map(|f| FollowConfig {
                bucket: bucket(
                    f.url,
                    f.endpoint,
                    f.region,
                    f.credentials_secret,
                    f.archive_name,
                ),
                device: f.device,
            }),
        }),
        ask: ArchiveAsk {
            base_request: some(r.base_request),
            verify_request: some(r.verify_request),
            restore: r.restore.map(|x| RestoreAsk {
                id: x.id,
                to_sequence: (x.to_sequence > 0).then_some(x.to_sequence),
                to_time_ms: (x.to_time_ms > 0).then_some(x.to_time_ms),
                force: x.force,
            }),
            promote_request: some(r.promote_request),
            drain: r.drain,
        },
    }
}

fn site_role_to_pb(role: SiteRole) -> pb::SiteRole {
    match role {
        SiteRole::Active => pb::SiteRole::Active,
        SiteRole::Passive => pb::SiteRole::Passive,
        SiteRole::Fenced => pb::SiteRole::Fenced,
    }
}

fn site_report_to_pb(r: &SiteReport) -> pb::SiteReport {
    pb::SiteReport {
        role: site_role_to_pb(r.role) as i32,
        site_epoch: r.site_epoch,
        source_sequence: r.source_sequence,
        source_time_ms: r.source_time_ms.unwrap_or(0),
        applied_sequence: r.applied_sequence,
        applied_time_ms: r.applied_time_ms.unwrap_or(0),
        lag_ms: r.lag_ms,
        fenced_by: r.fenced_by.clone().unwrap_or_default(),
        fence_sequence: r.fence_sequence,
        lost_writes: r.lost_writes,
        promotion_done: r.promotion_done.clone().unwrap_or_default(),
        promotion_running: r.promotion_running.clone().unwrap_or_default(),
        error: r.error.clone().unwrap_or_default(),
        fenced_by_device: r.fenced_by_device.clone().unwrap_or_default(),
        draining: r.draining,
    }
}

fn site_report_from_pb(r: pb::SiteReport) -> SiteReport {
    let ms = |v: u64| (v > 0).then_some(v);
    SiteReport {
        role: match pb::SiteRole::try_from(r.role) {
            Ok(pb::SiteRole::Passive) => SiteRole::Passive,
            Ok(pb::SiteRole::Fenced) => SiteRole::Fenced,
            _ => SiteRole::Active,
        },
        site_epoch: r.site_epoch,
        source_sequence: r.source_sequence,
        source_time_ms: ms(r.source_time_ms),
        applied_sequence: r.applied_sequence,
        applied_time_ms: ms(r.applied_time_ms),
        lag_ms: r.lag_ms,
        fenced_by: some(r.fenced_by),
        fenced_by_device: some(r.fenced_by_device),
        fence_sequence: r.fence_sequence,
        lost_writes: r.lost_writes,
        promotion_done: some(r.promotion_done),
        promotion_running: some(r.promotion_running),
        error: some(r.error),
        draining: r.draining,
    }
}

/// What a primary's archive supervisor answers, as sent.
pub(crate) fn archive_report_to_pb(r: &ArchiveReport) -> pb::ArchiveResponse {
    pb::ArchiveResponse {
        config_error: r.config_error.clone().unwrap_or_default(),
        archived_sequence: r.archived_sequence,
        primary_sequence: r.primary_sequence,
        up_to_date_ms: r.up_to_date_ms.unwrap_or(0),
        last_error: r.last_error.clone().unwrap_or_default(),
        last_error_kind: String::new(),
        bases: r
            .bases
            .iter()
            .map(|&(epoch, sequence, time_ms)| pb::ArchivePoint {
                epoch,
                sequence,
                time_ms,
            })
            .collect(),
        base_done: r.base_done.clone().unwrap_or_default(),
        drill_running: r.drill_running.clone().unwrap_or_default(),
        drill: r.drill.as_ref().map(|d| pb::DrillOutcome {
            request: d.request.clone(),
            verified: d.verified,
            sequence: d.sequence,
            epoch: d.epoch,
            time_ms: d.time_ms.unwrap_or(0),
            secrets: d.secrets,
            bytes: d.bytes,
            duration_ms: d.duration_ms,
            finished_ms: d.finished_ms,
            message: d.message.clone().unwrap_or_default(),
        }),
        not_primary: r.not_primary,
        restore_running: r.restore_running.clone().unwrap_or_default(),
        restore: r.restore.as_ref().map(|o| pb::RestoreOutcome {
            id: o.id.clone(),
            succeeded: o.succeeded,
            sequence: o.sequence,
            epoch: o.epoch,
            time_ms: o.time_ms.unwrap_or(0),
            secrets: o.secrets,
            bytes: o.bytes,
            finished_ms: o.finished_ms,
            message: o.message.clone().unwrap_or_default(),
        }),
        site: r.site.as_ref().map(site_report_to_pb),
    }
}

/// What a primary's archive supervisor answered.
pub(crate) fn archive_report_from_pb(r: pb::ArchiveResponse) -> ArchiveReport {
    let ms = |v: u64| (v > 0).then_some(v);
    ArchiveReport {
        config_error: some(r.config_error),
        archived_sequence: r.archived_sequence,
        primary_sequence: r.primary_sequence,
        up_to_date_ms: ms(r.up_to_date_ms),
        last_error: some(r.last_error),
        bases: r
            .bases
            .into_iter()
            .map(|b| (b.epoch, b.sequence, b.time_ms))
            .collect(),
        base_done: some(r.base_done),
        drill_running: some(r.drill_running),
        drill: r.drill.map(|d| DrillResult {
            request: d.request,
            verified: d.verified,
            sequence: d.sequence,
            epoch: d.epoch,
            time_ms: ms(d.time_ms),
            secrets: d.secrets,
            bytes: d.bytes,
            duration_ms: d.duration_ms,
            finished_ms: d.finished_ms,
            message: some(d.message),
        }),
        restore_running: some(r.restore_running),
        restore: r.restore.map(|o| RestoreResult {
            id: o.id,
            succeeded: o.succeeded,
            sequence: o.sequence,
            epoch: o.epoch,
            time_ms: ms(o.time_ms),
            secrets: o.secrets,
            bytes: o.bytes,
            finished_ms: o.finished_ms,
            message: some(o.message),
        }),
        site: r.site.map(site_report_from_pb),
        not_primary: r.not_primary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> SecretPath {
        s.parse().expect("path")
    }

    #[test]
    fn records_round_trip_and_forgeries_still_fail_verification() {
        let mut d = SecretData::new();
        d.insert("user", b"u".to_vec()).expect("insert");
        d.insert("bin", vec![0u8, 255, 7]).expect("insert");
        let live = Record::live(path("ns/a"), 7, d);
        let back = record_from_pb("n1", record_to_pb(&live)).expect("decode");
        assert_eq!(back, live);
        back.verify().expect("verifies");

        let tomb = Record::tombstone(path("ns/a"), 9);
        assert_eq!(
            record_from_pb("n1", record_to_pb(&tomb)).expect("decode"),
            tomb
        );

        let mut forged = record_to_pb(&live);
        forged.data[0].value = b"evil".to_vec();
        let decoded = record_from_pb("n1", forged).expect("decodes");
        assert!(
            decoded.verify().is_err(),
            "content no longer matches checksum"
        );
    }

    #[test]
    fn malformed_records_name_the_problem() {
        let live = Record::live(path("ns/a"), 1, SecretData::new());
        let mut bad_path = record_to_pb(&live);
        bad_path.path = "../x".into();
        let err = record_from_pb("n1", bad_path).expect_err("path");
        assert!(
            err.to_string().contains("path") && err.to_string().contains("n1"),
            "{err}"
        );

        let mut short = record_to_pb(&live);
        short.checksum.truncate(5);
        assert!(record_from_pb("n1", short).is_err());

        let mut tomb = record_to_pb(&Record::tombstone(path("ns/a"), 2));
        tomb.data.push(pb::KeyValue {
            key: "k".into(),
            value: vec![1],
        });
        assert!(record_from_pb("n1", tomb).is_err());

        let dup = vec![
            pb::KeyValue {
                key: "k".into(),
                value: vec![1],
            },
            pb::KeyValue {
                key: "k".into(),
                value: vec![2],
            },
        ];
        let err = data_from_pb(dup).expect_err("duplicate");
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn health_round_trips_and_a_bad_lost_write_is_named() {
        let pass = FullPassReport {
            finished: time_from_unix_ms(1_700_000_000_000),
            duration: Duration::from_millis(1500),
            checked: 10,
            lost_writes: vec![LostWrite {
                path: path("ns/a"),
                version: 3,
                deleted: true,
            }],
            sequence: 12,
            epoch: 4,
            ..FullPassReport::default()
        };
        let mirror = AgentHealth {
            node: "n2".into(),
            device: "prod-hsm".into(),
            token_label: "prod".into(),
            token_present: true,
            session_usable: false,
            token_serial: None,
            token_error: Some(Fault {
                kind: "session".into(),
                message: "cannot open a session".into(),
            }),
            role: Some(DeviceRole::ReadOnly),
            epoch: 4,
            applied_sequence: 12,
            write_lease_remaining_ms: 0,
            primary: Some(Peer {
                node: "n1".into(),
                endpoint: "https://n1:9443".into(),
            }),
            fenced: false,
            clock: Some(ClockReading { id: 7, now_ms: 99 }),
            sync: Some(SyncStatus {
                last_sync: pass.finished,
                primary_sequence: 12,
                last_error: None,
                last_full_pass: Some(pass.clone()),
                lost_writes: pass.lost_writes.clone(),
                ..SyncStatus::default()
            }),
            replication: None,
        };
        assert_eq!(
            health_from_pb("n2", health_to_pb(&mirror)).expect("decode"),
            mirror
        );
        let primary = AgentHealth {
            role: Some(DeviceRole::Primary),
            token_serial: Some("0001".into()),
            primary: None,
            sync: None,
            replication: Some(ReplicationStatus {
                in_sync: vec!["n2".into()],
                dropping: vec![OutsideMirror {
                    node: "n3".into(),
                    reason: "timed out".into(),
                    since: time_from_unix_ms(1_700_000_000_500).expect("time"),
                }],
                dropped: Vec::new(),
            }),
            ..mirror.clone()
        };
        assert_eq!(
            health_from_pb("n1", health_to_pb(&primary)).expect("decode"),
            primary
        );

        let mut bad = health_to_pb(&mirror);
        bad.sync.as_mut().expect("sync").lost_writes[0].path = "../x".into();
        let error = health_from_pb("n2", bad).expect_err("bad path");
        assert!(
            error.to_string().contains("n2") && error.to_string().contains("lost write"),
            "{error}"
        );
    }

    #[test]
    fn assignments_cross_the_wire_unchanged() {
        let peer = |n: &str| Peer {
            node: n.into(),
            endpoint: format!("https://{n}:9443"),
        };
        let deadline = LeaseDeadline {
            clock_id: 9,
            until_ms: 1234,
        };
        for a in [
            Assignment {
                role: DeviceRole::Primary,
                epoch: 5,
                primary: Some(peer("n1")),
                mirrors: vec![peer("n2"), peer("n3")],
                lease: Duration::from_millis(1500),
                sync_interval: Some(Duration::from_secs(300)),
            },
            Assignment {
                role: DeviceRole::ReadOnly,
                epoch: 5,
                primary: Some(peer("n1")),
                mirrors: Vec::new(),
                lease: Duration::ZERO,
                sync_interval: None,
            },
        ] {
            let wire = assignment_to_pb(&a, Some(deadline));
            assert_eq!(
                wire.lease_deadline.map(lease_deadline_from_pb),
                Some(deadline)
            );
            assert_eq!(super::super::assignment_from_pb(wire).expect("decode"), a);
        }
    }

    #[test]
    fn a_served_record_round_trips_and_an_empty_answer_is_named() {
        let served = Served {
            record: Record::live(path("ns/a"), 3, SecretData::new()),
            node: "n2".into(),
            role: DeviceRole::ReadOnly,
            epoch: 4,
            applied_sequence: 9,
        };
        assert_eq!(
            served_from_pb("n2", served_to_pb(&served)).expect("decode"),
            served
        );
        let mut empty = served_to_pb(&served);
        empty.record = None;
        let error = served_from_pb("n2", empty).expect_err("no record");
        assert!(error.to_string().contains("no record"), "{error}");
    }

    #[test]
    fn feed_messages_round_trip_and_bad_requests_name_their_field() {
        let live = Record::live(path("ns/a"), 7, SecretData::new());
        let entry = ManifestEntry {
            path: path("ns/a"),
            version: 7,
            checksum: live.checksum,
            deleted: false,
        };
        let manifest = Manifest {
            node: "n1".into(),
            sequence: 7,
            epoch: 2,
            fork_sequence: 5,
            entries: vec![entry.clone()],
        };
        assert_eq!(
            manifest_from_pb("n1", manifest_to_pb(&manifest)).expect("manifest"),
            manifest
        );
        let ask = ChangesAsk {
            since: 3,
            limit: 10,
            node: "n2".into(),
            verified_epoch: 2,
        };
        assert_eq!(changes_ask_from_pb(changes_ask_to_pb(&ask)), ask);
        let changes = Changes {
            records: vec![live.clone(), Record::tombstone(path("ns/b"), 8)],
            through: 8,
            sequence: 9,
            epoch: 2,
            more: true,
        };
        assert_eq!(
            changes_from_pb("n1", changes_to_pb(&changes)).expect("changes"),
            changes
        );
        let fetch = FetchAsk {
            paths: vec![path("ns/a"), path("ns/b")],
            held: vec![entry],
        };
        assert_eq!(
            fetch_ask_from_pb(fetch_ask_to_pb(&fetch)).expect("fetch"),
            fetch
        );
        let fetched = Fetched {
            covered: 2,
            records: vec![live.clone()],
            missing: vec![path("ns/b")],
            unreadable: Vec::new(),
            lost: vec![path("ns/a")],
        };
        assert_eq!(
            fetched_from_pb("n1", fetched_to_pb(&fetched)).expect("fetched"),
            fetched
        );
        let push = Push {
            record: live,
            epoch: 2,
            primary_node: "n1".into(),
        };
        assert_eq!(push_from_pb(push_to_pb(&push)).expect("push"), push);

        let mut bad = fetch_ask_to_pb(&fetch);
        bad.paths[1] = "../x".into();
        match fetch_ask_from_pb(bad).expect_err("bad path") {
            MirrorError::InvalidArgument { field, .. } => assert_eq!(field, "paths"),
            other => panic!("expected InvalidArgument, got {other}"),
        }
        let mut bare = push_to_pb(&push);
        bare.record = None;
        match push_from_pb(bare).expect_err("no record") {
            MirrorError::InvalidArgument { field, .. } => assert_eq!(field, "record"),
            other => panic!("expected InvalidArgument, got {other}"),
        }
    }

    #[test]
    fn expectations_and_roles_map_both_ways() {
        for e in [Expect::Any, Expect::Absent, Expect::Version(4)] {
            assert_eq!(expect_from_pb(Some(expect_to_pb(e))), e);
        }
        assert_eq!(expect_from_pb(None), Expect::Any);
        for r in [
            DeviceRole::Primary,
            DeviceRole::ReadOnly,
            DeviceRole::Standby,
        ] {
            assert_eq!(role_from_pb(role_to_pb(r) as i32), Some(r));
        }
        assert_eq!(role_from_pb(0), None);
        assert_eq!(role_from_pb(99), None);
    }

    #[test]
    fn archive_requests_cross_the_wire_with_sub_second_intervals() {
        let bucket = |device: &str| BucketRef {
            url: format!("s3://dr/{device}"),
            endpoint: Some("http://127.0.0.1:9000".into()),
            region: None,
            credentials_secret: "hsm-archive".into(),
            archive_name: "main".into(),
        };
        let full = ArchiveRequest {
            backup: Some(BackupConfig {
                bucket: bucket("a"),
                segment_interval: Duration::from_millis(200),
                base_interval: Duration::from_secs(3600),
                retention: Some(Duration::from_secs(86_400)),
            }),
            site: Some(SiteConfig {
                name: "b".into(),
                lease: Duration::from_millis(1500),
                follow: Some(FollowConfig {
                    bucket: bucket("a"),
                    device: "prod-hsm".into(),
                }),
            }),
            ask: ArchiveAsk {
                base_request: Some("b1".into()),
                verify_request: Some("v1".into()),
                restore: Some(RestoreAsk {
                    id: "r1".into(),
                    to_sequence: None,
                    to_time_ms: Some(1_700_000_000_000),
                    force: true,
                }),
                promote_request: Some("p1".into()),
                drain: true,
            },
        };
        let empty = ArchiveRequest::default();
        for request in [full, empty] {
            let back = archive_request_from_pb(archive_request_to_pb(&request));
            assert_eq!(back, request);
        }
    }

    #[test]
    fn archive_reports_cross_the_wire_unchanged() {
        let full = ArchiveReport {
            config_error: Some("spec.backup.url: set s3://BUCKET".into()),
            archived_sequence: 9,
            primary_sequence: 11,
            up_to_date_ms: Some(1_700_000_000_000),
            last_error: Some("object store down".into()),
            bases: vec![(1, 3, 1_600_000_000_000), (2, 9, 1_700_000_000_000)],
            base_done: Some("b1".into()),
            drill_running: Some("v2".into()),
            drill: Some(DrillResult {
                request: "v1".into(),
                verified: true,
                sequence: 9,
                epoch: 2,
                time_ms: Some(1_700_000_000_000),
                secrets: 4,
                bytes: 512,
                duration_ms: 30,
                finished_ms: 1_700_000_000_100,
                message: None,
            }),
            restore_running: None,
            restore: Some(RestoreResult {
                id: "r1".into(),
                succeeded: false,
                finished_ms: 5,
                message: Some("restore r0 is still running".into()),
                ..Default::default()
            }),
            site: Some(SiteReport {
                role: SiteRole::Fenced,
                site_epoch: 3,
                source_sequence: 8,
                source_time_ms: Some(7),
                applied_sequence: 8,
                applied_time_ms: Some(6),
                lag_ms: 0,
                fenced_by: Some("b".into()),
                fenced_by_device: Some("prod-hsm-b".into()),
                fence_sequence: 8,
                lost_writes: 2,
                promotion_done: None,
                promotion_running: None,
                error: None,
                draining: false,
            }),
            not_primary: true,
        };
        for report in [full, ArchiveReport::default()] {
            let back = archive_report_from_pb(archive_report_to_pb(&report));
            assert_eq!(back, report);
        }
        for role in [SiteRole::Active, SiteRole::Passive, SiteRole::Fenced] {
            let pb = site_role_to_pb(role) as i32;
            let back = site_report_from_pb(pb::SiteReport {
                role: pb,
                ..Default::default()
            });
            assert_eq!(back.role, role);
        }
    }
}
