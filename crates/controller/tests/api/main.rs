//! Integration tests of the controller through its HTTP API: a real controller on
//! loopback, real SQLite in a temporary directory (and, in `replicas`, several
//! controllers on one real PostgreSQL database), real HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod schema;
mod util;
mod webhooks;

mod approvals;
mod audit;
mod audit_anchor;
mod azure;
mod bad_input;
mod dashboard;
mod deltas;
mod enrollment;
mod examples;
mod gateways;
mod growth;
mod hardening;
mod lifecycle;
mod native;
mod oidc;
mod op;
mod rbac;
mod recommend;
mod replicas;
