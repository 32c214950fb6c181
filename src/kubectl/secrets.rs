//! HSMSecret commands: list, get, create/update (imports) and delete.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use super::args::{DeleteRequest, GetRequest, ImportRequest, ImportVerb, ListRequest, Wait};
use super::error::Call;
use super::plan;
use super::render::{self, SecretView};
use super::wait::{Outcome, Step, poll};
use super::{KubectlError, OutputFormat, Session, Term};
use crate::crd::{DeletionPolicy, HSMSecret, ImportMode, SyncStatus};

fn secrets_api(s: &Session) -> Api<HSMSecret> {
    Api::namespaced(s.client.clone(), &s.namespace)
}

fn with_hint(e: KubectlError, extra: String) -> KubectlError {
    match e {
        KubectlError::NotFound { kind, name, .. } => KubectlError::NotFound {
            kind,
            name,
            hint: extra,
        },
        other => other,
    }
}

/// GET one HSMSecret; a missing object is `None`, a missing CRD stays an error.
async fn get_opt(s: &Session, name: &str) -> Result<Option<HSMSecret>, KubectlError> {
    match secrets_api(s).get(name).await {
        Ok(obj) => Ok(Some(obj)),
        Err(e) => match Call::hsmsecret("get", Some(&s.namespace), Some(name)).fail(e) {
            KubectlError::NotFound { .. } => Ok(None),
            other => Err(other),
        },
    }
}

async fn get_existing(s: &Session, name: &str, hint: String) -> Result<HSMSecret, KubectlError> {
    secrets_api(s).get(name).await.map_err(|e| {
        with_hint(
            Call::hsmsecret("get", Some(&s.namespace), Some(name)).fail(e),
            hint,
        )
    })
}

fn list_hint(s: &Session) -> String {
    format!(
        "; see what exists with `kubectl hsm list -n {}`",
        s.namespace
    )
}

fn status_keys(obj: &HSMSecret) -> Vec<String> {
    obj.status
        .as_ref()
        .map(|st| st.keys.clone())
        .unwrap_or_default()
}

fn check_known_keys(
    s: &Session,
    name: &str,
    known: &[String],
    wanted: &[String],
) -> Result<(), KubectlError> {
    for key in wanted {
        if !known.contains(key) {
            return Err(KubectlError::UnknownKey {
                secret: format!("{}/{name}", s.namespace),
                key: key.clone(),
                known: if known.is_empty() {
                    "none reported in status yet".into()
                } else {
                    known.join(", ")
                },
            });
        }
    }
    Ok(())
}

pub(crate) async fn list(
    s: &Session,
    r: &ListRequest,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let (api, ns) = if r.all_namespaces {
        (Api::<HSMSecret>::all(s.client.clone()), None)
    } else {
        (secrets_api(s), Some(s.namespace.as_str()))
    };
    let items = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Call::hsmsecret("list", ns, None).fail(e))?
        .items;
    if items.is_empty() && r.output == OutputFormat::Table {
        term.note(&render::empty_notice("HSMSecret", ns));
    }
    term.print(&render::secret_list(
        &items,
        r.all_namespaces,
        r.output,
        Timestamp::now(),
    )?)
}

pub(crate) async fn get(
    s: &Session,
    r: &GetRequest,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let obj = get_existing(s, &r.name, list_hint(s)).await?;
    // Values are read only when asked for: without --show-values no Secret is fetched.
    let values = if r.show_values {
        Some(read_copy(s, &obj).await?)
    } else {
        None
    };
    let mut known = status_keys(&obj);
    if let Some(values) = &values {
        known.extend(
            values
                .keys()
                .filter(|k| !known.contains(k))
                .cloned()
                .collect::<Vec<_>>(),
        );
    }
    check_known_keys(s, &r.name, &known, &r.keys)?;
    if let (Some(values), [key], OutputFormat::Table) = (&values, r.keys.as_slice(), r.output) {
        let bytes = render::raw_value(values, key).ok_or_else(|| KubectlError::NotFound {
            kind: "key",
            name: key.clone(),
            hint: format!(
                " in the Secret copy {}/{} yet; the controller writes it on the next sync",
                s.namespace,
                obj.spec.secret_name.as_deref().unwrap_or_default()
            ),
        })?;
        return term
            .out
            .write_all(&bytes)
            .and_then(|()| term.out.flush())
            .map_err(KubectlError::stdout);
    }
    let view = SecretView::new(&obj, values.as_ref(), &r.keys);
    match r.output {
        OutputFormat::Table => term.print(&render::secret_detail(&view, Timestamp::now())),
        other => term.print(&render::serialized(&view, other)?),
    }
}

/// The data of the synced Kubernetes Secret (`spec.secretName`).
async fn read_copy(
    s: &Session,
    obj: &HSMSecret,
) -> Result<std::collections::BTreeMap<String, k8s_openapi::ByteString>, KubectlError> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let Some(copy) = obj.spec.secret_name.as_deref() else {
        return Err(KubectlError::Refused(format!(
            "HSMSecret {}/{name} keeps no Kubernetes Secret copy, so its values are only \
             mounted into pods; to read them here, set spec.secretName on the HSMSecret \
             (the controller then keeps a Secret of that name in sync)",
            s.namespace
        )));
    };
    let api: Api<Secret> = Api::namespaced(s.client.clone(), &s.namespace);
    let secret = api.get(copy).await.map_err(|e| {
        with_hint(
            Call::secret("get", &s.namespace, Some(copy)).fail(e),
            format!(
                " (the Secret copy of HSMSecret {}/{name}); the controller creates it on its next sync",
                s.namespace
            ),
        )
    })?;
    Ok(secret.data.unwrap_or_default())
}

/// How the HSMSecret is pointed at the import Secret.
enum SourceWrite<'a> {
    Create { device: &'a str },
    Patch { mode: ImportMode },
}

pub(crate) async fn import(
    s: &Session,
    r: &ImportRequest,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let ns = s.namespace.as_str();
    let given = r.keys.names();
    match &r.verb {
        ImportVerb::Create { device } => {
            if r.dry_run {
                if get_opt(s, &r.name).await?.is_some() {
                    return Err(KubectlError::AlreadyExists {
                        kind: "HSMSecret",
                        name: format!("{ns}/{}", r.name),
                        hint: "use `kubectl hsm update` to change it",
                    });
                }
                let changes = plan::plan_keys(&[], &given, ImportMode::Replace, &[]);
                let headline = format!("create HSMSecret {ns}/{} on device {device}", r.name);
                return term.print(&plan::render_plan(&headline, &changes));
            }
            let secret = plan::import_secret(ns, &r.name, Some(&r.keys), &[], None);
            send_import(
                s,
                term,
                &r.name,
                secret,
                SourceWrite::Create { device },
                r.wait,
            )
            .await
        }
        ImportVerb::Update => {
            let hint = format!(
                "; create it with `kubectl hsm create {} --device DEVICE ...`",
                r.name
            );
            let existing = get_existing(s, &r.name, hint).await?;
            if r.dry_run {
                let changes = plan::plan_keys(&status_keys(&existing), &given, r.mode, &[]);
                let headline = format!(
                    "update HSMSecret {ns}/{} on device {} (mode {:?})",
                    r.name, existing.spec.device_ref, r.mode
                );
                return term.print(&plan::render_plan(&headline, &changes));
            }
            let secret = plan::import_secret(ns, &r.name, Some(&r.keys), &[], Some(&existing));
            send_import(
                s,
                term,
                &r.name,
                secret,
                SourceWrite::Patch { mode: r.mode },
                r.wait,
            )
            .await
        }
    }
}

pub(crate) async fn delete(
    s: &Session,
    r: &DeleteRequest,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let ns = s.namespace.as_str();
    let obj = get_existing(s, &r.name, list_hint(s)).await?;
    if !r.remove_keys.is_empty() {
        let existing = status_keys(&obj);
        check_known_keys(s, &r.name, &existing, &r.remove_keys)?;
        if existing.iter().all(|k| r.remove_keys.contains(k)) {
            return Err(KubectlError::Refused(format!(
                "that would remove every key of HSMSecret {ns}/{}; delete the whole secret \
                 instead: kubectl hsm delete {}",
                r.name, r.name
            )));
        }
        if r.dry_run {
            let changes = plan::plan_keys(&existing, &[], ImportMode::Merge, &r.remove_keys);
            let headline = format!("remove keys from HSMSecret {ns}/{}", r.name);
            return term.print(&plan::render_plan(&headline, &changes));
        }
        let secret = plan::import_secret(ns, &r.name, None, &r.remove_keys, Some(&obj));
        return send_import(
            s,
            term,
            &r.name,
            secret,
            SourceWrite::Patch {
                mode: ImportMode::Merge,
            },
            r.wait,
        )
        .await;
    }
    let policy = if r.purge {
        DeletionPolicy::Delete
    } else {
        obj.spec.deletion_policy()
    };
    let fate = match policy {
        DeletionPolicy::Retain => {
            "the HSM data is kept (deletionPolicy Retain): recreate the HSMSecret to use it again, \
             or delete with --purge to remove it"
        }
        DeletionPolicy::Delete => "the controller deletes the HSM data (deletionPolicy Delete)",
    };
    if r.dry_run {
        return term.print(&format!(
            "would delete HSMSecret {ns}/{}; {fate} (dry run: nothing was written)\n",
            r.name
        ));
    }
    let api = secrets_api(s);
    if r.purge && obj.spec.deletion_policy() != DeletionPolicy::Delete {
        let patch = json!({"spec": {"deletionPolicy": "Delete"}});
        api.patch(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| Call::hsmsecret("patch", Some(ns), Some(&r.name)).fail(e))?;
    }
    api.delete(&r.name, &DeleteParams::default())
        .await
        .map_err(|e| Call::hsmsecret("delete", Some(ns), Some(&r.name)).fail(e))?;
    term.print(&format!("hsmsecret {ns}/{} deleted; {fate}\n", r.name))
}

/// Creates the import Secret, points the HSMSecret at it, and waits for the controller.
async fn send_import(
    s: &Session,
    term: &mut Term<'_>,
    name: &str,
    secret: Secret,
    write: SourceWrite<'_>,
    wait: Wait,
) -> Result<(), KubectlError> {
    let ns = s.namespace.as_str();
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), ns);
    let created = secrets
        .create(&PostParams::default(), &secret)
        .await
        .map_err(|e| Call::secret("create", ns, None).fail(e))?;
    let secret_name = created.metadata.name.clone().unwrap_or_default();
    let source_version = created
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let api = secrets_api(s);
    let write = async {
        match write {
            SourceWrite::Create { device } => api
                .create(
                    &PostParams::default(),
                    &plan::new_hsmsecret(ns, name, device, &secret_name),
                )
                .await
                .map_err(|e| Call::hsmsecret("create", Some(ns), Some(name)).fail(e)),
            SourceWrite::Patch { mode } => api
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(&plan::source_patch(&secret_name, mode)),
                )
                .await
                .map_err(|e| Call::hsmsecret("patch", Some(ns), Some(name)).fail(e)),
        }
    };
    // An interrupted command must not leave the plaintext import Secret behind: until the
    // HSMSecret points at it, Ctrl-C (or SIGTERM) takes it back like a refusal does.
    let written = tokio::select! {
        written = write => written,
        signal = interrupted() => Err(KubectlError::Refused(format!(
            "interrupted by {signal} before HSMSecret {ns}/{name} was written; nothing was imported"
        ))),
    };
    let written = match written {
        Ok(obj) => obj,
        Err(e) => {
            // The import Secret holds values nobody will import: take it back.
            if secrets
                .delete(&secret_name, &DeleteParams::default())
                .await
                .is_err()
            {
                term.note(&format!(
                    "warning: could not delete the unused import Secret {ns}/{secret_name}; \
                     delete it with: kubectl -n {ns} delete secret {secret_name}"
                ));
            }
            return Err(e);
        }
    };
    term.note(&format!(
        "import into HSMSecret {ns}/{name} requested (Secret {ns}/{secret_name})"
    ));
    if !wait.enabled {
        return term.print(&format!(
            "hsmsecret {ns}/{name}: import requested; not waiting (follow with `kubectl hsm get {name}`)\n"
        ));
    }
    let generation = written.metadata.generation;
    let outcome = poll(wait.timeout, s.poll_interval, async || {
        let obj = get_existing(s, name, String::new()).await?;
        let status = obj.status.clone().unwrap_or_default();
        if status.imported_source_version.as_deref() == Some(source_version.as_str()) {
            return Ok(Step::Done(obj));
        }
        let current = match (status.observed_generation, generation) {
            (Some(seen), Some(wrote)) => seen >= wrote,
            _ => true,
        };
        if status.sync_status == SyncStatus::Error && current {
            return Err(KubectlError::ImportFailed {
                name: format!("{ns}/{name}"),
                last_error: status
                    .last_error
                    .unwrap_or_else(|| "no error message in status".into()),
            });
        }
        Ok(Step::Pending(format!(
            "syncStatus {:?}, importedSourceVersion {}",
            status.sync_status,
            status
                .imported_source_version
                .as_deref()
                .unwrap_or("<none>")
        )))
    })
    .await?;
    match outcome {
        Outcome::Done(obj) => {
            let status = obj.status.unwrap_or_default();
            term.print(&format!(
                "hsmsecret {ns}/{name} imported (version {}; keys: {})\n",
                status
                    .version
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "<none>".into()),
                if status.keys.is_empty() {
                    "<none>".to_string()
                } else {
                    status.keys.join(", ")
                }
            ))
        }
        Outcome::TimedOut { last_seen } => Err(KubectlError::Timeout {
            after: wait.timeout,
            waiting_for: format!(
                "the controller to import Secret {ns}/{secret_name} into HSMSecret {ns}/{name}"
            ),
            last_seen,
            hint: format!(
                "the import stays queued and the controller will still apply it; check \
                 `kubectl hsm get {name}` and the controller's logs, or wait longer with --timeout"
            ),
        }),
    }
}

/// Resolves at the first SIGINT or SIGTERM, naming it; never when neither can be watched.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}
