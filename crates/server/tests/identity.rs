//! Keystone v3 subset, end to end: the real server on loopback over an embedded store.

use isthmus_server::{Config, ServerHandle};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

const ADMIN_PW: &str = "admin-secret-Pw1";

struct Server {
    handle: ServerHandle,
    url: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start_with(tweak: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = isthmus_store::embedded::EmbeddedStore::open(dir.path()).expect("open embedded store");
    let mut config = Config {
        identity_listen: "127.0.0.1:0".parse().expect("addr"),
        network_listen: "127.0.0.1:0".parse().expect("addr"),
        admin_password: Some(ADMIN_PW.into()),
        password_hash_kib: 64,
        token_key_dir: Some(dir.path().join("token-keys")),
        ..Config::default()
    };
    tweak(&mut config);
    let handle = isthmus_server::start(config, store).await.expect("server starts");
    let url = format!("http://{}", handle.identity_addr);
    Server {
        handle,
        url,
        client: reqwest::Client::new(),
        _dir: dir,
    }
}

async fn start() -> Server {
    start_with(|_| {}).await
}

fn password_auth(user: &str, password: &str, project: Option<&str>) -> Value {
    let mut body = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": user, "domain": {"name": "Default"}, "password": password}}}}});
    if let Some(p) = project {
        body["auth"]["scope"] = json!({"project": {"name": p, "domain": {"id": "default"}}});
    }
    body
}

impl Server {
    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.header("X-Auth-Token", t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let text = resp.text().await.expect("body read");
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).expect("JSON body")
        };
        (status, v)
    }
    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }
    async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }
    async fn patch(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(token), Some(body)).await
    }
    async fn delete(&self, path: &str, token: &str) -> StatusCode {
        self.call(Method::DELETE, path, Some(token), None).await.0
    }
    async fn put(&self, path: &str, token: &str) -> StatusCode {
        self.call(Method::PUT, path, Some(token), None).await.0
    }
    async fn head(&self, path: &str, token: &str) -> StatusCode {
        self.call(Method::HEAD, path, Some(token), None).await.0
    }

    /// POST /v3/auth/tokens: status, subject token, body.
    async fn auth(&self, body: Value) -> (StatusCode, Option<String>, Value) {
        let resp = self
            .client
            .post(format!("{}/v3/auth/tokens", self.url))
            .json(&body)
            .send()
            .await
            .expect("sent");
        let status = resp.status();
        let token = resp
            .headers()
            .get("x-subject-token")
            .map(|v| v.to_str().expect("ascii").to_string());
        let v: Value = resp.json().await.expect("JSON body");
        (status, token, v)
    }

    async fn token(&self, user: &str, password: &str, project: &str) -> String {
        let (status, token, body) = self.auth(password_auth(user, password, Some(project))).await;
        assert_eq!(status, StatusCode::CREATED, "token for {user}: {body}");
        token.expect("X-Subject-Token header")
    }

    async fn admin(&self) -> String {
        self.token("admin", ADMIN_PW, "admin").await
    }

    /// Status of validating `subject` with `auth`.
    async fn check(&self, auth: &str, subject: &str) -> StatusCode {
        self.client
            .get(format!("{}/v3/auth/tokens", self.url))
            .header("X-Auth-Token", auth)
            .header("X-Subject-Token", subject)
            .send()
            .await
            .expect("sent")
            .status()
    }

    async fn create_project(&self, admin: &str, name: &str) -> String {
        let (s, b) = self
            .post(
                "/v3/projects",
                admin,
                json!({"project": {"name": name, "domain_id": "default"}}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["project"]["id"].as_str().expect("project id").to_string()
    }

    async fn create_user(&self, admin: &str, name: &str, password: &str) -> String {
        let (s, b) = self
            .post(
                "/v3/users",
                admin,
                json!({"user": {"name": name, "password": password}}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["user"]["id"].as_str().expect("user id").to_string()
    }

    async fn role_id(&self, admin: &str, name: &str) -> String {
        let (s, b) = self.get(&format!("/v3/roles?name={name}"), admin).await;
        assert_eq!(s, StatusCode::OK);
        let roles = b["roles"].as_array().expect("roles");
        assert_eq!(roles.len(), 1, "{b}");
        roles[0]["id"].as_str().expect("id").to_string()
    }

    /// A project, a user with role `member` on it, and that user's token.
    async fn member(&self, admin: &str, tag: &str) -> (String, String, String) {
        let p = self.create_project(admin, &format!("proj-{tag}")).await;
        let u = self.create_user(admin, &format!("user-{tag}"), "pw-member").await;
        let r = self.role_id(admin, "member").await;
        assert_eq!(
            self.put(&format!("/v3/projects/{p}/users/{u}/roles/{r}"), admin).await,
            StatusCode::NO_CONTENT
        );
        let t = self
            .token(&format!("user-{tag}"), "pw-member", &format!("proj-{tag}"))
            .await;
        (p, u, t)
    }
}

fn assert_error(body: &Value, code: u16, title: &str) {
    assert_eq!(body["error"]["code"], json!(code), "{body}");
    assert_eq!(body["error"]["title"], json!(title), "{body}");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn is_keystone_time(s: &str) -> bool {
    // YYYY-MM-DDTHH:MM:SS.ffffffZ
    s.len() == 27
        && s.ends_with('Z')
        && s.as_bytes()[10] == b'T'
        && s.as_bytes()[19] == b'.'
        && s[20..26].bytes().all(|b| b.is_ascii_digit())
}

#[tokio::test]
async fn version_documents() {
    let s = start().await;
    let r = s.client.get(format!("{}/", s.url)).send().await.expect("sent");
    assert_eq!(r.status(), StatusCode::MULTIPLE_CHOICES);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["versions"]["values"][0]["id"], "v3.14");
    for path in ["/v3", "/v3/"] {
        let r = s.client.get(format!("{}{path}", s.url)).send().await.expect("sent");
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.expect("json");
        assert_eq!(v["version"]["status"], "stable");
        assert_eq!(v["version"]["links"][0]["href"], json!(format!("{}/v3/", s.url)));
        assert_eq!(
            v["version"]["media-types"][0]["type"],
            "application/vnd.openstack.identity-v3+json"
        );
    }
    let (st, b) = s.call(Method::GET, "/v3/nothing-here", None, None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_error(&b, 404, "Not Found");
    s.handle.stop().await;
}

#[tokio::test]
async fn token_issue_and_catalog() {
    let s = start().await;
    let (status, token, body) = s.auth(password_auth("admin", ADMIN_PW, Some("admin"))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token = token.expect("X-Subject-Token");
    let t = &body["token"];
    assert_eq!(t["methods"], json!(["password"]));
    assert_eq!(t["user"]["name"], "admin");
    assert_eq!(t["user"]["domain"], json!({"id": "default", "name": "Default"}));
    assert_eq!(t["project"]["name"], "admin");
    assert_eq!(t["project"]["domain"]["id"], "default");
    assert_eq!(t["is_domain"], json!(false));
    assert!(t["user"].get("password_expires_at").is_some());
    let roles: Vec<&str> = t["roles"]
        .as_array()
        .expect("roles")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(
        roles.contains(&"admin") && roles.contains(&"member") && roles.contains(&"reader"),
        "{roles:?}"
    );
    assert!(
        is_keystone_time(t["expires_at"].as_str().expect("expires_at")),
        "{}",
        t["expires_at"]
    );
    assert!(is_keystone_time(t["issued_at"].as_str().expect("issued_at")));
    assert_eq!(t["audit_ids"].as_array().map(Vec::len), Some(1));

    let network_url = s.handle.state.network_url.clone();
    assert_eq!(network_url, format!("http://{}/", s.handle.network_addr));
    let catalog = t["catalog"].as_array().expect("catalog");
    let net = catalog
        .iter()
        .find(|c| c["type"] == "network")
        .expect("network service in catalog");
    assert_eq!(net["name"], "neutron");
    let mut ifaces: Vec<&str> = net["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| {
            assert_eq!(e["url"], json!(network_url));
            assert_eq!(e["region"], "RegionOne");
            assert_eq!(e["region_id"], "RegionOne");
            e["interface"].as_str().expect("interface")
        })
        .collect();
    ifaces.sort_unstable();
    assert_eq!(ifaces, ["admin", "internal", "public"]);
    let ident = catalog
        .iter()
        .find(|c| c["type"] == "identity")
        .expect("identity service in catalog");
    assert_eq!(ident["endpoints"][0]["url"], json!(format!("{}/v3", s.url)));

    // The token works, and ?nocatalog leaves the catalog out.
    let (st, b) = s.get("/v3/projects", &token).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let r = s
        .client
        .post(format!("{}/v3/auth/tokens?nocatalog", s.url))
        .json(&password_auth("admin", ADMIN_PW, Some("admin")))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::CREATED);
    let b: Value = r.json().await.expect("json");
    assert!(b["token"].get("catalog").is_none(), "{b}");

    // By user id and project id.
    let uid = t["user"]["id"].as_str().expect("uid");
    let pid = t["project"]["id"].as_str().expect("pid");
    let (st, _, b) = s
        .auth(json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {"id": uid, "password": ADMIN_PW}}},
            "scope": {"project": {"id": pid}}}}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    assert_eq!(b["token"]["project"]["id"], json!(pid));

    // No scope: the default project; explicitly unscoped: none.
    let (st, _, b) = s.auth(password_auth("admin", ADMIN_PW, None)).await;
    assert_eq!(st, StatusCode::CREATED);
    assert_eq!(b["token"]["project"]["id"], json!(pid));
    let mut req = password_auth("admin", ADMIN_PW, None);
    req["auth"]["scope"] = json!("unscoped");
    let (st, unscoped, b) = s.auth(req).await;
    assert_eq!(st, StatusCode::CREATED);
    assert!(b["token"].get("project").is_none(), "{b}");
    assert!(
        b["token"].get("catalog").is_none(),
        "unscoped tokens carry no catalog: {b}"
    );
    let unscoped = unscoped.expect("token");
    // Unscoped tokens can list their projects but not administer, and are refused by `validate`.
    let (st, b) = s.get("/v3/auth/projects", &unscoped).await;
    assert_eq!(st, StatusCode::OK);
    assert!(b["projects"]
        .as_array()
        .expect("projects")
        .iter()
        .any(|p| p["id"] == json!(pid)));
    assert_eq!(s.get("/v3/users", &unscoped).await.0, StatusCode::FORBIDDEN);
    assert!(s.handle.state.identity.validate(&unscoped).await.is_err());
    // Re-scope it with the token method.
    let (st, rescoped, b) = s
        .auth(
            json!({"auth": {"identity": {"methods": ["token"], "token": {"id": unscoped}},
            "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}}}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    assert_eq!(b["token"]["project"]["id"], json!(pid));
    let ctx = s
        .handle
        .state
        .identity
        .validate(&rescoped.expect("token"))
        .await
        .expect("valid");
    assert!(ctx.is_admin);
    assert_eq!(ctx.project_id, pid);
    assert_eq!(ctx.user_name, "admin");
    s.handle.stop().await;
}

#[tokio::test]
async fn bad_credentials_are_401_without_enumeration() {
    let s = start().await;
    let (st, tok, wrong_pw) = s.auth(password_auth("admin", "not-the-password", Some("admin"))).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert!(tok.is_none());
    assert_error(&wrong_pw, 401, "Unauthorized");
    let (st, _, no_user) = s.auth(password_auth("nobody", "whatever", Some("admin"))).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong_pw, no_user, "unknown user and wrong password must look the same");
    let (st, _, _) = s.auth(password_auth("admin", ADMIN_PW, Some("no-such-project"))).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, _, b) = s
        .auth(json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {"id": "0123", "password": "x"}}}}}))
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{b}");

    // Malformed requests are 400 with Keystone's error body.
    let r = s
        .client
        .post(format!("{}/v3/auth/tokens", s.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_error(&r.json().await.expect("json"), 400, "Bad Request");
    let (st, _, b) = s.auth(json!({"auth": {"identity": {"methods": ["password"]}}})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{b}");
    let (st, _, b) = s.auth(json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "admin", "password": 5}}}}})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(!b.to_string().contains('5'), "a password is never echoed: {b}");

    // Requests without or with a garbage token.
    let (st, b) = s.call(Method::GET, "/v3/projects", None, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_error(&b, 401, "Unauthorized");
    for garbage in ["x", "a.b", "gAAAA", &"A".repeat(5000)] {
        assert_eq!(
            s.get("/v3/projects", garbage).await.0,
            StatusCode::UNAUTHORIZED,
            "{garbage}"
        );
    }
    // A user with no role on the project cannot get a token for it.
    let admin = s.admin().await;
    s.create_project(&admin, "lonely").await;
    s.create_user(&admin, "loner", "pw-loner").await;
    let (st, _, b) = s.auth(password_auth("loner", "pw-loner", Some("lonely"))).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{b}");
    // ...but may get an unscoped one.
    let (st, _, b) = s.auth(password_auth("loner", "pw-loner", None)).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    assert!(b["token"].get("project").is_none());
    s.handle.stop().await;
}

#[tokio::test]
async fn token_validate_and_revoke() {
    let s = start().await;
    let admin = s.admin().await;
    let (_, uid, member) = s.member(&admin, "val").await;

    let r = s
        .client
        .get(format!("{}/v3/auth/tokens", s.url))
        .header("X-Auth-Token", &admin)
        .header("X-Subject-Token", &member)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers().get("x-subject-token").and_then(|v| v.to_str().ok()),
        Some(member.as_str())
    );
    let b: Value = r.json().await.expect("json");
    assert_eq!(b["token"]["user"]["id"], json!(uid));
    let roles: Vec<&str> = b["token"]["roles"]
        .as_array()
        .expect("roles")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(roles, ["member", "reader"]);

    let head = |auth: String, subject: String| {
        let c = s.client.clone();
        let url = format!("{}/v3/auth/tokens", s.url);
        async move {
            c.head(url)
                .header("X-Auth-Token", auth)
                .header("X-Subject-Token", subject)
                .send()
                .await
                .expect("sent")
                .status()
        }
    };
    assert_eq!(head(admin.clone(), member.clone()).await, StatusCode::OK);
    assert_eq!(
        head(member.clone(), member.clone()).await,
        StatusCode::OK,
        "a user may validate their own token"
    );
    assert_eq!(head(admin.clone(), "bogus".into()).await, StatusCode::NOT_FOUND);
    assert_eq!(s.check(&admin, "bogus").await, StatusCode::NOT_FOUND);
    assert_eq!(s.check("bogus", &member).await, StatusCode::UNAUTHORIZED);
    // A member cannot validate someone else's token.
    assert_eq!(s.check(&member, &admin).await, StatusCode::FORBIDDEN);

    let ctx = s.handle.state.identity.validate(&member).await.expect("valid");
    assert_eq!(ctx.user_id, uid);
    assert!(!ctx.is_admin);
    assert!(ctx.roles.contains(&"member".to_string()));
    assert!(s.handle.state.identity.project_exists(&ctx.project_id));
    assert!(!s.handle.state.identity.project_exists("0000"));

    // Revoke: 204, then the token is dead everywhere; a second token of the same user lives.
    let other = s.token("user-val", "pw-member", "proj-val").await;
    let r = s
        .client
        .delete(format!("{}/v3/auth/tokens", s.url))
        .header("X-Auth-Token", &admin)
        .header("X-Subject-Token", &member)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(head(admin.clone(), member.clone()).await, StatusCode::NOT_FOUND);
    assert!(s.handle.state.identity.validate(&member).await.is_err());
    assert_eq!(
        s.get(&format!("/v3/users/{uid}"), &member).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(head(admin.clone(), other.clone()).await, StatusCode::OK);
    s.handle.stop().await;
}

#[tokio::test]
async fn tokens_expire() {
    let s = start_with(|c| c.token_ttl_secs = 1).await;
    let t = s.admin().await;
    assert_eq!(s.check(&t, &t).await, StatusCode::OK);
    assert!(s.handle.state.identity.validate(&t).await.is_ok());
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(s.handle.state.identity.validate(&t).await.is_err());
    assert_eq!(s.check(&t, &t).await, StatusCode::UNAUTHORIZED);
    let fresh = s.admin().await;
    assert_eq!(s.check(&fresh, &t).await, StatusCode::NOT_FOUND);
    assert_eq!(s.check(&fresh, &fresh).await, StatusCode::OK);
    s.handle.stop().await;
}

#[tokio::test]
async fn tokens_die_with_their_user_project_or_role() {
    let s = start().await;
    let admin = s.admin().await;

    let (p, _, t) = s.member(&admin, "delproj").await;
    assert_eq!(s.check(&admin, &t).await, StatusCode::OK);
    assert_eq!(
        s.delete(&format!("/v3/projects/{p}"), &admin).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(s.check(&admin, &t).await, StatusCode::NOT_FOUND);
    assert!(s.handle.state.identity.validate(&t).await.is_err());

    let (_, u, t) = s.member(&admin, "deluser").await;
    assert_eq!(s.check(&admin, &t).await, StatusCode::OK);
    assert_eq!(
        s.delete(&format!("/v3/users/{u}"), &admin).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(s.check(&admin, &t).await, StatusCode::NOT_FOUND);
    // A new user of the same name does not inherit the token.
    s.create_user(&admin, "user-deluser", "pw-member").await;
    assert_eq!(s.check(&admin, &t).await, StatusCode::NOT_FOUND);

    let (p, u, t) = s.member(&admin, "delrole").await;
    let r = s.role_id(&admin, "member").await;
    assert_eq!(
        s.delete(&format!("/v3/projects/{p}/users/{u}/roles/{r}"), &admin).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(s.check(&admin, &t).await, StatusCode::NOT_FOUND);

    let (p, _, t) = s.member(&admin, "disable").await;
    let (st, _) = s
        .patch(
            &format!("/v3/projects/{p}"),
            &admin,
            json!({"project": {"enabled": false}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(s.check(&admin, &t).await, StatusCode::NOT_FOUND);
    s.handle.stop().await;
}

#[tokio::test]
async fn tokens_die_after_password_change() {
    let s = start().await;
    let admin = s.admin().await;
    let (_, u, t) = s.member(&admin, "pw").await;
    assert_eq!(s.check(&admin, &t).await, StatusCode::OK);

    // Admin resets the password (`openstack user set --password`).
    let (st, b) = s
        .patch(
            &format!("/v3/users/{u}"),
            &admin,
            json!({"user": {"password": "pw-new"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert!(b["user"].get("password").is_none());
    assert_eq!(s.check(&admin, &t).await, StatusCode::NOT_FOUND);
    assert_eq!(
        s.auth(password_auth("user-pw", "pw-member", Some("proj-pw"))).await.0,
        StatusCode::UNAUTHORIZED
    );
    let t2 = s.token("user-pw", "pw-new", "proj-pw").await;
    assert_eq!(s.check(&admin, &t2).await, StatusCode::OK);

    // Self-service change needs the original password.
    let path = format!("/v3/users/{u}/password");
    let (st, b) = s
        .post(
            &path,
            &t2,
            json!({"user": {"original_password": "wrong", "password": "pw-3"}}),
        )
        .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{b}");
    assert_eq!(s.check(&admin, &t2).await, StatusCode::OK);
    let (st, _) = s
        .post(
            &path,
            &t2,
            json!({"user": {"original_password": "pw-new", "password": "pw-3"}}),
        )
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(s.check(&admin, &t2).await, StatusCode::NOT_FOUND);
    s.token("user-pw", "pw-3", "proj-pw").await;
    s.handle.stop().await;
}

#[tokio::test]
async fn project_crud() {
    let s = start().await;
    let admin = s.admin().await;
    let (st, b) = s
        .post(
            "/v3/projects",
            &admin,
            json!({"project": {"name": "alpha", "description": "first", "tags": ["x"], "owner": "me"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let p = &b["project"];
    let id = p["id"].as_str().expect("id").to_string();
    assert_eq!(p["domain_id"], "default");
    assert_eq!(p["parent_id"], "default");
    assert_eq!(p["enabled"], json!(true));
    assert_eq!(p["is_domain"], json!(false));
    assert_eq!(p["description"], "first");
    assert_eq!(p["tags"], json!(["x"]));
    assert_eq!(p["owner"], "me", "extra attributes are kept");
    assert_eq!(p["links"]["self"], json!(format!("{}/v3/projects/{id}", s.url)));

    let (st, b) = s
        .post("/v3/projects", &admin, json!({"project": {"name": "alpha"}}))
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_error(&b, 409, "Conflict");
    let (st, b) = s
        .post("/v3/projects", &admin, json!({"project": {"description": "no name"}}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_error(&b, 400, "Bad Request");
    let (st, _) = s
        .post(
            "/v3/projects",
            &admin,
            json!({"project": {"name": "x", "enabled": "yes"}}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = s
        .post(
            "/v3/projects",
            &admin,
            json!({"project": {"name": "x", "domain_id": "nope"}}),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = s
        .post("/v3/projects", &admin, json!({"project": {"name": "x".repeat(65)}}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = s.post("/v3/projects", &admin, json!({"project": {"name": ""}})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    let (st, b) = s.get(&format!("/v3/projects/{id}"), &admin).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b["project"]["name"], "alpha");
    let (st, b) = s.get("/v3/projects/0123456789abcdef", &admin).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_error(&b, 404, "Not Found");
    assert_eq!(s.get("/v3/projects/..%2Fusers", &admin).await.0, StatusCode::NOT_FOUND);

    let (_, b) = s.get("/v3/projects?name=alpha", &admin).await;
    assert_eq!(b["projects"].as_array().map(Vec::len), Some(1));
    assert_eq!(b["projects"][0]["id"], json!(id));
    let (_, b) = s.get("/v3/projects?name=nothing", &admin).await;
    assert_eq!(b["projects"], json!([]));
    let (_, b) = s.get("/v3/projects?domain_id=default", &admin).await;
    let names: Vec<&str> = b["projects"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for n in ["admin", "service", "alpha"] {
        assert!(names.contains(&n), "{names:?}");
    }
    let (_, b) = s.get("/v3/projects?domain_id=other", &admin).await;
    assert_eq!(b["projects"], json!([]));

    // Rename, then the old name is free and the new one taken.
    let (st, b) = s
        .patch(
            &format!("/v3/projects/{id}"),
            &admin,
            json!({"project": {"name": "beta", "description": "d2"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["project"]["name"], "beta");
    assert_eq!(b["project"]["tags"], json!(["x"]));
    let (_, b) = s.get("/v3/projects?name=alpha", &admin).await;
    assert_eq!(b["projects"], json!([]));
    s.create_project(&admin, "alpha").await;
    let (st, _) = s
        .patch(
            &format!("/v3/projects/{id}"),
            &admin,
            json!({"project": {"name": "alpha"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    let (st, _) = s
        .patch(
            &format!("/v3/projects/{id}"),
            &admin,
            json!({"project": {"domain_id": "other"}}),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = s
        .patch("/v3/projects/0123", &admin, json!({"project": {"name": "zz"}}))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    assert_eq!(
        s.delete(&format!("/v3/projects/{id}"), &admin).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.delete(&format!("/v3/projects/{id}"), &admin).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.get(&format!("/v3/projects/{id}"), &admin).await.0,
        StatusCode::NOT_FOUND
    );
    assert!(!s.handle.state.identity.project_exists(&id));
    // The name can be used again.
    s.create_project(&admin, "beta").await;
    s.handle.stop().await;
}

#[tokio::test]
async fn user_crud() {
    let s = start().await;
    let admin = s.admin().await;
    let pid = s.create_project(&admin, "home").await;
    let (st, b) = s
        .post(
            "/v3/users",
            &admin,
            json!({"user": {"name": "ann", "password": "pw-ann", "default_project_id": pid, "email": "ann@example.org",
                "domain_id": "default", "enabled": true, "description": "Ann"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let u = &b["user"];
    let id = u["id"].as_str().expect("id").to_string();
    assert_eq!(u["name"], "ann");
    assert_eq!(u["default_project_id"], json!(pid));
    assert_eq!(u["email"], "ann@example.org");
    assert_eq!(u["password_expires_at"], Value::Null);
    assert!(u.get("password").is_none() && !b.to_string().contains("pw-ann") && !b.to_string().contains("argon"));

    let (st, b) = s
        .post("/v3/users", &admin, json!({"user": {"name": "ann", "password": "x"}}))
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_error(&b, 409, "Conflict");
    let (st, _) = s.post("/v3/users", &admin, json!({"user": {"password": "x"}})).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let (st, _) = s
        .post("/v3/users", &admin, json!({"user": {"name": "bob", "password": 42}}))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    let r = s
        .client
        .post(format!("{}/v3/users", s.url))
        .header("X-Auth-Token", &admin)
        .header("content-type", "application/json")
        .body("{\"user\": ")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_error(&r.json().await.expect("json"), 400, "Bad Request");

    let (st, b) = s.get(&format!("/v3/users/{id}"), &admin).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b["user"]["name"], "ann");
    assert_eq!(s.get("/v3/users/0123456789", &admin).await.0, StatusCode::NOT_FOUND);
    let (_, b) = s.get("/v3/users?name=ann", &admin).await;
    assert_eq!(b["users"].as_array().map(Vec::len), Some(1));
    let (_, b) = s.get("/v3/users?name=ann&domain_id=default", &admin).await;
    assert_eq!(b["users"][0]["id"], json!(id));
    let (_, b) = s.get("/v3/users?name=nobody", &admin).await;
    assert_eq!(b["users"], json!([]));

    // A user without roles authenticates unscoped; with default project and a role, scoped.
    let (st, b) = s
        .patch(
            &format!("/v3/users/{id}"),
            &admin,
            json!({"user": {"name": "anne", "description": null}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["user"]["name"], "anne");
    assert!(b["user"].get("description").is_none());
    assert_eq!(
        s.auth(password_auth("ann", "pw-ann", None)).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.auth(password_auth("anne", "pw-ann", None)).await.0,
        StatusCode::CREATED
    );
    let (st, _) = s
        .patch(&format!("/v3/users/{id}"), &admin, json!({"user": {"enabled": false}}))
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        s.auth(password_auth("anne", "pw-ann", None)).await.0,
        StatusCode::UNAUTHORIZED
    );

    s.create_user(&admin, "carl", "pw").await;
    let (st, _) = s
        .patch(&format!("/v3/users/{id}"), &admin, json!({"user": {"name": "carl"}}))
        .await;
    assert_eq!(st, StatusCode::CONFLICT);

    assert_eq!(
        s.delete(&format!("/v3/users/{id}"), &admin).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.delete(&format!("/v3/users/{id}"), &admin).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(s.get(&format!("/v3/users/{id}"), &admin).await.0, StatusCode::NOT_FOUND);
    s.create_user(&admin, "anne", "again").await;
    s.handle.stop().await;
}

#[tokio::test]
async fn roles_and_assignments() {
    let s = start().await;
    let admin = s.admin().await;
    let (_, b) = s.get("/v3/roles", &admin).await;
    let mut names: Vec<&str> = b["roles"]
        .as_array()
        .expect("roles")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["admin", "member", "node", "reader"]);
    let member = s.role_id(&admin, "member").await;
    let (st, b) = s.get(&format!("/v3/roles/{member}"), &admin).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b["role"]["name"], "member");
    assert_eq!(s.get("/v3/roles/0123", &admin).await.0, StatusCode::NOT_FOUND);

    let (st, b) = s.post("/v3/roles", &admin, json!({"role": {"name": "auditor"}})).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let auditor = b["role"]["id"].as_str().expect("id").to_string();
    assert_eq!(
        s.post("/v3/roles", &admin, json!({"role": {"name": "auditor"}}))
            .await
            .0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        s.post("/v3/roles", &admin, json!({"role": {}})).await.0,
        StatusCode::BAD_REQUEST
    );

    let p = s.create_project(&admin, "ra").await;
    let u = s.create_user(&admin, "ra-user", "pw").await;
    let grant = format!("/v3/projects/{p}/users/{u}/roles/{auditor}");
    assert_eq!(s.head(&grant, &admin).await, StatusCode::NOT_FOUND);
    assert_eq!(s.put(&grant, &admin).await, StatusCode::NO_CONTENT);
    assert_eq!(
        s.put(&grant, &admin).await,
        StatusCode::NO_CONTENT,
        "granting twice is fine"
    );
    assert_eq!(s.head(&grant, &admin).await, StatusCode::NO_CONTENT);
    assert_eq!(
        s.put(&format!("/v3/projects/{p}/users/{u}/roles/0123"), &admin).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.put(&format!("/v3/projects/0123/users/{u}/roles/{auditor}"), &admin)
            .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.put(&format!("/v3/projects/{p}/users/0123/roles/{auditor}"), &admin)
            .await,
        StatusCode::NOT_FOUND
    );

    let (st, b) = s.get(&format!("/v3/projects/{p}/users/{u}/roles"), &admin).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b["roles"].as_array().map(Vec::len), Some(1));
    assert_eq!(b["roles"][0]["name"], "auditor");

    let (st, b) = s
        .get(
            &format!("/v3/role_assignments?user.id={u}&scope.project.id={p}&include_names"),
            &admin,
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let ra = b["role_assignments"].as_array().expect("list");
    assert_eq!(ra.len(), 1, "{b}");
    assert_eq!(ra[0]["role"], json!({"id": auditor, "name": "auditor"}));
    assert_eq!(ra[0]["user"]["name"], "ra-user");
    assert_eq!(ra[0]["scope"]["project"]["name"], "ra");
    let (_, b) = s.get("/v3/role_assignments", &admin).await;
    assert!(b["role_assignments"].as_array().expect("list").len() >= 2);
    let (_, b) = s
        .get(&format!("/v3/role_assignments?role.id={member}&user.id={u}"), &admin)
        .await;
    assert_eq!(b["role_assignments"], json!([]));

    let (_, b) = s.get(&format!("/v3/users/{u}/projects"), &admin).await;
    assert_eq!(b["projects"][0]["id"], json!(p));

    // The role works for tokens; deleting the role removes the assignment.
    let t = s.token("ra-user", "pw", "ra").await;
    assert_eq!(s.check(&admin, &t).await, StatusCode::OK);
    let (st, b) = s
        .patch(
            &format!("/v3/roles/{auditor}"),
            &admin,
            json!({"role": {"name": "auditor2"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(
        s.delete(&format!("/v3/roles/{auditor}"), &admin).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(s.head(&grant, &admin).await, StatusCode::NOT_FOUND);
    assert_eq!(s.check(&admin, &t).await, StatusCode::NOT_FOUND);
    let (_, b) = s.get(&format!("/v3/role_assignments?user.id={u}"), &admin).await;
    assert_eq!(b["role_assignments"], json!([]));

    // Delete a grant.
    let g2 = format!("/v3/projects/{p}/users/{u}/roles/{member}");
    assert_eq!(s.put(&g2, &admin).await, StatusCode::NO_CONTENT);
    assert_eq!(s.delete(&g2, &admin).await, StatusCode::NO_CONTENT);
    assert_eq!(s.head(&g2, &admin).await, StatusCode::NOT_FOUND);
    assert_eq!(s.delete(&g2, &admin).await, StatusCode::NOT_FOUND);

    // Domains.
    let (st, b) = s.get("/v3/domains?name=Default", &admin).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b["domains"][0]["id"], "default");
    let (_, b) = s.get("/v3/domains?name=Other", &admin).await;
    assert_eq!(b["domains"], json!([]));
    assert_eq!(s.get("/v3/domains/default", &admin).await.0, StatusCode::OK);
    assert_eq!(s.get("/v3/domains/Default", &admin).await.0, StatusCode::NOT_FOUND);
    s.handle.stop().await;
}

#[tokio::test]
async fn non_admins_are_forbidden() {
    let s = start().await;
    let admin = s.admin().await;
    let (p, u, t) = s.member(&admin, "na").await;
    let (st, b) = s
        .post("/v3/users", &t, json!({"user": {"name": "evil", "password": "x"}}))
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    assert_error(&b, 403, "Forbidden");
    assert_eq!(
        s.post("/v3/projects", &t, json!({"project": {"name": "evil"}})).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(s.get("/v3/users", &t).await.0, StatusCode::FORBIDDEN);
    assert_eq!(s.get("/v3/projects", &t).await.0, StatusCode::FORBIDDEN);
    let admin_role = s.role_id(&admin, "admin").await;
    assert_eq!(
        s.put(&format!("/v3/projects/{p}/users/{u}/roles/{admin_role}"), &t)
            .await,
        StatusCode::FORBIDDEN
    );
    let (_, b) = s.get("/v3/users?name=admin", &admin).await;
    let admin_id = b["users"][0]["id"].as_str().expect("admin id").to_string();
    assert_eq!(
        s.get(&format!("/v3/users/{admin_id}"), &t).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        s.delete(&format!("/v3/users/{admin_id}"), &t).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(s.get("/v3/role_assignments", &t).await.0, StatusCode::FORBIDDEN);
    // Themselves and their own project: fine.
    let (st, b) = s.get(&format!("/v3/users/{u}"), &t).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b["user"]["id"], json!(u));
    assert_eq!(s.get(&format!("/v3/projects/{p}"), &t).await.0, StatusCode::OK);
    assert_eq!(
        s.get(&format!("/v3/role_assignments?user.id={u}"), &t).await.0,
        StatusCode::OK
    );
    assert_eq!(s.get(&format!("/v3/users/{u}/projects"), &t).await.0, StatusCode::OK);
    // Still nothing was created.
    let (_, b) = s.get("/v3/users?name=evil", &admin).await;
    assert_eq!(b["users"], json!([]));
    s.handle.stop().await;
}

#[tokio::test]
async fn stored_records_hold_no_plaintext_password() {
    let s = start().await;
    let admin = s.admin().await;
    let secret = "Very-Distinct-Pa55word";
    let id = s.create_user(&admin, "hashed", secret).await;
    let (st, _) = s
        .patch(
            &format!("/v3/users/{id}"),
            &admin,
            json!({"user": {"password": "Another-Distinct-Pa55"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (kvs, _) = s.handle.state.store.list("/").await.expect("list store");
    assert!(!kvs.is_empty());
    for kv in &kvs {
        let text = String::from_utf8_lossy(&kv.value);
        for pw in [secret, "Another-Distinct-Pa55", ADMIN_PW] {
            assert!(!text.contains(pw), "plaintext password stored under {}", kv.key);
        }
    }
    let user_key = kvs
        .iter()
        .find(|kv| kv.key.ends_with(&format!("/users/{id}")))
        .expect("user record");
    let rec: Value = serde_json::from_slice(&user_key.value).expect("json record");
    assert!(
        rec["password_hash"]
            .as_str()
            .is_some_and(|h| h.starts_with("$argon2id$")),
        "{rec}"
    );
    s.handle.stop().await;
}

#[tokio::test]
async fn bootstrap_is_idempotent_and_keeps_passwords() {
    let s = start().await;
    let state = &s.handle.state;
    // Bootstrapping again, even with another configured password, changes nothing.
    let mut other = (*state.config).clone();
    other.admin_password = Some("a-different-one".into());
    let again =
        isthmus_server::identity::Identity::new(state.store.clone(), state.cache.clone(), std::sync::Arc::new(other));
    again.bootstrap().await.expect("second bootstrap");
    state.identity.bootstrap().await.expect("third bootstrap");
    let admin = s.admin().await;
    assert_eq!(
        s.auth(password_auth("admin", "a-different-one", Some("admin"))).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (_, b) = s.get("/v3/users?name=admin", &admin).await;
    assert_eq!(b["users"].as_array().map(Vec::len), Some(1));
    let (_, b) = s.get("/v3/roles", &admin).await;
    assert_eq!(b["roles"].as_array().map(Vec::len), Some(4));
    let (_, b) = s.get("/v3/projects?name=service", &admin).await;
    assert_eq!(b["projects"].as_array().map(Vec::len), Some(1));
    // Both instances share the signing key: a token from one validates on the other.
    assert!(again.validate(&admin).await.is_ok_and(|c| c.is_admin));
    s.handle.stop().await;

    // A fresh store without any admin password: a clear error.
    if std::env::var_os("ISTHMUS_ADMIN_PASSWORD").is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = isthmus_store::embedded::EmbeddedStore::open(dir.path()).expect("open");
        let config = Config {
            identity_listen: "127.0.0.1:0".parse().expect("addr"),
            network_listen: "127.0.0.1:0".parse().expect("addr"),
            admin_password: None,
            ..Config::default()
        };
        let err = isthmus_server::start(config, store)
            .await
            .err()
            .expect("start must fail");
        assert!(format!("{err:#}").contains("admin password"), "{err:#}");
    }
}

/// Runs `/usr/bin/openstack` as `user` against the server; returns its JSON output (or Null).
/// Commands that print nothing take no `-f json`.
fn openstack(url: &str, home: &std::path::Path, user: &str, password: &str, project: &str, args: &[&str]) -> Value {
    let json_out = !matches!(args, ["role", "add", ..] | ["user", "set", ..]);
    let mut cmd = std::process::Command::new(OPENSTACK);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("LC_ALL", "C.UTF-8")
        .args(["--os-auth-url", &format!("{url}/v3"), "--os-identity-api-version", "3"])
        .args([
            "--os-username",
            user,
            "--os-password",
            password,
            "--os-project-name",
            project,
        ])
        .args([
            "--os-user-domain-name",
            "Default",
            "--os-project-domain-name",
            "Default",
        ])
        .args(args);
    if json_out {
        cmd.args(["-f", "json"]);
    }
    let out = cmd.output().expect("running /usr/bin/openstack");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openstack {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    if json_out {
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("openstack {args:?}: output is not JSON ({e}): {stdout}"))
    } else {
        Value::Null
    }
}

const OPENSTACK: &str = "/usr/bin/openstack";

/// The calls the tempest setup script makes, with the real client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstack_cli() {
    assert!(
        std::path::Path::new(OPENSTACK).exists(),
        "{OPENSTACK} is missing: install it with `apt-get install -y python3-openstackclient`"
    );
    let s = start().await;
    let home = tempfile::tempdir().expect("tempdir");
    let url = s.url.clone();
    let h = home.path().to_path_buf();
    let (proj, user, listed, token) = tokio::task::spawn_blocking(move || {
        let os = |args: &[&str]| openstack(&url, &h, "admin", ADMIN_PW, "admin", args);
        let proj = os(&["project", "create", "--domain", "Default", "cli-proj"]);
        let shown = os(&["project", "show", "cli-proj"]);
        assert_eq!(shown["id"], proj["id"]);
        let user = os(&[
            "user",
            "create",
            "--domain",
            "Default",
            "--project",
            "cli-proj",
            "--password",
            "cli-pw1",
            "cli-user",
        ]);
        assert_eq!(user["default_project_id"], proj["id"]);
        let shown = os(&["user", "show", "cli-user"]);
        assert_eq!(shown["id"], user["id"]);
        os(&["user", "set", "--password", "cli-pw2", "cli-user"]);
        os(&["role", "add", "--project", "cli-proj", "--user", "cli-user", "member"]);
        let listed = os(&["project", "list"]);
        let token = openstack(&url, &h, "cli-user", "cli-pw2", "cli-proj", &["token", "issue"]);
        (proj, user, listed, token)
    })
    .await
    .expect("CLI steps");
    let names: Vec<&str> = listed
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|p| p["Name"].as_str())
        .collect();
    assert!(names.contains(&"cli-proj") && names.contains(&"admin"), "{names:?}");
    assert_eq!(token["project_id"], proj["id"]);
    assert_eq!(token["user_id"], user["id"]);
    let ctx = s
        .handle
        .state
        .identity
        .validate(token["id"].as_str().expect("token id"))
        .await
        .expect("CLI token valid");
    assert_eq!(ctx.user_name, "cli-user");
    assert_eq!(ctx.project_name, "cli-proj");
    assert!(!ctx.is_admin);
    s.handle.stop().await;
}
