//! The OpenAPI document served at `/api/v1/openapi.json` describes exactly the routes
//! the router registers: no route undocumented, no documented route missing.
//!
//! The routes are read from the source text of `src/lib.rs` (`router()`) and
//! `src/native.rs` (`routes()`): every `.route(path, method_router)` call, where the
//! path is a string literal, a `const` string, or `format!` over such consts, and the
//! methods are the calls chained in the method router (`get(h).post(h)`,
//! `axum::routing::delete(h)`). Adding a route without documenting it fails here.
//!
//! Likewise the paths that need no bearer token are read from `src/auth.rs`
//! (`is_public`), and exactly those must be documented with `"security": []`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

const SOURCES: [(&str, &str); 2] = [
    ("src/lib.rs", include_str!("../src/lib.rs")),
    ("src/native.rs", include_str!("../src/native.rs")),
];

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

type Route = (String, String); // (method, path)

/// Removes `//` comments (line and doc comments), so commented-out code is not read.
/// Good enough for this source: no string literal in it contains `//`.
fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text between the parenthesis at `open` and its match (exclusive), skipping
/// string literals.
fn balanced(src: &str, open: usize) -> &str {
    let bytes = src.as_bytes();
    assert_eq!(bytes[open], b'(');
    let mut depth = 0usize;
    let mut in_str = false;
    let mut i = open;
    while i < bytes.len() {
        let c = bytes[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        return &src[open + 1..i];
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    panic!("unbalanced parenthesis at byte {open}");
}

/// Splits call arguments at top-level commas.
fn split_args(args: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut in_str, mut start) = (0i32, false, 0);
    let bytes = args.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                b',' if depth == 0 => {
                    out.push(args[start..i].trim());
                    start = i + 1;
                }
                _ => {}
            }
        }
        i += 1;
    }
    let last = args[start..].trim();
    if !last.is_empty() {
        out.push(last);
    }
    out
}

/// The first string literal in `s`.
fn first_literal(s: &str) -> Option<&str> {
    let start = s.find('"')? + 1;
    let len = s[start..].find('"')?;
    Some(&s[start..start + len])
}

/// `const NAME: &str = "...";` in the source.
fn const_str(src: &str, name: &str) -> Option<String> {
    let decl = format!("const {name}: &str =");
    let at = src.find(&decl)?;
    first_literal(&src[at + decl.len()..]).map(str::to_owned)
}

/// Evaluates a route's path argument.
fn route_path(src: &str, arg: &str) -> String {
    let arg = arg.trim().trim_start_matches('&');
    if arg.starts_with('"') {
        return first_literal(arg).unwrap().to_owned();
    }
    if arg.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        return const_str(src, arg).unwrap_or_else(|| panic!("no `const {arg}: &str` found"));
    }
    if let Some(rest) = arg.strip_prefix("format!") {
        let template =
            first_literal(rest).unwrap_or_else(|| panic!("format! without a literal: {arg}"));
        // Substitute `{NAME}` with consts, then unescape `{{` and `}}`.
        let mut out = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    out.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    out.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    out.push_str(
                        &const_str(src, &name)
                            .unwrap_or_else(|| panic!("format! argument {name} is not a const")),
                    );
                }
                c => out.push(c),
            }
        }
        return out;
    }
    panic!("cannot evaluate the route path `{arg}`: teach tests/openapi.rs this form");
}

/// The HTTP methods of a method router expression such as
/// `get(a::get).put(a::put)` or `axum::routing::delete(h)`: the name before each
/// top-level parenthesis.
fn route_methods(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find('(') {
        let open = i + off;
        let name: String = expr[..open]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        assert!(
            HTTP_METHODS.contains(&name.as_str()),
            "`{name}(` in the method router `{expr}` is not an HTTP method: teach tests/openapi.rs this form"
        );
        out.push(name);
        i = open + balanced(expr, open).len() + 2;
    }
    out
}

/// Every (method, path) registered with `.route(` in the router's source.
fn source_routes() -> BTreeSet<Route> {
    let mut routes = BTreeSet::new();
    for (file, raw) in SOURCES {
        let src = strip_comments(raw);
        for forbidden in [".nest(", ".route_service(", ".nest_service("] {
            assert!(
                !src.contains(forbidden),
                "{file} uses `{forbidden}`: teach tests/openapi.rs to read it"
            );
        }
        let mut from = 0;
        while let Some(off) = src[from..].find(".route(") {
            let open = from + off + ".route".len();
            let args = split_args(balanced(&src, open));
            assert_eq!(
                args.len(),
                2,
                "{file}: .route( with {} arguments",
                args.len()
            );
            let path = route_path(&src, args[0]);
            for method in route_methods(args[1]) {
                assert!(
                    routes.insert((method.clone(), path.clone())),
                    "{file}: {method} {path} is registered twice"
                );
            }
            from = open;
        }
    }
    routes
}

fn doc() -> Value {
    serde_json::from_str(jitgate_controller::native::OPENAPI)
        .expect("src/openapi.json is not valid JSON")
}

fn documented_routes(doc: &Value) -> BTreeSet<Route> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        for method in item.as_object().expect("a path item is an object").keys() {
            if HTTP_METHODS.contains(&method.as_str()) {
                out.insert((method.clone(), path.clone()));
            }
        }
    }
    out
}

/// Follows a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("non-local $ref {r}"));
            let target = doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("$ref {r} does not resolve"));
            resolve(doc, target)
        }
        None => v,
    }
}

fn all_refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push(x.as_str().expect("$ref is a string"));
                } else {
                    all_refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| all_refs(x, out)),
        _ => {}
    }
}

#[test]
fn the_route_scanner_reads_the_router() {
    // Guards the scanner itself, so a parsing regression cannot pass vacuously.
    let routes = source_routes();
    for (m, p) in [
        ("get", "/api/v1/health"),
        ("get", "/api/v1/vms"),
        ("post", "/api/v1/vms"),
        ("delete", "/api/v1/tokens/{id}"),
        (
            "put",
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies/{name}",
        ),
        (
            "post",
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies/{name}/{action}",
        ),
    ] {
        assert!(
            routes.contains(&(m.to_owned(), p.to_owned())),
            "the scanner missed {m} {p}; it found {routes:#?}"
        );
    }
}

#[test]
fn the_scanner_handles_the_forms_it_claims_to() {
    let src = r#"
        const BASE: &str = "/x/{a}";
        // .route("/commented", get(nothing))
        Router::new()
            .route("/lit", get(h::get).post(h::post))
            .route(BASE, get(g).put(p).delete(d))
            .route(&format!("{BASE}/{{b}}"), axum::routing::delete(handler))
    "#;
    let src = strip_comments(src);
    let mut got = Vec::new();
    let mut from = 0;
    while let Some(off) = src[from..].find(".route(") {
        let open = from + off + ".route".len();
        let args = split_args(balanced(&src, open));
        let path = route_path(&src, args[0]);
        for m in route_methods(args[1]) {
            got.push(format!("{m} {path}"));
        }
        from = open;
    }
    assert_eq!(
        got,
        [
            "get /lit",
            "post /lit",
            "get /x/{a}",
            "put /x/{a}",
            "delete /x/{a}",
            "delete /x/{a}/{b}",
        ]
    );
}

#[test]
fn the_document_is_openapi_3() {
    let doc = doc();
    let version = doc["openapi"].as_str().expect("openapi is a string");
    assert!(version.starts_with("3."), "openapi is {version}, not 3.x");
    assert!(doc["info"]["title"].is_string());
    assert!(doc["info"]["version"].is_string());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    assert!(doc["components"]["schemas"]["CloudError"].is_object());
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let doc = doc();
    let in_source = source_routes();
    let documented = documented_routes(&doc);
    let undocumented: Vec<_> = in_source.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&in_source).collect();
    assert!(
        undocumented.is_empty() && phantom.is_empty(),
        "src/openapi.json and the router disagree.\n\
         Routes with no documentation (add them to src/openapi.json): {undocumented:#?}\n\
         Documented routes the router does not have: {phantom:#?}"
    );
}

#[test]
fn every_operation_is_complete() {
    let doc = doc();
    let mut ids = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let placeholders: BTreeSet<String> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(str::to_owned)
            .collect();
        for (method, op) in item.as_object().unwrap() {
            if !HTTP_METHODS.contains(&method.as_str()) {
                continue;
            }
            let at = format!("{} {path}", method.to_uppercase());
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{at}: no operationId"));
            if let Some(other) = ids.insert(id.to_owned(), at.clone()) {
                panic!("operationId {id} is used by both {other} and {at}");
            }
            let responses = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{at}: no responses"));
            assert!(
                responses.keys().any(|k| k.starts_with('2')),
                "{at}: no success response"
            );
            let declared: BTreeSet<String> = op["parameters"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|p| resolve(&doc, p))
                .filter(|p| p["in"] == "path")
                .map(|p| {
                    assert_eq!(p["required"], true, "{at}: path parameter not required");
                    p["name"].as_str().unwrap().to_owned()
                })
                .collect();
            assert_eq!(
                declared, placeholders,
                "{at}: path parameters do not match the path's placeholders"
            );
        }
    }
}

#[test]
fn every_reference_resolves() {
    let doc = doc();
    let mut refs = Vec::new();
    all_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("non-local $ref {r}"));
        assert!(doc.pointer(pointer).is_some(), "$ref {r} does not resolve");
    }
}

/// The paths `auth::is_public` lets through without a bearer token: the string
/// literals in its body.
fn public_paths() -> BTreeSet<String> {
    let src = strip_comments(include_str!("../src/auth.rs"));
    let at = src
        .find("fn is_public(")
        .expect("src/auth.rs has no `fn is_public(`");
    let body = &src[at..];
    let body = &body[..body.find("\n}").expect("is_public has no end")];
    // No literal in it holds an escaped quote: every other piece is a literal.
    body.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn public_paths_are_read_from_the_auth_layer() {
    let public = public_paths();
    for p in [
        "/api/v1/health",
        "/metrics",
        "/api/v1/openapi.json",
        "/api/v1/agent/enroll",
    ] {
        assert!(
            public.contains(p),
            "the scanner missed public path {p}; it found {public:?}"
        );
    }
    assert!(
        public.iter().all(|p| p.starts_with('/')),
        "is_public holds a literal that is not a path: {public:?}"
    );
}

#[test]
fn public_paths_need_no_token_and_the_rest_do() {
    // Mirrors `auth::is_public`: only its paths are reachable without a bearer token.
    let public = public_paths();
    let doc = doc();
    let documented: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    let undocumented: Vec<_> = public.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "public paths in is_public that src/openapi.json does not document: {undocumented:?}"
    );
    assert_eq!(doc["security"][0]["bearerAuth"], Value::Array(vec![]));
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !HTTP_METHODS.contains(&method.as_str()) {
                continue;
            }
            let open = op.get("security") == Some(&Value::Array(vec![]));
            assert_eq!(
                open,
                public.contains(path.as_str()),
                "{method} {path}: security does not match the auth layer"
            );
        }
    }
}
