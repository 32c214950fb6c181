//! Pure decisions for writes: what a write would do to the keys (for `--dry-run`), and
//! the objects a write sends (the import Secret, the HSMSecret and its source patch).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use serde::Serialize;
use serde_json::json;

use super::input::KeySet;
use super::{IMPORT_FOR_LABEL, REMOVE_KEYS_ANNOTATION};
use crate::crd::{HSMSecret, HSMSecretSpec, ImportMode, LocalSecretRef, SecretSource};

/// What a write does to one key. Values are never compared client-side, so a key that
/// exists and is given again is `Set` (it may or may not change).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum KeyChange {
    Add,
    Set,
    Remove,
}

impl KeyChange {
    fn word(self) -> &'static str {
        match self {
            KeyChange::Add => "add",
            KeyChange::Set => "set",
            KeyChange::Remove => "remove",
        }
    }
    fn mark(self) -> char {
        match self {
            KeyChange::Add => '+',
            KeyChange::Set => '~',
            KeyChange::Remove => '-',
        }
    }
}

/// Key changes of an import, sorted by key.
///
/// `existing` is `status.keys`; `given` the keys sent; `remove` the keys named for
/// removal. `Replace` removes every existing key not given.
pub fn plan_keys(
    existing: &[String],
    given: &[String],
    mode: ImportMode,
    remove: &[String],
) -> Vec<(String, KeyChange)> {
    let mut out: BTreeMap<String, KeyChange> = BTreeMap::new();
    for key in given {
        let change = if existing.contains(key) {
            KeyChange::Set
        } else {
            KeyChange::Add
        };
        out.insert(key.clone(), change);
    }
    for key in existing {
        let dropped = match mode {
            ImportMode::Replace => !given.contains(key),
            ImportMode::Merge => remove.contains(key),
        };
        if dropped {
            out.insert(key.clone(), KeyChange::Remove);
        }
    }
    out.into_iter().collect()
}

/// The `--dry-run` report.
pub fn render_plan(headline: &str, changes: &[(String, KeyChange)]) -> String {
    let mut out = format!("{headline} (dry run: nothing was written)\n");
    let width = changes
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    for (key, change) in changes {
        out.push_str(&format!(
            "  {} {key:<width$}   {}\n",
            change.mark(),
            change.word()
        ));
    }
    if changes.is_empty() {
        out.push_str("  no key changes\n");
    }
    out
}

/// The Secret the controller imports: data = the keys, plus removal instructions.
/// `owner` (the HSMSecret, when it already exists) lets garbage collection clean up an
/// import the controller never picked up.
pub fn import_secret(
    namespace: &str,
    hsmsecret: &str,
    keys: Option<&KeySet>,
    remove: &[String],
    owner: Option<&HSMSecret>,
) -> Secret {
    let data = keys.map(|keys| {
        keys.iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.expose().to_vec())))
            .collect::<BTreeMap<_, _>>()
    });
    let annotations = (!remove.is_empty())
        .then(|| BTreeMap::from([(REMOVE_KEYS_ANNOTATION.to_string(), remove.join(","))]));
    let owner_references = owner.and_then(|o| {
        Some(vec![OwnerReference {
            api_version: HSMSecret::api_version(&()).into_owned(),
            kind: HSMSecret::kind(&()).into_owned(),
            name: o.metadata.name.clone()?,
            uid: o.metadata.uid.clone()?,
            ..Default::default()
        }])
    });
    Secret {
        metadata: ObjectMeta {
            generate_name: Some(format!("{hsmsecret}-import-")),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                IMPORT_FOR_LABEL.to_string(),
                hsmsecret.to_string(),
            )])),
            annotations,
            owner_references,
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data.unwrap_or_default()),
        ..Default::default()
    }
}

/// `spec.source` pointing at an import Secret.
pub fn source(secret_name: &str, mode: ImportMode) -> SecretSource {
    SecretSource {
        secret_ref: LocalSecretRef {
            name: secret_name.to_string(),
        },
        delete_after_import: Some(true),
        mode: Some(mode),
    }
}

/// A new HSMSecret importing from `secret_name` (create always replaces: nothing to merge).
pub fn new_hsmsecret(namespace: &str, name: &str, device: &str, secret_name: &str) -> HSMSecret {
    let mut obj = HSMSecret::new(
        name,
        HSMSecretSpec {
            device_ref: device.to_string(),
            secret_name: None,
            secret_type: None,
            sync_interval: None,
            source: Some(source(secret_name, ImportMode::Replace)),
            access: None,
            deletion_policy: None,
        },
    );
    obj.metadata.namespace = Some(namespace.to_string());
    obj
}

/// Merge patch setting `spec.source` on an existing HSMSecret.
pub fn source_patch(secret_name: &str, mode: ImportMode) -> serde_json::Value {
    json!({"spec": {"source": source(secret_name, mode)}})
}
