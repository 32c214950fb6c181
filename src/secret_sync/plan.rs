//! Pure decisions for one HSMSecret: observations in, writes, status and Events out.
//!
//! A reconcile runs in three steps with IO between them, each decided here:
//! [`plan_import`] (what to write into the HSM, if anything), [`plan_secret`] (how to
//! bring the managed Secret in line with the HSM content, after the write) and
//! [`plan_status`] (the status, whether it changed, and the Event). Deletion is
//! [`plan_cleanup`].

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;

use super::{
    DEVICE_LABEL, DigestKey, IMPORT_FOR_LABEL, REMOVE_KEYS_ANNOTATION, SyncError, VERSION_LABEL,
};
use crate::crd::{
    DeletionPolicy, DevicePhase, HSMDevice, HSMSecret, HSMSecretStatus, ImportMode, ServedBy,
    SyncStatus,
};
use crate::hsm::{Expect, SecretData, SecretPath};
use crate::state::{EventRecord, EventType};

/// Condition type written by the reconciler.
pub const READY_CONDITION: &str = crate::contract::conditions::READY;

/// Whether the device takes writes now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceAccess {
    Missing {
        device: String,
    },
    /// Read-only fallback, failed, or no primary elected yet.
    NoWritablePrimary {
        device: String,
        why: String,
    },
    Writable {
        primary: String,
        epoch: u64,
    },
}

impl DeviceAccess {
    pub fn of(name: &str, device: Option<&HSMDevice>) -> Self {
        let Some(device) = device else {
            return DeviceAccess::Missing {
                device: name.into(),
            };
        };
        let status = device.status.clone().unwrap_or_default();
        match (&status.primary_node, status.phase) {
            (Some(primary), DevicePhase::Ready | DevicePhase::Degraded) => DeviceAccess::Writable {
                primary: primary.clone(),
                epoch: status.epoch,
            },
            (primary, phase) => DeviceAccess::NoWritablePrimary {
                device: name.into(),
                why: match primary {
                    Some(p) => format!("phase {phase:?}, primary {p} unavailable"),
                    None => format!("phase {phase:?}, no primary elected yet"),
                },
            },
        }
    }

    fn refusal(&self) -> Option<SyncError> {
        match self {
            DeviceAccess::Missing { device } => Some(SyncError::DeviceNotFound {
                device: device.clone(),
            }),
            DeviceAccess::NoWritablePrimary { device, why } => Some(SyncError::ReadOnly {
                device: device.clone(),
                why: why.clone(),
            }),
            DeviceAccess::Writable { .. } => None,
        }
    }
}

/// What the HSM holds at the HSMSecret's path.
#[derive(Clone, Debug, PartialEq)]
pub enum HsmContent {
    /// Never written, or deleted (a tombstone).
    Absent,
    Live {
        version: u64,
        data: SecretData,
        served_by: ServedBy,
    },
    /// No agent of the device could answer.
    Unavailable(SyncError),
}

/// Everything one reconcile looks at. `Debug` shows Secrets by name and key names only.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub object: &'a HSMSecret,
    pub device: &'a DeviceAccess,
    pub hsm: &'a HsmContent,
    /// `spec.source.secretRef`, read in the HSMSecret's namespace.
    pub source: Option<&'a Secret>,
    /// The Secret named `spec.secretName` in the HSMSecret's namespace.
    pub managed: Option<&'a Secret>,
    pub key: &'a DigestKey,
    pub now: Timestamp,
}

/// `<namespace>/<name>` of the HSMSecret itself: the only path it can reach.
pub fn hsm_path(object: &HSMSecret) -> Result<SecretPath, SyncError> {
    let ns = object.metadata.namespace.as_deref().unwrap_or_default();
    let name = object.metadata.name.as_deref().unwrap_or_default();
    SecretPath::new(ns, name).map_err(|e| {
        SyncError::Unsupported(format!(
            "HSMSecret {ns}/{name} cannot be stored in an HSM: {e}"
        ))
    })
}

fn namespace(object: &HSMSecret) -> &str {
    object.metadata.namespace.as_deref().unwrap_or_default()
}

/// The source Secret's name, checked to be a plain name (so it resolves in this
/// namespace and nowhere else).
pub fn source_name(object: &HSMSecret) -> Result<Option<&str>, SyncError> {
    let Some(source) = &object.spec.source else {
        return Ok(None);
    };
    let name = source.secret_ref.name.as_str();
    let invalid = |why: &str| SyncError::InvalidSource {
        namespace: namespace(object).into(),
        name: name.into(),
        why: why.into(),
    };
    match secret_name_problem(name) {
        Some(why) => Err(invalid(why)),
        None => Ok(Some(name)),
    }
}

/// `spec.secretName`, checked like the source: a plain Secret name of this namespace,
/// never looked up or written when it is not one.
pub fn copy_name(object: &HSMSecret) -> Result<Option<&str>, SyncError> {
    let Some(name) = object.spec.secret_name.as_deref() else {
        return Ok(None);
    };
    match secret_name_problem(name) {
        Some(why) => Err(SyncError::InvalidCopyName {
            namespace: namespace(object).into(),
            name: name.into(),
            why: why.into(),
        }),
        None => Ok(Some(name)),
    }
}

/// Why `name` is not a Secret name (a DNS subdomain), if it is not one.
fn secret_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 253 {
        return Some("it must have 1 to 253 characters");
    }
    let dns = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    (!dns).then_some(
        "it must be a DNS subdomain (lowercase letters, digits, '-', '.'); a '/' or namespace prefix is not allowed",
    )
}

/// The HSM write an import needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Import {
    /// No source, or this source version is already recorded as imported.
    Nothing,
    /// The HSM already holds what the import asks for: record it without a write.
    AlreadyThere {
        source_version: String,
    },
    Write {
        data: SecretData,
        expect: Expect,
        epoch: u64,
        primary: String,
        source_version: String,
    },
    Refused(SyncError),
}

/// What the import step ended with (after its IO).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImportResult {
    Nothing,
    Imported {
        source_version: String,
        /// A new HSM version was written.
        wrote: bool,
    },
    Failed(SyncError),
}

fn remove_keys(source: &Secret) -> Vec<String> {
    source
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REMOVE_KEYS_ANNOTATION))
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

pub fn plan_import(inputs: &Inputs) -> Import {
    let object = inputs.object;
    let name = match source_name(object) {
        Ok(Some(name)) => name,
        Ok(None) => return Import::Nothing,
        Err(e) => return Import::Refused(e),
    };
    let ns = namespace(object);
    let source_label = format!("{ns}/{name}");
    let imported = object
        .status
        .as_ref()
        .and_then(|s| s.imported_source_version.as_deref());
    let Some(source) = inputs.source else {
        // An import Secret is deleted once imported: a missing one is expected then.
        return if imported.is_some() {
            Import::Nothing
        } else {
            Import::Refused(SyncError::SourceNotFound {
                namespace: ns.into(),
                name: name.into(),
            })
        };
    };
    let source_version = source.metadata.resource_version.clone().unwrap_or_default();
    if imported == Some(source_version.as_str()) {
        return Import::Nothing;
    }
    // Whoever may write the Secret consents to its import by labelling it: an HSMSecret
    // alone cannot pull (and, with deleteAfterImport, delete) any Secret of the namespace.
    let hsm_secret = object.metadata.name.as_deref().unwrap_or_default();
    let labelled_for = source
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(IMPORT_FOR_LABEL));
    if labelled_for.map(String::as_str) != Some(hsm_secret) {
        return Import::Refused(SyncError::SourceNotLabelled {
            namespace: ns.into(),
            name: name.into(),
            hsm_secret: hsm_secret.into(),
        });
    }
    let path = match hsm_path(object) {
        Ok(p) => p,
        Err(e) => return Import::Refused(e),
    };
    let mode = object
        .spec
        .source
        .as_ref()
        .and_then(|s| s.mode)
        .unwrap_or_default();
    let current = match inputs.hsm {
        HsmContent::Live { data, version, .. } => Some((*version, data)),
        HsmContent::Absent => None,
        HsmContent::Unavailable(e) => return Import::Refused(e.clone()),
    };
    let mut target = match (mode, current) {
        (ImportMode::Merge, Some((_, data))) => data.clone(),
        _ => SecretData::new(),
    };
    for (key, value) in source.data.iter().flatten() {
        if let Err(e) = target.insert(key, value.0.clone()) {
            return Import::Refused(SyncError::InvalidKey {
                source_name: source_label,
                key: key.clone(),
                why: invalid_key_reason(&e),
            });
        }
    }
    for key in remove_keys(source) {
        target.remove(&key);
    }
    if target.is_empty() {
        return Import::Refused(SyncError::EmptyResult {
            source_name: source_label,
            path: path.to_string(),
        });
    }
    if current.is_some_and(|(_, data)| *data == target) {
        return Import::AlreadyThere { source_version };
    }
    if let Some(refusal) = inputs.device.refusal() {
        return Import::Refused(refusal);
    }
    let DeviceAccess::Writable { primary, epoch } = inputs.device else {
        return Import::Nothing;
    };
    Import::Write {
        data: target,
        expect: match current {
            Some((version, _)) => Expect::Version(version),
            None => Expect::Absent,
        },
        epoch: *epoch,
        primary: primary.clone(),
        source_version,
    }
}

/// The reason part of a key validation error (its text names the key, never a value).
fn invalid_key_reason(e: &crate::hsm::StoreError) -> String {
    match e {
        crate::hsm::StoreError::InvalidName { why, .. } => why.clone(),
        other => other.kind().to_string(),
    }
}

/// A write to the managed Secret. `Debug` shows the Secret by name and key names only.
#[derive(Clone, PartialEq)]
pub enum SecretWrite {
    Create(Secret),
    /// Replace under the resourceVersion it carries.
    Replace(Secret),
    /// The type changed (immutable in Kubernetes): delete at `resource_version`, create.
    Recreate {
        resource_version: String,
        secret: Secret,
    },
    /// The HSM no longer holds the secret.
    Delete {
        name: String,
        resource_version: String,
    },
}

/// A Secret as `Debug` may show it: name, type and key names, never the values (the
/// derived `Debug` of `Secret` prints every byte).
struct Redacted<'a>(&'a Secret);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&String> = self.0.data.iter().flat_map(|d| d.keys()).collect();
        f.debug_struct("Secret")
            .field("name", &self.0.metadata.name)
            .field("resource_version", &self.0.metadata.resource_version)
            .field("type", &self.0.type_)
            .field("keys", &keys)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SecretWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretWrite::Create(s) => f.debug_tuple("Create").field(&Redacted(s)).finish(),
            SecretWrite::Replace(s) => f.debug_tuple("Replace").field(&Redacted(s)).finish(),
            SecretWrite::Recreate {
                resource_version,
                secret,
            } => f
                .debug_struct("Recreate")
                .field("resource_version", resource_version)
                .field("secret", &Redacted(secret))
                .finish(),
            SecretWrite::Delete {
                name,
                resource_version,
            } => f
                .debug_struct("Delete")
                .field("name", name)
                .field("resource_version", resource_version)
                .finish(),
        }
    }
}

impl std::fmt::Debug for Inputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("object", &self.object.metadata.name)
            .field("device", self.device)
            .field("hsm", self.hsm)
            .field("source", &self.source.map(Redacted))
            .field("managed", &self.managed.map(Redacted))
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// Whether `secret` is controlled by `object` (never adopt anything else).
pub fn controlled_by(secret: &Secret, object: &HSMSecret) -> bool {
    let Some(uid) = object.metadata.uid.as_deref() else {
        return false;
    };
    secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid && o.kind == "HSMSecret")
}

fn owner_reference(object: &HSMSecret) -> OwnerReference {
    OwnerReference {
        api_version: HSMSecret::api_version(&()).into_owned(),
        kind: HSMSecret::kind(&()).into_owned(),
        name: object.metadata.name.clone().unwrap_or_default(),
        uid: object.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn secret_data(data: &SecretData) -> BTreeMap<String, ByteString> {
    data.iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
        .collect()
}

fn same_data(secret: &Secret, data: &SecretData) -> bool {
    let have = secret.data.as_ref();
    let count = have.map_or(0, BTreeMap::len);
    count == data.len()
        && data
            .iter()
            .all(|(k, v)| have.and_then(|h| h.get(k)).is_some_and(|b| b.0 == v))
}

/// How to bring the managed Secret in line with the HSM content; an error when the
/// Secret of that name belongs to someone else.
pub fn plan_secret(inputs: &Inputs) -> Result<Option<SecretWrite>, SyncError> {
    let object = inputs.object;
    let Some(name) = copy_name(object)? else {
        return Ok(None);
    };
    let ns = namespace(object);
    if let Some(existing) = inputs.managed
        && !controlled_by(existing, object)
    {
        return Err(SyncError::SecretNotOwned {
            namespace: ns.into(),
            name: name.into(),
        });
    }
    let (version, data) = match inputs.hsm {
        HsmContent::Unavailable(_) => return Ok(None),
        HsmContent::Absent => {
            return Ok(inputs.managed.map(|m| SecretWrite::Delete {
                name: name.into(),
                resource_version: m.metadata.resource_version.clone().unwrap_or_default(),
            }));
        }
        HsmContent::Live { version, data, .. } => (*version, data),
    };
    let type_ = object.spec.secret_type().to_string();
    let labels = [
        (DEVICE_LABEL.to_string(), object.spec.device_ref.clone()),
        (VERSION_LABEL.to_string(), version.to_string()),
    ];
    let Some(existing) = inputs.managed else {
        return Ok(Some(SecretWrite::Create(Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some(labels.into_iter().collect()),
                owner_references: Some(vec![owner_reference(object)]),
                ..Default::default()
            },
            type_: Some(type_),
            data: Some(secret_data(data)),
            ..Default::default()
        })));
    };
    let labels_ok = labels.iter().all(|(k, v)| {
        existing
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(k))
            .is_some_and(|have| have == v)
    });
    let type_ok = existing.type_.as_deref().unwrap_or("Opaque") == type_;
    if labels_ok && type_ok && same_data(existing, data) && existing.string_data.is_none() {
        return Ok(None);
    }
    // Keep what others added (labels, annotations); own only data, type and our labels.
    let mut next = existing.clone();
    next.metadata.managed_fields = None;
    next.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(labels);
    next.data = Some(secret_data(data));
    next.string_data = None;
    next.type_ = Some(type_);
    if type_ok {
        Ok(Some(SecretWrite::Replace(next)))
    } else {
        let resource_version = existing
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        next.metadata.resource_version = None;
        next.metadata.uid = None;
        next.metadata.creation_timestamp = None;
        Ok(Some(SecretWrite::Recreate {
            resource_version,
            secret: next,
        }))
    }
}

/// The source Secret to delete after a verified import: `(name, resourceVersion)`.
pub fn plan_source_cleanup(inputs: &Inputs, import: &ImportResult) -> Option<(String, String)> {
    let source = inputs.object.spec.source.as_ref()?;
    if source.delete_after_import != Some(true) {
        return None;
    }
    let existing = inputs.source?;
    let rv = existing.metadata.resource_version.clone()?;
    let imported = match import {
        ImportResult::Imported { source_version, .. } => Some(source_version.as_str()),
        ImportResult::Nothing => inputs
            .object
            .status
            .as_ref()
            .and_then(|s| s.imported_source_version.as_deref()),
        ImportResult::Failed(_) => None,
    };
    (imported == Some(rv.as_str()))
        .then(|| (existing.metadata.name.clone().unwrap_or_default(), rv))
}

/// The status after a reconcile, whether it differs from the stored one, and the Event.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusPlan {
    pub status: HSMSecretStatus,
    pub changed: bool,
    pub event: Option<EventRecord>,
}

pub fn plan_status(
    inputs: &Inputs,
    import: &ImportResult,
    secret_written: bool,
    secret_error: Option<&SyncError>,
) -> StatusPlan {
    let object = inputs.object;
    let prev = object.status.clone().unwrap_or_default();
    let mut next = prev.clone();
    next.observed_generation = object.metadata.generation;
    match inputs.hsm {
        HsmContent::Live {
            version,
            data,
            served_by,
        } => {
            next.version = Some(*version);
            next.digest = hsm_path(object).ok().map(|p| inputs.key.digest(&p, data));
            next.keys = data.keys().map(String::from).collect();
            next.served_by = Some(served_by.clone());
        }
        HsmContent::Absent => {
            next.version = None;
            next.digest = None;
            next.keys = Vec::new();
            next.served_by = None;
        }
        // Keep the last known facts while no agent answers.
        HsmContent::Unavailable(_) => {}
    }
    if let ImportResult::Imported { source_version, .. } = import {
        next.imported_source_version = Some(source_version.clone());
    }
    let error = match (import, inputs.hsm, secret_error) {
        (ImportResult::Failed(e), _, _) => Some(e),
        (_, HsmContent::Unavailable(e), _) => Some(e),
        (_, _, Some(e)) => Some(e),
        _ => None,
    };
    let pending = matches!(inputs.hsm, HsmContent::Absent);
    next.sync_status = match (error, pending) {
        (Some(_), _) => SyncStatus::Error,
        (None, true) => SyncStatus::Pending,
        (None, false) => SyncStatus::InSync,
    };
    next.last_error = error.map(ToString::to_string);
    let path = hsm_path(object).map(|p| p.to_string()).unwrap_or_default();
    let (cond_status, reason, message) = match (error, pending) {
        (Some(e), _) => ("False", e.kind().reason(), e.to_string()),
        (None, true) => (
            "False",
            "Pending",
            format!(
                "no secret at {path} in HSMDevice {} yet",
                object.spec.device_ref
            ),
        ),
        (None, false) => ("True", "Synced", synced_message(object, &next)),
    };
    next.conditions = vec![condition(
        prev.conditions.iter().find(|c| c.type_ == READY_CONDITION),
        cond_status,
        reason,
        message,
        object.metadata.generation,
        inputs.now,
    )];
    // lastSyncTime moves only with a change, so an unchanged pass writes nothing.
    next.last_sync_time = prev.last_sync_time.clone();
    let changed = next != prev || secret_written;
    if changed && error.is_none() {
        next.last_sync_time = Some(Time(inputs.now));
    }
    let changed = next != prev;

    let wrote = matches!(import, ImportResult::Imported { wrote: true, .. });
    let event = match error {
        Some(e) if prev.last_error.as_deref() != Some(e.to_string().as_str()) => {
            Some(EventRecord {
                type_: EventType::Warning,
                reason: crate::contract::reasons::SECRET_SYNC_FAILED.into(),
                action: "Sync".into(),
                message: e.to_string(),
            })
        }
        None if next.sync_status == SyncStatus::InSync
            && (wrote
                || secret_written
                || prev.sync_status != SyncStatus::InSync
                || prev.version != next.version) =>
        {
            Some(EventRecord {
                type_: EventType::Normal,
                reason: crate::contract::reasons::SECRET_SYNCED.into(),
                action: if wrote { "Import" } else { "Sync" }.into(),
                message: synced_message(object, &next),
            })
        }
        _ => None,
    };
    StatusPlan {
        status: next,
        changed,
        event,
    }
}

fn synced_message(object: &HSMSecret, status: &HSMSecretStatus) -> String {
    let mut m = format!(
        "version {} in HSMDevice {} (keys: {})",
        status.version.unwrap_or_default(),
        object.spec.device_ref,
        status.keys.join(", ")
    );
    if let Some(name) = &object.spec.secret_name {
        m.push_str(&format!("; Secret {name} in sync"));
    }
    m
}

fn condition(
    prev: Option<&Condition>,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let last_transition_time = match prev {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: READY_CONDITION.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// What deleting an HSMSecret takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleanup {
    /// The managed Secret `(name, resourceVersion)`, when this HSMSecret controls it.
    pub delete_secret: Option<(String, String)>,
    /// deletionPolicy Delete: the tombstone to write on the primary.
    pub tombstone: Option<Tombstone>,
    /// Why the finalizer must stay for now.
    pub blocked: Option<SyncError>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tombstone {
    pub expect: Expect,
    pub epoch: u64,
    pub primary: String,
}

pub fn plan_cleanup(inputs: &Inputs) -> Cleanup {
    let object = inputs.object;
    let delete_secret = match (object.spec.secret_name.as_deref(), inputs.managed) {
        (Some(name), Some(m)) if controlled_by(m, object) => Some((
            name.to_string(),
            m.metadata.resource_version.clone().unwrap_or_default(),
        )),
        _ => None,
    };
    let mut cleanup = Cleanup {
        delete_secret,
        tombstone: None,
        blocked: None,
    };
    if object.spec.deletion_policy() != DeletionPolicy::Delete {
        return cleanup;
    }
    match inputs.hsm {
        HsmContent::Absent => {}
        HsmContent::Unavailable(e) => cleanup.blocked = Some(e.clone()),
        HsmContent::Live { version, .. } => match inputs.device {
            DeviceAccess::Writable { primary, epoch } => {
                cleanup.tombstone = Some(Tombstone {
                    expect: Expect::Version(*version),
                    epoch: *epoch,
                    primary: primary.clone(),
                });
            }
            other => cleanup.blocked = other.refusal(),
        },
    }
    cleanup
}

#[cfg(test)]
mod tests;
