//! Exit codes, usage errors, and the controller's field names turned back into the
//! flags a person typed.
//!
//! A verb checks what it can of its flags before it calls the controller (a wrong
//! flag is exit 2 and changes nothing). What only the controller can judge comes back
//! as a 400 naming a JSON field of the body the verb built
//! (`properties.virtualMachines[0].ports[0].maxRequestAccessDuration: ...`); each verb
//! knows which of its flags filled which field, and `name_flags` rewrites the message
//! so it names the flag (`--max: ...`).

use std::fmt;

/// An error that ends the command with a specific exit code.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl Exit {
    pub fn err(code: u8, message: impl Into<String>) -> anyhow::Error {
        anyhow::Error::new(Exit {
            code,
            message: message.into(),
        })
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

/// Whether `e` ends the command with exit code `code`.
pub fn has_code(e: &anyhow::Error, code: u8) -> bool {
    e.downcast_ref::<Exit>().is_some_and(|x| x.code == code)
}

/// A flag or argument is wrong (as clap's own usage errors): nothing was changed.
pub const EXIT_USAGE: u8 = 2;
/// Not found or ambiguous.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Not authenticated or not permitted.
pub const EXIT_AUTH: u8 = 4;
/// Refused as invalid.
pub const EXIT_INVALID: u8 = 5;
/// Timed out waiting for a port.
pub const EXIT_TIMEOUT: u8 = 6;
/// `audit verify`: the audit chain is broken.
pub const EXIT_AUDIT_BROKEN: u8 = 7;
/// The controller's certificate does not validate (or TLS is not spoken there).
pub const EXIT_TLS: u8 = 8;

/// Every exit status the binary uses, for `--help` and the man pages.
pub const EXIT_CODES: &[(u8, &str)] = &[
    (0, "Success."),
    (
        1,
        "Any other error: the controller cannot be reached, a file cannot be read, the server failed.",
    ),
    (
        2,
        "Usage error: an unknown, missing or malformed flag or argument (a duration, address, protocol, scope...). Nothing was changed.",
    ),
    (
        3,
        "Not found or ambiguous: no such machine, request or token, or a short name that matches several machines.",
    ),
    (
        4,
        "Not authenticated (missing, wrong, expired or revoked token) or not permitted (your roles do not allow it).",
    ),
    (
        5,
        "Refused as invalid: the controller or the machine's policy does not allow what was asked (a port it does not protect, longer than its maximum, a source outside the allowed ones). Nothing was changed.",
    ),
    (6, "Timed out waiting for a port to open (ssh, connect)."),
    (
        7,
        "audit verify: the audit chain is broken (events modified, deleted, inserted or reordered).",
    ),
    (
        8,
        "TLS: the controller's certificate does not validate (unknown issuer, no name for the address, a pinned fingerprint that does not match), or the URL's scheme does not match what the controller serves. The message says what to do.",
    ),
    (
        78,
        "agent: it cannot work as configured and restarting will not help (its credential was replaced by a new enrollment or revoked; nft missing or not permitted; the controller's certificate does not match its pin); it stops with advice, and systemd does not restart it.",
    ),
    (
        141,
        "The reader of the output went away (`| head`), as for other Unix tools.",
    ),
];

/// The exit codes as plain text, for `--help`.
pub fn exit_codes_text() -> String {
    let mut out = String::from("Exit status:\n");
    for (code, what) in EXIT_CODES {
        out.push_str(&format!("  {code:<4}{what}\n"));
    }
    out.push_str("  jitgate ssh ends with ssh's own exit status once ssh runs.");
    out
}

/// A usage error naming the flag: exit 2.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Exit::err(EXIT_USAGE, msg)
}

/// `flag: problem` as a usage error.
pub fn bad_flag(flag: &str, problem: impl std::fmt::Display) -> anyhow::Error {
    usage(format!("{flag}: {problem}"))
}

/// Which flag filled which field of a request body: the field's last name (array
/// indexes and parents dropped), and the flag.
pub type FlagMap = &'static [(&'static str, &'static str)];

/// Rewrites a refusal (exit 5) whose message starts with a JSON field path of the
/// request into one that names the flag instead: `--max: 'PT48H' is outside ...`.
/// Other errors pass unchanged.
pub fn name_flags(e: anyhow::Error, flags: FlagMap) -> anyhow::Error {
    let Some(exit) = e.downcast_ref::<Exit>() else {
        return e;
    };
    if exit.code != EXIT_INVALID {
        return e;
    }
    match translate(&exit.message, flags) {
        Some(message) => Exit::err(exit.code, message),
        None => e,
    }
}

fn translate(message: &str, flags: FlagMap) -> Option<String> {
    let (path, rest) = message.split_once(": ")?;
    let is_path = !path.is_empty()
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._[]".contains(c));
    if !is_path {
        return None;
    }
    let last = path.rsplit('.').next()?;
    let last = last.split('[').next()?;
    let flag = flags
        .iter()
        .find(|(field, _)| field.eq_ignore_ascii_case(last))
        .map(|(_, flag)| *flag)?;
    Some(format!("{flag}: {rest}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ENABLE: FlagMap = &[
        ("maxRequestAccessDuration", "--max"),
        ("allowedSourceAddressPrefixes", "--from"),
        ("number", "--port"),
    ];

    fn check(message: &str, want: &str) {
        let e = name_flags(Exit::err(EXIT_INVALID, message), ENABLE);
        let got = e.downcast_ref::<Exit>().unwrap();
        assert_eq!(got.code, EXIT_INVALID);
        assert_eq!(got.message, want);
    }

    #[test]
    fn field_paths_become_flags() {
        check(
            "properties.virtualMachines[0].ports[0].maxRequestAccessDuration: 'PT48H' is outside the allowed range",
            "--max: 'PT48H' is outside the allowed range",
        );
        check(
            "properties.virtualMachines[1].ports[2].allowedSourceAddressPrefixes[3]: not a CIDR",
            "--from: not a CIDR",
        );
        check("number: is zero", "--port: is zero");
        // Not a field of this verb, or not a field at all: unchanged.
        check("properties.kind: unknown", "properties.kind: unknown");
        check(
            "the policy of prod/web-1: is gone",
            "the policy of prod/web-1: is gone",
        );
        check("no colon here", "no colon here");
        // Only refusals are rewritten.
        let e = name_flags(Exit::err(3, "number: not found"), ENABLE);
        assert_eq!(e.to_string(), "number: not found");
        let e = name_flags(anyhow::anyhow!("number: plain"), ENABLE);
        assert_eq!(e.to_string(), "number: plain");
    }

    #[test]
    fn every_exit_code_is_documented_once() {
        let text = exit_codes_text();
        for code in [0, 1, 2, 3, 4, 5, 6, 7, 78, 141] {
            assert_eq!(
                EXIT_CODES.iter().filter(|(c, _)| *c == code).count(),
                1,
                "{code}"
            );
            assert!(text.contains(&format!("  {code} ")), "{text}");
        }
        for code in [
            EXIT_NOT_FOUND,
            EXIT_AUTH,
            EXIT_INVALID,
            EXIT_TIMEOUT,
            EXIT_USAGE,
            EXIT_AUDIT_BROKEN,
        ] {
            assert!(EXIT_CODES.iter().any(|(c, _)| *c == code), "{code}");
        }
    }
}
