//! Nodes: agents register and heartbeat here, and the Neutron agents API lists them
//! (`openstack network agent list`).

use super::common::{json_bytes, new_id, now, retry, Ctx, NResult};
use super::http::{authenticate, json_response, parse_body, ApiResult};
use super::liveness::{self, Beat, Liveness};
use super::portops::check_router_device;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use isthmus_model::validate::Body;
use isthmus_model::{keys, NeutronError, Node};
use isthmus_store::{Compare, Op};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::Arc;

/// The role a node agent's user holds; it may register and heartbeat only as itself.
pub const NODE_ROLE: &str = "node";

/// Admins, or the node `host` itself: a user of that name holding the node role.
pub fn require_node(auth: &crate::identity::AuthContext, host: &str, what: &str) -> NResult<()> {
    let as_itself = auth.roles.iter().any(|r| r == NODE_ROLE) && auth.user_name == host;
    if auth.is_admin || as_itself {
        Ok(())
    } else {
        Err(NeutronError::forbidden(format!(
            "Only node {host} (or an admin) may {what}"
        )))
    }
}

/// Whether the caller may plug ports of `project_id` into its node: an admin, or a node user
/// holding the node role on that project (the project's grant; see ARCHITECTURE.md "Nodes").
/// Read from the cache at each request, so removing the role takes effect at once.
pub fn node_granted(state: &AppState, auth: &crate::identity::AuthContext, project_id: &str) -> bool {
    auth.is_admin
        || state
            .identity
            .direct_roles(&auth.user_id, project_id)
            .iter()
            .any(|r| r.name == NODE_ROLE)
}

/// The one refusal a node gets for a project that did not grant it, that does not exist, or
/// (claims) a port it may not take: the same words whatever the reason, so nothing leaks.
pub fn not_granted(host: &str, what: &str) -> NeutronError {
    NeutronError::forbidden(format!(
        "Node {host} may not {what}: it needs the node role on the project (granted by the project's admin)"
    ))
}

fn key(host: &str) -> String {
    keys::resource("nodes", host)
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
}

fn nodes(ctx: &Ctx<'_>) -> Vec<Node> {
    ctx.state
        .cache
        .list_typed::<Node>()
        .into_iter()
        .map(|(n, _)| Arc::unwrap_or_clone(n))
        .collect()
}

fn find(ctx: &Ctx<'_>, id: &str) -> NResult<(Node, i64)> {
    ctx.state
        .cache
        .list_typed::<Node>()
        .into_iter()
        .find(|(n, _)| n.id == id)
        .map(|(n, rev)| (Arc::unwrap_or_clone(n), rev))
        .ok_or_else(|| NeutronError::new(404, "AgentNotFound", format!("Agent {id} could not be found.")))
}

/// Agents are admin-only; to anyone else they do not exist (Neutron filters them out).
fn require_admin(ctx: &Ctx<'_>, id: &str) -> NResult<()> {
    if ctx.admin() {
        Ok(())
    } else {
        Err(NeutronError::new(
            404,
            "AgentNotFound",
            format!("Agent {id} could not be found."),
        ))
    }
}

/// Most capabilities one node may announce, and the longest one.
pub const MAX_CAPABILITIES: usize = 64;
pub const MAX_CAPABILITY_LEN: usize = 64;
/// Largest `binding:profile` / `vif_details` a node may report, serialized (Neutron's columns
/// hold 4095 characters).
const MAX_DICT_BYTES: usize = 4095;

/// An underlay address other nodes can send VXLAN to: not unspecified, loopback (unless the
/// deployment is one machine), multicast, broadcast, or an IPv6 link-local address (which
/// needs an interface scope the address cannot carry). Anything else would have every peer
/// tunnel its traffic to itself or to a group.
fn check_underlay(ip: IpAddr, allow_loopback: bool) -> NResult<()> {
    let ip = ip.to_canonical();
    let why = match ip {
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some("an unspecified (0.0.0.0/8) address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("a link-local address"),
        a if a.is_multicast() => Some("a multicast address"),
        a if a.is_loopback() && !allow_loopback => Some("a loopback address"),
        _ => None,
    };
    match why {
        Some(why) => Err(NeutronError::invalid_attr(
            "underlay_ip",
            format!("'{ip}' is {why}; the underlay address must be one other nodes can reach"),
        )),
        None => Ok(()),
    }
}

fn check_capabilities(caps: &[String]) -> NResult<()> {
    if caps.len() > MAX_CAPABILITIES {
        return Err(NeutronError::invalid_attr(
            "capabilities",
            format!("{} capabilities exceed the maximum of {MAX_CAPABILITIES}", caps.len()),
        ));
    }
    for c in caps {
        if c.is_empty() || c.chars().count() > MAX_CAPABILITY_LEN {
            return Err(NeutronError::invalid_attr(
                "capabilities",
                format!("each capability must be 1 to {MAX_CAPABILITY_LEN} characters long"),
            ));
        }
    }
    Ok(())
}

fn check_dict_size(attr: &str, v: &Option<Value>) -> NResult<()> {
    if v.as_ref().is_some_and(|v| v.to_string().len() > MAX_DICT_BYTES) {
        return Err(NeutronError::invalid_attr(
            attr,
            format!("exceeds maximum length of {MAX_DICT_BYTES} characters"),
        ));
    }
    Ok(())
}

/// Most failures one heartbeat may carry, and the longest one.
const MAX_FAILURES: usize = 64;
const MAX_FAILURE_LEN: usize = 1024;

fn check_failures(failures: &[String]) -> NResult<()> {
    if failures.len() > MAX_FAILURES {
        return Err(NeutronError::invalid_attr(
            "failures",
            format!("{} failures exceed the maximum of {MAX_FAILURES}", failures.len()),
        ));
    }
    if failures.iter().any(|f| f.len() > MAX_FAILURE_LEN) {
        return Err(NeutronError::invalid_attr(
            "failures",
            format!("a failure is longer than {MAX_FAILURE_LEN} characters"),
        ));
    }
    Ok(())
}

/// `PUT /isthmus/v1/nodes/{host}`: register or heartbeat. Body:
/// `{"node": {"underlay_ip": "...", "capabilities": [...], "restarted": bool,
/// "converged_revision": N, "failures": ["controller: what", ...]}}`.
pub async fn heartbeat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(host): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    if !valid_host(&host) {
        return Err(NeutronError::invalid_attr("host", format!("'{host}' is not a valid host name")).into());
    }
    require_node(&auth, &host, &format!("register as {host}"))?;
    let mut body = Body::from_value(parse_body(body)?, "node")?;
    let underlay = body
        .string("underlay_ip")?
        .ok_or_else(|| NeutronError::bad_request("Required attribute 'underlay_ip' not specified"))?;
    let underlay: IpAddr = underlay
        .parse()
        .map_err(|_| NeutronError::invalid_attr("underlay_ip", format!("'{underlay}' is not a valid IP address")))?;
    check_underlay(underlay, state.config.allow_loopback_underlay)?;
    let capabilities = body.string_list("capabilities")?.unwrap_or_default();
    check_capabilities(&capabilities)?;
    let restarted = body.boolean("restarted")?.unwrap_or(false);
    let converged_revision = body.integer("converged_revision")?;
    if converged_revision.is_some_and(|r| r < 0) {
        return Err(NeutronError::invalid_attr("converged_revision", "must not be negative").into());
    }
    let failures = body.string_list("failures")?.unwrap_or_default();
    check_failures(&failures)?;
    body.finish()?;
    let ts = unix_now();
    let stored = state.cache.get_typed::<Node>(&key(&host)).map(|(n, _)| n);
    // The lease and the underlay claim first: a node refused an address held by another
    // living node writes nothing, so no record ever points peers at that address.
    let previous = stored
        .as_ref()
        .and_then(|n| n.underlay_ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical().to_string());
    let claimed = state
        .neutron
        .liveness
        .beat(
            &state.store,
            &state.cache,
            &host,
            &underlay.to_canonical().to_string(),
            previous.as_deref(),
            ts,
            converged_revision,
            state.config.agent_down_secs,
        )
        .await
        .map_err(super::common::store_err)?;
    if let Beat::Taken { holder } = claimed {
        tracing::warn!(host = %host, underlay = %underlay, holder = %holder, "node refused an underlay address another living node holds");
        return Err(NeutronError::conflict(
            "UnderlayAddressInUse",
            format!(
                "Underlay address {underlay} is held by another node that is alive; \
                 a node may take it over only once that node is dead or deleted"
            ),
        )
        .into());
    }
    let fresh = Node {
        underlay_ip: underlay.to_string(),
        capabilities: capabilities.clone(),
        failures: failures.clone(),
        ..stored.clone().unwrap_or_else(|| blank_node(&host, ts))
    };
    // Only a record that says something new is written; a plain heartbeat renews a lease.
    let node = if Liveness::must_persist(stored.as_ref(), &fresh, restarted, ts) {
        retry(&ctx, |ctx| {
            let k = key(&host);
            let (mut n, cmp) = match ctx.state.cache.get_typed::<Node>(&k) {
                Some((n, rev)) => (n, Compare::ModRevision(k.clone(), rev)),
                None => (blank_node(&host, ts), Compare::Absent(k.clone())),
            };
            if restarted {
                n.started_unix = ts;
            }
            if n.underlay_ip != underlay.to_string() && !n.underlay_ip.is_empty() {
                tracing::warn!(host = %host, old = %n.underlay_ip, new = %underlay, "node changed its underlay address");
            }
            n.underlay_ip = underlay.to_string();
            n.capabilities = capabilities.clone();
            n.converged_revision = converged_revision;
            n.failures = failures.clone();
            n.heartbeat_unix = unix_now();
            Ok((vec![cmp], vec![Op::put(k, json_bytes(&n))], n))
        })
        .await?
    } else {
        fresh
    };
    if restarted {
        tracing::info!(host = %node.host, underlay = %node.underlay_ip, "node agent (re)started");
    }
    let down = state.config.agent_down_secs;
    let view = liveness::to_api(&state.cache, &state.neutron.liveness, node, unix_now(), down);
    Ok(json_response(StatusCode::OK, json!({ "node": view })))
}

fn blank_node(host: &str, ts: i64) -> Node {
    Node {
        id: new_id(),
        host: host.to_string(),
        underlay_ip: String::new(),
        capabilities: vec![],
        admin_state_up: true,
        description: String::new(),
        created_unix: ts,
        started_unix: ts,
        heartbeat_unix: 0,
        converged_revision: None,
        failures: vec![],
    }
}

/// `GET /v2.0/agents`.
pub async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    let (t, down) = (unix_now(), state.config.agent_down_secs);
    let items: Vec<Value> = if ctx.admin() {
        nodes(&ctx)
            .into_iter()
            .map(|n| liveness::to_api(&state.cache, &state.neutron.liveness, n, t, down))
            .collect()
    } else {
        vec![]
    };
    Ok(json_response(StatusCode::OK, json!({"agents": items})))
}

/// `GET/PUT/DELETE /v2.0/agents/{id}`.
pub async fn member(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    require_admin(&ctx, &id)?;
    let (t, down) = (unix_now(), state.config.agent_down_secs);
    match method {
        Method::GET => Ok(json_response(
            StatusCode::OK,
            json!({"agent": liveness::to_api(&state.cache, &state.neutron.liveness, find(&ctx, &id)?.0, t, down)}),
        )),
        Method::PUT => {
            let mut body = Body::from_value(parse_body(body)?, "agent")?;
            let admin_state_up = body.boolean("admin_state_up")?;
            let description = body.string("description")?;
            body.finish()?;
            let n = retry(&ctx, |ctx| {
                let (mut n, rev) = find(ctx, &id)?;
                if let Some(v) = admin_state_up {
                    n.admin_state_up = v;
                }
                if let Some(v) = &description {
                    n.description = v.clone();
                }
                let k = key(&n.host);
                Ok((
                    vec![Compare::ModRevision(k.clone(), rev)],
                    vec![Op::put(k, json_bytes(&n))],
                    n,
                ))
            })
            .await?;
            let v = liveness::to_api(&state.cache, &state.neutron.liveness, n, t, down);
            Ok(json_response(StatusCode::OK, json!({ "agent": v })))
        }
        _ => {
            let host = retry(&ctx, |ctx| {
                let (n, rev) = find(ctx, &id)?;
                let k = key(&n.host);
                let mut compares = vec![Compare::ModRevision(k.clone(), rev)];
                let mut ops = vec![Op::delete(k), Op::delete(liveness::key(&n.host))];
                // Its underlay address is free at once (even if another server holds its lease).
                if let Ok(ip) = n.underlay_ip.parse::<IpAddr>() {
                    let claim = liveness::underlay_key(&ip.to_canonical().to_string());
                    if let Some(kv) = ctx.state.cache.get(&claim).filter(|kv| kv.value == n.host.as_bytes()) {
                        compares.push(Compare::ModRevision(claim.clone(), kv.mod_revision));
                        ops.push(Op::delete(claim));
                    }
                }
                Ok((compares, ops, n.host))
            })
            .await?;
            state.neutron.liveness.forget(&state.store, &host).await;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

/// `PUT /isthmus/v1/nodes/{host}/ports/{id}`: the node binds a port to itself and reports its
/// binding and status. Body: `{"port": {"bind": true, "status": "ACTIVE"|"DOWN",
/// "vif_type": "...", "vif_details": {...}, "device_id": "...", "name": "...",
/// "binding:profile": {...}}}`. `bind` claims an unbound port (the attach path), in a
/// project that granted the node ([`node_granted`]); otherwise only ports already bound to
/// that node are accepted. Users cannot set these fields
/// (Neutron keeps them read-only).
pub async fn port_status(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((host, id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    require_node(&auth, &host, "report its ports")?;
    let mut body = Body::from_value(parse_body(body)?, "port")?;
    let bind = body.boolean("bind")?.unwrap_or(false);
    let status = body.string("status")?;
    if let Some(s) = &status {
        if !["ACTIVE", "DOWN", "BUILD", "ERROR"].contains(&s.as_str()) {
            return Err(NeutronError::invalid_attr("status", format!("'{s}' is not a port status")).into());
        }
    }
    let vif_type = body.string("vif_type")?;
    let device_id = body.string("device_id")?;
    let name = body.string("name")?;
    let profile = body.take_raw("binding:profile");
    if profile.as_ref().is_some_and(|v| !v.is_object()) {
        return Err(NeutronError::invalid_attr("binding:profile", "must be a dictionary").into());
    }
    let vif_details = body.take_raw("vif_details");
    if vif_details.as_ref().is_some_and(|v| !v.is_object()) {
        return Err(NeutronError::invalid_attr("vif_details", "must be a dictionary").into());
    }
    check_dict_size("binding:profile", &profile)?;
    check_dict_size("vif_details", &vif_details)?;
    body.finish()?;
    let port = retry(&ctx, |ctx| {
        let k = keys::resource("ports", &id);
        let (mut p, rev) = ctx
            .state
            .cache
            .get_typed::<isthmus_model::Port>(&k)
            .filter(|(p, _)| p.binding_host_id == host || (bind && p.binding_host_id.is_empty()))
            .ok_or_else(|| NeutronError::not_found("Port", "Port", &id))?;
        // Claiming an unbound port needs its project's grant. A port bound here already (an
        // admin set `binding:host_id`, or the node created it) needs none: that binding is
        // the grant.
        if p.binding_host_id.is_empty() && !node_granted(ctx.state, ctx.auth, &p.project_id) {
            tracing::info!(host = %host, port = %id, "node refused: no grant on the port's project");
            return Err(not_granted(&host, "claim this port"));
        }
        let mut changed = false;
        if p.binding_host_id.is_empty() {
            p.binding_host_id = host.clone();
            changed = true;
        }
        if let Some(s) = &status {
            changed |= p.status != *s;
            p.status = s.clone();
        }
        if let Some(v) = &vif_type {
            changed |= p.binding_vif_type != *v;
            p.binding_vif_type = v.clone();
        }
        if let Some(v) = &vif_details {
            changed |= p.binding_vif_details != *v;
            p.binding_vif_details = v.clone();
        }
        if let Some(v) = &device_id {
            if p.device_id != *v {
                // A node's report may not turn a router port into another project's.
                check_router_device(ctx, &p.device_owner, v, &p.project_id)?;
            }
            changed |= p.device_id != *v;
            p.device_id = v.clone();
        }
        if let Some(v) = &name {
            changed |= p.name != *v;
            p.name = v.clone();
        }
        if let Some(v) = &profile {
            changed |= p.binding_profile != *v;
            p.binding_profile = v.clone();
        }
        if !changed {
            // Nothing to write: reports are repeated on every sync and must stay cheap.
            return Ok((vec![Compare::ModRevision(k, rev)], vec![], p));
        }
        p.std.bump(&now());
        Ok((
            vec![Compare::ModRevision(k.clone(), rev)],
            vec![Op::put(k, json_bytes(&p))],
            p,
        ))
    })
    .await?;
    if let Some(s) = &status {
        tracing::info!(port = %id, host = %host, status = %s, "port status reported");
    }
    Ok(json_response(StatusCode::OK, json!({"port": port.to_api(true)})))
}
