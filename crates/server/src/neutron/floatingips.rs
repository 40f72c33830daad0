//! Floating IPs: an address on an external network, held by its own port
//! (`network:floatingip`, written in the same transaction as the floating IP), and optionally
//! associated with a fixed address of a port that a router with a gateway on that network
//! reaches. Association is unique per (port, fixed address) through an index key.

use super::common::{
    check_if_match, count_owned, description_from, json_bytes, new_id, not_found, now, policy_denied, retry, tags_from,
    Ctx, NResult, Stored,
};
use super::lookup::{self, external_network, visible_port, FLOATINGIP_OWNER, INTERFACE_OWNER};
use super::portops::{self, FixedReq, Reservation, ServicePort};
use super::query::Prefilter;
use super::quota;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use isthmus_model::validate::Body;
use isthmus_model::{keys, FloatingIp, NeutronError, Port, Router, StandardAttrs, Subnet};
use isthmus_store::{Compare, Op, Revision};
use serde_json::{json, Value};
use std::net::IpAddr;

pub struct FloatingIps;

static META: Meta = Meta {
    collection: "floatingips",
    singular: "floatingip",
    plural: "floatingips",
    store: FloatingIp::COLLECTION,
    not_found: FloatingIp::NOT_FOUND,
    // Neutron registers the L3 resources without bulk support.
    bulk: false,
    tags: true,
    indexed: false,
    quota: Some("floatingip"),
};

impl Resource for FloatingIps {
    fn meta(&self) -> &'static Meta {
        &META
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            Ok(ctx
                .all::<FloatingIp>()
                .into_iter()
                .filter(|(f, _)| ctx.admin() || ctx.owns(&f.project_id))
                .filter(|(f, _)| {
                    pre.keeps("id", &f.id)
                        && pre.keeps("project_id", &f.project_id)
                        && pre.keeps("tenant_id", &f.project_id)
                        && pre.keeps("floating_network_id", &f.floating_network_id)
                })
                .map(|(f, _)| render(ctx, &f))
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        Ok(render(ctx, &visible(ctx, id)?.0))
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
        count_owned::<FloatingIp>(ctx, project)
    }
}

fn key(id: &str) -> String {
    lookup::key::<FloatingIp>(id)
}

/// A floating IP the caller may see (its project's, or any for an admin), or FloatingIPNotFound.
fn visible(ctx: &Ctx<'_>, id: &str) -> NResult<(FloatingIp, Revision)> {
    ctx.get::<FloatingIp>(id)
        .filter(|(f, _)| ctx.admin() || ctx.owns(&f.project_id))
        .ok_or_else(|| not_found::<FloatingIp>(id))
}

/// The API view, with `port_details` (`fip-port-details`) from the associated port.
fn render(ctx: &Ctx<'_>, f: &FloatingIp) -> Value {
    let mut v = f.to_api();
    let details = f
        .port_id
        .as_deref()
        .and_then(|p| ctx.get::<Port>(p))
        .map(|(p, _)| {
            json!({
                "name": p.name, "network_id": p.network_id, "mac_address": p.mac_address,
                "admin_state_up": p.admin_state_up, "status": p.status,
                "device_id": p.device_id, "device_owner": p.device_owner,
            })
        })
        .unwrap_or(Value::Null);
    v["port_details"] = details;
    v
}

/// A requested association: the port and, optionally, which of its addresses.
struct AssocReq {
    port_id: String,
    fixed_ip: Option<String>,
}

/// A checked association.
struct Assoc {
    port_id: String,
    fixed_ip: String,
    router_id: String,
    router_rev: Revision,
    port_rev: Revision,
}

fn bad_request(msg: String) -> NeutronError {
    NeutronError::bad_request(format!("Bad floatingip request: {msg}"))
}

/// Checks that floating IP `fip_id` on external network `net_id` may be associated as asked
/// (Neutron's `_get_assoc_data`): the port is the caller's to see, the fixed address one of
/// its IPv4 addresses, a router connects that address's subnet to the external network, and
/// no other floating IP holds the same (port, address).
fn check_assoc(ctx: &Ctx<'_>, fip_id: &str, fip_project: &str, net_id: &str, req: &AssocReq) -> NResult<Assoc> {
    let (port, port_rev) = visible_port(ctx, &req.port_id)?;
    if !ctx.admin() && port.project_id != fip_project {
        return Err(not_found::<Port>(&req.port_id));
    }
    if port.device_owner.starts_with("network:") {
        return Err(bad_request(format!(
            "Port {} has owner {} and therefore cannot be associated with a floating IP.",
            port.id, port.device_owner
        )));
    }
    let v4: Vec<&isthmus_model::FixedIp> = port
        .fixed_ips
        .iter()
        .filter(|f| f.ip_address.parse::<IpAddr>().is_ok_and(|a| a.is_ipv4()))
        .collect();
    let fixed = match &req.fixed_ip {
        Some(ip) => v4.iter().find(|f| f.ip_address == *ip).copied().ok_or_else(|| {
            bad_request(format!("Port {} does not have fixed ip {ip}.", port.id))
        })?,
        None => match v4.as_slice() {
            [] => {
                return Err(bad_request(format!(
                    "No IPv4 addresses found on port {}.",
                    port.id
                )))
            }
            [one] => *one,
            _ => {
                return Err(bad_request(format!(
                    "Port {} has multiple fixed IPv4 addresses. Must provide a specific IPv4 address when assigning a floating IP.",
                    port.id
                )))
            }
        },
    };
    let (router_id, router_rev) = ctx
        .all::<Router>()
        .into_iter()
        .filter(|(r, _)| r.gateway.as_ref().is_some_and(|g| g.network_id == net_id))
        .find(|(r, _)| {
            ctx.all::<Port>().iter().any(|(p, _)| {
                p.device_id == r.id
                    && p.device_owner == INTERFACE_OWNER
                    && p.fixed_ips.iter().any(|f| f.subnet_id == fixed.subnet_id)
            })
        })
        .map(|(r, rev)| (r.id.clone(), rev))
        .ok_or_else(|| {
            NeutronError::new(
                404,
                "ExternalGatewayForFloatingIPNotFound",
                format!(
                    "External network {net_id} is not reachable from subnet {}.  Therefore, cannot associate Port {} with a Floating IP.",
                    fixed.subnet_id, port.id
                ),
            )
        })?;
    if let Some(holder) = ctx.state.cache.get(&keys::fip_assoc(&port.id, &fixed.ip_address)) {
        if holder.value != fip_id.as_bytes() {
            return Err(NeutronError::conflict(
                "FloatingIPPortAlreadyAssociated",
                format!(
                    "Cannot associate floating IP with port {} using fixed IP {}, as that fixed IP already has a floating IP on external network {net_id}.",
                    port.id, fixed.ip_address
                ),
            ));
        }
    }
    Ok(Assoc {
        port_id: port.id.clone(),
        fixed_ip: fixed.ip_address.clone(),
        router_id,
        router_rev,
        port_rev,
    })
}

/// Applies an association (or its removal, `None`) to `f`, with the index key writes.
fn associate(f: &mut FloatingIp, assoc: Option<&Assoc>, cmp: &mut Vec<Compare>, ops: &mut Vec<Op>) {
    let old = f.port_id.clone().zip(f.fixed_ip_address.clone());
    let new = assoc.map(|a| (a.port_id.clone(), a.fixed_ip.clone()));
    if old != new {
        if let Some((p, ip)) = &old {
            ops.push(Op::delete(keys::fip_assoc(p, ip)));
        }
        if let Some((p, ip)) = &new {
            let k = keys::fip_assoc(p, ip);
            cmp.push(Compare::Absent(k.clone()));
            ops.push(Op::put(k, f.id.clone()));
        }
    }
    if let Some(a) = assoc {
        // The port and the router (its interfaces, its gateway) must still be as checked when
        // the association commits.
        cmp.push(Compare::ModRevision(lookup::key::<Port>(&a.port_id), a.port_rev));
        cmp.push(Compare::ModRevision(lookup::key::<Router>(&a.router_id), a.router_rev));
    }
    f.port_id = assoc.map(|a| a.port_id.clone());
    f.fixed_ip_address = assoc.map(|a| a.fixed_ip.clone());
    f.router_id = assoc.map(|a| a.router_id.clone());
    f.status = if assoc.is_some() { "ACTIVE" } else { "DOWN" }.into();
}

/// `port_id` and `fixed_ip_address` from a body: absent, `null` (no association) or a port.
fn parse_assoc(body: &mut Body) -> NResult<Option<Option<AssocReq>>> {
    let port = body.opt_string("port_id")?;
    let fixed = body.opt_string("fixed_ip_address")?.flatten();
    if let Some(ip) = &fixed {
        if ip.parse::<IpAddr>().is_err() {
            return Err(NeutronError::invalid_attr(
                "fixed_ip_address",
                format!("'{ip}' is not a valid IP address"),
            ));
        }
    }
    Ok(match port {
        None if fixed.is_some() => {
            return Err(bad_request(
                "fixed_ip_address cannot be specified without a port_id".into(),
            ))
        }
        None => None,
        Some(None) => Some(None),
        Some(Some(port_id)) => Some(Some(AssocReq {
            port_id,
            fixed_ip: fixed,
        })),
    })
}

async fn create(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let net_id = body.string("floating_network_id")?.ok_or_else(|| {
        NeutronError::bad_request("Failed to parse request. Required attribute 'floating_network_id' not specified")
    })?;
    let subnet_id = body.opt_string("subnet_id")?.flatten();
    let address = body.opt_string("floating_ip_address")?.flatten();
    if address.is_some() && !ctx.admin() {
        return Err(policy_denied(
            "(rule:create_floatingip and rule:create_floatingip:floating_ip_address)",
        ));
    }
    let address = address
        .map(|a| {
            a.parse::<IpAddr>().map_err(|_| {
                NeutronError::invalid_attr("floating_ip_address", format!("'{a}' is not a valid IP address"))
            })
        })
        .transpose()?;
    let assoc = parse_assoc(&mut body)?.flatten();
    let description = description_from(&mut body)?.unwrap_or_default();
    let tags = tags_from(ctx, &mut body)?.unwrap_or_default();
    body.finish()?;
    external_network(ctx, &net_id, "floatingip")?;
    let v4_subnets: Vec<String> = ctx
        .all::<Subnet>()
        .into_iter()
        .filter(|(s, _)| s.network_id == net_id && s.ip_version == 4)
        .map(|(s, _)| s.id.clone())
        .collect();
    if let Some(sid) = &subnet_id {
        if !v4_subnets.contains(sid) {
            return Err(bad_request(format!(
                "Subnet {sid} is not an IPv4 subnet of external network {net_id}."
            )));
        }
    }
    if v4_subnets.is_empty() {
        return Err(bad_request(format!(
            "Network {net_id} does not contain any IPv4 subnet"
        )));
    }
    // Which addresses to try, in order: the one asked for, or one from each IPv4 subnet.
    let attempts: Vec<FixedReq> = match (&subnet_id, address) {
        (s, Some(ip)) => vec![FixedReq {
            subnet_id: s.clone(),
            ip: Some(ip),
        }],
        (Some(s), None) => vec![FixedReq {
            subnet_id: Some(s.clone()),
            ip: None,
        }],
        (None, None) => v4_subnets
            .iter()
            .map(|s| FixedReq {
                subnet_id: Some(s.clone()),
                ip: None,
            })
            .collect(),
    };
    let id = new_id();
    let ts = now();
    let inflight = &ctx.state.neutron.inflight;
    let mut port = ServicePort {
        id: new_id(),
        network_id: net_id.clone(),
        device_owner: FLOATINGIP_OWNER,
        device_id: id.clone(),
        fixed: None,
        res: Reservation::new(inflight),
    };
    let fip = retry(ctx, |ctx| {
        let (qcmp, qops) = quota::check(ctx, "floatingip", &project_id, 1, || {
            count_owned::<FloatingIp>(ctx, &project_id)
        })?;
        let mut planned = None;
        let mut last_err = None;
        for a in &attempts {
            port.fixed = Some(vec![a.clone()]);
            match port.plan(ctx) {
                Ok(p) => {
                    planned = Some(p);
                    break;
                }
                Err(e) if e.kind == "IpAddressGenerationFailure" => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        let (mut cmp, mut ops, p) = match planned {
            Some(p) => p,
            None => {
                return Err(last_err.unwrap_or_else(|| NeutronError::internal("no address planned")));
            }
        };
        let mut f = FloatingIp {
            id: id.clone(),
            project_id: project_id.clone(),
            floating_network_id: net_id.clone(),
            floating_ip_address: p.fixed_ips.first().map(|f| f.ip_address.clone()).unwrap_or_default(),
            floating_port_id: p.id.clone(),
            port_id: None,
            fixed_ip_address: None,
            router_id: None,
            status: "DOWN".into(),
            std: StandardAttrs {
                description: description.clone(),
                tags: tags.clone(),
                ..StandardAttrs::new(&ts)
            },
        };
        let checked = assoc
            .as_ref()
            .map(|a| check_assoc(ctx, &id, &project_id, &net_id, a))
            .transpose()?;
        associate(&mut f, checked.as_ref(), &mut cmp, &mut ops);
        cmp.push(Compare::Absent(key(&id)));
        ops.push(Op::put(key(&id), json_bytes(&f)));
        cmp.extend(qcmp);
        ops.extend(qops);
        Ok((cmp, ops, f))
    })
    .await?;
    tracing::info!(fip = %fip.id, address = %fip.floating_ip_address, "floating IP created");
    Ok(render(ctx, &fip))
}

async fn update(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    visible(ctx, id)?;
    let assoc = parse_assoc(&mut body)?;
    let description = description_from(&mut body)?;
    let tags = tags_from(ctx, &mut body)?;
    body.finish()?;
    let f = retry(ctx, |ctx| {
        let (mut f, rev) = visible(ctx, id)?;
        check_if_match(if_match, f.std.revision_number)?;
        let mut cmp = vec![Compare::ModRevision(key(id), rev)];
        let mut ops = vec![];
        if let Some(a) = &assoc {
            let checked = a
                .as_ref()
                .map(|a| check_assoc(ctx, id, &f.project_id, &f.floating_network_id, a))
                .transpose()?;
            associate(&mut f, checked.as_ref(), &mut cmp, &mut ops);
        }
        if let Some(v) = &description {
            f.std.description = v.clone();
        }
        if let Some(v) = &tags {
            f.std.tags = v.clone();
        }
        f.std.bump(&now());
        ops.push(Op::put(key(id), json_bytes(&f)));
        Ok((cmp, ops, f))
    })
    .await?;
    Ok(render(ctx, &f))
}

async fn delete(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    retry(ctx, |ctx| {
        let (mut f, rev) = visible(ctx, id)?;
        check_if_match(if_match, f.std.revision_number)?;
        let mut cmp = vec![Compare::ModRevision(key(id), rev)];
        let mut ops = vec![];
        associate(&mut f, None, &mut cmp, &mut ops);
        if let Some((p, prev)) = ctx.get::<Port>(&f.floating_port_id) {
            cmp.push(Compare::ModRevision(lookup::key::<Port>(&p.id), prev));
            ops.extend(portops::delete_ops(&p));
        }
        ops.push(Op::delete(key(id)));
        Ok((cmp, ops, ()))
    })
    .await
}
