//! An in-memory Kubernetes API server for tests and benches that run kube-runtime
//! watchers, which issue concurrent list and watch calls a scripted mock cannot answer:
//! list (with the current resourceVersion), watch (events on a body kept open, replayed
//! from the requested resourceVersion), get, create (with generateName), replace, JSON
//! patch (with `test` preconditions, failing with 422) and merge patches, delete (with
//! resourceVersion preconditions and finalizers), `/status` subresources, label and
//! `metadata.name` field selectors, and metadata-only answers for
//! `as=PartialObjectMetadata` requests.
//!
//! Reachable as a `kube::Client` in process ([`FakeApi::client`]) or over plain HTTP on
//! a listener ([`FakeApi::serve`]) for a controller in another process.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub type ResponseBody = BoxBody<Bytes, Infallible>;

/// Where an object lives.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// `api/v1` or `apis/GROUP/VERSION`.
    pub prefix: String,
    pub plural: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl Key {
    /// The key of an object from its apiVersion, kind (plural: lowercase + "s") and
    /// metadata.
    pub fn of(object: &Value) -> Key {
        let api_version = object["apiVersion"].as_str().unwrap();
        Key {
            prefix: prefix_of(api_version),
            plural: plural_of(object["kind"].as_str().unwrap()),
            namespace: object["metadata"]["namespace"].as_str().map(String::from),
            name: object["metadata"]["name"].as_str().unwrap().into(),
        }
    }
}

fn prefix_of(api_version: &str) -> String {
    if api_version.contains('/') {
        format!("apis/{api_version}")
    } else {
        format!("api/{api_version}")
    }
}

fn plural_of(kind: &str) -> String {
    format!("{}s", kind.to_lowercase())
}

struct Route {
    prefix: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn route(path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (format!("api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let mut it = rest.iter().map(|s| s.to_string());
    Some(Route {
        prefix,
        plural: it.next()?,
        namespace,
        name: it.next(),
        sub: it.next(),
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

/// A label or field requirement: key exists, equals, or differs.
#[derive(Clone, Debug)]
enum Requirement {
    Exists(String),
    Equals(String, String),
    Differs(String, String),
}

fn requirements(selector: Option<&String>) -> Vec<Requirement> {
    selector
        .map(|s| {
            s.split(',')
                .filter(|r| !r.is_empty())
                .map(|r| {
                    if let Some((k, v)) = r.split_once("!=") {
                        Requirement::Differs(k.into(), v.into())
                    } else if let Some((k, v)) = r.split_once("==").or_else(|| r.split_once('=')) {
                        Requirement::Equals(k.into(), v.into())
                    } else {
                        Requirement::Exists(r.into())
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Clone, Debug)]
struct Filter {
    prefix: String,
    plural: String,
    namespace: Option<String>,
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
    meta_only: bool,
}

impl Filter {
    fn matches(&self, key: &Key, object: &Value) -> bool {
        if key.prefix != self.prefix || key.plural != self.plural {
            return false;
        }
        if self.namespace.is_some() && key.namespace != self.namespace {
            return false;
        }
        let labels = &object["metadata"]["labels"];
        let label_ok = self.labels.iter().all(|r| match r {
            Requirement::Exists(k) => labels.get(k).is_some(),
            Requirement::Equals(k, v) => labels[k.as_str()].as_str() == Some(v),
            Requirement::Differs(k, v) => labels[k.as_str()].as_str() != Some(v),
        });
        let field = |k: &str| match k {
            "metadata.name" => Some(key.name.clone()),
            "metadata.namespace" => key.namespace.clone(),
            _ => None,
        };
        let field_ok = self.fields.iter().all(|r| match r {
            Requirement::Exists(k) => field(k).is_some(),
            Requirement::Equals(k, v) => field(k).as_deref() == Some(v),
            Requirement::Differs(k, v) => field(k).as_deref() != Some(v),
        });
        label_ok && field_ok
    }

    fn view(&self, object: &Value) -> Value {
        if self.meta_only {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                "metadata": object["metadata"]})
        } else {
            object.clone()
        }
    }
}

struct Change {
    rv: u64,
    kind: &'static str,
    key: Key,
    object: Arc<Value>,
}

struct Watch {
    filter: Filter,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    rv: u64,
    uid: u64,
    calls: BTreeMap<String, usize>,
    /// Creates refused by the server's validation: (kind, why).
    refused: Vec<(String, String)>,
    /// Changes up to this resourceVersion are no longer in `history`.
    forgotten: u64,
}

/// Changes kept for watches that start behind; older ones answer 410 Gone (clients
/// then list again), as a real API server's watch cache does.
const HISTORY: usize = 20_000;

impl State {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(&mut self, kind: &'static str, key: Key, object: Value) {
        let rv = self.rv;
        let object = Arc::new(object);
        self.watches.retain(|w| {
            if !w.filter.matches(&key, &object) {
                return !w.tx.is_closed();
            }
            w.tx.send(event_line(kind, &w.filter.view(&object))).is_ok()
        });
        self.history.push(Change {
            rv,
            kind,
            key,
            object,
        });
        if self.history.len() > 2 * HISTORY {
            let cut = self.history.len() - HISTORY;
            self.forgotten = self.history[cut - 1].rv;
            self.history.drain(..cut);
        }
    }

    /// Stores a new version of `key` (emitting MODIFIED), or removes it when its
    /// deletion was only waiting for the finalizers to go (DELETED).
    fn store(&mut self, key: Key, mut object: Value) -> Value {
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let deleting = !object["metadata"]["deletionTimestamp"].is_null();
        let finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if deleting && !finalizers {
            self.objects.remove(&key);
            self.emit("DELETED", key, object.clone());
        } else {
            self.objects.insert(key.clone(), object.clone());
            self.emit("MODIFIED", key, object.clone());
        }
        object
    }

    fn create(&mut self, key_of: impl FnOnce(&Value) -> Key, mut object: Value) -> Value {
        self.uid += 1;
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("fake-uid-{}", self.uid));
        }
        if object["metadata"]["generation"].is_null() && !object["spec"].is_null() {
            object["metadata"]["generation"] = json!(1);
        }
        object["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        let rv = self.next_rv();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&object);
        self.objects.insert(key.clone(), object.clone());
        self.emit("ADDED", key, object.clone());
        object
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    line.push(b'\n');
    Bytes::from(line)
}

fn respond(status: u16, body: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed())
        .unwrap()
}

fn failure(code: u16, reason: &str, message: &str) -> Response<ResponseBody> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}),
    )
}

/// The in-memory API server; clones share the same objects.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// A kube Client answered in process.
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                Ok::<_, Infallible>(api.handle(Request::from_parts(parts, bytes)))
            }
        });
        kube::Client::new(service, "default")
    }

    /// Serves plain HTTP on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let api = self.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let api = api.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let bytes = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            Ok::<_, Infallible>(api.handle(Request::from_parts(parts, bytes)))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    }

    /// Creates or replaces an object (no precondition), as another client would;
    /// returns it as stored.
    pub fn put(&self, object: Value) -> Value {
        let key = Key::of(&object);
        let mut s = self.state.lock().unwrap();
        match s.objects.get(&key) {
            Some(existing) => {
                let mut object = object;
                for field in ["uid", "creationTimestamp", "generation"] {
                    if object["metadata"][field].is_null() {
                        object["metadata"][field] = existing["metadata"][field].clone();
                    }
                }
                s.store(key, object)
            }
            None => s.create(|_| key, object),
        }
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = Key {
            prefix: prefix_of(api_version),
            plural: plural_of(kind),
            namespace: namespace.map(String::from),
            name: name.into(),
        };
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// Every stored object of `kind`.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let (prefix, plural) = (prefix_of(api_version), plural_of(kind));
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, _)| k.prefix == prefix && k.plural == plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How many stored objects of `kind` satisfy `pred`.
    pub fn count(&self, api_version: &str, kind: &str, pred: impl Fn(&Value) -> bool) -> usize {
        let (prefix, plural) = (prefix_of(api_version), plural_of(kind));
        self.state
            .lock()
            .unwrap()
            .objects
            .iter()
            .filter(|(k, v)| k.prefix == prefix && k.plural == plural && pred(v))
            .count()
    }

    /// Calls answered so far of `METHOD plural` or `METHOD plural/sub` (`watch` for
    /// watches), e.g. `GET hsmdevices`, `PATCH hsmsecrets/status`, `watch secrets`.
    pub fn calls(&self, what: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .get(what)
            .copied()
            .unwrap_or_default()
    }

    /// Creates this server refused as invalid (kind, reasons), as a real one would.
    pub fn refused(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().refused.clone()
    }

    /// Writes (anything but GET, list and watch) answered so far, by `METHOD plural[/sub]`.
    pub fn writes(&self) -> BTreeMap<String, usize> {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|(what, _)| !what.starts_with("GET ") && !what.starts_with("watch "))
            .map(|(w, n)| (w.clone(), *n))
            .collect()
    }

    /// Watches whose client is still connected.
    pub fn open_watches(&self) -> usize {
        let mut s = self.state.lock().unwrap();
        s.watches.retain(|w| !w.tx.is_closed());
        s.watches.len()
    }

    /// Answers one request.
    pub fn handle(&self, req: Request<Bytes>) -> Response<ResponseBody> {
        let Some(r) = route(req.uri().path()) else {
            return failure(404, "NotFound", "no such path");
        };
        let q = query(req.uri());
        let accept = req
            .headers()
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let filter = Filter {
            prefix: r.prefix.clone(),
            plural: r.plural.clone(),
            namespace: r.namespace.clone(),
            labels: requirements(q.get("labelSelector")),
            fields: requirements(q.get("fieldSelector")),
            meta_only: accept.contains("as=PartialObjectMetadata"),
        };
        let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
        let method = req.method().as_str().to_string();
        let what = match (&r.sub, watching) {
            (_, true) => format!("watch {}", r.plural),
            (Some(sub), _) => format!("{method} {}/{sub}", r.plural),
            (None, _) => format!("{method} {}", r.plural),
        };
        let mut s = self.state.lock().unwrap();
        *s.calls.entry(what).or_default() += 1;
        let key = |name: &str| Key {
            prefix: r.prefix.clone(),
            plural: r.plural.clone(),
            namespace: r.namespace.clone(),
            name: name.into(),
        };
        let body: Value = if req.body().is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(req.body()) {
                Ok(v) => v,
                Err(e) => return failure(400, "BadRequest", &format!("body: {e}")),
            }
        };
        match (method.as_str(), &r.name) {
            ("GET", None) if watching => {
                let from: u64 = q
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if from != 0 && from < s.forgotten {
                    return failure(410, "Expired", "too old resource version");
                }
                let (tx, rx) = mpsc::unbounded_channel();
                if from == 0 {
                    for (k, o) in &s.objects {
                        if filter.matches(k, o) {
                            let _ = tx.send(event_line("ADDED", &filter.view(o)));
                        }
                    }
                } else {
                    for c in s.history.iter().filter(|c| c.rv > from) {
                        if filter.matches(&c.key, &c.object) {
                            let _ = tx.send(event_line(c.kind, &filter.view(&c.object)));
                        }
                    }
                }
                s.watches.push(Watch { filter, tx });
                let frames = tokio_stream::wrappers::UnboundedReceiverStream::new(rx)
                    .map(|b| Ok::<_, Infallible>(Frame::data(b)));
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(BodyExt::boxed(StreamBody::new(frames)))
                    .unwrap()
            }
            ("GET", None) => {
                // Pages as a real API server does (`limit`, `continue`: the offset here).
                let offset: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
                let limit: usize = q
                    .get("limit")
                    .and_then(|l| l.parse().ok())
                    .filter(|l| *l > 0)
                    .unwrap_or(usize::MAX);
                let mut matching = s.objects.iter().filter(|(k, o)| filter.matches(k, o));
                let items: Vec<Value> = matching
                    .by_ref()
                    .skip(offset)
                    .take(limit)
                    .map(|(_, o)| filter.view(o))
                    .collect();
                let more = matching.next().is_some();
                let kind = if filter.meta_only {
                    "PartialObjectMetadataList"
                } else {
                    "List"
                };
                let mut metadata = json!({"resourceVersion": s.rv.to_string()});
                if more {
                    metadata["continue"] = json!((offset + items.len()).to_string());
                }
                respond(
                    200,
                    &json!({"apiVersion": "v1", "kind": kind, "metadata": metadata, "items": items}),
                )
            }
            ("GET", Some(name)) => match s.objects.get(&key(name)) {
                Some(o) => respond(200, &filter.view(o)),
                None => failure(404, "NotFound", &format!("{} {name} not found", r.plural)),
            },
            ("POST", None) => {
                let mut object = body;
                let problems = if r.prefix == "apis/events.k8s.io/v1" {
                    super::api_rules::event_problems(&object)
                } else {
                    super::api_rules::metadata_problems(&object)
                };
                if !problems.is_empty() {
                    let kind = object["kind"].as_str().unwrap_or_default().to_string();
                    s.refused.push((kind, problems.join("; ")));
                    return failure(422, "Invalid", &problems.join(", "));
                }
                if object["metadata"]["name"].is_null() {
                    let prefix = object["metadata"]["generateName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    object["metadata"]["name"] = json!(format!("{prefix}{:05}", s.uid + 1));
                }
                if let Some(ns) = &r.namespace {
                    object["metadata"]["namespace"] = json!(ns);
                }
                let name = object["metadata"]["name"].as_str().unwrap().to_string();
                if s.objects.contains_key(&key(&name)) {
                    return failure(
                        409,
                        "AlreadyExists",
                        &format!("{} {name} already exists", r.plural),
                    );
                }
                let created = s.create(|_| key(&name), object);
                respond(201, &created)
            }
            ("PUT" | "PATCH", Some(name)) => {
                let k = key(name);
                let Some(existing) = s.objects.get(&k).cloned() else {
                    return failure(404, "NotFound", &format!("{} {name} not found", r.plural));
                };
                let mut next = existing.clone();
                if method == "PUT" {
                    let rv = &body["metadata"]["resourceVersion"];
                    if !rv.is_null() && *rv != existing["metadata"]["resourceVersion"] {
                        return failure(409, "Conflict", "the object has been modified");
                    }
                    next = body;
                } else {
                    let content_type = req
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    if content_type.starts_with("application/json-patch") {
                        let patch: json_patch::Patch = match serde_json::from_value(body) {
                            Ok(p) => p,
                            Err(e) => return failure(400, "BadRequest", &e.to_string()),
                        };
                        if let Err(e) = json_patch::patch(&mut next, &patch) {
                            return failure(422, "Invalid", &e.to_string());
                        }
                    } else {
                        json_patch::merge(&mut next, &body);
                    }
                }
                // A subresource changes only itself; the main resource never its status.
                let result = match r.sub.as_deref() {
                    Some("status") => {
                        let mut o = existing.clone();
                        o["status"] = next["status"].clone();
                        o
                    }
                    _ => {
                        if let Some(status) = existing.get("status") {
                            next["status"] = status.clone();
                        }
                        for field in [
                            "uid",
                            "creationTimestamp",
                            "deletionTimestamp",
                            "generation",
                        ] {
                            next["metadata"][field] = existing["metadata"][field].clone();
                        }
                        if next["spec"] != existing["spec"] {
                            let g = existing["metadata"]["generation"].as_i64().unwrap_or(0);
                            next["metadata"]["generation"] = json!(g + 1);
                        }
                        next
                    }
                };
                let stored = s.store(k, result);
                respond(200, &stored)
            }
            ("DELETE", Some(name)) => {
                let k = key(name);
                let Some(existing) = s.objects.get(&k).cloned() else {
                    return failure(404, "NotFound", &format!("{} {name} not found", r.plural));
                };
                let rv = &body["preconditions"]["resourceVersion"];
                if !rv.is_null() && *rv != existing["metadata"]["resourceVersion"] {
                    return failure(409, "Conflict", "precondition failed: resourceVersion");
                }
                let mut next = existing;
                if next["metadata"]["deletionTimestamp"].is_null() {
                    next["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
                }
                let stored = s.store(k, next);
                respond(200, &stored)
            }
            (m, _) => failure(
                405,
                "MethodNotAllowed",
                &format!("{m} {}", req.uri().path()),
            ),
        }
    }
}
