//! The few Keystone and Neutron calls the benchmarks need, over plain HTTP.

use anyhow::{anyhow, bail, Context, Result};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

/// A client with one keep-alive connection pool; each benchmark client gets its own.
pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        // Loopback only: never route through an HTTP proxy from the environment.
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(8)
        .pool_idle_timeout(Duration::from_secs(300))
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")
}

/// Shortens a response body for an error message.
pub fn snippet(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &body[..i]),
        None => body.to_string(),
    }
}

/// A project-scoped admin token (Keystone v3 password auth).
pub async fn admin_token(http: &reqwest::Client, identity: SocketAddr, password: &str) -> Result<String> {
    let body = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": "admin", "domain": {"name": "Default"}, "password": password}}},
        "scope": {"project": {"name": "admin", "domain": {"name": "Default"}}},
    }});
    let resp = http
        .post(format!("http://{identity}/v3/auth/tokens"))
        .json(&body)
        .send()
        .await
        .context("POST /v3/auth/tokens")?;
    let status = resp.status();
    let token = resp
        .headers()
        .get("x-subject-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if status != StatusCode::CREATED {
        let text = resp.text().await.unwrap_or_default();
        bail!("POST /v3/auth/tokens: HTTP {status}: {}", snippet(&text));
    }
    token.ok_or_else(|| anyhow!("POST /v3/auth/tokens: no X-Subject-Token header"))
}

/// The Neutron endpoint with a token.
#[derive(Clone)]
pub struct Neutron {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Neutron {
    pub fn new(http: reqwest::Client, network: SocketAddr, token: &str) -> Neutron {
        Neutron {
            http,
            base: format!("http://{network}/v2.0"),
            token: token.to_string(),
        }
    }

    /// The same endpoint and token over a new connection pool.
    pub fn with_own_client(&self) -> Result<Neutron> {
        Ok(Neutron {
            http: http_client()?,
            ..self.clone()
        })
    }

    /// POSTs `{resource: body}` and returns the new resource's id.
    pub async fn create(&self, collection: &str, resource: &str, body: Value) -> Result<String> {
        let resp = self
            .http
            .post(format!("{}/{collection}", self.base))
            .header("x-auth-token", &self.token)
            .json(&json!({ resource: body }))
            .send()
            .await
            .with_context(|| format!("POST /v2.0/{collection}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status != StatusCode::CREATED {
            bail!("POST /v2.0/{collection}: HTTP {status}: {}", snippet(&text));
        }
        id_from(&text, resource).with_context(|| format!("POST /v2.0/{collection}: unexpected body"))
    }

    pub async fn delete(&self, collection: &str, id: &str) -> Result<()> {
        let resp = self
            .http
            .delete(format!("{}/{collection}/{id}", self.base))
            .header("x-auth-token", &self.token)
            .send()
            .await
            .with_context(|| format!("DELETE /v2.0/{collection}/{id}"))?;
        let status = resp.status();
        if status != StatusCode::NO_CONTENT {
            let text = resp.text().await.unwrap_or_default();
            bail!("DELETE /v2.0/{collection}/{id}: HTTP {status}: {}", snippet(&text));
        }
        Ok(())
    }

    /// GETs a path under /v2.0 and returns the JSON body.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let resp = self
            .http
            .get(format!("{}/{path}", self.base))
            .header("x-auth-token", &self.token)
            .send()
            .await
            .with_context(|| format!("GET /v2.0/{path}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status != StatusCode::OK {
            bail!("GET /v2.0/{path}: HTTP {status}: {}", snippet(&text));
        }
        serde_json::from_str(&text).with_context(|| format!("GET /v2.0/{path}: body is not JSON"))
    }
}

/// `{"<resource>": {"id": "..."}}` → the id.
pub fn id_from(body: &str, resource: &str) -> Result<String> {
    let v: Value = serde_json::from_str(body).context("body is not JSON")?;
    v.get(resource)
        .and_then(|r| r.get("id"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no {resource}.id in {}", snippet(body)))
}
