//! The API server's own validation of what this project creates, written from the
//! server's rules rather than from the code under test, so the stand-in API servers refuse
//! what a real one refuses: object names and `generateName` (DNS-1123 subdomains; a
//! `generateName` is checked as a prefix, only a trailing `-` being forgiven), and
//! events.k8s.io/v1 Events (required fields, lengths, type). One project rule is added:
//! an Event's `regarding` carries the object's uid, without which `kubectl describe`
//! never lists it.
#![allow(dead_code)]

use serde_json::Value;

/// Problems with `metadata.name` / `metadata.generateName`, as the server words them.
pub fn metadata_problems(object: &Value) -> Vec<String> {
    let meta = &object["metadata"];
    let mut problems = Vec::new();
    match (meta["name"].as_str(), meta["generateName"].as_str()) {
        (Some(name), _) if !name.is_empty() => {
            if let Some(why) = subdomain_problem(name) {
                problems.push(format!("metadata.name: Invalid value: {name:?}: {why}"));
            }
        }
        (_, Some(prefix)) if !prefix.is_empty() => {
            // The server appends 5 characters, checking the prefix as a name whose
            // trailing dash is masked.
            let masked = prefix
                .strip_suffix('-')
                .map_or(prefix.to_string(), |p| format!("{p}a"));
            if let Some(why) = subdomain_problem(&masked) {
                problems.push(format!(
                    "metadata.generateName: Invalid value: {prefix:?}: {why}"
                ));
            }
        }
        _ => {
            problems.push("metadata.name: Required value: name or generateName is required".into())
        }
    }
    problems
}

/// Why `name` is not a DNS-1123 subdomain, if it is not.
pub fn subdomain_problem(name: &str) -> Option<&'static str> {
    if name.len() > 253 {
        return Some("must be no more than 253 characters");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.split('.').all(label_ok) {
        None
    } else {
        Some(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        )
    }
}

/// Problems with an events.k8s.io/v1 Event, as the server (and `kubectl describe`) sees it.
pub fn event_problems(event: &Value) -> Vec<String> {
    let mut problems = metadata_problems(event);
    if event["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .is_empty()
    {
        problems.push("metadata.namespace: Required value".into());
    }
    if event["eventTime"].as_str().unwrap_or_default().is_empty() {
        problems.push("eventTime: Required value".into());
    }
    for (field, max) in [
        ("reportingController", 128),
        ("reportingInstance", 128),
        ("action", 128),
        ("reason", 128),
    ] {
        let value = event[field].as_str().unwrap_or_default();
        if value.is_empty() {
            problems.push(format!("{field}: Required value"));
        } else if value.len() > max {
            problems.push(format!(
                "{field}: Too long: may not be more than {max} bytes"
            ));
        }
    }
    if event["note"].as_str().unwrap_or_default().len() > 1024 {
        problems.push("note: Too long: may not be more than 1024 bytes".into());
    }
    if !matches!(event["type"].as_str(), Some("Normal" | "Warning")) {
        problems.push("type: Unsupported value: must be Normal or Warning".into());
    }
    let regarding = &event["regarding"];
    for field in ["kind", "name"] {
        if regarding[field].as_str().unwrap_or_default().is_empty() {
            problems.push(format!("regarding.{field}: Required value"));
        }
    }
    if regarding["uid"].as_str().unwrap_or_default().is_empty() {
        problems.push(
            "regarding.uid: missing: kubectl describe lists only Events that carry the object's uid"
                .into(),
        );
    }
    problems
}

/// Events about one object that `kubectl describe` would show as one line (same type,
/// reason and note) are fine; the server keeps every record. What must never happen is
/// two distinct occurrences sharing a name, which a create refuses (409).
pub fn event_names_unique(events: &[Value]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for e in events {
        let name = e["metadata"]["name"].as_str().unwrap_or_default();
        if !seen.insert(name.to_string()) {
            return Err(format!("two Events named {name}"));
        }
    }
    Ok(())
}
