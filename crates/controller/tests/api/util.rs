#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use jitgate_controller::clock::ManualClock;
use jitgate_controller::{Config, Running};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub const OWNER: &str = "test-owner-token-0123456789";

pub struct Ctl {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub base: String,
    pub sub: String,
    pub http: reqwest::Client,
    /// The controller's clock when the test moves time itself.
    pub clock: Option<ManualClock>,
}

pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    /// The CloudError code.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// The request id an initiate was answered with (`x-jitgate-request-id`).
    pub fn request_id(&self) -> String {
        self.headers["x-jitgate-request-id"]
            .to_str()
            .unwrap()
            .to_owned()
    }

    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

pub fn config(dir: PathBuf) -> Config {
    let mut c = Config::new(SocketAddr::from(([127, 0, 0, 1], 0)), dir);
    c.bootstrap_token = Some(jitgate_proto::Secret::new(OWNER));
    c
}

impl Ctl {
    pub async fn start() -> Ctl {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir).await
    }

    pub async fn start_in(dir: tempfile::TempDir) -> Ctl {
        Self::start_with(dir, |_| {}).await
    }

    pub async fn start_with(dir: tempfile::TempDir, adjust: impl FnOnce(&mut Config)) -> Ctl {
        let mut c = config(dir.path().to_owned());
        adjust(&mut c);
        let running = jitgate_controller::start(c).await.unwrap();
        let base = format!("http://{}", running.local_addr);
        let sub = running.subscription.to_string();
        Ctl {
            running: Some(running),
            dir,
            base,
            sub,
            http: reqwest::Client::new(),
            clock: None,
        }
    }

    /// A controller whose time moves only by [`Ctl::advance`] (it starts at the
    /// system's time), so a test waits for no grant, token or agent to age.
    pub async fn start_simulated() -> Ctl {
        Self::start_simulated_with(tempfile::tempdir().unwrap(), |_| {}).await
    }

    pub async fn start_simulated_with(
        dir: tempfile::TempDir,
        adjust: impl FnOnce(&mut Config),
    ) -> Ctl {
        Self::start_on(dir, ManualClock::starting_now(), adjust).await
    }

    async fn start_on(
        dir: tempfile::TempDir,
        clock: ManualClock,
        adjust: impl FnOnce(&mut Config),
    ) -> Ctl {
        let mut ctl = Self::start_with(dir, |c| {
            c.clock = clock.clone().into();
            adjust(c);
        })
        .await;
        ctl.clock = Some(clock);
        ctl
    }

    /// Moves the simulated clock forward (see [`Ctl::start_simulated`]).
    pub fn advance(&self, by: std::time::Duration) {
        self.clock
            .as_ref()
            .expect("advance needs a controller started with start_simulated")
            .advance(by);
    }

    /// The controller's time.
    pub fn now(&self) -> jiff::Timestamp {
        self.clock
            .as_ref()
            .map_or_else(jiff::Timestamp::now, ManualClock::now)
    }

    /// Stops the controller gracefully and starts a new one on the same data (and the
    /// same clock).
    pub async fn restart(mut self) -> Ctl {
        self.stop().await;
        Self::start_again(self).await
    }

    /// Starts a stopped controller again on its data and clock.
    pub async fn start_again(self) -> Ctl {
        match self.clock.clone() {
            Some(clock) => Self::start_on(self.dir, clock, |_| {}).await,
            None => Self::start_in(self.dir).await,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.unwrap();
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        self.call_with(method, path, token, body, &[]).await
    }

    /// [`Ctl::call`] with more request headers.
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let method_name = method.clone();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        let ct = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        crate::schema::check(&method_name, path, status.as_u16(), ct, &body);
        Resp {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.call(Method::GET, path, Some(OWNER), None).await
    }

    pub async fn get_as(&self, token: &str, path: &str) -> Resp {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.call(Method::POST, path, Some(OWNER), Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Resp {
        self.call(Method::PUT, path, Some(OWNER), Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Resp {
        self.call(Method::DELETE, path, Some(OWNER), None).await
    }

    pub fn vm_id(&self, rg: &str, name: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}",
            self.sub
        )
    }

    pub fn policy_path(&self, rg: &str, loc: &str, name: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Security/locations/{loc}/jitNetworkAccessPolicies/{name}",
            self.sub
        )
    }

    pub async fn register(&self, rg: &str, name: &str) {
        let r = self
            .post(
                "/api/v1/vms",
                json!({"resourceGroup": rg, "name": name, "location": "westeurope"}),
            )
            .await;
        assert!(r.status.is_success(), "register {rg}/{name}: {:?}", r.body);
    }

    /// Registers the VMs and puts them in policy `default` of `rg` with ports 22 and 3389.
    pub async fn enable(&self, rg: &str, vms: &[&str], allowed: &str) -> Resp {
        for vm in vms {
            self.register(rg, vm).await;
        }
        let body = json!({
            "kind": "Basic",
            "properties": {"virtualMachines": vms.iter().map(|vm| json!({
                "id": self.vm_id(rg, vm),
                "ports": [
                    {"number": 22, "protocol": "TCP", "allowedSourceAddressPrefix": allowed, "maxRequestAccessDuration": "PT3H"},
                    {"number": 3389, "protocol": "*", "allowedSourceAddressPrefix": allowed, "maxRequestAccessDuration": "PT1H"}
                ]
            })).collect::<Vec<_>>()}
        });
        let r = self
            .put(
                &format!(
                    "{}?api-version=2020-01-01",
                    self.policy_path(rg, "westeurope", "default")
                ),
                body,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "enable: {:?}", r.body);
        r
    }

    pub async fn initiate_as(&self, token: &str, rg: &str, vm: &str, ports: Value) -> Resp {
        self.initiate_with(token, rg, vm, ports, &[]).await
    }

    /// [`Ctl::initiate_as`] with more request headers.
    pub async fn initiate_with(
        &self,
        token: &str,
        rg: &str,
        vm: &str,
        ports: Value,
        headers: &[(&str, &str)],
    ) -> Resp {
        let body = json!({"virtualMachines": [{"id": self.vm_id(rg, vm), "ports": ports}], "justification": "test"});
        self.call_with(
            Method::POST,
            &format!(
                "{}/initiate?api-version=2020-01-01",
                self.policy_path(rg, "westeurope", "default")
            ),
            Some(token),
            Some(body),
            headers,
        )
        .await
    }

    pub async fn initiate(&self, rg: &str, vm: &str, ports: Value) -> Resp {
        self.initiate_as(OWNER, rg, vm, ports).await
    }

    /// Creates a token for `principal` with `role` at `scope`; returns the token.
    pub async fn principal(&self, principal: &str, role: &str, scope: &str) -> String {
        let t = self
            .post("/api/v1/tokens", json!({"principal": principal}))
            .await;
        assert_eq!(t.status, StatusCode::CREATED, "{:?}", t.body);
        let r = self
            .post(
                "/api/v1/roleAssignments",
                json!({"principal": principal, "role": role, "scope": scope}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        t.body["token"].as_str().unwrap().to_owned()
    }

    pub async fn get_policy(&self, rg: &str) -> Value {
        let r = self
            .get(&format!(
                "{}?api-version=2020-01-01",
                self.policy_path(rg, "westeurope", "default")
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.body
    }

    /// Everything a rejected call must leave unchanged (the audit log aside, which
    /// records the refusal).
    pub async fn snapshot(&self) -> Value {
        let policies = self
            .get(&format!("/subscriptions/{}/providers/Microsoft.Security/jitNetworkAccessPolicies?api-version=2020-01-01", self.sub))
            .await
            .body;
        json!({
            "policies": policies,
            "vms": self.get("/api/v1/vms").await.body,
            "requests": self.get("/api/v1/requests?limit=1000").await.body,
            "tokens": self.get("/api/v1/tokens").await.body,
            "roles": self.get("/api/v1/roleAssignments").await.body,
            "approvalRules": self.get("/api/v1/approvalRules").await.body,
            "webhooks": self.get("/api/v1/webhooks").await.body,
        })
    }

    pub async fn audit(&self, query: &str) -> Vec<Value> {
        let r = self.get(&format!("/api/v1/audit?{query}")).await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        r.body["value"].as_array().unwrap().clone()
    }
}

/// The status of port `number` of the newest request of the policy.
pub fn newest_port_status(policy: &Value, number: u64) -> (String, String) {
    let req = &policy["properties"]["requests"][0];
    for vm in req["virtualMachines"].as_array().unwrap() {
        for p in vm["ports"].as_array().unwrap() {
            if p["number"].as_u64() == Some(number) {
                return (
                    p["status"].as_str().unwrap().into(),
                    p["statusReason"].as_str().unwrap().into(),
                );
            }
        }
    }
    panic!("port {number} not in newest request: {policy}");
}

pub fn in_secs(s: i64) -> String {
    jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(s))
        .unwrap()
        .to_string()
}

/// Enrolls an agent for lab/<name>; returns (vm id, agent token).
pub async fn enroll(ctl: &Ctl, name: &str) -> (String, String) {
    let et = ctl.post("/api/v1/enrollTokens", json!({"uses": 1})).await;
    assert_eq!(et.status, StatusCode::CREATED, "{:?}", et.body);
    let r = ctl
        .call(
            Method::POST,
            "/api/v1/agent/enroll",
            None,
            Some(json!({"enrollToken": et.body["token"], "resourceGroup": "lab", "name": name})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    (
        r.body["vmId"].as_str().unwrap().to_owned(),
        r.body["token"].as_str().unwrap().to_owned(),
    )
}
