//! RBAC policies below the resources: the object types policies attach to, the writes that
//! grant and revoke, and Neutron's rule that a grant stays while something depends on it.
//!
//! An object type is one [`RbacObject`] implementation and a line in [`OBJECT_TYPES`].

use super::common::{json_bytes, new_id, not_found, Ctx, Grants, NResult, ACCESS_EXTERNAL, ACCESS_SHARED, WILDCARD};
use super::lookup::{self, FLOATINGIP_OWNER, GATEWAY_OWNER};
use isthmus_model::{
    keys, AddressScope, FloatingIp, Network, NeutronError, Port, RbacPolicy, Router, SecurityGroup, Subnet, SubnetPool,
};
use isthmus_store::{Compare, Op, Revision};
use std::collections::HashSet;
use std::sync::Arc;

/// An object a policy names, whoever owns it.
pub struct Target {
    pub project_id: String,
    /// Its store key and the revision it was read at: writes on its policies compare it, so
    /// none lands on an object deleted meanwhile.
    pub key: String,
    pub revision: Revision,
}

/// One object type RBAC policies attach to.
pub trait RbacObject: Sync {
    /// `object_type` as the API names it.
    fn name(&self) -> &'static str;
    /// The actions a policy on it may grant.
    fn actions(&self) -> &'static [&'static str];
    /// The object, `None` when it does not exist (or is being deleted).
    fn find(&self, ctx: &Ctx<'_>, id: &str) -> Option<Target>;
    /// Whether the caller sees the object.
    fn visible(&self, ctx: &Ctx<'_>, id: &str) -> bool;
    /// Neutron's NotFound for the object.
    fn not_found(&self, id: &str) -> NeutronError;
    /// Projects other than the owner with something that depends on `action` on the object.
    fn bound_projects(&self, ctx: &Ctx<'_>, id: &str, action: &str) -> HashSet<String>;
    /// Writes keeping the object in step with its policies, once a change touching
    /// `touched` leaves `after` (every policy on the object), or why the change cannot be
    /// made. None by default.
    fn sync(&self, _ctx: &Ctx<'_>, _id: &str, _touched: &[&RbacPolicy], _after: &[RbacPolicy]) -> NResult<Vec<Op>> {
        Ok(vec![])
    }
    /// Comparisons a policy change makes besides the object's revision: keys that whatever
    /// starts to depend on a grant rewrites, so a dependant committing meanwhile fails it.
    fn guards(&self, _ctx: &Ctx<'_>, _id: &str) -> Vec<Compare> {
        vec![]
    }
}

/// Every object type policies may name.
pub static OBJECT_TYPES: &[&dyn RbacObject] = &[
    &NetworkObject,
    &SecurityGroupObject,
    &SubnetPoolObject,
    &AddressScopeObject,
];

/// The object type called `name`.
pub fn object_type(name: &str) -> Option<&'static dyn RbacObject> {
    OBJECT_TYPES.iter().copied().find(|t| t.name() == name)
}

pub struct NetworkObject;

impl RbacObject for NetworkObject {
    fn name(&self) -> &'static str {
        "network"
    }
    fn actions(&self) -> &'static [&'static str] {
        &[ACCESS_EXTERNAL, ACCESS_SHARED]
    }
    fn find(&self, ctx: &Ctx<'_>, id: &str) -> Option<Target> {
        ctx.get::<Network>(id)
            .filter(|(n, _)| !n.deleting)
            .map(|(n, rev)| Target {
                project_id: n.project_id,
                key: lookup::key::<Network>(id),
                revision: rev,
            })
    }
    fn visible(&self, ctx: &Ctx<'_>, id: &str) -> bool {
        ctx.get::<Network>(id).is_some_and(|(n, _)| ctx.network_visible(&n))
    }
    fn not_found(&self, id: &str) -> NeutronError {
        not_found::<Network>(id)
    }
    fn bound_projects(&self, ctx: &Ctx<'_>, id: &str, action: &str) -> HashSet<String> {
        if action == ACCESS_SHARED {
            // Ports the L3 API owns (router gateways, floating IP addresses) belong to no
            // project and depend on external access, not on sharing.
            return ctx
                .all::<Port>()
                .into_iter()
                .filter(|(p, _)| p.network_id == id && !p.project_id.is_empty())
                .map(|(p, _)| p.project_id.clone())
                .collect();
        }
        // External access is used by router gateways and floating IPs.
        let mut out: HashSet<String> = ctx
            .all::<Port>()
            .into_iter()
            .filter(|(p, _)| p.network_id == id && p.device_owner == GATEWAY_OWNER)
            .filter_map(|(p, _)| ctx.get::<Router>(&p.device_id).map(|(r, _)| r.project_id))
            .collect();
        out.extend(
            ctx.all::<FloatingIp>()
                .into_iter()
                .filter(|(f, _)| f.floating_network_id == id)
                .map(|(f, _)| f.project_id.clone()),
        );
        out
    }
    fn sync(&self, ctx: &Ctx<'_>, id: &str, touched: &[&RbacPolicy], after: &[RbacPolicy]) -> NResult<Vec<Op>> {
        let Some((mut n, _)) = ctx.get::<Network>(id) else {
            return Ok(vec![]);
        };
        // `shared` is the `*` access_as_shared policy; `router:external` holds while any
        // access_as_external policy does. Flags no touched policy concerns stay as they are
        // (networks older than policies have the flags alone).
        let wildcard_shared = |p: &RbacPolicy| p.action == ACCESS_SHARED && p.target_project == WILDCARD;
        let shared = if touched.iter().any(|p| wildcard_shared(p)) {
            after.iter().any(wildcard_shared)
        } else {
            n.shared
        };
        let external = if touched.iter().any(|p| p.action == ACCESS_EXTERNAL) {
            after.iter().any(|p| p.action == ACCESS_EXTERNAL)
        } else {
            n.external
        };
        if shared == n.shared && external == n.external {
            return Ok(vec![]);
        }
        // Gateway ports and floating IPs would be left on a network no longer external.
        if n.external && !external && external_in_use(ctx, id) {
            return Err(external_network_in_use(id));
        }
        n.shared = shared;
        n.external = external;
        n.std.bump(&super::common::now());
        Ok(vec![Op::put(lookup::key::<Network>(id), json_bytes(&n))])
    }
}

/// Whether router gateways or floating IPs use external network `id`.
pub fn external_in_use(ctx: &Ctx<'_>, id: &str) -> bool {
    ctx.all::<Port>()
        .into_iter()
        .any(|(p, _)| p.network_id == id && matches!(p.device_owner.as_str(), GATEWAY_OWNER | FLOATINGIP_OWNER))
}

/// Neutron's ExternalNetworkInUse.
pub fn external_network_in_use(id: &str) -> NeutronError {
    NeutronError::conflict(
        "ExternalNetworkInUse",
        format!(
            "External network {id} cannot be updated to be made non-external, since it has existing gateway ports."
        ),
    )
}

pub struct SecurityGroupObject;

impl RbacObject for SecurityGroupObject {
    fn name(&self) -> &'static str {
        "security_group"
    }
    fn actions(&self) -> &'static [&'static str] {
        &[ACCESS_SHARED]
    }
    fn find(&self, ctx: &Ctx<'_>, id: &str) -> Option<Target> {
        ctx.get::<SecurityGroup>(id).map(|(g, rev)| Target {
            project_id: g.project_id,
            key: lookup::key::<SecurityGroup>(id),
            revision: rev,
        })
    }
    fn visible(&self, ctx: &Ctx<'_>, id: &str) -> bool {
        lookup::visible_group(ctx, id).is_ok()
    }
    fn not_found(&self, id: &str) -> NeutronError {
        not_found::<SecurityGroup>(id)
    }
    fn bound_projects(&self, ctx: &Ctx<'_>, id: &str, _action: &str) -> HashSet<String> {
        ctx.all::<Port>()
            .into_iter()
            .filter(|(p, _)| p.security_groups.iter().any(|g| g == id))
            .map(|(p, _)| p.project_id.clone())
            .collect()
    }
    fn sync(&self, ctx: &Ctx<'_>, id: &str, _touched: &[&RbacPolicy], _after: &[RbacPolicy]) -> NResult<Vec<Op>> {
        // Rewritten unchanged: a group delete planned without this policy compares the
        // group's revision, so it plans again and deletes the policy with the group.
        Ok(ctx
            .get::<SecurityGroup>(id)
            .map(|(g, _)| vec![Op::put(lookup::key::<SecurityGroup>(id), json_bytes(&g))])
            .unwrap_or_default())
    }
}

/// `shared` of an object whose flag is the `*` access_as_shared policy, once a change
/// touching `touched` leaves `after`; `current` when no touched policy concerns it.
fn wildcard_shared(current: bool, touched: &[&RbacPolicy], after: &[RbacPolicy]) -> bool {
    let wild = |p: &RbacPolicy| p.action == ACCESS_SHARED && p.target_project == WILDCARD;
    if touched.iter().any(|p| wild(p)) {
        after.iter().any(wild)
    } else {
        current
    }
}

/// Subnet pools (`rbac-subnetpool`): a grant lets a project see the pool and allocate
/// subnets from it.
pub struct SubnetPoolObject;

impl RbacObject for SubnetPoolObject {
    fn name(&self) -> &'static str {
        "subnetpool"
    }
    fn actions(&self) -> &'static [&'static str] {
        &[ACCESS_SHARED]
    }
    fn find(&self, ctx: &Ctx<'_>, id: &str) -> Option<Target> {
        ctx.get::<SubnetPool>(id).map(|(p, rev)| Target {
            project_id: p.project_id,
            key: lookup::key::<SubnetPool>(id),
            revision: rev,
        })
    }
    fn visible(&self, ctx: &Ctx<'_>, id: &str) -> bool {
        lookup::visible_pool(ctx, id).is_ok()
    }
    fn not_found(&self, id: &str) -> NeutronError {
        not_found::<SubnetPool>(id)
    }
    fn bound_projects(&self, ctx: &Ctx<'_>, id: &str, _action: &str) -> HashSet<String> {
        ctx.all::<Subnet>()
            .into_iter()
            .filter(|(s, _)| s.subnetpool_id.as_deref() == Some(id))
            .map(|(s, _)| s.project_id.clone())
            .collect()
    }
    fn sync(&self, ctx: &Ctx<'_>, id: &str, touched: &[&RbacPolicy], after: &[RbacPolicy]) -> NResult<Vec<Op>> {
        let Some((mut p, _)) = ctx.get::<SubnetPool>(id) else {
            return Ok(vec![]);
        };
        let shared = wildcard_shared(p.shared, touched, after);
        if shared != p.shared {
            p.shared = shared;
            p.std.bump(&super::common::now());
        }
        // Written even unchanged: an allocation or a pool delete planned without this policy
        // compares the pool's revision, so it plans again.
        Ok(vec![Op::put(lookup::key::<SubnetPool>(id), json_bytes(&p))])
    }
    fn guards(&self, ctx: &Ctx<'_>, id: &str) -> Vec<Compare> {
        // Every allocation from the pool rewrites its guard.
        vec![lookup::guard(ctx, &keys::pool_guard(id))]
    }
}

/// Address scopes (`rbac-address-scope`): a grant lets a project see the scope and put its
/// subnet pools in it.
pub struct AddressScopeObject;

impl RbacObject for AddressScopeObject {
    fn name(&self) -> &'static str {
        "address_scope"
    }
    fn actions(&self) -> &'static [&'static str] {
        &[ACCESS_SHARED]
    }
    fn find(&self, ctx: &Ctx<'_>, id: &str) -> Option<Target> {
        ctx.get::<AddressScope>(id).map(|(s, rev)| Target {
            project_id: s.project_id,
            key: lookup::key::<AddressScope>(id),
            revision: rev,
        })
    }
    fn visible(&self, ctx: &Ctx<'_>, id: &str) -> bool {
        lookup::visible_scope(ctx, id).is_ok()
    }
    fn not_found(&self, id: &str) -> NeutronError {
        not_found::<AddressScope>(id)
    }
    fn bound_projects(&self, ctx: &Ctx<'_>, id: &str, _action: &str) -> HashSet<String> {
        ctx.all::<SubnetPool>()
            .into_iter()
            .filter(|(p, _)| p.address_scope_id.as_deref() == Some(id))
            .map(|(p, _)| p.project_id.clone())
            .collect()
    }
    fn sync(&self, ctx: &Ctx<'_>, id: &str, touched: &[&RbacPolicy], after: &[RbacPolicy]) -> NResult<Vec<Op>> {
        let Some((mut s, _)) = ctx.get::<AddressScope>(id) else {
            return Ok(vec![]);
        };
        let shared = wildcard_shared(s.shared, touched, after);
        if shared != s.shared {
            s.shared = shared;
            s.std.bump(&super::common::now());
        }
        // Written even unchanged, so a pool joining or a scope delete planned without this
        // policy plans again.
        Ok(vec![Op::put(lookup::key::<AddressScope>(id), json_bytes(&s))])
    }
    fn guards(&self, ctx: &Ctx<'_>, id: &str) -> Vec<Compare> {
        // Every pool joining the scope rewrites its guard.
        vec![lookup::guard(ctx, &keys::scope_guard(id))]
    }
}

/// Every policy on object `id` (of any type), with revisions.
pub fn policies_on(ctx: &Ctx<'_>, id: &str) -> Vec<(Arc<RbacPolicy>, Revision)> {
    ctx.all::<RbacPolicy>()
        .into_iter()
        .filter(|(p, _)| p.object_id == id)
        .collect()
}

/// The index key that makes a policy unique.
pub fn grant_key(p: &RbacPolicy) -> String {
    keys::rbac_grant(&p.object_type, &p.object_id, &p.action, &p.target_project)
}

pub fn policy_key(id: &str) -> String {
    lookup::key::<RbacPolicy>(id)
}

/// Neutron's DuplicateRbacPolicy.
pub fn duplicate() -> NeutronError {
    NeutronError::conflict(
        "DuplicateRbacPolicy",
        "An RBAC policy already exists with those values.",
    )
}

/// Neutron's RbacPolicyInUse.
pub fn in_use(object_id: &str, details: &str) -> NeutronError {
    NeutronError::conflict(
        "RbacPolicyInUse",
        format!("RBAC policy on object {object_id} cannot be removed because other objects depend on it.\nDetails: {details}"),
    )
}

/// A new policy and the writes that add it (the caller compares the object's revision).
pub fn grant(
    object_type: &str,
    object_id: &str,
    action: &str,
    target: &str,
    owner: &str,
) -> (RbacPolicy, Vec<Compare>, Vec<Op>) {
    let p = RbacPolicy {
        id: new_id(),
        project_id: owner.to_string(),
        object_type: object_type.to_string(),
        object_id: object_id.to_string(),
        action: action.to_string(),
        target_project: target.to_string(),
    };
    let cmp = vec![Compare::Absent(grant_key(&p)), Compare::Absent(policy_key(&p.id))];
    let ops = vec![
        Op::put(grant_key(&p), p.id.clone()),
        Op::put(policy_key(&p.id), json_bytes(&p)),
    ];
    (p, cmp, ops)
}

/// The writes that remove a policy.
pub fn revoke(p: &RbacPolicy) -> Vec<Op> {
    vec![Op::delete(policy_key(&p.id)), Op::delete(grant_key(p))]
}

/// Neutron's check before `action` on an object stops reaching `lost` (a policy deleted, or
/// moved to another project): refused while a project that only `lost` covered has something
/// depending on the access. `remaining` are the targets of the object's other policies for
/// that action once the change is made.
pub fn check_release(
    ctx: &Ctx<'_>,
    t: &dyn RbacObject,
    id: &str,
    owner: &str,
    action: &str,
    lost: &str,
    remaining: &[&str],
) -> NResult<()> {
    if lost == owner || remaining.contains(&WILDCARD) {
        return Ok(());
    }
    let bound = t.bound_projects(ctx, id, action);
    let stuck: Vec<&String> = if lost == WILDCARD {
        let mut v: Vec<&String> = bound
            .iter()
            .filter(|p| p.as_str() != owner && !remaining.contains(&p.as_str()))
            .collect();
        v.sort();
        v
    } else {
        bound.iter().filter(|p| p.as_str() == lost).collect()
    };
    match stuck.first() {
        None => Ok(()),
        Some(p) => Err(in_use(id, &format!("project_id={p}"))),
    }
}

/// Writes and comparisons that make the `*` access_as_shared policy of an object created or
/// updated with `shared: true`, owned by the object's owner as networks' are.
pub fn share_with_all(t: &dyn RbacObject, id: &str, owner: &str, cmp: &mut Vec<Compare>, ops: &mut Vec<Op>) {
    let (_, c, o) = grant(t.name(), id, ACCESS_SHARED, WILDCARD, owner);
    cmp.extend(c);
    ops.extend(o);
}

/// The writes that turn `shared` off for an object of type `t` whose flag is its `*`
/// policy: refused (RbacPolicyInUse, as Neutron) while a project only `*` covers depends
/// on it.
pub fn unshare(ctx: &Ctx<'_>, t: &dyn RbacObject, id: &str, owner: &str) -> NResult<Vec<Op>> {
    let on: Vec<_> = policies_on(ctx, id)
        .into_iter()
        .filter(|(p, _)| p.object_type == t.name() && p.action == ACCESS_SHARED)
        .collect();
    let remaining: Vec<&str> = on
        .iter()
        .filter(|(p, _)| p.target_project != WILDCARD)
        .map(|(p, _)| p.target_project.as_str())
        .collect();
    check_release(ctx, t, id, owner, ACCESS_SHARED, WILDCARD, &remaining)?;
    Ok(on
        .iter()
        .filter(|(p, _)| p.target_project == WILDCARD)
        .flat_map(|(p, _)| revoke(p))
        .collect())
}

/// The writes removing every policy of type `t` on an object being deleted.
pub fn revoke_all(ctx: &Ctx<'_>, t: &dyn RbacObject, id: &str) -> Vec<Op> {
    policies_on(ctx, id)
        .into_iter()
        .filter(|(p, _)| p.object_type == t.name())
        .flat_map(|(p, _)| revoke(&p))
        .collect()
}

/// Whether `project` may use security group `g` on its ports: its own, or shared with it.
pub fn group_usable(ctx: &Ctx<'_>, g: &SecurityGroup, project: &str) -> bool {
    g.project_id == project || Grants::of(ctx, &g.id).grants("security_group", &g.id, ACCESS_SHARED, project)
}
