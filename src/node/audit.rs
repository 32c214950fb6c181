//! The node plugin's audit trail: one JSON line per publish, republish that changed or
//! failed, unpublish and refusal, saying which pod read which secrets at which version,
//! from which device and through which copy. Never a value.
//!
//! The volume source notes what each publish read ([`Mounts::read`]); when the csi
//! crate reports the finished operation, [`AuditLog`] joins the two into a record, keeps
//! the table of what is mounted now (served at `/mounts`), and counts records by outcome.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use hsm_secrets_csi::{NodeObserver, Operation, OperationKind, PublishRequest};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::attributes::{DEVICE, SECRETS};
use crate::crd::DeviceRole;

/// Version of the record layout; fields are only ever added.
pub const SCHEMA: &str = "hsmsecrets.io/audit/v1";

/// Where a volume's secrets were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadFrom {
    /// This node's token, serving as the device's primary.
    LocalPrimary,
    /// This node's token, a read-only mirror (or a standby).
    LocalMirror,
    /// This node's token, role unknown (no agent in this process).
    Local,
    /// The device's agents on other nodes (primary first, then a mirror).
    RemoteAgents,
}

impl ReadFrom {
    pub fn local(role: Option<DeviceRole>) -> Self {
        match role {
            Some(DeviceRole::Primary) => ReadFrom::LocalPrimary,
            Some(DeviceRole::ReadOnly | DeviceRole::Standby) => ReadFrom::LocalMirror,
            None => ReadFrom::Local,
        }
    }
}

/// One secret of a volume and the version that was read (none when the read failed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SecretVersion {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// What one publish read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRead {
    pub device: String,
    pub read_from: ReadFrom,
    pub secrets: Vec<SecretVersion>,
}

/// The pod a volume belongs to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

impl PodRef {
    fn of(request: &PublishRequest) -> Self {
        let owned = |v: Option<&str>| v.map(str::to_string);
        PodRef {
            namespace: owned(request.pod_namespace()),
            name: owned(request.pod_name()),
            uid: owned(request.pod_uid()),
            service_account: owned(request.service_account()),
        }
    }

    /// Only the uid, from kubelet's `<dir>/pods/<uid>/volumes/<plugin>/<volume>/mount`.
    fn from_target(target: &Path) -> Self {
        let uid = target
            .ancestors()
            .nth(4)
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .map(str::to_string);
        PodRef {
            uid,
            ..PodRef::default()
        }
    }
}

/// A volume mounted now, as `/mounts` and `kubectl hsm mounts` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mounted {
    pub pod: PodRef,
    pub volume_id: String,
    pub device: String,
    pub read_from: ReadFrom,
    pub secrets: Vec<SecretVersion>,
    /// When the content last changed (RFC 3339).
    pub since: String,
}

/// One line of the audit trail.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    pub schema: &'static str,
    pub time: String,
    pub node: String,
    pub operation: &'static str,
    /// `ok`, `kept_last_good`, `revoked`, or the error kind of a refusal or failure.
    pub outcome: &'static str,
    /// The error message (names objects and the fix, never a value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub pod: PodRef,
    pub volume_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_from: Option<ReadFrom>,
    pub secrets: Vec<SecretVersion>,
}

/// What the source read per target (until the operation finishes) and what is mounted.
#[derive(Default)]
pub struct Mounts {
    pending: Mutex<HashMap<PathBuf, VolumeRead>>,
    mounted: Mutex<BTreeMap<PathBuf, Mounted>>,
}

impl Mounts {
    /// Called by the volume source after a successful read for `target`.
    pub fn read(&self, target: &Path, read: VolumeRead) {
        lock(&self.pending).insert(target.to_path_buf(), read);
    }

    fn take_read(&self, target: &Path) -> Option<VolumeRead> {
        lock(&self.pending).remove(target)
    }

    /// Volumes mounted now whose pod is in `namespace` and that hold `secret` (either
    /// filter `None`: any).
    pub fn list(&self, namespace: Option<&str>, secret: Option<&str>) -> Vec<Mounted> {
        lock(&self.mounted)
            .values()
            .filter(|m| namespace.is_none() || m.pod.namespace.as_deref() == namespace)
            .filter(|m| secret.is_none_or(|s| m.secrets.iter().any(|v| v.name == s)))
            .cloned()
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecordLabels {
    operation: &'static str,
    outcome: &'static str,
}

/// Writes the audit trail and keeps [`Mounts`] current.
pub struct AuditLog {
    node: String,
    sink: Mutex<Box<dyn Write + Send>>,
    mounts: Arc<Mounts>,
    records: Family<RecordLabels, Counter>,
    write_failures: Counter,
}

impl AuditLog {
    /// Records go to `sink` (a file opened for append, or standard output), one JSON
    /// object per line.
    pub fn new(
        node: impl Into<String>,
        sink: Box<dyn Write + Send>,
        mounts: Arc<Mounts>,
        registry: &mut Registry,
    ) -> Self {
        let records = Family::<RecordLabels, Counter>::default();
        registry.register(
            "hsm_secrets_node_audit_records",
            "Audit records written, by operation and outcome",
            records.clone(),
        );
        let write_failures = Counter::default();
        registry.register(
            "hsm_secrets_node_audit_write_failures",
            "Audit records that could not be written",
            write_failures.clone(),
        );
        Self {
            node: node.into(),
            sink: Mutex::new(sink),
            mounts,
            records,
            write_failures,
        }
    }

    /// Opens `destination`: `-` is standard output, anything else a file appended to.
    pub fn open_sink(destination: &Path) -> std::io::Result<Box<dyn Write + Send>> {
        if destination == Path::new("-") {
            return Ok(Box::new(std::io::stdout()));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(destination)?;
        Ok(Box::new(std::io::LineWriter::new(file)))
    }

    pub fn mounts(&self) -> &Arc<Mounts> {
        &self.mounts
    }

    /// The record of `operation` (if it deserves one), updating the mount table.
    fn settle(&self, operation: &Operation<'_>) -> Option<AuditRecord> {
        // A publish refused before it began (a concurrent one holds the target) read
        // nothing: the pending read belongs to the one in flight.
        let read = match (operation.kind, operation.request) {
            (OperationKind::Unpublish, _) | (_, None) => None,
            _ => self.mounts.take_read(operation.target),
        };
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let reason = operation.error.map(ToString::to_string);
        let mut record = AuditRecord {
            schema: SCHEMA,
            time: now.clone(),
            node: self.node.clone(),
            operation: operation.kind.as_str(),
            outcome: operation.outcome,
            reason,
            pod: operation
                .request
                .map(PodRef::of)
                .unwrap_or_else(|| PodRef::from_target(operation.target)),
            volume_id: operation.volume_id.to_string(),
            device: None,
            read_from: None,
            secrets: Vec::new(),
        };
        let mut mounted = lock(&self.mounts.mounted);
        match (operation.kind, read) {
            (OperationKind::Unpublish, _) => {
                // A failed unpublish leaves the volume mounted: it stays in the table.
                let gone = match operation.outcome == hsm_secrets_csi::observer::OUTCOME_OK {
                    true => mounted.remove(operation.target),
                    false => mounted.get(operation.target).cloned(),
                };
                if let Some(gone) = gone {
                    record.pod = gone.pod;
                    record.device = Some(gone.device);
                    record.read_from = Some(gone.read_from);
                    record.secrets = gone.secrets;
                }
            }
            // The content on the volume is what was read: first publish or rotation.
            (_, Some(read)) if operation.outcome == hsm_secrets_csi::observer::OUTCOME_OK => {
                let entry = Mounted {
                    pod: record.pod.clone(),
                    volume_id: record.volume_id.clone(),
                    device: read.device.clone(),
                    read_from: read.read_from,
                    secrets: read.secrets.clone(),
                    since: now,
                };
                let previous = mounted.insert(operation.target.to_path_buf(), entry);
                if let (false, Some(previous)) = (operation.changed, previous) {
                    // An unchanged republish: the volume still holds what it held.
                    mounted.insert(operation.target.to_path_buf(), previous);
                    return None;
                }
                record.device = Some(read.device);
                record.read_from = Some(read.read_from);
                record.secrets = read.secrets;
            }
            (kind, _) => {
                if operation.outcome == hsm_secrets_csi::observer::OUTCOME_REVOKED {
                    mounted.remove(operation.target);
                }
                if kind == OperationKind::Republish
                    && operation.outcome == hsm_secrets_csi::observer::OUTCOME_OK
                    && !operation.changed
                {
                    return None;
                }
                // A refusal or failure: what the pod asked for, as it asked.
                if let Some(request) = operation.request {
                    record.device = request.volume_context.get(DEVICE).cloned();
                    record.secrets = requested_secrets(request);
                }
            }
        }
        Some(record)
    }

    fn write(&self, record: &AuditRecord) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(error) => {
                self.write_failures.inc();
                tracing::error!(%error, "cannot encode an audit record");
                return;
            }
        };
        line.push(b'\n');
        let written = {
            let mut sink = lock(&self.sink);
            sink.write_all(&line).and_then(|()| sink.flush())
        };
        match written {
            Ok(()) => {
                self.records
                    .get_or_create(&RecordLabels {
                        operation: record.operation,
                        outcome: record.outcome,
                    })
                    .inc();
            }
            Err(error) => {
                self.write_failures.inc();
                tracing::error!(%error, "cannot write an audit record");
            }
        }
    }
}

fn requested_secrets(request: &PublishRequest) -> Vec<SecretVersion> {
    let Some(list) = request.volume_context.get(SECRETS) else {
        return Vec::new();
    };
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .take(super::attributes::MAX_SECRETS_PER_VOLUME)
        .map(|name| SecretVersion {
            name: name.chars().take(253).collect(),
            version: None,
        })
        .collect()
}

impl NodeObserver for AuditLog {
    fn finished(&self, operation: &Operation<'_>) {
        if let Some(record) = self.settle(operation) {
            self.write(&record);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hsm_secrets_csi::observer::{OUTCOME_KEPT_LAST_GOOD, OUTCOME_OK};
    use hsm_secrets_csi::source::pod_info;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const TARGET: &str = "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/hsm/mount";

    fn request() -> PublishRequest {
        PublishRequest {
            volume_id: "v1".into(),
            target_path: TARGET.into(),
            volume_context: [
                (pod_info::POD_NAMESPACE, "shop"),
                (pod_info::POD_NAME, "web-0"),
                (pod_info::POD_UID, "uid-1"),
                (pod_info::SERVICE_ACCOUNT, "web"),
                (SECRETS, "db,api"),
                (DEVICE, "prod-hsm"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            read_only: true,
            fs_group: None,
            republish: false,
        }
    }

    fn operation<'a>(
        kind: OperationKind,
        request: Option<&'a PublishRequest>,
        outcome: &'static str,
        changed: bool,
    ) -> Operation<'a> {
        Operation {
            kind,
            volume_id: "v1",
            target: Path::new(TARGET),
            request,
            outcome,
            changed,
            error: None,
        }
    }

    fn read(version: u64) -> VolumeRead {
        VolumeRead {
            device: "prod-hsm".into(),
            read_from: ReadFrom::LocalMirror,
            secrets: vec![SecretVersion {
                name: "db".into(),
                version: Some(version),
            }],
        }
    }

    #[test]
    fn a_volumes_life_is_three_records_and_the_table_follows_it() {
        let buffer = Buffer::default();
        let mounts = Arc::new(Mounts::default());
        let log = AuditLog::new(
            "n1",
            Box::new(buffer.clone()),
            mounts.clone(),
            &mut Registry::default(),
        );
        let request = request();
        let target = Path::new(TARGET);

        mounts.read(target, read(3));
        log.finished(&operation(
            OperationKind::Publish,
            Some(&request),
            OUTCOME_OK,
            true,
        ));
        assert_eq!(mounts.list(Some("shop"), Some("db")).len(), 1);
        assert!(mounts.list(Some("other"), None).is_empty());

        // An unchanged republish writes nothing; a rotation does.
        mounts.read(target, read(3));
        log.finished(&operation(
            OperationKind::Republish,
            Some(&request),
            OUTCOME_OK,
            false,
        ));
        mounts.read(target, read(4));
        log.finished(&operation(
            OperationKind::Republish,
            Some(&request),
            OUTCOME_OK,
            true,
        ));
        assert_eq!(mounts.list(None, None)[0].secrets[0].version, Some(4));
        log.finished(&operation(
            OperationKind::Republish,
            Some(&request),
            OUTCOME_KEPT_LAST_GOOD,
            false,
        ));
        assert_eq!(
            mounts.list(None, None)[0].secrets[0].version,
            Some(4),
            "kept"
        );
        log.finished(&operation(OperationKind::Unpublish, None, OUTCOME_OK, true));
        assert!(mounts.list(None, None).is_empty());

        let text = String::from_utf8(lock(&buffer.0).clone()).unwrap();
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let summary: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r["operation"].as_str().unwrap(),
                    r["outcome"].as_str().unwrap(),
                    r["secrets"][0]["version"].as_u64(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("publish", "ok", Some(3)),
                ("republish", "ok", Some(4)),
                ("republish", "kept_last_good", None),
                ("unpublish", "ok", Some(4)),
            ]
        );
        // A refused concurrent publish takes nothing of the read in flight, and a failed
        // unpublish leaves the volume in the table.
        mounts.read(target, read(5));
        log.finished(&operation(
            OperationKind::Publish,
            None,
            "operation_pending",
            false,
        ));
        log.finished(&operation(
            OperationKind::Publish,
            Some(&request),
            OUTCOME_OK,
            true,
        ));
        assert_eq!(mounts.list(None, None)[0].secrets[0].version, Some(5));
        log.finished(&operation(
            OperationKind::Unpublish,
            None,
            "unmount_failed",
            false,
        ));
        assert_eq!(mounts.list(None, None).len(), 1, "still mounted");
        let last = &records[3];
        assert_eq!(last["pod"]["name"], "web-0", "unpublish knows the pod");
        assert_eq!(last["readFrom"], "local_mirror");
        assert_eq!(last["schema"], SCHEMA);
        assert_eq!(records[2]["secrets"][1]["name"], "api", "as requested");
    }
}
