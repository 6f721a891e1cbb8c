//! The OpenAPI document, generated from the route table (`lib.rs` and
//! [`crate::native::routes`]), each handler's `#[utoipa::path]`, and the wire types:
//! nothing in it is written by hand but the prose below.
//!
//! Two rules are applied to the generated operations rather than repeated on each:
//! every call needs the bearer token except the public paths, which the
//! authentication layer's own list ([`crate::auth::is_public`]) names; and every
//! operation answers errors as a `CloudError` (the `default` response).

use std::sync::LazyLock;

use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, ResponseBuilder, content::ContentBuilder};

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
    )
)]
pub struct ApiDoc;

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
