//! The state store of the no-cluster mode: one directory, YAML objects, JSON-lines
//! Events, replaced atomically (write + rename) under an advisory lock so several local
//! processes (controller, node plugins, webhook, CLI) share it safely.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{EventRecord, ObjectRef, StateError, StateStore};
use crate::crd::{HSMDevice, HSMDeviceStatus, HSMSecret, HSMSecretStatus};

/// A directory holding devices/, secrets/, nodes/, leases/ and events.jsonl.
#[derive(Clone, Debug)]
pub struct FileState {
    root: PathBuf,
}

/// One recorded Event, as stored in events.jsonl.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoredEvent {
    pub time_ms: u64,
    pub regarding: ObjectRef,
    pub event: EventRecord,
}

#[derive(Serialize, Deserialize)]
struct LeaseFile {
    holder: String,
    renewed_ms: u64,
    duration_ms: u64,
}

impl FileState {
    /// Opens (creating if needed) a state directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let root = root.into();
        for sub in ["devices", "secrets", "nodes", "leases"] {
            std::fs::create_dir_all(root.join(sub)).map_err(|e| file_err(&root.join(sub), e))?;
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates or updates a device's spec (keeps its status; bumps generation when the
    /// spec changed).
    pub fn apply_device(&self, device: &HSMDevice) -> Result<HSMDevice, StateError> {
        let name = object_name(&device.metadata.name, "HSMDevice")?;
        let path = self.root.join("devices").join(format!("{name}.yaml"));
        self.locked(|| {
            let current: Option<HSMDevice> = read_yaml(&path)?;
            let mut next = device.clone();
            next.status = current.as_ref().and_then(|c| c.status.clone());
            bump(
                &mut next.metadata,
                current
                    .as_ref()
                    .map(|c| (&c.metadata, c.spec != device.spec)),
            );
            write_yaml(&path, &next)?;
            Ok(next)
        })
    }

    /// Creates or updates an HSMSecret's spec.
    pub fn apply_secret(&self, secret: &HSMSecret) -> Result<HSMSecret, StateError> {
        let path = self.secret_path(
            secret.metadata.namespace.as_deref(),
            secret.metadata.name.as_deref(),
        )?;
        self.locked(|| {
            let current: Option<HSMSecret> = read_yaml(&path)?;
            let mut next = secret.clone();
            next.status = current.as_ref().and_then(|c| c.status.clone());
            bump(
                &mut next.metadata,
                current
                    .as_ref()
                    .map(|c| (&c.metadata, c.spec != secret.spec)),
            );
            write_yaml(&path, &next)?;
            Ok(next)
        })
    }

    /// Every Event recorded so far, oldest first.
    pub fn events(&self) -> Result<Vec<StoredEvent>, StateError> {
        let path = self.root.join("events.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(file_err(&path, e)),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| file_err(&path, e)))
            .collect()
    }

    /// The labels set on a node.
    pub fn node_labels(&self, node: &str) -> Result<BTreeMap<String, String>, StateError> {
        let path = self
            .root
            .join("nodes")
            .join(format!("{}.json", object_name(&Some(node.into()), "Node")?));
        Ok(read_json(&path)?.unwrap_or_default())
    }

    fn secret_path(&self, ns: Option<&str>, name: Option<&str>) -> Result<PathBuf, StateError> {
        let ns = object_name(&ns.map(String::from), "namespace")?;
        let name = object_name(&name.map(String::from), "HSMSecret")?;
        Ok(self.root.join("secrets").join(format!("{ns}_{name}.yaml")))
    }

    /// Runs `f` holding the directory's exclusive lock.
    fn locked<T>(&self, f: impl FnOnce() -> Result<T, StateError>) -> Result<T, StateError> {
        let path = self.root.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| file_err(&path, e))?;
        let _lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| file_err(&path, errno))?;
        f()
    }

    fn list<T: DeserializeOwned>(&self, dir: &str) -> Result<Vec<T>, StateError> {
        let dir = self.root.join(dir);
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| file_err(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        names.sort();
        let mut out = Vec::new();
        for p in names {
            if let Some(obj) = read_yaml(&p)? {
                out.push(obj);
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl StateStore for FileState {
    async fn list_devices(&self) -> Result<Vec<HSMDevice>, StateError> {
        self.list("devices")
    }

    async fn get_device(&self, name: &str) -> Result<Option<HSMDevice>, StateError> {
        let name = object_name(&Some(name.into()), "HSMDevice")?;
        read_yaml(&self.root.join("devices").join(format!("{name}.yaml")))
    }

    async fn replace_device_status(
        &self,
        name: &str,
        resource_version: &str,
        status: &HSMDeviceStatus,
    ) -> Result<HSMDevice, StateError> {
        let name = object_name(&Some(name.into()), "HSMDevice")?;
        let path = self.root.join("devices").join(format!("{name}.yaml"));
        self.locked(|| {
            let mut dev: HSMDevice = read_yaml(&path)?.ok_or_else(|| StateError::NotFound {
                kind: "HSMDevice",
                name: name.clone(),
            })?;
            check_version(&dev.metadata, resource_version, "HSMDevice", &name)?;
            dev.status = Some(status.clone());
            let previous = dev.metadata.clone();
            bump(&mut dev.metadata, Some((&previous, false)));
            write_yaml(&path, &dev)?;
            Ok(dev)
        })
    }

    async fn clear_device_annotation(&self, name: &str, key: &str) -> Result<(), StateError> {
        let name = object_name(&Some(name.into()), "HSMDevice")?;
        let path = self.root.join("devices").join(format!("{name}.yaml"));
        self.locked(|| {
            let Some(mut dev): Option<HSMDevice> = read_yaml(&path)? else {
                return Ok(());
            };
            let removed = dev
                .metadata
                .annotations
                .as_mut()
                .is_some_and(|a| a.remove(key).is_some());
            if removed {
                let previous = dev.metadata.clone();
                bump(&mut dev.metadata, Some((&previous, false)));
                write_yaml(&path, &dev)?;
            }
            Ok(())
        })
    }

    async fn list_secrets(&self) -> Result<Vec<HSMSecret>, StateError> {
        self.list("secrets")
    }

    async fn get_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<HSMSecret>, StateError> {
        read_yaml(&self.secret_path(Some(namespace), Some(name))?)
    }

    async fn replace_secret_status(
        &self,
        namespace: &str,
        name: &str,
        resource_version: &str,
        status: &HSMSecretStatus,
    ) -> Result<HSMSecret, StateError> {
        let path = self.secret_path(Some(namespace), Some(name))?;
        self.locked(|| {
            let mut s: HSMSecret = read_yaml(&path)?.ok_or_else(|| StateError::NotFound {
                kind: "HSMSecret",
                name: format!("{namespace}/{name}"),
            })?;
            check_version(&s.metadata, resource_version, "HSMSecret", name)?;
            s.status = Some(status.clone());
            let previous = s.metadata.clone();
            bump(&mut s.metadata, Some((&previous, false)));
            write_yaml(&path, &s)?;
            Ok(s)
        })
    }

    async fn record_event(
        &self,
        regarding: &ObjectRef,
        event: &EventRecord,
    ) -> Result<(), StateError> {
        let path = self.root.join("events.jsonl");
        let line = serde_json::to_string(&StoredEvent {
            time_ms: now_ms(),
            regarding: regarding.clone(),
            event: event.clone(),
        })
        .map_err(|e| file_err(&path, e))?;
        self.locked(|| {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| file_err(&path, e))?;
            writeln!(f, "{line}").map_err(|e| file_err(&path, e))
        })
    }

    async fn set_node_label(
        &self,
        node: &str,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), StateError> {
        let node = object_name(&Some(node.into()), "Node")?;
        let path = self.root.join("nodes").join(format!("{node}.json"));
        self.locked(|| {
            let mut labels: BTreeMap<String, String> = read_json(&path)?.unwrap_or_default();
            match value {
                Some(v) => labels.insert(key.into(), v.into()),
                None => labels.remove(key),
            };
            write_atomic(
                &path,
                &serde_json::to_vec_pretty(&labels).map_err(|e| file_err(&path, e))?,
            )
        })
    }

    async fn acquire_lease(
        &self,
        lease: &str,
        holder: &str,
        duration: Duration,
    ) -> Result<bool, StateError> {
        let lease = object_name(&Some(lease.into()), "Lease")?;
        let path = self.root.join("leases").join(format!("{lease}.json"));
        self.locked(|| {
            let now = now_ms();
            let current: Option<LeaseFile> = read_json(&path)?;
            if let Some(c) = &current
                && c.holder != holder
                && now < c.renewed_ms + c.duration_ms
            {
                return Ok(false);
            }
            let next = LeaseFile {
                holder: holder.into(),
                renewed_ms: now,
                duration_ms: duration.as_millis() as u64,
            };
            write_atomic(
                &path,
                &serde_json::to_vec(&next).map_err(|e| file_err(&path, e))?,
            )?;
            Ok(true)
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Names become file names: only Kubernetes name characters.
fn object_name(name: &Option<String>, kind: &'static str) -> Result<String, StateError> {
    match name {
        Some(n)
            if !n.is_empty()
                && n.len() <= 253
                && n.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                })
                && !n.starts_with('.') =>
        {
            Ok(n.clone())
        }
        _ => Err(StateError::File {
            path: kind.into(),
            detail: format!("{kind} name {name:?} is not a valid Kubernetes name"),
        }),
    }
}

fn check_version(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    expected: &str,
    kind: &'static str,
    name: &str,
) -> Result<(), StateError> {
    if meta.resource_version.as_deref() == Some(expected) {
        Ok(())
    } else {
        Err(StateError::Conflict {
            kind,
            name: name.into(),
            expected: expected.into(),
        })
    }
}

/// Advances resourceVersion (and generation when the spec changed) and stamps
/// creationTimestamp on create (kept on update), as the API server does.
fn bump(
    meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    previous: Option<(
        &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        bool,
    )>,
) {
    let (rv, generation) = match previous {
        Some((p, spec_changed)) => (
            p.resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                + 1,
            p.generation.unwrap_or(1) + i64::from(spec_changed),
        ),
        None => (1, 1),
    };
    // The server owns creationTimestamp: whatever the client sent is replaced. Whole
    // seconds, as the API server stores it (and as it reads back from the YAML).
    meta.creation_timestamp = match previous {
        Some((p, _)) => p.creation_timestamp.clone(),
        None => {
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            k8s_openapi::jiff::Timestamp::from_second(now)
                .ok()
                .map(Time)
        }
    };
    meta.resource_version = Some(rv.to_string());
    meta.generation = Some(generation);
}

fn read_yaml<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_saphyr::from_str(&text)
            .map(Some)
            .map_err(|e| file_err(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err(path, e)),
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| file_err(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err(path, e)),
    }
}

fn write_yaml<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let text = serde_saphyr::to_string(value).map_err(|e| file_err(path, e))?;
    write_atomic(path, text.as_bytes())
}

/// Write to a temporary file, then rename: readers see the old or the new file.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut f: File = File::create(&tmp).map_err(|e| file_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| file_err(&tmp, e))?;
    f.sync_all().map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> StateError {
    StateError::File {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::crd::{HSMSecretSpec, MirroringPolicy};

    fn device(policy: MirroringPolicy) -> HSMDevice {
        let mut device =
            crate::local::cluster::demo_device("/lib/softhsm2.so", &Default::default());
        if let Some(m) = device.spec.mirroring.as_mut() {
            m.policy = policy;
        }
        device
    }

    #[test]
    fn creation_timestamp_is_set_on_create_and_kept_on_update() {
        let dir = tempfile::tempdir().unwrap();
        let state = FileState::open(dir.path()).unwrap();
        let before = k8s_openapi::jiff::Timestamp::from_second(
            k8s_openapi::jiff::Timestamp::now().as_second(),
        )
        .unwrap();
        let mut sent = device(MirroringPolicy::ReadOnly);
        // A client-supplied value is not the server's to keep.
        sent.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let created = state.apply_device(&sent).unwrap();
        let stamp = created.metadata.creation_timestamp.clone().unwrap();
        assert!(stamp.0 >= before, "{stamp:?} is the time of creation");

        let updated = state
            .apply_device(&device(MirroringPolicy::Active))
            .unwrap();
        assert_eq!(updated.metadata.generation, Some(2));
        assert_eq!(updated.metadata.creation_timestamp, Some(stamp.clone()));
        let read: HSMDevice = read_yaml(&dir.path().join("devices/prod-hsm.yaml"))
            .unwrap()
            .unwrap();
        assert_eq!(read.metadata.creation_timestamp, Some(stamp));

        let mut secret = HSMSecret::new(
            "db",
            HSMSecretSpec {
                device_ref: "prod-hsm".into(),
                secret_name: None,
                secret_type: None,
                sync_interval: None,
                source: None,
                access: None,
                deletion_policy: None,
            },
        );
        secret.metadata.namespace = Some("shop".into());
        let first = state.apply_secret(&secret).unwrap();
        let stamp = first.metadata.creation_timestamp.clone().unwrap();
        assert!(stamp.0 >= before);
        let again = state.apply_secret(&secret).unwrap();
        assert_eq!(again.metadata.creation_timestamp, Some(stamp));
    }
}
