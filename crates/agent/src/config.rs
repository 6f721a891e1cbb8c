//! The agent's configuration.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Controller base URL, e.g. `https://jitgate.example.com:8443`.
    pub controller: String,
    /// Enrollment token, needed only until the agent has its own credential.
    pub enroll_token: Option<jitgate_proto::Secret>,
    pub resource_group: String,
    pub name: String,
    pub location: Option<String>,
    pub state_dir: PathBuf,
    /// PEM CA certificate for a controller with a private CA.
    pub ca_cert: Option<PathBuf>,
    /// SHA-256 fingerprint of the controller's CA to pin (also carried by an
    /// enrollment token, and kept with the credential after enrollment).
    pub ca_fingerprint: Option<jitgate_proto::tls::Fingerprint>,
    /// The `nft` binary.
    pub nft: PathBuf,
    /// Where `/proc` is (tests may point elsewhere).
    pub proc_root: PathBuf,
    /// Status report interval when nothing changes.
    pub heartbeat: Duration,
    /// How long one long-poll may wait at the controller.
    pub poll_wait: Duration,
    /// How often the table is compared with what was applied when nothing announced
    /// a change (the kernel's change notifications trigger a comparison at once).
    pub drift_check: Duration,
    /// Gateway mode (`jitgate gateway`): also enforce the machines placed behind this
    /// one (see [`crate::gateway`]).
    pub gateway: bool,
}

impl AgentConfig {
    pub fn new(controller: &str, resource_group: &str, name: &str, state_dir: PathBuf) -> Self {
        AgentConfig {
            controller: controller.trim_end_matches('/').to_owned(),
            enroll_token: None,
            resource_group: resource_group.to_owned(),
            name: name.to_owned(),
            location: None,
            state_dir,
            ca_cert: None,
            ca_fingerprint: None,
            nft: PathBuf::from("nft"),
            proc_root: PathBuf::from("/proc"),
            heartbeat: Duration::from_secs(10),
            poll_wait: Duration::from_secs(25),
            drift_check: Duration::from_secs(5),
            gateway: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status reports come often enough that their pooled connection is reused, not
    /// dropped and opened again (a TLS handshake) before each.
    #[test]
    fn status_reports_reuse_their_connection() {
        let c = AgentConfig::new("https://controller", "rg", "vm", PathBuf::from("/tmp"));
        assert!(c.heartbeat < jitgate_proto::CLIENT_POOL_IDLE);
    }
}
