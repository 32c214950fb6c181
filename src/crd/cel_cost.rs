//! A static guard for the CEL rules (`x-kubernetes-validations`) of a CRD schema, so that a
//! rule the API server would refuse for its estimated cost is caught by a test, offline.
//!
//! The API server estimates each rule's worst-case cost from the bounds of everything the
//! rule reaches (`maxLength`, `maxItems`, `maxProperties`); where a bound is missing it
//! assumes the largest request (about 3 MiB), which puts any traversal of that value far over
//! budget. It refuses a rule over its per-rule budget (10^7 units) and a schema whose rules
//! add up to more than 10^8, each rule counted once per element of the lists above it.
//!
//! This module's model is deliberately coarser and never lower:
//! - every string, list and map a rule reaches must carry a bound (otherwise: refused);
//! - `cost = L × W × N^d × C`, where `L` is the rule's length in characters (an upper bound on
//!   the number of operations it evaluates per pass), `W` the longest string reached (a
//!   string comparison costs at most its length), `N` the largest list or map reached, `d`
//!   the deepest nesting of comprehension macros (`all`, `exists`, `exists_one`, `map`,
//!   `filter`) plus one for each `in` operator (a linear scan), and `C` the product of the
//!   `maxItems` of the lists that enclose the rule (it runs once per element);
//! - each rule must stay under the per-rule budget and the sum under the schema budget.

use serde_json::Value;

/// The API server's budget for one rule's estimated cost.
pub const PER_RULE_BUDGET: u128 = 10_000_000;
/// The API server's budget for the sum over every rule of a schema.
pub const SCHEMA_BUDGET: u128 = 100_000_000;
/// `metadata.name`, which a root rule may read: a DNS subdomain.
const METADATA_NAME_MAX: u128 = 253;

/// One rule's estimate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleCost {
    /// Where the rule is declared, as a JSON path in the schema (`.spec.mirroring`).
    pub path: String,
    pub rule: String,
    /// The estimate of the model above, counted once per enclosing list element.
    pub cost: u128,
}

/// What the guard found: each rule's cost, and every reason the server would refuse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub rules: Vec<RuleCost>,
    pub problems: Vec<String>,
}

impl Report {
    pub fn total(&self) -> u128 {
        self.rules.iter().map(|r| r.cost).sum()
    }
}

/// Checks every rule of an `openAPIV3Schema`.
pub fn check(schema: &Value) -> Report {
    let mut report = Report::default();
    visit(schema, "", 1, true, &mut report);
    let total = report.total();
    if total > SCHEMA_BUDGET {
        report.problems.push(format!(
            "the rules of this schema cost {total} together, over the budget of {SCHEMA_BUDGET}"
        ));
    }
    report
}

fn visit(schema: &Value, path: &str, cardinality: u128, root: bool, report: &mut Report) {
    for rule in schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let text = rule.get("rule").and_then(Value::as_str).unwrap_or_default();
        match estimate(schema, text, root) {
            Ok(cost) => {
                let cost = cost.saturating_mul(cardinality);
                if cost > PER_RULE_BUDGET {
                    report.problems.push(format!(
                        "{}: rule {text:?} costs {cost}, over the per-rule budget of {PER_RULE_BUDGET}; bound what it reaches more tightly or simplify it",
                        shown(path)
                    ));
                }
                report.rules.push(RuleCost {
                    path: shown(path),
                    rule: text.into(),
                    cost,
                });
            }
            Err(why) => report
                .problems
                .push(format!("{}: rule {text:?} {why}", shown(path))),
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            visit(sub, &format!("{path}.{name}"), cardinality, false, report);
        }
    }
    if let Some(items) = schema.get("items") {
        let n = bound(schema, "maxItems").unwrap_or(u128::from(u32::MAX));
        visit(
            items,
            &format!("{path}[*]"),
            cardinality.saturating_mul(n),
            false,
            report,
        );
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        let n = bound(schema, "maxProperties").unwrap_or(u128::from(u32::MAX));
        visit(
            values,
            &format!("{path}[*]"),
            cardinality.saturating_mul(n),
            false,
            report,
        );
    }
}

fn shown(path: &str) -> String {
    if path.is_empty() {
        ".".into()
    } else {
        path.into()
    }
}

fn bound(schema: &Value, key: &str) -> Option<u128> {
    schema.get(key).and_then(Value::as_u64).map(u128::from)
}

/// The largest string and the largest collection a value of this schema can hold.
#[derive(Clone, Copy, Debug, Default)]
struct Extent {
    string: u128,
    collection: u128,
}

impl Extent {
    fn max(self, other: Extent) -> Extent {
        Extent {
            string: self.string.max(other.string),
            collection: self.collection.max(other.collection),
        }
    }
}

/// The rule's cost under the model, or why it cannot be estimated (an unbounded value).
fn estimate(schema: &Value, rule: &str, root: bool) -> Result<u128, String> {
    let mut extent = Extent {
        string: 1,
        collection: 1,
    };
    for path in self_paths(rule) {
        let reached = if root && path.first().map(String::as_str) == Some("metadata") {
            match path.get(1).map(String::as_str) {
                Some("name" | "generateName") => Extent {
                    string: METADATA_NAME_MAX,
                    collection: 1,
                },
                _ => return Err(format!("reads self.{} beyond name", path.join("."))),
            }
        } else {
            let Some(at) = resolve(schema, &path) else {
                return Err(format!(
                    "reads self.{}, which the schema does not declare",
                    path.join(".")
                ));
            };
            reach(at, &format!("self.{}", path.join(".")))?
        };
        extent = extent.max(reached);
    }
    let depth = nesting(rule);
    let scans = extent.collection.saturating_pow(depth);
    Ok((rule.len() as u128)
        .saturating_mul(extent.string)
        .saturating_mul(scans))
}

/// The schema at a field path below `schema`, following `properties`.
fn resolve<'a>(schema: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(schema, |at, field| at.get("properties")?.get(field))
}

/// Everything reachable from `schema`: every string, list and map must be bounded.
fn reach(schema: &Value, at: &str) -> Result<Extent, String> {
    let mut extent = Extent::default();
    match schema.get("type").and_then(Value::as_str) {
        Some("string") => {
            let max = bound(schema, "maxLength").or_else(|| {
                // An enum bounds its strings as well as maxLength does.
                schema.get("enum").and_then(Value::as_array).map(|values| {
                    values
                        .iter()
                        .filter_map(Value::as_str)
                        .map(|s| s.len() as u128)
                        .max()
                        .unwrap_or(0)
                })
            });
            let Some(max) = max else {
                return Err(format!(
                    "reaches {at}, a string without maxLength; add maxLength"
                ));
            };
            extent.string = max;
        }
        Some("array") => {
            let Some(max) = bound(schema, "maxItems") else {
                return Err(format!(
                    "reaches {at}, a list without maxItems; add maxItems"
                ));
            };
            extent.collection = max;
            if let Some(items) = schema.get("items") {
                extent = extent.max(reach(items, &format!("{at}[*]"))?);
            }
        }
        Some("object") => {
            if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
                let Some(max) = bound(schema, "maxProperties") else {
                    return Err(format!(
                        "reaches {at}, a map without maxProperties; add maxProperties"
                    ));
                };
                extent.collection = max;
                extent = extent.max(reach(values, &format!("{at}[*]"))?);
            }
            for (name, sub) in schema
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                extent = extent.max(reach(sub, &format!("{at}.{name}"))?);
            }
        }
        _ => {}
    }
    Ok(extent)
}

/// Every `self.a.b` path the rule reads (a bare `self` is the empty path).
fn self_paths(rule: &str) -> Vec<Vec<String>> {
    let bytes = rule.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut paths = Vec::new();
    let mut i = 0;
    while let Some(found) = rule[i..].find("self") {
        let start = i + found;
        let end = start + 4;
        i = end;
        let standalone = (start == 0 || !word(bytes[start - 1]) && bytes[start - 1] != b'.')
            && (end == bytes.len() || !word(bytes[end]));
        if !standalone {
            continue;
        }
        let mut path = Vec::new();
        let mut j = end;
        while j < bytes.len() && bytes[j] == b'.' {
            let k = (j + 1..bytes.len())
                .find(|&k| !word(bytes[k]))
                .unwrap_or(bytes.len());
            // A call (`self.x.size()`) is a method, not a field.
            if bytes.get(k) == Some(&b'(') || k == j + 1 {
                break;
            }
            path.push(rule[j + 1..k].to_string());
            j = k;
        }
        i = j;
        paths.push(path);
    }
    paths
}

const MACROS: [&str; 5] = ["all", "exists", "exists_one", "map", "filter"];

/// The deepest nesting of comprehension macros, plus one for each `in` operator.
fn nesting(rule: &str) -> u32 {
    let bytes = rule.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    // For each open parenthesis: whether it opened a macro.
    let mut open: Vec<bool> = Vec::new();
    let mut deepest = 0u32;
    let mut scans = 0u32;
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if let Some(q) = quote {
            if b == b'\\' {
                i += 1;
            } else if b == q {
                quote = None;
            }
        } else if b == b'\'' || b == b'"' {
            quote = Some(b);
        } else if b == b'(' {
            let name_start = (0..i).rev().find(|&k| !word(bytes[k])).map_or(0, |k| k + 1);
            let is_macro = name_start > 0
                && bytes[name_start - 1] == b'.'
                && MACROS.contains(&&rule[name_start..i]);
            open.push(is_macro);
            let depth = open.iter().filter(|m| **m).count() as u32;
            deepest = deepest.max(depth);
        } else if b == b')' {
            open.pop();
        } else if rule[i..].starts_with("in")
            && (i == 0 || !word(bytes[i - 1]))
            && bytes.get(i + 2).is_none_or(|&c| !word(c))
        {
            scans += 1;
        }
        i += 1;
    }
    deepest + scans
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node_list(items: Value, max_items: Option<u64>, rule: &str) -> Value {
        let mut list = json!({"type": "array", "items": items,
            "x-kubernetes-validations": [{"rule": rule}]});
        if let Some(n) = max_items {
            list["maxItems"] = json!(n);
        }
        json!({"type": "object", "properties": {"spec": {"type": "object",
            "properties": {"targetNodes": list}}}})
    }

    #[test]
    fn the_refused_uniqueness_rule_is_refused_here_too() {
        // What the API server refused: an O(n²) rule over a list of unbounded strings.
        let schema = node_list(
            json!({"type": "string"}),
            Some(64),
            "self.all(n, self.exists_one(m, m == n))",
        );
        let report = check(&schema);
        assert!(
            report.problems[0].contains("a string without maxLength"),
            "{report:?}"
        );
        // Bounding the strings is not enough for the quadratic rule.
        let schema = node_list(
            json!({"type": "string", "maxLength": 253}),
            Some(64),
            "self.all(n, self.exists_one(m, m == n))",
        );
        let report = check(&schema);
        assert!(
            report.problems[0].contains("over the per-rule budget"),
            "{report:?}"
        );
    }

    #[test]
    fn unbounded_lists_and_maps_are_named() {
        let schema = node_list(
            json!({"type": "string", "maxLength": 10}),
            None,
            "self.size() < 3",
        );
        assert!(check(&schema).problems[0].contains("list without maxItems"));
        let map = json!({"type": "object", "additionalProperties": {"type": "string", "maxLength": 5},
            "x-kubernetes-validations": [{"rule": "self.all(k, k != 'x')"}]});
        assert!(check(&map).problems[0].contains("map without maxProperties"));
    }

    #[test]
    fn a_rule_reads_only_the_fields_it_names() {
        // The unbounded `notes` is never reached by a rule on `library`.
        let schema = json!({"type": "object",
            "x-kubernetes-validations": [{"rule": "self.library.startsWith('/')"}],
            "properties": {
                "library": {"type": "string", "maxLength": 4096},
                "notes": {"type": "string"}}});
        let report = check(&schema);
        assert!(report.problems.is_empty(), "{report:?}");
        assert_eq!(report.rules[0].cost, 28 * 4096);
    }

    #[test]
    fn rules_under_lists_count_once_per_element() {
        let schema = json!({"type": "array", "maxItems": 1000, "items": {"type": "object",
            "properties": {"name": {"type": "string", "maxLength": 100,
                "x-kubernetes-validations": [{"rule": "self.startsWith('a')"}]}}}});
        let report = check(&schema);
        assert_eq!(report.rules[0].cost, 1000 * 100 * 20);
    }

    #[test]
    fn nesting_counts_macros_and_scans() {
        assert_eq!(nesting("self.startsWith('/')"), 0);
        assert_eq!(nesting("self.all(n, n.size() < 3)"), 1);
        assert_eq!(nesting("self.all(n, self.exists_one(m, m == n))"), 2);
        assert_eq!(nesting("!(self.primaryNode in self.targetNodes)"), 1);
        assert_eq!(nesting("self.x == 'in (all('"), 0);
        assert_eq!(
            self_paths("!has(self.a) || self.a.b.size() > 0 || myself"),
            vec![
                vec!["a".to_string()],
                vec!["a".to_string(), "b".to_string()]
            ]
        );
    }
}
