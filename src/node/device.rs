//! The HSM on this node: a [`SecretStore`] once its token is open.
//!
//! Opening can fail for reasons an operator fixes while the plugin runs (token not plugged
//! in, PIN Secret not yet created), so the plugin keeps serving and retries in the
//! background instead of exiting: a crash loop would only delay the fix.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::VolumeError;
use crate::crd::DeviceRole;
use crate::hsm::{SecretStore, StoreError};

enum State {
    Opening { reason: String },
    Open(Arc<dyn SecretStore>),
}

/// One HSMDevice's token on this node (primary or mirror: reads do not care).
pub struct LocalDevice {
    name: String,
    state: RwLock<State>,
    /// The role of this node's agent, once it runs (for the audit trail).
    role: std::sync::OnceLock<RoleSource>,
}

type RoleSource = Box<dyn Fn() -> DeviceRole + Send + Sync>;

impl LocalDevice {
    /// A device whose token is being opened.
    pub fn opening(name: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            state: RwLock::new(State::Opening {
                reason: "the token has not been opened yet".into(),
            }),
            role: std::sync::OnceLock::new(),
        })
    }

    /// A device whose token is open.
    pub fn open(name: impl Into<String>, store: Arc<dyn SecretStore>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            state: RwLock::new(State::Open(store)),
            role: std::sync::OnceLock::new(),
        })
    }

    /// The HSMDevice name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where reads learn this token's role: the agent serving it in this process.
    pub fn set_role_source(&self, role: impl Fn() -> DeviceRole + Send + Sync + 'static) {
        let _ = self.role.set(Box::new(role));
    }

    /// The token's role, when an agent in this process serves it.
    pub fn role(&self) -> Option<DeviceRole> {
        self.role.get().map(|role| role())
    }

    pub fn is_open(&self) -> bool {
        matches!(*self.read(), State::Open(_))
    }

    /// The store, or why there is none yet.
    pub fn store(&self) -> Result<Arc<dyn SecretStore>, VolumeError> {
        match &*self.read() {
            State::Open(store) => Ok(store.clone()),
            State::Opening { reason } => Err(VolumeError::DeviceNotOpen {
                device: self.name.clone(),
                reason: reason.clone(),
            }),
        }
    }

    pub fn set_open(&self, store: Arc<dyn SecretStore>) {
        *self.write() = State::Open(store);
    }

    /// Records why opening failed (shown by Probe, /readyz and publish errors).
    pub fn set_opening_failed(&self, reason: String) {
        *self.write() = State::Opening { reason };
    }

    /// Calls `open` until it succeeds, backing off from `initial` to `max` between
    /// attempts, logging each failure's reason and handing it to `failed` (metrics,
    /// Events). A refused PIN costs no login on later attempts: the store checks the
    /// PIN file against the refusal first.
    pub async fn open_with_retry<F, Fut>(
        &self,
        mut open: F,
        initial: Duration,
        max: Duration,
        mut failed: impl FnMut(&StoreError),
    ) where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Arc<dyn SecretStore>, StoreError>>,
    {
        let mut delay = initial;
        loop {
            match open().await {
                Ok(store) => {
                    tracing::info!(device = %self.name, token = store.token_label(), "HSM token open");
                    self.set_open(store);
                    return;
                }
                Err(error) => {
                    tracing::warn!(
                        device = %self.name,
                        %error,
                        kind = error.kind(),
                        retry_in = ?delay,
                        "cannot open the HSM token; until it opens, publishing reads through the device's agents when remote reads are configured, else answers Unavailable"
                    );
                    failed(&error);
                    self.set_opening_failed(error.to_string());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(max);
                }
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::hsm::MemoryStore;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_token_opens_and_reports_why_meanwhile() {
        let device = LocalDevice::opening("prod-hsm");
        let attempts = Arc::new(AtomicU32::new(0));
        let opener = {
            let (device, attempts) = (device.clone(), attempts.clone());
            tokio::spawn(async move {
                device
                    .open_with_retry(
                        || {
                            let n = attempts.fetch_add(1, Ordering::SeqCst);
                            async move {
                                if n < 3 {
                                    Err(StoreError::PinFile {
                                        path: "/etc/hsm/pin".into(),
                                        detail: "No such file".into(),
                                    })
                                } else {
                                    Ok(Arc::new(MemoryStore::new("tok")) as Arc<dyn SecretStore>)
                                }
                            }
                        },
                        Duration::from_secs(1),
                        Duration::from_secs(4),
                        |_| {},
                    )
                    .await
            })
        };
        while attempts.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let err = device.store().err().unwrap().to_string();
        assert!(
            err.contains("/etc/hsm/pin") && err.contains("retrying"),
            "{err}"
        );
        opener.await.unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 4);
        assert!(device.is_open());
        assert_eq!(device.store().ok().unwrap().token_label(), "tok");
    }
}
