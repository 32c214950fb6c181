//! Pure rendering of read commands: tables like kubectl's, and JSON/YAML of the objects
//! or of a summary struct (fields in declaration order, so output is stable).
//! Every function takes `now`, so golden tests are deterministic.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde::Serialize;

use super::{KubectlError, OutputFormat};
use crate::crd::{
    DeletionPolicy, DevicePhase, DeviceRole, HSMDevice, HSMSecret, MirroringPolicy, NodeHealth,
    SWITCHOVER_ANNOTATION, ServedBy, SyncStatus,
};

const NONE: &str = "<none>";

/// A kubectl-style table: columns padded to the widest cell plus three spaces.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self, indent: &str) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::from(indent);
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[c] - cell.chars().count() + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// kubectl's short duration format (`45s`, `5m3s`, `3h`, `2d4h`, `1y30d`).
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    let (m, h) = (s / 60, s / 3600);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{}d", h / 24)
        } else {
            format!("{}d{}h", h / 24, h % 24)
        }
    } else if h < 24 * 365 * 2 {
        format!("{}d", h / 24)
    } else if h < 24 * 365 * 8 {
        match (h / 24) % 365 {
            0 => format!("{}y", h / (24 * 365)),
            d => format!("{}y{d}d", h / (24 * 365)),
        }
    } else {
        format!("{}y", h / (24 * 365))
    }
}

/// Time since `t` (`<unknown>` when absent, as kubectl prints a missing AGE).
pub fn age(t: Option<&Time>, now: Timestamp, missing: &str) -> String {
    match t {
        Some(t) => human_duration(now.as_second() - t.0.as_second()),
        None => missing.into(),
    }
}

fn lag(seconds: Option<i64>) -> String {
    seconds.map(human_duration).unwrap_or_else(|| NONE.into())
}

fn or_none(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => one_line(s),
        _ => NONE.into(),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn debug_word<T: std::fmt::Debug>(v: T) -> String {
    format!("{v:?}")
}

fn timestamp(t: Option<&Time>, now: Timestamp) -> String {
    match t {
        Some(t) => format!("{} ({} ago)", t.0, age(Some(t), now, NONE)),
        None => NONE.into(),
    }
}

/// JSON (pretty, trailing newline) or YAML of a serializable value.
pub fn serialized<T: Serialize>(value: &T, output: OutputFormat) -> Result<String, KubectlError> {
    match output {
        OutputFormat::Yaml => serde_saphyr::to_string(value)
            .map(|mut s| {
                if !s.ends_with('\n') {
                    s.push('\n');
                }
                s
            })
            .map_err(|e| KubectlError::Output(e.to_string())),
        _ => serde_json::to_string_pretty(value)
            .map(|mut s| {
                s.push('\n');
                s
            })
            .map_err(|e| KubectlError::Output(e.to_string())),
    }
}

/// A `kind: List`, as `kubectl get -o json` prints several objects.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct List<T> {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub items: Vec<T>,
}

impl<T> List<T> {
    pub fn new(items: Vec<T>) -> Self {
        Self {
            api_version: "v1",
            kind: "List",
            items,
        }
    }
}

/// Objects as printed: without managedFields (kubectl hides them too).
fn printable<K: kube::Resource + Clone>(items: &[K]) -> Vec<K> {
    items
        .iter()
        .cloned()
        .map(|mut o| {
            o.meta_mut().managed_fields = None;
            o
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// list

/// `list`: NAME DEVICE STATUS VERSION KEYS LAST SYNC AGE (NAMESPACE first with `-A`).
/// An empty table renders as nothing; see [`empty_notice`].
pub fn secret_list(
    items: &[HSMSecret],
    all_namespaces: bool,
    output: OutputFormat,
    now: Timestamp,
) -> Result<String, KubectlError> {
    if output != OutputFormat::Table {
        return serialized(&List::new(printable(items)), output);
    }
    if items.is_empty() {
        return Ok(String::new());
    }
    let mut headers = vec![
        "NAME",
        "DEVICE",
        "STATUS",
        "VERSION",
        "KEYS",
        "LAST SYNC",
        "AGE",
    ];
    if all_namespaces {
        headers.insert(0, "NAMESPACE");
    }
    let mut table = Table::new(&headers);
    for s in items {
        let status = s.status.clone().unwrap_or_default();
        let mut row = vec![
            s.metadata.name.clone().unwrap_or_default(),
            s.spec.device_ref.clone(),
            debug_word(status.sync_status),
            status
                .version
                .map(|v| v.to_string())
                .unwrap_or_else(|| NONE.into()),
            status.keys.len().to_string(),
            age(status.last_sync_time.as_ref(), now, NONE),
            age(s.metadata.creation_timestamp.as_ref(), now, "<unknown>"),
        ];
        if all_namespaces {
            row.insert(0, s.metadata.namespace.clone().unwrap_or_default());
        }
        table.row(row);
    }
    Ok(table.render(""))
}

/// What kubectl says for an empty list (printed on stderr).
pub fn empty_notice(kind: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("No {kind}s found in namespace {ns}."),
        None => format!("No {kind}s found."),
    }
}

// ---------------------------------------------------------------------------------------
// get

/// `get NAME`: what a person (or script) needs about one HSMSecret.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretView {
    pub name: String,
    pub namespace: String,
    pub device: String,
    pub sync_status: SyncStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<ServedBy>,
    /// Name of the Kubernetes Secret copy, if one is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    pub deletion_policy: DeletionPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<Time>,
    /// Whether `keys[].value` was requested (`--show-values`).
    pub values_shown: bool,
    pub keys: Vec<KeyView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyView {
    pub name: String,
    /// The value as text (UTF-8 values only; only with `--show-values`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Base64 of a binary value (only with `--show-values`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// With `--show-values`: the key is in the HSM but not (yet) in the Secret copy.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub missing_from_copy: bool,
}

impl SecretView {
    /// `values` is the Secret copy's data (only passed with `--show-values`); `only`
    /// limits the keys shown (already checked to exist).
    pub fn new(
        obj: &HSMSecret,
        values: Option<&BTreeMap<String, ByteString>>,
        only: &[String],
    ) -> Self {
        let status = obj.status.clone().unwrap_or_default();
        let mut names: Vec<String> = status.keys.clone();
        if let Some(values) = values {
            for k in values.keys() {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
        names.sort();
        let keys = names
            .into_iter()
            .filter(|k| only.is_empty() || only.contains(k))
            .map(|name| key_view(name, values))
            .collect();
        SecretView {
            name: obj.metadata.name.clone().unwrap_or_default(),
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            device: obj.spec.device_ref.clone(),
            sync_status: status.sync_status,
            version: status.version,
            last_sync_time: status.last_sync_time,
            served_by: status.served_by,
            secret_name: obj.spec.secret_name.clone(),
            deletion_policy: obj.spec.deletion_policy(),
            last_error: status.last_error,
            creation_timestamp: obj.metadata.creation_timestamp.clone(),
            values_shown: values.is_some(),
            keys,
            conditions: status.conditions,
        }
    }
}

fn key_view(name: String, values: Option<&BTreeMap<String, ByteString>>) -> KeyView {
    let mut view = KeyView {
        name,
        value: None,
        value_base64: None,
        missing_from_copy: false,
    };
    if let Some(values) = values {
        match values.get(&view.name) {
            Some(bytes) => match std::str::from_utf8(&bytes.0) {
                Ok(text) => view.value = Some(text.to_string()),
                Err(_) => view.value_base64 = Some(base64_of(bytes)),
            },
            None => view.missing_from_copy = true,
        }
    }
    view
}

/// Base64 as Kubernetes writes Secret data (k8s-openapi's ByteString encoding).
fn base64_of(bytes: &ByteString) -> String {
    match serde_json::to_value(bytes) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// `get NAME` as text: a describe-style page; values only when the view carries them.
pub fn secret_detail(view: &SecretView, now: Timestamp) -> String {
    let mut out = String::new();
    let mut field = |label: &str, value: String| {
        out.push_str(&format!("{:<14}{value}\n", format!("{label}:")));
    };
    field("Name", view.name.clone());
    field("Namespace", view.namespace.clone());
    field("Device", view.device.clone());
    field("Status", debug_word(view.sync_status));
    field(
        "Version",
        view.version
            .map(|v| v.to_string())
            .unwrap_or_else(|| NONE.into()),
    );
    field("Last Sync", timestamp(view.last_sync_time.as_ref(), now));
    field(
        "Served By",
        view.served_by
            .as_ref()
            .map(|s| format!("{} ({:?})", s.node, s.role))
            .unwrap_or_else(|| NONE.into()),
    );
    field("Secret Copy", or_none(view.secret_name.as_deref()));
    field("Deletion", debug_word(view.deletion_policy));
    field("Last Error", or_none(view.last_error.as_deref()));
    field(
        "Age",
        age(view.creation_timestamp.as_ref(), now, "<unknown>"),
    );
    out.push_str("Keys:\n");
    if view.keys.is_empty() {
        out.push_str("  <none>\n");
    }
    let width = view
        .keys
        .iter()
        .map(|k| k.name.chars().count())
        .max()
        .unwrap_or(0);
    for k in &view.keys {
        let shown = if !view.values_shown {
            "<hidden>".to_string()
        } else if k.missing_from_copy {
            "<not in the Secret copy yet>".to_string()
        } else if let Some(text) = &k.value {
            text.replace('\n', &format!("\n  {:width$}   ", ""))
        } else {
            format!(
                "<binary; base64> {}",
                k.value_base64.as_deref().unwrap_or_default()
            )
        };
        out.push_str(&format!("  {:<width$}   {shown}\n", k.name));
    }
    out.push_str(&conditions_section(&view.conditions, now));
    out
}

fn conditions_section(conditions: &[Condition], now: Timestamp) -> String {
    let mut out = String::from("Conditions:\n");
    if conditions.is_empty() {
        out.push_str("  <none>\n");
        return out;
    }
    let mut table = Table::new(&["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]);
    for c in conditions {
        table.row(vec![
            c.type_.clone(),
            c.status.clone(),
            or_none(Some(&c.reason)),
            age(Some(&c.last_transition_time), now, NONE),
            or_none(Some(&c.message)),
        ]);
    }
    out.push_str(&table.render("  "));
    out
}

/// `get NAME --key K --show-values` as text: the raw value, byte for byte, so that
/// `$(kubectl hsm get NAME --key K --show-values)` works.
pub fn raw_value(values: &BTreeMap<String, ByteString>, key: &str) -> Option<Vec<u8>> {
    values.get(key).map(|v| v.0.clone())
}

// ---------------------------------------------------------------------------------------
// devices

fn policy(d: &HSMDevice) -> MirroringPolicy {
    d.mirroring().policy
}

/// `devices`: NAME POLICY PRIMARY PHASE MIRRORS LAG EPOCH LAST SYNC FAILOVERS AGE
/// (the `kubectl get hsmdevice -o wide` columns).
pub fn device_list(
    items: &[HSMDevice],
    output: OutputFormat,
    now: Timestamp,
) -> Result<String, KubectlError> {
    if output != OutputFormat::Table {
        return serialized(&List::new(printable(items)), output);
    }
    if items.is_empty() {
        return Ok(String::new());
    }
    let mut table = Table::new(&[
        "NAME",
        "POLICY",
        "PRIMARY",
        "PHASE",
        "MIRRORS",
        "LAG",
        "EPOCH",
        "LAST SYNC",
        "FAILOVERS",
        "ARCHIVE LAG",
        "VERIFIED",
        "AGE",
    ]);
    for d in items {
        let status = d.status.clone().unwrap_or_default();
        table.row(vec![
            d.metadata.name.clone().unwrap_or_default(),
            debug_word(policy(d)),
            or_none(status.primary_node.as_deref()),
            debug_word(status.phase),
            or_none(status.mirrors.as_deref()),
            lag(status.max_sync_lag_seconds),
            status.epoch.to_string(),
            age(status.last_sync_time.as_ref(), now, NONE),
            status.failover_count.to_string(),
            lag(status.backup.as_ref().and_then(|b| b.lag_seconds)),
            age(
                status
                    .backup
                    .as_ref()
                    .and_then(|b| b.last_verified.as_ref())
                    .map(|v| &v.finished_at),
                now,
                NONE,
            ),
            age(d.metadata.creation_timestamp.as_ref(), now, "<unknown>"),
        ]);
    }
    Ok(table.render(""))
}

// ---------------------------------------------------------------------------------------
// health

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthReport {
    /// Every device is Ready.
    pub ready: bool,
    pub devices: Vec<DeviceHealth>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceHealth {
    pub name: String,
    pub phase: DevicePhase,
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_node: Option<String>,
    pub epoch: u64,
    pub nodes: Vec<NodeHealthView>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeHealthView {
    pub node: String,
    pub role: DeviceRole,
    pub health: NodeHealth,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_lag_seconds: Option<i64>,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl HealthReport {
    pub fn new(devices: &[HSMDevice]) -> Self {
        let devices: Vec<DeviceHealth> = devices
            .iter()
            .map(|d| {
                let status = d.status.clone().unwrap_or_default();
                DeviceHealth {
                    name: d.metadata.name.clone().unwrap_or_default(),
                    phase: status.phase,
                    ready: status.phase == DevicePhase::Ready,
                    primary_node: status.primary_node,
                    epoch: status.epoch,
                    nodes: status
                        .nodes
                        .into_iter()
                        .map(|n| NodeHealthView {
                            node: n.node,
                            role: n.role,
                            health: n.health,
                            sync_lag_seconds: n.sync_lag_seconds,
                            consecutive_failures: n.consecutive_failures,
                            last_error: n.last_error,
                        })
                        .collect(),
                }
            })
            .collect();
        HealthReport {
            ready: devices.iter().all(|d| d.ready),
            devices,
        }
    }

    /// The devices that are not Ready, as `name (Phase)`.
    pub fn not_ready(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter(|d| !d.ready)
            .map(|d| format!("{} ({:?})", d.name, d.phase))
            .collect()
    }
}

/// `health` as text: one row per node, the device and phase repeated so lines grep.
pub fn health_table(report: &HealthReport) -> String {
    if report.devices.is_empty() {
        return String::new();
    }
    let mut table = Table::new(&[
        "DEVICE",
        "PHASE",
        "NODE",
        "ROLE",
        "HEALTH",
        "LAG",
        "FAILURES",
        "LAST ERROR",
    ]);
    for d in &report.devices {
        if d.nodes.is_empty() {
            table.row(vec![
                d.name.clone(),
                debug_word(d.phase),
                NONE.into(),
                NONE.into(),
                NONE.into(),
                NONE.into(),
                NONE.into(),
                NONE.into(),
            ]);
        }
        for n in &d.nodes {
            table.row(vec![
                d.name.clone(),
                debug_word(d.phase),
                n.node.clone(),
                debug_word(n.role),
                debug_word(n.health),
                lag(n.sync_lag_seconds),
                n.consecutive_failures.to_string(),
                or_none(n.last_error.as_deref()),
            ]);
        }
    }
    table.render("")
}

// ---------------------------------------------------------------------------------------
// mirror status

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MirrorStatusView {
    pub device: String,
    pub policy: MirroringPolicy,
    pub auto_failover: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_node: Option<String>,
    pub phase: DevicePhase,
    pub epoch: u64,
    pub failover_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_failover_time: Option<Time>,
    /// A planned switchover still in progress (the annotation is set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_to: Option<String>,
    pub nodes: Vec<crate::crd::DeviceNodeStatus>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl MirrorStatusView {
    pub fn new(d: &HSMDevice) -> Self {
        let status = d.status.clone().unwrap_or_default();
        let mirroring = d.mirroring();
        MirrorStatusView {
            device: d.metadata.name.clone().unwrap_or_default(),
            policy: mirroring.policy,
            auto_failover: mirroring.auto_failover(),
            primary_node: status.primary_node,
            phase: status.phase,
            epoch: status.epoch,
            failover_count: status.failover_count,
            last_failover_time: status.last_failover_time,
            switchover_to: d
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SWITCHOVER_ANNOTATION))
                .cloned(),
            nodes: status.nodes,
            conditions: status.conditions,
        }
    }
}

/// `mirror status DEVICE` as text: a summary, the per-node table and the conditions.
pub fn mirror_table(view: &MirrorStatusView, now: Timestamp) -> String {
    let mut out = String::new();
    let mut field = |label: &str, value: String| {
        out.push_str(&format!("{:<13}{value}\n", format!("{label}:")));
    };
    field("Device", view.device.clone());
    field(
        "Policy",
        format!("{:?} (autoFailover: {})", view.policy, view.auto_failover),
    );
    field(
        "Primary",
        format!(
            "{} (epoch {})",
            or_none(view.primary_node.as_deref()),
            view.epoch
        ),
    );
    field("Phase", debug_word(view.phase));
    field(
        "Failovers",
        match &view.last_failover_time {
            Some(t) => format!(
                "{} (last {} ago)",
                view.failover_count,
                age(Some(t), now, NONE)
            ),
            None => view.failover_count.to_string(),
        },
    );
    if let Some(to) = &view.switchover_to {
        field("Switchover", format!("to {to} requested, in progress"));
    }
    out.push('\n');
    if view.nodes.is_empty() {
        out.push_str("No nodes reported in status yet.\n");
    } else {
        let mut table = Table::new(&[
            "NODE",
            "ROLE",
            "HEALTH",
            "APPLIED SEQ",
            "LAG",
            "LAST SYNC",
            "ERROR",
        ]);
        for n in &view.nodes {
            table.row(vec![
                n.node.clone(),
                debug_word(n.role),
                debug_word(n.health),
                n.applied_sequence.to_string(),
                lag(n.sync_lag_seconds),
                age(n.last_sync_time.as_ref(), now, NONE),
                or_none(n.last_error.as_deref()),
            ]);
        }
        out.push_str(&table.render(""));
    }
    out.push('\n');
    out.push_str(&conditions_section(&view.conditions, now));
    out
}
