//! The controller's certificates: its own private CA when none is given, and a check
//! of a given one.
//!
//! With no `--tls-cert` on a non-loopback address (or with `--auto-tls`), the
//! controller keeps a private CA in `<data-dir>/tls/` (key mode 0600, ten years) and a
//! server certificate signed by it (90 days, renewed when less than 30 are left, or
//! when the names it must carry change) with subject alternative names for the listen
//! address (every local address when listening on all of them), the hostname,
//! `localhost` and each `--tls-san`. It serves the chain *server certificate, CA*, so a
//! client that pins the CA's SHA-256 fingerprint (printed at start, carried by
//! enrollment tokens) can verify the server with nothing else copied.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use jitgate_proto::tls::Fingerprint;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::checkpoint::create_secret_file;
use crate::server::TlsFiles;

pub const TLS_DIR: &str = "tls";
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
const SERVER_CHAIN: &str = "server.pem";
const SERVER_KEY: &str = "server-key.pem";

/// A server certificate lives this long ...
const SERVER_DAYS: i64 = 90;
/// ... and is renewed when fewer days than this are left.
pub const RENEW_DAYS: i64 = 30;
const CA_DAYS: i64 = 3650;

/// What the controller serves and the fingerprint clients pin.
#[derive(Debug, Clone)]
pub struct Served {
    pub files: TlsFiles,
    /// SHA-256 of the last certificate of the served chain: the private CA, or for a
    /// given certificate the top of its chain (the certificate itself when
    /// self-signed).
    pub pin: Fingerprint,
    /// The certificate was made by the controller (and is renewed by it).
    pub auto: bool,
}

/// A subject alternative name given with `--tls-san`: an IP address or a DNS name.
pub fn parse_san(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.parse::<IpAddr>().is_ok() {
        return Ok(t.to_owned());
    }
    let ok = !t.is_empty()
        && t.len() <= 253
        && t.split('.').all(|label| {
            let l = label.strip_prefix("*").unwrap_or(label);
            (!l.is_empty() || label == "*")
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(t.to_ascii_lowercase())
    } else {
        Err(format!(
            "--tls-san {text:?} is neither an IP address nor a DNS name"
        ))
    }
}

/// The names the server certificate must carry.
pub fn wanted_names(listen: SocketAddr, extra: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    names.insert("localhost".to_owned());
    names.insert("127.0.0.1".to_owned());
    names.insert("::1".to_owned());
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
        && parse_san(h).is_ok()
    {
        names.insert(h.to_ascii_lowercase());
    }
    if listen.ip().is_unspecified() {
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                let Some(sa) = a.address else { continue };
                let ip = if let Some(v4) = sa.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    let ip = v6.ip();
                    // Link-local addresses need a scope and are no name to connect to.
                    if (ip.segments()[0] & 0xffc0) == 0xfe80 {
                        continue;
                    }
                    IpAddr::V6(ip)
                } else {
                    continue;
                };
                names.insert(ip.to_string());
            }
        }
    } else {
        names.insert(listen.ip().to_string());
    }
    names.extend(extra.iter().cloned());
    names
}

fn write_public(path: &Path, text: &str) -> anyhow::Result<()> {
    // Written whole, then renamed over the old file: a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    create_secret_file(&tmp, text.as_bytes())?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn read(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn now_offset() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "jitgate".to_owned())
}

/// Loads the private CA, or creates it at first start.
fn ca(dir: &Path) -> anyhow::Result<(String, KeyPair)> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if let (Some(cert), Some(key)) = (read(&cert_path)?, read(&key_path)?) {
        let key = KeyPair::from_pem(&key)
            .with_context(|| format!("{} is not a private key", key_path.display()))?;
        return Ok((cert, key));
    }
    if cert_path.exists() || key_path.exists() {
        bail!(
            "{} holds only half of the controller's CA (certificate and key are both needed); move the directory aside to make a new CA (agents and logins then pin the new fingerprint)",
            dir.display()
        );
    }
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(
        DnType::CommonName,
        format!("jitgate controller CA ({})", hostname()),
    );
    p.distinguished_name
        .push(DnType::OrganizationName, "jitgate");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = now_offset();
    p.not_before = now - time_days(1);
    p.not_after = now + time_days(CA_DAYS);
    let cert = p
        .self_signed(&key)
        .context("cannot sign the CA certificate")?;
    create_secret_file(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, &cert.pem())?;
    tracing::info!(dir = %dir.display(), "created the controller's private CA");
    Ok((cert.pem(), key))
}

fn time_days(days: i64) -> time::Duration {
    time::Duration::days(days)
}

/// Why the current server certificate must be replaced, if it must.
fn needs_new(chain: Option<&str>, ca_pem: &str, wanted: &BTreeSet<String>) -> Option<String> {
    let Some(chain) = chain else {
        return Some("there is none yet".to_owned());
    };
    let certs = match jitgate_proto::tls::certs_from_pem(chain.as_bytes()) {
        Ok(c) if c.len() == 2 => c,
        _ => return Some("the file does not hold a server certificate and its CA".to_owned()),
    };
    let ca = jitgate_proto::tls::certs_from_pem(ca_pem.as_bytes()).ok();
    if ca.as_ref().and_then(|c| c.first()).map(|c| c.as_ref()) != Some(certs[1].as_ref()) {
        return Some("it was issued by another CA".to_owned());
    }
    let info = match inspect(certs[0].as_ref()) {
        Ok(i) => i,
        Err(e) => return Some(format!("it cannot be read: {e}")),
    };
    let left = info.not_after - jiff::Timestamp::now().as_second();
    if left < RENEW_DAYS * 86400 {
        return Some(format!("it expires in {} days", left / 86400));
    }
    let missing: Vec<&String> = wanted.iter().filter(|n| !info.names.contains(*n)).collect();
    if !missing.is_empty() {
        return Some(format!("it has no name for {missing:?}"));
    }
    None
}

/// Makes sure the controller's own CA and a current server certificate exist in
/// `data_dir/tls`; returns what to serve.
pub fn ensure_auto(
    data_dir: &Path,
    listen: SocketAddr,
    extra_sans: &[String],
) -> anyhow::Result<Served> {
    let dir = data_dir.join(TLS_DIR);
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let (ca_pem, ca_key) = ca(&dir)?;
    let ca_der = jitgate_proto::tls::certs_from_pem(ca_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(CA_CERT).display()))?;
    let pin = Fingerprint::of(ca_der[0].as_ref());
    let wanted = wanted_names(listen, extra_sans);
    let (chain_path, key_path) = (dir.join(SERVER_CHAIN), dir.join(SERVER_KEY));
    let current = read(&chain_path)?;
    let reason = if key_path.exists() {
        needs_new(current.as_deref(), &ca_pem, &wanted)
    } else {
        Some("its key is missing".to_owned())
    };
    if let Some(reason) = reason {
        let key = KeyPair::generate().context("cannot generate the server key")?;
        let mut p = CertificateParams::default();
        p.subject_alt_names = wanted
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .context("a subject alternative name is not valid")?;
        p.distinguished_name.push(DnType::CommonName, hostname());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let now = now_offset();
        p.not_before = now - time_days(1);
        p.not_after = now + time_days(SERVER_DAYS);
        let issuer =
            Issuer::from_ca_cert_pem(&ca_pem, &ca_key).context("cannot use the controller's CA")?;
        let cert = p
            .signed_by(&key, &issuer)
            .context("cannot sign the server certificate")?;
        let _ = std::fs::remove_file(&key_path);
        create_secret_file(&key_path, key.serialize_pem().as_bytes())?;
        write_public(&chain_path, &format!("{}{}", cert.pem(), ca_pem))?;
        tracing::info!(names = ?wanted, days = SERVER_DAYS, why = %reason, "issued a new server certificate from the controller's CA");
    }
    Ok(Served {
        files: TlsFiles {
            cert: chain_path,
            key: key_path,
        },
        pin,
        auto: true,
    })
}

/// What the controller needs to know about a certificate.
pub struct CertInfo {
    /// Unix seconds.
    pub not_after: i64,
    pub not_before: i64,
    /// DNS names and IP addresses (as text) of its subject alternative names.
    pub names: BTreeSet<String>,
    pub is_ca: bool,
}

pub fn inspect(der: &[u8]) -> anyhow::Result<CertInfo> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    let mut names = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => {
                    names.insert(d.to_ascii_lowercase());
                }
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default()),
                        16 => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default()),
                        _ => continue,
                    };
                    names.insert(ip.to_string());
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        not_after: cert.validity().not_after.timestamp(),
        not_before: cert.validity().not_before.timestamp(),
        names,
        is_ca: cert.is_ca(),
    })
}

/// Checks a certificate given with `--tls-cert` and returns the warnings, each saying
/// how to fix it (the controller serves anyway: the operator may know better).
pub fn check_given(files: &TlsFiles, listen: SocketAddr) -> anyhow::Result<(Served, Vec<String>)> {
    let pem = std::fs::read(&files.cert)
        .with_context(|| format!("cannot read the TLS certificate {}", files.cert.display()))?;
    let chain = jitgate_proto::tls::certs_from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: {e}", files.cert.display()))?;
    let leaf = inspect(chain[0].as_ref())
        .with_context(|| format!("{} (its first certificate)", files.cert.display()))?;
    let mut warnings = Vec::new();
    let now = jiff::Timestamp::now().as_second();
    let cert = files.cert.display();
    if leaf.not_after < now {
        warnings.push(format!(
            "the TLS certificate {cert} expired {} days ago: clients refuse it; issue a new one (or remove --tls-cert/--tls-key to let the controller run its own CA)",
            (now - leaf.not_after) / 86400
        ));
    } else if leaf.not_after - now < RENEW_DAYS * 86400 {
        warnings.push(format!(
            "the TLS certificate {cert} expires in {} days: renew it before then",
            (leaf.not_after - now) / 86400
        ));
    }
    if leaf.not_before > now {
        warnings.push(format!(
            "the TLS certificate {cert} is not valid yet: check the clock"
        ));
    }
    let ip = listen.ip();
    if !ip.is_unspecified() && !leaf.names.contains(&ip.to_string()) {
        warnings.push(format!(
            "the TLS certificate {cert} has no subject alternative name for the listen address {ip} (it names {:?}): clients connecting to https://{listen} refuse it; issue one with `-addext subjectAltName=IP:{ip}`, or remove --tls-cert/--tls-key to let the controller run its own CA",
            leaf.names
        ));
    }
    if leaf.names.is_empty() {
        warnings.push(format!(
            "the TLS certificate {cert} has no subject alternative names at all: most clients refuse it (the common name is not used); issue one with `-addext subjectAltName=IP:...,DNS:...`"
        ));
    }
    if leaf.is_ca && chain.len() == 1 {
        warnings.push(format!(
            "the TLS certificate {cert} is a self-signed CA certificate: jitgate's CLI and agents accept it only pinned (--ca-cert {cert} or the fingerprint below)"
        ));
    }
    let pin = Fingerprint::of(chain.last().map(|c| c.as_ref()).unwrap_or_default());
    Ok((
        Served {
            files: files.clone(),
            pin,
            auto: false,
        },
        warnings,
    ))
}

/// Where the auto CA's certificate is, for `jitgate serve`'s message.
pub fn ca_cert_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TLS_DIR).join(CA_CERT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_own_ca_is_made_once_and_the_server_certificate_follows_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "10.9.8.7:8443".parse().unwrap();
        let first = ensure_auto(dir.path(), listen, &[]).unwrap();
        for f in [CA_CERT, CA_KEY, SERVER_CHAIN, SERVER_KEY] {
            assert_eq!(mode(&dir.path().join(TLS_DIR).join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&dir.path().join(TLS_DIR)), 0o700);
        let chain = std::fs::read(&first.files.cert).unwrap();
        let certs = jitgate_proto::tls::certs_from_pem(&chain).unwrap();
        assert_eq!(certs.len(), 2, "server certificate, then the CA");
        assert_eq!(Fingerprint::of(certs[1].as_ref()), first.pin);
        let leaf = inspect(certs[0].as_ref()).unwrap();
        assert!(!leaf.is_ca);
        for n in ["10.9.8.7", "localhost", "127.0.0.1", "::1"] {
            assert!(leaf.names.contains(n), "{n} in {:?}", leaf.names);
        }
        assert!(leaf.not_after - jiff::Timestamp::now().as_second() > 80 * 86400);
        assert!(inspect(certs[1].as_ref()).unwrap().is_ca);

        // A second start keeps both.
        let again = ensure_auto(dir.path(), listen, &[]).unwrap();
        assert_eq!(again.pin, first.pin);
        assert_eq!(std::fs::read(&again.files.cert).unwrap(), chain);

        // A new name: a new server certificate from the same CA.
        let named = ensure_auto(dir.path(), listen, &["jit.example.com".to_owned()]).unwrap();
        assert_eq!(named.pin, first.pin);
        let chain2 = std::fs::read(&named.files.cert).unwrap();
        assert_ne!(chain2, chain);
        let certs2 = jitgate_proto::tls::certs_from_pem(&chain2).unwrap();
        assert!(
            inspect(certs2[0].as_ref())
                .unwrap()
                .names
                .contains("jit.example.com")
        );
    }

    #[test]
    fn a_certificate_close_to_its_end_or_from_another_ca_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "10.9.8.7:8443".parse().unwrap();
        ensure_auto(dir.path(), listen, &[]).unwrap();
        let tls = dir.path().join(TLS_DIR);
        let ca_pem = std::fs::read_to_string(tls.join(CA_CERT)).unwrap();
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(tls.join(CA_KEY)).unwrap()).unwrap();
        let wanted = wanted_names(listen, &[]);
        // Ten days left.
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(wanted.iter().cloned().collect::<Vec<_>>()).unwrap();
        p.not_before = now_offset() - time_days(80);
        p.not_after = now_offset() + time_days(10);
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key).unwrap();
        let short = p.signed_by(&key, &issuer).unwrap();
        let chain = format!("{}{ca_pem}", short.pem());
        assert!(
            needs_new(Some(&chain), &ca_pem, &wanted)
                .unwrap()
                .contains("expires in")
        );
        // Fine otherwise.
        p.not_after = now_offset() + time_days(60);
        let ok = p.signed_by(&key, &issuer).unwrap();
        assert_eq!(
            needs_new(Some(&format!("{}{ca_pem}", ok.pem())), &ca_pem, &wanted),
            None
        );
        // Another CA.
        let other_key = KeyPair::generate().unwrap();
        let mut op = CertificateParams::default();
        op.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other_ca = op.self_signed(&other_key).unwrap();
        let foreign = p
            .signed_by(
                &key,
                &Issuer::from_ca_cert_pem(&other_ca.pem(), &other_key).unwrap(),
            )
            .unwrap();
        assert!(
            needs_new(
                Some(&format!("{}{}", foreign.pem(), other_ca.pem())),
                &ca_pem,
                &wanted
            )
            .unwrap()
            .contains("another CA")
        );
        // Half a CA on disk is an error, never a silent new CA.
        std::fs::remove_file(tls.join(CA_KEY)).unwrap();
        let err = ensure_auto(dir.path(), listen, &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("half of the controller's CA"),
            "{err:#}"
        );
    }

    #[test]
    fn a_given_certificate_is_checked_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        // As `openssl req -x509 -subj /CN=...` makes it: a CA, no names, expired.
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.not_before = now_offset() - time_days(60);
        p.not_after = now_offset() - time_days(2);
        let cert = p.self_signed(&key).unwrap();
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        let (served, warnings) = check_given(&files, "10.88.0.1:8443".parse().unwrap()).unwrap();
        assert_eq!(served.pin, Fingerprint::of(cert.der().as_ref()));
        let all = warnings.join("\n");
        for expected in [
            "expired 2 days ago",
            "no subject alternative name for the listen address 10.88.0.1",
            "subjectAltName=IP:10.88.0.1",
            "self-signed CA certificate",
        ] {
            assert!(all.contains(expected), "{expected:?} in:\n{all}");
        }
        // A good one: no warnings.
        let mut p = CertificateParams::new(vec!["10.88.0.1".to_owned()]).unwrap();
        p.not_after = now_offset() + time_days(200);
        std::fs::write(&files.cert, p.self_signed(&key).unwrap().pem()).unwrap();
        let (_, warnings) = check_given(&files, "10.88.0.1:8443".parse().unwrap()).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn tls_sans_are_addresses_or_dns_names() {
        assert_eq!(parse_san("Jit.Example.com").unwrap(), "jit.example.com");
        assert_eq!(parse_san("10.0.0.1").unwrap(), "10.0.0.1");
        assert_eq!(parse_san("fd00::1").unwrap(), "fd00::1");
        for bad in ["", "a b", "-x.com", "x..com", "http://x", "x_y.com"] {
            assert!(parse_san(bad).is_err(), "{bad}");
        }
    }
}
