//! Security groups and rules (API only; the datapath enforces them in a later stage).

use super::common::{
    check_if_match, count_owned, description_from, json_bytes, new_id, not_found, now, retry, tags_from, Ctx, Grants,
    NResult, Stored,
};
use super::default_sg::{egress_rules, ensure_default};
use super::grants::{self, RbacObject, SecurityGroupObject};
use super::lookup::{
    self, default_group_id, default_sg_key, group, group_visible_in, rules_of, visible_group, writable_group,
};
use super::query::Prefilter;
use super::quota;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use ipnet::IpNet;
use isthmus_model::validate::{is_uuid, Body};
use isthmus_model::{NeutronError, Port, SecurityGroup, SecurityGroupRule, StandardAttrs};
use isthmus_store::{Compare, Op, Revision};
use serde_json::Value;
use std::collections::HashMap;
use std::net::IpAddr;

const PROTOCOLS: &[(&str, u8)] = &[
    ("ah", 51),
    ("dccp", 33),
    ("egp", 8),
    ("esp", 50),
    ("gre", 47),
    ("hopopt", 0),
    ("icmp", 1),
    ("igmp", 2),
    ("ip", 0),
    ("ipip", 4),
    ("ipv6-encap", 41),
    ("ipv6-frag", 44),
    ("ipv6-icmp", 58),
    ("icmpv6", 58),
    ("ipv6-nonxt", 59),
    ("ipv6-opts", 60),
    ("ipv6-route", 43),
    ("ospf", 89),
    ("pgm", 113),
    ("rsvp", 46),
    ("sctp", 132),
    ("tcp", 6),
    ("udp", 17),
    ("udplite", 136),
    ("vrrp", 112),
];
const PORT_PROTOCOLS: &[u8] = &[6, 17, 33, 132, 136];
/// Protocols that only exist over IPv6 (names and numbers), refused on IPv4 rules.
const IPV6_ONLY: &[&str] = &[
    "ipv6-encap",
    "ipv6-frag",
    "ipv6-icmp",
    "icmpv6",
    "ipv6-nonxt",
    "ipv6-opts",
    "ipv6-route",
    "41",
    "44",
    "58",
    "59",
    "60",
    "43",
];
const ICMP_PROTOCOLS: &[u8] = &[1, 58];

fn group_key(id: &str) -> String {
    lookup::key::<SecurityGroup>(id)
}
fn rule_key(id: &str) -> String {
    lookup::key::<SecurityGroupRule>(id)
}

pub struct SecurityGroups;

static GROUP_META: Meta = Meta {
    collection: "security-groups",
    singular: "security_group",
    plural: "security_groups",
    store: SecurityGroup::COLLECTION,
    not_found: SecurityGroup::NOT_FOUND,
    bulk: true,
    tags: true,
    indexed: true,
    quota: Some("security_group"),
};

impl Resource for SecurityGroups {
    fn meta(&self) -> &'static Meta {
        &GROUP_META
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            ensure_default(ctx, &ctx.auth.project_id).await?;
            let shared = Grants::all(ctx);
            let groups: Vec<_> = ctx
                .all::<SecurityGroup>()
                .into_iter()
                .filter(|(g, _)| group_visible_in(ctx, g, &shared))
                .filter(|(g, _)| pre.keeps_owned(&g.id, &g.name, &g.project_id))
                .collect();
            let mut rules: HashMap<String, Vec<Value>> = HashMap::new();
            if !groups.is_empty() {
                for (r, _) in ctx.all::<SecurityGroupRule>() {
                    rules.entry(r.security_group_id.clone()).or_default().push(r.to_api());
                }
            }
            Ok(groups
                .into_iter()
                .map(|(g, _)| {
                    let r = rules.remove(&g.id).unwrap_or_default();
                    g.to_api(r)
                })
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        let (g, _) = visible_group(ctx, id)?;
        Ok(g.to_api(rules_of(ctx, &g.id)))
    }
    fn create_one<'a>(&'a self, ctx: &'a Ctx<'a>, body: Body) -> BoxFut<'a, Value> {
        Box::pin(create_group(ctx, body))
    }
    fn update<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, body: Body, if_match: Option<u64>) -> BoxFut<'a, Value> {
        Box::pin(update_group(ctx, id, body, if_match))
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, if_match: Option<u64>) -> BoxFut<'a, ()> {
        Box::pin(delete_group(ctx, id, if_match))
    }
    fn used(&self, ctx: &Ctx<'_>, project: &str) -> usize {
        count_owned::<SecurityGroup>(ctx, project)
    }
}

pub struct SecurityGroupRules;

static RULE_META: Meta = Meta {
    collection: "security-group-rules",
    singular: "security_group_rule",
    plural: "security_group_rules",
    store: SecurityGroupRule::COLLECTION,
    not_found: SecurityGroupRule::NOT_FOUND,
    bulk: true,
    // Rules have no tags in Neutron's API.
    tags: false,
    indexed: true,
    quota: Some("security_group_rule"),
};

impl Resource for SecurityGroupRules {
    fn meta(&self) -> &'static Meta {
        &RULE_META
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            ensure_default(ctx, &ctx.auth.project_id).await?;
            Ok(ctx
                .all::<SecurityGroupRule>()
                .into_iter()
                .filter(|(r, _)| ctx.admin() || ctx.owns(&r.project_id))
                .filter(|(r, _)| {
                    pre.keeps("id", &r.id)
                        && pre.keeps("project_id", &r.project_id)
                        && pre.keeps("tenant_id", &r.project_id)
                        && pre.keeps("security_group_id", &r.security_group_id)
                })
                .map(|(r, _)| r.to_api())
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        Ok(visible_rule(ctx, id)?.0.to_api())
    }
    fn create_one<'a>(&'a self, ctx: &'a Ctx<'a>, body: Body) -> BoxFut<'a, Value> {
        Box::pin(create_rule(ctx, body))
    }
    fn update<'a>(&'a self, _ctx: &'a Ctx<'a>, _id: &'a str, _body: Body, _if_match: Option<u64>) -> BoxFut<'a, Value> {
        Box::pin(async {
            Err(NeutronError::new(
                400,
                "HTTPBadRequest",
                "Security group rules cannot be updated",
            ))
        })
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, _if_match: Option<u64>) -> BoxFut<'a, ()> {
        Box::pin(delete_rule(ctx, id))
    }
    fn used(&self, ctx: &Ctx<'_>, project: &str) -> usize {
        count_owned::<SecurityGroupRule>(ctx, project)
    }
}

fn visible_rule(ctx: &Ctx<'_>, id: &str) -> NResult<(SecurityGroupRule, Revision)> {
    ctx.get::<SecurityGroupRule>(id)
        .filter(|(r, _)| ctx.admin() || ctx.owns(&r.project_id))
        .ok_or_else(|| not_found::<SecurityGroupRule>(id))
}

async fn create_group(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let name = body.string("name")?.unwrap_or_default();
    let description = description_from(&mut body)?.unwrap_or_default();
    let stateful = body.boolean("stateful")?.unwrap_or(true);
    let tags = tags_from(ctx, &mut body)?.unwrap_or_default();
    body.finish()?;
    ensure_default(ctx, &project_id).await?;
    if name == "default" {
        return Err(NeutronError::conflict(
            "SecurityGroupDefaultAlreadyExists",
            "Default security group already exists.",
        ));
    }
    let ts = now();
    let id = new_id();
    let g = SecurityGroup {
        id: id.clone(),
        project_id: project_id.clone(),
        name,
        stateful,
        std: StandardAttrs {
            description,
            tags,
            ..StandardAttrs::new(&ts)
        },
    };
    let rules = egress_rules(&project_id, &id, &ts);
    retry(ctx, |ctx| {
        // As in Neutron, the group's own egress rules are not checked against the rule quota.
        let (mut cmp, mut ops) = quota::check(ctx, "security_group", &project_id, 1, || {
            count_owned::<SecurityGroup>(ctx, &project_id)
        })?;
        cmp.push(Compare::Absent(group_key(&id)));
        ops.push(Op::put(group_key(&id), json_bytes(&g)));
        for r in &rules {
            ops.push(Op::put(rule_key(&r.id), json_bytes(r)));
        }
        Ok((cmp, ops, ()))
    })
    .await?;
    Ok(g.to_api(rules.iter().map(|r| r.to_api()).collect()))
}

async fn update_group(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    writable_group(ctx, id, "update_security_group")?;
    let name = body.string("name")?;
    let description = description_from(&mut body)?;
    let stateful = body.boolean("stateful")?;
    let tags = tags_from(ctx, &mut body)?;
    body.finish()?;
    let g = retry(ctx, |ctx| {
        let (mut g, rev) = writable_group(ctx, id, "update_security_group")?;
        check_if_match(if_match, g.std.revision_number)?;
        if let Some(n) = &name {
            if g.name == "default" && *n != "default" {
                return Err(NeutronError::conflict(
                    "SecurityGroupCannotUpdateDefault",
                    "Updating default security group not allowed.",
                ));
            }
            if *n == "default" && g.name != "default" {
                return Err(NeutronError::conflict(
                    "SecurityGroupDefaultAlreadyExists",
                    "Default security group already exists.",
                ));
            }
            g.name = n.clone();
        }
        if let Some(d) = &description {
            g.std.description = d.clone();
        }
        if let Some(s) = stateful {
            g.stateful = s;
        }
        if let Some(t) = &tags {
            g.std.tags = t.clone();
        }
        g.std.bump(&now());
        Ok((
            vec![Compare::ModRevision(group_key(id), rev)],
            vec![Op::put(group_key(id), json_bytes(&g))],
            g,
        ))
    })
    .await?;
    Ok(g.to_api(rules_of(ctx, id)))
}

async fn delete_group(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    retry(ctx, |ctx| {
        let (g, rev) = writable_group(ctx, id, "delete_security_group")?;
        check_if_match(if_match, g.std.revision_number)?;
        if default_group_id(ctx, &g.project_id).as_deref() == Some(id) && !ctx.admin() {
            return Err(NeutronError::conflict(
                "SecurityGroupCannotRemoveDefault",
                "Insufficient rights for removing default security group.",
            ));
        }
        if ctx
            .all::<Port>()
            .iter()
            .any(|(p, _)| p.security_groups.iter().any(|s| s == id))
        {
            return Err(NeutronError::conflict(
                "SecurityGroupInUse",
                format!("Security Group {id} in use."),
            ));
        }
        let mut ops = vec![Op::delete(group_key(id))];
        for (r, _) in ctx.all::<SecurityGroupRule>() {
            if r.security_group_id == id || r.remote_group_id.as_deref() == Some(id) {
                ops.push(Op::delete(rule_key(&r.id)));
            }
        }
        if default_group_id(ctx, &g.project_id).as_deref() == Some(id) {
            ops.push(Op::delete(default_sg_key(&g.project_id)));
        }
        // Its RBAC policies go with it.
        for (p, _) in grants::policies_on(ctx, id) {
            if p.object_type == SecurityGroupObject.name() {
                ops.extend(grants::revoke(&p));
            }
        }
        Ok((vec![Compare::ModRevision(group_key(id), rev)], ops, ()))
    })
    .await
}

/// Protocol as Neutron accepts it: a known name, "any", or a number 0-255.
fn parse_protocol(v: Value) -> NResult<Option<(String, u8)>> {
    let bad = |v: &Value| {
        NeutronError::new(
            400,
            "SecurityGroupRuleInvalidProtocol",
            format!("Security group rule protocol {v} not supported. Only protocol values {:?} and integer representations [0 to 255] are supported.", PROTOCOLS.iter().map(|p| p.0).collect::<Vec<_>>()),
        )
    };
    match &v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() || s == "any" => Ok(None),
        Value::String(s) => {
            if let Some((n, num)) = PROTOCOLS.iter().find(|(n, _)| n.eq_ignore_ascii_case(s)) {
                return Ok(Some((n.to_string(), *num)));
            }
            s.parse::<u8>().map(|n| Some((s.clone(), n))).map_err(|_| bad(&v))
        }
        Value::Number(n) => match n.as_u64() {
            Some(x) if x <= 255 => Ok(Some((x.to_string(), x as u8))),
            _ => Err(bad(&v)),
        },
        _ => Err(bad(&v)),
    }
}

/// Neutron's canonical form on IPv6 rules: the legacy ICMP spellings become `ipv6-icmp`, and
/// protocol 1 becomes 58.
fn canonical_protocol(p: Option<(String, u8)>, ethertype: &str) -> Option<(String, u8)> {
    match p {
        Some((name, _)) if ethertype == "IPv6" && (name == "icmp" || name == "icmpv6") => {
            Some(("ipv6-icmp".into(), 58))
        }
        Some((name, 1)) if ethertype == "IPv6" && name == "1" => Some(("58".into(), 58)),
        other => other,
    }
}

/// The protocol number a stored protocol stands for (names and numbers alike).
fn protocol_number(p: &str) -> Option<u8> {
    PROTOCOLS
        .iter()
        .find(|(n, _)| *n == p)
        .map(|(_, num)| *num)
        .or_else(|| p.parse().ok())
}

/// What makes two rules the same for Neutron's duplicate check: the protocol by number, and
/// "anywhere" however it is spelled (no prefix, 0.0.0.0/0, ::/0).
fn same_rule_key(r: &SecurityGroupRule) -> impl PartialEq {
    let anywhere = |p: &Option<String>| match p.as_deref() {
        None | Some("0.0.0.0/0") | Some("::/0") => None,
        Some(other) => Some(other.to_string()),
    };
    (
        r.security_group_id.clone(),
        r.direction.clone(),
        r.ethertype.clone(),
        r.protocol
            .as_deref()
            .map(|p| protocol_number(p).map(u16::from).unwrap_or(u16::MAX)),
        r.port_range_min,
        r.port_range_max,
        anywhere(&r.remote_ip_prefix),
        r.remote_group_id.clone(),
    )
}

fn port_value(body: &mut Body, key: &str) -> NResult<Option<i64>> {
    match body.take_raw(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let n = match &v {
                Value::Number(n) => n.as_i64(),
                Value::String(s) => s.trim().parse::<i64>().ok(),
                _ => None,
            };
            match n {
                Some(n) if (0..=65535).contains(&n) => Ok(Some(n)),
                _ => Err(NeutronError::new(
                    400,
                    "SecurityGroupInvalidPortValue",
                    format!(
                        "Invalid value for port {}",
                        v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())
                    ),
                )),
            }
        }
    }
}

fn check_ports(proto: Option<u8>, min: Option<i64>, max: Option<i64>) -> NResult<()> {
    if min.is_none() && max.is_none() {
        return Ok(());
    }
    let Some(p) = proto else {
        return Err(NeutronError::new(
            400,
            "SecurityGroupProtocolRequiredWithPorts",
            "Must also specify protocol if port range is given.",
        ));
    };
    if PORT_PROTOCOLS.contains(&p) {
        if min == Some(0) || max == Some(0) {
            return Err(NeutronError::new(
                400,
                "SecurityGroupInvalidPortValue",
                "Invalid value for port 0",
            ));
        }
        match (min, max) {
            (Some(a), Some(b)) if a <= b => Ok(()),
            _ => Err(NeutronError::new(
                400,
                "SecurityGroupInvalidPortRange",
                "For TCP/UDP protocols, port_range_min must be <= port_range_max",
            )),
        }
    } else if ICMP_PROTOCOLS.contains(&p) {
        for (field, attr, v) in [("type", "port-range-min", min), ("code", "port-range-max", max)] {
            if let Some(v) = v {
                if !(0..=255).contains(&v) {
                    return Err(NeutronError::new(
                        400,
                        "SecurityGroupInvalidIcmpValue",
                        format!("Invalid value for ICMP {field} ({attr}): {v}. It must be 0 to 255."),
                    ));
                }
            }
        }
        if min.is_none() {
            if let Some(code) = max {
                return Err(NeutronError::new(
                    400,
                    "SecurityGroupMissingIcmpType",
                    format!("ICMP code (port-range-max) {code} is provided but ICMP type (port-range-min) is missing."),
                ));
            }
        }
        Ok(())
    } else {
        Err(NeutronError::new(
            400,
            "SecurityGroupInvalidProtocolForPort",
            format!("Invalid protocol {p} for port range, only supported for TCP, UDP, UDPLITE, SCTP and DCCP"),
        ))
    }
}

async fn create_rule(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let sg_id = body.string("security_group_id")?.ok_or_else(|| {
        NeutronError::bad_request("Failed to parse request. Required attribute 'security_group_id' not specified")
    })?;
    let direction = body.string("direction")?.ok_or_else(|| {
        NeutronError::bad_request("Failed to parse request. Required attribute 'direction' not specified")
    })?;
    if direction != "ingress" && direction != "egress" {
        return Err(NeutronError::invalid_attr(
            "direction",
            format!("'{direction}' is not in ['ingress', 'egress']"),
        ));
    }
    let ethertype = body.string("ethertype")?.unwrap_or_else(|| "IPv4".into());
    let ethertype = match ethertype.to_ascii_lowercase().as_str() {
        "ipv4" => "IPv4".to_string(),
        "ipv6" => "IPv6".to_string(),
        _ => {
            return Err(NeutronError::new(
                400,
                "SecurityGroupRuleInvalidEtherType",
                format!(
                "Security group rule for ethertype '{ethertype}' not supported. Allowed values are ['IPv4', 'IPv6']."
            ),
            ))
        }
    };
    let protocol = canonical_protocol(
        parse_protocol(body.take_raw("protocol").unwrap_or(Value::Null))?,
        &ethertype,
    );
    let mut min = port_value(&mut body, "port_range_min")?;
    let mut max = port_value(&mut body, "port_range_max")?;
    // The whole range is no range (Neutron stores it so).
    if min == Some(1) && max == Some(65535) {
        (min, max) = (None, None);
    }
    check_ports(protocol.as_ref().map(|p| p.1), min, max)?;
    let remote_ip = match body.opt_string("remote_ip_prefix")?.flatten() {
        None => None,
        Some(s) => {
            let bad = || NeutronError::invalid_attr("remote_ip_prefix", format!("'{s}' is not a valid IP subnet"));
            let net: IpNet = if s.contains('/') {
                s.parse().map_err(|_| bad())?
            } else {
                let ip: IpAddr = s.parse().map_err(|_| bad())?;
                IpNet::from(ip)
            };
            let v6 = matches!(net, IpNet::V6(_));
            if v6 != (ethertype == "IPv6") {
                return Err(NeutronError::bad_request(format!(
                    "Conflicting value ethertype {ethertype} for CIDR {s}"
                )));
            }
            Some(net.to_string())
        }
    };
    if let Some((p, _)) = &protocol {
        if ethertype == "IPv4" && IPV6_ONLY.contains(&p.as_str()) {
            return Err(NeutronError::new(
                400,
                "SecurityGroupEthertypeConflictWithProtocol",
                format!("Invalid ethertype {ethertype} for protocol {p}."),
            ));
        }
    }
    let remote_group = body.opt_string("remote_group_id")?.flatten();
    if remote_ip.is_some() && remote_group.is_some() {
        return Err(NeutronError::new(
            400,
            "SecurityGroupRemoteGroupAndRemoteIpPrefix",
            "Only remote_ip_prefix or remote_group_id may be provided.",
        ));
    }
    if body.take_raw("remote_address_group_id").is_some_and(|v| !v.is_null()) {
        return Err(NeutronError::invalid_input("remote address groups are not supported"));
    }
    let description = description_from(&mut body)?.unwrap_or_default();
    body.finish()?;
    let (sg, _) = writable_group(ctx, &sg_id, "create_security_group_rule")?;
    if let Some(rg) = &remote_group {
        if !is_uuid(rg) || visible_group(ctx, rg).is_err() {
            return Err(not_found::<SecurityGroup>(rg));
        }
    }
    let ts = now();
    let rule = SecurityGroupRule {
        id: new_id(),
        project_id: if ctx.admin() { project_id } else { sg.project_id.clone() },
        security_group_id: sg_id.clone(),
        direction,
        ethertype,
        protocol: protocol.map(|p| p.0),
        port_range_min: min.map(|v| v as u32),
        port_range_max: max.map(|v| v as u32),
        remote_ip_prefix: remote_ip,
        remote_group_id: remote_group,
        std: StandardAttrs {
            description,
            ..StandardAttrs::new(&ts)
        },
    };
    // Duplicate detection is serialized through the group's revision.
    retry(ctx, |ctx| {
        let (qcmp, qops) = quota::check(ctx, "security_group_rule", &rule.project_id, 1, || {
            count_owned::<SecurityGroupRule>(ctx, &rule.project_id)
        })?;
        let (mut g, grev) = writable_group(ctx, &sg_id, "create_security_group_rule")?;
        if let Some((dup, _)) = ctx
            .all::<SecurityGroupRule>()
            .into_iter()
            .find(|(r, _)| same_rule_key(r) == same_rule_key(&rule))
        {
            return Err(NeutronError::conflict(
                "SecurityGroupRuleExists",
                format!("Security group rule already exists. Rule id is {}.", dup.id),
            ));
        }
        g.std.bump(&ts);
        let mut cmp = vec![
            Compare::ModRevision(group_key(&sg_id), grev),
            Compare::Absent(rule_key(&rule.id)),
        ];
        let mut ops = vec![
            Op::put(rule_key(&rule.id), json_bytes(&rule)),
            Op::put(group_key(&sg_id), json_bytes(&g)),
        ];
        cmp.extend(qcmp);
        ops.extend(qops);
        Ok((cmp, ops, ()))
    })
    .await?;
    Ok(rule.to_api())
}

async fn delete_rule(ctx: &Ctx<'_>, id: &str) -> NResult<()> {
    retry(ctx, |ctx| {
        let (r, rev) = visible_rule(ctx, id)?;
        let mut cmp = vec![Compare::ModRevision(rule_key(id), rev)];
        let mut ops = vec![Op::delete(rule_key(id))];
        if let Some((mut g, grev)) = group(ctx, &r.security_group_id) {
            g.std.bump(&now());
            cmp.push(Compare::ModRevision(group_key(&g.id), grev));
            ops.push(Op::put(group_key(&g.id), json_bytes(&g)));
        }
        Ok((cmp, ops, ()))
    })
    .await
}
