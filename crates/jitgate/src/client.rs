//! The HTTP client of the CLI: one `reqwest` client with the caller's token and trust
//! (`--ca-cert` pinned through `proto::tls::PinnedVerifier`), answers read into the
//! wire types of `jitgate_proto::api` (or the Azure JSON the policy verbs read), lists
//! followed through every page, and a refusal turned into one readable line and an
//! exit code (`usage::Exit`).
//!
//! Every answer is kept twice: decoded into its type for the verbs, and as the JSON the
//! controller sent, which is what `--json` prints (so a field this build does not know
//! still reaches a script).

use std::path::Path;

use anyhow::Context;
use jitgate_proto::api;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::cli::ClientArgs;
use crate::usage::{EXIT_AUTH, EXIT_INVALID, EXIT_NOT_FOUND, EXIT_TLS, EXIT_USAGE, Exit};

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

/// An answer: `data` decoded into its wire type, `json` as the controller sent it
/// (what `--json` prints), and the response headers.
pub struct Reply<T> {
    pub data: T,
    pub json: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl<T> std::ops::Deref for Reply<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.data
    }
}

/// A page of a native list: `value` and, when more follow, `continuationToken`.
pub trait Page: DeserializeOwned {
    /// How many items the page holds.
    fn len(&self) -> usize;
    /// Keeps the first `n` items.
    fn truncate(&mut self, n: usize);
    /// Takes the continuation token out (None: this was the last page).
    fn take_token(&mut self) -> Option<String>;
    /// Appends the items of a later page.
    fn append(&mut self, later: Self);
}

macro_rules! page {
    ($($t:ty),* $(,)?) => {$(
        impl Page for $t {
            fn len(&self) -> usize {
                self.value.len()
            }
            fn truncate(&mut self, n: usize) {
                self.value.truncate(n);
            }
            fn take_token(&mut self) -> Option<String> {
                self.continuation_token.take()
            }
            fn append(&mut self, later: Self) {
                self.value.extend(later.value);
            }
        }
    )*};
}

page!(
    api::VmPage,
    api::RequestPage,
    api::TokenPage,
    api::RoleAssignmentPage,
    api::AuditPage,
    api::RecommendationPage,
    api::ExclusionPage,
    api::EnrollTokenPage,
);

/// A query string: (name, value) pairs, encoded by the HTTP client.
pub type Query<'a> = [(&'a str, String)];

pub struct Client {
    http: reqwest::Client,
    /// The same, following no redirect (to read what a path answers itself).
    probe: reqwest::Client,
    pub base: String,
    token: Option<String>,
}

pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";

impl Client {
    /// The controller and credential from the flags, then `JITGATE_*`, then the file
    /// `jitgate login` wrote.
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let saved = crate::config::load_saved()?;
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
        let mut builder = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .pool_idle_timeout(jitgate_proto::CLIENT_POOL_IDLE);
        let mut probe = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = ca {
            // The file's certificates are trust anchors; the controller's own
            // certificate, if it is one of them, is accepted as it is (pinned).
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let anchors = jitgate_proto::tls::certs_from_pem(&pem)
                .map_err(|e| Exit::err(EXIT_USAGE, format!("--ca-cert {}: {e}", ca.display())))?;
            let verifier = || jitgate_proto::tls::PinnedVerifier::new(anchors.clone(), Vec::new());
            builder = builder.tls_backend_preconfigured(verifier().client_config()?);
            probe = probe.tls_backend_preconfigured(verifier().client_config()?);
        }
        if token.is_some() && cleartext_to_network(url) {
            eprintln!(
                "warning: sending your token in clear text to {url}, which is not a loopback address: anyone on the path can read and reuse it. Use the controller's https:// URL."
            );
        }
        Ok(Client {
            http: builder.build().context("cannot build the HTTP client")?,
            probe: probe.build().context("cannot build the HTTP client")?,
            base: url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request; a refusal becomes an `Exit` with its code and the server's
    /// message. The body as JSON (null when empty).
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
        if !status.is_success() {
            let msg = match serde_json::from_str::<api::CloudError>(&text) {
                Ok(e) => e.error.message,
                // Not a CloudError: the body as it came, as JSON text.
                Err(_) => serde_json::from_str::<Value>(&text)
                    .unwrap_or_else(|_| {
                        if text.trim().is_empty() {
                            Value::Null
                        } else {
                            Value::String(text.clone())
                        }
                    })
                    .to_string(),
            };
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
        let body = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok((body, headers))
    }

    /// Sends a request and reads the answer into `T`.
    async fn call<T: DeserializeOwned>(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<Reply<T>> {
        let (json, headers) = self.send(req).await?;
        let data = T::deserialize(&json).with_context(|| {
            format!(
                "the controller's answer to {what} is not what this jitgate expects (is it another version?)"
            )
        })?;
        Ok(Reply {
            data,
            json,
            headers,
        })
    }

    /// GET with query parameters (encoded by the HTTP client).
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Query<'_>,
    ) -> anyhow::Result<Reply<T>> {
        self.call(
            &format!("GET {path}"),
            self.http.get(self.url(path)).query(query),
        )
        .await
    }

    /// Every page of a paged native list (`continuationToken`), as one page holding
    /// every item; its JSON is `{"value": [...]}` with whatever else the first page
    /// carried (a summary).
    pub async fn get_all_pages<P: Page>(
        &self,
        path: &str,
        query: &Query<'_>,
    ) -> anyhow::Result<Reply<P>> {
        self.get_pages(path, query, None).await
    }

    /// The pages of a list until `max` items (all of them when `None`).
    pub async fn get_pages<P: Page>(
        &self,
        path: &str,
        query: &Query<'_>,
        max: Option<usize>,
    ) -> anyhow::Result<Reply<P>> {
        let mut first: Reply<P> = self.get(path, query).await?;
        let mut next = first.data.take_token();
        let mut json = Vec::new();
        let mut head = match first.json {
            Value::Object(mut m) => {
                if let Some(Value::Array(items)) = m.remove("value") {
                    json = items;
                }
                m.remove("continuationToken");
                m
            }
            _ => serde_json::Map::new(),
        };
        while let Some(token) = next.take() {
            if max.is_some_and(|m| first.data.len() >= m) {
                break;
            }
            let mut q = query.to_vec();
            q.push(("continuationToken", token));
            let mut page: Reply<P> = self.get(path, &q).await?;
            next = page.data.take_token();
            if let Value::Object(mut m) = page.json
                && let Some(Value::Array(items)) = m.remove("value")
            {
                json.extend(items);
            }
            first.data.append(page.data);
        }
        if let Some(m) = max {
            first.data.truncate(m);
            json.truncate(m);
        }
        head.insert("value".to_owned(), Value::Array(json));
        first.json = Value::Object(head);
        Ok(first)
    }

    /// GET of a text export (CSV, JSON lines).
    pub async fn get_text(&self, path: &str, query: &Query<'_>) -> anyhow::Result<String> {
        let mut req = self.http.get(self.url(path)).query(query);
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

    /// The status a GET of `path` answers itself (no redirect followed, no credential).
    pub async fn status_of(&self, path: &str) -> anyhow::Result<u16> {
        let resp = self.probe.get(self.url(path)).send().await.map_err(|e| {
            match jitgate_proto::tls::advice(&e, &self.base) {
                Some(advice) => Exit::err(EXIT_TLS, advice),
                None => anyhow::Error::new(e)
                    .context(format!("cannot reach the controller at {}", self.base)),
            }
        })?;
        Ok(resp.status().as_u16())
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<Reply<T>> {
        self.call(
            &format!("POST {path}"),
            self.http.post(self.url(path)).json(body),
        )
        .await
    }

    /// POST with extra request headers.
    pub async fn post_with<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply<T>> {
        let mut req = self.http.post(self.url(path)).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.call(&format!("POST {path}"), req).await
    }

    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<Reply<T>> {
        self.call(
            &format!("PUT {path}"),
            self.http.put(self.url(path)).json(body),
        )
        .await
    }

    /// DELETE; whatever the answer holds is not needed.
    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        self.send(self.http.delete(self.url(path))).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
