//! `jitgate`: one binary for the controller (`serve`), the client verbs an admin uses
//! (`vm`, `token`, `role`, `audit`), and the benchmarks (`bench`).
//!
//! Errors are printed once, as a chain, with a non-zero exit code.

mod bench;
mod cli;
mod client;
mod people;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // One TLS crypto provider for every client and server in this process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jitgate: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(args)) {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<client::Exit>() {
            Some(exit) => {
                eprintln!("jitgate: {}", exit.message);
                ExitCode::from(exit.code)
            }
            None => {
                eprintln!("jitgate: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}
