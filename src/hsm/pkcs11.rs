//! The secret store over a PKCS#11 token (via `cryptoki`).
//!
//! Blocking PKCS#11 calls run on tokio's blocking pool under a timeout. Sessions are
//! pooled; a device loss drops the pool and the next call finds the token again by
//! label (slot ids change on re-insertion) and logs in again.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use secrecy::ExposeSecret;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroizing;

mod archive_key;
pub use archive_key::TransportPublicKey;

#[cfg(feature = "fault-injection")]
use super::FaultPlan;
use super::handles::{Entry, HandleCache, Lookup};
use super::layout::{self, DATA_APP, META_APP, Meta};
use super::pin_refusal::PinRefusals;
use super::{
    Body, Expect, GcReport, ManifestEntry, Record, SecretData, SecretPath, SecretStore, StoreError,
    TokenInfo,
};

/// How to reach one token.
#[derive(Clone, Debug)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module.
    pub library: PathBuf,
    /// Token label, matched exactly.
    pub token_label: String,
    /// Optional serial number when several tokens share a label.
    pub token_serial: Option<String>,
    /// File holding the user PIN (a mounted Secret); trailing newline ignored.
    pub pin_file: PathBuf,
    /// Most sessions open at once.
    pub max_sessions: usize,
    /// Deadline of one store operation.
    pub op_timeout: Duration,
    /// Where a PIN the token refused is remembered across restarts (see
    /// [`PinRefusals`]); `None` remembers it in this process only.
    pub pin_refusal_dir: Option<PathBuf>,
}

impl Pkcs11Config {
    pub fn new(
        library: impl Into<PathBuf>,
        token_label: impl Into<String>,
        pin_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            library: library.into(),
            token_label: token_label.into(),
            token_serial: None,
            pin_file: pin_file.into(),
            max_sessions: 8,
            op_timeout: Duration::from_secs(10),
            pin_refusal_dir: None,
        }
    }
}

/// Key names and values of one generation.
type KeyValues = BTreeMap<String, Zeroizing<Vec<u8>>>;

/// Objects returned per `C_FindObjects` call; the iterator pages until exhausted.
const FIND_PAGE: usize = 256;

/// The PKCS#11 implementation of [`SecretStore`].
#[derive(Clone)]
pub struct Pkcs11Store {
    shared: Arc<Shared>,
}

struct Shared {
    cfg: Pkcs11Config,
    ctx: Pkcs11,
    /// The PIN last read from the PIN file; read again when the token refused it.
    pin: Mutex<AuthPin>,
    refusals: PinRefusals,
    conn: Mutex<Option<Conn>>,
    conn_generation: AtomicU64,
    permits: Arc<Semaphore>,
    /// Next change sequence number to hand out (one writer per token: this process).
    next_version: AtomicU64,
    /// Writes are serialized per token: the check of the expected version and the
    /// generation switch must not interleave, and SoftHSM's file store fails concurrent
    /// `C_CreateObject` calls. Garbage collection takes it too, so it never mistakes a
    /// generation being written for an orphan. Reads run concurrently.
    write_lock: tokio::sync::Mutex<()>,
    /// SoftHSM's file store also fails a `C_CreateObject` that races a search in another
    /// session, so a mutation excludes concurrent PKCS#11 reads for its short duration.
    io_lock: std::sync::RwLock<()>,
    handles: Mutex<HandleCache>,
    #[cfg(feature = "fault-injection")]
    faults: Option<Arc<FaultPlan>>,
}

struct Conn {
    slot: Slot,
    generation: u64,
    info: TokenInfo,
    idle: Vec<Session>,
}

impl Pkcs11Store {
    /// Opens the token: loads the module, finds the token by label, logs in and reads the
    /// highest change sequence stored on it.
    pub async fn open(cfg: Pkcs11Config) -> Result<Self, StoreError> {
        Self::open_inner(
            cfg,
            #[cfg(feature = "fault-injection")]
            None,
        )
        .await
    }

    /// As [`open`](Self::open), consulting `faults` before every object operation.
    #[cfg(feature = "fault-injection")]
    pub async fn open_with_faults(
        cfg: Pkcs11Config,
        faults: Option<Arc<FaultPlan>>,
    ) -> Result<Self, StoreError> {
        Self::open_inner(cfg, faults).await
    }

    async fn open_inner(
        cfg: Pkcs11Config,
        #[cfg(feature = "fault-injection")] faults: Option<Arc<FaultPlan>>,
    ) -> Result<Self, StoreError> {
        let pin = read_pin(&cfg.pin_file)?;
        let refusals = PinRefusals::new(cfg.pin_refusal_dir.clone());
        if refusals.refused(&cfg.token_label, pin.expose_secret().as_bytes()) {
            return Err(StoreError::PinRefused {
                token: cfg.token_label.clone(),
                pin_file: cfg.pin_file.display().to_string(),
            });
        }
        let ctx = context(&cfg.library)?;
        let shared = Arc::new(Shared {
            permits: Arc::new(Semaphore::new(cfg.max_sessions.max(1))),
            refusals,
            cfg,
            ctx,
            pin: Mutex::new(pin),
            conn: Mutex::new(None),
            conn_generation: AtomicU64::new(0),
            next_version: AtomicU64::new(1),
            write_lock: tokio::sync::Mutex::new(()),
            io_lock: std::sync::RwLock::new(()),
            handles: Mutex::default(),
            #[cfg(feature = "fault-injection")]
            faults,
        });
        let store = Self { shared };
        let entries = store.manifest().await?;
        let max = entries.iter().map(|e| e.version).max().unwrap_or(0);
        store
            .shared
            .next_version
            .store(max.saturating_add(1), Ordering::SeqCst);
        Ok(store)
    }

    /// How many objects the logged-in user sees on the token, of any kind: what garbage
    /// collection must bring back to the live secrets' objects (diagnostics and tests).
    pub async fn object_count(&self) -> Result<usize, StoreError> {
        self.run(Op::Count, |tok| Ok(tok.find(&[])?.len())).await
    }

    /// Runs `f` with a pooled session on the blocking pool, under the operation timeout.
    async fn run<T, F>(&self, op: Op, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Tok<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (operation, mutates) = (op.name(), op.mutates());
        let permit = self.acquire().await?;
        let shared = self.shared.clone();
        let task = tokio::task::spawn_blocking(move || {
            let _permit: OwnedSemaphorePermit = permit;
            let _io = if mutates {
                IoGuard::Exclusive(shared.io_lock.write().unwrap_or_else(|p| p.into_inner()))
            } else {
                IoGuard::Shared(shared.io_lock.read().unwrap_or_else(|p| p.into_inner()))
            };
            let (session, generation) = shared.checkout()?;
            let result = f(&Tok {
                session: &session,
                shared: &shared,
            });
            match &result {
                Err(StoreError::DeviceUnavailable { .. }) => {
                    drop(session);
                    shared.invalidate(generation);
                }
                _ => shared.checkin(session, generation),
            }
            result
        });
        match tokio::time::timeout(self.shared.cfg.op_timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(StoreError::Pkcs11 {
                token: self.shared.cfg.token_label.clone(),
                function: operation.into(),
                rv: worker_failure(operation, join),
            }),
            Err(_) => Err(StoreError::Timeout {
                token: self.shared.cfg.token_label.clone(),
                operation,
                timeout: self.shared.cfg.op_timeout,
            }),
        }
    }

    /// How many times the token was found again after being lost (for metrics and tests).
    pub fn reconnects(&self) -> u64 {
        self.shared
            .conn_generation
            .load(Ordering::SeqCst)
            .saturating_sub(1)
    }

    async fn acquire(&self) -> Result<OwnedSemaphorePermit, StoreError> {
        self.shared
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::DeviceUnavailable {
                token: self.shared.cfg.token_label.clone(),
                detail: "store closed".into(),
            })
    }

    /// Writes `body` as a new generation of `path` if the current version admits it.
    async fn write(
        &self,
        path: &SecretPath,
        body: Body,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        let _writer = self.shared.write_lock.lock().await;
        let path = path.clone();
        let shared = self.shared.clone();
        self.run(Op::Write, move |tok| {
            let current = tok.load_meta(&path)?;
            let live_version = current
                .as_ref()
                .filter(|(m, _)| !m.deleted)
                .map(|(m, _)| m.version);
            if matches!(body, Body::Deleted) && live_version.is_none() {
                return Err(StoreError::NotFound {
                    token: tok.label().into(),
                    path: path.to_string(),
                });
            }
            if !expect.admits(live_version) {
                return Err(StoreError::VersionConflict {
                    token: tok.label().into(),
                    path: path.to_string(),
                    expected: describe_expect(expect),
                    actual: live_version.map_or("absent".into(), |v| v.to_string()),
                });
            }
            let version = shared
                .next_version
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_add(1))
                .map_err(|_| StoreError::SequenceExhausted {
                    token: tok.label().into(),
                })?;
            let record = match body {
                Body::Live(data) => Record::live(path, version, data),
                Body::Deleted => Record::tombstone(path, version),
            };
            tok.write_generation(&record, current)?;
            Ok(version)
        })
        .await
    }
}

fn describe_expect(expect: Expect) -> String {
    match expect {
        Expect::Any => "any".into(),
        Expect::Absent => "absent".into(),
        Expect::Version(v) => v.to_string(),
    }
}

#[async_trait]
impl SecretStore for Pkcs11Store {
    fn token_label(&self) -> &str {
        &self.shared.cfg.token_label
    }

    async fn record(&self, path: &SecretPath) -> Result<Record, StoreError> {
        let path = path.clone();
        self.run(Op::Get, move |tok| tok.read_record(&path)).await
    }

    async fn put(
        &self,
        path: &SecretPath,
        data: SecretData,
        expect: Expect,
    ) -> Result<u64, StoreError> {
        self.write(path, Body::Live(data), expect).await
    }

    async fn delete(&self, path: &SecretPath, expect: Expect) -> Result<u64, StoreError> {
        self.write(path, Body::Deleted, expect).await
    }

    async fn apply(&self, record: Record) -> Result<bool, StoreError> {
        // Never store what does not verify: a mirror only ever holds the primary's bytes.
        record.verify()?;
        let _writer = self.shared.write_lock.lock().await;
        let shared = self.shared.clone();
        self.run(Op::Apply, move |tok| {
            let current = tok.load_meta(&record.path)?;
            if let Some((meta, _)) = &current
                && meta.version == record.version
                && meta.checksum == record.checksum.to_hex()
            {
                return Ok(false);
            }
            shared
                .next_version
                .fetch_max(record.version.saturating_add(1), Ordering::SeqCst);
            tok.write_generation(&record, current)?;
            Ok(true)
        })
        .await
    }

    async fn purge(&self, path: &SecretPath) -> Result<bool, StoreError> {
        let _writer = self.shared.write_lock.lock().await;
        let path = path.clone();
        self.run(Op::Purge, move |tok| {
            let Some((meta, handles)) = tok.load_meta(&path)? else {
                return Ok(false);
            };
            let data = tok.find(&data_template(&path, &meta.generation))?;
            tok.shared.cache().forget(&path);
            for h in handles.into_iter().chain(data) {
                tok.destroy(h)?;
            }
            Ok(true)
        })
        .await
    }

    async fn manifest(&self) -> Result<Vec<ManifestEntry>, StoreError> {
        self.run(Op::Manifest, |tok| {
            let metas = tok.all_metas()?;
            metas
                .into_values()
                .map(|(meta, _)| {
                    Ok(ManifestEntry {
                        path: meta.secret_path()?,
                        version: meta.version,
                        checksum: meta.checksum()?,
                        deleted: meta.deleted,
                    })
                })
                .collect()
        })
        .await
    }

    fn latest_sequence(&self) -> u64 {
        self.shared.next_version.load(Ordering::SeqCst) - 1
    }

    async fn health(&self) -> Result<TokenInfo, StoreError> {
        self.run(Op::Health, |tok| {
            tok.session
                .get_session_info()
                .map_err(|e| tok.map_err(e, "C_GetSessionInfo"))?;
            tok.token_info()
        })
        .await
    }

    async fn gc(&self) -> Result<GcReport, StoreError> {
        let _writer = self.shared.write_lock.lock().await;
        self.run(Op::Gc, |tok| {
            let mut report = GcReport::default();
            let metas = tok.all_metas()?;
            let mut live: HashMap<SecretPath, String> = HashMap::new();
            for (path, (meta, handles)) in metas {
                // handles[0] is the newest metadata object; older ones are stale.
                for stale in handles.into_iter().skip(1) {
                    tok.destroy(stale)?;
                    report.stale_metadata += 1;
                }
                if !meta.deleted {
                    live.insert(path, meta.generation);
                }
            }
            let data = tok.find(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Application(DATA_APP.to_vec()),
            ])?;
            for h in data {
                let attrs = tok.read(h, &[AttributeType::Label])?;
                let keep = attrs.iter().any(|a| match a {
                    Attribute::Label(l) => {
                        layout::parse_data_label(l).is_some_and(|(p, g)| live.get(&p) == Some(&g))
                    }
                    _ => false,
                });
                if !keep {
                    tok.destroy(h)?;
                    report.orphan_objects += 1;
                }
            }
            // Refill the handle cache without the destroyed metadata objects.
            tok.all_metas()?;
            Ok(report)
        })
        .await
    }

    async fn load_agent_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(Op::LoadState, |tok| {
            Ok(tok
                .agent_state_copies()?
                .into_iter()
                .next()
                .map(|(_, _, payload)| payload))
        })
        .await
    }

    async fn save_agent_state(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let _writer = self.shared.write_lock.lock().await;
        let payload = bytes.to_vec();
        self.run(Op::SaveState, move |tok| {
            let copies = tok.agent_state_copies()?;
            let generation = copies.first().map_or(0, |(g, _, _)| *g) + 1;
            // The new copy first; a crash before the old ones are gone leaves both, and
            // the newest intact copy is what loads.
            tok.create(&[
                Attribute::Class(ObjectClass::DATA),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Label(layout::AGENT_LABEL.to_vec()),
                Attribute::Application(layout::AGENT_APP.to_vec()),
                Attribute::Value(layout::encode_agent_state(generation, &payload)),
            ])?;
            for (_, handle, _) in copies {
                tok.destroy(handle)?;
            }
            tok.destroy_damaged_agent_state()?;
            Ok(())
        })
        .await
    }
}

impl Shared {
    fn label(&self) -> &str {
        &self.cfg.token_label
    }

    /// A logged-in session from the pool, connecting first when needed.
    fn checkout(&self) -> Result<(Session, u64), StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.is_none() {
            *conn = Some(self.connect()?);
        }
        let c = conn.as_mut().expect("connected above");
        if let Some(s) = c.idle.pop() {
            return Ok((s, c.generation));
        }
        let session = self
            .ctx
            .open_rw_session(c.slot)
            .map_err(|e| map_ck(self.label(), e, "C_OpenSession"))?;
        // Each failed login spends one of the token's PIN attempts; check its counter
        // flags first so a wrong PIN file can never lock the token by itself.
        let info = self
            .ctx
            .get_token_info(c.slot)
            .map_err(|e| map_ck(self.label(), e, "C_GetTokenInfo"))?;
        login_guard(
            self.label(),
            info.user_pin_locked(),
            info.user_pin_final_try(),
        )?;
        let pin = self.login_pin()?;
        let pin_bytes = pin.expose_secret().as_bytes();
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) => self.refusals.clear_once(self.label()),
            Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => {
                let err = map_ck(self.label(), e, "C_Login");
                if matches!(err, StoreError::PinIncorrect { .. }) {
                    // Never again with this PIN, in this process or a later one.
                    self.refusals.record(self.label(), pin_bytes);
                }
                if matches!(err, StoreError::DeviceUnavailable { .. }) {
                    *conn = None;
                }
                return Err(err);
            }
        }
        Ok((session, c.generation))
    }

    /// The PIN to log in with. A refused PIN is never offered again: the PIN file is read
    /// once more, and only a PIN the token has not refused is used (the Secret was fixed
    /// while the store stayed open).
    fn login_pin(&self) -> Result<AuthPin, StoreError> {
        let mut pin = self.pin.lock().unwrap_or_else(|p| p.into_inner());
        if self
            .refusals
            .refused(self.label(), pin.expose_secret().as_bytes())
        {
            match read_pin(&self.cfg.pin_file) {
                Ok(fresh)
                    if fresh.expose_secret() != pin.expose_secret()
                        && !self
                            .refusals
                            .refused(self.label(), fresh.expose_secret().as_bytes()) =>
                {
                    tracing::info!(token = %self.label(), "the PIN file changed; trying the new PIN");
                    *pin = fresh;
                }
                _ => {
                    return Err(StoreError::PinRefused {
                        token: self.label().to_string(),
                        pin_file: self.cfg.pin_file.display().to_string(),
                    });
                }
            }
        }
        Ok(AuthPin::from(pin.expose_secret().to_string()))
    }

    fn checkin(&self, session: Session, generation: u64) {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = conn.as_mut()
            && c.generation == generation
        {
            c.idle.push(session);
        }
    }

    /// Forgets the connection (its sessions close) so the next call reconnects.
    fn invalidate(&self, generation: u64) {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if conn.as_ref().is_some_and(|c| c.generation == generation) {
            tracing::warn!(token = %self.label(), "token lost; will reconnect on next use");
            *conn = None;
            self.cache().clear();
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HandleCache> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connect(&self) -> Result<Conn, StoreError> {
        let slots = self
            .ctx
            .get_slots_with_token()
            .map_err(|e| map_ck(self.label(), e, "C_GetSlotList"))?;
        let mut present = Vec::new();
        for slot in slots {
            let Ok(info) = self.ctx.get_token_info(slot) else {
                continue;
            };
            let label = info.label().trim_end().to_string();
            let serial = info.serial_number().trim_end().to_string();
            if !info.token_initialized() {
                continue;
            }
            if label == self.cfg.token_label
                && self.cfg.token_serial.as_deref().is_none_or(|s| s == serial)
            {
                login_guard(&label, info.user_pin_locked(), info.user_pin_final_try())?;
                return Ok(Conn {
                    slot,
                    generation: self.conn_generation.fetch_add(1, Ordering::SeqCst) + 1,
                    info: TokenInfo {
                        label,
                        serial,
                        manufacturer: info.manufacturer_id().trim_end().to_string(),
                        model: info.model().trim_end().to_string(),
                    },
                    idle: Vec::new(),
                });
            }
            present.push(format!("{label:?} (serial {serial})"));
        }
        Err(StoreError::TokenNotFound {
            label: self.cfg.token_label.clone(),
            library: self.cfg.library.display().to_string(),
            present: if present.is_empty() {
                "none".into()
            } else {
                present.join(", ")
            },
        })
    }
}

/// One kind of token operation: it names the operation in errors and logs, and says
/// whether it creates or destroys objects (which needs the token to itself, see
/// `Shared::io_lock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Count,
    Write,
    Get,
    Apply,
    Purge,
    Manifest,
    Health,
    Gc,
    LoadState,
    SaveState,
    /// Reads the archive key or uses it (wrap, unwrap, export).
    ArchiveKeyUse,
    /// Creates or replaces archive key objects (generate, receive, import).
    ArchiveKeyChange,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Count => "count",
            Op::Write => "write",
            Op::Get => "get",
            Op::Apply => "apply",
            Op::Purge => "purge",
            Op::Manifest => "manifest",
            Op::Health => "health",
            Op::Gc => "gc",
            Op::LoadState => "load_state",
            Op::SaveState => "save_state",
            Op::ArchiveKeyUse => "archive_key",
            Op::ArchiveKeyChange => "archive_key_generate",
        }
    }

    fn mutates(self) -> bool {
        match self {
            Op::Write | Op::Apply | Op::Purge | Op::Gc | Op::SaveState | Op::ArchiveKeyChange => {
                true
            }
            Op::Count | Op::Get | Op::Manifest | Op::Health | Op::LoadState | Op::ArchiveKeyUse => {
                false
            }
        }
    }
}

/// What a failed worker is reported as. A panic's message stays in this process's log:
/// it may quote internal state, and the error travels to remote callers.
fn worker_failure(operation: &'static str, join: tokio::task::JoinError) -> String {
    if join.is_panic() {
        tracing::error!(operation, panic = %join, "a PKCS#11 worker panicked");
        "worker panicked (details in the agent's log)".into()
    } else {
        "worker cancelled".into()
    }
}

/// Whether logging in may be attempted, from the token's PIN counter flags: never when
/// the user PIN is locked, and never on the last attempt (a wrong PIN would lock the
/// token; that decision belongs to a person).
fn login_guard(token: &str, locked: bool, final_try: bool) -> Result<(), StoreError> {
    if locked {
        return Err(StoreError::PinLocked {
            token: token.to_string(),
        });
    }
    if final_try {
        return Err(StoreError::PinFinalTry {
            token: token.to_string(),
        });
    }
    Ok(())
}

/// Held while a PKCS#11 operation runs (see `Shared::io_lock`).
#[allow(dead_code)]
enum IoGuard<'a> {
    Shared(std::sync::RwLockReadGuard<'a, ()>),
    Exclusive(std::sync::RwLockWriteGuard<'a, ()>),
}

/// A session plus the store it belongs to: the object-level operations, each one a
/// fault-injection point.
struct Tok<'a> {
    session: &'a Session,
    shared: &'a Shared,
}

impl Tok<'_> {
    fn label(&self) -> &str {
        self.shared.label()
    }

    #[cfg(feature = "fault-injection")]
    fn fault(&self, op: &'static str) -> Result<(), StoreError> {
        match &self.shared.faults {
            Some(plan) => plan.check(op, self.label()),
            None => Ok(()),
        }
    }

    /// Without the `fault-injection` feature nothing is ever injected.
    #[cfg(not(feature = "fault-injection"))]
    #[inline(always)]
    fn fault(&self, _op: &'static str) -> Result<(), StoreError> {
        Ok(())
    }

    fn map_err(&self, e: CkError, function: &'static str) -> StoreError {
        map_ck(self.label(), e, function)
    }

    fn find(&self, template: &[Attribute]) -> Result<Vec<ObjectHandle>, StoreError> {
        self.fault("find")?;
        let page = NonZeroUsize::new(FIND_PAGE).expect("non-zero page");
        self.session
            .iter_objects_with_cache_size(template, page)
            .map_err(|e| self.map_err(e, "C_FindObjectsInit"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.map_err(e, "C_FindObjects"))
    }

    fn read(&self, h: ObjectHandle, attrs: &[AttributeType]) -> Result<Vec<Attribute>, StoreError> {
        self.fault("read")?;
        self.session
            .get_attributes(h, attrs)
            .map_err(|e| self.map_err(e, "C_GetAttributeValue"))
    }

    fn create(&self, template: &[Attribute]) -> Result<ObjectHandle, StoreError> {
        self.fault("create")?;
        self.session
            .create_object(template)
            .map_err(|e| self.map_err(e, "C_CreateObject"))
    }

    fn destroy(&self, h: ObjectHandle) -> Result<(), StoreError> {
        self.fault("destroy")?;
        match self.session.destroy_object(h) {
            Ok(()) | Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => Ok(()),
            Err(e) => Err(self.map_err(e, "C_DestroyObject")),
        }
    }

    /// As `read`, but None when the handle no longer names an object.
    fn try_read(
        &self,
        h: ObjectHandle,
        attrs: &[AttributeType],
    ) -> Result<Option<Vec<Attribute>>, StoreError> {
        self.fault("read")?;
        match self.session.get_attributes(h, attrs) {
            Ok(a) => Ok(Some(a)),
            Err(CkError::Pkcs11(RvError::ObjectHandleInvalid, _)) => Ok(None),
            Err(e) => Err(self.map_err(e, "C_GetAttributeValue")),
        }
    }

    fn read_value(&self, h: ObjectHandle) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        for attr in self.read(h, &[AttributeType::Value])? {
            if let Attribute::Value(v) = attr {
                return Ok(Zeroizing::new(v));
            }
        }
        Ok(Zeroizing::new(Vec::new()))
    }

    fn token_info(&self) -> Result<TokenInfo, StoreError> {
        let conn = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.as_ref()
            .map(|c| c.info.clone())
            .ok_or_else(|| StoreError::DeviceUnavailable {
                token: self.label().into(),
                detail: "not connected".into(),
            })
    }

    fn agent_state_handles(&self) -> Result<Vec<ObjectHandle>, StoreError> {
        self.find(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(layout::AGENT_APP.to_vec()),
            Attribute::Label(layout::AGENT_LABEL.to_vec()),
        ])
    }

    /// Intact copies of the agent state as (generation, handle, payload), newest first.
    fn agent_state_copies(&self) -> Result<Vec<(u64, ObjectHandle, Vec<u8>)>, StoreError> {
        let mut copies = Vec::new();
        for h in self.agent_state_handles()? {
            if let Some((generation, payload)) = layout::decode_agent_state(&self.read_value(h)?) {
                copies.push((generation, h, payload));
            }
        }
        copies.sort_by_key(|c| std::cmp::Reverse(c.0));
        Ok(copies)
    }

    /// Removes copies that do not decode (never produced by a save that finished).
    fn destroy_damaged_agent_state(&self) -> Result<(), StoreError> {
        for h in self.agent_state_handles()? {
            if layout::decode_agent_state(&self.read_value(h)?).is_none() {
                self.destroy(h)?;
            }
        }
        Ok(())
    }

    /// The newest metadata of `path` and all its metadata handles, newest first.
    fn load_meta(
        &self,
        path: &SecretPath,
    ) -> Result<Option<(Meta, Vec<ObjectHandle>)>, StoreError> {
        let cached = self.shared.cache().lookup(path);
        match cached {
            Lookup::Absent => return Ok(None),
            Lookup::Known(entry) => {
                if let Some(attrs) = self.try_read(entry.meta[0], &[AttributeType::Value])? {
                    let value = attrs.into_iter().find_map(|a| match a {
                        Attribute::Value(v) => Some(Zeroizing::new(v)),
                        _ => None,
                    });
                    if let Some(value) = value {
                        let meta = Meta::decode(&value)?;
                        if meta.path == path.to_string() && meta.generation == entry.generation {
                            return Ok(Some((meta, entry.meta)));
                        }
                    }
                }
                self.shared.cache().forget(path);
            }
            Lookup::Unknown => {}
        }
        let found = self.search_meta(path)?;
        if let Some((meta, handles)) = &found {
            self.shared.cache().insert(
                path.clone(),
                Entry {
                    meta: handles.clone(),
                    generation: meta.generation.clone(),
                    data: None,
                },
            );
        }
        Ok(found)
    }

    /// `load_meta` without the cache.
    fn search_meta(
        &self,
        path: &SecretPath,
    ) -> Result<Option<(Meta, Vec<ObjectHandle>)>, StoreError> {
        let handles = self.find(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(META_APP.to_vec()),
            Attribute::Label(layout::meta_label(path)),
        ])?;
        let mut found: Vec<(Meta, ObjectHandle)> = Vec::with_capacity(handles.len());
        for h in handles {
            let meta = Meta::decode(&self.read_value(h)?)?;
            if meta.path != path.to_string() {
                return Err(StoreError::Corrupt {
                    path: path.to_string(),
                    detail: "metadata label and content disagree".into(),
                });
            }
            found.push((meta, h));
        }
        found.sort_by_key(|m| std::cmp::Reverse(m.0.version));
        let mut iter = found.into_iter();
        Ok(iter.next().map(|(meta, h)| {
            let mut handles = vec![h];
            handles.extend(iter.map(|(_, h)| h));
            (meta, handles)
        }))
    }

    /// Every secret's newest metadata with all its metadata handles (newest first).
    fn all_metas(&self) -> Result<BTreeMap<SecretPath, (Meta, Vec<ObjectHandle>)>, StoreError> {
        let handles = self.find(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(META_APP.to_vec()),
        ])?;
        let mut by_path: BTreeMap<SecretPath, Vec<(Meta, ObjectHandle)>> = BTreeMap::new();
        for h in handles {
            let meta = Meta::decode(&self.read_value(h)?)?;
            by_path
                .entry(meta.secret_path()?)
                .or_default()
                .push((meta, h));
        }
        let all: BTreeMap<SecretPath, (Meta, Vec<ObjectHandle>)> = by_path
            .into_iter()
            .map(|(path, mut metas)| {
                metas.sort_by_key(|m| std::cmp::Reverse(m.0.version));
                let handles = metas.iter().map(|(_, h)| *h).collect();
                let newest = metas.swap_remove(0).0;
                (path, (newest, handles))
            })
            .collect();
        self.shared
            .cache()
            .fill(all.iter().map(|(path, (meta, handles))| {
                (
                    path.clone(),
                    Entry {
                        meta: handles.clone(),
                        generation: meta.generation.clone(),
                        data: None,
                    },
                )
            }));
        let live = || {
            all.iter()
                .filter(|(_, (meta, _))| !meta.deleted)
                .map(|(path, _)| path)
        };
        if self.shared.cache().lacks_data(live()) {
            self.scan_data_handles(&all)?;
        }
        Ok(all)
    }

    /// One scan of every data object, recording each live secret's data handles: without
    /// it a cold start (a restarted agent verifying its whole token) pays one linear
    /// `C_FindObjects` per secret, quadratic in the token's size.
    fn scan_data_handles(
        &self,
        metas: &BTreeMap<SecretPath, (Meta, Vec<ObjectHandle>)>,
    ) -> Result<(), StoreError> {
        let handles = self.find(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Application(DATA_APP.to_vec()),
        ])?;
        let mut found: HashMap<&SecretPath, Vec<ObjectHandle>> = metas
            .iter()
            .filter(|(_, (meta, _))| !meta.deleted)
            .map(|(path, _)| (path, Vec::new()))
            .collect();
        for h in handles {
            let Some(attrs) = self.try_read(h, &[AttributeType::Label])? else {
                continue;
            };
            for attr in attrs {
                if let Attribute::Label(label) = attr
                    && let Some((path, generation)) = layout::parse_data_label(&label)
                    && let Some((meta, _)) = metas.get(&path)
                    && meta.generation == generation
                    && let Some(list) = found.get_mut(&path)
                {
                    list.push(h);
                }
            }
        }
        let mut cache = self.shared.cache();
        for (path, data) in found {
            cache.set_data(path, &metas[path].0.generation, data);
        }
        Ok(())
    }

    fn read_record(&self, path: &SecretPath) -> Result<Record, StoreError> {
        let Some((meta, _)) = self.load_meta(path)? else {
            return Err(StoreError::NotFound {
                token: self.label().into(),
                path: path.to_string(),
            });
        };
        let checksum = meta.checksum()?;
        let body = if meta.deleted {
            Body::Deleted
        } else {
            let map = match self.read_data(path, &meta, true)? {
                Some(map) => map,
                None => self
                    .read_data(path, &meta, false)?
                    .ok_or_else(|| StoreError::Corrupt {
                        path: path.to_string(),
                        detail: "data objects vanished while being read".into(),
                    })?,
            };
            Body::Live(SecretData::from_validated(map))
        };
        let record = Record {
            path: path.clone(),
            version: meta.version,
            checksum,
            body,
        };
        record.verify()?;
        Ok(record)
    }

    /// Reads the keys of `meta`'s generation; None when a cached handle went stale.
    fn read_data(
        &self,
        path: &SecretPath,
        meta: &Meta,
        use_cache: bool,
    ) -> Result<Option<KeyValues>, StoreError> {
        let cached = if use_cache {
            match self.shared.cache().lookup(path) {
                Lookup::Known(e) if e.generation == meta.generation => e.data,
                _ => None,
            }
        } else {
            None
        };
        let from_cache = cached.is_some();
        let handles = match cached {
            Some(h) => h,
            None => self.find(&data_template(path, &meta.generation))?,
        };
        let mut map = BTreeMap::new();
        for h in handles.iter().copied() {
            let mut key = None;
            let mut value = Zeroizing::new(Vec::new());
            let Some(attrs) = self.try_read(h, &[AttributeType::ObjectId, AttributeType::Value])?
            else {
                self.shared.cache().forget(path);
                return Ok(None);
            };
            for attr in attrs {
                match attr {
                    Attribute::ObjectId(id) => key = String::from_utf8(id).ok(),
                    Attribute::Value(v) => value = Zeroizing::new(v),
                    _ => {}
                }
            }
            let key = key.ok_or_else(|| StoreError::Corrupt {
                path: path.to_string(),
                detail: "a data object has no readable key name".into(),
            })?;
            if map.insert(key, value).is_some() {
                return Err(StoreError::Corrupt {
                    path: path.to_string(),
                    detail: "a key is stored twice in one generation".into(),
                });
            }
        }
        if map.len() != meta.keys.len() || !meta.keys.iter().all(|k| map.contains_key(k)) {
            if from_cache {
                self.shared.cache().forget(path);
                return Ok(None);
            }
            return Err(StoreError::Corrupt {
                path: path.to_string(),
                detail: format!(
                    "version {} lists {} keys but {} data objects were found",
                    meta.version,
                    meta.keys.len(),
                    map.len()
                ),
            });
        }
        if !from_cache {
            let mut cache = self.shared.cache();
            if let Lookup::Known(mut e) = cache.lookup(path)
                && e.generation == meta.generation
            {
                e.data = Some(handles);
                cache.insert(path.clone(), e);
            }
        }
        Ok(Some(map))
    }

    /// Creates the new generation's objects, then its metadata, then destroys the old
    /// generation. Stops at the first failure without cleaning up, as a crash would:
    /// readers still see a whole secret and garbage collection removes the leftovers.
    fn write_generation(
        &self,
        record: &Record,
        previous: Option<(Meta, Vec<ObjectHandle>)>,
    ) -> Result<(), StoreError> {
        let result = self.switch_generation(record, previous);
        let mut cache = self.shared.cache();
        match &result {
            Ok(entry) => cache.insert(record.path.clone(), entry.clone()),
            // The token's state is unknown after a failed step: look it up next time.
            Err(_) => cache.forget(&record.path),
        }
        result.map(|_| ())
    }

    fn switch_generation(
        &self,
        record: &Record,
        previous: Option<(Meta, Vec<ObjectHandle>)>,
    ) -> Result<Entry, StoreError> {
        let generation = new_generation_id(record.version);
        let label = layout::data_label(&record.path, &generation);
        let mut keys = Vec::new();
        let mut data = Vec::new();
        if let Body::Live(secret) = &record.body {
            for (key, value) in secret.iter() {
                data.push(self.create(&[
                    Attribute::Class(ObjectClass::DATA),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Modifiable(false),
                    Attribute::Label(label.clone()),
                    Attribute::Application(DATA_APP.to_vec()),
                    Attribute::ObjectId(key.as_bytes().to_vec()),
                    Attribute::Value(value.to_vec()),
                ])?);
                keys.push(key.to_string());
            }
        }
        let meta = Meta {
            f: Meta::FORMAT,
            path: record.path.to_string(),
            version: record.version,
            generation: generation.clone(),
            deleted: record.is_deleted(),
            checksum: record.checksum.to_hex(),
            keys,
        };
        let meta_handle = self.create(&[
            Attribute::Class(ObjectClass::DATA),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Label(layout::meta_label(&record.path)),
            Attribute::Application(META_APP.to_vec()),
            Attribute::Value(meta.encode()),
        ])?;
        if let Some((old, old_handles)) = previous {
            for h in old_handles {
                self.destroy(h)?;
            }
            if !old.deleted {
                let old_data = match self.shared.cache().lookup(&record.path) {
                    Lookup::Known(e) if e.generation == old.generation => e.data,
                    _ => None,
                };
                let old_data = match old_data {
                    Some(h) => h,
                    None => self.find(&data_template(&record.path, &old.generation))?,
                };
                for h in old_data {
                    self.destroy(h)?;
                }
            }
        }
        Ok(Entry {
            meta: vec![meta_handle],
            generation,
            data: Some(data),
        })
    }
}

fn data_template(path: &SecretPath, generation: &str) -> [Attribute; 3] {
    [
        Attribute::Class(ObjectClass::DATA),
        Attribute::Application(DATA_APP.to_vec()),
        Attribute::Label(layout::data_label(path, generation)),
    ]
}

/// Unique per write even across restarts and processes, so a crashed write's leftovers
/// never mix with a later generation of the same version.
fn new_generation_id(version: u64) -> String {
    static COUNTER: OnceLock<AtomicU64> = OnceLock::new();
    let counter = COUNTER.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        AtomicU64::new(nanos ^ (u64::from(std::process::id()) << 40))
    });
    format!("{version}.{:x}", counter.fetch_add(1, Ordering::Relaxed))
}

/// One `Pkcs11` context per module per process: `C_Initialize` is process-wide.
fn context(library: &Path) -> Result<Pkcs11, StoreError> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(ctx) = map.get(library) {
        return Ok(ctx.clone());
    }
    let lib_err = |detail: String| StoreError::Library {
        library: library.display().to_string(),
        detail,
    };
    if !library.exists() {
        return Err(lib_err(
            "no such file; install the vendor's PKCS#11 module or fix pkcs11.library".into(),
        ));
    }
    let ctx = Pkcs11::new(library).map_err(|e| lib_err(e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => return Err(lib_err(format!("C_Initialize failed: {e}"))),
    }
    map.insert(library.to_path_buf(), ctx.clone());
    Ok(ctx)
}

fn read_pin(path: &Path) -> Result<AuthPin, StoreError> {
    let raw = Zeroizing::new(std::fs::read(path).map_err(|e| StoreError::PinFile {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?);
    let text = std::str::from_utf8(&raw).map_err(|_| StoreError::PinFile {
        path: path.display().to_string(),
        detail: "the PIN is not UTF-8 text".into(),
    })?;
    let pin = text.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        return Err(StoreError::PinFile {
            path: path.display().to_string(),
            detail: "the file is empty".into(),
        });
    }
    Ok(AuthPin::from(pin.to_string()))
}

/// Maps a PKCS#11 failure to what the caller can act on.
fn map_ck(token: &str, e: CkError, function: &'static str) -> StoreError {
    match e {
        CkError::Pkcs11(rv, f) => match rv {
            RvError::PinIncorrect => StoreError::PinIncorrect {
                token: token.into(),
            },
            RvError::PinLocked => StoreError::PinLocked {
                token: token.into(),
            },
            RvError::DeviceRemoved
            | RvError::DeviceError
            | RvError::TokenNotPresent
            | RvError::TokenNotRecognized
            | RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::SlotIdInvalid
            | RvError::UserNotLoggedIn
            | RvError::CryptokiNotInitialized => StoreError::DeviceUnavailable {
                token: token.into(),
                detail: format!("{f}: {rv}"),
            },
            _ => StoreError::Pkcs11 {
                token: token.into(),
                function: f.to_string(),
                rv: rv.to_string(),
            },
        },
        other => StoreError::Pkcs11 {
            token: token.into(),
            function: function.into(),
            rv: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_is_attempted_only_while_a_wrong_pin_cannot_lock_the_token() {
        assert!(login_guard("prod", false, false).is_ok());
        assert!(matches!(
            login_guard("prod", false, true),
            Err(StoreError::PinFinalTry { ref token }) if token == "prod"
        ));
        assert!(matches!(
            login_guard("prod", true, true),
            Err(StoreError::PinLocked { .. })
        ));
        let message = login_guard("prod", false, true)
            .err()
            .map(|e| e.to_string());
        assert!(message.is_some_and(|m| m.contains("check the PIN file")));
    }
}
