//! One client for Isthmus's APIs: Keystone v3 authentication (password or application
//! credential), the token renewed when refused (401), the network endpoint from the token's
//! catalog unless given, transport failures retried with back-off when repeating is safe,
//! typed Neutron calls and the node API.
//!
//! Secrets (passwords, application credential secrets, tokens) never appear in `Debug`
//! output, errors or logs.

mod auth;
mod nested;
mod node;

pub use auth::{Auth, Domain, Token};
pub use nested::{NestedClient, NestedConfig};
pub use node::NodeApi;

use serde::Serialize;
use serde_json::Value;
use std::time::Duration;
use tracing::{debug, info};

/// Per-call timeout unless the caller chose another.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per request when no answer comes back (only where repeating is safe).
const SEND_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No answer (connection refused, reset, timeout).
    #[error("server unreachable: {0}")]
    Unreachable(String),
    #[error("authentication failed ({status}): {body}")]
    Auth { status: u16, body: String },
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String },
    /// An answer that is not what the API defines.
    #[error("unexpected answer: {0}")]
    Decode(String),
    /// The CA bundle to verify servers with could not be used.
    #[error("CA bundle {path}: {reason}")]
    CaFile { path: String, reason: String },
    /// A setting the client cannot use (a URL, a credential's form); never repeats a secret.
    #[error("invalid client setting: {0}")]
    Config(String),
}

impl Error {
    /// The HTTP status, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } | Error::Auth { status, .. } => Some(*status),
            Error::Unreachable(_) | Error::Decode(_) | Error::CaFile { .. } | Error::Config(_) => None,
        }
    }

    /// Neutron's (or Keystone's) own message from an error body, if there is one.
    pub fn api_message(&self) -> Option<String> {
        let (Error::Status { body, .. } | Error::Auth { body, .. }) = self else {
            return None;
        };
        let v: Value = serde_json::from_str(body).ok()?;
        v["NeutronError"]["message"]
            .as_str()
            .or_else(|| v["error"]["message"].as_str())
            .map(str::to_string)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn unreachable(e: reqwest::Error) -> Error {
    // Without the URL (it carries nothing secret, but keeps messages short); with the causes,
    // which say what actually went wrong.
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(cause) = src {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        src = cause.source();
    }
    Error::Unreachable(msg)
}

/// Where and how to authenticate.
#[derive(Clone, Debug)]
pub struct Config {
    /// Identity v3 URL (`.../v3`).
    pub auth_url: String,
    pub auth: Auth,
    /// Unversioned network API URL; `None`: taken from the token's catalog (the network
    /// service's `interface` endpoint, else its public one).
    pub network_url: Option<String>,
    /// Which catalog endpoint to prefer: `internal` (services, nodes) or `public` (users).
    pub interface: String,
    /// Only the identity API is used: no network endpoint needed.
    pub identity_only: bool,
    /// PEM CA bundle that alone verifies https servers (like `OS_CACERT`); `None`: the
    /// system's trusted roots.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Config {
    pub fn new(auth_url: &str, auth: Auth) -> Config {
        Config {
            auth_url: auth_url.to_string(),
            auth,
            network_url: None,
            interface: "public".into(),
            identity_only: false,
            ca_file: None,
        }
    }

    /// Verifies https servers against this CA bundle only (`None`: the system's roots).
    pub fn ca_file(mut self, ca_file: Option<&std::path::Path>) -> Config {
        self.ca_file = ca_file.map(std::path::Path::to_path_buf);
        self
    }

    /// For identity calls only (no network endpoint looked up or needed).
    pub fn identity_only(mut self) -> Config {
        self.identity_only = true;
        self
    }

    /// A fixed network URL (empty: from the catalog).
    pub fn network_url(mut self, url: &str) -> Config {
        self.network_url = (!url.is_empty()).then(|| url.trim_end_matches('/').to_string());
        self
    }

    pub fn interface(mut self, interface: &str) -> Config {
        self.interface = interface.to_string();
        self
    }
}

/// A default HTTP client: connect timeout 5 s.
pub fn http_client() -> Result<reqwest::Client> {
    http_client_with_ca(None)
}

/// A default HTTP client that trusts only the CA certificates in `ca_file` (PEM, one or
/// more), or the system's roots when `None`.
pub fn http_client_with_ca(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client> {
    with_ca(reqwest::Client::builder(), ca_file)?
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Error::Unreachable(format!("HTTP client: {e}")))
}

/// Makes `builder` trust only the CA certificates in `ca_file` (when given): a server whose
/// certificate they did not sign is refused during the handshake.
pub fn with_ca(builder: reqwest::ClientBuilder, ca_file: Option<&std::path::Path>) -> Result<reqwest::ClientBuilder> {
    let Some(path) = ca_file else { return Ok(builder) };
    let err = |reason: String| Error::CaFile {
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in it".into()));
    }
    let mut b = builder.tls_built_in_root_certs(false);
    for c in certs {
        b = b.add_root_certificate(c);
    }
    Ok(b)
}

pub struct Client {
    http: reqwest::Client,
    /// Identity v3 URL, no trailing slash.
    auth_url: String,
    auth: Auth,
    interface: String,
    /// Unversioned network API URL, no trailing slash; empty until taken from the catalog.
    network_url: std::sync::Mutex<String>,
    network_url_fixed: bool,
    token: tokio::sync::Mutex<Option<Token>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("auth_url", &self.auth_url)
            .field("auth", &self.auth)
            .field("network_url", &self.network_url())
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(config: Config) -> Result<Client> {
        Ok(Client::with_http(
            http_client_with_ca(config.ca_file.as_deref())?,
            config,
        ))
    }

    /// With a caller's HTTP client (its pool, timeouts and proxy settings).
    pub fn with_http(http: reqwest::Client, config: Config) -> Client {
        Client {
            http,
            auth_url: config.auth_url.trim_end_matches('/').to_string(),
            auth: config.auth,
            interface: config.interface,
            network_url_fixed: config.network_url.is_some() || config.identity_only,
            network_url: std::sync::Mutex::new(config.network_url.unwrap_or_default()),
            token: tokio::sync::Mutex::new(None),
        }
    }

    /// The same endpoints, credentials and current token over another HTTP client (its own
    /// connection pool).
    pub fn with_other_http(&self, http: reqwest::Client) -> Client {
        let token = self.token.try_lock().ok().and_then(|t| t.clone());
        let network_url = self.network_url();
        Client {
            http,
            auth_url: self.auth_url.clone(),
            auth: self.auth.clone(),
            interface: self.interface.clone(),
            network_url_fixed: self.network_url_fixed || !network_url.is_empty(),
            network_url: std::sync::Mutex::new(network_url),
            token: tokio::sync::Mutex::new(token),
        }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn auth_url(&self) -> &str {
        &self.auth_url
    }

    /// The network API URL (empty before the first authentication when taken from the catalog).
    pub fn network_url(&self) -> String {
        self.network_url.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The node API of node `host`, over this client.
    pub fn node(&self, host: &str) -> NodeApi<'_> {
        NodeApi::new(self, host)
    }

    async fn authenticate(&self) -> Result<Token> {
        let body = self.auth.request_body();
        // Issuing a second token, should the first answer be lost, is harmless: retried.
        let req = self
            .http
            .post(format!("{}/auth/tokens", self.auth_url))
            .timeout(CALL_TIMEOUT)
            .json(&body);
        let resp = send_with_retries(req, true).await?;
        let status = resp.status().as_u16();
        let token = resp
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if status != 201 {
            let body = resp.text().await.unwrap_or_default();
            return Err(Error::Auth { status, body });
        }
        let token = token.ok_or_else(|| Error::Auth {
            status,
            body: "no X-Subject-Token in the answer".into(),
        })?;
        if !self.network_url_fixed {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            match network_endpoint(&body, &self.interface) {
                Some(url) => {
                    let mut cur = self.network_url.lock().unwrap_or_else(|p| p.into_inner());
                    if *cur != url {
                        info!(%url, "network API from the identity catalog");
                        *cur = url;
                    }
                }
                None => {
                    return Err(Error::Auth {
                        status,
                        body: "no network endpoint in the token's catalog (configure the network URL)".into(),
                    })
                }
            }
        }
        info!(who = %self.auth.who(), "authenticated");
        Ok(Token::new(token))
    }

    /// The current token, or a new one when there is none or `stale` is the one just refused.
    pub async fn token(&self, stale: Option<&Token>) -> Result<Token> {
        let mut t = self.token.lock().await;
        match &*t {
            Some(cur) if Some(cur) != stale => Ok(cur.clone()),
            _ => {
                let fresh = self.authenticate().await?;
                *t = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// Sends a request to `url` (`{network}` for the network API's base) with the token; on
    /// 401 re-authenticates once and sends it again. Transport failures are retried when the
    /// method is idempotent, else only when nothing reached the server.
    pub async fn send(
        &self,
        method: reqwest::Method,
        url: Url<'_>,
        body: Option<&(impl Serialize + ?Sized)>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response> {
        let idempotent = matches!(
            method,
            reqwest::Method::GET | reqwest::Method::HEAD | reqwest::Method::PUT | reqwest::Method::DELETE
        );
        let mut stale: Option<Token> = None;
        for _ in 0..2 {
            let token = self.token(stale.as_ref()).await?;
            let url = match url {
                Url::Network(path) => format!("{}{path}", self.network_url()),
                Url::Identity(path) => format!("{}{path}", self.auth_url),
            };
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("X-Auth-Token", token.secret());
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = send_with_retries(req, idempotent).await?;
            if resp.status().as_u16() == 401 {
                debug!("token refused, re-authenticating");
                stale = Some(token);
                continue;
            }
            return Ok(resp);
        }
        Err(Error::Auth {
            status: 401,
            body: "a fresh token was refused too".into(),
        })
    }

    /// One JSON call: the answer's body (`Null` when empty), or the status and body as an error.
    pub async fn call(
        &self,
        method: reqwest::Method,
        url: Url<'_>,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<Value> {
        let resp = self.send(method, url, body, Some(CALL_TIMEOUT)).await?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(unreachable)?;
        if !(200..300).contains(&status) {
            return Err(Error::Status { status, body: text });
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `GET /v2.0/{path}` (path with its query).
    pub async fn neutron_get(&self, path: &str) -> Result<Value> {
        self.call(
            reqwest::Method::GET,
            Url::Network(&format!("/v2.0/{path}")),
            None::<&()>,
        )
        .await
    }

    /// `POST /v2.0/{collection}` with `{resource: body}`; returns the created resource.
    pub async fn neutron_create(&self, collection: &str, resource: &str, body: &Value) -> Result<Value> {
        let wrapped = serde_json::json!({ resource: body });
        let mut v = self
            .call(
                reqwest::Method::POST,
                Url::Network(&format!("/v2.0/{collection}")),
                Some(&wrapped),
            )
            .await?;
        match v.get_mut(resource).map(Value::take) {
            Some(r @ Value::Object(_)) => Ok(r),
            _ => Err(Error::Decode(format!(
                "POST /v2.0/{collection}: no '{resource}' in the answer"
            ))),
        }
    }

    /// `DELETE /v2.0/{collection}/{id}`.
    pub async fn neutron_delete(&self, collection: &str, id: &str) -> Result<()> {
        self.call(
            reqwest::Method::DELETE,
            Url::Network(&format!("/v2.0/{collection}/{id}")),
            None::<&()>,
        )
        .await
        .map(|_| ())
    }

    /// An identity API call (`path` under `/v3`), as the authenticated user.
    pub async fn identity(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<Value> {
        self.call(method, Url::Identity(path), body).await
    }
}

/// Where a request goes: a path under the network API or under the identity API.
#[derive(Debug, Clone, Copy)]
pub enum Url<'a> {
    Network(&'a str),
    Identity(&'a str),
}

async fn send_with_retries(req: reqwest::RequestBuilder, idempotent: bool) -> Result<reqwest::Response> {
    let mut attempt = 1;
    loop {
        // Bodies are JSON (buffered), so the request can always be cloned.
        let Some(this) = req.try_clone() else {
            return req.send().await.map_err(unreachable);
        };
        match this.send().await {
            Ok(r) => return Ok(r),
            // A timed-out request may have been done; a refused connection was not.
            Err(e) if attempt < SEND_ATTEMPTS && !e.is_timeout() && (idempotent || e.is_connect()) => {
                debug!(error = %unreachable(e), attempt, "request failed, retrying");
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(unreachable(e)),
        }
    }
}

/// The network service's URL in a token body's catalog: its `interface` endpoint, else
/// internal, else public.
pub fn network_endpoint(token_body: &Value, interface: &str) -> Option<String> {
    let services = token_body["token"]["catalog"].as_array()?;
    let net = services.iter().find(|s| s["type"] == "network")?;
    let eps = net["endpoints"].as_array()?;
    [interface, "internal", "public"].iter().find_map(|iface| {
        eps.iter()
            .find(|e| e["interface"] == *iface)
            .and_then(|e| e["url"].as_str())
            .map(|u| u.trim_end_matches('/').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_network_endpoint_comes_from_the_catalog() {
        let body = json!({"token": {"catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "url": "http://id"}]},
            {"type": "network", "endpoints": [
                {"interface": "public", "url": "http://pub:9696/"},
                {"interface": "internal", "url": "http://int:9696"}]}]}});
        assert_eq!(network_endpoint(&body, "internal").as_deref(), Some("http://int:9696"));
        assert_eq!(network_endpoint(&body, "public").as_deref(), Some("http://pub:9696"));
        assert_eq!(network_endpoint(&json!({"token": {}}), "internal"), None);
    }
}
