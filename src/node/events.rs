//! Kubernetes Events for republishes that kept the last good content (DESIGN §7).
//!
//! A failed rotation leaves the pod running on its previous secrets, so the failure must
//! be visible where the pod's owner looks: a Warning `HSMSecretSyncFailed` on the pod.
//! A broken HSM fails every volume's republish every kubelet sync period, so Events are
//! limited to one per volume per [`EVENT_INTERVAL`]; the metrics still count them all.
//!
//! The message names the secrets and the error kind, never the error text or file
//! contents: secret bytes can never reach an Event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hsm_secrets_csi::{Error as CsiError, NodeObserver, PublishRequest};
use k8s_openapi::api::core::v1::ObjectReference;
use tokio::time::Instant;

use super::NodeMetrics;
use super::attributes::SECRETS;
use crate::kube_events::{self, Occurrence, Reporter, Severity};

/// Reason of the Event on the pod.
pub const REASON: &str = crate::contract::reasons::SECRET_SYNC_FAILED;
/// The reporting controller of the node plugin's Events.
pub const REPORTING_CONTROLLER: &str = "hsm-secrets.io/node";
/// At most one Event per volume this often.
pub const EVENT_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// events.k8s.io caps `note` at 1 kB.
const MAX_NOTE: usize = 1024;

/// The pod an Event is about, from kubelet's pod info in the volume context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// A Warning Event about one pod's volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEvent {
    pub pod: PodRef,
    pub reason: &'static str,
    /// The verb of events.k8s.io's `action`.
    pub action: &'static str,
    pub note: String,
}

/// Why an Event could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("cannot create the Event on pod {namespace}/{name}: {detail}")]
    Api {
        namespace: String,
        name: String,
        detail: String,
    },
}

impl EventError {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Api { .. } => "api",
        }
    }
}

/// Where Events go: the Kubernetes API, or a recording fake in tests.
#[async_trait]
pub trait PodEventSink: Send + Sync + 'static {
    async fn record(&self, event: &PodEvent) -> Result<(), EventError>;
}

/// Builds the Event for a republish that kept the last good content; None when kubelet
/// gave no pod info (`CSIDriver.podInfoOnMount` off): there is nothing to attach it to.
pub fn sync_failed_event(request: &PublishRequest, error_kind: &str) -> Option<PodEvent> {
    pod_event(request, REASON, |named| {
        format!(
            "cannot refresh {named} in volume {} ({error_kind}); the last good content is kept",
            request.volume_id
        )
    })
}

/// Reason of the Event recorded when a republish finds access revoked.
pub const REVOKED_REASON: &str = crate::contract::reasons::SECRET_REVOKED;

/// Builds the Event for a republish that removed a volume's files because the pod may no
/// longer read them.
pub fn revoked_event(request: &PublishRequest, error_kind: &str) -> Option<PodEvent> {
    pod_event(request, REVOKED_REASON, |named| {
        format!(
            "access to {named} in volume {} was revoked ({error_kind}); its files were removed from the pod",
            request.volume_id
        )
    })
}

fn pod_event(
    request: &PublishRequest,
    reason: &'static str,
    note: impl FnOnce(&str) -> String,
) -> Option<PodEvent> {
    let pod = PodRef {
        namespace: request.pod_namespace()?.to_string(),
        name: request.pod_name()?.to_string(),
        uid: request.pod_uid()?.to_string(),
    };
    let secrets: Vec<&str> = request
        .volume_context
        .get(SECRETS)
        .map(|raw| {
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let named = if secrets.is_empty() {
        "its HSMSecrets".to_string()
    } else {
        format!("HSMSecret {}", secrets.join(", "))
    };
    let mut note = note(&named);
    truncate(&mut note, MAX_NOTE);
    Some(PodEvent {
        pod,
        reason,
        action: "Republish",
        note,
    })
}

fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// At most one Event per volume per interval (pure: the caller passes the time).
#[derive(Debug)]
pub struct EventLimiter {
    interval: Duration,
    last: HashMap<String, Instant>,
}

impl EventLimiter {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: HashMap::new(),
        }
    }

    /// Whether `volume` may get an Event at `now`; if so, `now` is remembered.
    pub fn allow(&mut self, volume: &str, now: Instant) -> bool {
        // Forget volumes quiet for a whole interval: unpublished ones leave no entry.
        let interval = self.interval;
        self.last
            .retain(|_, at| now.saturating_duration_since(*at) < interval);
        if self.last.contains_key(volume) {
            return false;
        }
        self.last.insert(volume.to_string(), now);
        true
    }
}

/// Records `HSMSecretSyncFailed` Events, rate limited; without a sink (no cluster) it
/// only logs.
pub struct SyncFailureEvents {
    sink: Option<Arc<dyn PodEventSink>>,
    limiter: Mutex<EventLimiter>,
}

impl SyncFailureEvents {
    pub fn new(sink: Option<Arc<dyn PodEventSink>>) -> Self {
        Self::with_interval(sink, EVENT_INTERVAL)
    }

    pub fn with_interval(sink: Option<Arc<dyn PodEventSink>>, interval: Duration) -> Self {
        Self {
            sink,
            limiter: Mutex::new(EventLimiter::new(interval)),
        }
    }

    /// Records the Event of a kept-last-good republish unless the volume had one lately.
    /// `error_kind` is the csi error's [`CsiError::kind`].
    pub async fn republish_kept_last_good(&self, request: &PublishRequest, error_kind: &str) {
        self.record(request, sync_failed_event(request, error_kind))
            .await;
    }

    /// Records the Event of a revocation unless the volume had one lately.
    pub async fn republish_revoked(&self, request: &PublishRequest, error_kind: &str) {
        self.record(request, revoked_event(request, error_kind))
            .await;
    }

    async fn record(&self, request: &PublishRequest, event: Option<PodEvent>) {
        let Some(event) = event else {
            tracing::warn!(
                volume = %request.volume_id,
                "no pod info in the volume context, so no Event"
            );
            return;
        };
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(&request.volume_id, Instant::now());
        if !allowed {
            return;
        }
        let Some(sink) = &self.sink else {
            tracing::warn!(
                pod = %format_args!("{}/{}", event.pod.namespace, event.pod.name),
                reason = event.reason,
                note = %event.note,
                "no cluster: Event only logged"
            );
            return;
        };
        if let Err(error) = sink.record(&event).await {
            tracing::warn!(%error, kind = error.kind(), reason = event.reason, "cannot record the Event");
        }
    }
}

/// Creates events.k8s.io/v1 Events directly, like the HSMSecret reconciler: one per
/// rate-limited failure, no series to aggregate.
pub struct KubePodEvents {
    client: kube::Client,
    /// This node's name: the reporting instance.
    node: String,
}

impl KubePodEvents {
    pub fn new(client: kube::Client, node: impl Into<String>) -> Self {
        Self {
            client,
            node: node.into(),
        }
    }
}

#[async_trait]
impl PodEventSink for KubePodEvents {
    async fn record(&self, event: &PodEvent) -> Result<(), EventError> {
        let pod = &event.pod;
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..Default::default()
        };
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.into(),
            instance: self.node.clone(),
        };
        let what = Occurrence {
            severity: Severity::Warning,
            reason: event.reason,
            action: event.action,
            note: &event.note,
        };
        kube_events::publish(
            &self.client,
            &kube_events::build(regarding, &reporter, &what),
        )
        .await
        .map_err(|e| EventError::Api {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            detail: e.to_string(),
        })
    }
}

/// The plugin's observer: metrics for every call, an Event for kept-last-good republishes,
/// an audit record per operation.
pub struct NodeReporter {
    metrics: NodeMetrics,
    events: Arc<SyncFailureEvents>,
    audit: Option<Arc<super::AuditLog>>,
}

impl NodeReporter {
    pub fn new(metrics: NodeMetrics, events: SyncFailureEvents) -> Self {
        Self {
            metrics,
            events: Arc::new(events),
            audit: None,
        }
    }

    pub fn with_audit(mut self, audit: Arc<super::AuditLog>) -> Self {
        self.audit = Some(audit);
        self
    }
}

impl NodeObserver for NodeReporter {
    fn publish(&self, outcome: &'static str, republish: bool, elapsed: Duration) {
        self.metrics.publish(outcome, republish, elapsed);
    }

    fn unpublish(&self, outcome: &'static str, elapsed: Duration) {
        self.metrics.unpublish(outcome, elapsed);
    }

    fn republish_kept_last_good(&self, request: &PublishRequest, error: &CsiError) {
        self.metrics.republish_kept_last_good(request, error);
        // Observers must not block the CSI call: the API call runs on its own.
        let (events, request, kind) = (self.events.clone(), request.clone(), error.kind());
        tokio::spawn(async move { events.republish_kept_last_good(&request, kind).await });
    }

    fn republish_revoked(&self, request: &PublishRequest, error: &CsiError) {
        let (events, request, kind) = (self.events.clone(), request.clone(), error.kind());
        tokio::spawn(async move { events.republish_revoked(&request, kind).await });
    }

    fn finished(&self, operation: &hsm_secrets_csi::Operation<'_>) {
        if let Some(audit) = &self.audit {
            audit.finished(operation);
        }
    }
}

/// Records a Warning Event about this Node (namespace `default`, by the Node's uid so
/// `kubectl describe node` lists it): for what concerns the node's token rather than a
/// pod, such as a PIN the token refused. Needs `list nodes`, which the node plugin has.
pub async fn record_node_event(
    client: &kube::Client,
    node: &str,
    reason: &str,
    action: &str,
    note: &str,
) -> Result<(), EventError> {
    use k8s_openapi::api::core::v1::Node;
    let failed = |detail: String| EventError::Api {
        namespace: crate::kube_events::CLUSTER_EVENTS_NAMESPACE.into(),
        name: node.into(),
        detail,
    };
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    let listed = nodes
        .list(&kube::api::ListParams::default().fields(&format!("metadata.name={node}")))
        .await
        .map_err(|e| failed(e.to_string()))?;
    let uid = listed.items.first().and_then(|n| n.metadata.uid.clone());
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.into()),
        uid,
        ..Default::default()
    };
    let reporter = Reporter {
        controller: REPORTING_CONTROLLER.into(),
        instance: node.into(),
    };
    let what = Occurrence {
        severity: Severity::Warning,
        reason,
        action,
        note,
    };
    kube_events::publish(client, &kube_events::build(regarding, &reporter, &what))
        .await
        .map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hsm_secrets_csi::SourceError;
    use hsm_secrets_csi::source::pod_info;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Recording(Mutex<Vec<PodEvent>>);

    #[async_trait]
    impl PodEventSink for Recording {
        async fn record(&self, event: &PodEvent) -> Result<(), EventError> {
            self.0.lock().unwrap().push(event.clone());
            Ok(())
        }
    }

    fn request(volume: &str) -> PublishRequest {
        PublishRequest {
            volume_id: volume.into(),
            target_path: "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/v/mount".into(),
            volume_context: BTreeMap::from([
                (pod_info::POD_NAME.into(), "web-0".into()),
                (pod_info::POD_NAMESPACE.into(), "shop".into()),
                (pod_info::POD_UID.into(), "u1".into()),
                (SECRETS.into(), "db-creds, api-key".into()),
            ]),
            read_only: true,
            fs_group: None,
            republish: true,
        }
    }

    fn unavailable() -> CsiError {
        CsiError::Source {
            volume_id: "v".into(),
            source: SourceError::Unavailable("token gone s3cr3t".into()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_event_per_volume_per_interval_naming_secrets_and_kind_only() {
        let sink = Arc::new(Recording::default());
        let events = SyncFailureEvents::new(Some(sink.clone()));
        for _ in 0..3 {
            events
                .republish_kept_last_good(&request("vol-a"), unavailable().kind())
                .await;
        }
        events
            .republish_kept_last_good(&request("vol-b"), unavailable().kind())
            .await;
        {
            let seen = sink.0.lock().unwrap();
            assert_eq!(seen.len(), 2, "{seen:?}");
            let e = &seen[0];
            assert_eq!(
                e.pod,
                PodRef {
                    namespace: "shop".into(),
                    name: "web-0".into(),
                    uid: "u1".into()
                }
            );
            assert_eq!(e.reason, "HSMSecretSyncFailed");
            assert_eq!(
                e.note,
                "cannot refresh HSMSecret db-creds, api-key in volume vol-a \
                 (source_unavailable); the last good content is kept"
            );
            assert!(!e.note.contains("s3cr3t"));
        }
        tokio::time::advance(EVENT_INTERVAL).await;
        events
            .republish_kept_last_good(&request("vol-a"), unavailable().kind())
            .await;
        assert_eq!(sink.0.lock().unwrap().len(), 3);
    }

    #[test]
    fn no_pod_info_no_event() {
        let mut r = request("v");
        r.volume_context.remove(pod_info::POD_UID);
        assert_eq!(sync_failed_event(&r, unavailable().kind()), None);
    }

    #[tokio::test]
    async fn the_reporter_counts_and_records_without_blocking_the_call() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = NodeMetrics::register(&mut registry);
        let sink = Arc::new(Recording::default());
        let reporter = NodeReporter::new(metrics, SyncFailureEvents::new(Some(sink.clone())));
        reporter.republish_kept_last_good(&request("vol-a"), &unavailable());
        let text = crate::telemetry::encode_metrics(&registry);
        assert!(
            text.contains(
                r#"hsm_secrets_node_republish_kept_last_good_total{kind="source_unavailable"} 1"#
            ),
            "{text}"
        );
        // The Event is recorded on its own task.
        tokio::time::timeout(Duration::from_secs(30), async {
            while sink.0.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert_eq!(sink.0.lock().unwrap()[0].pod.name, "web-0");
    }
}
