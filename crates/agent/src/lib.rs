//! The jitgate agent: runs on the protected host as root and enforces its VM's
//! desired state in the kernel.
//!
//! ```text
//! enroll (once) -> credentials in the state dir (0600)
//! loop: long-poll desired state -> validate -> plan (pure, jitgate_core::nft)
//!       -> one `nft -f` transaction -> persist -> report status
//! heartbeat: every 10 s, status with listening sockets and blocked-attempt counters
//! ```
//!
//! Architecture invariants: the agent only ever touches and lists `table inet
//! jitgate`; grants are set elements with kernel timeouts, so nothing relies on the
//! agent being alive to close them; a desired state that fails validation is never
//! applied, not even in part; when the controller is unreachable the agent keeps the
//! last applied state and retries with backoff.

pub mod config;
pub mod drift;
pub mod enforce;
pub mod gateway;
pub mod host;
pub mod netlink;
pub mod nft;
pub mod run;
pub mod state;
pub mod upgrade;

pub use config::AgentConfig;
pub use run::{Permanent, Replaced, Restored, RestoredOwn, preflight, restore, run};
