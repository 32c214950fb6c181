//! A structural check of a value against a CRD's OpenAPI v3 schema: the subset the
//! API server applies before CEL (types, required fields, enums, ranges, lengths, and
//! unknown fields, which the server would silently prune). Used to prove that examples
//! and user-written blocks are accepted verbatim.

use serde_json::Value;

/// Every problem found, as `path: what is wrong`; empty when the value is accepted.
pub fn check(schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    walk(schema, value, "", &mut errors);
    errors
}

/// The `openAPIV3Schema` of the served version of a CRD rendered as JSON.
pub fn crd_schema(crd: &Value) -> Option<&Value> {
    crd.pointer("/spec/versions/0/schema/openAPIV3Schema")
}

fn walk(schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
    {
        return;
    }
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!("{at}: null is not allowed"));
        }
        return;
    }
    if let Some(any_of) = schema.get("anyOf").and_then(Value::as_array)
        && !any_of.iter().any(|s| check(s, value).is_empty())
    {
        errors.push(format!("{at}: matches none of the allowed forms"));
    }
    if let Some(one_of) = schema.get("oneOf").and_then(Value::as_array)
        && one_of.iter().filter(|s| check(s, value).is_empty()).count() != 1
    {
        errors.push(format!("{at}: must match exactly one allowed form"));
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!(
            "{at}: {value} is not one of {}",
            Value::Array(allowed.clone())
        ));
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let Some(obj) = value.as_object() else {
                errors.push(format!("{at}: expected an object"));
                return;
            };
            for req in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !obj.contains_key(req) {
                    errors.push(format!("{at}.{req}: required field is missing"));
                }
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties");
            for (k, v) in obj {
                let child = format!("{at}.{k}");
                match (props.and_then(|p| p.get(k)), extra) {
                    (Some(s), _) => walk(s, v, &child, errors),
                    (None, Some(s)) if s.is_object() => walk(s, v, &child, errors),
                    (None, Some(Value::Bool(true))) => {}
                    (None, _)
                        if at.is_empty()
                            && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") => {}
                    (None, _) => errors.push(format!(
                        "{child}: unknown field (the API server would drop it)"
                    )),
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                errors.push(format!("{at}: expected a list"));
                return;
            };
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                errors.push(format!("{at}: at most {max} items"));
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(item_schema, item, &format!("{at}[{i}]"), errors);
                }
            }
        }
        Some("string") => match value.as_str() {
            None => errors.push(format!("{at}: expected a string")),
            Some(s) => {
                let len = s.chars().count() as u64;
                if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                    && len < min
                {
                    errors.push(format!("{at}: at least {min} characters"));
                }
                if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                    && len > max
                {
                    errors.push(format!("{at}: at most {max} characters"));
                }
            }
        },
        Some("integer") | Some("number") => match value.as_f64() {
            None => errors.push(format!("{at}: expected a number")),
            Some(n) => {
                if schema.get("type").and_then(Value::as_str) == Some("integer")
                    && !(value.is_i64() || value.is_u64())
                {
                    errors.push(format!("{at}: expected an integer"));
                }
                if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                    && n < min
                {
                    errors.push(format!("{at}: must be at least {min}"));
                }
                if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                    && n > max
                {
                    errors.push(format!("{at}: must be at most {max}"));
                }
            }
        },
        Some("boolean") if !value.is_boolean() => {
            errors.push(format!("{at}: expected true or false"));
        }
        _ => {}
    }
}
