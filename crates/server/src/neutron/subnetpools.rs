//! Subnet pools (`subnet_allocation`, `default-subnetpools`, `subnetpool-prefix-ops`):
//! prefixes that subnets are cut from. Allocation itself happens in `subnets`; this module
//! keeps pools, their prefixes and their address-scope membership.

use super::common::Grants;
use super::common::{
    check_if_match, description_from, json_bytes, new_id, now, policy_denied, retry, tags_from, Ctx, NResult, Stored,
};
use super::grants::{self, SubnetPoolObject};
use super::lookup::{self, guard, pool_allocations, pool_nets, visible_pool, visible_scope};
use super::query::Prefilter;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use ipnet::IpNet;
use isthmus_model::prefixes;
use isthmus_model::validate::Body;
use isthmus_model::{keys, NeutronError, StandardAttrs, SubnetPool};
use isthmus_store::{Compare, Op, Revision};
use serde_json::{json, Value};

pub struct SubnetPools;

static META: Meta = Meta {
    collection: "subnetpools",
    singular: "subnetpool",
    plural: "subnetpools",
    store: SubnetPool::COLLECTION,
    not_found: SubnetPool::NOT_FOUND,
    bulk: true,
    tags: true,
    indexed: true,
    quota: Some("subnetpool"),
};

impl Resource for SubnetPools {
    fn meta(&self) -> &'static Meta {
        &META
    }
    fn used(&self, ctx: &Ctx<'_>, project: &str) -> usize {
        super::common::count_owned::<SubnetPool>(ctx, project)
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            let g = Grants::all(ctx);
            Ok(ctx
                .all::<SubnetPool>()
                .into_iter()
                .filter(|(p, _)| pre.keeps_owned(&p.id, &p.name, &p.project_id))
                .filter(|(p, _)| lookup::granted_visible(ctx, OBJECT, &p.id, &p.project_id, p.shared, &g))
                .map(|(p, _)| render(ctx, &p, &g))
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        Ok(render(ctx, &visible_pool(ctx, id)?.0, &Grants::of(ctx, id)))
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
}

fn key(id: &str) -> String {
    lookup::key::<SubnetPool>(id)
}

/// The pool's RBAC object type.
const OBJECT: &str = "subnetpool";

/// The API view for the caller: `shared` is true for every project the pool is shared with
/// (`rbac-subnetpool`), as Neutron reports it.
fn render(ctx: &Ctx<'_>, p: &SubnetPool, g: &Grants) -> Value {
    let mut v = p.to_api();
    v["shared"] = Value::Bool(lookup::shared_for(ctx, OBJECT, &p.id, p.shared, g));
    v
}

/// `default_quota`: a non-negative integer, or null for none.
fn quota_from(body: &mut Body) -> NResult<Option<Option<u64>>> {
    let v = match body.take_raw("default_quota") {
        None => return Ok(None),
        Some(Value::Null) => return Ok(Some(None)),
        Some(v) => v,
    };
    let q = match &v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    match q {
        Some(q) if q >= 0 => Ok(Some(Some(q as u64))),
        Some(q) => Err(NeutronError::invalid_attr(
            "default_quota",
            format!("'{q}' should be non-negative"),
        )),
        None => Err(NeutronError::invalid_attr(
            "default_quota",
            format!("'{v}' is not an integer"),
        )),
    }
}

/// Only admins set `shared` and `is_default` (Neutron's default policy).
fn admin_only(ctx: &Ctx<'_>, action: &str, attr: &str) -> NResult<()> {
    if ctx.admin() {
        Ok(())
    } else {
        Err(policy_denied(&format!("rule:{action}_subnetpool:{attr}")))
    }
}

/// The checks for pool `pool_id` with `nets` joining address scope `scope_id`, and the
/// comparisons and writes that keep them true: the scope still there and no other pool of
/// the scope changed meanwhile (every such change rewrites the scope's guard key).
fn join_scope(
    ctx: &Ctx<'_>,
    scope_id: &str,
    pool_id: &str,
    ip_version: u8,
    nets: &[IpNet],
) -> NResult<(Vec<Compare>, Vec<Op>)> {
    // A scope the caller sees is one it may use: its own, or shared with it
    // (`rbac-address-scope`); others' are not found.
    let (scope, srev) = visible_scope(ctx, scope_id)?;
    if scope.ip_version != ip_version {
        return Err(NeutronError::new(
            400,
            "IllegalSubnetPoolIpVersionAssociationToAddressScope",
            format!(
                "Illegal subnetpool association: subnetpool {pool_id} cannot associate with address scope {scope_id} because subnetpool ip_version is not {}.",
                scope.ip_version
            ),
        ));
    }
    for (other, _) in ctx.all::<SubnetPool>() {
        if other.id != pool_id
            && other.address_scope_id.as_deref() == Some(scope_id)
            && prefixes::overlap(&pool_nets(&other), nets)
        {
            return Err(NeutronError::conflict(
                "AddressScopePrefixConflict",
                "Failed to associate address scope: subnetpools within an address scope must have unique prefixes.",
            ));
        }
    }
    let gk = keys::scope_guard(scope_id);
    Ok((
        vec![
            Compare::ModRevision(lookup::key::<isthmus_model::AddressScope>(scope_id), srev),
            guard(ctx, &gk),
        ],
        vec![Op::put(gk, pool_id.as_bytes().to_vec())],
    ))
}

fn already_default() -> NeutronError {
    NeutronError::invalid_input(
        "A default subnetpool for this IP family has already been set. Only one default may exist per IP family",
    )
}

fn strings(nets: &[IpNet]) -> Vec<String> {
    nets.iter().map(|n| n.to_string()).collect()
}

async fn create(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let name = body.string("name")?.unwrap_or_default();
    let description = description_from(&mut body)?.unwrap_or_default();
    let list = body.string_list("prefixes")?.ok_or_else(|| {
        NeutronError::bad_request("Failed to parse request. Required attribute 'prefixes' not specified")
    })?;
    let (nets, ip_version) = prefixes::pool_prefixes(&list)?;
    let b = prefixes::bounds(
        ip_version == 6,
        body.integer("min_prefixlen")?,
        body.integer("max_prefixlen")?,
        body.integer("default_prefixlen")?,
    )?;
    let default_quota = quota_from(&mut body)?.flatten();
    let shared = body.boolean("shared")?.unwrap_or(false);
    let is_default = body.boolean("is_default")?.unwrap_or(false);
    let scope = body.opt_string("address_scope_id")?.flatten();
    let tags = tags_from(ctx, &mut body)?.unwrap_or_default();
    body.finish()?;
    if shared {
        admin_only(ctx, "create", "shared")?;
    }
    if is_default {
        admin_only(ctx, "create", "is_default")?;
    }
    let id = new_id();
    let ts = now();
    let pool = SubnetPool {
        id: id.clone(),
        project_id,
        name,
        ip_version,
        prefixes: strings(&nets),
        default_prefixlen: b.default,
        min_prefixlen: b.min,
        max_prefixlen: b.max,
        default_quota,
        shared,
        is_default,
        address_scope_id: scope.clone(),
        std: StandardAttrs {
            description,
            tags,
            ..StandardAttrs::new(&ts)
        },
    };
    let pool = retry(ctx, |ctx| {
        let (qcmp, qops) = super::quota::check(ctx, "subnetpool", &pool.project_id, 1, || {
            super::common::count_owned::<SubnetPool>(ctx, &pool.project_id)
        })?;
        let mut cmp = vec![Compare::Absent(key(&id))];
        let mut ops = vec![Op::put(key(&id), json_bytes(&pool))];
        cmp.extend(qcmp);
        ops.extend(qops);
        if let Some(s) = &scope {
            let (c, o) = join_scope(ctx, s, &id, ip_version, &nets)?;
            cmp.extend(c);
            ops.extend(o);
        }
        if is_default {
            let dk = keys::default_pool(ip_version);
            if ctx.state.cache.contains(&dk) {
                return Err(already_default());
            }
            cmp.push(Compare::Absent(dk.clone()));
            ops.push(Op::put(dk, id.as_bytes().to_vec()));
        }
        // `shared` is the `*` policy, made with the pool.
        if shared {
            grants::share_with_all(&SubnetPoolObject, &id, &pool.project_id, &mut cmp, &mut ops);
        }
        Ok((cmp, ops, pool.clone()))
    })
    .await?;
    tracing::info!(subnetpool = %pool.id, prefixes = ?pool.prefixes, "subnet pool created");
    Ok(pool.to_api())
}

/// A pool the caller may change: visible, and its own (or any for an admin).
fn writable(ctx: &Ctx<'_>, id: &str) -> NResult<(SubnetPool, Revision)> {
    let (p, r) = visible_pool(ctx, id)?;
    if !ctx.admin() && !ctx.owns(&p.project_id) {
        return Err(NeutronError::forbidden(format!(
            "Modifying subnet pool {id} is not allowed by policy"
        )));
    }
    Ok((p, r))
}

/// What an update or a prefix operation changes, applied to the current pool inside the plan.
#[derive(Default)]
struct Change {
    name: Option<String>,
    description: Option<String>,
    prefixes: Option<Vec<IpNet>>,
    min: Option<i64>,
    max: Option<i64>,
    default: Option<i64>,
    quota: Option<Option<u64>>,
    shared: Option<bool>,
    is_default: Option<bool>,
    scope: Option<Option<String>>,
    tags: Option<Vec<String>>,
}

/// The plan of one change to pool `id`: the pool as it will be, with the comparisons and
/// writes that keep Neutron's rules true at commit time.
fn plan_change(
    ctx: &Ctx<'_>,
    id: &str,
    c: &Change,
    if_match: Option<u64>,
) -> NResult<(Vec<Compare>, Vec<Op>, SubnetPool)> {
    let (mut p, rev) = writable(ctx, id)?;
    check_if_match(if_match, p.std.revision_number)?;
    let mut cmp = vec![Compare::ModRevision(key(id), rev)];
    let mut ops = vec![];
    let old = pool_nets(&p);
    let nets = c.prefixes.clone().unwrap_or_else(|| old.clone());
    if c.prefixes.is_some() {
        // Removing space from a pool must not strand its subnets; the pool's guard key makes
        // an allocation committing meanwhile fail this change.
        for a in pool_allocations(ctx, id) {
            let inside = a.cidr.parse::<IpNet>().is_ok_and(|n| prefixes::covers(&nets, &n));
            if !inside {
                return Err(NeutronError::new(
                    400,
                    "IllegalSubnetPoolUpdate",
                    format!(
                        "Illegal subnetpool update : prefix {} is in use by subnet {}.",
                        a.cidr, a.subnet_id
                    ),
                ));
            }
        }
        let gk = keys::pool_guard(id);
        cmp.push(guard(ctx, &gk));
        ops.push(Op::put(gk, id.as_bytes().to_vec()));
        p.prefixes = strings(&nets);
    }
    let b = prefixes::bounds(
        p.ip_version == 6,
        Some(c.min.unwrap_or(p.min_prefixlen as i64)),
        Some(c.max.unwrap_or(p.max_prefixlen as i64)),
        Some(c.default.unwrap_or(p.default_prefixlen as i64)),
    )?;
    (p.min_prefixlen, p.max_prefixlen, p.default_prefixlen) = (b.min, b.max, b.default);
    if let Some(s) = &c.scope {
        p.address_scope_id = s.clone();
    }
    // Joining a scope, or growing inside one, must not overlap the scope's other pools.
    if let Some(s) = &p.address_scope_id {
        if c.scope.is_some() || c.prefixes.is_some() {
            let (sc, so) = join_scope(ctx, s, id, p.ip_version, &nets)?;
            cmp.extend(sc);
            ops.extend(so);
        }
    }
    if let Some(d) = c.is_default {
        let dk = keys::default_pool(p.ip_version);
        if d && !p.is_default {
            if ctx.state.cache.contains(&dk) {
                return Err(already_default());
            }
            cmp.push(Compare::Absent(dk.clone()));
            ops.push(Op::put(dk, id.as_bytes().to_vec()));
        } else if !d && p.is_default {
            ops.push(Op::delete(dk));
        }
        p.is_default = d;
    }
    if let Some(v) = &c.name {
        p.name = v.clone();
    }
    if let Some(v) = &c.description {
        p.std.description = v.clone();
    }
    if let Some(q) = c.quota {
        p.default_quota = q;
    }
    if let Some(v) = c.shared {
        // The flag is the `*` policy: made when sharing, removed when unsharing unless
        // projects only it covers have subnets from the pool.
        if v && !p.shared {
            grants::share_with_all(&SubnetPoolObject, id, &p.project_id, &mut cmp, &mut ops);
        } else if !v && p.shared {
            ops.extend(grants::unshare(ctx, &SubnetPoolObject, id, &p.project_id)?);
        }
        p.shared = v;
    }
    if let Some(v) = &c.tags {
        p.std.tags = v.clone();
    }
    p.std.bump(&now());
    ops.push(Op::put(key(id), json_bytes(&p)));
    Ok((cmp, ops, p))
}

async fn update(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    writable(ctx, id)?;
    for ro in ["ip_version", "project_id", "tenant_id"] {
        if body.contains(ro) {
            return Err(NeutronError::bad_request(format!(
                "Cannot update read-only attribute {ro}"
            )));
        }
    }
    let mut c = Change {
        name: body.string("name")?,
        description: description_from(&mut body)?,
        ..Change::default()
    };
    if let Some(list) = body.string_list("prefixes")? {
        let (nets, v) = prefixes::pool_prefixes(&list)?;
        let (current, _) = writable(ctx, id)?;
        if v != current.ip_version {
            return Err(NeutronError::new(
                400,
                "PrefixVersionMismatch",
                "Cannot mix IPv4 and IPv6 prefixes in a subnet pool.",
            ));
        }
        // Neutron lets an update only grow a pool; shrinking is remove_prefixes.
        if !pool_nets(&current).iter().all(|n| prefixes::covers(&nets, n)) {
            return Err(NeutronError::new(
                400,
                "IllegalSubnetPoolPrefixUpdate",
                "Illegal update to prefixes: Existing prefixes must be a subset of the new prefixes.",
            ));
        }
        c.prefixes = Some(nets);
    }
    c.min = body.integer("min_prefixlen")?;
    c.max = body.integer("max_prefixlen")?;
    c.default = body.integer("default_prefixlen")?;
    c.quota = quota_from(&mut body)?;
    c.shared = body.boolean("shared")?;
    c.is_default = body.boolean("is_default")?;
    c.scope = body.opt_string("address_scope_id")?;
    c.tags = tags_from(ctx, &mut body)?;
    body.finish()?;
    if c.shared.is_some() {
        admin_only(ctx, "update", "shared")?;
    }
    if c.is_default.is_some() {
        admin_only(ctx, "update", "is_default")?;
    }
    let p = retry(ctx, |ctx| plan_change(ctx, id, &c, if_match)).await?;
    Ok(render(ctx, &p, &Grants::of(ctx, id)))
}

/// `PUT /v2.0/subnetpools/{id}/add_prefixes` and `.../remove_prefixes`: `{"prefixes": [...]}`
/// in, the pool's prefixes out.
pub async fn change_prefixes(ctx: &Ctx<'_>, id: &str, body: Value, add: bool) -> NResult<Value> {
    let action = if add { "add_prefixes" } else { "remove_prefixes" };
    if !ctx.can_read() {
        return Err(super::common::not_found::<SubnetPool>(id));
    }
    visible_pool(ctx, id)?;
    ctx.require_member(action)?;
    let list: Vec<String> = match body.get("prefixes") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(NeutronError::invalid_attr(
                    "prefixes",
                    format!("'{other}' is not a valid IP subnet"),
                )),
            })
            .collect::<NResult<_>>()?,
        _ => {
            return Err(NeutronError::bad_request(
                "Failed to parse request. Required attribute 'prefixes' not specified",
            ))
        }
    };
    let (given, v) = prefixes::pool_prefixes(&list)?;
    let p = retry(ctx, |ctx| {
        let (current, _) = writable(ctx, id)?;
        if v != current.ip_version {
            return Err(NeutronError::new(
                400,
                "IllegalSubnetPoolPrefixUpdate",
                format!(
                    "Illegal update to prefixes: IPv{v} prefixes cannot be {} an IPv{} subnet pool.",
                    if add { "added to" } else { "removed from" },
                    current.ip_version
                ),
            ));
        }
        let old = pool_nets(&current);
        let nets = if add {
            prefixes::compact(&[old, given.clone()].concat())
        } else {
            prefixes::free(&old, &given)
        };
        if nets.is_empty() {
            return Err(NeutronError::new(
                400,
                "IllegalSubnetPoolPrefixUpdate",
                "Illegal update to prefixes: a subnet pool keeps at least one prefix.",
            ));
        }
        let c = Change {
            prefixes: Some(nets),
            ..Change::default()
        };
        plan_change(ctx, id, &c, None)
    })
    .await?;
    tracing::info!(subnetpool = %id, prefixes = ?p.prefixes, action, "subnet pool prefixes changed");
    Ok(json!({ "prefixes": p.prefixes }))
}

async fn delete(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    retry(ctx, |ctx| {
        let (p, rev) = writable(ctx, id)?;
        check_if_match(if_match, p.std.revision_number)?;
        // Every allocation rewrites the guard, so one committing meanwhile fails this delete.
        let gk = keys::pool_guard(id);
        if !pool_allocations(ctx, id).is_empty() {
            return Err(NeutronError::conflict(
                "SubnetPoolInUse",
                format!("Unable to complete operation on subnet pool {id}. Subnets are allocated from it."),
            ));
        }
        let mut cmp = vec![Compare::ModRevision(key(id), rev), guard(ctx, &gk)];
        let mut ops = vec![Op::delete(key(id)), Op::delete(gk)];
        // Its RBAC policies go with it; a policy change rewrites the pool, so none is missed.
        ops.extend(grants::revoke_all(ctx, &SubnetPoolObject, id));
        if p.is_default {
            let dk = keys::default_pool(p.ip_version);
            if ctx.state.cache.get(&dk).is_some_and(|kv| kv.value == id.as_bytes()) {
                cmp.push(Compare::Exists(dk.clone()));
                ops.push(Op::delete(dk));
            }
        }
        Ok((cmp, ops, ()))
    })
    .await?;
    tracing::info!(subnetpool = %id, "subnet pool deleted");
    Ok(())
}
