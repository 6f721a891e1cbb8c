//! The dashboard's pages and forms. Each reads and writes through the API
//! ([`super::Api`]), as the signed-in person.

use std::collections::{BTreeMap, HashMap};

use askama::Template;
use axum::extract::{Path, Query, RawQuery};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use jitgate_core::Timestamp;
use jitgate_core::rbac::Action;
use jitgate_proto::api::{
    BlockedSeries, NsgView, Recommendation, RecommendationPage, Request, RequestPage, VmDetail,
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::render::{self, Bar, url_component};
use super::{Refused, Session, St};
use crate::AppState;
use crate::error::ErrorInfo;

/// Rows of a list shown at once.
const PAGE: usize = 50;
/// The most VMs one page or form acts on.
const MAX_VMS: usize = 100;
/// A tab with at most this many VMs is read whole (sorted by any column, paged here);
/// a larger one a page at a time in key order.
const IN_MEMORY: u64 = 1000;
/// Azure's JIT API version, for the policy calls.
const AZ: &str = "api-version=2020-01-01";

// ---- plumbing -------------------------------------------------------------------------

/// An API call that did not succeed, shown to the person.
pub(crate) struct Failed {
    status: StatusCode,
    info: Option<ErrorInfo>,
    message: String,
}

impl Failed {
    fn text(&self) -> String {
        match &self.info {
            Some(i) => match &i.target {
                Some(t) if !i.message.contains(t.as_str()) => format!("{t}: {}", i.message),
                _ => i.message.clone(),
            },
            None => self.message.clone(),
        }
    }
}

/// Calls the API as the session's person and decodes a success.
async fn api<T: DeserializeOwned>(
    state: &AppState,
    s: &Session,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> Result<T, Failed> {
    let (status, bytes, info) = state
        .web_api
        .call(&s.who, s.ip, method, uri, body)
        .await
        .map_err(|e| Failed {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            info: None,
            message: e,
        })?;
    if !status.is_success() {
        return Err(Failed {
            status,
            message: format!("the controller answered {status}"),
            info,
        });
    }
    let bytes = if bytes.is_empty() {
        axum::body::Bytes::from_static(b"null")
    } else {
        bytes
    };
    serde_json::from_slice(&bytes).map_err(|e| Failed {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        info: None,
        message: format!("cannot read the controller's answer: {e}"),
    })
}

async fn get<T: DeserializeOwned>(state: &AppState, s: &Session, uri: &str) -> Result<T, Failed> {
    api(state, s, Method::GET, uri, None).await
}

/// A page of any API list: its items and the token of the next page.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiPage<T> {
    value: Vec<T>,
    continuation_token: Option<String>,
}

/// Walks the pages of a list the API pages with `continuationToken` (at most `cap`
/// pages), handing each item to `keep` until it answers false.
async fn each_item<T: DeserializeOwned>(
    state: &AppState,
    s: &Session,
    uri: &str,
    cap: usize,
    mut keep: impl FnMut(T) -> bool,
) -> Result<(), Failed> {
    let mut next: Option<String> = None;
    for _ in 0..cap {
        let page_uri = match &next {
            Some(t) => format!("{uri}&continuationToken={}", url_component(t)),
            None => uri.to_owned(),
        };
        let page: ApiPage<T> = get(state, s, &page_uri).await?;
        for item in page.value {
            if !keep(item) {
                return Ok(());
            }
        }
        next = page.continuation_token;
        if next.is_none() {
            break;
        }
    }
    Ok(())
}

/// Every item of a paged list (at most `cap` pages).
async fn all_pages<T: DeserializeOwned>(
    state: &AppState,
    s: &Session,
    uri: &str,
    cap: usize,
) -> Result<Vec<T>, Failed> {
    let mut out = Vec::new();
    each_item(state, s, uri, cap, |item| {
        out.push(item);
        true
    })
    .await?;
    Ok(out)
}

/// A week before now: the reference's "Presented data is for the last week".
fn week_ago(state: &AppState) -> Timestamp {
    let now = state.clock.now();
    now.checked_sub(jiff::SignedDuration::from_hours(24 * 7))
        .unwrap_or(now)
}

/// What every page's frame shows.
pub(crate) struct Layout {
    pub title: String,
    pub who: String,
    pub csrf: String,
    /// The page refreshes its live parts when anything changes.
    pub live: bool,
}

impl Layout {
    /// A form's frame: no live refresh (it would replace what is being typed).
    fn form(s: &Session, title: impl Into<String>) -> Self {
        Layout {
            live: false,
            ..Layout::new(s, title)
        }
    }

    fn new(s: &Session, title: impl Into<String>) -> Self {
        Layout {
            title: title.into(),
            who: s
                .who
                .signed_in
                .as_ref()
                .map(|i| format!("{} ({})", i.name, s.who.name))
                .unwrap_or_else(|| s.who.name.clone()),
            csrf: s.csrf.clone(),
            live: true,
        }
    }
}

/// A rendered page with the dashboard's headers.
fn page<T: Template>(t: &T, status: StatusCode) -> Response {
    let mut resp = match t.render() {
        Ok(html) => (status, axum::response::Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render a dashboard page");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot render the page").into_response()
        }
    };
    super::secure_headers(&mut resp);
    resp
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    l: Layout,
    message: String,
}

/// An error page for a failed call, carrying what the audit layer records (once, as
/// the person).
fn failed(s: &Session, f: Failed) -> Response {
    let mut resp = page(
        &ErrorPage {
            // No live refresh: refetching a refused page would only be refused again.
            l: Layout::form(s, "Something went wrong"),
            message: f.text(),
        },
        f.status,
    );
    attach(&mut resp, s, f.info);
    resp
}

/// Marks a refused form's answer with who made it and why (for the audit layer).
fn attach(resp: &mut Response, s: &Session, info: Option<ErrorInfo>) {
    resp.extensions_mut()
        .insert(crate::auth::Actor(s.who.name.clone()));
    if let Some(i) = info {
        resp.extensions_mut().insert(i);
    }
}

fn see_other(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    resp.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static("/")),
    );
    resp
}

/// A form's fields: each name's values in order, found by name in one lookup.
pub(crate) struct Form(HashMap<String, Vec<String>>);

impl Form {
    fn parse(body: &[u8]) -> Form {
        let mut fields: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in url::form_urlencoded::parse(body) {
            fields
                .entry(k.into_owned())
                .or_default()
                .push(v.into_owned());
        }
        Form(fields)
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.first()).map(String::as_str)
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .get(name)
            .map(|v| v.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }
}

/// The VMs a form or query names: each once, at most [`MAX_VMS`].
fn distinct_vms<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for id in ids {
        if out.len() == MAX_VMS {
            break;
        }
        if !out.iter().any(|o| o.eq_ignore_ascii_case(id)) {
            out.push(id.to_owned());
        }
    }
    out
}

/// A form posted by a signed-in browser from this controller's page: its session
/// (the `Origin` checked) and its fields, after its CSRF token is checked.
pub(crate) struct Posted {
    s: Session,
    f: Form,
}

impl axum::extract::FromRequest<AppState> for Posted {
    type Rejection = Response;

    async fn from_request(
        req: axum::extract::Request,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let s = <Session as axum::extract::FromRequestParts<AppState>>::from_request_parts(
            &mut parts, state,
        )
        .await
        .map_err(IntoResponse::into_response)?;
        let req = axum::extract::Request::from_parts(parts, body);
        let body = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let f = Form::parse(&body);
        s.check_csrf(f.one("csrf").unwrap_or(""))
            .map_err(IntoResponse::into_response)?;
        Ok(Posted { s, f })
    }
}

/// A path on this controller to go back to (never elsewhere).
fn local(back: Option<&str>) -> String {
    match back {
        Some(b)
            if b.starts_with('/')
                && !b.starts_with("//")
                && !b.starts_with("/\\")
                && b.len() <= 1024
                && !b.chars().any(|c| c.is_control()) =>
        {
            b.to_owned()
        }
        _ => "/".to_owned(),
    }
}

fn vm_href(rg: &str, name: &str) -> String {
    format!("/ui/vms/{}/{}", url_component(rg), url_component(name))
}

// ---- sign-in --------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "signin.html")]
struct SigninPage {
    provider: bool,
    return_to: String,
    login_href: String,
    error: Option<String>,
}

#[derive(serde::Deserialize)]
pub(crate) struct SigninQuery {
    return_to: Option<String>,
}

pub(crate) async fn signin_page(
    axum::extract::State(state): St,
    Query(q): Query<SigninQuery>,
) -> Response {
    let return_to = local(q.return_to.as_deref());
    page(
        &SigninPage {
            provider: state.oidc.is_some(),
            login_href: format!("/auth/login?return_to={}", url_component(&return_to)),
            return_to,
            error: None,
        },
        StatusCode::OK,
    )
}

/// Signs a browser in with a pasted token (where no identity provider is configured;
/// with one, people sign in there). A wrong token is answered 401 and audited.
pub(crate) async fn signin(
    axum::extract::State(state): St,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let f = Form::parse(&body);
    let return_to = local(f.one("return_to"));
    // Signing a browser in to someone else's credential (login CSRF) needs this
    // controller's page.
    if let Err(why) = super::same_origin(&state, &headers) {
        return Refused::Forged(why).into_response();
    }
    let same_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"same-origin");
    if !headers.contains_key(header::ORIGIN) && !same_site {
        return Refused::Forged("it carries no Origin (browsers send one with every form)")
            .into_response();
    }
    let refuse = |message: String, status: StatusCode| {
        let mut resp = page(
            &SigninPage {
                provider: state.oidc.is_some(),
                login_href: format!("/auth/login?return_to={}", url_component(&return_to)),
                return_to: return_to.clone(),
                error: Some(message.clone()),
            },
            status,
        );
        resp.extensions_mut().insert(ErrorInfo {
            code: "SigninRefused",
            message,
            target: Some("token".into()),
        });
        resp.extensions_mut()
            .insert(crate::auth::AuditAs("auth.signin"));
        resp
    };
    if state.oidc.is_some() {
        return refuse(
            "this controller signs people in with the organisation's identity provider".to_owned(),
            StatusCode::BAD_REQUEST,
        );
    }
    let token = f.one("token").unwrap_or("").trim().to_owned();
    // Kept in a cookie: nothing that would end the cookie's value or add to it.
    if token.is_empty()
        || token.len() > 4096
        || token
            .chars()
            .any(|c| !c.is_ascii_graphic() || matches!(c, ';' | ',' | '"' | '\\'))
    {
        return refuse(
            "token: paste a jitgate token (jg_...); a token with spaces, quotes, commas, \
             semicolons or backslashes cannot be kept in a browser's cookie"
                .to_owned(),
            StatusCode::BAD_REQUEST,
        );
    }
    match crate::auth::authenticate(&state, &token, state.clock.now()).await {
        Ok(p) if p.name.starts_with("agent:") => refuse(
            "token: an agent's credential cannot sign in".to_owned(),
            StatusCode::FORBIDDEN,
        ),
        Ok(p) => {
            let mut resp = see_other(&return_to);
            resp.headers_mut()
                .append(header::SET_COOKIE, super::session_cookie(&state, &token));
            resp.extensions_mut().insert(crate::auth::Actor(p.name));
            resp
        }
        Err(e) => refuse(format!("token: {}", e.message), StatusCode::UNAUTHORIZED),
    }
}

/// Signs the browser out: its cookie is cleared, and a sign-in's credential revoked.
pub(crate) async fn signout(axum::extract::State(state): St, Posted { s, .. }: Posted) -> Response {
    if s.who.signed_in.is_some() && !s.who.provider_token {
        let audit = s.who.audit_ctx(s.ip, state.clock.now());
        if let Err(e) = state.store.revoke_token(&s.who.token_id, audit).await {
            tracing::warn!(error = %e, "cannot revoke a signed-out session");
        }
        state.auth_cache.invalidate();
    }
    let mut resp = see_other("/ui/signin");
    resp.headers_mut()
        .append(header::SET_COOKIE, super::clear_session_cookie(&state));
    resp
}

/// A cheap answer the pages poll: the audit log's newest sequence number changes with
/// every grant, request and policy change.
pub(crate) async fn live(axum::extract::State(state): St, s: Session) -> Response {
    let seq = state.store.audit_tail().await.map(|(s, _)| s).unwrap_or(0);
    // Opaque: it says that something changed, not how many events the log holds.
    let v = crate::auth::sha256_hex(&format!("{}:{seq}", s.csrf));
    let mut resp = axum::Json(json!({ "v": &v[..16] })).into_response();
    super::secure_headers(&mut resp);
    resp
}

// ---- the home page: summary and tabs --------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tab {
    Configured,
    NotConfigured,
    Unsupported,
    Requests,
}

impl Tab {
    fn as_param(self) -> &'static str {
        match self {
            Tab::Configured => "configured",
            Tab::NotConfigured => "not-configured",
            Tab::Unsupported => "unsupported",
            Tab::Requests => "requests",
        }
    }

    fn parse(s: Option<&str>) -> Tab {
        match s {
            Some("not-configured") => Tab::NotConfigured,
            Some("unsupported") => Tab::Unsupported,
            Some("requests") => Tab::Requests,
            _ => Tab::Configured,
        }
    }
}

pub(crate) struct ConfiguredRow {
    pub id: String,
    pub name: String,
    pub rg: String,
    pub href: String,
    pub approved: u64,
    pub last_access: String,
    pub last_access_key: i64,
    pub active: bool,
    pub connection: String,
    pub last_user: String,
    pub agent: String,
    /// The recommendation's reason (all management ports protected, or what is not).
    pub verdict: String,
    /// Blocked attempts in the last 24 hours, and their sparkline (2-hour bars).
    pub blocked: u64,
    pub spark: Vec<Bar>,
}

pub(crate) struct CandidateRow {
    pub id: String,
    pub name: String,
    pub rg: String,
    pub href: String,
    pub agent: String,
    pub reason: String,
    pub exposed: String,
}

pub(crate) struct UnsupportedGroup {
    pub reason: String,
    pub rows: Vec<CandidateRow>,
}

pub(crate) struct RequestRow {
    pub id: String,
    pub state: String,
    pub requestor: String,
    pub vms: String,
    pub ports: String,
    pub source: String,
    pub start: String,
    pub end: String,
    pub end_rfc: String,
    pub decision: String,
    pub justification: String,
    pub can_decide: bool,
    pub can_cancel: bool,
    pub can_revoke: bool,
    pub unreviewed_break_glass: bool,
}

pub(crate) struct Card {
    pub label: &'static str,
    pub value: String,
    pub href: String,
    pub warn: bool,
}

#[derive(Template)]
#[template(path = "home.html")]
struct HomePage {
    l: Layout,
    tab: Tab,
    cards: Vec<Card>,
    counts: [usize; 4],
    q: String,
    sort: String,
    desc: bool,
    view: String,
    page_no: usize,
    pages: usize,
    configured: Vec<ConfiguredRow>,
    candidates: Vec<CandidateRow>,
    unsupported: Vec<UnsupportedGroup>,
    requests: Vec<RequestRow>,
    grants_chart: Vec<Bar>,
    can_enable: bool,
    back: String,
    /// The tab has more VMs than are sorted as a whole: pages in key order.
    server_paged: bool,
    next_href: Option<String>,
}

impl HomePage {
    fn tab_href(&self, tab: &str) -> String {
        format!("/?tab={tab}")
    }

    fn sort_href(&self, key: &str) -> String {
        let desc = self.sort == key && !self.desc;
        format!(
            "/?tab=configured&q={}&sort={key}{}",
            url_component(&self.q),
            if desc { "&desc=1" } else { "" }
        )
    }

    fn sort_mark(&self, key: &str) -> &'static str {
        match (self.sort == key, self.desc) {
            (false, _) => "",
            (true, false) => " ▲",
            (true, true) => " ▼",
        }
    }

    fn tab_href_first(&self) -> String {
        format!("/?tab={}&q={}", self.tab.as_param(), url_component(&self.q))
    }

    fn page_href(&self, n: usize) -> String {
        format!(
            "/?tab={}&q={}&sort={}{}&page={n}",
            self.tab.as_param(),
            url_component(&self.q),
            url_component(&self.sort),
            if self.desc { "&desc=1" } else { "" }
        )
    }
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct HomeQuery {
    tab: Option<String>,
    q: Option<String>,
    sort: Option<String>,
    desc: Option<String>,
    page: Option<usize>,
    view: Option<String>,
    /// A continuation token, for a tab read a page at a time.
    after: Option<String>,
}

/// The unsupported reason a recommendation's text falls under (the reference groups
/// unsupported VMs by reason).
fn unsupported_group(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("no agent") {
        "No agent enrolled"
    } else if r.contains("offline") {
        "Agent offline"
    } else if r.contains("nftables") || r.contains("cannot apply") || r.contains("drift") {
        "Enforcement failing (nftables missing, failing or changed)"
    } else if r.contains("switched off") {
        "JIT switched off for the scope"
    } else {
        "Other"
    }
}

/// The agent's state as the recommendation tells it.
fn agent_of(r: &Recommendation) -> &'static str {
    if r.reason.starts_with("no agent") {
        "No agent"
    } else if r.reason.starts_with("the agent is offline") {
        "Offline"
    } else {
        "Online"
    }
}

fn ports_text(ports: impl IntoIterator<Item = u16>) -> String {
    let v: Vec<String> = ports.into_iter().map(|p| p.to_string()).collect();
    if v.is_empty() {
        "-".to_owned()
    } else {
        v.join(", ")
    }
}

fn vm_name_of(id: &str) -> String {
    id.rsplit('/').next().unwrap_or(id).to_owned()
}

/// A request as a row, with what the person may do with it.
fn request_row(r: &Request, who: &crate::auth::Principal, reviewable: bool) -> RequestRow {
    let me = who.name.as_str();
    let live = r
        .virtual_machines
        .iter()
        .flat_map(|v| &v.ports)
        .any(|p| p.live);
    let ports: Vec<String> = r
        .virtual_machines
        .iter()
        .flat_map(|v| &v.ports)
        .map(|p| format!("{}/{}", p.number, p.protocol))
        .collect();
    let sources: Vec<&str> = {
        let mut s: Vec<&str> = r
            .virtual_machines
            .iter()
            .flat_map(|v| &v.ports)
            .map(|p| p.allowed_source_address_prefix.as_str())
            .collect();
        s.dedup();
        s
    };
    let end = r
        .virtual_machines
        .iter()
        .flat_map(|v| &v.ports)
        .map(|p| p.end_time_utc.clone())
        .max()
        .unwrap_or_default();
    let decision = match &r.approval {
        Some(a) => {
            let votes: Vec<String> = a
                .decisions
                .iter()
                .map(|d| {
                    format!(
                        "{} by {}{}",
                        d.decision,
                        d.principal,
                        d.reason
                            .as_deref()
                            .map(|x| format!(": {x}"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            if votes.is_empty() {
                format!("waiting for {} approval(s)", a.min_approvals)
            } else {
                votes.join("; ")
            }
        }
        None if r.break_glass.is_some() => "break-glass (no approval)".to_owned(),
        None => "no approval needed".to_owned(),
    };
    RequestRow {
        id: r.id.clone(),
        state: r.state.clone(),
        requestor: r.requestor.clone(),
        vms: r
            .virtual_machines
            .iter()
            .map(|v| vm_name_of(&v.id))
            .collect::<Vec<_>>()
            .join(", "),
        ports: ports.join(", "),
        source: sources.join(", "),
        start: render::when(&r.start_time_utc),
        end: render::when(&end),
        end_rfc: if live { end.clone() } else { String::new() },
        decision,
        justification: r.justification.clone().unwrap_or_default(),
        can_decide: reviewable && r.state == "Pending" && r.requestor != me,
        can_cancel: r.state == "Pending" && r.requestor == me,
        can_revoke: live
            && (r.requestor == me
                || r.virtual_machines.iter().all(|v| {
                    jitgate_core::ids::VmId::parse(&v.id)
                        .is_ok_and(|id| who.can(Action::RequestRevoke, &id.scope()))
                })),
        unreviewed_break_glass: r.break_glass.as_ref().is_some_and(|b| !b.reviewed),
    }
}

pub(crate) async fn home(
    axum::extract::State(state): St,
    s: Session,
    Query(q): Query<HomeQuery>,
) -> Response {
    match home_inner(&state, &s, q).await {
        Ok(r) => r,
        Err(f) => failed(&s, f),
    }
}

async fn home_inner(state: &AppState, s: &Session, q: HomeQuery) -> Result<Response, Failed> {
    let now = state.clock.now();
    let tab = Tab::parse(q.tab.as_deref());
    let search = q.q.clone().unwrap_or_default().trim().to_owned();
    // The tabs' counts (aggregates in the store), then the shown tab's VMs with their
    // verdicts: all of them when few enough to sort as a whole, else a page at a
    // time in key order (resource group, name).
    let first: RecommendationPage =
        get(state, s, "/api/v1/recommendations?limit=1&tabs=true").await?;
    let tabs = first.tabs.unwrap_or_default();
    let (tab_param, tab_total) = match tab {
        Tab::Configured => (Some("configured"), tabs.configured),
        Tab::NotConfigured => (Some("notConfigured"), tabs.not_configured),
        Tab::Unsupported => (Some("unsupported"), tabs.unsupported),
        Tab::Requests => (None, 0),
    };
    let search_param = if search.is_empty() {
        String::new()
    } else {
        format!("&search={}", url_component(&search))
    };
    let server_paged = tab_total > IN_MEMORY;
    let mut server_next: Option<String> = None;
    let recs: Vec<Recommendation> = match tab_param {
        None => Vec::new(),
        Some(t) if !server_paged => {
            all_pages(
                state,
                s,
                &format!("/api/v1/recommendations?tab={t}&limit=1000{search_param}"),
                2,
            )
            .await?
        }
        Some(t) => {
            let after = q
                .after
                .as_deref()
                .map(|a| format!("&continuationToken={}", url_component(a)))
                .unwrap_or_default();
            let page: RecommendationPage = get(
                state,
                s,
                &format!("/api/v1/recommendations?tab={t}&limit={PAGE}{search_param}{after}"),
            )
            .await?;
            server_next = page.continuation_token;
            page.value
        }
    };
    // The last week's requests, newest first (the reference's "Presented data is for
    // the last week").
    let week_ago = week_ago(state);
    let mut week: Vec<Request> = Vec::new();
    // Newest first: the walk ends at the first request older than a week.
    each_item(state, s, "/api/v1/requests?limit=1000", 20, |r: Request| {
        if r.start_time_utc
            .parse::<Timestamp>()
            .is_ok_and(|t| t < week_ago)
        {
            return false;
        }
        week.push(r);
        true
    })
    .await?;
    // Per VM (lower-cased id): approved requests, last access, last user, who holds
    // which ports now.
    #[derive(Default)]
    struct Use {
        approved: u64,
        last: Option<(Timestamp, String)>,
        live: BTreeMap<String, Vec<u16>>,
    }
    let mut uses: HashMap<String, Use> = HashMap::new();
    for r in &week {
        let started = r.start_time_utc.parse::<Timestamp>().ok();
        for v in &r.virtual_machines {
            let u = uses.entry(v.id.to_ascii_lowercase()).or_default();
            if !matches!(r.state.as_str(), "Pending" | "Denied" | "Cancelled") {
                u.approved += 1;
                if let Some(t) = started
                    && u.last.as_ref().is_none_or(|(l, _)| t > *l)
                {
                    u.last = Some((t, r.requestor.clone()));
                }
            }
            for p in v.ports.iter().filter(|p| p.live) {
                u.live
                    .entry(format!(
                        "{} from {}",
                        r.requestor, p.allowed_source_address_prefix
                    ))
                    .or_default()
                    .push(p.number);
            }
        }
    }
    let needle = search.to_ascii_lowercase();
    let matches = |name: &str, rg: &str| {
        needle.is_empty()
            || name.to_ascii_lowercase().contains(&needle)
            || rg.to_ascii_lowercase().contains(&needle)
    };
    let mut configured = Vec::new();
    let mut candidates = Vec::new();
    let mut unsupported_rows: Vec<(String, CandidateRow)> = Vec::new();
    let (offline, drift) = (tabs.agents_offline, tabs.drift);
    for r in &recs {
        let agent = agent_of(r);
        let href = vm_href(&r.resource_group, &r.name);
        let u = uses.get(&r.vm.to_ascii_lowercase());
        if r.protected {
            let active = u.is_some_and(|u| !u.live.is_empty());
            let (last_access, key) = match (active, u.and_then(|u| u.last.as_ref())) {
                (true, _) => ("Active now".to_owned(), i64::MAX),
                (false, Some((t, _))) => {
                    (t.strftime("%Y-%m-%d %H:%M UTC").to_string(), t.as_second())
                }
                (false, None) => ("N/A".to_owned(), i64::MIN),
            };
            let connection = u
                .map(|u| {
                    u.live
                        .iter()
                        .map(|(who, ports)| format!("{who}: {}", ports_text(ports.clone())))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "-".to_owned());
            configured.push(ConfiguredRow {
                id: r.vm.clone(),
                name: r.name.clone(),
                rg: r.resource_group.clone(),
                href,
                approved: u.map(|u| u.approved).unwrap_or(0),
                last_access,
                last_access_key: key,
                active,
                connection,
                last_user: u
                    .and_then(|u| u.last.as_ref())
                    .map(|(_, who)| who.clone())
                    .unwrap_or_else(|| "N/A".to_owned()),
                agent: agent.to_owned(),
                verdict: r.reason.clone(),
                blocked: 0,
                spark: Vec::new(),
            });
            continue;
        }
        let row = CandidateRow {
            id: r.vm.clone(),
            name: r.name.clone(),
            rg: r.resource_group.clone(),
            href,
            agent: agent.to_owned(),
            reason: r.reason.clone(),
            exposed: ports_text(r.exposed_ports.clone()),
        };
        if r.verdict == "NotApplicable" {
            unsupported_rows.push((unsupported_group(&r.reason).to_owned(), row));
        } else {
            candidates.push(row);
        }
    }
    let counts_before = [
        tabs.configured as usize,
        tabs.not_configured as usize,
        tabs.unsupported as usize,
        0,
    ];
    configured.retain(|r| matches(&r.name, &r.rg));
    candidates.retain(|r| matches(&r.name, &r.rg));
    unsupported_rows.retain(|(_, r)| matches(&r.name, &r.rg));
    let sort = q.sort.clone().unwrap_or_else(|| "name".to_owned());
    let desc = q.desc.as_deref() == Some("1");
    match sort.as_str() {
        "approved" => configured.sort_by_key(|a| a.approved),
        "last" => configured.sort_by_key(|a| a.last_access_key),
        "user" => configured.sort_by(|a, b| a.last_user.cmp(&b.last_user)),
        _ => configured.sort_by(|a, b| {
            (a.name.to_ascii_lowercase(), &a.rg).cmp(&(b.name.to_ascii_lowercase(), &b.rg))
        }),
    }
    if desc {
        configured.reverse();
    }
    candidates.sort_by(|a, b| {
        a.name
            .to_ascii_lowercase()
            .cmp(&b.name.to_ascii_lowercase())
    });
    // Paging of the tab shown.
    let rows = match tab {
        Tab::Configured => configured.len(),
        Tab::NotConfigured => candidates.len(),
        Tab::Unsupported => unsupported_rows.len(),
        Tab::Requests => 0,
    };
    let pages = if server_paged {
        1
    } else {
        rows.div_ceil(PAGE).max(1)
    };
    let page_no = q.page.unwrap_or(1).clamp(1, pages);
    let window = |len: usize| {
        let start = ((page_no - 1) * PAGE).min(len);
        start..(start + PAGE).min(len)
    };
    let mut configured: Vec<ConfiguredRow> = {
        let w = window(configured.len());
        configured.drain(w).collect()
    };
    // The sparkline of blocked attempts, for the rows shown only.
    if tab == Tab::Configured {
        for row in &mut configured {
            let uri = format!(
                "/api/v1/vms/{}/{}/blocked",
                url_component(&row.rg),
                url_component(&row.name)
            );
            if let Ok(b) = get::<BlockedSeries>(state, s, &uri).await {
                let buckets = render::bucket(
                    b.series
                        .iter()
                        .filter_map(|p| p.at.parse::<Timestamp>().ok().map(|t| (t, p.count))),
                    now,
                    7200,
                    12,
                );
                row.blocked = buckets.iter().sum();
                let labels: Vec<(String, u64)> = buckets
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (format!("{}-{} h ago", 22 - 2 * i, 24 - 2 * i), *n))
                    .collect();
                row.spark = render::bars(&labels, 60, 16);
            }
        }
    }
    let candidates: Vec<CandidateRow> = {
        let w = window(candidates.len());
        candidates.drain(w).collect()
    };
    let mut groups: BTreeMap<String, Vec<CandidateRow>> = BTreeMap::new();
    let w = window(unsupported_rows.len());
    for (g, row) in unsupported_rows.drain(w) {
        groups.entry(g).or_default().push(row);
    }
    // Requests: mine, those I may decide on, or all I may read.
    let view = match q.view.as_deref() {
        Some("review") => "review",
        Some("all") => "all",
        _ => "mine",
    };
    let pending: RequestPage = get(
        state,
        s,
        "/api/v1/requests?state=Pending&reviewable=true&limit=1000",
    )
    .await?;
    let mut requests = Vec::new();
    if tab == Tab::Requests {
        let uri = match view {
            "review" => "/api/v1/requests?reviewable=true&limit=100",
            "all" => "/api/v1/requests?limit=100",
            _ => "/api/v1/requests?mine=true&limit=100",
        };
        let list: RequestPage = get(state, s, uri).await?;
        let reviewable: std::collections::HashSet<String> =
            pending.value.iter().map(|r| r.id.clone()).collect();
        requests = list
            .value
            .iter()
            .map(|r| request_row(r, &s.who, reviewable.contains(&r.id)))
            .collect();
    }
    let live_grants: usize = uses
        .values()
        .flat_map(|u| u.live.values())
        .map(Vec::len)
        .sum();
    let approved_week = week
        .iter()
        .filter(|r| !matches!(r.state.as_str(), "Pending" | "Denied" | "Cancelled"))
        .count();
    let cards = vec![
        Card {
            label: "VMs configured",
            value: counts_before[0].to_string(),
            href: "/?tab=configured".into(),
            warn: false,
        },
        Card {
            label: "Approved requests, last 7 days",
            value: approved_week.to_string(),
            href: "/?tab=requests&view=all".into(),
            warn: false,
        },
        Card {
            label: "Live grants now",
            value: live_grants.to_string(),
            href: "/?tab=configured&sort=last&desc=1".into(),
            warn: false,
        },
        Card {
            label: "Pending approvals for me",
            value: pending.value.len().to_string(),
            href: "/?tab=requests&view=review".into(),
            warn: !pending.value.is_empty(),
        },
        Card {
            label: "Agents offline",
            value: offline.to_string(),
            href: "/?tab=unsupported".into(),
            warn: offline > 0,
        },
        Card {
            label: "Enforcement drift",
            value: drift.to_string(),
            href: "/?tab=unsupported".into(),
            warn: drift > 0,
        },
    ];
    // Grants over the last 7 days, one bar a day.
    let per_day = render::bucket(
        week.iter()
            .filter(|r| !matches!(r.state.as_str(), "Pending" | "Denied" | "Cancelled"))
            .filter_map(|r| r.start_time_utc.parse::<Timestamp>().ok())
            .map(|t| (t, 1)),
        now,
        86_400,
        7,
    );
    let labels: Vec<(String, u64)> = per_day
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let day = now
                .checked_sub(jiff::SignedDuration::from_hours(24 * (6 - i as i64)))
                .unwrap_or(now);
            (day.strftime("%a %d").to_string(), *n)
        })
        .collect();
    let can_enable = s
        .who
        .assignments
        .iter()
        .any(|a| a.principal == s.who.name && a.role.permits(Action::PolicyWrite));
    let page_t = HomePage {
        l: Layout::new(s, "Just-in-time VM access"),
        tab,
        cards,
        counts: [
            counts_before[0],
            counts_before[1],
            counts_before[2],
            pending.value.len(),
        ],
        q: search.clone(),
        sort,
        desc,
        view: view.to_owned(),
        page_no,
        pages,
        configured,
        candidates,
        unsupported: groups
            .into_iter()
            .map(|(reason, rows)| UnsupportedGroup { reason, rows })
            .collect(),
        requests,
        grants_chart: render::bars(&labels, 280, 60),
        can_enable,
        next_href: server_next.map(|t| {
            format!(
                "/?tab={}&q={}&after={}",
                tab.as_param(),
                url_component(&search),
                url_component(&t)
            )
        }),
        server_paged,
        back: format!("/?tab=requests&view={view}"),
    };
    Ok(page(&page_t, StatusCode::OK))
}

// ---- a VM's page ------------------------------------------------------------------------

pub(crate) struct RuleRow {
    pub number: u16,
    pub protocol: String,
    pub sources: String,
    pub max: String,
    pub max_minutes: i64,
}

pub(crate) struct GrantRow {
    pub request: String,
    pub requestor: String,
    pub port: u16,
    pub protocol: String,
    pub source: String,
    pub end: String,
    pub end_rfc: String,
    pub connect: String,
    /// The person may revoke it (their own, or with the right to revoke others').
    pub revocable: bool,
}

pub(crate) struct ActivityRow {
    pub time: String,
    pub action: String,
    pub outcome: String,
    pub actor: String,
    pub source: String,
    pub ports: String,
    pub reason: String,
}

pub(crate) struct NsgRow {
    pub priority: u16,
    pub name: String,
    pub access: String,
    pub protocol: String,
    pub ports: String,
    pub description: String,
}

#[derive(Template)]
#[template(path = "vm.html")]
struct VmPageT {
    l: Layout,
    id: String,
    name: String,
    rg: String,
    href: String,
    policy: Option<String>,
    agent: String,
    address: String,
    last_access: String,
    last_user: String,
    rules: Vec<RuleRow>,
    nsg: Vec<NsgRow>,
    grants: Vec<GrantRow>,
    blocked: Vec<Bar>,
    blocked_total: u64,
    blocked_ports: String,
    activity: Option<Vec<ActivityRow>>,
    activity_error: String,
    since: String,
    until: String,
    csv_href: String,
    can_edit: bool,
    access_href: String,
}

/// The port rules of `vm` in its policy (Azure's view of it).
async fn policy_rules(
    state: &AppState,
    s: &Session,
    policy: &str,
    vm_id: &str,
) -> Result<(Value, Vec<RuleRow>), Failed> {
    let p: Value = get(state, s, &format!("{policy}?{AZ}")).await?;
    let rules = p["properties"]["virtualMachines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| {
            v["id"]
                .as_str()
                .is_some_and(|id| id.eq_ignore_ascii_case(vm_id))
        })
        .flat_map(|v| v["ports"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            let sources = match (
                r["allowedSourceAddressPrefix"].as_str(),
                r["allowedSourceAddressPrefixes"].as_array(),
            ) {
                (Some(one), _) => one.to_owned(),
                (None, Some(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => "*".to_owned(),
            };
            let max = r["maxRequestAccessDuration"].as_str().unwrap_or("PT3H");
            let secs = jitgate_core::duration::parse_iso8601_secs(max).unwrap_or(3 * 3600);
            RuleRow {
                number: r["number"].as_u64().unwrap_or(0) as u16,
                protocol: r["protocol"].as_str().unwrap_or("*").to_owned(),
                sources: if sources == "*" {
                    "Any".to_owned()
                } else {
                    sources
                },
                max: render::minutes(secs / 60),
                max_minutes: secs / 60,
            }
        })
        .collect();
    Ok((p, rules))
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct VmQuery {
    since: Option<String>,
    until: Option<String>,
}

fn audit_range(q: &VmQuery) -> String {
    let mut out = String::new();
    for (k, v) in [("since", &q.since), ("until", &q.until)] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            // `datetime-local` gives `2026-11-30T14:05`; the API takes RFC 3339.
            let v = if v.len() == 16 {
                format!("{v}:00Z")
            } else {
                v.to_owned()
            };
            out.push_str(&format!("&{k}={}", url_component(&v)));
        }
    }
    out
}

pub(crate) async fn vm_page(
    axum::extract::State(state): St,
    s: Session,
    Path((rg, name)): Path<(String, String)>,
    Query(q): Query<VmQuery>,
) -> Response {
    match vm_inner(&state, &s, &rg, &name, &q).await {
        Ok(r) => r,
        Err(f) => failed(&s, f),
    }
}

async fn vm_inner(
    state: &AppState,
    s: &Session,
    rg: &str,
    name: &str,
    q: &VmQuery,
) -> Result<Response, Failed> {
    let now = state.clock.now();
    let base = format!("/api/v1/vms/{}/{}", url_component(rg), url_component(name));
    let d: VmDetail = get(state, s, &base).await?;
    let rules = match &d.policy {
        Some(p) => policy_rules(state, s, p, &d.vm.id).await?.1,
        None => Vec::new(),
    };
    let nsg: NsgView = get(state, s, &format!("{base}/nsg")).await?;
    let blocked: Option<BlockedSeries> = get(state, s, &format!("{base}/blocked")).await.ok();
    // The agent reports its interfaces' addresses with their prefix length.
    let address = d
        .agent
        .report
        .addresses
        .first()
        .map(|a| a.split('/').next().unwrap_or(a).to_owned())
        .unwrap_or_else(|| d.vm.name.clone());
    let grants = d
        .grants
        .iter()
        .map(|g| GrantRow {
            request: g.request.clone(),
            requestor: g.requestor.clone(),
            port: g.port,
            protocol: g.protocol.clone(),
            source: g.source.clone(),
            end: render::when(&g.end_time_utc),
            end_rfc: g.end_time_utc.clone(),
            connect: match g.port {
                22 => format!("jitgate ssh <user>@{}", d.vm.name),
                3389 => format!("RDP to {address}:3389"),
                p => format!("{address}:{p}"),
            },
            revocable: g.requestor == s.who.name
                || jitgate_core::ids::VmId::parse(&d.vm.id)
                    .is_ok_and(|id| s.who.can(Action::RequestRevoke, &id.scope())),
        })
        .collect();
    let (blocked_bars, blocked_total, blocked_ports) = match &blocked {
        Some(b) => {
            let hourly = render::bucket(
                b.series
                    .iter()
                    .filter_map(|p| p.at.parse::<Timestamp>().ok().map(|t| (t, p.count))),
                now,
                3600,
                24,
            );
            let labels: Vec<(String, u64)> = hourly
                .iter()
                .enumerate()
                .map(|(i, n)| (format!("{} h ago", 23 - i), *n))
                .collect();
            (
                render::bars(&labels, 288, 60),
                b.totals.iter().map(|t| t.count).sum(),
                b.totals
                    .iter()
                    .map(|t| format!("{}/{}: {}", t.port, t.protocol, t.count))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        }
        None => (Vec::new(), 0, String::new()),
    };
    // The activity log of this VM, newest first (needs the right to read the audit
    // log): the API's text filter, then this VM's events exactly.
    let (activity, activity_error) = match vm_events(state, s, &d.vm.id, &d.vm.name, q).await {
        Ok(events) => (
            Some(events.iter().rev().map(activity_row).collect()),
            String::new(),
        ),
        Err(f) => (None, f.text()),
    };
    let scope = d.vm.id.clone();
    let t = VmPageT {
        l: Layout::new(s, d.vm.name.clone()),
        href: vm_href(rg, name),
        csv_href: format!(
            "{}/activity.csv?{}",
            vm_href(rg, name),
            audit_range(q).trim_start_matches('&')
        ),
        since: q.since.clone().unwrap_or_default(),
        until: q.until.clone().unwrap_or_default(),
        id: d.vm.id.clone(),
        name: d.vm.name.clone(),
        rg: d.vm.resource_group.clone(),
        policy: d.policy.clone(),
        agent: match (d.agent.enrolled, d.agent.online) {
            (false, _) => "no agent enrolled".to_owned(),
            (true, true) => "agent online".to_owned(),
            (true, false) => format!(
                "agent offline (last seen {})",
                d.agent
                    .last_seen
                    .as_deref()
                    .and_then(|t| t.parse::<Timestamp>().ok())
                    .map(|t| render::ago(t, now))
                    .unwrap_or_else(|| "never".into())
            ),
        },
        address,
        last_access: d
            .last_access
            .as_deref()
            .map(render::when)
            .unwrap_or_else(|| "N/A".into()),
        last_user: d.last_user.clone().unwrap_or_else(|| "N/A".into()),
        rules,
        nsg: nsg
            .rules
            .into_iter()
            .map(|r| NsgRow {
                priority: r.priority,
                name: r.name,
                access: r.access,
                protocol: r.protocol,
                ports: r.destination_port_ranges.join(", "),
                description: r.description,
            })
            .collect(),
        grants,
        blocked: blocked_bars,
        blocked_total,
        blocked_ports,
        activity,
        activity_error,
        can_edit: s.who.can(
            Action::PolicyWrite,
            &jitgate_core::ids::VmId::parse(&scope)
                .map(|v| v.scope())
                .unwrap_or(jitgate_core::ids::Scope::Subscription(
                    state.default_subscription(),
                )),
        ),
        access_href: format!("/ui/access?scope={}", url_component(&scope)),
    };
    Ok(page(&t, StatusCode::OK))
}

/// Whether an audit event is about this VM (its id, or its name as a whole segment).
/// Whether an audit event is about the VM `id`: its target is the VM, or its details
/// name the VM's id as a whole JSON string (not as the prefix of another's).
fn mentions_vm(target: &str, details: &str, id: &str) -> bool {
    target.eq_ignore_ascii_case(id)
        || details
            .to_ascii_lowercase()
            .contains(&format!("\"{}\"", id.to_ascii_lowercase()))
}

/// The most audit events read for one VM's log (pages of 1,000, oldest first).
const VM_EVENTS: usize = 20;
/// The newest events of a VM's log shown.
const VM_LOG_ROWS: usize = 200;

/// The VM's events in the asked time range (default: the last 7 days), oldest first,
/// the newest kept when there are more than fit.
async fn vm_events(
    state: &AppState,
    s: &Session,
    id: &str,
    name: &str,
    q: &VmQuery,
) -> Result<Vec<jitgate_proto::api::AuditEvent>, Failed> {
    let mut range = audit_range(q);
    if q.since.as_deref().is_none_or(str::is_empty) {
        range.push_str(&format!(
            "&since={}",
            url_component(&week_ago(state).to_string())
        ));
    }
    let uri = format!("/api/v1/audit?vm={}&limit=1000{range}", url_component(name));
    let mut out: std::collections::VecDeque<jitgate_proto::api::AuditEvent> =
        std::collections::VecDeque::new();
    each_item(
        state,
        s,
        &uri,
        VM_EVENTS,
        |e: jitgate_proto::api::AuditEvent| {
            if mentions_vm(&e.target, &e.details.to_string(), id) {
                if out.len() == VM_LOG_ROWS {
                    out.pop_front();
                }
                out.push_back(e);
            }
            true
        },
    )
    .await?;
    Ok(out.into())
}

fn activity_row(e: &jitgate_proto::api::AuditEvent) -> ActivityRow {
    let d = &e.details;
    let ports: Vec<String> = d["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(
            d["virtualMachines"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|v| v["ports"].as_array().into_iter().flatten()),
        )
        .filter_map(|p| match (p["number"].as_u64(), p.as_u64()) {
            (Some(n), _) | (None, Some(n)) => Some(n.to_string()),
            _ => None,
        })
        .collect();
    ActivityRow {
        time: render::when(&e.time),
        action: e.action.clone(),
        outcome: e.outcome.clone(),
        actor: e.actor.clone(),
        source: e.source.clone(),
        ports: ports.join(", "),
        reason: d["justification"]
            .as_str()
            .or(d["reason"].as_str())
            .or(d["message"].as_str())
            .unwrap_or("")
            .to_owned(),
    }
}

/// The VM's activity log as CSV (the API's export, filtered to the VM).
pub(crate) async fn activity_csv(
    axum::extract::State(state): St,
    s: Session,
    Path((rg, name)): Path<(String, String)>,
    Query(q): Query<VmQuery>,
) -> Response {
    let base = format!(
        "/api/v1/vms/{}/{}",
        url_component(&rg),
        url_component(&name)
    );
    let d: VmDetail = match get(&state, &s, &base).await {
        Ok(d) => d,
        Err(f) => return failed(&s, f),
    };
    let uri = format!(
        "/api/v1/audit?vm={}&limit=100000&format=csv{}",
        url_component(&d.vm.name),
        audit_range(&q)
    );
    match state
        .web_api
        .call(&s.who, s.ip, Method::GET, &uri, None)
        .await
    {
        Ok((status, bytes, _)) if status.is_success() => {
            let rows = match only_vm_rows(&bytes, &d.vm.id) {
                Ok(r) => r,
                Err(e) => {
                    return failed(
                        &s,
                        Failed {
                            status: StatusCode::INTERNAL_SERVER_ERROR,
                            info: None,
                            message: format!("cannot filter the activity log: {e}"),
                        },
                    );
                }
            };
            let mut resp = rows.into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            );
            let file: String =
                d.vm.name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
            if let Ok(v) =
                HeaderValue::from_str(&format!("attachment; filename=\"activity-{file}.csv\""))
            {
                resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            super::secure_headers(&mut resp);
            resp
        }
        Ok((status, _, info)) => failed(
            &s,
            Failed {
                status,
                message: "the activity log cannot be read".into(),
                info,
            },
        ),
        Err(e) => failed(
            &s,
            Failed {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                info: None,
                message: e,
            },
        ),
    }
}

/// The rows of the API's CSV export that are about the VM `id` (the header kept).
fn only_vm_rows(csv_bytes: &[u8], id: &str) -> Result<Vec<u8>, csv::Error> {
    let mut r = csv::Reader::from_reader(csv_bytes);
    let header = r.headers()?.clone();
    let col = |name: &str| header.iter().position(|h| h == name);
    let (Some(target), Some(details)) = (col("target"), col("details")) else {
        return Ok(csv_bytes.to_vec());
    };
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(&header)?;
    for row in r.records() {
        let row = row?;
        if mentions_vm(
            row.get(target).unwrap_or(""),
            row.get(details).unwrap_or(""),
            id,
        ) {
            w.write_record(&row)?;
        }
    }
    w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
}

// ---- port configuration: enable, edit, remove --------------------------------------------

#[derive(Clone)]
pub(crate) struct PortField {
    pub number: String,
    pub protocol: String,
    pub sources: String,
    pub hours: String,
}

#[derive(Template)]
#[template(path = "ports.html")]
struct PortsPage {
    l: Layout,
    heading: String,
    action: String,
    vms: Vec<(String, String)>,
    ports: Vec<PortField>,
    error: Option<String>,
    submit: String,
}

/// The port configuration pane: `heading` over `vms`, posting to `action`, with
/// `ports` in its rows and `error` above them (a refused save keeps what was typed).
#[allow(clippy::too_many_arguments)]
fn ports_page(
    s: &Session,
    heading: String,
    action: String,
    vms: Vec<(String, String)>,
    ports: Vec<PortField>,
    error: Option<String>,
    status: StatusCode,
    info: Option<ErrorInfo>,
) -> Response {
    let mut resp = page(
        &PortsPage {
            l: Layout::form(s, "JIT VM access configuration"),
            heading,
            action,
            vms,
            ports,
            error,
            submit: "Save".into(),
        },
        status,
    );
    attach(&mut resp, s, info);
    resp
}

fn enable_heading(n: usize) -> String {
    format!("Enable JIT on {n} VM{}", if n == 1 { "" } else { "s" })
}

fn default_ports() -> Vec<PortField> {
    [22u16, 3389, 5985, 5986]
        .into_iter()
        .map(|n| PortField {
            number: n.to_string(),
            protocol: "*".into(),
            sources: "*".into(),
            hours: "3".into(),
        })
        .collect()
}

/// The ports a configuration form names, as Azure's rules (rows with no port number
/// are left out: that is how a row is removed).
fn ports_from(f: &Form) -> (Vec<PortField>, Vec<Value>, Option<String>) {
    let numbers = f.all("port");
    let protocols = f.all("protocol");
    let sources = f.all("sources");
    let hours = f.all("hours");
    let mut fields = Vec::new();
    let mut rules = Vec::new();
    let mut error = None;
    for (i, n) in numbers.iter().enumerate() {
        let field = PortField {
            number: n.trim().to_owned(),
            protocol: protocols.get(i).copied().unwrap_or("*").to_owned(),
            sources: sources.get(i).copied().unwrap_or("*").trim().to_owned(),
            hours: hours.get(i).copied().unwrap_or("3").trim().to_owned(),
        };
        if field.number.is_empty() {
            continue;
        }
        let number: Option<i64> = field.number.parse().ok();
        let minutes = field
            .hours
            .parse::<f64>()
            .ok()
            .filter(|h| h.is_finite() && *h > 0.0)
            // Far past any policy's maximum: the API names the field.
            .map(|h| (h.min(100_000.0) * 60.0).round() as i64);
        if number.is_none() && error.is_none() {
            error = Some(format!("port: '{}' is not a port number", field.number));
        }
        if minutes.is_none() && error.is_none() {
            error = Some(format!(
                "maximum request time of port {}: '{}' is not a number of hours",
                field.number, field.hours
            ));
        }
        let list: Vec<String> = field
            .sources
            .split([',', ' '])
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect();
        rules.push(json!({
            "number": number.unwrap_or(0),
            "protocol": field.protocol,
            "allowedSourceAddressPrefixes": if list.is_empty() { vec!["*".to_owned()] } else { list },
            "maxRequestAccessDuration": jitgate_core::duration::format_iso8601_secs(minutes.unwrap_or(0) * 60),
        }));
        fields.push(field);
    }
    if rules.is_empty() && error.is_none() {
        error = Some("port: name at least one port".into());
    }
    (fields, rules, error)
}

fn vms_of(raw: Option<String>) -> Vec<String> {
    let f = Form::parse(raw.unwrap_or_default().as_bytes());
    distinct_vms(f.all("vm"))
}

fn vm_pairs(ids: &[String]) -> Vec<(String, String)> {
    ids.iter().map(|id| (id.clone(), vm_name_of(id))).collect()
}

/// "Enable JIT on N VMs": the port configuration pane, prefilled as the reference's.
pub(crate) async fn enable_page(s: Session, RawQuery(raw): RawQuery) -> Response {
    let ids = vms_of(raw);
    ports_page(
        &s,
        enable_heading(ids.len()),
        "/ui/enable".into(),
        vm_pairs(&ids),
        default_ports(),
        ids.is_empty()
            .then(|| "Select one or more VMs on the Not configured tab first.".to_owned()),
        StatusCode::OK,
        None,
    )
}

pub(crate) async fn enable(axum::extract::State(state): St, Posted { s, f }: Posted) -> Response {
    let ids = distinct_vms(f.all("vm"));
    let (fields, rules, error) = ports_from(&f);
    let redo = |error: String, status: StatusCode, info: Option<ErrorInfo>| {
        ports_page(
            &s,
            enable_heading(ids.len()),
            "/ui/enable".into(),
            vm_pairs(&ids),
            if fields.is_empty() {
                default_ports()
            } else {
                fields.clone()
            },
            Some(error),
            status,
            info,
        )
    };
    if let Some(e) = error {
        return redo(e, StatusCode::BAD_REQUEST, None);
    }
    let body = json!({ "vms": ids, "ports": rules });
    match api::<Value>(
        &state,
        &s,
        Method::POST,
        "/api/v1/recommendations/apply",
        Some(body),
    )
    .await
    {
        Ok(_) => see_other("/?tab=configured"),
        Err(f) => redo(f.text(), f.status, f.info),
    }
}

/// The VM's detail and its policy (Azure's document).
async fn vm_policy(
    state: &AppState,
    s: &Session,
    rg: &str,
    name: &str,
) -> Result<(VmDetail, Option<(String, Value, Vec<RuleRow>)>), Failed> {
    let d: VmDetail = get(
        state,
        s,
        &format!("/api/v1/vms/{}/{}", url_component(rg), url_component(name)),
    )
    .await?;
    let policy = match &d.policy {
        Some(p) => {
            let (doc, rules) = policy_rules(state, s, p, &d.vm.id).await?;
            Some((p.clone(), doc, rules))
        }
        None => None,
    };
    Ok((d, policy))
}

/// "Edit": the VM's port configuration.
pub(crate) async fn edit_page(
    axum::extract::State(state): St,
    s: Session,
    Path((rg, name)): Path<(String, String)>,
) -> Response {
    let (d, policy) = match vm_policy(&state, &s, &rg, &name).await {
        Ok(x) => x,
        Err(f) => return failed(&s, f),
    };
    let ports = match &policy {
        Some((_, _, rules)) => rules
            .iter()
            .map(|r| PortField {
                number: r.number.to_string(),
                protocol: r.protocol.clone(),
                sources: if r.sources == "Any" {
                    "*".into()
                } else {
                    r.sources.clone()
                },
                hours: format!("{}", r.max_minutes as f64 / 60.0),
            })
            .collect(),
        None => default_ports(),
    };
    ports_page(
        &s,
        format!("Port configuration of {}", d.vm.name),
        format!("{}/edit", vm_href(&rg, &name)),
        vm_pairs(std::slice::from_ref(&d.vm.id)),
        ports,
        None,
        StatusCode::OK,
        None,
    )
}

/// Saves the VM's port configuration into its policy (or enables JIT on it).
pub(crate) async fn edit(
    axum::extract::State(state): St,
    Path((rg, name)): Path<(String, String)>,
    Posted { s, f }: Posted,
) -> Response {
    let (fields, rules, error) = ports_from(&f);
    let (d, policy) = match vm_policy(&state, &s, &rg, &name).await {
        Ok(x) => x,
        Err(f) => return failed(&s, f),
    };
    let redo = |error: String, status: StatusCode, info: Option<ErrorInfo>| {
        ports_page(
            &s,
            format!("Port configuration of {}", d.vm.name),
            format!("{}/edit", vm_href(&rg, &name)),
            vm_pairs(std::slice::from_ref(&d.vm.id)),
            fields.clone(),
            Some(error),
            status,
            info,
        )
    };
    if let Some(e) = error {
        return redo(e, StatusCode::BAD_REQUEST, None);
    }
    let result = match policy {
        Some((id, mut doc, _)) => {
            if let Some(vms) = doc["properties"]["virtualMachines"].as_array_mut() {
                for v in vms.iter_mut() {
                    if v["id"]
                        .as_str()
                        .is_some_and(|x| x.eq_ignore_ascii_case(&d.vm.id))
                    {
                        v["ports"] = Value::Array(rules.clone());
                    }
                }
            }
            let body = json!({
                "kind": doc["kind"].clone(),
                "properties": { "virtualMachines": doc["properties"]["virtualMachines"].clone() },
            });
            api::<Value>(&state, &s, Method::PUT, &format!("{id}?{AZ}"), Some(body)).await
        }
        None => {
            api::<Value>(
                &state,
                &s,
                Method::POST,
                "/api/v1/recommendations/apply",
                Some(json!({ "vms": [d.vm.id], "ports": rules })),
            )
            .await
        }
    };
    match result {
        Ok(_) => see_other(&vm_href(&rg, &name)),
        Err(f) => redo(f.text(), f.status, f.info),
    }
}

#[derive(Template)]
#[template(path = "remove.html")]
struct RemovePage {
    l: Layout,
    name: String,
    href: String,
    action: String,
    live: usize,
}

pub(crate) async fn remove_page(
    axum::extract::State(state): St,
    s: Session,
    Path((rg, name)): Path<(String, String)>,
) -> Response {
    let (d, _) = match vm_policy(&state, &s, &rg, &name).await {
        Ok(x) => x,
        Err(f) => return failed(&s, f),
    };
    page(
        &RemovePage {
            l: Layout::form(&s, "Remove JIT"),
            name: d.vm.name.clone(),
            href: vm_href(&rg, &name),
            action: format!("{}/remove", vm_href(&rg, &name)),
            live: d.grants.len(),
        },
        StatusCode::OK,
    )
}

/// Takes the VM out of its policy (the policy is deleted with its last VM).
pub(crate) async fn remove(
    axum::extract::State(state): St,
    Path((rg, name)): Path<(String, String)>,
    Posted { s, .. }: Posted,
) -> Response {
    let (d, policy) = match vm_policy(&state, &s, &rg, &name).await {
        Ok(x) => x,
        Err(f) => return failed(&s, f),
    };
    let Some((id, doc, _)) = policy else {
        return see_other(&vm_href(&rg, &name));
    };
    let rest: Vec<Value> = doc["properties"]["virtualMachines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| {
            !v["id"]
                .as_str()
                .is_some_and(|x| x.eq_ignore_ascii_case(&d.vm.id))
        })
        .cloned()
        .collect();
    let result = if rest.is_empty() {
        api::<Value>(&state, &s, Method::DELETE, &format!("{id}?{AZ}"), None).await
    } else {
        let body = json!({
            "kind": doc["kind"].clone(),
            "properties": { "virtualMachines": rest },
        });
        api::<Value>(&state, &s, Method::PUT, &format!("{id}?{AZ}"), Some(body)).await
    };
    match result {
        Ok(_) => see_other("/?tab=configured"),
        Err(f) => failed(&s, f),
    }
}

// ---- add machines -------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "machines.html")]
struct MachinesPage {
    l: Layout,
    rg: String,
    uses: String,
    expires: String,
    error: Option<String>,
    line: Option<jitgate_proto::api::InstallLine>,
}

pub(crate) async fn machines_page(s: Session) -> Response {
    page(
        &MachinesPage {
            l: Layout::form(&s, "Add machines"),
            rg: String::new(),
            uses: "1".to_owned(),
            expires: "P1D".to_owned(),
            error: None,
            line: None,
        },
        StatusCode::OK,
    )
}

/// Makes an install line: an enrollment token for the resource group with its
/// one-time code, through the API as the person (who needs VM-write rights there).
pub(crate) async fn machines(
    axum::extract::State(state): St,
    headers: axum::http::HeaderMap,
    Posted { s, f }: Posted,
) -> Response {
    let rg = f.one("resourceGroup").unwrap_or("").trim().to_owned();
    let uses = f.one("uses").unwrap_or("1").trim().to_owned();
    let expires = f.one("expiresIn").unwrap_or("P1D").to_owned();
    let mut shown = MachinesPage {
        l: Layout::form(&s, "Add machines"),
        rg: rg.clone(),
        uses: uses.clone(),
        expires: expires.clone(),
        error: None,
        line: None,
    };
    let n: Option<i64> = uses.parse().ok();
    let result = match n {
        None => Err(Failed {
            status: StatusCode::BAD_REQUEST,
            info: None,
            message: format!("uses: '{uses}' is not a number of machines"),
        }),
        Some(n) => {
            // The line names this controller as the browser reached it.
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            let scope = format!(
                "/subscriptions/{}/resourceGroups/{rg}",
                state.default_subscription()
            );
            let body = json!({"scope": scope, "uses": n, "expiresIn": expires, "install": true, "description": "Add machines (dashboard)"});
            api::<jitgate_proto::api::CreatedEnrollToken>(
                &state,
                &s,
                Method::POST,
                &format!("http://{host}/api/v1/enrollTokens"),
                Some(body),
            )
            .await
        }
    };
    match result {
        Ok(t) => {
            shown.line = t.install;
            page(&shown, StatusCode::OK)
        }
        Err(e) => {
            shown.error = Some(e.text());
            let mut resp = page(&shown, e.status);
            attach(&mut resp, &s, e.info);
            resp
        }
    }
}

// ---- request access ---------------------------------------------------------------------

pub(crate) struct RequestVmRow {
    pub id: String,
    pub name: String,
    pub ports: Vec<RequestPortRow>,
}

pub(crate) struct RequestPortRow {
    pub key: String,
    pub number: u16,
    pub protocol: String,
    pub sources: String,
    pub any: bool,
    pub max_minutes: i64,
    pub default_minutes: i64,
    pub max: String,
    /// What the form had (a refused request is shown again as it was filled in).
    pub on: bool,
    pub src: String,
    pub range: String,
}

#[derive(Template)]
#[template(path = "request.html")]
struct RequestPageT {
    l: Layout,
    my_ip: String,
    ipv6: bool,
    vms: Vec<RequestVmRow>,
    error: Option<String>,
    justification: String,
}

async fn request_rows(
    state: &AppState,
    s: &Session,
    ids: &[String],
) -> Result<Vec<(RequestVmRow, String)>, Failed> {
    let mut out = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        let vm = jitgate_core::ids::VmId::parse(id).map_err(|e| Failed {
            status: StatusCode::BAD_REQUEST,
            info: None,
            message: format!("vm: {e}"),
        })?;
        let (d, policy) = vm_policy(state, s, vm.resource_group.as_str(), vm.name.as_str()).await?;
        let Some((policy_id, _, rules)) = policy else {
            return Err(Failed {
                status: StatusCode::CONFLICT,
                info: None,
                message: format!("JIT is not enabled on {}: enable it first", d.vm.name),
            });
        };
        out.push((
            RequestVmRow {
                id: d.vm.id.clone(),
                name: d.vm.name.clone(),
                ports: rules
                    .iter()
                    .map(|r| RequestPortRow {
                        key: format!("{index}.{}", r.number),
                        number: r.number,
                        protocol: r.protocol.clone(),
                        any: r.sources == "Any",
                        sources: r.sources.clone(),
                        max_minutes: r.max_minutes,
                        default_minutes: r.max_minutes.min(60),
                        max: r.max.clone(),
                        on: true,
                        src: "myip".into(),
                        range: String::new(),
                    })
                    .collect(),
            },
            policy_id,
        ));
    }
    Ok(out)
}

/// "Request access" for the selected VMs.
pub(crate) async fn request_page(
    axum::extract::State(state): St,
    s: Session,
    RawQuery(raw): RawQuery,
) -> Response {
    let ids = vms_of(raw);
    match request_rows(&state, &s, &ids).await {
        Ok(rows) => page(
            &RequestPageT {
                l: Layout::form(&s, "Request access"),
                my_ip: s.ip.to_string(),
                ipv6: s.ip.is_ipv6(),
                vms: rows.into_iter().map(|(r, _)| r).collect(),
                error: ids
                    .is_empty()
                    .then(|| "Select one or more VMs on the Configured tab first.".to_owned()),
                justification: String::new(),
            },
            StatusCode::OK,
        ),
        Err(f) => failed(&s, f),
    }
}

/// A VM's port rows as the refused form had them: what was switched on, which source,
/// the range and the time asked for.
fn refill(mut vm: RequestVmRow, f: &Form) -> RequestVmRow {
    let on = f.all("on");
    for p in &mut vm.ports {
        p.on = on.contains(&p.key.as_str());
        if let Some(src) = f
            .one(&format!("src.{}", p.key))
            .filter(|v| matches!(*v, "myip" | "range" | "any"))
        {
            p.src = src.to_owned();
        }
        p.range = f
            .one(&format!("range.{}", p.key))
            .unwrap_or("")
            .chars()
            .take(100)
            .collect();
        if let Some(m) = f
            .one(&format!("min.{}", p.key))
            .and_then(|m| m.trim().parse::<i64>().ok())
        {
            p.default_minutes = m.clamp(5, p.max_minutes.max(5));
        }
    }
    vm
}

/// Initiates the request: one per policy, through Azure's initiate action.
pub(crate) async fn request(axum::extract::State(state): St, Posted { s, f }: Posted) -> Response {
    let ids = distinct_vms(f.all("vm"));
    let rows = match request_rows(&state, &s, &ids).await {
        Ok(r) => r,
        Err(e) => return failed(&s, e),
    };
    let justification = f.one("justification").unwrap_or("").trim().to_owned();
    let on: Vec<&str> = f.all("on");
    let mut by_policy: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut error: Option<String> = None;
    for (vm, policy) in &rows {
        let mut ports = Vec::new();
        for p in &vm.ports {
            if !on.contains(&p.key.as_str()) {
                continue;
            }
            let source = match f.one(&format!("src.{}", p.key)) {
                Some("range") => f
                    .one(&format!("range.{}", p.key))
                    .unwrap_or("")
                    .trim()
                    .to_owned(),
                Some("any") => "*".to_owned(),
                _ => s.ip.to_string(),
            };
            let minutes: i64 = f
                .one(&format!("min.{}", p.key))
                .and_then(|m| m.trim().parse().ok())
                .unwrap_or(0);
            if source.is_empty() && error.is_none() {
                error = Some(format!(
                    "IP range of port {} on {}: give an address or prefix",
                    p.number, vm.name
                ));
            }
            if !(1..=p.max_minutes).contains(&minutes) && error.is_none() {
                error = Some(format!(
                    "time of port {} on {}: choose 1 to {} minutes",
                    p.number, vm.name, p.max_minutes
                ));
            }
            ports.push(json!({
                "number": p.number,
                "allowedSourceAddressPrefix": source,
                "duration": jitgate_core::duration::format_iso8601_secs(minutes.saturating_mul(60)),
            }));
        }
        if !ports.is_empty() {
            by_policy
                .entry(policy.clone())
                .or_default()
                .push(json!({ "id": vm.id, "ports": ports }));
        }
    }
    if by_policy.is_empty() && error.is_none() {
        error = Some("ports: switch on at least one port".into());
    }
    let redo = |error: String,
                status: StatusCode,
                info: Option<ErrorInfo>,
                rows: Vec<(RequestVmRow, String)>| {
        let mut resp = page(
            &RequestPageT {
                l: Layout::form(&s, "Request access"),
                my_ip: s.ip.to_string(),
                ipv6: s.ip.is_ipv6(),
                vms: rows.into_iter().map(|(r, _)| refill(r, &f)).collect(),
                error: Some(error),
                justification: justification.clone(),
            },
            status,
        );
        attach(&mut resp, &s, info);
        resp
    };
    if let Some(e) = error {
        return redo(e, StatusCode::BAD_REQUEST, None, rows);
    }
    for (policy, vms) in by_policy {
        let mut body = json!({ "virtualMachines": vms });
        if !justification.is_empty() {
            body["justification"] = Value::String(justification.clone());
        }
        if let Err(e) = api::<Value>(
            &state,
            &s,
            Method::POST,
            &format!("{policy}/initiate?{AZ}"),
            Some(body),
        )
        .await
        {
            return redo(e.text(), e.status, e.info, rows);
        }
    }
    match rows.first() {
        Some((vm, _)) if rows.len() == 1 => {
            let id = jitgate_core::ids::VmId::parse(&vm.id);
            match id {
                Ok(id) => see_other(&vm_href(id.resource_group.as_str(), id.name.as_str())),
                Err(_) => see_other("/?tab=requests"),
            }
        }
        _ => see_other("/?tab=requests"),
    }
}

/// Approve, deny, cancel, review or revoke a request, with a reason.
pub(crate) async fn decide(
    axum::extract::State(state): St,
    Path((id, action)): Path<(String, String)>,
    Posted { s, f }: Posted,
) -> Response {
    if !matches!(
        action.as_str(),
        "approve" | "deny" | "cancel" | "review" | "revoke"
    ) {
        return failed(
            &s,
            Failed {
                status: StatusCode::NOT_FOUND,
                info: None,
                message: format!("no such action: {action}"),
            },
        );
    }
    let reason = f.one("reason").unwrap_or("").trim();
    let body = if action == "revoke" || reason.is_empty() {
        json!({})
    } else {
        json!({ "reason": reason })
    };
    match api::<Value>(
        &state,
        &s,
        Method::POST,
        &format!("/api/v1/requests/{}/{action}", url_component(&id)),
        Some(body),
    )
    .await
    {
        Ok(_) => see_other(&local(f.one("back"))),
        Err(e) => failed(&s, e),
    }
}

// ---- who may do what ---------------------------------------------------------------------

pub(crate) struct AssignmentRow {
    pub id: String,
    pub principal: String,
    pub role: String,
    pub scope: String,
    pub covers: bool,
}

pub(crate) struct MappingRow {
    pub group: String,
    pub role: String,
    pub scope: String,
}

#[derive(Template)]
#[template(path = "access.html")]
struct AccessPage {
    l: Layout,
    scope: String,
    assignments: Vec<AssignmentRow>,
    mappings: Vec<MappingRow>,
    who: String,
    explained: Vec<String>,
    error: Option<String>,
    roles: Vec<&'static str>,
}

#[derive(serde::Deserialize, Default)]
pub(crate) struct AccessQuery {
    scope: Option<String>,
    who: Option<String>,
}

/// Whether an assignment at `at` covers `scope` (it is the scope or one above it).
fn covers(at: &str, scope: &str) -> bool {
    let at = at.trim_end_matches('/').to_ascii_lowercase();
    let scope = scope.trim_end_matches('/').to_ascii_lowercase();
    scope == at || scope.starts_with(&format!("{at}/"))
}

async fn access_view(
    state: &AppState,
    s: &Session,
    q: &AccessQuery,
    error: Option<String>,
    status: StatusCode,
    info: Option<ErrorInfo>,
) -> Response {
    let scope = q
        .scope
        .clone()
        .filter(|x| !x.is_empty())
        .unwrap_or_else(|| format!("/subscriptions/{}", state.default_subscription()));
    let list: Vec<jitgate_proto::api::RoleAssignment> =
        match all_pages::<jitgate_proto::api::RoleAssignment>(
            state,
            s,
            "/api/v1/roleAssignments?limit=1000",
            50,
        )
        .await
        {
            Ok(l) => l,
            Err(f) => return failed(s, f),
        };
    // The sign-in group mappings are configuration: shown to those who manage roles.
    let manages = s
        .who
        .assignments
        .iter()
        .any(|a| a.principal == s.who.name && a.role.permits(Action::RoleAssignmentWrite));
    let mappings: Vec<MappingRow> = state
        .oidc
        .as_ref()
        .filter(|_| manages)
        .map(|o| {
            o.config
                .roles
                .iter()
                .map(|m| MappingRow {
                    group: m.group.clone(),
                    role: m.role.as_str().to_owned(),
                    scope: m.scope.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    let who = q.who.clone().unwrap_or_default().trim().to_owned();
    let mut explained = Vec::new();
    if !who.is_empty() {
        for a in list
            .iter()
            .filter(|a| a.principal.eq_ignore_ascii_case(&who))
        {
            explained.push(format!(
                "{who} is {} at {} through a direct assignment{}",
                a.role,
                a.scope,
                if covers(&a.scope, &scope) {
                    " (it covers this scope)"
                } else {
                    ""
                }
            ));
        }
        for m in &mappings {
            explained.push(format!(
                "if {who} signs in as a member of group {}, {who} is {} at {}{}",
                m.group,
                m.role,
                m.scope,
                if covers(&m.scope, &scope) {
                    " (it covers this scope)"
                } else {
                    ""
                }
            ));
        }
        if explained.is_empty() {
            explained.push(format!(
                "{who} holds no role here: no assignment names them and no sign-in group mapping exists"
            ));
        }
    }
    let assignments = list
        .iter()
        .map(|a| AssignmentRow {
            id: a.id.clone(),
            principal: a.principal.clone(),
            role: a.role.clone(),
            scope: a.scope.clone(),
            covers: covers(&a.scope, &scope),
        })
        .collect();
    let mut resp = page(
        &AccessPage {
            l: Layout::form(s, "Access"),
            scope,
            assignments,
            mappings,
            who,
            explained,
            error,
            roles: vec![
                "JIT Requester",
                "JIT Approver",
                "JIT Administrator",
                "Reader",
            ],
        },
        status,
    );
    attach(&mut resp, s, info);
    resp
}

pub(crate) async fn access_page(
    axum::extract::State(state): St,
    s: Session,
    Query(q): Query<AccessQuery>,
) -> Response {
    access_view(&state, &s, &q, None, StatusCode::OK, None).await
}

/// Adds or removes a role assignment.
pub(crate) async fn access(axum::extract::State(state): St, Posted { s, f }: Posted) -> Response {
    let scope = f.one("scope").unwrap_or("").trim().to_owned();
    let q = AccessQuery {
        scope: Some(scope.clone()),
        who: None,
    };
    let result = match f.one("remove") {
        Some(id) => {
            api::<Value>(
                &state,
                &s,
                Method::DELETE,
                &format!("/api/v1/roleAssignments/{}", url_component(id)),
                None,
            )
            .await
        }
        None => {
            let body = json!({
                "principal": f.one("principal").unwrap_or("").trim(),
                "role": f.one("role").unwrap_or(""),
                "scope": f.one("at").map(str::trim).filter(|x| !x.is_empty()).unwrap_or(&scope),
            });
            api::<Value>(
                &state,
                &s,
                Method::POST,
                "/api/v1/roleAssignments",
                Some(body),
            )
            .await
        }
    };
    match result {
        Ok(_) => see_other(&format!("/ui/access?scope={}", url_component(&scope))),
        Err(e) => access_view(&state, &s, &q, Some(e.text()), e.status, e.info).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_returned_to() {
        assert_eq!(local(Some("/ui/vms/a/b")), "/ui/vms/a/b");
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil",
            "",
            "/\u{7}",
        ] {
            assert_eq!(local(Some(bad)), "/", "{bad}");
        }
        assert_eq!(local(None), "/");
    }

    #[test]
    fn scopes_cover_what_lies_below() {
        let rg = "/subscriptions/s/resourceGroups/prod";
        assert!(covers(rg, rg));
        assert!(covers(
            rg,
            "/subscriptions/s/resourceGroups/PROD/providers/Microsoft.Compute/virtualMachines/web-1"
        ));
        assert!(!covers(rg, "/subscriptions/s/resourceGroups/prod2"));
        assert!(!covers(rg, "/subscriptions/s"));
    }

    #[test]
    fn unsupported_reasons_group_as_the_reference() {
        assert_eq!(
            unsupported_group(
                "no agent has enrolled for this machine, so nothing can enforce JIT on it"
            ),
            "No agent enrolled"
        );
        assert_eq!(
            unsupported_group("the agent is offline: last seen 5m ago"),
            "Agent offline"
        );
        assert_eq!(
            unsupported_group("nftables is not available on the host"),
            "Enforcement failing (nftables missing, failing or changed)"
        );
        assert_eq!(
            unsupported_group(
                "JIT is switched off for this machine's scope by an administrator: lab"
            ),
            "JIT switched off for the scope"
        );
    }

    #[test]
    fn port_rows_become_rules_and_empty_rows_are_removed() {
        let f = Form::parse(
            b"port=22&protocol=TCP&sources=10.0.0.0%2F8%2C+192.168.1.1&hours=1.5&port=&protocol=*&sources=*&hours=3",
        );
        let (fields, rules, error) = ports_from(&f);
        assert_eq!(error, None);
        assert_eq!(fields.len(), 1);
        assert_eq!(rules[0]["number"], 22);
        assert_eq!(rules[0]["maxRequestAccessDuration"], "PT1H30M");
        assert_eq!(
            rules[0]["allowedSourceAddressPrefixes"],
            json!(["10.0.0.0/8", "192.168.1.1"])
        );
        let (_, _, error) = ports_from(&Form::parse(b"port=ssh&hours=3"));
        assert!(error.unwrap().contains("'ssh' is not a port number"));
        let (_, _, error) = ports_from(&Form::parse(b"port=22&hours=soon"));
        assert!(error.unwrap().contains("not a number of hours"));
        let (_, _, error) = ports_from(&Form::parse(b"port="));
        assert!(error.unwrap().contains("at least one port"));
    }
}
