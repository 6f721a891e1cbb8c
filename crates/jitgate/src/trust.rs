//! `jitgate login`'s first contact with a controller over HTTPS: when this machine
//! does not already trust its certificate, show the fingerprint of the certificate to
//! pin (the controller's own CA) and ask once, or check it against
//! `--ca-fingerprint`; then keep that certificate next to the login.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use jitgate_proto::tls::{ChainRecorder, Fingerprint};

use crate::usage::{EXIT_TLS, EXIT_USAGE, Exit};

/// The chain the controller at `url` shows, server certificate first. No credential
/// is sent on this connection.
async fn look(url: &str) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let recorder = Arc::new(ChainRecorder::default());
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .tls_backend_preconfigured(recorder.client_config()?)
        .build()
        .context("cannot build the HTTP client")?;
    http.get(format!("{url}/api/v1/health"))
        .send()
        .await
        .map_err(|e| match jitgate_proto::tls::advice(&e, url) {
            Some(a) => Exit::err(EXIT_TLS, a),
            None => anyhow::Error::new(e).context(format!("cannot reach the controller at {url}")),
        })?;
    let chain = recorder.chain();
    if chain.is_empty() {
        return Err(Exit::err(EXIT_TLS, format!("{url} showed no certificate")));
    }
    Ok(chain)
}

/// Whether this machine's own trust roots accept the controller's certificate.
async fn trusted_by_system(url: &str) -> bool {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Ok(http) = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
    else {
        return false;
    };
    http.get(format!("{url}/api/v1/health"))
        .send()
        .await
        .is_ok()
}

fn describe(der: &[u8]) -> String {
    match jitgate_controller::tls::inspect(der) {
        Ok(info) => {
            let until = jiff::Timestamp::from_second(info.not_after)
                .map(|t| t.strftime("%Y-%m-%d").to_string())
                .unwrap_or_default();
            let names = if info.names.is_empty() {
                "no names".to_owned()
            } else {
                info.names.iter().cloned().collect::<Vec<_>>().join(", ")
            };
            format!(
                "{} certificate for {names}, valid until {until}",
                if info.is_ca { "a CA" } else { "a server" }
            )
        }
        Err(_) => "a certificate".to_owned(),
    }
}

/// Asks on the terminal (even when the token came on standard input).
fn confirm(question: &str) -> anyhow::Result<bool> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty");
    let mut tty = match tty {
        Ok(t) if t.is_terminal() => t,
        _ => {
            return Err(Exit::err(
                EXIT_USAGE,
                "cannot ask whether to trust the controller's certificate (no terminal): give --ca-fingerprint sha256:... (printed by `jitgate serve` at start) or --ca-cert FILE",
            ));
        }
    };
    write!(tty, "{question} [y/N] ")?;
    tty.flush()?;
    let mut line = String::new();
    std::io::BufReader::new(&tty).read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes" | "Yes" | "YES"))
}

/// Where the pinned certificate of `url` is kept.
fn pin_file(url: &str) -> anyhow::Result<PathBuf> {
    let dir = crate::config::config_dir()
        .context("cannot find a config directory: set HOME or JITGATE_CONFIG_DIR")?;
    // host and port, as `host_port`, with nothing a file name could misread.
    let host: String = reqwest::Url::parse(url)
        .ok()
        .map(|u| {
            format!(
                "{}_{}",
                u.host_str().unwrap_or_default(),
                u.port_or_known_default().unwrap_or_default()
            )
        })
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(dir.join(format!("ca-{host}.pem")))
}

/// For an `https://` controller this machine does not trust yet: the certificate to
/// pin, checked against `expected` or confirmed by the person; saved, and its path
/// returned. `None` when the system's roots already trust the controller.
pub async fn first_contact(
    url: &str,
    expected: Option<Fingerprint>,
) -> anyhow::Result<Option<PathBuf>> {
    if !url.starts_with("https://") {
        if expected.is_some() {
            return Err(Exit::err(
                EXIT_USAGE,
                format!("--ca-fingerprint pins a TLS certificate, but {url} is not https://"),
            ));
        }
        return Ok(None);
    }
    if expected.is_none() && trusted_by_system(url).await {
        return Ok(None);
    }
    let chain = look(url).await?;
    let chosen = match expected {
        Some(fp) => chain
            .iter()
            .find(|c| Fingerprint::of(c.as_ref()) == fp)
            .ok_or_else(|| {
                Exit::err(
                    EXIT_TLS,
                    format!(
                        "no certificate the controller at {url} shows has the fingerprint {fp} (it shows {}): a different controller, or someone in between; check the fingerprint `jitgate serve` printed",
                        chain
                            .iter()
                            .map(|c| Fingerprint::of(c.as_ref()).to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?
            .clone(),
        None => {
            // The top of the chain: the controller's own CA, or a self-signed
            // certificate itself.
            let Some(top) = chain.last().cloned() else {
                return Err(Exit::err(EXIT_TLS, format!("{url} showed no certificate")));
            };
            let fp = Fingerprint::of(top.as_ref());
            eprintln!(
                "The controller at {url} uses a certificate this machine does not trust yet:\n  {}\n  fingerprint {fp}\nCompare the fingerprint with the one `jitgate serve` printed at start (on the controller: `openssl x509 -noout -fingerprint -sha256 -in <data-dir>/tls/ca.pem`).",
                describe(top.as_ref())
            );
            if !confirm("Trust it for this login?")? {
                return Err(Exit::err(
                    EXIT_TLS,
                    "not trusted: nothing saved. Check the fingerprint, then log in again (or give --ca-fingerprint)",
                ));
            }
            top
        }
    };
    let path = pin_file(url)?;
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&path, jitgate_proto::tls::to_pem(chosen.as_ref()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "pinned {} (saved in {})",
        Fingerprint::of(chosen.as_ref()),
        path.display()
    );
    Ok(Some(path))
}
