//! `jitgate ssh` and `jitgate connect`: resolve the machine's address first (a machine
//! nobody can reach gets no grant), reuse a live grant of the caller's own whose source
//! covers the caller's observed address or request one, wait until a TCP connect
//! succeeds; `ssh` then `exec`s ssh, or with `--revoke-on-exit` stays its parent and
//! revokes the grant it made when ssh exits.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use jitgate_core::net::SourcePrefix;
use jitgate_proto::api;
use serde::Serialize;

use crate::cli::ClientArgs;
use crate::cmd::access::{Wanted, for_duration, initiate, protected_ports, revoke_request};
use crate::cmd::{Session, invalid};
use crate::output::{human, print, short_id};
use crate::usage::{EXIT_NOT_FOUND, EXIT_TIMEOUT, Exit, bad_flag};

// ---- ssh / connect --------------------------------------------------------------------

#[derive(Args)]
pub struct ConnectArgs {
    pub vm: String,
    #[arg(long, default_value_t = 22)]
    pub port: u16,
    /// Address or name to connect to [default: the address the agent reports, else the machine name].
    #[arg(long)]
    pub host: Option<String>,
    /// How long to ask for when no live grant covers you (e.g. 15m, 1h) [default: the
    /// policy's maximum, at most 1h].
    #[arg(long = "for")]
    pub duration: Option<String>,
    /// How long to wait for the port to open (e.g. 30s, 2m; a bare number is seconds).
    #[arg(long, default_value = "30s")]
    pub wait: String,
    /// Why you need access (recorded in the audit log).
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Args)]
pub struct SshArgs {
    /// [user@]machine
    pub target: String,
    #[arg(long, default_value_t = 22)]
    pub port: u16,
    /// Address or name to connect to [default: the address the agent reports, else the machine name].
    #[arg(long)]
    pub host: Option<String>,
    /// How long to ask for when no live grant covers you: a short grant for one
    /// session, e.g. 15m [default: the policy's maximum, at most 1h].
    #[arg(long = "for")]
    pub duration: Option<String>,
    /// How long to wait for the port to open (e.g. 30s, 2m; a bare number is seconds).
    #[arg(long, default_value = "30s")]
    pub wait: String,
    /// Why you need access (recorded in the audit log).
    #[arg(long)]
    pub reason: Option<String>,
    /// Stay the parent of ssh and revoke the grant when ssh exits (a grant this run did
    /// not make, reused from earlier, is left as it is).
    #[arg(long)]
    pub revoke_on_exit: bool,
    /// The ssh program.
    #[arg(long, default_value = "ssh")]
    pub ssh: PathBuf,
    /// Arguments for ssh: options, then optionally a remote command.
    #[arg(last = true)]
    pub ssh_args: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `--wait`: a duration, or a bare number of seconds (zero: try once).
fn wait_duration(text: &str) -> anyhow::Result<Duration> {
    if let Ok(secs) = text.trim().parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let secs = human::parse_secs(text).map_err(|e| bad_flag("--wait", e))?;
    Ok(Duration::from_secs(secs.unsigned_abs()))
}

/// The host's address from the agent's report (global IPv4 first).
fn agent_address(addrs: &[String]) -> Option<String> {
    let ip = |a: &String| a.split('/').next().and_then(|x| x.parse::<IpAddr>().ok());
    addrs
        .iter()
        .filter_map(ip)
        .find(|i| i.is_ipv4() && !i.is_loopback())
        .or_else(|| addrs.iter().filter_map(ip).find(|i| matches!(i, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) != 0xfe80 && !v6.is_loopback())))
        .map(|i| i.to_string())
}

/// The host's address from the agent's report, else the machine name.
fn host_of(addresses: &[String], name: &str) -> String {
    agent_address(addresses).unwrap_or_else(|| name.to_owned())
}

/// Where a machine's `port` is reached by default: `(host, port to connect to)`. Behind
/// a DNAT gateway, the gateway's public address and the port mapped to `port` (as
/// Azure's `publicIpAddress` and `mappedPort`); behind a routed gateway, the
/// machine's private address; else the address its agent reports.
fn default_target(vm: &api::VmDetail, port: u16) -> (String, u16) {
    match &vm.placement {
        Some(p) => {
            let mapped = p
                .place
                .mapped_ports
                .iter()
                .find(|m| m.number == port)
                .map(|m| m.mapped_port);
            match (&p.place.public_ip_address, mapped) {
                (Some(public), Some(m)) if p.place.mode == "dnat" => (public.clone(), m),
                _ => (p.place.address.clone(), port),
            }
        }
        None => (host_of(&vm.agent.report.addresses, &vm.vm.name), port),
    }
}

/// Where to connect, resolved before anything is asked of the controller: a machine
/// whose address is unknown gets no grant nobody could use. `(host, addresses, the
/// port to connect to)`.
fn resolve_host(
    vm: &api::VmDetail,
    flag: Option<&str>,
    port: u16,
) -> anyhow::Result<(String, Vec<SocketAddr>, u16)> {
    let (default, port) = default_target(vm, port);
    let host = flag.map(str::to_owned).unwrap_or(default);
    let addrs: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .unwrap_or_default();
    if !addrs.is_empty() {
        return Ok((host, addrs, port));
    }
    let short = short_id(&vm.vm.id);
    Err(Exit::err(
        EXIT_NOT_FOUND,
        match flag {
            Some(h) => format!(
                "--host {h} does not resolve to an address; give an address or a name that resolves"
            ),
            None => format!(
                "cannot find the address of {short}: its agent reported none and the name {host} does not resolve; give --host ADDRESS (nothing was requested)"
            ),
        },
    ))
}

/// A live grant of mine that covers a port.
struct Grant {
    request: String,
    end: String,
    /// Made earlier (by me), not by this run.
    reused: bool,
}

/// Makes sure a live grant of mine from my address covers `port`. Only my own grants
/// are reused: someone else's grant from the same address (a shared office NAT) is not
/// mine to use, and my access must be on record as mine.
async fn ensure_grant(
    ses: &Session,
    vm: &api::VmDetail,
    port: u16,
    duration: Option<&str>,
    reason: Option<&str>,
) -> anyhow::Result<Grant> {
    let who = ses.whoami().await?;
    let my_ip: IpAddr = who
        .caller_ip
        .parse()
        .context("the controller reported an unreadable address")?;
    let me = SourcePrefix::host(my_ip);
    let reusable = vm.grants.iter().find(|g| {
        g.requestor == who.principal
            && g.port == port
            && g.seconds_left > 30
            && SourcePrefix::parse(&g.source).is_ok_and(|src| src.contains(&me))
    });
    if let Some(g) = reusable {
        eprintln!(
            "reusing a live grant for port {port} ({} left, request {})",
            human::left(&g.end_time_utc),
            g.request
        );
        return Ok(Grant {
            request: g.request.clone(),
            end: g.end_time_utc.clone(),
            reused: true,
        });
    }
    let (path, protected) = protected_ports(ses, vm).await?;
    let short = short_id(&vm.vm.id);
    let rule = protected.into_iter().find(|(p, _)| *p == port).ok_or_else(|| {
        invalid(format!("port {port} is not protected by JIT on {short}; connect directly, or ask an admin to `jitgate enable {short} --port {port}`"))
    })?;
    let wanted = [Wanted {
        vm: vm.vm.id.clone(),
        path,
        ports: vec![rule],
    }];
    let res = initiate(ses, &wanted, duration, "my-ip", reason, false).await?;
    let first = res.first();
    let asked = first
        .and_then(|r| r.granted.virtual_machines.first())
        .and_then(|v| v.ports.first());
    let mut end = asked.map_or_else(|| "-".to_owned(), |p| p.end_time_utc.clone());
    // An approval rule makes it wait: for the decision first, then for the port.
    if let (Some(r), Some(p)) = (first, asked)
        && p.status == "Pending"
    {
        eprintln!(
            "port {port} on {short} needs approval: waiting for it (request {}; withdraw it with `jitgate cancel {}`)",
            r.request, r.request
        );
        let decided = crate::cmd::approvals::wait_decision(ses, &r.request).await?;
        if let Some(p) = decided
            .virtual_machines
            .iter()
            .flat_map(|v| v.ports.iter())
            .find(|p| p.number == port)
        {
            end = p.end_time_utc.clone();
        }
    }
    eprintln!(
        "granted port {port} on {short} from {my_ip} until {}",
        human::time(&end)
    );
    Ok(Grant {
        request: first.map_or_else(|| "-".to_owned(), |r| r.request.clone()),
        end,
        reused: false,
    })
}

/// [`wait_open`] on a thread for blocking work, off the async runtime.
async fn wait_until_open(
    host: &str,
    addrs: &[SocketAddr],
    port: u16,
    wait: Duration,
) -> anyhow::Result<SocketAddr> {
    let (host, addrs) = (host.to_owned(), addrs.to_vec());
    tokio::task::spawn_blocking(move || wait_open(&host, &addrs, port, wait))
        .await
        .map_err(|e| anyhow::anyhow!("waiting for the port stopped: {e}"))?
}

/// Waits until a TCP connection to one of `addrs` succeeds from here.
fn wait_open(
    host: &str,
    addrs: &[SocketAddr],
    port: u16,
    wait: Duration,
) -> anyhow::Result<SocketAddr> {
    let tty = std::io::stderr().is_terminal();
    let spinner = ['|', '/', '-', '\\'];
    let start = Instant::now();
    let mut i = 0;
    loop {
        for a in addrs {
            if TcpStream::connect_timeout(a, Duration::from_millis(300)).is_ok() {
                if tty {
                    eprint!("\r\x1b[K");
                }
                return Ok(*a);
            }
        }
        if start.elapsed() >= wait {
            if tty {
                eprint!("\r\x1b[K");
            }
            return Err(Exit::err(
                EXIT_TIMEOUT,
                format!(
                    "port {port} on {host} did not open within {}; check the machine's agent with `jitgate vm show`, or that {host} is the right address (--host)",
                    human::duration(wait.as_secs() as i64)
                ),
            ));
        }
        if tty {
            eprint!(
                "\r{} waiting for {host}:{port} to open ({}s)",
                spinner[i % 4],
                start.elapsed().as_secs()
            );
            let _ = std::io::stderr().flush();
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What `connect` prints with `--json`: where to connect, until when, which request.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Connected<'a> {
    vm: &'a str,
    port: u16,
    address: String,
    request: &'a str,
    end_time_utc: &'a str,
    reused: bool,
}

pub async fn connect(a: ConnectArgs) -> anyhow::Result<ExitCode> {
    let duration = for_duration(a.duration.as_deref())?;
    let wait = wait_duration(&a.wait)?;
    let ses = Session::new(&a.client)?;
    let vm = ses.vm(&a.vm).await?;
    let (host, addrs, to_port) = resolve_host(&vm, a.host.as_deref(), a.port)?;
    let grant = ensure_grant(&ses, &vm, a.port, duration.as_deref(), a.reason.as_deref()).await?;
    let addr = wait_until_open(&host, &addrs, to_port, wait).await?;
    let out = Connected {
        vm: &vm.vm.id,
        port: a.port,
        address: addr.to_string(),
        request: &grant.request,
        end_time_utc: &grant.end,
        reused: grant.reused,
    };
    print(ses.json, &out, || {
        println!(
            "{} port {} is open: connect to {}",
            short_id(out.vm),
            out.port,
            out.address
        );
        println!(
            "it stays open until {}; end it sooner with: jitgate revoke {}",
            human::time(out.end_time_utc),
            out.request
        );
    });
    Ok(ExitCode::SUCCESS)
}

/// ssh's options that take a value (from ssh(1)).
const SSH_OPTS_WITH_VALUE: &str = "BbcDEeFIiJLlmOoPpQRSWw";

/// Splits user arguments into ssh options (before the destination) and the remote
/// command (after it).
pub fn split_ssh_args(args: &[String]) -> (Vec<String>, Vec<String>) {
    let mut opts = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if !a.starts_with('-') || a == "-" {
            break;
        }
        opts.push(a.clone());
        if a == "--" {
            i += 1;
            break;
        }
        // `-i key`: the value is the next argument unless attached (`-ikey`).
        let last = a.chars().last().unwrap_or(' ');
        if a.len() == 2 && SSH_OPTS_WITH_VALUE.contains(last) && i + 1 < args.len() {
            opts.push(args[i + 1].clone());
            i += 1;
        }
        i += 1;
    }
    (opts, args[i.min(args.len())..].to_vec())
}

pub async fn ssh(a: SshArgs) -> anyhow::Result<ExitCode> {
    let duration = for_duration(a.duration.as_deref())?;
    let wait = wait_duration(&a.wait)?;
    let (user, machine) = match a.target.split_once('@') {
        Some((u, m)) => (Some(u.to_owned()), m.to_owned()),
        None => (None, a.target.clone()),
    };
    let ses = Session::new(&a.client)?;
    let vm = ses.vm(&machine).await?;
    let short = short_id(&vm.vm.id);
    let (host, addrs, to_port) = resolve_host(&vm, a.host.as_deref(), a.port)?;
    let grant = ensure_grant(&ses, &vm, a.port, duration.as_deref(), a.reason.as_deref()).await?;
    wait_until_open(&host, &addrs, to_port, wait).await?;
    let until = human::time(&grant.end);
    if a.revoke_on_exit && !grant.reused {
        eprintln!(
            "port {} on {short} is open until {until} or until ssh exits (then it is revoked)",
            a.port
        );
    } else {
        eprintln!(
            "port {} on {short} stays open until {until}; end it sooner with: jitgate revoke {}",
            a.port, grant.request
        );
    }
    let (opts, command) = split_ssh_args(&a.ssh_args);
    let dest = match user {
        Some(u) => format!("{u}@{host}"),
        None => host,
    };
    let mut cmd = std::process::Command::new(&a.ssh);
    cmd.arg("-p")
        .arg(to_port.to_string())
        .args(&opts)
        .arg(&dest)
        .args(&command);
    let cannot_run = |e: std::io::Error| {
        anyhow::anyhow!(
            "cannot run {}: {e} (is openssh-client installed?)",
            a.ssh.display()
        )
    };
    if !a.revoke_on_exit {
        // Replace this process: the terminal and signals belong to ssh from here on.
        use std::os::unix::process::CommandExt;
        return Err(cannot_run(cmd.exec()));
    }
    let code = run_child(cmd).await.map_err(cannot_run)?;
    if grant.reused {
        eprintln!(
            "ssh exited; request {} was not made by this run and stays open until {until}; end it with: jitgate revoke {}",
            grant.request, grant.request
        );
        return Ok(ExitCode::from(code));
    }
    revoke_request(&ses, &grant.request, Some(&vm.vm.id))
        .await
        .with_context(|| {
            format!(
                "ssh exited, but revoking request {} failed; it stays open until {until}: run `jitgate revoke {}`",
                grant.request, grant.request
            )
        })?;
    eprintln!(
        "ssh exited; revoked request {}: port {} on {short} is closed",
        grant.request, a.port
    );
    Ok(ExitCode::from(code))
}

/// Runs ssh as a child and waits for it; its exit status (128 + the signal when a
/// signal ended it). Ctrl-C belongs to ssh (the terminal sends it to both; this process
/// stays to revoke); SIGTERM and SIGHUP are passed on to ssh.
async fn run_child(cmd: std::process::Command) -> std::io::Result<u8> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut child = tokio::process::Command::from(cmd).spawn()?;
    let pass_on = |child: &tokio::process::Child, sig: nix::sys::signal::Signal| {
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = int.recv() => {}
            _ = term.recv() => pass_on(&child, nix::sys::signal::Signal::SIGTERM),
            _ = hup.recv() => pass_on(&child, nix::sys::signal::Signal::SIGHUP),
        }
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(1),
        (None, None) => 1,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ssh_args_split_options_from_the_remote_command() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            split_ssh_args(&v(&[
                "-i",
                "key",
                "-o",
                "BatchMode=yes",
                "-v",
                "uname",
                "-a"
            ])),
            (
                v(&["-i", "key", "-o", "BatchMode=yes", "-v"]),
                v(&["uname", "-a"])
            )
        );
        assert_eq!(
            split_ssh_args(&v(&["-ikey", "hostname"])),
            (v(&["-ikey"]), v(&["hostname"]))
        );
        assert_eq!(split_ssh_args(&v(&[])), (vec![], vec![]));
        assert_eq!(split_ssh_args(&v(&["--", "-x"])), (v(&["--"]), v(&["-x"])));
    }

    #[test]
    fn host_prefers_a_global_ipv4() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let addresses = v(&["fe80::1/64", "2001:db8::5/64", "10.0.0.5/24"]);
        assert_eq!(host_of(&addresses, "web-1"), "10.0.0.5");
        let addresses = v(&["fe80::1/64", "2001:db8::5/64"]);
        assert_eq!(host_of(&addresses, "web-1"), "2001:db8::5");
        assert_eq!(host_of(&[], "web-1"), "web-1");
    }
}
