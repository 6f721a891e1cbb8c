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
    // The controller serves many callers at once: one worker per core. Every other
    // command (the agent, the gateway, the client verbs) has one task on its path at a
    // time, and runs on this one thread: no second worker to wake on each HTTP round
    // trip (on a 2-core VM an axum echo answered a multi-thread reqwest client in 0.47
    // ms, a single-threaded one in 0.29 ms), and one thread fewer on every protected
    // host. Blocking work goes to `spawn_blocking`, which either runtime runs.
    let mut builder = match args.command {
        cli::Command::Serve(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("jitgate: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // The command runs as a task, not in `block_on` itself: on the controller's
    // runtime it then runs on a worker, as the tasks it wakes do (the HTTP
    // connections' own), where each hand-off between this thread and a worker cost a
    // thread wake-up on every request.
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
