//! Ports a node creates and deletes for its own workloads (container attach, CNI, port pools).
//!
//! A node user holds the node role, which reads and writes nothing through the Neutron API.
//! These endpoints let it do one thing more: create a port in a named project's network,
//! bound to itself, and delete ports bound to itself. Only in a project that granted it (the
//! node role on that project, see [`node_granted`]); anything else is one 403 that says nothing
//! of the project or its networks. The port is then checked with the project's own rules (the
//! network must be the project's or shared; fixed IPs and MACs follow Neutron's checks), as if
//! a member of that project had asked.
//!
//! - `POST /isthmus/v1/nodes/{host}/ports` with `{"port": {"project": NAME_OR_ID,
//!   "network": NAME_OR_ID, "fixed_ips"?, "mac_address"?, "name"?, "device_id"?,
//!   "device_owner"?, "binding:profile"?}}` → 201 `{"port": ...}`.
//! - `DELETE /isthmus/v1/nodes/{host}/ports/{id}` → 204, or 404 if no such port is bound there.

use super::agents::{node_granted, not_granted, require_node};
use super::common::{not_found, Ctx, NResult};
use super::http::{authenticate, json_response, parse_body, ApiResult};
use super::portops::{self, NodeBinding};
use crate::identity::model::DEFAULT_DOMAIN_ID;
use crate::identity::AuthContext;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use isthmus_model::validate::Body;
use isthmus_model::{Network, NeutronError, Port};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The context of a member of `project_id`, acting through node `host`.
fn as_project(node: &AuthContext, project_id: &str, project_name: &str) -> AuthContext {
    AuthContext {
        user_id: node.user_id.clone(),
        user_name: node.user_name.clone(),
        project_id: project_id.to_string(),
        project_name: project_name.to_string(),
        roles: vec!["member".into(), "reader".into()],
        is_admin: false,
    }
}

/// The project `p` (by id, else by name in the default domain) if node `host` may plug its
/// ports. A project that does not exist and one that did not grant the node get the same 403,
/// before the network is looked at, so a node cannot probe names. (An admin is told 404.)
fn granted_project(state: &AppState, auth: &AuthContext, host: &str, p: &str) -> NResult<(String, String)> {
    let found = state
        .identity
        .project(p)
        .or_else(|| state.identity.project_by_name(DEFAULT_DOMAIN_ID, p))
        .filter(|pr| node_granted(state, auth, &pr.id));
    match found {
        Some(pr) if pr.enabled => Ok((pr.id, pr.name)),
        Some(pr) => Err(NeutronError::conflict(
            "ProjectDisabled",
            format!("Project {} is disabled", pr.name),
        )),
        None if auth.is_admin => Err(NeutronError::new(
            404,
            "ProjectNotFound",
            format!("Project {p} could not be found."),
        )),
        None => {
            tracing::info!(host, project = %p, "node refused: no grant on the project");
            Err(not_granted(host, "create ports in this project"))
        }
    }
}

/// A network the project may use, by id, else by name (its own first, then shared ones).
fn resolve_network(ctx: &Ctx<'_>, n: &str) -> NResult<Network> {
    if let Ok((net, _)) = ctx.visible_network(n) {
        return Ok(net);
    }
    let named: Vec<Network> = ctx
        .all::<Network>()
        .into_iter()
        .map(|(net, _)| (*net).clone())
        .filter(|net| net.name == n && ctx.network_visible(net))
        .collect();
    let own: Vec<&Network> = named.iter().filter(|net| ctx.owns(&net.project_id)).collect();
    match (own.len(), named.len()) {
        (1, _) => Ok(own[0].clone()),
        (0, 1) => Ok(named[0].clone()),
        (0, 0) => Err(not_found::<Network>(n)),
        _ => Err(NeutronError::conflict(
            "NetworkNameAmbiguous",
            format!("More than one network named '{n}' is visible to the project; use its id"),
        )),
    }
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(host): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    require_node(&auth, &host, "create ports bound to itself")?;
    let Value::Object(mut outer) = parse_body(body)? else {
        return Err(NeutronError::bad_request("The request body must be a JSON object").into());
    };
    let Some(Value::Object(mut req)) = outer.remove("port") else {
        return Err(NeutronError::bad_request("Resource body required: 'port'").into());
    };
    let project = take_string(&mut req, "project")?;
    let network = take_string(&mut req, "network")?;
    let profile = match req.remove("binding:profile") {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v,
        Some(other) => {
            return Err(NeutronError::invalid_attr("binding:profile", format!("'{other}' is not a dictionary")).into())
        }
    };
    for k in req.keys() {
        if !["fixed_ips", "mac_address", "name", "device_id", "device_owner"].contains(&k.as_str()) {
            return Err(NeutronError::bad_request(format!("Unrecognized attribute(s) '{k}'")).into());
        }
    }
    let (project_id, project_name) = granted_project(&state, &auth, &host, &project)?;
    let member = as_project(&auth, &project_id, &project_name);
    let ctx = Ctx {
        state: &state,
        auth: &member,
    };
    let net = resolve_network(&ctx, &network)?;
    let mut fields: Map<String, Value> = req;
    fields.insert("network_id".into(), Value::String(net.id.clone()));
    let port = portops::create_bound(
        &ctx,
        Body::from_map(fields),
        NodeBinding {
            host: host.clone(),
            profile,
        },
    )
    .await?;
    tracing::info!(port = %port.id, host = %host, network = %net.id, project = %project_id, "node created a port");
    Ok(json_response(StatusCode::CREATED, json!({"port": port.to_api(true)})))
}

pub async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((host, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    require_node(&auth, &host, "delete ports bound to itself")?;
    let port = state
        .cache
        .get_object::<Port>(&id)
        .map(|(p, _)| p)
        .filter(|p| p.binding_host_id == host)
        .ok_or_else(|| not_found::<Port>(&id))?;
    let member = as_project(&auth, &port.project_id, "");
    let ctx = Ctx {
        state: &state,
        auth: &member,
    };
    portops::delete(&ctx, &id, None).await?;
    tracing::info!(port = %id, host = %host, "node deleted a port");
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn take_string(m: &mut Map<String, Value>, k: &str) -> NResult<String> {
    match m.remove(k) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        None | Some(Value::Null) => Err(NeutronError::bad_request(format!(
            "Failed to parse request. Required attribute '{k}' not specified"
        ))),
        Some(other) => Err(NeutronError::invalid_attr(
            k,
            format!("'{other}' is not a valid string"),
        )),
    }
}
