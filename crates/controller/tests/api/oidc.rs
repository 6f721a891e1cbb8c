//! Sign-in with a real OpenID Provider (`testing/oidc-op`: panva's oidc-provider, run
//! with Node on a loopback port), driven over HTTP as a browser would: the controller's
//! `/auth/login`, the provider's login form, the callback, the session cookie.

use std::net::SocketAddr;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use jitgate_controller::oidc::{LOGIN_COOKIE, SESSION_COOKIE};

use crate::op::{Browser, Op, SECRET};
use crate::util::Ctl;

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
    Ctl::start_simulated_with(first.dir, move |c| {
        c.listen = SocketAddr::from(([127, 0, 0, 1], port));
        c.oidc = Some(jitgate_controller::oidc::OidcConfig {
            issuer,
            client_id: "jitgate".into(),
            client_secret: jitgate_proto::Secret::new(SECRET),
            audience: "jitgate-api".into(),
            scopes: ["openid", "email", "profile", "groups"]
                .map(str::to_owned)
                .to_vec(),
            name_claim: "name".into(),
            groups_claim: "groups".into(),
            roles,
            public_url: url::Url::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
            session: std::time::Duration::from_secs(3600),
            idle: std::time::Duration::from_secs(1800),
            key_refetch: std::time::Duration::from_secs(3),
        });
    })
    .await
}

/// A provider with `users` and a controller signing in with it (see
/// [`controller_with`]) on a free port, which is returned too.
async fn provider_and_controller(users: Value, mapped: bool) -> (u16, Op, Ctl) {
    let port = jitgate_store_sql::testpg::free_port();
    let op = Op::start(&format!("http://127.0.0.1:{port}/auth/callback"), users);
    let ctl = controller_with(port, &op, mapped).await;
    (port, op, ctl)
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

/// The command line's poll of a device sign-in.
async fn exchange_device(ctl: &Ctl, device_code: &Value) -> crate::util::Resp {
    ctl.call(
        Method::POST,
        "/auth/token",
        None,
        Some(json!({"grantType": "device", "deviceCode": device_code})),
    )
    .await
}

/// A form POSTed to `url` by a browser holding `session`, from the page at `origin`.
async fn post_form(
    url: &str,
    session: &str,
    origin: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("Cookie", session_cookie(session))
        .header("Origin", origin)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(
            url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form)
                .finish(),
        )
        .send()
        .await
        .unwrap()
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
    let (_, op, ctl) = provider_and_controller(json!({"alice": {"name": "Alice Example", "email": "alice@example.net", "groups": ["ops", "admins"]}}), true).await;
    let mut browser = Browser::new();
    let session = browser.sign_in(&ctl.base, &op.issuer, "alice").await;

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
    let second = Browser::new().sign_in(&ctl.base, &op.issuer, "alice").await;
    assert_eq!(roles(&whoami(&ctl, &second).await.1), ["JIT Requester"]);
    assert_eq!(roles(&whoami(&ctl, &session).await.1), ["JIT Requester"]);
    let removed = ctl.audit("action=roleAssignment.delete").await;
    assert!(!removed.is_empty(), "the removal is audited");

    // A provider that rotated its signing key: the new key is fetched.
    op.rotate_keys().await;
    let third = Browser::new().sign_in(&ctl.base, &op.issuer, "alice").await;
    assert_eq!(whoami(&ctl, &third).await.0, StatusCode::OK);
}

/// A change made with the session cookie must come from the controller's own pages;
/// signing out revokes the session on the spot.
#[tokio::test]
async fn sessions_refuse_other_origins_and_end_at_sign_out() {
    let (port, op, ctl) =
        provider_and_controller(json!({"bob": {"name": "Bob", "groups": ["admins"]}}), true).await;
    let mut browser = Browser::new();
    let session = browser.sign_in(&ctl.base, &op.issuer, "bob").await;
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
    let (_, op, ctl) =
        provider_and_controller(json!({"carol": {"name": "Carol", "groups": []}}), false).await;
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

/// The message of a refused call.
fn message(body: &str) -> String {
    serde_json::from_str::<Value>(body).unwrap()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// ID tokens a provider should never send, each refused with its reason and audited:
/// another audience, expired, signed with a key that is not the provider's, unsigned
/// (`alg: none`), a MAC keyed with the client secret, another sign-in's nonce.
#[tokio::test]
async fn id_tokens_that_do_not_verify_are_refused_and_audited() {
    let (_, op, ctl) = provider_and_controller(
        json!({"dave": {"name": "Dave", "groups": ["admins"]}}),
        true,
    )
    .await;
    let past = jiff::Timestamp::now().as_second() - 120;
    let cases = [
        (json!({"claims": {"aud": "someone-else"}}), "audience"),
        (json!({"claims": {"exp": past}}), "expired"),
        (json!({"key": "other"}), "signature"),
        (json!({"alg": "none"}), "no signature"),
        (json!({"alg": "HS256"}), "alg"),
        (json!({"claims": {"nonce": "another-sign-in"}}), "nonce"),
        (json!({"claims": {"nonce": null}}), "nonce"),
    ];
    for (how, reason) in &cases {
        let mut browser = Browser::new();
        let callback = browser.until_callback(&ctl.base, &op.issuer, "dave").await;
        op.tamper(how.clone()).await;
        let (status, _, body) = browser.send(Method::GET, &callback, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{how}: {body}");
        let m = message(&body).to_lowercase();
        assert!(
            m.contains("id token is not valid") && m.contains(reason),
            "{how}: {m}"
        );
        assert!(!browser.cookies.contains_key("__Host-jitgate_session"));
    }
    let refused: Vec<Value> = ctl
        .audit("action=auth.signin")
        .await
        .into_iter()
        .filter(|e| e["outcome"] != "success")
        .collect();
    assert_eq!(refused.len(), cases.len(), "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|e| e.to_string().contains("ID token is not valid"))
    );
    // Nobody was given a role by a refused sign-in.
    let roles = ctl.get("/api/v1/roleAssignments").await;
    assert!(
        !roles.body.to_string().contains("#dave"),
        "{:?}",
        roles.body
    );
}

/// A session ends at its absolute lifetime (1 h here), and earlier when unused for
/// the idle timeout (30 min here), on the controller's clock.
#[tokio::test]
async fn sessions_expire() {
    let (_, op, ctl) =
        provider_and_controller(json!({"erin": {"name": "Erin", "groups": ["ops"]}}), true).await;
    let session = Browser::new().sign_in(&ctl.base, &op.issuer, "erin").await;
    let unused = Browser::new().sign_in(&ctl.base, &op.issuer, "erin").await;
    let (status, who) = whoami(&ctl, &session).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(who["credential"], "signIn");
    assert_eq!(who["name"], "Erin");
    assert_eq!(who["groups"], json!(["ops"]));
    let min = |m: u64| std::time::Duration::from_secs(m * 60);
    ctl.advance(min(28));
    assert_eq!(whoami(&ctl, &session).await.0, StatusCode::OK);
    ctl.advance(min(28));
    // Used 28 minutes ago: still on. Never used for 56 minutes: ended.
    assert_eq!(whoami(&ctl, &session).await.0, StatusCode::OK);
    let (status, body) = whoami(&ctl, &unused).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.to_string().contains("without use"), "{body}");
    // At an hour the absolute lifetime ends it, used or not.
    ctl.advance(min(5));
    let (status, body) = whoami(&ctl, &session).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.to_string().contains("expired"), "{body}");
    // The owner's token list shows it as a sign-in, next to automation tokens.
    let tokens = ctl.get("/api/v1/tokens").await.body;
    let kinds: Vec<&str> = tokens["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"signIn") && kinds.contains(&"automation"),
        "{kinds:?}"
    );
}

/// The provider's own tokens for jitgate's audience are bearer credentials (a
/// workload's identity): roles from an administrator's assignment; refused when for
/// another audience, expired, unsigned or signed by another key, each audited; a
/// rotated key is fetched, but not more than once per `key_refetch`.
#[tokio::test]
async fn provider_tokens_are_bearer_credentials_for_jitgates_audience() {
    let port = jitgate_store_sql::testpg::free_port();
    let op = Op::start(&format!("http://127.0.0.1:{port}/auth/callback"), json!({}));
    let ctl = controller_with(port, &op, true).await;
    let robot = op.robot_token().await;
    let r = ctl.get_as(&robot, "/api/v1/whoami").await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["credential"], "providerToken");
    let principal = r.body["principal"].as_str().unwrap().to_owned();
    assert_eq!(principal, format!("{}#robot", op.issuer));
    assert_eq!(r.body["roles"], json!([]));
    // An Owner gives it a role; it holds it at once.
    let scope = format!("/subscriptions/{}/resourceGroups/prod", ctl.sub);
    let a = ctl
        .post(
            "/api/v1/roleAssignments",
            json!({"principal": principal, "role": "JIT Requester", "scope": scope}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
    let r = ctl.get_as(&robot, "/api/v1/whoami").await;
    assert_eq!(r.body["roles"][0]["role"], "JIT Requester");
    // It is not a sign-in: it cannot end itself at /auth/logout.
    let out = ctl
        .call(Method::POST, "/auth/logout", Some(&robot), None)
        .await;
    assert_eq!(out.status, StatusCode::BAD_REQUEST);

    let now = jiff::Timestamp::now().as_second();
    let claims = |extra: Value| {
        let mut c = json!({"sub": "robot", "aud": "jitgate-api", "client_id": "robot"});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let forged = [
        (
            json!({"claims": claims(json!({"aud": "another-api"}))}),
            "audience",
        ),
        (
            json!({"claims": claims(json!({"exp": now - 60, "iat": now - 400}))}),
            "expired",
        ),
        (
            json!({"claims": claims(json!({"iss": "http://127.0.0.1:1"}))}),
            "issuer",
        ),
        (
            json!({"claims": claims(json!({})), "key": "other"}),
            "signature",
        ),
        (
            json!({"claims": claims(json!({})), "alg": "none"}),
            "signature",
        ),
        (json!({"claims": claims(json!({})), "alg": "HS256"}), "alg"),
    ];
    for (how, reason) in &forged {
        let jwt = op.sign(how.clone()).await;
        let r = ctl.get_as(&jwt, "/api/v1/whoami").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{how}");
        let m = r.message().to_lowercase();
        assert!(
            m.contains("provider's token is not valid") && m.contains(reason),
            "{how}: {m}"
        );
    }
    // The same claims, properly signed, pass: the refusals were for what was changed.
    let good = op.sign(json!({"claims": claims(json!({}))})).await;
    assert_eq!(
        ctl.get_as(&good, "/api/v1/whoami").await.status,
        StatusCode::OK
    );
    let audited = ctl.audit("action=authentication.failed").await;
    assert!(audited.len() >= forged.len(), "{audited:?}");
    assert!(!audited.iter().any(|e| e.to_string().contains(&robot[..40])));

    // Rotated keys: a token with the new key id is refused until `key_refetch` (3 s)
    // has passed since the last fetch, then the keys are fetched again.
    op.rotate_keys().await;
    let fresh = op.robot_token().await;
    let r = ctl.get_as(&fresh, "/api/v1/whoami").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{:?}", r.body);
    assert!(r.message().contains("No matching key"), "{}", r.message());
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        ctl.get_as(&fresh, "/api/v1/whoami").await.status,
        StatusCode::OK
    );
}

/// The command line's loopback exchange and the device flow through the API: a code
/// is taken once (a wrong verifier uses it up), a device code is answered 202 until
/// decided, too-fast polling is slowed down, only a signed-in person can decide, from
/// the controller's origin, and a denial is final.
#[tokio::test]
async fn command_line_codes_are_taken_once_and_confirmed_by_a_person() {
    use base64::Engine;
    use sha2::Digest;
    let (port, op, ctl) =
        provider_and_controller(json!({"fay": {"name": "Fay", "groups": ["ops"]}}), true).await;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    // Loopback: the callback sends the browser to the command line's port.
    let verifier = "v".repeat(50);
    let challenge = b64.encode(sha2::Sha256::digest(verifier.as_bytes()));
    let start = format!(
        "{}/auth/login?cli_port=45678&cli_state=state-12345&cli_challenge={challenge}",
        ctl.base
    );
    let mut browser = Browser::new();
    let callback = browser
        .sign_in_from(&start, &ctl.base, &op.issuer, "fay")
        .await;
    let (status, _, body) = browser.send(Method::GET, &callback, None).await;
    // The person confirms first: the code goes to the loopback port only by its link.
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("Sign in the command line?") && body.contains("45678"),
        "{body}"
    );
    let location = crate::op::first_link(&body);
    assert!(
        location.starts_with("http://127.0.0.1:45678/callback?code="),
        "{location}"
    );
    assert!(location.ends_with("&state=state-12345"), "{location}");
    assert!(!browser.cookies.contains_key("__Host-jitgate_session"));
    let code = url::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let exchange = |code: &str, verifier: &str| json!({"grantType": "loopback", "code": code, "codeVerifier": verifier});
    // A wrong verifier is refused, and the code is gone with it.
    let r = ctl
        .call(
            Method::POST,
            "/auth/token",
            None,
            Some(exchange(&code, "w")),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "InvalidGrant")
    );
    let r = ctl
        .call(
            Method::POST,
            "/auth/token",
            None,
            Some(exchange(&code, &verifier)),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "InvalidGrant")
    );
    // Bad input names its field and changes nothing.
    for (body, field) in [
        (exchange("nothex", &verifier), "code"),
        (
            json!({"grantType": "device", "deviceCode": "12"}),
            "deviceCode",
        ),
        (json!({"grantType": "password"}), "grantType"),
    ] {
        let r = ctl
            .call(Method::POST, "/auth/token", None, Some(body))
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.message().contains(field), "{}", r.message());
    }
    for bad in [
        "cli_port=0&cli_state=state-12345",
        "cli_port=1&cli_state=x&cli_challenge=y",
    ] {
        let (status, _, body) = Browser::new()
            .send(Method::GET, &format!("{}/auth/login?{bad}", ctl.base), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(message(&body).contains("cli_"), "{body}");
    }
    // A fresh loopback sign-in, exchanged properly.
    let mut browser = Browser::new();
    let callback = browser
        .sign_in_from(&start, &ctl.base, &op.issuer, "fay")
        .await;
    let (_, _, page) = browser.send(Method::GET, &callback, None).await;
    let location = crate::op::first_link(&page);
    let code = url::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .next()
        .unwrap()
        .1
        .into_owned();
    let r = ctl
        .call(
            Method::POST,
            "/auth/token",
            None,
            Some(exchange(&code, &verifier)),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["name"], "Fay");
    let token = r.body["token"].as_str().unwrap().to_owned();
    let who = ctl.get_as(&token, "/api/v1/whoami").await.body;
    assert_eq!(who["credential"], "signIn");
    assert_eq!(who["roles"][0]["role"], "JIT Requester");

    // Device: pending, slowed down, then decided by a signed-in person.
    let d = ctl.call(Method::POST, "/auth/device", None, None).await;
    assert_eq!(d.status, StatusCode::OK, "{:?}", d.body);
    let device_code = d.body["deviceCode"].clone();
    let user_code = d.body["userCode"].as_str().unwrap().to_owned();
    let poll = || exchange_device(&ctl, &device_code);
    let r = poll().await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("authorizationPending"))
    );
    let r = poll().await;
    assert_eq!(r.body["status"], "slowDown");
    // The page: a browser without a session is sent to sign in first.
    let page = format!("{}/auth/device?code={}", ctl.base, user_code.to_lowercase());
    let mut person = Browser::new();
    let (status, location, _) = person.send(Method::GET, &page, None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        location.starts_with("/auth/login?return_to=%2Fauth%2Fdevice"),
        "{location}"
    );
    person.sign_in(&ctl.base, &op.issuer, "fay").await;
    let (status, _, html) = person.send(Method::GET, &page, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains(&user_code) && html.contains("127.0.0.1") && html.contains("Fay"),
        "{html}"
    );
    let decide = format!("{}/auth/device/decide", ctl.base);
    let form = [("code", user_code.as_str()), ("decision", "approve")];
    // Another site's form cannot approve with the person's session.
    let session = person.cookies["__Host-jitgate_session"].clone();
    let cross = post_form(&decide, &session, "https://evil.example", &form).await;
    assert_eq!(cross.status(), StatusCode::FORBIDDEN);
    // An administrator's token cannot turn itself into sign-in credentials.
    let admin = reqwest::Client::new()
        .post(&decide)
        .bearer_auth(crate::util::OWNER)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(
            url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form)
                .finish(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), StatusCode::FORBIDDEN);
    assert!(admin.text().await.unwrap().contains("NotASignIn"));
    let ok = post_form(
        &decide,
        &session,
        &format!("http://127.0.0.1:{port}"),
        &form,
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    ctl.advance(std::time::Duration::from_secs(5));
    let r = poll().await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let device_token = r.body["token"].as_str().unwrap().to_owned();
    let who = ctl.get_as(&device_token, "/api/v1/whoami").await.body;
    assert_eq!(who["principal"], format!("{}#fay", op.issuer));
    // It ends no later than the browser session that confirmed it.
    let session_end: jiff::Timestamp = whoami(&ctl, &session).await.1["expiresAt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let device_end: jiff::Timestamp = who["expiresAt"].as_str().unwrap().parse().unwrap();
    assert!(device_end <= session_end, "{device_end} > {session_end}");
    // A command line's credential cannot confirm another device (it would renew
    // itself without the provider).
    let d2 = ctl
        .call(Method::POST, "/auth/device", None, None)
        .await
        .body;
    let again = reqwest::Client::new()
        .post(&decide)
        .bearer_auth(&device_token)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!(
            "code={}&decision=approve",
            d2["userCode"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::FORBIDDEN);
    // Taken once.
    assert_eq!(poll().await.code(), "InvalidGrant");
    // `jitgate logout` ends it.
    let out = ctl
        .call(Method::POST, "/auth/logout", Some(&device_token), None)
        .await;
    assert_eq!(out.status, StatusCode::OK, "{:?}", out.body);
    assert_eq!(
        ctl.get_as(&device_token, "/api/v1/whoami").await.status,
        StatusCode::UNAUTHORIZED
    );

    // A denial is final; an expired one says so.
    let d = ctl
        .call(Method::POST, "/auth/device", None, None)
        .await
        .body;
    let form = [
        ("code", d["userCode"].as_str().unwrap()),
        ("decision", "deny"),
    ];
    let no = post_form(
        &decide,
        &session,
        &format!("http://127.0.0.1:{port}"),
        &form,
    )
    .await;
    assert_eq!(no.status(), StatusCode::OK);
    let r = exchange_device(&ctl, &d["deviceCode"]).await;
    assert_eq!(r.code(), "AccessDenied");
    let d = ctl
        .call(Method::POST, "/auth/device", None, None)
        .await
        .body;
    ctl.advance(std::time::Duration::from_secs(601));
    let r = exchange_device(&ctl, &d["deviceCode"]).await;
    assert_eq!(r.code(), "ExpiredToken");
    // One address cannot take every place: at most 5 device sign-ins under way.
    let mut refused = None;
    for _ in 0..6 {
        let r = ctl.call(Method::POST, "/auth/device", None, None).await;
        if r.status != StatusCode::OK {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("the address's sign-ins are bounded");
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::TOO_MANY_REQUESTS, "TooManySignins")
    );
    let decided = ctl.audit("action=auth.device").await;
    assert_eq!(decided.len(), 2, "{decided:?}");
}

/// The dashboard with the identity provider: the sign-in's `__Host-` cookie opens it,
/// the page names the person, the sign-in page offers only the provider (no token
/// pasting), and Sign out revokes the sign-in's credential.
#[tokio::test]
async fn the_dashboard_opens_with_a_provider_sign_in_and_signing_out_revokes_it() {
    let (port, op, ctl) = provider_and_controller(
        json!({"carol": {"name": "Carol Example", "groups": ["ops"]}}),
        true,
    )
    .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signin = http
        .get(format!("{}/ui/signin?return_to=/", ctl.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(signin.contains("/auth/login?return_to=%2F"), "{signin}");
    assert!(
        !signin.contains("name=\"token\""),
        "no token pasting with a provider"
    );
    let pasted = http
        .post(format!("{}/ui/signin", ctl.base))
        .header("origin", format!("http://127.0.0.1:{port}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", crate::util::OWNER))
        .send()
        .await
        .unwrap();
    assert_eq!(pasted.status(), StatusCode::BAD_REQUEST);

    let session = Browser::new().sign_in(&ctl.base, &op.issuer, "carol").await;
    let home = http
        .get(format!("{}/", ctl.base))
        .header("Cookie", session_cookie(&session))
        .send()
        .await
        .unwrap();
    assert_eq!(home.status(), StatusCode::OK);
    let html = home.text().await.unwrap();
    assert!(html.contains("Carol Example"), "{html}");
    let at = html.find("name=\"csrf\" value=\"").unwrap() + 19;
    let csrf = &html[at..at + 64];
    let out = http
        .post(format!("{}/ui/signout", ctl.base))
        .header("Cookie", session_cookie(&session))
        .header("origin", format!("http://127.0.0.1:{port}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let cleared = out.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cleared.starts_with(&format!("{SESSION_COOKIE}=;")) && cleared.contains("Secure"),
        "{cleared}"
    );
    assert_eq!(whoami(&ctl, &session).await.0, StatusCode::UNAUTHORIZED);
}
