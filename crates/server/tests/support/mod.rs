//! Shared harness for the end-to-end API tests: an in-process server on loopback over either
//! store backend, an admin token, and a small JSON client for both APIs.
//!
//! Each test file does `mod support;` and uses what it needs, hence the `dead_code` allowance.
#![allow(dead_code, unused_macros, unused_imports)]

pub mod process;

/// Generates `<name>::embedded` and `<name>::etcd` for each `async fn <name>(Backend)` (the
/// caller imports `Backend`).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn embedded() {
                super::$name(super::Backend::Embedded).await
            }
            #[tokio::test]
            async fn etcd() {
                super::$name(super::Backend::Etcd).await
            }
        }
    )*};
}
pub(crate) use on_both_backends;

use isthmus_server::{Config, ServerHandle};
use isthmus_store::testing::EtcdProcess;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "admin-secret-Pw1";
pub const ADMIN_PROJECT: &str = "admin";
pub const MEMBER_PASSWORD: &str = "member-secret-Pw1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Etcd,
}

/// What keeps a store's backing alive for as long as the server uses it.
enum Backing {
    Dir(tempfile::TempDir),
    Etcd(Arc<EtcdProcess>),
}

/// A config for tests: ephemeral loopback ports, the test admin password and cheap hashing.
pub fn test_config() -> Config {
    Config {
        identity_listen: "127.0.0.1:0".parse().expect("addr"),
        network_listen: "127.0.0.1:0".parse().expect("addr"),
        admin_password: Some(ADMIN_PASSWORD.into()),
        password_hash_kib: 64,
        ..Config::default()
    }
}

/// A running in-process server.
pub struct TestServer {
    /// `None` once stopped.
    pub handle: Option<ServerHandle>,
    pub identity_addr: std::net::SocketAddr,
    pub network_addr: std::net::SocketAddr,
    /// `http://127.0.0.1:P` of the network API (no trailing slash).
    pub network_url: String,
    /// `http://127.0.0.1:P/v3` of the identity API.
    pub identity_url: String,
    pub http: reqwest::Client,
    /// The network API as the bootstrap admin.
    pub admin: Api,
    pub backend: Backend,
    // Declared last: dropped after the server handle (the etcd process is killed on drop).
    backing: Backing,
}

impl TestServer {
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, |_| {}).await
    }

    /// Opens node `host`'s view stream as the admin (resuming after `since` if given); the
    /// response, already checked to be 200.
    pub async fn watch(&self, host: &str, since: Option<i64>) -> reqwest::Response {
        let q = since.map(|r| format!("?since={r}")).unwrap_or_default();
        let resp = self
            .admin
            .request(Method::GET, &format!("/isthmus/v1/nodes/{host}/watch{q}"))
            .send()
            .await
            .expect("watch");
        assert_eq!(resp.status(), StatusCode::OK);
        resp
    }

    /// Starts a server on a fresh store of `backend`, with `tweak` applied to the config.
    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestServer {
        match backend {
            Backend::Embedded => {
                let dir = tempfile::Builder::new()
                    .prefix("isthmus-api-test-")
                    .tempdir()
                    .expect("tempdir");
                let store = isthmus_store::embedded::EmbeddedStore::open(dir.path()).expect("open embedded store");
                Self::launch(backend, store, Backing::Dir(dir), tweak).await
            }
            Backend::Etcd => {
                // EtcdProcess::start blocks while etcd boots; keep it off the async workers.
                let etcd = tokio::task::spawn_blocking(EtcdProcess::start)
                    .await
                    .expect("etcd start task");
                Self::start_on_etcd(Arc::new(etcd), tweak).await
            }
        }
    }

    /// Starts a server on an existing etcd (several servers may share one, and share its
    /// token key directory unless `tweak` sets another).
    pub async fn start_on_etcd(etcd: Arc<EtcdProcess>, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let store = isthmus_store::etcd::EtcdStore::connect(vec![etcd.endpoint()])
            .await
            .expect("connect to etcd");
        let keys = etcd.dir().join("token-keys");
        Self::launch(Backend::Etcd, store, Backing::Etcd(etcd), move |c| {
            c.token_key_dir = Some(keys);
            tweak(c)
        })
        .await
    }

    async fn launch(
        backend: Backend,
        store: isthmus_store::DynStore,
        backing: Backing,
        tweak: impl FnOnce(&mut Config),
    ) -> TestServer {
        let mut config = test_config();
        tweak(&mut config);
        let handle = isthmus_server::start(config, store).await.expect("server starts");
        let http = reqwest::Client::new();
        let network_url = format!("http://{}", handle.network_addr);
        let identity_url = format!("http://{}/v3", handle.identity_addr);
        let token = issue_token(&http, &identity_url, ADMIN_USER, ADMIN_PASSWORD, ADMIN_PROJECT).await;
        let admin = Api {
            http: http.clone(),
            base: network_url.clone(),
            token: token.clone(),
        };
        TestServer {
            identity_addr: handle.identity_addr,
            network_addr: handle.network_addr,
            handle: Some(handle),
            network_url,
            identity_url,
            http,
            admin,
            backend,
            backing,
        }
    }

    /// The etcd this server runs on, to start more servers on it.
    pub fn etcd(&self) -> Option<Arc<EtcdProcess>> {
        match &self.backing {
            Backing::Etcd(e) => Some(e.clone()),
            Backing::Dir(_) => None,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop().await;
        }
    }

    /// The network API with `token`.
    pub fn api(&self, token: &str) -> Api {
        Api {
            http: self.http.clone(),
            base: self.network_url.clone(),
            token: token.to_string(),
        }
    }

    /// A new token for `user` scoped to `project` (names in the Default domain).
    pub async fn token(&self, user: &str, password: &str, project: &str) -> String {
        issue_token(&self.http, &self.identity_url, user, password, project).await
    }

    /// A fresh admin token (e.g. after the harness's one expired).
    pub async fn admin_token(&self) -> String {
        self.token(ADMIN_USER, ADMIN_PASSWORD, ADMIN_PROJECT).await
    }

    /// An identity API call as the admin. Retried once with a fresh admin token on 401, so
    /// servers with a very short token lifetime can still be set up.
    pub async fn identity(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.identity_url);
        let out = send(&self.http, method.clone(), &url, Some(&self.admin.token), body.clone()).await;
        if out.0 != StatusCode::UNAUTHORIZED {
            return out;
        }
        let fresh = self.admin_token().await;
        send(&self.http, method, &url, Some(&fresh), body).await
    }

    pub async fn create_project(&self, name: &str) -> String {
        let (s, b) = self
            .identity(
                Method::POST,
                "/projects",
                Some(json!({"project": {"name": name, "domain_id": "default"}})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "create project {name}: {b}");
        b["project"]["id"].as_str().expect("project id").to_string()
    }

    pub async fn create_user(&self, name: &str, password: &str) -> String {
        let (s, b) = self
            .identity(
                Method::POST,
                "/users",
                Some(json!({"user": {"name": name, "password": password, "domain_id": "default"}})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "create user {name}: {b}");
        b["user"]["id"].as_str().expect("user id").to_string()
    }

    pub async fn role_id(&self, name: &str) -> String {
        let (s, b) = self.identity(Method::GET, &format!("/roles?name={name}"), None).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let roles = b["roles"].as_array().expect("roles");
        assert_eq!(roles.len(), 1, "exactly one role named {name}: {b}");
        roles[0]["id"].as_str().expect("role id").to_string()
    }

    pub async fn grant(&self, project_id: &str, user_id: &str, role: &str) {
        let r = self.role_id(role).await;
        let (s, b) = self
            .identity(
                Method::PUT,
                &format!("/projects/{project_id}/users/{user_id}/roles/{r}"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "grant {role}: {b}");
    }

    /// A user `name` with the `node` role on the service project (a node agent's user), and
    /// its token.
    pub async fn node_token(&self, name: &str) -> String {
        let (_, b) = self.identity(Method::GET, "/projects?name=service", None).await;
        let service = b["projects"][0]["id"]
            .as_str()
            .expect("service project exists")
            .to_string();
        let user = self.create_user(name, MEMBER_PASSWORD).await;
        self.grant(&service, &user, "node").await;
        self.token(name, MEMBER_PASSWORD, "service").await
    }

    /// The id of user `name` (Default domain).
    pub async fn user_id(&self, name: &str) -> String {
        let (s, b) = self.identity(Method::GET, &format!("/users?name={name}"), None).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        b["users"][0]["id"].as_str().expect("user exists").to_string()
    }

    /// Project `project_id` grants node `node` the right to plug its ports: the node role on
    /// the project (`openstack role add --user <node> --project <project> node`).
    pub async fn grant_node(&self, node: &str, project_id: &str) {
        let user = self.user_id(node).await;
        self.grant(project_id, &user, "node").await;
    }

    /// Takes that grant back (`openstack role remove ...`).
    pub async fn revoke_node(&self, node: &str, project_id: &str) {
        let (user, role) = (self.user_id(node).await, self.role_id("node").await);
        let (s, b) = self
            .identity(
                Method::DELETE,
                &format!("/projects/{project_id}/users/{user}/roles/{role}"),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT, "revoke node: {b}");
    }

    /// A project `proj-<tag>` with user `user-<tag>` as `member`, and that user's token.
    pub async fn member(&self, tag: &str) -> Member {
        let project = format!("proj-{tag}");
        let user = format!("user-{tag}");
        let project_id = self.create_project(&project).await;
        let user_id = self.create_user(&user, MEMBER_PASSWORD).await;
        self.grant(&project_id, &user_id, "member").await;
        let token = self.token(&user, MEMBER_PASSWORD, &project).await;
        Member {
            project,
            project_id,
            user,
            user_id,
            api: self.api(&token),
            token,
        }
    }
}

/// A non-admin user with the member role on its own project.
pub struct Member {
    pub project: String,
    pub project_id: String,
    pub user: String,
    pub user_id: String,
    pub token: String,
    pub api: Api,
}

/// Password authentication scoped to a project; panics unless a token is issued.
pub async fn issue_token(
    http: &reqwest::Client,
    identity_url: &str,
    user: &str,
    password: &str,
    project: &str,
) -> String {
    let config = isthmus_client::Config::new(identity_url, isthmus_client::Auth::password(user, password, project))
        .identity_only();
    let client = isthmus_client::Client::with_http(http.clone(), config);
    match client.token(None).await {
        Ok(t) => t.secret().to_string(),
        Err(e) => panic!("token for {user}/{project}: {e}"),
    }
}

/// Sends one request; the body comes back as JSON (`Null` when empty, a string when not JSON).
pub async fn send(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = http.request(method.clone(), url);
    if let Some(t) = token {
        req = req.header("X-Auth-Token", t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: request failed: {e}"));
    read(resp).await
}

/// Status and body of a response (see [`send`]).
pub async fn read(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.expect("response body read");
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}

/// The network API with one token. Paths start at `/v2.0/...`.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    /// `http://127.0.0.1:P`
    pub base: String,
    pub token: String,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        send(&self.http, method, &self.url(path), Some(&self.token), body).await
    }
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, Some(body)).await
    }
    /// PUT without a body (e.g. adding one tag).
    pub async fn put_empty(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::PUT, path, None).await
    }
    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, None).await
    }
    /// A request builder with the token set, for unusual requests (raw bodies, headers).
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .header("X-Auth-Token", &self.token)
    }

    // Creation helpers: assert 201 and return the created resource.

    pub async fn create(&self, collection: &str, singular: &str, attrs: Value) -> Value {
        let (s, b) = self
            .post(&format!("/v2.0/{collection}"), json!({ singular: attrs }))
            .await;
        assert_eq!(s, StatusCode::CREATED, "create {singular} {attrs}: {b}");
        b[singular].clone()
    }
    pub async fn network(&self, name: &str) -> Value {
        self.create("networks", "network", json!({"name": name})).await
    }
    /// An IPv4 subnet with default gateway and pools.
    pub async fn subnet(&self, network_id: &str, cidr: &str) -> Value {
        self.create(
            "subnets",
            "subnet",
            json!({"network_id": network_id, "cidr": cidr, "ip_version": 4}),
        )
        .await
    }
    pub async fn port(&self, network_id: &str) -> Value {
        self.create("ports", "port", json!({"network_id": network_id})).await
    }
    /// The items of a list call that must succeed.
    pub async fn list(&self, path: &str, plural: &str) -> Vec<Value> {
        let (s, b) = self.get(path).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {b}");
        b[plural]
            .as_array()
            .unwrap_or_else(|| panic!("GET {path}: no '{plural}' list: {b}"))
            .clone()
    }
    /// Ids of the items of a list call.
    pub async fn ids(&self, path: &str, plural: &str) -> Vec<String> {
        self.list(path, plural).await.iter().map(id_of).collect()
    }
}

pub fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

/// Asserts a Neutron error: status, `{"NeutronError": {"type", "message", "detail"}}`, and the
/// type when one is given.
pub fn assert_neutron_error(status: StatusCode, body: &Value, want: StatusCode, kind: Option<&str>) {
    assert_eq!(status, want, "expected {want}, got {status}: {body}");
    let e = &body["NeutronError"];
    assert!(e.is_object(), "no NeutronError object in {body}");
    assert!(
        e["type"].as_str().is_some_and(|t| !t.is_empty()),
        "NeutronError.type missing: {body}"
    );
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "NeutronError.message missing: {body}"
    );
    assert!(e["detail"].is_string(), "NeutronError.detail missing: {body}");
    if let Some(k) = kind {
        assert_eq!(e["type"], json!(k), "error type: {body}");
    }
}

/// The NeutronError message of an error body.
pub fn error_message(body: &Value) -> &str {
    body["NeutronError"]["message"].as_str().unwrap_or("")
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An RBAC policy create as `api`: its status and body.
pub async fn policy(api: &Api, object_type: &str, object_id: &str, action: &str, target: &str) -> (StatusCode, Value) {
    api.post(
        "/v2.0/rbac-policies",
        json!({"rbac_policy": {"object_type": object_type, "object_id": object_id,
                               "action": action, "target_tenant": target}}),
    )
    .await
}

/// [`policy`], which must be created: the policy's id.
pub async fn created_policy(api: &Api, object_type: &str, object_id: &str, action: &str, target: &str) -> String {
    let (s, b) = policy(api, object_type, object_id, action, target).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    id_of(&b["rbac_policy"])
}

/// Three members for sharing tests: the owner, a project it shares with, and a third one.
pub async fn projects(s: &TestServer) -> (Member, Member, Member) {
    (
        s.member("owner").await,
        s.member("guest").await,
        s.member("third").await,
    )
}
