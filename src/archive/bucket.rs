//! Where archive objects live: S3 or an S3-compatible server (`s3://bucket/prefix`), or a
//! local directory (`file:///path`), through the `object_store` crate. Credentials are
//! read from files (a mounted Secret), never from flags.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use super::ArchiveError;

/// How to reach the bucket.
#[derive(Clone, Debug, Default)]
pub struct BucketConfig {
    /// `s3://BUCKET[/PREFIX]` or `file:///DIRECTORY`.
    pub url: String,
    /// S3 endpoint for S3-compatible servers (MinIO, Ceph, …): `http(s)://host:port`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Directory holding `access-key-id` and `secret-access-key` files (a mounted Secret).
    pub credentials_dir: Option<PathBuf>,
    /// Give up on a call after this long (retries included).
    pub timeout: Duration,
}

/// One object of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Relative to the bucket's prefix.
    pub name: String,
    pub size: u64,
}

/// The archive's bucket.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    url: String,
    prefix: String,
}

impl Bucket {
    pub fn open(config: &BucketConfig) -> Result<Self, ArchiveError> {
        let url = config.url.trim();
        let invalid = |why: &str| {
            ArchiveError::Config(format!(
                "bucket URL {url:?} {why}; use s3://BUCKET[/PREFIX] or file:///DIRECTORY"
            ))
        };
        if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(invalid("is not an absolute file:// path"));
            }
            std::fs::create_dir_all(dir).map_err(|e| {
                ArchiveError::Config(format!("create the archive directory {dir}: {e}"))
            })?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| ArchiveError::Config(format!("archive directory {dir}: {e}")))?;
            return Ok(Self {
                store: Arc::new(store),
                url: url.to_string(),
                prefix: String::new(),
            });
        }
        let Some(rest) = url.strip_prefix("s3://") else {
            return Err(invalid("has no known scheme"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("names no bucket"));
        }
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(config.region.clone().unwrap_or_else(|| "us-east-1".into()))
            .with_retry(object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: config.timeout,
                ..Default::default()
            })
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_timeout(config.timeout)
                    .with_connect_timeout(config.timeout.min(Duration::from_secs(5))),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let Some(dir) = &config.credentials_dir {
            builder = builder
                .with_access_key_id(read_credential(dir, "access-key-id")?)
                .with_secret_access_key(read_credential(dir, "secret-access-key")?);
        }
        let store = builder
            .build()
            .map_err(|e| ArchiveError::Config(format!("bucket {url}: {e}")))?;
        Ok(Self {
            store: Arc::new(store),
            url: url.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    /// A bucket over an object store built elsewhere (a wrapper that injects faults, in
    /// tests), named `url` in messages.
    pub fn from_store(store: Arc<dyn ObjectStore>, url: impl Into<String>) -> Self {
        Self {
            store,
            url: url.into(),
            prefix: String::new(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, name: &str) -> ObjectPath {
        match self.prefix.is_empty() {
            true => ObjectPath::from(name),
            false => ObjectPath::from(format!("{}/{name}", self.prefix)),
        }
    }

    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        self.store
            .put(&self.path(name), PutPayload::from(bytes))
            .await
            .map(drop)
            .map_err(|e| self.failed("PUT", name, e))
    }

    /// Writes `name` only if no object has that name. Ok(false): one exists (S3 answers
    /// 412; some servers 403, so existence is checked by reading it back).
    pub async fn put_new(&self, name: &str, bytes: Vec<u8>) -> Result<bool, ArchiveError> {
        let options = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(name), PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => match self.store.head(&self.path(name)).await {
                Ok(_) => Ok(false),
                Err(_) => Err(self.failed("PUT", name, e)),
            },
        }
    }

    pub async fn get(&self, name: &str) -> Result<Vec<u8>, ArchiveError> {
        let result = self
            .store
            .get(&self.path(name))
            .await
            .map_err(|e| self.failed("GET", name, e))?;
        let bytes = result
            .bytes()
            .await
            .map_err(|e| self.failed("GET", name, e))?;
        Ok(bytes.to_vec())
    }

    pub async fn delete(&self, name: &str) -> Result<(), ArchiveError> {
        self.store
            .delete(&self.path(name))
            .await
            .map_err(|e| self.failed("DELETE", name, e))
    }

    /// Every object under `under` (relative names, sorted).
    pub async fn list(&self, under: &str) -> Result<Vec<Listed>, ArchiveError> {
        let root = self.path(under);
        let mut listed: Vec<Listed> = self
            .store
            .list(Some(&root))
            .map_ok(|meta| Listed {
                name: strip(&meta.location, &self.prefix),
                size: meta.size,
            })
            .try_collect()
            .await
            .map_err(|e| self.failed("LIST", under, e))?;
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listed)
    }

    fn failed(
        &self,
        operation: &'static str,
        object: &str,
        error: object_store::Error,
    ) -> ArchiveError {
        let detail = error.to_string();
        let fix = match &error {
            object_store::Error::NotFound { .. } if detail.contains("NoSuchBucket") => {
                "create the bucket, or fix the bucket name in the URL"
            }
            object_store::Error::NotFound { .. } => {
                "the object is gone: check retention and the prefix"
            }
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                "check the credentials Secret (access-key-id, secret-access-key) and the bucket policy"
            }
            _ if detail.contains("NoSuchBucket") => {
                "create the bucket, or fix the bucket name in the URL"
            }
            _ if detail.contains("InvalidAccessKeyId")
                || detail.contains("SignatureDoesNotMatch")
                || detail.contains("AccessDenied")
                || detail.contains("Forbidden") =>
            {
                "check the credentials Secret (access-key-id, secret-access-key) and the bucket policy"
            }
            _ if detail.contains("StorageFull")
                || detail.contains("QuotaExceeded")
                || detail.contains("Insufficient Storage") =>
            {
                "the object store is full: free space or raise the bucket's quota (writes go on; the archive lags until it can write)"
            }
            _ if detail.contains("connect")
                || detail.contains("error sending request")
                || detail.contains("timed out")
                || detail.contains("dns") =>
            {
                "check the endpoint and that the object store is reachable from here"
            }
            _ => "retried with backoff; check the object store's health",
        };
        ArchiveError::Bucket {
            url: self.url.clone(),
            operation,
            object: object.to_string(),
            detail: first_line(&detail),
            fix,
        }
    }
}

fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(300).collect()
}

fn strip(location: &ObjectPath, prefix: &str) -> String {
    let full = location.as_ref();
    match prefix.is_empty() {
        true => full.to_string(),
        false => full
            .strip_prefix(prefix)
            .map(|s| s.trim_start_matches('/').to_string())
            .unwrap_or_else(|| full.to_string()),
    }
}

fn read_credential(dir: &Path, name: &str) -> Result<String, ArchiveError> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ArchiveError::Config(format!(
            "read {} ({e}); mount the archive credentials Secret with keys access-key-id and \
             secret-access-key there",
            path.display()
        ))
    })?;
    let value = text.trim().to_string();
    if value.is_empty() {
        return Err(ArchiveError::Config(format!("{} is empty", path.display())));
    }
    Ok(value)
}
