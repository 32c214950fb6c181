//! `hsm-secrets archive`: the key ceremony, the offline recovery key, listing and
//! point-in-time restore (the no-cluster commands; the archiver itself runs inside
//! `hsm-secrets node` with `--archive-url`).
//!
//! ```text
//! archive recovery-keygen --out recovery.key            (offline machine; keep the .key in a safe)
//! archive key-init          --token …                    (one token of the device, once)
//! archive key-receive-begin --token … --out transport.json          (each other token)
//! archive key-export        --token … --transport transport.json --out wrapped.bin (a token with the key)
//! archive key-receive       --token … --wrapped wrapped.bin         (back on the receiving token)
//! archive list    --bucket-url … --device D [--archive A]
//! archive restore --bucket-url … --device D [--archive A] [--to-sequence N | --to-time T]
//!                 (--recovery-key FILE | --key-token …) --token … [--force]
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::archive::chain::{ArchiveRoot, Entry, Target};
use crate::archive::{
    ARCHIVE_KEY_LABEL, Bucket, BucketConfig, KeyUnwrap, RecoverySecretKey, TokenArchiveKey, restore,
};
use crate::hsm::{Pkcs11Config, Pkcs11Store, TransportPublicKey};

#[derive(Args, Debug)]
pub struct ArchiveArgs {
    #[command(subcommand)]
    pub command: ArchiveCommand,
}

#[derive(Subcommand, Debug)]
pub enum ArchiveCommand {
    /// Make the offline recovery key pair: FILE (private, 0600) and FILE.pub.
    RecoveryKeygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate the device's archive key inside one of its tokens.
    KeyInit(TokenArgs),
    /// On a token without the key: make the transport key pair, write its public half.
    KeyReceiveBegin {
        #[command(flatten)]
        token: TokenArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// On a token with the key: wrap it for a receiving token's transport key.
    KeyExport {
        #[command(flatten)]
        token: TokenArgs,
        /// The file `key-receive-begin` wrote.
        #[arg(long)]
        transport: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Back on the receiving token: unwrap the key `key-export` wrote.
    KeyReceive {
        #[command(flatten)]
        token: TokenArgs,
        #[arg(long)]
        wrapped: PathBuf,
    },
    /// The archive's bases and segments.
    List {
        #[command(flatten)]
        bucket: BucketArgs,
    },
    /// Rebuild a device's secrets from the archive into an empty token.
    Restore(Box<RestoreArgs>),
    /// A restore drill: rebuild the newest point in memory (never a live token) and compare
    /// it with a token of the device, opened with that token's archive key (or the offline
    /// recovery key). Exit code 1 when they disagree or the chain breaks.
    Verify {
        #[command(flatten)]
        bucket: BucketArgs,
        /// A token of the device (read only: its manifest, and its archive key).
        #[command(flatten)]
        token: TokenArgs,
        /// Open the archive with the offline recovery key instead of the token's key (a
        /// token just restored holds no archive key yet).
        #[arg(long)]
        recovery_key: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A token, as the node plugin opens it.
#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    #[arg(long, env = "HSM_PKCS11_LIBRARY")]
    pub pkcs11_library: PathBuf,
    #[arg(long, env = "HSM_TOKEN_LABEL")]
    pub token_label: String,
    /// File holding the user PIN (never a flag).
    #[arg(long, env = "HSM_PIN_FILE")]
    pub pin_file: PathBuf,
}

impl TokenArgs {
    async fn open(&self) -> anyhow::Result<Arc<Pkcs11Store>> {
        let config = Pkcs11Config::new(&self.pkcs11_library, &self.token_label, &self.pin_file);
        Ok(Arc::new(Pkcs11Store::open(config).await.with_context(
            || format!("open token {}", self.token_label),
        )?))
    }
}

#[derive(Args, Debug, Clone)]
pub struct BucketArgs {
    /// `s3://BUCKET[/PREFIX]` or `file:///DIRECTORY`.
    #[arg(long, env = "HSM_ARCHIVE_URL")]
    pub bucket_url: String,
    /// S3 endpoint of an S3-compatible server (MinIO, Ceph): http(s)://HOST:PORT.
    #[arg(long, env = "HSM_ARCHIVE_ENDPOINT")]
    pub endpoint: Option<String>,
    #[arg(long, env = "HSM_ARCHIVE_REGION")]
    pub region: Option<String>,
    /// Directory with the files access-key-id and secret-access-key.
    #[arg(long, env = "HSM_ARCHIVE_CREDENTIALS_DIR")]
    pub credentials_dir: Option<PathBuf>,
    /// The HSMDevice.
    #[arg(long)]
    pub device: String,
    /// The archive's name (default: the only archive of the device in the bucket).
    #[arg(long)]
    pub archive: Option<String>,
}

impl BucketArgs {
    pub fn config(&self) -> BucketConfig {
        BucketConfig {
            url: self.bucket_url.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            credentials_dir: self.credentials_dir.clone(),
            timeout: Duration::from_secs(30),
        }
    }

    /// The archive root: the one named, or the only one the device has.
    async fn root(&self, bucket: &Bucket) -> anyhow::Result<ArchiveRoot> {
        if let Some(archive) = &self.archive {
            return Ok(ArchiveRoot::new(&self.device, archive)?);
        }
        let prefix = format!("{}/", self.device);
        let mut names: Vec<String> = bucket
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|l| {
                l.name
                    .strip_prefix(&prefix)
                    .and_then(|rest| rest.split('/').next())
                    .map(str::to_string)
            })
            .collect();
        names.dedup();
        match names.as_slice() {
            [one] => Ok(ArchiveRoot::new(&self.device, one)?),
            [] => bail!(
                "{} holds no archive of device {}; check --bucket-url and --device",
                bucket.url(),
                self.device
            ),
            many => bail!(
                "device {} has several archives ({}); choose one with --archive",
                self.device,
                many.join(", ")
            ),
        }
    }
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub bucket: BucketArgs,
    /// The newest point at or before this sequence (of the newest epoch).
    #[arg(long, conflicts_with = "to_time")]
    pub to_sequence: Option<u64>,
    /// The newest point written at or before this time (RFC 3339, e.g. 2026-12-07T10:00:00Z).
    #[arg(long)]
    pub to_time: Option<String>,
    /// The offline recovery key (when no token of the device survives).
    #[arg(long, conflicts_with = "key_token_label")]
    pub recovery_key: Option<PathBuf>,
    /// A token holding the device's archive key, to open the archive with.
    #[arg(long, requires_all = ["key_pkcs11_library", "key_pin_file"])]
    pub key_token_label: Option<String>,
    #[arg(long)]
    pub key_pkcs11_library: Option<PathBuf>,
    #[arg(long)]
    pub key_pin_file: Option<PathBuf>,
    /// The token to restore into (empty unless --force).
    #[command(flatten)]
    pub token: TokenArgs,
    /// Restore into a token that already holds secrets.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Succeed even when the restore stopped before later objects of the archive (a gap,
    /// a damaged object): by default that is an error, since writes after it are missing.
    #[arg(long)]
    pub allow_partial: bool,
}

pub fn run(args: ArchiveArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(execute(args))
}

async fn execute(args: ArchiveArgs) -> anyhow::Result<()> {
    match args.command {
        ArchiveCommand::RecoveryKeygen { out } => {
            let key = RecoverySecretKey::generate()?;
            key.write_new(&out)?;
            println!(
                "recovery key written to {} (keep it offline, in a safe); public key {} in {}",
                out.display(),
                key.public().key_id(),
                out.with_extension("pub").display()
            );
        }
        ArchiveCommand::KeyInit(token) => {
            token
                .open()
                .await?
                .archive_key_generate(ARCHIVE_KEY_LABEL)
                .await?;
            println!(
                "archive key {ARCHIVE_KEY_LABEL} generated inside token {}; copy it to the \
                 device's other tokens with key-receive-begin / key-export / key-receive",
                token.token_label
            );
        }
        ArchiveCommand::KeyReceiveBegin { token, out } => {
            let public = token
                .open()
                .await?
                .archive_transport_begin(ARCHIVE_KEY_LABEL)
                .await?;
            std::fs::write(&out, serde_json::to_vec_pretty(&public)?)
                .with_context(|| format!("write {}", out.display()))?;
            println!(
                "transport key made on token {}; take {} to a token that has the archive key \
                 and run key-export there",
                token.token_label,
                out.display()
            );
        }
        ArchiveCommand::KeyExport {
            token,
            transport,
            out,
        } => {
            let text = std::fs::read(&transport)
                .with_context(|| format!("read {}", transport.display()))?;
            let public: TransportPublicKey = serde_json::from_slice(&text).with_context(|| {
                format!(
                    "{} is not a file key-receive-begin wrote",
                    transport.display()
                )
            })?;
            let wrapped = token
                .open()
                .await?
                .archive_key_export(ARCHIVE_KEY_LABEL, &public)
                .await?;
            std::fs::write(&out, wrapped).with_context(|| format!("write {}", out.display()))?;
            println!(
                "archive key wrapped for token {} in {}; run key-receive there",
                public.token,
                out.display()
            );
        }
        ArchiveCommand::KeyReceive { token, wrapped } => {
            let bytes =
                std::fs::read(&wrapped).with_context(|| format!("read {}", wrapped.display()))?;
            token
                .open()
                .await?
                .archive_key_import(ARCHIVE_KEY_LABEL, bytes)
                .await?;
            println!("archive key received on token {}", token.token_label);
        }
        ArchiveCommand::List { bucket: args } => {
            let bucket = Bucket::open(&args.config())?;
            let root = args.root(&bucket).await?;
            let listed = bucket.list(&root.prefix()).await?;
            println!(
                "{:<8} {:>6} {:>12} {:>12} {:>10}  NAME",
                "KIND", "EPOCH", "FIRST", "LAST", "BYTES"
            );
            for item in &listed {
                if let Some(entry) = Entry::parse(&root, &item.name) {
                    println!(
                        "{:<8} {:>6} {:>12} {:>12} {:>10}  {}",
                        format!("{:?}", entry.kind).to_lowercase(),
                        entry.epoch,
                        entry.first,
                        entry.last,
                        item.size,
                        item.name
                    );
                }
            }
        }
        ArchiveCommand::Verify {
            bucket: args,
            token,
            recovery_key,
            json,
        } => {
            let bucket = Bucket::open(&args.config())?;
            let root = args.root(&bucket).await?;
            let store = token.open().await?;
            let live = crate::hsm::SecretStore::manifest(store.as_ref()).await?;
            let key: Box<dyn KeyUnwrap> = match &recovery_key {
                Some(file) => Box::new(RecoverySecretKey::read(file)?),
                None => Box::new(TokenArchiveKey::new(store, ARCHIVE_KEY_LABEL)),
            };
            let report = crate::archive::drill::verify(&bucket, &root, key.as_ref(), &live).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "restore drill of device {} archive {}: sequence {} (epoch {}, written {}), \
                     {} secrets, {} bytes, rebuilt in {} ms",
                    root.device,
                    root.archive,
                    report.sequence,
                    report.epoch,
                    report.time,
                    report.secrets,
                    report.bytes,
                    report.duration_ms
                );
                for mismatch in &report.mismatches {
                    println!("  mismatch: {mismatch}");
                }
                if let Some(stopped) = &report.stopped {
                    println!("  stopped early: {stopped}");
                }
            }
            if !report.verified() {
                bail!(
                    "the restore drill failed: {} mismatch(es){}",
                    report.mismatches.len(),
                    report
                        .stopped
                        .as_deref()
                        .map(|s| format!(", {s}"))
                        .unwrap_or_default()
                );
            }
            println!("verified");
        }
        ArchiveCommand::Restore(args) => {
            let args = *args;
            let target = match (&args.to_sequence, &args.to_time) {
                (Some(n), _) => Target::Sequence(*n),
                (None, Some(t)) => {
                    let time: k8s_openapi::jiff::Timestamp = t.parse().with_context(|| {
                        format!(
                            "--to-time {t:?} is not an RFC 3339 time such as 2026-12-07T10:00:00Z"
                        )
                    })?;
                    Target::Time(time.as_millisecond().max(0) as u64)
                }
                (None, None) => Target::Latest,
            };
            let key: Box<dyn KeyUnwrap> = match (&args.recovery_key, &args.key_token_label) {
                (Some(file), None) => Box::new(RecoverySecretKey::read(file)?),
                (None, Some(label)) => {
                    let token = TokenArgs {
                        pkcs11_library: args.key_pkcs11_library.clone().unwrap_or_default(),
                        token_label: label.clone(),
                        pin_file: args.key_pin_file.clone().unwrap_or_default(),
                    };
                    Box::new(TokenArchiveKey::new(token.open().await?, ARCHIVE_KEY_LABEL))
                }
                _ => bail!(
                    "say what opens the archive: --recovery-key FILE (the offline key) or \
                     --key-token-label with --key-pkcs11-library and --key-pin-file (a token \
                     holding the archive key)"
                ),
            };
            let bucket = Bucket::open(&args.bucket.config())?;
            let root = args.bucket.root(&bucket).await?;
            let into = args.token.open().await?;
            let report = restore(
                &bucket,
                &root,
                key.as_ref(),
                target,
                into.as_ref(),
                args.force,
            )
            .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "restored device {} archive {} into token {}: sequence {} (epoch {}, \
                     written {}), {} secrets, {} bytes, from {} and {} segment(s)",
                    report.device,
                    report.archive,
                    args.token.token_label,
                    report.sequence,
                    report.epoch,
                    report.time,
                    report.secrets,
                    report.bytes,
                    report.base,
                    report.segments
                );
                if let Some(stopped) = &report.stopped {
                    println!("stopped early: {stopped}");
                }
                for skipped in &report.skipped {
                    println!("skipped base: {skipped}");
                }
            }
            if let (Some(stopped), false) = (&report.stopped, args.allow_partial) {
                bail!(
                    "the restore stopped early ({stopped}); the token holds the point above, \
                     without what the archive holds after it: repair the archive, restore to \
                     an earlier point, or accept it with --allow-partial"
                );
            }
        }
    }
    Ok(())
}
