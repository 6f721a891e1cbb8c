//! A small HTTP client for the controller's API.

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cli::ClientArgs;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder();
        if let Some(ca) = &args.ca_cert {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("{} is not a PEM certificate", ca.display()))?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Client {
            http: builder.build().context("cannot build the HTTP client")?,
            base: args.url.trim_end_matches('/').to_owned(),
            token: args.token.clone(),
        })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the controller at {}", self.base))?;
        let status = resp.status();
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
            let hint = if status.as_u16() == 401 {
                " (set JITGATE_TOKEN or --token to a valid token)"
            } else {
                ""
            };
            bail!("{status}: {msg}{hint}");
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.delete(format!("{}{path}", self.base)))
            .await
    }
}
