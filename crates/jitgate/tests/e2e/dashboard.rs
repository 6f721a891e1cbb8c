//! The dashboard clicked through in a real browser: Debian's Chromium, headless,
//! driven over W3C WebDriver by its own `chromedriver` (same Debian source package,
//! so their versions match; nothing downloads a browser), against the real
//! controller and the real agent of the lab. The browser runs in client A's network
//! namespace, so "My IP" is A's address and the port it opens is really tested from
//! A (and B stays shut out).
//!
//! A screenshot of each page is saved under `target/tmp/dashboard/` (the test
//! prints the directory). Needs `chromium` and `chromium-driver`
//! (`scripts/setup-deps.sh --tests` installs them); without them the test fails
//! saying so.

use std::process::{Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::common::Kill;
use crate::lab::{Lab, OWNER, RG, SSH, VM, in_ns, wait_for};

const DRIVER_PORT: u16 = 9515;

/// Fails, naming the packages, when the browser or its driver is missing.
fn browser_preconditions() {
    for (bin, package) in [
        ("/usr/bin/chromium", "chromium"),
        ("/usr/bin/chromedriver", "chromium-driver"),
    ] {
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: the dashboard tests drive a real browser; install the Debian \
             package {package} (apt-get install -y chromium chromium-driver, or \
             scripts/setup-deps.sh --tests)"
        );
    }
}

/// Where screenshots go: a test artifact directory under the target directory.
fn shots_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A headless Chromium in `ns`, driven through chromedriver listening there.
struct Browser {
    _driver: Kill,
    profile: tempfile::TempDir,
}

impl Browser {
    fn start(ns: &str) -> Browser {
        browser_preconditions();
        let driver = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "/usr/bin/chromedriver",
                &format!("--port={DRIVER_PORT}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start chromedriver");
        let driver = Kill(driver);
        wait_for("chromedriver to listen", Duration::from_secs(20), || {
            in_ns(ns, || {
                std::net::TcpStream::connect(("127.0.0.1", DRIVER_PORT)).is_ok()
            })
        });
        Browser {
            _driver: driver,
            profile: tempfile::tempdir().unwrap(),
        }
    }

    async fn client(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,1000",
                    format!("--user-data-dir={}", self.profile.path().display()),
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{DRIVER_PORT}"))
            .await
            .expect("cannot open a browser session through chromedriver")
    }
}

/// Saves a screenshot of the page as `<n>-<name>.png`.
async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots_dir().join(format!("{name}.png")), png).unwrap();
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Clicks the element. The page's live update may replace a region between finding
/// the element and clicking it (it never replaces the region holding the focus, so
/// once clicked the element stays); a stale element is found again.
async fn click(c: &Client, css: &str) {
    for attempt in 1.. {
        let e = c
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"));
        match e.click().await {
            Ok(_) => return,
            Err(e) if attempt < 5 && e.to_string().contains("stale element") => {}
            Err(e) => panic!("cannot click {css}: {e}"),
        }
    }
}

async fn fill(c: &Client, css: &str, value: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

async fn sign_in(c: &Client, base: &str, token: &str) {
    c.goto(&format!("{base}/")).await.unwrap();
    // Sent to sign in first.
    assert!(
        c.current_url()
            .await
            .unwrap()
            .path()
            .starts_with("/ui/signin")
    );
    fill(c, "#token", token).await;
    click(c, "#signin-submit").await;
    wait_element(c, "#tab-configured").await;
}

async fn sign_out(c: &Client) {
    click(c, "form.who button").await;
    wait_element(c, "#token").await;
}

/// Waits (up to 10 s, without navigating) until `css` matches on the page.
async fn wait_element(c: &Client, css: &str) {
    for _ in 0..100 {
        if c.find(Locator::Css(css)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{css} did not appear on the page within 10 s");
}

/// From the Configured tab: vm1 ticked, Request access, every port but 22 switched
/// off.
async fn request_port_22(c: &Client) {
    click(c, "#configured tr[data-vm='vm1'] input[name=vm]").await;
    click(c, "#request-access").await;
    wait_element(c, "#request-form").await;
    for port in ["3389", "5985", "5986", "2222"] {
        click(c, &format!("#on-0\\.{port}")).await;
    }
}

/// The number in a tab's badge.
async fn count(c: &Client, tab: &str) -> u64 {
    text(c, &format!("#tab-{tab} .count"))
        .await
        .parse()
        .unwrap()
}

#[test]
fn the_dashboard_in_a_real_browser() {
    let lab = Lab::start();
    // A second VM, without an agent: unsupported until someone runs one.
    let r = lab.admin(
        "POST",
        "/api/v1/vms",
        Some(json!({"resourceGroup": RG, "name": "vm2", "location": "westeurope"})),
    );
    assert_eq!(r.status, 201, "{:?}", r.body);
    // The agent's report makes vm1 Unhealthy (SSH listens, reachable from anyone).
    wait_for("vm1 to be unhealthy", Duration::from_secs(20), || {
        let r = lab.admin("GET", "/api/v1/recommendations", None);
        r.body["value"].as_array().is_some_and(|v| {
            v.iter()
                .any(|x| x["name"] == VM && x["verdict"] == "Unhealthy")
        })
    });
    let browser = Browser::start(&lab.a.ns);
    let base = lab.base();
    let dir = shots_dir();
    println!("screenshots in {}", dir.display());
    let ssh = lab.vm.v4_at(SSH);
    assert!(lab.a.tcp_open(ssh), "before JIT, port 22 answers A");

    let scenario = async {
        let c = browser.client().await;
        sign_in(&c, &base, OWNER).await;
        shot(&c, "01-overview").await;
        // The tab counts are the API's.
        assert_eq!(count(&c, "configured").await, 0);
        assert_eq!(count(&c, "not-configured").await, 1);
        assert_eq!(count(&c, "unsupported").await, 1);

        // Not configured → select vm1 → "Enable JIT on 1 VM" → the pane's defaults.
        click(&c, "#tab-not-configured").await;
        wait_element(&c, "#not-configured").await;
        let button = c.find(Locator::Css("#enable-jit")).await.unwrap();
        assert!(
            !button.is_enabled().await.unwrap(),
            "disabled until a VM is ticked"
        );
        click(&c, "#not-configured tr[data-vm='vm1'] input[name=vm]").await;
        assert_eq!(text(&c, "#enable-jit").await, "Enable JIT on 1 VM");
        shot(&c, "02-not-configured").await;
        click(&c, "#enable-jit").await;
        wait_element(&c, "#ports-form").await;
        assert_eq!(text(&c, "#pane-heading").await, "Enable JIT on 1 VM");
        let ports: Vec<String> = {
            let mut v = Vec::new();
            for e in c.find_all(Locator::Css("input[name=port]")).await.unwrap() {
                v.push(e.prop("value").await.unwrap().unwrap_or_default());
            }
            v
        };
        assert_eq!(ports[..4], ["22", "3389", "5985", "5986"]);
        // Add a custom port with the Add button, then save.
        click(&c, "button[data-add-row]").await;
        let rows = c.find_all(Locator::Css("input[name=port]")).await.unwrap();
        rows[rows.len() - 2].send_keys("2222").await.unwrap();
        shot(&c, "03-enable-pane").await;
        click(&c, "#save").await;
        wait_element(&c, "#configured").await;
        assert_eq!(count(&c, "configured").await, 1);
        assert_eq!(count(&c, "not-configured").await, 0);
        let pid = lab.vm_view()["policy"].as_str().unwrap().to_owned();
        let policy = lab.admin("GET", &format!("{pid}?api-version=2020-01-01"), None);
        let numbers: Vec<u64> = policy.body["properties"]["virtualMachines"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["number"].as_u64().unwrap())
            .collect();
        assert_eq!(numbers, [22, 3389, 5985, 5986, 2222]);
        lab.wait_agent_up_to_date();
        assert!(!lab.a.tcp_open(ssh), "JIT closed port 22");
        shot(&c, "04-configured").await;

        // Request access with My IP for port 22 only, 30 minutes, a hostile
        // justification.
        request_port_22(&c).await;
        assert_eq!(text(&c, "#my-ip").await, lab.a.v4.to_string());
        let slider = c
            .find(Locator::Css("input[name='min.0.22']"))
            .await
            .unwrap();
        assert_eq!(slider.attr("max").await.unwrap().as_deref(), Some("180"));
        fill(
            &c,
            "#justification",
            "<script>alert('x')</script> patch night",
        )
        .await;
        shot(&c, "05-request-access").await;
        click(&c, "#open-ports").await;
        wait_element(&c, "#connect .grant").await;
        lab.a.wait_tcp_open(ssh, Duration::from_secs(5));
        assert!(
            !lab.b.tcp_open(ssh),
            "only the requester's address is let in"
        );
        // The countdown runs.
        let mut counting = false;
        for _ in 0..50 {
            if text(&c, "#connect time.countdown").await.contains("left") {
                counting = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(counting, "the countdown does not run");
        let card = text(&c, "#connect").await;
        assert!(card.contains(&format!("from {}", lab.a.v4)), "{card}");
        assert!(card.contains("jitgate ssh <user>@vm1"), "{card}");
        shot(&c, "06-connect-card").await;
        // The justification is text, not script: no alert opened.
        click(&c, "a[href='/']").await;
        click(&c, "#tab-requests").await;
        let row = text(&c, "#requests tbody tr").await;
        assert!(
            row.contains("<script>alert('x')</script> patch night"),
            "{row}"
        );
        assert!(c.get_alert_text().await.is_err(), "no script ran");
        shot(&c, "07-requests").await;

        // Revoke from the Connect card: the port closes at once.
        c.goto(&format!("{base}/ui/vms/{RG}/{VM}")).await.unwrap();
        click(&c, "#revoke-22").await;
        wait_element(&c, "#connect .empty").await;
        lab.a.wait_tcp_closed(ssh, Duration::from_secs(5));

        // Live: a grant made elsewhere (the API) appears on the open page without a
        // reload, with its countdown, and goes when it is revoked there.
        let marker = c
            .execute("window.__notReloaded = true; return true;", vec![])
            .await
            .unwrap();
        assert_eq!(marker, Value::Bool(true));
        let r = lab.call(
            &lab.a,
            "POST",
            &format!("{pid}/initiate?api-version=2020-01-01"),
            Some(OWNER),
            Some(json!({"virtualMachines": [{"id": lab.vm_id(), "ports": [{"number": SSH, "duration": "PT10M"}]}]})),
        );
        assert_eq!(r.status, 202, "{:?}", r.body);
        let id = r.headers["x-jitgate-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        wait_element(&c, "#connect .grant time.countdown").await;
        let r = lab.admin(
            "POST",
            &format!("/api/v1/requests/{id}/revoke"),
            Some(json!({})),
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
        wait_element(&c, "#connect .empty").await;
        let same = c
            .execute("return window.__notReloaded === true;", vec![])
            .await
            .unwrap();
        assert_eq!(
            same,
            Value::Bool(true),
            "the page was reloaded, not updated"
        );

        // The activity log, filtered to the VM, and its CSV.
        let log = text(&c, "#activity-log").await;
        assert!(
            log.contains("request.initiate") && log.contains("request.revoke"),
            "{log}"
        );
        shot(&c, "08-vm-page").await;
        let href = c
            .find(Locator::Css("#download-csv"))
            .await
            .unwrap()
            .attr("href")
            .await
            .unwrap()
            .unwrap();
        let csv = c
            .execute_async(
                "const [href, done] = arguments; fetch(href).then(r => r.text()).then(done);",
                vec![Value::String(href)],
            )
            .await
            .unwrap();
        let csv = csv.as_str().unwrap().to_owned();
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let header = reader.headers().unwrap().clone();
        let action = header.iter().position(|h| h == "action").unwrap();
        let source = header.iter().position(|h| h == "source").unwrap();
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert!(
            rows.iter()
                .any(|r| &r[action] == "request.initiate" && r[source] == *lab.a.v4.to_string()),
            "{csv}"
        );
        assert!(rows.iter().any(|r| &r[action] == "request.revoke"), "{csv}");

        // Access: dave becomes a Requester of vm1 only.
        c.goto(&format!("{base}/ui/access?scope={}", lab.vm_id()))
            .await
            .unwrap();
        fill(&c, "#add-principal", "dave").await;
        click(&c, "#add-submit").await;
        wait_element(&c, "#assignments").await;
        assert!(text(&c, "#assignments").await.contains("dave"));
        shot(&c, "09-access").await;
        // Add machines (issue 17): the install line for a resource group, never the
        // token; bad input shown on the form, naming the field.
        c.goto(&format!("{base}/ui/machines")).await.unwrap();
        fill(&c, "#machines-rg", "no such group!").await;
        click(&c, "#machines-submit").await;
        wait_element(&c, "#form-error").await;
        assert!(text(&c, "#form-error").await.contains("scope"));
        assert!(c.find(Locator::Css("#install-line")).await.is_err());
        fill(&c, "#machines-rg", RG).await;
        fill(&c, "#machines-uses", "3").await;
        click(&c, "#machines-submit").await;
        wait_element(&c, "#install-line").await;
        let line = text(&c, "#install-line").await;
        assert!(
            line.starts_with("curl -fsS ")
                && line.contains(&format!("{base}/install.sh?code="))
                && line.ends_with("| sudo sh")
                && !line.contains("je_"),
            "{line}"
        );
        shot(&c, "09b-add-machines").await;
        let tokens = lab.admin("GET", "/api/v1/enrollTokens", None);
        assert!(
            tokens.body["value"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| { t["description"] == "Add machines (dashboard)" && t["usesLeft"] == 3 }),
            "{:?}",
            tokens.body
        );
        // An approval rule on the resource group, and an approver.
        let scope = format!("/subscriptions/{}/resourceGroups/{RG}", lab.sub);
        let r = lab.admin(
            "PUT",
            "/api/v1/approvalRules/lab",
            Some(json!({"scope": scope, "minApprovals": 1})),
        );
        assert!(r.status == 200 || r.status == 201, "{:?}", r.body);
        let token_of = |who: &str| {
            let r = lab.admin("POST", "/api/v1/tokens", Some(json!({"principal": who})));
            assert_eq!(r.status, 201, "{:?}", r.body);
            r.body["token"].as_str().unwrap().to_owned()
        };
        let dave = token_of("dave");
        let bob = token_of("bob");
        let r = lab.admin(
            "POST",
            "/api/v1/roleAssignments",
            Some(json!({"principal": "bob", "role": "JIT Approver", "scope": scope})),
        );
        assert_eq!(r.status, 201, "{:?}", r.body);
        sign_out(&c).await;

        // Dave sees vm1 and not vm2, and his request waits for approval.
        sign_in(&c, &base, &dave).await;
        assert_eq!(count(&c, "configured").await, 1);
        assert_eq!(count(&c, "unsupported").await, 0, "vm2 is not his to see");
        request_port_22(&c).await;
        fill(&c, "#justification", "deploy").await;
        click(&c, "#open-ports").await;
        wait_element(&c, "#connect").await;
        assert!(!lab.a.tcp_open(ssh), "pending: still closed");
        c.goto(&format!("{base}/?tab=requests")).await.unwrap();
        assert!(text(&c, "#requests").await.contains("Pending"));
        sign_out(&c).await;

        // Bob approves it from the Requests tab, with a reason; the port opens.
        sign_in(&c, &base, &bob).await;
        assert_eq!(count(&c, "requests").await, 1, "one request waits for bob");
        click(&c, "#tab-requests").await;
        click(&c, "#view-review").await;
        fill(&c, "#requests input[name=reason]", "ok for tonight").await;
        shot(&c, "10-approve").await;
        click(&c, "#requests button[value=approve]").await;
        wait_element(&c, "#requests").await;
        lab.a.wait_tcp_open(ssh, Duration::from_secs(5));
        c.goto(&format!("{base}/?tab=requests&view=all"))
            .await
            .unwrap();
        let all = text(&c, "#requests").await;
        assert!(all.contains("approve by bob: ok for tonight"), "{all}");
        shot(&c, "11-approved").await;

        // The page is usable on a phone's width: nothing wider than the screen but
        // the tables' own scroll boxes.
        c.set_window_size(390, 844).await.unwrap();
        c.goto(&format!("{base}/")).await.unwrap();
        shot(&c, "12-phone").await;
        // Nothing wider than the screen: only the tables scroll, inside their boxes.
        let scrolls = c
            .execute(
                "return document.documentElement.scrollWidth > document.documentElement.clientWidth;",
                vec![],
            )
            .await
            .unwrap();
        let all = c
            .execute(
                "const w = document.documentElement.clientWidth; return [w, document.documentElement.scrollWidth, Array.from(document.querySelectorAll('body *'))\
                 .filter(e => e.getBoundingClientRect().right > w + 1)\
                 .map(e => e.tagName + '.' + e.className + '#' + e.id + ':' + e.getBoundingClientRect().right).slice(0, 10)];",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(
            scrolls,
            Value::Bool(false),
            "the page scrolls sideways on a phone: {all}"
        );
        c.close().await.unwrap();
    };
    in_ns(&lab.a.ns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(scenario)
    });
}
