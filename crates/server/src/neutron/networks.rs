//! Networks, with their segmentation ids (VXLAN VNIs).

use super::common::{
    check_if_match, count_owned, description_from, json_bytes, new_id, now, policy_denied, retry, retry_rev, tags_from,
    Ctx, Grants, NResult, Stored, ACCESS_EXTERNAL, ACCESS_SHARED, WILDCARD,
};
use super::grants::{self, NetworkObject, RbacObject};
use super::lookup;
use super::query::Prefilter;
use super::quota;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use isthmus_model::validate::Body;
use isthmus_model::{keys, FloatingIp, Network, NeutronError, Port, QosPolicy, StandardAttrs, Subnet};
use isthmus_store::{Compare, Op};
use serde_json::Value;

pub struct Networks;

static META: Meta = Meta {
    collection: "networks",
    singular: "network",
    plural: "networks",
    store: Network::COLLECTION,
    not_found: Network::NOT_FOUND,
    bulk: true,
    tags: true,
    indexed: true,
    quota: Some("network"),
};

impl Resource for Networks {
    fn meta(&self) -> &'static Meta {
        &META
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            let g = Grants::all(ctx);
            let scopes = lookup::network_scopes(ctx);
            Ok(ctx
                .all::<Network>()
                .into_iter()
                .filter(|(n, _)| ctx.network_visible_in(n, &g) && pre.keeps_owned(&n.id, &n.name, &n.project_id))
                .map(|(n, _)| render(ctx, &n, &g, &scopes))
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        let (n, _) = ctx.visible_network(id)?;
        Ok(render(ctx, &n, &Grants::of(ctx, id), &lookup::network_scopes(ctx)))
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
        count_owned::<Network>(ctx, project)
    }
}

fn key(id: &str) -> String {
    lookup::key::<Network>(id)
}

/// The API view for the caller: Neutron reports `shared` true to every project the network
/// is shared with, through a policy naming it or `*`.
fn render(ctx: &Ctx<'_>, n: &Network, g: &Grants, scopes: &lookup::NetworkScopes) -> Value {
    let mut v = lookup::render_network(ctx, n, scopes);
    v["shared"] = Value::Bool(g.network_shared(n, &ctx.auth.project_id));
    v
}

/// The `*` policy `shared` or `router:external` stands for, made with the network.
fn wildcard_grant(n: &Network, action: &str, cmp: &mut Vec<Compare>, ops: &mut Vec<Op>) {
    let (_, c, o) = grants::grant(NetworkObject.name(), &n.id, action, WILDCARD, &n.project_id);
    cmp.extend(c);
    ops.extend(o);
}

/// A free VNI from the configured range, starting at a random point so concurrent servers
/// rarely pick the same one; the transaction settles any tie.
fn free_vni(ctx: &Ctx<'_>, skip: &[u32]) -> NResult<u32> {
    let (lo, hi) = (ctx.state.config.vni_min, ctx.state.config.vni_max);
    if lo > hi {
        return Err(NeutronError::internal("configured VNI range is empty"));
    }
    let span = (hi - lo) as u64 + 1;
    let start = rand::random::<u64>() % span;
    for i in 0..span {
        let vni = lo + ((start + i) % span) as u32;
        if !skip.contains(&vni) && !ctx.state.cache.contains(&keys::vni_alloc(vni)) {
            return Ok(vni);
        }
    }
    Err(NeutronError::conflict(
        "NoNetworkAvailable",
        "Unable to create the network. No tenant network is available for allocation.",
    ))
}

/// The provider attributes of a new network.
struct Provider {
    network_type: String,
    physical_network: Option<String>,
    segmentation_id: Option<u32>,
}

fn flat_in_use(physical_network: &str) -> NeutronError {
    NeutronError::conflict(
        "FlatNetworkInUse",
        format!("Unable to create the flat network. Physical network {physical_network} is in use."),
    )
}

/// A physical network's name as the node configuration can map it to a host bridge.
fn valid_physnet(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `provider:*` on create (admins only): `vxlan` (the default, optionally with a VNI) or
/// `flat` on a named physical network.
fn parse_provider(ctx: &Ctx<'_>, body: &mut Body) -> NResult<Provider> {
    let keys_given = [
        "provider:network_type",
        "provider:segmentation_id",
        "provider:physical_network",
    ]
    .iter()
    .any(|k| body.contains(k));
    if keys_given && !ctx.admin() {
        return Err(NeutronError::forbidden(
            "Setting provider attributes requires admin privileges",
        ));
    }
    let network_type = body
        .opt_string("provider:network_type")?
        .flatten()
        .unwrap_or_else(|| "vxlan".into());
    let segmentation_id = body.integer("provider:segmentation_id")?;
    let physical_network = body.opt_string("provider:physical_network")?.flatten();
    match network_type.as_str() {
        "vxlan" => {
            if physical_network.is_some() {
                return Err(NeutronError::invalid_input(
                    "provider:physical_network specified for VXLAN network",
                ));
            }
            let segmentation_id = match segmentation_id {
                None => None,
                Some(v) if (1..=16_777_215).contains(&v) => Some(v as u32),
                Some(v) => {
                    return Err(NeutronError::invalid_input(format!(
                        "segmentation_id {v} out of range (1-16777215)"
                    )))
                }
            };
            Ok(Provider {
                network_type,
                physical_network: None,
                segmentation_id,
            })
        }
        "flat" => {
            if segmentation_id.is_some() {
                return Err(NeutronError::invalid_input(
                    "segmentation_id specified for flat network",
                ));
            }
            let pn = physical_network
                .ok_or_else(|| NeutronError::invalid_input("physical_network required for flat provider network"))?;
            if !valid_physnet(&pn) {
                return Err(NeutronError::invalid_input(format!(
                    "physical_network '{pn}' is not a valid name (1-64 of A-Z a-z 0-9 _ . -)"
                )));
            }
            Ok(Provider {
                network_type,
                physical_network: Some(pn),
                segmentation_id: None,
            })
        }
        t => Err(NeutronError::invalid_input(format!(
            "network_type value '{t}' not supported"
        ))),
    }
}

/// `dns_domain` (dns-integration): empty (null reads as empty) or an FQDN with its dot.
fn dns_domain_from(body: &mut Body) -> NResult<Option<String>> {
    let Some(v) = body.opt_string("dns_domain")? else {
        return Ok(None);
    };
    let v = v.unwrap_or_default();
    isthmus_model::validate::dns_domain(&v).map_err(|m| NeutronError::invalid_attr("dns_domain", m))?;
    Ok(Some(v))
}

async fn create(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let name = body.string("name")?.unwrap_or_default();
    let description = description_from(&mut body)?.unwrap_or_default();
    let admin_state_up = body.boolean("admin_state_up")?.unwrap_or(true);
    let shared = body.boolean("shared")?.unwrap_or(false);
    if shared && !ctx.admin() {
        return Err(NeutronError::forbidden(
            "(rule:create_network and rule:create_network:shared) is disallowed by policy",
        ));
    }
    let port_security_enabled = body.boolean("port_security_enabled")?.unwrap_or(true);
    let tenant_mtu = ctx.state.config.tenant_mtu();
    let mtu = match body.integer("mtu")? {
        None => tenant_mtu,
        Some(m) if (68..=tenant_mtu as i64).contains(&m) => m as u32,
        Some(m) => {
            return Err(NeutronError::invalid_input(format!(
                "Requested MTU is too big, maximum is {tenant_mtu}; got {m}"
            )))
        }
    };
    let provider = parse_provider(ctx, &mut body)?;
    let requested_vni = provider.segmentation_id;
    let external = body.boolean("router:external")?;
    if external.is_some() && !ctx.admin() {
        return Err(policy_denied(
            "(rule:create_network and rule:create_network:router:external)",
        ));
    }
    let external = external.unwrap_or(false);
    if let Some(hints) = body.string_list("availability_zone_hints")? {
        if !hints.is_empty() {
            return Err(NeutronError::invalid_input("availability zones are not supported"));
        }
    }
    let dns_domain = dns_domain_from(&mut body)?.unwrap_or_default();
    let asked_qos = lookup::qos_policy_from(&mut body)?;
    let tags = tags_from(ctx, &mut body)?.unwrap_or_default();
    body.finish()?;

    let id = new_id();
    let ts = now();
    let mut tried: Vec<u32> = vec![];
    let net = retry(ctx, |ctx| {
        let (qcmp, qops) = quota::check(ctx, "network", &project_id, 1, || {
            count_owned::<Network>(ctx, &project_id)
        })?;
        let vni = match requested_vni {
            Some(v) => {
                if ctx.state.cache.contains(&keys::vni_alloc(v)) {
                    return Err(NeutronError::conflict(
                        "SegmentationIdInUse",
                        format!("Unable to create the network. The VNI {v} is in use."),
                    ));
                }
                v
            }
            None => free_vni(ctx, &tried)?,
        };
        tried.push(vni);
        if tried.len() > 8 {
            tried.remove(0);
        }
        // Not asked for: the project's default policy (`qos-default`), if any.
        let qos_policy_id = match &asked_qos {
            Some(q) => q.clone(),
            None => lookup::default_policy_id(ctx, &project_id),
        };
        let qos_cmp = match &qos_policy_id {
            Some(q) => {
                let (_, qrev) = lookup::attachable_policy(ctx, q)?;
                Some(Compare::ModRevision(lookup::key::<QosPolicy>(q), qrev))
            }
            None => None,
        };
        let net = Network {
            id: id.clone(),
            project_id: project_id.clone(),
            name: name.clone(),
            admin_state_up,
            shared,
            external,
            network_type: provider.network_type.clone(),
            physical_network: provider.physical_network.clone(),
            mtu,
            status: "ACTIVE".into(),
            segmentation_id: vni,
            port_security_enabled,
            subnets: vec![],
            dns_domain: dns_domain.clone(),
            qos_policy_id: qos_policy_id.clone(),
            deleting: false,
            std: StandardAttrs {
                description: description.clone(),
                tags: tags.clone(),
                ..StandardAttrs::new(&ts)
            },
        };
        let mut cmp = vec![Compare::Absent(keys::vni_alloc(vni)), Compare::Absent(key(&id))];
        cmp.extend(qos_cmp);
        let mut ops = vec![
            Op::put(keys::vni_alloc(vni), id.clone()),
            Op::put(key(&id), json_bytes(&net)),
        ];
        if shared {
            wildcard_grant(&net, ACCESS_SHARED, &mut cmp, &mut ops);
        }
        if external {
            wildcard_grant(&net, ACCESS_EXTERNAL, &mut cmp, &mut ops);
        }
        if let Some(pn) = &provider.physical_network {
            // One flat network per physical network, settled by the transaction.
            let k = keys::flat_alloc(pn);
            if ctx.state.cache.contains(&k) {
                return Err(flat_in_use(pn));
            }
            cmp.push(Compare::Absent(k.clone()));
            ops.push(Op::put(k, id.clone()));
        }
        cmp.extend(qcmp);
        ops.extend(qops);
        Ok((cmp, ops, net))
    })
    .await?;
    tracing::info!(network = %net.id, project = %net.project_id, vni = net.segmentation_id, "network created");
    Ok(render(
        ctx,
        &net,
        &Grants::of(ctx, &net.id),
        &lookup::network_scopes(ctx),
    ))
}

/// A network the caller may change: visible and owned (or admin). Others' shared networks are
/// visible but not writable, which Neutron reports as 403; invisible ones as 404.
fn writable(ctx: &Ctx<'_>, id: &str) -> NResult<(Network, i64)> {
    let (n, r) = ctx.visible_network(id)?;
    if !ctx.admin() && !ctx.owns(&n.project_id) {
        return Err(NeutronError::forbidden(format!(
            "Modifying network {id} is not allowed by policy"
        )));
    }
    Ok((n, r))
}

async fn update(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    writable(ctx, id)?;
    let name = body.string("name")?;
    let description = description_from(&mut body)?;
    let admin_state_up = body.boolean("admin_state_up")?;
    let shared = body.boolean("shared")?;
    if shared.is_some() && !ctx.admin() {
        return Err(NeutronError::forbidden(
            "(rule:update_network and rule:update_network:shared) is disallowed by policy",
        ));
    }
    let external = body.boolean("router:external")?;
    if external.is_some() && !ctx.admin() {
        return Err(policy_denied(
            "(rule:update_network and rule:update_network:router:external)",
        ));
    }
    let port_security_enabled = body.boolean("port_security_enabled")?;
    let tenant_mtu = ctx.state.config.tenant_mtu();
    let mtu = match body.integer("mtu")? {
        None => None,
        Some(m) if (68..=tenant_mtu as i64).contains(&m) => Some(m as u32),
        Some(m) => {
            return Err(NeutronError::invalid_input(format!(
                "Requested MTU is too big, maximum is {tenant_mtu}; got {m}"
            )))
        }
    };
    for k in [
        "provider:network_type",
        "provider:segmentation_id",
        "provider:physical_network",
    ] {
        if body.contains(k) {
            return Err(NeutronError::invalid_input(
                "Plugin does not support updating provider attributes",
            ));
        }
    }
    let dns_domain = dns_domain_from(&mut body)?;
    let qos = lookup::qos_policy_from(&mut body)?;
    let tags = tags_from(ctx, &mut body)?;
    body.finish()?;
    let net = retry(ctx, |ctx| {
        let (mut n, rev) = writable(ctx, id)?;
        check_if_match(if_match, n.std.revision_number)?;
        let mut cmp = vec![Compare::ModRevision(key(id), rev)];
        if let Some(v) = &qos {
            if let Some(q) = v {
                let (_, qrev) = lookup::attachable_policy(ctx, q)?;
                cmp.push(Compare::ModRevision(lookup::key::<QosPolicy>(q), qrev));
            }
            n.qos_policy_id = v.clone();
        }
        if let Some(v) = &name {
            n.name = v.clone();
        }
        if let Some(v) = &dns_domain {
            n.dns_domain = v.clone();
        }
        if let Some(v) = &description {
            n.std.description = v.clone();
        }
        if let Some(v) = admin_state_up {
            n.admin_state_up = v;
        }
        let mut cmp = vec![Compare::ModRevision(key(id), rev)];
        let mut ops = vec![];
        let policies = grants::policies_on(ctx, id);
        let on = |action: &'static str| {
            policies
                .iter()
                .filter(move |(p, _)| p.object_type == NetworkObject.name() && p.action == action)
                .map(|(p, _)| p)
        };
        if let Some(v) = shared {
            if v && !n.shared {
                wildcard_grant(&n, ACCESS_SHARED, &mut cmp, &mut ops);
            }
            if !v && n.shared {
                // Unsharing is refused while projects no other policy covers have ports on
                // the network.
                let remaining: Vec<&str> = on(ACCESS_SHARED)
                    .filter(|p| p.target_project != WILDCARD)
                    .map(|p| p.target_project.as_str())
                    .collect();
                grants::check_release(
                    ctx,
                    &NetworkObject,
                    id,
                    &n.project_id,
                    ACCESS_SHARED,
                    WILDCARD,
                    &remaining,
                )
                .map_err(|_| {
                    NeutronError::conflict(
                        "InvalidSharedSetting",
                        format!(
                            "Unable to reconfigure sharing settings for network {id}. Multiple tenants are using it."
                        ),
                    )
                })?;
                for p in on(ACCESS_SHARED).filter(|p| p.target_project == WILDCARD) {
                    ops.extend(grants::revoke(p));
                }
            }
            n.shared = v;
        }
        if let Some(v) = external {
            if !v && n.external {
                // Gateway ports and floating IPs would be left on a network no longer external.
                if grants::external_in_use(ctx, id) {
                    return Err(grants::external_network_in_use(id));
                }
                // No longer external: every access_as_external policy goes, as in Neutron.
                for p in on(ACCESS_EXTERNAL) {
                    ops.extend(grants::revoke(p));
                }
            }
            if v && !n.external {
                wildcard_grant(&n, ACCESS_EXTERNAL, &mut cmp, &mut ops);
            }
            n.external = v;
        }
        if let Some(v) = port_security_enabled {
            n.port_security_enabled = v;
        }
        if let Some(v) = mtu {
            n.mtu = v;
        }
        if let Some(v) = &tags {
            n.std.tags = v.clone();
        }
        // An update also clears a deleting mark left by an interrupted delete.
        n.deleting = false;
        n.std.bump(&now());
        ops.push(Op::put(key(id), json_bytes(&n)));
        Ok((cmp, ops, n))
    })
    .await?;
    Ok(render(ctx, &net, &Grants::of(ctx, id), &lookup::network_scopes(ctx)))
}

/// A node's pool port not yet given to a workload (see the agent's CNI pools).
fn is_free_pool_port(p: &Port) -> bool {
    p.device_owner == "isthmus:cni" && p.device_id.is_empty()
}

async fn delete(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    // Phase 1: mark the network as being deleted. Port and subnet creates compare the
    // network's revision, so none can slip in once the mark is committed.
    let (marked, mark_rev) = retry_rev(ctx, |ctx| {
        let (mut n, rev) = writable(ctx, id)?;
        check_if_match(if_match, n.std.revision_number)?;
        n.deleting = true;
        Ok((
            vec![Compare::ModRevision(key(id), rev)],
            vec![Op::put(key(id), json_bytes(&n))],
            n,
        ))
    })
    .await?;
    // Phase 2: with the mark in place, the cache is complete for this network.
    // Floating IPs go with their external network, as in Neutron; like the pool ports below
    // they do not keep it in use.
    let (ports, pool): (Vec<_>, Vec<_>) = ctx
        .all::<Port>()
        .into_iter()
        .filter(|(p, _)| p.network_id == id)
        .partition(|(p, _)| !is_free_pool_port(p) && p.device_owner != lookup::FLOATINGIP_OWNER);
    let fips: Vec<_> = ctx
        .all::<FloatingIp>()
        .into_iter()
        .filter(|(f, _)| f.floating_network_id == id)
        .collect();
    if !ports.is_empty() {
        let mut n = marked.clone();
        n.deleting = false;
        if ctx
            .commit(
                vec![Compare::ModRevision(key(id), mark_rev)],
                vec![Op::put(key(id), json_bytes(&n))],
            )
            .await?
            .is_none()
        {
            tracing::warn!(network = %id, "could not clear the deleting mark; it will be cleared by the next update");
        }
        return Err(NeutronError::conflict(
            "NetworkInUse",
            format!("Unable to complete operation on network {id}. There are one or more ports still in use on the network."),
        ));
    }
    let subnets: Vec<_> = ctx
        .all::<Subnet>()
        .into_iter()
        .map(|(s, _)| s)
        .filter(|s| s.network_id == id)
        .collect();
    let mut ops = vec![Op::delete(key(id)), Op::delete(keys::vni_alloc(marked.segmentation_id))];
    if let Some(pn) = &marked.physical_network {
        ops.push(Op::delete(keys::flat_alloc(pn)));
    }
    for s in &subnets {
        ops.push(Op::delete(lookup::key::<Subnet>(&s.id)));
        if let Some(pool) = &s.subnetpool_id {
            ops.push(Op::delete(keys::pool_alloc(pool, &s.cidr)));
        }
    }
    // Nodes' ready-but-unused container ports go with the network (as Neutron's DHCP ports
    // do); a node claiming one meanwhile changes its revision and fails this delete.
    let mut cmp = vec![Compare::ModRevision(key(id), mark_rev)];
    for (p, rev) in &pool {
        cmp.push(Compare::ModRevision(lookup::key::<Port>(&p.id), *rev));
        ops.push(Op::delete(lookup::key::<Port>(&p.id)));
        ops.push(Op::delete(keys::mac_alloc(id, &p.mac_address)));
        for f in &p.fixed_ips {
            ops.push(Op::delete(keys::ip_alloc(&f.subnet_id, &f.ip_address)));
        }
    }
    // Its RBAC policies go with it; creating one compares the network's revision, so none
    // appears after the mark.
    for (p, _) in grants::policies_on(ctx, id) {
        if p.object_type == NetworkObject.name() {
            ops.extend(grants::revoke(&p));
        }
    }
    for (f, rev) in &fips {
        cmp.push(Compare::ModRevision(lookup::key::<FloatingIp>(&f.id), *rev));
        ops.push(Op::delete(lookup::key::<FloatingIp>(&f.id)));
        if let (Some(p), Some(ip)) = (&f.port_id, &f.fixed_ip_address) {
            ops.push(Op::delete(keys::fip_assoc(p, ip)));
        }
    }
    if ctx.commit(cmp, ops).await?.is_none() {
        return Err(NeutronError::new(
            409,
            "Conflict",
            "The network changed while it was being deleted; retry",
        ));
    }
    tracing::info!(network = %id, subnets = subnets.len(), pool_ports = pool.len(), floating_ips = fips.len(), "network deleted");
    Ok(())
}
