//! End-to-end tests of enforcement (issue 3): the real controller and the real agent in
//! network namespaces, with real TCP and UDP connections from two client namespaces;
//! `jitgate ssh` against a real OpenSSH server (issue 4); recommendations from what
//! real agents see (issue 5).
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables), and for `ssh.rs` OpenSSH
//! (openssh-server, openssh-client); without them the tests fail saying what to
//! install. Each test builds its own lab (see `lab.rs`) and tears it down.
//! Run: `cargo test -p jitgate --test e2e`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure report

mod access;
mod agent;
#[path = "../common/mod.rs"]
mod common;
mod dashboard;
mod faults;
mod gateway;
mod install;
mod lab;
mod nsg;
mod readme;
mod recommend;
mod ssh;
mod tls;
