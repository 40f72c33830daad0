//! Routers: create/update/delete with their external gateway (a port on an external network,
//! written in the same transaction as the router) and static routes (`extraroute`).
//! Interfaces are in `router_interfaces`.

use super::common::{
    check_if_match, count_owned, description_from, json_bytes, new_id, now, policy_denied, retry, tags_from, Ctx,
    NResult, Stored,
};
use super::lookup::{
    self, external_network, fips_of_router, router_interfaces, visible_router as visible, GATEWAY_OWNER,
};
use super::portops::{self, parse_fixed_ips, FixedReq, InFlight, Reservation, ServicePort};
use super::query::Prefilter;
use super::quota;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use ipnet::IpNet;
use isthmus_model::validate::Body;
use isthmus_model::{HostRoute, NeutronError, Port, Router, RouterGateway, StandardAttrs, Subnet};
use isthmus_store::{Compare, Op};
use serde_json::Value;
use std::net::IpAddr;

pub struct Routers;

static META: Meta = Meta {
    collection: "routers",
    singular: "router",
    plural: "routers",
    store: Router::COLLECTION,
    not_found: Router::NOT_FOUND,
    // Neutron registers the L3 resources without bulk support.
    bulk: false,
    tags: true,
    indexed: false,
    quota: Some("router"),
};

impl Resource for Routers {
    fn meta(&self) -> &'static Meta {
        &META
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            Ok(ctx
                .all::<Router>()
                .into_iter()
                .filter(|(r, _)| ctx.admin() || ctx.owns(&r.project_id))
                .filter(|(r, _)| pre.keeps_owned(&r.id, &r.name, &r.project_id))
                .map(|(r, _)| r.to_api())
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        Ok(visible(ctx, id)?.0.to_api())
    }
    fn create_one<'a>(&'a self, ctx: &'a Ctx<'a>, body: Body) -> BoxFut<'a, Value> {
        Box::pin(create(ctx, body))
    }
    fn update<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, body: Body, if_match: Option<u64>) -> BoxFut<'a, Value> {
        Box::pin(update(ctx, id, body, if_match))
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, if_match: Option<u64>) -> BoxFut<'a, ()> {
        Box::pin(delete(ctx, id, if_match))
    }
    fn used(&self, ctx: &Ctx<'_>, project: &str) -> usize {
        count_owned::<Router>(ctx, project)
    }
}

fn key(id: &str) -> String {
    lookup::key::<Router>(id)
}

/// Neutron's `max_routes`.
const MAX_ROUTES: usize = 30;

/// A requested external gateway.
struct GatewayReq {
    network_id: String,
    enable_snat: Option<bool>,
    fixed: Option<Vec<FixedReq>>,
}

/// `external_gateway_info` from a body: absent (`None`), cleared (`Some(None)`: `null` or
/// `{}`), or set. `enable_snat` and `external_fixed_ips` are admin-only (Neutron's policy).
fn parse_gateway(ctx: &Ctx<'_>, body: &mut Body, action: &str) -> NResult<Option<Option<GatewayReq>>> {
    let Some(raw) = body.take_raw("external_gateway_info") else {
        return Ok(None);
    };
    let map = match raw {
        Value::Null => return Ok(Some(None)),
        Value::Object(m) if m.is_empty() => return Ok(Some(None)),
        Value::Object(m) => m,
        other => {
            return Err(NeutronError::invalid_attr(
                "external_gateway_info",
                format!("'{other}' is not a dictionary"),
            ))
        }
    };
    let mut b = Body::from_map(map);
    let network_id = b.string("network_id")?.ok_or_else(|| {
        NeutronError::invalid_attr(
            "external_gateway_info",
            "Validation of dictionary's keys failed. Expected keys: {'network_id'}",
        )
    })?;
    let enable_snat = b.boolean("enable_snat")?;
    let fixed = b.object_list("external_fixed_ips")?;
    b.finish()?;
    for (attr, given) in [
        ("enable_snat", enable_snat.is_some()),
        ("external_fixed_ips", fixed.is_some()),
    ] {
        if given && !ctx.admin() {
            return Err(policy_denied(&format!(
                "(rule:{action} and rule:{action}:external_gateway_info and rule:{action}:external_gateway_info:{attr})"
            )));
        }
    }
    let fixed = match fixed {
        Some(items) if items.len() > ctx.state.config.max_fixed_ips_per_port => {
            return Err(NeutronError::invalid_input(
                "Exceeded maximum amount of fixed ips per port.",
            ))
        }
        Some(items) => Some(parse_fixed_ips(items)?),
        None => None,
    };
    Ok(Some(Some(GatewayReq {
        network_id,
        enable_snat,
        fixed,
    })))
}

fn gateway_in_use(router_id: &str, net_id: &str) -> NeutronError {
    NeutronError::conflict(
        "RouterExternalGatewayInUseByFloatingIp",
        format!(
            "Gateway cannot be updated for router {router_id}, since a gateway to external network {net_id} is required by one or more floating IPs."
        ),
    )
}

/// Plans a change of `r`'s gateway to `req` (`None`: remove it): the router is changed in
/// place; the comparisons and writes for the gateway ports are returned. `port` plans a new
/// gateway port and is kept across retries (it holds the in-flight addresses).
fn plan_gateway<'r>(
    ctx: &Ctx<'_>,
    r: &mut Router,
    req: Option<&GatewayReq>,
    port: &mut Option<ServicePort<'r>>,
    inflight: &'r InFlight,
) -> NResult<(Vec<Compare>, Vec<Op>)> {
    let mut cmp = vec![];
    let mut ops = vec![];
    let current = r.gateway.clone();
    if let (Some(cur), Some(req)) = (&current, req) {
        let same_ips = req.fixed.as_ref().is_none_or(|f| same_fixed(f, &cur.fixed_ips));
        if cur.network_id == req.network_id && same_ips {
            if let Some(snat) = req.enable_snat {
                if let Some(g) = r.gateway.as_mut() {
                    g.enable_snat = snat;
                }
            }
            return Ok((cmp, ops));
        }
    }
    if let Some(req) = req {
        external_network(ctx, &req.network_id, "router")?;
    }
    if let Some(cur) = &current {
        if !fips_of_router(ctx, &r.id).is_empty() {
            return Err(gateway_in_use(&r.id, &cur.network_id));
        }
        if let Some((p, prev)) = ctx.get::<Port>(&cur.port_id) {
            cmp.push(Compare::ModRevision(lookup::key::<Port>(&p.id), prev));
            ops.extend(portops::delete_ops(&p));
        }
        r.gateway = None;
    }
    let Some(req) = req else {
        return Ok((cmp, ops));
    };
    let sp = port.get_or_insert_with(|| ServicePort {
        id: new_id(),
        network_id: req.network_id.clone(),
        device_owner: GATEWAY_OWNER,
        device_id: r.id.clone(),
        fixed: req.fixed.clone(),
        res: Reservation::new(inflight),
    });
    let (c, o, p) = sp.plan(ctx)?;
    cmp.extend(c);
    ops.extend(o);
    r.gateway = Some(RouterGateway {
        network_id: req.network_id.clone(),
        enable_snat: req
            .enable_snat
            .or(current
                .as_ref()
                .filter(|c| c.network_id == req.network_id)
                .map(|c| c.enable_snat))
            .unwrap_or(true),
        port_id: p.id.clone(),
        fixed_ips: p.fixed_ips,
    });
    Ok((cmp, ops))
}

/// Whether requested addresses name exactly the gateway's current ones.
fn same_fixed(req: &[FixedReq], cur: &[isthmus_model::FixedIp]) -> bool {
    req.len() == cur.len()
        && req.iter().all(|q| {
            cur.iter().any(|c| {
                q.ip.is_some_and(|ip| ip.to_string() == c.ip_address)
                    && q.subnet_id.as_ref().is_none_or(|s| *s == c.subnet_id)
            })
        })
}

/// `routes` from an update body, parsed and de-duplicated (`null` clears them).
fn parse_routes(body: &mut Body) -> NResult<Option<Vec<HostRoute>>> {
    let Some(raw) = body.take_raw("routes") else {
        return Ok(None);
    };
    let items = match raw {
        Value::Null => return Ok(Some(vec![])),
        Value::Array(items) => items,
        other => {
            return Err(NeutronError::invalid_attr("routes", format!("'{other}' is not a list")));
        }
    };
    if items.len() > MAX_ROUTES {
        return Err(routes_exhausted());
    }
    let mut out: Vec<HostRoute> = vec![];
    for item in items {
        let Value::Object(m) = item else {
            return Err(NeutronError::invalid_attr(
                "routes",
                format!("'{item}' is not a dictionary"),
            ));
        };
        let mut b = Body::from_map(m);
        let dest = b.string("destination")?;
        let hop = b.string("nexthop")?;
        b.finish()?;
        let (Some(dest), Some(hop)) = (dest, hop) else {
            return Err(NeutronError::invalid_attr(
                "routes",
                "Validation of dictionary's keys failed. Expected keys: {'destination', 'nexthop'}",
            ));
        };
        let net: IpNet = dest
            .parse()
            .ok()
            .filter(|_| dest.contains('/'))
            .ok_or_else(|| NeutronError::invalid_attr("routes", format!("'{dest}' is not a valid IP subnet")))?;
        let ip: IpAddr = hop
            .parse()
            .map_err(|_| NeutronError::invalid_attr("routes", format!("'{hop}' is not a valid IP address")))?;
        if net.addr().is_ipv4() != ip.is_ipv4() {
            return Err(invalid_routes(
                &dest,
                &hop,
                "the nexthop's IP version differs from the destination's",
            ));
        }
        let route = HostRoute {
            destination: net.to_string(),
            nexthop: ip.to_string(),
        };
        if !out.contains(&route) {
            out.push(route);
        }
    }
    Ok(Some(out))
}

fn routes_exhausted() -> NeutronError {
    NeutronError::bad_request(format!(
        "Unable to complete operation for router. The number of routes exceeds the maximum {MAX_ROUTES}."
    ))
}

fn invalid_routes(dest: &str, hop: &str, why: &str) -> NeutronError {
    NeutronError::new(
        400,
        "InvalidRoutes",
        format!("Invalid format for routes: [{{'destination': '{dest}', 'nexthop': '{hop}'}}], {why}"),
    )
}

/// Each route's next hop must be on a subnet the router is connected to, and not one of the
/// router's own addresses.
fn check_routes(ctx: &Ctx<'_>, r: &Router, routes: &[HostRoute]) -> NResult<()> {
    let mut ports = router_interfaces(ctx, &r.id);
    if let Some(g) = &r.gateway {
        if let Some((p, _)) = ctx.get::<Port>(&g.port_id) {
            ports.push(p);
        }
    }
    let fixed: Vec<&isthmus_model::FixedIp> = ports.iter().flat_map(|p| p.fixed_ips.iter()).collect();
    let cidrs: Vec<IpNet> = fixed
        .iter()
        .filter_map(|f| ctx.get::<Subnet>(&f.subnet_id))
        .filter_map(|(s, _)| s.cidr.parse().ok())
        .collect();
    for rt in routes {
        let ip: IpAddr = rt
            .nexthop
            .parse()
            .map_err(|_| NeutronError::internal("unparsable route"))?;
        if !cidrs.iter().any(|c| c.contains(&ip)) {
            return Err(invalid_routes(
                &rt.destination,
                &rt.nexthop,
                "the nexthop is not connected with router",
            ));
        }
        if fixed.iter().any(|f| f.ip_address == rt.nexthop) {
            return Err(invalid_routes(
                &rt.destination,
                &rt.nexthop,
                "the nexthop is used by router",
            ));
        }
    }
    Ok(())
}

async fn create(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let name = body.string("name")?.unwrap_or_default();
    let description = description_from(&mut body)?.unwrap_or_default();
    let admin_state_up = body.boolean("admin_state_up")?.unwrap_or(true);
    let gateway = parse_gateway(ctx, &mut body, "create_router")?.flatten();
    check_flavours(ctx, &mut body, "create_router")?;
    let tags = tags_from(ctx, &mut body)?.unwrap_or_default();
    body.finish()?;
    let ts = now();
    let id = new_id();
    let mut port = None;
    let inflight = &ctx.state.neutron.inflight;
    let r = retry(ctx, |ctx| {
        let (qcmp, qops) = quota::check(ctx, "router", &project_id, 1, || {
            count_owned::<Router>(ctx, &project_id)
        })?;
        let mut r = Router {
            id: id.clone(),
            project_id: project_id.clone(),
            name: name.clone(),
            admin_state_up,
            status: "ACTIVE".into(),
            gateway: None,
            routes: vec![],
            std: StandardAttrs {
                description: description.clone(),
                tags: tags.clone(),
                ..StandardAttrs::new(&ts)
            },
        };
        let (mut cmp, mut ops) = match &gateway {
            Some(g) => plan_gateway(ctx, &mut r, Some(g), &mut port, inflight)?,
            None => (vec![], vec![]),
        };
        cmp.push(Compare::Absent(key(&r.id)));
        ops.push(Op::put(key(&r.id), json_bytes(&r)));
        cmp.extend(qcmp);
        ops.extend(qops);
        Ok((cmp, ops, r))
    })
    .await?;
    Ok(r.to_api())
}

/// `distributed` and `ha`: every router here is distributed (routing happens on each node), so
/// `distributed: true` is accepted (from admins, as Neutron's policy has it) and the rest refused.
fn check_flavours(ctx: &Ctx<'_>, body: &mut Body, action: &str) -> NResult<()> {
    if let Some(v) = body.boolean("distributed")? {
        if !ctx.admin() {
            return Err(policy_denied(&format!("(rule:{action} and rule:{action}:distributed)")));
        }
        if !v {
            return Err(NeutronError::invalid_input(
                "Centralized routers are not supported: every router is distributed",
            ));
        }
    }
    if let Some(v) = body.boolean("ha")? {
        if !ctx.admin() {
            return Err(policy_denied(&format!("(rule:{action} and rule:{action}:ha)")));
        }
        if v {
            return Err(NeutronError::invalid_input("'ha' routers are not supported"));
        }
    }
    Ok(())
}

async fn update(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    visible(ctx, id)?;
    let name = body.string("name")?;
    let description = description_from(&mut body)?;
    let admin_state_up = body.boolean("admin_state_up")?;
    let gateway = parse_gateway(ctx, &mut body, "update_router")?;
    let routes = parse_routes(&mut body)?;
    check_flavours(ctx, &mut body, "update_router")?;
    let tags = tags_from(ctx, &mut body)?;
    body.finish()?;
    let mut port = None;
    let inflight = &ctx.state.neutron.inflight;
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
        let (mut cmp, mut ops) = match &gateway {
            Some(g) => plan_gateway(ctx, &mut r, g.as_ref(), &mut port, inflight)?,
            None => (vec![], vec![]),
        };
        if let Some(v) = &routes {
            check_routes(ctx, &r, v)?;
            r.routes = v.clone();
        }
        r.std.bump(&now());
        cmp.push(Compare::ModRevision(key(id), rev));
        ops.push(Op::put(key(id), json_bytes(&r)));
        Ok((cmp, ops, r))
    })
    .await?;
    Ok(r.to_api())
}

async fn delete(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    retry(ctx, |ctx| {
        let (mut r, rev) = visible(ctx, id)?;
        check_if_match(if_match, r.std.revision_number)?;
        if !router_interfaces(ctx, id).is_empty() || !fips_of_router(ctx, id).is_empty() {
            return Err(NeutronError::conflict(
                "RouterInUse",
                format!("Router {id} still has ports"),
            ));
        }
        let (mut cmp, mut ops) = plan_gateway(ctx, &mut r, None, &mut None, &ctx.state.neutron.inflight)?;
        cmp.push(Compare::ModRevision(key(id), rev));
        ops.push(Op::delete(key(id)));
        Ok((cmp, ops, ()))
    })
    .await
}

/// `PUT /v2.0/routers/{id}/add_extraroutes` and `.../remove_extraroutes`
/// (`extraroute-atomic`): adds or removes the given routes against the stored ones, in one
/// compare-and-swap, so concurrent callers do not overwrite each other's routes.
pub async fn change_routes(ctx: &Ctx<'_>, id: &str, body: Value, add: bool) -> NResult<Value> {
    visible(ctx, id)?;
    ctx.require_member(if add { "add_extraroutes" } else { "remove_extraroutes" })?;
    let mut body = Body::from_value(body, "router")?;
    let given = parse_routes(&mut body)?.ok_or_else(|| {
        NeutronError::bad_request("Failed to parse request. Required attribute 'routes' not specified")
    })?;
    body.finish()?;
    let r = retry(ctx, |ctx| {
        let (mut r, rev) = visible(ctx, id)?;
        if add {
            let mut routes = r.routes.clone();
            for g in &given {
                if !routes.contains(g) {
                    routes.push(g.clone());
                }
            }
            if routes.len() > MAX_ROUTES {
                return Err(routes_exhausted());
            }
            check_routes(ctx, &r, &given)?;
            r.routes = routes;
        } else {
            r.routes.retain(|x| !given.contains(x));
        }
        r.std.bump(&now());
        Ok((
            vec![Compare::ModRevision(key(id), rev)],
            vec![Op::put(key(id), json_bytes(&r))],
            r,
        ))
    })
    .await?;
    Ok(serde_json::json!({ "router": r.to_api() }))
}
