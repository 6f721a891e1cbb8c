//! The pure core of jitgate.
//!
//! Everything that decides something lives here: what a valid policy or request is,
//! where JIT rules sit in a VM's NSG, how a request's ports move through their
//! lifecycle, who may do what, and how the audit chain is hashed and verified.
//!
//! Architecture invariant: this crate does no IO and never reads the clock. Every
//! function that needs the time takes `now` as a parameter, so the same code runs in
//! tests with simulated time. Nothing here derives `Serialize`: the wire formats
//! (Azure JSON, native API, storage rows) live at the edges and convert explicitly.

pub mod approval;
pub mod audit;
pub mod blocked;
pub mod duration;
pub mod enable;
pub mod error;
pub mod gateway;
pub mod ids;
pub mod net;
pub mod nfnl;
pub mod nft;
pub mod nsg;
pub mod policy;
pub mod procnet;
pub mod rbac;
pub mod recommend;
pub mod request;

pub use error::FieldError;
pub use jiff::Timestamp;
