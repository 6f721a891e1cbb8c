//! Onboarding in one line: the controller serves its own binary (the agent is the same
//! binary) and an install script, and `POST /api/v1/enrollTokens` with `install` makes
//! the line a machine runs:
//!
//! ```text
//! curl -fsS --insecure --pinnedpubkey 'sha256//<key>' 'https://ctl:8443/install.sh?code=<code>' | sudo sh
//! ```
//!
//! curl checks the controller's public key against the pin before sending anything
//! (no CA file on the machine; `--insecure` only drops the CA check the pin replaces).
//! A fetch with the code exchanges it for the enrollment token, which is written into
//! that script: it reaches the machine through the pipe and a file of mode 0600,
//! never a command line another user could see in `ps`. A code gives the token as
//! many times as the token has uses (once by default: then the code seen in `ps` is
//! already spent). The database keeps
//! only the code's hash and the token sealed under a key derived from the code
//! (ChaCha20-Poly1305), so its file does not give the token away. A fetch with a spent
//! code gets the script without a token: run again on an enrolled machine it changes
//! nothing.
//!
//! The script (`install.sh`, with the controller's values filled in) downloads the
//! binary over the same pinned connection and checks it against the SHA-256 the
//! controller computed of it before installing anything.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use jitgate_store::{AuditCtx, InstallCodeRecord};
use ring::aead;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::auth::CallerIp;
use crate::error::{ApiError, ApiResult};

/// Where the script is served.
pub const SCRIPT_PATH: &str = "/install.sh";

/// The architecture of this build, as Debian names it.
pub const ARCH: &str = jitgate_proto::ARCH;

pub use jitgate_proto::binary_path;

/// Paths anyone may fetch: the script and the binary with its checksum.
pub fn is_public(path: &str) -> bool {
    path == SCRIPT_PATH
        || path
            .strip_prefix(&binary_path())
            .is_some_and(|rest| rest.is_empty() || rest == ".sha256")
}

/// The binary the controller serves as the agent, and its SHA-256, computed on first
/// use and kept: a file changed on disk afterwards no longer matches what install
/// scripts announce, and they refuse it.
pub struct AgentBinary {
    path: PathBuf,
    sha256: tokio::sync::OnceCell<String>,
    downloads: Arc<Mutex<Downloads>>,
}

/// At most this many downloads of the binary at once from one address...
pub const DOWNLOADS_PER_SOURCE: usize = 2;
/// ...and in all (anyone may download it: this bounds what a flood costs). The
/// install script retries a refused download.
pub const DOWNLOADS_IN_ALL: usize = 32;

/// The downloads under way, per source address.
#[derive(Default)]
struct Downloads {
    per_source: HashMap<IpAddr, usize>,
    total: usize,
}

/// One download under way; its place is given back when the body ends or the client
/// goes away.
struct Slot {
    ip: IpAddr,
    downloads: Arc<Mutex<Downloads>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut d = self.downloads.lock().unwrap_or_else(|p| p.into_inner());
        d.total = d.total.saturating_sub(1);
        if let Some(n) = d.per_source.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                d.per_source.remove(&self.ip);
            }
        }
    }
}

impl AgentBinary {
    pub fn new(path: PathBuf) -> Self {
        AgentBinary {
            path,
            sha256: tokio::sync::OnceCell::new(),
            downloads: Arc::default(),
        }
    }

    /// A place for a download from `ip`, unless the limits are reached.
    fn slot(&self, ip: IpAddr) -> Option<Slot> {
        let mut d = self.downloads.lock().unwrap_or_else(|p| p.into_inner());
        let mine = d.per_source.get(&ip).copied().unwrap_or(0);
        if mine >= DOWNLOADS_PER_SOURCE || d.total >= DOWNLOADS_IN_ALL {
            return None;
        }
        d.per_source.insert(ip, mine + 1);
        d.total += 1;
        Some(Slot {
            ip,
            downloads: self.downloads.clone(),
        })
    }

    async fn sha256(&self) -> ApiResult<String> {
        let path = self.path.clone();
        self.sha256
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || sha256_file(&path))
                    .await
                    .map_err(ApiError::internal)?
            })
            .await
            .cloned()
    }
}

fn sha256_file(path: &Path) -> ApiResult<String> {
    let mut f = std::fs::File::open(path).map_err(|e| {
        ApiError::internal(format!(
            "cannot read the agent binary {}: {e}",
            path.display()
        ))
    })?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(ApiError::internal)?;
    Ok(hex::encode(h.finalize()))
}

/// A new install code (43 URL-safe characters, 256 bits) and its lookup hash.
pub fn new_code() -> (String, String) {
    let bytes: [u8; 32] = rand::random();
    let code = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = code_hash(&code);
    (code, hash)
}

/// How a code is looked up: a hash with its own label, apart from the sealing key.
pub fn code_hash(code: &str) -> String {
    hex::encode(Sha256::digest(format!("jitgate install code id\0{code}")))
}

fn sealing_key(code: &str) -> aead::LessSafeKey {
    let k = Sha256::digest(format!("jitgate install code key\0{code}"));
    // A 32-byte key is what ChaCha20-Poly1305 takes: this cannot fail.
    #[allow(clippy::expect_used)]
    let unbound = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &k).expect("a 32-byte key");
    aead::LessSafeKey::new(unbound)
}

/// What a code delivers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sealed {
    pub token: String,
    pub resource_group: String,
}

/// `what` sealed under the code (each code seals once, so a fixed nonce is safe).
pub fn seal(code: &str, what: &Sealed) -> String {
    let mut data = serde_json::to_vec(what).unwrap_or_default();
    let nonce = aead::Nonce::assume_unique_for_key([0; 12]);
    match sealing_key(code).seal_in_place_append_tag(nonce, aead::Aad::empty(), &mut data) {
        Ok(()) => hex::encode(data),
        Err(_) => String::new(),
    }
}

/// What `sealed` holds, if `code` opens it.
pub fn open(code: &str, sealed: &str) -> Option<Sealed> {
    let mut data = hex::decode(sealed).ok()?;
    let nonce = aead::Nonce::assume_unique_for_key([0; 12]);
    let plain = sealing_key(code)
        .open_in_place(nonce, aead::Aad::empty(), &mut data)
        .ok()?;
    serde_json::from_slice(plain).ok()
}

/// The controller's public key as curl pins it: `sha256//<base64 of the SHA-256 of the
/// certificate's SubjectPublicKeyInfo>`, from the first certificate of a PEM chain.
pub fn curl_pin(cert_pem: &Path) -> anyhow::Result<String> {
    let pem = std::fs::read(cert_pem)?;
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", cert_pem.display()))?;
    let cert = p
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert_pem.display()))?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    Ok(format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(spki))
    ))
}

/// The controller's URL as the caller reached it (`Host`, or the authority of an
/// HTTP/2 request), for the line and the script: only a host name or address with an
/// optional port is taken, since it is written into a shell script.
pub fn base_url(state: &AppState, headers: &HeaderMap, uri: &Uri) -> ApiResult<String> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !ok {
        return Err(ApiError::bad_param(
            "Host",
            "the Host header is not a host name or address with a port",
        ));
    }
    let scheme = if state.tls { "https" } else { "http" };
    Ok(format!("{scheme}://{host}"))
}

/// The pin for the line and the script: None without TLS.
fn pin(state: &AppState) -> ApiResult<Option<String>> {
    match &state.tls_cert {
        Some(path) => curl_pin(path).map(Some).map_err(ApiError::internal),
        None => Ok(None),
    }
}

/// The code to keep with a new enrollment token and the line that uses it.
pub fn make_line(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    token_id: &str,
    sealed: &Sealed,
    expires: jiff::Timestamp,
    uses_left: u32,
) -> ApiResult<(InstallCodeRecord, jitgate_proto::api::InstallLine)> {
    let base = base_url(state, headers, uri)?;
    let pin = pin(state)?;
    let (code, code_hash) = new_code();
    let url = format!("{base}{SCRIPT_PATH}?code={code}");
    let command = match &pin {
        Some(p) => format!("curl -fsS --insecure --pinnedpubkey '{p}' '{url}' | sudo sh"),
        None => format!("curl -fsS '{url}' | sudo sh"),
    };
    Ok((
        InstallCodeRecord {
            code_hash,
            token_id: token_id.to_owned(),
            sealed: seal(&code, sealed),
            expires,
            uses_left,
        },
        jitgate_proto::api::InstallLine {
            command,
            url,
            expires_at: expires.to_string(),
            pinned_public_key: pin,
        },
    ))
}

/// A value written into the script, single-quoted for `sh`.
fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The script with this controller's values.
pub fn render(
    controller: &str,
    pin: Option<&str>,
    sha256: &str,
    delivered: Option<&Sealed>,
) -> String {
    const TEMPLATE: &str = include_str!("install.sh");
    const AGENT_UNIT: &str = include_str!("../../../deploy/jitgate-agent.service");
    const RESTORE_UNIT: &str = include_str!("../../../deploy/jitgate-agent-restore.service");
    TEMPLATE
        .replace("@AGENT_UNIT@", AGENT_UNIT.trim_end())
        .replace("@RESTORE_UNIT@", RESTORE_UNIT.trim_end())
        .replace("@CONTROLLER@", &quoted(controller))
        .replace("@PIN@", &quoted(pin.unwrap_or("")))
        .replace("@SHA256@", &quoted(sha256))
        .replace("@ARCH@", &quoted(ARCH))
        .replace(
            "@RESOURCE_GROUP@",
            &quoted(delivered.map_or("", |d| d.resource_group.as_str())),
        )
        .replace(
            "@TOKEN@",
            &quoted(delivered.map_or("", |d| d.token.as_str())),
        )
}

#[derive(Deserialize)]
pub struct ScriptQuery {
    code: Option<String>,
}

fn no_store(content_type: &'static str) -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-store"),
    ]
}

/// `GET /install.sh?code=<code>`: the install script; with an unused, unexpired code
/// it carries that code's enrollment token (once).
pub async fn script(
    State(state): State<AppState>,
    CallerIp(ip): CallerIp,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<ScriptQuery>,
) -> ApiResult<Response> {
    let controller = base_url(&state, &headers, &uri)?;
    let binary = state
        .agent_binary
        .as_ref()
        .ok_or_else(|| ApiError::internal("this controller serves no agent binary"))?;
    let sha256 = binary.sha256().await?;
    let pin = pin(&state)?;
    let mut delivered = None;
    if let Some(code) = q.code.as_deref().filter(|c| c.len() <= 128) {
        let audit = AuditCtx {
            actor: "install-code".to_owned(),
            source: ip.to_string(),
            now: state.clock.now(),
        };
        if let Some(rec) = state
            .store
            .take_install_code(&code_hash(code), audit)
            .await?
        {
            delivered = open(code, &rec.sealed);
            if delivered.is_none() {
                tracing::warn!(token = %rec.token_id, "an install code's sealed token does not open");
            }
        }
    }
    let text = render(&controller, pin.as_deref(), &sha256, delivered.as_ref());
    Ok((
        StatusCode::OK,
        no_store("text/x-shellscript; charset=utf-8"),
        text,
    )
        .into_response())
}

/// `GET /download/jitgate-linux-<arch>.sha256`: the checksum, as `sha256sum` prints it.
pub async fn checksum(State(state): State<AppState>) -> ApiResult<Response> {
    let binary = state
        .agent_binary
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this controller serves no agent binary"))?;
    let sum = binary.sha256().await?;
    Ok((
        StatusCode::OK,
        no_store("text/plain; charset=utf-8"),
        format!("{sum}  jitgate-linux-{ARCH}\n"),
    )
        .into_response())
}

/// `GET /download/jitgate-linux-<arch>`: the binary, streamed from disk; 429 past
/// [`DOWNLOADS_PER_SOURCE`] or [`DOWNLOADS_IN_ALL`] downloads under way.
pub async fn download(
    State(state): State<AppState>,
    CallerIp(ip): CallerIp,
) -> ApiResult<Response> {
    use tokio::io::AsyncReadExt as _;
    let binary = state
        .agent_binary
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this controller serves no agent binary"))?;
    let Some(slot) = binary.slot(ip) else {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            "too many downloads of the agent at once; try again shortly",
        );
        e.retry_after = Some(2);
        return Err(e);
    };
    let file = tokio::fs::File::open(&binary.path)
        .await
        .map_err(ApiError::internal)?;
    let len = file.metadata().await.map_err(ApiError::internal)?.len();
    // The slot lives as long as the body (dropped with it, read to the end or not).
    let chunks = futures_util::stream::unfold((Some(file), slot), |(file, slot)| async move {
        let mut file = file?;
        let mut buf = vec![0u8; 256 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::from(buf)),
                    (Some(file), slot),
                ))
            }
            Err(e) => Some((Err(e), (None, slot))),
        }
    });
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        axum::body::Body::from_stream(chunks),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_code_opens_its_own_seal_only() {
        let what = Sealed {
            token: "je_abc.def#sha256:00".into(),
            resource_group: "prod-web".into(),
        };
        let (code, hash) = new_code();
        assert_eq!(code.len(), 43);
        assert_eq!(hash, code_hash(&code));
        let sealed = seal(&code, &what);
        assert!(!sealed.contains("je_abc"), "the token is not in clear");
        assert_eq!(open(&code, &sealed), Some(what.clone()));
        let (other, _) = new_code();
        assert_eq!(open(&other, &sealed), None);
        // A changed byte fails the tag.
        let mut bad = sealed.clone().into_bytes();
        bad[0] = if bad[0] == b'0' { b'1' } else { b'0' };
        assert_eq!(open(&code, &String::from_utf8(bad).unwrap()), None);
        assert_ne!(code_hash(&code), code_hash(&other));
    }

    #[test]
    fn values_are_quoted_for_the_shell() {
        let d = Sealed {
            token: "t".into(),
            resource_group: "rg'; rm -rf /; '".into(),
        };
        let s = render("https://ctl:8443", Some("sha256//abc="), "00ff", Some(&d));
        assert!(
            s.contains("RESOURCE_GROUP='rg'\\''; rm -rf /; '\\'''"),
            "{s}"
        );
        assert!(s.contains("CONTROLLER='https://ctl:8443'"));
        assert!(s.contains("PIN='sha256//abc='"));
        assert!(s.contains("[Install]"), "the units are in the script");
        assert!(!s.contains("@TOKEN@") && !s.contains("@AGENT_UNIT@"));
        let none = render("http://127.0.0.1:8080", None, "00", None);
        assert!(none.contains("TOKEN=''") && none.contains("PIN=''"));
    }

    #[test]
    fn only_the_script_and_the_binary_are_public() {
        assert!(is_public("/install.sh"));
        assert!(is_public(&binary_path()));
        assert!(is_public(&format!("{}.sha256", binary_path())));
        assert!(!is_public("/download/other"));
        assert!(!is_public(&format!("{}x", binary_path())));
    }
}
