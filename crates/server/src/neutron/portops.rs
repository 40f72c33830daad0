//! Port operations: fixed IPs and MACs (unique by store transaction), binding, port security,
//! address pairs. Used by the port resource, router interfaces and the node API.

use super::common::{
    check_if_match, count_owned, description_from, json_bytes, new_id, not_found, now, policy_denied, retry, tags_from,
    Ctx, NResult,
};
use super::default_sg::ensure_default;
use super::grants;
use super::lookup::{self, default_group_id, is_auto_address, visible_port};
use super::quota;
use ipnet::IpNet;
use isthmus_model::ipam;
use isthmus_model::validate::{is_uuid, Body};
use isthmus_model::{
    keys, AddressPair, ExtraDhcpOpt, FixedIp, FloatingIp, Network, NeutronError, Port, QosPolicy, Router,
    SecurityGroup, StandardAttrs, Subnet, Trunk,
};
use isthmus_store::{Compare, Op, Revision};
use rand::seq::SliceRandom;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

const VNIC_TYPES: &[&str] = &[
    "normal",
    "direct",
    "macvtap",
    "baremetal",
    "direct-physical",
    "virtio-forwarder",
    "smart-nic",
    "vdpa",
    "remote-managed",
];
/// Candidates drawn per allocation; a random pick among them keeps concurrent servers apart.
const CANDIDATES: usize = 16;

/// Addresses this server is trying to claim right now, so its own concurrent requests do not
/// race each other for the same address; and where the next free address probably is.
#[derive(Default)]
pub struct InFlight {
    keys: Mutex<HashSet<String>>,
    hints: Mutex<HashMap<String, u128>>,
}

impl InFlight {
    fn hint(&self, subnet_id: &str) -> u128 {
        self.hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(subnet_id)
            .copied()
            .unwrap_or(0)
    }
    fn set_hint(&self, subnet_id: &str, next: u128) {
        self.hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(subnet_id.to_string(), next);
    }
}

/// The in-flight keys one request holds; released when it ends, whatever the outcome.
pub struct Reservation<'a> {
    set: &'a InFlight,
    held: Vec<String>,
}

impl<'a> Reservation<'a> {
    pub fn new(set: &'a InFlight) -> Self {
        Self { set, held: vec![] }
    }
    fn contains(&self, key: &str) -> bool {
        self.set.keys.lock().unwrap_or_else(|p| p.into_inner()).contains(key)
    }
    fn take(&mut self, key: String) {
        self.set
            .keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        self.held.push(key);
    }
    pub fn release(&mut self) {
        let mut s = self.set.keys.lock().unwrap_or_else(|p| p.into_inner());
        for k in self.held.drain(..) {
            s.remove(&k);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// One requested address: a subnet, an address, or both.
#[derive(Debug, Clone)]
pub struct FixedReq {
    pub subnet_id: Option<String>,
    pub ip: Option<IpAddr>,
}

pub fn parse_fixed_ips(items: Vec<Map<String, Value>>) -> NResult<Vec<FixedReq>> {
    let mut out = vec![];
    for m in items {
        let mut b = Body::from_map(m);
        let subnet_id = b.string("subnet_id")?;
        let ip = b.string("ip_address")?;
        b.finish()?;
        let ip = match ip {
            Some(s) => Some(
                s.parse::<IpAddr>()
                    .map_err(|_| NeutronError::invalid_attr("fixed_ips", format!("'{s}' is not a valid IP address")))?,
            ),
            None => None,
        };
        if subnet_id.is_none() && ip.is_none() {
            return Err(NeutronError::invalid_attr(
                "fixed_ips",
                "each entry needs a subnet_id or an ip_address",
            ));
        }
        out.push(FixedReq { subnet_id, ip });
    }
    Ok(out)
}

fn parse_pairs(items: Vec<Map<String, Value>>, max: usize) -> NResult<Vec<(String, Option<String>)>> {
    // Counted before anything else, as Neutron does, so a huge list costs nothing more.
    if items.len() > max {
        return Err(NeutronError::new(
            400,
            "AllowedAddressPairExhausted",
            format!("The number of allowed address pair exceeds the maximum {max}."),
        ));
    }
    let mut out: Vec<(String, Option<String>)> = vec![];
    let mut seen: HashSet<(String, Option<String>)> = HashSet::new();
    for m in items {
        let mut b = Body::from_map(m);
        let ip = b.string("ip_address")?.ok_or_else(|| {
            NeutronError::new(
                400,
                "AllowedAddressPairsMissingIP",
                "AllowedAddressPair must contain ip_address",
            )
        })?;
        let mac = b.string("mac_address")?;
        b.finish()?;
        let ip_norm = if ip.contains('/') {
            ip.parse::<IpNet>().map(|n| n.to_string()).map_err(|_| {
                NeutronError::invalid_attr("allowed_address_pairs", format!("'{ip}' is not a valid IP address"))
            })?
        } else {
            ip.parse::<IpAddr>().map(|a| a.to_string()).map_err(|_| {
                NeutronError::invalid_attr("allowed_address_pairs", format!("'{ip}' is not a valid IP address"))
            })?
        };
        let mac = match mac {
            Some(m) => Some(ipam::normalize_mac(&m).ok_or_else(|| {
                NeutronError::invalid_attr("allowed_address_pairs", format!("'{m}' is not a valid MAC address"))
            })?),
            None => None,
        };
        if !seen.insert((ip_norm.clone(), mac.clone())) {
            return Err(NeutronError::new(
                400,
                "DuplicateAddressPairInRequest",
                format!("Request contains duplicate address pair: mac_address {mac:?} ip_address {ip_norm}."),
            ));
        }
        out.push((ip_norm, mac));
    }
    Ok(out)
}

/// Everything a port create or update may ask for, parsed and validated.
#[derive(Default)]
struct PortFields {
    name: Option<String>,
    description: Option<String>,
    admin_state_up: Option<bool>,
    mac: Option<String>,
    /// `mac_address: null`: a fresh MAC wanted.
    regen_mac: bool,
    fixed_ips: Option<Vec<FixedReq>>,
    device_id: Option<String>,
    device_owner: Option<String>,
    host_id: Option<String>,
    profile: Option<Value>,
    vnic_type: Option<String>,
    pairs: Option<Vec<(String, Option<String>)>>,
    port_security: Option<bool>,
    security_groups: Option<Vec<String>>,
    /// `extra_dhcp_opts` as asked: name, value (none: remove), IP version.
    dhcp_opts: Option<Vec<DhcpOptReq>>,
    dns_name: Option<String>,
    /// `Some(None)`: detach the port's policy.
    qos_policy_id: Option<Option<String>>,
    tags: Option<Vec<String>>,
}

/// One requested extra DHCP option; `value` none removes the option (on update).
#[derive(Debug, Clone, PartialEq)]
struct DhcpOptReq {
    name: String,
    value: Option<String>,
    ip_version: u8,
}

/// DHCPv6 option names the API accepts (stored and shown; DHCPv6 answers use `dns-server`).
const DHCPV6_NAMES: &[&str] = &[
    "dns-server",
    "domain-search",
    "ntp-server",
    "sntp-server",
    "bootfile-url",
    "bootfile-param",
    "information-refresh-time",
];

fn dhcp_opt_error(reason: impl Into<String>) -> NeutronError {
    NeutronError::new(
        400,
        "ExtraDhcpOptBadData",
        format!("Invalid data format for extra-dhcp-opt: {}.", reason.into()),
    )
}

/// Parses `extra_dhcp_opts` as Neutron's validator does: a list of dicts with a non-empty
/// `opt_name`, an `opt_value` (a non-empty string or null) and `ip_version` 4 or 6 (default
/// 4). Names must be options the server knows, and DHCPv4 values must encode.
fn parse_dhcp_opts(v: Value) -> NResult<Vec<DhcpOptReq>> {
    let items = match v {
        Value::Null => return Ok(vec![]),
        Value::Array(items) => items,
        other => return Err(dhcp_opt_error(format!("'{other}' is not a list"))),
    };
    let mut out: Vec<DhcpOptReq> = vec![];
    for item in items {
        let Value::Object(mut m) = item else {
            return Err(dhcp_opt_error(format!("'{item}' is not a dictionary")));
        };
        let name = match m.remove("opt_name") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            other => {
                return Err(dhcp_opt_error(format!(
                    "opt_name '{}' is not a non-empty string",
                    other.unwrap_or(Value::Null)
                )))
            }
        };
        let value = match m.remove("opt_value") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            Some(other) => {
                return Err(dhcp_opt_error(format!(
                    "opt_value '{other}' of {name} is not a non-empty string or null"
                )))
            }
        };
        let ip_version = match m.remove("ip_version") {
            None | Some(Value::Null) => 4,
            Some(Value::Number(n)) if n.as_u64() == Some(4) || n.as_u64() == Some(6) => n.as_u64().unwrap_or(4) as u8,
            Some(Value::String(s)) if s == "4" || s == "6" => s.parse().unwrap_or(4),
            Some(other) => return Err(dhcp_opt_error(format!("ip_version '{other}' is not in [4, 6]"))),
        };
        if let Some(k) = m.keys().next() {
            return Err(dhcp_opt_error(format!("unknown key '{k}'")));
        }
        if ip_version == 4 {
            if !isthmus_dhcp::opts::known(&name) {
                return Err(dhcp_opt_error(format!("'{name}' is not a known DHCP option")));
            }
            if let Some(v) = &value {
                // An IPv6 address under an IPv4 option name is stored as Neutron stores it (its
                // API does not look at values, and clients send these for IPv6 subnets); DHCPv4
                // cannot carry it, so the node's DHCP leaves it out.
                if v.parse::<std::net::Ipv6Addr>().is_err() {
                    isthmus_dhcp::opts::encode(&name, v).map_err(dhcp_opt_error)?;
                }
            }
        } else {
            let bare = name.strip_prefix("option6:").unwrap_or(&name);
            let numeric = bare.parse::<u16>().is_ok_and(|n| n > 0);
            if !numeric && !DHCPV6_NAMES.contains(&bare) {
                return Err(dhcp_opt_error(format!("'{name}' is not a known DHCPv6 option")));
            }
            if let Some(v) = value.as_deref().filter(|_| isthmus_dhcp::opts::is_dns_server_v6(&name)) {
                if isthmus_dhcp::opts::dns_servers_v6(v).is_none() {
                    return Err(dhcp_opt_error(format!(
                        "'{v}' is not a list of IPv6 addresses for {name}"
                    )));
                }
            }
        }
        if out.iter().any(|o| o.name == name && o.ip_version == ip_version) {
            return Err(dhcp_opt_error(format!("duplicate option {name} (IPv{ip_version})")));
        }
        out.push(DhcpOptReq {
            name,
            value,
            ip_version,
        });
    }
    Ok(out)
}

/// The port's options after a request: each asked-for option replaces the one with its name
/// and IP version, or removes it when its value is null.
fn merge_dhcp_opts(current: &[ExtraDhcpOpt], asked: &[DhcpOptReq]) -> Vec<ExtraDhcpOpt> {
    let mut out = current.to_vec();
    for a in asked {
        let at = out
            .iter()
            .position(|o| o.opt_name == a.name && o.ip_version == a.ip_version);
        match (&a.value, at) {
            (Some(v), Some(i)) => out[i].opt_value = v.clone(),
            (Some(v), None) => out.push(ExtraDhcpOpt {
                opt_name: a.name.clone(),
                opt_value: v.clone(),
                ip_version: a.ip_version,
            }),
            (None, Some(i)) => {
                out.remove(i);
            }
            (None, None) => {}
        }
    }
    out
}

fn parse_fields(ctx: &Ctx<'_>, body: &mut Body) -> NResult<PortFields> {
    let mut f = PortFields {
        name: body.string("name")?,
        description: description_from(body)?,
        admin_state_up: body.boolean("admin_state_up")?,
        ..Default::default()
    };
    match body.opt_string("mac_address")? {
        // `port-mac-address-regenerate`: null asks for a fresh MAC (on create: as if absent).
        Some(None) => f.regen_mac = true,
        Some(Some(m)) => {
            f.mac = Some(ipam::normalize_mac(&m).ok_or_else(|| {
                NeutronError::invalid_attr("mac_address", format!("'{m}' is not a valid MAC address"))
            })?)
        }
        None => {}
    }
    let limits = &ctx.state.config;
    if let Some(items) = body.object_list("fixed_ips")? {
        if items.len() > limits.max_fixed_ips_per_port {
            return Err(NeutronError::invalid_input(
                "Exceeded maximum amount of fixed ips per port.",
            ));
        }
        f.fixed_ips = Some(parse_fixed_ips(items)?);
    }
    f.device_id = body.string("device_id")?;
    f.device_owner = body.string("device_owner")?;
    f.host_id = body.string("binding:host_id")?;
    if let Some(p) = body.take_raw("binding:profile") {
        match p {
            Value::Object(_) => f.profile = Some(p),
            Value::Null => f.profile = Some(json!({})),
            other => {
                return Err(NeutronError::invalid_attr(
                    "binding:profile",
                    format!("'{other}' is not a dictionary"),
                ))
            }
        }
    }
    if (f.host_id.is_some() || f.profile.is_some()) && !ctx.admin() {
        return Err(NeutronError::forbidden(
            "Setting binding:host_id or binding:profile requires admin privileges",
        ));
    }
    if let Some(v) = body.string("binding:vnic_type")? {
        if !VNIC_TYPES.contains(&v.as_str()) {
            return Err(NeutronError::invalid_attr(
                "binding:vnic_type",
                format!("'{v}' is not in {VNIC_TYPES:?}"),
            ));
        }
        f.vnic_type = Some(v);
    }
    f.pairs = body
        .object_list("allowed_address_pairs")?
        .map(|items| parse_pairs(items, limits.max_allowed_address_pair))
        .transpose()?;
    f.port_security = body.boolean("port_security_enabled")?;
    if let Some(v) = body.take_raw("security_groups") {
        f.security_groups = Some(match v {
            Value::Null => vec![],
            Value::Array(items) => {
                let mut ids: Vec<String> = vec![];
                let mut seen: HashSet<String> = HashSet::new();
                for i in items {
                    let s = i.as_str().ok_or_else(|| {
                        NeutronError::invalid_attr("security_groups", format!("'{i}' is not a valid UUID"))
                    })?;
                    // Neutron's uuid_list validator refuses duplicates.
                    if !seen.insert(s.to_string()) {
                        return Err(NeutronError::invalid_attr(
                            "security_groups",
                            format!("Duplicate items in the list: '{s}'"),
                        ));
                    }
                    ids.push(s.to_string());
                }
                ids
            }
            other => {
                return Err(NeutronError::invalid_attr(
                    "security_groups",
                    format!("'{other}' is not a list"),
                ))
            }
        });
    }
    if let Some(v) = body.take_raw("extra_dhcp_opts") {
        f.dhcp_opts = Some(parse_dhcp_opts(v)?);
    }
    if let Some(v) = body.opt_string("dns_name")? {
        let v = v.unwrap_or_default();
        isthmus_model::validate::dns_name(&v).map_err(|m| NeutronError::invalid_attr("dns_name", m))?;
        f.dns_name = Some(v);
    }
    f.qos_policy_id = lookup::qos_policy_from(body)?;
    f.tags = tags_from(ctx, body)?;
    Ok(f)
}

/// The outcome of planning addresses for a port.
struct IpPlan {
    fixed_ips: Vec<FixedIp>,
    /// Addresses this write claims (not held by the port before).
    claimed: Vec<FixedIp>,
    /// Subnets that gain an address, with the revision they were read at.
    subnets: Vec<(String, Revision)>,
}

fn generation_failure(network_id: &str) -> NeutronError {
    NeutronError::conflict(
        "IpAddressGenerationFailure",
        format!("No more IP addresses available on network {network_id}."),
    )
}

/// Plans the port's addresses from the cache. `held` are the port's current addresses (update).
fn plan_ips(
    ctx: &Ctx<'_>,
    network_id: &str,
    port_id: &str,
    mac: &str,
    requested: Option<&[FixedReq]>,
    held: &[FixedIp],
    res: &mut Reservation<'_>,
) -> NResult<IpPlan> {
    let subnets: Vec<(Arc<Subnet>, Revision)> = ctx
        .all::<Subnet>()
        .into_iter()
        .filter(|(s, _)| s.network_id == network_id)
        .collect();
    let mut plan = IpPlan {
        fixed_ips: vec![],
        claimed: vec![],
        subnets: vec![],
    };
    let mut chosen: HashSet<(String, String)> = HashSet::new();

    let mut claim =
        |plan: &mut IpPlan, s: &Subnet, rev: Revision, ip: IpAddr, res: &mut Reservation<'_>| -> NResult<()> {
            let ip_s = ip.to_string();
            if !chosen.insert((s.id.clone(), ip_s.clone())) {
                return Err(NeutronError::invalid_input(format!("Duplicate IP address '{ip_s}'")));
            }
            let fip = FixedIp {
                subnet_id: s.id.clone(),
                ip_address: ip_s,
            };
            if !held.contains(&fip) {
                if s.deleting {
                    return Err(not_found::<Subnet>(&s.id));
                }
                res.take(keys::ip_alloc(&s.id, &fip.ip_address));
                plan.claimed.push(fip.clone());
                if !plan.subnets.iter().any(|(id, _)| *id == s.id) {
                    plan.subnets.push((s.id.clone(), rev));
                }
            }
            plan.fixed_ips.push(fip);
            Ok(())
        };

    // A free address from the subnet's pools, avoiding what is allocated, in flight, or
    // already picked by this plan.
    // A free address from the subnet's pools, avoiding what is allocated, in flight, or
    // already picked by this plan. The scan starts after this server's last pick on the subnet.
    let pick = |s: &Subnet, res: &Reservation<'_>, taken: &HashSet<(String, String)>| -> Option<IpAddr> {
        let start = ctx.state.neutron.inflight.hint(&s.id);
        let cands = ipam::free_candidates_from(&s.allocation_pools, start, CANDIDATES, |ip| {
            let ip_s = ip.to_string();
            let k = keys::ip_alloc(&s.id, &ip_s);
            ctx.state.cache.contains(&k) || res.contains(&k) || taken.contains(&(s.id.clone(), ip_s))
        });
        let ip = cands.choose(&mut rand::thread_rng()).copied()?;
        ctx.state.neutron.inflight.set_hint(&s.id, ipam::to_u128(ip) + 1);
        Some(ip)
    };

    match requested {
        None => {
            // Neutron's default: one IPv4 address, one stateful IPv6 address, and a SLAAC
            // address on every auto-addressed IPv6 subnet.
            let mut v4_tried = false;
            let mut v4_done = false;
            let mut v6_done = false;
            for (s, rev) in &subnets {
                if s.deleting {
                    continue;
                }
                if is_auto_address(s) {
                    let net: IpNet = s
                        .cidr
                        .parse()
                        .map_err(|_| NeutronError::internal("stored subnet has an invalid CIDR"))?;
                    if let Some(ip) = ipam::eui64(&net, mac) {
                        claim(&mut plan, s, *rev, ip, res)?;
                    }
                    continue;
                }
                let done = if s.ip_version == 4 { &mut v4_done } else { &mut v6_done };
                if *done {
                    continue;
                }
                if s.ip_version == 4 {
                    v4_tried = true;
                }
                let taken: HashSet<(String, String)> = plan
                    .fixed_ips
                    .iter()
                    .map(|f| (f.subnet_id.clone(), f.ip_address.clone()))
                    .collect();
                if let Some(ip) = pick(s, res, &taken) {
                    claim(&mut plan, s, *rev, ip, res)?;
                    *done = true;
                }
            }
            if v4_tried && !v4_done {
                return Err(generation_failure(network_id));
            }
        }
        Some(reqs) => {
            for r in reqs {
                let (s, rev) = match (&r.subnet_id, r.ip) {
                    (Some(sid), _) => subnets.iter().find(|(s, _)| s.id == *sid).cloned().ok_or_else(|| {
                        // A subnet the caller cannot see answers as one that does not exist, so
                        // the error does not reveal other projects' subnets.
                        let visible = ctx.get::<Subnet>(sid).is_some_and(|(s, _)| ctx.subnet_visible(&s));
                        if is_uuid(sid) && !visible {
                            not_found::<Subnet>(sid)
                        } else {
                            NeutronError::invalid_input(format!(
                                "Failed to create port on network {network_id}, because fixed_ips included invalid subnet {sid}"
                            ))
                        }
                    })?,
                    (None, Some(ip)) => subnets
                        .iter()
                        .find(|(s, _)| s.cidr.parse::<IpNet>().is_ok_and(|n| n.contains(&ip)))
                        .cloned()
                        .ok_or_else(|| {
                            NeutronError::new(400, "InvalidIpForNetwork", format!("IP address {ip} is not a valid IP for any of the subnets on the specified network."))
                        })?,
                    (None, None) => {
                        return Err(NeutronError::invalid_attr("fixed_ips", "each entry needs a subnet_id or an ip_address"))
                    }
                };
                let net: IpNet = s
                    .cidr
                    .parse()
                    .map_err(|_| NeutronError::internal("stored subnet has an invalid CIDR"))?;
                match r.ip {
                    Some(ip) => {
                        let (first, last) = ipam::bounds(&net);
                        let v = ipam::to_u128(ip);
                        let edge = s.ip_version == 4 && last > first + 1 && (v == first || v == last);
                        if !net.contains(&ip) || edge {
                            return Err(NeutronError::new(
                                400,
                                "InvalidIpForSubnet",
                                format!("IP address {ip} is not a valid IP for the specified subnet."),
                            ));
                        }
                        let fip = FixedIp {
                            subnet_id: s.id.clone(),
                            ip_address: ip.to_string(),
                        };
                        if !held.contains(&fip) {
                            if let Some(owner) = ctx.state.cache.get(&keys::ip_alloc(&s.id, &fip.ip_address)) {
                                if owner.value != port_id.as_bytes() {
                                    return Err(NeutronError::conflict(
                                        "IpAddressAlreadyAllocated",
                                        format!("IP address {ip} already allocated in subnet {}", s.id),
                                    ));
                                }
                            }
                        }
                        claim(&mut plan, &s, rev, ip, res)?;
                    }
                    None if is_auto_address(&s) => {
                        let ip = ipam::eui64(&net, mac)
                            .ok_or_else(|| NeutronError::internal("cannot derive a SLAAC address"))?;
                        claim(&mut plan, &s, rev, ip, res)?;
                    }
                    None => {
                        // Keep an address the port already has on this subnet, if still unused here.
                        let keep = held
                            .iter()
                            .find(|h| h.subnet_id == s.id && !plan.fixed_ips.iter().any(|f| f == *h));
                        let ip = match keep {
                            Some(h) => h
                                .ip_address
                                .parse()
                                .map_err(|_| NeutronError::internal("stored port has an invalid IP"))?,
                            None => {
                                let taken: HashSet<(String, String)> = plan
                                    .fixed_ips
                                    .iter()
                                    .map(|f| (f.subnet_id.clone(), f.ip_address.clone()))
                                    .collect();
                                pick(&s, res, &taken).ok_or_else(|| generation_failure(network_id))?
                            }
                        };
                        claim(&mut plan, &s, rev, ip, res)?;
                    }
                }
            }
        }
    }
    Ok(plan)
}

fn key(id: &str) -> String {
    lookup::key::<Port>(id)
}

/// Validates security group ids for a port of `project_id`.
fn check_groups(ctx: &Ctx<'_>, project_id: &str, ids: &[String]) -> NResult<()> {
    for id in ids {
        match lookup::group(ctx, id) {
            // A group shared with the port's project (rbac-security-groups) is usable too.
            Some((g, _)) if ctx.admin() || ctx.owns(&g.project_id) || grants::group_usable(ctx, &g, project_id) => {}
            _ => return Err(not_found::<SecurityGroup>(id)),
        }
    }
    Ok(())
}

fn apply_pairs(pairs: &[(String, Option<String>)], mac: &str) -> Vec<AddressPair> {
    pairs
        .iter()
        .map(|(ip, m)| AddressPair {
            ip_address: ip.clone(),
            mac_address: m.clone().unwrap_or_else(|| mac.to_string()),
        })
        .collect()
}

fn security_conflicts(port_security: bool, groups: &[String], pairs: &[AddressPair]) -> NResult<()> {
    if !port_security && !groups.is_empty() {
        return Err(NeutronError::conflict(
            "PortSecurityAndIPRequiredForSecurityGroups",
            "Port security must be enabled and port must have an IP address in order to use security groups.",
        ));
    }
    if !port_security && !pairs.is_empty() {
        return Err(NeutronError::conflict(
            "AddressPairAndPortSecurityRequired",
            "Port Security must be enabled in order to have allowed address pairs on a port.",
        ));
    }
    Ok(())
}

/// Until a node agent binds the port, Neutron's word for its VIF type is "unbound".
const VIF_UNBOUND: &str = "unbound";

/// Neutron's attribute policies on ports (neutron/conf/policies/port.py): only an admin or a
/// member of the network's project may pick a port's addresses (`fixed_ips` with
/// `ip_address`; a `subnet_id` alone is fine on a shared network), its MAC, address pairs or
/// port security, or give it a `network:*` owner. Otherwise a project on someone else's
/// shared network could take the gateway's address or turn off spoofing protection.
/// `action` is `create_port` or `update_port`; a MAC change on update is admin-only and
/// checked by the update itself.
fn check_attributes(ctx: &Ctx<'_>, action: &str, network_project: &str, f: &PortFields) -> NResult<()> {
    if ctx.net_owner_member(network_project) {
        return Ok(());
    }
    let deny = |attr: &str| Err(policy_denied(&format!("(rule:{action} and rule:{action}:{attr})")));
    if f.fixed_ips
        .as_ref()
        .is_some_and(|ips| ips.iter().any(|r| r.ip.is_some()))
    {
        return deny("fixed_ips:ip_address");
    }
    if f.mac.is_some() && action == "create_port" {
        return deny("mac_address");
    }
    if f.pairs.is_some() {
        return deny("allowed_address_pairs");
    }
    if f.port_security.is_some() {
        return deny("port_security_enabled");
    }
    if f.device_owner.as_deref().is_some_and(|o| o.starts_with("network:")) {
        return deny("device_owner");
    }
    Ok(())
}

/// Owners that make a port part of a router (neutron-lib's `ROUTER_INTERFACE_OWNERS` and the
/// HA interface): its `device_id` must name a router of the port's own project.
const ROUTER_INTERFACE_OWNERS: &[&str] = &[
    "network:router_interface",
    "network:router_interface_distributed",
    "network:ha_router_replicated_interface",
    "network:router_ha_interface",
];

/// Owners of ports that only the L3 API may delete (Neutron's `prevent_l3_port_deletion`).
const L3_OWNERS: &[&str] = &[
    "network:router_interface",
    "network:router_interface_distributed",
    "network:ha_router_replicated_interface",
    "network:router_ha_interface",
    "network:router_gateway",
    "network:router_centralized_snat",
    "network:floatingip",
];

/// Neutron's `_enforce_device_owner_not_router_intf_or_device_id`: a non-admin may not make a
/// port a router interface of another project's router, which would keep that router from
/// being deleted. A device id that names no router is left alone, as in Neutron.
pub fn check_router_device(ctx: &Ctx<'_>, owner: &str, device_id: &str, port_project: &str) -> NResult<()> {
    if ctx.admin() || device_id.is_empty() || !ROUTER_INTERFACE_OWNERS.contains(&owner) {
        return Ok(());
    }
    match ctx.get::<Router>(device_id) {
        Some((r, _)) if r.project_id != port_project => Err(NeutronError::conflict(
            "DeviceIDNotOwnedByTenant",
            format!(
                "The following device_id {device_id} is not owned by your tenant or matches another tenants router."
            ),
        )),
        _ => Ok(()),
    }
}

/// Neutron's `prevent_l3_port_deletion`, for everyone (admins too): a router's port goes
/// through the router API, a floating IP's through the floating IP API. A port without
/// addresses, or whose router or floating IP no longer exists, is stale and may go.
fn check_l3_deletion(ctx: &Ctx<'_>, p: &Port) -> NResult<()> {
    if !L3_OWNERS.contains(&p.device_owner.as_str()) || p.fixed_ips.is_empty() {
        return Ok(());
    }
    let owner_exists = if p.device_owner == lookup::FLOATINGIP_OWNER {
        ctx.get::<FloatingIp>(&p.device_id).is_some()
    } else {
        ctx.get::<Router>(&p.device_id).is_some()
    };
    if !owner_exists {
        return Ok(());
    }
    Err(NeutronError::conflict(
        "ServicePortInUse",
        format!(
            "Port {} cannot be deleted directly via the port API: has device owner {}.",
            p.id, p.device_owner
        ),
    ))
}

/// A port created through the Neutron API, under the caller's policy.
pub async fn create(ctx: &Ctx<'_>, body: Body) -> NResult<Port> {
    create_port(ctx, body, None, true).await
}

/// A port the server makes on the caller's behalf (a router interface on the gateway
/// address), as Neutron's plugins do with an elevated context: attribute policy is the
/// calling operation's business.
pub async fn create_internal(ctx: &Ctx<'_>, body: Body) -> NResult<Port> {
    create_port(ctx, body, None, false).await
}

/// A port a node creates for itself (the node API): bound to `host` from the start, with the
/// binding profile the node gives. The caller's context is the owning project's.
pub struct NodeBinding {
    pub host: String,
    pub profile: Value,
}

pub async fn create_bound(ctx: &Ctx<'_>, body: Body, node: NodeBinding) -> NResult<Port> {
    create_port(ctx, body, Some(node), true).await
}

async fn create_port(ctx: &Ctx<'_>, body: Body, node: Option<NodeBinding>, checked: bool) -> NResult<Port> {
    let mut new = NewPort::prepare(ctx, body, node, checked).await?;
    let port = retry(ctx, |ctx| {
        let (cmp, mut ops, port) = new.plan(ctx)?;
        ops.insert(0, put_op(&port));
        Ok((cmp, ops, port))
    })
    .await?;
    drop(new);
    tracing::debug!(port = %port.id, network = %port.network_id, mac = %port.mac_address, "port created");
    Ok(port)
}

/// A port create, validated, planned from the cache on each attempt: alone (a Neutron port
/// create) or inside another write's transaction (a nested container's port and its trunk).
pub struct NewPort<'r> {
    id: String,
    ts: String,
    project_id: String,
    network_id: String,
    status: Option<String>,
    f: PortFields,
    node: Option<NodeBinding>,
    checked: bool,
    port_security: bool,
    res: Reservation<'r>,
}

/// The write of port `p` itself.
pub fn put_op(p: &Port) -> Op {
    Op::put(key(&p.id), json_bytes(p))
}

impl<'r> NewPort<'r> {
    /// Validates the body under the caller's policy (`checked`: Neutron's attribute policy and
    /// quota) and makes sure the project's default security group exists.
    pub async fn prepare(ctx: &Ctx<'r>, mut body: Body, node: Option<NodeBinding>, checked: bool) -> NResult<Self> {
        let project_id = ctx.target_project(&mut body)?;
        let network_id = body.string("network_id")?.ok_or_else(|| {
            NeutronError::bad_request("Failed to parse request. Required attribute 'network_id' not specified")
        })?;
        if body.contains("status") && !ctx.admin() {
            return Err(NeutronError::forbidden("Setting status requires admin privileges"));
        }
        let status = body.string("status")?;
        let f = parse_fields(ctx, &mut body)?;
        body.finish()?;
        let (net, _) = ctx.visible_network(&network_id)?;
        if !ctx.admin() && !ctx.owns(&net.project_id) && !ctx.network_shared_with_me(&net) {
            return Err(not_found::<Network>(&network_id));
        }
        if checked {
            check_attributes(ctx, "create_port", &net.project_id, &f)?;
        }
        check_router_device(
            ctx,
            f.device_owner.as_deref().unwrap_or_default(),
            f.device_id.as_deref().unwrap_or_default(),
            &project_id,
        )?;
        let port_security = f.port_security.unwrap_or(net.port_security_enabled);
        if f.security_groups.is_none() && port_security {
            ensure_default(ctx, &project_id).await?;
        }
        Ok(NewPort {
            id: new_id(),
            ts: now(),
            project_id,
            network_id,
            status,
            f,
            node,
            checked,
            port_security,
            res: Reservation::new(&ctx.state.neutron.inflight),
        })
    }

    /// The port, and what creating it compares and writes except the port's own key
    /// ([`put_op`]), so the caller may still change the port. Call again after a lost race.
    pub fn plan(&mut self, ctx: &Ctx<'_>) -> NResult<(Vec<Compare>, Vec<Op>, Port)> {
        let (id, ts) = (self.id.clone(), self.ts.clone());
        let (project_id, network_id) = (self.project_id.clone(), self.network_id.clone());
        let (checked, port_security) = (self.checked, self.port_security);
        let NewPort {
            status, f, node, res, ..
        } = self;
        res.release();
        // Ports the server makes for an operation (router interfaces) count, unchecked, as in
        // Neutron, where quotas are checked at the API.
        let (qcmp, qops) = if checked {
            quota::check(ctx, "port", &project_id, 1, || count_owned::<Port>(ctx, &project_id))?
        } else {
            (vec![], vec![])
        };
        let (net, nrev) = ctx.visible_network(&network_id)?;
        if net.deleting {
            return Err(not_found::<Network>(&network_id));
        }
        let mac = match &f.mac {
            Some(m) => {
                if ctx.state.cache.contains(&keys::mac_alloc(&network_id, m)) {
                    return Err(NeutronError::conflict(
                        "MacAddressInUse",
                        format!(
                            "Unable to complete operation for network {network_id}. The mac address {m} is in use."
                        ),
                    ));
                }
                m.clone()
            }
            None => {
                let mut rng = rand::thread_rng();
                let mut m = ipam::random_mac(&mut rng);
                while ctx.state.cache.contains(&keys::mac_alloc(&network_id, &m)) {
                    m = ipam::random_mac(&mut rng);
                }
                m
            }
        };
        let ips = plan_ips(ctx, &network_id, &id, &mac, f.fixed_ips.as_deref(), &[], res)?;
        let groups = match &f.security_groups {
            Some(g) => g.clone(),
            None if port_security => default_group_id(ctx, &project_id).into_iter().collect(),
            None => vec![],
        };
        check_groups(ctx, &project_id, &groups)?;
        let pairs = apply_pairs(f.pairs.as_deref().unwrap_or(&[]), &mac);
        security_conflicts(port_security, &groups, &pairs)?;
        let host = match &node {
            Some(n) => n.host.clone(),
            None => f.host_id.clone().unwrap_or_default(),
        };
        let profile = match &node {
            Some(n) => n.profile.clone(),
            None => f.profile.clone().unwrap_or_else(|| json!({})),
        };
        let port = Port {
            id: id.clone(),
            project_id: project_id.clone(),
            network_id: network_id.clone(),
            name: f.name.clone().unwrap_or_default(),
            admin_state_up: f.admin_state_up.unwrap_or(true),
            mac_address: mac.clone(),
            fixed_ips: ips.fixed_ips,
            device_id: f.device_id.clone().unwrap_or_default(),
            device_owner: f.device_owner.clone().unwrap_or_default(),
            status: status.clone().unwrap_or_else(|| "DOWN".into()),
            binding_vif_type: VIF_UNBOUND.into(),
            binding_host_id: host,
            binding_vif_details: json!({}),
            binding_profile: profile,
            binding_vnic_type: f.vnic_type.clone().unwrap_or_else(|| "normal".into()),
            allowed_address_pairs: pairs,
            port_security_enabled: port_security,
            security_groups: groups,
            extra_dhcp_opts: merge_dhcp_opts(&[], f.dhcp_opts.as_deref().unwrap_or(&[])),
            dns_name: f.dns_name.clone().unwrap_or_default(),
            qos_policy_id: f.qos_policy_id.clone().flatten(),
            subport_of: None,
            std: StandardAttrs {
                description: f.description.clone().unwrap_or_default(),
                tags: f.tags.clone().unwrap_or_default(),
                ..StandardAttrs::new(&ts)
            },
        };
        let mut cmp = vec![
            Compare::Absent(key(&id)),
            Compare::ModRevision(lookup::key::<Network>(&network_id), nrev),
            Compare::Absent(keys::mac_alloc(&network_id, &mac)),
        ];
        let mut ops = vec![Op::put(keys::mac_alloc(&network_id, &mac), id.clone())];
        for (sid, srev) in &ips.subnets {
            cmp.push(Compare::ModRevision(lookup::key::<Subnet>(sid), *srev));
        }
        for c in &ips.claimed {
            let k = keys::ip_alloc(&c.subnet_id, &c.ip_address);
            cmp.push(Compare::Absent(k.clone()));
            ops.push(Op::put(k, id.clone()));
        }
        cmp.extend(qcmp);
        ops.extend(qops);
        if let Some(q) = &port.qos_policy_id {
            // Compared, so a policy delete cannot miss this port.
            let (_, qrev) = lookup::attachable_policy(ctx, q)?;
            cmp.push(Compare::ModRevision(lookup::key::<QosPolicy>(q), qrev));
        }
        Ok((cmp, ops, port))
    }
}

fn writable(ctx: &Ctx<'_>, id: &str) -> NResult<(Port, Revision)> {
    visible_port(ctx, id)
}

/// A port update through the Neutron API: only the port's own project (or an admin) may
/// change it; the network's owner sees it but gets 403, as from Neutron.
pub async fn update(ctx: &Ctx<'_>, id: &str, body: Body, if_match: Option<u64>) -> NResult<Port> {
    update_port(ctx, id, body, if_match, true).await
}

/// An update the server makes on the caller's behalf (attaching a router interface).
pub async fn update_internal(ctx: &Ctx<'_>, id: &str, body: Body) -> NResult<Port> {
    update_port(ctx, id, body, None, false).await
}

async fn update_port(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>, checked: bool) -> NResult<Port> {
    let (current, _) = writable(ctx, id)?;
    if checked && !ctx.admin() && !(ctx.member() && ctx.owns(&current.project_id)) {
        return Err(policy_denied("rule:update_port"));
    }
    for ro in ["network_id", "project_id", "tenant_id"] {
        if body.contains(ro) {
            return Err(NeutronError::bad_request(format!(
                "Cannot update read-only attribute {ro}"
            )));
        }
    }
    let status = body.string("status")?;
    if status.is_some() && !ctx.admin() {
        return Err(NeutronError::forbidden("Setting status requires admin privileges"));
    }
    let f = parse_fields(ctx, &mut body)?;
    body.finish()?;
    if checked {
        let net_project = ctx
            .get::<Network>(&current.network_id)
            .map(|(n, _)| n.project_id)
            .unwrap_or_default();
        check_attributes(ctx, "update_port", &net_project, &f)?;
    }
    let mac_change = f.regen_mac || f.mac.as_deref().is_some_and(|m| m != current.mac_address);
    if mac_change && !ctx.admin() {
        return Err(policy_denied("(rule:update_port and rule:update_port:mac_address)"));
    }
    let mut res = Reservation::new(&ctx.state.neutron.inflight);
    retry(ctx, |ctx| {
        res.release();
        let (mut p, rev) = writable(ctx, id)?;
        check_if_match(if_match, p.std.revision_number)?;
        // As Neutron's _validate_port_for_update: any change of owner, or of device with an
        // owner set, is checked against the port's project (from the port read in this plan).
        let owner = f.device_owner.as_deref().filter(|o| !o.is_empty()).unwrap_or(&p.device_owner);
        let device = f.device_id.as_deref().filter(|d| !d.is_empty()).unwrap_or(&p.device_id);
        let device_changed = f.device_id.as_ref().is_some_and(|d| *d != p.device_id);
        if (!owner.is_empty() && device_changed) || f.device_owner.is_some() {
            check_router_device(ctx, owner, device, &p.project_id)?;
        }
        let mut cmp = vec![Compare::ModRevision(key(id), rev)];
        let mut ops = vec![];
        if f.regen_mac || f.mac.as_deref().is_some_and(|m| m != p.mac_address) {
            // As ML2: a bound port's MAC is in use by its host; it changes only unbound.
            if !matches!(p.binding_vif_type.as_str(), "" | "unbound" | "binding_failed") {
                return Err(NeutronError::conflict(
                    "PortBound",
                    format!(
                        "Unable to complete operation on port {id}, port is already bound, port type: {}, old_mac {}, new_mac {}.",
                        p.binding_vif_type,
                        p.mac_address,
                        f.mac.as_deref().unwrap_or("None")
                    ),
                ));
            }
        }
        let new_mac = match &f.mac {
            Some(m) => Some(m.clone()),
            None if f.regen_mac => {
                let mut rng = rand::thread_rng();
                let mut m = ipam::random_mac(&mut rng);
                while ctx.state.cache.contains(&keys::mac_alloc(&p.network_id, &m)) || m == p.mac_address {
                    m = ipam::random_mac(&mut rng);
                }
                Some(m)
            }
            None => None,
        };
        if let Some(m) = &new_mac {
            if *m != p.mac_address {
                let mk = keys::mac_alloc(&p.network_id, m);
                if ctx.state.cache.contains(&mk) {
                    return Err(NeutronError::conflict("MacAddressInUse", format!("Unable to complete operation for network {}. The mac address {m} is in use.", p.network_id)));
                }
                cmp.push(Compare::Absent(mk.clone()));
                ops.push(Op::put(mk, id.to_string()));
                ops.push(Op::delete(keys::mac_alloc(&p.network_id, &p.mac_address)));
                p.mac_address = m.clone();
            }
        }
        if let Some(reqs) = &f.fixed_ips {
            let (net, nrev) = ctx
                .get::<Network>(&p.network_id)
                .ok_or_else(|| not_found::<Network>(&p.network_id))?;
            let ips = plan_ips(ctx, &net.id, id, &p.mac_address, Some(reqs), &p.fixed_ips, &mut res)?;
            cmp.push(Compare::ModRevision(lookup::key::<Network>(&net.id), nrev));
            for (sid, srev) in &ips.subnets {
                cmp.push(Compare::ModRevision(lookup::key::<Subnet>(sid), *srev));
            }
            for c in &ips.claimed {
                let k = keys::ip_alloc(&c.subnet_id, &c.ip_address);
                cmp.push(Compare::Absent(k.clone()));
                ops.push(Op::put(k, id.to_string()));
            }
            for old in &p.fixed_ips {
                if !ips.fixed_ips.contains(old) {
                    ops.push(Op::delete(keys::ip_alloc(&old.subnet_id, &old.ip_address)));
                }
            }
            // A floating IP on an address the port gives up is disassociated.
            disassociate(ctx, id, &ips.fixed_ips, &mut cmp, &mut ops);
            p.fixed_ips = ips.fixed_ips;
        }
        if let Some(v) = &f.name {
            p.name = v.clone();
        }
        if let Some(v) = &f.description {
            p.std.description = v.clone();
        }
        if let Some(v) = f.admin_state_up {
            p.admin_state_up = v;
        }
        if let Some(v) = &f.device_id {
            p.device_id = v.clone();
        }
        if let Some(v) = &f.device_owner {
            p.device_owner = v.clone();
        }
        if let Some(v) = &f.host_id {
            if *v != p.binding_host_id {
                move_subports(ctx, id, v, &mut cmp, &mut ops);
            }
            p.binding_host_id = v.clone();
            p.binding_vif_type = VIF_UNBOUND.into();
        }
        if let Some(v) = &f.profile {
            p.binding_profile = v.clone();
        }
        if let Some(v) = &f.vnic_type {
            p.binding_vnic_type = v.clone();
        }
        if let Some(v) = &status {
            p.status = v.clone();
        }
        if let Some(v) = &f.security_groups {
            check_groups(ctx, &p.project_id, v)?;
            p.security_groups = v.clone();
        }
        if let Some(v) = f.port_security {
            if !v && f.security_groups.is_none() && !p.security_groups.is_empty() {
                return Err(NeutronError::conflict(
                    "PortSecurityPortHasSecurityGroup",
                    "Port has security group associated. Cannot disable port security or ip address until security group is removed",
                ));
            }
            p.port_security_enabled = v;
        }
        if let Some(pairs) = &f.pairs {
            p.allowed_address_pairs = apply_pairs(pairs, &p.mac_address);
        }
        security_conflicts(p.port_security_enabled, &p.security_groups, &p.allowed_address_pairs)?;
        if let Some(v) = &f.dhcp_opts {
            p.extra_dhcp_opts = merge_dhcp_opts(&p.extra_dhcp_opts, v);
        }
        if let Some(v) = &f.dns_name {
            p.dns_name = v.clone();
        }
        if let Some(v) = &f.qos_policy_id {
            if let Some(q) = v {
                let (_, qrev) = lookup::attachable_policy(ctx, q)?;
                cmp.push(Compare::ModRevision(lookup::key::<QosPolicy>(q), qrev));
            }
            p.qos_policy_id = v.clone();
        }
        if let Some(v) = &f.tags {
            p.std.tags = v.clone();
        }
        p.std.bump(&now());
        ops.insert(0, Op::put(key(id), json_bytes(&p)));
        Ok((cmp, ops, p))
    })
    .await
}

/// `DELETE /v2.0/ports/{id}` (and a node deleting its own ports): router and floating IP
/// ports refused (the L3 API removes those with [`delete_ops`], in its own transactions).
pub async fn delete(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    retry(ctx, |ctx| {
        let (p, rev) = writable(ctx, id)?;
        check_if_match(if_match, p.std.revision_number)?;
        check_l3_deletion(ctx, &p)?;
        super::trunks::check_port_deletion(ctx, id)?;
        let mut cmp = vec![Compare::ModRevision(key(id), rev), super::trunks::not_trunked(id)];
        let mut ops = delete_ops(&p);
        super::trunks::plan_nested_port_gone(ctx, &p, &mut cmp, &mut ops);
        // Its floating IPs stay, disassociated, as Neutron leaves them.
        disassociate(ctx, id, &[], &mut cmp, &mut ops);
        Ok((cmp, ops, ()))
    })
    .await?;
    tracing::debug!(port = %id, "port deleted");
    Ok(())
}

/// Plans deleting port `id` inside another write (a nested container's attachment): its
/// floating IPs disassociated; its trunk membership is the caller's business.
pub fn plan_delete(ctx: &Ctx<'_>, id: &str, cmp: &mut Vec<Compare>, ops: &mut Vec<Op>) -> NResult<Port> {
    let (p, rev) = writable(ctx, id)?;
    check_l3_deletion(ctx, &p)?;
    cmp.push(Compare::ModRevision(key(id), rev));
    ops.extend(delete_ops(&p));
    disassociate(ctx, id, &[], cmp, ops);
    Ok(p)
}

/// What deleting port `p` writes: the port gone, its MAC and addresses free.
pub fn delete_ops(p: &Port) -> Vec<Op> {
    let mut ops = vec![
        Op::delete(key(&p.id)),
        Op::delete(keys::mac_alloc(&p.network_id, &p.mac_address)),
    ];
    for f in &p.fixed_ips {
        ops.push(Op::delete(keys::ip_alloc(&f.subnet_id, &f.ip_address)));
    }
    ops
}

/// A port the L3 API owns (a router gateway, a floating IP's address), planned but not
/// written: the caller commits it in the same transaction as its owner. It belongs to no
/// project (as Neutron's are admin-owned), has no security groups, and takes `fixed` or else
/// Neutron's default addresses on the network.
pub struct ServicePort<'r> {
    pub id: String,
    pub network_id: String,
    pub device_owner: &'static str,
    pub device_id: String,
    pub fixed: Option<Vec<FixedReq>>,
    pub res: Reservation<'r>,
}

impl ServicePort<'_> {
    /// Plans the port from the cache: its comparisons, writes and value. Call again after a
    /// lost race (the earlier plan's in-flight addresses are released).
    pub fn plan(&mut self, ctx: &Ctx<'_>) -> NResult<(Vec<Compare>, Vec<Op>, Port)> {
        self.res.release();
        let (net, nrev) = ctx
            .get::<Network>(&self.network_id)
            .filter(|(n, _)| !n.deleting)
            .ok_or_else(|| not_found::<Network>(&self.network_id))?;
        let mut rng = rand::thread_rng();
        let mut mac = ipam::random_mac(&mut rng);
        while ctx.state.cache.contains(&keys::mac_alloc(&net.id, &mac)) {
            mac = ipam::random_mac(&mut rng);
        }
        let ips = plan_ips(ctx, &net.id, &self.id, &mac, self.fixed.as_deref(), &[], &mut self.res)?;
        let port = Port {
            id: self.id.clone(),
            project_id: String::new(),
            network_id: net.id.clone(),
            name: String::new(),
            admin_state_up: true,
            mac_address: mac.clone(),
            fixed_ips: ips.fixed_ips,
            device_id: self.device_id.clone(),
            device_owner: self.device_owner.to_string(),
            status: "ACTIVE".into(),
            binding_host_id: String::new(),
            binding_vif_type: VIF_UNBOUND.into(),
            binding_vif_details: json!({}),
            binding_profile: json!({}),
            binding_vnic_type: "normal".into(),
            allowed_address_pairs: vec![],
            port_security_enabled: false,
            security_groups: vec![],
            extra_dhcp_opts: vec![],
            dns_name: String::new(),
            qos_policy_id: None,
            subport_of: None,
            std: StandardAttrs::new(&now()),
        };
        let mut cmp = vec![
            Compare::Absent(key(&port.id)),
            Compare::ModRevision(lookup::key::<Network>(&net.id), nrev),
            Compare::Absent(keys::mac_alloc(&net.id, &mac)),
        ];
        let mut ops = vec![
            Op::put(key(&port.id), json_bytes(&port)),
            Op::put(keys::mac_alloc(&net.id, &mac), port.id.clone()),
        ];
        for (sid, srev) in &ips.subnets {
            cmp.push(Compare::ModRevision(lookup::key::<Subnet>(sid), *srev));
        }
        for c in &ips.claimed {
            let k = keys::ip_alloc(&c.subnet_id, &c.ip_address);
            cmp.push(Compare::Absent(k.clone()));
            ops.push(Op::put(k, port.id.clone()));
        }
        Ok((cmp, ops, port))
    }
}

/// A trunk parent's subports follow it to its new host (as Neutron rebinds them), in the
/// parent's transaction; comparing the trunk catches a subport added meanwhile.
fn move_subports(ctx: &Ctx<'_>, port_id: &str, host: &str, cmp: &mut Vec<Compare>, ops: &mut Vec<Op>) {
    let Some(kv) = ctx.state.cache.get(&keys::trunk_port(port_id)) else {
        return;
    };
    let trunk_id = String::from_utf8_lossy(&kv.value).to_string();
    let Some((t, trev)) = ctx.get::<Trunk>(&trunk_id) else {
        return;
    };
    if t.port_id != port_id {
        return;
    }
    cmp.push(Compare::ModRevision(lookup::key::<Trunk>(&trunk_id), trev));
    for s in &t.sub_ports {
        if let Some((mut sp, rev)) = ctx.get::<Port>(&s.port_id) {
            sp.binding_host_id = host.to_string();
            sp.status = "DOWN".into();
            sp.std.bump(&now());
            cmp.push(Compare::ModRevision(key(&s.port_id), rev));
            ops.push(Op::put(key(&s.port_id), json_bytes(&sp)));
        }
    }
}

/// Disassociates the floating IPs of port `port_id` whose fixed address is not in `keep`,
/// adding the writes to a port write's transaction.
fn disassociate(ctx: &Ctx<'_>, port_id: &str, keep: &[FixedIp], cmp: &mut Vec<Compare>, ops: &mut Vec<Op>) {
    let ts = now();
    for (mut fip, frev) in lookup::fips_of_port(ctx, port_id) {
        let fixed = fip.fixed_ip_address.clone().unwrap_or_default();
        if keep.iter().any(|k| k.ip_address == fixed) {
            continue;
        }
        cmp.push(Compare::ModRevision(lookup::key::<FloatingIp>(&fip.id), frev));
        ops.push(Op::delete(keys::fip_assoc(port_id, &fixed)));
        fip.port_id = None;
        fip.fixed_ip_address = None;
        fip.router_id = None;
        fip.status = "DOWN".into();
        fip.std.bump(&ts);
        ops.push(Op::put(lookup::key::<FloatingIp>(&fip.id), json_bytes(&fip)));
    }
}
