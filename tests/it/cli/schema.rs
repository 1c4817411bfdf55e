//! The result's JSON Schema (docs/result.schema.json) and the small validator the CLI tests check
//! results with.

use serde_json::Value;
use std::path::Path;

/// A small subset of JSON Schema (type, const, enum, pattern, required, properties,
/// additionalProperties: false, items, uniqueItems, oneOf, local $ref): what result.schema.json uses.
pub fn validate(schema: &Value, root: &Value, v: &Value, at: &str) -> Vec<String> {
    if let Some(r) = schema["$ref"].as_str() {
        let target = root
            .pointer(r.trim_start_matches('#'))
            .expect("a local $ref");
        return validate(target, root, v, at);
    }
    let mut errs = Vec::new();
    if let Some(options) = schema["oneOf"].as_array() {
        let ok = options
            .iter()
            .filter(|o| validate(o, root, v, at).is_empty())
            .count();
        if ok != 1 {
            errs.push(format!("{at}: matches {ok} of oneOf"));
        }
    }
    let kind = match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    if let Some(t) = schema["type"].as_str().filter(|t| *t != kind) {
        errs.push(format!("{at}: {kind}, not {t}"));
    }
    if schema.get("const").is_some_and(|c| c != v) {
        errs.push(format!("{at}: {v} is not {}", schema["const"]));
    }
    if schema["enum"].as_array().is_some_and(|e| !e.contains(v)) {
        errs.push(format!("{at}: {v} not in the enum"));
    }
    if let (Some(p), Some(s)) = (schema["pattern"].as_str(), v.as_str()) {
        if !regex::Regex::new(p).unwrap().is_match(s) {
            errs.push(format!("{at}: {s:?} does not match {p}"));
        }
    }
    if let (Some(items), Some(a)) = (schema.get("items"), v.as_array()) {
        for (i, x) in a.iter().enumerate() {
            errs.extend(validate(items, root, x, &format!("{at}/{i}")));
        }
        let mut unique = a.clone();
        unique.dedup();
        if schema["uniqueItems"] == true && unique.len() != a.len() {
            errs.push(format!("{at}: duplicate items"));
        }
    }
    if let Some(o) = v.as_object() {
        for r in schema["required"].as_array().into_iter().flatten() {
            if !o.contains_key(r.as_str().unwrap()) {
                errs.push(format!("{at}: {r} missing"));
            }
        }
        for (k, x) in o {
            match schema["properties"].get(k) {
                Some(s) => errs.extend(validate(s, root, x, &format!("{at}/{k}"))),
                None if schema["additionalProperties"] == false => {
                    errs.push(format!("{at}: unexpected {k}"))
                }
                None => {}
            }
        }
    }
    errs
}

pub fn schema() -> Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/result.schema.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}
