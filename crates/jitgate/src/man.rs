//! Man pages: `jitgate man` (the top page) and `jitgate man VERB [SUB]` (one verb's),
//! from the same clap definition as `--help`. clap_mangen renders the name, synopsis,
//! description, options and subcommands; EXAMPLES, EXIT STATUS, ENVIRONMENT and FILES
//! are appended here as roff.

use clap::CommandFactory;

use crate::usage::{EXIT_CODES, usage};

/// Variables every client verb reads, besides its flags' own.
const CLIENT_ENV: &[(&str, &str)] = &[
    (
        "JITGATE_URL",
        "The controller's URL (as --url); else the one `jitgate login` saved, else http://127.0.0.1:8080.",
    ),
    (
        "JITGATE_TOKEN",
        "Your API token (as --token); else the one `jitgate login` saved.",
    ),
    (
        "JITGATE_CA_CERT",
        "PEM CA certificate of a controller with a private CA (as --ca-cert).",
    ),
];

/// Variables every verb reads.
const COMMON_ENV: &[(&str, &str)] = &[
    (
        "JITGATE_CONFIG_DIR",
        "Where `jitgate login` keeps config.toml [default: $XDG_CONFIG_HOME/jitgate, else ~/.config/jitgate].",
    ),
    (
        "JITGATE_LOG",
        "Log filter for serve and agent, e.g. info or jitgate_agent=debug [default: info].",
    ),
    (
        "COLUMNS",
        "Width tables are fitted to [default: the terminal's; output to a pipe is not cut].",
    ),
    (
        "TZ",
        "Time zone times are shown in [default: the system's].",
    ),
];

const CONFIG_FILE: (&str, &str) = (
    "~/.config/jitgate/config.toml",
    "The controller URL, token and CA certificate saved by `jitgate login` (mode 0600).",
);

/// Files a verb reads or writes, by verb.
fn files(verb: &str) -> Vec<(&'static str, &'static str)> {
    match verb {
        "serve" => vec![
            (
                "/etc/jitgate/controller.toml",
                "Configuration given with --config (deploy/controller.toml).",
            ),
            (
                "<data-dir>/jitgate.db",
                "The SQLite database: machines, policies, requests, tokens, the audit log.",
            ),
            (
                "<data-dir>/bootstrap-token",
                "The first Owner token, written at first start (mode 0600).",
            ),
            (
                "<data-dir>/audit-signing.key, audit-signing.pub",
                "The key that signs audit checkpoints, and its public half.",
            ),
            (
                "<data-dir>/audit-checkpoints.jsonl",
                "Signed audit checkpoints (--audit-checkpoints to put them elsewhere).",
            ),
        ],
        "agent" => vec![(
            "/var/lib/jitgate-agent",
            "The agent's credential and last applied state (--state-dir).",
        )],
        "admin" | "audit" => vec![
            (
                "<data-dir>/jitgate.db",
                "The controller's database (with --data-dir).",
            ),
            (
                "<data-dir>/audit-checkpoints.jsonl, audit-signing.pub",
                "Signed checkpoints and the key they are checked with (with --data-dir).",
            ),
            CONFIG_FILE,
        ],
        "completions" | "man" => vec![],
        _ => vec![CONFIG_FILE],
    }
}

/// More examples than the one in `--help`, by verb.
fn examples(verb: &str) -> &'static [&'static str] {
    match verb {
        "" => &[
            "jitgate login https://jit.example.com:8443",
            "jitgate status",
            "jitgate ssh admin@web-1 --for 15m --revoke-on-exit",
            "jitgate requests --mine --active",
        ],
        "login" => &[
            "jitgate login https://jit.example.com:8443",
            "jitgate login https://jit.example.com:8443 --device",
            "jitgate login https://jit.example.com:8443 --no-browser",
            "jitgate login https://jit.example.com:8443 --token-stdin < automation-token",
        ],
        "ssh" => &[
            "jitgate ssh admin@web-1",
            "jitgate ssh admin@web-1 --for 15m --revoke-on-exit --reason \"deploy fix\"",
            "jitgate ssh prod/web-1 --host 10.0.0.5 -- -i ~/.ssh/id_ed25519 uptime",
        ],
        "connect" => &[
            "jitgate connect win-1 --port 3389 --for 30m",
            "jitgate connect win-1 --port 3389 --json",
        ],
        "request" => &[
            "jitgate request web-1 --port 22 --for 1h --reason \"deploy fix\"",
            "jitgate request web-1 web-2 --port 22 --from 203.0.113.0/24 --for 30m",
        ],
        "enable" => &[
            "jitgate enable web-1 web-2 --port 22 --max 3h",
            "jitgate enable db-1 --port 5432 --from 10.0.0.0/8 --max 30m",
            "jitgate enable --recommended --resource-group prod-web",
        ],
        "revoke" => &[
            "jitgate revoke 0b6c1e5a-7f2d-4c8e-9a41-3d5f6e7a8b9c",
            "jitgate revoke web-1",
            "jitgate revoke web-1 --all",
        ],
        "audit" => &[
            "jitgate audit show --vm web-1 --since 24h",
            "jitgate audit show --follow",
            "jitgate audit show --since 7d --csv > audit.csv",
            "jitgate audit verify --data-dir /var/lib/jitgate",
        ],
        "token" => &[
            "jitgate token create --principal alice@example.com --expires-in 30d",
            "jitgate token list",
        ],
        "role" => &[
            "jitgate role assign --principal alice@example.com --role \"JIT Requester\" --resource-group prod-web",
            "jitgate role list --principal alice@example.com",
        ],
        "enroll-token" => {
            &["jitgate enroll-token create --resource-group prod-web --uses 10 --expires-in 1d"]
        }
        _ => &[],
    }
}

/// The roff page of the verb at `path` (empty: the top page).
pub fn page(path: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut root = crate::cli::Cli::command();
    root.build();
    let mut cmd = root;
    for name in path {
        let sub = cmd.find_subcommand(name).cloned().ok_or_else(|| {
            usage(format!(
                "`{name}` is not a verb of `{}`; see `{} --help`",
                cmd.get_bin_name().unwrap_or("jitgate"),
                cmd.get_bin_name().unwrap_or("jitgate")
            ))
        })?;
        cmd = sub;
    }
    let title = if path.is_empty() {
        "jitgate".to_owned()
    } else {
        format!("jitgate-{}", path.join("-"))
    };
    let verb = path.first().map(String::as_str).unwrap_or("");
    // The exit codes are a section of their own here, not `--help`'s after-text.
    let cmd = cmd
        .display_name(title.clone())
        .version(env!("CARGO_PKG_VERSION"))
        .after_help(None::<&str>)
        .after_long_help(None::<&str>);
    let man = clap_mangen::Man::new(cmd.clone()).title(title.to_uppercase());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut out)?;
    }
    let mut roff = String::new();
    section(&mut roff, "EXAMPLES");
    let mut shown: Vec<String> = example_lines(&cmd);
    for e in examples(verb) {
        if !shown.iter().any(|s| s == e) {
            shown.push((*e).to_owned());
        }
    }
    for e in &shown {
        roff.push_str(".PP\n.nf\n");
        line_escaped(&mut roff, e);
        roff.push_str(".fi\n");
    }
    section(&mut roff, "EXIT STATUS");
    for (code, what) in EXIT_CODES {
        item(&mut roff, &code.to_string(), what);
    }
    if verb == "ssh" || verb.is_empty() {
        roff.push_str(".PP\n");
        line_escaped(
            &mut roff,
            "Once ssh runs, jitgate ssh ends with ssh's own exit status (with --revoke-on-exit, after revoking the grant).",
        );
    }
    section(&mut roff, "ENVIRONMENT");
    let mut env: Vec<(String, String)> = Vec::new();
    collect_env(&cmd, &mut env);
    let client_verb = cmd
        .get_arguments()
        .any(|a| a.get_long() == Some("token") || a.get_long() == Some("url"));
    if client_verb || verb.is_empty() {
        for (k, v) in CLIENT_ENV {
            if !env.iter().any(|(e, _)| e == k) {
                env.push(((*k).to_owned(), (*v).to_owned()));
            }
        }
    }
    for (k, v) in COMMON_ENV {
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    for (k, v) in &env {
        item(&mut roff, k, v);
    }
    let files = if verb.is_empty() {
        vec![CONFIG_FILE]
    } else {
        files(verb)
    };
    if !files.is_empty() {
        section(&mut roff, "FILES");
        for (f, what) in files {
            item(&mut roff, f, what);
        }
    }
    section(&mut roff, "SEE ALSO");
    if verb.is_empty() {
        line_escaped(
            &mut roff,
            "jitgate man VERB (e.g. jitgate man ssh) for each verb's page; jitgate VERB --help.",
        );
    } else {
        line_escaped(&mut roff, "jitgate(1), jitgate man, jitgate --help.");
    }
    out.extend_from_slice(roff.as_bytes());
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// The `Example:` lines of a command's help, and of its subcommands'.
fn example_lines(cmd: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    let text = cmd
        .get_long_about()
        .or(cmd.get_about())
        .map(|t| t.to_string())
        .unwrap_or_default();
    for l in text.lines() {
        if let Some(e) = l.trim().strip_prefix("Example:") {
            out.push(e.trim().to_owned());
        }
    }
    for sub in cmd.get_subcommands() {
        out.extend(example_lines(sub));
    }
    out
}

/// The environment variables of a command's flags: (name, the flag's help).
fn collect_env(cmd: &clap::Command, out: &mut Vec<(String, String)>) {
    for a in cmd.get_arguments() {
        let Some(env) = a.get_env() else { continue };
        let name = env.to_string_lossy().into_owned();
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
        let flag = a
            .get_long()
            .map(|l| format!("As --{l}. "))
            .unwrap_or_default();
        out.push((name, format!("{flag}{help}")));
    }
}

fn section(roff: &mut String, name: &str) {
    roff.push_str(&format!(".SH \"{name}\"\n"));
}

/// A tagged paragraph: `tag` in bold, then its text.
fn item(roff: &mut String, tag: &str, text: &str) {
    roff.push_str(".TP\n");
    line(roff, &format!("\\fB{}\\fR", escape(tag)));
    line_escaped(roff, text);
}

/// A line of text (escaped) as one roff input line.
fn line_escaped(roff: &mut String, text: &str) {
    line(roff, &escape(text));
}

/// A roff input line: one starting with `.` or `'` would be a request, so it is
/// guarded with `\&`.
fn line(roff: &mut String, text: &str) {
    if text.starts_with(['.', '\'']) {
        roff.push_str("\\&");
    }
    roff.push_str(text);
    roff.push('\n');
}

/// Text with roff's escape character and hyphens made literal.
fn escape(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn page_of(path: &[&str]) -> String {
        let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        String::from_utf8(page(&path).unwrap()).unwrap()
    }

    #[test]
    fn a_verb_page_has_every_section() {
        let ssh = page_of(&["ssh"]);
        for s in [
            ".TH JITGATE-SSH",
            ".SH NAME",
            ".SH SYNOPSIS",
            ".SH OPTIONS",
            ".SH \"EXAMPLES\"",
            ".SH \"EXIT STATUS\"",
            ".SH \"ENVIRONMENT\"",
            ".SH \"FILES\"",
            "revoke\\-on\\-exit",
            "JITGATE_TOKEN",
        ] {
            assert!(ssh.contains(s), "no {s:?} in:\n{ssh}");
        }
        // A subcommand's page, and the top page.
        let create = page_of(&["token", "create"]);
        assert!(create.contains(".TH JITGATE-TOKEN-CREATE"), "{create}");
        assert!(create.contains("expires\\-in 30d"), "{create}");
        let top = page_of(&[]);
        assert!(top.contains(".TH JITGATE ") && top.contains("ssh"), "{top}");
        assert!(top.contains(".SH \"EXIT STATUS\""), "{top}");
    }

    #[test]
    fn an_unknown_verb_is_a_usage_error() {
        let e = page(&["nope".to_owned()]).unwrap_err();
        let exit = e.downcast_ref::<crate::usage::Exit>().unwrap();
        assert_eq!(exit.code, crate::usage::EXIT_USAGE);
        assert!(exit.message.contains("`nope`"), "{}", exit.message);
    }

    #[test]
    fn text_cannot_become_a_roff_request() {
        let mut r = String::new();
        line_escaped(&mut r, ".SH evil \\ -x");
        assert_eq!(r, "\\&.SH evil \\e \\-x\n");
    }
}
