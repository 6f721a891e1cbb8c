//! The Azure-compatible API (`jitNetworkAccessPolicies`) as the CLI reads and writes
//! it: small serde structs for the parts the verbs use. They are the CLI's own rather
//! than the controller's (`controller::azure`), whose input types only deserialize:
//! the CLI is a client of the contract, not of the server's code.
//!
//! A policy is read, changed and written back whole: every field the controller
//! sends for a machine entry (`id`, `ports`, `publicIpAddress`) is kept, so a
//! machine the verb does not touch is written back as it was.

use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::usage::{EXIT_NOT_FOUND, has_code};

/// The query parameter of every Azure-compatible call.
pub const API: &str = "api-version=2020-01-01";

/// A JIT policy: what a GET returns that a PUT needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    pub kind: String,
    pub properties: PolicyProperties,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyProperties {
    pub virtual_machines: Vec<PolicyVm>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVm {
    pub id: String,
    pub ports: Vec<PortRule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip_address: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    pub number: u16,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_source_address_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_source_address_prefixes: Option<Vec<String>>,
    pub max_request_access_duration: String,
}

/// A list of policies; only their ids are read.
#[derive(Debug, Clone, Deserialize)]
pub struct PolicyList {
    pub value: Vec<PolicyRef>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PolicyRef {
    pub id: String,
}

/// The body of `initiate`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Initiate {
    pub virtual_machines: Vec<InitiateVm>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InitiateVm {
    pub id: String,
    pub ports: Vec<InitiatePort>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitiatePort {
    pub number: u16,
    /// ISO 8601.
    pub duration: String,
    /// Absent: the address the controller sees ("My IP").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_source_address_prefix: Option<String>,
}

/// The answer of `initiate` (Azure's request): what was granted.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Initiated {
    pub virtual_machines: Vec<InitiatedVm>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InitiatedVm {
    pub id: String,
    pub ports: Vec<InitiatedPort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitiatedPort {
    pub number: u16,
    pub allowed_source_address_prefix: String,
    pub end_time_utc: String,
    /// `Initiated`, or `Pending` when an approval rule makes it wait.
    #[serde(default)]
    pub status: String,
}

/// Reads a policy, or `None` when it does not exist (yet).
pub async fn get_policy(c: &Client, path: &str) -> anyhow::Result<Option<Policy>> {
    match c.get::<Policy>(&format!("{path}?{API}"), &[]).await {
        Ok(p) => Ok(Some(p.data)),
        Err(e) if has_code(&e, EXIT_NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes a policy whole (create or replace).
pub async fn put_policy(c: &Client, path: &str, policy: &Policy) -> anyhow::Result<()> {
    c.put::<_, serde_json::Value>(&format!("{path}?{API}"), policy)
        .await?;
    Ok(())
}
