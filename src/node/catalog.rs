//! Where the node looks up HSMSecrets: an abstraction over the Kubernetes API cache
//! ([`super::KubeCatalog`]), a static list loaded from YAML ([`StaticCatalog`]) and the
//! file-backed state of the no-cluster mode ([`StateCatalog`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use async_trait::async_trait;
use kube::ResourceExt;

use crate::crd::HSMSecret;
use crate::hsm::SecretPath;

/// Finds the HSMSecret a pod asks for. Lookups must be cheap (no API call per publish).
#[async_trait]
pub trait SecretCatalog: Send + Sync + 'static {
    /// The HSMSecret `name` in `namespace`, or None when there is none.
    async fn hsm_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<HSMSecret>, CatalogError>;

    /// Whether lookups can be answered (e.g. the cache has finished its first list).
    async fn ready(&self) -> Result<(), CatalogError>;
}

/// Errors of a catalog: not synchronized yet, or a static file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("the HSMSecret cache is not synchronized yet ({reason}); retry shortly")]
    NotSynced { reason: String },

    #[error("cannot read the HSMSecret catalog {path}: {detail}")]
    Read { path: PathBuf, detail: String },

    #[error("HSMSecret catalog {path} is not valid YAML: {detail}")]
    Yaml { path: PathBuf, detail: String },

    #[error("HSMSecret catalog {path}, document {document}: {problem}; {fix}")]
    Document {
        path: PathBuf,
        /// 1-based position in the YAML stream.
        document: usize,
        problem: String,
        fix: &'static str,
    },
}

impl CatalogError {
    /// Bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotSynced { .. } => "not_synced",
            Self::Read { .. } => "read",
            Self::Yaml { .. } => "yaml",
            Self::Document { .. } => "document",
        }
    }
}

/// An in-memory catalog: for tests, benchmarks and running without a cluster.
#[derive(Debug, Default)]
pub struct StaticCatalog {
    secrets: RwLock<BTreeMap<(String, String), HSMSecret>>,
}

impl StaticCatalog {
    pub fn new(secrets: impl IntoIterator<Item = HSMSecret>) -> Self {
        let catalog = Self::default();
        for secret in secrets {
            catalog.insert(secret);
        }
        catalog
    }

    /// Adds or replaces an HSMSecret (keyed by its namespace and name).
    pub fn insert(&self, secret: HSMSecret) {
        let key = (secret.namespace().unwrap_or_default(), secret.name_any());
        self.write().insert(key, secret);
    }

    pub fn remove(&self, namespace: &str, name: &str) -> Option<HSMSecret> {
        self.write()
            .remove(&(namespace.to_string(), name.to_string()))
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Loads a file of HSMSecret documents (`---`-separated, as `kubectl apply -f` takes).
    pub fn from_yaml_file(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|e| CatalogError::Read {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        Self::from_yaml(path, &text)
    }

    /// Parses `text`; `path` only names the source in errors.
    pub fn from_yaml(path: &Path, text: &str) -> Result<Self, CatalogError> {
        let documents: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(text).map_err(|e| CatalogError::Yaml {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        let catalog = Self::default();
        for (index, document) in documents.into_iter().enumerate() {
            // Empty documents (a leading `---`, a trailing separator) carry nothing.
            if document.is_null() {
                continue;
            }
            let secret = parse_document(path, index + 1, document)?;
            let key = (secret.namespace().unwrap_or_default(), secret.name_any());
            if catalog.read().contains_key(&key) {
                return Err(CatalogError::Document {
                    path: path.to_path_buf(),
                    document: index + 1,
                    problem: format!("HSMSecret {}/{} appears twice", key.0, key.1),
                    fix: "keep one document per HSMSecret",
                });
            }
            catalog.insert(secret);
        }
        Ok(catalog)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<(String, String), HSMSecret>> {
        self.secrets.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<(String, String), HSMSecret>> {
        self.secrets.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn parse_document(
    path: &Path,
    document: usize,
    value: serde_json::Value,
) -> Result<HSMSecret, CatalogError> {
    let bad = |problem: String, fix: &'static str| CatalogError::Document {
        path: path.to_path_buf(),
        document,
        problem,
        fix,
    };
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or("");
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version != "hsmsecrets.io/v1alpha1" || kind != "HSMSecret" {
        return Err(bad(
            format!("apiVersion {api_version:?}, kind {kind:?} is not an HSMSecret"),
            "every document must have apiVersion: hsmsecrets.io/v1alpha1 and kind: HSMSecret",
        ));
    }
    let secret: HSMSecret = serde_json::from_value(value)
        .map_err(|e| bad(e.to_string(), "fix the document to match the HSMSecret CRD"))?;
    let namespace = secret.metadata.namespace.clone().unwrap_or_default();
    let name = secret.metadata.name.clone().unwrap_or_default();
    if namespace.is_empty() || name.is_empty() {
        return Err(bad(
            "metadata.name or metadata.namespace is missing".into(),
            "a static catalog has no current namespace: set both on every HSMSecret",
        ));
    }
    SecretPath::new(&namespace, &name).map_err(|e| {
        bad(
            e.to_string(),
            "metadata.name and metadata.namespace must be Kubernetes names",
        )
    })?;
    if secret.spec.device_ref.is_empty() {
        return Err(bad(
            format!("HSMSecret {namespace}/{name} has an empty spec.deviceRef"),
            "set spec.deviceRef to the HSMDevice holding the secret",
        ));
    }
    Ok(secret)
}

#[async_trait]
impl SecretCatalog for StaticCatalog {
    async fn hsm_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<HSMSecret>, CatalogError> {
        Ok(self
            .read()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned())
    }

    async fn ready(&self) -> Result<(), CatalogError> {
        Ok(())
    }
}

/// The HSMSecrets of the no-cluster mode's file-backed state, read at every lookup, so
/// that secrets declared while the plugins run (`hsm-secrets local put`) can be mounted.
/// A lookup reads one small file: cheap enough for a development machine.
pub struct StateCatalog {
    state: crate::state::FileState,
}

impl StateCatalog {
    /// `dir`: the state directory (as the controller's and the webhook's `--state`).
    pub fn open(dir: &Path) -> Result<Self, CatalogError> {
        if !dir.join("secrets").is_dir() {
            return Err(CatalogError::Read {
                path: dir.to_path_buf(),
                detail: "not a state directory of the no-cluster mode (no secrets/ inside)".into(),
            });
        }
        let state = crate::state::FileState::open(dir).map_err(|e| CatalogError::Read {
            path: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        Ok(Self { state })
    }
}

#[async_trait]
impl SecretCatalog for StateCatalog {
    async fn hsm_secret(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<HSMSecret>, CatalogError> {
        use crate::state::StateStore;
        self.state
            .get_secret(namespace, name)
            .await
            .map_err(|e| CatalogError::Read {
                path: self.state.root().to_path_buf(),
                detail: e.to_string(),
            })
    }

    async fn ready(&self) -> Result<(), CatalogError> {
        Ok(())
    }
}
