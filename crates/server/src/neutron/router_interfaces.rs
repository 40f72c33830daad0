//! Router interfaces (`PUT /v2.0/routers/{id}/add_router_interface` and
//! `.../remove_router_interface`): ports the router owns, made and removed through the port
//! operations.

use super::common::{json_bytes, not_found, now, retry, Ctx, NResult};
use super::lookup::{self, fips_of_router, router_interfaces, visible_router, visible_subnet, INTERFACE_OWNER};
use super::portops;
use ipnet::IpNet;
use isthmus_model::validate::Body;
use isthmus_model::{NeutronError, Port, Router, Subnet};
use isthmus_store::{Compare, Op};
use serde_json::{json, Value};
use std::net::IpAddr;

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
    let (router, _) = visible_router(ctx, id)?;
    ctx.require_member("add_router_interface")?;
    let port = match target(&body)? {
        Target::Port(pid) => {
            let (p, _) = ctx
                .get::<Port>(&pid)
                .filter(|(p, _)| ctx.admin() || ctx.owns(&p.project_id))
                .ok_or_else(|| not_found::<Port>(&pid))?;
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
            for f in &p.fixed_ips {
                check_overlap(ctx, id, &f.subnet_id)?;
            }
            let b = Body::from_map(
                json!({"device_id": id, "device_owner": INTERFACE_OWNER})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            );
            portops::update_internal(ctx, &pid, b).await?
        }
        Target::Subnet(sid) => {
            let (s, _) = visible_subnet(ctx, &sid)?;
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
            if router_interfaces(ctx, id)
                .iter()
                .any(|p| p.fixed_ips.iter().any(|f| f.subnet_id == sid))
            {
                return Err(NeutronError::bad_request(format!(
                    "Bad router request: Router already has a port on subnet {sid}."
                )));
            }
            check_overlap(ctx, id, &sid)?;
            let body = json!({
                "network_id": s.network_id, "device_id": id, "device_owner": INTERFACE_OWNER,
                "fixed_ips": [{"subnet_id": sid, "ip_address": gw}], "port_security_enabled": false,
                "project_id": router.project_id,
            });
            portops::create_internal(ctx, Body::from_map(body.as_object().cloned().unwrap_or_default())).await?
        }
    };
    Ok(interface_info(&router, &port))
}

/// A router cannot connect two subnets whose ranges overlap: it could not tell where to send
/// their addresses. The gateway's subnets count too.
fn check_overlap(ctx: &Ctx<'_>, router_id: &str, subnet_id: &str) -> NResult<()> {
    let Some((new, _)) = ctx.get::<Subnet>(subnet_id) else {
        return Ok(());
    };
    let Ok(new_net) = new.cidr.parse::<IpNet>() else {
        return Ok(());
    };
    let mut ports = router_interfaces(ctx, router_id);
    if let Some(g) = ctx.get::<Router>(router_id).and_then(|(r, _)| r.gateway) {
        ports.extend(ctx.get::<Port>(&g.port_id).map(|(p, _)| p));
    }
    for f in ports.iter().flat_map(|p| p.fixed_ips.iter()) {
        if f.subnet_id == subnet_id {
            continue;
        }
        let Some((other, _)) = ctx.get::<Subnet>(&f.subnet_id) else {
            continue;
        };
        let Ok(o) = other.cidr.parse::<IpNet>() else { continue };
        if o.contains(&new_net.network()) || new_net.contains(&o.network()) {
            return Err(NeutronError::bad_request(format!(
                "Bad router request: Cidr {} of subnet {subnet_id} overlaps with cidr {} of subnet {}.",
                new.cidr, other.cidr, other.id
            )));
        }
    }
    Ok(())
}

pub async fn remove_interface(ctx: &Ctx<'_>, id: &str, body: Value) -> NResult<Value> {
    visible_router(ctx, id)?;
    ctx.require_member("remove_router_interface")?;
    let target = target(&body)?;
    // The port goes and the router's revision moves in one transaction: a route or a floating
    // IP association planned meanwhile compares the router and must plan again.
    let (router, port) = retry(ctx, |ctx| {
        let (mut router, rrev) = visible_router(ctx, id)?;
        let ifaces = router_interfaces(ctx, id);
        let port = match &target {
            Target::Port(pid) => ifaces.into_iter().find(|p| p.id == *pid).ok_or_else(|| {
                NeutronError::new(
                    404,
                    "RouterInterfaceNotFound",
                    format!("Router {id} does not have an interface with id {pid}"),
                )
            })?,
            Target::Subnet(sid) => ifaces
                .into_iter()
                .find(|p| p.fixed_ips.iter().any(|f| f.subnet_id == *sid))
                .ok_or_else(|| {
                    NeutronError::new(
                        404,
                        "RouterInterfaceNotFoundForSubnet",
                        format!("Router {id} has no interface on subnet {sid}"),
                    )
                })?,
        };
        let (_, prev) = ctx.get::<Port>(&port.id).ok_or_else(|| not_found::<Port>(&port.id))?;
        check_removable(ctx, &router, &port)?;
        let mut ops = portops::delete_ops(&port);
        router.std.bump(&now());
        ops.push(Op::put(lookup::key::<Router>(id), json_bytes(&router)));
        let cmp = vec![
            Compare::ModRevision(lookup::key::<Port>(&port.id), prev),
            Compare::ModRevision(lookup::key::<Router>(id), rrev),
        ];
        Ok((cmp, ops, (router, port)))
    })
    .await?;
    Ok(interface_info(&router, &port))
}

/// An interface stays while a static route's next hop or a floating IP's fixed address
/// relies on one of its subnets (Neutron's RouterInterfaceInUseByRoute / ...ByFloatingIP).
fn check_removable(ctx: &Ctx<'_>, router: &Router, port: &Port) -> NResult<()> {
    let cidrs: Vec<(String, IpNet)> = port
        .fixed_ips
        .iter()
        .filter_map(|f| ctx.get::<Subnet>(&f.subnet_id))
        .filter_map(|(s, _)| s.cidr.parse().ok().map(|c| (s.id.clone(), c)))
        .collect();
    let inside = |ip: &str| -> Option<String> {
        let ip: IpAddr = ip.parse().ok()?;
        cidrs.iter().find(|(_, c)| c.contains(&ip)).map(|(id, _)| id.clone())
    };
    for r in &router.routes {
        if let Some(sid) = inside(&r.nexthop) {
            return Err(NeutronError::conflict(
                "RouterInterfaceInUseByRoute",
                format!(
                    "Router interface for subnet {sid} on router {} cannot be deleted, as it is required by one or more routes.",
                    router.id
                ),
            ));
        }
    }
    for f in fips_of_router(ctx, &router.id) {
        if let Some(sid) = f.fixed_ip_address.as_deref().and_then(inside) {
            return Err(NeutronError::conflict(
                "RouterInterfaceInUseByFloatingIP",
                format!(
                    "Router interface for subnet {sid} on router {} cannot be deleted, as it is required by one or more floating IPs.",
                    router.id
                ),
            ));
        }
    }
    Ok(())
}
