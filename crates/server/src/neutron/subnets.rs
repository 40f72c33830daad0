//! Subnets: CIDR, gateway, allocation pools, routes, DNS, IPv6 modes.

use super::common::{
    check_if_match, count_owned, description_from, json_bytes, new_id, not_found, now, retry, retry_rev, tags_from,
    Ctx, Grants, NResult, Stored,
};
use super::lookup::{self, is_auto_address, visible_subnet};
use super::query::Prefilter;
use super::quota;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use ipnet::IpNet;
use isthmus_model::ipam;
use isthmus_model::validate::Body;
use isthmus_model::{
    keys, prefixes, AllocationPool, HostRoute, Network, NeutronError, PoolAllocation, Port, StandardAttrs, Subnet,
    SubnetPool,
};
use isthmus_store::{Compare, Op};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::net::IpAddr;

pub struct Subnets;

static META: Meta = Meta {
    collection: "subnets",
    singular: "subnet",
    plural: "subnets",
    store: Subnet::COLLECTION,
    not_found: Subnet::NOT_FOUND,
    bulk: true,
    tags: true,
    indexed: true,
    quota: Some("subnet"),
};

impl Resource for Subnets {
    fn meta(&self) -> &'static Meta {
        &META
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            // `shared` as the caller sees it: shared with everyone or with its project.
            let g = Grants::all(ctx);
            let shared: HashMap<String, bool> = ctx
                .all::<Network>()
                .into_iter()
                .map(|(n, _)| (n.id.clone(), g.network_shared(&n, &ctx.auth.project_id)))
                .collect();
            let shared_net = |s: &Subnet| shared.get(&s.network_id).copied().unwrap_or(false);
            Ok(ctx
                .all::<Subnet>()
                .into_iter()
                .filter(|(s, _)| ctx.admin() || ctx.owns(&s.project_id) || shared_net(s))
                .filter(|(s, _)| {
                    pre.keeps_owned(&s.id, &s.name, &s.project_id) && pre.keeps("network_id", &s.network_id)
                })
                .map(|(s, _)| {
                    let mut v = s.to_api();
                    // Filter-only (hidden by the query): the network's shared flag.
                    v["shared"] = Value::Bool(shared_net(&s));
                    v
                })
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        Ok(visible_subnet(ctx, id)?.0.to_api())
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
        count_owned::<Subnet>(ctx, project)
    }
}

const IPV6_MODES: &[&str] = &["slaac", "dhcpv6-stateful", "dhcpv6-stateless"];
const MAX_DNS: usize = 5;
const MAX_ROUTES: usize = 20;

fn key(id: &str) -> String {
    lookup::key::<Subnet>(id)
}

fn parse_ip(attr: &str, s: &str) -> NResult<IpAddr> {
    s.parse()
        .map_err(|_| NeutronError::invalid_attr(attr, format!("'{s}' is not a valid IP address")))
}

fn parse_pools(items: Vec<Map<String, Value>>) -> NResult<Vec<AllocationPool>> {
    items
        .into_iter()
        .map(|m| {
            let mut b = Body::from_map(m);
            let start = b.string("start")?;
            let end = b.string("end")?;
            b.finish()?;
            match (start, end) {
                (Some(start), Some(end)) => Ok(AllocationPool { start, end }),
                _ => Err(NeutronError::invalid_attr(
                    "allocation_pools",
                    "each pool needs 'start' and 'end'",
                )),
            }
        })
        .collect()
}

fn parse_dns(list: Vec<String>) -> NResult<Vec<String>> {
    if list.len() > MAX_DNS {
        return Err(NeutronError::new(400, "DNSNameServersExhausted", format!("Unable to complete operation for the subnet. The number of DNS nameservers exceeds the limit {MAX_DNS}.")));
    }
    let mut out: Vec<String> = vec![];
    for d in list {
        let ip = parse_ip("dns_nameservers", &d)?;
        let s = ip.to_string();
        if out.contains(&s) {
            return Err(NeutronError::invalid_attr(
                "dns_nameservers",
                format!("Duplicate nameserver '{d}'"),
            ));
        }
        out.push(s);
    }
    Ok(out)
}

fn parse_routes(items: Vec<Map<String, Value>>, v6: bool) -> NResult<Vec<HostRoute>> {
    if items.len() > MAX_ROUTES {
        return Err(NeutronError::new(400, "HostRoutesExhausted", format!("Unable to complete operation for the subnet. The number of host routes exceeds the limit {MAX_ROUTES}.")));
    }
    let mut out: Vec<HostRoute> = vec![];
    for m in items {
        let mut b = Body::from_map(m);
        let dest = b.string("destination")?;
        let hop = b.string("nexthop")?;
        b.finish()?;
        let (Some(dest), Some(hop)) = (dest, hop) else {
            return Err(NeutronError::invalid_attr(
                "host_routes",
                "each route needs 'destination' and 'nexthop'",
            ));
        };
        let d: IpNet = dest
            .parse()
            .map_err(|_| NeutronError::invalid_attr("host_routes", format!("'{dest}' is not a valid IP subnet")))?;
        let h = parse_ip("host_routes", &hop)?;
        if matches!(d, IpNet::V6(_)) != v6 || h.is_ipv6() != v6 {
            return Err(NeutronError::invalid_input(
                "host_routes must match the subnet's IP version",
            ));
        }
        let r = HostRoute {
            destination: d.trunc().to_string(),
            nexthop: h.to_string(),
        };
        if out.contains(&r) {
            return Err(NeutronError::invalid_attr(
                "host_routes",
                format!("Duplicate hostroute '{dest}'"),
            ));
        }
        out.push(r);
    }
    Ok(out)
}

/// A gateway must be a usable address of the subnet (or an IPv6 link-local address).
fn check_gateway(net: &IpNet, gw: IpAddr) -> NResult<()> {
    if gw.is_ipv6() != ipam::net_is_v6(net) {
        return Err(NeutronError::invalid_input(format!(
            "Gateway IP version {gw} does not match the subnet"
        )));
    }
    let link_local = matches!(gw, IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80);
    if link_local {
        return Ok(());
    }
    let (first, last) = ipam::bounds(net);
    let g = ipam::to_u128(gw);
    let v4_edge = !ipam::net_is_v6(net) && last > first + 1 && (g == first || g == last);
    if !net.contains(&gw) || v4_edge || (ipam::net_is_v6(net) && g == first && last > first) {
        return Err(NeutronError::invalid_input(format!(
            "Gateway is not valid on subnet: {gw} is not a usable address of {net}"
        )));
    }
    Ok(())
}

fn ipv6_modes(v6: bool, ra: &Option<String>, addr: &Option<String>, net: &IpNet) -> NResult<()> {
    for (attr, v) in [("ipv6_ra_mode", ra), ("ipv6_address_mode", addr)] {
        if let Some(v) = v {
            if !IPV6_MODES.contains(&v.as_str()) {
                return Err(NeutronError::invalid_attr(
                    attr,
                    format!("'{v}' is not in {IPV6_MODES:?}"),
                ));
            }
            if !v6 {
                return Err(NeutronError::invalid_input(format!(
                    "{attr} is not valid when ip_version is 4"
                )));
            }
        }
    }
    if let (Some(r), Some(a)) = (ra, addr) {
        if r != a {
            return Err(NeutronError::invalid_input(format!(
                "ipv6_ra_mode set to '{r}' with ipv6_address_mode set to '{a}' is not valid. If both attributes are set, they must be the same value"
            )));
        }
    }
    let auto = matches!(addr.as_deref(), Some("slaac") | Some("dhcpv6-stateless"));
    if auto && net.prefix_len() != 64 {
        return Err(NeutronError::invalid_input(format!(
            "Invalid CIDR {net} for IPv6 address mode. OpenStack uses the EUI-64 address format, which requires the prefix to be /64"
        )));
    }
    Ok(())
}

/// Where a new subnet's CIDR comes from.
enum Source {
    /// Given, outside any pool.
    Cidr(IpNet),
    /// From pool `pool`: exactly `cidr`, or any free block of `prefixlen` (the pool's
    /// default when `None`).
    Pool {
        pool: String,
        cidr: Option<IpNet>,
        prefixlen: Option<i64>,
    },
}

/// A subnet's gateway and allocation pools, as asked for (or defaulted) and checked against
/// its CIDR, which a pool may only choose at commit time.
fn layout(
    net: &IpNet,
    gateway: &Option<Option<IpAddr>>,
    pools: &Option<Vec<AllocationPool>>,
) -> NResult<(Option<IpAddr>, Vec<AllocationPool>)> {
    let gateway = match gateway {
        None => ipam::default_gateway(net),
        Some(None) => None,
        Some(Some(ip)) => {
            check_gateway(net, *ip)?;
            Some(*ip)
        }
    };
    let pools = match pools {
        Some(pools) => {
            ipam::validate_pools(net, gateway, pools)?;
            pools
                .iter()
                .map(|p| AllocationPool {
                    // Normalised spelling so later comparisons are textual.
                    start: p
                        .start
                        .parse::<IpAddr>()
                        .map(|i| i.to_string())
                        .unwrap_or(p.start.clone()),
                    end: p.end.parse::<IpAddr>().map(|i| i.to_string()).unwrap_or(p.end.clone()),
                })
                .collect()
        }
        None => ipam::default_pools(net, gateway),
    };
    Ok((gateway, pools))
}

/// The CIDR pool `pool_id` gives a subnet of `project_id`, with the comparisons and writes
/// that claim it: the pool unchanged, its guard key rewritten (so allocations from one pool
/// serialize across servers, as Neutron locks the pool's row) and an index key per prefix.
fn allocate_from_pool(
    ctx: &Ctx<'_>,
    pool_id: &str,
    ip_version: u8,
    project_id: &str,
    subnet_id: &str,
    cidr: Option<IpNet>,
    prefixlen: Option<i64>,
) -> NResult<(IpNet, Vec<Compare>, Vec<Op>)> {
    let (pool, prev) = lookup::visible_pool(ctx, pool_id)?;
    if pool.ip_version != ip_version {
        return Err(NeutronError::bad_request(format!(
            "Invalid input for operation: Cannot allocate IPv{ip_version} subnet from IPv{} subnet pool.",
            pool.ip_version
        )));
    }
    let len = match (&cidr, prefixlen) {
        (Some(c), _) => c.prefix_len() as i64,
        (None, Some(l)) => l,
        (None, None) => pool.default_prefixlen as i64,
    };
    if len > pool.max_prefixlen as i64 {
        return Err(NeutronError::new(
            400,
            "MaxPrefixSubnetAllocationError",
            format!(
                "Unable to allocate subnet with prefix length {len}, maximum allowed prefix is {}.",
                pool.max_prefixlen
            ),
        ));
    }
    if len < pool.min_prefixlen as i64 {
        return Err(NeutronError::new(
            400,
            "MinPrefixSubnetAllocationError",
            format!(
                "Unable to allocate subnet with prefix length {len}, minimum allowed prefix is {}.",
                pool.min_prefixlen
            ),
        ));
    }
    // Within the bounds, so 0..=128.
    let len = len as u8;
    let allocs = lookup::pool_allocations(ctx, pool_id);
    let used: Vec<IpNet> = allocs.iter().filter_map(|a| a.cidr.parse().ok()).collect();
    let v6 = ip_version == 6;
    // Neutron treats a quota of 0 as none.
    if let Some(q) = pool.default_quota.filter(|q| *q > 0) {
        let mine: u128 = allocs
            .iter()
            .filter(|a| a.project_id == project_id)
            .filter_map(|a| a.cidr.parse::<IpNet>().ok())
            .map(|n| prefixes::quota_units(n.prefix_len(), v6))
            .sum();
        if mine + prefixes::quota_units(len, v6) > q as u128 {
            return Err(NeutronError::conflict(
                "SubnetPoolQuotaExceeded",
                "Per-tenant subnet pool prefix quota exceeded.",
            ));
        }
    }
    let nets = lookup::pool_nets(&pool);
    let net = match cidr {
        Some(c) if prefixes::can_allocate(&nets, &used, &c) => c,
        Some(_) => {
            return Err(alloc_error(
                "Cannot allocate requested subnet from the available set of prefixes",
            ))
        }
        None => prefixes::allocate_any(&nets, &used, len)
            .ok_or_else(|| alloc_error(&format!("Insufficient prefix space to allocate subnet size /{len}")))?,
    };
    let ak = keys::pool_alloc(pool_id, &net.to_string());
    let gk = keys::pool_guard(pool_id);
    let record = PoolAllocation {
        subnet_id: subnet_id.to_string(),
        project_id: project_id.to_string(),
        cidr: net.to_string(),
    };
    Ok((
        net,
        vec![
            Compare::ModRevision(lookup::key::<SubnetPool>(pool_id), prev),
            lookup::guard(ctx, &gk),
            Compare::Absent(ak.clone()),
        ],
        vec![
            Op::put(ak, json_bytes(&record)),
            Op::put(gk, subnet_id.as_bytes().to_vec()),
        ],
    ))
}

/// Neutron's SubnetAllocationError is a server error there; a full pool is the client's
/// conflict, so it is a 409 here.
fn alloc_error(reason: &str) -> NeutronError {
    NeutronError::conflict("SubnetAllocationError", format!("Failed to allocate subnet: {reason}."))
}

async fn create(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let network_id = body.string("network_id")?.ok_or_else(|| {
        NeutronError::bad_request("Failed to parse request. Required attribute 'network_id' not specified")
    })?;
    let ip_version = match body.integer("ip_version")? {
        Some(4) => 4u8,
        Some(6) => 6u8,
        Some(v) => {
            return Err(NeutronError::invalid_attr(
                "ip_version",
                format!("{v} is not in [4, 6]"),
            ))
        }
        None => {
            return Err(NeutronError::bad_request(
                "Failed to parse request. Required attribute 'ip_version' not specified",
            ))
        }
    };
    let v6 = ip_version == 6;
    let pool_id = body.opt_string("subnetpool_id")?.flatten();
    let use_default = body.boolean("use_default_subnetpool")?.unwrap_or(false);
    let prefixlen = body.integer("prefixlen")?;
    if let Some(l) = prefixlen {
        if l < 0 {
            return Err(NeutronError::invalid_attr(
                "prefixlen",
                format!("'{l}' should be non-negative"),
            ));
        }
    }
    if body.take_raw("segment_id").is_some_and(|v| !v.is_null()) {
        return Err(NeutronError::invalid_input("segments are not supported"));
    }
    if let Some(st) = body.string_list("service_types")? {
        if !st.is_empty() {
            return Err(NeutronError::invalid_input("service types are not supported"));
        }
    }
    let cidr = body
        .opt_string("cidr")?
        .flatten()
        .map(|c| ipam::parse_cidr(&c, ip_version))
        .transpose()?;
    if cidr.is_some() && prefixlen.is_some() {
        return Err(NeutronError::bad_request(
            "cidr and prefixlen must not be supplied together",
        ));
    }
    if use_default && pool_id.is_some() {
        return Err(NeutronError::bad_request(
            "subnetpool_id and use_default_subnetpool cannot both be specified",
        ));
    }
    let pool_id = match pool_id {
        Some(p) => Some(p),
        None if use_default => {
            let kv =
                ctx.state.cache.get(&keys::default_pool(ip_version)).ok_or_else(|| {
                    NeutronError::bad_request(format!("No default subnetpool found for IPv{ip_version}"))
                })?;
            Some(String::from_utf8_lossy(&kv.value).into_owned())
        }
        None => None,
    };
    let source = match (pool_id, cidr) {
        (Some(pool), cidr) => Source::Pool { pool, cidr, prefixlen },
        (None, Some(c)) => Source::Cidr(c),
        (None, None) => {
            return Err(NeutronError::bad_request(
                "a subnetpool must be specified in the absence of a cidr",
            ))
        }
    };
    let name = body.string("name")?.unwrap_or_default();
    let description = description_from(&mut body)?.unwrap_or_default();
    let gateway = match body.opt_string("gateway_ip")? {
        None => None,
        Some(None) => Some(None),
        Some(Some(g)) => Some(Some(parse_ip("gateway_ip", &g)?)),
    };
    let pools = match body.object_list("allocation_pools")? {
        Some(items) if !items.is_empty() => Some(parse_pools(items)?),
        _ => None,
    };
    if pools.is_some() && matches!(source, Source::Pool { cidr: None, .. }) {
        return Err(NeutronError::bad_request(
            "allocation_pools allowed only for specific subnet requests.",
        ));
    }
    let dns = parse_dns(body.string_list("dns_nameservers")?.unwrap_or_default())?;
    let routes = parse_routes(body.object_list("host_routes")?.unwrap_or_default(), v6)?;
    let enable_dhcp = body.boolean("enable_dhcp")?.unwrap_or(true);
    let ra = body.opt_string("ipv6_ra_mode")?.flatten();
    let addr_mode = body.opt_string("ipv6_address_mode")?.flatten();
    let tags = tags_from(ctx, &mut body)?.unwrap_or_default();
    body.finish()?;
    // What can be checked before a pool picks the CIDR is checked once, here.
    if let Source::Cidr(net) | Source::Pool { cidr: Some(net), .. } = &source {
        layout(net, &gateway, &pools)?;
        ipv6_modes(v6, &ra, &addr_mode, net)?;
        ipam::check_subnet_cidr(net, enable_dhcp, true)?;
    }

    let (n, _) = ctx.visible_network(&network_id)?;
    if !ctx.admin() && !ctx.owns(&n.project_id) && !ctx.owns(&project_id) {
        return Err(NeutronError::forbidden(
            "Creating a subnet on another project's network is not allowed",
        ));
    }
    if !ctx.admin() && !ctx.owns(&n.project_id) {
        return Err(NeutronError::forbidden(format!(
            "Adding a subnet to network {network_id} is not allowed by policy"
        )));
    }
    let id = new_id();
    let ts = now();
    let subnet = retry(ctx, |ctx| {
        let (qcmp, qops) = quota::check(ctx, "subnet", &project_id, 1, || {
            count_owned::<Subnet>(ctx, &project_id)
        })?;
        let (mut n, nrev) = ctx.visible_network(&network_id)?;
        if n.deleting {
            return Err(not_found::<Network>(&network_id));
        }
        let mut cmp = vec![];
        let mut ops = vec![];
        let (net, pool_id) = match &source {
            Source::Cidr(c) => (*c, None),
            Source::Pool { pool, cidr, prefixlen } => {
                let (net, c, o) = allocate_from_pool(ctx, pool, ip_version, &project_id, &id, *cidr, *prefixlen)?;
                cmp.extend(c);
                ops.extend(o);
                (net, Some(pool.clone()))
            }
        };
        let (gateway, pools) = layout(&net, &gateway, &pools)?;
        ipv6_modes(v6, &ra, &addr_mode, &net)?;
        ipam::check_subnet_cidr(&net, enable_dhcp, true)?;
        for (other, _) in ctx.all::<Subnet>() {
            if other.network_id != network_id {
                continue;
            }
            // Neutron keeps one pool (or none) per IP version on a network.
            if other.ip_version == ip_version && other.subnetpool_id != pool_id {
                return Err(NeutronError::new(
                    400,
                    "NetworkSubnetPoolAffinityError",
                    "Subnets hosted on the same network must be allocated from the same subnet pool.",
                ));
            }
            let Ok(o) = other.cidr.parse::<IpNet>() else { continue };
            if o.contains(&net.network()) || net.contains(&o.network()) {
                return Err(NeutronError::invalid_input(format!(
                    "Requested subnet with cidr: {net} for network: {network_id} overlaps with another subnet"
                )));
            }
        }
        let s = Subnet {
            id: id.clone(),
            project_id: project_id.clone(),
            network_id: network_id.clone(),
            name: name.clone(),
            ip_version,
            cidr: net.to_string(),
            gateway_ip: gateway.map(|g| g.to_string()),
            allocation_pools: pools,
            host_routes: routes.clone(),
            dns_nameservers: dns.clone(),
            enable_dhcp,
            ipv6_ra_mode: ra.clone(),
            ipv6_address_mode: addr_mode.clone(),
            subnetpool_id: pool_id,
            deleting: false,
            std: StandardAttrs {
                description: description.clone(),
                tags: tags.clone(),
                ..StandardAttrs::new(&ts)
            },
        };
        n.subnets.push(id.clone());
        n.std.bump(&ts);
        let nk = lookup::key::<Network>(&network_id);
        cmp.extend([Compare::ModRevision(nk.clone(), nrev), Compare::Absent(key(&id))]);
        ops.extend([Op::put(key(&id), json_bytes(&s)), Op::put(nk, json_bytes(&n))]);
        cmp.extend(qcmp);
        ops.extend(qops);
        Ok((cmp, ops, s))
    })
    .await?;
    tracing::info!(subnet = %subnet.id, network = %subnet.network_id, cidr = %subnet.cidr, subnetpool = ?subnet.subnetpool_id, "subnet created");
    Ok(subnet.to_api())
}

fn writable(ctx: &Ctx<'_>, id: &str) -> NResult<(Subnet, i64)> {
    let (s, r) = visible_subnet(ctx, id)?;
    if !ctx.admin() && !ctx.owns(&s.project_id) {
        return Err(NeutronError::forbidden(format!(
            "Modifying subnet {id} is not allowed by policy"
        )));
    }
    Ok((s, r))
}

async fn update(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    let (current, _) = writable(ctx, id)?;
    for ro in [
        "cidr",
        "ip_version",
        "network_id",
        "project_id",
        "tenant_id",
        "ipv6_ra_mode",
        "ipv6_address_mode",
        "subnetpool_id",
    ] {
        if body.contains(ro) {
            return Err(NeutronError::bad_request(format!(
                "Cannot update read-only attribute {ro}"
            )));
        }
    }
    let v6 = current.ip_version == 6;
    let net: IpNet = current
        .cidr
        .parse()
        .map_err(|_| NeutronError::internal(format!("stored subnet {id} has an invalid CIDR")))?;
    let name = body.string("name")?;
    let description = description_from(&mut body)?;
    let gateway = match body.opt_string("gateway_ip")? {
        None => None,
        Some(None) => Some(None),
        Some(Some(g)) => {
            let ip = parse_ip("gateway_ip", &g)?;
            check_gateway(&net, ip)?;
            Some(Some(ip))
        }
    };
    let pools = body.object_list("allocation_pools")?.map(parse_pools).transpose()?;
    let dns = body.string_list("dns_nameservers")?.map(parse_dns).transpose()?;
    let routes = body
        .object_list("host_routes")?
        .map(|r| parse_routes(r, v6))
        .transpose()?;
    let enable_dhcp = body.boolean("enable_dhcp")?;
    let tags = tags_from(ctx, &mut body)?;
    body.finish()?;
    let s = retry(ctx, |ctx| {
        let (mut s, rev) = writable(ctx, id)?;
        check_if_match(if_match, s.std.revision_number)?;
        if let Some(v) = &name {
            s.name = v.clone();
        }
        if let Some(v) = &description {
            s.std.description = v.clone();
        }
        let gw = match gateway {
            Some(g) => g,
            None => s.gateway_ip.as_deref().and_then(|g| g.parse().ok()),
        };
        if let Some(p) = &pools {
            ipam::validate_pools(&net, gw, p)?;
            s.allocation_pools = p.clone();
        } else if gateway.is_some() {
            ipam::validate_pools(&net, gw, &s.allocation_pools)?;
        }
        s.gateway_ip = gw.map(|g| g.to_string());
        if let Some(v) = &dns {
            s.dns_nameservers = v.clone();
        }
        if let Some(v) = &routes {
            s.host_routes = v.clone();
        }
        if let Some(v) = enable_dhcp {
            // Turning DHCP on brings its constraints on the CIDR, as in Neutron.
            if v && !s.enable_dhcp {
                ipam::check_subnet_cidr(&net, true, false)?;
            }
            s.enable_dhcp = v;
        }
        if let Some(v) = &tags {
            s.std.tags = v.clone();
        }
        s.deleting = false;
        s.std.bump(&now());
        Ok((
            vec![Compare::ModRevision(key(id), rev)],
            vec![Op::put(key(id), json_bytes(&s))],
            s,
        ))
    })
    .await?;
    Ok(s.to_api())
}

async fn delete(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    // Mark first (see networks::delete): port creates compare the subnet's revision.
    let (s, mark_rev) = retry_rev(ctx, |ctx| {
        let (mut s, rev) = writable(ctx, id)?;
        check_if_match(if_match, s.std.revision_number)?;
        s.deleting = true;
        Ok((
            vec![Compare::ModRevision(key(id), rev)],
            vec![Op::put(key(id), json_bytes(&s))],
            s,
        ))
    })
    .await?;
    // SLAAC addresses are derived, not handed out: like Neutron, deleting such a subnet takes
    // them off the ports instead of refusing.
    let auto = is_auto_address(&s);
    if !auto && !ctx.state.cache.list(&keys::ip_alloc_prefix(id)).is_empty() {
        let mut back = s.clone();
        back.deleting = false;
        if ctx
            .commit(
                vec![Compare::ModRevision(key(id), mark_rev)],
                vec![Op::put(key(id), json_bytes(&back))],
            )
            .await?
            .is_none()
        {
            tracing::warn!(subnet = %id, "could not clear the deleting mark");
        }
        return Err(NeutronError::conflict(
            "SubnetInUse",
            format!("Unable to complete operation on subnet {id}: One or more ports have an IP allocation from this subnet."),
        ));
    }
    let nk = lookup::key::<Network>(&s.network_id);
    for attempt in 0..30 {
        let mut cmp = vec![Compare::ModRevision(key(id), mark_rev)];
        let mut ops = vec![Op::delete(key(id))];
        if let Some(pool) = &s.subnetpool_id {
            ops.push(Op::delete(keys::pool_alloc(pool, &s.cidr)));
        }
        if auto {
            for (p, prev) in ctx.all::<Port>() {
                if !p.fixed_ips.iter().any(|f| f.subnet_id == id) {
                    continue;
                }
                let mut p = (*p).clone();
                for f in p.fixed_ips.iter().filter(|f| f.subnet_id == id) {
                    ops.push(Op::delete(keys::ip_alloc(id, &f.ip_address)));
                }
                p.fixed_ips.retain(|f| f.subnet_id != id);
                p.std.bump(&now());
                cmp.push(Compare::ModRevision(lookup::key::<Port>(&p.id), prev));
                ops.push(Op::put(lookup::key::<Port>(&p.id), json_bytes(&p)));
            }
        }
        if let Some((mut n, nrev)) = ctx.get::<Network>(&s.network_id) {
            n.subnets.retain(|x| x != id);
            n.std.bump(&now());
            cmp.push(Compare::ModRevision(nk.clone(), nrev));
            ops.push(Op::put(nk.clone(), json_bytes(&n)));
        }
        if ctx.commit(cmp, ops).await?.is_some() {
            tracing::info!(subnet = %id, "subnet deleted");
            return Ok(());
        }
        ctx.resync(attempt).await?;
        if ctx
            .state
            .cache
            .get(&key(id))
            .is_none_or(|kv| kv.mod_revision != mark_rev)
        {
            return Err(NeutronError::new(
                409,
                "Conflict",
                "The subnet changed while it was being deleted; retry",
            ));
        }
    }
    Err(NeutronError::new(
        409,
        "Conflict",
        "Too much concurrent change to this subnet's network; retry",
    ))
}
