//! The OpenAPI document, generated from the route table (`lib.rs` and
//! [`crate::native::routes`]), each handler's `#[utoipa::path]`, and the wire types:
//! nothing in it is written by hand but the prose below.
//!
//! Three rules are applied to the generated operations rather than repeated on each:
//! every call needs the bearer token except the public paths, which the
//! authentication layer's own list ([`crate::auth::is_public`]) names; every
//! operation answers errors as a `CloudError` (the `default` response); and the
//! parameters named alike everywhere (`sub`, `rg`, `loc`, `name`, `rule`,
//! `resourceGroup`, `api-version`) carry the bounds the server's parsers apply
//! ([`name_bounds`]).

use std::sync::LazyLock;

use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, ResponseBuilder, Schema, content::ContentBuilder};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "jitgate",
        description = "Just-in-time network access. Two APIs on one server: the Azure-compatible `Microsoft.Security/locations/jitNetworkAccessPolicies` API (api-version 2020-01-01; path segments are matched case-insensitively, as Azure does) and the native API under `/api/v1`. Every call needs a bearer token except health, metrics, this document and agent enrollment (which presents an enrollment token in its body). Errors are Azure `CloudError` bodies; every refused or failed call is recorded in the audit log. Lists are pages: follow `continuationToken` (native) or `nextLink` (Azure).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    security(("bearerAuth" = [])),
    components(schemas(jitgate_proto::api::CloudError)),
    tags(
        (name = "azure", description = "The Azure-compatible JIT policy API"),
        (name = "vms", description = "Machines, their NSG view and user rules"),
        (name = "requests", description = "Access requests"),
        (name = "access", description = "Tokens and role assignments"),
        (name = "audit", description = "The tamper-evident audit log"),
        (name = "agents", description = "Enrollment and the agent protocol"),
        (name = "recommendations", description = "Which machines expose management ports"),
        (name = "service", description = "Health, metrics, this document, the caller"),
        (name = "approvals", description = "Approval rules, decisions on pending requests, break-glass reviews"),
        (name = "webhooks", description = "Endpoints told about requests, decisions, grants and drift (Standard Webhooks)"),
        (name = "signin", description = "Sign-in with the organisation's identity provider, for browsers and the command line"),
    )
)]
pub struct ApiDoc;

const GUID: &str = "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$";
const RESOURCE_GROUP: &str = "^[A-Za-z0-9_().-]{0,89}[A-Za-z0-9_()-]$";
const LOCATION: &str = "^[A-Za-z0-9_-]{1,64}$";
const POLICY_NAME: &str = "^[A-Za-z0-9_.-]{0,89}[A-Za-z0-9_-]$";
const VM_NAME: &str = "^[A-Za-z0-9_.-]{0,63}[A-Za-z0-9_-]$";
const RULE_NAME: &str = "^[A-Za-z0-9_.-]{1,80}$";

/// The most length and the pattern of a parameter named `name` on `path`, as the
/// server checks them (`jitgate_core::ids`, `params`); `name` is a policy's on the
/// Azure paths and a VM's on the native ones.
fn name_bounds(path: &str, name: &str) -> Option<(Option<usize>, &'static str)> {
    Some(match name {
        "sub" => (None, GUID),
        "api-version" => (None, "^2020-01-01$"),
        "rg" | "resourceGroup" => (Some(90), RESOURCE_GROUP),
        "loc" => (Some(64), LOCATION),
        "name" if path.contains("/jitNetworkAccessPolicies/") => (Some(90), POLICY_NAME),
        "name" => (Some(64), VM_NAME),
        "rule" => (Some(80), RULE_NAME),
        _ => return None,
    })
}

/// The document, generated from the router.
pub fn document() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = crate::api_router().split_for_parts();
    if let Some(components) = doc.components.as_mut() {
        components.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A jitgate token (`jg_<id>.<secret>`), from `jitgate token create` or the bootstrap-token file.",
                    ))
                    .build(),
            ),
        );
    }
    let error = ResponseBuilder::new()
        .description("An error, as Azure answers them: 400 names the field at fault in `target`")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "CloudError",
                ))))
                .build(),
        )
        .build();
    for (path, item) in doc.paths.paths.iter_mut() {
        let public = crate::auth::is_public(path);
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            if public {
                op.security = Some(Vec::new());
            }
            for p in op.parameters.iter_mut().flatten() {
                if let RefOr::T(p) = p
                    && let Some((max, pattern)) = name_bounds(path, &p.name)
                    && let Some(RefOr::T(Schema::Object(o))) = p.schema.as_mut()
                {
                    o.max_length = max;
                    o.pattern = Some(pattern.to_owned());
                }
            }
            op.responses
                .responses
                .entry("default".to_owned())
                .or_insert_with(|| RefOr::T(error.clone()));
        }
    }
    doc
}

static JSON: LazyLock<String> = LazyLock::new(|| {
    document()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the OpenAPI document: {e}\"}}"))
});

/// The document as served at `/api/v1/openapi.json`.
pub fn json() -> &'static str {
    &JSON
}
