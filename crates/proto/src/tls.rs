//! Trusting a controller's certificate: by pin, by a CA file, and advice when it fails.
//!
//! A controller with no certificate of its own makes a private CA (`jitgate serve`
//! prints its SHA-256 fingerprint) and serves the chain *server certificate, CA*. A
//! client trusts it in one of three ways, all through [`PinnedVerifier`]:
//!
//! - a **fingerprint** (from an enrollment token, or `--ca-fingerprint`): a certificate
//!   the controller sends whose SHA-256 equals the pin becomes the trust anchor, and
//!   the server certificate must chain to it and name the host (as `kubeadm join`
//!   pins a cluster CA by its hash);
//! - a **PEM file** (`--ca-cert`): its certificates are trust anchors;
//! - either way, a server certificate that *is* one of the pinned certificates is
//!   accepted as it is, whatever its CA flag or names: the usual
//!   `openssl req -x509` certificate, which webpki alone refuses as a CA used as an
//!   end entity.
//!
//! [`advice`] turns a failed connection's TLS error into a sentence that says what to
//! do.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// A certificate's SHA-256 fingerprint over its DER encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(der).into())
    }

    /// Reads `sha256:<64 hex>`, bare hex, or OpenSSL's colon-separated form
    /// (`AB:CD:...`), in any case.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .or_else(|| t.strip_prefix("sha256 Fingerprint="))
            .or_else(|| t.strip_prefix("SHA256 Fingerprint="))
            .unwrap_or(t);
        let hex_digits: String = t.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&hex_digits).map_err(|_| {
            format!("{text:?} is not a SHA-256 fingerprint (expected sha256:<64 hex digits>)")
        })?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| {
            format!("{text:?} is not a SHA-256 fingerprint (expected 64 hex digits, 32 bytes)")
        })?;
        Ok(Fingerprint(arr))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

/// The separator between an enrollment token and the CA fingerprint it carries:
/// `je_<id>.<secret>#sha256:<hex>`.
pub const PIN_SEPARATOR: char = '#';

/// Splits a token that may carry a CA fingerprint into the token and the pin.
pub fn split_pinned_token(text: &str) -> Result<(&str, Option<Fingerprint>), String> {
    match text.trim().split_once(PIN_SEPARATOR) {
        None => Ok((text.trim(), None)),
        Some((token, pin)) => Ok((token, Some(Fingerprint::parse(pin)?))),
    }
}

/// Parses every certificate of a PEM file's text.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it (expected -----BEGIN CERTIFICATE-----)".to_owned());
    }
    Ok(certs)
}

/// PEM text of one certificate.
pub fn to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Trusts a controller by pinned certificates and fingerprints (see the module).
#[derive(Debug)]
pub struct PinnedVerifier {
    anchors: Vec<CertificateDer<'static>>,
    pins: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    pub fn new(anchors: Vec<CertificateDer<'static>>, pins: Vec<Fingerprint>) -> Self {
        PinnedVerifier {
            anchors,
            pins,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    fn pinned(&self, der: &CertificateDer<'_>) -> bool {
        self.anchors.iter().any(|a| a.as_ref() == der.as_ref())
            || self.pins.contains(&Fingerprint::of(der))
    }

    /// A rustls client configuration that trusts only this verifier.
    pub fn client_config(self) -> Result<rustls::ClientConfig, rustls::Error> {
        let provider = self.provider.clone();
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(self))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The error a pin mismatch reports (recognised by [`advice`]).
pub const PIN_MISMATCH: &str = "no certificate the controller sent matches the pinned CA";

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The server's own certificate, pinned exactly: nothing more to check.
        if self.pinned(end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        let mut roots = RootCertStore::empty();
        for a in &self.anchors {
            // A certificate webpki cannot use as an anchor can still match exactly.
            let _ = roots.add(a.clone());
        }
        for c in intermediates {
            if self.pins.contains(&Fingerprint::of(c)) {
                roots
                    .add(c.clone().into_owned())
                    .map_err(|e| rustls::Error::General(format!("pinned CA: {e}")))?;
            }
        }
        if roots.is_empty() {
            return Err(rustls::Error::General(format!(
                "{PIN_MISMATCH} ({})",
                self.pins
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Accepts any certificate and remembers the chain it was shown: only for *looking*
/// at a controller's certificate before deciding to trust it (`jitgate login`). Never
/// send a credential over a connection made with it.
#[derive(Debug)]
pub struct ChainRecorder {
    seen: std::sync::Mutex<Vec<CertificateDer<'static>>>,
    inner: PinnedVerifier,
}

impl Default for ChainRecorder {
    fn default() -> Self {
        ChainRecorder {
            seen: std::sync::Mutex::new(Vec::new()),
            inner: PinnedVerifier::new(Vec::new(), Vec::new()),
        }
    }
}

impl ChainRecorder {
    /// The chain the server sent, server certificate first.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, rustls::Error> {
        let mut config = rustls::ClientConfig::builder_with_provider(self.inner.provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl ServerCertVerifier for ChainRecorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = std::iter::once(end_entity)
                .chain(intermediates)
                .map(|c| c.clone().into_owned())
                .collect();
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Finds the rustls error inside a failed connection's error chain (`io::Error`
/// hides its inner error from `source()`, so it is opened by hand).
fn find_rustls<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = find_rustls(inner)
        {
            return Some(r);
        }
        cur = e.source();
    }
    None
}

fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        parts.push(e.to_string());
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            parts.push(inner.to_string());
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// What to do about a connection to `url` that failed with `err`, when the cause is
/// TLS (or plain HTTP against TLS, or the reverse); `None` for other failures.
pub fn advice(err: &(dyn std::error::Error + 'static), url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok();
    // `host:port` for the message, and the bare host (no IPv6 brackets) for --tls-san.
    let host = parsed
        .as_ref()
        .map(|u| match u.port() {
            Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
            None => u.host_str().unwrap_or_default().to_owned(),
        })
        .unwrap_or_else(|| url.to_owned());
    let host_only = parsed
        .as_ref()
        .and_then(|u| u.host_str())
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let trust = "give --ca-cert FILE (the controller's CA, or its self-signed certificate) or --ca-fingerprint sha256:... (printed by `jitgate serve`, also carried by enrollment tokens)";
    if let Some(r) = find_rustls(err) {
        return Some(match r {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => {
                    let presented = match c {
                        CertificateError::NotValidForNameContext { presented, .. } => {
                            format!(" (it names {})", presented.join(", "))
                        }
                        _ => String::new(),
                    };
                    format!(
                        "the controller's certificate has no name for {host_only}{presented}: connect with a name it has, or restart `jitgate serve` with `--tls-san {host_only}` (its own CA issues a new certificate), or issue a certificate with that subject alternative name"
                    )
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the controller's certificate has expired: renew it (`jitgate serve` renews its own certificate at start; for a given --tls-cert, issue a new one)".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the controller's certificate is not valid yet: check this machine's clock".to_owned()
                }
                CertificateError::UnknownIssuer => format!(
                    "the controller's certificate is not signed by a CA this machine trusts: {trust}, or run `jitgate login {url}` to check and pin it"
                ),
                CertificateError::BadEncoding => format!(
                    "the controller's certificate cannot be used as it is (for example a CA certificate serving as the server's own): pin that exact certificate with --ca-cert FILE; {trust}"
                ),
                other => format!("the controller's certificate was refused ({other:?}): {trust}"),
            },
            rustls::Error::General(m) if m.starts_with(PIN_MISMATCH) => format!(
                "{m}: the controller at {url} is not the one the fingerprint names (an enrollment token or --ca-fingerprint from another controller, or someone in between); check the fingerprint `jitgate serve` printed"
            ),
            rustls::Error::InvalidMessage(_) => format!(
                "{url} does not speak TLS: the controller serves plain HTTP there (use http:// on loopback, or give the controller a certificate)"
            ),
            other => format!("TLS with {url} failed: {other}"),
        });
    }
    let text = chain_text(err).to_ascii_lowercase();
    if url.starts_with("http://")
        && (text.contains("connection closed before message completed")
            || text.contains("connection reset")
            || text.contains("invalid http version")
            || text.contains("error parsing")
            || text.contains("parse"))
    {
        return Some(format!(
            "the controller at {url} did not answer plain HTTP: it probably serves HTTPS, use https://{host}"
        ));
    }
    if text.contains("invalid peer certificate") || text.contains("certificate") {
        return Some(format!("the controller's certificate was refused: {trust}"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_every_usual_spelling() {
        let fp = Fingerprint::of(b"x");
        let hexed = hex::encode(fp.0);
        let colons =
            fp.0.iter()
                .map(|b| format!("{b:02X}"))
                .collect::<Vec<_>>()
                .join(":");
        for text in [
            fp.to_string(),
            hexed.clone(),
            hexed.to_uppercase(),
            colons.clone(),
            format!("SHA256 Fingerprint={colons}"),
        ] {
            assert_eq!(Fingerprint::parse(&text), Ok(fp), "{text}");
        }
        for bad in [
            "",
            "sha256:",
            "sha256:zz",
            "sha256:abcd",
            &format!("{hexed}00"),
        ] {
            assert!(Fingerprint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_token_may_carry_a_pin() {
        let fp = Fingerprint::of(b"ca");
        let joined = format!("je_1.abc{PIN_SEPARATOR}{fp}");
        assert_eq!(split_pinned_token(&joined), Ok(("je_1.abc", Some(fp))));
        assert_eq!(split_pinned_token("je_1.abc\n"), Ok(("je_1.abc", None)));
        assert!(split_pinned_token("je_1.abc#sha256:12").is_err());
    }

    #[test]
    fn pem_round_trips() {
        let der: Vec<u8> = (0u8..=200).collect();
        let pem = to_pem(&der);
        let back = certs_from_pem(pem.as_bytes()).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].as_ref(), der.as_slice());
        assert!(certs_from_pem(b"nothing").is_err());
    }
}
