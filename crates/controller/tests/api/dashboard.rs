//! The dashboard through HTTP, as a browser would use it without script: sign-in,
//! its cookie and CSRF token, pages that show what the API says, forms that change
//! it (and refuse bad input, other sites and the wrong person, changing nothing), and
//! every value escaped. The same flows are clicked in a real browser in the
//! end-to-end suite (`crates/jitgate/tests/e2e/dashboard.rs`).

use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, LOCATION, SET_COOKIE};
use serde_json::json;

use crate::util::{Ctl, OWNER};

/// A browser: no redirects followed, its session cookie sent by hand.
struct Browser<'a> {
    ctl: &'a Ctl,
    http: reqwest::Client,
    cookie: String,
    csrf: String,
}

struct Page {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    html: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get(LOCATION)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

impl<'a> Browser<'a> {
    /// Signs in by pasting `token` on the sign-in page.
    async fn sign_in(ctl: &'a Ctl, token: &str) -> Browser<'a> {
        let http = client();
        let r = http
            .post(format!("{}/ui/signin", ctl.base))
            .header("origin", &ctl.base)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode(&[("token", token), ("return_to", "/")]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "sign-in refused");
        let set = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Lax"),
            "{set}"
        );
        let cookie = set.split(';').next().unwrap().to_owned();
        let mut b = Browser {
            ctl,
            http,
            cookie,
            csrf: String::new(),
        };
        let home = b.get("/").await;
        assert_eq!(home.status, StatusCode::OK, "{}", home.html);
        b.csrf = csrf_of(&home.html);
        b
    }

    async fn get(&self, path: &str) -> Page {
        let r = self
            .http
            .get(format!("{}{path}", self.ctl.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap();
        Page {
            status: r.status(),
            headers: r.headers().clone(),
            html: r.text().await.unwrap(),
        }
    }

    /// Posts a form from this controller's own page (its Origin, its CSRF token).
    async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Page {
        let mut all: Vec<(&str, &str)> = vec![("csrf", &self.csrf)];
        all.extend_from_slice(fields);
        self.post_raw(path, &all, Some(&self.ctl.base)).await
    }

    async fn post_raw(&self, path: &str, fields: &[(&str, &str)], origin: Option<&str>) -> Page {
        let mut req = self
            .http
            .post(format!("{}{path}", self.ctl.base))
            .header("cookie", &self.cookie)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode(fields));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let r = req.send().await.unwrap();
        Page {
            status: r.status(),
            headers: r.headers().clone(),
            html: r.text().await.unwrap(),
        }
    }
}

fn encode(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

fn csrf_of(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[at..at + 64].to_owned()
}

/// The number in a tab's count badge.
fn tab_count(html: &str, tab: &str) -> u64 {
    let at = html.find(&format!("id=\"tab-{tab}\"")).unwrap();
    let rest = &html[at..];
    let c = rest.find("class=\"count\"").unwrap();
    let rest = &rest[c..];
    let open = rest.find('>').unwrap() + 1;
    let close = rest.find('<').unwrap();
    rest[open..close].trim().parse().unwrap()
}

#[tokio::test]
async fn a_browser_without_a_session_is_sent_to_sign_in_and_a_wrong_token_is_refused() {
    let ctl = Ctl::start().await;
    let http = client();
    let r = http
        .get(format!("{}/?tab=requests", ctl.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        r.headers()[LOCATION],
        "/ui/signin?return_to=%2F%3Ftab%3Drequests"
    );
    let page = http
        .get(format!("{}/ui/signin?return_to=//evil.example", ctl.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("name=\"return_to\" value=\"/\""),
        "another site is never returned to"
    );
    // A wrong token: 401, no cookie, audited as a refused sign-in.
    let r = http
        .post(format!("{}/ui/signin", ctl.base))
        .header("origin", &ctl.base)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(encode(&[("token", "jg_abc.wrong")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("token: Authentication failed")
    );
    let refused = ctl.audit("action=auth.signin").await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["outcome"], "denied");
    // Another site cannot sign a browser in to its own credential (login CSRF), nor
    // can a form without any Origin (browsers always send one).
    for origin in [Some("https://evil.example"), None] {
        let mut req = http
            .post(format!("{}/ui/signin", ctl.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encode(&[("token", OWNER)]));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "origin {origin:?}");
        assert!(r.headers().get(SET_COOKIE).is_none());
    }
    // A cookie with a wrong or revoked credential: 401, the cookie cleared, audited
    // like any refused credential.
    let r = http
        .get(format!("{}/ui/vms/prod/web-1", ctl.base))
        .header("cookie", "jitgate_session=jg_abc.wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    assert!(r.text().await.unwrap().contains("Your session has ended"));
    let failed = ctl.audit("action=authentication.failed").await;
    assert!(
        failed.iter().any(|e| e["target"] == "/ui/vms/prod/web-1"),
        "{failed:?}"
    );
    // A page is never answered as JSON 401, and the API still is.
    let api = http
        .get(format!("{}/api/v1/vms", ctl.base))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn pages_carry_a_strict_content_security_policy_and_load_no_inline_script() {
    let ctl = Ctl::start().await;
    let b = Browser::sign_in(&ctl, OWNER).await;
    let home = b.get("/").await;
    let csp = home.headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(home.headers["x-frame-options"], "DENY");
    assert_eq!(home.headers["cache-control"], "no-store");
    // Every script is a file of the controller's; no inline handler either.
    assert!(
        home.html
            .contains("<script src=\"/ui/assets/app.js\" defer></script>")
    );
    assert_eq!(home.html.matches("<script").count(), 1);
    assert!(!home.html.contains(" onclick="));
    for asset in ["app.js", "app.css"] {
        let a = b.get(&format!("/ui/assets/{asset}")).await;
        assert_eq!(a.status, StatusCode::OK, "{asset}");
        assert!(
            !a.html.contains("http://") && !a.html.contains("https://"),
            "{asset} loads nothing from elsewhere"
        );
    }
    assert_eq!(
        b.get("/ui/assets/../Cargo.toml").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn tab_counts_match_the_api_and_enabling_moves_vms_to_configured() {
    let ctl = Ctl::start().await;
    ctl.enable("prod", &["web-1"], "*").await;
    ctl.register("prod", "db-1").await;
    ctl.register("prod", "db-2").await;
    let b = Browser::sign_in(&ctl, OWNER).await;
    let home = b.get("/").await;
    // No agent reports for any of them: one configured, two unsupported.
    assert_eq!(tab_count(&home.html, "configured"), 1);
    assert_eq!(tab_count(&home.html, "not-configured"), 0);
    assert_eq!(tab_count(&home.html, "unsupported"), 2);
    let unsupported = b.get("/?tab=unsupported").await.html;
    assert!(unsupported.contains("No agent enrolled"));
    assert!(unsupported.contains("db-1") && unsupported.contains("db-2"));

    // "Enable JIT on 2 VMs" with the pane's defaults edited: 22 for TCP from a
    // prefix for 2 hours, 3389 kept, 5985 and 5986 removed (their port cleared).
    let (db1, db2) = (ctl.vm_id("prod", "db-1"), ctl.vm_id("prod", "db-2"));
    let pane = b.get(&format!("/ui/enable?vm={db1}&vm={db2}")).await;
    assert!(pane.html.contains("Enable JIT on 2 VMs"));
    for port in ["22", "3389", "5985", "5986"] {
        assert!(
            pane.html
                .contains(&format!("name=\"port\" value=\"{port}\"")),
            "{port}"
        );
    }
    let before = ctl.snapshot().await;
    // Bad input: the field is named, nothing changes.
    let bad = b
        .post(
            "/ui/enable",
            &[
                ("vm", &db1),
                ("port", "22"),
                ("protocol", "TCP"),
                ("sources", "10.0.0.0/33"),
                ("hours", "2"),
            ],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.html.contains("ports[0].allowedSourceAddressPrefixes"),
        "{}",
        bad.html
    );
    let bad = b
        .post(
            "/ui/enable",
            &[("vm", &db1), ("port", "22"), ("hours", "100")],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.html.contains("maxRequestAccessDuration"),
        "{}",
        bad.html
    );
    assert_eq!(ctl.snapshot().await, before);

    let done = b
        .post(
            "/ui/enable",
            &[
                ("vm", &db1),
                ("vm", &db2),
                ("port", "22"),
                ("protocol", "TCP"),
                ("sources", "10.0.0.0/8"),
                ("hours", "2"),
                ("port", "3389"),
                ("protocol", "*"),
                ("sources", "*"),
                ("hours", "3"),
                ("port", ""),
                ("protocol", "*"),
                ("sources", "*"),
                ("hours", "3"),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.html);
    assert_eq!(done.location(), "/?tab=configured");
    let policy = ctl.get_policy("prod").await;
    let vms = policy["properties"]["virtualMachines"].as_array().unwrap();
    assert_eq!(vms.len(), 3);
    let db1_entry = vms.iter().find(|v| v["id"] == db1.as_str()).unwrap();
    assert_eq!(
        db1_entry["ports"],
        json!([
            {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefixes": ["10.0.0.0/8"], "maxRequestAccessDuration": "PT2H"},
            {"number": 3389, "protocol": "*", "allowedSourceAddressPrefixes": ["*"], "maxRequestAccessDuration": "PT3H"}
        ])
    );
    let home = b.get("/").await;
    assert_eq!(tab_count(&home.html, "configured"), 3);
    assert_eq!(tab_count(&home.html, "unsupported"), 0);
    let events = ctl.audit("action=policies.enable").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["actor"], "bootstrap-admin");
}

#[tokio::test]
async fn forms_from_another_site_or_without_the_csrf_token_change_nothing() {
    let ctl = Ctl::start().await;
    ctl.register("prod", "db-1").await;
    let b = Browser::sign_in(&ctl, OWNER).await;
    let db1 = ctl.vm_id("prod", "db-1");
    let fields = [("vm", db1.as_str()), ("port", "22"), ("hours", "1")];
    let other = ctl
        .principal("carol", "Owner", &format!("/subscriptions/{}", ctl.sub))
        .await;
    let carol = Browser::sign_in(&ctl, &other).await;
    let before = ctl.snapshot().await;
    // No token.
    let r = b.post_raw("/ui/enable", &fields, Some(&ctl.base)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.html.contains("CSRF"), "{}", r.html);
    // Another session's token.
    let mut with_carols = vec![("csrf", carol.csrf.as_str())];
    with_carols.extend_from_slice(&fields);
    let r = b
        .post_raw("/ui/enable", &with_carols, Some(&ctl.base))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // The right token from another site.
    let mut with_token = vec![("csrf", b.csrf.as_str())];
    with_token.extend_from_slice(&fields);
    let r = b
        .post_raw("/ui/enable", &with_token, Some("https://evil.example"))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.html.contains("another site"), "{}", r.html);
    assert_eq!(ctl.snapshot().await, before);
    // Signing out ends the page's use of the cookie's credential... for a pasted
    // token only locally (an administrator's token is not revoked by a browser).
    let out = b.post("/ui/signout", &[]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(
        out.headers[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test]
async fn a_requester_requests_with_my_ip_sees_the_grant_and_revokes_and_cannot_configure() {
    let ctl = Ctl::start().await;
    ctl.enable("prod", &["web-1", "web-2"], "*").await;
    let web1 = ctl.vm_id("prod", "web-1");
    let alice = ctl.principal("alice", "JIT Requester", &web1).await;
    let b = Browser::sign_in(&ctl, &alice).await;
    // She sees only what she may read.
    let home = b.get("/").await;
    assert_eq!(tab_count(&home.html, "configured"), 1);
    assert!(home.html.contains("web-1") && !home.html.contains("web-2"));
    assert!(!home.html.contains("id=\"enable-jit\""));

    let pane = b.get(&format!("/ui/request?vm={web1}")).await;
    assert!(
        pane.html
            .contains("<strong id=\"my-ip\">127.0.0.1</strong>"),
        "{}",
        pane.html
    );
    assert!(
        pane.html
            .contains("name=\"min.0.22\" min=\"5\" max=\"180\"")
    );
    // Out of the policy's bounds: refused with the field named, nothing changes.
    let before = ctl.snapshot().await;
    let bad = b
        .post(
            "/ui/request",
            &[
                ("vm", &web1),
                ("on", "0.3389"),
                ("src.0.3389", "myip"),
                ("min.0.3389", "600"),
            ],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    // Shown again as it was filled in: 3389 on, 22 off.
    assert!(
        bad.html
            .contains("value=\"0.3389\" checked id=\"on-0.3389\""),
        "{}",
        bad.html
    );
    assert!(
        bad.html.contains("value=\"0.22\" id=\"on-0.22\""),
        "{}",
        bad.html
    );
    assert!(
        bad.html
            .contains("time of port 3389 on web-1: choose 1 to 60 minutes"),
        "{}",
        bad.html
    );
    assert_eq!(ctl.snapshot().await, before);

    let script = "<script>alert('x')</script> \"quoted\" & more";
    let done = b
        .post(
            "/ui/request",
            &[
                ("vm", &web1),
                ("on", "0.22"),
                ("src.0.22", "myip"),
                ("min.0.22", "30"),
                ("justification", script),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.html);
    assert_eq!(done.location(), "/ui/vms/prod/web%2D1");
    let vm = b.get("/ui/vms/prod/web-1").await;
    assert!(
        vm.html.contains("open for alice from 127.0.0.1"),
        "{}",
        vm.html
    );
    assert!(vm.html.contains("jitgate ssh &#60;user&#62;@web-1"));
    // The justification is shown as text wherever it appears.
    let requests = b.get("/?tab=requests").await;
    assert!(
        requests
            .html
            .contains("&#60;script&#62;alert(&#39;x&#39;)&#60;/script&#62;")
    );
    assert!(!requests.html.contains("<script>alert"));
    let list = ctl.get("/api/v1/requests?mine=false").await;
    let id = list.body["value"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        list.body["value"][0]["virtualMachines"][0]["ports"][0]["allowedSourceAddressPrefix"],
        "127.0.0.1"
    );

    // Configuring is not hers: the form is refused as the API refuses it.
    let before = ctl.snapshot().await;
    let edit = b
        .post(
            "/ui/vms/prod/web-1/edit",
            &[("port", "2222"), ("hours", "1")],
        )
        .await;
    assert_eq!(edit.status, StatusCode::FORBIDDEN, "{}", edit.html);
    let remove = b.post("/ui/vms/prod/web-1/remove", &[]).await;
    assert_eq!(remove.status, StatusCode::FORBIDDEN, "{}", remove.html);
    assert_eq!(ctl.snapshot().await, before);
    let denied = ctl.audit("action=authorization.denied").await;
    assert!(denied.iter().any(|e| e["actor"] == "alice"), "{denied:?}");

    // Revoke from the Connect card.
    let revoked = b
        .post(
            &format!("/ui/requests/{id}/revoke"),
            &[("back", "/ui/vms/prod/web-1")],
        )
        .await;
    assert_eq!(revoked.status, StatusCode::SEE_OTHER, "{}", revoked.html);
    assert_eq!(revoked.location(), "/ui/vms/prod/web-1");
    let vm = b.get("/ui/vms/prod/web-1").await;
    assert!(vm.html.contains("No port is open now."));
}

#[tokio::test]
async fn an_approver_approves_from_the_requests_tab_and_the_activity_log_downloads_as_csv() {
    let ctl = Ctl::start().await;
    ctl.enable("prod", &["web-1"], "*").await;
    let rg = format!("/subscriptions/{}/resourceGroups/prod", ctl.sub);
    let r = ctl
        .put(
            "/api/v1/approvalRules/prod",
            json!({"scope": rg, "minApprovals": 1, "requireJustification": true}),
        )
        .await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let alice = ctl.principal("alice", "JIT Requester", &rg).await;
    let bob = ctl.principal("bob", "JIT Approver", &rg).await;
    let a = Browser::sign_in(&ctl, &alice).await;
    let web1 = ctl.vm_id("prod", "web-1");
    // The rule wants a justification: the API's refusal is shown on the form.
    let r = a
        .post(
            "/ui/request",
            &[
                ("vm", &web1),
                ("on", "0.22"),
                ("src.0.22", "myip"),
                ("min.0.22", "60"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.html);
    assert!(r.html.contains("justification"), "{}", r.html);
    let r = a
        .post(
            "/ui/request",
            &[
                ("vm", &web1),
                ("on", "0.22"),
                ("src.0.22", "myip"),
                ("min.0.22", "60"),
                ("justification", "patching"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.html);
    let mine = a.get("/?tab=requests").await;
    assert!(mine.html.contains("state-Pending"), "{}", mine.html);
    assert!(
        !mine.html.contains(">Approve</button>"),
        "no one approves their own"
    );

    let b = Browser::sign_in(&ctl, &bob).await;
    let home = b.get("/").await;
    assert_eq!(tab_count(&home.html, "requests"), 1, "one waits for bob");
    let review = b.get("/?tab=requests&view=review").await;
    assert!(review.html.contains(">Approve</button>"), "{}", review.html);
    let id = ctl.get("/api/v1/requests").await.body["value"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = b
        .post(
            &format!("/ui/requests/{id}/approve"),
            &[
                ("reason", "<b>ok</b>"),
                ("back", "/?tab=requests&view=review"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.html);
    let all = b.get("/?tab=requests&view=all").await;
    assert!(all.html.contains("state-Active"), "{}", all.html);
    assert!(
        all.html
            .contains("approve by bob: &#60;b&#62;ok&#60;/b&#62;"),
        "{}",
        all.html
    );

    // The activity log of the VM, in the page and as CSV (the owner reads the log);
    // another VM whose name starts the same is not in it.
    ctl.register("prod", "web-10").await;
    let o = Browser::sign_in(&ctl, OWNER).await;
    let vm = o.get("/ui/vms/prod/web-1").await;
    assert!(vm.html.contains("request.initiate"), "{}", vm.html);
    let csv = o.get("/ui/vms/prod/web-1/activity.csv").await;
    assert_eq!(csv.status, StatusCode::OK);
    assert_eq!(
        csv.headers["content-disposition"],
        "attachment; filename=\"activity-web-1.csv\""
    );
    let mut rows = csv::Reader::from_reader(csv.html.as_bytes());
    let header = rows.headers().unwrap().clone();
    let action = header.iter().position(|h| h == "action").unwrap();
    let actor = header.iter().position(|h| h == "actor").unwrap();
    let records: Vec<csv::StringRecord> = rows.records().map(|r| r.unwrap()).collect();
    assert!(
        records
            .iter()
            .any(|r| &r[action] == "request.initiate" && &r[actor] == "alice"),
        "{records:?}"
    );
    let target = header.iter().position(|h| h == "target").unwrap();
    assert!(
        records.iter().all(|r| !r[target].ends_with("/web-10")),
        "{records:?}"
    );
    assert!(
        records.iter().any(|r| &r[action] == "request.approve"),
        "{records:?}"
    );
    // A requester may not read the log: the page says so, the CSV is refused.
    let denied = a.get("/ui/vms/prod/web-1/activity.csv").await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_access_page_grants_a_person_a_role_on_one_vm_and_explains_it() {
    let ctl = Ctl::start().await;
    ctl.enable("prod", &["web-1", "web-2"], "*").await;
    let web1 = ctl.vm_id("prod", "web-1");
    let o = Browser::sign_in(&ctl, OWNER).await;
    let page = o.get(&format!("/ui/access?scope={web1}")).await;
    assert_eq!(page.status, StatusCode::OK);
    let bad = o
        .post(
            "/ui/access",
            &[
                ("scope", &web1),
                ("principal", "dave"),
                ("role", "Emperor"),
                ("at", &web1),
            ],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.html);
    assert!(bad.html.contains("role"), "{}", bad.html);
    let added = o
        .post(
            "/ui/access",
            &[
                ("scope", &web1),
                ("principal", "dave"),
                ("role", "JIT Requester"),
                ("at", &web1),
            ],
        )
        .await;
    assert_eq!(added.status, StatusCode::SEE_OTHER, "{}", added.html);
    let roles = ctl.get("/api/v1/roleAssignments").await.body;
    let dave = roles["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["principal"] == "dave")
        .unwrap()
        .clone();
    assert_eq!(dave["role"], "JIT Requester");
    assert_eq!(
        dave["scope"].as_str().unwrap().to_ascii_lowercase(),
        web1.to_ascii_lowercase()
    );
    let explained = o.get(&format!("/ui/access?scope={web1}&who=dave")).await;
    assert!(
        explained.html.contains("dave is JIT Requester at")
            && explained.html.contains("(it covers this scope)"),
        "{}",
        explained.html
    );
    // Dave can request web-1 and nothing else.
    let t = ctl
        .post("/api/v1/tokens", json!({"principal": "dave"}))
        .await;
    let dave_token = t.body["token"].as_str().unwrap().to_owned();
    let d = Browser::sign_in(&ctl, &dave_token).await;
    let home = d.get("/").await;
    assert!(home.html.contains("web-1") && !home.html.contains("web-2"));
    let r = d
        .post(
            "/ui/request",
            &[
                ("vm", &web1),
                ("on", "0.22"),
                ("src.0.22", "myip"),
                ("min.0.22", "10"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.html);
    let web2 = ctl.vm_id("prod", "web-2");
    let r = d.get(&format!("/ui/request?vm={web2}")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.html);
    assert!(!r.html.contains("id=\"request-form\""));
    // Removing the assignment.
    let id = dave["id"].as_str().unwrap();
    let removed = o
        .post("/ui/access", &[("scope", &web1), ("remove", id)])
        .await;
    assert_eq!(removed.status, StatusCode::SEE_OTHER, "{}", removed.html);
    let again = d.get("/").await;
    assert!(!again.html.contains("web-1"), "the role is gone");
}

#[tokio::test]
async fn apply_with_named_vms_validates_every_field() {
    let ctl = Ctl::start().await;
    ctl.register("prod", "db-1").await;
    let db1 = ctl.vm_id("prod", "db-1");
    let before = ctl.snapshot().await;
    for (body, field) in [
        (json!({"vms": []}), "vms"),
        (json!({"vms": ["not-an-id"]}), "vms[0]"),
        (
            json!({"vms": [format!("/subscriptions/{}/resourceGroups/prod/providers/Microsoft.Compute/virtualMachines/nope", ctl.sub)]}),
            "vms[0]",
        ),
        (json!({"vms": [db1], "resourceGroup": "other"}), "vms[0]"),
        (json!({"vms": [db1], "ports": []}), "ports"),
        (
            json!({"vms": [db1], "ports": [{"number": 0}]}),
            "ports[0].number",
        ),
        (
            json!({"vms": [db1], "ports": [{"number": 22}, {"number": 22}]}),
            "ports[1].number",
        ),
        (
            json!({"vms": [db1], "ports": [{"number": 22, "protocol": "ICMP"}]}),
            "ports[0].protocol",
        ),
        (json!({"ports": [{"number": 22}]}), "ports"),
    ] {
        let r = ctl
            .post("/api/v1/recommendations/apply", body.clone())
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {:?}", r.body);
        assert_eq!(r.body["error"]["target"], field, "{body}: {:?}", r.body);
    }
    assert_eq!(ctl.snapshot().await, before);
    // The defaults are the reference's four ports.
    let r = ctl
        .post("/api/v1/recommendations/apply", json!({"vms": [db1]}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["enabled"][0]["ports"], json!([22, 3389, 5985, 5986]));
}

#[tokio::test]
async fn a_tab_of_more_than_a_thousand_vms_is_read_a_page_at_a_time() {
    let ctl = Ctl::start().await;
    for i in 0..1005 {
        let r = ctl
            .post(
                "/api/v1/vms",
                json!({"resourceGroup": "fleet", "name": format!("node-{i:04}")}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
    let b = Browser::sign_in(&ctl, OWNER).await;
    let first = b.get("/?tab=unsupported").await;
    assert_eq!(tab_count(&first.html, "unsupported"), 1005);
    assert_eq!(first.html.matches("<tr data-vm=").count(), 50);
    assert!(first.html.contains(">node-0000<") && !first.html.contains(">node-0050<"));
    let at = first.html.find("id=\"next-page\"").unwrap();
    let href_at = first.html[..at].rfind("href=\"").unwrap() + 6;
    let href = first.html[href_at..at]
        .split('"')
        .next()
        .unwrap()
        .replace("&#38;", "&");
    let second = b.get(&href).await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(second.html.contains(">node-0050<") && !second.html.contains(">node-0000<"));
    // The search is the store's: across every page.
    let found = b.get("/?tab=unsupported&q=node-1003").await;
    assert_eq!(
        found.html.matches("<tr data-vm=").count(),
        1,
        "{}",
        found.html
    );
    // Bad parameters of the list name themselves.
    let plain = ctl.get("/api/v1/recommendations?limit=1").await;
    assert!(plain.body.get("tabs").is_none(), "counted only when asked");
    let counted = ctl.get("/api/v1/recommendations?limit=1&tabs=true").await;
    assert_eq!(counted.body["tabs"]["unsupported"], 1005);
    for (query, field) in [
        ("tab=bogus", "tab"),
        ("search=", "search"),
        ("tabs=maybe", "tabs"),
    ] {
        let r = ctl.get(&format!("/api/v1/recommendations?{query}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(r.body["error"]["target"], field, "{query}");
    }
}
