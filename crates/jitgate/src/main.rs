//! `jitgate`: one binary for the controller (`serve`), the agent (`agent`) and the
//! client verbs people use (`vm`, `token`, `role`, `audit`, ...). The benchmarks are a
//! binary of their own (`crates/bench`), so this one holds only the product.
//!
//! Errors are printed once, as a chain, with a non-zero exit code (the codes are listed
//! in `usage::EXIT_CODES`, shown by `--help` and the man pages).

mod azure;
mod cli;
mod client;
mod cmd;
mod config;
mod man;
mod output;
mod trust;
mod usage;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    quiet_broken_pipe();
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
    // The command runs as a task on a worker thread, not on this thread: the tasks it
    // wakes (the HTTP connections' own, the agent's saver) are then run on the same
    // worker, where each hand-off between this thread and a worker cost a thread
    // wake-up (a quarter of a millisecond on a small VM) on every request.
    let ran = runtime.block_on(async { tokio::spawn(cli::run(args)).await });
    let ran = match ran {
        Ok(r) => r,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => Err(anyhow::anyhow!("the command was cancelled: {e}")),
        },
    };
    match ran {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<usage::Exit>() {
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

/// Output piped into a reader that stops early (`jitgate audit show | head`): end
/// quietly with the shell's SIGPIPE status, as other Unix tools do, instead of the
/// panic `println!` raises on EPIPE (Rust ignores SIGPIPE, and unsafe code is denied
/// here, so the signal's default action cannot be restored).
fn quiet_broken_pipe() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload_as_str().unwrap_or_default();
        if msg.starts_with("failed printing to stdout") && msg.contains("os error 32") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
}
