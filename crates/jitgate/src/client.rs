//! The client side of the CLI: where the controller is and who we are (flags, then
//! `JITGATE_*` environment, then the file `jitgate login` wrote), an HTTP client for
//! the API, errors with exit codes, and resolving machine names.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cli::ClientArgs;

/// An error that ends the command with a specific exit code.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

/// Exit codes: 1 any other error, 2 usage error, 3 not found or ambiguous, 4 not
/// authenticated or not permitted, 5 refused as invalid, 6 timed out waiting for a
/// port, 7 the audit chain is broken, 8 the controller's certificate does not validate.
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_AUTH: u8 = 4;
pub const EXIT_INVALID: u8 = 5;
pub const EXIT_TIMEOUT: u8 = 6;
/// The controller's certificate does not validate (or TLS is not spoken there).
pub const EXIT_TLS: u8 = 8;
pub use crate::usage::EXIT_USAGE;

/// A plain `http://` URL to an address that is not loopback: a token sent there
/// crosses the network readable.
pub fn cleartext_to_network(url: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    if u.scheme() != "http" {
        return false;
    }
    match u.host() {
        Some(url::Host::Domain(d)) => !d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => !ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => !ip.is_loopback(),
        None => false,
    }
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

/// What `jitgate login` stores (mode 0600).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Saved {
    pub url: Option<String>,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

/// `$JITGATE_CONFIG_DIR`, else `$XDG_CONFIG_HOME/jitgate`, else `~/.config/jitgate`.
pub fn config_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("JITGATE_CONFIG_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(d).join("jitgate"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config").join("jitgate"))
}

pub fn config_file() -> Option<PathBuf> {
    config_dir().map(|d| d.join("config.toml"))
}

pub fn load_saved() -> anyhow::Result<Saved> {
    let Some(path) = config_file() else {
        return Ok(Saved::default());
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("{} is not a valid jitgate config", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

pub fn save(saved: &Saved) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let path =
        config_file().context("cannot find a config directory: set HOME or JITGATE_CONFIG_DIR")?;
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = toml::to_string(saved)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(path)
}

pub struct Client {
    http: reqwest::Client,
    pub base: String,
    token: Option<String>,
}

pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let saved = load_saved()?;
        let url = args
            .url
            .clone()
            .or(saved.url)
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let token = args.token.clone().or(saved.token);
        let ca = args.ca_cert.clone().or(saved.ca_cert);
        Self::build(&url, token, ca.as_deref())
    }

    pub fn build(url: &str, token: Option<String>, ca: Option<&Path>) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder =
            reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(10));
        if let Some(ca) = ca {
            // The file's certificates are trust anchors; the controller's own
            // certificate, if it is one of them, is accepted as it is (pinned).
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let anchors = jitgate_proto::tls::certs_from_pem(&pem)
                .map_err(|e| Exit::err(EXIT_USAGE, format!("--ca-cert {}: {e}", ca.display())))?;
            let verifier = jitgate_proto::tls::PinnedVerifier::new(anchors, Vec::new());
            builder = builder.tls_backend_preconfigured(verifier.client_config()?);
        }
        if token.is_some() && cleartext_to_network(url) {
            eprintln!(
                "warning: sending your token in clear text to {url}, which is not a loopback address: anyone on the path can read and reuse it. Use the controller's https:// URL."
            );
        }
        Ok(Client {
            http: builder.build().context("cannot build the HTTP client")?,
            base: url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<(Value, reqwest::header::HeaderMap)> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp =
            req.send()
                .await
                .map_err(|e| {
                    match jitgate_proto::tls::advice(&e, &self.base) {
                Some(advice) => Exit::err(EXIT_TLS, advice),
                None => anyhow::Error::new(e).context(format!(
                    "cannot reach the controller at {} (check the URL, or run `jitgate login URL`)",
                    self.base
                )),
            }
                })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            let msg = body["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| body.to_string());
            return Err(match status.as_u16() {
                401 => Exit::err(
                    EXIT_AUTH,
                    format!(
                        "not authenticated: {msg} Log in again with `jitgate login {} --token <token>` (or set JITGATE_TOKEN).",
                        self.base
                    ),
                ),
                403 => Exit::err(EXIT_AUTH, format!("not permitted: {msg}")),
                404 => Exit::err(EXIT_NOT_FOUND, msg),
                400 | 409 | 413 => Exit::err(EXIT_INVALID, msg),
                _ => Exit::err(1, format!("{status}: {msg}")),
            });
        }
        Ok((body, headers))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .send(self.http.get(format!("{}{path}", self.base)))
            .await?
            .0)
    }

    /// GET with query parameters (encoded by the HTTP client).
    pub async fn get_query(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        Ok(self
            .send(self.http.get(format!("{}{path}", self.base)).query(query))
            .await?
            .0)
    }

    /// Every page of a paged native list (`continuationToken`), as one
    /// `{"value": [...]}` with whatever else the first page carried.
    pub async fn get_all_pages(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<Value> {
        let mut all = Vec::new();
        let mut first: Option<Value> = None;
        let mut next: Option<String> = None;
        loop {
            let mut q: Vec<(&str, String)> = query.to_vec();
            q.push(("limit", "1000".to_owned()));
            if let Some(t) = &next {
                q.push(("continuationToken", t.clone()));
            }
            let mut page = self.get_query(path, &q).await?;
            all.extend(page["value"].as_array().cloned().unwrap_or_default());
            // What only the first page carries (a summary) is kept.
            first.get_or_insert_with(|| {
                page["value"] = Value::Null;
                page.clone()
            });
            match page["continuationToken"].as_str() {
                Some(t) => next = Some(t.to_owned()),
                None => {
                    let mut out = first.take().unwrap_or_default();
                    if let Some(o) = out.as_object_mut() {
                        o.remove("continuationToken");
                    }
                    out["value"] = Value::Array(all);
                    return Ok(out);
                }
            }
        }
    }

    /// The machine `name` names (a full id, `rg/name`, or a short name unique among
    /// those the caller may read), found by the controller with an indexed lookup:
    /// never by listing every machine.
    pub async fn find_vm(&self, name: &str) -> anyhow::Result<Value> {
        let (rg, short) = split_vm_name(name);
        let mut q = vec![("name", short.to_owned()), ("limit", "50".to_owned())];
        if let Some(rg) = rg {
            q.push(("resourceGroup", rg.to_owned()));
        }
        let found = match self.get_query("/api/v1/vms", &q).await {
            Ok(v) => v,
            // A name the controller refuses cannot name a machine.
            Err(e)
                if e.downcast_ref::<Exit>()
                    .is_some_and(|x| x.code == EXIT_INVALID) =>
            {
                serde_json::json!({ "value": [] })
            }
            Err(e) => return Err(e),
        };
        let vms = found["value"].as_array().cloned().unwrap_or_default();
        resolve(&vms, name).cloned()
    }

    pub async fn get_text(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<String> {
        let mut req = self.http.get(format!("{}{path}", self.base)).query(query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the controller at {}", self.base))?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(Exit::err(
                if status.as_u16() == 401 || status.as_u16() == 403 {
                    EXIT_AUTH
                } else {
                    1
                },
                format!("{status}: {}", resp.text().await.unwrap_or_default()),
            ));
        }
        Ok(resp.text().await?)
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Ok(self
            .send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await?
            .0)
    }

    pub async fn post_with_headers(
        &self,
        path: &str,
        body: &Value,
    ) -> anyhow::Result<(Value, reqwest::header::HeaderMap)> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        Ok(self
            .send(self.http.put(format!("{}{path}", self.base)).json(body))
            .await?
            .0)
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .send(self.http.delete(format!("{}{path}", self.base)))
            .await?
            .0)
    }
}

/// (resource group, name) of a machine named by full id, `rg/name` or short name.
pub fn split_vm_name(name: &str) -> (Option<&str>, &str) {
    if name.starts_with('/') {
        let parts: Vec<&str> = name.split('/').collect();
        let after = |seg: &str| {
            parts
                .iter()
                .position(|p| p.eq_ignore_ascii_case(seg))
                .and_then(|i| parts.get(i + 1).copied())
        };
        return (
            after("resourceGroups"),
            after("virtualMachines").unwrap_or(name),
        );
    }
    match name.split_once('/') {
        Some((rg, n)) => (Some(rg), n),
        None => (None, name),
    }
}

/// Finds a machine by full id, `rg/name`, or a unique short name, among `vms` (the
/// `value` of GET /api/v1/vms).
pub fn resolve<'a>(vms: &'a [Value], name: &str) -> anyhow::Result<&'a Value> {
    let eq = |a: &Value, b: &str| a.as_str().is_some_and(|a| a.eq_ignore_ascii_case(b));
    let matches: Vec<&Value> = if name.starts_with("/subscriptions/") {
        vms.iter().filter(|v| eq(&v["id"], name)).collect()
    } else if let Some((rg, n)) = name.split_once('/') {
        vms.iter()
            .filter(|v| eq(&v["resourceGroup"], rg) && eq(&v["name"], n))
            .collect()
    } else {
        vms.iter().filter(|v| eq(&v["name"], name)).collect()
    };
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(Exit::err(
            EXIT_NOT_FOUND,
            format!("no machine named '{name}' that you can see; list them with `jitgate vm list`"),
        )),
        many => {
            let names: Vec<String> = many
                .iter()
                .map(|v| {
                    format!(
                        "{}/{}",
                        v["resourceGroup"].as_str().unwrap_or("?"),
                        v["name"].as_str().unwrap_or("?")
                    )
                })
                .collect();
            Err(Exit::err(
                EXIT_NOT_FOUND,
                format!(
                    "'{name}' is ambiguous: {}; name it as resource-group/name",
                    names.join(", ")
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn vms() -> Vec<Value> {
        vec![
            json!({"id": "/subscriptions/s/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/web-1", "resourceGroup": "prod", "name": "web-1"}),
            json!({"id": "/subscriptions/s/resourceGroups/lab/providers/Microsoft.Compute/virtualMachines/web-1", "resourceGroup": "lab", "name": "web-1"}),
            json!({"id": "/subscriptions/s/resourceGroups/lab/providers/Microsoft.Compute/virtualMachines/db", "resourceGroup": "lab", "name": "db"}),
        ]
    }

    #[test]
    fn resolves_names() {
        let v = vms();
        assert_eq!(resolve(&v, "db").unwrap()["resourceGroup"], "lab");
        assert_eq!(resolve(&v, "LAB/WEB-1").unwrap()["resourceGroup"], "lab");
        assert_eq!(resolve(&v, "/subscriptions/s/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/web-1").unwrap()["resourceGroup"], "prod");
        let e = resolve(&v, "web-1").unwrap_err().to_string();
        assert!(
            e.contains("ambiguous") && e.contains("prod/web-1") && e.contains("lab/web-1"),
            "{e}"
        );
        let e = resolve(&v, "nope").unwrap_err();
        assert_eq!(e.downcast_ref::<Exit>().unwrap().code, EXIT_NOT_FOUND);
    }

    #[test]
    fn machine_names_split_into_group_and_name() {
        assert_eq!(split_vm_name("web-1"), (None, "web-1"));
        assert_eq!(split_vm_name("prod/web-1"), (Some("prod"), "web-1"));
        assert_eq!(
            split_vm_name(
                "/subscriptions/s/resourcegroups/Prod/providers/Microsoft.Compute/virtualMachines/Web-1"
            ),
            (Some("Prod"), "Web-1")
        );
    }

    #[test]
    fn a_token_in_clear_text_to_the_network_is_recognised() {
        for url in [
            "http://10.0.0.1:8080",
            "http://jit.example.com",
            "http://[fd00::1]:80/x",
        ] {
            assert!(cleartext_to_network(url), "{url}");
        }
        for url in [
            "https://10.0.0.1:8443",
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://[::1]:8080",
            "http://127.9.9.9",
        ] {
            assert!(!cleartext_to_network(url), "{url}");
        }
    }
}
