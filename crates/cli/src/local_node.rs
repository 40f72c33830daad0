//! The all-in-one node of `isthmus up`: this machine joins as a node, with an agent in this
//! process, so VMs and containers on it get networking without any other setup.

use anyhow::{Context, Result};
use isthmus_client::{Auth, Client, Config, Domain};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::Path;

/// An identity call as the admin; returns the JSON body (Null for 204).
async fn call(admin: &Client, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
    admin
        .identity(method.clone(), path, body.as_ref())
        .await
        .with_context(|| format!("{method} {path}"))
}

fn first_id(v: &Value, plural: &str) -> Option<String> {
    v[plural][0]["id"].as_str().map(str::to_string)
}

/// Makes sure user `node` exists with the node role on the service project and on the admin
/// project (that project's grant to plug its ports here), and a password kept (0600) in the
/// data dir; returns that password.
pub async fn ensure_node_user(
    auth_url: &str,
    ca_file: Option<&Path>,
    admin_password: &str,
    node: &str,
    data_dir: &Path,
) -> Result<String> {
    let auth = Auth::Password {
        user: "admin".into(),
        user_domain: Domain::Id("default".into()),
        password: admin_password.to_string(),
        project: "admin".into(),
        project_domain: Domain::Id("default".into()),
    };
    let admin = Client::new(Config::new(auth_url, auth).identity_only().ca_file(ca_file))?;
    admin.token(None).await.context("authenticating as admin")?;
    let service = first_id(
        &call(&admin, Method::GET, "/projects?name=service", None).await?,
        "projects",
    )
    .context("no service project")?;
    let role =
        first_id(&call(&admin, Method::GET, "/roles?name=node", None).await?, "roles").context("no node role")?;
    let password = crate::secret_file(&data_dir.join("node-password"))?;
    let existing = call(&admin, Method::GET, &format!("/users?name={node}"), None).await?;
    let user = match first_id(&existing, "users") {
        Some(id) => {
            // The password file is the source of truth (it may be new after a wiped file).
            let body = json!({"user": {"password": password}});
            call(&admin, Method::PATCH, &format!("/users/{id}"), Some(body)).await?;
            id
        }
        None => {
            let body = json!({"user": {"name": node, "password": password, "domain_id": "default",
                "default_project_id": service}});
            let v = call(&admin, Method::POST, "/users", Some(body)).await?;
            v["user"]["id"].as_str().context("created user has no id")?.to_string()
        }
    };
    // The service project holds the node's own role; the admin project, where `isthmus up`'s
    // user works (the demo's VM and container ports), grants it the right to plug its ports.
    let admin_project = first_id(
        &call(&admin, Method::GET, "/projects?name=admin", None).await?,
        "projects",
    )
    .context("no admin project")?;
    for project in [&service, &admin_project] {
        call(
            &admin,
            Method::PUT,
            &format!("/projects/{project}/users/{user}/roles/{role}"),
            None,
        )
        .await?;
    }
    Ok(password)
}
