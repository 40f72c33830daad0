//! Reads several resources share (keys, visibility, who refers to whom), below the resource
//! modules so that none of them needs another.

use super::common::{not_found, Ctx, Grants, NResult, ACCESS_SHARED};
use crate::cache::Typed;
use ipnet::IpNet;
use isthmus_model::validate::{is_uuid, Body};
use isthmus_model::{
    keys, AddressScope, FloatingIp, Network, NeutronError, PoolAllocation, Port, QosPolicy, Router, SecurityGroup,
    SecurityGroupRule, Subnet, SubnetPool,
};
use isthmus_store::{Compare, Revision};
use serde_json::Value;
use std::collections::HashMap;

/// The device owner of a router's interface ports.
pub const INTERFACE_OWNER: &str = "network:router_interface";
/// The device owner of a router's gateway port on an external network.
pub const GATEWAY_OWNER: &str = "network:router_gateway";
/// The device owner of the port holding a floating IP's address.
pub const FLOATINGIP_OWNER: &str = "network:floatingip";

/// Store key of object `id` of type `T`.
pub fn key<T: Typed>(id: &str) -> String {
    keys::resource(T::COLLECTION, id)
}

/// Index key naming a project's default security group.
pub fn default_sg_key(project: &str) -> String {
    format!("{}default_sg/{project}", keys::ROOT)
}

/// A subnet the caller may see, or SubnetNotFound.
pub fn visible_subnet(ctx: &Ctx<'_>, id: &str) -> NResult<(Subnet, Revision)> {
    ctx.get::<Subnet>(id)
        .filter(|(s, _)| ctx.subnet_visible(s))
        .ok_or_else(|| not_found::<Subnet>(id))
}

/// Whether ports get their address on this subnet by SLAAC (EUI-64) rather than from a pool.
pub fn is_auto_address(s: &Subnet) -> bool {
    matches!(s.ipv6_address_mode.as_deref(), Some("slaac") | Some("dhcpv6-stateless"))
}

/// A port the caller may see, or PortNotFound.
pub fn visible_port(ctx: &Ctx<'_>, id: &str) -> NResult<(Port, Revision)> {
    ctx.get::<Port>(id)
        .filter(|(p, _)| ctx.port_visible(p))
        .ok_or_else(|| not_found::<Port>(id))
}

/// A router the caller may see (its project's, or any for an admin), or RouterNotFound.
pub fn visible_router(ctx: &Ctx<'_>, id: &str) -> NResult<(Router, Revision)> {
    ctx.get::<Router>(id)
        .filter(|(r, _)| ctx.admin() || ctx.owns(&r.project_id))
        .ok_or_else(|| not_found::<Router>(id))
}

/// The router's interface ports.
pub fn router_interfaces(ctx: &Ctx<'_>, router_id: &str) -> Vec<Port> {
    ctx.all::<Port>()
        .into_iter()
        .filter(|(p, _)| p.device_id == router_id && p.device_owner == INTERFACE_OWNER)
        .map(|(p, _)| (*p).clone())
        .collect()
}

pub fn group(ctx: &Ctx<'_>, id: &str) -> Option<(SecurityGroup, Revision)> {
    ctx.get::<SecurityGroup>(id)
}

/// Whether the caller sees group `g`: its project's, the admin, or shared with its project
/// (`rbac-security-groups`).
pub fn group_visible_in(ctx: &Ctx<'_>, g: &SecurityGroup, grants: &Grants) -> bool {
    ctx.admin()
        || ctx.owns(&g.project_id)
        || grants.grants("security_group", &g.id, ACCESS_SHARED, &ctx.auth.project_id)
}

/// A security group the caller may see, or SecurityGroupNotFound.
pub fn visible_group(ctx: &Ctx<'_>, id: &str) -> NResult<(SecurityGroup, Revision)> {
    group(ctx, id)
        .filter(|(g, _)| group_visible_in(ctx, g, &Grants::of(ctx, id)))
        .ok_or_else(|| not_found::<SecurityGroup>(id))
}

/// A security group the caller may change: its project's (or any for an admin). Others'
/// groups shared with it are visible but not writable (403); invisible ones are 404.
pub fn writable_group(ctx: &Ctx<'_>, id: &str, rule: &str) -> NResult<(SecurityGroup, Revision)> {
    let (g, rev) = visible_group(ctx, id)?;
    if !ctx.admin() && !ctx.owns(&g.project_id) {
        return Err(super::common::policy_denied(&format!("rule:{rule}")));
    }
    Ok((g, rev))
}

/// The group's rules, rendered.
pub fn rules_of(ctx: &Ctx<'_>, group_id: &str) -> Vec<Value> {
    ctx.all::<SecurityGroupRule>()
        .into_iter()
        .filter(|(r, _)| r.security_group_id == group_id)
        .map(|(r, _)| r.to_api())
        .collect()
}

/// The id of the project's default security group, once it exists.
pub fn default_group_id(ctx: &Ctx<'_>, project: &str) -> Option<String> {
    ctx.state
        .cache
        .get(&default_sg_key(project))
        .and_then(|kv| String::from_utf8(kv.value.clone()).ok())
}

/// The floating IPs associated with port `port_id`, with their revisions.
pub fn fips_of_port(ctx: &Ctx<'_>, port_id: &str) -> Vec<(FloatingIp, Revision)> {
    ctx.all::<FloatingIp>()
        .into_iter()
        .filter(|(f, _)| f.port_id.as_deref() == Some(port_id))
        .map(|(f, r)| ((*f).clone(), r))
        .collect()
}

/// The floating IPs associated through router `router_id`.
pub fn fips_of_router(ctx: &Ctx<'_>, router_id: &str) -> Vec<FloatingIp> {
    ctx.all::<FloatingIp>()
        .into_iter()
        .filter(|(f, _)| f.router_id.as_deref() == Some(router_id))
        .map(|(f, _)| (*f).clone())
        .collect()
}

/// The external network a gateway or floating IP is on: 404 if the caller cannot see it,
/// 400 if it is not external.
pub fn external_network(ctx: &Ctx<'_>, id: &str, resource: &str) -> NResult<Network> {
    let grants = Grants::of(ctx, id);
    let (n, _) = ctx
        .get::<Network>(id)
        .filter(|(n, _)| ctx.network_visible_in(n, &grants))
        .ok_or_else(|| not_found::<Network>(id))?;
    let usable = ctx.admin() || ctx.owns(&n.project_id) || grants.network_external(&n, &ctx.auth.project_id);
    if !n.external || !usable {
        return Err(NeutronError::bad_request(format!(
            "Bad {resource} request: Network {id} is not a valid external network."
        )));
    }
    Ok(n)
}

/// Neutron's per-caller `shared` of an object whose flag is its `*` policy (subnet pools,
/// address scopes): shared with everyone, or through a policy naming the caller's project.
pub fn shared_for(ctx: &Ctx<'_>, object_type: &str, id: &str, shared: bool, grants: &Grants) -> bool {
    shared || grants.grants(object_type, id, ACCESS_SHARED, &ctx.auth.project_id)
}

/// Whether the caller sees (and may use) an object with a `shared` flag and RBAC policies:
/// the admin, the owner, or a project it is shared with.
pub fn granted_visible(ctx: &Ctx<'_>, object_type: &str, id: &str, owner: &str, shared: bool, grants: &Grants) -> bool {
    own_or_shared(ctx, owner, shared_for(ctx, object_type, id, shared, grants))
}

/// A subnet pool the caller may see and allocate from (`rbac-subnetpool`), or
/// SubnetPoolNotFound.
pub fn visible_pool(ctx: &Ctx<'_>, id: &str) -> NResult<(SubnetPool, Revision)> {
    ctx.get::<SubnetPool>(id)
        .filter(|(p, _)| granted_visible(ctx, "subnetpool", id, &p.project_id, p.shared, &Grants::of(ctx, id)))
        .ok_or_else(|| not_found::<SubnetPool>(id))
}

/// An address scope the caller may see and put its pools in (`rbac-address-scope`), or
/// AddressScopeNotFound.
pub fn visible_scope(ctx: &Ctx<'_>, id: &str) -> NResult<(AddressScope, Revision)> {
    ctx.get::<AddressScope>(id)
        .filter(|(s, _)| granted_visible(ctx, "address_scope", id, &s.project_id, s.shared, &Grants::of(ctx, id)))
        .ok_or_else(|| not_found::<AddressScope>(id))
}

/// The subnets allocated from pool `pool_id`, from its index keys.
pub fn pool_allocations(ctx: &Ctx<'_>, pool_id: &str) -> Vec<PoolAllocation> {
    ctx.state
        .cache
        .list(&keys::pool_alloc_prefix(pool_id))
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect()
}

/// The stored prefixes of a pool, parsed.
pub fn pool_nets(p: &SubnetPool) -> Vec<IpNet> {
    p.prefixes.iter().filter_map(|s| s.parse().ok()).collect()
}

/// A comparison that fails if anybody rewrites (or first writes) the guard key `key`.
pub fn guard(ctx: &Ctx<'_>, key: &str) -> Compare {
    match ctx.state.cache.get(key) {
        Some(kv) => Compare::ModRevision(key.to_string(), kv.mod_revision),
        None => Compare::Absent(key.to_string()),
    }
}

/// Per network, the address scopes (IPv4, IPv6) of the pools its subnets came from.
pub fn network_scopes(ctx: &Ctx<'_>) -> HashMap<String, (Option<String>, Option<String>)> {
    let mut out: HashMap<String, (Option<String>, Option<String>)> = HashMap::new();
    for (s, _) in ctx.all::<Subnet>() {
        let Some(pid) = &s.subnetpool_id else { continue };
        let Some(scope) = ctx.get::<SubnetPool>(pid).and_then(|(p, _)| p.address_scope_id) else {
            continue;
        };
        let e = out.entry(s.network_id.clone()).or_default();
        if s.ip_version == 6 {
            e.1 = Some(scope);
        } else {
            e.0 = Some(scope);
        }
    }
    out
}

/// A network's API view with its address scopes filled in.
/// Per network id, its (IPv4, IPv6) address scopes.
pub type NetworkScopes = HashMap<String, (Option<String>, Option<String>)>;

pub fn render_network(ctx: &Ctx<'_>, n: &Network, scopes: &NetworkScopes) -> Value {
    let mut v = n.to_api(ctx.admin());
    if let Some((v4, v6)) = scopes.get(&n.id) {
        v["ipv4_address_scope"] = serde_json::json!(v4);
        v["ipv6_address_scope"] = serde_json::json!(v6);
    }
    v
}
/// Index key naming a project's default QoS policy (`qos-default`).
pub fn qos_default_key(project: &str) -> String {
    format!("{}qos_default/{project}", keys::ROOT)
}

/// Whether the caller sees a QoS policy: its project's, shared ones, all for an admin.
pub fn policy_visible(ctx: &Ctx<'_>, p: &QosPolicy) -> bool {
    own_or_shared(ctx, &p.project_id, p.shared)
}

/// Neutron's read rule for objects with a plain `shared` flag (QoS policies): the admin, the
/// owner, or anybody when shared.
pub fn own_or_shared(ctx: &Ctx<'_>, project_id: &str, shared: bool) -> bool {
    ctx.admin() || ctx.owns(project_id) || shared
}

/// A QoS policy the caller may see, or QosPolicyNotFound.
pub fn visible_policy(ctx: &Ctx<'_>, id: &str) -> NResult<(QosPolicy, Revision)> {
    ctx.get::<QosPolicy>(id)
        .filter(|(p, _)| policy_visible(ctx, p))
        .ok_or_else(|| not_found::<QosPolicy>(id))
}

/// A policy a port or network may be given: visible and not being deleted. The caller
/// compares its revision in the same transaction, so a delete cannot miss the new user.
pub fn attachable_policy(ctx: &Ctx<'_>, id: &str) -> NResult<(QosPolicy, Revision)> {
    visible_policy(ctx, id).and_then(|(p, r)| {
        if p.deleting {
            Err(not_found::<QosPolicy>(id))
        } else {
            Ok((p, r))
        }
    })
}

/// The id of the project's default QoS policy, if it has one.
pub fn default_policy_id(ctx: &Ctx<'_>, project: &str) -> Option<String> {
    ctx.state
        .cache
        .get(&qos_default_key(project))
        .and_then(|kv| String::from_utf8(kv.value.clone()).ok())
}

/// `qos_policy_id` of a port or network body: absent, `null` (none), or a policy's UUID.
pub fn qos_policy_from(body: &mut Body) -> NResult<Option<Option<String>>> {
    match body.take_raw("qos_policy_id") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) if is_uuid(&s) => Ok(Some(Some(s))),
        Some(Value::String(s)) => Err(NeutronError::invalid_attr(
            "qos_policy_id",
            format!("'{s}' is not a valid UUID"),
        )),
        Some(v) => Err(NeutronError::invalid_attr(
            "qos_policy_id",
            format!("'{v}' is not a valid UUID"),
        )),
    }
}
