//! Routers, API only: create/update/delete and interfaces (ports the router owns). Routing in
//! the datapath is a later stage, so the `router` extension is not advertised yet.

use super::common::{check_if_match, description_from, json_bytes, new_id, now, retry, tags_from, Ctx, NResult};
use super::{ports, Kind};
use isthmus_model::validate::Body;
use isthmus_model::{keys, NeutronError, Port, Router, StandardAttrs, Subnet};
use isthmus_store::{Compare, Op, Revision};
use serde_json::{json, Value};

pub const INTERFACE_OWNER: &str = "network:router_interface";

fn key(id: &str) -> String {
    keys::resource("routers", id)
}

pub fn visible(ctx: &Ctx<'_>, id: &str) -> NResult<(Router, Revision)> {
    ctx.get::<Router>(Kind::Router, id)
        .filter(|(r, _)| ctx.admin() || ctx.owns(&r.project_id))
        .ok_or_else(|| Kind::Router.not_found(id))
}

fn interfaces(ctx: &Ctx<'_>, router_id: &str) -> Vec<Port> {
    ctx.all::<Port>(Kind::Port)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.device_id == router_id && p.device_owner == INTERFACE_OWNER)
        .collect()
}

pub async fn create(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let name = body.string("name")?.unwrap_or_default();
    let description = description_from(&mut body)?.unwrap_or_default();
    let admin_state_up = body.boolean("admin_state_up")?.unwrap_or(true);
    if let Some(gw) = body.take_raw("external_gateway_info") {
        let empty = gw.is_null() || gw.as_object().is_some_and(|o| o.is_empty());
        if !empty {
            return Err(NeutronError::invalid_input("external gateways are not supported yet"));
        }
    }
    for unsupported in ["distributed", "ha"] {
        if let Some(v) = body.boolean(unsupported)? {
            if v {
                return Err(NeutronError::invalid_input(format!(
                    "'{unsupported}' routers are not supported yet"
                )));
            }
        }
    }
    let tags = tags_from(ctx, &mut body)?.unwrap_or_default();
    body.finish()?;
    let ts = now();
    let r = Router {
        id: new_id(),
        project_id,
        name,
        admin_state_up,
        status: "ACTIVE".into(),
        std: StandardAttrs {
            description,
            tags,
            ..StandardAttrs::new(&ts)
        },
    };
    if ctx
        .commit(
            vec![Compare::Absent(key(&r.id))],
            vec![Op::put(key(&r.id), json_bytes(&r))],
        )
        .await?
        .is_none()
    {
        return Err(NeutronError::internal("router id collision"));
    }
    Ok(r.to_api())
}

pub async fn update(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    visible(ctx, id)?;
    let name = body.string("name")?;
    let description = description_from(&mut body)?;
    let admin_state_up = body.boolean("admin_state_up")?;
    if let Some(gw) = body.take_raw("external_gateway_info") {
        if !(gw.is_null() || gw.as_object().is_some_and(|o| o.is_empty())) {
            return Err(NeutronError::invalid_input("external gateways are not supported yet"));
        }
    }
    if let Some(routes) = body.take_raw("routes") {
        if !(routes.is_null() || routes.as_array().is_some_and(|a| a.is_empty())) {
            return Err(NeutronError::invalid_input("extra routes are not supported yet"));
        }
    }
    let tags = tags_from(ctx, &mut body)?;
    body.finish()?;
    let r = retry(ctx, |ctx| {
        let (mut r, rev) = visible(ctx, id)?;
        check_if_match(if_match, r.std.revision_number)?;
        if let Some(v) = &name {
            r.name = v.clone();
        }
        if let Some(v) = &description {
            r.std.description = v.clone();
        }
        if let Some(v) = admin_state_up {
            r.admin_state_up = v;
        }
        if let Some(v) = &tags {
            r.std.tags = v.clone();
        }
        r.std.bump(&now());
        Ok((
            vec![Compare::ModRevision(key(id), rev)],
            vec![Op::put(key(id), json_bytes(&r))],
            r,
        ))
    })
    .await?;
    Ok(r.to_api())
}

pub async fn delete(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    retry(ctx, |ctx| {
        let (r, rev) = visible(ctx, id)?;
        check_if_match(if_match, r.std.revision_number)?;
        if !interfaces(ctx, id).is_empty() {
            return Err(NeutronError::conflict(
                "RouterInUse",
                format!("Router {id} still has ports"),
            ));
        }
        Ok((vec![Compare::ModRevision(key(id), rev)], vec![Op::delete(key(id))], ()))
    })
    .await
}

fn interface_info(router: &Router, p: &Port) -> Value {
    let subnet_ids: Vec<&str> = p.fixed_ips.iter().map(|f| f.subnet_id.as_str()).collect();
    json!({
        "id": router.id, "tenant_id": router.project_id, "project_id": router.project_id,
        "port_id": p.id, "network_id": p.network_id,
        "subnet_id": subnet_ids.first(), "subnet_ids": subnet_ids,
    })
}

enum Target {
    Subnet(String),
    Port(String),
}

/// `{"subnet_id": X}` or `{"port_id": Y}`, exactly one.
fn target(body: &Value) -> NResult<Target> {
    let obj = body
        .as_object()
        .ok_or_else(|| NeutronError::bad_request("Body contains invalid data"))?;
    let get = |k: &str| obj.get(k).and_then(|v| v.as_str()).map(str::to_string);
    for k in obj.keys() {
        if k != "subnet_id" && k != "port_id" {
            return Err(NeutronError::bad_request(format!("Unrecognized attribute(s) '{k}'")));
        }
    }
    match (get("subnet_id"), get("port_id")) {
        (Some(_), Some(_)) => Err(NeutronError::bad_request("Cannot specify both subnet-id and port-id")),
        (None, None) => Err(NeutronError::bad_request(
            "Either subnet_id or port_id must be specified",
        )),
        (Some(s), None) => Ok(Target::Subnet(s)),
        (None, Some(p)) => Ok(Target::Port(p)),
    }
}

pub async fn add_interface(ctx: &Ctx<'_>, id: &str, body: Value) -> NResult<Value> {
    let (router, _) = visible(ctx, id)?;
    ctx.require_member("add_router_interface")?;
    let port = match target(&body)? {
        Target::Port(pid) => {
            let (p, _) = ctx
                .get::<Port>(Kind::Port, &pid)
                .filter(|(p, _)| ctx.admin() || ctx.owns(&p.project_id))
                .ok_or_else(|| Kind::Port.not_found(&pid))?;
            if !p.device_id.is_empty() {
                return Err(NeutronError::conflict(
                    "PortInUse",
                    format!("Unable to complete operation on port {pid} for network {}. Port already has an attached device {}.", p.network_id, p.device_id),
                ));
            }
            if p.fixed_ips.is_empty() {
                return Err(NeutronError::bad_request(format!(
                    "Bad router request: Router port {pid} must have at least one fixed IP"
                )));
            }
            let b = Body::from_map(
                json!({"device_id": id, "device_owner": INTERFACE_OWNER})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            );
            ports::update_internal(ctx, &pid, b).await?
        }
        Target::Subnet(sid) => {
            let (s, _) = ctx
                .get::<Subnet>(Kind::Subnet, &sid)
                .filter(|(s, _)| ctx.subnet_visible(s))
                .ok_or_else(|| Kind::Subnet.not_found(&sid))?;
            // The interface takes the subnet's gateway address: on another project's shared
            // network that would hijack its gateway (Neutron bug 1757482), so only the
            // subnet's project or an admin may.
            if !ctx.admin() && !ctx.owns(&s.project_id) {
                return Err(NeutronError::bad_request(format!(
                    "Bad router request: Cannot add interface to router because subnet {sid} is not owned by project making the request."
                )));
            }
            let gw = s.gateway_ip.clone().ok_or_else(|| {
                NeutronError::bad_request(format!(
                    "Bad router request: Subnet {sid} for router interface must have a gateway IP"
                ))
            })?;
            if interfaces(ctx, id)
                .iter()
                .any(|p| p.fixed_ips.iter().any(|f| f.subnet_id == sid))
            {
                return Err(NeutronError::bad_request(format!(
                    "Bad router request: Router already has a port on subnet {sid}."
                )));
            }
            let body = json!({
                "network_id": s.network_id, "device_id": id, "device_owner": INTERFACE_OWNER,
                "fixed_ips": [{"subnet_id": sid, "ip_address": gw}], "port_security_enabled": false,
                "project_id": router.project_id,
            });
            ports::create_internal(ctx, Body::from_map(body.as_object().cloned().unwrap_or_default())).await?
        }
    };
    Ok(interface_info(&router, &port))
}

pub async fn remove_interface(ctx: &Ctx<'_>, id: &str, body: Value) -> NResult<Value> {
    let (router, _) = visible(ctx, id)?;
    ctx.require_member("remove_router_interface")?;
    let ifaces = interfaces(ctx, id);
    let port = match target(&body)? {
        Target::Port(pid) => ifaces.into_iter().find(|p| p.id == pid).ok_or_else(|| {
            NeutronError::new(
                404,
                "RouterInterfaceNotFound",
                format!("Router {id} does not have an interface with id {pid}"),
            )
        })?,
        Target::Subnet(sid) => ifaces
            .into_iter()
            .find(|p| p.fixed_ips.iter().any(|f| f.subnet_id == sid))
            .ok_or_else(|| {
                NeutronError::new(
                    404,
                    "RouterInterfaceNotFoundForSubnet",
                    format!("Router {id} has no interface on subnet {sid}"),
                )
            })?,
    };
    ports::delete_internal(ctx, &port.id).await?;
    Ok(interface_info(&router, &port))
}
