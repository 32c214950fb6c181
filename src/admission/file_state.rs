//! What the webhook knows without a cluster (`webhook --state DIR`): the HSMDevices and HSMSecrets of a
//! file-backed state directory ([`FileState`]), re-read in the background so the
//! admission rules keep reading memory, as they do over informer caches.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::{AdmissionState, MemoryState};
use crate::crd::{HSMDevice, HSMSecret};
use crate::state::{FileState, StateError, StateStore};

/// How often the state directory is re-read: the controller's status writes reach
/// the validating rules within this delay.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(100);

/// Admission state mirrored from a state directory.
#[derive(Clone)]
pub struct FileAdmissionState {
    memory: Arc<MemoryState>,
    synced: Arc<AtomicBool>,
}

impl FileAdmissionState {
    /// Opens `dir` and returns the state plus the future that keeps it current (it runs
    /// until dropped; poll it on a Tokio runtime).
    pub fn watch(
        dir: impl Into<PathBuf>,
    ) -> Result<(Self, impl Future<Output = ()> + Send + 'static), StateError> {
        let files = FileState::open(dir.into())?;
        let state = Self {
            memory: Arc::new(MemoryState::new()),
            synced: Arc::new(AtomicBool::new(false)),
        };
        let this = state.clone();
        let drive = async move {
            let mut reported = false;
            loop {
                match this.refresh(&files).await {
                    Ok(()) => {
                        this.synced.store(true, Ordering::Release);
                        reported = false;
                    }
                    Err(error) if !reported => {
                        tracing::warn!(%error, "cannot read the state directory; keeping the last view");
                        reported = true;
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(REFRESH_INTERVAL).await;
            }
        };
        Ok((state, drive))
    }

    async fn refresh(&self, files: &FileState) -> Result<(), StateError> {
        let devices: Vec<HSMDevice> = files.list_devices().await?;
        let secrets: Vec<HSMSecret> = files.list_secrets().await?;
        let names = |d: &HSMDevice| d.metadata.name.clone().unwrap_or_default();
        for gone in self.memory.devices() {
            if !devices.iter().any(|d| names(d) == names(&gone)) {
                self.memory.remove_device(&names(&gone));
            }
        }
        for device in devices {
            self.memory.put_device(device);
        }
        for secret in secrets {
            self.memory.put_secret(secret);
        }
        Ok(())
    }
}

impl AdmissionState for FileAdmissionState {
    fn device(&self, name: &str) -> Option<Arc<HSMDevice>> {
        self.memory.device(name)
    }
    fn devices(&self) -> Vec<Arc<HSMDevice>> {
        self.memory.devices()
    }
    fn secret(&self, namespace: &str, name: &str) -> Option<Arc<HSMSecret>> {
        self.memory.secret(namespace, name)
    }
    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DevicePhase, HSMDeviceStatus};

    #[tokio::test]
    async fn follows_status_written_to_the_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let files = FileState::open(dir.path()).expect("state");
        let device = crate::local::cluster::demo_device(
            "/usr/lib/softhsm/libsofthsm2.so",
            &Default::default(),
        );
        let stored = files.apply_device(&device).expect("apply");
        let (state, drive) = FileAdmissionState::watch(dir.path()).expect("watch");
        let task = tokio::spawn(drive);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !state.is_synced() {
            assert!(tokio::time::Instant::now() < deadline, "never synced");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(state.device("prod-hsm").is_some());
        let status = HSMDeviceStatus {
            phase: DevicePhase::ReadOnlyFallback,
            ..HSMDeviceStatus::default()
        };
        files
            .replace_device_status(
                "prod-hsm",
                stored.metadata.resource_version.as_deref().expect("rv"),
                &status,
            )
            .await
            .expect("status");
        loop {
            let phase = state
                .device("prod-hsm")
                .and_then(|d| d.status.clone())
                .map(|s| s.phase);
            if phase == Some(DevicePhase::ReadOnlyFallback) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "status not seen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }
}
