//! `kubectl hsm mounts [SECRET]`: which pods have HSM secrets mounted now, at which
//! version, from which copy. Each node plugin keeps its own table in memory (no API write
//! per publish) and serves it at `/mounts` on its metrics port; this command reads every
//! plugin's table through the API server's pod proxy (`get pods/proxy` in the plugin's
//! namespace).

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde::{Deserialize, Serialize};

use super::args::MountsRequest;
use super::error::Call;
use super::render::{Table, serialized};
use super::{KubectlError, OutputFormat, Session, Term};

/// One mounted volume as a node plugin reports it (the `/mounts` schema).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MountView {
    #[serde(default)]
    pub node: String,
    pub pod: PodView,
    pub device: String,
    pub read_from: String,
    pub secrets: Vec<SecretVersionView>,
    pub since: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodView {
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecretVersionView {
    pub name: String,
    #[serde(default)]
    pub version: Option<u64>,
}

/// The report: every mount found, and the plugins that could not be asked.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MountsReport {
    pub mounts: Vec<MountView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

pub async fn mounts(
    session: &Session,
    request: &MountsRequest,
    term: &mut Term<'_>,
) -> Result<(), KubectlError> {
    let plugins: Api<Pod> = Api::namespaced(session.client.clone(), &request.plugin_namespace);
    let call = Call {
        verb: "list",
        kind: "Pod",
        resource: "pods",
        group: "",
        namespace: Some(&request.plugin_namespace),
        name: None,
    };
    let pods = plugins
        .list(&ListParams::default().labels(&request.plugin_selector))
        .await
        .map_err(|e| call.fail(e))?
        .items;
    if pods.is_empty() {
        return Err(KubectlError::Refused(format!(
            "no node plugin pods match {:?} in namespace {}; set --plugin-namespace and \
             --plugin-selector to where the hsm-secrets DaemonSet runs",
            request.plugin_selector, request.plugin_namespace
        )));
    }
    let namespace = (!request.all_namespaces).then_some(session.namespace.as_str());
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(namespace) = namespace {
        query.append_pair("namespace", namespace);
    }
    if let Some(secret) = &request.secret {
        query.append_pair("secret", secret);
    }
    let query = query.finish();
    let mut report = MountsReport {
        mounts: Vec::new(),
        unreachable: Vec::new(),
    };
    for pod in &pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let path = format!(
            "/api/v1/namespaces/{}/pods/{name}:{}/proxy/mounts?{query}",
            request.plugin_namespace, request.plugin_port
        );
        let answer = match http::Request::get(&path).body(Vec::new()) {
            Ok(get) => session.client.request_text(get).await,
            Err(error) => {
                report.unreachable.push(format!("{node}: {error}"));
                continue;
            }
        };
        let text = match answer {
            Ok(text) => text,
            Err(kube::Error::Api(status)) if status.code == 403 => {
                return Err(KubectlError::Forbidden {
                    verb: "get",
                    resource: "pods/proxy",
                    scope: format!(" in namespace {}", request.plugin_namespace),
                    message: status.message,
                });
            }
            Err(error) => {
                report
                    .unreachable
                    .push(format!("{node} (pod {name}): {error}"));
                continue;
            }
        };
        match serde_json::from_str::<Vec<MountView>>(&text) {
            Ok(found) => report.mounts.extend(found.into_iter().map(|mut m| {
                m.node = node.clone();
                m
            })),
            Err(error) => report.unreachable.push(format!(
                "{node} (pod {name}): the answer is not a mount table ({error}); is the \
                 plugin older than this kubectl hsm, or started with --audit-log none?"
            )),
        }
    }
    report
        .mounts
        .sort_by(|a, b| (&a.pod.namespace, &a.pod.name).cmp(&(&b.pod.namespace, &b.pod.name)));
    for unreachable in &report.unreachable {
        term.note(&format!("warning: node plugin on {unreachable}"));
    }
    let text = render(&report, request.secret.as_deref(), request.output)?;
    term.print(&text)
}

/// The table (one row per pod and secret) or the whole report as JSON or YAML.
pub fn render(
    report: &MountsReport,
    secret: Option<&str>,
    output: OutputFormat,
) -> Result<String, KubectlError> {
    if output != OutputFormat::Table {
        return serialized(report, output);
    }
    if report.mounts.is_empty() {
        return Ok(match secret {
            Some(secret) => format!("No pod has HSMSecret {secret} mounted.\n"),
            None => "No pod has HSM secrets mounted.\n".into(),
        });
    }
    let mut table = Table::new(&[
        "NAMESPACE",
        "POD",
        "SECRET",
        "VERSION",
        "NODE",
        "READ FROM",
        "SINCE",
    ]);
    for mount in &report.mounts {
        for version in mount
            .secrets
            .iter()
            .filter(|v| secret.is_none_or(|s| v.name == s))
        {
            table.row(vec![
                mount.pod.namespace.clone().unwrap_or_default(),
                mount.pod.name.clone().unwrap_or_default(),
                version.name.clone(),
                version.version.map(|v| v.to_string()).unwrap_or_default(),
                mount.node.clone(),
                mount.read_from.clone(),
                mount.since.clone(),
            ]);
        }
    }
    Ok(table.render(""))
}
