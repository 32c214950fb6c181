//! The one way this project records a Kubernetes Event (events.k8s.io/v1), for the
//! HSMDevice controller, the HSMSecret reconciler and the node plugin alike.
//!
//! Every Event is its own record: failovers and switchovers are the audit trail of a
//! device, so two Events with the same reason are never merged into a series (as a
//! caching recorder would do, keeping the first message). Each gets a fresh name chosen
//! here, `<object>.<hex>` the way kubectl's own recorders name them, because the API
//! server refuses a `generateName` that ends in a dot. `regarding` carries the object's
//! uid, without which `kubectl describe` does not list the Event.

use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};

/// Severity of an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Normal => "Normal",
            Severity::Warning => "Warning",
        }
    }
}

/// Who records: the reporting controller and its instance (pod or node name).
#[derive(Clone, Debug)]
pub struct Reporter {
    pub controller: String,
    pub instance: String,
}

/// What happened, before it becomes an Event.
#[derive(Clone, Debug)]
pub struct Occurrence<'a> {
    pub severity: Severity,
    pub reason: &'a str,
    pub action: &'a str,
    pub note: &'a str,
}

/// The API server's limit on an events.k8s.io/v1 note, in bytes.
pub const NOTE_MAX_BYTES: usize = 1024;
/// The API server's limit on reason, action, reporting controller and instance.
pub const FIELD_MAX: usize = 128;
/// Namespace of Events about cluster-scoped objects (such as an HSMDevice), as kubectl and
/// client-go record them; `kubectl describe` finds them there by the object's uid.
pub const CLUSTER_EVENTS_NAMESPACE: &str = "default";

/// The Event for an occurrence about `regarding`, named and bounded as the API server
/// requires.
pub fn build(regarding: ObjectReference, reporter: &Reporter, what: &Occurrence<'_>) -> Event {
    let namespace = regarding
        .namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| CLUSTER_EVENTS_NAMESPACE.into());
    let name = event_name(
        regarding.name.as_deref().unwrap_or("object"),
        unique_suffix(),
    );
    Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            ..Default::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        action: Some(bounded(what.action, FIELD_MAX)),
        reason: Some(bounded(what.reason, FIELD_MAX)),
        note: Some(bounded(what.note, NOTE_MAX_BYTES)),
        type_: Some(what.severity.as_str().into()),
        regarding: Some(regarding),
        reporting_controller: Some(bounded(&reporter.controller, FIELD_MAX)),
        reporting_instance: Some(bounded(&reporter.instance, FIELD_MAX)),
        ..Default::default()
    }
}

/// Creates the Event in its namespace.
pub async fn publish(client: &kube::Client, event: &Event) -> Result<(), kube::Error> {
    let namespace = event
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(CLUSTER_EVENTS_NAMESPACE);
    Api::<Event>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), event)
        .await
        .map(drop)
}

/// `<object>.<suffix>`, the object's name cut so the whole stays a DNS subdomain of at most
/// 253 characters.
pub fn event_name(object: &str, suffix: u64) -> String {
    let suffix = format!("{suffix:x}");
    let room = 253 - 1 - suffix.len();
    let mut base: String = object.chars().take(room).collect();
    // A cut name must still end in an alphanumeric character.
    while base.ends_with(['.', '-']) {
        base.pop();
    }
    if base.is_empty() {
        base.push_str("object");
    }
    format!("{base}.{suffix}")
}

/// Nanoseconds since the epoch, strictly increasing within the process, so two Events
/// recorded in the same instant still get two names.
fn unique_suffix() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last.saturating_add(1));
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reporter() -> Reporter {
        Reporter {
            controller: "hsmsecrets.io/controller".into(),
            instance: "pod-1".into(),
        }
    }

    #[test]
    fn names_are_fresh_subdomains_and_cluster_objects_go_to_default() {
        let regarding = ObjectReference {
            kind: Some("HSMDevice".into()),
            name: Some("prod-hsm".into()),
            uid: Some("u-1".into()),
            ..Default::default()
        };
        let what = Occurrence {
            severity: Severity::Warning,
            reason: "HSMFailover",
            action: "Failover",
            note: "primary worker-1 failed",
        };
        let a = build(regarding.clone(), &reporter(), &what);
        let b = build(regarding, &reporter(), &what);
        let (na, nb) = (a.metadata.name.unwrap(), b.metadata.name.unwrap());
        assert_ne!(na, nb);
        assert!(na.starts_with("prod-hsm."));
        assert!(a.metadata.generate_name.is_none());
        assert_eq!(a.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(a.regarding.unwrap().uid.as_deref(), Some("u-1"));
    }

    #[test]
    fn long_names_and_notes_are_cut_to_the_servers_limits() {
        let name = event_name(&format!("{}.-", "a".repeat(300)), u64::MAX);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.starts_with('a') && !name.contains(".-"));
        let note = bounded(&"é".repeat(1000), NOTE_MAX_BYTES);
        assert!(note.len() <= NOTE_MAX_BYTES && note.ends_with("..."));
    }
}
