//! The few Keystone and Neutron calls the benchmarks need, over the project's client; the
//! measured port creates use its HTTP client and token directly, to stay as lean as possible.

use anyhow::{anyhow, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A client with one keep-alive connection pool; each benchmark client gets its own. With
/// `ca` it speaks https and trusts only that CA; without, the system's roots are not even
/// loaded (the server is on loopback, plain HTTP).
pub fn http_client(ca: Option<&Path>) -> Result<reqwest::Client> {
    let builder = reqwest::Client::builder().tls_built_in_root_certs(false);
    isthmus_client::with_ca(builder, ca)
        .map_err(|e| anyhow!("{e}"))?
        // Loopback only: never route through an HTTP proxy from the environment.
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(8)
        // Below the server's idle timeout (60 s), so a pooled connection is never reused just as
        // the server closes it.
        .pool_idle_timeout(Duration::from_secs(30))
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

/// The Neutron endpoint as the admin (Keystone v3 password auth, project scope).
pub struct Neutron {
    pub client: isthmus_client::Client,
    pub http: reqwest::Client,
    /// `http://<network>/v2.0`.
    pub base: String,
    /// The token the measured path sends as is.
    pub token: String,
    /// The CA that verifies the server (https), for more clients.
    pub ca: Option<PathBuf>,
}

impl Neutron {
    /// Authenticates as the admin of `server` over a new client.
    pub async fn login(server: &crate::proc::ServerProcess, password: &str) -> Result<Neutron> {
        let http = http_client(server.ca())?;
        let config = isthmus_client::Config::new(
            &server.identity_url(),
            isthmus_client::Auth::password("admin", password, "admin"),
        )
        .network_url(&server.network_url());
        let client = isthmus_client::Client::with_http(http.clone(), config);
        let token = client.token(None).await.context("POST /v3/auth/tokens")?;
        Ok(Neutron {
            base: format!("{}/v2.0", client.network_url()),
            token: token.secret().to_string(),
            client,
            http,
            ca: server.ca().map(Path::to_path_buf),
        })
    }

    /// The same endpoint and token over a new connection pool.
    pub fn with_own_client(&self) -> Result<Neutron> {
        let http = http_client(self.ca.as_deref())?;
        Ok(Neutron {
            client: self.client.with_other_http(http.clone()),
            http,
            base: self.base.clone(),
            token: self.token.clone(),
            ca: self.ca.clone(),
        })
    }

    /// POSTs `{resource: body}` and returns the new resource's id.
    pub async fn create(&self, collection: &str, resource: &str, body: Value) -> Result<String> {
        let created = self
            .client
            .neutron_create(collection, resource, &body)
            .await
            .map_err(short)
            .with_context(|| format!("POST /v2.0/{collection}"))?;
        created
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("POST /v2.0/{collection}: no {resource}.id in the answer"))
    }

    pub async fn delete(&self, collection: &str, id: &str) -> Result<()> {
        self.client
            .neutron_delete(collection, id)
            .await
            .map_err(short)
            .with_context(|| format!("DELETE /v2.0/{collection}/{id}"))
    }

    /// GETs a path under /v2.0 and returns the JSON body.
    pub async fn get(&self, path: &str) -> Result<Value> {
        self.client
            .neutron_get(path)
            .await
            .map_err(short)
            .with_context(|| format!("GET /v2.0/{path}"))
    }
}

/// An API error with its body shortened.
fn short(e: isthmus_client::Error) -> anyhow::Error {
    match e {
        isthmus_client::Error::Status { status, body } => anyhow!("HTTP {status}: {}", snippet(&body)),
        other => anyhow!(other),
    }
}
