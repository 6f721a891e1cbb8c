//! A real OpenID Provider for the sign-in tests (`testing/oidc-op`: panva's
//! oidc-provider, run with Node on a loopback port) and a browser that drives it over
//! HTTP. Shared by the controller's API tests and the command line's tests (each uses
//! part of it).

#![allow(dead_code)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub const SECRET: &str = "test-client-secret-0123456789";
/// The secret of the client `robot`, which gets access tokens for jitgate's API with
/// client credentials (a workload's identity).
pub const ROBOT_SECRET: &str = "robot-secret-0123456789";

/// The provider, stopped when dropped.
pub struct Op {
    child: Child,
    pub issuer: String,
    users: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Op {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Op {
    /// Starts the provider with the client `jitgate` (redirect URI `redirect`) and
    /// `users` (login -> claims).
    pub fn start(redirect: &str, users: Value) -> Op {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testing/oidc-op");
        assert!(
            root.join("node_modules/oidc-provider").exists(),
            "the test OpenID Provider is not installed: run `npm ci --prefix testing/oidc-op` \
             (Node.js 20 and npm; ./scripts/test.sh does it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let users_file = dir.path().join("users.json");
        std::fs::write(&users_file, users.to_string()).unwrap();
        let config = dir.path().join("op.json");
        std::fs::write(
            &config,
            json!({
                "clients": [{
                    "client_id": "jitgate",
                    "client_secret": SECRET,
                    "redirect_uris": [redirect],
                    "grant_types": ["authorization_code"],
                    "response_types": ["code"],
                }, {
                    "client_id": "robot",
                    "client_secret": ROBOT_SECRET,
                    "redirect_uris": [],
                    "grant_types": ["client_credentials"],
                    "response_types": [],
                }],
                "users": users_file,
            })
            .to_string(),
        )
        .unwrap();
        let mut child = Command::new("node")
            .arg(root.join("op.mjs"))
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node runs (install Node.js 20: ./scripts/setup-deps.sh --tests does)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let issuer = serde_json::from_str::<Value>(&line)
            .unwrap_or_else(|e| panic!("the provider did not start ({e}): {line:?}"))["issuer"]
            .as_str()
            .unwrap()
            .to_owned();
        Op {
            child,
            issuer,
            users: users_file,
            _dir: dir,
        }
    }

    pub fn set_users(&self, users: Value) {
        std::fs::write(&self.users, users.to_string()).unwrap();
    }

    pub async fn rotate_keys(&self) {
        let r = reqwest::Client::new()
            .post(format!("{}/test/rotate", self.issuer))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.issuer))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r
    }

    /// The next ID token the provider issues is changed as `how` says (see op.mjs).
    pub async fn tamper(&self, how: Value) {
        self.post("/test/tamper", how).await;
    }

    /// A token with `how`'s claims, signed as `how` says (see op.mjs).
    pub async fn sign(&self, how: Value) -> String {
        let v: Value = self.post("/test/sign", how).await.json().await.unwrap();
        v["jwt"].as_str().unwrap().to_owned()
    }

    /// An access token for jitgate's API (audience `jitgate-api`) issued to the client
    /// `robot` with client credentials.
    pub async fn robot_token(&self) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/token", self.issuer))
            .basic_auth("robot", Some(ROBOT_SECRET))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&resource=urn%3Ajitgate%3Aapi&scope=api")
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(status.is_success(), "{v}");
        v["access_token"].as_str().unwrap().to_owned()
    }
}

/// A browser: cookies per name (the provider's and the controller's), no redirects
/// followed by themselves.
pub struct Browser {
    http: reqwest::Client,
    pub cookies: std::collections::BTreeMap<String, String>,
}

impl Browser {
    pub fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: Default::default(),
        }
    }

    pub async fn send(
        &mut self,
        method: Method,
        url: &str,
        form: Option<&[(&str, &str)]>,
    ) -> (StatusCode, String, String) {
        // A form posted from a page of the same site: browsers name its origin.
        let origin = (method == Method::POST)
            .then(|| url::Url::parse(url).unwrap().origin().ascii_serialization());
        let mut req = self.http.request(method, url);
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        if !self.cookies.is_empty() {
            let c: Vec<String> = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req = req.header("Cookie", c.join("; "));
        }
        if let Some(f) = form {
            let body = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(f)
                .finish();
            req = req
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(body);
        }
        let resp = req.send().await.unwrap();
        for sc in resp.headers().get_all("set-cookie") {
            let sc = sc.to_str().unwrap();
            let (kv, attrs) = sc.split_once(';').unwrap_or((sc, ""));
            let (k, v) = kv.split_once('=').unwrap();
            if v.is_empty()
                || attrs.contains("Max-Age=0")
                || attrs.contains("expires=Thu, 01 Jan 1970")
            {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), v.to_owned());
            }
        }
        let status = resp.status();
        let location = resp
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, location, resp.text().await.unwrap())
    }

    /// Signs in at the controller `base` as `login`, up to the callback URL the
    /// provider sends the browser to (not yet followed).
    pub async fn until_callback(&mut self, base: &str, issuer: &str, login: &str) -> String {
        self.sign_in_from(
            &format!("{base}/auth/login?return_to=/requests"),
            base,
            issuer,
            login,
        )
        .await
    }

    /// Opens `start` (a controller's `/auth/login...`), signs in at the provider as
    /// `login`, and returns the callback URL on the controller `base` the provider
    /// sends the browser to (not yet followed).
    pub async fn sign_in_from(
        &mut self,
        start: &str,
        base: &str,
        issuer: &str,
        login: &str,
    ) -> String {
        let (status, mut next, body) = self.send(Method::GET, start, None).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
        assert!(next.starts_with(issuer), "{next}");
        for _ in 0..10 {
            if next.starts_with(base) {
                return next;
            }
            let url = if next.starts_with('/') {
                format!("{issuer}{next}")
            } else {
                next.clone()
            };
            let (status, location, body) = self.send(Method::GET, &url, None).await;
            if status.is_redirection() {
                next = location;
                continue;
            }
            // The provider's login form.
            assert_eq!(status, StatusCode::OK, "{body}");
            let action = body
                .split("action=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or_else(|| panic!("no form in {body}"))
                .to_owned();
            let action = if action.starts_with('/') {
                format!("{issuer}{action}")
            } else {
                action
            };
            let (status, location, body) = self
                .send(
                    Method::POST,
                    &action,
                    Some(&[("prompt", "login"), ("login", login), ("password", "any")]),
                )
                .await;
            assert!(status.is_redirection(), "{status} {body}");
            next = location;
        }
        panic!("the provider never sent the browser back");
    }

    /// The whole sign-in; returns the session cookie.
    pub async fn sign_in(&mut self, base: &str, issuer: &str, login: &str) -> String {
        let callback = self.until_callback(base, issuer, login).await;
        let (status, location, body) = self.send(Method::GET, &callback, None).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
        assert_eq!(location, "/requests");
        self.cookies
            .get("__Host-jitgate_session")
            .expect("a session cookie")
            .clone()
    }
}

/// The target of the first link of a page (`Continue` on the controller's confirmation
/// page), unescaped.
pub fn first_link(html: &str) -> String {
    html.split("<a href=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no link in {html}"))
        .replace("&amp;", "&")
}
