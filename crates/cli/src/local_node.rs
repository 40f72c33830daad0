//! The all-in-one node of `isthmus up`: this machine joins as a node, with an agent in this
//! process, so VMs and containers on it get networking without any other setup.

use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::Path;

/// An identity call as the admin; returns the JSON body (Null for 204).
async fn call(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value> {
    let mut req = http
        .request(method.clone(), format!("{base}{path}"))
        .header("X-Auth-Token", token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.with_context(|| format!("{method} {path}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{method} {path}: {status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn first_id(v: &Value, plural: &str) -> Option<String> {
    v[plural][0]["id"].as_str().map(str::to_string)
}

/// Makes sure user `node` exists with the node role on the service project and a password
/// kept (0600) in the data dir; returns that password.
pub async fn ensure_node_user(auth_url: &str, admin_password: &str, node: &str, data_dir: &Path) -> Result<String> {
    let http = reqwest::Client::new();
    let base = auth_url.trim_end_matches('/');
    let auth = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": "admin", "domain": {"id": "default"}, "password": admin_password}}},
        "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}});
    let resp = http
        .post(format!("{base}/auth/tokens"))
        .json(&auth)
        .send()
        .await
        .context("authenticating as admin")?;
    if !resp.status().is_success() {
        bail!("authenticating as admin: {}", resp.status());
    }
    let token = resp
        .headers()
        .get("X-Subject-Token")
        .and_then(|v| v.to_str().ok())
        .context("no X-Subject-Token")?
        .to_string();
    let service = first_id(
        &call(&http, base, &token, Method::GET, "/projects?name=service", None).await?,
        "projects",
    )
    .context("no service project")?;
    let role = first_id(
        &call(&http, base, &token, Method::GET, "/roles?name=node", None).await?,
        "roles",
    )
    .context("no node role")?;
    let password = crate::secret_file(&data_dir.join("node-password"))?;
    let existing = call(&http, base, &token, Method::GET, &format!("/users?name={node}"), None).await?;
    let user = match first_id(&existing, "users") {
        Some(id) => {
            // The password file is the source of truth (it may be new after a wiped file).
            let body = json!({"user": {"password": password}});
            call(&http, base, &token, Method::PATCH, &format!("/users/{id}"), Some(body)).await?;
            id
        }
        None => {
            let body = json!({"user": {"name": node, "password": password, "domain_id": "default",
                "default_project_id": service}});
            let v = call(&http, base, &token, Method::POST, "/users", Some(body)).await?;
            v["user"]["id"].as_str().context("created user has no id")?.to_string()
        }
    };
    call(
        &http,
        base,
        &token,
        Method::PUT,
        &format!("/projects/{service}/users/{user}/roles/{role}"),
        None,
    )
    .await?;
    Ok(password)
}
