//! Sign-in with a real OpenID Provider (`testing/oidc-op`: panva's oidc-provider, run
//! with Node on a loopback port), driven over HTTP as a browser would: the controller's
//! `/auth/login`, the provider's login form, the callback, the session cookie.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use jitgate_controller::oidc::{LOGIN_COOKIE, SESSION_COOKIE};

use crate::util::Ctl;

const SECRET: &str = "test-client-secret-0123456789";

/// The provider, stopped when dropped.
struct Op {
    child: Child,
    issuer: String,
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
    fn start(redirect: &str, users: Value) -> Op {
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

    fn set_users(&self, users: Value) {
        std::fs::write(&self.users, users.to_string()).unwrap();
    }

    async fn rotate_keys(&self) {
        let r = reqwest::Client::new()
            .post(format!("{}/test/rotate", self.issuer))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
}

/// A controller whose sign-in uses `op`'s provider, listening on `port`; with
/// `mapped`, members of `ops` are JIT Requesters on resource group `prod` and members
/// of `admins` Owners of the subscription (known once the installation exists: it is
/// started once without sign-in to create it).
async fn controller_with(port: u16, op: &Op, mapped: bool) -> Ctl {
    let mut first = Ctl::start().await;
    first.stop().await;
    let sub = first.sub.clone();
    let issuer = op.issuer.clone();
    let scope = |s: String| jitgate_core::ids::Scope::parse(&s).unwrap();
    let roles = if mapped {
        vec![
            jitgate_controller::oidc::GroupRole {
                group: "ops".into(),
                role: jitgate_core::rbac::Role::JitRequester,
                scope: scope(format!("/subscriptions/{sub}/resourceGroups/prod")),
            },
            jitgate_controller::oidc::GroupRole {
                group: "admins".into(),
                role: jitgate_core::rbac::Role::Owner,
                scope: scope(format!("/subscriptions/{sub}")),
            },
        ]
    } else {
        Vec::new()
    };
    Ctl::start_with(first.dir, move |c| {
        c.listen = SocketAddr::from(([127, 0, 0, 1], port));
        c.oidc = Some(jitgate_controller::oidc::OidcConfig {
            issuer,
            client_id: "jitgate".into(),
            client_secret: jitgate_proto::Secret::new(SECRET),
            audience: "jitgate".into(),
            scopes: ["openid", "email", "profile", "groups"]
                .map(str::to_owned)
                .to_vec(),
            name_claim: "name".into(),
            groups_claim: "groups".into(),
            roles,
            public_url: url::Url::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
            session: std::time::Duration::from_secs(3600),
        });
    })
    .await
}

/// A browser: cookies per name (the provider's and the controller's), no redirects
/// followed by themselves.
struct Browser {
    http: reqwest::Client,
    cookies: std::collections::BTreeMap<String, String>,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: Default::default(),
        }
    }

    async fn send(
        &mut self,
        method: Method,
        url: &str,
        form: Option<&[(&str, &str)]>,
    ) -> (StatusCode, String, String) {
        let mut req = self.http.request(method, url);
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
    async fn until_callback(&mut self, base: &str, issuer: &str, login: &str) -> String {
        let (status, mut next, body) = self
            .send(
                Method::GET,
                &format!("{base}/auth/login?return_to=/requests"),
                None,
            )
            .await;
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
    async fn sign_in(&mut self, ctl: &Ctl, issuer: &str, login: &str) -> String {
        let callback = self.until_callback(&ctl.base, issuer, login).await;
        let (status, location, body) = self.send(Method::GET, &callback, None).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
        assert_eq!(location, "/requests");
        self.cookies
            .get(SESSION_COOKIE)
            .expect("a session cookie")
            .clone()
    }
}

async fn whoami(ctl: &Ctl, session: &str) -> (StatusCode, Value) {
    let r = ctl
        .call_with(
            Method::GET,
            "/api/v1/whoami",
            None,
            None,
            &[("Cookie", &session_cookie(session))],
        )
        .await;
    (r.status, r.body)
}

/// The `Cookie` header of a browser holding `session`.
fn session_cookie(session: &str) -> String {
    format!("{SESSION_COOKIE}={session}")
}

fn roles(who: &Value) -> Vec<String> {
    let mut r: Vec<String> = who["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["role"].as_str().unwrap().to_owned())
        .collect();
    r.sort();
    r
}

/// The web flow end to end: signed in through the provider's form, a person is named
/// by issuer and subject, holds the roles of their groups, and loses a role at the
/// next sign-in once out of its group; each step is audited.
#[tokio::test]
async fn a_person_signs_in_and_holds_the_roles_of_their_groups() {
    let port = jitgate_store_sql::testpg::free_port();
    let op = Op::start(
        &format!("http://127.0.0.1:{port}/auth/callback"),
        json!({"alice": {"name": "Alice Example", "email": "alice@example.net", "groups": ["ops", "admins"]}}),
    );
    let ctl = controller_with(port, &op, true).await;
    let mut browser = Browser::new();
    let session = browser.sign_in(&ctl, &op.issuer, "alice").await;

    let (status, who) = whoami(&ctl, &session).await;
    assert_eq!(status, StatusCode::OK, "{who}");
    assert_eq!(who["principal"], format!("{}#alice", op.issuer));
    assert_eq!(roles(&who), ["JIT Requester", "Owner"]);
    let signins = ctl.audit("action=auth.signin").await;
    let last = signins.last().unwrap();
    assert_eq!(last["outcome"], "success", "{last}");
    let details = match &last["details"] {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        d => d.clone(),
    };
    assert_eq!(details["name"], "Alice Example");
    assert!(
        !last.to_string().contains(&session[3..]),
        "no secret in the audit log"
    );

    // Out of `admins`: the next sign-in takes Owner away, from every session of hers.
    op.set_users(json!({"alice": {"name": "Alice Example", "groups": ["ops"]}}));
    let second = Browser::new().sign_in(&ctl, &op.issuer, "alice").await;
    assert_eq!(roles(&whoami(&ctl, &second).await.1), ["JIT Requester"]);
    assert_eq!(roles(&whoami(&ctl, &session).await.1), ["JIT Requester"]);
    let removed = ctl.audit("action=roleAssignment.delete").await;
    assert!(!removed.is_empty(), "the removal is audited");

    // A provider that rotated its signing key: the new key is fetched.
    op.rotate_keys().await;
    let third = Browser::new().sign_in(&ctl, &op.issuer, "alice").await;
    assert_eq!(whoami(&ctl, &third).await.0, StatusCode::OK);
}

/// A change made with the session cookie must come from the controller's own pages;
/// signing out revokes the session on the spot.
#[tokio::test]
async fn sessions_refuse_other_origins_and_end_at_sign_out() {
    let port = jitgate_store_sql::testpg::free_port();
    let op = Op::start(
        &format!("http://127.0.0.1:{port}/auth/callback"),
        json!({"bob": {"name": "Bob", "groups": ["admins"]}}),
    );
    let ctl = controller_with(port, &op, true).await;
    let mut browser = Browser::new();
    let session = browser.sign_in(&ctl, &op.issuer, "bob").await;
    let origin = format!("http://127.0.0.1:{port}");
    let cookie = session_cookie(&session);
    async fn post(ctl: &Ctl, cookie: &str, origin: Option<&str>) -> crate::util::Resp {
        let mut headers = vec![("Cookie", cookie)];
        headers.extend(origin.map(|o| ("Origin", o)));
        let body = json!({"principal": "robot"});
        ctl.call_with(Method::POST, "/api/v1/tokens", None, Some(body), &headers)
            .await
    }
    for bad in [None, Some("https://evil.example")] {
        let r = post(&ctl, &cookie, bad).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.code(), "CrossOriginRefused", "{:?}", r.body);
    }
    assert_eq!(
        post(&ctl, &cookie, Some(&origin)).await.status,
        StatusCode::CREATED
    );

    // Sign-out from another origin is refused too; from ours it ends the session.
    let out = |origin: &str| {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .post(format!("{}/auth/logout", ctl.base))
            .header("Cookie", &cookie)
            .header("Origin", origin.to_owned())
            .send()
    };
    assert_eq!(
        out("https://evil.example").await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(whoami(&ctl, &session).await.0, StatusCode::OK);
    let r = out(&origin).await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(whoami(&ctl, &session).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(ctl.audit("action=auth.signout").await.len(), 1);
}

/// Refused sign-ins, each audited with its reason: a callback replayed (the provider
/// takes a code once), a state that is not this browser's, no sign-in cookie at all.
#[tokio::test]
async fn forged_and_replayed_callbacks_are_refused_and_audited() {
    let port = jitgate_store_sql::testpg::free_port();
    let op = Op::start(
        &format!("http://127.0.0.1:{port}/auth/callback"),
        json!({"carol": {"name": "Carol", "groups": []}}),
    );
    let ctl = controller_with(port, &op, false).await;
    let mut browser = Browser::new();
    let callback = browser.until_callback(&ctl.base, &op.issuer, "carol").await;
    let login_cookie = browser.cookies.get(LOGIN_COOKIE).unwrap().clone();

    // Another browser (no sign-in cookie) cannot finish it.
    let (status, _, body) = Browser::new().send(Method::GET, &callback, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("sign-in cookie is missing"), "{body}");

    // A changed state.
    let mut other = Browser::new();
    other
        .cookies
        .insert(LOGIN_COOKIE.into(), login_cookie.clone());
    let forged = callback.replace("state=", "state=x");
    let (status, _, body) = other.send(Method::GET, &forged, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("state does not match"), "{body}");

    // The real one works once (a refused callback cleared the sign-in cookie: this
    // browser kept a copy); replayed, the provider refuses the code.
    other
        .cookies
        .insert(LOGIN_COOKIE.into(), login_cookie.clone());
    let (status, _, body) = other.send(Method::GET, &callback, None).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let mut replay = Browser::new();
    replay.cookies.insert(LOGIN_COOKIE.into(), login_cookie);
    let (status, _, body) = replay.send(Method::GET, &callback, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("refused the code"), "{body}");

    let refused: Vec<Value> = ctl
        .audit("action=auth.signin")
        .await
        .into_iter()
        .filter(|e| e["outcome"] != "success")
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    // Nothing was granted to a refused sign-in, and the owner still works.
    assert_eq!(ctl.get("/api/v1/whoami").await.status, StatusCode::OK);
}
