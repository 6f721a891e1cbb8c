//! The native API under `/api/v1`, one module per resource: VMs and their NSG view,
//! access requests, tokens and role assignments, the audit log, and the service itself
//! (health, metrics, whoami, the OpenAPI document). Agents' calls are in
//! [`crate::agent`], recommendations and exclusions in [`crate::recommend`], each with
//! its own route table; `lib.rs` merges the three.
//!
//! Every handler answers with a wire type of [`jitgate_proto::api`] and carries its
//! `#[utoipa::path]`, from which [`crate::openapi`] generates the document: the route
//! table below is the one place a route is declared.

pub mod access;
pub mod approvals;
pub mod audit;
pub mod meta;
pub mod nsg;
pub mod requests;
pub mod vms;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(meta::health))
        .routes(routes!(meta::live))
        .routes(routes!(meta::metrics))
        .routes(routes!(meta::openapi))
        .routes(routes!(meta::whoami))
        .routes(routes!(vms::list_vms, vms::register_vm))
        .routes(routes!(vms::get_vm, vms::delete_vm))
        .routes(routes!(vms::blocked))
        .routes(routes!(vms::put_placement, vms::delete_placement))
        .routes(routes!(nsg::get_nsg))
        .routes(routes!(nsg::list_nsg_rules))
        .routes(routes!(nsg::put_nsg_rule, nsg::delete_nsg_rule))
        .routes(routes!(requests::list_requests))
        .routes(routes!(requests::get_request))
        .routes(routes!(requests::revoke_request))
        .routes(routes!(approvals::approve))
        .routes(routes!(approvals::deny))
        .routes(routes!(approvals::cancel))
        .routes(routes!(approvals::review))
        .routes(routes!(crate::webhooks::list))
        .routes(routes!(
            crate::webhooks::get,
            crate::webhooks::put,
            crate::webhooks::delete
        ))
        .routes(routes!(approvals::list_rules))
        .routes(routes!(
            approvals::get_rule,
            approvals::put_rule,
            approvals::delete_rule
        ))
        .routes(routes!(access::list_tokens, access::create_token))
        .routes(routes!(access::revoke_token))
        .routes(routes!(
            access::list_role_assignments,
            access::create_role_assignment
        ))
        .routes(routes!(access::delete_role_assignment))
        .routes(routes!(audit::query_audit))
        .routes(routes!(audit::verify_audit))
}
