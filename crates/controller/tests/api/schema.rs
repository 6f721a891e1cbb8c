//! Every response the API tests receive is checked against the OpenAPI document the
//! controller serves (generated from its route table and wire types): the operation is
//! found by method and path template, the response by status (else `default`), and a
//! JSON body must match that response's schema. A response the document does not
//! describe fails the test that received it.
//!
//! `every_operation_answers_as_documented` (in `native.rs`) walks every operation, so
//! no operation depends on other tests happening to call it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{LazyLock, Mutex};

use reqwest::Method;
use serde_json::{Value, json};

pub static DOC: LazyLock<Value> = LazyLock::new(|| {
    serde_json::from_str(jitgate_controller::openapi::json()).expect("the document is JSON")
});

type Validators = HashMap<String, std::sync::Arc<jsonschema::Validator>>;
static VALIDATORS: LazyLock<Mutex<Validators>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// Operations checked so far in this process, as `METHOD template`.
pub static SEEN: LazyLock<Mutex<BTreeSet<String>>> = LazyLock::new(|| Mutex::new(BTreeSet::new()));

/// The documented path template `path` (no query) falls under, if any. Fixed segments
/// of the Azure paths match in any case, as the controller matches them.
pub fn template(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let paths = DOC["paths"].as_object()?;
    paths
        .keys()
        .filter(|t| {
            let ts: Vec<&str> = t.trim_start_matches('/').split('/').collect();
            ts.len() == segs.len()
                && ts.iter().zip(&segs).all(|(t, s)| {
                    (t.starts_with('{') && t.ends_with('}') && !s.is_empty())
                        || t.eq_ignore_ascii_case(s)
                })
        })
        // A literal segment beats a parameter (`/vms/{rg}/{name}` vs `/audit/verify`).
        .max_by_key(|t| t.split('/').filter(|s| !s.starts_with('{')).count())
        .cloned()
}

fn validator(key: &str, schema: &Value) -> std::sync::Arc<jsonschema::Validator> {
    let mut cache = VALIDATORS.lock().unwrap();
    cache
        .entry(key.to_owned())
        .or_insert_with(|| {
            // The response schema, with the document's components beside it so that
            // `#/components/schemas/...` references resolve.
            let root = json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "allOf": [schema],
                "components": DOC["components"],
            });
            std::sync::Arc::new(
                jsonschema::draft202012::new(&root)
                    .unwrap_or_else(|e| panic!("schema of {key} does not compile: {e}")),
            )
        })
        .clone()
}

/// Checks one response; panics with what differs.
pub fn check(method: &Method, path: &str, status: u16, content_type: Option<&str>, body: &Value) {
    let path = path.split('?').next().unwrap_or(path);
    let Some(t) = template(path) else {
        // Not an operation: refused before routing (401, 429) or the fallback's 404,
        // always as a CloudError.
        let shown: String = path.chars().take(80).collect();
        assert!(
            [401, 404, 429].contains(&status),
            "{method} {shown} is not in the document but answered {status}"
        );
        let v = validator(
            "CloudError",
            &json!({"$ref": "#/components/schemas/CloudError"}),
        );
        assert!(
            v.is_valid(body),
            "{method} {shown}: {status} is not a CloudError: {body}"
        );
        return;
    };
    let m = method.as_str().to_ascii_lowercase();
    let op = &DOC["paths"][&t][&m];
    if op.is_null() {
        // axum answers 405 for a method the path does not have.
        assert_eq!(
            status, 405,
            "{method} {t} is not documented but answered {status}"
        );
        return;
    }
    SEEN.lock()
        .unwrap()
        .insert(format!("{} {t}", method.as_str()));
    let responses = &op["responses"];
    let (which, resp) = match responses.get(status.to_string()) {
        Some(r) => (status.to_string(), r),
        None => (
            "default".to_owned(),
            responses
                .get("default")
                .unwrap_or_else(|| panic!("{method} {t}: status {status} is not documented")),
        ),
    };
    if which == "default" {
        assert!(
            status >= 400,
            "{method} {t}: success status {status} is not documented (only errors fall to default)"
        );
    }
    let Some(content) = resp.get("content") else {
        assert!(
            body.is_null(),
            "{method} {t} {status}: documented without a body, answered {body}"
        );
        return;
    };
    let ct = content_type.unwrap_or("");
    if !ct.starts_with("application/json") {
        // Text (metrics, CSV, JSON lines): the document names the content type.
        let base = ct.split(';').next().unwrap_or("").trim();
        assert!(
            content.get(base).is_some(),
            "{method} {t} {status}: content type {ct} is not documented"
        );
        return;
    }
    let schema = &content["application/json"]["schema"];
    assert!(!schema.is_null(), "{method} {t} {status}: no JSON schema");
    let v = validator(&format!("{m} {t} {which}"), schema);
    let errors: Vec<String> = v
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {t} answered {status} with a body the document does not describe:\n  {}\nbody: {body}",
        errors.join("\n  ")
    );
}

/// Every operation in the document, as `METHOD template`.
pub fn operations() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (t, item) in DOC["paths"].as_object().unwrap() {
        for m in ["get", "put", "post", "delete", "patch"] {
            if item.get(m).is_some() {
                out.insert(format!("{} {t}", m.to_ascii_uppercase()));
            }
        }
    }
    out
}
