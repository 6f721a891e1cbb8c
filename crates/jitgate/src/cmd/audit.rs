//! `jitgate audit`: show events (with `--vm`, also the policy events that added,
//! changed or removed the machine), follow them, export CSV, verify the chain offline
//! or through the API.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use jitgate_core::Timestamp;
use jitgate_proto::api;
use serde::{Deserialize, Serialize};

use crate::cli::ClientArgs;
use crate::cmd::Session;
use crate::output::table::Table;
use crate::output::{human, short_id};
use crate::usage::bad_flag;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub cmd: Option<AuditCommand>,
    #[command(flatten)]
    pub show: AuditShowArgs,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Show audit events (oldest first), optionally following new ones.
    ///
    /// Example: jitgate audit show --vm web-1 --since 24h
    Show(AuditShowArgs),
    /// Verify the hash chain: offline on a data directory, or through the API.
    ///
    /// Example: jitgate audit verify --data-dir ./jitgate-data
    Verify {
        /// Verify the database in this data directory directly (no controller needed).
        /// With --database, where a controller's checkpoints and public key are.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Verify this PostgreSQL database directly (controllers sharing it may run).
        /// Not read from JITGATE_DATABASE_URL: a controller's environment must not
        /// turn a verify through the API into another one.
        #[arg(long)]
        database: Option<String>,
        /// Signed checkpoints to check the chain against (with --data-dir)
        /// [default: <data-dir>/audit-checkpoints.jsonl].
        #[arg(long, requires = "data_dir")]
        checkpoints: Option<PathBuf>,
        /// The controller's audit public key, hex, or a file holding it; trust this
        /// rather than the copy in the data directory (with --data-dir)
        /// [default: <data-dir>/audit-signing.pub].
        #[arg(long, requires = "data_dir")]
        public_key: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// The checkpoints and key for an offline verify; None when there are none at all.
fn offline_anchors(
    dir: &std::path::Path,
    checkpoints: Option<PathBuf>,
    public_key: Option<String>,
) -> anyhow::Result<Option<jitgate_store::AnchorSet>> {
    use jitgate_controller::checkpoint::{CHECKPOINT_FILE, PUBLIC_KEY_FILE};
    let cp_path = checkpoints.unwrap_or_else(|| dir.join(CHECKPOINT_FILE));
    let key_text = match public_key {
        Some(k) if std::path::Path::new(&k).is_file() => std::fs::read_to_string(&k)
            .with_context(|| format!("cannot read the public key file {k}"))?,
        Some(k) => k,
        None => match std::fs::read_to_string(dir.join(PUBLIC_KEY_FILE)) {
            Ok(t) => t,
            Err(_) => return Ok(None),
        },
    };
    let key = jitgate_core::audit::CheckpointPublicKey::parse(&key_text)
        .map_err(|e| anyhow::anyhow!("--public-key: {e}"))?;
    let checkpoints = jitgate_store::checkpoint::read(&cp_path)?;
    Ok(Some(jitgate_store::AnchorSet { key, checkpoints }))
}

pub async fn audit(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let Some(cmd) = args.cmd else {
        return audit_show(args.show).await;
    };
    match cmd {
        AuditCommand::Show(a) => audit_show(a).await,
        AuditCommand::Verify {
            data_dir,
            database,
            checkpoints,
            public_key,
            client,
        } => {
            let (ok, events, head, problems) = match (data_dir, database) {
                (None, None) => {
                    let ses = Session::new(&client)?;
                    let v = ses
                        .c
                        .get::<api::AuditVerify>("/api/v1/audit/verify", &[])
                        .await?
                        .data;
                    (v.ok, v.events, v.head_hash, v.problems)
                }
                (dir, database) => {
                    let anchors = match &dir {
                        Some(dir) => offline_anchors(dir, checkpoints, public_key)?,
                        None => None,
                    };
                    let r = match (database, dir) {
                        (Some(url), _) => {
                            let anchors = anchors.clone();
                            tokio::task::spawn_blocking(move || {
                                jitgate_store_sql::verify_postgres(&url, anchors.as_ref())
                            })
                            .await??
                        }
                        (None, dir) => {
                            let db = dir
                                .context("give --data-dir or --database")?
                                .join(jitgate_controller::DB_FILE);
                            if !db.exists() {
                                bail!("no jitgate database at {}", db.display());
                            }
                            jitgate_store_sql::verify_file(&db, anchors.as_ref())?
                        }
                    };
                    let problems: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
                    match (&anchors, r.anchored_at) {
                        (None, _) => eprintln!(
                            "warning: no audit public key found: the chain was checked only against itself (give --data-dir, or --public-key and --checkpoints)"
                        ),
                        (Some(_), None) => eprintln!(
                            "warning: no signed checkpoint found: events at the end could have been deleted unnoticed"
                        ),
                        (Some(_), Some(seq)) => {
                            eprintln!("anchored by a signed checkpoint of event {seq}")
                        }
                    }
                    (r.ok(), r.count, r.head_hash, problems)
                }
            };
            if client.json {
                let out = Verified {
                    ok,
                    events,
                    head_hash: &head,
                    problems: &problems,
                };
                println!("{}", serde_json::to_value(&out)?);
            } else if ok {
                println!("audit chain intact: {events} events, head {head}");
            } else {
                println!("audit chain BROKEN ({events} events read):");
                for p in &problems {
                    println!("  - {p}");
                }
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(crate::usage::EXIT_AUDIT_BROKEN)
            })
        }
    }
}

// ---- audit show ----------------------------------------------------------------------------

#[derive(Args)]
pub struct AuditShowArgs {
    /// Only events about this machine: its requests, grants and agent, and the policy
    /// changes that added, changed or removed it.
    #[arg(long)]
    pub vm: Option<String>,
    /// Only events by this principal.
    #[arg(long)]
    pub actor: Option<String>,
    /// Only actions starting with this (e.g. request., policy.create, authorization.denied).
    #[arg(long)]
    pub action: Option<String>,
    /// How far back (e.g. 24h, 30m, P1D) or a time (2026-01-01T00:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Keep printing new events.
    #[arg(long)]
    pub follow: bool,
    /// Print CSV (the export format, every field; with --vm only the events whose
    /// target is the machine). --json prints JSON lines.
    #[arg(long, conflicts_with = "follow")]
    pub csv: bool,
    /// At most this many events (1 to 100000).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// The largest page the controller serves.
const AUDIT_PAGE_MAX: usize = 100_000;

/// `--since`: a duration back from now, or a time.
fn since_time(text: &str) -> anyhow::Result<Timestamp> {
    match human::parse_secs(text) {
        Ok(secs) => Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_secs(secs))
            .map_err(|_| bad_flag("--since", format!("'{text}' is too far back"))),
        Err(_) => jitgate_core::request::parse_time(text).map_err(|_| {
            bad_flag(
                "--since",
                format!(
                    "'{text}' is neither a duration ({}) nor a time such as 2026-05-17T09:06:45Z",
                    human::DURATION_FORMS
                ),
            )
        }),
    }
}

/// What `audit verify --json` prints, offline or through the API.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Verified<'a> {
    ok: bool,
    events: u64,
    head_hash: &'a str,
    problems: &'a [String],
}

/// The parts of an event's `details` this verb reads (the details are free-form, one
/// shape per action; anything else in them is ignored).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Details {
    justification: Option<String>,
    reason: Option<String>,
    /// A `policy.*` event: the machines the policy lists after it.
    virtual_machines: Option<Vec<DetailsVm>>,
}

#[derive(Deserialize)]
struct DetailsVm {
    vm: Option<String>,
}

impl Details {
    fn of(e: &api::AuditEvent) -> Details {
        Details::deserialize(&e.details).unwrap_or_default()
    }
}

/// Which policy events concern one machine: those that list it (it was added or its
/// rules changed), and the next event on a policy that listed it but no longer does
/// (it was removed, or the policy deleted). Fed every policy event in order.
struct PolicyEventsOf {
    vm: String,
    /// Policies (lower-cased ids) that list the machine as of the last event seen.
    member_of: std::collections::BTreeSet<String>,
}

impl PolicyEventsOf {
    fn new(vm: &str) -> Self {
        PolicyEventsOf {
            vm: vm.to_owned(),
            member_of: Default::default(),
        }
    }

    /// Whether `e` (a `policy.*` event) concerns the machine.
    fn concerns(&mut self, e: &api::AuditEvent) -> bool {
        let policy = e.target.to_ascii_lowercase();
        let lists = Details::of(e).virtual_machines.is_some_and(|vms| {
            vms.iter().any(|v| {
                v.vm.as_deref()
                    .is_some_and(|id| id.eq_ignore_ascii_case(&self.vm))
            })
        });
        if lists {
            self.member_of.insert(policy);
            true
        } else {
            self.member_of.remove(&policy)
        }
    }
}

/// One audit event as a table row.
fn audit_row(e: &api::AuditEvent) -> Vec<String> {
    let d = Details::of(e);
    let why = d.justification.or(d.reason).unwrap_or_default();
    vec![
        e.seq.to_string(),
        human::stamp(&e.time),
        e.actor.clone(),
        e.source.clone(),
        e.action.clone(),
        short_target(&e.target),
        e.outcome.clone(),
        why,
    ]
}

const AUDIT_HEADERS: [&str; 8] = [
    "SEQ",
    "TIME",
    "ACTOR",
    "SOURCE",
    "ACTION",
    "TARGET",
    "OUTCOME",
    "JUSTIFICATION",
];

/// A machine or policy id in short (`prod/web-1`, `policy prod/default`); other
/// targets as they are.
fn short_target(id: &str) -> String {
    let parts: Vec<&str> = id.split('/').collect();
    match parts.as_slice() {
        [
            "",
            "subscriptions",
            _,
            "resourceGroups",
            rg,
            "providers",
            _,
            "locations",
            _,
            "jitNetworkAccessPolicies",
            name,
        ] => {
            format!("policy {rg}/{name}")
        }
        _ => short_id(id),
    }
}

pub async fn audit_show(a: AuditShowArgs) -> anyhow::Result<ExitCode> {
    if !(1..=AUDIT_PAGE_MAX).contains(&a.limit) {
        return Err(bad_flag(
            "--limit",
            format!("{} is not from 1 to {AUDIT_PAGE_MAX}", a.limit),
        ));
    }
    let since = a.since.as_deref().map(since_time).transpose()?;
    let ses = Session::new(&a.client)?;
    let vm = match &a.vm {
        Some(v) => Some(ses.find_vm(v).await?.vm.id),
        None => None,
    };
    let mut q = vec![("limit", a.limit.to_string())];
    if let Some(x) = &a.actor {
        q.push(("actor", x.clone()));
    }
    // The machine's own events; its policy events are found apart (they name the
    // policy as their target).
    let mut own = q.clone();
    if let Some(x) = &a.action {
        own.push(("action", x.clone()));
    }
    if let Some(id) = &vm {
        own.push(("vm", id.clone()));
    }
    if let Some(t) = since {
        own.push(("since", t.to_string()));
    }
    if a.csv {
        own.push(("format", "csv".to_owned()));
        print!("{}", ses.c.get_text("/api/v1/audit", &own).await?);
        return Ok(ExitCode::SUCCESS);
    }
    // Policy events: every one from the start (whether a later one removed the
    // machine depends on the earlier ones), shown from --since on.
    let policy_action = match a.action.as_deref() {
        None => Some("policy.".to_owned()),
        Some(x) if x.starts_with("policy.") || "policy.".starts_with(x) => Some(
            if x.len() > "policy.".len() {
                x
            } else {
                "policy."
            }
            .to_owned(),
        ),
        Some(_) => None,
    };
    // Every policy event is followed (by anyone: membership depends on them all);
    // --actor applies to what is shown.
    let mut policies = match (&vm, &policy_action) {
        (Some(id), Some(action)) => Some((
            vec![
                ("limit", AUDIT_PAGE_MAX.to_string()),
                ("action", action.clone()),
            ],
            PolicyEventsOf::new(id),
        )),
        _ => None,
    };
    // Policy events of the machine not shown yet (past --limit), and how far the
    // policy events were read.
    let mut pending: Vec<api::AuditEvent> = Vec::new();
    let mut policy_after: Option<u64> = None;
    let mut after: Option<u64> = None;
    let mut widths: Option<Vec<usize>> = None;
    loop {
        let mut page = own.clone();
        if let Some(seq) = after {
            page.push(("afterSeq", seq.to_string()));
        }
        let mut events = ses
            .c
            .get_pages::<api::AuditPage>("/api/v1/audit", &page, Some(a.limit))
            .await?
            .data
            .value;
        if let Some((query, tracker)) = &mut policies {
            let mut page = query.clone();
            if let Some(seq) = policy_after {
                page.push(("afterSeq", seq.to_string()));
            }
            let all = ses
                .c
                .get_all_pages::<api::AuditPage>("/api/v1/audit", &page)
                .await?
                .data
                .value;
            for e in all {
                policy_after = Some(e.seq);
                let concerns = tracker.concerns(&e);
                let shown = since.is_none_or(|t| {
                    jitgate_core::request::parse_time(&e.time).is_ok_and(|at| at >= t)
                }) && a.actor.as_ref().is_none_or(|x| &e.actor == x);
                if concerns && shown {
                    pending.push(e);
                }
            }
            events.append(&mut pending);
            events.sort_by_key(|e| e.seq);
            events.dedup_by_key(|e| e.seq);
            if events.len() > a.limit {
                // The machine's own events past the limit are read again next time;
                // its policy events are kept.
                pending = events
                    .split_off(a.limit)
                    .into_iter()
                    .filter(|e| e.action.starts_with("policy."))
                    .collect();
            }
        }
        if let Some(e) = events.last() {
            after = Some(e.seq);
        }
        if ses.json {
            for e in &events {
                println!("{}", serde_json::to_value(e)?);
            }
        } else if events.is_empty() && !a.follow {
            eprintln!("no matching events");
        } else if !events.is_empty() || widths.is_none() {
            let mut t = Table::new(&AUDIT_HEADERS);
            if a.follow {
                // Room for the events still to come.
                t.at_least(&[6, 19, 16, 15, 22, 24, 7]);
            }
            for e in &events {
                t.row(audit_row(e));
            }
            let fit = crate::output::table::terminal_width();
            match &widths {
                None => {
                    let w = t.widths(fit);
                    print!("{}", t.render_with(&w, true, fit.is_some()));
                    widths = Some(w);
                }
                Some(w) => print!("{}", t.render_with(w, false, fit.is_some())),
            }
            let _ = std::io::stdout().flush();
        }
        if !a.follow {
            break;
        }
        if after.is_none() {
            after = Some(0);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(ExitCode::SUCCESS)
}
