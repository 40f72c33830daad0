//! The agent's side of the node API: identity (password, project scope; re-authenticates when
//! the token is refused), heartbeats, port binding and status reports, the node stream.

use isthmus_wire::node::{Heartbeat, HeartbeatBody, PortBody, PortCreate, PortReport};
use serde::Serialize;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::time::Duration;
use tracing::{debug, info};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Credentials {
    /// The user: named as the node, with role `node` on `project`.
    pub user: String,
    /// Never logged.
    pub password: String,
    pub project: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("project", &self.project)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No answer (connection refused, reset, timeout).
    #[error("server unreachable: {0}")]
    Unreachable(String),
    #[error("authentication failed ({status}): {body}")]
    Auth { status: u16, body: String },
    #[error("server answered {status}: {body}")]
    Status { status: u16, body: String },
}

impl ApiError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } | ApiError::Auth { status, .. } => Some(*status),
            ApiError::Unreachable(_) => None,
        }
    }
}

fn unreachable(e: reqwest::Error) -> ApiError {
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
    ApiError::Unreachable(msg)
}

/// Attempts per request when no answer comes back. Every call the agent makes is a PUT or a
/// GET, so repeating one is safe; this rides over a pooled connection the server closed.
const SEND_ATTEMPTS: u32 = 3;

pub struct Client {
    http: reqwest::Client,
    /// Unversioned network API URL, no trailing slash; empty until taken from the catalog
    /// when not configured.
    network_url: std::sync::Mutex<String>,
    network_url_fixed: bool,
    /// Identity v3 URL, no trailing slash (`.../v3`).
    auth_url: String,
    node: String,
    creds: Credentials,
    token: tokio::sync::Mutex<Option<String>>,
}

impl Client {
    /// `network_url` empty: taken from the identity catalog (the network service's internal,
    /// else public endpoint).
    pub fn new(network_url: &str, auth_url: &str, node: &str, creds: Credentials) -> Result<Client, ApiError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ApiError::Unreachable(format!("HTTP client: {e}")))?;
        Ok(Client {
            http,
            network_url: std::sync::Mutex::new(network_url.trim_end_matches('/').to_string()),
            network_url_fixed: !network_url.is_empty(),
            auth_url: auth_url.trim_end_matches('/').to_string(),
            node: node.to_string(),
            creds,
            token: tokio::sync::Mutex::new(None),
        })
    }

    async fn authenticate(&self) -> Result<String, ApiError> {
        let body = json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "name": self.creds.user, "domain": {"name": "Default"}, "password": self.creds.password}}},
            "scope": {"project": {"name": self.creds.project, "domain": {"name": "Default"}}}}});
        // Issuing a second token, should the first answer be lost, is harmless.
        let req = self
            .http
            .post(format!("{}/auth/tokens", self.auth_url))
            .timeout(CALL_TIMEOUT)
            .json(&body);
        let resp = send_with_retries(req).await?;
        let status = resp.status();
        let token = resp
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if status.as_u16() != 201 {
            let body = resp.text().await.unwrap_or_default();
            return Err(ApiError::Auth {
                status: status.as_u16(),
                body,
            });
        }
        let token = token.ok_or_else(|| ApiError::Auth {
            status: 201,
            body: "no X-Subject-Token in the answer".into(),
        })?;
        if !self.network_url_fixed {
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            match network_endpoint(&body) {
                Some(url) => {
                    let mut cur = self.network_url.lock().unwrap_or_else(|p| p.into_inner());
                    if *cur != url {
                        info!(%url, "network API from the identity catalog");
                        *cur = url;
                    }
                }
                None => {
                    return Err(ApiError::Auth {
                        status: 201,
                        body: "no network endpoint in the token's catalog (configure the network URL)".into(),
                    })
                }
            }
        }
        info!(user = %self.creds.user, project = %self.creds.project, "authenticated");
        Ok(token)
    }

    /// The current token, or a new one when there is none or `stale` is the one just refused.
    async fn token(&self, stale: Option<&str>) -> Result<String, ApiError> {
        let mut t = self.token.lock().await;
        match t.as_deref() {
            Some(cur) if Some(cur) != stale => Ok(cur.to_string()),
            _ => {
                let fresh = self.authenticate().await?;
                *t = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// Sends a request with the token; on 401 re-authenticates once and retries.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, ApiError> {
        let mut stale: Option<String> = None;
        for _ in 0..2 {
            let token = self.token(stale.as_deref()).await?;
            let base = self.network_url.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let url = format!("{base}{path}");
            let mut req = self.http.request(method.clone(), &url).header("X-Auth-Token", &token);
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = send_with_retries(req).await?;
            if resp.status().as_u16() == 401 {
                debug!("token refused, re-authenticating");
                stale = Some(token);
                continue;
            }
            return Ok(resp);
        }
        Err(ApiError::Auth {
            status: 401,
            body: "a fresh token was refused too".into(),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &(impl Serialize + ?Sized),
    ) -> Result<Value, ApiError> {
        let resp = self.send(method, path, Some(body), Some(CALL_TIMEOUT)).await?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(unreachable)?;
        if !(200..300).contains(&status) {
            return Err(ApiError::Status { status, body: text });
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Registers or heartbeats this node.
    pub async fn heartbeat(
        &self,
        underlay_ip: IpAddr,
        capabilities: &[String],
        restarted: bool,
    ) -> Result<(), ApiError> {
        let body = HeartbeatBody {
            node: Heartbeat {
                underlay_ip: underlay_ip.to_string(),
                capabilities: capabilities.to_vec(),
                restarted,
            },
        };
        self.call(reqwest::Method::PUT, &format!("/isthmus/v1/nodes/{}", self.node), &body)
            .await
            .map(|_| ())
    }

    /// Binds a port to this node and/or reports its status and binding. Returns the port.
    pub async fn report_port(&self, port_id: &str, port: &PortReport) -> Result<Value, ApiError> {
        let body = PortBody { port };
        let v = self
            .call(
                reqwest::Method::PUT,
                &format!("/isthmus/v1/nodes/{}/ports/{port_id}", self.node),
                &body,
            )
            .await?;
        Ok(v["port"].clone())
    }

    /// Creates a port bound to this node in `port.project`'s `port.network`. Returns the port.
    pub async fn create_port(&self, port: &PortCreate) -> Result<Value, ApiError> {
        let v = self
            .call(
                reqwest::Method::POST,
                &format!("/isthmus/v1/nodes/{}/ports", self.node),
                &PortBody { port },
            )
            .await?;
        Ok(v["port"].clone())
    }

    /// Deletes a port bound to this node; one already gone counts as deleted.
    pub async fn delete_port(&self, port_id: &str) -> Result<(), ApiError> {
        match self
            .call(
                reqwest::Method::DELETE,
                &format!("/isthmus/v1/nodes/{}/ports/{port_id}", self.node),
                &Value::Null,
            )
            .await
        {
            Err(e) if e.status() == Some(404) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Opens the node stream (NDJSON), resuming after revision `since` when given. No overall
    /// timeout: the caller watches for pings.
    pub async fn watch(&self, since: Option<i64>) -> Result<reqwest::Response, ApiError> {
        let q = since.map(|r| format!("?since={r}")).unwrap_or_default();
        let resp = self
            .send(
                reqwest::Method::GET,
                &format!("/isthmus/v1/nodes/{}/watch{q}", self.node),
                None::<&()>,
                None,
            )
            .await?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            return Err(ApiError::Status { status, body });
        }
        Ok(resp)
    }
}

async fn send_with_retries(req: reqwest::RequestBuilder) -> Result<reqwest::Response, ApiError> {
    let mut attempt = 1;
    loop {
        // Bodies are JSON (buffered), so the request can always be cloned.
        let Some(this) = req.try_clone() else {
            return req.send().await.map_err(unreachable);
        };
        match this.send().await {
            Ok(r) => return Ok(r),
            Err(e) if attempt < SEND_ATTEMPTS && !e.is_timeout() => {
                debug!(error = %unreachable(e), attempt, "request failed, retrying");
                tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(e) => return Err(unreachable(e)),
        }
    }
}

/// The network service's URL in a token body's catalog: its internal endpoint, else public.
pub fn network_endpoint(token_body: &Value) -> Option<String> {
    let services = token_body["token"]["catalog"].as_array()?;
    let net = services.iter().find(|s| s["type"] == "network")?;
    let eps = net["endpoints"].as_array()?;
    ["internal", "public"].iter().find_map(|iface| {
        eps.iter()
            .find(|e| e["interface"] == *iface)
            .and_then(|e| e["url"].as_str())
            .map(|u| u.trim_end_matches('/').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_endpoint_comes_from_the_catalog() {
        let body = json!({"token": {"catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "url": "http://id"}]},
            {"type": "network", "endpoints": [
                {"interface": "public", "url": "http://pub:9696/"},
                {"interface": "internal", "url": "http://int:9696"}]}]}});
        assert_eq!(network_endpoint(&body).as_deref(), Some("http://int:9696"));
        assert_eq!(network_endpoint(&json!({"token": {}})), None);
        let creds = Credentials {
            user: "n".into(),
            password: "hunter2-secret".into(),
            project: "service".into(),
        };
        assert!(!format!("{creds:?}").contains("hunter2"));
    }
}
