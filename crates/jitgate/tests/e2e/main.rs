//! End-to-end tests of enforcement (issue 3): the real controller and the real agent in
//! network namespaces, with real TCP and UDP connections from two client namespaces.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables); without them every test fails
//! saying what to install. Each test builds its own lab (see `lab.rs`) and tears it
//! down. Run: `cargo test -p jitgate --test e2e`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod access;
mod agent;
mod faults;
mod lab;
mod nsg;
